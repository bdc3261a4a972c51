//! `POST /api/v5/publish` and `/api/v5/publish/bulk`: EMQX 5's publish API, its request bodies
//! and its answers, so that backends written against EMQX publish here unchanged.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::response::{Response as ApiResponse, ResponseBuilder};
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
use utoipa::openapi::{Content, Ref, RefOr};
use utoipa::{IntoResponses, ToSchema};

use super::AppState;
use super::error::ApiError;
use super::topics::{caller, read_body};
use crate::bridge::{Message, Origin, Qos, Topic};
use crate::policy::{Action, Principal};

/// MQTT 5 reason code 0x10, what EMQX answers when no subscriber matched.
const NO_MATCHING_SUBSCRIBERS: u8 = 16;
/// MQTT 5 reason code 0x88, for an item of a batch the broker could not take.
const SERVER_UNAVAILABLE: u8 = 136;

/// One message to publish, as EMQX 5 takes it.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct PublishRequest {
    /// Topic to publish to: not empty, no wildcards, U+0000 or leading `$`.
    #[schema(example = "api/example/topic", pattern = r"^[^$+#\x00][^+#\x00]*$")]
    topic: String,
    /// The payload: text, or base64 with `payload_encoding: "base64"`.
    #[schema(example = "hello emqx api")]
    payload: String,
    /// How `payload` is written: `plain` (default) or `base64`.
    #[serde(default)]
    payload_encoding: Encoding,
    /// MQTT QoS: 0 (default), 1 or 2.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 2)]
    qos: u8,
    /// Whether the message is retained (default false).
    #[serde(default)]
    retain: bool,
    /// MQTT 5 publish properties.
    #[serde(default)]
    properties: PublishProperties,
}

/// How the payload of a [`PublishRequest`] is written.
#[derive(Debug, Default, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Encoding {
    /// The payload as it is.
    #[default]
    Plain,
    /// The payload in standard base64.
    Base64,
}

/// The MQTT 5 properties of a [`PublishRequest`].
#[derive(Debug, Default, Deserialize, ToSchema)]
pub(crate) struct PublishProperties {
    /// 0: bytes; 1: UTF-8 text (checked; not forwarded to subscribers).
    #[schema(minimum = 0, maximum = 1)]
    payload_format_indicator: Option<u8>,
    /// Seconds the message lives; 0 or absent: no expiry.
    message_expiry_interval: Option<u32>,
    /// MQTT 5 Response Topic: a topic as `topic` is.
    #[schema(pattern = r"^[^$+#\x00][^+#\x00]*$")]
    response_topic: Option<String>,
    /// MQTT 5 Correlation Data, as text.
    correlation_data: Option<String>,
    /// MQTT 5 user properties, name to value.
    user_properties: Option<BTreeMap<String, String>>,
    /// MQTT 5 content type, without U+0000.
    #[schema(pattern = r"^[^\x00]*$")]
    content_type: Option<String>,
}

/// A message published and delivered to at least one subscriber.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Published {
    /// The message's id: 32 hexadecimal digits, as EMQX's.
    #[schema(example = "0006BE6A4D0B8F2C9A1F35E7C0D24B18")]
    id: String,
}

/// A message published to no subscriber, or (in a batch) not published.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct NotDelivered {
    /// The MQTT 5 reason code: 16 when no subscriber matched, 136 when the broker was
    /// unavailable.
    #[schema(example = 16)]
    reason_code: u8,
    /// The reason code's name, as EMQX spells it.
    #[schema(example = "no_matching_subscribers")]
    message: &'static str,
}

/// The result of one message of a batch.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub(crate) enum Outcome {
    /// Delivered.
    Published(Published),
    /// Not delivered.
    NotDelivered(NotDelivered),
}

/// An error as EMQX's management API writes it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct EmqxError {
    /// An upper-case code: `BAD_REQUEST`, `FORBIDDEN`, `PAYLOAD_TOO_LARGE`,
    /// `SERVICE_UNAVAILABLE`, ...
    #[schema(example = "BAD_REQUEST")]
    code: &'static str,
    /// One sentence for people.
    message: String,
}

/// An [`ApiError`] answered in EMQX's shape, with its status and headers.
pub(crate) struct Refused(ApiError);

