//! The endpoint's request path without a socket or a broker, for the fuzz targets in `fuzz/`:
//! framing checks, decoding, deduplication, option parsing, the handler, Block1/Block2 and the
//! observer registry, in the order `server::Endpoint` runs them (keep the two in step), over an
//! in-memory store that every publish reaches at once.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};

use super::block::Uploads;
use super::exchange::{Exchanges, Seen, exchange_lifetime};
use super::handler::{Action, Handler, Representation, Work, unavailable};
use super::observe::{Full, ObserverKey, Observers};
use super::request::{self, Reply, Request};
use super::wire::{self, Inbound};
use crate::bridge::{Bridge, Message, Origin, RetainedStore, Topic};
use crate::config::CoapConfig;
use crate::config::{AuthConfig, LimitsConfig};
use crate::metrics::Metrics;
use crate::mqtt::Link;
use crate::policy::Policy;

/// The one client endpoint every datagram comes from.
const PEER: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 5683));
/// Payload limit: small, so that a few blocks of an upload reach it.
const MAX_PAYLOAD: usize = 4096;

/// A CoAP endpoint serving one client, fed one datagram at a time.
pub struct CoapHarness {
    store: Arc<RetainedStore>,
    handler: Handler,
    exchanges: Exchanges,
    observers: Observers,
    uploads: Uploads,
    next_mid: u16,
    now: Instant,
}

impl Default for CoapHarness {
    /// The default CoAP settings over a store holding a short text value, a JSON value and a
    /// value that takes several blocks.
    fn default() -> Self {
        let config = CoapConfig::default();
        let lifetime = exchange_lifetime(config.ack_timeout, config.max_retransmit);
        let store = Arc::new(RetainedStore::new());
        let blob: Vec<u8> = (0..3000u16).map(|i| i as u8).collect();
        let retained = [
            (
                "home/kitchen/temp",
                Bytes::from_static(b"21.5"),
                Some("text/plain"),
            ),
            (
                "home/hall/light",
                Bytes::from_static(br#"{"on":true}"#),
                Some("application/json"),
            ),
            ("blob/firmware", Bytes::from(blob), None),
        ];
        for (topic, payload, content_type) in retained {
            let Ok(topic) = Topic::parse(topic) else {
                continue;
            };
            let mut message = Message::new(topic, payload, Origin::Mqtt);
            message.retain = true;
            message.content_type = content_type.map(str::to_owned);
            drop(store.apply(&Arc::new(message)));
        }
        let bridge = Bridge::new(
            store.clone(),
            Link::detached(),
            Arc::new(Metrics::default()),
            // No rate limit: one fuzzed peer sends far more than any client may.
            Policy::new(
                &AuthConfig::default(),
                &LimitsConfig {
                    rate: 0,
                    ..LimitsConfig::default()
                },
            ),
            MAX_PAYLOAD,
            16,
            16,
            crate::config::RpcConfig::default(),
        );
        Self {
            store,
            handler: Handler::new(bridge, wire::szx_of(config.block_size)),
            exchanges: Exchanges::new(lifetime, config.dedup_capacity),
            observers: Observers::new(config.max_observers),
            uploads: Uploads::new(MAX_PAYLOAD, config.max_uploads, lifetime),
            next_mid: 0,
            now: Instant::now(),
        }
    }
}

impl CoapHarness {
    /// Takes one datagram; returns what the endpoint sends because of it: a response or Reset,
    /// then the notifications of a publish.
    pub fn datagram(&mut self, bytes: &[u8]) -> Vec<Bytes> {
        let mut out = Vec::new();
        match wire::decode(bytes) {
            Inbound::Ignore => {}
            Inbound::Reject(mid) => out.extend(reset(mid)),
            Inbound::Message(packet) => self.message(&packet, &mut out),
        }
        out
    }

    /// Moves the clock on, so that uploads and remembered responses expire.
    pub fn advance(&mut self, by: Duration) {
        self.now += by;
    }

