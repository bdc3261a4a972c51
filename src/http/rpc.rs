//! `/rpc/{topic}`: publish the body as a request and answer with its reply, one bridge call.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::IntoParams;

use super::AppState;
use super::error::{ApiError, ErrorBody, Refusals};
use super::topics::{
    CORRELATION_DATA, RESPONSE_TOPIC, build_message, caller, describe, parse_query, path_after,
    payload,
};
use crate::bridge::{Call, Message, Topic, parse_flag};

/// Query of a call.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct CallQuery {
    /// How long to wait for the reply: seconds (`2.5`) or with a unit (`500ms`, `5s`); default
    /// `rpc.timeout` (5 s), at most `rpc.max_timeout` (60 s; longer is refused with 400).
    #[param(value_type = Option<String>, example = "5s")]
    timeout: Option<String>,
    /// MQTT QoS of the request: 0, 1 or 2 (default 0).
    #[param(value_type = Option<u8>, minimum = 0, maximum = 2)]
    qos: Option<String>,
    /// `true` to publish the request's JSON envelope (payload, content type, user properties,
    /// `properties.response_topic`) as its payload, for MQTT 3.1.1 responders, which cannot read
    /// the MQTT 5 Response Topic.
    #[param(value_type = Option<bool>)]
    envelope: Option<String>,
    /// `true` to refuse the call at once when no MQTT session subscribes to the topic (404),
    /// instead of waiting for a reply that cannot come; in front of an external broker, which
    /// cannot tell, such a call is refused with 503.
    #[param(value_type = Option<bool>)]
    require_subscriber: Option<String>,
}

/// Publish the body as a request and answer with the reply.
#[utoipa::path(
    post,
    path = "/rpc/{*topic}",
    tag = "rpc",
    params(
        ("topic" = String, Path, description = "Topic the request is published to, the rest of the path, percent-decoded"),
        CallQuery,
    ),
    request_body(description = "The request payload, raw bytes of any type, with the metadata headers of `POST /topics` (`Content-Type`, `mqtt-user-NAME`). It is published with a fresh MQTT 5 Response Topic under `rpc/replies/` and fresh Correlation Data, which the gateway sets: `mqtt-response-topic` and `mqtt-correlation-data` are refused.", content(("*/*"))),
    responses(
        (status = 200, description = "The reply: its payload, raw, with its Content-Type (`application/octet-stream` if none) and its MQTT 5 user properties as `mqtt-user-NAME` headers.", content(("*/*"))),
        (status = 400, description = "Bad topic, parameter or header", body = ErrorBody),
        (status = 404, description = "`require_subscriber=true` and no MQTT subscriber matches the topic (`no_subscriber`)", body = ErrorBody),
        (status = 413, description = "Payload over the limit", body = ErrorBody),
        (status = 503, description = "Broker unavailable, the gateway is shutting down, or `require_subscriber=true` in front of an external broker, which cannot tell (`subscribers_unknown`, without `Retry-After`)", body = ErrorBody,
            headers(("Retry-After" = u32, description = "Seconds to wait before trying again"))),
        (status = 504, description = "No reply within the timeout", body = ErrorBody),
        Refusals,
    ),
    security(("basic" = []), ("bearer" = []), ())
)]
pub(crate) async fn call(state: State<AppState>, request: Request) -> Result<Response, ApiError> {
    answer(state, request).await
}

/// Publish the body as a request and answer with the reply, as `POST` does.
#[utoipa::path(
    put,
    path = "/rpc/{*topic}",
    tag = "rpc",
    params(
        ("topic" = String, Path, description = "Topic the request is published to, the rest of the path, percent-decoded"),
        CallQuery,
    ),
    request_body(description = "The request payload, as for `POST`.", content(("*/*"))),
    responses(
        (status = 200, description = "The reply, as for `POST`.", content(("*/*"))),
        (status = 400, description = "Bad topic, parameter or header", body = ErrorBody),
        (status = 404, description = "`require_subscriber=true` and no MQTT subscriber matches the topic (`no_subscriber`)", body = ErrorBody),
        (status = 413, description = "Payload over the limit", body = ErrorBody),
        (status = 503, description = "Broker unavailable, the gateway is shutting down, or `require_subscriber=true` in front of an external broker, which cannot tell (`subscribers_unknown`, without `Retry-After`)", body = ErrorBody,
            headers(("Retry-After" = u32, description = "Seconds to wait before trying again"))),
        (status = 504, description = "No reply within the timeout", body = ErrorBody),
        Refusals,
    ),
    security(("basic" = []), ("bearer" = []), ())
)]
pub(crate) async fn call_put(
    state: State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    answer(state, request).await
}

async fn answer(State(state): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let (request, body) = request.into_parts();
    let topic = Topic::parse(&path_after("/rpc", &request.uri)?)?;
    let query = parse_query::<CallQuery>(&request.uri)?;
    let timeout = state.bridge.call_timeout(query.timeout.as_deref())?;
    let envelope = match query.envelope.as_deref() {
        None => false,
        Some(v) => parse_flag("envelope", v)?,
    };
    for name in [RESPONSE_TOPIC, CORRELATION_DATA] {
        if request.headers.contains_key(name) {
            return Err(ApiError::InvalidHeader(format!(
                "{name} is set by the gateway on /rpc requests"
            )));
        }
    }
    let payload = payload(&state, &request.headers, body).await?;
    let message = build_message(topic, query.qos.as_deref(), &request.headers, payload)?;
    let who = &caller(&request.extensions)?.principal;
    let require = match query.require_subscriber.as_deref() {
        None => false,
        Some(v) => parse_flag("require_subscriber", v)?,
    };
    if require {
        match state.bridge.has_subscribers(&message.topic, who)? {
            Some(true) => {}
            Some(false) => return Err(ApiError::NoSubscriber(message.topic.to_string())),
            None => return Err(ApiError::SubscribersUnknown),
        }
    }
    let reply = state
        .bridge
        .call(message, who, Call { timeout, envelope })
        .await?;
    Ok(reply_response(&reply))
}

/// The reply as a response: payload, content type and user properties.
fn reply_response(reply: &Message) -> Response {
    let mut response = (StatusCode::OK, Body::from(reply.payload.clone())).into_response();
    describe(response.headers_mut(), reply);
    response
}
