//! What the endpoint sends on its own: notifications to observers, separate responses, their
//! resends on the RFC 7252 schedule until acknowledged, and the farewell at shutdown.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use coap_lite::{CoapOption, MessageType};

use super::{Endpoint, Peer, Timer};
use crate::bridge::Message;
use crate::coap::exchange::{ACK_RANDOM_FACTOR, Exchange, encode};
use crate::coap::handler::{Representation, unavailable};
use crate::coap::observe::{Inflight, ObserverKey};
use crate::coap::request::Reply;
use crate::metrics::{ProtocolLabel, ReasonLabel, StreamLabel};

impl Endpoint {
    /// The first wait for an ACK: ACK_TIMEOUT times a random factor up to ACK_RANDOM_FACTOR.
    fn first_timeout(&self) -> std::time::Duration {
        self.ack_timeout
            .mul_f64(rand::random_range(1.0..ACK_RANDOM_FACTOR))
    }

    /// Sends a separate response as a confirmable message and keeps it for resending until
    /// the client acknowledges it; beyond `max_pending` of them waiting, it is sent once.
    pub(super) fn send_separate(&mut self, exchange: &Exchange, reply: Reply, now: Instant) {
        let mid = self.next_mid();
        let peer = exchange.key.0;
        let Some(bytes) = exchange.frame_separate(reply, mid, &self.metrics) else {
            return;
        };
        if self.separate.len() < self.max_pending {
            let timeout = self.first_timeout();
            let timer = self
                .timers
                .insert(now + timeout, Timer::Separate(peer, mid));
            let inflight = Inflight {
                mid,
                bytes: bytes.clone(),
                resends: 0,
                timeout,
                timer,
            };
            self.separate.insert((peer, mid), inflight);
        }
        self.send(bytes, peer);
    }

    /// A separate response's timer fired: send it again, or give up after the RFC's resends.
    pub(super) fn resend_separate(&mut self, peer: Peer, mid: u16, now: Instant) {
        let Some(inflight) = self.separate.get_mut(&(peer, mid)) else {
            return;
        };
        if inflight.resends >= self.max_retransmit {
            self.separate.remove(&(peer, mid));
            return;
        }
        inflight.resends += 1;
        inflight.timeout *= 2;
        inflight.timer = self
            .timers
            .insert(now + inflight.timeout, Timer::Separate(peer, mid));
        let bytes = inflight.bytes.clone();
        self.metrics.coap_retransmissions.inc();
        self.send(bytes, peer);
    }

    /// A live message: a notification to every observer it concerns.
    pub(super) fn notify_all(&mut self, message: &Arc<Message>, now: Instant) {
        if message.is_expired(SystemTime::now()) {
            return;
        }
        for key in self.observers.matching(&message.topic) {
            self.notify(&key, message.clone(), now);
        }
    }

    /// Sends one notification, or keeps the message as the latest pending one while a
    /// confirmable notification is in flight.
    fn notify(&mut self, key: &ObserverKey, message: Arc<Message>, now: Instant) {
        let mid = self.next_mid();
        let timeout = self.first_timeout();
        let Some(observer) = self.observers.get_mut(key) else {
            return;
        };
        if observer.inflight.is_some() {
            observer.pending = Some(message);
            return;
        }
        let confirmable = observer.take_con_turn(now);
        let seq = observer.next_seq();
        let repr = if observer.filter.is_wildcard() {
            Representation::of_listing(&[message], None)
        } else {
            Representation::of_message(&message, SystemTime::now())
        };
        let reply = repr
            .content(None, observer.szx)
            .with_uint(CoapOption::Observe, seq);
        let mut packet = reply.into_packet(false, mid, &key.token);
        if confirmable {
            packet.header.set_type(MessageType::Confirmable);
        }
        let Some(bytes) = encode(&packet) else { return };
        if confirmable {
            let timer = self
                .timers
                .insert(now + timeout, Timer::Notification(key.clone(), mid));
            observer.inflight = Some(Inflight {
                mid,
                bytes: bytes.clone(),
                resends: 0,
                timeout,
                timer,
            });
        }
        self.observers.sent(key, mid);
        self.metrics
            .deliveries
            .get_or_create(&ProtocolLabel { protocol: "coap" })
            .inc();
        self.send(bytes, key.peer);
    }

