//! The command line as a user meets it: help, print-config, precedence, errors with exit code 2,
//! one log line per listener, graceful stop on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_topicgate");

/// The binary in its own working directory (so the default `./data` is the test's own), with
/// no `RUST_LOG` or `TOPICGATE_*` from the caller's environment, then `env` on top.
fn command(args: &[&str], env: &[(&str, &str)], cwd: &std::path::Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(cwd).env_remove("RUST_LOG");
    for (key, _) in std::env::vars() {
        if key.starts_with("TOPICGATE_") {
            cmd.env_remove(key);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let data = tempfile::tempdir().unwrap();
    let mut cmd = command(args, env, data.path());
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "{args:?} exits in time");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn expect_startup_error(out: &Output, needle: &str) {
    assert_eq!(out.status.code(), Some(2), "exit code 2");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].contains(needle), "{:?} names {needle:?}", lines[0]);
}

fn config_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
    f
}

#[test]
fn help_lists_every_flag() {
    let out = run(&["--help"], &[]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--mqtt-addr",
        "--http-addr",
        "--https-addr",
        "--mqtts-addr",
        "TOPICGATE_MQTTS_ADDR",
        "--coap-addr",
        "--data-dir",
        "--log-format",
        "--broker",
        "--broker-username",
        "--broker-password",
        "TOPICGATE_HTTP_ADDR",
        "print-config",
    ] {
        assert!(text.contains(flag), "help mentions {flag}");
    }
}

#[test]
fn print_config_prints_the_documented_defaults() {
    let out = run(&["print-config"], &[]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        include_str!("../../config/topicgate.toml")
    );
}

#[test]
fn bad_flags_env_and_config_exit_2_with_one_line() {
    expect_startup_error(&run(&["--http-addr", "nope"], &[]), "--http-addr");
    expect_startup_error(&run(&["--log-format", "xml"], &[]), "xml");
    expect_startup_error(&run(&["--no-such-flag"], &[]), "--no-such-flag");
    expect_startup_error(
        &run(&[], &[("TOPICGATE_MQTT_ADDR", "localhost")]),
        "--mqtt-addr",
    );
    let f = config_file("[http]\naddr = \"127.0.0.1:0\"\ncolour = \"red\"\n");
    expect_startup_error(
        &run(&["--config", f.path().to_str().unwrap()], &[]),
        "colour",
    );
    let f = config_file("[mqtt]\naddr = \"not an address\"\n");
    expect_startup_error(
        &run(&["--config", f.path().to_str().unwrap()], &[]),
        "line 2",
    );
    let f = config_file("max_payload = \"0\"\n");
    expect_startup_error(
        &run(&["--config", f.path().to_str().unwrap()], &[]),
        "max_payload",
    );
    expect_startup_error(
        &run(&["--config", "/no/such/file.toml"], &[]),
        "/no/such/file.toml",
    );
}

#[test]
fn a_bad_push_or_pull_rule_exits_2_naming_the_rule() {
    let bad = [
        (
            "[[push]]\nname = \"plugs\"\nfilter = \"plugs/#\"\nurl = \"http://{1}.lan/x\"\n",
            "push rule `plugs`",
        ),
        (
            "[[push]]\nname = \"plugs\"\nfilter = \"plugs/+/set\"\nurl = \"http://plugs.lan/{4}\"\n",
            "{4}",
        ),
        (
            "[[push]]\nname = \"hook\"\nfilter = \"a/#\"\nurl = \"http://h/x\"\n\
             headers = { Authorization = \"Bearer ${TOPICGATE_TEST_UNSET_TOKEN}\" }\n",
            "push rule `hook`: header `Authorization` uses ${TOPICGATE_TEST_UNSET_TOKEN}",
        ),
        (
            "[[push]]\nname = \"loop\"\nfilter = \"a/#\"\nurl = \"http://h/x\"\n\
             dead_letter_topic = \"a/dead\"\n",
            "push rule `loop`",
        ),
        (
            "[[auth.acl]]\nuser = \"hook\"\ntopic = \"other/#\"\naccess = \"read\"\n\
             [[push]]\nname = \"acl\"\nfilter = \"a/#\"\nurl = \"http://h/x\"\nprincipal = \"hook\"\n",
            "push rule `acl`: `filter` a/#: principal hook",
        ),
        (
            "[[pull]]\nname = \"temp\"\nurl = \"coap+tcp://h/x\"\ntopic = \"t\"\n",
            "pull rule `temp`",
        ),
        (
            "[[push]]\nname = \"mtls\"\nfilter = \"a/#\"\nurl = \"https://h/x\"\n\
             client_cert = \"/no/such/client.pem\"\nclient_key = \"/no/such/client.key\"\n",
            "push rule `mtls`: `client_cert` /no/such/client.pem",
        ),
    ];
    for (text, needle) in bad {
        let f = config_file(text);
        expect_startup_error(&run(&["--config", f.path().to_str().unwrap()], &[]), needle);
    }
}

