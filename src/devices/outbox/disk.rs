//! The outbox file: one redb table from (rule, sequence number) to a stored message, written by
//! one thread that commits what has queued up in one durable transaction (group commit), and read
//! back by the lanes a window at a time. Removals go to the delivery log (`acks.rs`) first and
//! into the database with the next commit that new entries, a full log or a quiet spell call for,
//! so draining a queue does not cost one fsync per batch of deliveries.

use std::collections::{HashMap, HashSet};
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
/// Longest wait of new entries for their commit, while those of the last batch were mostly
/// delivered within it: a delivered entry needs no commit, so a rule whose endpoint keeps up
/// costs no fsync, and its HTTP and CoAP publishers are answered once it is delivered.
const LINGER: Duration = Duration::from_millis(2);
/// How often a lingering writer checks whether its new entries were all delivered.
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
            commit(&db, &[], &HashSet::new(), &delivered).map_err(unreadable)?;
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

/// The writer thread's state: the removals held in the delivery log and not yet committed.
struct Writer {
    acks: Acks,
    held: Vec<(Arc<str>, u64)>,
    /// Whether new entries wait up to [`LINGER`] before their commit.
    lingering: bool,
}

impl Writer {
    fn new(acks: Acks) -> Self {
        Self {
            acks,
            held: Vec::new(),
            lingering: true,
        }
    }

    /// Commits batches of operations until told to stop or every sender is gone.
    fn run(mut self, file: &RwLock<Option<Database>>, rx: &mpsc::Receiver<Op>) {
        loop {
            let first = if self.held.is_empty() {
                rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
            } else {
                rx.recv_timeout(QUIET)
            };
            let first = match first {
                Ok(op) => op,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = self.commit(file, &[], &HashSet::new());
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = self.commit(file, &[], &HashSet::new());
                    return;
                }
            };
            let mut batch = vec![first];
            take_queued(&mut batch, rx);
            if self.lingering {
                linger(&mut batch, rx);
            }
            let unwritten = unwritten(&batch);
            let puts = batch
                .iter()
                .filter(|op| matches!(op, Op::Put { .. }))
                .count();
            if puts > 0 {
                // Lingering pays while most new entries are delivered within it.
                self.lingering = unwritten.len() * 2 >= puts;
            }
            let outcome = if self.hold(&batch, &unwritten) {
                Ok(())
            } else {
                self.commit(file, &batch, &unwritten)
            };
            // A delivered entry is taken whatever became of the commit.
            let delivered: Vec<bool> = batch
                .iter()
                .map(|op| matches!(op, Op::Put { rule, seq, .. } if unwritten.contains(&(&**rule, *seq))))
                .collect();
            drop(unwritten);
            let mut stop = None;
            for (op, delivered) in batch.into_iter().zip(delivered) {
                match op {
                    Op::Put {
                        ack,
                        committed,
                        seq,
                        ..
                    } => {
                        let outcome = if delivered { Ok(()) } else { outcome.clone() };
                        if let (Some(committed), Ok(())) = (committed, &outcome) {
                            committed.fetch_max(seq + 1, Ordering::Release);
                        }
                        let _ = ack.send(outcome);
                    }
                    Op::Stop(ack) => stop = Some(ack),
                    Op::Delete { .. } => {}
                }
            }
            if let Some(ack) = stop {
                // Closed before the stop is confirmed, so a new gateway can open the file at once.
                *file.write().unwrap_or_else(PoisonError::into_inner) = None;
                let _ = ack.send(outcome);
                return;
            }
        }
    }

    /// Writes the removals of a batch that has nothing else to commit (its new entries, if
    /// any, all removed in it too) to the delivery log instead of the database, while the log
    /// has room; false when the batch is to be committed.
    fn hold(&mut self, batch: &[Op], unwritten: &HashSet<(&str, u64)>) -> bool {
        let mut removals = Vec::with_capacity(batch.len());
        for op in batch {
            match op {
                Op::Delete { rule, seqs } => removals.extend(
                    seqs.iter()
                        .filter(|seq| !unwritten.contains(&(&**rule, **seq)))
                        .map(|seq| (rule.clone(), *seq)),
                ),
                Op::Put { rule, seq, .. } if unwritten.contains(&(&**rule, *seq)) => {}
                Op::Put { .. } | Op::Stop(_) => return false,
            }
        }
        if removals.is_empty() {
            return true;
        }
        if self.held.len() + removals.len() > HELD {
            return false;
        }
        match self.acks.append(&removals) {
            Ok(()) => {
                self.held.extend(removals);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot write the push outbox's delivery log; committing instead");
                false
            }
        }
    }

    /// Commits `batch` with every held removal, then empties the delivery log.
    fn commit(
        &mut self,
        file: &RwLock<Option<Database>>,
        batch: &[Op],
        unwritten: &HashSet<(&str, u64)>,
    ) -> Result<(), String> {
        if batch.is_empty() && self.held.is_empty() {
            return Ok(());
        }
        match &*file.read().unwrap_or_else(PoisonError::into_inner) {
            Some(db) => commit(db, batch, unwritten, &self.held),
            None => Err("the push outbox is closed".to_owned()),
        }
        .inspect_err(|e| tracing::error!(error = %e, "cannot write the push outbox"))?;
        self.held.clear();
        if let Err(e) = self.acks.clear() {
            // Records left in the log are applied again at the next start, removing nothing
            // else: sequence numbers are not reused.
            tracing::warn!(error = %e, "cannot empty the push outbox's delivery log");
        }
        Ok(())
    }
}