impl<E: Into<ApiError>> From<E> for Refused {
    fn from(e: E) -> Self {
        Self(e.into())
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let code = match self.0.status() {
            StatusCode::BAD_REQUEST => "BAD_REQUEST",
            StatusCode::UNAUTHORIZED => "UNAUTHORIZED",
            StatusCode::FORBIDDEN => "FORBIDDEN",
            StatusCode::NOT_FOUND => "NOT_FOUND",
            StatusCode::METHOD_NOT_ALLOWED => "METHOD_NOT_ALLOWED",
            StatusCode::PAYLOAD_TOO_LARGE => "PAYLOAD_TOO_LARGE",
            StatusCode::REQUEST_TIMEOUT => "REQUEST_TIMEOUT",
            StatusCode::TOO_MANY_REQUESTS => "TOO_MANY_REQUESTS",
            StatusCode::SERVICE_UNAVAILABLE => "SERVICE_UNAVAILABLE",
            _ => "INTERNAL_ERROR",
        };
        let message = self.0.to_string();
        // The gateway's own answer keeps its status, headers and the front's marks; only the
        // body takes EMQX's shape.
        let (parts, _) = self.0.into_response().into_parts();
        let body = Json(EmqxError { code, message })
            .into_response()
            .into_body();
        Response::from_parts(parts, body)
    }
}

/// The refusals of the front and the ACL, documented in EMQX's shape: credentials (401), the
/// ACL (401 for an anonymous caller, 403), the request rate (429).
pub(crate) struct EmqxRefusals;

impl IntoResponses for EmqxRefusals {
    fn responses() -> BTreeMap<String, RefOr<ApiResponse>> {
        let json = || Content::new(Some(Ref::from_schema_name(EmqxError::name())));
        let text_header = |description: &str| {
            HeaderBuilder::new()
                .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                .description(Some(description))
                .build()
        };
        let seconds = HeaderBuilder::new()
            .schema(Some(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int32)))
                    .minimum(Some(0)),
            ))
            .description(Some("Seconds to wait before trying again"))
            .build();
        let unauthorized = ResponseBuilder::new()
            .description(
                "Credentials are missing where the ACL (or `allow_anonymous = false`) requires \
                 them, or wrong",
            )
            .content("application/json", json())
            .header(
                "WWW-Authenticate",
                text_header(
                    "The challenge: `Basic realm=\"topicgate\", Bearer realm=\"topicgate\"`",
                ),
            );
        let forbidden = ResponseBuilder::new()
            .description("The ACL does not grant publishing to the caller")
            .content("application/json", json());
        let rate = ResponseBuilder::new()
            .description("Over the caller's request rate")
            .content("application/json", json())
            .header("Retry-After", seconds);
        BTreeMap::from([
            ("401".to_owned(), unauthorized.build().into()),
            ("403".to_owned(), forbidden.build().into()),
            ("429".to_owned(), rate.build().into()),
        ])
    }
}

fn bad(message: impl Into<String>) -> Refused {
    Refused(ApiError::InvalidParameter(message.into()))
}

/// Publish one message, as EMQX 5's `POST /api/v5/publish`.
#[utoipa::path(
    post,
    path = "/api/v5/publish",
    tag = "emqx",
    request_body(content = PublishRequest, description = "The message, as EMQX 5 takes it. Unknown fields (EMQX 4's `clientid`) are ignored."),
    responses(
        (status = 200, description = "Published, and at least one MQTT subscriber matched (always, in front of an external broker, which cannot tell)", body = Published),
        (status = 202, description = "Published, and no MQTT subscriber matched: `reason_code` 16", body = NotDelivered),
        (status = 400, description = "Bad JSON, field, topic or payload encoding", body = EmqxError),
        (status = 413, description = "Body, or decoded payload, over the limit", body = EmqxError),
        (status = 503, description = "Broker unavailable", body = EmqxError,
            headers(("Retry-After" = u32, description = "Seconds to wait before trying again"))),
        EmqxRefusals,
    ),
    security(("basic" = []), ("bearer" = []), ())
)]
pub(crate) async fn publish(
    State(state): State<AppState>,
    request: Request,
) -> Result<Response, Refused> {
    let (who, body) = read(&state, request).await?;
    let item: PublishRequest =
        serde_json::from_slice(&body).map_err(|e| bad(format!("bad request body: {e}")))?;
    let message = to_message(item, state.bridge.max_payload())?;
    let topic = message.topic.clone();
    state.bridge.publish(message, &who).await?;
    let (status, outcome) = outcome(&state, &topic, &who)?;
    Ok((status, Json(outcome)).into_response())
}

