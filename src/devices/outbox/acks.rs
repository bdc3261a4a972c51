//! The outbox's delivery log (`outbox.acks`): the entries a rule is done with, appended with a
//! plain write and no fsync, so that removing an entry does not cost a database commit of its
//! own. A write reaches the kernel before the writer goes on, so the log outlives a killed
//! gateway; after a power cut its tail may be lost, and those entries are pushed again, which
//! at-least-once delivery allows. The writer moves what the log holds into the database with
//! its next durable commit and then empties the log; a gateway that starts applies what an
//! earlier one left.
//!
//! A record is the rule name's length (u16, little endian), the name, the sequence number
//! (u64, little endian) and a CRC-32 of those bytes; reading stops at the first record that does
//! not check. Sequence numbers are never reused (the database keeps each rule's next one), so a
//! record applied twice removes nothing else.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

/// The open log.
pub(super) struct Acks {
    file: File,
    /// Reused for the bytes of one append.
    buf: Vec<u8>,
}

impl Acks {
    /// Opens (or creates) the log at `path`; returns it with the records an earlier run left.
    pub(super) fn open(path: &Path) -> io::Result<(Self, Vec<(String, u64)>)> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let left = decode(&bytes);
        let acks = Self {
            file,
            buf: Vec::new(),
        };
        Ok((acks, left))
    }

    /// Appends one record per entry, in one write.
    pub(super) fn append(&mut self, entries: &[(Arc<str>, u64)]) -> io::Result<()> {
        self.buf.clear();
        for (rule, seq) in entries {
            encode(rule, *seq, &mut self.buf)?;
        }
        self.file.write_all(&self.buf)
    }

    /// Forgets every record: the database now holds what they said.
    pub(super) fn clear(&mut self) -> io::Result<()> {
        self.file.set_len(0)
    }

    /// [`Self::clear`], on disk before it returns: for the start, where the records of a run
    /// that is over were just applied.
    pub(super) fn clear_durably(&mut self) -> io::Result<()> {
        self.clear()?;
        self.file.sync_all()
    }
}

fn encode(rule: &str, seq: u64, out: &mut Vec<u8>) -> io::Result<()> {
    let len = u16::try_from(rule.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "rule name too long"))?;
    let start = out.len();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(rule.as_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// The records of `bytes` up to the first one that is cut short or does not check.
fn decode(mut bytes: &[u8]) -> Vec<(String, u64)> {
    let mut records = Vec::new();
    while let Some((record, rest)) = decode_one(bytes) {
        records.push(record);
        bytes = rest;
    }
    records
}

fn decode_one(bytes: &[u8]) -> Option<((String, u64), &[u8])> {
    let len = usize::from(u16::from_le_bytes(bytes.get(..2)?.try_into().ok()?));
    let body = bytes.get(..2 + len + 8)?;
    let crc = u32::from_le_bytes(bytes.get(body.len()..body.len() + 4)?.try_into().ok()?);
    if crc32fast::hash(body) != crc {
        return None;
    }
    let rule = std::str::from_utf8(&body[2..2 + len]).ok()?.to_owned();
    let seq = u64::from_le_bytes(body[2 + len..].try_into().ok()?);
    Some(((rule, seq), &bytes[body.len() + 4..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_come_back_until_the_first_that_does_not_check() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acks");
        let (mut acks, left) = Acks::open(&path).unwrap();
        assert!(left.is_empty());
        acks.append(&[(Arc::from("plugs"), 7), (Arc::from("lights"), u64::MAX)])
            .unwrap();
        acks.append(&[(Arc::from("plugs"), 9)]).unwrap();
        drop(acks);
        let (mut acks, left) = Acks::open(&path).unwrap();
        let want = |v: &[(&str, u64)]| -> Vec<(String, u64)> {
            v.iter().map(|(r, s)| ((*r).to_owned(), *s)).collect()
        };
        assert_eq!(
            left,
            want(&[("plugs", 7), ("lights", u64::MAX), ("plugs", 9)])
        );

        // A torn tail (a power cut) and a flipped byte both end the log where they are.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(
            Acks::open(&path).unwrap().1,
            want(&[("plugs", 7), ("lights", u64::MAX)])
        );
        bytes[2] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(Acks::open(&path).unwrap().1.is_empty());

        // Appends after a clear start the log again.
        acks.clear().unwrap();
        acks.append(&[(Arc::from("x"), 1)]).unwrap();
        assert_eq!(Acks::open(&path).unwrap().1, want(&[("x", 1)]));
    }
}
