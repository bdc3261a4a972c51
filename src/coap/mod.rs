//! The CoAP endpoint (RFC 7252, Observe RFC 7641, block-wise RFC 7959): a state machine without
//! I/O (`endpoint.rs`) and the UDP loop that drives it. coap-lite is the codec; exchanges,
//! deduplication, retransmission, observation and block-wise transfer are built here, and every
//! request becomes one bridge call.

mod block;
mod discovery;
mod dtls;
mod endpoint;
mod exchange;
pub(crate) mod fuzzing;
mod handler;
mod observe;
mod request;
mod server;
mod shell;
mod timers;
mod wire;

use std::net::SocketAddr;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use dtls::{CoapsError, CoapsServer, dtls_settings};

use crate::bridge::Bridge;
use crate::config::CoapConfig;

/// A bound CoAP endpoint, ready to serve.
pub struct CoapServer {
    socket: UdpSocket,
    addr: SocketAddr,
    config: CoapConfig,
}

impl CoapServer {
    /// Binds the UDP socket to `addr`.
    pub async fn bind(addr: SocketAddr, config: &CoapConfig) -> std::io::Result<Self> {
        let socket = UdpSocket::bind(addr).await?;
        let addr = socket.local_addr().unwrap_or(addr);
        Ok(Self {
            socket,
            addr,
            config: config.clone(),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `cancel` on a thread of its own, spawning publishes on `tracker`; returns
    /// when the endpoint has said goodbye to its observers.
    ///
    /// The UDP loop is one task that owns the socket and the endpoint, and on the gateway's
    /// multi-threaded runtime it is woken on whichever worker is free, so its requests cross
    /// cores. On a current-thread runtime of its own, as libcoap's server runs on one thread,
    /// it answers CON GETs far faster, measured in turns on the same machine
    /// (`bench/README.md`).
    pub async fn run(self, bridge: Bridge, tracker: TaskTracker, cancel: CancellationToken) {
        let config = self.config;
        shell::on_own_thread("coap", "CoAP", self.socket, move |socket| async move {
            server::run(socket, &config, bridge, tracker, cancel).await;
        })
        .await;
    }
}
