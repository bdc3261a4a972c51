//! The retained store on disk: one redb table from topic to message, written by one thread that
//! commits whatever has queued up in one durable transaction (group commit), so many concurrent
//! publishes share one fsync. The queue keeps only the latest change of each topic, so it never
//! outgrows the store and every change is on disk within the commit after next. A caller that
//! must not answer before its value is durable waits for its [`Durable`] receipt.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redb::{Database, DatabaseError, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::message::{Message, Origin, Qos};
use crate::topic::Topic;

const TABLE: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("retained");
/// File name under the data dir.
const FILE: &str = "retained.redb";
/// Page cache of the database file.
const CACHE: usize = 16 * 1024 * 1024;
/// Format of a stored value: this byte, then the postcard encoding of [`Record`].
const VERSION: u8 = 1;

/// Why the store on disk cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The data dir cannot be created or read.
    #[error("cannot use data dir {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another process holds the database.
    #[error("{path} is in use by another topicgate process")]
    InUse {
        /// The database file.
        path: PathBuf,
    },
    /// The file cannot be opened or read; it is left as it is.
    #[error("cannot read the retained store {path} (left untouched): {detail}")]
    Unreadable {
        /// The database file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
}

/// A confirmation that a write reached the disk, or why it did not.
pub struct Durable(oneshot::Receiver<Result<(), String>>);

impl Durable {
    /// A receipt resolved through the returned sender, for another store's writer.
    pub fn pending() -> (oneshot::Sender<Result<(), String>>, Self) {
        let (tx, rx) = oneshot::channel();
        (tx, Self(rx))
    }

    /// Waits for the commit that carries the write.
    pub async fn wait(self) -> Result<(), String> {
        self.0
            .await
            .unwrap_or_else(|_| Err("the store writer stopped".to_owned()))
    }
}

type Ack = oneshot::Sender<Result<(), String>>;

/// Changes waiting for the writer: the latest record of each topic (`None` deletes) and who
/// waits for them. A newer change to a topic replaces the queued one, so the queue never holds
/// more than one entry per topic and one commit always covers it all.
#[derive(Default)]
struct Pending {
    changes: HashMap<Box<str>, Option<Vec<u8>>>,
    acks: Vec<Ack>,
    stop: Vec<Ack>,
    stopped: bool,
}

struct Queue {
    pending: Mutex<Pending>,
    ready: Condvar,
}

/// The writer's handle.
pub struct Journal {
    queue: Arc<Queue>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Journal")
    }
}