    /// Whether the endpoint takes `bytes` as a well-formed message.
    pub fn accepts(bytes: &[u8]) -> bool {
        matches!(wire::decode(bytes), Inbound::Message(_))
    }

    fn message(&mut self, packet: &Packet, out: &mut Vec<Bytes>) {
        let mid = packet.header.message_id;
        match (packet.header.get_type(), packet.header.code) {
            (MessageType::Reset, _) => {
                if let Some(key) = self.observers.by_mid(PEER, mid) {
                    self.observers.remove(&key);
                }
            }
            (
                MessageType::Confirmable | MessageType::NonConfirmable,
                MessageClass::Request(method),
            ) => self.request(packet, method, out),
            (MessageType::Confirmable | MessageType::NonConfirmable, MessageClass::Reserved(c))
                if c >> 5 == 0 =>
            {
                self.request(packet, RequestType::UnKnown, out);
            }
            (MessageType::Confirmable, _) => out.extend(reset(mid)),
            // An empty ACK: notifications here are never confirmable, so none waits for one.
            _ => {}
        }
    }

    fn request(&mut self, packet: &Packet, method: RequestType, out: &mut Vec<Bytes>) {
        let key = (PEER, packet.header.message_id);
        match self.exchanges.check(key, self.now) {
            Seen::New => {}
            // Every request here is answered before the next datagram, so nothing is pending.
            Seen::Pending => return,
            Seen::Answered(bytes) => return out.extend(bytes),
        }
        let confirmable = packet.header.get_type() == MessageType::Confirmable;
        let mid = if confirmable { key.1 } else { self.next_mid() };
        let token = packet.get_token();
        let (reply, no_response, published) = match request::parse(packet, method) {
            Err(reply) => (reply, 0, None),
            Ok(req) if method == RequestType::UnKnown => (
                Reply::error(ResponseType::MethodNotAllowed, "unknown method"),
                req.no_response,
                None,
            ),
            Ok(req) => {
                let (reply, published) = self.handle(&req, token);
                (reply, req.no_response, published)
            }
        };
        let bytes = frame(reply, confirmable, mid, token, no_response);
        self.exchanges.answer(key, bytes.clone());
        out.extend(bytes);
        if let Some(message) = published {
            self.notify_all(&message, out);
        }
    }

    fn handle(&mut self, req: &Request, token: &[u8]) -> (Reply, Option<Arc<Message>>) {
        let key = ObserverKey {
            peer: PEER,
            token: token.into(),
        };
        match self.handler.handle(req, PEER, &mut self.uploads, self.now) {
            Action::Reply(reply) => (reply, None),
            Action::Observe {
                filter,
                scope,
                szx,
                reply,
            } => {
                let reply = match self.observers.register(key, filter, scope, szx, self.now) {
                    Ok((seq, _)) => reply.with_uint(CoapOption::Observe, seq),
                    Err(Full) => unavailable("too many observers"),
                };
                (reply, None)
            }
            Action::Deregister(reply) => {
                self.observers.remove(&key);
                (reply, None)
            }
            Action::Work(work) => self.perform(work),
        }
    }

    /// Stands in for `handler::perform` with a broker that takes every publish at once.
    fn perform(&self, work: Work) -> (Reply, Option<Arc<Message>>) {
        let (message, reply) = match work {
            Work::Publish(message, ok, _) => (Arc::new(*message), ok),
            Work::Clear(topic, _) => {
                if self.store.get(&topic).is_none() {
                    let reply = Reply::error(
                        ResponseType::NotFound,
                        format!("nothing is retained on {topic}"),
                    );
                    return (reply, None);
                }
                let mut message = Message::new(topic, Bytes::new(), Origin::Coap);
                message.retain = true;
                (Arc::new(message), Reply::new(ResponseType::Deleted))
            }
            // Nothing answers a call here: it times out at once.
            Work::Call(message, ..) => (
                Arc::new(*message),
                Reply::error(ResponseType::GatewayTimeout, "no reply within the timeout"),
            ),
        };
        drop(self.store.apply(&message));
        (reply, Some(message))
    }

