//! The MQTT codec every client connection goes through: picks MQTT 3.1.1 or 5 from the CONNECT
//! packet (other levels get CONNACK 0x01), and corrects rumqttd where it departs from the
//! specification (retained messages, empty publishes, keep-alive 0, properties sent to 3.1.1
//! clients, Retain As Published).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{
    Connect, ConnectReturnCode, DisconnectReasonCode, Error, LastWillProperties, Packet, PingReq,
    Protocol, Publish, RetainForwardRule, SubscribeReasonCode,
};

use super::guard::{Guard, Verdict, split_share};

/// An inbound packet, passed on to the router or refused.
// Passing is the common case, and boxing the packet would cost an allocation for each.
#[allow(clippy::large_enum_variant)]
enum Inbound {
    Pass(Packet),
    Refused(Verdict),
}
use super::link::LinkStats;
use super::listener::{Orphan, Report, Reports};
use super::message::{Meta, RetainedSource};
use super::routing::{filter_to_router, from_router, to_router};
use super::rules::{check_filter, check_framing, check_text};
use super::secure::Secret;
use crate::policy::{Policy, Readable};

/// Keep-alive given to clients that ask for none (rumqttd refuses 0): about 27 hours.
const UNLIMITED_KEEP_ALIVE: u16 = u16::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V311,
    V5,
}

/// A subscription the client asked for, remembered until its SUBACK is written.
#[derive(Debug)]
struct PendingFilter {
    path: String,
    rule: RetainForwardRule,
    is_new: bool,
    /// The topics under it the client may read; `None` when refused.
    scope: Option<Readable>,
}

#[derive(Debug, Default)]
struct ConnState {
    version: Option<Version>,
    pending: HashMap<u16, Vec<PendingFilter>>,
    subscribed: HashSet<String>,
    /// Filters subscribed with MQTT 5 Retain As Published, which rumqttd ignores.
    retain_as_published: HashSet<String>,
    guard: Guard,
    /// Whether the CONNECT has been read: a second one is a protocol violation.
    connected: bool,
    /// The CONNECT handed to rumqttd, until its link asks for the next packet: dropped with
    /// it still here, the connection is an orphan (see `listener`).
    handed: Option<Orphan>,
    /// Whether this connection holds one of `Shared::max_clients`.
    counted: bool,
    /// Whether the relay's introduction has been read (MQTT over TLS).
    introduced: bool,
    /// The common name of the client's TLS certificate.
    certified: Option<String>,
}

/// Settings shared by every connection of one listener.
pub(crate) struct Shared {
    pub(crate) max_payload: usize,
    pub(crate) retained: Arc<dyn RetainedSource>,
    pub(crate) stats: Arc<LinkStats>,
    pub(crate) policy: Policy,
    /// Where connections that end between CONNECT and link are reported (see `listener`).
    pub(crate) reports: Reports,
    /// Clients accepted at once; more get CONNACK "quota exceeded" (3.1.1: "unavailable").
    pub(crate) max_clients: usize,
    pub(crate) clients: AtomicUsize,
    /// Set on the listener behind the TLS relay: every connection starts with its introduction.
    pub(crate) introduction: Option<Secret>,
}

