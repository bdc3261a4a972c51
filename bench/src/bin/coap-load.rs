//! Closed-loop CoAP load: each of `--sockets` UDP sockets sends a confirmable request, waits for
//! its answer (or `--timeout`) and sends the next; reports answers per second and their latency.
//! `coap-load --addr 127.0.0.1:5683 --method get --prime --duration 5s` (also works against
//! libcoap's `coap-server-notls -d 100`).

use std::collections::BTreeMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
use tokio::net::UdpSocket;
use tokio::task::JoinSet;
use topicgate_bench::{Latencies, Report, parse_duration};

/// Closed-loop CoAP request load over several UDP sockets.
#[derive(Parser)]
struct Args {
    /// CoAP server address.
    #[arg(long, default_value = "127.0.0.1:5683")]
    addr: SocketAddr,
    /// Sockets, each with one request in flight.
    #[arg(long, default_value_t = 16)]
    sockets: usize,
    /// Request method.
    #[arg(long, value_enum, default_value_t = Method::Get)]
    method: Method,
    /// Resource path, split into Uri-Path options.
    #[arg(long, default_value = "/topics/bench/coap")]
    path: String,
    /// Payload bytes of POST and PUT requests (and of the priming PUT).
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// How long to send requests.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Most requests in total, across all sockets; unlimited when absent.
    #[arg(long)]
    count: Option<u64>,
    /// How long a request waits for its answer before it counts as a timeout.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    timeout: Duration,
    /// Before measuring, PUT the payload to the path so that GET reads a retained value.
    #[arg(long)]
    prime: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Method {
    Get,
    Post,
    Put,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Get => "get",
            Method::Post => "post",
            Method::Put => "put",
        }
    }

    fn request_type(self) -> RequestType {
        match self {
            Method::Get => RequestType::Get,
            Method::Post => RequestType::Post,
            Method::Put => RequestType::Put,
        }
    }
}

const TOKEN_LEN: usize = 4;
const TYPE_CON: u8 = 0;
const TYPE_NON: u8 = 1;
const TYPE_ACK: u8 = 2;
const TYPE_RST: u8 = 3;

/// One socket's tally.
#[derive(Default)]
struct Tally {
    latencies: Latencies,
    ok: u64,
    timeouts: u64,
    errors: u64,
    io_errors: u64,
    codes: BTreeMap<String, u64>,
}

/// How one request ended.
enum Outcome {
    Answer(u8),
    Reset,
    Timeout,
}

/// The fields of a CoAP message this tool matches on, read straight from the 4-byte header and
/// the token: parsing options and payload of every answer would cost more than the exchange.
struct Head<'a> {
    kind: u8,
    code: u8,
    message_id: u16,
    token: &'a [u8],
}

fn head(datagram: &[u8]) -> Option<Head<'_>> {
    let first = *datagram.first()?;
    let token_len = usize::from(first & 0x0f);
    if first >> 6 != 1 || token_len > 8 {
        return None;
    }
    Some(Head {
        kind: (first >> 4) & 0x03,
        code: *datagram.get(1)?,
        message_id: u16::from_be_bytes([*datagram.get(2)?, *datagram.get(3)?]),
        token: datagram.get(4..4 + token_len)?,
    })
}

fn code_text(code: u8) -> String {
    format!("{}.{:02}", code >> 5, code & 0x1f)
}

/// A request encoded once; each send patches in its message id and token, which sit at fixed
/// offsets (bytes 2..4 and 4..4+TKL), instead of encoding a new packet.
struct Template(Vec<u8>);

impl Template {
    fn new(method: Method, path: &str, payload: &[u8]) -> anyhow::Result<Self> {
        let mut packet = Packet::new();
        packet.header.set_type(MessageType::Confirmable);
        packet.header.code = MessageClass::Request(method.request_type());
        packet.set_token(vec![0; TOKEN_LEN]);
        for segment in path.split('/').filter(|s| !s.is_empty()) {
            packet.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
        }
        if method != Method::Get {
            packet.payload = payload.to_vec();
        }
        let bytes = packet
            .to_bytes()
            .map_err(|e| anyhow::anyhow!("cannot encode the request: {e:?}"))?;
        Ok(Self(bytes))
    }

    fn stamp(&mut self, message_id: u16, token: [u8; TOKEN_LEN]) -> &[u8] {
        self.0[2..4].copy_from_slice(&message_id.to_be_bytes());
        self.0[4..4 + TOKEN_LEN].copy_from_slice(&token);
        &self.0
    }
}

/// A splitmix64 generator for tokens and first message ids; seeded from the standard library's
/// per-process random hash keys, so no random number crate is needed.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u64(topicgate_bench::now_ns());
        Self(hasher.finish())
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

async fn socket(addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    let local: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(addr).await?;
    Ok(socket)
}

