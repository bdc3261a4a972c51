//! The endpoint's event loop: one task owns the socket's receive side and every piece of
//! exchange state (dedup cache, observers, uploads, retransmission timers), so none of it needs a
//! lock. Publishes and calls wait in tracked tasks of their own and never hold the loop up.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use futures_util::StreamExt;
use tokio::net::UdpSocket;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::time::DelayQueue;

use super::block::Uploads;
use super::exchange::{ACK_RANDOM_FACTOR, ExchangeKey, Exchanges, Seen, exchange_lifetime};
use super::handler::{Action, Handler, Representation, Work, perform, unavailable};
use super::observe::{Full, Inflight, ObserverKey, Observers};
use super::request::{self, Reply};
use super::wire::{self, Inbound};
use crate::bridge::{Event, Message};
use crate::config::CoapConfig;
use crate::metrics::{Metrics, ProtocolLabel, ReasonLabel, StreamLabel};

/// What a publish or call task hands back to the loop.
enum Done {
    /// A finished exchange: its key and the datagram that answered it (an empty ACK when its
    /// response follows separately).
    Answered(ExchangeKey, Option<Bytes>),
    /// The response to a confirmable request already acknowledged with an empty ACK: sent as a
    /// confirmable message of its own (RFC 7252 §5.2.2), resent until acknowledged.
    Separate(Exchange, Reply),
}

/// A retransmission timer: of a notification to an observer, or of a separate response to
/// the peer, each by message id.
enum Timer {
    Notification(ObserverKey, u16),
    Separate(SocketAddr, u16),
}

/// Everything the loop owns.
pub(crate) struct Endpoint {
    socket: Arc<UdpSocket>,
    handler: Handler,
    exchanges: Exchanges,
    observers: Observers,
    uploads: Uploads,
    timers: DelayQueue<Timer>,
    /// Separate responses awaiting their ACK, by peer and message id; at most `max_pending`.
    separate: HashMap<(SocketAddr, u16), Inflight>,
    /// Every accepted message, while anyone observes; without observers the loop does not wake
    /// for messages at all.
    live: Option<broadcast::Receiver<Event>>,
    next_mid: u16,
    ack_timeout: Duration,
    max_retransmit: u8,
    pending: Arc<Semaphore>,
    pending_limit: usize,
    answered: mpsc::UnboundedSender<Done>,
    metrics: Arc<Metrics>,
    /// This endpoint's share of the `coap_observers` gauge, which every CoAP socket adds to.
    observers_counted: i64,
    tracker: TaskTracker,
}

