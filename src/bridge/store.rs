//! The gateway's retained store: a topic trie holding the last retained message of each topic.
//! It is the only retained store (the broker keeps none); with a journal, every change is also
//! written to disk and the trie is rebuilt from it at start.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::SystemTime;

use super::journal::{Durable, Journal};
use super::message::Message;
use crate::topic::{Topic, TopicFilter};

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    value: Option<Arc<Message>>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.value.is_none() && self.children.is_empty()
    }

    /// Removes the value at `levels`, pruning nodes left empty; returns the removed value.
    fn remove(&mut self, levels: &[&str]) -> Option<Arc<Message>> {
        let Some((first, rest)) = levels.split_first() else {
            return self.value.take();
        };
        let child = self.children.get_mut(*first)?;
        let removed = child.remove(rest);
        if child.is_empty() {
            self.children.remove(*first);
        }
        removed
    }

    fn collect(&self, filter: &[&str], depth: usize, out: &mut Vec<Arc<Message>>) {
        let Some((first, rest)) = filter.split_first() else {
            out.extend(self.value.iter().cloned());
            return;
        };
        // Wildcards at the first level do not match topics starting with '$'.
        let skip_dollar = depth == 0;
        match *first {
            "#" => {
                out.extend(self.value.iter().cloned());
                for (name, child) in &self.children {
                    if !(skip_dollar && name.starts_with('$')) {
                        child.collect_all(out);
                    }
                }
            }
            "+" => {
                for (name, child) in &self.children {
                    if !(skip_dollar && name.starts_with('$')) {
                        child.collect(rest, depth + 1, out);
                    }
                }
            }
            level => {
                if let Some(child) = self.children.get(level) {
                    child.collect(rest, depth + 1, out);
                }
            }
        }
    }

    fn collect_all(&self, out: &mut Vec<Arc<Message>>) {
        out.extend(self.value.iter().cloned());
        for child in self.children.values() {
            child.collect_all(out);
        }
    }
}

/// One page of a listing.
#[derive(Debug)]
pub struct Page {
    /// Messages sorted by topic.
    pub messages: Vec<Arc<Message>>,
    /// The topic to continue after, when more remain.
    pub next: Option<String>,
}

/// Retained messages by topic.
#[derive(Debug, Default)]
pub struct RetainedStore {
    root: RwLock<Node>,
    count: AtomicUsize,
    journal: Option<Journal>,
}

impl RetainedStore {
    /// An empty store, in memory only.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store backed by `journal`, holding the messages it loaded.
    pub fn durable(journal: Journal, messages: Vec<Message>) -> Self {
        let store = Self::new();
        for message in messages {
            store.insert(&Arc::new(message));
        }
        Self {
            journal: Some(journal),
            ..store
        }
    }

    /// Commits what the journal has queued and stops it; later changes stay in memory.
    pub async fn close(&self) -> Result<(), String> {
        match &self.journal {
            Some(journal) => journal.close().await,
            None => Ok(()),
        }
    }

    /// Applies a publish: a retained non-empty one replaces the topic's value, a retained empty
    /// one deletes it (MQTT 3.1.1 §3.3.1.3), a non-retained one changes nothing. Returns the
    /// receipt of the write to disk, when there is one.
    pub fn apply(&self, message: &Arc<Message>) -> Option<Durable> {
        if !message.retain {
            return None;
        }
        if message.payload.is_empty() {
            self.remove(&message.topic);
            return self.journal.as_ref().map(|j| j.delete(&message.topic));
        }
        self.insert(message);
        self.journal.as_ref().map(|j| j.put(message))
    }