impl Shared {
    /// Takes one of the client slots, unless they are all taken.
    fn take_slot(&self) -> bool {
        let taken = self.clients.fetch_add(1, Ordering::AcqRel);
        if taken >= self.max_clients {
            self.clients.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }
}

/// What the connections accepted by one rumqttd `Server` share: the client ids whose will entry
/// in that server was left behind (see `listener`). A CONNECT with one of them would panic
/// there, so it is refused until a new server takes over.
#[derive(Debug, Default)]
struct Generation {
    orphaned: Mutex<HashSet<String>>,
}

impl Generation {
    fn is_orphaned(&self, client_id: &str) -> bool {
        self.orphaned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(client_id)
    }
}

/// One value per connection: rumqttd clones the listener's protocol for each accepted socket,
/// and `Clone` here starts a fresh connection state.
pub(crate) struct GatewayProtocol {
    shared: Arc<Shared>,
    generation: Arc<Generation>,
    state: Mutex<ConnState>,
}

impl GatewayProtocol {
    /// The protocol of a new listener (a new rumqttd `Server`).
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            generation: Arc::default(),
            state: Mutex::new(ConnState::default()),
        }
    }

    fn inspect_inbound(&mut self, header: u8, pkid: u16, packet: Packet) -> Result<Inbound, Error> {
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        let policy = &self.shared.policy;
        let v5 = state.version == Some(Version::V5);
        match packet {
            Packet::Connect(mut connect, props, mut will, will_props, mut login) => {
                state.connected = true;
                check_text(&connect.client_id)?;
                if let Some(login) = &login {
                    check_text(&login.username)?;
                }
                // Before the will is touched: its topic is checked as the client wrote it.
                state.guard.connect(
                    policy,
                    state.certified.as_deref(),
                    &mut connect,
                    &mut will,
                    &mut login,
                );
                if connect.keep_alive == 0 {
                    connect.keep_alive = UNLIMITED_KEEP_ALIVE;
                }
                // rumqttd drops, without a CONNACK, any client whose id holds one of these
                // characters; MQTT allows them, so they are escaped, one-to-one.
                if connect.client_id.contains(['+', '$', '#', '/', '%']) {
                    connect.client_id = escape_client_id(&connect.client_id);
                }
                // After the escape: the id as the router and its listener know it.
                if !state.guard.refused() {
                    let unavailable = if self.generation.is_orphaned(&connect.client_id) {
                        let _ = self.shared.reports.send(Report::Returned);
                        Some(ConnectReturnCode::ServerUnavailable)
                    } else if !self.shared.take_slot() {
                        Some(ConnectReturnCode::QuotaExceeded)
                    } else {
                        state.counted = true;
                        None
                    };
                    if let Some(code) = unavailable {
                        state
                            .guard
                            .refuse(code, &mut connect, &mut will, &mut login);
                    }
                }
                let mut will_props = will_props;
                if let Some(will) = will.as_mut() {
                    let meta = Meta::from_client(will.retain, will.qos as u8);
                    let topic =
                        std::str::from_utf8(&will.topic).map_err(|_| Error::TopicNotUtf8)?;
                    check_publish_topic(topic)?;
                    will.topic = to_router(will.topic.clone());
                    will.retain = false;
                    let mut p = will_props.unwrap_or(LastWillProperties {
                        delay_interval: None,
                        payload_format_indicator: None,
                        message_expiry_interval: None,
                        content_type: None,
                        response_topic: None,
                        correlation_data: None,
                        user_properties: Vec::new(),
                    });
                    meta.attach(&mut p.payload_format_indicator);
                    will_props = Some(p);
                }
                if will.is_none() {
                    will_props = None;
                }
                state.handed = Some(Orphan {
                    client_id: connect.client_id.clone(),
                    clean: connect.clean_session,
                    registered: false,
                });
                Ok(Inbound::Pass(Packet::Connect(
                    connect, props, will, will_props, login,
                )))
            }
            Packet::Publish(mut publish, props) => {
                if publish.payload.len() > self.shared.max_payload {
                    return Err(Error::PayloadSizeLimitExceeded(publish.payload.len()));
                }
                let alias = props.as_ref().and_then(|p| p.topic_alias);
                let topic = std::str::from_utf8(&publish.topic).map_err(|_| Error::TopicNotUtf8)?;
                if !(topic.is_empty() && alias.is_some()) {
                    check_publish_topic(topic)?;
                }
                let topic = state
                    .guard
                    .alias(alias, topic)
                    .ok_or(Error::MalformedPacket)?;
                let qos = (header >> 1) & 0b11;
                if let Err(verdict) = state.guard.publish(policy, v5, &topic, qos, pkid) {
                    return Ok(Inbound::Refused(verdict));
                }
                // The retain and QoS bits of the fixed header: rumqttd clears the first and does
                // not expose the second, so they travel to the gateway's own subscriber here.
                let meta = Meta::from_client(header & 0b0001 != 0, (header >> 1) & 0b11);
                // rumqttd keeps no retained messages at all: the gateway's store is the only one,
                // so an empty non-retained publish can no longer wipe a retained value.
                publish.retain = false;
                publish.topic = to_router(publish.topic);
                let mut props = props.unwrap_or_default();
                meta.attach(&mut props.payload_format_indicator);
                Ok(Inbound::Pass(Packet::Publish(publish, Some(props))))
            }
            Packet::Subscribe(mut subscribe, props) => {
                for f in &subscribe.filters {
                    check_filter(&f.path)?;
                }
                let requested: Vec<(String, RetainForwardRule)> = subscribe
                    .filters
                    .iter()
                    .map(|f| (f.path.clone(), f.retain_forward_rule.clone()))
                    .collect();
                let scopes = match state.guard.subscribe(policy, v5, &mut subscribe) {
                    Ok(scopes) => scopes,
                    Err(answer) if answer.is_empty() => {
                        return Ok(Inbound::Refused(Verdict::Close));
                    }
                    Err(answer) => return Ok(Inbound::Refused(Verdict::Answer(answer))),
                };
                for f in &subscribe.filters {
                    if f.preserve_retain {
                        state.retain_as_published.insert(f.path.clone());
                    } else {
                        state.retain_as_published.remove(&f.path);
                    }
                }
                let filters = requested
                    .into_iter()
                    .zip(scopes)
                    .map(|((path, rule), scope)| PendingFilter {
                        is_new: scope.is_some() && state.subscribed.insert(path.clone()),
                        path,
                        rule,
                        scope,
                    })
                    .collect();
                state.pending.insert(subscribe.pkid, filters);
                for f in &mut subscribe.filters {
                    f.path = filter_to_router(&f.path);
                }
                Ok(Inbound::Pass(Packet::Subscribe(subscribe, props)))
            }
            Packet::Unsubscribe(mut unsubscribe, props) => {
                for f in &unsubscribe.filters {
                    check_filter(f)?;
                    state.subscribed.remove(f);
                    state.retain_as_published.remove(f);
                }
                state.guard.unsubscribe(&mut unsubscribe);
                for f in &mut unsubscribe.filters {
                    *f = filter_to_router(f);
                }
                Ok(Inbound::Pass(Packet::Unsubscribe(unsubscribe, props)))
            }
            Packet::PubRel(pubrel, props) => Ok(match state.guard.pubrel(pubrel.pkid) {
                Some(verdict) => Inbound::Refused(verdict),
                None => Inbound::Pass(Packet::PubRel(pubrel, props)),
            }),
            Packet::PingReq(ping) => {
                state.guard.client_ping();
                Ok(Inbound::Pass(Packet::PingReq(ping)))
            }
            other => Ok(Inbound::Pass(other)),
        }
    }

    /// Writes the retained messages matching the filters acknowledged by `return_codes`.
    fn write_retained(
        &self,
        pkid: u16,
        return_codes: &[SubscribeReasonCode],
        version: Version,
        buffer: &mut BytesMut,
    ) -> Result<usize, Error> {
        let pending = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.pending.remove(&pkid)
        };
        let Some(filters) = pending else {
            return Ok(0);
        };
        let mut written = 0;
        for (filter, code) in filters.iter().zip(return_codes) {
            let granted = matches!(
                code,
                SubscribeReasonCode::QoS0
                    | SubscribeReasonCode::QoS1
                    | SubscribeReasonCode::QoS2
                    | SubscribeReasonCode::Success(_)
            );
            let Some(scope) = &filter.scope else { continue };
            let wanted = match filter.rule {
                RetainForwardRule::OnEverySubscribe => true,
                RetainForwardRule::OnNewSubscribe => filter.is_new,
                RetainForwardRule::Never => false,
            };
            // MQTT 5 §4.8.2: retained messages are not sent for shared subscriptions.
            if !granted || !wanted || filter.path.starts_with("$share/") {
                continue;
            }
            for message in self.shared.retained.retained_matching(&filter.path) {
                if !scope.admits(&message.topic) {
                    continue;
                }
                let props = match version {
                    Version::V311 => None,
                    Version::V5 => Some(message.properties(None)),
                };
                let publish = Publish::new(Bytes::from(message.topic), message.payload, true);
                written += codec_write(version, Packet::Publish(publish, props), buffer)?;
                self.shared.stats.delivered.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(written)
    }
}

