//! The CoAP endpoint (RFC 7252, Observe RFC 7641, block-wise RFC 7959) on a UDP socket.
//! coap-lite is the codec; exchanges, deduplication, retransmission, observation and block-wise
//! transfer are built here, and every request becomes one bridge call.

mod block;
mod discovery;
mod exchange;
pub(crate) mod fuzzing;
mod handler;
mod observe;
mod request;
mod server;
mod wire;

use std::net::SocketAddr;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bridge::Bridge;
use crate::config::CoapConfig;

/// A bound CoAP endpoint, ready to serve.
pub struct CoapServer {
    socket: UdpSocket,
    config: CoapConfig,
}

impl CoapServer {
    /// Binds the UDP socket.
    pub async fn bind(config: &CoapConfig) -> std::io::Result<Self> {
        let socket = UdpSocket::bind(config.addr).await?;
        Ok(Self {
            socket,
            config: config.clone(),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.socket.local_addr().unwrap_or(self.config.addr)
    }

    /// Serves until `cancel`, spawning publishes on `tracker`.
    pub async fn run(self, bridge: Bridge, tracker: TaskTracker, cancel: CancellationToken) {
        let handler = handler::Handler::new(bridge, wire::szx_of(self.config.block_size));
        server::Endpoint::run(self.socket, &self.config, handler, tracker, cancel).await;
    }
}
