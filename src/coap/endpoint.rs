//! The CoAP endpoint as a state machine without I/O: datagrams, timer ticks, live messages and
//! finished work go in; datagrams to send, work to start and the next deadline come out. The
//! UDP loop (`server.rs`) drives it, and so do the fuzz targets; another transport's loop can.

mod dispatch;
mod notify;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use coap_lite::MessageType;
use tokio::sync::broadcast::error::RecvError;

use super::block::Uploads;
use super::exchange::{Exchange, ExchangeKey, Exchanges, empty, encode, exchange_lifetime};
use super::handler::{Handler, Work, perform, unavailable};
use super::observe::{Inflight, ObserverKey, Observers};
use super::request::Reply;
use super::timers::{TimerId, Timers};
use super::wire::{self, Inbound};
use crate::bridge::{Bridge, Event, Live};
use crate::config::CoapConfig;
use crate::metrics::Metrics;
use crate::policy::Principal;

/// Whom the endpoint talks to: the key of its exchanges, observations, uploads and separate
/// responses, chosen by the transport. A plain UDP peer is its address; a DTLS session keeps
/// its number when the client's address changes (Connection ID, RFC 9146).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Peer {
    /// A UDP client, known by its address.
    Udp(SocketAddr),
    /// A secured session, known by a number its transport gives it.
    Session(u64),
}

/// Where a received datagram comes from, as its transport knows it.
#[derive(Clone, Debug)]
pub(crate) struct Source {
    /// The peer, which answers go to.
    pub(crate) peer: Peer,
    /// The client's current address, for logs and per-address rate limits.
    pub(crate) addr: SocketAddr,
    /// The principal the transport authenticated (a DTLS identity); `None` leaves it to
    /// `?auth=<token>`, or anonymous.
    pub(crate) principal: Option<Principal>,
}

impl Source {
    /// A plain UDP client at `addr`.
    pub(crate) fn udp(addr: SocketAddr) -> Self {
        Self {
            peer: Peer::Udp(addr),
            addr,
            principal: None,
        }
    }
}

/// A datagram to send.
#[derive(Debug)]
pub(crate) struct Transmit {
    /// To whom; the transport finds the address.
    pub(crate) peer: Peer,
    /// The whole CoAP message.
    pub(crate) bytes: Bytes,
}

/// Names a piece of work the endpoint asked for, to report its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct JobId(u64);

/// Work to run off the endpoint (a publish, clear or call that waits for the broker); its
/// reply goes back through [`Endpoint::completed`].
#[derive(Debug)]
pub(crate) struct Job {
    /// Which job, for [`Endpoint::completed`].
    pub(crate) id: JobId,
    /// What to do.
    pub(crate) work: Work,
}

impl Job {
    /// Runs the work through `bridge`; the result is what [`Endpoint::completed`] takes.
    pub(crate) async fn run(self, bridge: &Bridge) -> (JobId, Reply) {
        (self.id, perform(bridge, self.work).await)
    }
}

/// What a timer is for.
#[derive(Debug)]
enum Timer {
    /// Resend a confirmable notification, by message id.
    Notification(ObserverKey, u16),
    /// Resend a separate response, by peer and message id.
    Separate(Peer, u16),
    /// Acknowledge a confirmable request whose job still runs (RFC 7252 §5.2.2).
    Ack(JobId),
}

/// A job started and not yet completed.
#[derive(Debug)]
struct Running {
    exchange: Exchange,
    /// The timer that acknowledges the request early, while it is armed.
    ack_timer: Option<TimerId>,
    /// Whether the empty ACK went: the reply then goes as a separate response.
    acked: bool,
}