impl Clone for GatewayProtocol {
    /// A new connection of the same listener.
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            generation: self.generation.clone(),
            state: Mutex::new(ConnState::default()),
        }
    }
}

impl Drop for GatewayProtocol {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        if state.counted {
            self.shared.clients.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some(orphan) = state.handed.take() {
            self.generation
                .orphaned
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(orphan.client_id.clone());
            // The receiver lives as long as the broker; after it, nothing is left to clear.
            let _ = self.shared.reports.send(Report::Orphaned(orphan));
        }
    }
}

impl Protocol for GatewayProtocol {
    fn read_mut(&mut self, stream: &mut BytesMut, max_size: usize) -> Result<Packet, Error> {
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        // rumqttd reads nothing between the CONNECT and the start of the link.
        state.handed = None;
        if let Some(secret) = &self.shared.introduction
            && !state.introduced
        {
            match secret.read(stream) {
                Ok(None) => return Err(Error::InsufficientBytes(1)),
                Ok(Some(name)) => {
                    state.introduced = true;
                    state.certified = Some(name).filter(|n| !n.is_empty());
                }
                Err(()) => return Err(Error::IncorrectPacketFormat),
            }
        }
        loop {
            let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
            if state.guard.closing() {
                // Refused, or told to go: whatever the client sends now ends the connection.
                return Err(Error::IncorrectPacketFormat);
            }
            check_framing(stream, state.connected)?;
            let header = stream.first().copied().unwrap_or(0);
            let pkid = publish_pkid(stream).unwrap_or(0);
            let version = match state.version {
                Some(v) => Some(v),
                None => match detect_version(stream, max_size)? {
                    Level::Supported(v) => {
                        state.version = Some(v);
                        Some(v)
                    }
                    Level::Unsupported(len) => {
                        let _ = stream.split_to(len);
                        state.version = Some(Version::V311);
                        None
                    }
                },
            };
            let packet = match version {
                Some(Version::V311) => V4.read_mut(stream, max_size)?,
                Some(Version::V5) => V5.read_mut(stream, max_size)?,
                // MQTT 3.1.1 §3.1.2.2: CONNACK 0x01 ("unacceptable protocol level"), then close,
                // as Mosquitto does. The CONNECT goes on as a refused one, whatever its body
                // says: a protocol this gateway does not speak has no fields it could trust.
                None => {
                    let mut connect = Connect {
                        keep_alive: 0,
                        client_id: String::new(),
                        clean_session: true,
                    };
                    let (mut will, mut login) = (None, None);
                    state.guard.refuse(
                        ConnectReturnCode::RefusedProtocolVersion,
                        &mut connect,
                        &mut will,
                        &mut login,
                    );
                    Packet::Connect(connect, None, will, None, login)
                }
            };
            match self.inspect_inbound(header, pkid, packet)? {
                Inbound::Pass(packet) => return Ok(packet),
                // Dropped: the next packet in the buffer, or a wait for more bytes.
                Inbound::Refused(Verdict::Drop) => continue,
                Inbound::Refused(Verdict::Answer(packets)) => {
                    let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
                    state.guard.answer_later(packets);
                    return Ok(Packet::PingReq(PingReq));
                }
                Inbound::Refused(Verdict::Close) => return Err(Error::IncorrectPacketFormat),
            }
        }
    }

