//! SSE fan-out: opens `--streams` event streams on one topic, publishes `--messages` timestamped
//! messages over HTTP and measures publish-to-event latency, losses and the gateway's RSS per stream.
//! `ulimit -n 20000; sse-load --http 127.0.0.1:8080 --streams 10000 --pid $(pidof topicgate)`
//! (the gateway needs `http.max_streams`, `max_streams_per_client` and `limits.rate` raised).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use topicgate_bench::http::{HttpConn, encode_path, read_head};
use topicgate_bench::{Latencies, Report, now_ns, parse_duration, random_hex, rss_kib};

/// Server-sent events fan-out load.
#[derive(Parser)]
struct Args {
    /// The gateway's HTTP address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Event streams to open.
    #[arg(long, default_value_t = 10_000)]
    streams: usize,
    /// Messages to publish once every stream is open.
    #[arg(long, default_value_t = 100)]
    messages: u64,
    /// Gap between publishes.
    #[arg(long, default_value = "20ms", value_parser = parse_duration)]
    interval: Duration,
    /// Topic to stream and publish to; default `bench/sse/<random hex>`.
    #[arg(long)]
    topic: Option<String>,
    /// The gateway's process id, to read its RSS before and after the streams open.
    #[arg(long)]
    pid: Option<u32>,
    /// Most streams being opened at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Longest wait for the streams to open, and again for the messages to arrive.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    timeout: Duration,
}

/// What every stream task shares with the main task.
struct Shared {
    addr: SocketAddr,
    request: Vec<u8>,
    messages: u64,
    /// Streams that got their first event (the retained message).
    connected: AtomicU64,
    /// Streams that ended before they connected.
    failed: AtomicU64,
    /// Connected streams that will receive nothing more: all messages seen (or reported
    /// dropped), or the stream broke.
    settled: AtomicU64,
    /// `now_ns()` of the latest live event, for the length of the delivery phase.
    last_event_ns: AtomicU64,
}

/// One stream's results.
#[derive(Default)]
struct Tally {
    permit: Option<OwnedSemaphorePermit>,
    connected: bool,
    settled: bool,
    /// Latencies in microseconds; a histogram per stream would cost ~100 KiB each.
    latencies_us: Vec<u32>,
    received: u64,
    lagged: u64,
    dropped: u64,
    malformed: u64,
    error: Option<String>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    payload: Cow<'a, str>,
    #[serde(borrow)]
    payload_encoding: Cow<'a, str>,
}

#[derive(Deserialize)]
struct Lagged {
    dropped: u64,
}