/// Every piece of exchange state of one CoAP endpoint.
pub(crate) struct Endpoint {
    handler: Handler,
    exchanges: Exchanges,
    observers: Observers,
    uploads: Uploads,
    timers: Timers<Timer>,
    /// Separate responses awaiting their ACK, by peer and message id; at most `max_pending`.
    separate: HashMap<(Peer, u16), Inflight>,
    jobs: HashMap<JobId, Running>,
    next_job: u64,
    /// Every accepted message, while anyone observes.
    live: Option<Live>,
    next_mid: u16,
    ack_timeout: Duration,
    max_retransmit: u8,
    max_pending: usize,
    metrics: Arc<Metrics>,
    /// This endpoint's share of the `coap_observers` gauge, which every endpoint adds to.
    observers_counted: i64,
    /// Datagrams to send and jobs to start, kept between calls so their space is reused.
    transmits: VecDeque<Transmit>,
    started: VecDeque<Job>,
}

impl Endpoint {
    /// An endpoint with `config`'s limits over `bridge`.
    pub(crate) fn new(config: &CoapConfig, bridge: Bridge) -> Self {
        let lifetime = exchange_lifetime(config.ack_timeout, config.max_retransmit);
        Self {
            exchanges: Exchanges::new(lifetime, config.dedup_capacity),
            observers: Observers::new(config.max_observers),
            uploads: Uploads::new(bridge.max_payload(), config.max_uploads, lifetime),
            timers: Timers::default(),
            separate: HashMap::new(),
            jobs: HashMap::new(),
            next_job: 0,
            live: None,
            next_mid: rand::random(),
            ack_timeout: config.ack_timeout,
            max_retransmit: config.max_retransmit,
            max_pending: config.max_pending,
            metrics: bridge.metrics().clone(),
            observers_counted: 0,
            transmits: VecDeque::new(),
            started: VecDeque::new(),
            handler: Handler::new(bridge, wire::szx_of(config.block_size)),
        }
    }

    /// Takes one datagram from `source`.
    pub(crate) fn receive(&mut self, source: &Source, datagram: &[u8], now: Instant) {
        match wire::decode(datagram) {
            Inbound::Ignore => {
                let reason = format_args!("malformed datagram of {} bytes dropped", datagram.len());
                crate::refused::log("coap", source.addr, &reason);
            }
            Inbound::Reject(mid) => {
                let reason = format_args!("malformed datagram of {} bytes reset", datagram.len());
                crate::refused::log("coap", source.addr, &reason);
                self.reset_peer(mid, source.peer);
            }
            Inbound::Message(packet) => self.message(&packet, source, now),
        }
        self.settle();
    }

    /// Fires the timers due at `now`: resends, observers given up, early ACKs.
    pub(crate) fn tick(&mut self, now: Instant) {
        while let Some(timer) = self.timers.expired(now) {
            match timer {
                Timer::Notification(key, mid) => self.retransmit(key, mid, now),
                Timer::Separate(peer, mid) => self.resend_separate(peer, mid, now),
                Timer::Ack(id) => self.ack_early(id),
            }
        }
        self.settle();
    }

    /// Takes what the live subscription ([`Endpoint::live`]) gave: a message for the
    /// observers, or how many the endpoint missed.
    pub(crate) fn on_live(&mut self, received: Result<Event, RecvError>, now: Instant) {
        match received {
            Ok(event) => self.notify_all(&event.message, now),
            Err(RecvError::Lagged(missed)) => self.lagged(missed, now),
            // The hub lives as long as the bridge this endpoint holds; nothing more will come.
            Err(RecvError::Closed) => self.live = None,
        }
        self.settle();
    }

    /// Takes the reply of a job it asked for.
    pub(crate) fn completed(&mut self, id: JobId, reply: Reply, now: Instant) {
        if let Some(job) = self.jobs.remove(&id) {
            if let Some(timer) = job.ack_timer {
                self.timers.remove(timer);
            }
            if job.acked {
                self.send_separate(&job.exchange, reply, now);
            } else {
                self.answer(&job.exchange, reply);
            }
        }
        self.settle();
    }

    /// Ends every observation with a final 5.03 (RFC 7641 §3.2: an error ends it), when the
    /// endpoint stops.
    pub(crate) fn close(&mut self) {
        self.farewell();
        self.settle();
    }