impl Endpoint {
    /// Serves on `socket` until `cancel`, then tells every observer the endpoint is going away.
    pub(crate) async fn run(
        socket: UdpSocket,
        config: &CoapConfig,
        handler: Handler,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) {
        let lifetime = exchange_lifetime(config.ack_timeout, config.max_retransmit);
        let (answered, mut answers) = mpsc::unbounded_channel();
        let bridge = handler.bridge().clone();
        let mut endpoint = Endpoint {
            socket: Arc::new(socket),
            exchanges: Exchanges::new(lifetime, config.dedup_capacity),
            observers: Observers::new(config.max_observers),
            uploads: Uploads::new(bridge.max_payload(), config.max_uploads, lifetime),
            timers: DelayQueue::new(),
            separate: HashMap::new(),
            live: None,
            next_mid: rand::random(),
            ack_timeout: config.ack_timeout,
            max_retransmit: config.max_retransmit,
            pending: Arc::new(Semaphore::new(config.max_pending)),
            pending_limit: config.max_pending,
            answered,
            metrics: bridge.metrics().clone(),
            observers_counted: 0,
            tracker,
            handler,
        };
        // The largest UDP payload; a longer datagram cannot arrive.
        let mut buf = vec![0u8; 65_536];
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                received = endpoint.socket.recv_from(&mut buf) => match received {
                    Ok((len, peer)) => endpoint.datagram(&buf[..len], peer).await,
                    // An ICMP error from an earlier send surfaces here; the socket is fine.
                    Err(e) => tracing::debug!(error = %e, "CoAP receive error"),
                },
                Some(event) = next_event(&mut endpoint.live) => match event {
                    Ok(event) => endpoint.notify_all(&event.message).await,
                    Err(RecvError::Lagged(n)) => endpoint.lagged(n).await,
                    Err(RecvError::Closed) => break,
                },
                Some(expired) = endpoint.timers.next(), if !endpoint.timers.is_empty() => {
                    match expired.into_inner() {
                        Timer::Notification(key, mid) => endpoint.retransmit(key, mid).await,
                        Timer::Separate(peer, mid) => endpoint.resend_separate(peer, mid).await,
                    }
                }
                Some(done) = answers.recv() => endpoint.done(done).await,
            }
            if endpoint.observers.len() == 0 {
                endpoint.live = None;
            }
        }
        // Publishes still waiting for the broker finish and are answered; the socket is no
        // longer read. The loop's own sender goes first so the channel ends with the last task.
        drop(std::mem::replace(
            &mut endpoint.answered,
            mpsc::unbounded_channel().0,
        ));
        while let Some(done) = answers.recv().await {
            endpoint.done(done).await;
        }
        endpoint.farewell().await;
    }

    async fn datagram(&mut self, data: &[u8], peer: SocketAddr) {
        match wire::decode(data) {
            Inbound::Ignore => {
                let reason = format_args!("malformed datagram of {} bytes dropped", data.len());
                crate::refused::log("coap", peer, &reason);
            }
            Inbound::Reject(mid) => {
                let reason = format_args!("malformed datagram of {} bytes reset", data.len());
                crate::refused::log("coap", peer, &reason);
                self.reset_peer(mid, peer).await;
            }
            Inbound::Message(packet) => self.message(packet, peer).await,
        }
    }

    async fn message(&mut self, packet: Packet, peer: SocketAddr) {
        let mid = packet.header.message_id;
        match (packet.header.get_type(), packet.header.code) {
            (MessageType::Acknowledgement, MessageClass::Empty) => self.acked(peer, mid).await,
            (MessageType::Reset, _) => {
                if let Some(inflight) = self.separate.remove(&(peer, mid)) {
                    self.timers.remove(&inflight.timer);
                } else if let Some(key) = self.observers.by_mid(peer, mid) {
                    self.drop_observer(&key, "reset");
                }
            }
            (
                MessageType::Confirmable | MessageType::NonConfirmable,
                MessageClass::Request(method),
            ) => self.request(packet, method, peer).await,
            // A method code this endpoint does not know (0.08 to 0.31).
            (MessageType::Confirmable | MessageType::NonConfirmable, MessageClass::Reserved(c))
                if c >> 5 == 0 =>
            {
                self.request(packet, RequestType::UnKnown, peer).await;
            }
            // A ping, a response nobody asked for, or a reserved class: Reset (RFC 7252 §4.2).
            (MessageType::Confirmable, _) => self.reset_peer(mid, peer).await,
            _ => {}
        }
    }

    async fn request(&mut self, packet: Packet, method: RequestType, peer: SocketAddr) {
        let key = (peer, packet.header.message_id);
        let now = Instant::now();
        match self.exchanges.check(key, now) {
            Seen::New => {}
            Seen::Pending => {
                self.metrics.coap_duplicates.inc();
                return;
            }
            Seen::Answered(bytes) => {
                self.metrics.coap_duplicates.inc();
                if let Some(bytes) = bytes {
                    self.send(&bytes, peer).await;
                }
                return;
            }
        }
        let confirmable = packet.header.get_type() == MessageType::Confirmable;
        let mut exchange = Exchange {
            key,
            confirmable,
            // A piggybacked ACK reuses the request's id; a NON response needs its own.
            mid: if confirmable { key.1 } else { self.next_mid() },
            token: packet.get_token().into(),
            method,
            no_response: 0,
        };
        let req = match request::parse(&packet, method) {
            Ok(req) => req,
            Err(reply) => return self.answer(&exchange, reply).await,
        };
        exchange.no_response = req.no_response;
        if method == RequestType::UnKnown {
            let reply = Reply::error(ResponseType::MethodNotAllowed, "unknown method");
            return self.answer(&exchange, reply).await;
        }
        if req.observe == Some(0) && self.live.is_none() {
            // Subscribe before the handler reads the current value, so no message falls
            // between the registration response and the first notification.
            self.live = Some(self.handler.bridge().live());
        }
        match self.handler.handle(&req, peer, &mut self.uploads, now) {
            Action::Reply(reply) => self.answer(&exchange, reply).await,
            Action::Observe {
                filter,
                scope,
                szx,
                reply,
            } => {
                let okey = ObserverKey {
                    peer,
                    token: exchange.token.clone(),
                };
                let reply = match self.observers.register(okey, filter, scope, szx, now) {
                    Ok((seq, replaced)) => {
                        if let Some(inflight) = replaced.and_then(|o| o.inflight) {
                            self.timers.remove(&inflight.timer);
                        }
                        reply.with_uint(CoapOption::Observe, seq)
                    }
                    Err(Full) => unavailable("too many observers"),
                };
                self.count_observers();
                self.answer(&exchange, reply).await;
            }
            Action::Deregister(reply) => {
                let okey = ObserverKey {
                    peer,
                    token: exchange.token.clone(),
                };
                self.drop_observer(&okey, "deregistered");
                self.answer(&exchange, reply).await;
            }
            Action::Work(work) => self.spawn_work(exchange, work).await,
        }
    }

    /// Runs a publish, clear or call in its own task; the loop goes on serving.
    async fn spawn_work(&mut self, exchange: Exchange, work: Work) {
        let Ok(permit) = self.pending.clone().try_acquire_owned() else {
            let reply = unavailable("too many publishes and calls are waiting");
            return self.answer(&exchange, reply).await;
        };
        let bridge = self.handler.bridge().clone();
        let metrics = self.metrics.clone();
        let answered = self.answered.clone();
        // A call still waiting for its reply when half the client's first ACK wait is over is
        // acknowledged, so the client stops retransmitting, and answered separately.
        let separate_after =
            (exchange.confirmable && work.may_wait()).then_some(self.ack_timeout / 2);
        self.tracker.spawn(async move {
            let work = perform(&bridge, work);
            tokio::pin!(work);
            let reply = match separate_after {
                None => work.await,
                Some(wait) => match tokio::time::timeout(wait, &mut work).await {
                    Ok(reply) => reply,
                    Err(_) => {
                        let ack = empty(MessageType::Acknowledgement, exchange.mid);
                        let _ = answered.send(Done::Answered(exchange.key, encode(&ack)));
                        let reply = work.await;
                        let _ = answered.send(Done::Separate(exchange, reply));
                        return drop(permit);
                    }
                },
            };
            let bytes = exchange.frame(reply, &metrics);
            // The loop records the response before sending it, so a duplicate arriving
            // after the client has the response is answered from the cache, never dropped.
            // At shutdown the loop may be gone; the client then retransmits to a closed port.
            let _ = answered.send(Done::Answered(exchange.key, bytes));
            drop(permit);
        });
    }

    async fn done(&mut self, done: Done) {
        match done {
            Done::Answered(key, bytes) => self.finish(key, bytes).await,
            Done::Separate(exchange, reply) => self.send_separate(exchange, reply).await,
        }
    }

    /// Sends a separate response as a confirmable message and keeps it for resending until
    /// the client acknowledges it; beyond `max_pending` of them waiting, it is sent once.
    async fn send_separate(&mut self, exchange: Exchange, reply: Reply) {
        let mid = self.next_mid();
        let peer = exchange.key.0;
        let Some(bytes) = exchange.frame_separate(reply, mid, &self.metrics) else {
            return;
        };
        if self.separate.len() < self.pending_limit {
            let timeout = self
                .ack_timeout
                .mul_f64(rand::random_range(1.0..ACK_RANDOM_FACTOR));
            let timer = self.timers.insert(Timer::Separate(peer, mid), timeout);
            let inflight = Inflight {
                mid,
                bytes: bytes.clone(),
                resends: 0,
                timeout,
                timer,
            };
            self.separate.insert((peer, mid), inflight);
        }
        self.send(&bytes, peer).await;
    }

    /// A separate response's timer fired: send it again, or give up after the RFC's resends.
    async fn resend_separate(&mut self, peer: SocketAddr, mid: u16) {
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
            .insert(Timer::Separate(peer, mid), inflight.timeout);
        let bytes = inflight.bytes.clone();
        self.metrics.coap_retransmissions.inc();
        self.send(&bytes, peer).await;
    }

    /// Records a finished exchange's response, then sends it.
    async fn finish(&mut self, key: ExchangeKey, bytes: Option<Bytes>) {
        self.exchanges.answer(key, bytes.clone());
        if let Some(bytes) = bytes {
            self.send(&bytes, key.0).await;
        }
    }

    async fn answer(&mut self, exchange: &Exchange, reply: Reply) {
        let bytes = exchange.frame(reply, &self.metrics);
        self.finish(exchange.key, bytes).await;
    }

    async fn notify_all(&mut self, message: &Arc<Message>) {
        if message.is_expired(SystemTime::now()) {
            return;
        }
        for key in self.observers.matching(&message.topic) {
            self.notify(&key, message.clone()).await;
        }
    }

    /// Sends one notification, or keeps the message as the latest pending one while a
    /// confirmable notification is in flight.
    async fn notify(&mut self, key: &ObserverKey, message: Arc<Message>) {
        let now = Instant::now();
        let mid = self.next_mid();
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
            let timeout = self
                .ack_timeout
                .mul_f64(rand::random_range(1.0..ACK_RANDOM_FACTOR));
            let timer = self
                .timers
                .insert(Timer::Notification(key.clone(), mid), timeout);
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
        self.send(&bytes, key.peer).await;
    }

    async fn acked(&mut self, peer: SocketAddr, mid: u16) {
        if let Some(inflight) = self.separate.remove(&(peer, mid)) {
            self.timers.remove(&inflight.timer);
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
            self.timers.remove(&inflight.timer);
        }
        if let Some(next) = observer.pending.take() {
            self.notify(&key, next).await;
        }
    }

    /// A notification's retransmission timer fired: send again, or give the observer up.
    async fn retransmit(&mut self, key: ObserverKey, mid: u16) {
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
        inflight.timer = self
            .timers
            .insert(Timer::Notification(key.clone(), mid), inflight.timeout);
        let bytes = inflight.bytes.clone();
        self.metrics.coap_retransmissions.inc();
        self.send(&bytes, key.peer).await;
    }

    /// The loop fell behind the bridge: observers of a topic get its current retained value.
    async fn lagged(&mut self, missed: u64) {
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
                self.notify(&key, message).await;
            }
        }
    }

    fn drop_observer(&mut self, key: &ObserverKey, reason: &'static str) {
        if let Some(observer) = self.observers.remove(key) {
            if let Some(inflight) = observer.inflight {
                self.timers.remove(&inflight.timer);
            }
            self.metrics
                .coap_observers_removed
                .get_or_create(&ReasonLabel { reason })
                .inc();
            self.count_observers();
        }
    }

    /// Ends every observation with a final 5.03 (RFC 7641 §3.2: an error ends it).
    async fn farewell(&mut self) {
        for key in self.observers.keys() {
            let mid = self.next_mid();
            let reply = unavailable("the gateway is shutting down");
            if let Some(bytes) = encode(&reply.into_packet(false, mid, &key.token)) {
                self.send(&bytes, key.peer).await;
            }
            if let Some(observer) = self.observers.remove(&key)
                && let Some(inflight) = observer.inflight
            {
                self.timers.remove(&inflight.timer);
            }
            self.metrics
                .coap_observers_removed
                .get_or_create(&ReasonLabel { reason: "shutdown" })
                .inc();
        }
        self.count_observers();
    }

    /// Brings the gauge in step with this endpoint's observers, leaving other sockets' share.
    fn count_observers(&mut self) {
        let now = self.observers.len() as i64;
        self.metrics
            .coap_observers
            .inc_by(now - self.observers_counted);
        self.observers_counted = now;
    }

    async fn reset_peer(&self, mid: u16, peer: SocketAddr) {
        if let Some(bytes) = encode(&empty(MessageType::Reset, mid)) {
            self.send(&bytes, peer).await;
        }
    }

    async fn send(&self, bytes: &[u8], peer: SocketAddr) {
        send(&self.socket, bytes, peer).await;
    }

    fn next_mid(&mut self) -> u16 {
        self.next_mid = self.next_mid.wrapping_add(1);
        self.next_mid
    }
}

