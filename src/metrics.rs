//! The gateway's Prometheus metrics: one registry per gateway, rendered as text by `/metrics`.

use std::sync::OnceLock;
use std::sync::atomic::Ordering;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A `protocol` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ProtocolLabel {
    /// `mqtt`, `http`, `coap` or `sse`.
    pub protocol: &'static str,
}

/// A `status` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StatusLabel {
    /// HTTP status code.
    pub status: u16,
}

/// A `stream` label for lag counters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StreamLabel {
    /// `sse` or `broker_link`.
    pub stream: &'static str,
}

/// Labels of a CoAP request count.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CoapRequestLabel {
    /// `GET`, `PUT`, `POST`, `DELETE` or `other`.
    pub method: &'static str,
    /// Response code, `2.05` style.
    pub code: String,
}

/// A `reason` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why it happened.
    pub reason: &'static str,
}

/// Labels of a refusal count.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RefusalLabel {
    /// `mqtt`, `http` or `coap`.
    pub protocol: &'static str,
    /// `login`, `acl` or `rate`.
    pub reason: &'static str,
}

/// A `rule` label: the name of a push or pull rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RuleLabel {
    /// The rule's `name`.
    pub rule: String,
}

/// Labels of a pull read count.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PullLabel {
    /// The rule's `name`.
    pub rule: String,
    /// `changed`, `unchanged` or `failed`.
    pub outcome: &'static str,
}

/// The DTLS transport's counts, cheap clones of the registered metrics.
#[derive(Debug, Clone, Default)]
pub struct DtlsMeters {
    /// DTLS sessions held, handshakes included.
    pub sessions: Gauge,
    /// DTLS handshakes in progress.
    pub handshakes: Gauge,
    /// HelloVerifyRequests sent (ClientHellos without a valid cookie).
    pub hello_verify: Counter,
    /// Sessions that moved to a new client address by their Connection ID.
    pub address_changes: Counter,
    handshake_results: Family<ReasonLabel, Counter>,
    sessions_ended: Family<ReasonLabel, Counter>,
}

impl DtlsMeters {
    /// Counts a handshake's end: `ok`, `failed`, `refused` (over a bound) or `timeout`.
    pub fn handshake(&self, result: &'static str) {
        self.handshake_results
            .get_or_create(&ReasonLabel { reason: result })
            .inc();
    }

    /// Counts an open session's end: `closed`, `idle` or `replaced`.
    pub fn ended(&self, reason: &'static str) {
        self.sessions_ended
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "dtls_sessions",
            "DTLS sessions held, handshakes included",
            self.sessions.clone(),
        );
        registry.register(
            "dtls_handshakes",
            "DTLS handshakes in progress",
            self.handshakes.clone(),
        );
        registry.register(
            "dtls_hello_verify_requests",
            "DTLS ClientHellos answered with a cookie (HelloVerifyRequest), nothing allocated",
            self.hello_verify.clone(),
        );
        registry.register(
            "dtls_address_changes",
            "DTLS sessions moved to a new client address by a record with their Connection ID",
            self.address_changes.clone(),
        );
        registry.register(
            "dtls_handshake_results",
            "DTLS handshakes ended: ok, failed, refused (over a bound), timeout",
            self.handshake_results.clone(),
        );
        registry.register(
            "dtls_sessions_ended",
            "DTLS sessions ended: closed, idle, replaced (the client started again)",
            self.sessions_ended.clone(),
        );
    }
}

