//! One client's session once its CONNECT is accepted: the rules MQTT puts on what it sends and
//! receives (ACL, QoS, aliases, packet sizes, No Local, `$` topics), applied in front of
//! rumqttd's router. Sans-I/O: a packet or a router notification in, packets for the client,
//! the router and the bridge out.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use bytestring::ByteString;
use rumqttd::protocol as r;
use rumqttd::{Forward, Notification};
use rustc_hash::{FxHashMap, FxHashSet};

use super::copies::Copies;
use super::flow::{Matcher, Reader, log_size};
use super::message::{Meta, MqttPublish};
use super::routing::{filter_to_router, from_router, to_router};
use super::settings::{Audience, Settings, Tally};
use super::wire::{
    Ack, Packet, Publish, PublishProperties, QoS, SubAck, Subscribe, Subscription, Unsubscribe,
    Version,
};
use crate::policy::{Action, Denial, Door, Principal, Readable, Refusal};

/// MQTT 5 reason codes the session answers with.
pub(super) mod code {
    pub(crate) const SUCCESS: u8 = 0x00;
    pub(crate) const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
    pub(crate) const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    pub(crate) const UNSPECIFIED: u8 = 0x80;
    pub(crate) const PROTOCOL_ERROR: u8 = 0x82;
    pub(crate) const NOT_AUTHORIZED: u8 = 0x87;
    pub(crate) const TOPIC_FILTER_INVALID: u8 = 0x8F;
    pub(crate) const TOPIC_NAME_INVALID: u8 = 0x90;
    pub(crate) const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub(crate) const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub(crate) const PACKET_TOO_LARGE: u8 = 0x95;
}

/// Deliveries the session holds back for the client's Receive Maximum before it stops waking
/// the router for more (the router then keeps the rest in its log).
const MAX_WAITING: usize = 1024;

/// The user property that carries a publish's origin (its connection) through the router, for
/// No Local. Its name holds U+0000, which no client can send, so it cannot be forged; it never
/// reaches a client.
const TRACE: &str = "\0topicgate";

/// How a session ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum End {
    /// The client sent DISCONNECT: its will is published only with reason 0x04.
    Client {
        /// Reason 0x04, disconnect with will message.
        with_will: bool,
        /// A new Session Expiry Interval the client gave.
        session_expiry: Option<u32>,
    },
    /// The client broke a rule: an MQTT 5 client gets DISCONNECT with this reason code, then
    /// the connection closes and the will is published.
    Violation(u8, &'static str),
    /// The client broke a rule for which the connection closes without a word; the will is
    /// published.
    Close(&'static str),
}

/// What one step of the session produced.
#[derive(Debug, Default)]
pub(super) struct Out {
    /// Packets to write to the client, in order.
    pub(super) client: Vec<Packet>,
    /// Packets for the router, in order.
    pub(super) router: Vec<r::Packet>,
    /// Client publishes for the gateway's store and streams.
    pub(super) bridge: Vec<MqttPublish>,
    /// Set when the session must end after the packets above are written.
    pub(super) end: Option<End>,
    /// The router paused this connection and must be told it is ready again.
    pub(super) wake_router: bool,
    /// Seconds to stop reading the client: its publish rate is over the limit.
    pub(super) pause: Option<u64>,
    /// A subscriber the last publish left too far behind: reading the client waits for it.
    pub(super) blocked: Option<Arc<Reader>>,
    /// What to add to the broker's counters (see [`Tally`]).
    pub(super) tally: Tally,
    /// The router's deliveries among `client`, for a second copy of a message to join.
    pub(super) copies: Copies,
}

/// One subscription as the session knows it; the router holds the same filter under `id`.
#[derive(Debug, Clone)]
pub(super) struct Held {
    pub(super) filter: String,
    pub(super) qos: QoS,
    pub(super) no_local: bool,
    pub(super) retain_as_published: bool,
    /// The client's own subscription identifier.
    pub(super) identifier: Option<u32>,
    /// The topics under the filter the ACL lets the client read.
    pub(super) scope: Readable,
    /// A filter whose first level is a wildcard never matches topics starting with `$`.
    pub(super) wild_first: bool,
}

/// What survives a connection when the session is kept: the router keeps its own part. Its
/// subscriptions count as subscribers until it is resumed or dropped.
#[derive(Default)]
pub(super) struct Kept {
    held: FxHashMap<usize, Held>,
    qos2_in: FxHashSet<u16>,
    /// The session's own publishes not acknowledged yet, with whether PUBREL was sent.
    unacked: Vec<(Publish, bool)>,
    settings: Option<Arc<Settings>>,
}

impl Drop for Kept {
    fn drop(&mut self) {
        if let Some(settings) = &self.settings {
            release(settings, self.held.values());
        }
    }
}

/// Takes subscriptions out of the gateway's count of subscribers.
fn release<'a>(settings: &Settings, held: impl Iterator<Item = &'a Held>) {
    for h in held {
        settings.unsubscribed(split_share(&h.filter).1);
        if h.no_local {
            settings.no_local_removed();
        }
    }
}

/// A SUBACK held until the router has taken the SUBSCRIBE's filters.
#[derive(Debug)]
struct PendingSubAck {
    suback: SubAck,
    router_ids: HashSet<u16>,
    retained: Vec<(usize, MqttPublish)>,
}

