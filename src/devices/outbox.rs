//! The push outbox: one bounded queue per push rule in memory, mirrored in a redb table keyed
//! by (rule, sequence number) under the data dir. A writer thread commits what has queued up in
//! one durable transaction, so a message is on disk before the publisher is answered, and
//! leaves the disk only when its rule is done with it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use redb::{Database, DatabaseError, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{Notify, oneshot};

use super::record::{decode, encode};
use crate::bridge::{Durable, Message, TopicFilter};
use crate::config::WhenFull;
use crate::policy::Readable;
use crate::topic::Topic;

const TABLE: TableDefinition<'_, (&str, u64), &[u8]> = TableDefinition::new("outbox");
/// File name under the data dir.
const FILE: &str = "outbox.redb";
/// Page cache of the database file: the queues hold every waiting message in memory.
const CACHE: usize = 4 * 1024 * 1024;
/// Most operations committed in one transaction.
const BATCH: usize = 4096;

/// Why the outbox cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// Another process holds the database.
    #[error("{path} is in use by another topicgate process")]
    InUse {
        /// The database file.
        path: PathBuf,
    },
    /// The file cannot be opened or read; it is left as it is.
    #[error("cannot read the push outbox {path} (left untouched): {detail}")]
    Unreadable {
        /// The database file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
}

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
    /// Messages dropped or refused at the bound.
    pub(crate) overflow: Counter,
    /// Messages waiting.
    pub(crate) depth: Gauge,
}

/// One push rule's queue.
pub(crate) struct Lane {
    pub(crate) name: Arc<str>,
    filter: TopicFilter,
    /// What the rule's principal may read of the filter.
    scope: Readable,
    bound: Bound,
    state: Mutex<LaneState>,
    ready: Notify,
}

#[derive(Default)]
struct LaneState {
    queue: VecDeque<Entry>,
    next_seq: u64,
    /// The entries the worker holds, which the bound never drops, and their topics.
    in_flight: HashMap<u64, Topic>,
    busy: HashSet<Topic>,
}

impl Lane {
    /// The oldest waiting entry whose topic has none in flight, marked in flight; waits for one
    /// while `limit` entries are in flight or none can go.
    pub(crate) async fn next(&self, limit: usize) -> Entry {
        loop {
            let ready = self.ready.notified();
            {
                let mut state = self.lock();
                if state.in_flight.len() < limit
                    && let Some(entry) = state
                        .queue
                        .iter()
                        .find(|e| {
                            !state.in_flight.contains_key(&e.seq)
                                && !state.busy.contains(&e.message.topic)
                        })
                        .cloned()
                {
                    let topic = entry.message.topic.clone();
                    state.busy.insert(topic.clone());
                    state.in_flight.insert(entry.seq, topic);
                    return entry;
                }
            }
            ready.await;
        }
    }

