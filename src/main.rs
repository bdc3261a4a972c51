//! The `topicgate` command: flags, logging, configuration, then the gateway until a signal.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use topicgate::config::{DEFAULT_TOML, LogFormat};
use topicgate::{Config, Gateway};

/// MQTT broker, HTTP API and CoAP endpoint sharing one topic space.
#[derive(Debug, Parser)]
#[command(name = "topicgate", version, about)]
struct Cli {
    /// Configuration file (TOML); see `topicgate print-config`.
    #[arg(long, env = "TOPICGATE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// MQTT listener address [default: port 1883 on loopback (127.0.0.1 and ::1) while [auth]
    /// lets anonymous clients do everything, else 0.0.0.0:1883].
    #[arg(long, env = "TOPICGATE_MQTT_ADDR", value_name = "ADDR")]
    mqtt_addr: Option<SocketAddr>,
    /// HTTP listener address [default: port 8080, loopback or all interfaces as for MQTT].
    #[arg(long, env = "TOPICGATE_HTTP_ADDR", value_name = "ADDR")]
    http_addr: Option<SocketAddr>,
    /// MQTT over TLS listener address, opened when [tls] names a certificate
    /// [default: 0.0.0.0:8883].
    #[arg(long, env = "TOPICGATE_MQTTS_ADDR", value_name = "ADDR")]
    mqtts_addr: Option<SocketAddr>,
    /// HTTPS listener address, opened when [tls] names a certificate [default: 0.0.0.0:8443].
    #[arg(long, env = "TOPICGATE_HTTPS_ADDR", value_name = "ADDR")]
    https_addr: Option<SocketAddr>,
    /// CoAP socket address [default: port 5683, loopback or all interfaces as for MQTT].
    #[arg(long, env = "TOPICGATE_COAP_ADDR", value_name = "ADDR")]
    coap_addr: Option<SocketAddr>,
    /// CoAP over DTLS socket address, opened when [[auth.psk]] or [tls] names a key
    /// [default: 0.0.0.0:5684].
    #[arg(long, env = "TOPICGATE_COAPS_ADDR", value_name = "ADDR")]
    coaps_addr: Option<SocketAddr>,
    /// Directory for the gateway's state [default: ./data].
    #[arg(long, env = "TOPICGATE_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Front an external MQTT broker, mqtt://host[:port], instead of the embedded one.
    #[arg(long, env = "TOPICGATE_BROKER", value_name = "URL")]
    broker: Option<String>,
    /// User name for the external broker.
    #[arg(long, env = "TOPICGATE_BROKER_USERNAME", value_name = "NAME")]
    broker_username: Option<String>,
    /// Password for the external broker (prefer the environment variable).
    #[arg(
        long,
        env = "TOPICGATE_BROKER_PASSWORD",
        value_name = "PASSWORD",
        hide_env_values = true
    )]
    broker_password: Option<String>,
    /// Log format [default: text].
    #[arg(long, env = "TOPICGATE_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the documented default configuration file.
    PrintConfig,
    /// Read a password (prompted twice on a terminal, else the first line of standard input)
    /// and print its argon2 hash for `password_hash` in `[[auth.users]]`.
    Passwd,
    /// GET /healthz from the HTTP listener the configuration names (as a container health
    /// check does); exit 0 when it answers 200, else 1 with the reason.
    Healthcheck,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print and exit 0 as clap does.
        Err(e) if !e.use_stderr() => e.exit(),
        // A bad flag: one line, exit code 2, like every other startup error, keeping clap's
        // "a similar argument exists" tip.
        Err(e) => {
            let text = e.to_string();
            let line = text.lines().next().unwrap_or("invalid arguments");
            let line = line.trim_start_matches("error: ");
            let tips: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| l.starts_with("tip:"))
                .collect();
            let tips = if tips.is_empty() {
                String::new()
            } else {
                format!(" ({})", tips.join("; "))
            };
            let _ = writeln!(std::io::stderr(), "topicgate: error: {line}{tips}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::PrintConfig) = cli.command {
        return match std::io::stdout().write_all(DEFAULT_TOML.as_bytes()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        };
    }
    if let Some(Command::Passwd) = cli.command {
        return match read_password()
            .and_then(|p| topicgate::policy::hash_password(&p).map_err(|e| anyhow::anyhow!("{e}")))
        {
            Ok(hash) => match writeln!(std::io::stdout(), "{hash}") {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            },
            Err(e) => fail(&e),
        };
    }
    let config = match load(&cli) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    if let Some(Command::Healthcheck) = cli.command {
        let addr = config.http_addrs()[0];
        return match topicgate::probe::healthz(addr, std::time::Duration::from_secs(3)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "topicgate: unhealthy: {e}");
                ExitCode::FAILURE
            }
        };
    }
    init_tracing(config.log_format);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    // Connections are served in the order their sockets became ready. By default a worker
    // runs the task it woke last first (its "LIFO slot"), so of two clients whose packets
    // arrive together the later one is served first: a PUBLISH sent just after another
    // client's SUBSCRIBE could reach the router ahead of it and miss that subscriber, which a
    // broker that reads its clients in turn (Mosquitto) never does.
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => return fail(&anyhow::anyhow!("cannot start the runtime: {e}")),
    };
    let result = runtime.block_on(async {
        let shutdown = shutdown_signal();
        let gateway = Gateway::bind(config).await?;
        gateway.run(shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e.into()),
    }
}

