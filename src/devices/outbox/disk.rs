//! The outbox file: one redb table from (rule, sequence number) to a stored message, written by
//! one thread that commits what has queued up in one durable transaction (group commit), and read
//! back by the lanes a window at a time. Removals go to the delivery log (`acks.rs`) first and
//! into the database with the next commit that new entries, a full log or a quiet spell call for,
//! so draining a queue does not cost one fsync per batch of deliveries. A new entry waits a
//! moment for its commit, and one delivered meanwhile is never written, so pushing to an
//! endpoint that keeps up does not cost one fsync per group of messages either.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use redb::{Database, DatabaseError, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::OutboxError;
use super::acks::Acks;
use super::lane::Entry;
use crate::bridge::Durable;
use crate::devices::record::decode;

const TABLE: TableDefinition<'_, (&str, u64), &[u8]> = TableDefinition::new("outbox");
/// Each rule's next sequence number, so that one is never given twice, even once the rule's
/// queue has been empty (the delivery log names entries by their numbers).
const NEXT: TableDefinition<'_, &str, u64> = TableDefinition::new("outbox_next");
/// Page cache of the database file: the lanes read back what they do not hold through it.
const CACHE: usize = 4 * 1024 * 1024;
/// Most operations committed in one transaction.
const BATCH: usize = 4096;
/// Most removals held in the delivery log before they are committed.
const HELD: usize = 16_384;
/// How long removals wait in the delivery log while nothing else comes.
const QUIET: Duration = Duration::from_millis(250);
/// Longest wait of a new entry for its commit, while waiting pays (see [`LINGER_WINDOW`]): a
/// delivered entry needs no commit, so a rule whose endpoint keeps up costs no fsync, and its
/// HTTP and CoAP publishers are answered once it is delivered. Push workers report deliveries
/// well within it (`ERASE_WITHIN`).
const LINGER: Duration = Duration::from_millis(2);
/// How long the writer looks before it decides again whether new entries wait. After a window
/// in which they waited, they wait in the next one if at least as many were delivered within
/// their wait as were written: a moment's stall of the endpoint, which makes a burst of entries
/// outlast their wait, does not end the waiting.
const LINGER_WINDOW: Duration = Duration::from_millis(100);
/// How long new entries are written at once after a window in which waiting did not pay; then
/// they wait for a window on trial. Written at once, an entry is written before its delivery is
/// known, so only a trial tells that the endpoint keeps up again; a dead endpoint's publishers
/// wait up to `LINGER` longer for their answers during one window in eleven.
const LINGER_RETRY: Duration = Duration::from_secs(1);
/// Shortest time between two writes of new entries that nobody waits for. When the endpoint
/// falls behind, entries outlast their wait at every look, and a write (with its fsync) at every
/// look cost more than the pushes themselves; at most one per this long, each write takes all
/// that came due. An entry a publisher waits for is written at the next look, as before.
const WRITE_GAP: Duration = Duration::from_millis(1);
/// How often a writer looks at what came meanwhile while a publisher waits for one of the new
/// entries (it is answered soon after the entry's delivery). When nobody waits for them (MQTT
/// publishes), the writer sleeps until the first of them is due instead: a look every step cost
/// some 4,000 wake-ups a second of a thread that had nothing to do at most of them.
const LINGER_STEP: Duration = Duration::from_micros(250);

type Ack = oneshot::Sender<Result<(), String>>;

enum Op {
    Put {
        rule: Arc<str>,
        seq: u64,
        record: Vec<u8>,
        ack: Ack,
        /// Raised past `seq` once the entry is on disk: its lane holds it in memory until then.
        committed: Option<Arc<AtomicU64>>,
    },
    Delete {
        rule: Arc<str>,
        seqs: Vec<u64>,
    },
    Stop(Ack),
}

/// What an earlier run left of one rule's queue: its oldest entries, read, and how many more
/// wait on disk from which sequence number on.
#[derive(Default)]
pub(super) struct Stored {
    pub(super) held: Vec<Entry>,
    pub(super) spilled: usize,
    pub(super) spill_from: u64,
    pub(super) next_seq: u64,
}

