//! Fan-out of every accepted message to live subscribers, with a bounded history for resuming
//! streams. Store updates and fan-out happen under one lock, so a new subscriber's retained
//! snapshot and its live messages neither overlap nor leave a gap.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::broadcast;

use crate::policy::Readable;

use super::journal::Durable;
use super::message::Message;
use super::store::RetainedStore;
use crate::topic::TopicFilter;

/// A message with its place in the gateway's sequence.
#[derive(Debug, Clone)]
pub struct Event {
    /// Position in this process's sequence, from 1.
    pub seq: u64,
    /// The message.
    pub message: Arc<Message>,
    /// The message's JSON envelope, rendered by the first stream that sends it for all others.
    rendered: Arc<OnceLock<String>>,
}

impl Event {
    /// The message's envelope as one line of JSON at `now`. Rendered once and shared by every
    /// stream, unless it has an expiry, whose remaining time depends on `now`.
    pub fn envelope_json(&self, now: SystemTime) -> Cow<'_, str> {
        if self.message.expires_at.is_some() {
            return Cow::Owned(self.message.envelope_json(now));
        }
        Cow::Borrowed(
            self.rendered
                .get_or_init(|| self.message.envelope_json(now)),
        )
    }
}

/// Where a new subscription starts.
#[derive(Debug)]
pub enum Start {
    /// The events missed since the given id, oldest first.
    Resume(Vec<Event>),
    /// The retained messages matching the filter; `reset` when a resume was asked but is not
    /// possible any more.
    Snapshot {
        /// Whether a resume was refused.
        reset: bool,
        /// Retained messages, sorted by topic.
        retained: Vec<Arc<Message>>,
    },
}

/// A live subscription: where it starts, then every event after `at`.
#[derive(Debug)]
pub struct Subscription {
    /// What to send first.
    pub start: Start,
    /// The sequence number the start covers up to.
    pub at: u64,
    /// Later events; falls behind by at most the configured buffer.
    pub live: broadcast::Receiver<Event>,
    /// The topics the subscriber may read.
    pub scope: Readable,
}

/// How much of the recent past is kept for streams that resume: the oldest events go once
/// either bound is passed.
#[derive(Debug, Clone, Copy)]
pub struct History {
    /// Most events.
    pub messages: usize,
    /// Most bytes of their messages ([`Message::weight`]).
    pub bytes: usize,
}

#[derive(Debug)]
struct Inner {
    seq: u64,
    history: VecDeque<Event>,
    /// What the events in `history` weigh together.
    history_bytes: usize,
}

/// The fan-out point.
#[derive(Debug)]
pub(crate) struct Hub {
    epoch: u64,
    history_cap: History,
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Event>,
}

impl Hub {
    pub(crate) fn new(buffer: usize, history_cap: History) -> Self {
        let (tx, _) = broadcast::channel(buffer.max(1));
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Self {
            epoch,
            history_cap,
            inner: Mutex::new(Inner {
                seq: 0,
                history: VecDeque::with_capacity(history_cap.messages.min(4096)),
                history_bytes: 0,
            }),
            tx,
        }
    }

