//! Rules shared by gateways in front of one external broker: each push rule takes its messages
//! from a shared subscription (one gateway per message), each pull rule runs only while this
//! gateway holds the rule's lease.

use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::bridge::{Bridge, TopicFilter};
use crate::mqtt::SharedDelivery;

use super::outbox::Outbox;
use super::pull::{self, PullRule};

/// Joins the shared subscription of a group (the first argument) to a filter.
pub type Subscribe = Box<dyn Fn(String, &TopicFilter) -> mpsc::Receiver<SharedDelivery> + Send>;
/// Takes part in the lease kept in a retained topic; the watch is true while this gateway holds it.
pub type Lease = Box<dyn Fn(String) -> watch::Receiver<bool> + Send>;

/// Opens the gateway's share of the rules' work on the external broker.
pub struct Sharing {
    /// Joins the shared subscription of `group` to `filter`.
    pub subscribe: Subscribe,
    /// Takes part in the lease kept in the retained `topic`; true while this gateway holds it.
    pub lease: Lease,
}

/// The shared-subscription group of the push rule `name`.
pub(crate) fn push_group(name: &str) -> String {
    format!("topicgate-push-{name}")
}

/// The retained topic that holds the lease of the pull rule `name`.
pub(crate) fn lease_topic(name: &str) -> String {
    format!("topicgate/lease/pull/{name}")
}

/// Takes what the broker gives this gateway of the rule's shared subscription into lane
/// `lane`, and acknowledges each message once it is on disk.
pub(crate) async fn intake(
    outbox: Arc<Outbox>,
    lane: usize,
    mut deliveries: mpsc::Receiver<SharedDelivery>,
    cancel: CancellationToken,
) {
    // Commits run behind the intake, so one slow fsync does not hold up the next message.
    let mut committing = FuturesUnordered::new();
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            Some(()) = committing.next(), if !committing.is_empty() => {}
            delivery = deliveries.recv() => match delivery {
                Some(delivery) => committing.extend(take(&outbox, lane, delivery)),
                None => return,
            },
        }
    }
    // What the connection handed over is kept: the outbox is committed at shutdown, and
    // pushed from when the gateway runs again (the broker, unanswered, may also send it again).
    deliveries.close();
    while let Ok(delivery) = deliveries.try_recv() {
        drop(take(&outbox, lane, delivery));
    }
}

/// Queues one delivery; the future acknowledges it once it is on disk.
fn take(
    outbox: &Outbox,
    lane: usize,
    delivery: SharedDelivery,
) -> Option<impl Future<Output = ()> + use<>> {
    let message = match crate::bridge::from_mqtt(delivery.publish.clone()) {
        Ok(m) => Arc::new(m),
        Err(e) => {
            tracing::warn!(error = %e, "dropped a shared message with an invalid topic");
            delivery.taken();
            return None;
        }
    };
    // Refused at the bound (and counted) or taken: either way the broker is done with it.
    let durable = outbox.offer_lane(lane, &message);
    Some(async move {
        let stored = match durable {
            Some(durable) => durable.wait().await,
            None => Ok(()),
        };
        // Not on disk: left unacknowledged, for the broker to send again.
        if stored.is_ok() {
            delivery.taken();
        }
    })
}

/// Runs the pull rule while `held` says this gateway holds its lease.
pub(crate) async fn leased(
    rule: Arc<PullRule>,
    client: reqwest::Client,
    bridge: Bridge,
    mut held: watch::Receiver<bool>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            r = held.wait_for(|h| *h) => if r.is_err() { return },
            () = cancel.cancelled() => return,
        }
        tracing::info!(rule = %rule.name, "this gateway holds the pull rule's lease");
        let pulling = pull::run(rule.clone(), client.clone(), bridge.clone(), cancel.clone());
        tokio::select! {
            () = pulling => return,
            r = held.wait_for(|h| !*h) => if r.is_err() { return },
        }
        tracing::info!(rule = %rule.name, "the pull rule's lease went elsewhere");
    }
}