/// The open file and its writer thread.
pub(super) struct Disk {
    /// Shared with the writer thread, which closes it (`None`) when told to stop, so a new
    /// gateway can open the file at once.
    db: Arc<RwLock<Option<Database>>>,
    writer: RwLock<Option<mpsc::Sender<Op>>>,
}

impl Disk {
    /// Opens (or creates) the file; returns it with what it holds, the first `window(rule)`
    /// entries of each rule read, every entry checked.
    pub(super) fn open(
        path: &Path,
        window: impl Fn(&str) -> usize,
    ) -> Result<(Self, HashMap<String, Stored>), OutboxError> {
        let unreadable = |detail: String| OutboxError::Unreadable {
            path: path.to_owned(),
            detail,
        };
        let db = match Database::builder().set_cache_size(CACHE).create(path) {
            Ok(db) => db,
            Err(DatabaseError::DatabaseAlreadyOpen) => {
                return Err(OutboxError::InUse {
                    path: path.to_owned(),
                });
            }
            Err(e) => return Err(unreadable(e.to_string())),
        };
        let acks_path = path.with_extension("acks");
        let unreadable_acks = |e: std::io::Error| OutboxError::Unreadable {
            path: acks_path.clone(),
            detail: e.to_string(),
        };
        let (mut acks, delivered) = Acks::open(&acks_path).map_err(unreadable_acks)?;
        if !delivered.is_empty() {
            let delivered: Vec<_> = delivered
                .into_iter()
                .map(|(rule, seq)| (Arc::from(rule), seq))
                .collect();
            commit(&db, &[], &delivered, &HashMap::new()).map_err(unreadable)?;
            acks.clear_durably().map_err(unreadable_acks)?;
        }
        let stored = scan(&db, window).map_err(unreadable)?;
        let db = Arc::new(RwLock::new(Some(db)));
        let (tx, rx) = mpsc::channel();
        let file = db.clone();
        std::thread::Builder::new()
            .name("outbox-writer".to_owned())
            .spawn(move || Writer::new(acks).run(&file, &rx))
            .map_err(|e| unreadable(e.to_string()))?;
        let disk = Self {
            db,
            writer: RwLock::new(Some(tx)),
        };
        Ok((disk, stored))
    }

    /// Queues an entry's record; the receipt resolves once it is on disk, and `committed` is
    /// raised past `seq` then.
    pub(super) fn put(
        &self,
        rule: &Arc<str>,
        seq: u64,
        record: Vec<u8>,
        committed: Option<Arc<AtomicU64>>,
    ) -> Option<Durable> {
        let (ack, durable) = Durable::pending();
        let op = Op::Put {
            rule: rule.clone(),
            seq,
            record,
            ack,
            committed,
        };
        self.send(op).then_some(durable)
    }

    /// Queues the removal of entries.
    pub(super) fn delete(&self, rule: &Arc<str>, seqs: Vec<u64>) {
        self.send(Op::Delete {
            rule: rule.clone(),
            seqs,
        });
    }

    /// Up to `max` committed entries of `rule` from sequence number `from` on, in order.
    pub(super) fn read(&self, rule: &str, from: u64, max: usize) -> Result<Vec<Entry>, String> {
        let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
        let Some(db) = db.as_ref() else {
            return Ok(Vec::new());
        };
        let txn = db.begin_read().map_err(|e| e.to_string())?;
        let table = match txn.open_table(TABLE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.to_string()),
        };
        let mut entries = Vec::with_capacity(max);
        for row in table
            .range((rule, from)..=(rule, u64::MAX))
            .map_err(|e| e.to_string())?
            .take(max)
        {
            let (key, value) = row.map_err(|e| e.to_string())?;
            let seq = key.value().1;
            let entry = decode(seq, value.value())
                .ok_or_else(|| format!("entry {seq} of push rule {rule:?} is not readable"))?;
            entries.push(entry);
        }
        Ok(entries)
    }

    /// Commits everything queued, then closes the file.
    pub(super) async fn close(&self) {
        let writer = self
            .writer
            .write()
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
        match &*self.writer.read().unwrap_or_else(PoisonError::into_inner) {
            Some(writer) => writer.send(op).is_ok(),
            None => false,
        }
    }
}

