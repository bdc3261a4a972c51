//! topicgate: one process in which MQTT clients, HTTP clients and CoAP devices share one topic
//! space.
//!
//! Codemap (dependencies point down):
//! - [`gateway`]: binds every listener and runs the whole until shutdown.
//! - [`http`]: the axum router, handlers, event streams and the OpenAPI document.
//! - [`coap`]: the endpoint as a sans-I/O state machine (exchanges, deduplication, Observe,
//!   block-wise transfer) and the UDP loop around it.
//! - [`devices`]: push rules (through the durable outbox) and pull rules: the gateway as an
//!   HTTP client of devices that only serve.
//! - [`bridge`]: topics and filters, the retained store, fan-out to streams; the one place that
//!   decides.
//! - [`mqtt`]: the embedded rumqttd broker and the gateway's link into it; the only module that
//!   names rumqttd.
//! - [`topic`]: topic names and filters, their rules and MQTT matching, under everything else.
//! - [`policy`]: identities, the topic ACL, topic limits and request rates, asked by every
//!   protocol alike.
//! - [`tls`]: certificates and handshakes of the HTTPS and MQTT-over-TLS listeners.
//! - [`dtls`]: the DTLS 1.2 server transport under `coaps://`, sans I/O: stateless cookies,
//!   bounded sessions, each session's principal; it knows nothing of CoAP.
//! - [`config`]: the typed configuration; [`metrics`]: the Prometheus registry.
//! - [`refused`]: the rate-limited log line of a refused client, for every protocol.
//! - [`probe`]: the `healthcheck` subcommand's GET of `/healthz`.

pub mod bridge;
pub mod coap;
pub mod config;
mod deadline;
pub mod devices;
pub mod dtls;
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub mod http;
pub mod metrics;
pub mod mqtt;
pub mod policy;
pub mod probe;
pub mod refused;
pub mod tls;
pub mod topic;

pub use config::Config;
pub use gateway::{Gateway, GatewayError};
