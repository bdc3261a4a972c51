//! Flow control between publishers and subscribers, so that a burst is slowed at its
//! publisher instead of lost in the router.
//!
//! rumqttd keeps, for each subscribed filter, a log of a few segments; a subscriber further
//! behind than the log holds has its read cursor moved past what fell out, and those messages
//! are gone. Nothing in the router holds a publisher back, and it schedules a subscriber's reads
//! only between batches of publishes, so a fast publisher outruns a subscriber that keeps up on
//! average.
//!
//! Here every publish is counted, in the router's own size unit, against each filter it goes
//! into ([`FilterFlow::appended`]), and every message the router forwards is counted against the
//! subscription it came through ([`Reader::consumed`]). A publish that leaves some subscriber
//! more than [`Flow::window`] behind on a filter stops its publisher's reading until that
//! subscriber is back within half the window. A subscriber that makes no progress at all for
//! [`STUCK`] is stuck: publishers stop waiting for it, and what the router then skips for it is
//! counted as dropped (`$SYS/broker/publish/messages/dropped`, and the link's lag counters).
//!
//! The counts are estimates that err toward waiting: a subscriber idle while the counts say it
//! is behind (the router dropped expired messages, or a subscription began with publishes
//! still queued before it) is taken to be caught up ([`Reader::resync`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::message::MqttPublish;
use super::routing::to_router;
use super::settings::BrokerStats;

/// A subscriber that consumes nothing for this long while publishers wait for it is stuck.
pub(super) const STUCK: Duration = Duration::from_secs(5);

/// How often a waiting publisher looks again without being woken.
const RECHECK: Duration = Duration::from_millis(20);

/// Topics a publisher remembers the matching filters of.
const MATCH_CACHE: usize = 256;

/// The size the router's log gives a message: what its retention counts.
pub(super) fn log_size(topic: &[u8], payload: &[u8]) -> u64 {
    (4 + topic.len() + payload.len()) as u64
}

/// The flow state of one gateway.
pub(crate) struct Flow {
    /// Bytes a subscriber may be behind on one filter before publishers to it wait.
    window: u64,
    /// Bumped whenever a filter is added or removed, so that cached matches are redone.
    generation: AtomicU64,
    registry: Mutex<Registry>,
    stats: Arc<BrokerStats>,
}

#[derive(Default)]
struct Registry {
    filters: HashMap<String, Arc<FilterFlow>>,
    /// The readers of shared groups by (router filter, group), with their members: members
    /// of a group share one.
    groups: HashMap<(String, String), (Arc<Reader>, usize)>,
}

/// One filter of the router's: what has gone into its log, and who reads it.
pub(crate) struct FilterFlow {
    filter: String,
    appended: AtomicU64,
    readers: RwLock<Vec<Arc<Reader>>>,
}

/// One subscription's progress through its filter's log (a shared group's, for its members).
pub(crate) struct Reader {
    filter: Arc<FilterFlow>,
    shared: bool,
    consumed: AtomicU64,
    /// Publishers stopped waiting for it; cleared once it consumes again.
    stuck: AtomicBool,
    /// Its subscription ended: nobody waits for it.
    left: AtomicBool,
    /// Some publisher waits for it to catch up.
    waited: AtomicBool,
    progress: Notify,
    /// The router's offset of the next message expected, for counting what it skipped.
    next_offset: AtomicU64,
}

