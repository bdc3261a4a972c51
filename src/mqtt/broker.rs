//! The embedded broker: rumqttd's router on its thread, and the gateway's own listeners (TCP
//! and TLS) whose connections each run a session in front of the router.

use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use futures_util::FutureExt;
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol as r;
use rumqttd::{Router, RouterConfig, Strategy};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::MqttError;
use super::connection::{Front, LinkFactory, serve};
use super::flow::Matcher;
use super::link::{Link, LinkParts, LinkStats};
use super::message::{Inbound, Meta, MqttPublish, RetainedSource};
use super::routing::to_router;
use super::sessions::{Reap, Sessions, WillSink};
use super::settings::{Audience, BrokerStats, Settings};
use crate::config::MqttConfig;
use crate::policy::Policy;
use crate::tls::{Tls, accept};

/// Room for the topic, properties and packet id around the largest payload.
const PACKET_OVERHEAD: usize = 64 * 1024 + 4096;

/// Router connections beyond `mqtt.max_connections`: the gateway's links and sessions that are
/// kept while their clients are away.
const ROUTER_HEADROOM: usize = 1024;

/// Topic Alias Maximum announced to MQTT 5 clients (Mosquitto's default).
const TOPIC_ALIAS_MAX: u16 = 10;

/// The broker, bound and ready to run.
pub struct Broker {
    /// One or more addresses (IPv4 and IPv6 loopback by default), one port.
    listeners: Vec<StdTcpListener>,
    secure: Option<(StdTcpListener, Tls)>,
    link_parts: LinkParts,
    front: Option<FrontParts>,
    stats: Arc<LinkStats>,
    broker_stats: Arc<BrokerStats>,
    connect_timeout: Duration,
}

/// What the connections need that is made once the gateway's tracker is known.
struct FrontParts {
    settings: Arc<Settings>,
    links: LinkFactory,
    reap: Reap,
    /// The router link wills are published on.
    will_link: (LinkTx, LinkRx),
    max_clients: usize,
}

impl Broker {
    /// Starts the router, opens the gateway's link and binds the client listeners: every
    /// address of `addrs` (a port 0 after the first takes the first's port; an IPv6 address the
    /// host cannot bind is skipped), and the TLS one when TLS is configured.
    pub fn bind(
        config: &MqttConfig,
        addrs: &[SocketAddr],
        max_payload: usize,
        retained: Arc<dyn RetainedSource>,
        policy: Policy,
        tls: Option<Tls>,
    ) -> Result<Self, MqttError> {
        let bind = |addr: SocketAddr| {
            StdTcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|source| MqttError::Bind { addr, source })
        };
        let mut listeners: Vec<StdTcpListener> = Vec::with_capacity(addrs.len());
        for &asked in addrs {
            let mut addr = asked;
            let first_port = listeners
                .first()
                .and_then(|l| l.local_addr().ok())
                .map(|a| a.port());
            if let (0, Some(port)) = (addr.port(), first_port) {
                addr.set_port(port);
            }
            match bind(addr) {
                Ok(listener) => listeners.push(listener),
                Err(MqttError::Bind { source, .. })
                    if first_port.is_some()
                        && addr.is_ipv6()
                        && source.kind() != std::io::ErrorKind::AddrInUse =>
                {
                    tracing::debug!(%addr, error = %source, "no IPv6 loopback for MQTT; IPv4 only");
                }
                Err(e) => return Err(e),
            }
        }
        if listeners.is_empty() {
            return Err(MqttError::NotReady(SocketAddr::from(([0, 0, 0, 0], 0))));
        }
        let secure = match tls {
            Some(tls) => Some((bind(config.tls_addr)?, tls)),
            None => None,
        };

