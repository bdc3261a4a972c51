//! The embedded rumqttd: router thread, client listener on the gateway's runtime, and the
//! gateway's own link into the router.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener as StdTcpListener};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use rumqttd::local::LinkBuilder;
use rumqttd::{ConnectionSettings, Router, RouterConfig, Server, ServerSettings, Strategy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::MqttError;
use super::link::{Link, LinkParts, LinkStats};
use super::listener::{Listener, end_session};
use super::message::RetainedSource;
use super::protocol::{GatewayProtocol, Shared};
use super::secure::{self, Secret};
use crate::config::MqttConfig;
use crate::policy::Policy;
use crate::tls::Tls;

/// Room for the topic, properties and packet id around the largest payload.
const PACKET_OVERHEAD: usize = 64 * 1024 + 4096;

/// Router connections beyond `mqtt.max_connections`: see `router_config`.
const ROUTER_HEADROOM: usize = 1024;

/// The broker, bound and ready to run.
pub struct Broker {
    addr: SocketAddr,
    listener: Listener,
    secure: Option<SecureFront>,
    link_parts: LinkParts,
    stats: Arc<LinkStats>,
}

/// MQTT over TLS: the public listener, and the loopback rumqttd listener it relays to.
struct SecureFront {
    front: StdTcpListener,
    tls: Tls,
    inner: SocketAddr,
    secret: Secret,
    listener: Listener,
    /// Time a TLS client has for its handshake.
    handshake: Duration,
}

impl Broker {
    /// Starts the router, opens the gateway's link and reserves the client listener's address.
    pub fn bind(
        config: &MqttConfig,
        max_payload: usize,
        retained: Arc<dyn RetainedSource>,
        policy: Policy,
        tls: Option<Tls>,
    ) -> Result<Self, MqttError> {
        // rumqttd binds its listener itself from an address, so the port is resolved here first:
        // a busy port is reported now, and port 0 becomes a concrete one.
        let addr = StdTcpListener::bind(config.addr)
            .and_then(|l| l.local_addr())
            .map_err(|source| MqttError::Bind {
                addr: config.addr,
                source,
            })?;

        let listeners = if tls.is_some() { 2 } else { 1 };
        let router = Router::new(0, router_config(config, listeners));
        let router_tx = router.spawn();
        let (link_tx, link_rx) = LinkBuilder::new(&link_client_id(), router_tx.clone())
            .build()
            .map(|(tx, rx, _ack)| (tx, rx))
            .map_err(|e| MqttError::Link(e.to_string()))?;
        let full = {
            let router_tx = router_tx.clone();
            Box::new(move || router_tx.is_full())
        };
        let link_parts = LinkParts::new(link_tx, link_rx, full)?;

        let settings = ServerSettings {
            name: "mqtt".to_owned(),
            listen: addr,
            tls: None,
            next_connection_delay_ms: 0,
            connections: ConnectionSettings {
                connection_timeout_ms: u16::try_from(config.connect_timeout.as_millis())
                    .unwrap_or(u16::MAX),
                max_payload_size: max_payload + PACKET_OVERHEAD,
                max_inflight_count: config.max_inflight,
                auth: None,
                external_auth: None,
                // Every topic a client may publish to matches the gateway's own `#`
                // subscription, so no per-topic logs are ever needed.
                dynamic_filters: false,
            },
        };
        let stats = Arc::new(LinkStats::default());
        // One listener: its codec settings, and the means to renew it (see `listener`).
        let listener = |settings: ServerSettings, introduction: Option<Secret>| {
            let (reports, reported) = tokio::sync::mpsc::unbounded_channel();
            let shared = Arc::new(Shared {
                max_payload,
                retained: retained.clone(),
                stats: stats.clone(),
                policy: policy.clone(),
                reports,
                max_clients: config.max_connections,
                clients: AtomicUsize::new(0),
                introduction,
            });
            let (server_tx, reap_tx) = (router_tx.clone(), router_tx.clone());
            Listener::new(
                settings.listen,
                move || {
                    let protocol = GatewayProtocol::new(shared.clone());
                    Server::new(settings.clone(), server_tx.clone(), protocol)
                },
                move |orphan| {
                    end_session(
                        LinkBuilder::new(&orphan.client_id, reap_tx.clone())
                            .clean_session(orphan.clean),
                    )
                },
                reported,
            )
        };
        let secure = match tls {
            None => None,
            Some(tls) => {
                let front = StdTcpListener::bind(config.tls_addr)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .map_err(|source| MqttError::Bind {
                        addr: config.tls_addr,
                        source,
                    })?;
                // The relay's side door: loopback only, and useless without the secret.
                let inner = StdTcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                    .and_then(|l| l.local_addr())
                    .map_err(|source| MqttError::Bind {
                        addr: config.tls_addr,
                        source,
                    })?;
                let secret = Secret::random();
                let settings = ServerSettings {
                    name: "mqtts".to_owned(),
                    listen: inner,
                    ..settings.clone()
                };
                Some(SecureFront {
                    front,
                    tls,
                    inner,
                    secret,
                    listener: listener(settings, Some(secret)),
                    handshake: config.connect_timeout,
                })
            }
        };
        let listener = listener(settings, None);
        Ok(Self {
            addr,
            listener,
            secure,
            link_parts,
            stats,
        })
    }

    /// The address MQTT clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address MQTT-over-TLS clients connect to, when TLS is configured.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.secure.as_ref().and_then(|s| s.front.local_addr().ok())
    }

    /// Starts accepting clients and the gateway's link; returns once the listener answers.
    pub async fn run(
        self,
        link_buffer: usize,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Result<Link, MqttError> {
        let Self {
            addr,
            listener,
            secure,
            link_parts,
            stats,
        } = self;
        let server_task = tracker.spawn(listener.run(cancel.clone()));
        let secure = match secure {
            None => None,
            Some(front) => {
                let inner_task = tracker.spawn(front.listener.run(cancel.clone()));
                let relay = TcpListener::from_std(front.front)
                    .map_err(|source| MqttError::Bind { addr, source })?;
                tracker.spawn(secure::relay(
                    relay,
                    front.tls,
                    front.inner,
                    front.secret,
                    front.handshake,
                    tracker.clone(),
                    cancel.clone(),
                ));
                Some((front.inner, front.secret, inner_task))
            }
        };
        let link = link_parts.run(stats, link_buffer, tracker, cancel);

        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if server_task.is_finished() {
                let reason = match server_task.await {
                    Ok(Err(e)) => e,
                    _ => "listener stopped".to_owned(),
                };
                return Err(MqttError::Bind {
                    addr,
                    source: io::Error::other(reason),
                });
            }
            let inner_ready = match &secure {
                None => true,
                Some((inner, secret, task)) => {
                    if task.is_finished() {
                        return Err(MqttError::Bind {
                            addr: *inner,
                            source: io::Error::other("the listener behind the TLS relay stopped"),
                        });
                    }
                    probe(*inner, &secret.introduce(None)).await.is_ok()
                }
            };
            if inner_ready && probe(addr, &[]).await.is_ok() {
                return Ok(link);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(MqttError::NotReady(addr));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A client id no MQTT client can guess, so none can take the gateway's session over.
fn link_client_id() -> String {
    format!("topicgate-bridge-{:016x}", rand::random::<u64>())
}

/// Every router setting chosen on purpose: rumqttd's `RouterConfig::default()` is all zeros.
pub(super) fn router_config(config: &MqttConfig, listeners: usize) -> RouterConfig {
    RouterConfig {
        // The codec turns clients away above `max_connections` with a CONNACK; the router must
        // not refuse first (it closes without one), so it has room for the gateway's own link,
        // refused connections on their way out, and the sessions the listener ends.
        max_connections: config.max_connections * listeners + ROUTER_HEADROOM,
        // Publishes read from a log in one pass for a QoS 0 subscriber. rumqttd pauses a
        // connection whose buffer reaches 200 messages until it asks for more; reading half of
        // that lets a subscriber that keeps up stay scheduled instead of waiting its turn again.
        max_outgoing_packet_count: 100,
        // Each subscribed filter keeps at most `segment_count` segments of this size in memory:
        // this bounds the broker's memory whatever the message rate.
        max_segment_size: config.segment_size.max(1024),
        max_segment_count: config.segment_count.max(1),
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Strategy::RoundRobin,
    }
}

/// One MQTT 3.1.1 CONNECT/CONNACK/DISCONNECT round trip: the listener is up and the router
/// answers.
async fn probe(addr: SocketAddr, introduction: &[u8]) -> io::Result<()> {
    let target = match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => {
            SocketAddr::from((Ipv4Addr::LOCALHOST, a.port()))
        }
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::from((Ipv6Addr::LOCALHOST, a.port()))
        }
        other => other,
    };
    let attempt = async {
        let mut stream = TcpStream::connect(target).await?;
        stream.write_all(introduction).await?;
        stream
            .write_all(&[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 5, 0, 0])
            .await?;
        let mut connack = [0u8; 4];
        stream.read_exact(&mut connack).await?;
        // Any CONNACK will do: with anonymous access off the probe is refused, which proves
        // as well that the listener and the router answer.
        if connack[0] != 0x20 {
            return Err(io::Error::other("unexpected CONNACK"));
        }
        stream.write_all(&[0xE0, 0]).await
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoRetained;

    impl RetainedSource for NoRetained {
        fn retained_matching(&self, _: &str) -> Vec<super::super::MqttPublish> {
            Vec::new()
        }
    }

    /// A client's PUBACKs and deliveries leave at once: the connection rumqttd accepted for it
    /// has Nagle's algorithm off (see `nodelay`).
    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clients_are_served_without_nagles_delay() {
        let config = MqttConfig {
            addr: (Ipv4Addr::LOCALHOST, 0).into(),
            ..MqttConfig::default()
        };
        let broker =
            Broker::bind(&config, 1024, Arc::new(NoRetained), Policy::open(), None).unwrap();
        let addr = broker.addr();
        let cancel = CancellationToken::new();
        let _link = broker
            .run(8, &TaskTracker::new(), cancel.clone())
            .await
            .unwrap();

        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(&[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 5, 0, 0])
            .await
            .unwrap();
        let mut connack = [0u8; 4];
        client.read_exact(&mut connack).await.unwrap();
        assert_eq!(connack, [0x20, 2, 0, 0], "accepted");
        assert!(super::super::nodelay::accepted_has_nodelay(
            client.local_addr().unwrap()
        ));
        cancel.cancel();
    }
}
