//! The push outbox: one bounded queue per push rule, durable in `outbox.redb` under the data dir
//! (`disk.rs`) before the publisher is answered, with only a window of each queue held in memory
//! (`lane.rs`); an entry leaves the disk when its rule is done with it, through the delivery log
//! (`acks.rs`).

mod acks;
mod disk;
mod lane;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub(crate) use self::lane::{Bound, Entry, Lane, MIN_WINDOW};

use self::disk::Disk;
use crate::bridge::{Durable, Message, TopicFilter};
use crate::policy::Readable;

/// File name under the data dir.
const FILE: &str = "outbox.redb";

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

/// The outbox of every push rule.
pub(crate) struct Outbox {
    lanes: Vec<Arc<Lane>>,
    disk: Arc<Disk>,
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
        std::fs::create_dir_all(dir).map_err(|e| OutboxError::Unreadable {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        let windows: HashMap<&str, usize> = rules
            .iter()
            .map(|(name, _, _, bound)| (&**name, bound.window))
            .collect();
        // A rule no longer configured is only counted.
        let window = |rule: &str| windows.get(rule).copied().unwrap_or(0);
        let (disk, mut stored) = Disk::open(&path, window)?;
        let disk = Arc::new(disk);
        let lanes = rules
            .into_iter()
            .map(|rule| {
                let left = stored.remove(&*rule.0).unwrap_or_default();
                Arc::new(Lane::new(rule, disk.clone(), left))
            })
            .collect();
        // A rule whose queue is empty is remembered only by its next sequence number.
        for (rule, left) in stored.iter().filter(|(_, left)| left.spilled > 0) {
            tracing::warn!(
                rule = %rule,
                messages = left.spilled,
                "the outbox holds messages of a push rule that is no longer configured; they are kept"
            );
        }
        Ok(Self { lanes, disk })
    }

    /// The queue of each rule, in the order the rules were given.
    pub(crate) fn lanes(&self) -> &[Arc<Lane>] {
        &self.lanes
    }

    /// Forgets delivered or dead-lettered entries of `lane`, in memory and then on disk (one
    /// write for them all).
    #[cfg(test)]
    pub(crate) fn remove(&self, lane: &Lane, seqs: &[u64]) {
        lane.remove(seqs);
        lane.erase(seqs.to_vec());
    }

    /// Commits everything queued, then closes the file.
    pub(crate) async fn close(&self) {
        self.disk.close().await;
    }

    /// Takes `message` into the queue of every rule that matches it; the receipt resolves
    /// once they are on disk.
    pub(crate) fn offer(&self, message: &Arc<Message>) -> Option<Durable> {
        let mut last = None;
        for lane in &self.lanes {
            if lane.filter.matches(&message.topic) {
                // One commit carries every earlier put: the last receipt covers them all.
                last = take(lane, message).or(last);
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
        take(lane, message)
    }
}

/// Queues `message` in `lane` if the rule's principal may read it.
fn take(lane: &Lane, message: &Arc<Message>) -> Option<Durable> {
    if !lane.scope.admits(message.topic.as_str()) {
        return None;
    }
    lane.take(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::{Origin, Topic};
    use crate::config::WhenFull;
    use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
    use std::time::Duration;

    fn bound(max_queued: usize, when_full: WhenFull) -> Bound {
        Bound {
            max_queued,
            when_full,
            window: MIN_WINDOW,
            overflow: Counter::default(),
            depth: Gauge::default(),
        }
    }

    /// A rule as [`Outbox::open`] takes it, whose principal may read everything.
    fn rule(name: &str, filter: &str, bound: Bound) -> (Arc<str>, TopicFilter, Readable, Bound) {
        (
            Arc::from(name),
            TopicFilter::parse(filter).unwrap(),
            Readable::All,
            bound,
        )
    }

    fn message(topic: &str, payload: impl Into<bytes::Bytes>) -> Arc<Message> {
        Arc::new(Message::new(
            Topic::parse(topic).unwrap(),
            payload,
            Origin::Http,
        ))
    }

    #[tokio::test]
    async fn entries_survive_a_reopen_in_order_and_leave_when_removed() {
        let dir = tempfile::tempdir().unwrap();
        let rules = || vec![rule("plugs", "plugs/#", bound(10, WhenFull::DropOldest))];
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
        outbox.remove(&lane, &[first.seq]);
        outbox.close().await;
        let outbox = Outbox::open(dir.path(), rules()).unwrap();
        let lane = outbox.lanes()[0].clone();
        assert_eq!(lane.held(), ["2", "3"]);
        // New entries continue the sequence after the stored ones.
        outbox
            .offer(&message("plugs/b", "4"))
            .unwrap()
            .wait()
            .await
            .unwrap();
        let mut seqs = Vec::new();
        for _ in 0..3 {
            let entry = lane.next(1).await;
            outbox.remove(&lane, &[entry.seq]);
            seqs.push(entry.seq);
        }
        assert_eq!(seqs, [1, 2, 3]);
        outbox.close().await;
    }

    #[tokio::test]
    async fn the_bound_drops_the_oldest_waiting_or_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(
            dir.path(),
            vec![
                rule("drop", "t", bound(2, WhenFull::DropOldest)),
                rule("refuse", "t", bound(2, WhenFull::Refuse)),
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
        assert_eq!(drop.held(), ["1", "3"]);
        assert_eq!(refuse.held(), ["1", "2"]);
        assert_eq!(drop.bound.overflow.get(), 1);
        assert_eq!(refuse.bound.overflow.get(), 1);
        outbox.close().await;
    }

    #[tokio::test]
    async fn entries_go_out_at_once_for_different_topics_and_in_order_for_one() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(
            dir.path(),
            vec![rule("all", "#", bound(10, WhenFull::Refuse))],
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
        outbox.remove(&lane, &[b1.seq]);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), lane.next(3))
                .await
                .is_err()
        );
        outbox.remove(&lane, &[a1.seq]);
        assert_eq!(lane.next(3).await.message.payload, "a2");
        outbox.close().await;
    }

    /// A queue far longer than the window (an endpoint down) holds the window in memory and
    /// the rest on disk, and still goes out whole and in order, across a restart too.
    #[tokio::test]
    async fn only_a_window_of_a_long_queue_is_held_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let rules = |max_queued| vec![rule("dead", "t/+", bound(max_queued, WhenFull::DropOldest))];
        let outbox = Outbox::open(dir.path(), rules(3000)).unwrap();
        let lane = outbox.lanes()[0].clone();
        let mut last = None;
        for n in 0..4000 {
            last = outbox.offer(&message(&format!("t/{}", n % 7), n.to_string()));
        }
        last.unwrap().wait().await.unwrap();
        // The bound dropped the 1,000 oldest: the window's, and then from disk.
        assert_eq!(lane.depth(), 3000);
        assert!(lane.held().is_empty());
        assert_eq!(
            lane.in_memory(),
            0,
            "committed entries beyond the window stay on disk only"
        );
        let mut sent = Vec::new();
        for _ in 0..1000 {
            let entry = lane.next(1).await;
            outbox.remove(&lane, &[entry.seq]);
            sent.push(entry.message.payload.clone());
            assert!(lane.in_memory() <= MIN_WINDOW);
        }
        outbox.close().await;
        let outbox = Outbox::open(dir.path(), rules(3000)).unwrap();
        let lane = outbox.lanes()[0].clone();
        assert_eq!((lane.depth(), lane.held().len()), (2000, MIN_WINDOW));
        for _ in 0..2000 {
            let entry = lane.next(1).await;
            outbox.remove(&lane, &[entry.seq]);
            sent.push(entry.message.payload.clone());
        }
        let expected: Vec<String> = (1000..4000).map(|n| n.to_string()).collect();
        assert_eq!(sent, expected);
        assert_eq!(lane.depth(), 0);
        outbox.close().await;
    }

    /// Removals written to the delivery log by a gateway that was killed before it committed
    /// them are applied at the next start; sequence numbers go on past every entry ever given,
    /// even once the queue was empty, so the log can never name a later entry.
    #[tokio::test]
    async fn a_killed_gateway_s_delivery_log_is_applied_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let rules = || vec![rule("plugs", "plugs/+", bound(100, WhenFull::Refuse))];
        let outbox = Outbox::open(dir.path(), rules()).unwrap();
        let mut last = None;
        for n in 0..5 {
            last = outbox.offer(&message(&format!("plugs/{n}"), n.to_string()));
        }
        last.unwrap().wait().await.unwrap();
        outbox.close().await;
        // What a gateway killed after delivering entries 0, 1 and 3 leaves behind.
        let (mut log, left) = acks::Acks::open(&dir.path().join("outbox.acks")).unwrap();
        assert!(left.is_empty());
        log.append(&[(Arc::from("plugs"), 0), (Arc::from("plugs"), 1)])
            .unwrap();
        log.append(&[(Arc::from("plugs"), 3)]).unwrap();
        drop(log);

        let outbox = Outbox::open(dir.path(), rules()).unwrap();
        let lane = outbox.lanes()[0].clone();
        assert_eq!(lane.held(), ["2", "4"]);
        for _ in 0..2 {
            let entry = lane.next(2).await;
            outbox.remove(&lane, &[entry.seq]);
        }
        outbox.close().await;
        let outbox = Outbox::open(dir.path(), rules()).unwrap();
        let lane = outbox.lanes()[0].clone();
        assert_eq!(lane.depth(), 0);
        outbox
            .offer(&message("plugs/9", "9"))
            .unwrap()
            .wait()
            .await
            .unwrap();
        assert_eq!(lane.next(1).await.seq, 5, "a number is never given twice");
        outbox.close().await;
        assert_eq!(
            std::fs::metadata(dir.path().join("outbox.acks"))
                .unwrap()
                .len(),
            0,
            "a closed outbox leaves its log empty"
        );
    }
}