        let router = Router::new(0, router_config(config));
        let router_tx = router.spawn();
        let links: LinkFactory = {
            let router_tx = router_tx.clone();
            Arc::new(move |client_id: &str, clean: bool| {
                LinkBuilder::new(client_id, router_tx.clone())
                    .clean_session(clean)
                    .build()
                    .map(|(tx, rx, _ack)| (tx, rx))
                    .map_err(|e| e.to_string())
            })
        };
        // A filter's log stays in the router after its last subscriber leaves. One `#` log with
        // no reader makes every topic match some filter (the router disconnects a publisher
        // whose topic matches none) and costs an append per publish, bounded by the segments.
        keep_every_topic_routable(&links)?;
        let (link_tx, link_rx) = links(
            &format!("topicgate-bridge-{:016x}", rand::random::<u64>()),
            true,
        )
        .map_err(MqttError::Link)?;
        let full = {
            let router_tx = router_tx.clone();
            Box::new(move || router_tx.is_full())
        };
        let link_parts = LinkParts::new(link_tx, link_rx, full);
        let reap: Reap = {
            let links = links.clone();
            Arc::new(move |client_id: &str| {
                if let Ok((mut tx, _rx)) = links(client_id, true) {
                    let _ = tx.send(disconnect()).now_or_never();
                }
            })
        };
        let stats = Arc::new(LinkStats::default());
        let broker_stats = Arc::new(BrokerStats::default());
        let settings = Arc::new(Settings::new(
            max_payload,
            max_payload + PACKET_OVERHEAD,
            TOPIC_ALIAS_MAX,
            u16::try_from(config.max_inflight.clamp(1, 65535)).unwrap_or(u16::MAX),
            config.max_keepalive.max(1),
            retained,
            policy,
            broker_stats.clone(),
            stats.clone(),
            kept_log_bytes(config),
        ));
        let will_link = links(
            &format!("topicgate-wills-{:016x}", rand::random::<u64>()),
            true,
        )
        .map_err(MqttError::Link)?;
        Ok(Self {
            listeners,
            secure,
            link_parts,
            front: Some(FrontParts {
                settings,
                links,
                reap,
                will_link,
                max_clients: config.max_connections,
            }),
            stats,
            broker_stats,
            connect_timeout: config.connect_timeout,
        })
    }

    /// The address MQTT clients connect to (the first bound).
    pub fn addr(&self) -> SocketAddr {
        self.addrs()
            .first()
            .copied()
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Every address MQTT clients can connect to.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The address MQTT-over-TLS clients connect to, when TLS is configured.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.secure.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// The broker's counters.
    pub fn stats(&self) -> Arc<BrokerStats> {
        self.broker_stats.clone()
    }

    /// Starts the gateway's link. Clients are accepted once [`Ready::accept_clients`] names
    /// where their publishes go: the gateway's bridge, which needs the link first.
    pub fn run(
        mut self,
        link_buffer: usize,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Result<(Link, Ready), MqttError> {
        let addr = self.addr();
        let Some(parts) = self.front.take() else {
            return Err(MqttError::NotReady(addr));
        };
        let link = self.link_parts.run(
            self.stats,
            parts.settings.clone(),
            link_buffer,
            tracker,
            cancel.clone(),
        );
        let ready = Ready {
            listeners: self.listeners,
            secure: self.secure,
            parts,
            connect_timeout: self.connect_timeout,
            tracker: tracker.clone(),
            cancel,
        };
        Ok((link, ready))
    }
}

/// The broker with its link running and its listeners bound, not yet accepting clients.
pub struct Ready {
    listeners: Vec<StdTcpListener>,
    secure: Option<(StdTcpListener, Tls)>,
    parts: FrontParts,
    connect_timeout: Duration,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Ready {
    /// Starts accepting clients, whose publishes (wills too) `inbound` takes; the acceptor
    /// serves connections that come in another way (MQTT over WebSocket).
    pub fn accept_clients(self, inbound: Arc<dyn Inbound>) -> Result<Acceptor, MqttError> {
        let Self {
            listeners,
            secure,
            parts,
            connect_timeout,
            tracker,
            cancel,
        } = self;
        let addr = listeners
            .first()
            .and_then(|l| l.local_addr().ok())
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let wills = will_sink(parts.will_link, parts.settings.clone(), inbound.clone());
        let sessions = Sessions::new(parts.reap, wills, tracker.clone(), cancel.clone());
        let front = Arc::new(Front {
            settings: parts.settings,
            sessions,
            links: parts.links,
            bridge: inbound,
            connect_timeout,
            max_clients: parts.max_clients,
            clients: AtomicUsize::new(0),
            origins: AtomicU64::new(0),
        });
        for listener in listeners {
            let listener = TcpListener::from_std(listener)
                .map_err(|source| MqttError::Bind { addr, source })?;
            tracker.spawn(accept_plain(
                listener,
                front.clone(),
                tracker.clone(),
                cancel.clone(),
            ));
        }
        if let Some((secure, tls)) = secure {
            let secure_addr = secure.local_addr().unwrap_or(addr);
            let secure = TcpListener::from_std(secure).map_err(|source| MqttError::Bind {
                addr: secure_addr,
                source,
            })?;
            tracker.spawn(accept_tls(
                secure,
                tls,
                front.clone(),
                tracker.clone(),
                cancel.clone(),
            ));
        }
        Ok(Acceptor {
            front,
            tracker,
            cancel,
        })
    }
}

/// Publishes a will to MQTT subscribers on `link`, and hands it to `inbound` as any client
/// publish.
fn will_sink(
    link: (LinkTx, LinkRx),
    settings: Arc<Settings>,
    inbound: Arc<dyn Inbound>,
) -> WillSink {
    let link = std::sync::Mutex::new(link);
    let known = std::sync::Mutex::new((Matcher::default(), Audience::default()));
    Arc::new(move |publish: MqttPublish| {
        let mut known = known.lock().unwrap_or_else(PoisonError::into_inner);
        let (matcher, audience) = &mut *known;
        if settings.is_read(audience, &publish.topic) {
            settings.flow.gateway_publish(matcher, &publish);
            drop(known);
            let packet = router_publish(&publish);
            let mut link = link.lock().unwrap_or_else(PoisonError::into_inner);
            let _ = link.0.send(packet).now_or_never();
        }
        // The gateway's store and streams see the will as they see any client publish.
        inbound.take(&mut vec![publish]);
    })
}

/// Serves MQTT on connections accepted elsewhere, with the same identity, ACL and limits.
#[derive(Clone)]
pub struct Acceptor {
    front: Arc<Front>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Acceptor {
    /// Serves the connection `stream` resolves to (nothing when it resolves to `None`), from
    /// `peer`, named by its TLS client certificate when `certified`.
    pub fn serve<S, F>(&self, stream: F, peer: SocketAddr, certified: Option<String>)
    where
        F: std::future::Future<Output = Option<S>> + Send + 'static,
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (front, cancel) = (self.front.clone(), self.cancel.clone());
        self.tracker.spawn(async move {
            if let Some(stream) = stream.await {
                serve(front, "mqtt+ws", stream, peer, certified, cancel).await;
            }
        });
    }
}

async fn accept_plain(
    listener: TcpListener,
    front: Arc<Front>,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            a = accept(&listener, "mqtt") => a,
            () = cancel.cancelled() => return,
        };
        tracker.spawn(serve(
            front.clone(),
            "mqtt",
            stream,
            peer,
            None,
            cancel.clone(),
        ));
    }
}

