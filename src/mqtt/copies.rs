//! One PUBLISH for a message that several of a client's subscriptions match. The router makes a
//! copy per matching subscription, all sharing the published payload's bytes; the session sends
//! the first and adds what the others would have said to it, as Mosquitto does.

use bytes::Bytes;
use bytestring::ByteString;
use rustc_hash::FxHashMap;

/// The router's deliveries in one batch of packets for a client, by message.
#[derive(Debug, Default)]
pub(super) struct Copies {
    sent: Vec<Sent>,
    /// The last of `sent` for each payload buffer.
    last: FxHashMap<(usize, usize), usize>,
}

#[derive(Debug)]
struct Sent {
    topic: ByteString,
    /// Where its PUBLISH is among the batch's packets.
    at: usize,
    /// The held subscriptions it goes out for.
    through: usize,
    more: Vec<usize>,
    /// The copy before it with the same payload buffer: another message published with the
    /// same bytes.
    prev: Option<usize>,
}

/// A delivery already in the batch that a later copy may join.
pub(super) struct Earlier {
    slot: usize,
    /// Where its PUBLISH is among the batch's packets.
    pub(super) at: usize,
}

fn key(payload: &Bytes) -> (usize, usize) {
    (payload.as_ptr() as usize, payload.len())
}

impl Copies {
    /// Forgets the batch, once its packets are written.
    pub(super) fn clear(&mut self) {
        self.sent.clear();
        self.last.clear();
    }

    /// Notes that the PUBLISH at `at` in the batch carries `payload` on `topic` for the held
    /// subscription `through`.
    pub(super) fn note(&mut self, payload: &Bytes, topic: ByteString, at: usize, through: usize) {
        let slot = self.sent.len();
        let prev = self.last.insert(key(payload), slot);
        self.sent.push(Sent {
            topic,
            at,
            through,
            more: Vec::new(),
            prev,
        });
    }

    /// The batch's delivery of the same message (same payload bytes and topic) that does not
    /// go out for `held` yet.
    pub(super) fn earlier(&self, payload: &Bytes, topic: &str, held: usize) -> Option<Earlier> {
        let mut slot = self.last.get(&key(payload)).copied();
        while let Some(s) = slot {
            let sent = &self.sent[s];
            let has = sent.through == held || sent.more.contains(&held);
            if sent.topic == topic && !has {
                return Some(Earlier {
                    slot: s,
                    at: sent.at,
                });
            }
            slot = sent.prev;
        }
        None
    }

    /// Records that `earlier` now goes out for `held` as well.
    pub(super) fn join(&mut self, earlier: &Earlier, held: usize) {
        self.sent[earlier.slot].more.push(held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_found_by_their_bytes_topic_and_subscription() {
        let mut copies = Copies::default();
        let (m, other) = (Bytes::from_static(b"m"), Bytes::from(vec![b'm']));
        let topic = ByteString::from_static("a/b");
        copies.note(&m, topic.clone(), 0, 1);
        copies.note(&other, topic.clone(), 1, 1);
        // Equal bytes in another buffer are another message.
        let found = copies.earlier(&m.slice(..), "a/b", 2).unwrap();
        assert_eq!(found.at, 0);
        assert!(copies.earlier(&m, "a/c", 2).is_none());
        assert!(
            copies.earlier(&m, "a/b", 1).is_none(),
            "the same subscription"
        );
        copies.join(&found, 2);
        assert!(copies.earlier(&m, "a/b", 2).is_none());
        // The same bytes published again: the second message is joined in turn.
        copies.note(&m, topic.clone(), 2, 1);
        assert_eq!(copies.earlier(&m, "a/b", 3).unwrap().at, 2);
        copies.clear();
        assert!(copies.earlier(&m, "a/b", 3).is_none());
    }
}