#[test]
fn a_busy_port_exits_2_naming_the_address() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let out = run(
        &[
            "--http-addr",
            &addr,
            "--mqtt-addr",
            "127.0.0.1:0",
            "--coap-addr",
            "127.0.0.1:0",
        ],
        &[],
    );
    expect_startup_error(&out, &addr);
    let out = run(
        &[
            "--http-addr",
            "127.0.0.1:0",
            "--mqtt-addr",
            &addr,
            "--coap-addr",
            "127.0.0.1:0",
        ],
        &[],
    );
    expect_startup_error(&out, &addr);
    let busy_udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp = busy_udp.local_addr().unwrap().to_string();
    let out = run(
        &[
            "--http-addr",
            "127.0.0.1:0",
            "--mqtt-addr",
            "127.0.0.1:0",
            "--coap-addr",
            &udp,
        ],
        &[],
    );
    expect_startup_error(&out, &udp);
    assert!(String::from_utf8_lossy(&out.stderr).contains("CoAP"));
}

struct Running {
    child: Child,
    lines: Vec<String>,
    /// The working directory, so the default `./data` is the test's own.
    _cwd: tempfile::TempDir,
    /// Later stderr lines; kept open so the child's logging never meets a closed pipe.
    stderr: std::sync::mpsc::Receiver<String>,
}

impl Drop for Running {
    /// A failed assertion must not leave the gateway running and holding its ports.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts the binary and reads stderr until all three listeners are logged.
fn start(args: &[&str], env: &[(&str, &str)]) -> Running {
    let cwd = tempfile::tempdir().unwrap();
    // Every started gateway takes a free CoAP port unless a test says otherwise.
    let env: Vec<(&str, &str)> = [("TOPICGATE_COAP_ADDR", "127.0.0.1:0")]
        .into_iter()
        .chain(env.iter().copied())
        .collect();
    let mut cmd = command(args, &env, cwd.path());
    let mut child = cmd
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Owned from here on, so a failed wait still stops the child.
    let (_, placeholder) = std::sync::mpsc::channel();
    let mut running = Running {
        child,
        lines: Vec::new(),
        _cwd: cwd,
        stderr: placeholder,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while running
        .lines
        .iter()
        .filter(|l: &&String| l.contains("listening"))
        .count()
        < 3
    {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("listeners logged; got {:?}", running.lines));
        running.lines.push(line);
    }
    running.stderr = rx;
    running
}

fn listening_line<'a>(r: &'a Running, protocol: &str) -> &'a str {
    r.lines
        .iter()
        .find(|l| l.contains("listening") && l.contains(&format!("\"{protocol}\"")))
        .map(String::as_str)
        .unwrap_or_else(|| panic!("a {protocol} line in {:?}", r.lines))
}