/// A family of histograms by rule.
pub type RuleHistograms = Family<RuleLabel, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms to about 16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Every metric the gateway exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Messages accepted, by the protocol they were published with.
    pub publishes: Family<ProtocolLabel, Counter>,
    /// Messages sent to subscribers, by protocol.
    pub deliveries: Family<ProtocolLabel, Counter>,
    /// Topics holding a retained message.
    pub retained: Gauge,
    /// Open event streams.
    pub sse_clients: Gauge,
    /// Messages skipped because a reader fell behind.
    pub lag_dropped: Family<StreamLabel, Counter>,
    /// HTTP responses by status code.
    pub http_responses: Family<StatusLabel, Counter>,
    /// 1 while the gateway's link into the broker is up.
    pub broker_link_up: Gauge,
    /// Times the broker paused the gateway's link and it was woken again.
    pub broker_link_wakeups: Counter,
    /// CoAP requests by method and response code.
    pub coap_requests: Family<CoapRequestLabel, Counter>,
    /// Active CoAP observations.
    pub coap_observers: Gauge,
    /// Duplicate CoAP requests answered from the cache.
    pub coap_duplicates: Counter,
    /// Confirmable CoAP notifications sent again for want of an ACK.
    pub coap_retransmissions: Counter,
    /// CoAP observations ended, by reason.
    pub coap_observers_removed: Family<ReasonLabel, Counter>,
    /// Requests refused by the policy: failed logins, ACL denials, rate limits.
    pub refusals: Family<RefusalLabel, Counter>,
    /// Messages a push rule delivered (answered 2xx).
    pub push_sent: Family<RuleLabel, Counter>,
    /// Push attempts that failed: no answer, or an answer other than 2xx.
    pub push_failed: Family<RuleLabel, Counter>,
    /// Push attempts made again after a failure.
    pub push_retried: Family<RuleLabel, Counter>,
    /// Messages a push rule gave up on (dead letters).
    pub push_dead_letters: Family<RuleLabel, Counter>,
    /// Messages dropped or refused at a full outbox.
    pub push_overflow: Family<RuleLabel, Counter>,
    /// Messages waiting in a push rule's outbox.
    pub push_queued: Family<RuleLabel, Gauge>,
    /// Time from a push request to its answer.
    pub push_latency: RuleHistograms,
    /// Pull reads by outcome: `changed`, `unchanged` or `failed`.
    pub pull_reads: Family<PullLabel, Counter>,
    /// 1 while a pull rule's device answers, 0 while it does not.
    pub pull_up: Family<RuleLabel, Gauge>,
    /// The DTLS transport's counts.
    pub dtls: DtlsMeters,
    /// Handles on `http_responses` by status, made on first use: a family lookup takes a lock
    /// and hashes the label, which every response would pay.
    status_counters: Box<[OnceLock<Counter>]>,
    /// Handles on `coap_requests`, by method (as ordered in [`COAP_METHODS`]) and response
    /// code byte, made on first use.
    coap_counters: Box<[OnceLock<Counter>]>,
    /// Handles on `publishes` for the protocols in [`PUBLISHERS`], made on first use.
    publish_counters: [OnceLock<Counter>; PUBLISHERS.len()],
}

/// The `protocol` values of `publishes` counted through a kept handle.
const PUBLISHERS: [&str; 3] = ["mqtt", "http", "coap"];

