//! The embedded MQTT broker: the only module that names rumqttd. It serves MQTT 3.1.1 and 5 on
//! one port, keeps rumqttd's traps inside (see `protocol` and `link`), and hands the rest of the
//! gateway plain [`MqttPublish`] values.

mod broker;
mod link;
mod message;
mod protocol;

use std::net::SocketAddr;

pub use broker::Broker;
pub use link::{Link, LinkStats};
pub use message::{MqttPublish, RetainedSource};

/// What can go wrong starting or using the broker.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// The MQTT listener address could not be bound.
    #[error("cannot listen for MQTT on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The listener did not answer an MQTT CONNECT in time.
    #[error("the MQTT listener on {0} did not become ready")]
    NotReady(SocketAddr),
    /// The gateway's link into the router could not be made.
    #[error("cannot connect the gateway to its broker: {0}")]
    Link(String),
    /// The gateway's link into the router is gone.
    #[error("the broker link is down")]
    LinkDown,
}
