//! Fan-out of every accepted message to live subscribers, with a bounded history for resuming
//! streams. Store updates and fan-out happen under one lock, so a new subscriber's retained
//! snapshot and its live messages neither overlap nor leave a gap.
//!
//! The broadcast ring carries weak references: the hub's recent past (bounded in messages and
//! bytes) holds the messages, so a subscriber that stops reading (a stalled stream) holds none;
//! what it finds let go when it reads on counts as missed, as if the ring had overtaken it.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::broadcast;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

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

/// What the broadcast ring holds of an event: the message is held by the hub's recent past.
#[derive(Debug, Clone)]
struct Shared {
    seq: u64,
    message: Weak<Message>,
    rendered: Arc<OnceLock<String>>,
}

impl Shared {
    fn upgrade(&self) -> Option<Event> {
        Some(Event {
            seq: self.seq,
            message: self.message.upgrade()?,
            rendered: self.rendered.clone(),
        })
    }
}

/// Every event published after it was made, unless it falls behind: by more than the ring
/// (`http.sse_buffer` events) or past what the hub keeps (`http.sse_history_bytes`). Then it
/// is told how many it missed, and goes on with the oldest it can still have.
#[derive(Debug)]
pub struct Live {
    rx: broadcast::Receiver<Shared>,
    /// An event read while counting missed ones, given at the next call.
    pending: Option<Event>,
}

impl Live {
    /// The next event; `Lagged(n)` when `n` were missed before it.
    pub async fn recv(&mut self) -> Result<Event, RecvError> {
        if let Some(event) = self.pending.take() {
            return Ok(event);
        }
        let next = match self.rx.recv().await {
            Ok(shared) => Ok(shared),
            Err(RecvError::Lagged(n)) => Err(TryRecvError::Lagged(n)),
            Err(RecvError::Closed) => Err(TryRecvError::Closed),
        };
        self.settle(next).map_err(|e| match e {
            TryRecvError::Lagged(n) => RecvError::Lagged(n),
            TryRecvError::Empty | TryRecvError::Closed => RecvError::Closed,
        })
    }

    /// The next event if one is there.
    pub fn try_recv(&mut self) -> Result<Event, TryRecvError> {
        if let Some(event) = self.pending.take() {
            return Ok(event);
        }
        let next = self.rx.try_recv();
        self.settle(next)
    }

    /// `next` as an event, or the count of events missed from it on, let go or overtaken, up
    /// to the first one still held (kept for the next call).
    fn settle(&mut self, mut next: Result<Shared, TryRecvError>) -> Result<Event, TryRecvError> {
        let mut missed = 0;
        loop {
            match next {
                Ok(shared) => match shared.upgrade() {
                    Some(event) if missed == 0 => return Ok(event),
                    Some(event) => {
                        self.pending = Some(event);
                        return Err(TryRecvError::Lagged(missed));
                    }
                    None => missed += 1,
                },
                Err(TryRecvError::Lagged(n)) => missed += n,
                Err(e) if missed == 0 => return Err(e),
                // Closed is seen again at the next call.
                Err(TryRecvError::Empty | TryRecvError::Closed) => {
                    return Err(TryRecvError::Lagged(missed));
                }
            }
            next = self.rx.try_recv();
        }
    }

    /// The events as a stream, which ends when the hub is gone.
    pub fn into_stream(self) -> impl futures_util::Stream<Item = Result<Event, u64>> {
        futures_util::stream::unfold(self, |mut live| async move {
            match live.recv().await {
                Ok(event) => Some((Ok(event), live)),
                Err(RecvError::Lagged(n)) => Some((Err(n), live)),
                Err(RecvError::Closed) => None,
            }
        })
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
    /// Later events.
    pub live: Live,
    /// The topics the subscriber may read.
    pub scope: Readable,
}

/// How much of the recent past is kept for streams that resume: the oldest events go once
/// either bound is passed. The bytes bound also caps what live subscribers that fall behind
/// can have (the ring holds no message itself).
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
    /// The recent past: the history streams resume from, and at least the ring's length, within
    /// the bytes bound (the newest event always).
    history: VecDeque<Event>,
    /// What the events in `history` weigh together.
    history_bytes: usize,
}

/// The fan-out point.
#[derive(Debug)]
pub(crate) struct Hub {
    epoch: u64,
    history_cap: History,
    /// Most events held: the history's, or the ring's length if that is more.
    keep: usize,
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Shared>,
}