    /// Non-confirmable notifications of `message`, as `Endpoint::notify` frames them.
    fn notify_all(&mut self, message: &Arc<Message>, out: &mut Vec<Bytes>) {
        if message.is_expired(SystemTime::now()) {
            return;
        }
        for key in self.observers.matching(&message.topic) {
            let mid = self.next_mid();
            let Some(observer) = self.observers.get_mut(&key) else {
                continue;
            };
            let seq = observer.next_seq();
            let repr = if observer.filter.is_wildcard() {
                Representation::of_listing(std::slice::from_ref(message), None)
            } else {
                Representation::of_message(message, SystemTime::now())
            };
            let reply = repr
                .content(None, observer.szx)
                .with_uint(CoapOption::Observe, seq);
            out.extend(encode(&reply.into_packet(false, mid, &key.token)));
            self.observers.sent(&key, mid);
        }
    }

    fn next_mid(&mut self) -> u16 {
        self.next_mid = self.next_mid.wrapping_add(1);
        self.next_mid
    }
}

/// Frames a response as `server::Exchange::frame` does: No-Response suppresses it, leaving an
/// empty ACK for a confirmable request.
fn frame(
    reply: Reply,
    confirmable: bool,
    mid: u16,
    token: &[u8],
    no_response: u8,
) -> Option<Bytes> {
    let class = u8::from(MessageClass::Response(reply.code)) >> 5;
    if no_response & (1 << (class - 1).min(7)) != 0 {
        if !confirmable {
            return None;
        }
        return encode(&empty(MessageType::Acknowledgement, mid));
    }
    encode(&reply.into_packet(confirmable, mid, token))
}

fn reset(mid: u16) -> Option<Bytes> {
    encode(&empty(MessageType::Reset, mid))
}

fn empty(kind: MessageType, mid: u16) -> Packet {
    let mut packet = Packet::new();
    packet.header.set_type(kind);
    packet.header.code = MessageClass::Empty;
    packet.header.message_id = mid;
    packet
}

fn encode(packet: &Packet) -> Option<Bytes> {
    packet.to_bytes_unlimited().ok().map(Bytes::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(datagram: &[u8]) -> MessageClass {
        Packet::from_bytes(datagram).unwrap().header.code
    }

    #[test]
    fn reads_and_block_wise_uploads_go_through() {
        let mut h = CoapHarness::default();
        // CON GET /topics/home/kitchen/temp
        let get = b"\x40\x01\x00\x01\xb6topics\x04home\x07kitchen\x04temp";
        let out = h.datagram(get);
        assert_eq!(out.len(), 1);
        assert_eq!(code(&out[0]), MessageClass::Response(ResponseType::Content));
        assert!(out[0].ends_with(b"\xff21.5"));
        // The retransmitted request gets the same bytes.
        assert_eq!(h.datagram(get), out);
        // PUT /topics/t in two 16-byte blocks (Block1 num 0 more, then num 1 last).
        let first = [
            b"\x40\x03\x00\x02\xb6topics\x01t\xd1\x03\x08\xff".as_slice(),
            &[7; 16],
        ];
        let out = h.datagram(&first.concat());
        assert_eq!(
            code(&out[0]),
            MessageClass::Response(ResponseType::Continue)
        );
        let last = b"\x40\x03\x00\x03\xb6topics\x01t\xd1\x03\x10\xffend";
        let out = h.datagram(last);
        assert_eq!(code(&out[0]), MessageClass::Response(ResponseType::Changed));
        let out = h.datagram(b"\x40\x01\x00\x04\xb6topics\x01t");
        assert!(out[0].ends_with(&[[7u8; 16].as_slice(), b"end"].concat()));
        // Malformed and confirmable: Reset with its message id.
        assert_eq!(h.datagram(b"\x49\x01\x12\x34").len(), 1);
        assert!(h.datagram(b"\x59\x01\x12\x34").is_empty());
    }
}
