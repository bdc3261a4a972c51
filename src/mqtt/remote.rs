//! The gateway as an MQTT 5 client of a broker the user already runs (Mosquitto, EMQX, VerneMQ,
//! HiveMQ), instead of the embedded one. Publishes go to the broker and, at QoS 1 and 2, wait
//! for its acknowledgement; one `#` subscription (no-local, retain-as-published) feeds the store
//! and the streams; a dropped connection is made again with exponential backoff. Device rules
//! share their work between gateways over connections of their own (`shared`, `lease`).

mod lease;
mod shared;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytestring::ByteString;
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Filter, Packet, PubAckReason, PubCompReason, PubRecReason, Publish,
    PublishProperties, RetainForwardRule,
};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::MqttError;
use super::link::{Link, LinkStats, Outbound, Sink};
use super::message::MqttPublish;

pub use shared::SharedDelivery;

/// First wait before connecting again; doubled up to `max_backoff` while attempts fail.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// The shortest keep-alive rumqttc accepts.
const MIN_KEEP_ALIVE: Duration = Duration::from_secs(5);
/// Publishes handed to the client and not yet settled, at most.
const IN_FLIGHT: usize = 1000;

/// Where the broker is and how to log in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteBroker {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// User name, if the broker wants one.
    pub username: Option<String>,
    /// Password, with the user name.
    pub password: Option<String>,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// Longest wait between connection attempts.
    pub max_backoff: Duration,
    /// Largest packet, both ways.
    pub max_packet: usize,
}

