//! A lease held by one gateway at a time, kept in a retained topic of the external broker:
//! `held <id>` claims it and is repeated as a heartbeat, `free <id>` (sent at shutdown, and
//! the connection's will) gives it up. Every gateway sees the topic's messages in the broker's
//! order, so all agree on the last claim. The decisions are sans-I/O ([`LeaseState`]).

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, LastWill, Packet, RetainForwardRule};
use rumqttc::v5::{AsyncClient, Event};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{MIN_BACKOFF, RemoteBroker, keep_alive, options, subscribed};

/// How often the decisions are looked at again.
const TICK: Duration = Duration::from_millis(100);

/// The lease's timing, from the connection's keep-alive `k`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timing {
    /// The holder repeats its claim this often (`k / 2`).
    pub(crate) heartbeat: Duration,
    /// A claim not repeated for this long is void (`2 k`): the fallback when a will is lost.
    pub(crate) stale: Duration,
    /// A free lease is claimed after this long without a claim, and a claim seen come back is
    /// acted on after this long without a later one (`k / 4`, at most 1 s): simultaneous
    /// claims settle on the last, and the previous holder has stopped.
    pub(crate) settle: Duration,
}

impl Timing {
    pub(crate) fn from_keep_alive(k: Duration) -> Self {
        Self {
            heartbeat: k / 2,
            stale: k * 2,
            settle: (k / 4).min(Duration::from_secs(1)),
        }
    }
}

/// What the state machine asks of the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Send {
    /// Publish `held <id>`, retained.
    Claim,
}

/// One gateway's view of the lease.
#[derive(Debug)]
pub(crate) struct LeaseState {
    me: String,
    timing: Timing,
    holder: Option<String>,
    /// When the holder was last heard (its claim or heartbeat).
    heard: Instant,
    /// Since when the lease has looked free.
    free_since: Option<Instant>,
    /// Since when this gateway's own claim is the last one.
    mine_since: Option<Instant>,
    /// When this gateway last sent a claim.
    sent: Option<Instant>,
}

impl LeaseState {
    /// A gateway that has just subscribed and heard nothing yet.
    pub(crate) fn new(me: String, timing: Timing, now: Instant) -> Self {
        Self {
            me,
            timing,
            holder: None,
            heard: now,
            free_since: Some(now),
            mine_since: None,
            sent: None,
        }
    }

    /// A message on the lease topic.
    pub(crate) fn on_message(&mut self, payload: &[u8], now: Instant) {
        let text = std::str::from_utf8(payload).unwrap_or("");
        if let Some(id) = text.strip_prefix("held ") {
            if id == self.me {
                self.mine_since.get_or_insert(now);
            } else {
                self.mine_since = None;
            }
            self.holder = Some(id.to_owned());
            self.heard = now;
            self.free_since = None;
            return;
        }
        // `free <id>` frees only the lease of `id`: the will of a gateway that never held it
        // changes nothing.
        let freed = text.strip_prefix("free ");
        if freed.is_none() || self.holder.is_none() || self.holder.as_deref() == freed {
            self.release(now);
        }
    }

    fn release(&mut self, now: Instant) {
        self.holder = None;
        self.mine_since = None;
        self.free_since.get_or_insert(now);
    }

    /// Time passes: what to send, if anything.
    pub(crate) fn tick(&mut self, now: Instant) -> Option<Send> {
        let mine = self.holder.as_deref() == Some(self.me.as_str());
        if self.holder.is_some() && !mine && now.duration_since(self.heard) >= self.timing.stale {
            self.release(now);
        }
        let due = match self.sent {
            None => true,
            Some(at) if mine => now.duration_since(at) >= self.timing.heartbeat,
            // A claim still unanswered after a heartbeat is sent again.
            Some(at) => now.duration_since(at) >= self.timing.heartbeat.max(self.timing.settle),
        };
        let claim = match self.free_since {
            Some(since) => now.duration_since(since) >= self.timing.settle && due,
            None => mine && due,
        };
        if claim {
            self.sent = Some(now);
            return Some(Send::Claim);
        }
        None
    }

    /// Whether this gateway holds the lease and may do the work.
    pub(crate) fn held(&self, now: Instant) -> bool {
        self.mine_since
            .is_some_and(|since| now.duration_since(since) >= self.timing.settle)
    }

    /// Whether this gateway's claim is the last one, settled or not.
    pub(crate) fn claimed(&self) -> bool {
        self.mine_since.is_some()
    }
}

/// Takes part in the lease on `topic`; the watch says whether this gateway holds it. It is
/// given up (`free <id>`) when `cancel` fires.
pub(crate) fn start(
    broker: RemoteBroker,
    topic: String,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tracker.spawn(run(broker, topic, tx, cancel));
    rx
}

