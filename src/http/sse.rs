//! Server-sent event streams of a topic filter: retained messages (or the missed ones) first,
//! then live ones; a reader that falls behind is told how many it lost and goes on.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::stream::{self, Stream, StreamExt};
use serde::Serialize;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use super::AppState;
use crate::bridge::{Bridge, Envelope, Message, Start, TopicFilter};
use crate::metrics::{Metrics, ProtocolLabel, StreamLabel};

/// An envelope as sent in a stream.
#[derive(Serialize)]
struct StreamEnvelope {
    #[serde(flatten)]
    envelope: Envelope,
}

/// Counts an open stream for as long as it lives.
struct ClientGuard(Arc<Metrics>);

impl ClientGuard {
    fn new(metrics: Arc<Metrics>) -> Self {
        metrics.sse_clients.inc();
        Self(metrics)
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.sse_clients.dec();
    }
}

/// Opens a stream of `filter`, resuming after `last_event_id` when possible.
pub(crate) fn stream(
    state: &AppState,
    filter: TopicFilter,
    last_event_id: Option<&str>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>> + use<>> {
    let bridge = state.bridge.clone();
    let metrics = bridge.metrics().clone();
    let sub = bridge.subscribe(&filter, last_event_id);
    let at = sub.at;
    let now = SystemTime::now();

    let mut first = Vec::new();
    match sub.start {
        Start::Resume(events) => {
            for e in events.iter().filter(|e| !e.message.is_expired(now)) {
                first.push(message_event(&bridge, e.seq, &e.message, now));
            }
        }
        Start::Snapshot { reset, retained } => {
            if reset {
                first.push(
                    SseEvent::default()
                        .event("reset")
                        .id(bridge.event_id(at))
                        .data(r#"{"reason":"the stream cannot resume from Last-Event-ID; retained messages follow"}"#),
                );
            }
            for m in &retained {
                first.push(message_event(&bridge, at, m, now));
            }
        }
    }
    metrics
        .deliveries
        .get_or_create(&ProtocolLabel { protocol: "sse" })
        .inc_by(first.len() as u64);

    let guard = ClientGuard::new(metrics.clone());
    let live_bridge = bridge.clone();
    let live = BroadcastStream::new(sub.live).filter_map(move |item| {
        let _alive = &guard;
        let event = match item {
            Ok(e) if e.seq > at && filter.matches(&e.message.topic) => {
                let now = SystemTime::now();
                (!e.message.is_expired(now)).then(|| {
                    metrics
                        .deliveries
                        .get_or_create(&ProtocolLabel { protocol: "sse" })
                        .inc();
                    message_event(&live_bridge, e.seq, &e.message, now)
                })
            }
            Ok(_) => None,
            Err(BroadcastStreamRecvError::Lagged(n)) => {
                metrics
                    .lag_dropped
                    .get_or_create(&StreamLabel { stream: "sse" })
                    .inc_by(n);
                Some(
                    SseEvent::default()
                        .event("lagged")
                        .data(format!(r#"{{"dropped":{n}}}"#)),
                )
            }
        };
        std::future::ready(event.map(Ok))
    });

    let cancel = state.cancel.clone();
    let events = stream::iter(first.into_iter().map(Ok))
        .chain(live)
        .take_until(async move { cancel.cancelled_owned().await });
    Sse::new(events).keep_alive(
        KeepAlive::new()
            .interval(state.config.sse_heartbeat)
            .text("heartbeat"),
    )
}

fn message_event(bridge: &Bridge, seq: u64, message: &Message, now: SystemTime) -> SseEvent {
    let body = StreamEnvelope {
        envelope: message.envelope(now),
    };
    let data = serde_json::to_string(&body).unwrap_or_else(|_| "{}".to_owned());
    SseEvent::default()
        .event("message")
        .id(bridge.event_id(seq))
        .data(data)
}