/// An outgoing QoS 1/2 publish the client has not acknowledged yet. The router delivers to
/// the session at QoS 0 only: every exchange with the client is the session's, so the
/// router's in-order acknowledgement rules and its window of 100 never apply, and what is
/// unacknowledged when the connection ends is kept with a session that outlives it.
#[derive(Debug)]
struct Flight {
    qos: QoS,
    /// PUBREC received and PUBREL sent (QoS 2).
    released: bool,
    /// The publish, to send again on resumption; only for a session that may be kept.
    publish: Option<Publish>,
}

/// The state of one connected client.
pub(super) struct Session {
    settings: Arc<Settings>,
    version: Version,
    principal: Principal,
    rate_key: String,
    /// Told apart from every other connection, for No Local.
    origin: u64,
    held: FxHashMap<usize, Held>,
    by_filter: HashMap<String, usize>,
    next_sub: usize,
    aliases_in: HashMap<u16, ByteString>,
    /// Publishes received at QoS 2 whose PUBREL has not come.
    qos2_in: FxHashSet<u16>,
    /// By packet id; the ids are the session's own, so a fast hash is safe.
    in_flight: FxHashMap<u16, Flight>,
    /// Whether the session may outlive its connection; if not, what is in flight is never
    /// sent again and need not be kept.
    kept_after: bool,
    /// What a resumed session sends again (see [`Session::resume`]).
    unacked: Vec<(Publish, bool)>,
    /// The router paused this connection while deliveries were held back: it is woken once
    /// they have gone out.
    router_paused: bool,
    /// QoS 1/2 publishes held back by the client's Receive Maximum.
    waiting: VecDeque<Publish>,
    /// Retained messages for the filters of the SUBSCRIBE being answered.
    pending_retained: Vec<(usize, MqttPublish)>,
    /// SUBACKs waiting for the router to have taken every filter of their SUBSCRIBE, so that
    /// a message published once the client has its SUBACK reaches it; in order.
    subacks: VecDeque<PendingSubAck>,
    next_own: u16,
    client_receive_max: usize,
    client_max_packet: usize,
    /// Topic aliases the session uses toward the client, up to the client's Topic Alias
    /// Maximum (MQTT 5 §3.3.2.3.4): the first topics sent get one, for as long as the
    /// connection lasts.
    aliases_out: HashMap<ByteString, u16>,
    alias_max_out: u16,
    router_sub_id: u16,
    /// Router ids of the SUBSCRIBEs sent for the client's SUBSCRIBE being handled.
    router_waiting: HashSet<u16>,
    /// The session's progress through the router's log of each held subscription.
    readers: FxHashMap<usize, Arc<Reader>>,
    /// Where the client's publishes go, for flow control.
    matcher: Matcher,
    /// Which of the client's topics someone reads.
    audience: Audience,
    /// What the filters of lagging readers had appended when the connection last went idle.
    idle_marks: Option<Vec<(usize, u64)>>,
    /// How the session ended, once it has.
    pub(super) ended: Option<End>,
}

impl Session {
    /// A session for an accepted CONNECT.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        settings: Arc<Settings>,
        version: Version,
        principal: Principal,
        client_id: &str,
        origin: u64,
        receive_max: Option<u16>,
        max_packet: Option<u32>,
        alias_max: Option<u16>,
        mut kept: Kept,
    ) -> Self {
        let held = std::mem::take(&mut kept.held);
        let qos2_in = std::mem::take(&mut kept.qos2_in);
        let unacked = std::mem::take(&mut kept.unacked);
        let rate_key =
            crate::policy::Policy::client_key(&principal, || format!("client:{client_id}"));
        let by_filter = held.iter().map(|(id, h)| (h.filter.clone(), *id)).collect();
        let next_sub = held.keys().max().map_or(1, |m| m + 1);
        let readers = held
            .iter()
            .map(|(id, h)| (*id, join(&settings, &h.filter)))
            .collect();
        Self {
            settings,
            version,
            principal,
            rate_key,
            origin,
            held,
            by_filter,
            next_sub,
            aliases_in: HashMap::new(),
            qos2_in,
            in_flight: FxHashMap::default(),
            kept_after: true,
            router_paused: false,
            waiting: VecDeque::new(),
            pending_retained: Vec::new(),
            subacks: VecDeque::new(),
            next_own: 1,
            client_receive_max: usize::from(receive_max.unwrap_or(u16::MAX)),
            client_max_packet: max_packet.map_or(usize::MAX, |m| m as usize),
            aliases_out: HashMap::new(),
            alias_max_out: if version == Version::V5 {
                alias_max.unwrap_or(0)
            } else {
                0
            },
            router_sub_id: 0,
            router_waiting: HashSet::new(),
            readers,
            matcher: Matcher::default(),
            audience: Audience::default(),
            idle_marks: None,
            ended: None,
            unacked,
        }
    }

    /// Sends again what the resumed session had not had acknowledged (MQTT 4.4): its own
    /// publishes with DUP set, or their PUBREL. The router sends its own again by itself.
    pub(super) fn resume(&mut self, out: &mut Out) {
        for (mut p, released) in std::mem::take(&mut self.unacked) {
            if p.packet_id == 0 {
                self.waiting.push_back(p);
                continue;
            }
            let id = p.packet_id;
            if released {
                out.client.push(Packet::PubRel(ack(id, code::SUCCESS)));
            } else {
                p.dup = true;
                let sent = self.aliased(p.clone());
                out.client.push(Packet::Publish(sent));
            }
            self.in_flight.insert(
                id,
                Flight {
                    qos: p.qos,
                    released,
                    publish: Some(p),
                },
            );
        }
    }

    /// Declares that the session ends with its connection (clean session, or session expiry
    /// 0, which a DISCONNECT cannot raise): its publishes in flight are not kept for resending.
    pub(super) fn ends_with_connection(&mut self) {
        self.kept_after = false;
    }

    /// What to keep of the session when it outlives the connection.
    pub(super) fn keep(mut self) -> Kept {
        let mut unacked: Vec<(Publish, bool)> = Vec::new();
        for flight in self.in_flight.values() {
            if let Some(p) = &flight.publish {
                unacked.push((p.clone(), flight.released));
            }
        }
        // Waiting ones never went out: they go on resumption, after the unacknowledged.
        unacked.sort_by_key(|(p, _)| p.packet_id);
        unacked.extend(
            std::mem::take(&mut self.waiting)
                .into_iter()
                .map(|p| (p, false)),
        );
        // (Those have no packet id yet: they get one when they go out.)
        // Offline, the session holds no publisher back: the router keeps what its log can.
        self.leave_all();
        Kept {
            held: std::mem::take(&mut self.held),
            qos2_in: std::mem::take(&mut self.qos2_in),
            unacked,
            settings: Some(self.settings.clone()),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.leave_all();
        release(&self.settings, self.held.values());
    }
}

