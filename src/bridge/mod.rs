//! The core every adapter calls: topic rules, the retained store, limits and fan-out. HTTP and
//! CoAP parse requests into these types and call one [`Bridge`] method; MQTT publishes arrive
//! through the broker link.

mod content;
mod hub;
mod journal;
mod message;
mod params;
mod rpc;
mod rules;
mod store;
pub mod sys;

use std::sync::{Arc, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

pub use crate::topic::{Topic, TopicError, TopicFilter};
pub use content::{content_format_for, content_type_for};
pub use hub::{Event, History, Live, Start, Subscription};
pub use journal::{Durable, Journal, JournalError};
pub(crate) use journal::{from_millis, millis};
pub use message::{
    Envelope, Listing, Message, Origin, PayloadEncoding, Properties, Qos, UserProperty, fnv1a,
    is_textual,
};
pub use params::{ParamError, apply_expiry, parse_flag, parse_limit, parse_qos, parse_timeout};
pub use rpc::{Call, CallError};
pub use rules::{LastAttempt, PullReport, PushReport, RulesReport};
pub use store::{Page, RetainedStore};

/// The push and pull rules as the bridge sees them, without naming them: a durable queue
/// that takes accepted messages (the push outbox), and a report of their state.
pub trait Tap: Send + Sync {
    /// Offers one accepted message; the receipt resolves once what was taken is on disk.
    fn offer(&self, message: &Arc<Message>) -> Option<Durable>;
    /// Every rule with its state.
    fn report(&self) -> RulesReport;
}

use crate::config::RpcConfig;
use crate::metrics::Metrics;
use crate::mqtt::{Inbound, Link, LinkStats, MqttPublish, Refused, RetainedSource};
use crate::policy::{Action, Denial, Policy, Principal, Readable};

/// Most broker publishes the bridge takes from its queue at a time.
const INBOUND_BATCH: usize = 64;

/// Why the bridge refused a request.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The payload is over the shared limit.
    #[error("the payload is {size} bytes, over the limit of {limit} bytes")]
    PayloadTooLarge {
        /// Payload size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The broker cannot take publishes now.
    #[error("the broker is not available")]
    BrokerUnavailable,
    /// The message was published but its retained value could not be written to disk.
    #[error("the retained store cannot be written")]
    Storage,
    /// The policy refuses it: the ACL or a topic limit.
    #[error(transparent)]
    Denied(#[from] Denial),
}

/// A cheap, cloneable handle to the gateway's core.
#[derive(Clone)]
pub struct Bridge {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<RetainedStore>,
    hub: hub::Hub,
    replies: rpc::Replies,
    link: Link,
    link_stats: Arc<LinkStats>,
    metrics: Arc<Metrics>,
    policy: Policy,
    max_payload: usize,
    rpc: RpcConfig,
    /// Keeps the broker's order and the store's order the same for gateway publishes.
    order: std::sync::Mutex<()>,
    /// The push outbox, attached once at startup.
    tap: std::sync::OnceLock<Arc<dyn Tap>>,
}

impl Bridge {
    /// A bridge over a running broker link.
    // why: each argument is one setting of a different config section; a struct of them would
    // only rename the list.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<RetainedStore>,
        link: Link,
        metrics: Arc<Metrics>,
        policy: Policy,
        max_payload: usize,
        sse_buffer: usize,
        history: History,
        rpc: RpcConfig,
    ) -> Self {
        let link_stats = link.stats();
        Self {
            inner: Arc::new(Inner {
                store,
                hub: hub::Hub::new(sse_buffer, history),
                replies: rpc::Replies::default(),
                link,
                link_stats,
                metrics,
                policy,
                max_payload,
                rpc,
                order: std::sync::Mutex::new(()),
                tap: std::sync::OnceLock::new(),
            }),
        }
    }

    /// A bridge over `store` and no broker, for running the adapters' request handling without
    /// one (the fuzz targets, the CoAP endpoint's tests): its publishes fail as with a broker
    /// down, and [`Bridge::inject`] stands in for a broker that routed them.
    pub(crate) fn detached(store: Arc<RetainedStore>, policy: Policy, max_payload: usize) -> Self {
        Self::new(
            store,
            Link::detached(),
            Arc::new(Metrics::default()),
            policy,
            max_payload,
            16,
            History {
                messages: 16,
                bytes: 1 << 20,
            },
            RpcConfig::default(),
        )
    }

    /// Takes `message` as a broker would hand it back: into the store, the streams and the
    /// calls waiting for it, without authorization; for a detached bridge.
    pub(crate) fn inject(&self, mut message: Message) {
        compact(&mut message);
        drop(self.accept(message));
    }

    /// Feeds an external broker's publishes into the store and the hub until cancelled (the
    /// embedded broker's connections hand theirs over themselves, as [`Inbound`]); then lets
    /// waiting calls go.
    pub async fn run(self, cancel: CancellationToken) {
        if let Some(mut inbound) = self.inner.link.take_inbound() {
            // Taken in batches: one wake-up of this task for all that is queued.
            let mut batch: Vec<MqttPublish> = Vec::with_capacity(INBOUND_BATCH);
            loop {
                let taken = tokio::select! {
                    n = inbound.recv_many(&mut batch, INBOUND_BATCH) => n,
                    () = cancel.cancelled() => break,
                };
                if taken == 0 {
                    break;
                }
                self.take(&mut batch);
            }
        }
        cancel.cancelled().await;
        // No reply can arrive any more: calls end now rather than at their timeout, which
        // would hold up the shutdown.
        self.inner.replies.close();
    }

    /// The bridge as the embedded broker's connections see it: where their publishes go.
    pub fn inbound(&self) -> Arc<dyn Inbound> {
        Arc::new(self.clone())
    }

    /// Publishes through the broker for `who`, then updates the store and the streams; a
    /// retained value is on disk before this returns.
    pub async fn publish(&self, message: Message, who: &Principal) -> Result<(), BridgeError> {
        self.inner
            .policy
            .authorize(who, Action::Publish, message.topic.as_str())?;
        self.publish_authorized(message).await
    }

    pub(crate) async fn publish_authorized(&self, mut message: Message) -> Result<(), BridgeError> {
        compact(&mut message);
        let size = message.payload.len();
        if size > self.inner.max_payload {
            return Err(BridgeError::PayloadTooLarge {
                size,
                limit: self.inner.max_payload,
            });
        }
        let (receipt, (durable, taken)) = loop {
            // Queued to the broker and applied to the store under one plain lock, so that both
            // see gateway publishes in the same order; a saturated broker is waited for
            // outside it.
            {
                let _order = self
                    .inner
                    .order
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                match self.inner.link.try_publish(to_mqtt(&message)) {
                    Ok(receipt) => break (receipt, self.accept(message)),
                    Err(Refused::Down) => return Err(BridgeError::BrokerUnavailable),
                    Err(Refused::Full(_)) => {}
                }
            }
            self.inner.link.room().await;
        };
        // Waiting outside the order lock lets concurrent publishes share one broker round trip
        // and one disk commit.
        receipt
            .acknowledged()
            .await
            .map_err(|_| BridgeError::BrokerUnavailable)?;
        if let Some(durable) = durable {
            durable.wait().await.map_err(|e| {
                tracing::error!(error = %e, "a retained value was not stored");
                BridgeError::Storage
            })?;
        }
        if let Some(taken) = taken {
            taken.wait().await.map_err(|e| {
                tracing::error!(error = %e, "a message for a push rule was not stored");
                BridgeError::Storage
            })?;
        }
        Ok(())
    }

    /// Publishes a request for `who` with a fresh reply topic and correlation data, and waits
    /// for its reply, from any protocol.
    pub async fn call(
        &self,
        mut message: Message,
        who: &Principal,
        call: Call,
    ) -> Result<Arc<Message>, CallError> {
        self.inner
            .policy
            .authorize(who, Action::Publish, message.topic.as_str())
            .map_err(BridgeError::from)?;
        // Registered before it is published: a reply can come back before `publish` returns.
        let (_pending, reply) = self.inner.replies.register(&mut message, call.envelope);
        self.publish_authorized(message).await?;
        match tokio::time::timeout(call.timeout, reply).await {
            Ok(Ok(reply)) => Ok(reply),
            // The sender is dropped before `_pending` only at shutdown.
            Ok(Err(_)) => Err(CallError::Closed),
            Err(_) => Err(CallError::NoReply(call.timeout)),
        }
    }

    /// Whether some MQTT session subscribes to a filter matching `topic`, for a caller allowed
    /// to publish to it; `None` in front of an external broker, which cannot tell.
    pub fn has_subscribers(&self, topic: &Topic, who: &Principal) -> Result<Option<bool>, Denial> {
        self.inner
            .policy
            .authorize(who, Action::Publish, topic.as_str())?;
        Ok(self.inner.link.has_subscribers(topic.as_str()))
    }

    /// The wait of a call: `?timeout=` when given (at most `rpc.max_timeout`), else
    /// `rpc.timeout`.
    pub fn call_timeout(&self, asked: Option<&str>) -> Result<Duration, ParamError> {
        match asked {
            None => Ok(self.inner.rpc.timeout),
            Some(v) => parse_timeout(v, self.inner.rpc.max_timeout),
        }
    }

    /// The longest wait a call may ask for.
    pub fn max_call_timeout(&self) -> Duration {
        self.inner.rpc.max_timeout
    }

    /// Clears a retained value with an empty retained publish; `false` when there was none.
    pub async fn clear(
        &self,
        topic: &Topic,
        origin: Origin,
        who: &Principal,
    ) -> Result<bool, BridgeError> {
        self.inner
            .policy
            .authorize(who, Action::Publish, topic.as_str())?;
        if self.inner.store.get(topic).is_none() {
            return Ok(false);
        }
        let mut message = Message::new(topic.clone(), bytes::Bytes::new(), origin);
        message.retain = true;
        self.publish_authorized(message).await?;
        Ok(true)
    }

    /// The live retained message of a topic, if `who` may read it.
    pub fn retained(&self, topic: &Topic, who: &Principal) -> Result<Option<Arc<Message>>, Denial> {
        self.inner
            .policy
            .authorize(who, Action::Read, topic.as_str())?;
        Ok(self.inner.store.get(topic))
    }

    /// The live retained message of a topic, for a reader already authorized (an observer
    /// registered earlier, a precondition check after the publish check).
    pub fn current(&self, topic: &Topic) -> Option<Arc<Message>> {
        self.inner.store.get(topic)
    }

    /// One page of the retained messages matching `filter` that `who` may read.
    pub fn list(
        &self,
        filter: &TopicFilter,
        who: &Principal,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page, Denial> {
        let scope = self.inner.policy.subscription(who, filter.as_str())?;
        Ok(self
            .inner
            .store
            .page(filter, after, limit, |m| scope.admits(m.topic.as_str())))
    }

    /// Subscribes `who` to live messages, resuming after `last_event_id` when possible; only
    /// messages `who` may read are in it, and its `scope` tells live ones apart.
    pub fn subscribe(
        &self,
        filter: &TopicFilter,
        who: &Principal,
        last_event_id: Option<&str>,
    ) -> Result<Subscription, Denial> {
        let scope = self.inner.policy.subscription(who, filter.as_str())?;
        let mut sub = self
            .inner
            .hub
            .subscribe(filter, last_event_id, &self.inner.store);
        if scope != Readable::All {
            match &mut sub.start {
                Start::Resume(events) => events.retain(|e| scope.admits(e.message.topic.as_str())),
                Start::Snapshot { retained, .. } => {
                    retained.retain(|m| scope.admits(m.topic.as_str()))
                }
            }
        }
        sub.scope = scope;
        Ok(sub)
    }

    /// The policy every request is checked against.
    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    /// Every message accepted from now on, whatever its topic, unless it falls behind (then it
    /// is told how many it missed).
    pub fn live(&self) -> Live {
        self.inner.hub.live()
    }

    /// The `<epoch>-<seq>` id of an event.
    pub fn event_id(&self, seq: u64) -> String {
        format!("{}-{seq}", self.inner.hub.epoch())
    }

    /// Whether publishes can reach the broker.
    pub fn is_ready(&self) -> bool {
        self.inner.link_stats.is_up()
    }

    /// The largest payload accepted.
    pub fn max_payload(&self) -> usize {
        self.inner.max_payload
    }

    /// The gateway's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The gateway's metrics, with the values kept elsewhere (store, broker link) brought up to
    /// date; for rendering.
    pub fn refreshed_metrics(&self) -> &Arc<Metrics> {
        let m = &self.inner.metrics;
        let stats = &self.inner.link_stats;
        m.retained.set(self.inner.store.len() as i64);
        m.broker_link_up.set(i64::from(stats.is_up()));
        Metrics::mirror(&m.broker_link_wakeups, stats.wakeups());
        Metrics::mirror(
            &m.lag_dropped.get_or_create(&crate::metrics::StreamLabel {
                stream: "broker_link",
            }),
            stats.lag_dropped(),
        );
        Metrics::mirror(
            &m.deliveries
                .get_or_create(&crate::metrics::ProtocolLabel { protocol: "mqtt" }),
            stats.delivered(),
        );
        for (protocol, reason, n) in self.inner.policy.refusals() {
            Metrics::mirror(
                &m.refusals
                    .get_or_create(&crate::metrics::RefusalLabel { protocol, reason }),
                n,
            );
        }
        m
    }

    /// Attaches the push outbox: every message accepted from now on is offered to it. Only
    /// the first call counts.
    pub fn attach(&self, tap: Arc<dyn Tap>) {
        let _ = self.inner.tap.set(tap);
    }

    /// The push and pull rules with their state; none when no rule runs.
    pub fn rules(&self) -> RulesReport {
        self.inner
            .tap
            .get()
            .map(|tap| tap.report())
            .unwrap_or_default()
    }

    /// Store and fan-out, then the outbox; the receipts of the retained value and of the
    /// outbox's copy.
    fn accept(&self, message: Message) -> (Option<Durable>, Option<Durable>) {
        self.inner.metrics.published(message.origin.label());
        let message = Arc::new(message);
        self.inner.replies.deliver(&message);
        let taken = self.inner.tap.get().and_then(|tap| tap.offer(&message));
        (self.inner.hub.publish(message, &self.inner.store), taken)
    }
}

impl Inbound for Bridge {
    fn take(&self, publishes: &mut Vec<MqttPublish>) {
        for publish in publishes.drain(..) {
            match from_mqtt(publish) {
                // An MQTT publish is durable with the writer's next commit, a few milliseconds
                // later; nobody waits for it.
                Ok(message) => drop(self.accept(message)),
                Err(e) => {
                    tracing::warn!(error = %e, "dropped a broker message with an invalid topic")
                }
            }
        }
    }
}

/// Serves retained messages to MQTT clients when they subscribe.
pub struct StoreSource(pub Arc<RetainedStore>);

impl RetainedSource for StoreSource {
    fn retained_matching(&self, filter: &str) -> Vec<MqttPublish> {
        let Ok(filter) = TopicFilter::parse(filter) else {
            return Vec::new();
        };
        let now = SystemTime::now();
        self.0
            .matching(&filter)
            .iter()
            .map(|m| {
                let mut p = to_mqtt(m);
                p.expiry_secs = m.remaining_expiry(now);
                p
            })
            .collect()
    }
}

/// Gives a message buffers of its own. A payload read off a socket is often a slice of the
/// connection's whole read buffer; kept in the broker's log, the history or the retained store,
/// it would hold that buffer alive (measured: 6.5 KB per HTTP publish, 570 MB after 113,000
/// one-byte POSTs, before this copy).
fn compact(message: &mut Message) {
    message.payload = Bytes::copy_from_slice(&message.payload);
    if let Some(data) = &mut message.correlation_data {
        *data = Bytes::copy_from_slice(data);
    }
}

fn to_mqtt(m: &Message) -> MqttPublish {
    MqttPublish {
        topic: m.topic.as_str().into(),
        payload: m.payload.clone(),
        qos: m.qos.level(),
        retain: m.retain,
        content_type: m.content_type.clone(),
        user_properties: m.user_properties.clone(),
        response_topic: m.response_topic.clone(),
        correlation_data: m.correlation_data.clone(),
        expiry_secs: m.remaining_expiry(SystemTime::now()),
    }
}

/// A publish of the broker as the bridge takes it in, with buffers of its own (see
/// [`compact`]).
pub(crate) fn from_mqtt(p: MqttPublish) -> Result<Message, TopicError> {
    let now = SystemTime::now();
    let mut message = Message {
        topic: Topic::parse_any(&p.topic)?,
        payload: p.payload,
        content_type: p.content_type,
        user_properties: p.user_properties,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        qos: Qos::new(p.qos).unwrap_or_default(),
        retain: p.retain,
        expires_at: p
            .expiry_secs
            .map(|s| now + Duration::from_secs(u64::from(s))),
        updated_at: now,
        origin: Origin::Mqtt,
    };
    compact(&mut message);
    Ok(message)
}