/// The writer thread's state.
struct Writer {
    acks: Acks,
    /// Removals in the delivery log, not yet committed.
    held: Vec<(Arc<str>, u64)>,
    /// New entries not yet resolved (written or delivered), in the order they came.
    waiting: VecDeque<Waiting>,
    /// Each rule's next sequence number past the entries seen, for the next commit.
    next: HashMap<Arc<str>, u64>,
    /// Whether a new entry waits up to [`LINGER`] before it is written, in this window.
    lingering: bool,
    /// When this window began, and the new entries delivered before their write and written
    /// in it.
    window: Instant,
    delivered: usize,
    written: usize,
    /// When new entries were last written.
    last_write: Option<Instant>,
}

/// A new entry on its way to the file.
struct Waiting {
    rule: Arc<str>,
    seq: u64,
    record: Vec<u8>,
    ack: Ack,
    committed: Option<Arc<AtomicU64>>,
    since: Instant,
    /// Written (with the outcome) or delivered; `None` while it waits.
    resolved: Option<Result<(), String>>,
}

impl Writer {
    fn new(acks: Acks) -> Self {
        Self {
            acks,
            held: Vec::new(),
            waiting: VecDeque::new(),
            next: HashMap::new(),
            lingering: true,
            window: Instant::now(),
            delivered: 0,
            written: 0,
            last_write: None,
        }
    }

