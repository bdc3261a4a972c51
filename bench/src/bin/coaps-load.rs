//! Closed-loop CoAP-over-DTLS load with a PSK (OpenSSL's DTLS client): each of `--sockets`
//! threads opens one session, then sends a confirmable GET, waits for its answer and sends the
//! next; reports answers per second and their latency. With `--handshakes`, each thread
//! instead handshakes again and again from fresh sockets and the report counts handshakes.
//! `coaps-load --addr 127.0.0.1:5684 --identity bench --key bench-key-0123 --duration 5s`
//! (also works against libcoap's `coap-server-openssl -k KEY`).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use openssl::ssl::{ErrorCode, Ssl, SslContext, SslMethod, SslStream};
use topicgate_bench::{Latencies, Report, parse_duration};

/// Closed-loop CoAP GETs over DTLS sessions, or handshakes.
#[derive(Parser)]
struct Args {
    /// CoAP-over-DTLS server address.
    #[arg(long, default_value = "127.0.0.1:5684")]
    addr: SocketAddr,
    /// Sessions, each with one request in flight (threads).
    #[arg(long, default_value_t = 16)]
    sockets: usize,
    /// PSK identity.
    #[arg(long)]
    identity: String,
    /// PSK, as text.
    #[arg(long)]
    key: String,
    /// OpenSSL cipher list the client offers.
    #[arg(long, default_value = "PSK-AES128-CCM8")]
    cipher: String,
    /// Resource path, split into Uri-Path options.
    #[arg(long, default_value = "/topics/bench/coap")]
    path: String,
    /// How long to send requests.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// How long a handshake or request waits before it counts as a timeout.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    timeout: Duration,
    /// Before measuring, PUT 100 bytes to the path so that GET reads a retained value.
    #[arg(long)]
    prime: bool,
    /// Measure handshakes (each followed by one GET) instead of GETs on open sessions.
    #[arg(long)]
    handshakes: bool,
}

/// A connected UDP socket as OpenSSL's byte stream: one datagram per read and write.
struct Udp(UdpSocket);

impl Read for Udp {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.recv(buf)
    }
}

impl Write for Udp {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.send(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Session {
    stream: SslStream<Udp>,
    mid: u16,
    buf: Vec<u8>,
}

fn context(args: &Args) -> anyhow::Result<SslContext> {
    let mut b = SslContext::builder(SslMethod::dtls_client())?;
    b.set_cipher_list(&args.cipher)?;
    let (identity, key) = (
        args.identity.clone().into_bytes(),
        args.key.clone().into_bytes(),
    );
    b.set_psk_client_callback(move |_, _, id, psk| {
        let (n, k) = (identity.len().min(id.len() - 1), key.len().min(psk.len()));
        id[..n].copy_from_slice(&identity[..n]);
        id[n] = 0;
        psk[..k].copy_from_slice(&key[..k]);
        Ok(k)
    });
    Ok(b.build())
}

fn connect(ctx: &SslContext, args: &Args) -> anyhow::Result<Session> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.connect(args.addr)?;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut stream = SslStream::new(Ssl::new(ctx)?, Udp(socket))?;
    let deadline = Instant::now() + args.timeout;
    loop {
        match stream.connect() {
            Ok(()) => break,
            Err(e) if e.code() == ErrorCode::WANT_READ && Instant::now() < deadline => {}
            Err(e) => bail!("handshake with {}: {e}", args.addr),
        }
    }
    Ok(Session {
        stream,
        mid: 0,
        buf: vec![0; 2048],
    })
}

impl Session {
    /// Sends one confirmable request; its response code, or `None` on timeout.
    fn call(
        &mut self,
        method: RequestType,
        path: &str,
        payload: &[u8],
        wait: Duration,
    ) -> anyhow::Result<Option<MessageClass>> {
        self.mid = self.mid.wrapping_add(1);
        let mut p = Packet::new();
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(method);
        p.header.message_id = self.mid;
        p.set_token(self.mid.to_be_bytes().to_vec());
        for segment in path.split('/').filter(|s| !s.is_empty()) {
            p.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
        }
        p.payload = payload.to_vec();
        let bytes = p.to_bytes().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        self.stream.ssl_write(&bytes)?;
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            match self.stream.ssl_read(&mut self.buf) {
                Ok(n) => {
                    if let Ok(r) = Packet::from_bytes(&self.buf[..n])
                        && r.header.message_id == self.mid
                    {
                        return Ok(Some(r.header.code));
                    }
                }
                Err(e) if e.code() == ErrorCode::WANT_READ => {}
                Err(e) => bail!("session with {}: {e}", self.stream.get_ref().0.peer_addr()?),
            }
        }
        Ok(None)
    }
}

#[derive(Default)]
struct Tally {
    latencies: Latencies,
    ok: u64,
    timeouts: u64,
    errors: u64,
}

fn run(args: &Args, ctx: &SslContext, end: Instant) -> anyhow::Result<Tally> {
    let mut tally = Tally::default();
    let mut session = if args.handshakes {
        None
    } else {
        Some(connect(ctx, args)?)
    };
    while Instant::now() < end {
        let started = Instant::now();
        let mut fresh = None;
        let s = match session.as_mut() {
            Some(s) => s,
            None => match connect(ctx, args) {
                Ok(s) => fresh.insert(s),
                // A handshake the server never finished: counted, and the next one starts.
                Err(_) => {
                    tally.timeouts += 1;
                    continue;
                }
            },
        };
        match s.call(RequestType::Get, &args.path, b"", args.timeout)? {
            Some(MessageClass::Response(ResponseType::Content)) => {
                tally.ok += 1;
                tally.latencies.record(started.elapsed());
            }
            Some(_) => tally.errors += 1,
            None => tally.timeouts += 1,
        }
        if let Some(mut s) = fresh {
            // close_notify, so the server can drop the session at once.
            let _ = s.stream.shutdown();
        }
    }
    Ok(tally)
}

fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    if args.sockets == 0 {
        bail!("--sockets must be at least 1");
    }
    let ctx = context(&args)?;
    if args.prime {
        let mut s = connect(&ctx, &args).context("priming")?;
        match s.call(RequestType::Put, &args.path, &[b'x'; 100], args.timeout)? {
            Some(MessageClass::Response(ResponseType::Changed | ResponseType::Created)) => {}
            other => bail!("the priming PUT got {other:?}"),
        }
    }
    let start = Instant::now();
    let end = start + args.duration;
    let threads: Vec<_> = (0..args.sockets)
        .map(|_| {
            let (args, ctx) = (args.clone(), ctx.clone());
            thread::spawn(move || run(&args, &ctx, end))
        })
        .collect();
    let mut total = Tally::default();
    for t in threads {
        let tally = t
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
        total.latencies.merge(&tally.latencies);
        total.ok += tally.ok;
        total.timeouts += tally.timeouts;
        total.errors += tally.errors;
    }
    let what = if args.handshakes {
        "handshake+get"
    } else {
        "con get"
    };
    Report::new(
        format!("coaps {what} x{}", args.sockets),
        total.ok,
        start.elapsed(),
        &total.latencies,
    )
    .with("timeouts", total.timeouts)
    .with("errors", total.errors)
    .with("sockets", args.sockets as u64)
    .with("cipher", args.cipher.clone())
    .print();
    Ok(())
}
