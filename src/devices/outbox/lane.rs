//! One push rule's queue: its oldest entries held in memory, at most a window of them, the rest
//! on disk only (kept in memory too until their commit) until the window has room again; the
//! worker takes the oldest held entry whose topic has none in flight, so a dead endpoint's queue
//! costs memory for the window alone.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;

use super::disk::{Disk, Stored};
use crate::bridge::{Durable, Message, TopicFilter};
use crate::config::WhenFull;
use crate::devices::record::encode;
use crate::policy::Readable;
use crate::topic::Topic;

/// Fewest entries a lane holds in memory, whatever its `in_flight`: read back from disk in
/// batches of at least half of it.
pub(crate) const MIN_WINDOW: usize = 256;

/// One message waiting in a rule's outbox.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) seq: u64,
    pub(crate) message: Arc<Message>,
    /// When the outbox took it; `max_age` counts from here, across restarts.
    pub(crate) taken_at: SystemTime,
}

/// How a rule's queue is bounded, and its counters.
pub(crate) struct Bound {
    pub(crate) max_queued: usize,
    pub(crate) when_full: WhenFull,
    /// Most entries held in memory; the rest wait on disk only.
    pub(crate) window: usize,
    /// Messages dropped or refused at the bound.
    pub(crate) overflow: Counter,
    /// Messages waiting.
    pub(crate) depth: Gauge,
}

/// One push rule's queue.
pub(crate) struct Lane {
    pub(crate) name: Arc<str>,
    pub(super) filter: TopicFilter,
    /// What the rule's principal may read of the filter.
    pub(super) scope: Readable,
    pub(super) bound: Bound,
    disk: Arc<Disk>,
    /// Every entry below this sequence number is on disk (raised by the writer thread).
    committed: Arc<AtomicU64>,
    state: Mutex<LaneState>,
    ready: Notify,
}

struct Held {
    entry: Entry,
    in_flight: bool,
}

struct LaneState {
    /// The oldest entries, in sequence order.
    held: VecDeque<Held>,
    in_flight: usize,
    /// Topics with an entry in flight.
    busy: HashSet<Topic>,
    /// Entries after the held ones, on disk (or on their way there) only.
    spilled: usize,
    /// The newest spilled entries, whose commit is not known to be done: read back from here,
    /// a message never waits for a disk sync to go out.
    fresh: VecDeque<Entry>,
    /// No spilled entry has a lower sequence number.
    spill_from: u64,
    /// The first spilled entries, which the bound dropped before they were read back.
    skip: usize,
    /// The worker is reading spilled entries back.
    loading: bool,
    next_seq: u64,
}

impl LaneState {
    fn depth(&self) -> usize {
        self.held.len() + self.spilled - self.skip
    }
}

impl Lane {
    /// A lane with what an earlier run left on disk.
    pub(super) fn new(
        (name, filter, scope, bound): (Arc<str>, TopicFilter, Readable, Bound),
        disk: Arc<Disk>,
        stored: Stored,
    ) -> Self {
        let state = LaneState {
            held: stored
                .held
                .into_iter()
                .map(|entry| Held {
                    entry,
                    in_flight: false,
                })
                .collect(),
            in_flight: 0,
            busy: HashSet::new(),
            fresh: VecDeque::new(),
            spilled: stored.spilled,
            spill_from: stored.spill_from,
            skip: 0,
            loading: false,
            next_seq: stored.next_seq,
        };
        bound.depth.set(state.depth() as i64);
        Self {
            name,
            filter,
            scope,
            bound,
            disk,
            committed: Arc::new(AtomicU64::new(0)),
            state: Mutex::new(state),
            ready: Notify::new(),
        }
    }

    /// The oldest waiting entry whose topic has none in flight, marked in flight; waits for one
    /// while `limit` entries are in flight or none can go.
    pub(crate) async fn next(&self, limit: usize) -> Entry {
        loop {
            let ready = self.ready.notified();
            self.refill();
            if let Some(entry) = self.pick(limit) {
                return entry;
            }
            ready.await;
        }
    }

    /// Messages waiting, those in flight included.
    pub(crate) fn depth(&self) -> usize {
        self.lock().depth()
    }

