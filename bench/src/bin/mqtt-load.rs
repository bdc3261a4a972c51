//! MQTT 3.1.1 throughput and end-to-end latency (a send timestamp in each payload) of any broker,
//! from raw TCP clients with batched writes: `mqtt-load --addr 127.0.0.1:1883 --scenario fan-out
//! --qos 1 --clients 8 --count 100000`. Scenarios: one-to-one, fan-out (1 → N), fan-in (N → 1),
//! and fill (`--count` retained QoS 1 values under `--topic`, latency = PUBLISH to PUBACK).
//! With `--ws /mqtt` every client speaks MQTT over WebSocket (subprotocol `mqtt`, the MQTT bytes
//! in binary messages) instead of raw TCP.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use bytes::{Buf as _, BytesMut};
use clap::{Parser, ValueEnum};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout, timeout_at};

use topicgate_bench::{Latencies, Report, age, now_ns, parse_duration, random_hex, stamped};

/// Limit on every connect, handshake packet and acknowledgement write.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Some brokers refuse a keep-alive of 0, so the clients ping instead.
const KEEP_ALIVE_SECS: u16 = 60;
const PING_EVERY: Duration = Duration::from_secs(30);
/// How long stragglers may still arrive once the publishers are done.
const GRACE: Duration = Duration::from_secs(2);
/// Free room kept in a read buffer before each read.
const READ_CHUNK: usize = 64 * 1024;
/// Bytes of publishes gathered into one write.
const WRITE_BATCH_BYTES: usize = 64 * 1024;
/// Most publishes in one write, so that timestamps are taken close to the write.
const WRITE_BATCH_MAX: u64 = 64;
/// Send times of a QoS 1 publisher's unacknowledged publishes, by packet id.
const SEND_SLOTS: usize = 1024;

#[derive(Parser)]
#[command(about = "MQTT 3.1.1 load generator: messages/s and end-to-end latency")]
struct Args {
    /// Broker address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    addr: String,
    #[arg(long, value_enum, default_value_t = Scenario::OneToOne)]
    scenario: Scenario,
    /// QoS of publishes and subscriptions (fill always uses 1).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// Subscribers for fan-out, publishers for fan-in; ignored otherwise.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    clients: u32,
    /// Messages per publisher (for fill: retained topics).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
    /// Payload bytes; the first 8 carry the send timestamp.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(8..=1_048_576))]
    payload: u32,
    /// Publishers stop when this passes; stragglers get 2 s more.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    duration: Duration,
    /// Unacknowledged QoS 1 publishes per publisher (at most 100, topicgate's max_inflight).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=100))]
    inflight: u32,
    /// Total publishes per second, split across publishers; unlimited when absent.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    rate: Option<u64>,
    /// Topic prefix; a fresh random one by default, so runs never see each other's messages.
    #[arg(long)]
    topic: Option<String>,
    /// Subscribers acknowledge TCP segments at once (TCP_QUICKACK after every read). Brokers
    /// that leave Nagle's algorithm on otherwise hold QoS 0 deliveries until a delayed ACK
    /// (up to 40 ms) from a subscriber that never sends; ordinary clients do not do this.
    #[arg(long)]
    quickack: bool,
    /// Speak MQTT over WebSocket at this path of `--addr` (e.g. `/mqtt`), subprotocol `mqtt`,
    /// one binary message per batch of MQTT bytes; raw TCP when absent.
    #[arg(long)]
    ws: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// One publisher, one subscriber.
    OneToOne,
    /// One publisher, `--clients` subscribers.
    FanOut,
    /// `--clients` publishers, one subscriber.
    FanIn,
    /// One publisher of retained QoS 1 values to `--count` topics, no subscriber.
    Fill,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Self::OneToOne => "one-to-one",
            Self::FanOut => "fan-out",
            Self::FanIn => "fan-in",
            Self::Fill => "fill",
        }
    }
}

/// MQTT 3.1.1 packets, only as much as the load needs.
mod wire {
    use anyhow::{bail, ensure};
    use bytes::{BufMut as _, BytesMut};

    pub(crate) const PINGREQ: [u8; 2] = [0xC0, 0];
    pub(crate) const DISCONNECT: [u8; 2] = [0xE0, 0];

    /// CONNECT with a clean session and no credentials.
    pub(crate) fn connect(out: &mut BytesMut, client_id: &str, keep_alive: u16) {
        out.put_u8(0x10);
        remaining_length(out, 10 + 2 + client_id.len());
        out.put_u16(4);
        out.put_slice(b"MQTT");
        out.put_u8(4);
        out.put_u8(0x02);
        out.put_u16(keep_alive);
        string(out, client_id);
    }