impl Tally {
    fn on_message(&mut self, data: &[u8], shared: &Shared) {
        if !self.connected {
            // The first event is the retained value: the stream is now live.
            self.connected = true;
            self.permit = None;
            shared.connected.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let sent = serde_json::from_slice::<Envelope<'_>>(data)
            .ok()
            .filter(|e| e.payload_encoding == "utf8")
            .and_then(|e| e.payload.parse::<u64>().ok());
        match sent {
            Some(sent) => {
                let now = now_ns();
                let micros = now.saturating_sub(sent) / 1000;
                self.latencies_us
                    .push(u32::try_from(micros).unwrap_or(u32::MAX));
                self.received += 1;
                shared.last_event_ns.fetch_max(now, Ordering::Relaxed);
            }
            None => self.malformed += 1,
        }
        self.check_settled(shared);
    }

    fn on_lagged(&mut self, data: &[u8], shared: &Shared) {
        self.lagged += 1;
        if let Ok(lagged) = serde_json::from_slice::<Lagged>(data) {
            self.dropped += lagged.dropped;
        }
        self.check_settled(shared);
    }

    fn check_settled(&mut self, shared: &Shared) {
        if !self.settled && self.received + self.dropped + self.malformed >= shared.messages {
            self.settled = true;
            shared.settled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum Kind {
    #[default]
    Message,
    Lagged,
    Other,
}

/// An event-stream parser that keeps only what this tool reads: the event type and its data.
#[derive(Default)]
struct SseParser {
    line: Vec<u8>,
    kind: Kind,
    data: Vec<u8>,
}

impl SseParser {
    fn feed(&mut self, mut input: &[u8], tally: &mut Tally, shared: &Shared) {
        while let Some(i) = input.iter().position(|&b| b == b'\n') {
            let Self { line, kind, data } = self;
            if line.is_empty() {
                on_line(&input[..i], kind, data, tally, shared);
            } else {
                line.extend_from_slice(&input[..i]);
                on_line(line, kind, data, tally, shared);
                line.clear();
            }
            input = &input[i + 1..];
        }
        self.line.extend_from_slice(input);
    }
}

fn on_line(line: &[u8], kind: &mut Kind, data: &mut Vec<u8>, tally: &mut Tally, shared: &Shared) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        if !data.is_empty() {
            match kind {
                Kind::Message => tally.on_message(data, shared),
                Kind::Lagged => tally.on_lagged(data, shared),
                Kind::Other => {}
            }
        }
        *kind = Kind::Message;
        data.clear();
        return;
    }
    let (field, value) = match line.iter().position(|&b| b == b':') {
        Some(0) => return,
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &b""[..]),
    };
    let value = value.strip_prefix(b" ").unwrap_or(value);
    match field {
        b"event" => {
            *kind = match value {
                b"message" => Kind::Message,
                b"lagged" => Kind::Lagged,
                _ => Kind::Other,
            }
        }
        b"data" => {
            if !data.is_empty() {
                data.push(b'\n');
            }
            data.extend_from_slice(value);
        }
        _ => {}
    }
}

/// HTTP/1.1 chunked transfer decoding, fed whatever bytes have arrived.
#[derive(Clone, Copy)]
enum Chunked {
    Size,
    Data(usize),
    DataEnd,
    Done,
}

impl Chunked {
    /// Passes the payload bytes found in `raw` to `out`; returns how many bytes of `raw` were used.
    fn decode(&mut self, raw: &[u8], mut out: impl FnMut(&[u8])) -> anyhow::Result<usize> {
        let mut pos = 0;
        loop {
            match *self {
                Chunked::Size => {
                    let Some(end) = raw[pos..].windows(2).position(|w| w == b"\r\n") else {
                        break;
                    };
                    let line = std::str::from_utf8(&raw[pos..pos + end])?;
                    let hex = line.split(';').next().unwrap_or_default().trim();
                    let size = usize::from_str_radix(hex, 16)
                        .with_context(|| format!("bad chunk size line {line:?}"))?;
                    pos += end + 2;
                    *self = if size == 0 {
                        Chunked::Done
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Data(left) => {
                    let take = left.min(raw.len() - pos);
                    if take == 0 {
                        break;
                    }
                    out(&raw[pos..pos + take]);
                    pos += take;
                    *self = if take == left {
                        Chunked::DataEnd
                    } else {
                        Chunked::Data(left - take)
                    };
                }
                Chunked::DataEnd => {
                    if raw.len() - pos < 2 {
                        break;
                    }
                    if &raw[pos..pos + 2] != b"\r\n" {
                        bail!("a chunk does not end with CRLF");
                    }
                    pos += 2;
                    *self = Chunked::Size;
                }
                Chunked::Done => break,
            }
        }
        Ok(pos)
    }
}

/// Raises the soft open-file limit to the hard one; returns the limit now in force.
fn raise_fd_limit() -> anyhow::Result<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        setrlimit(
            Resource::Nofile,
            rustix::process::Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        )
        .context("raising the open-file limit (RLIMIT_NOFILE) to its hard limit")?;
    }
    Ok(limit.maximum.unwrap_or(u64::MAX))
}

async fn follow(shared: &Shared, tally: &mut Tally) -> anyhow::Result<()> {
    let mut conn = TcpStream::connect(shared.addr).await.context("connect")?;
    conn.set_nodelay(true)?;
    conn.write_all(&shared.request).await?;
    let mut raw = Vec::with_capacity(4096);
    let head = read_head(&mut conn, &mut raw).await?;
    if head.status != 200 {
        bail!("status {}", head.status);
    }
    let mut chunked = head.chunked.then_some(Chunked::Size);
    let mut sse = SseParser::default();
    loop {
        match chunked.as_mut() {
            Some(decoder) => {
                let used = decoder.decode(&raw, |data| sse.feed(data, tally, shared))?;
                raw.drain(..used);
                if matches!(decoder, Chunked::Done) {
                    bail!("the server ended the stream");
                }
            }
            None => {
                sse.feed(&raw, tally, shared);
                raw.clear();
            }
        }
        if raw.len() == raw.capacity() {
            raw.reserve(4096);
        }
        if conn.read_buf(&mut raw).await? == 0 {
            bail!("the server closed the stream");
        }
    }
}

async fn stream_task(
    shared: Arc<Shared>,
    permit: OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) -> Tally {
    let mut tally = Tally {
        permit: Some(permit),
        latencies_us: Vec::with_capacity(usize::try_from(shared.messages).unwrap_or(0)),
        ..Tally::default()
    };
    let result = tokio::select! {
        result = follow(&shared, &mut tally) => result,
        _ = stop.changed() => Ok(()),
    };
    tally.permit = None;
    if let Err(e) = result {
        tally.error = Some(format!("{e:#}"));
        if !tally.connected {
            shared.failed.fetch_add(1, Ordering::Relaxed);
        } else if !tally.settled {
            tally.settled = true;
            shared.settled.fetch_add(1, Ordering::Relaxed);
        }
    }
    tally
}

/// Waits until `done` holds or `deadline` passes; returns whether `done` held.
async fn wait_for(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.streams == 0 || args.connect_concurrency == 0 {
        bail!("--streams and --connect-concurrency must be at least 1");
    }
    let fd_limit = raise_fd_limit()?;
    let needed = args.streams as u64 + 64;
    if needed > fd_limit {
        bail!(
            "{} streams need {needed} open files, over this process's hard limit of {fd_limit}: \
             raise it (ulimit -Hn) or open fewer streams",
            args.streams
        );
    }

    let topic = args
        .topic
        .clone()
        .unwrap_or_else(|| format!("bench/sse/{}", random_hex()));
    let path = format!("/topics/{}", encode_path(&topic));
    let status = HttpConn::connect(args.http)
        .await?
        .send("PUT", &path, "text/plain", b"retained")
        .await
        .context("the retained PUT")?;
    if !(200..300).contains(&status) {
        bail!("the retained PUT to {path} got status {status}");
    }

    let rss_idle = args.pid.and_then(rss_kib);
    let shared = Arc::new(Shared {
        addr: args.http,
        request: format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
            args.http
        )
        .into_bytes(),
        messages: args.messages,
        connected: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        settled: AtomicU64::new(0),
        last_event_ns: AtomicU64::new(0),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(args.connect_concurrency));
    let mut tasks = JoinSet::new();
    let open_started = Instant::now();
    let open_deadline = open_started + args.timeout;
    let opened = tokio::time::timeout_at(open_deadline.into(), async {
        for _ in 0..args.streams {
            // why: the semaphore is never closed, so acquiring only waits.
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .expect("an open semaphore");
            tasks.spawn(stream_task(shared.clone(), permit, stop_rx.clone()));
        }
    })
    .await
    .is_ok();
    let spawned = tasks.len() as u64;
    wait_for(open_deadline, || {
        shared.connected.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed) >= spawned
    })
    .await;
    let connected = shared.connected.load(Ordering::Relaxed);
    let open_seconds = open_started.elapsed().as_secs_f64();
    if !opened || connected < args.streams as u64 {
        eprintln!(
            "{connected} of {} streams connected in {open_seconds:.1} s",
            args.streams
        );
    }
    // Let the gateway settle the allocations of the last streams before reading its RSS.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_streams = args.pid.and_then(rss_kib);