    /// Queues `message` (the caller checked the filter and the scope), applying the bound; the
    /// receipt resolves once it is on disk.
    pub(super) fn take(&self, message: &Arc<Message>) -> Option<Durable> {
        let mut state = self.lock();
        if state.depth() >= self.bound.max_queued {
            self.bound.overflow.inc();
            match self.bound.when_full {
                WhenFull::Refuse => return None,
                // The entries being delivered stay: their worker owns them.
                WhenFull::DropOldest => {
                    let oldest = state.held.iter().position(|h| !h.in_flight);
                    if let Some(dropped) = oldest.and_then(|i| state.held.remove(i)) {
                        self.disk.delete(&self.name, vec![dropped.entry.seq]);
                    } else if state.spilled > state.skip {
                        // The oldest waiting entry is on disk: it goes when it is read back.
                        state.skip += 1;
                    } else {
                        return None;
                    }
                }
            }
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        let entry = Entry {
            seq,
            message: Arc::clone(message),
            taken_at: SystemTime::now(),
        };
        let record = encode(&entry);
        self.settle_fresh(&mut state);
        let committed = if state.spilled == 0 && state.held.len() < self.bound.window {
            state.held.push_back(Held {
                entry,
                in_flight: false,
            });
            None
        } else {
            // Beyond the window the message lives on disk only, once its commit is done.
            if state.spilled == 0 {
                state.spill_from = seq;
            }
            state.spilled += 1;
            state.fresh.push_back(entry);
            Some(self.committed.clone())
        };
        self.bound.depth.set(state.depth() as i64);
        // Sent under the lane's lock, so the file sees a lane's entries in their order.
        let durable = self.disk.put(&self.name, seq, record, committed);
        drop(state);
        self.ready.notify_one();
        durable
    }

    /// Forgets delivered or dead-lettered entries in memory; [`Self::erase`] takes them off
    /// the disk.
    pub(crate) fn remove(&self, seqs: &[u64]) {
        {
            let mut state = self.lock();
            for &seq in seqs {
                if let Ok(i) = state.held.binary_search_by_key(&seq, |h| h.entry.seq)
                    && let Some(done) = state.held.remove(i)
                    && done.in_flight
                {
                    state.in_flight -= 1;
                    state.busy.remove(&done.entry.message.topic);
                }
            }
            self.bound.depth.set(state.depth() as i64);
        }
        // The next message on those topics may go now.
        self.ready.notify_one();
    }

    /// Takes removed entries off the disk (through the delivery log).
    pub(crate) fn erase(&self, seqs: Vec<u64>) {
        self.disk.delete(&self.name, seqs);
    }

    /// Moves spilled entries back into the window once it is half empty: from memory when
    /// their commit is not known to be done, else read from disk.
    fn refill(&self) {
        loop {
            let (from, count) = {
                let mut state = self.lock();
                self.settle_fresh(&mut state);
                let room = self.bound.window.saturating_sub(state.held.len());
                if state.spilled == 0 || state.loading || room < self.bound.window / 2 {
                    return;
                }
                let on_disk = state.spilled - state.fresh.len();
                let wanted = room + state.skip;
                if on_disk == 0 {
                    let n = wanted.min(state.fresh.len());
                    let entries: Vec<Entry> = state.fresh.drain(..n).collect();
                    self.settle(&mut state, entries);
                    return;
                }
                state.loading = true;
                (state.spill_from, wanted.min(on_disk))
            };
            // Read outside the lock: publishers keep queueing meanwhile, behind these entries.
            let read = self.disk.read(&self.name, from, count);
            let mut state = self.lock();
            state.loading = false;
            match read {
                Ok(entries) => {
                    // Entries that should be on disk and are not (a failed commit, whose
                    // publisher was told) are not waited for.
                    let missing = count - entries.len();
                    self.settle(&mut state, entries);
                    if missing > 0 {
                        tracing::warn!(rule = %self.name, missing, "outbox entries missing on disk");
                        state.spilled -= missing.min(state.spilled - state.fresh.len());
                        state.skip = state.skip.min(state.spilled);
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!(rule = %self.name, error = %e, "cannot read the push outbox");
                    return;
                }
            }
        }
    }

    /// Takes the next spilled entries, in order, into the window (or drops those the bound
    /// skipped).
    fn settle(&self, state: &mut LaneState, entries: Vec<Entry>) {
        for entry in entries {
            state.spilled -= 1;
            state.spill_from = entry.seq + 1;
            if state.skip > 0 {
                state.skip -= 1;
                self.disk.delete(&self.name, vec![entry.seq]);
            } else {
                state.held.push_back(Held {
                    entry,
                    in_flight: false,
                });
            }
        }
    }

    /// Forgets the memory copy of spilled entries whose commit is done.
    fn settle_fresh(&self, state: &mut LaneState) {
        let committed = self.committed.load(Ordering::Acquire);
        while state.fresh.front().is_some_and(|e| e.seq < committed) {
            state.fresh.pop_front();
        }
    }

    fn pick(&self, limit: usize) -> Option<Entry> {
        let mut state = self.lock();
        if state.in_flight >= limit {
            return None;
        }
        let LaneState {
            held,
            busy,
            in_flight,
            ..
        } = &mut *state;
        let next = held
            .iter_mut()
            .find(|h| !h.in_flight && !busy.contains(&h.entry.message.topic))?;
        next.in_flight = true;
        *in_flight += 1;
        busy.insert(next.entry.message.topic.clone());
        Some(next.entry.clone())
    }

    fn lock(&self) -> MutexGuard<'_, LaneState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The payloads held in the window, oldest first.
    #[cfg(test)]
    pub(super) fn held(&self) -> Vec<bytes::Bytes> {
        let state = self.lock();
        state
            .held
            .iter()
            .map(|h| h.entry.message.payload.clone())
            .collect()
    }

    /// Entries in memory: the window and the spilled ones still waiting for their commit.
    #[cfg(test)]
    pub(super) fn in_memory(&self) -> usize {
        let mut state = self.lock();
        self.settle_fresh(&mut state);
        state.held.len() + state.fresh.len()
    }
}
