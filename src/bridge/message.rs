//! A message as the gateway holds it, whatever protocol it came from, and its JSON envelope.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::Serialize;
use utoipa::ToSchema;

use crate::topic::Topic;

/// The protocol a message was published with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// An MQTT client.
    Mqtt,
    /// An HTTP request.
    Http,
    /// A CoAP request.
    Coap,
    /// The broker itself: its `$SYS` figures.
    Broker,
    /// A device the gateway called: a pulled value, a pushed message's answer, a dead letter.
    Device,
}

impl Origin {
    /// Lower-case label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Origin::Mqtt => "mqtt",
            Origin::Http => "http",
            Origin::Coap => "coap",
            Origin::Broker => "broker",
            Origin::Device => "device",
        }
    }
}

/// MQTT quality of service, 0 to 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Qos(u8);

impl Qos {
    /// `Some` for 0, 1 and 2.
    pub fn new(level: u8) -> Option<Self> {
        (level <= 2).then_some(Self(level))
    }
    /// The level as a number.
    pub fn level(self) -> u8 {
        self.0
    }
}

/// One published message with its MQTT 5 metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Where it was published.
    pub topic: Topic,
    /// The raw payload.
    pub payload: Bytes,
    /// Content type (MQTT 5 content type, HTTP Content-Type).
    pub content_type: Option<String>,
    /// MQTT 5 user properties, in order.
    pub user_properties: Vec<(String, String)>,
    /// MQTT 5 response topic.
    pub response_topic: Option<String>,
    /// MQTT 5 correlation data.
    pub correlation_data: Option<Bytes>,
    /// QoS the publisher asked for.
    pub qos: Qos,
    /// Whether the publisher asked the broker to retain it.
    pub retain: bool,
    /// When it stops being retained or delivered (MQTT 5 message expiry).
    pub expires_at: Option<SystemTime>,
    /// When the gateway received it.
    pub updated_at: SystemTime,
    /// The protocol it came from.
    pub origin: Origin,
}

impl Message {
    /// A plain message published now, without metadata.
    pub fn new(topic: Topic, payload: impl Into<Bytes>, origin: Origin) -> Self {
        Self {
            topic,
            payload: payload.into(),
            content_type: None,
            user_properties: Vec::new(),
            response_topic: None,
            correlation_data: None,
            qos: Qos::default(),
            retain: false,
            expires_at: None,
            updated_at: SystemTime::now(),
            origin,
        }
    }

    /// What the message holds in memory beyond its fixed fields: topic, payload and metadata,
    /// for bounds on how many bytes of messages are kept.
    pub fn weight(&self) -> usize {
        let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        self.topic.as_str().len()
            + self.payload.len()
            + text(&self.content_type)
            + text(&self.response_topic)
            + self.correlation_data.as_ref().map_or(0, Bytes::len)
            + self
                .user_properties
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }

    /// Whether the message has expired at `now`.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// Seconds left before expiry, rounded up, as MQTT 5 expects when forwarding.
    pub fn remaining_expiry(&self, now: SystemTime) -> Option<u32> {
        self.expires_at.map(|at| {
            let left = at.duration_since(now).unwrap_or(Duration::ZERO);
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            u32::try_from(secs).unwrap_or(u32::MAX)
        })
    }

    /// A strong validator of payload and content type, as an HTTP `ETag`.
    pub fn etag(&self) -> String {
        format!("\"{:016x}\"", self.validator())
    }

    /// A strong validator of payload and content type; the CoAP ETag is its 8 bytes.
    pub fn validator(&self) -> u64 {
        let ct = self.content_type.as_deref().unwrap_or("").as_bytes();
        fnv1a(self.payload.iter().chain(&[0u8]).chain(ct))
    }

    /// The envelope as one line of JSON, as event streams carry it.
    pub fn envelope_json(&self, now: SystemTime) -> String {
        // why: an Envelope holds only strings, numbers and lists, which always serialize.
        serde_json::to_string(&self.envelope(now)).expect("an envelope serializes")
    }

    /// The JSON form shared by wildcard GET and event streams.
    pub fn envelope(&self, now: SystemTime) -> Envelope {
        let textual = self.content_type.as_deref().is_none_or(is_textual);
        let (payload, payload_encoding) = match std::str::from_utf8(&self.payload) {
            Ok(text) if textual => (text.to_owned(), PayloadEncoding::Utf8),
            _ => (BASE64.encode(&self.payload), PayloadEncoding::Base64),
        };
        Envelope {
            topic: self.topic.to_string(),
            payload,
            payload_encoding,
            content_type: self.content_type.clone(),
            qos: self.qos.level(),
            retain: self.retain,
            updated_at: humantime::format_rfc3339_millis(self.updated_at).to_string(),
            properties: Properties {
                user_properties: self
                    .user_properties
                    .iter()
                    .map(|(name, value)| UserProperty {
                        name: name.clone(),
                        value: value.clone(),
                    })
                    .collect(),
                response_topic: self.response_topic.clone(),
                correlation_data: self.correlation_data.as_ref().map(|d| BASE64.encode(d)),
                message_expiry_interval: self.remaining_expiry(now),
            },
        }
    }
}

