//! The publish as the rest of the gateway sees it, and the private marker that carries what
//! rumqttd forgets (retain flag, publish QoS, origin) from a client to the gateway's subscriber.

use bytes::Bytes;
use rumqttd::protocol::PublishProperties;

/// User-property key of the marker; never leaves the broker (stripped on every write).
const META_KEY: &str = "x-topicgate-meta";

/// One MQTT publish, free of rumqttd types.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MqttPublish {
    /// Topic name.
    pub topic: String,
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
        let mut user_properties = self.user_properties.clone();
        if let Some(meta) = meta {
            meta.attach(&mut user_properties);
        }
        PublishProperties {
            content_type: self.content_type.clone(),
            user_properties,
            response_topic: self.response_topic.clone(),
            correlation_data: self.correlation_data.clone(),
            message_expiry_interval: self.expiry_secs,
            ..PublishProperties::default()
        }
    }

    /// Rebuilds a publish from what the router forwarded; `None` for the gateway's own publishes.
    pub(crate) fn from_forward(
        topic: Bytes,
        payload: Bytes,
        props: Option<PublishProperties>,
    ) -> Option<Self> {
        let mut props = props.unwrap_or_default();
        let meta = Meta::detach(&mut props.user_properties).unwrap_or(Meta {
            retain: false,
            qos: 0,
            from_gateway: false,
        });
        if meta.from_gateway {
            return None;
        }
        Some(Self {
            topic: String::from_utf8_lossy(&topic).into_owned(),
            payload,
            qos: meta.qos,
            retain: meta.retain,
            content_type: props.content_type,
            user_properties: props.user_properties,
            response_topic: props.response_topic,
            correlation_data: props.correlation_data,
            expiry_secs: props.message_expiry_interval,
        })
    }
}

/// Where retained messages come from when a client subscribes.
pub trait RetainedSource: Send + Sync {
    /// The live retained messages whose topics match `filter`.
    fn retained_matching(&self, filter: &str) -> Vec<MqttPublish>;
}

/// What rumqttd's router drops on the way from a publisher to subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta {
    pub(crate) retain: bool,
    pub(crate) qos: u8,
    pub(crate) from_gateway: bool,
}

impl Meta {
    pub(crate) fn from_client(retain: bool, qos: u8) -> Self {
        Self {
            retain,
            qos,
            from_gateway: false,
        }
    }

    /// Adds the marker, replacing any a client tried to forge.
    pub(crate) fn attach(self, props: &mut Vec<(String, String)>) {
        Self::detach(props);
        let value = format!(
            "{}{}{}",
            u8::from(self.retain),
            self.qos.min(2),
            if self.from_gateway { 'g' } else { 'c' }
        );
        props.push((META_KEY.to_owned(), value));
    }

    /// Removes the marker and returns what it said.
    pub(crate) fn detach(props: &mut Vec<(String, String)>) -> Option<Self> {
        let at = props.iter().rposition(|(k, _)| k == META_KEY)?;
        let (_, value) = props.remove(at);
        props.retain(|(k, _)| k != META_KEY);
        let b = value.as_bytes();
        (b.len() == 3).then(|| Self {
            retain: b[0] == b'1',
            qos: b[1].saturating_sub(b'0').min(2),
            from_gateway: b[2] == b'g',
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_round_trips_and_replaces_forgeries() {
        let mut props = vec![
            ("a".to_owned(), "1".to_owned()),
            (META_KEY.to_owned(), "12g".to_owned()),
        ];
        Meta::from_client(true, 2).attach(&mut props);
        assert_eq!(props.iter().filter(|(k, _)| k == META_KEY).count(), 1);
        let meta = Meta::detach(&mut props);
        assert_eq!(meta, Some(Meta::from_client(true, 2)));
        assert_eq!(props, vec![("a".to_owned(), "1".to_owned())]);
        assert_eq!(Meta::detach(&mut props), None);
    }

    #[test]
    fn gateway_publishes_are_not_echoed_back() {
        let mut props = PublishProperties::default();
        Meta {
            retain: true,
            qos: 1,
            from_gateway: true,
        }
        .attach(&mut props.user_properties);
        let echoed = MqttPublish::from_forward("t".into(), "p".into(), Some(props));
        assert_eq!(echoed, None);
    }
}
