//! A strict, sans-I/O codec for MQTT 3.1, 3.1.1 and 5: `Decoder` frames and validates the
//! packets a client sends, `encode` writes packets for any version.

mod decode;
mod encode;
mod packet;

pub(crate) use decode::Decoder;
pub(crate) use encode::{encode, encoded_len};
pub(crate) use packet::{
    Ack, ConnAck, Connect, Disconnect, Packet, Publish, PublishProperties, QoS, SubAck, Subscribe,
    Subscription, Unsubscribe, Version,
};

/// What the connection should do after a decode error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Answer with a CONNACK carrying this code as written on the wire for `version` (before the CONNECT was accepted), then close.
    ConnAck {
        /// The version whose CONNACK layout to use.
        version: Version,
        /// The return code (3.1/3.1.1) or reason code (5).
        code: u8,
    },
    /// Answer with an MQTT 5 DISCONNECT with this reason code, then close.
    Disconnect(u8),
    /// Close without a word (MQTT 3.1/3.1.1, or nothing valid to say).
    Close,
}

impl Answer {
    /// The packet to send before closing, with the version to encode it for, if any.
    pub(crate) fn packet(&self) -> Option<(Packet, Version)> {
        match *self {
            Answer::ConnAck { version, code } => Some((
                Packet::ConnAck(Box::new(ConnAck {
                    code,
                    ..ConnAck::default()
                })),
                version,
            )),
            Answer::Disconnect(reason) => Some((
                Packet::Disconnect(Disconnect {
                    reason,
                    ..Disconnect::default()
                }),
                Version::V5,
            )),
            Answer::Close => None,
        }
    }

    /// Appends the bytes to send before closing (nothing for `Close`).
    pub(crate) fn encode(&self, out: &mut bytes::BytesMut) {
        if let Some((packet, version)) = self.packet() {
            encode(&packet, version, out);
        }
    }
}

/// A packet that must not be accepted, with what to tell the peer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{detail}")]
pub(crate) struct WireError {
    /// What the connection should send, if anything, before closing.
    pub(crate) answer: Answer,
    /// A short human-readable reason.
    pub(crate) detail: &'static str,
}

#[cfg(test)]
mod tests_codec;
#[cfg(test)]
mod tests_mosquitto_data;
