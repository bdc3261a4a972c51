//! A CoAP device observed by many pull rules, timed at an MQTT subscriber: answers every GET
//! with Observe 0 by registering the observer, waits for `--observers` of them, then sends
//! timestamped notifications (NON, every 20th CON) round-robin at `--rate` in all for
//! `--duration`, and counts what reaches `--topic` (an MQTT 3.1.1 QoS 0 subscription).
//! `coap-device --addr 127.0.0.1:5699 --observers 1000 --mqtt 127.0.0.1:1883 --topic 'pull/#'`

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::BytesMut;
use clap::Parser;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use rumqttc::mqttbytes::v4::{Connect, Packet as Mqtt, SubAck, Subscribe, SubscribeReasonCode};
use rumqttc::mqttbytes::{Error as MqttError, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::watch;
use topicgate_bench::{Latencies, Report, age, parse_duration, random_hex, stamped};

/// An observed CoAP device.
#[derive(Parser)]
struct Args {
    /// UDP address to serve on.
    #[arg(long)]
    addr: SocketAddr,
    /// Observers to wait for before notifying.
    #[arg(long, default_value_t = 1000)]
    observers: usize,
    /// How long to wait for them.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    register_timeout: Duration,
    /// Notifications per second, over all observers.
    #[arg(long, default_value_t = 10_000.0)]
    rate: f64,
    /// How long to notify.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// The gateway's MQTT address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt: SocketAddr,
    /// The filter the pull rules' topics match.
    #[arg(long, default_value = "pull/#")]
    topic: String,
    /// Once the observers are registered, wait for a line on standard input before notifying
    /// (so the caller can read the gateway's memory in between).
    #[arg(long)]
    hold: bool,
}

/// One registered observation: where it came from and its token.
struct Observer {
    peer: SocketAddr,
    token: Vec<u8>,
}

/// Observers by (peer, path): a new registration of the same resource replaces the old one.
type Observers = HashMap<(SocketAddr, String), Observer>;

/// Answers one datagram: registers an observer for a GET with Observe 0 and answers it with
/// the first value; an ACK is dropped, a RST ends that peer's observations.
async fn serve(socket: &UdpSocket, observers: &mut Observers, bytes: &[u8], peer: SocketAddr) {
    let Ok(request) = Packet::from_bytes(bytes) else {
        return;
    };
    match (request.header.get_type(), request.header.code) {
        (MessageType::Reset, _) => observers.retain(|(p, _), _| *p != peer),
        (_, MessageClass::Request(RequestType::Get)) => {
            let path = request
                .get_option(CoapOption::UriPath)
                .map(|segments| {
                    segments
                        .iter()
                        .map(|s| String::from_utf8_lossy(s).into_owned())
                        .collect::<Vec<_>>()
                        .join("/")
                })
                .unwrap_or_default();
            let observe = request.get_first_option(CoapOption::Observe).cloned();
            let mut answer = Packet::new();
            answer.header.set_type(MessageType::Acknowledgement);
            answer.header.message_id = request.header.message_id;
            answer.header.code = MessageClass::Response(ResponseType::Content);
            answer.set_token(request.get_token().to_vec());
            if observe
                .as_deref()
                .is_some_and(|o| o.iter().all(|b| *b == 0))
            {
                answer.add_option(CoapOption::Observe, vec![1]);
                let token = request.get_token().to_vec();
                observers.insert((peer, path), Observer { peer, token });
            }
            answer.payload = stamped(16);
            if let Ok(bytes) = answer.to_bytes() {
                let _ = socket.send_to(&bytes, peer).await;
            }
        }
        _ => {}
    }
}

/// A notification with Observe sequence `seq`; every 20th is confirmable.
fn notification(observer: &Observer, seq: u32, mid: u16) -> Option<Vec<u8>> {
    let mut p = Packet::new();
    let kind = if seq.is_multiple_of(20) {
        MessageType::Confirmable
    } else {
        MessageType::NonConfirmable
    };
    p.header.set_type(kind);
    p.header.message_id = mid;
    p.header.code = MessageClass::Response(ResponseType::Content);
    p.set_token(observer.token.clone());
    p.add_option(CoapOption::Observe, seq.to_be_bytes()[1..].to_vec());
    p.add_option(CoapOption::MaxAge, vec![60]);
    p.payload = stamped(16);
    p.to_bytes().ok()
}

/// Reads MQTT packets and times each message against the stamp in its payload.
async fn subscriber(
    mut conn: TcpStream,
    mut buf: BytesMut,
    received: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<Latencies> {
    let mut latencies = Latencies::default();
    loop {
        tokio::select! {
            packet = next_packet(&mut conn, &mut buf) => {
                // Retained values come with the subscription, stamped at registration: only
                // live notifications are timed.
                if let Mqtt::Publish(publish) = packet?
                    && !publish.retain
                    && let Some(latency) = age(&publish.payload)
                {
                    latencies.record(latency);
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ = stop.changed() => return Ok(latencies),
        }
    }
}

async fn next_packet(conn: &mut TcpStream, buf: &mut BytesMut) -> anyhow::Result<Mqtt> {
    loop {
        match Mqtt::read(buf, 1 << 20) {
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

async fn subscribe(addr: SocketAddr, filter: &str) -> anyhow::Result<(TcpStream, BytesMut)> {
    let mut conn = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    conn.set_nodelay(true)?;
    let mut out = BytesMut::new();
    let mut connect = Connect::new(format!("coap-device-{}", random_hex()));
    connect.keep_alive = 600;
    connect.write(&mut out)?;
    let mut subscribe = Subscribe::new(filter, QoS::AtMostOnce);
    subscribe.pkid = 1;
    subscribe.write(&mut out)?;
    conn.write_all(&out).await?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        if let Mqtt::SubAck(SubAck { return_codes, .. }) = next_packet(&mut conn, &mut buf).await? {
            return match return_codes.first() {
                Some(SubscribeReasonCode::Success(_)) => Ok((conn, buf)),
                _ => bail!("the broker refused the subscription to {filter}"),
            };
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.rate.is_nan() || args.rate <= 0.0 {
        bail!("--rate must be above 0");
    }
    let socket = UdpSocket::bind(args.addr)
        .await
        .with_context(|| format!("binding {}", args.addr))?;
    let mut observers = Observers::new();
    let mut buf = vec![0u8; 2048];
    let registering = Instant::now();
    let deadline = registering + args.register_timeout;
    while observers.len() < args.observers {
        match tokio::time::timeout_at(deadline.into(), socket.recv_from(&mut buf)).await {
            Ok(received) => {
                let (n, peer) = received?;
                serve(&socket, &mut observers, &buf[..n], peer).await;
            }
            Err(_) => break,
        }
    }
    let registered = observers.len();
    let took = registering.elapsed();
    eprintln!(
        "registered: {registered} observers in {:.2} s",
        took.as_secs_f64()
    );
    if args.hold {
        std::io::stdin().read_line(&mut String::new())?;
    }

    let (conn, mqtt_buf) = subscribe(args.mqtt, &args.topic).await?;
    let received = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let reading = tokio::spawn(subscriber(conn, mqtt_buf, received.clone(), stop_rx));

    let list: Vec<&Observer> = observers.values().collect();
    if list.is_empty() {
        bail!("no observer registered");
    }
    let (mut sent, mut seq, mut mid) = (0u64, 2u32, 0u16);
    let start = Instant::now();
    let mut datagram = vec![0u8; 2048];
    while start.elapsed() < args.duration {
        let at = start + Duration::from_secs_f64(sent as f64 / args.rate);
        // ACKs and re-registrations are read while waiting for the next slot.
        while Instant::now() < at {
            if let Ok(Ok((n, peer))) =
                tokio::time::timeout_at(at.into(), socket.recv_from(&mut datagram)).await
            {
                let mut fresh = Observers::new();
                serve(&socket, &mut fresh, &datagram[..n], peer).await;
            }
        }
        let observer = list[(sent as usize) % list.len()];
        if (sent as usize) % list.len() == list.len() - 1 {
            seq += 1;
        }
        mid = mid.wrapping_add(1);
        if let Some(bytes) = notification(observer, seq, mid) {
            socket.send_to(&bytes, observer.peer).await?;
        }
        sent += 1;
    }
    let notified = start.elapsed();
    let wait = Instant::now() + Duration::from_secs(5);
    while received.load(Ordering::Relaxed) < sent && Instant::now() < wait {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop_tx.send(true);
    let latencies = reading.await??;
    let got = received.load(Ordering::Relaxed);
    Report::new("coap notifications -> mqtt", got, notified, &latencies)
        .with("observers", registered as u64)
        .with("registered_in_s", took.as_secs_f64())
        .with("sent", sent)
        .with("lost", sent.saturating_sub(got))
        .with("rate_target", args.rate)
        .print();
    Ok(())
}
