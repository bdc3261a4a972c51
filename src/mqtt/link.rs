//! The gateway's own connection into rumqttd's router: publishes go in through a dedicated
//! thread, and a `#` subscription brings every client publish out, without ever stalling.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;

use bytes::Bytes;
use futures_util::FutureExt;
use rumqttd::Notification;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::MqttError;
use super::message::{Meta, MqttPublish};
use super::routing::{from_router, to_router};

/// Publishes the link thread hands to the router in one batch, at most.
const PUBLISH_BATCH: usize = 256;

/// Counters of the link, read by the gateway's metrics.
#[derive(Debug, Default)]
pub struct LinkStats {
    pub(crate) up: AtomicBool,
    pub(crate) received: AtomicU64,
    lag_events: AtomicU64,
    lag_dropped: AtomicU64,
    wakeups: AtomicU64,
    pub(crate) delivered: AtomicU64,
}

impl LinkStats {
    /// Whether the link to the router is alive.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }
    /// Client publishes received from the router.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
    /// Times the router skipped messages the link had not read yet.
    pub fn lag_events(&self) -> u64 {
        self.lag_events.load(Ordering::Relaxed)
    }
    /// Messages skipped by those lags.
    pub fn lag_dropped(&self) -> u64 {
        self.lag_dropped.load(Ordering::Relaxed)
    }
    /// Publishes written to MQTT client connections.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }
    /// Times the router paused the link because its buffer was full, and was woken again.
    pub fn wakeups(&self) -> u64 {
        self.wakeups.load(Ordering::Relaxed)
    }
}

/// The link, connected to the router and subscribed, not yet running.
pub(crate) struct LinkParts {
    tx: LinkTx,
    rx: LinkRx,
}

impl LinkParts {
    pub(crate) fn new(mut tx: LinkTx, rx: LinkRx) -> Result<Self, MqttError> {
        tx.subscribe("#")
            .map_err(|e| MqttError::Link(e.to_string()))?;
        Ok(Self { tx, rx })
    }

    pub(crate) fn run(
        self,
        stats: Arc<LinkStats>,
        buffer: usize,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Link {
        stats.up.store(true, Ordering::Relaxed);
        let (publish_tx, publish_rx) = flume::bounded::<MqttPublish>(buffer.max(1));
        let (inbound_tx, inbound_rx) = mpsc::channel(buffer.max(1));

        let thread_stats = stats.clone();
        let mut tx = self.tx;
        // LinkTx hands each batch to the router with a blocking channel send, so it runs on a
        // thread of its own instead of stalling a runtime worker.
        let spawned = thread::Builder::new()
            .name("mqtt-link-tx".to_owned())
            .spawn(move || {
                while let Ok(first) = publish_rx.recv() {
                    let mut batch = vec![first];
                    batch.extend(publish_rx.try_iter().take(PUBLISH_BATCH - 1));
                    let last = batch.pop().map(into_packet);
                    tx.buffer().extend(batch.into_iter().map(into_packet));
                    let sent = last.and_then(|p| tx.send(p).now_or_never());
                    if !matches!(sent, Some(Ok(_))) {
                        thread_stats.up.store(false, Ordering::Relaxed);
                        break;
                    }
                }
            });
        if spawned.is_err() {
            stats.up.store(false, Ordering::Relaxed);
        }

        tracker.spawn(receive(self.rx, inbound_tx, stats.clone(), cancel));
        Link::new(Sink::Router(publish_tx), inbound_rx, stats)
    }
}

/// Where the gateway's publishes go.
pub(crate) enum Sink {
    /// The embedded router, through the link thread.
    Router(flume::Sender<MqttPublish>),
    /// An external broker, through the client task.
    Remote(mpsc::Sender<Outbound>),
}

/// A publish for an external broker, with where to report its acknowledgement.
pub(crate) struct Outbound {
    pub(crate) publish: MqttPublish,
    pub(crate) ack: oneshot::Sender<Result<(), MqttError>>,
}

/// The broker's answer to one publish, to await after the publish is queued in order.
pub struct Receipt(Option<oneshot::Receiver<Result<(), MqttError>>>);

impl Receipt {
    /// Resolves when the broker has the publish: at once for the embedded router (it took it
    /// in order), on PUBACK/PUBCOMP for QoS 1/2 on an external broker.
    pub async fn acknowledged(self) -> Result<(), MqttError> {
        match self.0 {
            None => Ok(()),
            Some(rx) => rx.await.unwrap_or(Err(MqttError::LinkDown)),
        }
    }
}

/// A handle to the gateway's connection to its broker, embedded or external.
pub struct Link {
    sink: Sink,
    inbound: std::sync::Mutex<Option<mpsc::Receiver<MqttPublish>>>,
    stats: Arc<LinkStats>,
}

impl Link {
    pub(crate) fn new(
        sink: Sink,
        inbound: mpsc::Receiver<MqttPublish>,
        stats: Arc<LinkStats>,
    ) -> Self {
        Self {
            sink,
            inbound: std::sync::Mutex::new(Some(inbound)),
            stats,
        }
    }

