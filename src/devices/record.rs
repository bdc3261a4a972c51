//! How the outbox stores a message: a version byte, then the postcard encoding of a
//! [`Record`], keyed by (rule, sequence number).

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::outbox::Entry;
use crate::bridge::{Message, Origin, Qos, Topic, from_millis, millis};

/// Format of a stored value: this byte, then the postcard encoding of [`Record`].
const VERSION: u8 = 1;

/// A message as the outbox stores it, as earlier versions wrote it field by field.
#[cfg(test)]
#[derive(Serialize)]
struct Record {
    topic: String,
    payload: Vec<u8>,
    content_type: Option<String>,
    user_properties: Vec<(String, String)>,
    response_topic: Option<String>,
    correlation_data: Option<Vec<u8>>,
    qos: u8,
    retain: bool,
    expires_at_ms: Option<u64>,
    updated_at_ms: u64,
    taken_at_ms: u64,
}

/// A message as the outbox stores it, borrowed from the message (to encode) or from the stored
/// bytes (to decode): no copy of every field on the way. Bytes are written as a sequence of
/// `u8`, which postcard encodes as it encodes bytes (a length, then the bytes), so they are read
/// back in one piece.
#[derive(Serialize, Deserialize)]
struct RecordRef<'a> {
    topic: &'a str,
    payload: &'a [u8],
    #[serde(borrow)]
    content_type: Option<&'a str>,
    #[serde(borrow)]
    user_properties: Cow<'a, [(String, String)]>,
    #[serde(borrow)]
    response_topic: Option<&'a str>,
    #[serde(borrow)]
    correlation_data: Option<&'a [u8]>,
    qos: u8,
    retain: bool,
    expires_at_ms: Option<u64>,
    updated_at_ms: u64,
    taken_at_ms: u64,
}

/// Room for a record's numbers, flags and length prefixes beside its strings and bytes.
const FIXED: usize = 64;

pub(crate) fn encode(entry: &Entry) -> Vec<u8> {
    let m = &entry.message;
    let record = RecordRef {
        topic: m.topic.as_str(),
        payload: &m.payload,
        content_type: m.content_type.as_deref(),
        user_properties: Cow::Borrowed(&m.user_properties),
        response_topic: m.response_topic.as_deref(),
        correlation_data: m.correlation_data.as_deref(),
        qos: m.qos.level(),
        retain: m.retain,
        expires_at_ms: m.expires_at.map(millis),
        updated_at_ms: millis(m.updated_at),
        taken_at_ms: millis(entry.taken_at),
    };
    let strings: usize = m
        .user_properties
        .iter()
        .map(|(k, v)| k.len() + v.len() + 4)
        .sum();
    let size = 1
        + FIXED
        + m.topic.as_str().len()
        + m.payload.len()
        + m.content_type.as_ref().map_or(0, String::len)
        + m.response_topic.as_ref().map_or(0, String::len)
        + m.correlation_data.as_ref().map_or(0, Bytes::len)
        + strings;
    let mut out = Vec::with_capacity(size);
    out.push(VERSION);
    // why: postcard into a Vec fails only on allocation failure, which aborts anyway.
    postcard::to_extend(&record, out).expect("a record encodes")
}

pub(crate) fn decode(seq: u64, bytes: &[u8]) -> Option<Entry> {
    let (&version, rest) = bytes.split_first()?;
    if version != VERSION {
        return None;
    }
    let r: RecordRef<'_> = postcard::from_bytes(rest).ok()?;
    let message = Message {
        topic: Topic::parse_any(r.topic).ok()?,
        payload: Bytes::copy_from_slice(r.payload),
        content_type: r.content_type.map(str::to_owned),
        user_properties: r.user_properties.into_owned(),
        response_topic: r.response_topic.map(str::to_owned),
        correlation_data: r.correlation_data.map(Bytes::copy_from_slice),
        qos: Qos::new(r.qos).unwrap_or_default(),
        retain: r.retain,
        expires_at: r.expires_at_ms.map(from_millis),
        updated_at: from_millis(r.updated_at_ms),
        origin: Origin::Mqtt,
    };
    Some(Entry {
        seq,
        message: Arc::new(message),
        taken_at: from_millis(r.taken_at_ms),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn a_record_keeps_the_message_and_when_it_was_taken() {
        let mut m = Message::new(
            Topic::parse("plugs/7").unwrap(),
            &b"\x00on"[..],
            Origin::Http,
        );
        m.content_type = Some("application/octet-stream".to_owned());
        m.user_properties = vec![("k".to_owned(), "v".to_owned())];
        m.response_topic = Some("me/answers".to_owned());
        m.correlation_data = Some(Bytes::from_static(b"c1"));
        m.qos = Qos::new(1).unwrap();
        m.expires_at = Some(UNIX_EPOCH + Duration::from_millis(4_000_000_000_000));
        let entry = Entry {
            seq: 9,
            message: Arc::new(m),
            taken_at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
        };
        let back = decode(9, &encode(&entry)).unwrap();
        assert_eq!(back.seq, 9);
        assert_eq!(back.taken_at, entry.taken_at);
        let (a, b) = (&*back.message, &*entry.message);
        assert_eq!(
            (&a.topic, &a.payload, &a.content_type, &a.user_properties),
            (&b.topic, &b.payload, &b.content_type, &b.user_properties)
        );
        assert_eq!(
            (&a.response_topic, &a.correlation_data, a.qos, a.expires_at),
            (&b.response_topic, &b.correlation_data, b.qos, b.expires_at)
        );
        // The same bytes as the owned record's encoding, which earlier versions wrote.
        let owned = Record {
            topic: a.topic.to_string(),
            payload: a.payload.to_vec(),
            content_type: a.content_type.clone(),
            user_properties: a.user_properties.clone(),
            response_topic: a.response_topic.clone(),
            correlation_data: a.correlation_data.as_ref().map(|d| d.to_vec()),
            qos: a.qos.level(),
            retain: a.retain,
            expires_at_ms: a.expires_at.map(millis),
            updated_at_ms: millis(a.updated_at),
            taken_at_ms: millis(back.taken_at),
        };
        let mut written = vec![VERSION];
        written.extend(postcard::to_allocvec(&owned).unwrap());
        assert_eq!(encode(&entry), written);
        // Another format version is not read as this one.
        let mut other = encode(&entry);
        other[0] = 2;
        assert!(decode(9, &other).is_none());
    }
}
