//! `/topics/{topic}`: publish, read, list, stream and clear, mapped onto one bridge call each.

use std::time::SystemTime;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::request::Parts;
use axum::http::{Extensions, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use percent_encoding::percent_decode_str;
use serde::Deserialize;
use utoipa::openapi::path::{Parameter, ParameterIn};
use utoipa::openapi::schema::{AnyOf, ObjectBuilder, Schema, SchemaType};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{IntoParams, PartialSchema, ToSchema};

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ErrorBody, Refusals, StreamLimits};
use super::{poll, sse};
use crate::bridge::{
    Listing, Message, Origin, Qos, Topic, TopicError, TopicFilter, apply_expiry, parse_flag,
    parse_limit, parse_qos, parse_timeout,
};

/// Prefix of headers carrying MQTT 5 user properties.
pub(super) const USER_PREFIX: &str = "mqtt-user-";
pub(super) const RESPONSE_TOPIC: &str = "mqtt-response-topic";
pub(super) const CORRELATION_DATA: &str = "mqtt-correlation-data";
const EXPIRY: &str = "mqtt-message-expiry-interval";

/// Query of a publish.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct PublishQuery {
    /// MQTT QoS of the publish: 0, 1 or 2 (default 0).
    #[param(value_type = Option<u8>, minimum = 0, maximum = 2)]
    qos: Option<String>,
    /// `true` to make the broker retain the message (PUT always retains).
    #[param(value_type = Option<bool>)]
    retain: Option<String>,
    /// MQTT 5 message expiry, in seconds (1 to 4294967295).
    #[param(value_type = Option<u64>, minimum = 1, maximum = 4294967295_u64)]
    expiry: Option<String>,
}

/// The query of a PUT as documented: that of POST without `retain`, which PUT always sets.
/// The handler still reads a [`PublishQuery`]: `retain=true` is redundant and accepted,
/// `retain=false` contradicts the method and is refused with 400.
pub(crate) struct PutQuery;

impl IntoParams for PutQuery {
    fn into_params(parameter_in: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        PublishQuery::into_params(parameter_in)
            .into_iter()
            .filter(|p| p.name != "retain")
            .collect()
    }
}

/// Query of a read.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReadQuery {
    /// Page size of a wildcard listing (default and maximum: `http.list_limit`, 1000).
    #[param(value_type = Option<u32>, minimum = 1)]
    limit: Option<String>,
    /// Continue a wildcard listing after this topic (the `next` of the previous page).
    cursor: Option<String>,
    /// `true` for an event stream, as with `Accept: text/event-stream`.
    #[param(value_type = Option<bool>)]
    stream: Option<String>,
    /// Long poll: answer at once when the topic's retained value differs from `If-None-Match`
    /// (or there is one and no `If-None-Match`), else wait this long for the next message
    /// (a filter: for what arrives, as a listing), then 204. Seconds (`30`) or with a unit
    /// (`30s`), at most `http.max_wait` (60 s; longer is refused with 400).
    #[param(value_type = Option<String>, example = "30s")]
    wait: Option<String>,
}

