//! The publish as the rest of the gateway sees it, and the private marker that carries what
//! rumqttd forgets (retain flag, publish QoS, origin) from a client to the gateway's subscriber.

use bytes::Bytes;
use bytestring::ByteString;
use rumqttd::protocol::PublishProperties;

/// One MQTT publish, free of rumqttd types.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MqttPublish {
    /// Topic name.
    pub topic: ByteString,
    /// Payload bytes.
    pub payload: Bytes,
    /// QoS the publisher used.
    pub qos: u8,
    /// Retain flag the publisher set.
    pub retain: bool,
    /// MQTT 5 content type.
    pub content_type: Option<String>,
    /// MQTT 5 user properties, in order.
    pub user_properties: Vec<(String, String)>,
    /// MQTT 5 response topic.
    pub response_topic: Option<String>,
    /// MQTT 5 correlation data.
    pub correlation_data: Option<Bytes>,
    /// MQTT 5 message expiry interval, seconds.
    pub expiry_secs: Option<u32>,
}

impl MqttPublish {
    pub(crate) fn properties(&self, meta: Option<Meta>) -> PublishProperties {
        let mut payload_format_indicator = None;
        if let Some(meta) = meta {
            meta.attach(&mut payload_format_indicator);
        }
        PublishProperties {
            payload_format_indicator,
            content_type: self.content_type.clone(),
            user_properties: self.user_properties.clone(),
            response_topic: self.response_topic.clone(),
            correlation_data: self.correlation_data.clone(),
            message_expiry_interval: self.expiry_secs,
            ..PublishProperties::default()
        }
    }
}

/// Where the publishes of the broker's clients go (the gateway's store, streams and push
/// outbox). The connection that read them hands them over itself, in the order it read them:
/// no task between the socket and the outbox to wake per batch.
pub trait Inbound: Send + Sync {
    /// Takes every publish in `publishes`, leaving it empty. Never waits.
    fn take(&self, publishes: &mut Vec<MqttPublish>);
}

/// Where retained messages come from when a client subscribes.
pub trait RetainedSource: Send + Sync {
    /// The live retained messages whose topics match `filter`.
    fn retained_matching(&self, filter: &str) -> Vec<MqttPublish>;
}

/// What rumqttd's router drops on the way from a publisher to subscribers.
///
/// It travels in the high bits of the MQTT 5 payload format indicator, whose only valid values
/// are 0 and 1: no allocation per message, and restored before any client sees the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta {
    pub(crate) retain: bool,
    pub(crate) qos: u8,
    pub(crate) from_gateway: bool,
}

const MARK: u8 = 0x80;
const HAD_PFI: u8 = 0x40;
const FROM_GATEWAY: u8 = 0x10;
const RETAIN: u8 = 0x02;

impl Meta {
    pub(crate) fn from_client(retain: bool, qos: u8) -> Self {
        Self {
            retain,
            qos,
            from_gateway: false,
        }
    }

    /// Stores the marker, keeping the publisher's own indicator; replaces any forged marker.
    pub(crate) fn attach(self, pfi: &mut Option<u8>) {
        let original = match *pfi {
            Some(v) if v & MARK != 0 => (v & HAD_PFI != 0).then_some(v & 1),
            other => other,
        };
        let mut v = MARK | (self.qos.min(2) << 2);
        if let Some(p) = original {
            v |= HAD_PFI | (p & 1);
        }
        if self.retain {
            v |= RETAIN;
        }
        if self.from_gateway {
            v |= FROM_GATEWAY;
        }
        *pfi = Some(v);
    }

    /// Removes the marker, restoring the publisher's indicator, and returns what it said.
    pub(crate) fn detach(pfi: &mut Option<u8>) -> Option<Self> {
        let v = (*pfi)?;
        if v & MARK == 0 {
            return None;
        }
        *pfi = (v & HAD_PFI != 0).then_some(v & 1);
        Some(Self {
            retain: v & RETAIN != 0,
            qos: ((v >> 2) & 0b11).min(2),
            from_gateway: v & FROM_GATEWAY != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_round_trips_and_keeps_the_publishers_indicator() {
        for original in [None, Some(0), Some(1)] {
            for meta in [
                Meta::from_client(true, 2),
                Meta {
                    retain: false,
                    qos: 1,
                    from_gateway: true,
                },
            ] {
                let mut pfi = original;
                meta.attach(&mut pfi);
                assert_eq!(Meta::detach(&mut pfi), Some(meta));
                assert_eq!(pfi, original);
                assert_eq!(Meta::detach(&mut pfi), None);
            }
        }
    }

    #[test]
    fn a_forged_marker_is_replaced() {
        let mut pfi = Some(0xff);
        Meta::from_client(false, 0).attach(&mut pfi);
        assert_eq!(Meta::detach(&mut pfi), Some(Meta::from_client(false, 0)));
        assert_eq!(pfi, Some(1));
    }
}