/// Takes part, on a connection of its own, in the shared subscription `$share/{group}/{filter}`:
/// each message goes to one gateway of the group.
pub fn subscribe_shared(
    broker: RemoteBroker,
    group: String,
    filter: String,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> mpsc::Receiver<SharedDelivery> {
    shared::start(broker, group, filter, tracker, cancel)
}

/// Takes part, on a connection of its own, in the lease kept in the retained `topic`; the watch
/// is true while this gateway holds it. Given up when `cancel` fires.
pub fn lease(
    broker: RemoteBroker,
    topic: String,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> tokio::sync::watch::Receiver<bool> {
    lease::start(broker, topic, tracker, cancel)
}

/// Starts the client; the link is up once the broker has accepted the connection.
pub(crate) fn start(
    broker: RemoteBroker,
    buffer: usize,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> Link {
    let stats = Arc::new(LinkStats::default());
    let (out_tx, out_rx) = mpsc::channel(buffer.max(1));
    let (in_tx, in_rx) = mpsc::channel(buffer.max(1));
    tracker.spawn(run(broker, out_rx, in_tx, stats.clone(), cancel));
    Link::new(Sink::Remote(out_tx), Some(in_rx), stats)
}

async fn run(
    broker: RemoteBroker,
    mut requests: mpsc::Receiver<Outbound>,
    inbound: mpsc::Sender<MqttPublish>,
    stats: Arc<LinkStats>,
    cancel: CancellationToken,
) {
    // One id per process: each gateway is its own subscriber.
    let client_id = format!("topicgate-{:016x}", rand::random::<u64>());
    let mut backoff = MIN_BACKOFF;
    loop {
        let mut session = Session::new(&broker, &client_id);
        let ended = session
            .drive(&mut requests, &inbound, &stats, &cancel)
            .await;
        stats.up.store(false, Ordering::Relaxed);
        session.fail_all();
        // Publishes queued while the connection went down are refused rather than kept.
        while let Ok(out) = requests.try_recv() {
            let _ = out.ack.send(Err(MqttError::LinkDown));
        }
        match ended {
            Ended::Stopped => break,
            Ended::Lost { error, was_up } => {
                if was_up {
                    backoff = MIN_BACKOFF;
                    tracing::warn!(%error, host = %broker.host, port = broker.port, "lost the broker; reconnecting");
                } else {
                    tracing::warn!(%error, host = %broker.host, port = broker.port, retry_in = ?backoff, "cannot reach the broker");
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = cancel.cancelled() => break,
                }
                backoff = (backoff * 2).min(broker.max_backoff.max(MIN_BACKOFF));
            }
        }
    }
}

enum Ended {
    Stopped,
    Lost { error: String, was_up: bool },
}

/// One connection: a fresh client each time, so nothing of an earlier connection is resent
/// behind the gateway's back.
struct Session {
    client: AsyncClient,
    events: EventLoop,
    /// Publishes handed to the client, in order, waiting for their packet id.
    waiting: VecDeque<(u8, oneshot::Sender<Result<(), MqttError>>)>,
    /// QoS 1 and 2 publishes on the wire, waiting for PUBACK or PUBCOMP.
    on_wire: HashMap<u16, oneshot::Sender<Result<(), MqttError>>>,
    up: bool,
}

impl Session {
    fn new(broker: &RemoteBroker, client_id: &str) -> Self {
        let options = options(broker, client_id);
        let (client, events) = AsyncClient::new(options, IN_FLIGHT + 16);
        Self {
            client,
            events,
            waiting: VecDeque::new(),
            on_wire: HashMap::new(),
            up: false,
        }
    }

    async fn drive(
        &mut self,
        requests: &mut mpsc::Receiver<Outbound>,
        inbound: &mpsc::Sender<MqttPublish>,
        stats: &LinkStats,
        cancel: &CancellationToken,
    ) -> Ended {
        loop {
            let room = self.waiting.len() + self.on_wire.len() < IN_FLIGHT;
            tokio::select! {
                () = cancel.cancelled() => {
                    let _ = self.client.try_disconnect();
                    return Ended::Stopped;
                }
                Some(out) = requests.recv(), if self.up && room => self.send(out),
                event = self.events.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        if ack.code != ConnectReturnCode::Success {
                            return self.lost(format!("the broker refused the connection: {:?}", ack.code));
                        }
                        let all = Filter {
                            path: "#".to_owned(),
                            qos: QoS::AtLeastOnce,
                            nolocal: true,
                            preserve_retain: true,
                            retain_forward_rule: RetainForwardRule::OnEverySubscribe,
                        };
                        if let Err(e) = self.client.try_subscribe_many(vec![all]) {
                            return self.lost(e.to_string());
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        if let Err(e) = subscribed(&ack) {
                            return self.lost(e);
                        }
                        self.up = true;
                        stats.up.store(true, Ordering::Relaxed);
                        tracing::info!("connected to the broker and subscribed");
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        if let Some(message) = from_publish(publish) {
                            stats.received.fetch_add(1, Ordering::Relaxed);
                            if inbound.send(message).await.is_err() {
                                let _ = self.client.try_disconnect();
                                return Ended::Stopped;
                            }
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        if let Some((qos, ack)) = self.waiting.pop_front() {
                            if qos == 0 {
                                let _ = ack.send(Ok(()));
                            } else {
                                self.on_wire.insert(pkid, ack);
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        let ok = matches!(ack.reason, PubAckReason::Success | PubAckReason::NoMatchingSubscribers);
                        self.settle(ack.pkid, ok, &ack.reason);
                    }
                    Ok(Event::Incoming(Packet::PubRec(rec))) => {
                        let ok = matches!(rec.reason, PubRecReason::Success | PubRecReason::NoMatchingSubscribers);
                        if !ok {
                            self.settle(rec.pkid, false, &rec.reason);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubComp(comp))) => {
                        self.settle(comp.pkid, comp.reason == PubCompReason::Success, &comp.reason);
                    }
                    Ok(_) => {}
                    Err(e) => return self.lost(e.to_string()),
                },
            }
        }
    }

    fn lost(&self, error: String) -> Ended {
        Ended::Lost {
            error,
            was_up: self.up,
        }
    }

    fn send(&mut self, out: Outbound) {
        let p = out.publish;
        let qos = match p.qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        };
        let properties = PublishProperties {
            payload_format_indicator: None,
            message_expiry_interval: p.expiry_secs,
            topic_alias: None,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            user_properties: p.user_properties,
            subscription_identifiers: Vec::new(),
            content_type: p.content_type,
        };
        match self
            .client
            .try_publish_with_properties(p.topic, qos, p.retain, p.payload, properties)
        {
            Ok(()) => self.waiting.push_back((p.qos, out.ack)),
            Err(e) => {
                let _ = out.ack.send(Err(MqttError::Link(e.to_string())));
            }
        }
    }

    fn settle(&mut self, pkid: u16, ok: bool, reason: &dyn std::fmt::Debug) {
        if let Some(ack) = self.on_wire.remove(&pkid) {
            let outcome = if ok {
                Ok(())
            } else {
                Err(MqttError::Link(format!(
                    "the broker refused the publish: {reason:?}"
                )))
            };
            let _ = ack.send(outcome);
        }
    }

    /// The connection is gone: nothing in flight can be confirmed any more.
    fn fail_all(&mut self) {
        for (_, ack) in self.waiting.drain(..) {
            let _ = ack.send(Err(MqttError::LinkDown));
        }
        for (_, ack) in self.on_wire.drain() {
            let _ = ack.send(Err(MqttError::LinkDown));
        }
    }
}

/// A fresh session's options: clean start, the keep-alive, packet limit and login.
fn options(broker: &RemoteBroker, client_id: &str) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, broker.host.clone(), broker.port);
    options.set_keep_alive(keep_alive(broker));
    options.set_clean_start(true);
    options.set_max_packet_size(Some(u32::try_from(broker.max_packet).unwrap_or(u32::MAX)));
    if let Some(user) = &broker.username {
        options.set_credentials(user.clone(), broker.password.clone().unwrap_or_default());
    }
    options
}

/// The keep-alive the connections use: rumqttc refuses (panics on) less than 5 s, which the
/// config refuses too; a `RemoteBroker` built in code is held to it here.
fn keep_alive(broker: &RemoteBroker) -> Duration {
    broker.keep_alive.max(MIN_KEEP_ALIVE)
}

/// Whether the broker granted every filter of a subscription; why not, if it did not.
fn subscribed(ack: &rumqttc::v5::mqttbytes::v5::SubAck) -> Result<(), String> {
    let granted = ack.return_codes.iter().all(|c| {
        matches!(
            c,
            rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
        )
    });
    if granted {
        Ok(())
    } else {
        Err(format!(
            "the broker refused the subscription: {:?}",
            ack.return_codes
        ))
    }
}

fn from_publish(p: Publish) -> Option<MqttPublish> {
    let topic = ByteString::try_from(p.topic).ok()?;
    let props = p.properties.unwrap_or_default();
    Some(MqttPublish {
        topic,
        payload: p.payload,
        qos: match p.qos {
            QoS::AtMostOnce => 0,
            QoS::AtLeastOnce => 1,
            QoS::ExactlyOnce => 2,
        },
        retain: p.retain,
        content_type: props.content_type,
        user_properties: props.user_properties,
        response_topic: props.response_topic,
        correlation_data: props.correlation_data,
        expiry_secs: props.message_expiry_interval,
    })
}