/// Publish several messages, as EMQX 5's `POST /api/v5/publish/bulk`.
#[utoipa::path(
    post,
    path = "/api/v5/publish/bulk",
    tag = "emqx",
    request_body(content = Vec<PublishRequest>, description = "The messages, in order. Every item is checked (fields, topic, encoding, size, ACL) before any is published: one bad item refuses the whole batch with 400 (403 for the ACL), naming its index, as EMQX does."),
    responses(
        (status = 200, description = "Every message published and matched by an MQTT subscriber: one `{\"id\"}` per message, in order", body = Vec<Outcome>),
        (status = 202, description = "Every message published, some matched no subscriber: their items are `{\"reason_code\": 16, \"message\": \"no_matching_subscribers\"}`", body = Vec<Outcome>),
        (status = 400, description = "Bad JSON, an empty array, or a bad item", body = EmqxError),
        (status = 413, description = "Body, or a decoded payload, over the limit", body = EmqxError),
        (status = 503, description = "The broker was unavailable for some messages: their items carry `reason_code` 136", body = Vec<Outcome>),
        EmqxRefusals,
    ),
    security(("basic" = []), ("bearer" = []), ())
)]
pub(crate) async fn publish_bulk(
    State(state): State<AppState>,
    request: Request,
) -> Result<Response, Refused> {
    let (who, body) = read(&state, request).await?;
    let items: Vec<PublishRequest> =
        serde_json::from_slice(&body).map_err(|e| bad(format!("bad request body: {e}")))?;
    if items.is_empty() {
        return Err(bad("the batch is empty"));
    }
    let policy = state.bridge.policy();
    let mut messages = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let at = |e: Refused| match e.0 {
            ApiError::InvalidParameter(m) | ApiError::InvalidHeader(m) => {
                bad(format!("item {i}: {m}"))
            }
            ApiError::InvalidTopic(t) => bad(format!("item {i}: {t}")),
            other => Refused(other),
        };
        let message = to_message(item, state.bridge.max_payload()).map_err(at)?;
        policy
            .authorize(&who, Action::Publish, message.topic.as_str())
            .map_err(Refused::from)?;
        messages.push(message);
    }
    let mut outcomes = Vec::with_capacity(messages.len());
    let (mut unmatched, mut failed) = (false, false);
    for message in messages {
        let topic = message.topic.clone();
        match state.bridge.publish(message, &who).await {
            Ok(()) => {
                let (status, outcome) = outcome(&state, &topic, &who)?;
                unmatched |= status != StatusCode::OK;
                outcomes.push(outcome);
            }
            Err(e) => {
                tracing::debug!(error = %e, "a message of a batch was not published");
                failed = true;
                outcomes.push(Outcome::NotDelivered(NotDelivered {
                    reason_code: SERVER_UNAVAILABLE,
                    message: "server_unavailable",
                }));
            }
        }
    }
    // EMQX's overall status: 503 when any failed, else 202 when any matched nobody.
    let status = if failed {
        StatusCode::SERVICE_UNAVAILABLE
    } else if unmatched {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(outcomes)).into_response())
}

/// The caller and the body, which may hold a base64 payload of the full size.
async fn read(state: &AppState, request: Request) -> Result<(Principal, Bytes), Refused> {
    let (parts, body): (_, Body) = request.into_parts();
    let who = caller(&parts.extensions)?.principal.clone();
    let limit = state
        .bridge
        .max_payload()
        .saturating_mul(2)
        .saturating_add(64 * 1024);
    let body = read_body(&parts.headers, body, limit).await?;
    Ok((who, body))
}

/// The answer for a published message: 200 with its id when some MQTT session subscribes to
/// its topic (or the broker cannot tell), else 202.
fn outcome(
    state: &AppState,
    topic: &Topic,
    who: &Principal,
) -> Result<(StatusCode, Outcome), Refused> {
    Ok(match state.bridge.has_subscribers(topic, who)? {
        Some(false) => (
            StatusCode::ACCEPTED,
            Outcome::NotDelivered(NotDelivered {
                reason_code: NO_MATCHING_SUBSCRIBERS,
                message: "no_matching_subscribers",
            }),
        ),
        Some(true) | None => (
            StatusCode::OK,
            Outcome::Published(Published { id: new_id() }),
        ),
    })
}