    /// Messages waiting, the one in flight included.
    pub(crate) fn depth(&self) -> usize {
        self.lock().queue.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LaneState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

enum Op {
    Put {
        rule: Arc<str>,
        seq: u64,
        record: Vec<u8>,
        ack: Option<oneshot::Sender<Result<(), String>>>,
    },
    Delete {
        rule: Arc<str>,
        seq: u64,
    },
    Stop(oneshot::Sender<Result<(), String>>),
}

/// The outbox of every push rule.
pub(crate) struct Outbox {
    lanes: Vec<Arc<Lane>>,
    writer: Mutex<Option<mpsc::Sender<Op>>>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Outbox")
    }
}

impl Outbox {
    /// Opens (or creates) the outbox under `dir` with one queue per rule (name, filter,
    /// bound), filled with what an earlier run left; entries of rules no longer configured
    /// stay on disk untouched.
    pub(crate) fn open(
        dir: &Path,
        rules: Vec<(Arc<str>, TopicFilter, Readable, Bound)>,
    ) -> Result<Self, OutboxError> {
        let path = dir.join(FILE);
        let unreadable = |detail: String| OutboxError::Unreadable {
            path: path.clone(),
            detail,
        };
        std::fs::create_dir_all(dir).map_err(|e| unreadable(e.to_string()))?;
        let db = match Database::builder().set_cache_size(CACHE).create(&path) {
            Ok(db) => db,
            Err(DatabaseError::DatabaseAlreadyOpen) => return Err(OutboxError::InUse { path }),
            Err(e) => return Err(unreadable(e.to_string())),
        };
        let mut stored = load(&db).map_err(unreadable)?;
        let lanes: Vec<Arc<Lane>> = rules
            .into_iter()
            .map(|(name, filter, scope, bound)| {
                let queue: VecDeque<Entry> = stored.remove(&*name).unwrap_or_default().into();
                let next_seq = queue.back().map_or(0, |e| e.seq + 1);
                bound.depth.set(queue.len() as i64);
                Arc::new(Lane {
                    name,
                    filter,
                    scope,
                    bound,
                    state: Mutex::new(LaneState {
                        queue,
                        next_seq,
                        in_flight: HashMap::new(),
                        busy: HashSet::new(),
                    }),
                    ready: Notify::new(),
                })
            })
            .collect();
        for (rule, entries) in &stored {
            tracing::warn!(
                rule = %rule,
                messages = entries.len(),
                "the outbox holds messages of a push rule that is no longer configured; they are kept"
            );
        }
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("outbox-writer".to_owned())
            .spawn(move || write_loop(db, &rx))
            .map_err(|e| unreadable(e.to_string()))?;
        Ok(Self {
            lanes,
            writer: Mutex::new(Some(tx)),
        })
    }

    /// The queue of each rule, in the order the rules were given.
    pub(crate) fn lanes(&self) -> &[Arc<Lane>] {
        &self.lanes
    }

    /// Forgets a delivered or dead-lettered entry, in memory and then on disk.
    pub(crate) fn remove(&self, lane: &Lane, seq: u64) {
        {
            let mut state = lane.lock();
            if let Some(i) = state.queue.iter().position(|e| e.seq == seq) {
                state.queue.remove(i);
            }
            if let Some(topic) = state.in_flight.remove(&seq) {
                state.busy.remove(&topic);
            }
            lane.bound.depth.set(state.queue.len() as i64);
        }
        // The next message on that topic may go now.
        lane.ready.notify_one();
        self.send(Op::Delete {
            rule: lane.name.clone(),
            seq,
        });
    }

    /// Commits everything queued, then closes the file.
    pub(crate) async fn close(&self) {
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(writer) = writer else { return };
        let (ack, done) = Durable::pending();
        if writer.send(Op::Stop(ack)).is_ok()
            && let Err(e) = done.wait().await
        {
            tracing::error!(error = %e, "the push outbox could not be flushed");
        }
    }

    fn send(&self, op: Op) -> bool {
        match &*self.writer.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(writer) => writer.send(op).is_ok(),
            None => false,
        }
    }
}

impl Outbox {
    /// Takes `message` into the queue of every rule that matches it; the receipt resolves
    /// once they are on disk.
    pub(crate) fn offer(&self, message: &Arc<Message>) -> Option<Durable> {
        let mut last = None;
        for lane in &self.lanes {
            if lane.filter.matches(&message.topic) {
                // One commit carries every earlier put: the last receipt covers them all.
                last = self.take(lane, message).or(last);
            }
        }
        last
    }

    /// Takes `message` into the queue of lane `index` alone (a message a shared subscription
    /// gave this gateway for that rule); the receipt resolves once it is on disk.
    pub(crate) fn offer_lane(&self, index: usize, message: &Arc<Message>) -> Option<Durable> {
        let lane = self.lanes.get(index)?;
        if !lane.filter.matches(&message.topic) {
            return None;
        }
        self.take(lane, message)
    }