/// Adds to `batch` what is queued, up to [`BATCH`] operations.
fn take_queued(batch: &mut Vec<Op>, rx: &mpsc::Receiver<Op>) {
    while batch.len() < BATCH {
        match rx.try_recv() {
            Ok(op) => batch.push(op),
            Err(_) => break,
        }
    }
}

/// Waits up to [`LINGER`] for the new entries of `batch` to be delivered, checking every
/// [`LINGER_STEP`]; returns at once for a batch without new entries or with a stop.
fn linger(batch: &mut Vec<Op>, rx: &mpsc::Receiver<Op>) {
    let until = Instant::now() + LINGER;
    loop {
        let puts = batch
            .iter()
            .filter(|op| matches!(op, Op::Put { .. }))
            .count();
        let stop = batch.iter().any(|op| matches!(op, Op::Stop(_)));
        if puts == 0
            || stop
            || batch.len() >= BATCH
            || Instant::now() >= until
            || unwritten(batch).len() == puts
        {
            return;
        }
        std::thread::sleep(LINGER_STEP);
        take_queued(batch, rx);
    }
}

/// The entries both put and removed in `batch`: delivered (or dropped) before their put was
/// committed, they never reach the file. While a commit's fsync runs, most messages of a busy
/// rule are put and delivered.
fn unwritten(batch: &[Op]) -> HashSet<(&str, u64)> {
    let mut put = HashSet::new();
    for op in batch {
        if let Op::Put { rule, seq, .. } = op {
            put.insert((&**rule, *seq));
        }
    }
    let mut both = HashSet::new();
    if put.is_empty() {
        return both;
    }
    for op in batch {
        if let Op::Delete { rule, seqs } = op {
            both.extend(
                seqs.iter()
                    .map(|seq| (&**rule, *seq))
                    .filter(|key| put.contains(key)),
            );
        }
    }
    both
}

