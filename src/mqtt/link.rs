//! The gateway's own connection into rumqttd's router: publishes go straight into the router's
//! buffer for the link (through a dedicated thread when the router is behind); client
//! publishes reach the gateway from their sessions, not from the router.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;

use futures_util::FutureExt;
use rumqttd::Notification;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::Packet;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::MqttError;
use super::flow::Matcher;
use super::message::MqttPublish;
use super::settings::{Audience, Settings};

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
    /// Times the router skipped messages the link had not read yet (with the embedded broker:
    /// that a subscriber too far behind had not read yet).
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
    /// Counts one lag of `messages` skipped.
    pub(crate) fn lagged(&self, messages: u64) {
        self.lag_events.fetch_add(1, Ordering::Relaxed);
        self.lag_dropped.fetch_add(messages, Ordering::Relaxed);
    }

    /// Times the router paused the link because its buffer was full, and was woken again.
    pub fn wakeups(&self) -> u64 {
        self.wakeups.load(Ordering::Relaxed)
    }
}

/// Whether the router's event queue is full, so that one more event would block the sender.
pub(crate) type RouterFull = Box<dyn Fn() -> bool + Send + Sync>;

/// The link, connected to the router and subscribed, not yet running.
pub(crate) struct LinkParts {
    tx: LinkTx,
    rx: LinkRx,
    full: RouterFull,
}

impl LinkParts {
    pub(crate) fn new(tx: LinkTx, rx: LinkRx, full: RouterFull) -> Self {
        Self { tx, rx, full }
    }

    /// Starts the link. The publishes of the broker's clients do not come through it: each
    /// connection hands its own to the gateway ([`super::Inbound`]).
    pub(crate) fn run(
        self,
        stats: Arc<LinkStats>,
        settings: Arc<Settings>,
        buffer: usize,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Link {
        stats.up.store(true, Ordering::Relaxed);
        let sink = RouterSink::start(self.tx, self.full, buffer, stats.clone(), settings.clone());
        {
            let (tx, announce) = (sink.tx.clone(), sink.announce.clone());
            settings.on_gateway_flush(Box::new(move || {
                let _ = announce_now(&tx, &announce);
            }));
        }
        tracker.spawn(announce(
            sink.tx.clone(),
            sink.announce.clone(),
            stats.clone(),
            cancel.clone(),
        ));
        tracker.spawn(receive(self.rx, stats.clone(), cancel));
        let mut link = Link::new(Sink::Router(sink), None, stats);
        link.subscribers = Some(settings);
        link
    }
}

/// Where the gateway's publishes go.
pub(crate) enum Sink {
    /// The embedded router.
    Router(RouterSink),
    /// An external broker, through the client task.
    Remote(mpsc::Sender<Outbound>),
}

/// The way into the embedded router.
///
/// `LinkTx` appends to a buffer the router takes whole on each of the link's events, and sends
/// that event on the router's bounded queue with a blocking send. A publish therefore goes in
/// from the calling task when the queue has room, which spares a hand-off to another thread and
/// the wake-up it costs; only when the queue is full does it go to the link thread, which may
/// block, while the caller waits asynchronously for room in the thread's queue. Publishes keep
/// their order: they pass one at a time, and none goes in directly while the thread still has
/// some to hand over.
pub(crate) struct RouterSink {
    /// Held by each publish while it goes in, with what the gateway knows of its topics.
    turn: std::sync::Mutex<(Matcher, Audience)>,
    tx: Arc<std::sync::Mutex<LinkTx>>,
    full: RouterFull,
    /// Publishes given to the thread and not yet in the router's buffer.
    queued: Arc<AtomicUsize>,
    thread: flume::Sender<MqttPublish>,
    /// Who reads what, and where flow control counts the gateway's publishes.
    settings: Arc<Settings>,
    /// Tells the router of packets put in its buffer, once per batch (see [`announce`]).
    announce: Arc<Announce>,
}

/// Packets waiting in the router's buffer for the event that tells the router of them.
#[derive(Default)]
struct Announce {
    pending: AtomicBool,
    wake: tokio::sync::Notify,
}

/// Tells the router of what the gateway put in its buffer. The event goes after the tasks
/// already running have had their turn, so that concurrent HTTP and CoAP publishes share one
/// event, and one wake-up of the router's thread, instead of one each.
async fn announce(
    tx: Arc<std::sync::Mutex<LinkTx>>,
    announce: Arc<Announce>,
    stats: Arc<LinkStats>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            () = announce.wake.notified() => {}
            () = cancel.cancelled() => return,
        }
        tokio::task::yield_now().await;
        if !announce_now(&tx, &announce) {
            stats.up.store(false, Ordering::Relaxed);
            return;
        }
    }
}