impl Flow {
    /// Flow control for logs sure to keep `log_bytes` behind their newest message.
    pub(crate) fn new(log_bytes: u64, stats: Arc<BrokerStats>) -> Self {
        Self {
            window: (log_bytes / 2).max(1),
            generation: AtomicU64::new(0),
            registry: Mutex::new(Registry::default()),
            stats,
        }
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A subscription to `filter` (as the router knows it) begins; members of one shared
    /// `group` share a reader. It starts caught up.
    pub(crate) fn join(&self, filter: &str, group: Option<&str>) -> Arc<Reader> {
        let mut registry = self.registry();
        if let Some(group) = group
            && let Some((reader, members)) = registry
                .groups
                .get_mut(&(filter.to_owned(), group.to_owned()))
        {
            *members += 1;
            return reader.clone();
        }
        let flow = match registry.filters.get(filter) {
            Some(flow) => flow.clone(),
            None => {
                let flow = Arc::new(FilterFlow {
                    filter: filter.to_owned(),
                    appended: AtomicU64::new(0),
                    readers: RwLock::new(Vec::new()),
                });
                registry.filters.insert(filter.to_owned(), flow.clone());
                self.generation.fetch_add(1, Ordering::AcqRel);
                flow
            }
        };
        let reader = Arc::new(Reader {
            consumed: AtomicU64::new(flow.appended.load(Ordering::SeqCst)),
            filter: flow.clone(),
            shared: group.is_some(),
            stuck: AtomicBool::new(false),
            left: AtomicBool::new(false),
            waited: AtomicBool::new(false),
            progress: Notify::new(),
            next_offset: AtomicU64::new(u64::MAX),
        });
        write(&flow.readers).push(reader.clone());
        if let Some(group) = group {
            registry
                .groups
                .insert((filter.to_owned(), group.to_owned()), (reader.clone(), 1));
        }
        reader
    }

    /// A subscription ends (unsubscribed, or its session ended or went offline).
    pub(crate) fn leave(&self, reader: &Arc<Reader>, group: Option<&str>) {
        let mut registry = self.registry();
        if let Some(group) = group {
            let key = (reader.filter.filter.clone(), group.to_owned());
            let Some((_, members)) = registry.groups.get_mut(&key) else {
                return;
            };
            *members -= 1;
            if *members > 0 {
                return;
            }
            registry.groups.remove(&key);
        }
        reader.left.store(true, Ordering::SeqCst);
        reader.progress.notify_waiters();
        let empty = {
            let mut readers = write(&reader.filter.readers);
            readers.retain(|r| !Arc::ptr_eq(r, reader));
            readers.is_empty()
        };
        if empty {
            registry.filters.remove(&reader.filter.filter);
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Counts a message of `size` going into the logs of `filters`; the first reader it leaves
    /// more than the window behind, which its publisher must wait for.
    pub(crate) fn append(&self, filters: &[Arc<FilterFlow>], size: u64) -> Option<Arc<Reader>> {
        let mut blocker = None;
        for flow in filters {
            let appended = flow.appended.fetch_add(size, Ordering::SeqCst) + size;
            if blocker.is_some() {
                continue;
            }
            blocker = read(&flow.readers)
                .iter()
                .find(|r| r.holds_back() && appended.saturating_sub(r.consumed()) > self.window)
                .cloned();
        }
        blocker
    }

    /// Counts a publish to `topic` (as the router sees it) through a publisher's `matcher`; the
    /// reader it must wait for, if any.
    pub(super) fn publish(
        &self,
        matcher: &mut Matcher,
        topic: &Bytes,
        payload: &[u8],
    ) -> Option<Arc<Reader>> {
        let filters = matcher.filters(self, topic);
        if filters.is_empty() {
            return None;
        }
        self.append(&filters, log_size(topic, payload))
    }

    /// Counts a publish the gateway makes itself (from HTTP or CoAP, or a will): those are
    /// not held back, but subscribers' counts must include them.
    pub(super) fn gateway_publish(&self, matcher: &mut Matcher, publish: &MqttPublish) {
        let topic = to_router(publish.topic.as_bytes().clone());
        let _ = self.publish(matcher, &topic, &publish.payload);
    }

    /// Whether a publisher waiting for `reader` may go on.
    fn clear(&self, reader: &Reader) -> bool {
        !reader.holds_back() || reader.lag() <= self.window / 2
    }
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("filter", &self.filter.filter)
            .field("lag", &self.lag())
            .finish_non_exhaustive()
    }
}

impl Reader {
    fn consumed(&self) -> u64 {
        self.consumed.load(Ordering::SeqCst)
    }

    fn holds_back(&self) -> bool {
        !self.stuck.load(Ordering::SeqCst) && !self.left.load(Ordering::SeqCst)
    }

    /// Bytes appended to the filter that this reader has not had yet.
    pub(crate) fn lag(&self) -> u64 {
        self.filter
            .appended
            .load(Ordering::SeqCst)
            .saturating_sub(self.consumed())
    }

    /// The appended count of the filter, for telling an idle reader from a busy filter.
    pub(crate) fn appended(&self) -> u64 {
        self.filter.appended.load(Ordering::SeqCst)
    }

    /// The router forwarded a message of `size` at `offset` in the filter's log; how many
    /// messages it skipped before it (the reader was further behind than the log holds).
    pub(crate) fn forwarded(&self, size: u64, offset: Option<u64>) -> u64 {
        let mut skipped = 0;
        if let (Some(offset), false) = (offset, self.shared) {
            let expected = self.next_offset.swap(offset + 1, Ordering::Relaxed);
            if expected != u64::MAX && offset > expected {
                skipped = offset - expected;
            }
        }
        let appended = self.appended();
        if self.stuck.swap(false, Ordering::SeqCst) {
            // What it missed is gone: it starts again from where the filter is.
            self.consumed.store(appended, Ordering::SeqCst);
        } else {
            // Never past what went in: a message counted nowhere (a will) must not hide a lag.
            let _ = self
                .consumed
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                    Some((c + size).min(appended.max(c)))
                });
        }
        if self.waited.load(Ordering::SeqCst) {
            self.waited.store(false, Ordering::SeqCst);
            self.progress.notify_waiters();
        }
        skipped
    }