    /// Queues `message` in `lane` if the rule's principal may read it, applying the bound.
    fn take(&self, lane: &Lane, message: &Arc<Message>) -> Option<Durable> {
        if !lane.scope.admits(message.topic.as_str()) {
            return None;
        }
        let mut state = lane.lock();
        if state.queue.len() >= lane.bound.max_queued {
            let oldest = match lane.bound.when_full {
                WhenFull::Refuse => None,
                // The entries being delivered stay: their worker owns them.
                WhenFull::DropOldest => state
                    .queue
                    .iter()
                    .position(|e| !state.in_flight.contains_key(&e.seq)),
            };
            lane.bound.overflow.inc();
            let oldest = oldest.and_then(|i| state.queue.remove(i))?;
            self.send(Op::Delete {
                rule: lane.name.clone(),
                seq: oldest.seq,
            });
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        let entry = Entry {
            seq,
            message: Arc::clone(message),
            taken_at: SystemTime::now(),
        };
        let record = encode(&entry);
        state.queue.push_back(entry);
        lane.bound.depth.set(state.queue.len() as i64);
        // Sent under the lane's lock, so the file sees a lane's entries in their order.
        let (ack, durable) = Durable::pending();
        let sent = self.send(Op::Put {
            rule: lane.name.clone(),
            seq,
            record,
            ack: Some(ack),
        });
        drop(state);
        lane.ready.notify_one();
        sent.then_some(durable)
    }
}

/// Commits batches of operations until told to stop or every sender is gone.
fn write_loop(db: Database, rx: &mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let outcome = commit(&db, &batch).inspect_err(|e| {
            tracing::error!(error = %e, "cannot write the push outbox");
        });
        let mut stop = None;
        for op in batch {
            match op {
                Op::Put { ack: Some(ack), .. } => {
                    let _ = ack.send(outcome.clone());
                }
                Op::Stop(ack) => stop = Some(ack),
                Op::Put { .. } | Op::Delete { .. } => {}
            }
        }
        if let Some(ack) = stop {
            // Closed before the stop is confirmed, so a new gateway can open the file at once.
            drop(db);
            let _ = ack.send(outcome);
            return;
        }
    }
}

fn commit(db: &Database, batch: &[Op]) -> Result<(), String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut table = txn.open_table(TABLE).map_err(|e| e.to_string())?;
        for op in batch {
            match op {
                Op::Put {
                    rule, seq, record, ..
                } => {
                    table
                        .insert((&**rule, *seq), record.as_slice())
                        .map_err(|e| e.to_string())?;
                }
                Op::Delete { rule, seq } => {
                    table.remove((&**rule, *seq)).map_err(|e| e.to_string())?;
                }
                Op::Stop(_) => {}
            }
        }
    }
    txn.commit().map_err(|e| e.to_string())
}