/// The message an EMQX request describes, checked as an MQTT 5 publish would be.
fn to_message(item: PublishRequest, max_payload: usize) -> Result<Message, Refused> {
    let topic = Topic::parse(&item.topic)?;
    let payload = match item.payload_encoding {
        Encoding::Plain => Bytes::from(item.payload),
        Encoding::Base64 => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(item.payload.as_bytes())
                .map_err(|e| bad(format!("payload is not valid base64: {e}")))?,
        ),
    };
    if payload.len() > max_payload {
        return Err(Refused(ApiError::PayloadTooLarge(max_payload)));
    }
    let qos = Qos::new(item.qos).ok_or_else(|| bad("qos must be 0, 1 or 2"))?;
    let props = item.properties;
    match props.payload_format_indicator {
        None | Some(0) => {}
        Some(1) if std::str::from_utf8(&payload).is_ok() => {}
        Some(1) => {
            return Err(bad(
                "payload_format_indicator is 1 but the payload is not UTF-8",
            ));
        }
        Some(_) => return Err(bad("payload_format_indicator must be 0 or 1")),
    }
    let mut message = Message::new(topic, payload, Origin::Http);
    message.qos = qos;
    message.retain = item.retain;
    if let Some(secs) = props.message_expiry_interval.filter(|s| *s > 0) {
        message.expires_at = Some(message.updated_at + Duration::from_secs(u64::from(secs)));
    }
    if let Some(t) = props.response_topic {
        let topic = Topic::parse(&t)
            .map_err(|e| bad(format!("response_topic is not a valid topic: {e}")))?;
        message.response_topic = Some(topic.to_string());
    }
    message.correlation_data = props.correlation_data.map(Bytes::from);
    if let Some(ct) = props.content_type {
        message.content_type = Some(text("content_type", ct)?);
    }
    for (name, value) in props.user_properties.unwrap_or_default() {
        let name = text("user_properties", name)?;
        message
            .user_properties
            .push((name, text("user_properties", value)?));
    }
    Ok(message)
}

/// A string MQTT can carry: no U+0000.
fn text(field: &str, value: String) -> Result<String, Refused> {
    if value.contains('\0') {
        return Err(bad(format!("{field} contains the character U+0000")));
    }
    Ok(value)
}

/// A message id as EMQX writes one: 128 bits as 32 upper-case hexadecimal digits, the time in
/// microseconds first, so ids sort by time.
fn new_id() -> String {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    format!("{micros:016X}{:016X}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(json: &str) -> Result<Message, String> {
        let item: PublishRequest = serde_json::from_str(json).map_err(|e| e.to_string())?;
        to_message(item, 16).map_err(|e| e.0.to_string())
    }

    #[test]
    fn emqx_fields_become_the_message() {
        let m = item(
            r#"{"topic":"a/b","payload":"aGk=","payload_encoding":"base64","qos":1,"retain":true,
            "clientid":"ignored","properties":{"payload_format_indicator":1,
            "message_expiry_interval":60,"response_topic":"r","correlation_data":"c",
            "user_properties":{"k":"v"},"content_type":"text/plain"}}"#,
        )
        .unwrap();
        assert_eq!(m.payload, "hi");
        assert_eq!((m.qos.level(), m.retain), (1, true));
        assert!(m.expires_at.is_some());
        assert_eq!(m.response_topic.as_deref(), Some("r"));
        assert_eq!(m.correlation_data.as_deref(), Some(&b"c"[..]));
        assert_eq!(m.user_properties, [("k".to_owned(), "v".to_owned())]);
        assert_eq!(m.content_type.as_deref(), Some("text/plain"));
    }

    #[test]
    fn bad_items_are_refused_with_a_reason() {
        for (json, says) in [
            (r#"{"payload":"x"}"#, "missing field `topic`"),
            (r#"{"topic":"a/#","payload":"x"}"#, "wildcard"),
            (r#"{"topic":"a","payload":"x","qos":3}"#, "qos"),
            (
                r#"{"topic":"a","payload":"!","payload_encoding":"base64"}"#,
                "base64",
            ),
            (
                r#"{"topic":"a","payload":"x","payload_encoding":"hex"}"#,
                "unknown variant",
            ),
            (
                r#"{"topic":"a","payload":"x","properties":{"response_topic":"+"}}"#,
                "response_topic",
            ),
            (
                r#"{"topic":"a","payload":"0123456789abcdefg"}"#,
                "over the limit",
            ),
            (
                r#"{"topic":"a","payload":"/w==","payload_encoding":"base64","properties":{"payload_format_indicator":1}}"#,
                "not UTF-8",
            ),
        ] {
            let err = item(json).unwrap_err();
            assert!(err.contains(says), "{json}: {err}");
        }
    }

    #[test]
    fn ids_are_32_hex_digits_in_time_order() {
        let (a, b) = (new_id(), new_id());
        assert_eq!(a.len(), 32);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase())
        );
        assert!(a[..16] <= b[..16]);
    }
}