    /// Writes and removes until told to stop or every sender is gone.
    fn run(mut self, file: &RwLock<Option<Database>>, rx: &mpsc::Receiver<Op>) {
        loop {
            let mut ops = Vec::new();
            if !self.waiting.is_empty() {
                // New entries are waiting: look again when one may be due rather than be
                // woken by every operation sent.
                std::thread::sleep(self.pause(Instant::now()));
            } else {
                let first = if self.held.is_empty() {
                    rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
                } else {
                    rx.recv_timeout(QUIET)
                };
                match first {
                    Ok(op) => ops.push(op),
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        let _ = self.commit(file, &[], &[]);
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        let _ = self.write_all(file, Vec::new());
                        return;
                    }
                }
            }
            while ops.len() < BATCH {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) if ops.is_empty() => {
                        let _ = self.write_all(file, Vec::new());
                        return;
                    }
                    Err(mpsc::TryRecvError::Disconnected) => break,
                }
            }
            let (removals, stop) = self.sort(ops);
            if let Some(ack) = stop {
                let outcome = self.write_all(file, removals);
                // Closed before the stop is confirmed, so a new gateway can open the file at once.
                *file.write().unwrap_or_else(PoisonError::into_inner) = None;
                let _ = ack.send(outcome);
                return;
            }
            self.write_due(file, removals);
        }
    }

    /// Takes new entries into the waiting line and marks those a removal names delivered;
    /// returns the other removals (of entries already written) and a stop, if one came.
    fn sort(&mut self, ops: Vec<Op>) -> (Vec<(Arc<str>, u64)>, Option<Ack>) {
        let now = Instant::now();
        let mut removals = Vec::new();
        let mut stop = None;
        for op in ops {
            match op {
                Op::Put {
                    rule,
                    seq,
                    record,
                    ack,
                    committed,
                } => {
                    let past = self.next.entry(rule.clone()).or_default();
                    *past = (*past).max(seq + 1);
                    self.waiting.push_back(Waiting {
                        rule,
                        seq,
                        record,
                        ack,
                        committed,
                        since: now,
                        resolved: None,
                    });
                }
                Op::Delete { rule, seqs } => {
                    for seq in seqs {
                        // Deliveries come roughly in order: the entry is near the front.
                        match self
                            .waiting
                            .iter_mut()
                            .find(|w| w.seq == seq && w.rule == rule && w.resolved.is_none())
                        {
                            Some(w) => {
                                w.resolved = Some(Ok(()));
                                self.delivered += 1;
                            }
                            None => removals.push((rule.clone(), seq)),
                        }
                    }
                }
                Op::Stop(ack) => stop = Some(ack),
            }
        }
        (removals, stop)
    }

    /// Writes the new entries whose wait is over, with `removals`; the removals alone go to
    /// the delivery log when nothing is due. Then answers the resolved entries, in order.
    fn write_due(&mut self, file: &RwLock<Option<Database>>, removals: Vec<(Arc<str>, u64)>) {
        let now = Instant::now();
        self.decide(now);
        let lingering = self.lingering;
        let gap = self
            .last_write
            .is_some_and(|at| now.duration_since(at) < WRITE_GAP);
        let mut due: Vec<usize> = (0..self.waiting.len())
            .filter(|&i| {
                let w = &self.waiting[i];
                w.resolved.is_none()
                    && (!lingering || now.duration_since(w.since) >= LINGER || i >= BATCH)
            })
            .collect();
        // Within the gap, entries nobody waits for (MQTT publishes) wait for the next write.
        if gap && due.iter().all(|&i| self.waiting[i].ack.is_closed()) {
            due.clear();
        }
        if due.is_empty() {
            if !self.hold(&removals) {
                let _ = self.commit(file, &[], &removals);
            }
        } else {
            let outcome = self.commit(file, &due, &removals);
            for &i in &due {
                self.waiting[i].resolved = Some(outcome.clone());
            }
            self.written += due.len();
            self.last_write = Some(now);
        }
        self.answer();
    }

    /// How long to sleep before the next look while new entries wait: [`LINGER_STEP`] while a
    /// publisher waits for one of them, else until the first is due (its wait over, and the
    /// gap since the last write), at least a step and at most [`LINGER`].
    fn pause(&self, now: Instant) -> Duration {
        let mut first = None;
        for w in self.waiting.iter().filter(|w| w.resolved.is_none()) {
            if !w.ack.is_closed() {
                return LINGER_STEP;
            }
            first.get_or_insert(w.since);
        }
        let Some(since) = first else {
            return LINGER_STEP;
        };
        let mut due = if self.lingering {
            since + LINGER
        } else {
            since
        };
        if let Some(at) = self.last_write {
            due = due.max(at + WRITE_GAP);
        }
        due.saturating_duration_since(now)
            .clamp(LINGER_STEP, LINGER)
    }

    /// Decides, once a window is over, whether new entries wait in the next one.
    fn decide(&mut self, now: Instant) {
        let length = if self.lingering {
            LINGER_WINDOW
        } else {
            LINGER_RETRY
        };
        if now.duration_since(self.window) < length {
            return;
        }
        self.lingering = !self.lingering || self.delivered >= self.written;
        self.window = now;
        self.delivered = 0;
        self.written = 0;
    }

    /// Writes every new entry not delivered, with `removals`, and answers them all.
    fn write_all(
        &mut self,
        file: &RwLock<Option<Database>>,
        removals: Vec<(Arc<str>, u64)>,
    ) -> Result<(), String> {
        let due: Vec<usize> = (0..self.waiting.len())
            .filter(|&i| self.waiting[i].resolved.is_none())
            .collect();
        let outcome = self.commit(file, &due, &removals);
        for &i in &due {
            self.waiting[i].resolved = Some(outcome.clone());
        }
        self.answer();
        outcome
    }

    /// Answers the resolved entries at the front of the line. One answer covers every entry
    /// before it (a publisher waits for its message's last rule alone), so none goes ahead of
    /// an entry still waiting; its lane's memory copy may go too.
    fn answer(&mut self) {
        while self.waiting.front().is_some_and(|w| w.resolved.is_some()) {
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            let outcome = w.resolved.unwrap_or(Ok(()));
            if let (Some(committed), Ok(())) = (&w.committed, &outcome) {
                committed.fetch_max(w.seq + 1, Ordering::Release);
            }
            let _ = w.ack.send(outcome);
        }
    }

    /// Writes `removals` alone to the delivery log instead of the database, while the log has
    /// room; false when they are to be committed.
    fn hold(&mut self, removals: &[(Arc<str>, u64)]) -> bool {
        if removals.is_empty() {
            return true;
        }
        if self.held.len() + removals.len() > HELD {
            return false;
        }
        match self.acks.append(removals) {
            Ok(()) => {
                self.held.extend_from_slice(removals);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot write the push outbox's delivery log; committing instead");
                false
            }
        }
    }

    /// Commits the waiting entries at `due`, `removals` and every held removal, then empties
    /// the delivery log.
    fn commit(
        &mut self,
        file: &RwLock<Option<Database>>,
        due: &[usize],
        removals: &[(Arc<str>, u64)],
    ) -> Result<(), String> {
        if due.is_empty() && removals.is_empty() && self.held.is_empty() {
            return Ok(());
        }
        let puts: Vec<(&str, u64, &[u8])> = due
            .iter()
            .map(|&i| {
                let w = &self.waiting[i];
                (&*w.rule, w.seq, w.record.as_slice())
            })
            .collect();
        match &*file.read().unwrap_or_else(PoisonError::into_inner) {
            Some(db) => commit(db, &puts, self.held.iter().chain(removals), &self.next),
            None => Err("the push outbox is closed".to_owned()),
        }
        .inspect_err(|e| tracing::error!(error = %e, "cannot write the push outbox"))?;
        self.held.clear();
        self.next.clear();
        if let Err(e) = self.acks.clear() {
            // Records left in the log are applied again at the next start, removing nothing
            // else: sequence numbers are not reused.
            tracing::warn!(error = %e, "cannot empty the push outbox's delivery log");
        }
        Ok(())
    }
}