/// The address a JSON-logging gateway says it bound for `protocol`.
fn bound_addr(r: &Running, protocol: &str) -> String {
    let line: serde_json::Value =
        serde_json::from_str(listening_line(r, protocol)).expect("json log line");
    line["fields"]["addr"]
        .as_str()
        .expect("an addr field")
        .to_owned()
}

fn terminate(r: Running) {
    sigterm(&r);
    exits_0(r);
}

fn sigterm(r: &Running) {
    let status = Command::new("kill")
        .args(["-TERM", &r.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits for a process sent SIGTERM to exit 0 within its drain and grace periods.
fn exits_0(mut r: Running) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = r.child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(0), "graceful exit");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "exits within the drain and grace periods"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn logs_each_bound_listener_and_stops_on_sigterm() {
    let r = start(
        &[
            "--http-addr",
            "127.0.0.1:0",
            "--mqtt-addr",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ],
        &[],
    );
    let coap: serde_json::Value =
        serde_json::from_str(listening_line(&r, "coap")).expect("json log line");
    assert!(
        coap["fields"]["addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    let http = listening_line(&r, "http");
    let v: serde_json::Value = serde_json::from_str(http).expect("json log line");
    let addr = v["fields"]["addr"].as_str().unwrap();
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "the bound port: {addr}"
    );
    terminate(r);
}

#[test]
fn flags_beat_env_which_beats_the_config_file() {
    let f = config_file(
        "[http]\naddr = \"127.0.0.2:0\"\n[mqtt]\naddr = \"127.0.0.2:0\"\n[coap]\naddr = \"127.0.0.2:0\"\n",
    );
    let path = f.path().to_str().unwrap();
    let r = start(
        &["--config", path],
        &[("TOPICGATE_MQTT_ADDR", "127.0.0.3:0")],
    );
    assert!(
        listening_line(&r, "http").contains("127.0.0.2:"),
        "file beats default"
    );
    assert!(
        listening_line(&r, "mqtt").contains("127.0.0.3:"),
        "env beats file"
    );
    assert!(
        listening_line(&r, "coap").contains("127.0.0.1:"),
        "env beats file for CoAP too"
    );
    terminate(r);
    let r = start(
        &[
            "--config",
            path,
            "--mqtt-addr",
            "127.0.0.4:0",
            "--coap-addr",
            "127.0.0.4:0",
        ],
        &[("TOPICGATE_MQTT_ADDR", "127.0.0.3:0")],
    );
    assert!(
        listening_line(&r, "mqtt").contains("127.0.0.4:"),
        "flag beats env"
    );
    assert!(listening_line(&r, "coap").contains("127.0.0.4:"));
    terminate(r);
}

#[test]
fn sigterm_turns_readyz_to_503_while_still_serving_then_exits_0() {
    let f = config_file("shutdown_drain = \"3s\"\n");
    let r = start(
        &[
            "--config",
            f.path().to_str().unwrap(),
            "--http-addr",
            "127.0.0.1:0",
            "--mqtt-addr",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ],
        &[],
    );
    let addr = bound_addr(&r, "http");
    let readyz = |addr: &str| -> Option<String> {
        use std::io::{Read, Write};
        let mut s = match std::net::TcpStream::connect(addr) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("connect {addr}: {e}");
                return None;
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        if let Err(e) = s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        {
            eprintln!("write: {e}");
            return None;
        }
        let mut text = String::new();
        if let Err(e) = s.read_to_string(&mut text) {
            eprintln!("read: {e} after {text:?}");
            return None;
        }
        text.lines().next().map(str::to_owned)
    };
    assert!(readyz(&addr).unwrap().contains(" 200 "));
    sigterm(&r);
    // Still answering, but no longer ready.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let line = readyz(&addr).expect("the listener still serves while draining");
        if line.contains(" 503 ") {
            break;
        }
        assert!(Instant::now() < deadline, "readyz turns 503");
        std::thread::sleep(Duration::from_millis(10));
    }
    exits_0(r);
}

#[test]
fn a_closed_log_pipe_does_not_stop_the_gateway() {
    // Draining adds a log line before "shutting down", so at least one line meets the closed
    // pipe.
    let f = config_file("shutdown_drain = \"100ms\"\n");
    let path = f.path().to_str().unwrap();
    let mut r = start(
        &[
            "--config",
            path,
            "--http-addr",
            "127.0.0.1:0",
            "--mqtt-addr",
            "127.0.0.1:0",
        ],
        &[],
    );
    // Nobody reads stderr any more: the reader thread stops at the next line and the pipe
    // closes, so the lines logged while shutting down meet a broken pipe.
    r.stderr = std::sync::mpsc::channel().1;
    terminate(r);
}

#[test]
fn a_mistyped_flag_keeps_clap_s_suggestion() {
    let out = run(&["--htp-addr", "127.0.0.1:0"], &[]);
    expect_startup_error(&out, "--htp-addr");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tip:") && stderr.contains("'--http-addr'"),
        "{stderr}"
    );
}

/// The next stderr line containing `needle`, within 10 s.
fn line_with(r: &Running, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    if let Some(line) = r.lines.iter().find(|l| l.contains(needle)) {
        return line.clone();
    }
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = r
            .stderr
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("a line with {needle:?}"));
        if line.contains(needle) {
            return line;
        }
    }
}