impl Journal {
    /// Opens (or creates) the store under `dir`, returning the writer and the live messages it
    /// holds; expired ones are deleted.
    pub fn open(dir: &Path) -> Result<(Self, Vec<Message>), JournalError> {
        std::fs::create_dir_all(dir).map_err(|source| JournalError::Dir {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(FILE);
        let unreadable = |detail: String| JournalError::Unreadable {
            path: path.clone(),
            detail,
        };
        // redb caches up to 1 GiB by default; the trie already holds every value in memory, so
        // the file needs little more than its write path.
        let db = match Database::builder().set_cache_size(CACHE).create(&path) {
            Ok(db) => db,
            Err(DatabaseError::DatabaseAlreadyOpen) => return Err(JournalError::InUse { path }),
            Err(e) => return Err(unreadable(e.to_string())),
        };
        let (messages, expired) = load(&db).map_err(unreadable)?;
        if !expired.is_empty() {
            remove(&db, &expired).map_err(unreadable)?;
        }
        let queue = Arc::new(Queue {
            pending: Mutex::new(Pending::default()),
            ready: Condvar::new(),
        });
        let writer = queue.clone();
        std::thread::Builder::new()
            .name("store-writer".to_owned())
            .spawn(move || {
                let stopped = write_loop(&db, &writer);
                // Closing the file releases its lock before the stop is confirmed, so a new
                // gateway on the same data dir can open it at once.
                drop(db);
                for ack in stopped {
                    let _ = ack.send(Ok(()));
                }
            })
            .map_err(|e| unreadable(e.to_string()))?;
        Ok((Self { queue }, messages))
    }

    /// Queues a retained value.
    pub fn put(&self, message: &Message) -> Durable {
        self.queue(message.topic.as_str(), Some(encode(message)))
    }

    /// Queues the deletion of a topic's value.
    pub fn delete(&self, topic: &Topic) -> Durable {
        self.queue(topic.as_str(), None)
    }

    fn queue(&self, topic: &str, record: Option<Vec<u8>>) -> Durable {
        let (ack, receipt) = oneshot::channel();
        let mut pending = self.lock();
        if pending.stopped {
            let _ = ack.send(Err("the store is closed".to_owned()));
        } else {
            pending.changes.insert(topic.into(), record);
            pending.acks.push(ack);
            self.queue.ready.notify_one();
        }
        Durable(receipt)
    }

    /// Commits everything queued, then stops the writer.
    pub async fn close(&self) -> Result<(), String> {
        let (ack, receipt) = oneshot::channel();
        {
            let mut pending = self.lock();
            if pending.stopped {
                return Ok(());
            }
            pending.stopped = true;
            pending.stop.push(ack);
            self.queue.ready.notify_one();
        }
        Durable(receipt).wait().await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.queue
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Commits what has queued up, one transaction at a time, until told to stop; returns the
/// acknowledgements of the stop requests.
fn write_loop(db: &Database, queue: &Queue) -> Vec<Ack> {
    loop {
        let batch = {
            let mut pending = queue.pending.lock().unwrap_or_else(PoisonError::into_inner);
            while pending.changes.is_empty() && pending.acks.is_empty() && !pending.stopped {
                pending = queue
                    .ready
                    .wait(pending)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            let batch = std::mem::take(&mut *pending);
            // Once stopped, later changes are refused, not queued for a writer that is gone.
            pending.stopped = batch.stopped;
            batch
        };
        let outcome = if batch.changes.is_empty() {
            Ok(())
        } else {
            commit(db, &batch.changes).map_err(|e| {
                tracing::error!(error = %e, "cannot write the retained store");
                e
            })
        };
        for ack in batch.acks {
            let _ = ack.send(outcome.clone());
        }
        if batch.stopped {
            return batch.stop;
        }
    }
}

fn commit(db: &Database, changes: &HashMap<Box<str>, Option<Vec<u8>>>) -> Result<(), String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut table = txn.open_table(TABLE).map_err(|e| e.to_string())?;
        for (topic, record) in changes {
            match record {
                Some(record) => {
                    table
                        .insert(&**topic, record.as_slice())
                        .map_err(|e| e.to_string())?;
                }
                None => {
                    table.remove(&**topic).map_err(|e| e.to_string())?;
                }
            }
        }
    }
    txn.commit().map_err(|e| e.to_string())
}

/// Every stored message, and the topics whose message has expired.
fn load(db: &Database) -> Result<(Vec<Message>, Vec<String>), String> {
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let table = match txn.open_table(TABLE) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok((Vec::new(), Vec::new())),
        Err(e) => return Err(e.to_string()),
    };
    let now = SystemTime::now();
    let (mut live, mut expired) = (Vec::new(), Vec::new());
    for entry in table.iter().map_err(|e| e.to_string())? {
        let (key, value) = entry.map_err(|e| e.to_string())?;
        let topic = key.value();
        let message = decode(topic, value.value())
            .ok_or_else(|| format!("the record of topic {topic:?} is not readable"))?;
        if message.is_expired(now) {
            expired.push(topic.to_owned());
        } else {
            live.push(message);
        }
    }
    Ok((live, expired))
}

fn remove(db: &Database, topics: &[String]) -> Result<(), String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut table = txn.open_table(TABLE).map_err(|e| e.to_string())?;
        for topic in topics {
            table.remove(topic.as_str()).map_err(|e| e.to_string())?;
        }
    }
    txn.commit().map_err(|e| e.to_string())
}