/// One durable transaction: the entries `puts`, the `removals`, and each rule's next sequence
/// number (`next`: past every entry seen, delivered ones too, so that no number is given twice).
fn commit<'a>(
    db: &Database,
    puts: &[(&str, u64, &[u8])],
    removals: impl IntoIterator<Item = &'a (Arc<str>, u64)>,
    next: &HashMap<Arc<str>, u64>,
) -> Result<(), String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut table = txn.open_table(TABLE).map_err(|e| e.to_string())?;
        remove_all(&mut table, removals)?;
        for (rule, seq, record) in puts {
            table
                .insert((*rule, *seq), *record)
                .map_err(|e| e.to_string())?;
        }
        if !next.is_empty() {
            let mut floors = txn.open_table(NEXT).map_err(|e| e.to_string())?;
            for (rule, past) in next {
                let known = floors
                    .get(&**rule)
                    .map_err(|e| e.to_string())?
                    .map_or(0, |v| v.value());
                if *past > known {
                    floors.insert(&**rule, *past).map_err(|e| e.to_string())?;
                }
            }
        }
    }
    txn.commit().map_err(|e| e.to_string())
}

/// A rule's removals are swept in one pass over their range when they are at least this dense in
/// it (one in `DENSE` numbers or more), else removed one by one.
const DENSE: u64 = 4;