    fn write(&self, packet: Packet, buffer: &mut BytesMut) -> Result<usize, Error> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let version = state.version.unwrap_or(Version::V311);
        match packet {
            Packet::Publish(mut publish, props) => {
                let mut meta = None;
                let props = props.map(|mut p| {
                    meta = Meta::detach(&mut p.payload_format_indicator);
                    p
                });
                // MQTT 5 §3.8.3.1: with Retain As Published the flag is forwarded as the
                // publisher set it; rumqttd always clears it on live messages.
                if meta.is_some_and(|m| m.retain)
                    && !state.retain_as_published.is_empty()
                    && std::str::from_utf8(&publish.topic).is_ok_and(|topic| {
                        state.retain_as_published.iter().any(|f| {
                            rumqttd::protocol::matches(topic, &filter_to_router(split_share(f).1))
                        })
                    })
                {
                    publish.retain = true;
                }
                drop(state);
                publish.topic = from_router(publish.topic);
                self.shared.stats.delivered.fetch_add(1, Ordering::Relaxed);
                codec_write(version, Packet::Publish(publish, props), buffer)
            }
            Packet::SubAck(mut suback, props) => {
                state.guard.suback(&mut suback);
                drop(state);
                let pkid = suback.pkid;
                let codes = suback.return_codes.clone();
                let n = codec_write(version, Packet::SubAck(suback, props), buffer)?;
                Ok(n + self.write_retained(pkid, &codes, version, buffer)?)
            }
            Packet::ConnAck(mut ack, props) => {
                if let Some(handed) = state.handed.as_mut() {
                    handed.registered = true;
                    // An empty client id was replaced by one the router made up.
                    if let Some(id) = props
                        .as_ref()
                        .and_then(|p| p.assigned_client_identifier.as_ref())
                    {
                        handed.client_id.clone_from(id);
                    }
                }
                state.guard.connack(version == Version::V5, &mut ack);
                drop(state);
                codec_write(version, Packet::ConnAck(ack, props), buffer)
            }
            Packet::UnsubAck(mut ack, props) => {
                state.guard.unsuback(&mut ack);
                drop(state);
                codec_write(version, Packet::UnsubAck(ack, props), buffer)
            }
            Packet::PingResp(ping) => match state.guard.pingresp() {
                None => {
                    drop(state);
                    codec_write(version, Packet::PingResp(ping), buffer)
                }
                Some(packets) => {
                    drop(state);
                    let mut written = 0;
                    for packet in packets {
                        written += codec_write(version, packet, buffer)?;
                    }
                    Ok(written)
                }
            },
            other => {
                drop(state);
                codec_write(version, other, buffer)
            }
        }
    }
}