/// Every stored entry by rule, in sequence order.
fn load(db: &Database) -> Result<HashMap<String, Vec<Entry>>, String> {
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let table = match txn.open_table(TABLE) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(HashMap::new()),
        Err(e) => return Err(e.to_string()),
    };
    let mut rules: HashMap<String, Vec<Entry>> = HashMap::new();
    for row in table.iter().map_err(|e| e.to_string())? {
        let (key, value) = row.map_err(|e| e.to_string())?;
        let (rule, seq) = key.value();
        let entry = decode(seq, value.value())
            .ok_or_else(|| format!("entry {seq} of push rule {rule:?} is not readable"))?;
        rules.entry(rule.to_owned()).or_default().push(entry);
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::{Origin, Topic};
    use bytes::Bytes;
    use std::time::Duration;

    fn bound(max_queued: usize, when_full: WhenFull) -> Bound {
        Bound {
            max_queued,
            when_full,
            overflow: Counter::default(),
            depth: Gauge::default(),
        }
    }

    fn message(topic: &str, payload: &'static str) -> Arc<Message> {
        Arc::new(Message::new(
            Topic::parse(topic).unwrap(),
            payload,
            Origin::Http,
        ))
    }

    fn payloads(lane: &Lane) -> Vec<Bytes> {
        lane.lock()
            .queue
            .iter()
            .map(|e| e.message.payload.clone())
            .collect()
    }

    #[tokio::test]
    async fn entries_survive_a_reopen_in_order_and_leave_when_removed() {
        let dir = tempfile::tempdir().unwrap();
        let rules = || {
            vec![(
                Arc::from("plugs"),
                TopicFilter::parse("plugs/#").unwrap(),
                Readable::All,
                bound(10, WhenFull::DropOldest),
            )]
        };
        let outbox = Outbox::open(dir.path(), rules()).unwrap();
        assert!(outbox.offer(&message("other", "x")).is_none());
        for p in ["1", "2", "3"] {
            outbox
                .offer(&message("plugs/a", p))
                .unwrap()
                .wait()
                .await
                .unwrap();
        }
        let lane = outbox.lanes()[0].clone();
        let first = lane.next(1).await;
        assert_eq!(first.message.payload, "1");
        outbox.remove(&lane, first.seq);
        outbox.close().await;
        let outbox = Outbox::open(dir.path(), rules()).unwrap();
        let lane = outbox.lanes()[0].clone();
        assert_eq!(payloads(&lane), ["2", "3"]);
        // New entries continue the sequence after the stored ones.
        outbox
            .offer(&message("plugs/b", "4"))
            .unwrap()
            .wait()
            .await
            .unwrap();
        assert_eq!(lane.lock().queue.back().unwrap().seq, 3);
        outbox.close().await;
    }

    #[tokio::test]
    async fn the_bound_drops_the_oldest_waiting_or_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(
            dir.path(),
            vec![
                (
                    Arc::from("drop"),
                    TopicFilter::parse("t").unwrap(),
                    Readable::All,
                    bound(2, WhenFull::DropOldest),
                ),
                (
                    Arc::from("refuse"),
                    TopicFilter::parse("t").unwrap(),
                    Readable::All,
                    bound(2, WhenFull::Refuse),
                ),
            ],
        )
        .unwrap();
        let (drop, refuse) = (outbox.lanes()[0].clone(), outbox.lanes()[1].clone());
        for p in ["1", "2"] {
            outbox.offer(&message("t", p));
        }
        // "1" is in flight: the bound drops "2", the oldest of those only waiting.
        assert_eq!(drop.next(1).await.message.payload, "1");
        outbox.offer(&message("t", "3"));
        assert_eq!(payloads(&drop), ["1", "3"]);
        assert_eq!(payloads(&refuse), ["1", "2"]);
        assert_eq!(drop.bound.overflow.get(), 1);
        assert_eq!(refuse.bound.overflow.get(), 1);
        outbox.close().await;
    }

    #[tokio::test]
    async fn entries_go_out_at_once_for_different_topics_and_in_order_for_one() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(
            dir.path(),
            vec![(
                Arc::from("all"),
                TopicFilter::parse("#").unwrap(),
                Readable::All,
                bound(10, WhenFull::Refuse),
            )],
        )
        .unwrap();
        let lane = outbox.lanes()[0].clone();
        for (t, p) in [("a", "a1"), ("a", "a2"), ("b", "b1"), ("c", "c1")] {
            outbox.offer(&message(t, p));
        }
        let a1 = lane.next(3).await;
        let b1 = lane.next(3).await;
        let c1 = lane.next(3).await;
        assert_eq!(
            [&a1, &b1, &c1].map(|e| e.message.payload.clone()),
            ["a1", "b1", "c1"],
            "a2 waits for a1"
        );
        // At the limit, and with a2's topic busy, nothing more goes.
        let next = tokio::time::timeout(Duration::from_millis(50), lane.next(4)).await;
        assert!(next.is_err(), "a2 must wait for a1");
        outbox.remove(&lane, b1.seq);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), lane.next(3))
                .await
                .is_err()
        );
        outbox.remove(&lane, a1.seq);
        assert_eq!(lane.next(3).await.message.payload, "a2");
        outbox.close().await;
    }
}
