//! Request/response round trips: `POST /rpc/{topic}` over keep-alive connections, answered by
//! an MQTT 5 responder in this process that replies on each request's Response Topic with its
//! Correlation Data: a bare one on the socket (`--responder raw`, the default), or a rumqttc
//! client (`--responder rumqttc`), whose event loop and channels add hops of their own. The
//! responder runs on a thread of its own, the calls on another. Without `--rate`, every
//! connection calls again as soon as it is answered, for `--duration` (the maximum rate); with
//! `--rate`, `--count` calls are released one by one on a fixed schedule by a pacing thread and
//! made by whichever connection is free (the latency at that rate).
//! `rpc-load --http 127.0.0.1:8080 --mqtt 127.0.0.1:1883 --connections 32 --duration 10s`
//! `rpc-load --http 127.0.0.1:8080 --mqtt 127.0.0.1:1883 --rate 2000 --count 20000`

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use topicgate_bench::http::{HttpConn, encode_path};
use topicgate_bench::pace::{Pacer, Schedule};
use topicgate_bench::responder::Responder;
use topicgate_bench::{Latencies, Report, on_own_thread, parse_duration, random_hex};

/// HTTP request/response load against an MQTT 5 responder.
#[derive(Parser)]
struct Args {
    /// The gateway's HTTP address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// The gateway's MQTT address, where the responder connects.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt: SocketAddr,
    /// Keep-alive HTTP connections, each with one call in flight.
    #[arg(long, default_value_t = 32)]
    connections: u64,
    /// Length of an unpaced run.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Calls per second over all connections; unset, each connection calls back to back.
    #[arg(long)]
    rate: Option<f64>,
    /// Calls in total of a paced run.
    #[arg(long, default_value_t = 20_000)]
    count: u64,
    /// Request body bytes.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// What answers the calls.
    #[arg(long, value_enum, default_value_t = Kind::Raw)]
    responder: Kind,
    /// The topic the calls go to; a fresh one under `bench/rpc/` when unset. The same topic
    /// over several runs against one gateway keeps the broker's filters the same.
    #[arg(long)]
    topic: Option<String>,
}

/// The MQTT 5 client that answers.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Kind {
    /// A bare client on the socket: each reply written by the task that read the request.
    Raw,
    /// rumqttc's `AsyncClient`, as an application would use it.
    Rumqttc,
}

/// Connects an MQTT 5 client subscribed to `topic` that answers every request on its Response
/// Topic with its Correlation Data and payload; returns once the subscription is granted.
async fn responder(
    addr: SocketAddr,
    topic: &str,
    tasks: &mut JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let mut opts = MqttOptions::new(
        format!("rpc-load-{}", random_hex()),
        addr.ip().to_string(),
        addr.port(),
    );
    opts.set_keep_alive(Duration::from_secs(60));
    let (client, mut eventloop) = AsyncClient::new(opts, 4096);
    let (requests_tx, mut requests) = mpsc::unbounded_channel();
    let (granted_tx, granted) = oneshot::channel();
    // The event loop only reads and writes; replies are queued by the task below, so a full
    // request queue never stops the loop that drains it.
    tasks.spawn(async move {
        let mut granted_tx = Some(granted_tx);
        loop {
            match eventloop
                .poll()
                .await
                .context("the responder's connection")?
            {
                Event::Incoming(Packet::Publish(p)) => {
                    let _ = requests_tx.send(p);
                }
                Event::Incoming(Packet::SubAck(ack)) => {
                    let ok = matches!(
                        ack.return_codes.first(),
                        Some(SubscribeReasonCode::Success(_))
                    );
                    if let Some(tx) = granted_tx.take() {
                        let _ = tx.send(ok);
                    }
                }
                _ => {}
            }
        }
    });
    let replier = client.clone();
    tasks.spawn(async move {
        while let Some(request) = requests.recv().await {
            let props = request.properties.unwrap_or_default();
            let Some(reply_to) = props.response_topic else {
                continue;
            };
            let answer = PublishProperties {
                correlation_data: props.correlation_data,
                ..PublishProperties::default()
            };
            replier
                .publish_with_properties(reply_to, QoS::AtMostOnce, false, request.payload, answer)
                .await
                .context("queueing a reply")?;
        }
        Ok(())
    });
    client.subscribe(topic, QoS::AtMostOnce).await?;
    match tokio::time::timeout(Duration::from_secs(10), granted).await {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => bail!("the broker refused the responder's subscription to {topic}"),
        _ => bail!("the responder's subscription to {topic} was not acknowledged"),
    }
}