    /// The reader has had all the router holds for it: the counts agree again.
    pub(crate) fn resync(&self) {
        let appended = self.appended();
        let _ = self.consumed.fetch_max(appended, Ordering::SeqCst);
        if self.waited.swap(false, Ordering::SeqCst) {
            self.progress.notify_waiters();
        }
    }
}

/// A publisher's wait for one reader.
pub(super) struct Blocked {
    reader: Arc<Reader>,
    seen: u64,
    since: Instant,
}

impl Blocked {
    pub(super) fn new(reader: Arc<Reader>) -> Self {
        Self {
            seen: reader.consumed(),
            reader,
            since: Instant::now(),
        }
    }

    /// Resolves once the reader is back within half the window, has left, or is found stuck.
    /// Cancel-safe: progress seen so far is kept.
    pub(super) async fn settle(&mut self, flow: &Flow) {
        loop {
            let notified = self.reader.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.reader.waited.store(true, Ordering::SeqCst);
            if flow.clear(&self.reader) {
                return;
            }
            let _ = tokio::time::timeout(RECHECK, notified).await;
            let consumed = self.reader.consumed();
            if consumed != self.seen {
                self.seen = consumed;
                self.since = Instant::now();
            } else if self.since.elapsed() >= STUCK {
                if !self.reader.stuck.swap(true, Ordering::SeqCst) {
                    flow.stats.stuck.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        filter = %self.reader.filter.filter.escape_debug(),
                        "an MQTT subscriber took nothing for {STUCK:?}: publishers no longer \
                         wait for it"
                    );
                }
                return;
            }
        }
    }
}

/// The filters a publisher's topics go into, remembered per topic until a filter comes or
/// goes.
#[derive(Default)]
pub(super) struct Matcher {
    generation: u64,
    /// Keyed by owned copies: a topic from a client is a slice of the buffer its packet was
    /// read into, and a key kept from it would keep that whole buffer alive.
    cache: HashMap<Bytes, Arc<[Arc<FilterFlow>]>>,
}

