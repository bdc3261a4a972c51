//! The endpoint behind DTLS (`coaps://`): one task owns the UDP socket, the DTLS transport
//! (`crate::dtls`) and a CoAP [`Endpoint`]; a DTLS session is the endpoint's `Peer::Session`,
//! and its handshake's principal is the principal of every request it carries.

use std::net::SocketAddr;
use std::pin::pin;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::endpoint::{Endpoint, Peer, Source};
use super::shell::{Jobs, follow, next_live, on_own_thread, tick_time};
use crate::bridge::Bridge;
use crate::config::{AuthConfig, CoapConfig, TlsConfig};
use crate::deadline::Deadline;
use crate::dtls::{Certificate, DtlsError, Output, Psk, Settings, Transport};
use crate::metrics::DtlsMeters;

/// Why the DTLS endpoint cannot start.
#[derive(Debug, thiserror::Error)]
pub enum CoapsError {
    /// The UDP socket cannot be bound.
    #[error("cannot listen for CoAP over DTLS on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The keys or certificate cannot be used.
    #[error(transparent)]
    Dtls(#[from] DtlsError),
    /// A PSK cannot be read (its `${VAR}` is not set).
    #[error("auth.psk: identity {identity:?}: key {reason}")]
    Key {
        /// The identity whose key it is.
        identity: String,
        /// Why.
        reason: String,
    },
}

/// The DTLS transport's settings from `[[auth.psk]]`, `[tls]` and `[coap]`; `None` when
/// neither names a key, and no `coaps://` socket opens.
pub fn dtls_settings(auth: &AuthConfig, tls: &TlsConfig) -> Result<Option<DtlsKeys>, CoapsError> {
    let psks = auth
        .psk
        .iter()
        .map(|entry| {
            let key = entry.key_bytes().map_err(|reason| CoapsError::Key {
                identity: entry.identity.clone(),
                reason,
            })?;
            Ok(Psk {
                identity: entry.identity.clone(),
                key,
                principal: entry.principal().to_owned(),
            })
        })
        .collect::<Result<Vec<_>, CoapsError>>()?;
    let certificate = match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => Some(Certificate {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: tls.client_ca.clone(),
            require_client_cert: tls.require_client_cert,
        }),
        _ => None,
    };
    if psks.is_empty() && certificate.is_none() {
        return Ok(None);
    }
    Ok(Some(DtlsKeys { psks, certificate }))
}

/// The keys and certificate `coaps://` opens with.
#[derive(Debug, Clone)]
pub struct DtlsKeys {
    psks: Vec<Psk>,
    certificate: Option<Certificate>,
}

/// A bound `coaps://` socket with its transport, ready to run.
pub struct CoapsServer {
    socket: UdpSocket,
    transport: Transport,
    config: CoapConfig,
}