/// Publish the request body to a topic.
#[utoipa::path(
    post,
    path = "/topics/{*topic}",
    tag = "topics",
    params(
        ("topic" = String, Path, description = "Topic name, the rest of the path, percent-decoded"),
        PublishQuery,
    ),
    request_body(description = "The payload, raw bytes of any type. Content-Type becomes the MQTT 5 content type; `mqtt-user-NAME` headers become user properties; `mqtt-response-topic` and `mqtt-correlation-data` the MQTT 5 fields.", content(("*/*"))),
    responses(
        (status = 204, description = "Published"),
        (status = 400, description = "Bad topic, parameter or header", body = ErrorBody),
        (status = 413, description = "Payload over the limit", body = ErrorBody),
        (status = 503, description = "Broker unavailable", body = ErrorBody,
            headers(("Retry-After" = u32, description = "Seconds to wait before trying again"))),
        Refusals,
    ),
    security(("basic" = []), ("bearer" = []), ())
)]
pub(crate) async fn publish(
    State(state): State<AppState>,
    request: Request,
) -> Result<StatusCode, ApiError> {
    let (request, body) = request.into_parts();
    let topic = Topic::parse(&path_text(&request.uri)?)?;
    let query = parse_query::<PublishQuery>(&request.uri)?;
    let retain = match query.retain.as_deref() {
        None => false,
        Some(v) => parse_flag("retain", v)?,
    };
    send(&state, &request, body, topic, &query, retain).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Publish the request body as the topic's retained value.
#[utoipa::path(
    put,
    path = "/topics/{*topic}",
    tag = "topics",
    params(
        ("topic" = String, Path, description = "Topic name, the rest of the path, percent-decoded"),
        PutQuery,
    ),
    request_body(description = "The payload, raw bytes of any type, with the same metadata headers as POST.", content(("*/*"))),
    responses(
        (status = 204, description = "Retained; `Location` names the resource", headers(("Location" = String))),
        (status = 400, description = "Bad topic, parameter or header; also `retain=false`, since PUT always retains", body = ErrorBody),
        (status = 413, description = "Payload over the limit", body = ErrorBody),
        (status = 503, description = "Broker unavailable", body = ErrorBody,
            headers(("Retry-After" = u32, description = "Seconds to wait before trying again"))),
        Refusals,
    ),
    security(("basic" = []), ("bearer" = []), ())
)]
pub(crate) async fn put_retained(
    State(state): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    let (request, body) = request.into_parts();
    let uri = &request.uri;
    let topic = Topic::parse(&path_text(uri)?)?;
    let query = parse_query::<PublishQuery>(uri)?;
    if let Some(v) = query.retain.as_deref()
        && !parse_flag("retain", v)?
    {
        return Err(ApiError::InvalidParameter(
            "PUT always retains; use POST to publish without retaining".to_owned(),
        ));
    }
    send(&state, &request, body, topic, &query, true).await?;
    let location = HeaderValue::from_str(uri.path()).map_err(|_| ApiError::Internal)?;
    Ok((StatusCode::NO_CONTENT, [(header::LOCATION, location)]).into_response())
}

/// Read a retained value, list retained values under a filter, or stream messages.
#[utoipa::path(
    get,
    path = "/topics/{*topic}",
    tag = "topics",
    params(
        ("topic" = String, Path, description = "Topic name, or a filter with `+` and `#` (written `%23`)"),
        ReadQuery,
        ("If-None-Match" = Option<String>, Header, description = "ETag of a copy already held"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume an event stream after this id"),
    ),
    responses(
        (status = 200, description = "A topic: its retained payload, raw, with the Content-Type it was published with (`application/octet-stream` if none), `ETag`, `Last-Modified` and `mqtt-*` metadata headers. A filter: a JSON page of retained messages. With `Accept: text/event-stream` or `?stream=true`: server-sent events, retained messages first, then live ones. With `?wait=`: a topic's changed retained value or next message as above; for a filter, a listing of the messages that arrived during the wait (the latest per topic, `next` null).",
            content(
                ("*/*"),
                (ReadJson = "application/json"),
                (String = "text/event-stream"),
            )),
        (status = 204, description = "`?wait=`: no message arrived during the wait"),
        (status = 304, description = "Unchanged since the given ETag"),
        (status = 400, description = "Bad topic, filter or parameter", body = ErrorBody),
        (status = 404, description = "Nothing retained on the topic", body = ErrorBody),
        Refusals,
        StreamLimits,
    ),
    security(("basic" = []), ("bearer" = []), ())
)]
pub(crate) async fn read(
    State(state): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    let (uri, headers) = (request.uri(), request.headers());
    let caller = caller(request.extensions())?;
    let filter = TopicFilter::parse(&path_text(uri)?)?;
    let query = parse_query::<ReadQuery>(uri)?;
    let wants_stream = match query.stream.as_deref() {
        Some(v) => parse_flag("stream", v)?,
        None => accepts_event_stream(headers),
    };
    if let Some(wait) = query.wait.as_deref() {
        if wants_stream || query.limit.is_some() || query.cursor.is_some() {
            return Err(ApiError::InvalidParameter(
                "wait does not combine with an event stream, limit or cursor".to_owned(),
            ));
        }
        let max = state.config.max_wait;
        let wait = parse_timeout(wait, max).map_err(|_| {
            ApiError::InvalidParameter(format!(
                "wait must be above 0 and at most {} (seconds, or with a unit: 500ms, 30s)",
                humantime::format_duration(max)
            ))
        })?;
        return poll::long_poll(&state, caller, &filter, headers, wait).await;
    }
    if wants_stream {
        let last_id = headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        return Ok(sse::stream(&state, caller, filter, last_id.as_deref())?.into_response());
    }
    if filter.is_wildcard() {
        return list(&state, caller, &filter, &query);
    }
    if query.limit.is_some() || query.cursor.is_some() {
        return Err(ApiError::InvalidParameter(
            "limit and cursor apply only to filters with '+' or '#'".to_owned(),
        ));
    }
    let topic = filter.as_topic().ok_or(TopicError::Reserved)?;
    let message = state
        .bridge
        .retained(&topic, &caller.principal)?
        .ok_or_else(|| ApiError::NotRetained(topic.to_string()))?;
    Ok(single(&message, headers))
}