    pub(crate) fn subscribe(out: &mut BytesMut, pkid: u16, filter: &str, qos: u8) {
        out.put_u8(0x82);
        remaining_length(out, 2 + 2 + filter.len() + 1);
        out.put_u16(pkid);
        string(out, filter);
        out.put_u8(qos);
    }

    /// Appends a PUBLISH and returns where its payload starts in `out`.
    pub(crate) fn publish(
        out: &mut BytesMut,
        topic: &str,
        qos: u8,
        retain: bool,
        pkid: u16,
        payload: &[u8],
    ) -> usize {
        let id_len = if qos > 0 { 2 } else { 0 };
        out.put_u8(0x30 | (qos << 1) | u8::from(retain));
        remaining_length(out, 2 + topic.len() + id_len + payload.len());
        string(out, topic);
        if qos > 0 {
            out.put_u16(pkid);
        }
        let at = out.len();
        out.put_slice(payload);
        at
    }

    pub(crate) fn puback(out: &mut BytesMut, pkid: u16) {
        out.put_slice(&[0x40, 2]);
        out.put_u16(pkid);
    }

    pub(crate) enum Packet<'a> {
        ConnAck {
            code: u8,
        },
        SubAck {
            codes: &'a [u8],
        },
        Publish {
            qos: u8,
            retain: bool,
            pkid: u16,
            payload: &'a [u8],
        },
        PubAck {
            pkid: u16,
        },
        Other,
    }

    /// The first complete packet in `buf` and its length, `None` while it is incomplete.
    pub(crate) fn next(buf: &[u8]) -> anyhow::Result<Option<(Packet<'_>, usize)>> {
        let Some(&byte1) = buf.first() else {
            return Ok(None);
        };
        let mut len = 0usize;
        let mut header = 0;
        for i in 1..=4 {
            let Some(&b) = buf.get(i) else {
                return Ok(None);
            };
            len |= usize::from(b & 0x7F) << (7 * (i - 1));
            if b & 0x80 == 0 {
                header = i + 1;
                break;
            }
        }
        ensure!(header > 0, "malformed remaining length");
        let end = header + len;
        let Some(body) = buf.get(header..end) else {
            return Ok(None);
        };
        let packet = match byte1 >> 4 {
            2 => {
                ensure!(body.len() >= 2, "short CONNACK");
                Packet::ConnAck { code: body[1] }
            }
            3 => {
                let qos = (byte1 >> 1) & 3;
                ensure!(body.len() >= 2, "short PUBLISH");
                let mut at = 2 + usize::from(u16::from_be_bytes([body[0], body[1]]));
                let mut pkid = 0;
                if qos > 0 {
                    ensure!(body.len() >= at + 2, "short PUBLISH");
                    pkid = u16::from_be_bytes([body[at], body[at + 1]]);
                    at += 2;
                }
                let Some(payload) = body.get(at..) else {
                    bail!("PUBLISH topic longer than the packet");
                };
                Packet::Publish {
                    qos,
                    retain: byte1 & 1 == 1,
                    pkid,
                    payload,
                }
            }
            4 => {
                ensure!(body.len() >= 2, "short PUBACK");
                Packet::PubAck {
                    pkid: u16::from_be_bytes([body[0], body[1]]),
                }
            }
            9 => {
                ensure!(body.len() >= 3, "short SUBACK");
                Packet::SubAck { codes: &body[2..] }
            }
            _ => Packet::Other,
        };
        Ok(Some((packet, end)))
    }

    fn string(out: &mut BytesMut, s: &str) {
        // why: topics and client ids are checked to fit in 16 bits where they are made.
        out.put_u16(u16::try_from(s.len()).unwrap_or(u16::MAX));
        out.put_slice(s.as_bytes());
    }

    fn remaining_length(out: &mut BytesMut, mut len: usize) {
        loop {
            let mut byte = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                byte |= 0x80;
            }
            out.put_u8(byte);
            if len == 0 {
                break;
            }
        }
    }
}

/// The write side of a connection: a TCP write half, or the write half of a WebSocket.
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// The read side of a connection.
enum Reader {
    Tcp(OwnedReadHalf),
    Ws(tokio::io::ReadHalf<ws::WsIo>),
}

impl Reader {
    /// Asks for TCP quick ACKs again (raw TCP only).
    fn quickack(&self) -> std::io::Result<()> {
        match self {
            Self::Tcp(read) => read.as_ref().set_quickack(true),
            Self::Ws(_) => Ok(()),
        }
    }
}

impl AsyncRead for Reader {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(read) => std::pin::Pin::new(read).poll_read(cx, buf),
            Self::Ws(read) => std::pin::Pin::new(read).poll_read(cx, buf),
        }
    }
}

