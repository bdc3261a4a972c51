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
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::App;
use super::auth::ClientName;
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
    let graceful = GracefulShutdown::new();
    // HTTP/1.1 only over TLS: hyper answers an HTTP/2 request refused before its body was read
    // with a stream reset that curl reports as a failed transfer instead of the 401 or 413.
    let tls = listening.tls.as_ref().map(|t| t.with_alpn(&[b"http/1.1"]));
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(listening.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(listening.header_timeout));
    let builder = Arc::new(builder);
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
            builder: builder.clone(),
            tls: tls.clone(),
            deadline: listening.header_timeout,
            peer,
        };
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            connection.serve(stream, watcher).await;
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

struct Connection {
    app: App,
    builder: Arc<Builder<TokioExecutor>>,
    tls: Option<Tls>,
    deadline: Duration,
    peer: SocketAddr,
}

impl Connection {
    async fn serve(self, stream: TcpStream, watcher: hyper_util::server::graceful::Watcher) {
        let Self {
            app,
            builder,
            tls,
            deadline,
            peer,
        } = self;
        let (io, client_name): (Box<dyn Io>, _) = match tls {
            None => (Box::new(stream), None),
            Some(tls) => match tls.accept(stream, deadline).await {
                Ok(accepted) => (Box::new(accepted.stream), accepted.client_name),
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
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
        let served = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        if let Err(e) = watcher.watch(served.into_owned()).await {
            tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
        }
    }
}

/// A plain or TLS byte stream.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}
