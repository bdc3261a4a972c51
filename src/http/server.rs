//! The HTTP and HTTPS accept loop: a bounded number of connections per listener, a deadline for
//! the TLS handshake and for request headers (slowloris), and the peer's address and certificate
//! name handed to the router with every request.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use futures_util::FutureExt;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustix::net::RecvFlags;
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::App;
use super::auth::ClientName;
use super::direct::{self, Then};
use crate::tls::{Tls, accept};

/// How one listener treats its connections.
#[derive(Debug, Clone)]
pub struct Listening {
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Time for the TLS handshake, for a request's headers, and for an idle connection's next
    /// request to begin.
    pub header_timeout: Duration,
    /// Set for HTTPS.
    pub tls: Option<Tls>,
}

/// Serves `app` on `listener` until `cancel` fires, then lets in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    app: App,
    listening: Listening,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(listening.max_connections));
    // Cancelled when the listener stops: each connection then finishes its in-flight requests
    // (hyper's graceful shutdown) and ends.
    let stopping = CancellationToken::new();
    // Every connection task, so that shutdown also waits for the event streams `direct` writes,
    // which hyper's graceful shutdown does not see.
    let connections = TaskTracker::new();
    // HTTP/1.1 only over TLS: hyper answers an HTTP/2 request refused before its body was read
    // with a stream reset that curl reports as a failed transfer instead of the 401 or 413.
    let tls = listening.tls.as_ref().map(|t| t.with_alpn(&[b"http/1.1"]));
    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(listening.header_timeout);
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(listening.header_timeout));
    let builders = Arc::new((http1, http2));
    let what = if tls.is_some() { "https" } else { "http" };
    loop {
        let ((stream, peer), slot) = tokio::select! {
            () = cancel.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => tokio::select! {
                    () = cancel.cancelled() => break,
                    accepted = accept(&listener, what) => (accepted, slot),
                },
                Err(_) => break,
            },
        };
        let connection = Connection {
            app: app.clone(),
            builders: builders.clone(),
            tls: tls.clone(),
            deadline: listening.header_timeout,
            peer,
        };
        let stopping = stopping.clone();
        connections.spawn(async move {
            connection.serve(stream, stopping).await;
            drop(slot);
        });
    }
    drop(listener);
    stopping.cancel();
    connections.close();
    connections.wait().await;
    Ok(())
}

struct Connection {
    app: App,
    builders: Arc<(http1::Builder, http2::Builder<TokioExecutor>)>,
    tls: Option<Tls>,
    deadline: Duration,
    peer: SocketAddr,
}

impl Connection {
    async fn serve(self, stream: TcpStream, stopping: CancellationToken) {
        let Self {
            app,
            builders,
            tls,
            deadline,
            peer,
        } = self;
        let (io, client_name, h2): (Box<dyn Io>, _, _) = match tls {
            None => match tokio::time::timeout(deadline, opening(&stream, peer)).await {
                Ok(Ok(Opening::Http2)) => (Box::new(stream), None, true),
                Ok(Ok(Opening::Http1(None))) => (Box::new(stream), None, false),
                Ok(Ok(Opening::Http1(Some(asked)))) => {
                    let mut stream = stream;
                    match direct::answer(&mut stream, asked, &app).await {
                        Ok(Then::GoOn) => (Box::new(stream), None, false),
                        Ok(Then::Close) => return,
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "event stream connection ended");
                            return;
                        }
                    }
                }
                Ok(Err(_)) => return,
                Err(_) => {
                    let reason = "closed: no request within http.header_timeout";
                    return crate::refused::log("http", peer, &reason);
                }
            },
            Some(tls) => match tls.accept(stream, deadline).await {
                Ok(accepted) => (Box::new(accepted.stream), accepted.client_name, false),
                Err(e) => {
                    let reason = format_args!("TLS handshake refused: {e}");
                    return crate::refused::log("https", peer, &reason);
                }
            },
        };
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            if let Some(name) = &client_name {
                request.extensions_mut().insert(ClientName(name.clone()));
            }
            app.handle(request.map(Body::new)).map(Ok::<_, Infallible>)
        });
        let io = TokioIo::new(io);
        let served = if h2 {
            let conn = std::pin::pin!(builders.1.serve_connection(io, service));
            until_stopped(conn, &stopping, |c| c.graceful_shutdown()).await
        } else {
            // Upgrades serve MQTT over WebSocket (`/mqtt`); an upgraded connection belongs to
            // the broker from then on.
            let conn = std::pin::pin!(builders.0.serve_connection(io, service).with_upgrades());
            until_stopped(conn, &stopping, |c| c.graceful_shutdown()).await
        };
        match served {
            Ok(()) => {}
            // hyper answered a request it could not parse (400, 431) or cut a slow head off
            // itself: a refused client, as much as one the router refused.
            Err(e) if e.is_parse() || e.is_timeout() => {
                let what = if h2 { "http2" } else { "http" };
                crate::refused::log(what, peer, &format_args!("closed: {e}"));
            }
            Err(e) => tracing::debug!(%peer, error = %e, "HTTP connection ended with an error"),
        }
    }
}

