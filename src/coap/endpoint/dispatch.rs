//! A received message: a request to its exchange (answered from the dedup cache, by the
//! handler, or as a job), an ACK or Reset to the notification or separate response it answers.

use std::time::Instant;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};

use super::{Endpoint, Source};
use crate::coap::exchange::{Exchange, Seen};
use crate::coap::handler::{Action, unavailable};
use crate::coap::observe::{Full, ObserverKey};
use crate::coap::request::{self, Reply};

impl Endpoint {
    /// A well-formed message from `source`, by its type and code.
    pub(super) fn message(&mut self, packet: &Packet, source: &Source, now: Instant) {
        let mid = packet.header.message_id;
        let peer = source.peer;
        match (packet.header.get_type(), packet.header.code) {
            (MessageType::Acknowledgement, MessageClass::Empty) => self.acked(peer, mid, now),
            (MessageType::Reset, _) => {
                if let Some(inflight) = self.separate.remove(&(peer, mid)) {
                    self.timers.remove(inflight.timer);
                } else if let Some(key) = self.observers.by_mid(peer, mid) {
                    self.drop_observer(&key, "reset");
                }
            }
            (
                MessageType::Confirmable | MessageType::NonConfirmable,
                MessageClass::Request(method),
            ) => self.request(packet, method, source, now),
            // A method code this endpoint does not know (0.08 to 0.31).
            (MessageType::Confirmable | MessageType::NonConfirmable, MessageClass::Reserved(c))
                if c >> 5 == 0 =>
            {
                self.request(packet, RequestType::UnKnown, source, now);
            }
            // A ping, a response nobody asked for, or a reserved class: Reset (RFC 7252 §4.2).
            (MessageType::Confirmable, _) => self.reset_peer(mid, peer),
            _ => {}
        }
    }

    fn request(&mut self, packet: &Packet, method: RequestType, source: &Source, now: Instant) {
        let key = (source.peer, packet.header.message_id);
        match self.exchanges.check(key, now) {
            Seen::New => {}
            Seen::Pending => {
                self.metrics.coap_duplicates.inc();
                return;
            }
            Seen::Answered(bytes) => {
                self.metrics.coap_duplicates.inc();
                if let Some(bytes) = bytes {
                    self.send(bytes, source.peer);
                }
                return;
            }
        }
        let confirmable = packet.header.get_type() == MessageType::Confirmable;
        let mut exchange = Exchange {
            key,
            addr: source.addr,
            confirmable,
            // A piggybacked ACK reuses the request's id; a NON response needs its own.
            mid: if confirmable { key.1 } else { self.next_mid() },
            token: packet.get_token().into(),
            method,
            no_response: 0,
        };
        let req = match request::parse(packet, method) {
            Ok(req) => req,
            Err(reply) => return self.answer(&exchange, reply),
        };
        exchange.no_response = req.no_response;
        if method == RequestType::UnKnown {
            let reply = Reply::error(ResponseType::MethodNotAllowed, "unknown method");
            return self.answer(&exchange, reply);
        }
        if req.observe == Some(0) && self.live.is_none() {
            // Subscribe before the handler reads the current value, so no message falls
            // between the registration response and the first notification.
            self.live = Some(self.handler.bridge().live());
        }
        match self.handler.handle(&req, source, &mut self.uploads, now) {
            Action::Reply(reply) => self.answer(&exchange, reply),
            Action::Observe {
                filter,
                scope,
                szx,
                reply,
            } => {
                let okey = ObserverKey {
                    peer: source.peer,
                    token: exchange.token.clone(),
                };
                let reply = match self.observers.register(okey, filter, scope, szx, now) {
                    Ok((seq, replaced)) => {
                        if let Some(inflight) = replaced.and_then(|o| o.inflight) {
                            self.timers.remove(inflight.timer);
                        }
                        reply.with_uint(CoapOption::Observe, seq)
                    }
                    Err(Full) => unavailable("too many observers"),
                };
                self.count_observers();
                self.answer(&exchange, reply);
            }
            Action::Deregister(reply) => {
                let okey = ObserverKey {
                    peer: source.peer,
                    token: exchange.token.clone(),
                };
                self.drop_observer(&okey, "deregistered");
                self.answer(&exchange, reply);
            }
            Action::Work(work) => self.start(exchange, work, now),
        }
    }
}
