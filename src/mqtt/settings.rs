//! What every MQTT connection of one gateway shares: its limits, the policy, the retained
//! store, and the broker's counters (published under `$SYS`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytestring::ByteString;

use super::flow::Flow;
use super::link::LinkStats;
use super::message::RetainedSource;
use super::routing::routed;
use crate::policy::Policy;

/// Topics a publisher remembers the answer of [`Settings::is_read`] for.
const AUDIENCE_MEMORY: usize = 256;

/// What one publisher knows of who reads its topics: whether some subscription, of a connected
/// session or a kept one, matches each topic it published to lately, until a filter comes or
/// goes. A publish that no subscription matches does not enter the router: there it would
/// only be appended to the log of the `#` filter nobody reads, and its topic kept for ever.
#[derive(Default)]
pub(crate) struct Audience {
    changed: u64,
    /// Owned copies: a topic from a client is a slice of the buffer its packet was read into,
    /// and a key kept from it would keep that whole buffer (up to a packet's size) alive.
    topics: HashMap<Box<str>, bool>,
}

/// The filters sessions hold, each with how many hold it: those without wildcards apart, as a
/// topic is matched by them only when it is the same string.
#[derive(Default)]
struct Subscribed {
    exact: HashMap<String, usize>,
    wild: HashMap<String, usize>,
}

impl Subscribed {
    fn side(&mut self, filter: &str) -> &mut HashMap<String, usize> {
        if filter.contains(['+', '#']) {
            &mut self.wild
        } else {
            &mut self.exact
        }
    }

    /// Counts one more holder of `filter`; true when it is new.
    fn add(&mut self, filter: &str) -> bool {
        let held = self.side(filter).entry(filter.to_owned()).or_default();
        *held += 1;
        *held == 1
    }

    /// Counts one holder of `filter` fewer; true when it is gone.
    fn remove(&mut self, filter: &str) -> bool {
        let side = self.side(filter);
        let Some(held) = side.get_mut(filter) else {
            return false;
        };
        *held -= 1;
        if *held > 0 {
            return false;
        }
        side.remove(filter);
        true
    }

    fn match_any(&self, topic: &str) -> bool {
        self.exact.contains_key(topic) || self.wild.keys().any(|f| crate::topic::matches(f, topic))
    }
}

/// Settings and counters shared by the connections of one gateway.
pub(crate) struct Settings {
    /// The shared payload limit, bytes.
    pub(crate) max_payload: usize,
    /// The largest packet a client may send, bytes (announced as Maximum Packet Size).
    pub(crate) max_packet: usize,
    /// Topic Alias Maximum announced to MQTT 5 clients.
    pub(crate) topic_alias_max: u16,
    /// Receive Maximum announced to MQTT 5 clients: QoS 2 publishes awaiting PUBREL.
    pub(crate) receive_maximum: u16,
    /// Longest keep-alive granted; a client asking for more (or for none) gets this.
    pub(crate) max_keep_alive: u16,
    /// Where retained messages for new subscriptions come from.
    pub(crate) retained: Arc<dyn RetainedSource>,
    /// Who may connect, publish and subscribe.
    pub(crate) policy: Policy,
    /// The broker's counters.
    pub(crate) stats: Arc<BrokerStats>,
    /// The counters the gateway's metrics read (deliveries to MQTT clients).
    link: Arc<LinkStats>,
    /// Subscriptions with No Local held now: while there are none, publishes need no origin.
    no_local: AtomicUsize,
    /// Every subscribed filter (without `$share/group/`), with how many sessions hold it.
    filters: Mutex<Subscribed>,
    /// Bumped whenever a filter comes into `filters` or leaves it, so that the topics each
    /// publisher's [`Audience`] remembers are looked at again.
    filters_changed: AtomicU64,
    /// Publishers wait for subscribers that fall behind.
    pub(crate) flow: Arc<Flow>,
    /// Sends the router the gateway's publishes still waiting for their event.
    gateway_flush: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl Settings {
    /// Settings with no No Local subscription held yet.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        max_payload: usize,
        max_packet: usize,
        topic_alias_max: u16,
        receive_maximum: u16,
        max_keep_alive: u16,
        retained: Arc<dyn RetainedSource>,
        policy: Policy,
        stats: Arc<BrokerStats>,
        link: Arc<LinkStats>,
        log_bytes: u64,
    ) -> Self {
        Self {
            max_payload,
            max_packet,
            topic_alias_max,
            receive_maximum,
            max_keep_alive,
            retained,
            policy,
            stats: stats.clone(),
            link,
            no_local: AtomicUsize::new(0),
            filters: Mutex::default(),
            filters_changed: AtomicU64::new(0),
            flow: Arc::new(Flow::new(log_bytes, stats.clone())),
            gateway_flush: std::sync::OnceLock::new(),
        }
    }

