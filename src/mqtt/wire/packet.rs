//! The MQTT control packets of versions 3.1, 3.1.1 and 5 as plain values: what the codec reads
//! and writes, and all the session ever looks at.

use bytes::Bytes;
use bytestring::ByteString;

/// The protocol version a connection speaks, fixed by its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub(crate) enum Version {
    /// MQTT 3.1: protocol name `MQIsdp`, level 3.
    V31,
    /// MQTT 3.1.1: protocol name `MQTT`, level 4.
    #[default]
    V311,
    /// MQTT 5: protocol name `MQTT`, level 5.
    V5,
}

/// Quality of service of a publish or a subscription (MQTT's own names).
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub(crate) enum QoS {
    /// At most once.
    #[default]
    AtMostOnce = 0,
    /// At least once.
    AtLeastOnce = 1,
    /// Exactly once.
    ExactlyOnce = 2,
}

/// One MQTT 5 user property.
pub(crate) type UserProperty = (String, String);

/// Every control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Packet {
    /// CONNECT (1).
    Connect(Box<Connect>),
    /// CONNACK (2).
    ConnAck(Box<ConnAck>),
    /// PUBLISH (3).
    Publish(Publish),
    /// PUBACK (4).
    PubAck(Ack),
    /// PUBREC (5).
    PubRec(Ack),
    /// PUBREL (6).
    PubRel(Ack),
    /// PUBCOMP (7).
    PubComp(Ack),
    /// SUBSCRIBE (8).
    Subscribe(Subscribe),
    /// SUBACK (9).
    SubAck(SubAck),
    /// UNSUBSCRIBE (10).
    Unsubscribe(Unsubscribe),
    /// UNSUBACK (11).
    UnsubAck(SubAck),
    /// PINGREQ (12).
    PingReq,
    /// PINGRESP (13).
    PingResp,
    /// DISCONNECT (14).
    Disconnect(Disconnect),
    /// AUTH (15, MQTT 5 only).
    Auth(Auth),
}

/// CONNECT.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Connect {
    /// Version named by the protocol name and level.
    pub(crate) version: Version,
    /// Clean Session (3.1/3.1.1) or Clean Start (5).
    pub(crate) clean_start: bool,
    /// Keep Alive, seconds; 0 turns it off.
    pub(crate) keep_alive: u16,
    /// Client Identifier, possibly empty.
    pub(crate) client_id: String,
    /// The will, when the Will Flag is set.
    pub(crate) will: Option<Will>,
    /// User Name, when its flag is set.
    pub(crate) username: Option<String>,
    /// Password, when its flag is set.
    pub(crate) password: Option<Bytes>,
    /// Session Expiry Interval (17), seconds.
    pub(crate) session_expiry: Option<u32>,
    /// Receive Maximum (33); never 0 once decoded.
    pub(crate) receive_maximum: Option<u16>,
    /// Maximum Packet Size (39); never 0 once decoded.
    pub(crate) maximum_packet_size: Option<u32>,
    /// Topic Alias Maximum (34).
    pub(crate) topic_alias_maximum: Option<u16>,
    /// Request Response Information (25): 0 or 1.
    pub(crate) request_response_information: Option<u8>,
    /// Request Problem Information (23): 0 or 1.
    pub(crate) request_problem_information: Option<u8>,
    /// User Property (38), in order.
    pub(crate) user_properties: Vec<UserProperty>,
    /// Authentication Method (21).
    pub(crate) authentication_method: Option<String>,
    /// Authentication Data (22).
    pub(crate) authentication_data: Option<Bytes>,
}

/// The will of a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Will {
    /// Will Topic.
    pub(crate) topic: String,
    /// Will Payload.
    pub(crate) payload: Bytes,
    /// Will QoS.
    pub(crate) qos: QoS,
    /// Will Retain.
    pub(crate) retain: bool,
    /// Will Delay Interval (24), seconds.
    pub(crate) delay_interval: Option<u32>,
    /// The will's message properties (format indicator, expiry, content type, response
    /// topic, correlation data, user properties); its `topic_alias` and
    /// `subscription_identifiers` are always empty.
    pub(crate) properties: PublishProperties,
}

