//! Raw MQTT packets for tests that speak the protocol byte by byte: builders for what a client
//! sends, and a reader of what the server answered.

/// The protocol version a packet is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    V311,
    V5,
}

/// How a case names the version.
pub(crate) fn label(version: Version) -> &'static str {
    match version {
        Version::V311 => "MQTT 3.1.1",
        Version::V5 => "MQTT 5",
    }
}

/// A variable byte integer (remaining length, property length).
pub(crate) fn varint(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return out;
        }
    }
}

/// A packet: first byte, remaining length, body.
pub(crate) fn packet(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![byte1];
    out.extend(varint(body.len()));
    out.extend_from_slice(body);
    out
}

/// A length-prefixed string or binary field.
pub(crate) fn string(s: &[u8]) -> Vec<u8> {
    let mut out = u16::try_from(s.len()).unwrap().to_be_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

/// Properties of an MQTT 5 packet: the length, then the properties.
pub(crate) fn props(version: Version, raw: &[u8]) -> Vec<u8> {
    match version {
        Version::V311 => Vec::new(),
        Version::V5 => {
            let mut out = varint(raw.len());
            out.extend_from_slice(raw);
            out
        }
    }
}

/// The protocol level byte of `version`.
pub(crate) fn level(version: Version) -> u8 {
    match version {
        Version::V311 => 4,
        Version::V5 => 5,
    }
}

/// A CONNECT with any protocol name, level and flags; `rest` follows the client id (will,
/// user name, password as the flags announce).
pub(crate) fn connect_raw(
    name: &[u8],
    level: u8,
    flags: u8,
    client_id: &[u8],
    rest: &[u8],
) -> Vec<u8> {
    let mut body = string(name);
    body.push(level);
    body.push(flags);
    body.extend_from_slice(&60u16.to_be_bytes());
    if level == 5 {
        body.push(0);
    }
    body.extend(string(client_id));
    body.extend_from_slice(rest);
    packet(0x10, &body)
}

/// A CONNECT named `MQTT` at the level of `version`.
pub(crate) fn connect(version: Version, flags: u8, client_id: &[u8], rest: &[u8]) -> Vec<u8> {
    connect_raw(b"MQTT", level(version), flags, client_id, rest)
}

/// A PUBLISH without properties; `byte1` carries the flags under test.
pub(crate) fn publish(
    version: Version,
    byte1: u8,
    topic: &[u8],
    pkid: Option<u16>,
    payload: &[u8],
) -> Vec<u8> {
    publish_with(version, byte1, topic, pkid, &[], payload)
}

/// A PUBLISH with raw MQTT 5 properties.
pub(crate) fn publish_with(
    version: Version,
    byte1: u8,
    topic: &[u8],
    pkid: Option<u16>,
    raw_props: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut body = string(topic);
    if let Some(id) = pkid {
        body.extend_from_slice(&id.to_be_bytes());
    }
    body.extend(props(version, raw_props));
    body.extend_from_slice(payload);
    packet(byte1, &body)
}

/// A SUBSCRIBE (packet id 1) of `filters` at QoS 0.
pub(crate) fn subscribe(version: Version, byte1: u8, filters: &[&[u8]]) -> Vec<u8> {
    let mut body = 1u16.to_be_bytes().to_vec();
    body.extend(props(version, &[]));
    for f in filters {
        body.extend(string(f));
        body.push(0);
    }
    packet(byte1, &body)
}

/// An UNSUBSCRIBE (packet id 1) of `filters`.
pub(crate) fn unsubscribe(version: Version, byte1: u8, filters: &[&[u8]]) -> Vec<u8> {
    let mut body = 1u16.to_be_bytes().to_vec();
    body.extend(props(version, &[]));
    for f in filters {
        body.extend(string(f));
    }
    packet(byte1, &body)
}

// --- what the server sent ------------------------------------------------------------------

/// What a server packet says, for the assertions.
#[derive(Debug)]
pub(crate) enum Reply {
    /// CONNACK with this return (3.1.1) or reason (5) code.
    ConnAck(u8),
    /// DISCONNECT with this reason code (0 when absent).
    Disconnect(u8),
    /// Anything else.
    Other,
}

/// Splits what the server sent into packets; a truncated tail counts as one more packet.
pub(crate) fn replies(mut bytes: &[u8]) -> Vec<Reply> {
    let mut out = Vec::new();
    while let Some(&byte1) = bytes.first() {
        let mut len = 0usize;
        let mut at = 1;
        let mut shift = 0;
        while let Some(&b) = bytes.get(at) {
            len |= usize::from(b & 0x7F) << shift;
            shift += 7;
            at += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        let body = bytes.get(at..at + len).unwrap_or(&[]);
        out.push(match byte1 {
            0x20 => Reply::ConnAck(body.get(1).copied().unwrap_or(0xFF)),
            0xE0 => Reply::Disconnect(body.first().copied().unwrap_or(0)),
            _ => Reply::Other,
        });
        bytes = bytes.get(at + len..).unwrap_or(&[]);
    }
    out
}