/// The packet identifier of a QoS 1 or 2 PUBLISH at the head of `stream`, read off the wire
/// (rumqttd keeps it private once parsed).
fn publish_pkid(stream: &[u8]) -> Option<u16> {
    let header = *stream.first()?;
    if header >> 4 != 3 || (header >> 1) & 0b11 == 0 {
        return None;
    }
    let mut pos = 1;
    loop {
        let b = *stream.get(pos)?;
        pos += 1;
        if b & 0x80 == 0 {
            break;
        }
        if pos > 4 {
            return None;
        }
    }
    let len = usize::from(u16::from_be_bytes([
        *stream.get(pos)?,
        *stream.get(pos + 1)?,
    ]));
    let at = pos + 2 + len;
    Some(u16::from_be_bytes([*stream.get(at)?, *stream.get(at + 1)?]))
}

/// Writes with the connection's codec; 3.1.1 has no properties and rumqttd's V4 writer panics on
/// any, so they are dropped first.
fn codec_write(version: Version, packet: Packet, buffer: &mut BytesMut) -> Result<usize, Error> {
    match version {
        Version::V5 => write_v5(packet, buffer),
        Version::V311 => V4.write(strip_properties(packet), buffer),
    }
}

/// rumqttd's MQTT 5 DISCONNECT writer, given a reason code and no properties, writes the code
/// and an empty property length under a remaining length of 1, leaving a stray byte after the
/// packet (given empty properties, it drops the code instead): the length is corrected here.
fn write_v5(packet: Packet, buffer: &mut BytesMut) -> Result<usize, Error> {
    let start = buffer.len();
    let with_reason = matches!(&packet, Packet::Disconnect(d, None)
        if d.reason_code != DisconnectReasonCode::NormalDisconnection);
    let written = V5.write(packet, buffer)?;
    if with_reason && buffer.len() == start + 4 && buffer[start + 1] == 1 {
        buffer[start + 1] = 2;
        return Ok(4);
    }
    Ok(written)
}