/// MQTT bytes carried in binary WebSocket messages, as a byte stream.
mod ws {
    use std::io;
    use std::pin::Pin;
    use std::task::{Context, Poll, ready};

    use anyhow::{Context as _, bail};
    use bytes::{Buf as _, Bytes};
    use futures_util::{Sink, Stream};
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio::net::TcpStream;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    use tokio_tungstenite::tungstenite::http::HeaderValue;
    use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

    pub(crate) struct WsIo {
        ws: WebSocketStream<TcpStream>,
        /// What is left of the last binary message read.
        pending: Bytes,
    }

    /// The WebSocket handshake on a connected socket, asking for subprotocol `mqtt`.
    pub(crate) async fn handshake(
        stream: TcpStream,
        addr: &str,
        path: &str,
    ) -> anyhow::Result<WsIo> {
        let mut request = format!("ws://{addr}{path}").into_client_request()?;
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
        // Each message is written to the socket as it is sent, as a raw TCP write would be.
        let config = WebSocketConfig::default().write_buffer_size(0);
        let (ws, response) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(config))
                .await
                .with_context(|| format!("WebSocket handshake with ws://{addr}{path}"))?;
        if response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .is_none_or(|p| p.as_bytes() != b"mqtt")
        {
            bail!("ws://{addr}{path} did not accept subprotocol mqtt");
        }
        Ok(WsIo {
            ws,
            pending: Bytes::new(),
        })
    }

    impl AsyncRead for WsIo {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            while this.pending.is_empty() {
                match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                    Some(Ok(Message::Binary(data))) => this.pending = data,
                    // End of stream: a read of 0 bytes.
                    Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                    // Pings are answered by tungstenite itself.
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                }
            }
            let n = this.pending.len().min(buf.remaining());
            buf.put_slice(&this.pending[..n]);
            this.pending.advance(n);
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for WsIo {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(io::Error::other)?;
            Pin::new(&mut this.ws)
                .start_send(Message::Binary(Bytes::copy_from_slice(data)))
                .map_err(io::Error::other)?;
            Poll::Ready(Ok(data.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().ws)
                .poll_flush(cx)
                .map_err(io::Error::other)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().ws)
                .poll_close(cx)
                .map_err(io::Error::other)
        }
    }
}

/// A connected client: its socket's two halves and the bytes read but not yet parsed.
struct Conn {
    id: String,
    read: Reader,
    write: Writer,
    buf: BytesMut,
}

impl Conn {
    /// Connects (and for `ws`, upgrades to a WebSocket at that path) and waits for a CONNACK
    /// that accepts the client.
    async fn open(addr: &str, id: String, ws: Option<&str>) -> anyhow::Result<Self> {
        let stream = timeout(IO_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("{id}: connect to {addr} timed out"))?
            .with_context(|| format!("{id}: connect to {addr}"))?;
        stream.set_nodelay(true)?;
        let (read, write): (Reader, Writer) = match ws {
            None => {
                let (read, write) = stream.into_split();
                (Reader::Tcp(read), Box::new(write))
            }
            Some(path) => {
                let io = timeout(IO_TIMEOUT, ws::handshake(stream, addr, path))
                    .await
                    .map_err(|_| anyhow!("{id}: WebSocket handshake timed out"))??;
                let (read, write) = tokio::io::split(io);
                (Reader::Ws(read), Box::new(write))
            }
        };
        let mut conn = Self {
            id,
            read,
            write,
            buf: BytesMut::with_capacity(4 * READ_CHUNK),
        };
        let mut out = BytesMut::new();
        wire::connect(&mut out, &conn.id, KEEP_ALIVE_SECS);
        conn.send(&out).await?;
        match conn.handshake_reply().await? {
            Reply::ConnAck(0) => Ok(conn),
            Reply::ConnAck(code) => bail!(
                "{}: CONNACK refused with code {code} ({})",
                conn.id,
                connack_meaning(code)
            ),
            Reply::SubAck(_) => bail!("{}: SUBACK before CONNACK", conn.id),
        }
    }

