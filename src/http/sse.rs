//! Server-sent event streams of a topic filter: retained messages (or the missed ones) first,
//! then live ones; a reader that falls behind is told how many it lost and goes on.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::stream::{self, Stream, StreamExt};
use prometheus_client::metrics::gauge::Gauge;

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use crate::bridge::{Bridge, Start, TopicFilter};
use crate::metrics::{ProtocolLabel, StreamLabel};

/// The open streams, counted in total (also shown as the `sse_clients` gauge) and per caller.
pub(crate) struct Streams {
    max: usize,
    per_client: usize,
    open: Mutex<(usize, HashMap<String, usize>)>,
    gauge: Gauge,
}

/// One open stream's place in [`Streams`], given back when the stream ends.
pub(crate) struct Slot {
    streams: Arc<Streams>,
    key: String,
}

impl Streams {
    pub(crate) fn new(max: usize, per_client: usize, gauge: Gauge) -> Self {
        Self {
            max,
            per_client,
            open: Mutex::new((0, HashMap::new())),
            gauge,
        }
    }

    /// Takes a place for a stream of `key`, if both limits allow.
    fn take(self: &Arc<Self>, key: &str) -> Result<Slot, ApiError> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.0 >= self.max {
            return Err(ApiError::TooManyStreams(format!(
                "the gateway has {} event streams open, its limit",
                self.max
            )));
        }
        let mine = open.1.entry(key.to_owned()).or_insert(0);
        if *mine >= self.per_client {
            return Err(ApiError::ClientStreams(self.per_client));
        }
        *mine += 1;
        open.0 += 1;
        self.gauge.set(open.0 as i64);
        Ok(Slot {
            streams: self.clone(),
            key: key.to_owned(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .streams
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.0 = open.0.saturating_sub(1);
        self.streams.gauge.set(open.0 as i64);
        if let Some(n) = open.1.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.key);
            }
        }
    }
}

/// Opens a stream of `filter` for `caller`, resuming after `last_event_id` when possible.
pub(crate) fn stream(
    state: &AppState,
    caller: &Caller,
    filter: TopicFilter,
    last_event_id: Option<&str>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>> + use<>>, ApiError> {
    let bridge = state.bridge.clone();
    let metrics = bridge.metrics().clone();
    let sub = bridge.subscribe(&filter, &caller.principal, last_event_id)?;
    let slot = state.streams.take(&caller.key())?;
    let at = sub.at;
    let now = SystemTime::now();

    let mut first = Vec::new();
    match sub.start {
        Start::Resume(events) => {
            for e in events.iter().filter(|e| !e.message.is_expired(now)) {
                first.push(message_event(&bridge, e.seq, &e.envelope_json(now)));
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
                first.push(message_event(&bridge, at, &m.envelope_json(now)));
            }
        }
    }
    metrics
        .deliveries
        .get_or_create(&ProtocolLabel { protocol: "sse" })
        .inc_by(first.len() as u64);

    let guard = slot;
    let live_bridge = bridge.clone();
    let delivered = metrics
        .deliveries
        .get_or_create(&ProtocolLabel { protocol: "sse" })
        .clone();
    let scope = sub.scope;
    let live = sub.live.into_stream().filter_map(move |item| {
        let _alive = &guard;
        let event = match item {
            Ok(e)
                if e.seq > at
                    && filter.matches(&e.message.topic)
                    && scope.admits(e.message.topic.as_str()) =>
            {
                let now = SystemTime::now();
                (!e.message.is_expired(now)).then(|| {
                    delivered.inc();
                    message_event(&live_bridge, e.seq, &e.envelope_json(now))
                })
            }
            Ok(_) => None,
            Err(n) => {
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
    Ok(Sse::new(events).keep_alive(
        KeepAlive::new()
            .interval(state.config.sse_heartbeat)
            .text("heartbeat"),
    ))
}

fn message_event(bridge: &Bridge, seq: u64, data: &str) -> SseEvent {
    SseEvent::default()
        .event("message")
        .id(bridge.event_id(seq))
        .data(data)
}
