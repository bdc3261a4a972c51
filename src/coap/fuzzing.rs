//! The real [`Endpoint`] for the fuzz targets in `fuzz/`, without a socket or a broker: it
//! serves one client, and its jobs are done at once against a detached bridge whose store and
//! live messages every publish reaches.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use coap_lite::ResponseType;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use super::endpoint::{Endpoint, Source};
use super::handler::Work;
use super::request::Reply;
use super::wire::{self, Inbound};
use crate::bridge::{Bridge, Message, Origin, RetainedStore, Topic};
use crate::config::{AuthConfig, CoapConfig, LimitsConfig};
use crate::policy::Policy;

/// The one client endpoint every datagram comes from.
const PEER: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 5683));
/// Payload limit: small, so that a few blocks of an upload reach it.
const MAX_PAYLOAD: usize = 4096;

/// A CoAP endpoint serving one client, fed one datagram at a time.
pub struct CoapHarness {
    endpoint: Endpoint,
    bridge: Bridge,
    now: Instant,
}

impl Default for CoapHarness {
    /// The default CoAP settings over a store holding a short text value, a JSON value and a
    /// value that takes several blocks.
    fn default() -> Self {
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
        // No rate limit: one fuzzed peer sends far more than any client may.
        let limits = LimitsConfig {
            rate: 0,
            ..LimitsConfig::default()
        };
        let policy = Policy::new(&AuthConfig::default(), &limits);
        let bridge = Bridge::detached(store, policy, MAX_PAYLOAD);
        Self {
            endpoint: Endpoint::new(&CoapConfig::default(), bridge.clone()),
            bridge,
            now: Instant::now(),
        }
    }
}

impl CoapHarness {
    /// Takes one datagram; returns what the endpoint sends because of it: a response or Reset,
    /// then the notifications of a publish.
    pub fn datagram(&mut self, bytes: &[u8]) -> Vec<Bytes> {
        self.endpoint.receive(&Source::udp(PEER), bytes, self.now);
        self.settle()
    }

    /// Moves the clock on, firing every timer due on the way (resends, observers given up);
    /// returns what the endpoint sends because of them.
    pub fn advance(&mut self, by: Duration) -> Vec<Bytes> {
        let until = self.now + by;
        let mut sent = Vec::new();
        while let Some(at) = self.endpoint.poll_timeout().filter(|at| *at <= until) {
            self.now = self.now.max(at);
            self.endpoint.tick(self.now);
            sent.extend(self.settle());
        }
        self.now = until;
        sent
    }

    /// Whether the endpoint takes `bytes` as a well-formed message.
    pub fn accepts(bytes: &[u8]) -> bool {
        matches!(wire::decode(bytes), Inbound::Message(_))
    }

    /// Does the endpoint's jobs and hands it the messages they published, until it has nothing
    /// more to do; returns what it sent.
    fn settle(&mut self) -> Vec<Bytes> {
        loop {
            while let Some(job) = self.endpoint.poll_job() {
                let reply = self.perform(job.work);
                self.endpoint.completed(job.id, reply, self.now);
            }
            let Some(live) = self.endpoint.live() else {
                break;
            };
            match live.try_recv() {
                Err(TryRecvError::Empty) => break,
                received => {
                    let received = received.map_err(|e| match e {
                        TryRecvError::Lagged(n) => RecvError::Lagged(n),
                        _ => RecvError::Closed,
                    });
                    self.endpoint.on_live(received, self.now);
                }
            }
        }
        std::iter::from_fn(|| self.endpoint.poll_transmit())
            .map(|t| t.bytes)
            .collect()
    }

    /// Stands in for a broker that takes every publish at once; a call gets no reply.
    fn perform(&self, work: Work) -> Reply {
        match work {
            Work::Publish(message, ok, _) => {
                self.bridge.inject(*message);
                ok
            }
            Work::Clear(topic, _) => {
                if self.bridge.current(&topic).is_none() {
                    return Reply::error(ResponseType::NotFound, "nothing is retained");
                }
                let mut message = Message::new(topic, Bytes::new(), Origin::Coap);
                message.retain = true;
                self.bridge.inject(message);
                Reply::new(ResponseType::Deleted)
            }
            Work::Call(message, ..) => {
                self.bridge.inject(*message);
                Reply::error(ResponseType::GatewayTimeout, "no reply within the timeout")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use coap_lite::{MessageClass, Packet};

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

    #[test]
    fn an_observer_is_notified_of_a_publish() {
        let mut h = CoapHarness::default();
        // CON GET Observe 0 /topics/t, token 0x7a.
        let out = h.datagram(b"\x41\x01\x00\x01\x7a\x60\x56topics\x01t");
        assert_eq!(code(&out[0]), MessageClass::Response(ResponseType::Content));
        // NON PUT /topics/t "v": the response, then the notification.
        let out = h.datagram(b"\x50\x03\x00\x02\xb6topics\x01t\xffv");
        assert_eq!(out.len(), 2);
        assert_eq!(code(&out[1]), MessageClass::Response(ResponseType::Content));
        assert!(out[1].ends_with(b"\xffv"));
    }
}