/// Removes the entries `removals` names. Deliveries come about in order, so a rule's removals
/// are mostly a run of numbers: one pass over their range (redb's `retain_in`, which rewrites
/// each leaf once) costs a fraction of a B-tree removal for each (a drain spent 7 % of the
/// gateway's CPU in those).
fn remove_all<'a>(
    table: &mut redb::Table<'_, (&'static str, u64), &'static [u8]>,
    removals: impl IntoIterator<Item = &'a (Arc<str>, u64)>,
) -> Result<(), String> {
    let mut by_rule: HashMap<&str, Vec<u64>> = HashMap::new();
    for (rule, seq) in removals {
        by_rule.entry(&**rule).or_default().push(*seq);
    }
    for (rule, mut seqs) in by_rule {
        seqs.sort_unstable();
        seqs.dedup();
        let (Some(&first), Some(&last)) = (seqs.first(), seqs.last()) else {
            continue;
        };
        if last - first < DENSE * seqs.len() as u64 {
            let mut listed = seqs.iter().copied().peekable();
            table
                .retain_in((rule, first)..=(rule, last), |(_, seq), _| {
                    while listed.next_if(|&s| s < seq).is_some() {}
                    listed.next_if_eq(&seq).is_none()
                })
                .map_err(|e| e.to_string())?;
        } else {
            for seq in seqs {
                table.remove((rule, seq)).map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(())
}

/// Every rule's stored queue: the first `window(rule)` entries read, the rest counted; every
/// entry is decoded once, so an unreadable file fails at startup, not halfway through a queue.
fn scan(db: &Database, window: impl Fn(&str) -> usize) -> Result<HashMap<String, Stored>, String> {
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let table = match txn.open_table(TABLE) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(HashMap::new()),
        Err(e) => return Err(e.to_string()),
    };
    let mut rules: HashMap<String, Stored> = HashMap::new();
    // Rows come in key order, so each rule's rows are together.
    let mut current: Option<(String, usize, Stored)> = None;
    for row in table.iter().map_err(|e| e.to_string())? {
        let (key, value) = row.map_err(|e| e.to_string())?;
        let (rule, seq) = key.value();
        let entry = decode(seq, value.value())
            .ok_or_else(|| format!("entry {seq} of push rule {rule:?} is not readable"))?;
        if current.as_ref().is_none_or(|(name, ..)| name != rule) {
            if let Some((name, _, stored)) = current.take() {
                rules.insert(name, stored);
            }
            current = Some((rule.to_owned(), window(rule), Stored::default()));
        }
        let (_, limit, stored) = current.get_or_insert_with(Default::default);
        if stored.held.len() < *limit && stored.spilled == 0 {
            stored.held.push(entry);
        } else {
            if stored.spilled == 0 {
                stored.spill_from = seq;
            }
            stored.spilled += 1;
        }
        stored.next_seq = seq + 1;
    }
    if let Some((name, _, stored)) = current {
        rules.insert(name, stored);
    }
    match txn.open_table(NEXT) {
        Ok(floors) => {
            for row in floors.iter().map_err(|e| e.to_string())? {
                let (rule, next) = row.map_err(|e| e.to_string())?;
                let stored = rules.entry(rule.value().to_owned()).or_default();
                stored.next_seq = stored.next_seq.max(next.value());
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(e.to_string()),
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::{Message, Origin, Topic};
    use crate::devices::record::encode;
    use std::time::SystemTime;

    fn put(seq: u64) -> (Op, oneshot::Receiver<Result<(), String>>) {
        let entry = Entry {
            seq,
            message: Arc::new(Message::new(
                Topic::parse("t").unwrap(),
                seq.to_string(),
                Origin::Http,
            )),
            taken_at: SystemTime::now(),
        };
        let (ack, receipt) = oneshot::channel();
        let op = Op::Put {
            rule: Arc::from("r"),
            seq,
            record: encode(&entry),
            ack,
            committed: None,
        };
        (op, receipt)
    }

    fn delete(seqs: Vec<u64>) -> Op {
        Op::Delete {
            rule: Arc::from("r"),
            seqs,
        }
    }

    /// A writer on a fresh file, as the thread runs it.
    fn writer(dir: &Path) -> (Writer, RwLock<Option<Database>>) {
        let (acks, _) = Acks::open(&dir.join("outbox.acks")).unwrap();
        let db = Database::create(dir.join("outbox.redb")).unwrap();
        (Writer::new(acks), RwLock::new(Some(db)))
    }

    fn stored(file: &RwLock<Option<Database>>) -> (Vec<u64>, u64) {
        let file = file.read().unwrap();
        let stored = scan(file.as_ref().unwrap(), |_| 10)
            .unwrap()
            .remove("r")
            .unwrap_or_default();
        let held = stored.held.iter().map(|e| e.seq).collect();
        (held, stored.next_seq)
    }

    /// `write_due` as if the last write were long ago.
    fn write_now(
        writer: &mut Writer,
        file: &RwLock<Option<Database>>,
        removals: Vec<(Arc<str>, u64)>,
    ) {
        writer.last_write = None;
        writer.write_due(file, removals);
    }

    #[test]
    fn an_entry_delivered_before_its_write_is_never_written_and_is_answered() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, file) = writer(dir.path());
        writer.lingering = false;
        let (put0, r0) = put(0);
        let (put1, _) = put(1);
        let (removals, _) = writer.sort(vec![put0, put1]);
        write_now(&mut writer, &file, removals);
        assert_eq!(r0.blocking_recv().unwrap(), Ok(()));
        assert_eq!(stored(&file), (vec![0, 1], 2));
        // 0 was written: its removal goes to the file; 2 never reaches it.
        let (put2, r2) = put(2);
        let (put3, r3) = put(3);
        let (removals, _) = writer.sort(vec![put2, put3, delete(vec![0, 2])]);
        assert_eq!(removals, [(Arc::from("r"), 0)]);
        write_now(&mut writer, &file, removals);
        assert_eq!(r2.blocking_recv().unwrap(), Ok(()));
        assert_eq!(r3.blocking_recv().unwrap(), Ok(()));
        assert_eq!(stored(&file), (vec![1, 3], 4));
        // Nothing left to write: the removal of 1 waits in the delivery log.
        let (put4, r4) = put(4);
        let (removals, _) = writer.sort(vec![put4, delete(vec![1, 4])]);
        write_now(&mut writer, &file, removals);
        assert_eq!(r4.blocking_recv().unwrap(), Ok(()));
        assert_eq!(writer.held, [(Arc::from("r"), 1)]);
        assert_eq!(stored(&file), (vec![1, 3], 4));
        let (_, logged) = Acks::open(&dir.path().join("outbox.acks")).unwrap();
        assert_eq!(logged, [("r".to_owned(), 1)]);
        // The next commit takes it, and moves the next number past the one never written.
        let (put5, _) = put(5);
        let (removals, _) = writer.sort(vec![put5]);
        writer.waiting[0].since -= LINGER;
        write_now(&mut writer, &file, removals);
        assert_eq!(stored(&file), (vec![3, 5], 6));
    }

    #[test]
    fn new_entries_nobody_waits_for_are_written_at_most_once_per_gap() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, file) = writer(dir.path());
        writer.lingering = false;
        let (put0, _) = put(0);
        let (removals, _) = writer.sort(vec![put0]);
        writer.write_due(&file, removals);
        assert_eq!(stored(&file), (vec![0], 1));
        // Within the gap (here, one that lasts), an entry nobody waits for waits for the next
        // write; one a publisher waits for is written at once, with every entry before it.
        writer.last_write = Some(Instant::now() + Duration::from_secs(60));
        let (put1, _) = put(1);
        let (removals, _) = writer.sort(vec![put1]);
        writer.write_due(&file, removals);
        assert_eq!(stored(&file), (vec![0], 1));
        let (put2, mut r2) = put(2);
        let (removals, _) = writer.sort(vec![put2]);
        writer.write_due(&file, removals);
        assert_eq!(r2.try_recv().unwrap(), Ok(()));
        assert_eq!(stored(&file), (vec![0, 1, 2], 3));
        // An entry nobody waits for, come due within the gap, goes with the first write after.
        writer.last_write = Some(Instant::now() + Duration::from_secs(60));
        let (put3, _) = put(3);
        let (removals, _) = writer.sort(vec![put3]);
        writer.write_due(&file, removals);
        assert_eq!(stored(&file), (vec![0, 1, 2], 3));
        writer.last_write = Some(Instant::now() - WRITE_GAP);
        writer.write_due(&file, Vec::new());
        assert_eq!(stored(&file), (vec![0, 1, 2, 3], 4));
    }

    #[test]
    fn removals_go_in_one_sweep_when_dense_and_one_by_one_when_not() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("outbox.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(TABLE).unwrap();
            for rule in ["a", "b"] {
                for seq in (0..100u64).filter(|&s| (rule, s) != ("a", 18)) {
                    table.insert((rule, seq), &[0u8][..]).unwrap();
                }
            }
            let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
            // Rule a: a run with a gap (swept), listed out of order, once twice, one not stored.
            // Rule b: four numbers far apart (one by one).
            let mut removals: Vec<(Arc<str>, u64)> = [12, 10, 11, 13, 14, 16, 17, 12, 18]
                .into_iter()
                .map(|s| (a.clone(), s))
                .collect();
            removals.extend([3, 50, 51, 99].into_iter().map(|s| (b.clone(), s)));
            remove_all(&mut table, &removals).unwrap();
            let left = |rule: &'static str| -> Vec<u64> {
                table
                    .range((rule, 0)..=(rule, u64::MAX))
                    .unwrap()
                    .map(|row| row.unwrap().0.value().1)
                    .collect()
            };
            let expected_a: Vec<u64> = (0..100)
                .filter(|s| !(10..=18).contains(s) || *s == 15)
                .collect();
            assert_eq!(left("a"), expected_a);
            let expected_b: Vec<u64> = (0..100).filter(|s| ![3, 50, 51, 99].contains(s)).collect();
            assert_eq!(left("b"), expected_b);
        }
        txn.commit().unwrap();
    }

    #[test]
    fn the_writer_sleeps_until_an_entry_is_due_unless_a_publisher_waits() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, _file) = writer(dir.path());
        let now = Instant::now();
        // Nobody waits for 0 (an MQTT publish): the next look is when its wait is over.
        let (put0, r0) = put(0);
        drop(r0);
        writer.sort(vec![put0]);
        writer.waiting[0].since = now - Duration::from_micros(500);
        assert_eq!(writer.pause(now), LINGER - Duration::from_micros(500));
        // ... or after the gap since the last write, whichever comes later.
        writer.last_write = Some(now);
        writer.waiting[0].since = now - LINGER;
        assert_eq!(writer.pause(now), WRITE_GAP);
        // Written at once, entries are due now: the writer still sleeps a step.
        writer.last_write = None;
        writer.lingering = false;
        assert_eq!(writer.pause(now), LINGER_STEP);
        // A publisher waits for 1: the writer looks every step, to answer it once delivered.
        writer.lingering = true;
        let (put1, _r1) = put(1);
        writer.sort(vec![put1]);
        assert_eq!(writer.pause(now), LINGER_STEP);
        // Once 1 is delivered, only 0 is waited on again.
        writer.sort(vec![delete(vec![1])]);
        writer.waiting[0].since = now;
        assert_eq!(writer.pause(now), LINGER);
    }

    #[test]
    fn a_new_entry_waits_for_its_delivery_and_answers_keep_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, file) = writer(dir.path());
        let (put0, mut r0) = put(0);
        let (put1, mut r1) = put(1);
        let (removals, _) = writer.sort(vec![put0, put1, delete(vec![1])]);
        write_now(&mut writer, &file, removals);
        // 1 is delivered, but a publisher waiting for it may be waiting for 0 as well.
        assert!(r0.try_recv().is_err());
        assert!(r1.try_recv().is_err());
        assert_eq!(stored(&file), (vec![], 0));
        // 0's wait is over: it is written, and both are answered.
        writer.waiting[0].since -= LINGER;
        write_now(&mut writer, &file, Vec::new());
        assert_eq!(r0.try_recv().unwrap(), Ok(()));
        assert_eq!(r1.try_recv().unwrap(), Ok(()));
        assert_eq!(stored(&file), (vec![0], 2));
        // As many delivered as written in this window: in the next, new entries keep waiting.
        writer.window -= LINGER_WINDOW;
        let (put2, mut r2) = put(2);
        let (removals, _) = writer.sort(vec![put2]);
        write_now(&mut writer, &file, removals);
        assert!(writer.lingering);
        assert!(r2.try_recv().is_err());
        // None delivered: 2 is written once its wait is over, and in the next window new
        // entries are written at once.
        writer.waiting[0].since -= LINGER;
        write_now(&mut writer, &file, Vec::new());
        assert_eq!(r2.try_recv().unwrap(), Ok(()));
        writer.window -= LINGER_WINDOW;
        let (put3, mut r3) = put(3);
        let (removals, _) = writer.sort(vec![put3]);
        write_now(&mut writer, &file, removals);
        assert!(!writer.lingering);
        assert_eq!(r3.try_recv().unwrap(), Ok(()));
        assert_eq!(stored(&file), (vec![0, 2, 3], 4));
        // After a longer window, a trial: a new entry waits again, and, delivered within its
        // wait, is never written.
        writer.window -= LINGER_WINDOW;
        let (put4, _) = put(4);
        let (removals, _) = writer.sort(vec![put4]);
        write_now(&mut writer, &file, removals);
        assert!(!writer.lingering);
        assert_eq!(stored(&file), (vec![0, 2, 3, 4], 5));
        writer.window -= LINGER_RETRY;
        let (put5, mut r5) = put(5);
        let (removals, _) = writer.sort(vec![put5]);
        write_now(&mut writer, &file, removals);
        assert!(writer.lingering);
        assert!(r5.try_recv().is_err());
        let (removals, _) = writer.sort(vec![delete(vec![5])]);
        write_now(&mut writer, &file, removals);
        assert_eq!(r5.try_recv().unwrap(), Ok(()));
        assert_eq!(stored(&file), (vec![0, 2, 3, 4], 5));
    }
}