/// The `method` values of `coap_requests`.
pub const COAP_METHODS: [&str; 5] = ["GET", "PUT", "POST", "DELETE", "other"];

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("topicgate");
        let publishes = Family::default();
        registry.register(
            "publishes",
            "Messages accepted, by origin protocol",
            publishes.clone(),
        );
        let deliveries = Family::default();
        registry.register(
            "deliveries",
            "Messages sent to subscribers, by protocol",
            deliveries.clone(),
        );
        let retained = Gauge::default();
        registry.register(
            "retained_messages",
            "Topics holding a retained message",
            retained.clone(),
        );
        let sse_clients = Gauge::default();
        registry.register("sse_clients", "Open event streams", sse_clients.clone());
        let lag_dropped = Family::default();
        registry.register(
            "lag_dropped",
            "Messages skipped because a reader fell behind",
            lag_dropped.clone(),
        );
        let http_responses = Family::default();
        registry.register(
            "http_responses",
            "HTTP responses by status code",
            http_responses.clone(),
        );
        let broker_link_up = Gauge::default();
        registry.register(
            "broker_link_up",
            "1 while the gateway's link into the broker is up",
            broker_link_up.clone(),
        );
        let broker_link_wakeups = Counter::default();
        registry.register(
            "broker_link_wakeups",
            "Times the broker paused the gateway's link and it was woken again",
            broker_link_wakeups.clone(),
        );
        let coap_requests = Family::default();
        registry.register(
            "coap_requests",
            "CoAP requests by method and response code",
            coap_requests.clone(),
        );
        let coap_observers = Gauge::default();
        registry.register(
            "coap_observers",
            "Active CoAP observations",
            coap_observers.clone(),
        );
        let coap_duplicates = Counter::default();
        registry.register(
            "coap_duplicates",
            "Duplicate CoAP requests answered from the cache",
            coap_duplicates.clone(),
        );
        let coap_retransmissions = Counter::default();
        registry.register(
            "coap_retransmissions",
            "Confirmable CoAP notifications sent again for want of an ACK",
            coap_retransmissions.clone(),
        );
        let coap_observers_removed = Family::default();
        registry.register(
            "coap_observers_removed",
            "CoAP observations ended: deregistered, reset (RST), timeout (no ACK), replaced, closed (the peer's session ended), shutdown",
            coap_observers_removed.clone(),
        );
        let refusals = Family::default();
        registry.register(
            "refusals",
            "Requests refused: login (missing or wrong credentials), acl, rate",
            refusals.clone(),
        );
        let push_sent = Family::default();
        registry.register(
            "push_sent",
            "Messages a push rule delivered (answered 2xx)",
            push_sent.clone(),
        );
        let push_failed = Family::default();
        registry.register(
            "push_failed",
            "Push attempts that failed: no answer, or an answer other than 2xx",
            push_failed.clone(),
        );
        let push_retried = Family::default();
        registry.register(
            "push_retried",
            "Push attempts made again after a failure",
            push_retried.clone(),
        );
        let push_dead_letters = Family::default();
        registry.register(
            "push_dead_letters",
            "Messages a push rule gave up on after max_attempts, max_age or a 4xx",
            push_dead_letters.clone(),
        );
        let push_overflow = Family::default();
        registry.register(
            "push_overflow",
            "Messages dropped (drop_oldest) or refused (refuse) at a full outbox",
            push_overflow.clone(),
        );
        let push_queued = Family::default();
        registry.register(
            "push_queued",
            "Messages waiting in a push rule's outbox",
            push_queued.clone(),
        );
        let push_latency: RuleHistograms = Family::new_with_constructor(latency_histogram);
        registry.register(
            "push_latency_seconds",
            "Time from a push request to its answer",
            push_latency.clone(),
        );
        let pull_reads = Family::default();
        registry.register(
            "pull_reads",
            "Pull reads by outcome: changed (published), unchanged, failed",
            pull_reads.clone(),
        );
        let pull_up = Family::default();
        registry.register(
            "pull_up",
            "1 while a pull rule's device answers, 0 while it does not",
            pull_up.clone(),
        );
        let dtls = DtlsMeters::default();
        dtls.register(&mut registry);
        Self {
            dtls,
            registry,
            push_sent,
            push_failed,
            push_retried,
            push_dead_letters,
            push_overflow,
            push_queued,
            push_latency,
            pull_reads,
            pull_up,
            publishes,
            deliveries,
            retained,
            sse_clients,
            lag_dropped,
            http_responses,
            broker_link_up,
            broker_link_wakeups,
            coap_requests,
            coap_observers,
            coap_duplicates,
            coap_retransmissions,
            coap_observers_removed,
            refusals,
            status_counters: (100..600).map(|_| OnceLock::new()).collect(),
            publish_counters: Default::default(),
            coap_counters: (0..COAP_METHODS.len() * 256)
                .map(|_| OnceLock::new())
                .collect(),
        }
    }
}

impl Metrics {
    /// Counts one publish from `protocol`.
    pub fn published(&self, protocol: &'static str) {
        let make = || {
            self.publishes
                .get_or_create(&ProtocolLabel { protocol })
                .clone()
        };
        let slot = PUBLISHERS.iter().position(|&p| p == protocol);
        count(slot.map(|i| &self.publish_counters[i]), make);
    }

    /// Counts one HTTP response.
    pub fn http_response(&self, status: u16) {
        let make = || {
            self.http_responses
                .get_or_create(&StatusLabel { status })
                .clone()
        };
        let slot = self
            .status_counters
            .get(usize::from(status).wrapping_sub(100));
        count(slot, make);
    }

    /// Counts one CoAP request by the index of its method in [`COAP_METHODS`] and its
    /// response code (class in the top three bits, detail in the low five).
    pub fn coap_request(&self, method: usize, code: u8) {
        let method = method.min(COAP_METHODS.len() - 1);
        let make = || {
            let label = CoapRequestLabel {
                method: COAP_METHODS[method],
                code: format!("{}.{:02}", code >> 5, code & 0x1f),
            };
            self.coap_requests.get_or_create(&label).clone()
        };
        count(
            self.coap_counters.get(method * 256 + usize::from(code)),
            make,
        );
    }

    /// Sets a counter mirrored from a value kept elsewhere.
    pub fn mirror(counter: &Counter, value: u64) {
        counter.inner().store(value, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Adds one to the counter kept in `slot`, made by `make` on first use; without a slot, `make`
/// looks it up in its family each time.
fn count(slot: Option<&OnceLock<Counter>>, make: impl FnOnce() -> Counter) {
    match slot {
        Some(slot) => slot.get_or_init(make).inc(),
        None => make().inc(),
    };
}