    /// An empty ACK: of a separate response, or of a notification, which lets the observer's
    /// pending message go.
    pub(super) fn acked(&mut self, peer: Peer, mid: u16, now: Instant) {
        if let Some(inflight) = self.separate.remove(&(peer, mid)) {
            self.timers.remove(inflight.timer);
            return;
        }
        let Some(key) = self.observers.by_mid(peer, mid) else {
            return;
        };
        let Some(observer) = self.observers.get_mut(&key) else {
            return;
        };
        if observer.inflight.as_ref().is_none_or(|i| i.mid != mid) {
            return;
        }
        if let Some(inflight) = observer.inflight.take() {
            self.timers.remove(inflight.timer);
        }
        if let Some(next) = observer.pending.take() {
            self.notify(&key, next, now);
        }
    }

    /// A notification's retransmission timer fired: send again, or give the observer up.
    pub(super) fn retransmit(&mut self, key: ObserverKey, mid: u16, now: Instant) {
        let Some(observer) = self.observers.get_mut(&key) else {
            return;
        };
        let Some(inflight) = observer.inflight.as_mut().filter(|i| i.mid == mid) else {
            return;
        };
        if inflight.resends >= self.max_retransmit {
            // The timer has fired and is gone; only the observer is left to drop.
            observer.inflight = None;
            self.drop_observer(&key, "timeout");
            return;
        }
        inflight.resends += 1;
        inflight.timeout *= 2;
        inflight.timer = self.timers.insert(
            now + inflight.timeout,
            Timer::Notification(key.clone(), mid),
        );
        let bytes = inflight.bytes.clone();
        self.metrics.coap_retransmissions.inc();
        self.send(bytes, key.peer);
    }

    /// The endpoint fell behind the bridge: observers of a topic get its current retained
    /// value.
    pub(super) fn lagged(&mut self, missed: u64, now: Instant) {
        self.metrics
            .lag_dropped
            .get_or_create(&StreamLabel { stream: "coap" })
            .inc_by(missed);
        for key in self.observers.keys() {
            let topic = self
                .observers
                .get_mut(&key)
                .and_then(|o| o.filter.as_topic());
            if let Some(message) = topic.and_then(|t| self.handler.bridge().current(&t)) {
                self.notify(&key, message, now);
            }
        }
    }

    /// Ends an observation, counted under `reason`.
    pub(super) fn drop_observer(&mut self, key: &ObserverKey, reason: &'static str) {
        if let Some(observer) = self.observers.remove(key) {
            if let Some(inflight) = observer.inflight {
                self.timers.remove(inflight.timer);
            }
            self.metrics
                .coap_observers_removed
                .get_or_create(&ReasonLabel { reason })
                .inc();
            self.count_observers();
        }
    }

    /// Ends every observation with a final 5.03 (RFC 7641 §3.2: an error ends it).
    pub(super) fn farewell(&mut self) {
        for key in self.observers.keys() {
            let mid = self.next_mid();
            let reply = unavailable("the gateway is shutting down");
            if let Some(bytes) = encode(&reply.into_packet(false, mid, &key.token)) {
                self.send(bytes, key.peer);
            }
            if let Some(observer) = self.observers.remove(&key)
                && let Some(inflight) = observer.inflight
            {
                self.timers.remove(inflight.timer);
            }
            self.metrics
                .coap_observers_removed
                .get_or_create(&ReasonLabel { reason: "shutdown" })
                .inc();
        }
        self.count_observers();
    }

    /// Brings the gauge in step with this endpoint's observers, leaving other endpoints' share.
    pub(super) fn count_observers(&mut self) {
        let now = self.observers.len() as i64;
        self.metrics
            .coap_observers
            .inc_by(now - self.observers_counted);
        self.observers_counted = now;
    }
}
