//! A small CoAP client over a real UDP socket, built on coap-lite's codec, for the CoAP tests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::time::Duration;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
use tokio::net::UdpSocket;

use crate::support::within;

/// One client endpoint.
pub(crate) struct CoapClient {
    pub(crate) socket: UdpSocket,
    server: SocketAddr,
    mid: AtomicU16,
    token: AtomicU32,
}

impl CoapClient {
    pub(crate) async fn new(server: SocketAddr) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        Self {
            socket,
            server,
            mid: AtomicU16::new(0x1000),
            token: AtomicU32::new(0xabc0),
        }
    }

    /// A confirmable request with a fresh message id and token; `target` is
    /// `path/segments?query&items`, each segment a Uri-Path option as written.
    pub(crate) fn request(&self, method: RequestType, target: &str) -> Packet {
        let mid = self.mid.fetch_add(1, Ordering::Relaxed);
        let token = self.token.fetch_add(1, Ordering::Relaxed);
        let mut p = Packet::new();
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(method);
        p.header.message_id = mid;
        p.set_token(token.to_be_bytes().to_vec());
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        for segment in path.split('/') {
            p.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
        }
        for item in query.split('&').filter(|q| !q.is_empty()) {
            p.add_option(CoapOption::UriQuery, item.as_bytes().to_vec());
        }
        p
    }

    pub(crate) async fn send(&self, packet: &Packet) {
        self.send_raw(&packet.to_bytes_unlimited().unwrap()).await;
    }

    pub(crate) async fn send_raw(&self, bytes: &[u8]) {
        self.socket.send_to(bytes, self.server).await.unwrap();
    }

    /// The next datagram from the server, raw.
    pub(crate) async fn recv_raw(&self) -> Vec<u8> {
        let mut buf = vec![0u8; 65_536];
        let (n, from) = within("a CoAP datagram", self.socket.recv_from(&mut buf))
            .await
            .unwrap();
        assert_eq!(from, self.server);
        buf.truncate(n);
        buf
    }

    /// The next message from the server.
    pub(crate) async fn recv(&self) -> Packet {
        Packet::from_bytes(&self.recv_raw().await).expect("the server sends valid CoAP")
    }

    /// Whether a datagram arrives within `wait`; for asserting that none does.
    pub(crate) async fn try_recv(&self, wait: Duration) -> Option<Packet> {
        let mut buf = vec![0u8; 65_536];
        let (n, _) = tokio::time::timeout(wait, self.socket.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        Packet::from_bytes(&buf[..n]).ok()
    }

    /// Sends a request and returns the response carrying its token, skipping anything else.
    pub(crate) async fn call(&self, request: Packet) -> Packet {
        self.send(&request).await;
        loop {
            let p = self.recv().await;
            if p.get_token() == request.get_token()
                && matches!(p.header.code, MessageClass::Response(_))
            {
                if request.header.get_type() == MessageType::Confirmable {
                    assert_eq!(p.header.get_type(), MessageType::Acknowledgement);
                    assert_eq!(p.header.message_id, request.header.message_id);
                }
                return p;
            }
        }
    }

    /// Acknowledges a confirmable message.
    pub(crate) async fn ack(&self, mid: u16) {
        self.send(&empty(MessageType::Acknowledgement, mid)).await;
    }

    /// Rejects a message with a Reset.
    pub(crate) async fn reset(&self, mid: u16) {
        self.send(&empty(MessageType::Reset, mid)).await;
    }
}

fn empty(kind: MessageType, mid: u16) -> Packet {
    let mut p = Packet::new();
    p.header.set_type(kind);
    p.header.code = MessageClass::Empty;
    p.header.message_id = mid;
    p
}

/// The response code as `2.05`.
pub(crate) fn code(p: &Packet) -> String {
    p.header.code.to_string()
}

/// An unsigned integer option.
pub(crate) fn uint_option(p: &Packet, option: CoapOption) -> Option<u32> {
    p.get_first_option(option)
        .map(|v| v.iter().fold(0u32, |a, b| (a << 8) | u32::from(*b)))
}

/// Sets an unsigned integer option, shortest encoding.
pub(crate) fn set_uint(p: &mut Packet, option: CoapOption, value: u32) {
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    p.add_option(option, bytes[skip..].to_vec());
}

/// A Block1/Block2 value: (num, more, szx).
pub(crate) fn block(p: &Packet, option: CoapOption) -> Option<(u32, bool, u8)> {
    uint_option(p, option).map(|n| (n >> 4, n & 8 != 0, (n & 7) as u8))
}

/// Sets a Block1/Block2 option.
pub(crate) fn set_block(p: &mut Packet, option: CoapOption, num: u32, more: bool, szx: u8) {
    set_uint(
        p,
        option,
        (num << 4) | (u32::from(more) << 3) | u32::from(szx),
    );
}

pub(crate) fn text(p: &Packet) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}