/// A message as stored; the topic is the key.
#[derive(Serialize, Deserialize)]
struct Record {
    payload: Vec<u8>,
    content_type: Option<String>,
    user_properties: Vec<(String, String)>,
    response_topic: Option<String>,
    correlation_data: Option<Vec<u8>>,
    qos: u8,
    expires_at_ms: Option<u64>,
    updated_at_ms: u64,
    origin: u8,
}

/// A time as stored on disk: milliseconds since the Unix epoch.
pub(crate) fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A time stored as [`millis`].
pub(crate) fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn encode(m: &Message) -> Vec<u8> {
    let record = Record {
        payload: m.payload.to_vec(),
        content_type: m.content_type.clone(),
        user_properties: m.user_properties.clone(),
        response_topic: m.response_topic.clone(),
        correlation_data: m.correlation_data.as_ref().map(|d| d.to_vec()),
        qos: m.qos.level(),
        expires_at_ms: m.expires_at.map(millis),
        updated_at_ms: millis(m.updated_at),
        origin: match m.origin {
            Origin::Mqtt => 0,
            Origin::Http => 1,
            Origin::Coap => 2,
            Origin::Broker => 3,
            Origin::Device => 4,
        },
    };
    let mut out = vec![VERSION];
    // Plain strings, bytes and integers always serialize.
    out.extend(postcard::to_stdvec(&record).unwrap_or_default());
    out
}

fn decode(topic: &str, bytes: &[u8]) -> Option<Message> {
    let (&VERSION, rest) = bytes.split_first()? else {
        return None;
    };
    let r: Record = postcard::from_bytes(rest).ok()?;
    let at = from_millis;
    Some(Message {
        topic: Topic::parse_any(topic).ok()?,
        payload: Bytes::from(r.payload),
        content_type: r.content_type,
        user_properties: r.user_properties,
        response_topic: r.response_topic,
        correlation_data: r.correlation_data.map(Bytes::from),
        qos: Qos::new(r.qos)?,
        retain: true,
        expires_at: r.expires_at_ms.map(at),
        updated_at: at(r.updated_at_ms),
        origin: match r.origin {
            0 => Origin::Mqtt,
            1 => Origin::Http,
            3 => Origin::Broker,
            4 => Origin::Device,
            _ => Origin::Coap,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queued_changes_coalesce_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, loaded) = Journal::open(dir.path()).unwrap();
        assert!(loaded.is_empty());
        let retained = |topic: &str, value: &'static str| {
            let mut m = Message::new(Topic::parse(topic).unwrap(), value, Origin::Http);
            m.retain = true;
            m
        };
        let receipts = [
            journal.put(&retained("a", "1")),
            journal.put(&retained("a", "2")),
            journal.put(&retained("b", "x")),
            journal.delete(&Topic::parse("b").unwrap()),
        ];
        for receipt in receipts {
            receipt.wait().await.unwrap();
        }
        journal.close().await.unwrap();
        assert!(journal.put(&retained("c", "late")).wait().await.is_err());
        let (_journal, loaded) = Journal::open(dir.path()).unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(
            (loaded[0].topic.as_str(), &loaded[0].payload[..]),
            ("a", &b"2"[..])
        );
    }

    #[test]
    fn records_round_trip_to_the_millisecond() {
        let mut m = Message::new(Topic::parse("a/b").unwrap(), "v", Origin::Coap);
        m.retain = true;
        m.content_type = Some("application/json".to_owned());
        m.user_properties = vec![("k".to_owned(), "v".to_owned())];
        m.correlation_data = Some(Bytes::from_static(b"\x00\x01"));
        m.qos = Qos::new(2).unwrap();
        m.updated_at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        m.expires_at = Some(m.updated_at + Duration::from_secs(60));
        assert_eq!(decode("a/b", &encode(&m)), Some(m));
        assert_eq!(decode("a/b", b"\x09junk"), None);
        assert_eq!(decode("a/b", b""), None);
    }
}
