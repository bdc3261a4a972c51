//! The latency a push rule adds: publishes timestamped MQTT 3.1.1 QoS 0 messages at a fixed
//! `--rate`, each on a topic of its own under `--prefix`, and times their arrival at an HTTP
//! sink this tool serves on `--sink` (the rule's URL points there). With `--direct`, the
//! reference: the same bodies POSTed straight to the sink over keep-alive connections.
//! `push-latency --mqtt 127.0.0.1:1883 --sink 127.0.0.1:18081 --rate 10000 --count 50000`

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use bytes::BytesMut;
use clap::Parser;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, Publish};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use topicgate_bench::http::HttpConn;
use topicgate_bench::pace::{LATE, Schedule, slot_time};
use topicgate_bench::{Latencies, Report, age, parse_duration, random_hex, stamped};

/// Open-loop publishes, timed at an HTTP sink.
#[derive(Parser)]
struct Args {
    /// The gateway's MQTT address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt: SocketAddr,
    /// Where the sink listens.
    #[arg(long)]
    sink: SocketAddr,
    /// Messages per second.
    #[arg(long, default_value_t = 5000.0)]
    rate: f64,
    /// Messages in total.
    #[arg(long, default_value_t = 20_000)]
    count: u64,
    /// Payload bytes (at least 8, for the timestamp).
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Topic prefix; message n goes to `<prefix>/<random hex>-<n>`.
    #[arg(long, default_value = "push")]
    prefix: String,
    /// POST straight to the sink instead of publishing (the reference).
    #[arg(long)]
    direct: bool,
    /// Keep-alive connections of `--direct`, each with one request in flight.
    #[arg(long, default_value_t = 32)]
    connections: u64,
    /// How long the sink may take, after the last publish, to receive the rest.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
}

/// What the sink saw.
#[derive(Default)]
struct Seen {
    latencies: Latencies,
    count: u64,
    last: Option<Instant>,
}

type Sink = Arc<Mutex<Seen>>;

async fn receive(State(seen): State<Sink>, body: Bytes) -> StatusCode {
    let latency = age(&body);
    let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(latency) = latency {
        seen.latencies.record(latency);
        seen.count += 1;
        seen.last = Some(Instant::now());
    }
    StatusCode::NO_CONTENT
}

/// Publishes a message at each slot of a run at `--rate` from `start`, on one connection, from
/// the thread it is called on: it sleeps to the next slot, then writes every slot due by then
/// in one write, each message stamped as it is written. A pacing thread handing slots to a
/// task cost a wake-up of each per message, which at 30,000/s took a good part of a core
/// beside the gateway measured. Returns the number of slots written more than `LATE` after
/// their time.
fn publish(args: &Args, start: Instant) -> anyhow::Result<u64> {
    let mut conn = std::net::TcpStream::connect(args.mqtt)
        .with_context(|| format!("connecting to {}", args.mqtt))?;
    conn.set_nodelay(true)?;
    let mut out = BytesMut::new();
    let mut connect = Connect::new(format!("push-latency-{}", random_hex()));
    connect.keep_alive = 600;
    connect.write(&mut out)?;
    conn.write_all(&out)?;
    let run = random_hex();
    let mut late = 0;
    let mut n = 0;
    while n < args.count {
        let now = Instant::now();
        let at = slot_time(start, args.rate, n);
        if now < at {
            std::thread::sleep(at - now);
            continue;
        }
        out.clear();
        while n < args.count {
            let at = slot_time(start, args.rate, n);
            if at > now {
                break;
            }
            if now > at + LATE {
                late += 1;
            }
            let topic = format!("{}/{run}-{n}", args.prefix);
            Publish::new(topic, QoS::AtMostOnce, stamped(args.payload)).write(&mut out)?;
            n += 1;
        }
        conn.write_all(&out)?;
    }
    Ok(late)
}

/// POSTs a message at each slot of the schedule it takes.
async fn post(args: Arc<Args>, schedule: Arc<Schedule>) -> anyhow::Result<()> {
    let mut conn = HttpConn::connect(args.sink).await?;
    while schedule.take().await.is_some() {
        let body = stamped(args.payload);
        let status = conn
            .send("POST", "/in/x", "application/octet-stream", &body)
            .await?;
        if status != 204 {
            bail!("the sink answered {status}");
        }
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    if args.rate.is_nan() || args.rate <= 0.0 || args.connections == 0 {
        bail!("--rate and --connections must be above 0");
    }
    let seen: Sink = Arc::default();
    let listener = TcpListener::bind(args.sink)
        .await
        .with_context(|| format!("binding {}", args.sink))?;
    let app = Router::new().fallback(receive).with_state(seen.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    // A short lead lets every connection open before its first slot.
    let start = Instant::now() + Duration::from_millis(50);
    let late = if args.direct {
        let pacer = Schedule::start(args.rate, args.count, start, args.connections)?;
        let mut senders = JoinSet::new();
        for _ in 0..args.connections {
            senders.spawn(post(args.clone(), pacer.schedule.clone()));
        }
        while let Some(joined) = senders.join_next().await {
            joined??;
        }
        pacer.late()
    } else {
        let args = args.clone();
        tokio::task::spawn_blocking(move || publish(&args, start)).await??
    };
    let deadline = Instant::now() + args.timeout;
    let count = || seen.lock().unwrap_or_else(PoisonError::into_inner).count;
    while count() < args.count && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.abort();
    let seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
    let elapsed = seen
        .last
        .map_or(Duration::ZERO, |last| last.saturating_duration_since(start));
    let scenario = if args.direct {
        "http post -> sink"
    } else {
        "mqtt publish -> push rule -> sink"
    };
    Report::new(scenario, seen.count, elapsed, &seen.latencies)
        .with("sent", args.count)
        .with("lost", args.count.saturating_sub(seen.count))
        .with("rate_target", args.rate)
        .with("late", late)
        .print();
    Ok(())
}