/// The flow reader of a new subscription to `filter`.
fn join(settings: &Settings, filter: &str) -> Arc<Reader> {
    let (group, inner) = split_share(filter);
    settings.flow.join(&filter_to_router(inner), group)
}

impl Session {
    fn leave_all(&mut self) {
        for (id, reader) in self.readers.drain() {
            let group = self.held.get(&id).and_then(|h| split_share(&h.filter).0);
            self.settings.flow.leave(&reader, group);
        }
    }

    /// Whether the router should still have messages for this session: the counts say so, and
    /// the session has not paused the router itself.
    pub(super) fn behind(&self) -> bool {
        !self.router_paused && self.readers.values().any(|r| r.lag() > 0)
    }

    /// The connection has been idle for a while, all written and nothing from the router. A
    /// reader the counts call behind, whose filter took nothing since the last idle check, has
    /// had all the router holds for it (the router dropped expired messages, or a publish was
    /// counted before the subscription began): its count is set right. Whether the session is
    /// still behind.
    pub(super) fn idle(&mut self) -> bool {
        if self.router_paused {
            return false;
        }
        let now: Vec<(usize, u64)> = self
            .readers
            .iter()
            .filter(|(_, r)| r.lag() > 0)
            .map(|(id, r)| (*id, r.appended()))
            .collect();
        if let Some(before) = self.idle_marks.take() {
            for (id, appended) in &now {
                if before.contains(&(*id, *appended))
                    && let Some(reader) = self.readers.get(id)
                {
                    reader.resync();
                }
            }
        }
        self.idle_marks = Some(now);
        self.behind()
    }

    fn v5(&self) -> bool {
        self.version == Version::V5
    }

