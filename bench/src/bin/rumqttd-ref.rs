//! Bare rumqttd 0.20 with the router and connection settings topicgate gives its embedded broker,
//! so that comparing the two shows the gateway's own cost: `rumqttd-ref --addr 127.0.0.1:1884`.
//! Plain MQTT 3.1.1 over TCP, anonymous; stops on SIGINT or SIGTERM.

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Parser;
use rumqttd::protocol::v4::V4;
use rumqttd::{
    ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings, Strategy,
};
use tokio::signal::unix::{SignalKind, signal};

/// topicgate's `mqtt.max_connections` default.
const MAX_CONNECTIONS: usize = 10_000;
/// Router connections beyond that in topicgate (its own link, refusals on their way out).
const ROUTER_HEADROOM: usize = 1024;
/// topicgate's `max_payload` default.
const MAX_PAYLOAD: usize = 1024 * 1024;
/// What topicgate allows around the largest payload for topic, properties and packet id.
const PACKET_OVERHEAD: usize = 64 * 1024 + 4096;

#[derive(Parser)]
#[command(about = "rumqttd with topicgate's broker settings, for comparison")]
struct Args {
    /// Address of the MQTT listener.
    #[arg(long, default_value = "127.0.0.1:1884")]
    addr: SocketAddr,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Every field is set: rumqttd's `RouterConfig::default()` is all zeros.
    let router = RouterConfig {
        max_connections: MAX_CONNECTIONS + ROUTER_HEADROOM,
        max_outgoing_packet_count: 100,
        max_segment_size: 1024 * 1024,
        max_segment_count: 3,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Strategy::RoundRobin,
    };
    let settings = ServerSettings {
        name: "v4".to_owned(),
        listen: args.addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 5000,
            max_payload_size: MAX_PAYLOAD + PACKET_OVERHEAD,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            // topicgate runs without per-topic logs because its own `#` subscription gives every
            // publish a log to land in. A bare broker has no such link: without dynamic filters,
            // a publish to a topic that no subscription matches (`fill`) disconnects its client.
            dynamic_filters: true,
        },
    };

    // Same layout as topicgate: the router on its own thread, the listener and connections on a
    // multi-threaded tokio runtime.
    let router_tx = Router::new(0, router).spawn();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async move {
        let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut server = Server::new(settings, router_tx, V4);
        tokio::select! {
            served = server.start(LinkType::Remote) => {
                served.map_err(|e| anyhow::anyhow!("listener on {}: {e}", args.addr))
            }
            _ = tokio::signal::ctrl_c() => Ok(()),
            _ = terminate.recv() => Ok(()),
        }
    })
}