    /// Subscribes to `filter` and waits for the SUBACK.
    async fn subscribe(&mut self, filter: &str, qos: u8) -> anyhow::Result<()> {
        let mut out = BytesMut::new();
        wire::subscribe(&mut out, 1, filter, qos);
        self.send(&out).await?;
        match self.handshake_reply().await? {
            Reply::SubAck(0x80) => bail!("{}: SUBACK refused {filter}", self.id),
            Reply::SubAck(granted) if granted < qos => {
                eprintln!(
                    "mqtt-load: {}: {filter} granted at QoS {granted} only",
                    self.id
                );
                Ok(())
            }
            Reply::SubAck(_) => Ok(()),
            Reply::ConnAck(_) => bail!("{}: a second CONNACK", self.id),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        timeout(IO_TIMEOUT, write_out(&mut self.write, bytes))
            .await
            .map_err(|_| anyhow!("{}: write timed out", self.id))?
            .with_context(|| format!("{}: write", self.id))
    }

    /// The next CONNACK or SUBACK; anything else before it is skipped.
    async fn handshake_reply(&mut self) -> anyhow::Result<Reply> {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            while let Some((packet, len)) = wire::next(&self.buf)? {
                let reply = match packet {
                    wire::Packet::ConnAck { code } => Some(Reply::ConnAck(code)),
                    wire::Packet::SubAck { codes } => Some(Reply::SubAck(codes[0])),
                    _ => None,
                };
                self.buf.advance(len);
                if let Some(reply) = reply {
                    return Ok(reply);
                }
            }
            let read = timeout_at(deadline, self.read.read_buf(&mut self.buf))
                .await
                .map_err(|_| anyhow!("{}: no answer from the broker", self.id))?
                .with_context(|| format!("{}: read", self.id))?;
            if read == 0 {
                bail!("{}: the broker closed the connection", self.id);
            }
        }
    }
}

enum Reply {
    ConnAck(u8),
    SubAck(u8),
}

/// Writes all of `bytes` and flushes them: a no-op on TCP, where a WebSocket sends what it
/// still holds.
async fn write_out(write: &mut Writer, bytes: &[u8]) -> std::io::Result<()> {
    write.write_all(bytes).await?;
    write.flush().await
}

fn connack_meaning(code: u8) -> &'static str {
    match code {
        1 => "unacceptable protocol version",
        2 => "client id rejected",
        3 => "server unavailable",
        4 => "bad user name or password",
        5 => "not authorized",
        _ => "unknown code",
    }
}

/// Tells readers how many messages to wait for, and when to give up.
#[derive(Clone)]
struct Until {
    want: watch::Receiver<u64>,
    stop: watch::Receiver<bool>,
}

impl Until {
    /// Whether a reader with `got` messages is done.
    fn reached(&mut self, got: u64) -> bool {
        *self.stop.borrow_and_update() || got >= *self.want.borrow_and_update()
    }

    /// Returns when either value changes; a value whose sender is gone is final.
    async fn changed(&mut self) {
        tokio::select! {
            Ok(()) = self.want.changed() => {}
            Ok(()) = self.stop.changed() => {}
            else => std::future::pending().await,
        }
    }
}

/// What one reader (a subscriber, or a publisher's PUBACK reader) saw.
#[derive(Default)]
struct Seen {
    count: u64,
    latencies: Latencies,
    last: Option<Instant>,
    error: Option<anyhow::Error>,
}

impl Seen {
    /// Adds another reader's counts and latencies; its error, if any, goes to `errors`.
    fn absorb(&mut self, other: Seen, errors: &mut Vec<anyhow::Error>) {
        self.count += other.count;
        self.latencies.merge(&other.latencies);
        self.last = self.last.max(other.last);
        errors.extend(other.error);
    }
}

/// Reads publishes until `until` says so, acknowledging QoS 1 ones.
async fn subscriber(mut conn: Conn, mut until: Until, quickack: bool) -> (Seen, Conn) {
    let mut seen = Seen::default();
    let result: anyhow::Result<()> = async {
        let mut acks = BytesMut::with_capacity(4096);
        let mut ping_at = Instant::now() + PING_EVERY;
        // The buffer is parsed before each read: publishes that came in with the SUBACK are
        // already there, and a broker waits for their PUBACKs before it sends more.
        loop {
            let mut at = 0;
            let mut got = 0;
            while let Some((packet, len)) = wire::next(&conn.buf[at..])? {
                at += len;
                if let wire::Packet::Publish {
                    qos,
                    retain,
                    pkid,
                    payload,
                } = packet
                {
                    if qos > 0 {
                        wire::puback(&mut acks, pkid);
                    }
                    // A retained value sent on subscribing is from an earlier run, not this one.
                    if retain {
                        continue;
                    }
                    if let Some(latency) = age(payload) {
                        seen.latencies.record(latency);
                    }
                    got += 1;
                }
            }
            conn.buf.advance(at);
            if got > 0 {
                seen.count += got;
                seen.last = Some(Instant::now());
            }
            if !acks.is_empty() {
                conn.send(&acks).await?;
                acks.clear();
                ping_at = Instant::now() + PING_EVERY;
            }
            if until.reached(seen.count) {
                break;
            }
            if conn.buf.capacity() - conn.buf.len() < READ_CHUNK {
                conn.buf.reserve(4 * READ_CHUNK);
            }
            let read = tokio::select! {
                () = until.changed() => continue,
                () = sleep_until(ping_at) => None,
                read = conn.read.read_buf(&mut conn.buf) => Some(read),
            };
            let Some(read) = read else {
                conn.send(&wire::PINGREQ).await?;
                ping_at = Instant::now() + PING_EVERY;
                continue;
            };
            if read.with_context(|| format!("{}: read", conn.id))? == 0 {
                bail!("{}: the broker closed the connection", conn.id);
            }
            if quickack {
                // Linux drops out of quick-ACK mode on its own, so it is asked for again.
                conn.read.quickack()?;
            }
        }
        Ok(())
    }
    .await;
    seen.error = result.err();
    (seen, conn)
}

