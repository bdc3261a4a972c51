//! The observer registry (RFC 7641): who observes which filter, the 24-bit sequence of each
//! observation, and the one notification each may have in flight. A slow observer holds at most
//! one pending message, the latest; it never builds a queue.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::endpoint::Peer;
use super::timers::TimerId;
use crate::bridge::{Message, Topic, TopicFilter};
use crate::policy::Readable;

/// A confirmable notification goes out at least this often (RFC 7641 §4.5 suggests 24 h; the
/// product contract asks for 30 s) ...
const CON_EVERY: Duration = Duration::from_secs(30);
/// ... and at least once every this many notifications.
const CON_EVERY_COUNT: u32 = 100;
/// Non-confirmable notification ids remembered so that a Reset to one ends its observation.
const REMEMBERED_IDS: usize = 65_536;

/// An observation: the peer and the token of its registration.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ObserverKey {
    /// Who registered.
    pub(crate) peer: Peer,
    /// The registration's token.
    pub(crate) token: Box<[u8]>,
}

/// A confirmable notification waiting for its ACK.
#[derive(Debug)]
pub(crate) struct Inflight {
    /// Its message id.
    pub(crate) mid: u16,
    /// The datagram, to send again.
    pub(crate) bytes: Bytes,
    /// Resends so far.
    pub(crate) resends: u8,
    /// The current wait.
    pub(crate) timeout: Duration,
    /// Its retransmission timer.
    pub(crate) timer: TimerId,
}

/// One observation.
#[derive(Debug)]
pub(crate) struct Observer {
    /// What it observes.
    pub(crate) filter: TopicFilter,
    /// The topics under the filter it may read.
    pub(crate) scope: Readable,
    /// Block size exponent for notifications larger than one block.
    pub(crate) szx: u8,
    seq: u32,
    since_con: u32,
    last_con: Instant,
    /// The confirmable notification in flight, if any.
    pub(crate) inflight: Option<Inflight>,
    /// The latest message that arrived while a notification was in flight.
    pub(crate) pending: Option<Arc<Message>>,
}

impl Observer {
    /// The next Observe value, 24 bits wrapping.
    pub(crate) fn next_seq(&mut self) -> u32 {
        self.seq = (self.seq + 1) & 0x00ff_ffff;
        self.seq
    }

    /// Whether the next notification must be confirmable, and counts it.
    pub(crate) fn take_con_turn(&mut self, now: Instant) -> bool {
        self.since_con += 1;
        if self.since_con >= CON_EVERY_COUNT || now.duration_since(self.last_con) >= CON_EVERY {
            self.since_con = 0;
            self.last_con = now;
            true
        } else {
            false
        }
    }
}

/// Why a registration was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Full;

/// Every observation, indexed by topic for exact filters.
#[derive(Debug)]
pub(crate) struct Observers {
    capacity: usize,
    all: HashMap<ObserverKey, Observer>,
    exact: HashMap<Topic, HashSet<ObserverKey>>,
    wildcard: HashSet<ObserverKey>,
    by_mid: HashMap<(Peer, u16), ObserverKey>,
    mid_order: VecDeque<(Peer, u16)>,
}

