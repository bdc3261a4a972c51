//! HTTP-to-MQTT latency: POSTs timestamped bodies at a fixed `--rate` over keep-alive connections
//! and measures their arrival at an MQTT 3.1.1 QoS 0 subscriber of the same topic, which runs
//! on a thread of its own.
//! `bridge-latency --http 127.0.0.1:8080 --mqtt 127.0.0.1:1883 --rate 5000 --count 20000`

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::BytesMut;
use clap::Parser;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PingReq, SubAck, Subscribe, SubscribeReasonCode,
};
use rumqttc::mqttbytes::{Error as MqttError, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use topicgate_bench::http::{HttpConn, encode_path};
use topicgate_bench::pace::Schedule;
use topicgate_bench::{Latencies, Report, age, on_own_thread, parse_duration, random_hex, stamped};

/// Open-loop HTTP POST load, timed at an MQTT subscriber.
#[derive(Parser)]
struct Args {
    /// The gateway's HTTP address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// The gateway's MQTT address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt: SocketAddr,
    /// Publishes per second, over all connections.
    #[arg(long, default_value_t = 5000.0)]
    rate: f64,
    /// Publishes in total.
    #[arg(long, default_value_t = 20_000)]
    count: u64,
    /// Body bytes (at least 8, for the timestamp).
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Keep-alive HTTP connections, each with one request in flight: enough that a slot
    /// seldom waits for a free one at the rates measured.
    #[arg(long, default_value_t = 16)]
    connections: u64,
    /// Topic; default `bench/latency/<random hex>`.
    #[arg(long)]
    topic: Option<String>,
    /// How long the subscriber may take, after the last publish, to receive the rest.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
}

const MAX_PACKET: usize = 16 * 1024 * 1024;

/// Reads the next MQTT packet, reading more from `conn` as needed.
async fn next_packet(conn: &mut TcpStream, buf: &mut BytesMut) -> anyhow::Result<Packet> {
    loop {
        match Packet::read(buf, MAX_PACKET) {
            Ok(packet) => return Ok(packet),
            Err(MqttError::InsufficientBytes(n)) => {
                buf.reserve(n.max(4096));
                if conn.read_buf(buf).await? == 0 {
                    bail!("the broker closed the connection");
                }
            }
            Err(e) => bail!("a malformed MQTT packet: {e}"),
        }
    }
}

/// Connects, subscribes to `topic` at QoS 0 and returns once the SUBACK grants it.
async fn subscribe(addr: SocketAddr, topic: &str) -> anyhow::Result<(TcpStream, BytesMut)> {
    let mut conn = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    conn.set_nodelay(true)?;
    let mut out = BytesMut::new();
    let mut connect = Connect::new(format!("bridge-latency-{}", random_hex()));
    connect.keep_alive = 60;
    connect.write(&mut out)?;
    let mut subscribe = Subscribe::new(topic, QoS::AtMostOnce);
    subscribe.pkid = 1;
    subscribe.write(&mut out)?;
    conn.write_all(&out).await?;

    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        match next_packet(&mut conn, &mut buf).await? {
            Packet::ConnAck(ConnAck { code, .. }) if code != ConnectReturnCode::Success => {
                bail!("the broker refused the connection: {code:?}")
            }
            Packet::SubAck(SubAck { return_codes, .. }) => {
                return match return_codes.first() {
                    Some(SubscribeReasonCode::Success(_)) => Ok((conn, buf)),
                    _ => bail!("the broker refused the subscription to {topic}"),
                };
            }
            _ => {}
        }
    }
}

/// What the subscriber saw.
#[derive(Default)]
struct Received {
    latencies: Latencies,
    count: u64,
    short: u64,
    last: Option<Instant>,
}

