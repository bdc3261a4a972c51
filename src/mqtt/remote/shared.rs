//! One connection of its own per shared subscription (`$share/group/filter`) on the external
//! broker: the broker hands each message to one member of the group, and gets its
//! acknowledgement only once the member has taken it.

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish, RetainForwardRule};
use rumqttc::v5::{AsyncClient, Event};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{MIN_BACKOFF, RemoteBroker, from_publish, options, subscribed};
use crate::mqtt::MqttPublish;

/// Messages handed out and not yet taken, at most; the broker holds the rest back.
const UNTAKEN: u16 = 64;

/// One message of a shared subscription; the broker is told it arrived once [`taken`] is
/// called (dropping it unanswered leaves the broker to send it again or elsewhere).
///
/// [`taken`]: SharedDelivery::taken
#[derive(Debug)]
pub struct SharedDelivery {
    /// The message.
    pub publish: MqttPublish,
    ack: Option<(Taken, mpsc::UnboundedSender<Taken>)>,
}

/// A message taken: the connection it came on (its generation) and the packet to answer.
type Taken = (u64, Publish);

impl SharedDelivery {
    /// Acknowledges the message to the broker.
    pub fn taken(mut self) {
        if let Some((taken, acks)) = self.ack.take() {
            let _ = acks.send(taken);
        }
    }
}

/// Subscribes to `$share/{group}/{filter}` at QoS 1 on its own connection, made again with
/// backoff when lost, and hands out each message the broker gives this member.
pub(crate) fn start(
    broker: RemoteBroker,
    group: String,
    filter: String,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> mpsc::Receiver<SharedDelivery> {
    let (tx, rx) = mpsc::channel(usize::from(UNTAKEN));
    let path = format!("$share/{group}/{filter}");
    tracker.spawn(run(broker, path, tx, cancel));
    rx
}

async fn run(
    broker: RemoteBroker,
    path: String,
    out: mpsc::Sender<SharedDelivery>,
    cancel: CancellationToken,
) {
    let client_id = format!("topicgate-share-{:016x}", rand::random::<u64>());
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel();
    let mut backoff = MIN_BACKOFF;
    for generation in 0u64.. {
        let mut opts = options(&broker, &client_id);
        opts.set_manual_acks(true);
        opts.set_receive_maximum(Some(UNTAKEN));
        let (client, mut events) = AsyncClient::new(opts, usize::from(UNTAKEN) * 2);
        let mut up = false;
        let error = loop {
            tokio::select! {
                () = cancel.cancelled() => {
                    let _ = client.try_disconnect();
                    return;
                }
                Some((from, publish)) = ack_rx.recv() => {
                    // An acknowledgement for an earlier connection has no packet to answer.
                    if from == generation && let Err(e) = client.try_ack(&publish) {
                        break e.to_string();
                    }
                }
                event = events.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let filter = Filter {
                            path: path.clone(),
                            qos: QoS::AtLeastOnce,
                            // MQTT 5 §3.8.3.1: No Local on a shared subscription is a protocol error.
                            nolocal: false,
                            preserve_retain: true,
                            retain_forward_rule: RetainForwardRule::Never,
                        };
                        if let Err(e) = client.try_subscribe_many(vec![filter]) {
                            break e.to_string();
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        if let Err(e) = subscribed(&ack) {
                            break e;
                        }
                        up = true;
                        backoff = MIN_BACKOFF;
                        tracing::debug!(filter = %path, "shared subscription made");
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        let Some(message) = from_publish(publish.clone()) else {
                            let _ = client.try_ack(&publish);
                            continue;
                        };
                        let delivery = SharedDelivery {
                            publish: message,
                            ack: Some(((generation, publish), ack_tx.clone())),
                        };
                        if out.send(delivery).await.is_err() {
                            let _ = client.try_disconnect();
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => break e.to_string(),
                },
            }
        };
        if up {
            tracing::warn!(%error, filter = %path, "lost the shared subscription; subscribing again");
        } else {
            tracing::debug!(%error, filter = %path, retry_in = ?backoff, "cannot make the shared subscription");
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = cancel.cancelled() => return,
        }
        backoff = (backoff * 2).min(broker.max_backoff.max(MIN_BACKOFF));
    }
}
