//! The gateway's MQTT side: the embedded broker, whose connections each run our own codec
//! (`wire`) and session (`session`, `connection`, `sessions`) in front of rumqttd's router (the
//! only module that names rumqttd), or a client of an external broker (`remote`, with rumqttc).
//! Either way the rest of the gateway sees one [`Link`] and plain [`MqttPublish`] values.

mod broker;
mod connection;
mod copies;
mod flow;
mod link;
mod message;
mod remote;
mod routing;
mod session;
mod sessions;
mod settings;
pub(crate) mod wire;

use std::net::SocketAddr;

pub use broker::{Acceptor, Broker, Ready};
pub use link::{Link, LinkStats, Receipt, Refused};
pub use message::{Inbound, MqttPublish, RetainedSource};
pub use remote::{RemoteBroker, SharedDelivery, lease, subscribe_shared};
pub use settings::BrokerStats;

/// Connects to an external broker instead of running the embedded one.
pub fn connect_remote(
    broker: RemoteBroker,
    buffer: usize,
    tracker: &tokio_util::task::TaskTracker,
    cancel: tokio_util::sync::CancellationToken,
) -> Link {
    remote::start(broker, buffer, tracker, cancel)
}

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