    /// Settings for unit tests: an open policy, nothing retained.
    #[cfg(test)]
    pub(crate) fn for_tests() -> Arc<Self> {
        struct NoRetained;
        impl RetainedSource for NoRetained {
            fn retained_matching(&self, _: &str) -> Vec<crate::mqtt::MqttPublish> {
                Vec::new()
            }
        }
        Arc::new(Self::new(
            1024,
            2048,
            10,
            100,
            60,
            Arc::new(NoRetained),
            Policy::open(),
            Arc::default(),
            Arc::default(),
            1 << 20,
        ))
    }

    fn filters(&self) -> std::sync::MutexGuard<'_, Subscribed> {
        self.filters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a connection's counts to the broker's, touching only those that moved.
    pub(crate) fn add(&self, tally: &mut Tally) {
        let t = std::mem::take(tally);
        let add = |counter: &AtomicU64, n: u64| {
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        };
        let s = &self.stats;
        add(&s.messages_received, t.packets_in);
        add(&s.messages_sent, t.packets_out);
        add(&s.bytes_received, t.bytes_in);
        add(&s.bytes_sent, t.bytes_out);
        add(&s.publish_received, t.publishes_in);
        add(&s.publish_sent, t.publishes_out);
        add(&self.link.delivered, t.publishes_out);
    }

    /// Registers how the gateway's link sends its waiting publishes to the router.
    pub(crate) fn on_gateway_flush(&self, flush: Box<dyn Fn() + Send + Sync>) {
        let _ = self.gateway_flush.set(flush);
    }

    /// Sends the router the gateway's publishes that are in its buffer without their event
    /// yet. A publish is in the store only once it is in that buffer, so a SUBSCRIBE that
    /// read a retained value from the store and calls this before it goes to the router
    /// reaches the router after that publish: the router does not deliver it live as well.
    pub(crate) fn flush_gateway(&self) {
        if let Some(flush) = self.gateway_flush.get() {
            flush();
        }
    }

    /// Counts messages the router skipped for a subscriber too far behind: dropped for the
    /// broker's `$SYS` figures, and lags of the embedded broker's side of the gateway's link.
    pub(crate) fn skipped(&self, messages: u64) {
        self.stats
            .publish_dropped
            .fetch_add(messages, Ordering::Relaxed);
        self.link.lagged(messages);
    }

    /// Counts a new subscription to `filter`.
    pub(crate) fn subscribed(&self, filter: &str) {
        if self.filters().add(filter) {
            self.filters_changed.fetch_add(1, Ordering::AcqRel);
        }
        self.stats.subscriptions(1);
    }

    /// Counts a subscription to `filter` gone.
    pub(crate) fn unsubscribed(&self, filter: &str) {
        if self.filters().remove(filter) {
            self.filters_changed.fetch_add(1, Ordering::AcqRel);
        }
        self.stats.subscriptions(-1);
    }

    /// Whether any MQTT session, connected or kept, subscribes to a filter matching `topic`.
    pub(crate) fn has_subscribers(&self, topic: &str) -> bool {
        self.filters().match_any(topic)
    }

    /// Whether a publish to `topic` goes into the router: it is not a reply to a gateway call
    /// ([`routed`]), and some subscription reads it there, as far as `audience` (a publisher's
    /// memory of earlier answers) knows. The one check on every way in: sessions, the gateway's
    /// link, and wills.
    pub(crate) fn is_read(&self, audience: &mut Audience, topic: &ByteString) -> bool {
        if !routed(topic) {
            return false;
        }
        let changed = self.filters_changed.load(Ordering::Acquire);
        if changed != audience.changed || audience.topics.len() >= AUDIENCE_MEMORY {
            audience.topics.clear();
            audience.changed = changed;
        }
        if let Some(&read) = audience.topics.get(&**topic) {
            return read;
        }
        let read = self.has_subscribers(topic);
        audience.topics.insert(Box::from(&**topic), read);
        read
    }