async fn accept_tls(
    listener: TcpListener,
    tls: Tls,
    front: Arc<Front>,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            a = accept(&listener, "mqtts") => a,
            () = cancel.cancelled() => return,
        };
        let (tls, front, cancel) = (tls.clone(), front.clone(), cancel.clone());
        // The handshake runs in the connection's own task, so a slow client holds up no one.
        tracker.spawn(async move {
            match tls.accept(stream, front.connect_timeout).await {
                Ok(accepted) => {
                    let name = accepted.client_name;
                    serve(front, "mqtts", accepted.stream, peer, name, cancel).await;
                }
                Err(e) => crate::refused::log("mqtts", peer, &format_args!("TLS handshake: {e}")),
            }
        });
    }
}

fn keep_every_topic_routable(links: &LinkFactory) -> Result<(), MqttError> {
    let (mut tx, mut rx) = links(
        &format!("topicgate-all-{:016x}", rand::random::<u64>()),
        true,
    )
    .map_err(MqttError::Link)?;
    tx.subscribe("#")
        .map_err(|e| MqttError::Link(e.to_string()))?;
    // The SUBACK says the router has made the log.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match rx.recv_deadline(deadline) {
            Ok(Some(rumqttd::Notification::DeviceAck(_))) => break,
            Ok(_) => {}
            Err(e) => return Err(MqttError::Link(e.to_string())),
        }
    }
    tx.send(disconnect())
        .now_or_never()
        .ok_or_else(|| MqttError::Link("the router did not take a DISCONNECT".to_owned()))?
        .map_err(|e| MqttError::Link(e.to_string()))?;
    Ok(())
}

fn disconnect() -> r::Packet {
    r::Packet::Disconnect(
        r::Disconnect {
            reason_code: r::DisconnectReasonCode::NormalDisconnection,
        },
        None,
    )
}

/// A publish as the router carries it: QoS 0, no retain flag (the gateway's store keeps
/// retained messages), the real QoS and retain flag in the marker.
pub(super) fn router_publish(p: &MqttPublish) -> r::Packet {
    let meta = Meta::from_client(p.retain, p.qos);
    let props = p.properties(Some(meta));
    let publish = r::Publish::new(
        to_router(p.topic.as_bytes().clone()),
        p.payload.clone(),
        false,
    );
    r::Packet::Publish(publish, Some(props))
}

/// What a filter's log is sure to hold behind its newest message: on rolling over, the router
/// drops its oldest segment before it starts a new one, so all but one segment (with one
/// segment, nothing: then half of it, at best).
fn kept_log_bytes(config: &MqttConfig) -> u64 {
    let size = config.segment_size.max(1024) as u64;
    match config.segment_count {
        0 | 1 => size / 2,
        n => size * (n as u64 - 1),
    }
}

/// Every router setting chosen on purpose: rumqttd's `RouterConfig::default()` is all zeros.
pub(super) fn router_config(config: &MqttConfig) -> RouterConfig {
    RouterConfig {
        max_connections: config.max_connections + ROUTER_HEADROOM,
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

#[cfg(test)]
mod tests {
    use super::*;

    struct NoRetained;

    impl RetainedSource for NoRetained {
        fn retained_matching(&self, _: &str) -> Vec<MqttPublish> {
            Vec::new()
        }
    }

    /// The loopback default: IPv4 and IPv6 on one port, even when the port is chosen by the
    /// system; a host without IPv6 keeps IPv4 alone.
    #[test]
    fn every_address_is_bound_on_the_first_ones_port() {
        let addrs: Vec<SocketAddr> =
            vec!["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()];
        let broker = Broker::bind(
            &MqttConfig::default(),
            &addrs,
            1024,
            Arc::new(NoRetained),
            Policy::open(),
            None,
        )
        .unwrap();
        let bound = broker.addrs();
        assert!(matches!(bound.len(), 1 | 2), "{bound:?}");
        assert!(bound[0].ip().is_loopback() && bound[0].is_ipv4());
        assert!(
            bound.iter().all(|a| a.port() == bound[0].port()),
            "{bound:?}"
        );
    }
}