/// Serves a connection; once `stopping` fires, lets it finish its requests and end.
async fn until_stopped<C, T>(
    mut conn: std::pin::Pin<&mut C>,
    stopping: &CancellationToken,
    graceful_shutdown: impl FnOnce(std::pin::Pin<&mut C>),
) -> T
where
    C: Future<Output = T>,
{
    tokio::select! {
        served = conn.as_mut() => served,
        () = stopping.cancelled() => {
            graceful_shutdown(conn.as_mut());
            conn.await
        }
    }
}

/// The connection preface of HTTP/2 with prior knowledge (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How a plain connection opens.
enum Opening {
    /// With the HTTP/2 preface.
    Http2,
    /// With anything else, for HTTP/1.1; a first request asking for an event stream is taken
    /// by `direct`.
    Http1(Option<direct::Asked>),
}

/// Tells how a plain connection opens. The bytes are looked at, not read, so hyper starts
/// with an empty read buffer: replaying bytes read ahead made hyper grow its buffer to 16 KiB
/// on every connection, twice what one request needs.
async fn opening(stream: &TcpStream, peer: SocketAddr) -> std::io::Result<Opening> {
    let mut seen = [0u8; PREFACE.len()];
    let mut n = stream.peek(&mut seen).await?;
    loop {
        if n == 0 || seen[..n] != PREFACE[..n] {
            let asked = if direct::may_ask_for_events(&seen[..n]) {
                direct::look(stream, peer).await?
            } else {
                None
            };
            return Ok(Opening::Http1(asked));
        }
        if n == PREFACE.len() {
            return Ok(Opening::Http2);
        }
        match peek_more(stream, &mut seen, n).await? {
            Some(more) => n = more,
            // Closed in the middle of the preface: hyper reads what there is and ends it.
            None => return Ok(Opening::Http1(None)),
        }
    }
}

/// Waits until more than `known` bytes are queued on `stream` and looks at them, without
/// reading, into `buf`; `None` once the peer has closed its side with no more than `known`
/// sent.
///
/// The bytes already queued keep the socket readable, so waiting for readiness alone would
/// return at once: the readiness is cleared while no new bytes are there, and the next segment
/// (or the peer's FIN) sets it again. A client that sends its head a byte at a time therefore
/// costs one wake-up per segment, not a poll on a timer.
pub(super) async fn peek_more(
    stream: &TcpStream,
    buf: &mut [u8],
    known: usize,
) -> std::io::Result<Option<usize>> {
    loop {
        let ready = stream.ready(Interest::READABLE).await?;
        let looked = stream.try_io(Interest::READABLE, || {
            let (n, _) =
                rustix::net::recv(stream, &mut *buf, RecvFlags::PEEK | RecvFlags::DONTWAIT)?;
            if n > known {
                Ok(Some(n))
            } else if ready.is_read_closed() {
                Ok(None)
            } else {
                Err(std::io::ErrorKind::WouldBlock.into())
            }
        });
        match looked {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

/// A plain or TLS byte stream.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}