/// Sends one raw HTTP/1.1 request and returns the status line.
fn raw_request(addr: &str, head: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines().next().unwrap_or_default().to_owned()
}

#[test]
fn startup_names_version_and_urls_refusals_are_logged_and_healthcheck_probes() {
    let r = start(
        &[
            "--http-addr",
            "127.0.0.1:0",
            "--mqtt-addr",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ],
        &[],
    );
    let addr = bound_addr(&r, "http");
    let ready: serde_json::Value = serde_json::from_str(&line_with(&r, "\"version\"")).unwrap();
    assert_eq!(ready["fields"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(ready["fields"]["explorer"], format!("http://{addr}/"));
    assert_eq!(ready["fields"]["docs"], format!("http://{addr}/docs"));

    let status = raw_request(
        &addr,
        "POST /topics/a%2Bb HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert!(status.contains(" 400 "), "{status}");
    let refused: serde_json::Value =
        serde_json::from_str(&line_with(&r, "client refused")).unwrap();
    assert_eq!(refused["level"], "INFO");
    assert!(
        refused["fields"]["peer"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert!(
        refused["fields"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("400 invalid_topic"),
        "{refused}"
    );

    // So is a request hyper cannot parse.
    let status = raw_request(&addr, "NOT HTTP AT ALL\r\n\r\n");
    assert!(status.contains(" 400 "), "{status}");
    let unparsed: serde_json::Value = serde_json::from_str(&line_with(&r, "closed: ")).unwrap();
    assert_eq!(unparsed["fields"]["protocol"], "http");

    // A malformed CoAP datagram is a refused client too.
    let coap: serde_json::Value = serde_json::from_str(listening_line(&r, "coap")).unwrap();
    let coap = coap["fields"]["addr"].as_str().unwrap().to_owned();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.send_to(&[0x40, 0x01], &coap).unwrap();
    let malformed: serde_json::Value =
        serde_json::from_str(&line_with(&r, "malformed datagram")).unwrap();
    assert_eq!(malformed["fields"]["protocol"], "coap");
    assert_eq!(
        malformed["fields"]["peer"],
        socket.local_addr().unwrap().to_string()
    );

    let data = tempfile::tempdir().unwrap();
    let probe = command(&["--http-addr", &addr, "healthcheck"], &[], data.path())
        .output()
        .unwrap();
    assert_eq!(probe.status.code(), Some(0), "{probe:?}");
    terminate(r);
    let probe = command(&["--http-addr", &addr, "healthcheck"], &[], data.path())
        .output()
        .unwrap();
    assert_eq!(probe.status.code(), Some(1), "{probe:?}");
    assert!(String::from_utf8_lossy(&probe.stderr).contains("unhealthy"));
}
