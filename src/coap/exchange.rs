//! Message deduplication (RFC 7252 §4.5): the response to each request, kept per peer and
//! message id for EXCHANGE_LIFETIME so that a retransmitted request is answered again without
//! being processed again (the oldest entries go first); and the framing of each response.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use coap_lite::{MessageClass, MessageType, Packet, RequestType};

use super::endpoint::Peer;
use super::request::Reply;
use crate::metrics::Metrics;

/// A peer and one of its message ids.
pub(crate) type ExchangeKey = (Peer, u16);

/// What is known of a request's message id.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// First time: process it.
    New,
    /// Still being processed: drop the duplicate, the response is on its way.
    Pending,
    /// Answered: send these bytes again (`None` when no response was to be sent).
    Answered(Option<Bytes>),
}

#[derive(Debug)]
struct Entry {
    at: Instant,
    response: Option<Option<Bytes>>,
}

/// The response cache.
#[derive(Debug)]
pub(crate) struct Exchanges {
    lifetime: Duration,
    capacity: usize,
    entries: HashMap<ExchangeKey, Entry>,
    order: VecDeque<(Instant, ExchangeKey)>,
}

impl Exchanges {
    /// A cache holding each entry for `lifetime`, at most `capacity` at once.
    pub(crate) fn new(lifetime: Duration, capacity: usize) -> Self {
        Self {
            lifetime,
            capacity,
            entries: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Looks a request up, recording it as pending when it is new.
    pub(crate) fn check(&mut self, key: ExchangeKey, now: Instant) -> Seen {
        self.expire(now);
        if let Some(entry) = self.entries.get(&key) {
            return match &entry.response {
                None => Seen::Pending,
                Some(bytes) => Seen::Answered(bytes.clone()),
            };
        }
        while self.entries.len() >= self.capacity {
            let Some((at, old)) = self.order.pop_front() else {
                break;
            };
            self.remove_if_at(old, at);
        }
        self.entries.insert(
            key,
            Entry {
                at: now,
                response: None,
            },
        );
        self.order.push_back((now, key));
        Seen::New
    }

    /// Records the response sent for a request.
    pub(crate) fn answer(&mut self, key: ExchangeKey, response: Option<Bytes>) {
        if let Some(entry) = self.entries.get_mut(&key) {
            entry.response = Some(response);
        }
    }

    /// Requests remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(at, key)) = self.order.front() {
            if now.duration_since(at) < self.lifetime {
                break;
            }
            self.order.pop_front();
            self.remove_if_at(key, at);
        }
    }

    /// Removes `key` unless it was recorded again after `at`.
    fn remove_if_at(&mut self, key: ExchangeKey, at: Instant) {
        if self.entries.get(&key).is_some_and(|e| e.at == at) {
            self.entries.remove(&key);
        }
    }
}

/// RFC 7252 §4.8.2 EXCHANGE_LIFETIME for the given transmission parameters:
/// MAX_TRANSMIT_SPAN + 2 × MAX_LATENCY (100 s) + PROCESSING_DELAY (ACK_TIMEOUT).
pub(crate) fn exchange_lifetime(ack_timeout: Duration, max_retransmit: u8) -> Duration {
    let span = ack_timeout.mul_f64(((1u64 << max_retransmit) - 1) as f64 * ACK_RANDOM_FACTOR);
    span + Duration::from_secs(200) + ack_timeout
}

/// RFC 7252 ACK_RANDOM_FACTOR.
pub(crate) const ACK_RANDOM_FACTOR: f64 = 1.5;

/// One request's identity, for framing its response.
#[derive(Debug)]
pub(crate) struct Exchange {
    /// The peer and the request's message id.
    pub(crate) key: ExchangeKey,
    /// The peer's address when the request came, for the refused log.
    pub(crate) addr: SocketAddr,
    /// Whether the request was confirmable.
    pub(crate) confirmable: bool,
    /// The response's message id: the request's for a piggybacked ACK, a fresh one for a NON.
    pub(crate) mid: u16,
    /// The request's token.
    pub(crate) token: Box<[u8]>,
    /// The request's method, for the metrics.
    pub(crate) method: RequestType,
    /// The request's No-Response bits.
    pub(crate) no_response: u8,
}