fn strip_properties(packet: Packet) -> Packet {
    match packet {
        Packet::Connect(c, _, w, _, l) => Packet::Connect(c, None, w, None, l),
        Packet::ConnAck(a, _) => Packet::ConnAck(a, None),
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::PubAck(p, _) => Packet::PubAck(p, None),
        Packet::Subscribe(s, _) => Packet::Subscribe(s, None),
        Packet::SubAck(s, _) => Packet::SubAck(s, None),
        Packet::PubRec(p, _) => Packet::PubRec(p, None),
        Packet::PubRel(p, _) => Packet::PubRel(p, None),
        Packet::PubComp(p, _) => Packet::PubComp(p, None),
        Packet::Unsubscribe(u, _) => Packet::Unsubscribe(u, None),
        Packet::UnsubAck(u, _) => Packet::UnsubAck(u, None),
        Packet::Disconnect(d, _) => Packet::Disconnect(d, None),
        other => other,
    }
}

fn escape_client_id(id: &str) -> String {
    let mut out = String::with_capacity(id.len() + 8);
    for c in id.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            '+' => out.push_str("%2B"),
            '#' => out.push_str("%23"),
            '$' => out.push_str("%24"),
            c => out.push(c),
        }
    }
    out
}

/// A client may not publish to a wildcard, an empty or a `$` topic, nor one holding U+0000.
fn check_publish_topic(topic: &str) -> Result<(), Error> {
    if topic.is_empty() || topic.starts_with('$') || topic.contains(['+', '#', '\0']) {
        return Err(Error::MalformedPacket);
    }
    Ok(())
}

/// What the CONNECT at the head of the stream asks for.
#[derive(Debug, PartialEq, Eq)]
enum Level {
    /// A version this gateway speaks.
    Supported(Version),
    /// Named `MQTT` (or `MQIsdp`, MQTT 3.1) at a level this gateway does not speak; the whole
    /// packet, this many bytes, has arrived.
    Unsupported(usize),
}