/// Clear a topic's retained value (an empty retained publish, seen by MQTT subscribers too).
#[utoipa::path(
    delete,
    path = "/topics/{*topic}",
    tag = "topics",
    params(("topic" = String, Path, description = "Topic name")),
    responses(
        (status = 204, description = "Cleared"),
        (status = 400, description = "Bad topic", body = ErrorBody),
        (status = 404, description = "Nothing retained on the topic", body = ErrorBody),
        (status = 503, description = "Broker unavailable", body = ErrorBody,
            headers(("Retry-After" = u32, description = "Seconds to wait before trying again"))),
        Refusals,
    ),
    security(("basic" = []), ("bearer" = []), ())
)]
pub(crate) async fn clear(
    State(state): State<AppState>,
    request: Request,
) -> Result<StatusCode, ApiError> {
    let topic = Topic::parse(&path_text(request.uri())?)?;
    parse_query::<Empty>(request.uri())?;
    let caller = caller(request.extensions())?;
    if state
        .bridge
        .clear(&topic, Origin::Http, &caller.principal)
        .await?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotRetained(topic.to_string()))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

/// The JSON body of a read: a [`Listing`] for a filter; for a topic, its retained payload as
/// published, which is any JSON when it was published as `application/json`.
pub(crate) struct ReadJson;

impl PartialSchema for ReadJson {
    fn schema() -> RefOr<Schema> {
        AnyOf::builder()
            .item(Ref::from_schema_name(Listing::name()))
            .item(
                ObjectBuilder::new()
                    .schema_type(SchemaType::AnyValue)
                    .description(Some("A topic's retained JSON payload, as published.")),
            )
            .description(Some(
                "A filter: a page of retained messages. A topic: its retained payload.",
            ))
            .into()
    }
}

impl ToSchema for ReadJson {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((Listing::name().into_owned(), Listing::schema()));
        Listing::schemas(schemas);
    }
}

fn list(
    state: &AppState,
    caller: &Caller,
    filter: &TopicFilter,
    query: &ReadQuery,
) -> Result<Response, ApiError> {
    let max = state.config.list_limit;
    let limit = match query.limit.as_deref() {
        None => max,
        Some(v) => parse_limit(v, max)?,
    };
    let page = state
        .bridge
        .list(filter, &caller.principal, query.cursor.as_deref(), limit)?;
    Ok(Json(Listing::new(&page.messages, page.next, SystemTime::now())).into_response())
}