    fn insert(&self, message: &Arc<Message>) {
        let mut root = self.root.write().unwrap_or_else(PoisonError::into_inner);
        let mut node = &mut *root;
        for level in message.topic.levels() {
            node = node.children.entry(level.into()).or_default();
        }
        if node.value.replace(message.clone()).is_none() {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Deletes the topic's value in memory; returns whether a live one was there.
    fn remove(&self, topic: &Topic) -> bool {
        let levels: Vec<&str> = topic.levels().collect();
        let mut root = self.root.write().unwrap_or_else(PoisonError::into_inner);
        let removed = root.remove(&levels);
        if removed.is_some() {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
        removed.is_some_and(|m| !m.is_expired(SystemTime::now()))
    }

    /// The live value of one topic.
    pub fn get(&self, topic: &Topic) -> Option<Arc<Message>> {
        let root = self.root.read().unwrap_or_else(PoisonError::into_inner);
        let mut node = &*root;
        for level in topic.levels() {
            node = node.children.get(level)?;
        }
        node.value
            .clone()
            .filter(|m| !m.is_expired(SystemTime::now()))
    }

    /// All live values matching `filter`, sorted by topic.
    pub fn matching(&self, filter: &TopicFilter) -> Vec<Arc<Message>> {
        let levels: Vec<&str> = filter.levels().collect();
        let mut out = Vec::new();
        {
            let root = self.root.read().unwrap_or_else(PoisonError::into_inner);
            root.collect(&levels, 0, &mut out);
        }
        let now = SystemTime::now();
        out.retain(|m| !m.is_expired(now));
        out.sort_unstable_by(|a, b| a.topic.cmp(&b.topic));
        out
    }

    /// Up to `limit` live values matching `filter` that `keep` keeps, with topics after
    /// `after`, sorted by topic.
    pub fn page(
        &self,
        filter: &TopicFilter,
        after: Option<&str>,
        limit: usize,
        keep: impl Fn(&Message) -> bool,
    ) -> Page {
        let mut all = self.matching(filter);
        all.retain(|m| keep(m));
        let start = after.map_or(0, |a| all.partition_point(|m| m.topic.as_str() <= a));
        let mut messages: Vec<_> = all.drain(start..).collect();
        let next = (messages.len() > limit).then(|| {
            messages.truncate(limit);
            messages
                .last()
                .map(|m| m.topic.to_string())
                .unwrap_or_default()
        });
        Page { messages, next }
    }

    /// Number of topics with a value, expired ones included until they are read or replaced.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Whether no topic has a value.
    pub fn is_empty(&self) -> bool {
        self.root
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::message::Origin;

    fn put(store: &RetainedStore, topic: &str, payload: &'static str, retain: bool) {
        let mut m = Message::new(Topic::parse(topic).unwrap(), payload, Origin::Mqtt);
        m.retain = retain;
        store.apply(&Arc::new(m));
    }

    fn topics(store: &RetainedStore, filter: &str) -> Vec<String> {
        store
            .matching(&TopicFilter::parse(filter).unwrap())
            .iter()
            .map(|m| m.topic.to_string())
            .collect()
    }

    #[test]
    fn only_an_empty_retained_publish_deletes() {
        let s = RetainedStore::new();
        put(&s, "a/b", "1", true);
        put(&s, "a/b", "", false);
        assert_eq!(topics(&s, "a/b"), ["a/b"]);
        put(&s, "a/b", "2", false);
        assert_eq!(
            &s.get(&Topic::parse("a/b").unwrap()).unwrap().payload[..],
            b"1"
        );
        put(&s, "a/b", "", true);
        assert!(s.is_empty());
    }

    #[test]
    fn wildcards_match_and_sort() {
        let s = RetainedStore::new();
        for t in [
            "home/temp",
            "home/hum",
            "home",
            "a//b",
            "office/temp",
            "home/x/y",
        ] {
            put(&s, t, "v", true);
        }
        assert_eq!(
            topics(&s, "home/#"),
            ["home", "home/hum", "home/temp", "home/x/y"]
        );
        assert_eq!(topics(&s, "+/temp"), ["home/temp", "office/temp"]);
        assert_eq!(topics(&s, "a/+/b"), ["a//b"]);
        assert_eq!(s.len(), 6);
    }

    #[test]
    fn pages_continue_after_the_cursor() {
        let s = RetainedStore::new();
        for t in ["t/1", "t/2", "t/3"] {
            put(&s, t, "v", true);
        }
        let f = TopicFilter::parse("t/#").unwrap();
        let p = s.page(&f, None, 2, |_| true);
        assert_eq!(p.messages.len(), 2);
        assert_eq!(p.next.as_deref(), Some("t/2"));
        let p = s.page(&f, p.next.as_deref(), 2, |_| true);
        assert_eq!(p.messages.len(), 1);
        assert_eq!(p.next, None);
    }
}