/// FNV-1a: stable across processes and releases, unlike std's hasher.
pub fn fnv1a<'a>(bytes: impl IntoIterator<Item = &'a u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Whether a content type denotes text, so that a UTF-8 payload can be shown as is.
pub fn is_textual(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence.starts_with("text/")
        || essence == "application/json"
        || essence == "application/xml"
        || essence == "application/link-format"
        || essence.ends_with("+json")
        || essence.ends_with("+xml")
}

/// How `payload` is written in an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PayloadEncoding {
    /// The payload is the text itself.
    Utf8,
    /// The payload is standard base64 of the bytes.
    Base64,
}

/// A message as JSON.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Envelope {
    /// Topic name.
    pub topic: String,
    /// The payload, as text or base64 per `payload_encoding`.
    pub payload: String,
    /// `utf8` for textual UTF-8 payloads, else `base64`.
    pub payload_encoding: PayloadEncoding,
    /// Content type, when the publisher gave one.
    pub content_type: Option<String>,
    /// QoS of the publish.
    pub qos: u8,
    /// Whether the message was published retained.
    pub retain: bool,
    /// When the gateway received it (RFC 3339).
    pub updated_at: String,
    /// MQTT 5 properties.
    pub properties: Properties,
}

/// A page of retained messages as JSON, the body of a wildcard read on every protocol.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Listing {
    /// Messages sorted by topic.
    pub messages: Vec<Envelope>,
    /// Pass as `cursor` to get the next page; null on the last one.
    pub next: Option<String>,
}

impl Listing {
    /// The JSON form of a page, with expiry counted from `now`.
    pub fn new(messages: &[Arc<Message>], next: Option<String>, now: SystemTime) -> Self {
        Self {
            messages: messages.iter().map(|m| m.envelope(now)).collect(),
            next,
        }
    }
}

/// MQTT 5 properties of a message.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Properties {
    /// User properties, in order; names may repeat.
    pub user_properties: Vec<UserProperty>,
    /// Response topic.
    pub response_topic: Option<String>,
    /// Correlation data, base64.
    pub correlation_data: Option<String>,
    /// Seconds left before the message expires.
    pub message_expiry_interval: Option<u32>,
}

/// One MQTT 5 user property.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UserProperty {
    /// Property name.
    pub name: String,
    /// Property value.
    pub value: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(payload: &'static [u8], ct: Option<&str>) -> Message {
        let mut m = Message::new(Topic::parse("t").unwrap(), payload, Origin::Http);
        m.content_type = ct.map(str::to_owned);
        m
    }

    #[test]
    fn payload_encoding_is_never_ambiguous() {
        let now = SystemTime::now();
        let e = msg(b"21.5", None).envelope(now);
        assert_eq!(
            (e.payload.as_str(), e.payload_encoding),
            ("21.5", PayloadEncoding::Utf8)
        );
        let e = msg(b"{}", Some("application/json; charset=utf-8")).envelope(now);
        assert_eq!(e.payload_encoding, PayloadEncoding::Utf8);
        let e = msg(b"abc", Some("application/octet-stream")).envelope(now);
        assert_eq!(
            (e.payload.as_str(), e.payload_encoding),
            ("YWJj", PayloadEncoding::Base64)
        );
        let e = msg(&[0xff, 0x00], None).envelope(now);
        assert_eq!(e.payload_encoding, PayloadEncoding::Base64);
    }

    #[test]
    fn etag_depends_on_payload_and_type() {
        assert_eq!(msg(b"a", None).etag(), msg(b"a", None).etag());
        assert_ne!(msg(b"a", None).etag(), msg(b"b", None).etag());
        assert_ne!(msg(b"a", None).etag(), msg(b"a", Some("text/plain")).etag());
    }

    #[test]
    fn expiry_counts_down_and_rounds_up() {
        let now = SystemTime::now();
        let mut m = msg(b"x", None);
        m.expires_at = Some(now + Duration::from_millis(1500));
        assert_eq!(m.remaining_expiry(now), Some(2));
        assert!(!m.is_expired(now));
        assert!(m.is_expired(now + Duration::from_secs(2)));
    }
}