/// Sends the event for the packets waiting in the router's buffer, if none was sent for them
/// yet; `false` when the router is gone.
fn announce_now(tx: &std::sync::Mutex<LinkTx>, announce: &Announce) -> bool {
    if !announce.pending.swap(false, Ordering::SeqCst) {
        return true;
    }
    let mut tx = lock(tx);
    let last = tx.buffer().pop_back();
    // `send` puts the packet back and sends the event: the router takes the whole buffer.
    last.is_none_or(|last| matches!(tx.send(last).now_or_never(), Some(Ok(_))))
}

impl RouterSink {
    fn start(
        tx: LinkTx,
        full: RouterFull,
        buffer: usize,
        stats: Arc<LinkStats>,
        settings: Arc<Settings>,
    ) -> Self {
        let (thread, publishes) = flume::bounded::<MqttPublish>(buffer.max(1));
        let tx = Arc::new(std::sync::Mutex::new(tx));
        let queued = Arc::new(AtomicUsize::new(0));
        let (thread_tx, thread_queued, thread_stats) = (tx.clone(), queued.clone(), stats.clone());
        let spawned = thread::Builder::new()
            .name("mqtt-link-tx".to_owned())
            .spawn(move || {
                while let Ok(first) = publishes.recv() {
                    let mut batch: Vec<Packet> = std::iter::once(first)
                        .chain(publishes.try_iter().take(PUBLISH_BATCH - 1))
                        .map(into_packet)
                        .collect();
                    let count = batch.len();
                    let sent = {
                        let mut tx = lock(&thread_tx);
                        let last = batch.pop();
                        tx.buffer().extend(batch);
                        last.and_then(|p| tx.send(p).now_or_never())
                    };
                    thread_queued.fetch_sub(count, Ordering::Release);
                    if !matches!(sent, Some(Ok(_))) {
                        thread_stats.up.store(false, Ordering::Relaxed);
                        break;
                    }
                }
            });
        if spawned.is_err() {
            stats.up.store(false, Ordering::Relaxed);
        }
        Self {
            turn: std::sync::Mutex::default(),
            tx,
            full,
            queued,
            thread,
            settings,
            announce: Arc::default(),
        }
    }