impl Hub {
    pub(crate) fn new(buffer: usize, history_cap: History) -> Self {
        let buffer = buffer.max(1);
        let (tx, _) = broadcast::channel(buffer);
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let keep = history_cap.messages.max(buffer);
        Self {
            epoch,
            history_cap,
            keep,
            inner: Mutex::new(Inner {
                seq: 0,
                history: VecDeque::with_capacity(keep.min(4096)),
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
        let shared = Shared {
            seq: event.seq,
            message: Arc::downgrade(&event.message),
            rendered: event.rendered.clone(),
        };
        inner.history_bytes += event.message.weight();
        inner.history.push_back(event);
        while inner.history.len() > self.keep
            || (inner.history_bytes > self.history_cap.bytes && inner.history.len() > 1)
        {
            let Some(oldest) = inner.history.pop_front() else {
                break;
            };
            inner.history_bytes -= oldest.message.weight();
        }
        // No receiver is not an error: nobody is streaming.
        let _ = self.tx.send(shared);
        durable
    }

    /// Every later event.
    pub(crate) fn live(&self) -> Live {
        Live {
            rx: self.tx.subscribe(),
            pending: None,
        }
    }

    /// Subscribes to `filter`, resuming after `last_event_id` when it is still in the history.
    pub(crate) fn subscribe(
        &self,
        filter: &TopicFilter,
        last_event_id: Option<&str>,
        store: &RetainedStore,
    ) -> Subscription {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let live = self.live();
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
        let held = inner.history.front().map_or(inner.seq + 1, |e| e.seq);
        // The recent past may be longer than the history streams resume from.
        let covered = (inner.seq + 1).saturating_sub(self.history_cap.messages as u64);
        (seq + 1 >= held.max(covered)).then_some(seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::message::Origin;
    use crate::topic::Topic;

    fn send(hub: &Hub, store: &RetainedStore, topic: &str) {
        send_sized(hub, store, topic, 1);
    }

    /// Publishes `size` bytes to `topic`; the handle tells whether anything still holds them.
    fn send_sized(hub: &Hub, store: &RetainedStore, topic: &str, size: usize) -> Weak<Message> {
        let m = Message::new(Topic::parse(topic).unwrap(), vec![b'x'; size], Origin::Http);
        let m = Arc::new(m);
        let weak = Arc::downgrade(&m);
        hub.publish(m, store);
        weak
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
        for t in ["a", "b", "c", "d"] {
            send_sized(&hub, &store, t, 999);
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
        // A message over the bound is kept alone while it is the newest, so that live
        // subscribers still get it, and goes with the next.
        send_sized(&hub, &store, "e", 3_000);
        match hub.subscribe(&all, Some(&id(4)), &store).start {
            Start::Resume(events) => {
                assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [5]);
            }
            other => panic!("expected a resume, got {other:?}"),
        }
        assert!(matches!(
            hub.subscribe(&all, Some(&id(3)), &store).start,
            Start::Snapshot { reset: true, .. }
        ));
        send(&hub, &store, "f");
        assert_eq!(hub.inner.lock().unwrap().history.len(), 1);
    }

    /// A subscriber that stops reading holds no message: the hub's recent past does, within its
    /// bytes. Reading on, it is told how many it missed, then gets the oldest still held and
    /// everything after it.
    #[tokio::test]
    async fn a_subscriber_that_stops_reading_holds_no_message_past_the_bytes() {
        let store = RetainedStore::new();
        // Room for ten or so of the 999-byte messages below, whatever the ring's length.
        let hub_with_ring = |buffer| {
            Hub::new(
                buffer,
                History {
                    messages: 10_000,
                    bytes: 10_500,
                },
            )
        };
        let hub = hub_with_ring(1024);
        let mut stalled = hub.live();
        let weak = send_sized(&hub, &store, "t/0", 999);
        for n in 1..100 {
            send_sized(&hub, &store, &format!("t/{n}"), 999);
        }
        assert!(
            weak.upgrade().is_none(),
            "the first message is let go though the subscriber never read it"
        );
        let held = hub.inner.lock().unwrap().history.len() as u64;
        assert!((5..=10).contains(&held), "{held}");
        assert!(matches!(stalled.recv().await, Err(RecvError::Lagged(n)) if n == 100 - held));
        for seq in 100 - held + 1..=100 {
            assert_eq!(stalled.try_recv().unwrap().seq, seq);
        }
        assert!(matches!(stalled.try_recv(), Err(TryRecvError::Empty)));
        // Overtaken by the ring and let go by the hub at once: one count for both.
        let hub = hub_with_ring(16);
        let mut stalled = hub.live();
        for n in 0..30 {
            send_sized(&hub, &store, &format!("t/{n}"), 999);
        }
        // The ring kept the last 16, the hub the last `held` of them.
        let held = hub.inner.lock().unwrap().history.len() as u64;
        assert!(held < 16, "{held}");
        assert!(matches!(stalled.try_recv(), Err(TryRecvError::Lagged(n)) if n == 30 - held));
        assert_eq!(stalled.try_recv().unwrap().seq, 30 - held + 1);
    }
}