/// One publisher's job.
struct Plan {
    id: String,
    /// The topic of every publish, or for fill the prefix of `<prefix>/<i>`.
    topic: String,
    fill: bool,
    qos: u8,
    count: u64,
    payload: usize,
    /// Publishes per second, unlimited when `None`.
    rate: Option<f64>,
    /// Where in each interval of `1 / rate` this publisher's messages fall (0..1), so that paced
    /// publishers do not all write at the same instant.
    phase: f64,
    start: Instant,
    stop_at: Instant,
}

/// What a publisher's writer did.
struct Wrote {
    sent: u64,
    last_write: Option<Instant>,
    error: Option<anyhow::Error>,
    write: Writer,
}

/// The QoS 1 side of a publisher: its window and the send times of what is in flight.
struct Window {
    permits: Semaphore,
    /// `pkid << 48 | send time in ns (48 bits)` per slot `pkid % SEND_SLOTS`.
    sent_at: Vec<AtomicU64>,
}

const NS_MASK: u64 = (1 << 48) - 1;

impl Window {
    fn new(inflight: u32) -> Self {
        Self {
            permits: Semaphore::new(inflight as usize),
            sent_at: (0..SEND_SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn mark(&self, pkid: u16, ns: u64) {
        self.sent_at[usize::from(pkid) % SEND_SLOTS]
            .store(u64::from(pkid) << 48 | (ns & NS_MASK), Ordering::Relaxed);
    }

    /// The time since `pkid` was written, unless its slot was reused since.
    fn since(&self, pkid: u16) -> Option<Duration> {
        let slot = self.sent_at[usize::from(pkid) % SEND_SLOTS].load(Ordering::Relaxed);
        (slot >> 48 == u64::from(pkid)).then(|| {
            Duration::from_nanos((now_ns() & NS_MASK).wrapping_sub(slot & NS_MASK) & NS_MASK)
        })
    }

    /// Takes up to `want` permits, waiting for at least one until `deadline`; `None` once the
    /// deadline passes or the reader closed the window.
    async fn take(&self, want: u64, deadline: Instant) -> Option<u64> {
        let want = usize::try_from(want).unwrap_or(usize::MAX);
        let ready = self.permits.available_permits().min(want);
        if ready > 0 {
            // why: only the writer takes permits, so the ones just counted are still there.
            self.permits
                .try_acquire_many(u32::try_from(ready).ok()?)
                .ok()?
                .forget();
            return Some(ready as u64);
        }
        timeout_at(deadline, self.permits.acquire())
            .await
            .ok()?
            .ok()?
            .forget();
        let more = self.permits.available_permits().min(want - 1);
        if more > 0 {
            self.permits
                .try_acquire_many(u32::try_from(more).ok()?)
                .ok()?
                .forget();
        }
        Some(1 + more as u64)
    }
}

/// Writes the plan's publishes in batches until they are all sent or `stop_at` passes; then
/// tells the PUBACK reader how many to wait for.
async fn publisher(
    plan: Plan,
    mut write: Writer,
    window: Option<Arc<Window>>,
    acks_due: Option<watch::Sender<u64>>,
) -> Wrote {
    let template = stamped(plan.payload);
    let packet_size = plan.topic.len() + plan.payload + 16;
    let batch_max = ((WRITE_BATCH_BYTES / packet_size) as u64).clamp(1, WRITE_BATCH_MAX);
    let mut out = BytesMut::with_capacity(WRITE_BATCH_BYTES.max(packet_size) * 2);
    let mut topic = plan.topic.clone();
    let mut pkid: u16 = 0;
    let mut sent = 0u64;
    let mut last_write = None;
    let result: anyhow::Result<()> = async {
        while sent < plan.count {
            let now = Instant::now();
            if now >= plan.stop_at {
                break;
            }
            let mut n = batch_max.min(plan.count - sent);
            if let Some(rate) = plan.rate {
                // Message `i` is due at `(i + phase) / rate` after the start.
                let due = ((now - plan.start).as_secs_f64() * rate + 1.0 - plan.phase) as u64;
                if due <= sent {
                    let next =
                        plan.start + Duration::from_secs_f64((sent as f64 + plan.phase) / rate);
                    sleep_until(next.min(plan.stop_at)).await;
                    continue;
                }
                n = n.min(due - sent);
            }
            if let Some(window) = &window {
                match window.take(n, plan.stop_at).await {
                    Some(granted) => n = granted,
                    None => break,
                }
            }
            for i in sent..sent + n {
                if plan.qos > 0 {
                    pkid = pkid.checked_add(1).unwrap_or(1);
                }
                if plan.fill {
                    topic.truncate(plan.topic.len());
                    // why: writing into a String cannot fail.
                    let _ = write!(topic, "/{i}");
                }
                let at = wire::publish(&mut out, &topic, plan.qos, plan.fill, pkid, &template);
                // `stamped`'s layout, rewritten in place so a batch allocates nothing.
                let ns = now_ns();
                out[at..at + 8].copy_from_slice(&ns.to_be_bytes());
                if let Some(window) = &window {
                    window.mark(pkid, ns);
                }
            }
            match timeout_at(plan.stop_at, write_out(&mut write, &out)).await {
                Ok(written) => written.with_context(|| format!("{}: write", plan.id))?,
                // The broker stopped reading and the time is up; this batch does not count.
                Err(_) => break,
            }
            out.clear();
            sent += n;
            last_write = Some(Instant::now());
        }
        Ok(())
    }
    .await;
    if let Some(due) = acks_due {
        // A reader that already ended has nothing left to be told.
        let _ = due.send(sent);
    }
    Wrote {
        sent,
        last_write,
        error: result.err(),
        write,
    }
}

/// Reads a QoS 1 publisher's PUBACKs, reopening its window as they come.
async fn ack_reader(
    id: String,
    mut read: Reader,
    mut buf: BytesMut,
    window: Arc<Window>,
    mut until: Until,
) -> (Seen, Reader) {
    let mut seen = Seen::default();
    let result: anyhow::Result<()> = async {
        while !until.reached(seen.count) {
            if buf.capacity() - buf.len() < READ_CHUNK {
                buf.reserve(READ_CHUNK);
            }
            let read = tokio::select! {
                () = until.changed() => continue,
                read = read.read_buf(&mut buf) => read,
            };
            if read.with_context(|| format!("{id}: read"))? == 0 {
                bail!("{id}: the broker closed the connection");
            }
            let mut at = 0;
            let mut acked = 0;
            while let Some((packet, len)) = wire::next(&buf[at..])? {
                at += len;
                if let wire::Packet::PubAck { pkid } = packet {
                    if let Some(latency) = window.since(pkid) {
                        seen.latencies.record(latency);
                    }
                    acked += 1;
                }
            }
            buf.advance(at);
            if acked > 0 {
                seen.count += acked;
                seen.last = Some(Instant::now());
                window.permits.add_permits(acked as usize);
            }
        }
        Ok(())
    }
    .await;
    if result.is_err() {
        // The writer would otherwise wait for permits that can no longer come.
        window.permits.close();
    }
    seen.error = result.err();
    (seen, read)
}

/// Opens `n` connections at once, with ids `<base><i>`.
async fn open_all(addr: &str, ws: Option<&str>, base: &str, n: u32) -> anyhow::Result<Vec<Conn>> {
    let tasks: Vec<JoinHandle<anyhow::Result<Conn>>> = (0..n)
        .map(|i| {
            let addr = addr.to_owned();
            let ws = ws.map(str::to_owned);
            let id = format!("{base}{i}");
            tokio::spawn(async move { Conn::open(&addr, id, ws.as_deref()).await })
        })
        .collect();
    let mut conns = Vec::with_capacity(tasks.len());
    for task in tasks {
        conns.push(task.await??);
    }
    Ok(conns)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let fill = args.scenario == Scenario::Fill;
    let qos = if fill { 1 } else { args.qos };
    let (publishers, subscribers) = match args.scenario {
        Scenario::OneToOne => (1, 1),
        Scenario::FanOut => (1, args.clients),
        Scenario::FanIn => (args.clients, 1),
        Scenario::Fill => (1, 0),
    };
    let run = random_hex();
    let prefix = args
        .topic
        .clone()
        .unwrap_or_else(|| format!("bench/mqtt/{run}"));
    if prefix.len() > 1024 || prefix.contains(['+', '#']) {
        bail!("--topic must be at most 1024 bytes without wildcards");
    }
    let filter = if publishers == 1 {
        format!("{prefix}/0")
    } else {
        format!("{prefix}/+")
    };
    // Short ids: MQTT 3.1.1 only obliges brokers to take 23 characters.
    let id_base = format!("ml{}", &run[..8]);

    let ws = args.ws.as_deref();
    if ws.is_some_and(|p| !p.starts_with('/')) {
        bail!("--ws takes a path, such as /mqtt");
    }
    let mut subs = open_all(&args.addr, ws, &format!("{id_base}s"), subscribers).await?;
    for sub in &mut subs {
        sub.subscribe(&filter, qos).await?;
    }
    let pubs = open_all(&args.addr, ws, &format!("{id_base}p"), publishers).await?;

    let planned = u64::from(publishers) * args.count;
    let (want_tx, want) = watch::channel(planned);
    let (stop_tx, stop) = watch::channel(false);
    let until = Until { want, stop };
    let readers: Vec<_> = subs
        .into_iter()
        .map(|conn| tokio::spawn(subscriber(conn, until.clone(), args.quickack)))
        .collect();

    let start = Instant::now();
    let stop_at = start + args.duration;
    let rate = args.rate.map(|r| r as f64 / f64::from(publishers));
    let mut writers = Vec::new();
    let mut ackers = Vec::new();
    // QoS 0 publishers read nothing, but their read halves stay open until the end.
    let mut idle = Vec::new();
    for (i, conn) in pubs.into_iter().enumerate() {
        let Conn {
            id,
            read,
            write,
            buf,
        } = conn;
        let plan = Plan {
            id: id.clone(),
            topic: if fill {
                prefix.clone()
            } else {
                format!("{prefix}/{i}")
            },
            fill,
            qos,
            count: args.count,
            payload: args.payload as usize,
            rate,
            phase: i as f64 / f64::from(publishers),
            start,
            stop_at,
        };
        if qos == 0 {
            idle.push(read);
            writers.push(tokio::spawn(publisher(plan, write, None, None)));
            continue;
        }
        let window = Arc::new(Window::new(args.inflight));
        let (due_tx, due) = watch::channel(args.count);
        let acks_until = Until {
            want: due,
            stop: until.stop.clone(),
        };
        ackers.push(tokio::spawn(ack_reader(
            id,
            read,
            buf,
            window.clone(),
            acks_until,
        )));
        writers.push(tokio::spawn(publisher(
            plan,
            write,
            Some(window),
            Some(due_tx),
        )));
    }
    drop(until);

    let mut errors = Vec::new();
    let mut sent = 0;
    let mut last_write = None;
    let mut writes = Vec::new();
    for writer in writers {
        let wrote = writer.await.context("a publisher failed")?;
        sent += wrote.sent;
        last_write = last_write.max(wrote.last_write);
        errors.extend(wrote.error);
        writes.push(wrote.write);
    }
    // Subscribers can stop once they have all that was actually sent.
    let _ = want_tx.send(sent);
    let grace = Instant::now().min(stop_at) + GRACE;
    let timer = tokio::spawn(async move {
        sleep_until(grace).await;
        let _ = stop_tx.send(true);
    });

    let mut received = Seen::default();
    let mut conns = Vec::new();
    for reader in readers {
        let (seen, conn) = reader.await.context("a subscriber failed")?;
        received.absorb(seen, &mut errors);
        conns.push(conn);
    }
    let mut acked = Seen::default();
    for acker in ackers {
        let (seen, read) = acker.await.context("a PUBACK reader failed")?;
        acked.absorb(seen, &mut errors);
        idle.push(read);
    }
    timer.abort();

    // Best effort: the figures are taken, a broker that is gone by now changes nothing.
    for write in &mut writes {
        let _ = timeout(GRACE, write_out(write, &wire::DISCONNECT)).await;
    }
    for conn in &mut conns {
        let _ = timeout(GRACE, write_out(&mut conn.write, &wire::DISCONNECT)).await;
    }
    drop((writes, idle, conns));

    let (count, expected, measured) = if fill {
        (acked.count, sent, &acked)
    } else {
        (received.count, sent * u64::from(subscribers), &received)
    };
    let end = measured.last.unwrap_or_else(Instant::now);
    let publish_seconds = last_write.map_or(0.0, |t| (t - start).as_secs_f64());
    let shape = match args.scenario {
        Scenario::FanOut | Scenario::FanIn => format!(" x{}", args.clients),
        Scenario::OneToOne | Scenario::Fill => String::new(),
    };
    let mut report = Report::new(
        format!(
            "mqtt{} qos{qos} {}{shape}",
            if ws.is_some() { " over websocket" } else { "" },
            args.scenario.name()
        ),
        count,
        end - start,
        &measured.latencies,
    )
    .with("sent", sent)
    .with("expected", expected)
    .with("lost", expected.saturating_sub(count))
    .with(
        "publish_rate",
        if publish_seconds > 0.0 {
            sent as f64 / publish_seconds
        } else {
            0.0
        },
    );
    if qos > 0 && !fill {
        report = report
            .with("ack_p50_us", acked.latencies.quantile_us(0.5))
            .with("ack_p99_us", acked.latencies.quantile_us(0.99));
    }
    if sent < planned {
        report = report.with("planned", planned);
    }
    if !errors.is_empty() {
        report = report.with("errors", errors.len());
    }
    report.print();
    if let Some(first) = errors.first() {
        bail!(
            "{} connection(s) failed during the run, first: {first:#}",
            errors.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use rumqttc::mqttbytes::QoS;
    use rumqttc::mqttbytes::v4::{
        ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode,
    };

    use super::wire;

    const MAX: usize = 2 * 1024 * 1024;

    #[test]
    fn what_the_load_writes_reads_back_as_mqtt() {
        let mut out = BytesMut::new();
        wire::connect(&mut out, "client-1", 60);
        let Ok(Packet::Connect(connect)) = Packet::read(&mut out, MAX) else {
            panic!("not a CONNECT");
        };
        assert_eq!(
            (
                connect.client_id.as_str(),
                connect.keep_alive,
                connect.clean_session
            ),
            ("client-1", 60, true)
        );

        wire::subscribe(&mut out, 7, "a/+", 1);
        let Ok(Packet::Subscribe(subscribe)) = Packet::read(&mut out, MAX) else {
            panic!("not a SUBSCRIBE");
        };
        assert_eq!(subscribe.pkid, 7);
        assert_eq!(subscribe.filters[0].path, "a/+");
        assert_eq!(subscribe.filters[0].qos, QoS::AtLeastOnce);

        // A large payload needs a three-byte remaining length.
        let payload = vec![b'p'; 1024 * 1024];
        for (qos, retain, pkid) in [(0, false, 0), (1, true, 65535)] {
            let at = wire::publish(&mut out, "a/b", qos, retain, pkid, &payload);
            assert_eq!(&out[at..at + 4], b"pppp");
            let Ok(Packet::Publish(publish)) = Packet::read(&mut out, MAX) else {
                panic!("not a PUBLISH");
            };
            assert_eq!(publish.topic, "a/b");
            assert_eq!(publish.qos as u8, qos);
            assert_eq!((publish.retain, publish.pkid), (retain, pkid));
            assert_eq!(publish.payload.len(), payload.len());
        }

        wire::puback(&mut out, 513);
        assert_eq!(
            Packet::read(&mut out, MAX).ok(),
            Some(Packet::PubAck(PubAck::new(513)))
        );
        assert!(out.is_empty());
    }

    #[test]
    fn what_a_broker_writes_is_parsed_only_once_complete() {
        let mut publish = Publish::new("t/0", QoS::AtLeastOnce, vec![b'x'; 300]);
        publish.pkid = 9;
        publish.retain = true;
        let mut bytes = BytesMut::new();
        for packet in [
            Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)),
            Packet::SubAck(SubAck::new(1, vec![SubscribeReasonCode::Failure])),
            Packet::Publish(publish),
            Packet::PubAck(PubAck::new(300)),
            Packet::PingResp,
        ] {
            packet.write(&mut bytes, MAX).expect("encodes");
        }

        let mut at = 0;
        let mut seen = Vec::new();
        while at < bytes.len() {
            let rest = &bytes[at..];
            let (packet, len) = wire::next(rest).expect("valid").expect("complete");
            for cut in 0..len {
                assert!(wire::next(&rest[..cut]).expect("valid").is_none(), "{cut}");
            }
            seen.push(match packet {
                wire::Packet::ConnAck { code } => format!("connack {code}"),
                wire::Packet::SubAck { codes } => format!("suback {codes:?}"),
                wire::Packet::Publish {
                    qos,
                    retain,
                    pkid,
                    payload,
                } => format!("publish {qos} {retain} {pkid} {}", payload.len()),
                wire::Packet::PubAck { pkid } => format!("puback {pkid}"),
                wire::Packet::Other => "other".to_owned(),
            });
            at += len;
        }
        assert_eq!(
            seen,
            [
                "connack 0",
                "suback [128]",
                "publish 1 true 9 300",
                "puback 300",
                "other"
            ]
        );
        assert!(wire::next(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]).is_err());
    }
}