/// CONNACK.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct ConnAck {
    /// Session Present.
    pub(crate) session_present: bool,
    /// The reason code (5) or return code (3.1, 3.1.1), written as given.
    pub(crate) code: u8,
    /// Session Expiry Interval (17).
    pub(crate) session_expiry: Option<u32>,
    /// Receive Maximum (33).
    pub(crate) receive_maximum: Option<u16>,
    /// Maximum QoS (36).
    pub(crate) maximum_qos: Option<u8>,
    /// Retain Available (37).
    pub(crate) retain_available: Option<u8>,
    /// Maximum Packet Size (39).
    pub(crate) maximum_packet_size: Option<u32>,
    /// Assigned Client Identifier (18).
    pub(crate) assigned_client_identifier: Option<String>,
    /// Topic Alias Maximum (34).
    pub(crate) topic_alias_maximum: Option<u16>,
    /// Reason String (31).
    pub(crate) reason_string: Option<String>,
    /// User Property (38).
    pub(crate) user_properties: Vec<UserProperty>,
    /// Wildcard Subscription Available (40).
    pub(crate) wildcard_subscription_available: Option<u8>,
    /// Subscription Identifiers Available (41).
    pub(crate) subscription_identifiers_available: Option<u8>,
    /// Shared Subscription Available (42).
    pub(crate) shared_subscription_available: Option<u8>,
    /// Server Keep Alive (19).
    pub(crate) server_keep_alive: Option<u16>,
    /// Response Information (26).
    pub(crate) response_information: Option<String>,
    /// Server Reference (28).
    pub(crate) server_reference: Option<String>,
    /// Authentication Method (21).
    pub(crate) authentication_method: Option<String>,
    /// Authentication Data (22).
    pub(crate) authentication_data: Option<Bytes>,
}

/// The properties a PUBLISH (and a will) may carry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct PublishProperties {
    /// Payload Format Indicator (1): 0 or 1.
    pub(crate) payload_format_indicator: Option<u8>,
    /// Message Expiry Interval (2), seconds.
    pub(crate) message_expiry_interval: Option<u32>,
    /// Topic Alias (35); never 0 once decoded.
    pub(crate) topic_alias: Option<u16>,
    /// Response Topic (8).
    pub(crate) response_topic: Option<String>,
    /// Correlation Data (9).
    pub(crate) correlation_data: Option<Bytes>,
    /// User Property (38), in order.
    pub(crate) user_properties: Vec<UserProperty>,
    /// Subscription Identifier (11), one per matching subscription (server to client only).
    pub(crate) subscription_identifiers: Vec<u32>,
    /// Content Type (3).
    pub(crate) content_type: Option<String>,
}

/// A publish's properties, boxed, and absent when there are none: most publishes carry none,
/// and a PUBLISH is moved several times on its way through the session, where unboxed
/// properties were two thirds of its size. Reads go through `Deref`; writes through
/// [`Props::make_mut`], which allocates only then.
#[derive(Debug, Clone, Default)]
pub(crate) struct Props(Option<Box<PublishProperties>>);

static NO_PROPERTIES: PublishProperties = PublishProperties {
    payload_format_indicator: None,
    message_expiry_interval: None,
    topic_alias: None,
    response_topic: None,
    correlation_data: None,
    user_properties: Vec::new(),
    subscription_identifiers: Vec::new(),
    content_type: None,
};

impl std::ops::Deref for Props {
    type Target = PublishProperties;

    fn deref(&self) -> &PublishProperties {
        self.0.as_deref().unwrap_or(&NO_PROPERTIES)
    }
}

impl PartialEq for Props {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Props {}

impl PublishProperties {
    /// Whether no property is present.
    fn is_empty(&self) -> bool {
        let Self {
            payload_format_indicator,
            message_expiry_interval,
            topic_alias,
            response_topic,
            correlation_data,
            user_properties,
            subscription_identifiers,
            content_type,
        } = self;
        payload_format_indicator.is_none()
            && message_expiry_interval.is_none()
            && topic_alias.is_none()
            && response_topic.is_none()
            && correlation_data.is_none()
            && user_properties.is_empty()
            && subscription_identifiers.is_empty()
            && content_type.is_none()
    }
}

impl From<PublishProperties> for Props {
    fn from(p: PublishProperties) -> Self {
        if p.is_empty() {
            Self(None)
        } else {
            Self(Some(Box::new(p)))
        }
    }
}

impl Props {
    /// The properties to change; allocated on first use.
    pub(crate) fn make_mut(&mut self) -> &mut PublishProperties {
        self.0.get_or_insert_with(Box::default)
    }