async fn receive(
    mut conn: TcpStream,
    mut buf: BytesMut,
    counter: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<Received> {
    let mut received = Received::default();
    let mut ping = tokio::time::interval(Duration::from_secs(30));
    ping.tick().await;
    let mut out = BytesMut::with_capacity(2);
    loop {
        tokio::select! {
            packet = next_packet(&mut conn, &mut buf) => {
                if let Packet::Publish(publish) = packet? {
                    match age(&publish.payload) {
                        Some(latency) => {
                            received.latencies.record(latency);
                            received.count += 1;
                            received.last = Some(Instant::now());
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                        None => received.short += 1,
                    }
                }
            }
            _ = ping.tick() => {
                out.clear();
                PingReq.write(&mut out)?;
                conn.write_all(&out).await?;
            }
            _ = stop.changed() => return Ok(received),
        }
    }
}

/// What one publishing connection did.
#[derive(Default)]
struct Sent {
    ok: u64,
    errors: u64,
    first_error: Option<u16>,
}

/// Sends a publish at each slot of the schedule it takes.
async fn publish(args: Arc<Args>, path: Arc<str>, schedule: Arc<Schedule>) -> anyhow::Result<Sent> {
    let mut conn = HttpConn::connect(args.http).await?;
    let mut sent = Sent::default();
    while schedule.take().await.is_some() {
        match conn
            .send(
                "POST",
                &path,
                "application/octet-stream",
                &stamped(args.payload),
            )
            .await?
        {
            204 => sent.ok += 1,
            status => {
                sent.errors += 1;
                sent.first_error.get_or_insert(status);
            }
        }
    }
    Ok(sent)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    if args.rate.is_nan() || args.rate <= 0.0 || args.connections == 0 {
        bail!("--rate and --connections must be above 0");
    }
    let topic = args
        .topic
        .clone()
        .unwrap_or_else(|| format!("bench/latency/{}", random_hex()));
    let path: Arc<str> = format!("/topics/{}", encode_path(&topic)).into();

    let counter = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, ready) = oneshot::channel();
    let subscriber = {
        let (mqtt, counter) = (args.mqtt, counter.clone());
        on_own_thread("subscriber", move || async move {
            let (conn, buf) = match subscribe(mqtt, &topic).await {
                Ok(subscribed) => subscribed,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Ok(Received::default());
                }
            };
            let _ = ready_tx.send(Ok(()));
            receive(conn, buf, counter, stop_rx).await
        })?
    };
    ready.await.context("the subscriber's thread ended")??;

    // A short lead lets every connection open before its first slot.
    let start = Instant::now() + Duration::from_millis(50);
    let pacer = Schedule::start(args.rate, args.count, start, args.connections)?;
    let mut publishers = JoinSet::new();
    for _ in 0..args.connections {
        publishers.spawn(publish(args.clone(), path.clone(), pacer.schedule.clone()));
    }
    let mut sent = Sent::default();
    while let Some(joined) = publishers.join_next().await {
        let one = joined??;
        sent.ok += one.ok;
        sent.errors += one.errors;
        if sent.first_error.is_none() {
            sent.first_error = one.first_error;
        }
    }
    let late = pacer.late();
    if let Some(status) = sent.first_error {
        eprintln!(
            "{} publishes failed, the first with status {status}",
            sent.errors
        );
    }

    let deadline = Instant::now() + args.timeout;
    while counter.load(Ordering::Relaxed) < sent.ok && Instant::now() < deadline {
        if subscriber.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop_tx.send(true);
    let received = subscriber
        .join()
        .map_err(|_| anyhow::anyhow!("the subscriber panicked"))??;
    if received.short > 0 {
        eprintln!("{} messages too short to carry a timestamp", received.short);
    }

    let elapsed = received
        .last
        .map_or(Duration::ZERO, |last| last.saturating_duration_since(start));
    Report::new(
        "http post -> mqtt",
        received.count,
        elapsed,
        &received.latencies,
    )
    .with("sent", sent.ok)
    .with("lost", sent.ok.saturating_sub(received.count))
    .with("rate_target", args.rate)
    .with("http_errors", sent.errors)
    .with("late", late)
    .with("connections", args.connections)
    .print();
    Ok(())
}