    /// One packet from the client.
    pub(super) fn client(&mut self, packet: Packet, out: &mut Out) {
        match packet {
            Packet::Publish(p) => self.publish(p, out),
            Packet::PubAck(a) => self.acked(a.packet_id, AckKind::Ack, a.reason, out),
            Packet::PubRec(a) => self.acked(a.packet_id, AckKind::Received, a.reason, out),
            Packet::PubComp(a) => self.acked(a.packet_id, AckKind::Complete, a.reason, out),
            Packet::PubRel(a) => self.released(a.packet_id, out),
            Packet::Subscribe(s) => self.subscribe(s, out),
            Packet::Unsubscribe(u) => self.unsubscribe(u, out),
            Packet::PingReq => out.client.push(Packet::PingResp),
            Packet::Disconnect(d) => {
                if self.v5() && d.reason != 0x00 && d.reason != 0x04 {
                    // Any other reason code is the client reporting its own error.
                    tracing::debug!(reason = d.reason, "client disconnected with an error");
                }
                out.end = Some(End::Client {
                    with_will: d.reason == 0x04,
                    session_expiry: d.session_expiry,
                });
            }
            Packet::Auth(_) => {
                out.end = Some(End::Violation(
                    code::PROTOCOL_ERROR,
                    "AUTH without an authentication method",
                ));
            }
            Packet::Connect(_) => {
                out.end = Some(End::Violation(code::PROTOCOL_ERROR, "a second CONNECT"));
            }
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                out.end = Some(End::Violation(
                    code::PROTOCOL_ERROR,
                    "a packet only a server sends",
                ));
            }
        }
    }

    fn publish(&mut self, mut p: Publish, out: &mut Out) {
        // Topic aliases: the client's own, up to the maximum the CONNACK announced.
        if let Some(alias) = p.properties.topic_alias {
            p.properties.make_mut().topic_alias = None;
            if alias == 0 || alias > self.settings.topic_alias_max {
                out.end = Some(End::Violation(
                    code::TOPIC_ALIAS_INVALID,
                    "topic alias out of range",
                ));
                return;
            }
            if p.topic.is_empty() {
                match self.aliases_in.get(&alias) {
                    Some(topic) => p.topic = topic.clone(),
                    None => {
                        out.end = Some(End::Violation(
                            code::PROTOCOL_ERROR,
                            "topic alias not set before",
                        ));
                        return;
                    }
                }
            } else {
                self.aliases_in.insert(alias, p.topic.clone());
            }
        }
        if p.topic.is_empty() {
            out.end = Some(End::Violation(code::TOPIC_NAME_INVALID, "empty topic"));
            return;
        }
        if p.payload.len() > self.settings.max_payload {
            out.end = Some(End::Violation(
                code::PACKET_TOO_LARGE,
                "payload over the limit",
            ));
            return;
        }
        if p.qos == QoS::ExactlyOnce {
            if self.qos2_in.contains(&p.packet_id) {
                // A retransmission: acknowledged again, delivered once.
                out.client
                    .push(Packet::PubRec(ack(p.packet_id, code::SUCCESS)));
                return;
            }
            if self.qos2_in.len() >= usize::from(self.settings.receive_maximum) {
                out.end = Some(End::Violation(
                    code::RECEIVE_MAXIMUM_EXCEEDED,
                    "more QoS 2 publishes in flight than Receive Maximum",
                ));
                return;
            }
        }
        if let Err(retry) = self.settings.policy.admit(&self.rate_key) {
            self.settings.policy.count(Door::Mqtt, Refusal::Rate);
            out.pause = Some(retry);
        }
        let allowed = if p.topic.starts_with("$SYS") {
            Err(code::NOT_AUTHORIZED)
        } else {
            match self
                .settings
                .policy
                .authorize(&self.principal, Action::Publish, &p.topic)
            {
                Ok(()) => Ok(()),
                Err(Denial::TooLong(_) | Denial::TooDeep(_)) => Err(code::TOPIC_NAME_INVALID),
                Err(_) => {
                    self.settings.policy.count(Door::Mqtt, Refusal::Acl);
                    Err(code::NOT_AUTHORIZED)
                }
            }
        };
        let (qos, packet_id) = (p.qos, p.packet_id);
        let reason = match allowed {
            Ok(()) => {
                out.tally.publishes_in += 1;
                // MQTT 5 tells a QoS 1 publisher when nobody subscribes, as Mosquitto does.
                let unheard = qos == QoS::AtLeastOnce
                    && self.v5()
                    && !self.settings.has_subscribers(&p.topic);
                self.route(p, out);
                if unheard {
                    code::NO_MATCHING_SUBSCRIBERS
                } else {
                    code::SUCCESS
                }
            }
            Err(reason) => {
                tracing::debug!(topic = %p.topic, "publish refused by the ACL");
                reason
            }
        };
        // MQTT 3.1.1 has no way to say no to a publish: it is acknowledged and dropped.
        let reason = if self.v5() { reason } else { code::SUCCESS };
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => out.client.push(Packet::PubAck(ack(packet_id, reason))),
            QoS::ExactlyOnce => {
                if reason == code::SUCCESS {
                    self.qos2_in.insert(packet_id);
                }
                out.client.push(Packet::PubRec(ack(packet_id, reason)));
            }
        }
    }

    /// Hands an accepted publish to the router, when some subscription can read it there, and
    /// to the bridge, which takes the publish's own buffers.
    fn route(&mut self, p: Publish, out: &mut Out) {
        if self.settings.is_read(&mut self.audience, &p.topic) {
            self.hand_to_router(&p, out);
        }
        let props = p.properties.into_inner();
        out.bridge.push(MqttPublish {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos as u8,
            retain: p.retain,
            content_type: props.content_type,
            user_properties: props.user_properties,
            response_topic: props.response_topic,
            correlation_data: props.correlation_data,
            expiry_secs: props.message_expiry_interval,
        });
    }

    /// Hands an accepted publish to the router.
    fn hand_to_router(&mut self, p: &Publish, out: &mut Out) {
        let props = &*p.properties;
        let mut rprops = r::PublishProperties {
            payload_format_indicator: props.payload_format_indicator,
            message_expiry_interval: props.message_expiry_interval,
            topic_alias: None,
            response_topic: props.response_topic.clone(),
            correlation_data: props.correlation_data.clone(),
            user_properties: props.user_properties.clone(),
            subscription_identifiers: Vec::new(),
            content_type: props.content_type.clone(),
        };
        Meta::from_client(p.retain, p.qos as u8).attach(&mut rprops.payload_format_indicator);
        if self.settings.no_local_in_use() {
            rprops
                .user_properties
                .push((TRACE.to_owned(), self.origin.to_string()));
        }
        // rumqttd keeps no retained messages (the gateway's store does), and delivers at
        // each subscriber's QoS: the publish QoS travels in the marker.
        let topic = to_router(p.topic.as_bytes().clone());
        if let Some(reader) = self
            .settings
            .flow
            .publish(&mut self.matcher, &topic, &p.payload)
        {
            out.blocked = Some(reader);
        }
        let publish = r::Publish::new(topic, p.payload.clone(), false);
        out.router.push(r::Packet::Publish(publish, Some(rprops)));
    }

    fn acked(&mut self, id: u16, kind: AckKind, reason: u8, out: &mut Out) {
        let Some((qos, released)) = self.in_flight.get(&id).map(|f| (f.qos, f.released)) else {
            // An acknowledgement for nothing in flight is ignored, as Mosquitto does, except a
            // PUBREC: the client may have lost the PUBREL, so it is sent (again).
            if kind == AckKind::Received && reason < 0x80 {
                out.client.push(Packet::PubRel(ack(id, code::SUCCESS)));
            }
            return;
        };
        match (qos, released, kind) {
            (QoS::AtLeastOnce, _, AckKind::Ack)
            | (QoS::ExactlyOnce, true, AckKind::Complete)
            // MQTT 5 §4.3.3: a PUBREC with a failure reason ends the exchange.
            | (QoS::ExactlyOnce, false, AckKind::Received)
                if kind != AckKind::Received || reason >= 0x80 =>
            {
                self.landed(id);
            }
            (QoS::ExactlyOnce, false, AckKind::Received) => {
                if let Some(flight) = self.in_flight.get_mut(&id) {
                    flight.released = true;
                }
                out.client.push(Packet::PubRel(ack(id, code::SUCCESS)));
            }
            // The PUBREL was lost: sent again.
            (QoS::ExactlyOnce, true, AckKind::Received) => {
                out.client.push(Packet::PubRel(ack(id, code::SUCCESS)));
            }
            _ => {
                out.end = Some(End::Violation(
                    code::PROTOCOL_ERROR,
                    "an acknowledgement of the wrong kind",
                ));
                return;
            }
        }
        self.send_waiting(out);
    }

    fn released(&mut self, id: u16, out: &mut Out) {
        // A PUBREL for an id not awaited (its PUBCOMP was lost) is answered with success too,
        // as Mosquitto does: the message was delivered once either way.
        self.qos2_in.remove(&id);
        out.client.push(Packet::PubComp(ack(id, code::SUCCESS)));
    }

    fn subscribe(&mut self, s: Subscribe, out: &mut Out) {
        let v5 = self.v5();
        let mut codes = Vec::with_capacity(s.subscriptions.len());
        for sub in s.subscriptions {
            let code = self.subscribe_one(sub, s.subscription_identifier, out);
            codes.push(match code {
                Ok((qos, _)) => qos as u8,
                Err(reason) if v5 => reason,
                Err(_) => 0x80,
            });
        }
        // After the retained values were read, before the SUBSCRIBE goes to the router.
        self.settings.flush_gateway();
        let waiting = std::mem::take(&mut self.router_waiting);
        self.subacks.push_back(PendingSubAck {
            suback: SubAck {
                packet_id: s.packet_id,
                codes,
                ..SubAck::default()
            },
            router_ids: waiting,
            retained: std::mem::take(&mut self.pending_retained),
        });
        self.release_subacks(out);
    }

    /// Writes the SUBACKs whose filters the router has all taken, each followed by its
    /// retained messages.
    fn release_subacks(&mut self, out: &mut Out) {
        while self
            .subacks
            .front()
            .is_some_and(|p| p.router_ids.is_empty())
        {
            let Some(done) = self.subacks.pop_front() else {
                break;
            };
            out.client.push(Packet::SubAck(done.suback));
            for (id, publish) in done.retained {
                self.deliver_own(id, publish, out);
            }
        }
    }

    /// The router acknowledged one of the SUBSCRIBEs it was given.
    fn router_subscribed(&mut self, router_id: u16, out: &mut Out) {
        for pending in &mut self.subacks {
            if pending.router_ids.remove(&router_id) {
                break;
            }
        }
        self.release_subacks(out);
    }

    /// Subscribes one filter; the granted QoS and whether it is new, or the reason it is not.
    fn subscribe_one(
        &mut self,
        sub: Subscription,
        identifier: Option<u32>,
        out: &mut Out,
    ) -> Result<(QoS, bool), u8> {
        let (group, inner) = split_share(&sub.filter);
        if group.is_some() && sub.no_local {
            return Err(code::PROTOCOL_ERROR);
        }
        let scope = match self.settings.policy.subscription(&self.principal, inner) {
            Ok(scope) => scope,
            Err(Denial::TooLong(_) | Denial::TooDeep(_)) => return Err(code::TOPIC_FILTER_INVALID),
            Err(_) => {
                self.settings.policy.count(Door::Mqtt, Refusal::Acl);
                return Err(code::NOT_AUTHORIZED);
            }
        };
        let qos = sub.qos;
        let held = Held {
            filter: sub.filter.clone(),
            qos,
            no_local: sub.no_local,
            retain_as_published: sub.retain_as_published,
            identifier,
            scope,
            wild_first: inner.starts_with(['+', '#']),
        };
        if held.no_local {
            self.settings.no_local_added();
        }
        let (id, new) = match self.by_filter.get(&sub.filter) {
            Some(&id) => {
                if self.held.insert(id, held).is_some_and(|old| old.no_local) {
                    self.settings.no_local_removed();
                }
                (id, false)
            }
            None => {
                let id = self.next_sub;
                self.next_sub += 1;
                self.by_filter.insert(sub.filter.clone(), id);
                self.held.insert(id, held);
                self.readers.insert(id, join(&self.settings, &sub.filter));
                self.settings.subscribed(inner);
                (id, true)
            }
        };
        self.router_sub_id = self.router_sub_id.wrapping_add(1).max(1);
        self.router_waiting.insert(self.router_sub_id);
        out.router.push(r::Packet::Subscribe(
            r::Subscribe {
                pkid: self.router_sub_id,
                filters: vec![r::Filter {
                    path: filter_to_router(&sub.filter),
                    qos: r::QoS::AtMostOnce,
                    nolocal: false,
                    preserve_retain: false,
                    retain_forward_rule: r::RetainForwardRule::Never,
                }],
            },
            Some(r::SubscribeProperties {
                id: Some(id),
                user_properties: Vec::new(),
            }),
        ));
        let wanted = match sub.retain_handling {
            0 => true,
            1 => new,
            _ => false,
        };
        // MQTT 5 §4.8.2: no retained messages for shared subscriptions.
        if wanted && group.is_none() {
            for m in self.settings.retained.retained_matching(inner) {
                self.pending_retained.push((id, m));
            }
        }
        Ok((qos, new))
    }

    fn unsubscribe(&mut self, u: Unsubscribe, out: &mut Out) {
        let mut codes = Vec::with_capacity(u.filters.len());
        for filter in u.filters {
            match self.by_filter.remove(&filter) {
                Some(id) => {
                    if let Some(reader) = self.readers.remove(&id) {
                        self.settings.flow.leave(&reader, split_share(&filter).0);
                    }
                    if self.held.remove(&id).is_some_and(|old| old.no_local) {
                        self.settings.no_local_removed();
                    }
                    self.settings.unsubscribed(split_share(&filter).1);
                    self.router_sub_id = self.router_sub_id.wrapping_add(1).max(1);
                    out.router.push(r::Packet::Unsubscribe(
                        r::Unsubscribe {
                            pkid: self.router_sub_id,
                            filters: vec![filter_to_router(&filter)],
                        },
                        None,
                    ));
                    codes.push(code::SUCCESS);
                }
                None => codes.push(code::NO_SUBSCRIPTION_EXISTED),
            }
        }
        out.client.push(Packet::UnsubAck(SubAck {
            packet_id: u.packet_id,
            codes,
            ..SubAck::default()
        }));
    }

    /// One notification from the router.
    pub(super) fn router(&mut self, notification: Notification, out: &mut Out) {
        self.idle_marks = None;
        match notification {
            Notification::Forward(forward) => self.forwarded(forward, out),
            Notification::Unschedule => {
                if self.waiting.len() >= MAX_WAITING {
                    self.router_paused = true;
                } else {
                    out.wake_router = true;
                }
            }
            Notification::Disconnect(..) => {
                out.end = Some(End::Violation(
                    code::UNSPECIFIED,
                    "the router ended the session",
                ));
            }
            other @ Notification::DeviceAck(_) => {
                // The session answers the client's SUBSCRIBE, UNSUBSCRIBE, PUBLISH and PINGREQ
                // itself; of the router's acknowledgements only PUBREL goes on.
                if let Some(r::Packet::SubAck(suback, _)) = Option::<r::Packet>::from(other) {
                    self.router_subscribed(suback.pkid, out);
                }
            }
            _ => {}
        }
    }

    fn forwarded(&mut self, forward: Forward, out: &mut Out) {
        let Forward {
            publish,
            properties,
            cursor,
            ..
        } = forward;
        let mut props = properties.unwrap_or_default();
        let meta = Meta::detach(&mut props.payload_format_indicator);
        let trace = take_trace(&mut props.user_properties);
        let id = props.subscription_identifiers.pop();
        let size = log_size(&publish.topic, &publish.payload);
        let topic = from_router(publish.topic);
        let Ok(topic) = ByteString::try_from(topic) else {
            return;
        };
        let Some((held_id, held)) = self.held_for(id, &topic) else {
            return;
        };
        if let Some(reader) = self.readers.get(&held_id) {
            let skipped = reader.forwarded(size, cursor.map(|c| c.1));
            if skipped > 0 {
                self.settings.skipped(skipped);
            }
        }
        let origin = trace.unwrap_or(0);
        let dropped = held.no_local && origin == self.origin && origin != 0
            || held.wild_first && topic.starts_with('$')
            || !held.scope.admits(&topic);
        let delivery = (!dropped).then(|| {
            let published = meta.map_or(QoS::AtMostOnce, |m| qos_of(m.qos));
            let qos = published.min(held.qos);
            let retain = held.retain_as_published && meta.is_some_and(|m| m.retain);
            let subscription_identifiers = held.identifier.into_iter().collect();
            Publish {
                dup: false,
                qos,
                retain,
                topic,
                packet_id: 0,
                properties: PublishProperties {
                    payload_format_indicator: props.payload_format_indicator,
                    // The router counts down the expiry of what it held, and drops what expired.
                    message_expiry_interval: props.message_expiry_interval,
                    topic_alias: None,
                    response_topic: props.response_topic.take(),
                    correlation_data: props.correlation_data.take(),
                    user_properties: std::mem::take(&mut props.user_properties),
                    subscription_identifiers,
                    content_type: props.content_type.take(),
                }
                .into(),
                payload: publish.payload,
            }
        });
        tracing::trace!(
            delivered = ?delivery.as_ref().map(|p| (&p.topic, p.qos)),
            "forwarded by the router"
        );
        let Some(p) = delivery else {
            return;
        };
        // Only a client with several subscriptions can be sent copies of one message.
        if self.held.len() < 2 {
            return self.deliver(p, out);
        }
        if !self.joined(&p, held_id, out) {
            let at = out.client.len();
            let (payload, topic) = (p.payload.clone(), p.topic.clone());
            self.deliver(p, out);
            if out.client.len() > at {
                out.copies.note(&payload, topic, at, held_id);
            }
        }
    }

    /// Adds a message matched by several of the client's subscriptions to the copy already on
    /// its way, as one PUBLISH with every subscription identifier (MQTT 5 §3.3.4), when that
    /// copy has at least its QoS and the same retain flag; `false` leaves it to go on its own.
    /// The router hands over the copies of one message in one batch, so only the batch's are
    /// looked at.
    fn joined(&mut self, p: &Publish, held_id: usize, out: &mut Out) -> bool {
        let Some(earlier) = out.copies.earlier(&p.payload, &p.topic, held_id) else {
            return false;
        };
        let Some(Packet::Publish(sent)) = out.client.get_mut(earlier.at) else {
            return false;
        };
        if sent.qos < p.qos || sent.retain != p.retain {
            return false;
        }
        let ids = &p.properties.subscription_identifiers;
        if !ids.is_empty() {
            let mut joined = sent.clone();
            let all = &mut joined.properties.make_mut().subscription_identifiers;
            all.extend(ids);
            let all = all.clone();
            // The identifiers must not take the copy past the client's Maximum Packet Size.
            if self.too_large(&joined) {
                return false;
            }
            *sent = joined;
            let kept = self.in_flight.get_mut(&sent.packet_id);
            if let Some(kept) = kept.and_then(|f| f.publish.as_mut()) {
                kept.properties.make_mut().subscription_identifiers = all;
            }
        }
        out.copies.join(&earlier, held_id);
        true
    }

    /// Sends a publish at its QoS: at once for QoS 0, under a packet id of the session's for
    /// QoS 1 and 2.
    fn deliver(&mut self, p: Publish, out: &mut Out) {
        if p.qos == QoS::AtMostOnce {
            self.write(p, out);
        } else {
            self.send(p, out);
        }
    }

    /// The held subscription a forwarded message came through: by the identifier the router
    /// put on it, or (a session restored without identifiers) the first filter that matches.
    fn held_for(&self, id: Option<usize>, topic: &str) -> Option<(usize, &Held)> {
        if let Some(id) = id {
            return self.held.get(&id).map(|h| (id, h));
        }
        self.held
            .iter()
            .find(|(_, h)| crate::topic::matches(split_share(&h.filter).1, topic))
            .map(|(id, h)| (*id, h))
    }

    /// Takes an own publish out of flight.
    fn landed(&mut self, id: u16) {
        self.in_flight.remove(&id);
    }

    /// A retained message for a new subscription, sent by the session itself.
    fn deliver_own(&mut self, id: usize, m: MqttPublish, out: &mut Out) {
        let Some(held) = self.held.get(&id) else {
            return;
        };
        if held.wild_first && m.topic.starts_with('$') || !held.scope.admits(&m.topic) {
            return;
        }
        let qos = qos_of(m.qos).min(held.qos);
        let p = Publish {
            dup: false,
            qos,
            retain: true,
            topic: m.topic,
            packet_id: 0,
            properties: PublishProperties {
                message_expiry_interval: m.expiry_secs,
                response_topic: m.response_topic,
                correlation_data: m.correlation_data,
                user_properties: m.user_properties,
                subscription_identifiers: held.identifier.into_iter().collect(),
                content_type: m.content_type,
                ..PublishProperties::default()
            }
            .into(),
            payload: m.payload,
        };
        self.deliver(p, out);
    }

    /// Sends a QoS 1/2 publish now, or keeps it until the client's Receive Maximum allows.
    /// Sends a QoS 1/2 publish now, or keeps it until the client's Receive Maximum allows;
    /// its packet id is given when it goes out.
    fn send(&mut self, mut p: Publish, out: &mut Out) {
        if self.too_large(&p) {
            // MQTT 5 §3.1.2.24: a packet over the client's maximum is discarded as if sent.
            return;
        }
        if self.in_flight.len() >= self.client_receive_max {
            self.waiting.push_back(p);
            return;
        }
        p.packet_id = self.own_id();
        out.tally.publishes_out += 1;
        self.in_flight.insert(
            p.packet_id,
            Flight {
                qos: p.qos,
                released: false,
                publish: self.kept_after.then(|| p.clone()),
            },
        );
        let p = self.aliased(p);
        out.client.push(Packet::Publish(p));
    }

    /// The publish as written to the client: under a topic alias when the client takes them.
    fn aliased(&mut self, mut p: Publish) -> Publish {
        if self.alias_max_out == 0 {
            return p;
        }
        if let Some(&alias) = self.aliases_out.get(&p.topic) {
            p.topic = ByteString::new();
            p.properties.make_mut().topic_alias = Some(alias);
        } else if let Ok(n) = u16::try_from(self.aliases_out.len())
            && n < self.alias_max_out
        {
            self.aliases_out.insert(p.topic.clone(), n + 1);
            p.properties.make_mut().topic_alias = Some(n + 1);
        }
        p
    }

    fn send_waiting(&mut self, out: &mut Out) {
        while self.in_flight.len() < self.client_receive_max {
            let Some(p) = self.waiting.pop_front() else {
                break;
            };
            self.send(p, out);
        }
        if self.router_paused && self.waiting.len() < MAX_WAITING / 2 {
            self.router_paused = false;
            out.wake_router = true;
        }
    }

    fn write(&mut self, p: Publish, out: &mut Out) {
        if self.too_large(&p) {
            return;
        }
        out.tally.publishes_out += 1;
        let p = self.aliased(p);
        out.client.push(Packet::Publish(p));
    }

    fn too_large(&self, p: &Publish) -> bool {
        self.client_max_packet != usize::MAX
            && super::wire::encoded_len(&Packet::Publish(p.clone()), self.version)
                > self.client_max_packet
    }

    fn own_id(&mut self) -> u16 {
        loop {
            let id = self.next_own;
            self.next_own = if id == u16::MAX { 1 } else { id + 1 };
            if !self.in_flight.contains_key(&id) {
                return id;
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckKind {
    Ack,
    Received,
    Complete,
}

fn ack(packet_id: u16, reason: u8) -> Ack {
    Ack {
        packet_id,
        reason,
        ..Ack::default()
    }
}

fn qos_of(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// `$share/group/filter` into its group and filter.
pub(super) fn split_share(filter: &str) -> (Option<&str>, &str) {
    match filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
    {
        Some((group, inner)) => (Some(group), inner),
        None => (None, filter),
    }
}

/// The publishing connection a publish's marker names, with the marker taken out.
fn take_trace(props: &mut Vec<(String, String)>) -> Option<u64> {
    let at = props.iter().rposition(|(k, _)| k == TRACE)?;
    let (_, origin) = props.remove(at);
    origin.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscribed(settings: &Arc<Settings>, filter: &str) -> Session {
        let mut session = Session::new(
            settings.clone(),
            Version::V311,
            Principal::Anonymous,
            "idle-test",
            1,
            None,
            None,
            None,
            Kept::default(),
        );
        let mut out = Out::default();
        session.client(
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                subscriptions: vec![Subscription {
                    filter: filter.to_owned(),
                    qos: QoS::AtMostOnce,
                    ..Subscription::default()
                }],
                ..Subscribe::default()
            }),
            &mut out,
        );
        session
    }

    #[test]
    fn a_reader_counted_behind_is_set_right_after_two_quiet_idle_checks() {
        let settings = Settings::for_tests();
        let mut session = subscribed(&settings, "idle/#");
        assert!(!session.behind());
        // A publish counted for the filter that the router never forwards (it expired there).
        let mut matcher = Matcher::default();
        let topic = bytes::Bytes::from_static(b"idle/x");
        let _ = settings.flow.publish(&mut matcher, &topic, b"payload");
        assert!(session.behind());
        assert!(session.idle(), "the first check only takes note");
        // Anything from the router in between starts the watch again.
        session.router(Notification::Unschedule, &mut Out::default());
        assert!(session.idle());
        // New publishes between two checks: the filter is busy, nothing is set right.
        let _ = settings.flow.publish(&mut matcher, &topic, b"payload");
        assert!(session.idle());
        assert!(!session.idle(), "two quiet checks in a row: caught up");
        assert!(!session.behind());
    }

    #[test]
    fn a_reply_to_a_gateway_call_goes_to_the_bridge_alone() {
        let settings = Settings::for_tests();
        // Even a session whose filter covers the reply topic may not read it.
        let mut session = subscribed(&settings, "#");
        for (topic, routed) in [("rpc/replies/00ff", false), ("rpc/other", true)] {
            let mut out = Out::default();
            let publish = Publish {
                topic: topic.into(),
                payload: bytes::Bytes::from_static(b"answer"),
                ..Publish::default()
            };
            session.client(Packet::Publish(publish), &mut out);
            assert_eq!(out.bridge.len(), 1, "{topic}");
            assert_eq!(!out.router.is_empty(), routed, "{topic}");
        }
    }

    #[test]
    fn a_publish_nobody_reads_goes_to_the_bridge_alone() {
        let settings = Settings::for_tests();
        let mut publisher = subscribed(&settings, "elsewhere/#");
        // (messages to the bridge, whether the router got one)
        let mut publish = || {
            let mut out = Out::default();
            let publish = Publish {
                topic: "lonely/x".into(),
                payload: bytes::Bytes::from_static(b"reading"),
                ..Publish::default()
            };
            publisher.client(Packet::Publish(publish), &mut out);
            (out.bridge.len(), !out.router.is_empty())
        };
        assert_eq!(publish(), (1, false));
        let reader = subscribed(&settings, "lonely/+");
        assert_eq!(publish(), (1, true));
        // Offline with its session kept, the subscriber still has messages kept for it.
        let kept = reader.keep();
        assert_eq!(publish(), (1, true));
        drop(kept);
        assert_eq!(publish(), (1, false));
    }
}