/// Reads the protocol name and level of a CONNECT packet without consuming it. A name other than
/// `MQTT` or `MQIsdp`, or one that does not fit in the packet, is an error: the connection
/// closes without an answer.
fn detect_version(stream: &[u8], max_size: usize) -> Result<Level, Error> {
    let need = |n: usize| Error::InsufficientBytes(n.saturating_sub(stream.len()).max(1));
    let Some(&byte1) = stream.first() else {
        return Err(need(2));
    };
    if byte1 >> 4 != 1 {
        return Err(Error::InvalidPacketType(byte1 >> 4));
    }
    // The remaining-length varint (1 to 4 bytes).
    let mut pos = 1;
    let mut remaining = 0usize;
    loop {
        let Some(&b) = stream.get(pos) else {
            return Err(need(pos + 1));
        };
        remaining |= usize::from(b & 0x7F) << (7 * (pos - 1));
        pos += 1;
        if b & 0x80 == 0 {
            break;
        }
        if pos > 4 {
            return Err(Error::MalformedRemainingLength);
        }
    }
    let (Some(&hi), Some(&lo)) = (stream.get(pos), stream.get(pos + 1)) else {
        return Err(need(pos + 2));
    };
    let name_len = usize::from(u16::from_be_bytes([hi, lo]));
    // The name and the level byte lie inside the packet.
    if 2 + name_len + 1 > remaining {
        return Err(Error::MalformedPacket);
    }
    let level_at = pos + 2 + name_len;
    let Some(&level) = stream.get(level_at) else {
        return Err(need(level_at + 1));
    };
    match (&stream[pos + 2..level_at], level) {
        (b"MQTT", 4) => return Ok(Level::Supported(Version::V311)),
        (b"MQTT", 5) => return Ok(Level::Supported(Version::V5)),
        (b"MQTT" | b"MQIsdp", _) => {}
        _ => return Err(Error::InvalidProtocol),
    }
    if remaining > max_size {
        return Err(Error::PayloadSizeLimitExceeded(remaining));
    }
    let len = pos + remaining;
    if stream.len() < len {
        return Err(need(len));
    }
    Ok(Level::Unsupported(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(level: u8) -> BytesMut {
        let mut b = BytesMut::new();
        b.extend_from_slice(&[0x10, 10, 0, 4, b'M', b'Q', b'T', b'T', level, 2, 0, 60]);
        b
    }

    #[test]
    fn detects_both_versions_and_waits_for_more_bytes() {
        let detect = |b: &[u8]| detect_version(b, 1024);
        assert_eq!(
            detect(&connect(4)).ok(),
            Some(Level::Supported(Version::V311))
        );
        assert_eq!(
            detect(&connect(5)).ok(),
            Some(Level::Supported(Version::V5))
        );
        assert!(matches!(
            detect(&connect(5)[..5]),
            Err(Error::InsufficientBytes(_))
        ));
        assert!(matches!(
            detect(&[0x30u8, 0]),
            Err(Error::InvalidPacketType(3))
        ));
    }

    #[test]
    fn an_unsupported_level_is_told_apart_from_garbage() {
        let detect = |b: &[u8]| detect_version(b, 1024);
        for level in [0, 3, 6, 255] {
            assert_eq!(detect(&connect(level)).ok(), Some(Level::Unsupported(12)));
        }
        let mqisdp = [
            0x10, 12, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 2, 0, 60,
        ];
        assert_eq!(detect(&mqisdp).ok(), Some(Level::Unsupported(14)));
        // Known only once the whole packet is there.
        assert!(matches!(
            detect(&connect(3)[..10]),
            Err(Error::InsufficientBytes(2))
        ));
        let mut wrong_name = connect(3);
        wrong_name[7] = b's';
        assert!(matches!(detect(&wrong_name), Err(Error::InvalidProtocol)));
        let mut name_past_packet = connect(3);
        name_past_packet[1] = 6;
        assert!(matches!(
            detect(&name_past_packet),
            Err(Error::MalformedPacket)
        ));
        assert!(matches!(
            detect_version(&connect(6), 8),
            Err(Error::PayloadSizeLimitExceeded(10))
        ));
    }

    #[test]
    fn client_ids_are_escaped_one_to_one() {
        assert_eq!(escape_client_id("a/b+c#d$e%f"), "a%2Fb%2Bc%23d%24e%25f");
        assert_ne!(escape_client_id("a/b"), escape_client_id("a%2Fb"));
    }

    #[test]
    fn a_disconnect_with_a_reason_is_as_long_as_it_says() {
        use rumqttd::protocol::Disconnect;
        let mut buf = BytesMut::new();
        let d = Disconnect {
            reason_code: DisconnectReasonCode::ProtocolError,
        };
        codec_write(Version::V5, Packet::Disconnect(d, None), &mut buf).unwrap();
        assert_eq!(&buf[..], &[0xE0, 2, 0x82, 0]);
    }

    #[test]
    fn refuses_topics_clients_may_not_publish_to() {
        for bad in ["", "$SYS/x", "a/+", "a/#", "a\0b"] {
            assert!(check_publish_topic(bad).is_err(), "{bad:?}");
        }
        assert!(check_publish_topic("a//b").is_ok());
    }
}