impl std::fmt::Debug for CoapsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoapsServer")
            .field("addr", &self.socket.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl CoapsServer {
    /// Loads the keys and certificate, then binds `config.dtls_addr`.
    pub async fn bind(
        config: &CoapConfig,
        keys: DtlsKeys,
        meters: DtlsMeters,
    ) -> Result<Self, CoapsError> {
        let settings = Settings {
            psks: keys.psks,
            certificate: keys.certificate,
            max_sessions: config.dtls_max_sessions,
            max_handshakes: config.dtls_max_handshakes,
            max_handshakes_per_address: config.dtls_max_handshakes_per_address,
            handshake_timeout: config.dtls_handshake_timeout,
            idle_timeout: config.dtls_idle_timeout,
        };
        let transport = Transport::new(settings, meters, Instant::now())?;
        let addr = config.dtls_addr;
        let socket = UdpSocket::bind(addr)
            .await
            .map_err(|source| CoapsError::Bind { addr, source })?;
        Ok(Self {
            socket,
            transport,
            config: config.clone(),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.socket.local_addr().unwrap_or(self.config.dtls_addr)
    }

    /// Serves until `cancel` on a thread of its own with a current-thread runtime, as the plain
    /// endpoint does (`CoapServer::run` says why), then lets running jobs finish, tells every
    /// observer the endpoint is going away and closes every session.
    pub async fn run(self, bridge: Bridge, tracker: TaskTracker, cancel: CancellationToken) {
        let Self {
            socket,
            transport,
            config,
        } = self;
        on_own_thread(
            "coaps",
            "CoAP-over-DTLS",
            socket,
            move |socket| async move {
                serve(socket, transport, &config, bridge, tracker, cancel).await;
            },
        )
        .await;
    }
}

/// The loop: datagrams through the transport to the endpoint, and its answers back.
async fn serve(
    socket: UdpSocket,
    mut transport: Transport,
    config: &CoapConfig,
    bridge: Bridge,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    let mut shell = Shell {
        socket,
        endpoint: Endpoint::new(config, bridge.clone()),
        out: Vec::new(),
    };
    let mut jobs = Jobs::new(bridge, tracker);
    let mut deadline = Deadline::default();
    let mut sessions_tick = pin!(tokio::time::sleep(Duration::from_secs(1)));
    let mut buf = vec![0u8; 65_536];
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            received = shell.socket.recv_from(&mut buf) => match received {
                Ok((len, addr)) => {
                    transport.receive(Instant::now(), addr, &buf[..len], &mut shell.out);
                }
                Err(e) => tracing::debug!(error = %e, "CoAP over DTLS receive error"),
            },
            received = next_live(shell.endpoint.live()) => {
                shell.endpoint.on_live(received, Instant::now());
            }
            at = deadline.passed() => shell.endpoint.tick(tick_time(at)),
            Some((id, reply)) = jobs.next() => {
                shell.endpoint.completed(id, reply, Instant::now());
            }
            () = &mut sessions_tick => {
                let next = transport.tick(Instant::now(), &mut shell.out);
                let next = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
                sessions_tick.as_mut().reset(next.into());
            }
        }
        shell.flush(&mut transport, &jobs, &mut deadline).await;
    }
    jobs.close();
    loop {
        tokio::select! {
            done = jobs.next() => match done {
                Some((id, reply)) => shell.endpoint.completed(id, reply, Instant::now()),
                None => break,
            },
            at = deadline.passed() => shell.endpoint.tick(tick_time(at)),
        }
        shell.flush(&mut transport, &jobs, &mut deadline).await;
    }
    shell.endpoint.close();
    shell.flush(&mut transport, &jobs, &mut deadline).await;
    transport.close_all(&mut shell.out);
    shell.flush(&mut transport, &jobs, &mut deadline).await;
}

/// The socket and the endpoint, and the transport's outputs between the two.
struct Shell {
    socket: UdpSocket,
    endpoint: Endpoint,
    out: Vec<Output>,
}

impl Shell {
    /// Hands the transport's plaintext to the endpoint, seals what the endpoint answers, sends
    /// every datagram, starts the endpoint's jobs and follows its deadline.
    async fn flush(&mut self, transport: &mut Transport, jobs: &Jobs, deadline: &mut Deadline) {
        loop {
            let now = Instant::now();
            for output in std::mem::take(&mut self.out) {
                match output {
                    Output::Transmit { to, bytes } => {
                        if let Err(e) = self.socket.send_to(&bytes, to).await {
                            tracing::debug!(error = %e, addr = %to, "CoAP over DTLS send failed");
                        }
                    }
                    Output::Received {
                        session,
                        from,
                        principal,
                        bytes,
                    } => {
                        let source = Source {
                            peer: Peer::Session(session),
                            addr: from,
                            principal,
                        };
                        self.endpoint.receive(&source, &bytes, now);
                    }
                    // Its observations and separate responses end with it.
                    Output::Closed { session } => self.endpoint.forget(Peer::Session(session)),
                }
            }
            while let Some(transmit) = self.endpoint.poll_transmit() {
                if let Peer::Session(id) = transmit.peer {
                    transport.send(id, &transmit.bytes, &mut self.out);
                }
            }
            if self.out.is_empty() {
                break;
            }
        }
        jobs.start(&mut self.endpoint);
        follow(deadline, &mut self.endpoint);
    }
}
