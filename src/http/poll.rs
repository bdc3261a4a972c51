//! Long polling: `GET /topics/{topic}?wait=` answers with a value the client does not hold, or
//! with what arrives on the hub within the wait, or 204.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use super::topics::{holds, single};
use crate::bridge::{Event, Listing, Message, Start, TopicFilter};

/// A long poll: the retained value at once when the client does not hold it, else the first
/// message (a filter: the messages) arriving within `wait`, else 204.
pub(super) async fn long_poll(
    state: &AppState,
    caller: &Caller,
    filter: &TopicFilter,
    headers: &HeaderMap,
    wait: Duration,
) -> Result<Response, ApiError> {
    // Subscribed before the retained value is looked at: nothing published in between is lost.
    let mut sub = state.bridge.subscribe(filter, &caller.principal, None)?;
    if !filter.is_wildcard()
        && let Start::Snapshot { retained, .. } = &sub.start
        && let Some(current) = retained.first()
        && !holds(headers, &current.etag())
    {
        return Ok(single(current, headers));
    }
    let deadline = Instant::now() + wait;
    let (at, scope) = (sub.at, sub.scope.clone());
    let admits = |e: &Event| {
        e.seq > at && filter.matches(&e.message.topic) && scope.admits(e.message.topic.as_str())
    };
    let mut arrived: Vec<Arc<Message>> = Vec::new();
    while arrived.is_empty() {
        let next = tokio::select! {
            next = sub.live.recv() => next,
            () = tokio::time::sleep_until(deadline) => break,
            () = state.cancel.cancelled() => break,
        };
        match next {
            Ok(e) if admits(&e) => arrived.push(e.message),
            Ok(_) | Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => break,
        }
    }
    let Some(first) = arrived.first().cloned() else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    if !filter.is_wildcard() {
        let mut response = single(&first, &HeaderMap::new());
        if !first.retain {
            // A message that was not retained is no state of the topic a later poll could
            // validate: the client keeps the ETag it holds.
            response.headers_mut().remove(header::ETAG);
        }
        return Ok(response);
    }
    // What else has arrived by now goes in the same answer, the latest per topic.
    while let Ok(e) = sub.live.try_recv() {
        if admits(&e) {
            arrived.push(e.message);
        }
    }
    let mut latest: BTreeMap<&str, Arc<Message>> = BTreeMap::new();
    for m in &arrived {
        latest.insert(m.topic.as_str(), Arc::clone(m));
    }
    let messages: Vec<Arc<Message>> = latest.into_values().collect();
    Ok(Json(Listing::new(&messages, None, SystemTime::now())).into_response())
}