    /// Identifies this process in event ids, so ids from an earlier run are never resumed.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Applies `message` to `store` and sends it to every subscriber; returns the receipt of the
    /// store's write to disk, if any. Under the lock, the disk sees changes in the same order
    /// as memory.
    pub(crate) fn publish(&self, message: Arc<Message>, store: &RetainedStore) -> Option<Durable> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let durable = store.apply(&message);
        inner.seq += 1;
        let event = Event {
            seq: inner.seq,
            message,
            rendered: Arc::default(),
        };
        let cap = self.history_cap;
        if cap.messages > 0 {
            inner.history_bytes += event.message.weight();
            inner.history.push_back(event.clone());
            while inner.history.len() > cap.messages || inner.history_bytes > cap.bytes {
                let Some(oldest) = inner.history.pop_front() else {
                    break;
                };
                inner.history_bytes -= oldest.message.weight();
            }
        }
        // No receiver is not an error: nobody is streaming.
        let _ = self.tx.send(event);
        durable
    }

    /// Every later event.
    pub(crate) fn live(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    /// Subscribes to `filter`, resuming after `last_event_id` when it is still in the history.
    pub(crate) fn subscribe(
        &self,
        filter: &TopicFilter,
        last_event_id: Option<&str>,
        store: &RetainedStore,
    ) -> Subscription {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let live = self.tx.subscribe();
        let at = inner.seq;
        let start = match last_event_id.map(|id| self.resume_point(id, &inner)) {
            Some(Some(after)) => Start::Resume(
                inner
                    .history
                    .iter()
                    .filter(|e| e.seq > after && filter.matches(&e.message.topic))
                    .cloned()
                    .collect(),
            ),
            asked => Start::Snapshot {
                reset: asked.is_some(),
                retained: store.matching(filter),
            },
        };
        Subscription {
            start,
            at,
            live,
            scope: Readable::All,
        }
    }

    /// The sequence number to resume after, if `id` names a point still covered.
    fn resume_point(&self, id: &str, inner: &Inner) -> Option<u64> {
        let (epoch, seq) = id.trim().split_once('-')?;
        let (epoch, seq): (u64, u64) = (epoch.parse().ok()?, seq.parse().ok()?);
        if epoch != self.epoch || seq > inner.seq {
            return None;
        }
        let oldest = inner.history.front().map_or(inner.seq + 1, |e| e.seq);
        (seq + 1 >= oldest).then_some(seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::message::Origin;
    use crate::topic::Topic;

    fn send(hub: &Hub, store: &RetainedStore, topic: &str) {
        let m = Message::new(Topic::parse(topic).unwrap(), "v", Origin::Http);
        hub.publish(Arc::new(m), store);
    }

    #[test]
    fn resumes_within_history_and_resets_beyond_it() {
        let store = RetainedStore::new();
        let hub = Hub::new(
            16,
            History {
                messages: 3,
                bytes: usize::MAX,
            },
        );
        let all = TopicFilter::parse("#").unwrap();
        for t in ["a", "b", "c", "d"] {
            send(&hub, &store, t);
        }
        let id = |seq: u64| format!("{}-{seq}", hub.epoch());
        // History holds 2, 3, 4: resuming after 1 misses nothing.
        match hub.subscribe(&all, Some(&id(1)), &store).start {
            Start::Resume(events) => {
                assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 3, 4]);
            }
            other => panic!("expected a resume, got {other:?}"),
        }
        // After 0, event 1 is gone.
        assert!(matches!(
            hub.subscribe(&all, Some(&id(0)), &store).start,
            Start::Snapshot { reset: true, .. }
        ));
        // Another process's ids and future ids are not resumed.
        assert!(matches!(
            hub.subscribe(&all, Some("1-1"), &store).start,
            Start::Snapshot { reset: true, .. }
        ));
        assert!(matches!(
            hub.subscribe(&all, Some(&id(9)), &store).start,
            Start::Snapshot { reset: true, .. }
        ));
        let sub = hub.subscribe(&all, None, &store);
        assert!(matches!(sub.start, Start::Snapshot { reset: false, .. }));
        assert_eq!(sub.at, 4);
    }

    /// Large messages cannot make the history hold more than its bytes: the oldest go first,
    /// and a stream resuming from before them starts again from the retained values.
    #[test]
    fn the_history_lets_the_oldest_go_past_its_bytes() {
        let store = RetainedStore::new();
        let hub = Hub::new(
            16,
            History {
                messages: 100,
                bytes: 2_500,
            },
        );
        let big = |topic: &str| {
            let m = Message::new(Topic::parse(topic).unwrap(), vec![b'x'; 999], Origin::Http);
            hub.publish(Arc::new(m), &store);
        };
        for t in ["a", "b", "c", "d"] {
            big(t);
        }
        let all = TopicFilter::parse("#").unwrap();
        let id = |seq: u64| format!("{}-{seq}", hub.epoch());
        // 1,000 bytes each: two fit in 2,500.
        match hub.subscribe(&all, Some(&id(2)), &store).start {
            Start::Resume(events) => {
                assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4]);
            }
            other => panic!("expected a resume, got {other:?}"),
        }
        assert!(matches!(
            hub.subscribe(&all, Some(&id(1)), &store).start,
            Start::Snapshot { reset: true, .. }
        ));
        // One message over the bound is not kept at all.
        let m = Message::new(Topic::parse("e").unwrap(), vec![b'x'; 3_000], Origin::Http);
        hub.publish(Arc::new(m), &store);
        assert!(matches!(
            hub.subscribe(&all, Some(&id(4)), &store).start,
            Start::Snapshot { reset: true, .. }
        ));
        assert_eq!(hub.inner.lock().unwrap().history_bytes, 0);
    }
}