    /// The properties by value.
    pub(crate) fn into_inner(self) -> PublishProperties {
        self.0.map(|b| *b).unwrap_or_default()
    }
}

/// PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Publish {
    /// DUP flag.
    pub(crate) dup: bool,
    /// QoS.
    pub(crate) qos: QoS,
    /// RETAIN flag.
    pub(crate) retain: bool,
    /// Topic Name; empty when an MQTT 5 Topic Alias stands for it. Decoded, it shares the
    /// packet's buffer.
    pub(crate) topic: ByteString,
    /// Packet Identifier: present (non-zero) exactly when QoS > 0.
    pub(crate) packet_id: u16,
    /// Properties (MQTT 5; empty otherwise).
    pub(crate) properties: Props,
    /// Application Message.
    pub(crate) payload: Bytes,
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP (which one is the `Packet` variant).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Ack {
    /// Packet Identifier; never 0 once decoded.
    pub(crate) packet_id: u16,
    /// Reason code (MQTT 5; 0 when absent on the wire or before version 5).
    pub(crate) reason: u8,
    /// Reason String (31).
    pub(crate) reason_string: Option<String>,
    /// User Property (38).
    pub(crate) user_properties: Vec<UserProperty>,
}

/// One topic filter of a SUBSCRIBE with its options.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Subscription {
    /// Topic Filter, as written (including `$share/group/`).
    pub(crate) filter: String,
    /// Maximum QoS.
    pub(crate) qos: QoS,
    /// No Local (MQTT 5).
    pub(crate) no_local: bool,
    /// Retain As Published (MQTT 5).
    pub(crate) retain_as_published: bool,
    /// Retain Handling (MQTT 5): 0, 1 or 2.
    pub(crate) retain_handling: u8,
}

/// SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Subscribe {
    /// Packet Identifier; never 0 once decoded.
    pub(crate) packet_id: u16,
    /// Subscription Identifier (11): 1 to 268,435,455.
    pub(crate) subscription_identifier: Option<u32>,
    /// User Property (38).
    pub(crate) user_properties: Vec<UserProperty>,
    /// The filters, at least one.
    pub(crate) subscriptions: Vec<Subscription>,
}

/// SUBACK or UNSUBACK.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct SubAck {
    /// Packet Identifier.
    pub(crate) packet_id: u16,
    /// Reason String (31).
    pub(crate) reason_string: Option<String>,
    /// User Property (38).
    pub(crate) user_properties: Vec<UserProperty>,
    /// One code per filter; an UNSUBACK before version 5 has none on the wire.
    pub(crate) codes: Vec<u8>,
}

/// UNSUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Unsubscribe {
    /// Packet Identifier; never 0 once decoded.
    pub(crate) packet_id: u16,
    /// User Property (38).
    pub(crate) user_properties: Vec<UserProperty>,
    /// The filters, at least one.
    pub(crate) filters: Vec<String>,
}

/// DISCONNECT.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Disconnect {
    /// Reason code (MQTT 5; 0 when absent).
    pub(crate) reason: u8,
    /// Session Expiry Interval (17).
    pub(crate) session_expiry: Option<u32>,
    /// Reason String (31).
    pub(crate) reason_string: Option<String>,
    /// User Property (38).
    pub(crate) user_properties: Vec<UserProperty>,
    /// Server Reference (28).
    pub(crate) server_reference: Option<String>,
}

/// AUTH (MQTT 5).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Auth {
    /// Reason code (0 when absent).
    pub(crate) reason: u8,
    /// Authentication Method (21).
    pub(crate) authentication_method: Option<String>,
    /// Authentication Data (22).
    pub(crate) authentication_data: Option<Bytes>,
    /// Reason String (31).
    pub(crate) reason_string: Option<String>,
    /// User Property (38).
    pub(crate) user_properties: Vec<UserProperty>,
}