    /// A link to no broker, never up: publishes fail with `LinkDown`. Lets the adapters' request
    /// handling run without a broker, as the fuzz targets do.
    pub(crate) fn detached() -> Self {
        let (sink, _) = flume::bounded(1);
        let (_, inbound) = mpsc::channel(1);
        Self::new(Sink::Router(sink), inbound, Arc::new(LinkStats::default()))
    }

    /// Queues a publish for the broker, in order; waits while the broker is saturated. The
    /// receipt says when the broker has it.
    pub async fn publish(&self, publish: MqttPublish) -> Result<Receipt, MqttError> {
        if !self.stats.is_up() {
            return Err(MqttError::LinkDown);
        }
        match &self.sink {
            Sink::Router(tx) => {
                tx.send_async(publish)
                    .await
                    .map_err(|_| MqttError::LinkDown)?;
                Ok(Receipt(None))
            }
            Sink::Remote(tx) => {
                let (ack, rx) = oneshot::channel();
                tx.send(Outbound { publish, ack })
                    .await
                    .map_err(|_| MqttError::LinkDown)?;
                Ok(Receipt(Some(rx)))
            }
        }
    }

    /// The stream of client publishes; can be taken once.
    pub fn take_inbound(&self) -> Option<mpsc::Receiver<MqttPublish>> {
        self.inbound
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// The link's counters.
    pub fn stats(&self) -> Arc<LinkStats> {
        self.stats.clone()
    }
}

fn into_packet(p: MqttPublish) -> Packet {
    let meta = Meta {
        retain: p.retain,
        qos: p.qos,
        from_gateway: true,
    };
    let props = p.properties(Some(meta));
    // The router delivers at each subscriber's granted QoS whatever the publish QoS, so the link
    // publishes at QoS 0 (all rumqttd lets a local link use) and carries the real QoS in `meta`.
    let publish = Publish::new(to_router(Bytes::from(p.topic)), p.payload, false);
    Packet::Publish(publish, Some(props))
}

async fn receive(
    mut rx: LinkRx,
    inbound: mpsc::Sender<MqttPublish>,
    stats: Arc<LinkStats>,
    cancel: CancellationToken,
) {
    let mut last_offset: Option<u64> = None;
    loop {
        let next = tokio::select! {
            n = rx.next() => n,
            () = cancel.cancelled() => break,
        };
        match next {
            Ok(Some(Notification::Forward(forward))) => {
                if let Some((_, offset)) = forward.cursor {
                    // The link subscribes before any client can publish, so the first message
                    // it is owed is at offset 0: a burst that overruns the segments before the
                    // first read is a gap too.
                    let expected = last_offset.map_or(0, |l| l + 1);
                    if offset > expected {
                        let dropped = offset - expected;
                        stats.lag_events.fetch_add(1, Ordering::Relaxed);
                        stats.lag_dropped.fetch_add(dropped, Ordering::Relaxed);
                        tracing::warn!(dropped, "bridge link lagged behind the broker");
                    }
                    last_offset = Some(offset);
                }
                let publish = forward.publish;
                let Some(message) = MqttPublish::from_forward(
                    from_router(publish.topic),
                    publish.payload,
                    forward.properties,
                ) else {
                    continue;
                };
                stats.received.fetch_add(1, Ordering::Relaxed);
                if inbound.send(message).await.is_err() {
                    break;
                }
            }
            // The router stops scheduling a link whose buffer filled up until it says it is
            // ready again; without this the link would stall for good.
            Ok(Some(Notification::Unschedule)) => {
                stats.wakeups.fetch_add(1, Ordering::Relaxed);
                if rx.wake().await.is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "bridge link to the broker closed");
                break;
            }
        }
    }
    stats.up.store(false, Ordering::Relaxed);
}