    pub(crate) fn no_local_in_use(&self) -> bool {
        self.no_local.load(Ordering::Relaxed) > 0
    }

    pub(crate) fn no_local_added(&self) {
        self.no_local.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn no_local_removed(&self) {
        self.no_local.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One connection's counts for the broker's `$SYS` statistics, added to them once per batch
/// by [`Settings::add`]: counters shared by every connection cost a contended cache line per
/// update.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tally {
    pub(crate) packets_in: u64,
    pub(crate) packets_out: u64,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    pub(crate) publishes_in: u64,
    pub(crate) publishes_out: u64,
}

/// The broker's counters, by Mosquitto's `$SYS` names.
#[derive(Debug, Default)]
pub struct BrokerStats {
    pub(crate) clients_connected: AtomicI64,
    pub(crate) clients_maximum: AtomicI64,
    pub(crate) clients_disconnected: AtomicI64,
    pub(crate) messages_received: AtomicU64,
    pub(crate) messages_sent: AtomicU64,
    pub(crate) publish_received: AtomicU64,
    pub(crate) publish_sent: AtomicU64,
    pub(crate) publish_dropped: AtomicU64,
    pub(crate) stuck: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) subscriptions: AtomicI64,
}

impl BrokerStats {
    pub(crate) fn subscriptions(&self, delta: i64) {
        self.subscriptions.fetch_add(delta, Ordering::Relaxed);
    }

    pub(crate) fn connected(&self) {
        let now = self.clients_connected.fetch_add(1, Ordering::Relaxed) + 1;
        self.clients_maximum.fetch_max(now, Ordering::Relaxed);
    }

    pub(crate) fn disconnected(&self, kept: bool) {
        self.clients_connected.fetch_sub(1, Ordering::Relaxed);
        if kept {
            self.clients_disconnected.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A snapshot, as (name under `$SYS/broker/`, value).
    pub fn snapshot(&self) -> Vec<(&'static str, i64)> {
        let u = |a: &AtomicU64| i64::try_from(a.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
        let i = |a: &AtomicI64| a.load(Ordering::Relaxed);
        let connected = i(&self.clients_connected);
        let disconnected = i(&self.clients_disconnected);
        vec![
            ("clients/connected", connected),
            ("clients/active", connected),
            ("clients/disconnected", disconnected),
            ("clients/inactive", disconnected),
            ("clients/total", connected + disconnected),
            ("clients/maximum", i(&self.clients_maximum)),
            ("messages/received", u(&self.messages_received)),
            ("messages/sent", u(&self.messages_sent)),
            ("publish/messages/received", u(&self.publish_received)),
            ("publish/messages/sent", u(&self.publish_sent)),
            ("publish/messages/dropped", u(&self.publish_dropped)),
            ("clients/stuck", u(&self.stuck)),
            ("bytes/received", u(&self.bytes_received)),
            ("bytes/sent", u(&self.bytes_sent)),
            ("subscriptions/count", i(&self.subscriptions)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_topic_is_read_while_some_session_holds_a_matching_filter() {
        let settings = Settings::for_tests();
        let mut audience = Audience::default();
        let topic = ByteString::from_static("home/temp");
        assert!(!settings.is_read(&mut audience, &topic));
        settings.subscribed("home/+");
        assert!(
            settings.is_read(&mut audience, &topic),
            "a new filter is seen at once"
        );
        settings.subscribed("home/+");
        settings.unsubscribed("home/+");
        assert!(
            settings.is_read(&mut audience, &topic),
            "one still holds it"
        );
        settings.unsubscribed("home/+");
        assert!(!settings.is_read(&mut audience, &topic));
        settings.subscribed("home/temp");
        assert!(settings.is_read(&mut audience, &topic), "an exact filter");
        assert!(!settings.is_read(&mut audience, &ByteString::from_static("home/temp/x")));
        settings.unsubscribed("home/temp");
        assert!(!settings.is_read(&mut audience, &topic));
        settings.subscribed("#");
        assert!(settings.is_read(&mut audience, &topic));
        let sys = ByteString::from_static("$SYS/broker/uptime");
        assert!(
            !settings.is_read(&mut audience, &sys),
            "`#` does not read `$` topics"
        );
    }
}