impl Matcher {
    /// The filters of the router's that `topic` (as the router sees it) goes into.
    pub(super) fn filters(&mut self, flow: &Flow, topic: &Bytes) -> Arc<[Arc<FilterFlow>]> {
        let generation = flow.generation.load(Ordering::Acquire);
        if generation != self.generation || self.cache.len() >= MATCH_CACHE {
            self.cache.clear();
            self.generation = generation;
        }
        if let Some(found) = self.cache.get(topic) {
            return found.clone();
        }
        let found: Arc<[Arc<FilterFlow>]> = match std::str::from_utf8(topic) {
            Ok(topic) => flow
                .registry()
                .filters
                .values()
                .filter(|f| rumqttd::protocol::matches(topic, &f.filter))
                .cloned()
                .collect(),
            Err(_) => Arc::new([]),
        };
        self.cache
            .insert(Bytes::copy_from_slice(topic), found.clone());
        found
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(log: u64) -> Flow {
        Flow::new(log, Arc::new(BrokerStats::default()))
    }

    #[test]
    fn a_publisher_waits_once_a_reader_is_more_than_the_window_behind() {
        let flow = flow(4096);
        let reader = flow.join("a/+", None);
        let mut matcher = Matcher::default();
        let filters = matcher.filters(&flow, &Bytes::from_static(b"a/b"));
        assert_eq!(filters.len(), 1);
        assert!(flow.append(&filters, 2048).is_none());
        let blocker = flow.append(&filters, 1).expect("over the window");
        assert!(Arc::ptr_eq(&blocker, &reader));
        assert!(!flow.clear(&reader));
        let _ = reader.forwarded(1024, Some(0));
        assert!(!flow.clear(&reader), "not yet back within half the window");
        let _ = reader.forwarded(1, Some(1));
        assert!(flow.clear(&reader), "back within half the window");
        assert!(
            matcher
                .filters(&flow, &Bytes::from_static(b"b/c"))
                .is_empty()
        );
    }

    #[test]
    fn readers_that_left_or_are_stuck_hold_nobody_back() {
        let flow = flow(4096);
        let reader = flow.join("t", None);
        let filters = Matcher::default().filters(&flow, &Bytes::from_static(b"t"));
        assert!(flow.append(&filters, 4000).is_some());
        reader.stuck.store(true, Ordering::SeqCst);
        assert!(flow.append(&filters, 10).is_none());
        // Consuming again ends being stuck, from where the filter is.
        let _ = reader.forwarded(10, None);
        assert_eq!(reader.lag(), 0);
        flow.leave(&reader, None);
        assert!(flow.append(&filters, 10_000).is_none());
        assert!(
            Matcher::default()
                .filters(&flow, &Bytes::from_static(b"t"))
                .is_empty(),
            "the filter is gone with its last reader"
        );
    }

    #[test]
    fn members_of_a_shared_group_share_one_reader() {
        let flow = flow(4096);
        let one = flow.join("g/#", Some("workers"));
        let two = flow.join("g/#", Some("workers"));
        assert!(Arc::ptr_eq(&one, &two));
        let alone = flow.join("g/#", None);
        assert!(!Arc::ptr_eq(&one, &alone));
        assert!(
            !Arc::ptr_eq(&alone, &flow.join("g/#", None)),
            "subscriptions outside groups each have their own"
        );
        flow.leave(&one, Some("workers"));
        assert!(!one.left.load(Ordering::SeqCst), "one member remains");
        flow.leave(&two, Some("workers"));
        assert!(one.left.load(Ordering::SeqCst));
    }

    #[test]
    fn gaps_in_the_routers_offsets_count_as_dropped() {
        let flow = flow(4096);
        let reader = flow.join("t", None);
        let filters = Matcher::default().filters(&flow, &Bytes::from_static(b"t"));
        let _ = flow.append(&filters, 40);
        assert_eq!(reader.forwarded(10, Some(7)), 0);
        assert_eq!(reader.forwarded(10, Some(8)), 0);
        assert_eq!(reader.forwarded(10, Some(12)), 3);
    }

    #[test]
    fn consumption_never_runs_ahead_of_what_went_in() {
        let flow = flow(4096);
        let reader = flow.join("t", None);
        let filters = Matcher::default().filters(&flow, &Bytes::from_static(b"t"));
        // A message nobody counted (a will the router published itself) is forwarded.
        let _ = reader.forwarded(500, None);
        assert_eq!(reader.consumed(), 0);
        let _ = flow.append(&filters, 100);
        assert_eq!(reader.lag(), 100);
        reader.resync();
        assert_eq!(reader.lag(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_publisher_goes_on_when_the_reader_catches_up_or_is_stuck() {
        let flow = Arc::new(flow(4096));
        let reader = flow.join("t", None);
        let filters = Matcher::default().filters(&flow, &Bytes::from_static(b"t"));
        let blocker = flow.append(&filters, 3000).expect("blocked");
        let mut blocked = Blocked::new(blocker);
        let waiting = {
            let flow = flow.clone();
            tokio::spawn(async move { blocked.settle(&flow).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        let _ = reader.forwarded(2000, Some(0));
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("woken by progress")
            .unwrap();

        let blocker = flow.append(&filters, 3000).expect("blocked again");
        let started = Instant::now();
        Blocked::new(blocker).settle(&flow).await;
        assert!(started.elapsed() >= STUCK);
        assert_eq!(flow.stats.stuck.load(Ordering::Relaxed), 1);
        assert!(
            flow.append(&filters, 10_000).is_none(),
            "stuck: not waited for"
        );
    }
}