/// One request's identity, for framing its response.
struct Exchange {
    key: ExchangeKey,
    confirmable: bool,
    mid: u16,
    token: Box<[u8]>,
    method: RequestType,
    no_response: u8,
}

impl Exchange {
    /// Counts and frames a response; `None` when No-Response suppresses it on a
    /// non-confirmable request (a confirmable one still gets an empty ACK).
    fn frame(&self, reply: Reply, metrics: &Metrics) -> Option<Bytes> {
        if self.count(&reply, metrics) {
            if !self.confirmable {
                return None;
            }
            return encode(&empty(MessageType::Acknowledgement, self.mid));
        }
        encode(&reply.into_packet(self.confirmable, self.mid, &self.token))
    }

    /// Counts and frames a separate response under message id `mid`; `None` when
    /// No-Response suppresses it (the empty ACK went already).
    fn frame_separate(&self, reply: Reply, mid: u16, metrics: &Metrics) -> Option<Bytes> {
        if self.count(&reply, metrics) {
            return None;
        }
        let mut packet = reply.into_packet(false, mid, &self.token);
        packet.header.set_type(MessageType::Confirmable);
        encode(&packet)
    }

    /// Counts a response and logs a refusal; whether No-Response suppresses it.
    fn count(&self, reply: &Reply, metrics: &Metrics) -> bool {
        let code = MessageClass::Response(reply.code);
        metrics.coap_request(method_index(self.method), u8::from(code));
        let class = u8::from(code) >> 5;
        let detail = u8::from(code) & 0x1f;
        // Refused requests are logged, 4.04 (nothing there) aside, as HTTP does.
        if class == 4 && detail != 4 {
            let text = String::from_utf8_lossy(&reply.payload);
            let reason = format_args!("{class}.{detail:02} {text}");
            crate::refused::log("coap", self.key.0, &reason);
        }
        self.no_response & (1 << (class - 1).min(7)) != 0
    }
}