    /// Forgets a peer that is gone (its secured session ended): its observations end without
    /// a word and its separate responses are no longer resent.
    pub(crate) fn forget(&mut self, peer: Peer) {
        for key in self.observers.keys() {
            if key.peer == peer {
                self.drop_observer(&key, "closed");
            }
        }
        let timers = &mut self.timers;
        self.separate.retain(|(to, _), inflight| {
            if *to == peer {
                timers.remove(inflight.timer);
            }
            *to != peer
        });
        self.settle();
    }

    /// The next datagram to send.
    pub(crate) fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next job to start.
    pub(crate) fn poll_job(&mut self) -> Option<Job> {
        self.started.pop_front()
    }

    /// When the endpoint wants [`Endpoint::tick`] next; `None` while no timer is armed.
    pub(crate) fn poll_timeout(&mut self) -> Option<Instant> {
        self.timers.deadline()
    }

    /// The subscription to every accepted message, held while anyone observes; its results go
    /// to [`Endpoint::on_live`].
    pub(crate) fn live(&mut self) -> Option<&mut Live> {
        self.live.as_mut()
    }

    /// Jobs started and not yet completed.
    pub(crate) fn jobs_running(&self) -> usize {
        self.jobs.len()
    }

    /// The bridge the endpoint's jobs run through.
    pub(crate) fn bridge(&self) -> &Bridge {
        self.handler.bridge()
    }

    /// Asks the transport to run a publish, clear or call; at most `max_pending` at once.
    fn start(&mut self, exchange: Exchange, work: Work, now: Instant) {
        if self.jobs.len() >= self.max_pending {
            let reply = unavailable("too many publishes and calls are waiting");
            return self.answer(&exchange, reply);
        }
        self.next_job += 1;
        let id = JobId(self.next_job);
        // A call still waiting for its reply when half the client's first ACK wait is over is
        // acknowledged, so the client stops retransmitting, and answered separately.
        let ack_timer = (exchange.confirmable && work.may_wait()).then(|| {
            self.timers
                .insert(now + self.ack_timeout / 2, Timer::Ack(id))
        });
        self.jobs.insert(
            id,
            Running {
                exchange,
                ack_timer,
                acked: false,
            },
        );
        self.started.push_back(Job { id, work });
    }

    /// A job outlived half the ACK timeout: the empty ACK goes now, and is what a duplicate
    /// of the request gets.
    fn ack_early(&mut self, id: JobId) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        job.ack_timer = None;
        job.acked = true;
        let key = job.exchange.key;
        let ack = encode(&empty(MessageType::Acknowledgement, job.exchange.mid));
        self.finish(key, ack);
    }

    /// Records a finished exchange's response, then sends it; recorded first, so a
    /// duplicate arriving after the client has the response is answered from the cache.
    fn finish(&mut self, key: ExchangeKey, bytes: Option<Bytes>) {
        self.exchanges.answer(key, bytes.clone());
        if let Some(bytes) = bytes {
            self.send(bytes, key.0);
        }
    }

    fn answer(&mut self, exchange: &Exchange, reply: Reply) {
        let bytes = exchange.frame(reply, &self.metrics);
        self.finish(exchange.key, bytes);
    }

    fn reset_peer(&mut self, mid: u16, peer: Peer) {
        if let Some(bytes) = encode(&empty(MessageType::Reset, mid)) {
            self.send(bytes, peer);
        }
    }

    fn send(&mut self, bytes: Bytes, peer: Peer) {
        self.transmits.push_back(Transmit { peer, bytes });
    }

    fn next_mid(&mut self) -> u16 {
        self.next_mid = self.next_mid.wrapping_add(1);
        self.next_mid
    }

    /// Without observers the endpoint holds no subscription, so nothing wakes it for messages.
    fn settle(&mut self) {
        if self.observers.len() == 0 {
            self.live = None;
        }
    }
}