/// One durable transaction: the puts and removals of `batch` but the `unwritten` entries, the
/// removals `held`, and each rule's next sequence number past its puts (the unwritten ones
/// too: their numbers are used up all the same).
fn commit(
    db: &Database,
    batch: &[Op],
    unwritten: &HashSet<(&str, u64)>,
    held: &[(Arc<str>, u64)],
) -> Result<(), String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut table = txn.open_table(TABLE).map_err(|e| e.to_string())?;
        let mut next: HashMap<&str, u64> = HashMap::new();
        for (rule, seq) in held {
            table.remove((&**rule, *seq)).map_err(|e| e.to_string())?;
        }
        for op in batch {
            match op {
                Op::Put {
                    rule, seq, record, ..
                } => {
                    let key = (&**rule, *seq);
                    if !unwritten.contains(&key) {
                        table
                            .insert(key, record.as_slice())
                            .map_err(|e| e.to_string())?;
                    }
                    let past = next.entry(rule).or_default();
                    *past = (*past).max(seq + 1);
                }
                Op::Delete { rule, seqs } => {
                    for seq in seqs {
                        let key = (&**rule, *seq);
                        if !unwritten.contains(&key) {
                            table.remove(key).map_err(|e| e.to_string())?;
                        }
                    }
                }
                Op::Stop(_) => {}
            }
        }
        if !next.is_empty() {
            let mut floors = txn.open_table(NEXT).map_err(|e| e.to_string())?;
            for (rule, past) in next {
                let known = floors
                    .get(rule)
                    .map_err(|e| e.to_string())?
                    .map_or(0, |v| v.value());
                if past > known {
                    floors.insert(rule, past).map_err(|e| e.to_string())?;
                }
            }
        }
    }
    txn.commit().map_err(|e| e.to_string())
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

    #[test]
    fn an_entry_put_and_removed_in_one_batch_leaves_nothing_and_its_number_stays_used() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("outbox.redb")).unwrap();
        let (first, _) = put(0);
        let (second, _) = put(1);
        let (third, _) = put(2);
        let delete = |seqs: Vec<u64>| Op::Delete {
            rule: Arc::from("r"),
            seqs,
        };
        let write = |batch: &[Op]| commit(&db, batch, &unwritten(batch), &[]).unwrap();
        write(&[first]);
        // Entry 0 was committed before: its removal reaches the file; entry 1 never does.
        write(&[second, third, delete(vec![0, 1])]);
        let stored = scan(&db, |_| 10).unwrap().remove("r").unwrap();
        let held: Vec<u64> = stored.held.iter().map(|e| e.seq).collect();
        assert_eq!(held, [2]);
        assert_eq!(stored.next_seq, 3);
        // The last entry given, removed with its put, still moves the next number on.
        let (fourth, _) = put(3);
        write(&[fourth, delete(vec![2, 3])]);
        let stored = scan(&db, |_| 10).unwrap().remove("r").unwrap();
        assert!(stored.held.is_empty());
        assert_eq!(stored.next_seq, 4);
    }

    #[test]
    fn a_batch_whose_new_entries_were_all_delivered_needs_no_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (acks, _) = Acks::open(&dir.path().join("outbox.acks")).unwrap();
        let mut writer = Writer::new(acks);
        let delete = |seqs: Vec<u64>| Op::Delete {
            rule: Arc::from("r"),
            seqs,
        };
        let (put5, _) = put(5);
        let (put6, _) = put(6);
        // Entry 4 was committed earlier; 5 and 6 were delivered before any commit.
        let batch = [put5, delete(vec![4, 5]), put6, delete(vec![6])];
        let skipped = unwritten(&batch);
        assert_eq!(skipped.len(), 2);
        assert!(writer.hold(&batch, &skipped));
        assert_eq!(writer.held, [(Arc::from("r"), 4)]);
        // An entry still waiting for its delivery must be committed.
        let (put7, _) = put(7);
        let batch = [put7, delete(vec![3])];
        assert!(!writer.hold(&batch, &unwritten(&batch)));
        let (_, logged) = Acks::open(&dir.path().join("outbox.acks")).unwrap();
        assert_eq!(logged, [("r".to_owned(), 4)]);
    }
}