async fn run(
    broker: RemoteBroker,
    topic: String,
    held: watch::Sender<bool>,
    cancel: CancellationToken,
) {
    let me = format!("{:016x}", rand::random::<u64>());
    let timing = Timing::from_keep_alive(keep_alive(&broker));
    let mut backoff = MIN_BACKOFF;
    loop {
        let mut opts = options(&broker, &format!("topicgate-lease-{me}"));
        opts.set_last_will(LastWill::new(
            topic.clone(),
            format!("free {me}"),
            QoS::AtLeastOnce,
            true,
            None,
        ));
        let (client, mut events) = AsyncClient::new(opts, 16);
        let mut state: Option<LeaseState> = None;
        let mut ticks = tokio::time::interval(TICK);
        let error = loop {
            tokio::select! {
                () = cancel.cancelled() => {
                    held.send_replace(false);
                    if state.as_ref().is_some_and(LeaseState::claimed) {
                        give_up(&client, &mut events, &topic, &me).await;
                    }
                    let _ = client.try_disconnect();
                    return;
                }
                _ = ticks.tick() => {
                    let now = Instant::now();
                    if let Some(state) = &mut state {
                        if state.tick(now) == Some(Send::Claim) {
                            let claim = Bytes::from(format!("held {me}"));
                            if let Err(e) = client.try_publish(topic.clone(), QoS::AtLeastOnce, true, claim) {
                                break e.to_string();
                            }
                        }
                        held.send_if_modified(|h| std::mem::replace(h, state.held(now)) != *h);
                    }
                }
                event = events.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let filter = Filter {
                            path: topic.clone(),
                            qos: QoS::AtLeastOnce,
                            nolocal: false,
                            preserve_retain: true,
                            retain_forward_rule: RetainForwardRule::OnEverySubscribe,
                        };
                        if let Err(e) = client.try_subscribe_many(vec![filter]) {
                            break e.to_string();
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        if let Err(e) = subscribed(&ack) {
                            break e;
                        }
                        backoff = MIN_BACKOFF;
                        state = Some(LeaseState::new(me.clone(), timing, Instant::now()));
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Some(state) = &mut state {
                            state.on_message(&p.payload, Instant::now());
                        }
                    }
                    Ok(_) => {}
                    Err(e) => break e.to_string(),
                },
            }
        };
        // Without the broker this gateway cannot know who holds the lease: it stops at once.
        held.send_replace(false);
        tracing::debug!(%error, %topic, retry_in = ?backoff, "lease connection lost");
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = cancel.cancelled() => return,
        }
        backoff = (backoff * 2).min(broker.max_backoff.max(MIN_BACKOFF));
    }
}

/// Publishes `free <me>` and waits (briefly) for the broker to take it, so another gateway
/// takes over without waiting for a stale lease.
async fn give_up(client: &AsyncClient, events: &mut rumqttc::v5::EventLoop, topic: &str, me: &str) {
    let free = Bytes::from(format!("free {me}"));
    if client
        .try_publish(topic, QoS::AtLeastOnce, true, free)
        .is_err()
    {
        return;
    }
    let acked = async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), acked).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing() -> Timing {
        Timing::from_keep_alive(Duration::from_secs(4))
    }

    #[test]
    fn a_free_lease_is_claimed_after_settling_and_held_once_the_claim_comes_back() {
        let t0 = Instant::now();
        let mut a = LeaseState::new("a".into(), timing(), t0);
        assert_eq!(a.tick(t0), None, "waits to hear a retained claim first");
        let t1 = t0 + timing().settle;
        assert_eq!(a.tick(t1), Some(Send::Claim));
        assert!(!a.held(t1));
        a.on_message(b"held a", t1);
        assert!(!a.held(t1), "a claim settles before the work starts");
        assert!(a.held(t1 + timing().settle));
        assert_eq!(a.tick(t1 + timing().settle), None);
        assert_eq!(
            a.tick(t1 + timing().heartbeat),
            Some(Send::Claim),
            "heartbeat"
        );
    }

    #[test]
    fn simultaneous_claims_end_with_the_last_one() {
        let t0 = Instant::now();
        let (mut a, mut b) = (
            LeaseState::new("a".into(), timing(), t0),
            LeaseState::new("b".into(), timing(), t0),
        );
        let t1 = t0 + timing().settle;
        assert_eq!(a.tick(t1), Some(Send::Claim));
        assert_eq!(b.tick(t1), Some(Send::Claim));
        for s in [&mut a, &mut b] {
            s.on_message(b"held a", t1);
            s.on_message(b"held b", t1);
        }
        let t2 = t1 + timing().settle;
        assert!(!a.held(t2) && b.held(t2));
        assert_eq!(a.tick(t2 + timing().heartbeat), None, "the loser waits");
    }

    #[test]
    fn a_will_frees_only_its_own_gateways_lease() {
        let t0 = Instant::now();
        let mut a = LeaseState::new("a".into(), timing(), t0);
        a.on_message(b"held b", t0);
        a.on_message(b"free c", t0);
        assert_eq!(a.tick(t0 + timing().settle * 2), None, "b still holds it");
        a.on_message(b"free b", t0);
        assert_eq!(a.tick(t0 + timing().settle), Some(Send::Claim));
    }

    #[test]
    fn a_claim_not_repeated_goes_stale() {
        let t0 = Instant::now();
        let mut a = LeaseState::new("a".into(), timing(), t0);
        a.on_message(b"held b", t0);
        assert_eq!(a.tick(t0 + timing().stale / 2), None);
        let t1 = t0 + timing().stale;
        assert_eq!(a.tick(t1), None, "freed now, claimed after settling");
        assert_eq!(a.tick(t1 + timing().settle), Some(Send::Claim));
    }
}