fn load(cli: &Cli) -> anyhow::Result<Config> {
    let mut config = Config::load(cli.config.as_deref())?;
    if let Some(a) = cli.mqtt_addr {
        config.mqtt.given_addr = Some(a);
    }
    if let Some(a) = cli.mqtts_addr {
        config.mqtt.tls_addr = a;
    }
    if let Some(a) = cli.https_addr {
        config.http.tls_addr = a;
    }
    if let Some(a) = cli.http_addr {
        config.http.addr = Some(a);
    }
    if let Some(a) = cli.coap_addr {
        config.coap.addr = Some(a);
    }
    if let Some(a) = cli.coaps_addr {
        config.coap.dtls_addr = a;
    }
    if let Some(d) = &cli.data_dir {
        config.data_dir.clone_from(d);
    }
    if let Some(url) = &cli.broker {
        config.broker.url.clone_from(url);
    }
    if let Some(user) = &cli.broker_username {
        config.broker.username = Some(user.clone());
    }
    if let Some(password) = &cli.broker_password {
        config.broker.password = Some(password.clone());
    }
    if let Some(f) = cli.log_format {
        config.log_format = f;
    }
    config.validate()?;
    Ok(config)
}

/// The password to hash: asked for twice without echo on a terminal, else one line of input.
fn read_password() -> anyhow::Result<String> {
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ")?;
        let again = rpassword::prompt_password("Again: ")?;
        if first != again {
            anyhow::bail!("the passwords differ");
        }
        first
    } else {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        line.trim_end_matches(['\n', '\r']).to_owned()
    };
    if password.is_empty() {
        anyhow::bail!("the password is empty");
    }
    Ok(password)
}

/// One line on stderr and exit code 2, for every startup error.
fn fail(error: &anyhow::Error) -> ExitCode {
    // Each error's own message already names its cause; `{:#}` would repeat it.
    let _ = writeln!(std::io::stderr(), "topicgate: error: {error}");
    ExitCode::from(2)
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    // rumqttd logs ordinary client disconnects as errors; its listener problems surface through
    // the gateway's own messages.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rumqttd=off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_writer(std::io::stderr)
        // By default a failed log write is reported with `eprint!`, which panics when stderr
        // itself is gone (a closed pipe): the gateway would die for want of a log reader.
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on the first SIGINT or SIGTERM. The handlers are installed when this is called, so a
/// signal that arrives once the listeners are announced is never missed.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let interrupt = signal(SignalKind::interrupt());
    let terminate = signal(SignalKind::terminate());
    async move {
        let wait = |s: std::io::Result<tokio::signal::unix::Signal>| async move {
            match s {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = wait(interrupt) => {},
            () = wait(terminate) => {},
        }
    }
}
