//! The client listener, and the one rumqttd trap that only a fresh listener can clear.
//!
//! rumqttd's `Server` keeps, per listener, a map from client id to the channel that tells a
//! departed connection whether to publish its will. A connection registers there right after its
//! CONNECT, and removes itself only on the normal path, once its link has run. When it fails in
//! between (the router refuses it at `max_connections`, or the client resets before the CONNACK is
//! written) its entry stays behind with nobody listening, and the next CONNECT with that client
//! id panics while holding the map's mutex: from then on every connection to that listener panics
//! after its CONNECT, and MQTT is down for everyone.
//!
//! Such a connection is seen by the codec: its CONNECT was handed on, and it was dropped before
//! rumqttd ever asked it for another packet. It is reported here as an [`Orphan`]. From then on
//! that listener refuses the client id (CONNACK "server unavailable", before rumqttd looks it up),
//! and when the client comes back the listener is replaced by a new `Server` with an empty map,
//! at most once per [`RENEWAL_INTERVAL`]; the client is let in at its next attempt. Connections
//! already running keep their tasks; only the accept loop is new, and for the moment the socket
//! is rebound new connections are refused. When the router had already registered the orphan
//! (its CONNACK was written), its session is taken over and ended by a short-lived local link,
//! or it would hold a router connection for good.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;

use futures_util::FutureExt;
use rumqttd::local::LinkBuilder;
use rumqttd::protocol::{Disconnect, DisconnectReasonCode, Packet};
use rumqttd::{LinkType, Server};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::protocol::GatewayProtocol;

/// A connection that ended between its CONNECT and the start of its link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Orphan {
    /// The client id the router knows it by.
    pub(crate) client_id: String,
    /// The clean-session flag of its CONNECT.
    pub(crate) clean: bool,
    /// Whether the router accepted it (a CONNACK was written).
    pub(crate) registered: bool,
}

/// What the codec tells the listener.
#[derive(Debug)]
pub(crate) enum Report {
    /// A connection was orphaned; its client id is refused by this listener from now on.
    Orphaned(Orphan),
    /// A client whose id is refused came back: a new listener should take over.
    Returned,
}

/// Where the codec reports to the listener.
pub(crate) type Reports = mpsc::UnboundedSender<Report>;

/// Shortest time between two renewals of the listener: each closes the listening socket for a
/// moment, refusing whoever connects then, so a flapping client cannot make that constant.
const RENEWAL_INTERVAL: Duration = Duration::from_secs(1);

type MakeServer = Box<dyn Fn() -> Server<GatewayProtocol> + Send>;
type Reap = Arc<dyn Fn(&Orphan) -> Result<(), String> + Send + Sync>;

/// Everything needed to (re)build the client listener.
pub(crate) struct Listener {
    /// The address the server binds.
    addr: SocketAddr,
    make_server: MakeServer,
    reap: Reap,
    reports: mpsc::UnboundedReceiver<Report>,
}

impl Listener {
    /// `make_server` builds a listener with an empty will map; `reap` ends an orphan's session in
    /// the router, usually with [`end_session`]. (Both are closures because the router channel's
    /// item type is private to rumqttd.)
    pub(crate) fn new(
        addr: SocketAddr,
        make_server: impl Fn() -> Server<GatewayProtocol> + Send + 'static,
        reap: impl Fn(&Orphan) -> Result<(), String> + Send + Sync + 'static,
        reports: mpsc::UnboundedReceiver<Report>,
    ) -> Self {
        Self {
            addr,
            make_server: Box::new(make_server),
            reap: Arc::new(reap),
            reports,
        }
    }

    /// Accepts clients until cancelled; renews the listener when an orphaned client id returns.
    pub(crate) async fn run(mut self, cancel: CancellationToken) -> Result<(), String> {
        let mut renewed = Instant::now();
        loop {
            let mut server = (self.make_server)();
            let start = server.start(LinkType::Remote);
            tokio::pin!(start);
            // The first poll binds the listening socket (and fails only when it cannot).
            if let Poll::Ready(res) = futures_util::poll!(&mut start) {
                return res.map_err(|e| e.to_string());
            }
            turn_nagle_off(self.addr).await;
            let mut renew_at: Option<Instant> = None;
            loop {
                tokio::select! {
                    res = &mut start => return res.map_err(|e| e.to_string()),
                    () = cancel.cancelled() => return Ok(()),
                    () = sleep_until(renew_at.unwrap_or_else(Instant::now)), if renew_at.is_some() => break,
                    Some(report) = self.reports.recv() => match report {
                        Report::Orphaned(orphan) if orphan.registered => self.reap(orphan),
                        Report::Orphaned(_) => {}
                        Report::Returned => {
                            renew_at.get_or_insert(renewed + RENEWAL_INTERVAL);
                        }
                    },
                }
            }
            renewed = Instant::now();
            tracing::info!(
                "MQTT listener renewed for clients whose connection broke before its CONNACK"
            );
        }
    }

    /// Ends an orphan's session in the router, off the runtime's workers: registering a local
    /// link waits on the router.
    fn reap(&self, orphan: Orphan) {
        let reap = self.reap.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = reap(&orphan) {
                tracing::warn!(client_id = %orphan.client_id, error = %e,
                    "cannot end an orphaned MQTT session");
            }
        });
    }
}

/// Connections rumqttd accepts from now on send each packet at once (see `nodelay`). The
/// search goes through every descriptor of the process, thousands when the listener is
/// renewed under load, so it runs off the runtime's workers. A connection whose handshake
/// completes in that moment (before the gateway reports ready, or during a renewal) keeps
/// Nagle's algorithm.
async fn turn_nagle_off(addr: SocketAddr) {
    #[cfg(target_os = "linux")]
    let set = tokio::task::spawn_blocking(move || super::nodelay::set_on_listener(addr))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    #[cfg(not(target_os = "linux"))]
    let set: std::io::Result<()> = Err(std::io::ErrorKind::Unsupported.into());
    if let Err(e) = set {
        tracing::warn!(%addr, error = %e,
            "cannot turn Nagle's algorithm off for MQTT clients: small packets such as \
             PUBACKs may wait up to 40 ms for the client's ACK");
    }
}

/// Takes the session over with a local link (the router drops the orphaned connection, keeping
/// its session when it was not clean) and disconnects at once, releasing the connection slot.
/// Blocks until the router answers.
pub(crate) fn end_session(builder: LinkBuilder<'_>) -> Result<(), String> {
    let (mut tx, _rx, _ack) = builder.build().map_err(|e| e.to_string())?;
    let disconnect = Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        },
        None,
    );
    // `send` never waits: it queues the packet and notifies the router.
    match tx.send(disconnect).now_or_never() {
        Some(Ok(_)) => Ok(()),
        Some(Err(e)) => Err(e.to_string()),
        None => Err("the router did not take the DISCONNECT".to_owned()),
    }
}