impl Exchange {
    /// Counts and frames a response; `None` when No-Response suppresses it on a
    /// non-confirmable request (a confirmable one still gets an empty ACK).
    pub(crate) fn frame(&self, reply: Reply, metrics: &Metrics) -> Option<Bytes> {
        if self.count(&reply, metrics) {
            if !self.confirmable {
                return None;
            }
            return encode(&empty(MessageType::Acknowledgement, self.mid));
        }
        encode(&reply.into_packet(self.confirmable, self.mid, &self.token))
    }

    /// Counts and frames a separate response under message id `mid`; `None` when
    /// No-Response suppresses it (the empty ACK went already).
    pub(crate) fn frame_separate(
        &self,
        reply: Reply,
        mid: u16,
        metrics: &Metrics,
    ) -> Option<Bytes> {
        if self.count(&reply, metrics) {
            return None;
        }
        let mut packet = reply.into_packet(false, mid, &self.token);
        packet.header.set_type(MessageType::Confirmable);
        encode(&packet)
    }

    /// Counts a response and logs a refusal; whether No-Response suppresses it.
    fn count(&self, reply: &Reply, metrics: &Metrics) -> bool {
        let code = MessageClass::Response(reply.code);
        metrics.coap_request(method_index(self.method), u8::from(code));
        let class = u8::from(code) >> 5;
        let detail = u8::from(code) & 0x1f;
        // Refused requests are logged, 4.04 (nothing there) aside, as HTTP does.
        if class == 4 && detail != 4 {
            let text = String::from_utf8_lossy(&reply.payload);
            let reason = format_args!("{class}.{detail:02} {text}");
            crate::refused::log("coap", self.addr, &reason);
        }
        self.no_response & (1 << (class - 1).min(7)) != 0
    }
}

/// The method's place in [`crate::metrics::COAP_METHODS`].
fn method_index(method: RequestType) -> usize {
    match method {
        RequestType::Get => 0,
        RequestType::Put => 1,
        RequestType::Post => 2,
        RequestType::Delete => 3,
        _ => 4,
    }
}

/// An empty message: an ACK or a Reset of `mid`.
pub(crate) fn empty(kind: MessageType, mid: u16) -> Packet {
    let mut packet = Packet::new();
    packet.header.set_type(kind);
    packet.header.code = MessageClass::Empty;
    packet.header.message_id = mid;
    packet
}

/// A packet's bytes; `None` (logged) for one the codec cannot write.
pub(crate) fn encode(packet: &Packet) -> Option<Bytes> {
    match packet.to_bytes_unlimited() {
        Ok(bytes) => Some(Bytes::from(bytes)),
        Err(e) => {
            tracing::warn!(error = ?e, "could not encode a CoAP message");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(mid: u16) -> ExchangeKey {
        (Peer::Udp(SocketAddr::from(([127, 0, 0, 1], 5000))), mid)
    }

    #[test]
    fn duplicates_are_answered_from_the_cache_until_they_expire() {
        let t0 = Instant::now();
        let mut x = Exchanges::new(Duration::from_secs(10), 100);
        assert_eq!(x.check(key(1), t0), Seen::New);
        assert_eq!(x.check(key(1), t0), Seen::Pending);
        x.answer(key(1), Some(Bytes::from_static(b"r")));
        assert_eq!(
            x.check(key(1), t0 + Duration::from_secs(9)),
            Seen::Answered(Some(Bytes::from_static(b"r")))
        );
        assert_eq!(x.check(key(1), t0 + Duration::from_secs(10)), Seen::New);
        assert_eq!(x.len(), 1);
    }

    #[test]
    fn capacity_bounds_memory() {
        let t0 = Instant::now();
        let mut x = Exchanges::new(Duration::from_secs(100), 3);
        for mid in 0..10 {
            assert_eq!(x.check(key(mid), t0), Seen::New);
        }
        assert_eq!(x.len(), 3);
        assert_eq!(x.check(key(9), t0), Seen::Pending);
        assert_eq!(x.check(key(0), t0), Seen::New);
    }

    #[test]
    fn lifetime_follows_the_rfc() {
        assert_eq!(
            exchange_lifetime(Duration::from_secs(2), 4),
            Duration::from_secs(247)
        );
    }
}