    /// Queues a publish without waiting; gives it back when the thread's queue is full too.
    fn try_publish(&self, publish: MqttPublish) -> Result<(), Refused> {
        let mut turn = lock(&self.turn);
        let (matcher, audience) = &mut *turn;
        if !self.settings.is_read(audience, &publish.topic) {
            return Ok(());
        }
        self.settings.flow.gateway_publish(matcher, &publish);
        let publish = if self.queued.load(Ordering::Acquire) == 0 {
            match self.push(publish) {
                None => return Ok(()),
                Some(publish) => publish,
            }
        } else {
            publish
        };
        self.queued.fetch_add(1, Ordering::AcqRel);
        match self.thread.try_send(publish) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                match e {
                    flume::TrySendError::Full(p) => Err(Refused::Full(Box::new(p))),
                    flume::TrySendError::Disconnected(_) => Err(Refused::Down),
                }
            }
        }
    }

    /// Appends to the router's buffer for the link. The router takes the whole buffer on each
    /// of the link's events; while it holds packets, the event for the first is on its way or
    /// [`announce`] will send it, so only a packet into an empty buffer asks for one, and only
    /// then must the router's queue have room for it (looking costs a lock the router's thread
    /// takes for every event): else the publish is given back for the link thread.
    fn push(&self, publish: MqttPublish) -> Option<MqttPublish> {
        let was_empty = {
            let tx = lock(&self.tx);
            let mut buffer = tx.buffer();
            let was_empty = buffer.is_empty();
            if was_empty && (self.full)() {
                return Some(publish);
            }
            buffer.push_back(into_packet(publish));
            was_empty
        };
        if was_empty && !self.announce.pending.swap(true, Ordering::SeqCst) {
            self.announce.wake.notify_one();
        }
        None
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Why [`Link::try_publish`] did not queue a publish.
#[derive(Debug)]
pub enum Refused {
    /// The broker's queue is full: the publish, to try again.
    Full(Box<MqttPublish>),
    /// The link is down.
    Down,
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
    /// The embedded broker's sessions, which know every subscription.
    subscribers: Option<Arc<Settings>>,
    /// An external broker's publishes, from its client task; none from the embedded broker.
    inbound: std::sync::Mutex<Option<mpsc::Receiver<MqttPublish>>>,
    stats: Arc<LinkStats>,
}

impl Link {
    pub(crate) fn new(
        sink: Sink,
        inbound: Option<mpsc::Receiver<MqttPublish>>,
        stats: Arc<LinkStats>,
    ) -> Self {
        Self {
            sink,
            subscribers: None,
            inbound: std::sync::Mutex::new(inbound),
            stats,
        }
    }

    /// A link to no broker, never up: publishes fail with `LinkDown`. Lets the adapters' request
    /// handling run without a broker, as the fuzz targets do.
    pub(crate) fn detached() -> Self {
        let (sink, _) = mpsc::channel(1);
        Self::new(Sink::Remote(sink), None, Arc::new(LinkStats::default()))
    }

    /// Queues a publish for the broker without waiting, so that callers can keep their own
    /// order under a plain lock; the receipt says when the broker has it. While the broker is
    /// saturated the publish is given back: wait for [`Link::room`] and try again.
    pub fn try_publish(&self, publish: MqttPublish) -> Result<Receipt, Refused> {
        if !self.stats.is_up() {
            return Err(Refused::Down);
        }
        match &self.sink {
            Sink::Router(sink) => sink.try_publish(publish).map(|()| Receipt(None)),
            Sink::Remote(tx) => {
                let (ack, rx) = oneshot::channel();
                match tx.try_send(Outbound { publish, ack }) {
                    Ok(()) => Ok(Receipt(Some(rx))),
                    Err(mpsc::error::TrySendError::Full(o)) => {
                        Err(Refused::Full(Box::new(o.publish)))
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => Err(Refused::Down),
                }
            }
        }
    }

    /// Resolves when a publish given back as [`Refused::Full`] may be tried again: the broker
    /// drains its queue without waiting on the gateway, so a short pause is enough.
    pub async fn room(&self) {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }

    /// Queues a publish for the broker, in order; waits while the broker is saturated. The
    /// receipt says when the broker has it.
    pub async fn publish(&self, mut publish: MqttPublish) -> Result<Receipt, MqttError> {
        loop {
            match self.try_publish(publish) {
                Ok(receipt) => return Ok(receipt),
                Err(Refused::Down) => return Err(MqttError::LinkDown),
                Err(Refused::Full(p)) => {
                    publish = *p;
                    self.room().await;
                }
            }
        }
    }

    /// Whether some MQTT session, connected or kept, subscribes to a filter matching `topic`;
    /// `None` through an external broker, which does not say.
    pub fn has_subscribers(&self, topic: &str) -> Option<bool> {
        self.subscribers.as_ref().map(|s| s.has_subscribers(topic))
    }

    /// The stream of an external broker's publishes; can be taken once. None from the embedded
    /// broker, whose connections hand theirs over themselves.
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
    // The router delivers at each subscriber's granted QoS whatever the publish QoS, so the link
    // publishes at QoS 0 (all rumqttd lets a local link use) and carries the real QoS in the
    // marker; each session delivers at the lower of the two.
    super::broker::router_publish(&p)
}

/// Watches the link's side of the router: it subscribes to nothing, so only the router's
/// pauses and its end come this way.
async fn receive(mut rx: LinkRx, stats: Arc<LinkStats>, cancel: CancellationToken) {
    loop {
        let next = tokio::select! {
            n = rx.next() => n,
            () = cancel.cancelled() => break,
        };
        match next {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rumqttd::Router;
    use rumqttd::local::LinkBuilder;

    use super::*;
    use crate::config::MqttConfig;

    /// The router's queue is reported full for two publishes of every three, so they alternate
    /// between the direct way in and the link thread: a subscriber still gets every one, in
    /// order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publishes_keep_their_order_whichever_way_they_go_in() {
        let config = super::super::broker::router_config(&MqttConfig::default());
        let router_tx = Router::new(0, config).spawn();
        let (mut reader_tx, mut reader, _) = LinkBuilder::new("reader", router_tx.clone())
            .build()
            .unwrap();
        reader_tx.subscribe("order/#").unwrap();
        loop {
            if let Some(Notification::DeviceAck(_)) = reader.next().await.unwrap() {
                break;
            }
        }
        let (tx, rx, _) = LinkBuilder::new("gateway", router_tx).build().unwrap();
        let asked = AtomicUsize::new(0);
        let full: RouterFull =
            Box::new(move || !asked.fetch_add(1, Ordering::Relaxed).is_multiple_of(3));
        // The reader subscribes beside the sessions: it is counted as a session's would be.
        let settings = Settings::for_tests();
        settings.subscribed("order/#");
        let link = LinkParts::new(tx, rx, full).run(
            Arc::new(LinkStats::default()),
            settings,
            8,
            &TaskTracker::new(),
            CancellationToken::new(),
        );

        const COUNT: usize = 600;
        let writer = async {
            for i in 0..COUNT {
                let publish = MqttPublish {
                    topic: "order/x".into(),
                    payload: bytes::Bytes::from(i.to_string()),
                    ..MqttPublish::default()
                };
                link.publish(publish).await.unwrap();
            }
        };
        let read = async {
            let mut got = Vec::new();
            while got.len() < COUNT {
                match reader.next().await.unwrap() {
                    Some(Notification::Forward(f)) => {
                        got.push(String::from_utf8(f.publish.payload.to_vec()).unwrap());
                    }
                    Some(Notification::Unschedule) => reader.wake().await.unwrap(),
                    _ => {}
                }
            }
            got
        };
        let ((), got) = tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(writer, read)
        })
        .await
        .expect("every publish arrives");
        let expected: Vec<String> = (0..COUNT).map(|i| i.to_string()).collect();
        assert_eq!(got, expected);
    }
}