/// Whether `If-None-Match` names `etag` (or `*`).
pub(super) fn holds(request: &HeaderMap, etag: &str) -> bool {
    request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == "*" || t == etag)
}

pub(super) fn single(message: &Message, request: &HeaderMap) -> Response {
    let etag = message.etag();
    let unchanged = holds(request, &etag);
    let mut response = if unchanged {
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response
    } else {
        Response::new(Body::from(message.payload.clone()))
    };
    let headers = response.headers_mut();
    // Both values are ASCII, made here: taken as they are, not copied.
    let last_modified = httpdate::fmt_http_date(message.updated_at);
    for (name, value) in [(header::ETAG, etag), (header::LAST_MODIFIED, last_modified)] {
        if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(value)) {
            headers.insert(name, v);
        }
    }
    if unchanged {
        return response;
    }
    describe(headers, message);
    if let Some(v) = message
        .response_topic
        .as_deref()
        .and_then(|t| HeaderValue::from_str(t).ok())
    {
        headers.insert(RESPONSE_TOPIC, v);
    }
    if let Some(v) = message
        .correlation_data
        .as_ref()
        .and_then(|d| HeaderValue::from_bytes(d).ok())
    {
        headers.insert(CORRELATION_DATA, v);
    }
    if let Some(secs) = message.remaining_expiry(SystemTime::now()) {
        headers.insert(EXPIRY, HeaderValue::from(secs));
    }
    response
}

/// Writes a message's `Content-Type` (`application/octet-stream` when it has none) and its
/// user properties as `mqtt-user-NAME` headers.
pub(super) fn describe(headers: &mut HeaderMap, message: &Message) {
    let content_type = message
        .content_type
        .as_deref()
        .and_then(|ct| HeaderValue::from_str(ct).ok())
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_TYPE, content_type);
    for (name, value) in &message.user_properties {
        let name = HeaderName::try_from(format!("{USER_PREFIX}{name}"));
        if let (Ok(name), Ok(value)) = (name, HeaderValue::from_str(value)) {
            headers.append(name, value);
        }
    }
}

/// Reads the body and publishes it with the request's metadata, as the caller.
async fn send(
    state: &AppState,
    request: &Parts,
    body: Body,
    topic: Topic,
    query: &PublishQuery,
    retain: bool,
) -> Result<(), ApiError> {
    let payload = payload(state, &request.headers, body).await?;
    let mut message = build_message(topic, query.qos.as_deref(), &request.headers, payload)?;
    message.retain = retain;
    if let Some(v) = query.expiry.as_deref() {
        apply_expiry(&mut message, v)?;
    }
    let who = &caller(&request.extensions)?.principal;
    Ok(state.bridge.publish(message, who).await?)
}

/// The caller the front attached to a `/topics` or `/rpc` request.
pub(super) fn caller(extensions: &Extensions) -> Result<&Caller, ApiError> {
    extensions.get::<Caller>().ok_or(ApiError::Internal)
}

/// The request body, refused with 413 past the payload limit: at once when Content-Length
/// says so, else as soon as that many bytes have arrived.
pub(super) async fn payload(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Bytes, ApiError> {
    read_body(headers, body, state.bridge.max_payload()).await
}

/// The request body, refused with 413 past `limit` bytes, as [`payload`] does.
pub(super) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    let refused = |e: Box<dyn std::error::Error + Send + Sync>| {
        if e.is::<LengthLimitError>() {
            ApiError::PayloadTooLarge(limit)
        } else {
            ApiError::BadBody
        }
    };
    // A small body comes in one frame, which is kept as it is; only a body in several frames
    // is copied into one buffer.
    let mut body = Limited::new(body, limit);
    let mut whole = Bytes::new();
    let mut joined: Option<BytesMut> = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(refused)?.into_data() else {
            continue;
        };
        match &mut joined {
            Some(buffer) => buffer.extend_from_slice(&data),
            None if whole.is_empty() => whole = data,
            None => {
                let mut buffer = BytesMut::with_capacity(whole.len() + data.len());
                buffer.extend_from_slice(&whole);
                buffer.extend_from_slice(&data);
                joined = Some(buffer);
            }
        }
    }
    Ok(joined.map_or(whole, BytesMut::freeze))
}