    // A fresh connection: the gateway closes keep-alive connections left idle for
    // `http.header_timeout`, which opening many streams can take longer than.
    let mut publisher = HttpConn::connect(args.http).await?;
    let publish_start_ns = now_ns();
    let publish_start = Instant::now();
    let mut published = 0u64;
    let mut publish_errors = 0u64;
    let mut ticks = tokio::time::interval(args.interval);
    for _ in 0..args.messages {
        ticks.tick().await;
        let payload = now_ns().to_string();
        match publisher
            .send("POST", &path, "text/plain", payload.as_bytes())
            .await
        {
            Ok(204) => published += 1,
            Ok(status) => {
                publish_errors += 1;
                if publish_errors == 1 {
                    eprintln!("a publish got status {status}");
                }
            }
            Err(e) => {
                publish_errors += args.messages - published - publish_errors;
                eprintln!("publishing stopped: {e:#}");
                break;
            }
        }
    }
    let publish_seconds = publish_start.elapsed().as_secs_f64();
    let all_settled = wait_for(publish_start + args.timeout, || {
        shared.settled.load(Ordering::Relaxed) >= connected
    })
    .await;
    if !all_settled {
        eprintln!(
            "timed out with {} of {connected} streams complete",
            shared.settled.load(Ordering::Relaxed)
        );
    }
    let _ = stop_tx.send(true);

    let mut latencies = Latencies::default();
    let (mut received, mut lagged, mut dropped, mut malformed) = (0u64, 0u64, 0u64, 0u64);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    while let Some(joined) = tasks.join_next().await {
        let tally = joined?;
        for &micros in &tally.latencies_us {
            latencies.record(Duration::from_micros(u64::from(micros)));
        }
        received += tally.received;
        lagged += tally.lagged;
        dropped += tally.dropped;
        malformed += tally.malformed;
        if let Some(error) = tally.error {
            *errors.entry(error).or_default() += 1;
        }
    }
    for (error, n) in &errors {
        eprintln!("{n} streams: {error}");
    }
    let failed = args.streams as u64 - connected;
    let expected = connected * args.messages;
    let last = shared.last_event_ns.load(Ordering::Relaxed);
    let delivery = Duration::from_nanos(last.saturating_sub(publish_start_ns));

    let mut report = Report::new(
        format!("sse fan-out x{}", args.streams),
        received,
        delivery,
        &latencies,
    )
    .with("streams", args.streams as u64)
    .with("connected", connected)
    .with("failed", failed)
    .with("expected", expected)
    .with("lost", expected.saturating_sub(received))
    .with("lagged", lagged)
    .with("dropped", dropped)
    .with("malformed", malformed)
    .with("published", published)
    .with("publish_errors", publish_errors)
    .with("publish_seconds", publish_seconds)
    .with("connect_seconds", open_seconds);
    if let (Some(idle), Some(streams)) = (rss_idle, rss_streams) {
        let per_stream = (streams.saturating_sub(idle) * 1024)
            .checked_div(connected)
            .unwrap_or(0);
        report = report
            .with("rss_idle_kib", idle)
            .with("rss_streams_kib", streams)
            .with("bytes_per_stream", per_stream);
    }
    report.print();
    Ok(())
}