/// Sends one request and waits for its answer: piggybacked on the ACK with the same message id,
/// or, after an empty ACK, a separate response with the same token. Anything else is a stray
/// datagram (such as a late answer to an earlier, timed-out request) and is skipped.
async fn exchange(
    socket: &UdpSocket,
    request: &[u8],
    message_id: u16,
    token: &[u8],
    timeout: Duration,
    buf: &mut [u8],
) -> std::io::Result<Outcome> {
    socket.send(request).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = match tokio::time::timeout_at(deadline, socket.recv(buf)).await {
            Ok(received) => received?,
            Err(_) => return Ok(Outcome::Timeout),
        };
        let Some(h) = head(&buf[..n]) else { continue };
        match h.kind {
            TYPE_ACK if h.message_id == message_id => {
                if h.code == 0 {
                    continue;
                }
                if h.token == token {
                    return Ok(Outcome::Answer(h.code));
                }
            }
            TYPE_RST if h.message_id == message_id => return Ok(Outcome::Reset),
            TYPE_CON | TYPE_NON if h.token == token && h.code >> 5 >= 2 => {
                if h.kind == TYPE_CON {
                    let ack_id = h.message_id.to_be_bytes();
                    socket.send(&[0x60, 0, ack_id[0], ack_id[1]]).await?;
                }
                return Ok(Outcome::Answer(h.code));
            }
            _ => {}
        }
    }
}

async fn run_socket(
    args: Arc<Args>,
    mut template: Template,
    issued: Arc<AtomicU64>,
    end: Instant,
) -> anyhow::Result<Tally> {
    let socket = socket(args.addr).await?;
    let mut rng = Rng::new();
    // why: a u64 truncated to its low 16 bits is any valid message id.
    let mut message_id = rng.next() as u16;
    let mut buf = vec![0u8; 2048];
    let mut tally = Tally::default();
    while Instant::now() < end {
        if let Some(max) = args.count
            && issued.fetch_add(1, Ordering::Relaxed) >= max
        {
            break;
        }
        message_id = message_id.wrapping_add(1);
        let token = rng.next().to_be_bytes();
        let token: [u8; TOKEN_LEN] = [token[0], token[1], token[2], token[3]];
        let request = template.stamp(message_id, token);
        let sent = Instant::now();
        match exchange(&socket, request, message_id, &token, args.timeout, &mut buf).await {
            Ok(Outcome::Answer(code)) if code >> 5 == 2 => {
                tally.latencies.record(sent.elapsed());
                tally.ok += 1;
            }
            Ok(Outcome::Answer(code)) => {
                tally.errors += 1;
                *tally.codes.entry(code_text(code)).or_default() += 1;
            }
            Ok(Outcome::Reset) => {
                tally.errors += 1;
                *tally.codes.entry("reset".to_owned()).or_default() += 1;
            }
            Ok(Outcome::Timeout) => tally.timeouts += 1,
            Err(_) => {
                // An ICMP "port unreachable" surfaces here; pausing keeps a dead server from
                // turning the loop into a busy spin.
                tally.io_errors += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    Ok(tally)
}

async fn prime(args: &Args, payload: &[u8]) -> anyhow::Result<()> {
    let socket = socket(args.addr).await?;
    let mut rng = Rng::new();
    // why: a u64 truncated to its low 16 bits is any valid message id.
    let message_id = rng.next() as u16;
    let token = rng.next().to_be_bytes();
    let mut template = Template::new(Method::Put, &args.path, payload)?;
    let request = template.stamp(message_id, [token[0], token[1], token[2], token[3]]);
    let mut buf = vec![0u8; 2048];
    let outcome = exchange(
        &socket,
        request,
        message_id,
        &token[..TOKEN_LEN],
        args.timeout,
        &mut buf,
    )
    .await
    .with_context(|| format!("priming PUT to {}", args.addr))?;
    match outcome {
        Outcome::Answer(code) if code >> 5 == 2 => Ok(()),
        Outcome::Answer(code) => bail!("the priming PUT got {}", code_text(code)),
        Outcome::Reset => bail!("the priming PUT was reset"),
        Outcome::Timeout => bail!("no answer to the priming PUT within {:?}", args.timeout),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    if args.sockets == 0 {
        bail!("--sockets must be at least 1");
    }
    let payload = vec![b'x'; args.payload];
    if args.prime {
        prime(&args, &payload).await?;
    }

    let issued = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + args.duration;
    let mut tasks = JoinSet::new();
    for _ in 0..args.sockets {
        let template = Template::new(args.method, &args.path, &payload)?;
        tasks.spawn(run_socket(args.clone(), template, issued.clone(), end));
    }
    let mut total = Tally::default();
    while let Some(joined) = tasks.join_next().await {
        let tally = joined??;
        total.latencies.merge(&tally.latencies);
        total.ok += tally.ok;
        total.timeouts += tally.timeouts;
        total.errors += tally.errors;
        total.io_errors += tally.io_errors;
        for (code, n) in tally.codes {
            *total.codes.entry(code).or_default() += n;
        }
    }
    let elapsed = start.elapsed();

    let codes: serde_json::Map<String, serde_json::Value> = total
        .codes
        .into_iter()
        .map(|(code, n)| (code, n.into()))
        .collect();
    Report::new(
        format!("coap con {} x{}", args.method.name(), args.sockets),
        total.ok,
        elapsed,
        &total.latencies,
    )
    .with("timeouts", total.timeouts)
    .with("errors", total.errors)
    .with("error_codes", codes)
    .with("io_errors", total.io_errors)
    .with("sockets", args.sockets as u64)
    .print();
    Ok(())
}