/// A message of `payload` with the QoS asked for and the metadata of the request's headers.
pub(super) fn build_message(
    topic: Topic,
    qos: Option<&str>,
    headers: &HeaderMap,
    payload: Bytes,
) -> Result<Message, ApiError> {
    let mut message = Message::new(topic, payload, Origin::Http);
    message.qos = match qos {
        None => Qos::default(),
        Some(v) => parse_qos(v)?,
    };
    message.content_type = content_type(headers)?;
    for (name, value) in headers {
        let Some(prop) = name.as_str().strip_prefix(USER_PREFIX) else {
            continue;
        };
        let value = text_header(name.as_str(), value)?;
        message.user_properties.push((prop.to_owned(), value));
    }
    if let Some(v) = headers.get(RESPONSE_TOPIC) {
        let text = text_header(RESPONSE_TOPIC, v)?;
        let topic = Topic::parse(&text).map_err(|e| {
            ApiError::InvalidHeader(format!("{RESPONSE_TOPIC} is not a valid topic: {e}"))
        })?;
        message.response_topic = Some(topic.to_string());
    }
    if let Some(v) = headers.get(CORRELATION_DATA) {
        message.correlation_data = Some(Bytes::copy_from_slice(v.as_bytes()));
    }
    Ok(message)
}

/// The body's content type. curl's `-d` labels every body as a form, which no device means, so
/// that label counts as none.
fn content_type(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(header::CONTENT_TYPE) else {
        return Ok(None);
    };
    let text = text_header("content-type", v)?;
    let essence = text.split(';').next().unwrap_or("").trim();
    if essence.is_empty() || essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return Ok(None);
    }
    Ok(Some(text))
}

fn text_header(name: &str, value: &HeaderValue) -> Result<String, ApiError> {
    let text = std::str::from_utf8(value.as_bytes())
        .map_err(|_| ApiError::InvalidHeader(format!("header {name} is not valid UTF-8")))?;
    if text.contains('\0') {
        return Err(ApiError::InvalidHeader(format!(
            "header {name} contains the character U+0000"
        )));
    }
    Ok(text.to_owned())
}

fn accepts_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.split(';').next().unwrap_or("").trim() == "text/event-stream")
}

pub(super) fn parse_query<T: serde::de::DeserializeOwned + Default>(
    uri: &Uri,
) -> Result<T, ApiError> {
    match uri.query() {
        None => Ok(T::default()),
        Some(_) => Query::<T>::try_from_uri(uri)
            .map(|q| q.0)
            .map_err(|e| ApiError::InvalidParameter(query_message(&e.body_text()))),
    }
}

/// Turns serde's wording into one sentence about the query.
fn query_message(detail: &str) -> String {
    let detail = detail
        .trim_start_matches("Failed to deserialize query string: ")
        .trim_end_matches('.');
    format!("bad query string: {detail}")
}

/// The topic part of a `/topics` path, percent-decoded; refuses bytes that are not UTF-8.
pub(crate) fn path_text(uri: &Uri) -> Result<String, ApiError> {
    path_after("/topics", uri)
}

/// The part of the path after `prefix`, percent-decoded; refuses bytes that are not UTF-8.
pub(super) fn path_after(prefix: &str, uri: &Uri) -> Result<String, ApiError> {
    let rest = uri.path().strip_prefix(prefix).unwrap_or_default();
    let rest = rest.strip_prefix('/').unwrap_or(rest);
    let bytes: Vec<u8> = percent_decode_str(rest).collect();
    String::from_utf8(bytes).map_err(|_| ApiError::InvalidTopic(TopicError::NotUtf8))
}