/// The next message for observers, or never while nobody observes.
async fn next_event(
    live: &mut Option<broadcast::Receiver<Event>>,
) -> Option<Result<Event, RecvError>> {
    match live {
        Some(rx) => Some(rx.recv().await),
        None => std::future::pending().await,
    }
}

/// The method's place in [`COAP_METHODS`].
fn method_index(method: RequestType) -> usize {
    match method {
        RequestType::Get => 0,
        RequestType::Put => 1,
        RequestType::Post => 2,
        RequestType::Delete => 3,
        _ => 4,
    }
}

/// An empty message: an ACK or a Reset of `mid`.
fn empty(kind: MessageType, mid: u16) -> Packet {
    let mut packet = Packet::new();
    packet.header.set_type(kind);
    packet.header.code = MessageClass::Empty;
    packet.header.message_id = mid;
    packet
}

fn encode(packet: &Packet) -> Option<Bytes> {
    match packet.to_bytes_unlimited() {
        Ok(bytes) => Some(Bytes::from(bytes)),
        Err(e) => {
            tracing::warn!(error = ?e, "could not encode a CoAP message");
            None
        }
    }
}

async fn send(socket: &UdpSocket, bytes: &[u8], peer: SocketAddr) {
    if let Err(e) = socket.send_to(bytes, peer).await {
        tracing::debug!(error = %e, %peer, "CoAP send failed");
    }
}