impl Observers {
    /// A registry of at most `capacity` observations.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            all: HashMap::new(),
            exact: HashMap::new(),
            wildcard: HashSet::new(),
            by_mid: HashMap::new(),
            mid_order: VecDeque::new(),
        }
    }

    /// Registers an observation, replacing one with the same key; returns the Observe value of
    /// the registration response.
    pub(crate) fn register(
        &mut self,
        key: ObserverKey,
        filter: TopicFilter,
        scope: Readable,
        szx: u8,
        now: Instant,
    ) -> Result<(u32, Option<Observer>), Full> {
        let replaced = self.remove(&key);
        if self.all.len() >= self.capacity {
            return Err(Full);
        }
        // Continue the old sequence so a replacing registration never looks older.
        let seq = replaced.as_ref().map_or(0, |o| o.seq);
        match filter.as_topic() {
            Some(topic) => {
                self.exact.entry(topic).or_default().insert(key.clone());
            }
            None => {
                self.wildcard.insert(key.clone());
            }
        }
        let mut observer = Observer {
            filter,
            scope,
            szx,
            seq,
            since_con: 0,
            last_con: now,
            inflight: None,
            pending: None,
        };
        let seq = observer.next_seq();
        self.all.insert(key, observer);
        Ok((seq, replaced))
    }

    /// Ends an observation.
    pub(crate) fn remove(&mut self, key: &ObserverKey) -> Option<Observer> {
        let observer = self.all.remove(key)?;
        match observer.filter.as_topic() {
            Some(topic) => {
                if let Some(set) = self.exact.get_mut(&topic) {
                    set.remove(key);
                    if set.is_empty() {
                        self.exact.remove(&topic);
                    }
                }
            }
            None => {
                self.wildcard.remove(key);
            }
        }
        Some(observer)
    }

    /// The observations a message on `topic` concerns.
    pub(crate) fn matching(&self, topic: &Topic) -> Vec<ObserverKey> {
        let mut keys: Vec<ObserverKey> = self
            .exact
            .get(topic)
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default();
        keys.extend(
            self.wildcard
                .iter()
                .filter(|k| {
                    self.all
                        .get(*k)
                        .is_some_and(|o| o.filter.matches(topic) && o.scope.admits(topic.as_str()))
                })
                .cloned(),
        );
        keys
    }

    /// One observation.
    pub(crate) fn get_mut(&mut self, key: &ObserverKey) -> Option<&mut Observer> {
        self.all.get_mut(key)
    }

    /// Remembers which observation a notification's message id belongs to.
    pub(crate) fn sent(&mut self, key: &ObserverKey, mid: u16) {
        let id = (key.peer, mid);
        if self.by_mid.insert(id, key.clone()).is_none() {
            self.mid_order.push_back(id);
        }
        while self.mid_order.len() > REMEMBERED_IDS {
            if let Some(old) = self.mid_order.pop_front() {
                self.by_mid.remove(&old);
            }
        }
    }

    /// The observation a notification's message id belongs to.
    pub(crate) fn by_mid(&self, peer: Peer, mid: u16) -> Option<ObserverKey> {
        self.by_mid
            .get(&(peer, mid))
            .filter(|k| self.all.contains_key(*k))
            .cloned()
    }

    /// Every observation key.
    pub(crate) fn keys(&self) -> Vec<ObserverKey> {
        self.all.keys().cloned().collect()
    }

    /// Active observations.
    pub(crate) fn len(&self) -> usize {
        self.all.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16, token: &[u8]) -> ObserverKey {
        ObserverKey {
            peer: Peer::Session(u64::from(port)),
            token: token.into(),
        }
    }

    fn filter(s: &str) -> TopicFilter {
        TopicFilter::parse(s).unwrap()
    }

    #[test]
    fn matching_covers_exact_and_wildcard_filters() {
        let now = Instant::now();
        let mut obs = Observers::new(10);
        obs.register(key(1, b"a"), filter("home/temp"), Readable::All, 6, now)
            .unwrap();
        obs.register(key(2, b"b"), filter("home/+"), Readable::All, 6, now)
            .unwrap();
        obs.register(key(3, b"c"), filter("office/#"), Readable::All, 6, now)
            .unwrap();
        let mut hits = obs.matching(&Topic::parse("home/temp").unwrap());
        hits.sort_by_key(|k| format!("{:?}", k.peer));
        assert_eq!(hits, [key(1, b"a"), key(2, b"b")]);
        assert!(obs.matching(&Topic::parse("garden").unwrap()).is_empty());
        obs.remove(&key(1, b"a"));
        assert_eq!(obs.matching(&Topic::parse("home/temp").unwrap()).len(), 1);
    }

    #[test]
    fn capacity_is_enforced_but_replacing_is_allowed() {
        let now = Instant::now();
        let mut obs = Observers::new(1);
        let (first, _) = obs
            .register(key(1, b"a"), filter("t"), Readable::All, 6, now)
            .unwrap();
        assert_eq!(
            obs.register(key(2, b"b"), filter("t"), Readable::All, 6, now)
                .err(),
            Some(Full)
        );
        let (second, replaced) = obs
            .register(key(1, b"a"), filter("u"), Readable::All, 6, now)
            .unwrap();
        assert!(replaced.is_some());
        assert!(
            second > first,
            "a replacing registration continues the sequence"
        );
        assert_eq!(obs.len(), 1);
        assert!(obs.matching(&Topic::parse("t").unwrap()).is_empty());
    }

    #[test]
    fn sequence_wraps_at_24_bits_and_con_turns_come_round() {
        let now = Instant::now();
        let mut obs = Observers::new(1);
        obs.register(key(1, b"a"), filter("t"), Readable::All, 6, now)
            .unwrap();
        let o = obs.get_mut(&key(1, b"a")).unwrap();
        o.seq = 0x00ff_fffe;
        assert_eq!(o.next_seq(), 0x00ff_ffff);
        assert_eq!(o.next_seq(), 0);
        let cons = (0..250).filter(|_| o.take_con_turn(now)).count();
        assert_eq!(cons, 2);
        assert!(o.take_con_turn(now + CON_EVERY));
    }

    #[test]
    fn notification_ids_lead_back_to_their_observation() {
        let now = Instant::now();
        let mut obs = Observers::new(2);
        obs.register(key(1, b"a"), filter("t"), Readable::All, 6, now)
            .unwrap();
        obs.sent(&key(1, b"a"), 77);
        assert_eq!(obs.by_mid(key(1, b"a").peer, 77), Some(key(1, b"a")));
        assert_eq!(obs.by_mid(key(2, b"a").peer, 77), None);
        obs.remove(&key(1, b"a"));
        assert_eq!(obs.by_mid(key(1, b"a").peer, 77), None);
    }
}
