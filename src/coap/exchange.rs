//! Message deduplication (RFC 7252 §4.5): the response to each request, kept per client endpoint
//! and message id for EXCHANGE_LIFETIME so that a retransmitted request is answered again
//! without being processed again. Memory is bounded by a capacity; the oldest entries go first.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// A client endpoint and one of its message ids.
pub(crate) type ExchangeKey = (SocketAddr, u16);

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

#[cfg(test)]
mod tests {
    use super::*;

    fn key(mid: u16) -> ExchangeKey {
        (SocketAddr::from(([127, 0, 0, 1], 5000)), mid)
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