/// Runs the responder on a thread and runtime of its own, as a device is a process of its own:
/// on the callers' thread its work would wait behind theirs and count in their round trips.
/// Returns once it is subscribed.
async fn start_responder(kind: Kind, addr: SocketAddr, topic: String) -> anyhow::Result<()> {
    let (ready_tx, ready) = oneshot::channel();
    on_own_thread("responder", move || async move {
        let mut tasks = JoinSet::new();
        let subscribed = match kind {
            Kind::Raw => {
                let id = format!("rpc-load-{}", random_hex());
                Responder::connect(addr, &id, &topic)
                    .await
                    .map(|r| drop(tasks.spawn(r.serve())))
            }
            Kind::Rumqttc => responder(addr, &topic, &mut tasks).await,
        };
        let serving = subscribed.is_ok();
        let _ = ready_tx.send(subscribed);
        if serving {
            while tasks.join_next().await.is_some() {}
        }
        Ok(())
    })?;
    ready.await.context("the responder's thread ended")?
}

/// What one calling connection did.
#[derive(Default)]
struct Calls {
    latencies: Latencies,
    ok: u64,
    errors: u64,
    first_error: Option<u16>,
}

/// Calls `path` until `until` (unpaced), or once per slot of the schedule it takes (paced).
async fn call(
    args: Arc<Args>,
    path: Arc<str>,
    schedule: Option<Arc<Schedule>>,
    until: Instant,
) -> anyhow::Result<Calls> {
    let mut conn = HttpConn::connect(args.http).await?;
    let body = vec![b'x'; args.payload];
    let mut calls = Calls::default();
    loop {
        let go = match &schedule {
            Some(schedule) => schedule.take().await.is_some(),
            None => Instant::now() < until,
        };
        if !go {
            break;
        }
        let sent = Instant::now();
        match conn
            .send("POST", &path, "application/octet-stream", &body)
            .await?
        {
            200 => {
                calls.latencies.record(sent.elapsed());
                calls.ok += 1;
            }
            status => {
                calls.errors += 1;
                calls.first_error.get_or_insert(status);
            }
        }
    }
    Ok(calls)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    if args.connections == 0 || args.rate.is_some_and(|r| r.is_nan() || r <= 0.0) {
        bail!("--connections and --rate must be above 0");
    }
    let topic = (args.topic.clone()).unwrap_or_else(|| format!("bench/rpc/{}", random_hex()));
    let path: Arc<str> = format!("/rpc/{}", encode_path(&topic)).into();
    start_responder(args.responder, args.mqtt, topic).await?;

    // A short lead lets every connection open before its first slot.
    let start = Instant::now() + Duration::from_millis(50);
    let until = start + args.duration;
    let pacer = match args.rate {
        Some(rate) => Some(Schedule::start(rate, args.count, start, args.connections)?),
        None => None,
    };
    let mut callers = JoinSet::new();
    for _ in 0..args.connections {
        let schedule = pacer.as_ref().map(|p| p.schedule.clone());
        callers.spawn(call(args.clone(), path.clone(), schedule, until));
    }
    let mut all = Calls::default();
    while let Some(joined) = callers.join_next().await {
        let one = joined??;
        all.latencies.merge(&one.latencies);
        all.ok += one.ok;
        all.errors += one.errors;
        if all.first_error.is_none() {
            all.first_error = one.first_error;
        }
    }
    // The pacer has handed out its last slot once every connection has ended.
    let late = pacer.map(Pacer::late);
    let elapsed = start.elapsed();
    if let Some(status) = all.first_error {
        eprintln!(
            "{} calls failed, the first with status {status}",
            all.errors
        );
    }
    let scenario = match args.responder {
        Kind::Raw => "http rpc -> mqtt5 responder",
        Kind::Rumqttc => "http rpc -> mqtt5 responder (rumqttc)",
    };
    let mut report = Report::new(scenario, all.ok, elapsed, &all.latencies)
        .with("errors", all.errors)
        .with("connections", args.connections);
    if let (Some(rate), Some(late)) = (args.rate, late) {
        report = report.with("rate_target", rate).with("late", late);
    }
    report.print();
    Ok(())
}
