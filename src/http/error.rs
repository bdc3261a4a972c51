//! The one error type of the HTTP API and its JSON form `{"error", "message"}`.

use std::collections::BTreeMap;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::openapi::header::{Header, HeaderBuilder};
use utoipa::openapi::response::{Response as ApiResponse, ResponseBuilder};
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
use utoipa::openapi::{Content, Ref, RefOr};
use utoipa::{IntoResponses, ToSchema};

use crate::bridge::{BridgeError, CallError, ParamError, TopicError};
use crate::policy::{Denial, Refusal};

/// Every way a request can fail, each with its status and snake_case code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The topic or filter in the path is not acceptable.
    #[error("{0}")]
    InvalidTopic(TopicError),
    /// A query parameter has a bad value.
    #[error("{0}")]
    InvalidParameter(String),
    /// A header has a bad value.
    #[error("{0}")]
    InvalidHeader(String),
    /// Nothing retained at that topic.
    #[error("no retained message on topic '{0}'")]
    NotRetained(String),
    /// No such resource.
    #[error("no resource at this path")]
    NotFound,
    /// The path exists, the method does not.
    #[error("this method is not allowed here")]
    MethodNotAllowed,
    /// The body is over the payload limit.
    #[error("the payload is over the limit of {0} bytes")]
    PayloadTooLarge(usize),
    /// The body could not be read.
    #[error("the request body could not be read")]
    BadBody,
    /// The request took longer than allowed.
    #[error("the request took too long")]
    Timeout,
    /// The broker cannot take publishes.
    #[error("the broker is not available, try again later")]
    Unavailable,
    /// A request/response call got no reply in time.
    #[error("{0}")]
    NoReply(String),
    /// Missing or wrong credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// Too many password checks waiting already; retry in a second.
    #[error("the gateway is busy checking other logins, try again shortly")]
    LoginsBusy,
    /// The ACL does not grant this to anonymous clients.
    #[error("this topic needs credentials: HTTP Basic or a Bearer token")]
    NeedsCredentials,
    /// The ACL does not grant this to the client.
    #[error("{0}")]
    Forbidden(String),
    /// The topic is over a configured limit.
    #[error("{0}")]
    TopicLimit(String),
    /// Over the request rate; retry after the given number of seconds.
    #[error("too many requests, retry after {0} s")]
    RateLimited(u64),
    /// Too many event streams open in total.
    #[error("{0}")]
    TooManyStreams(String),
    /// This client has as many event streams open as it may.
    #[error("this client has {0} event streams open, its limit")]
    ClientStreams(usize),
    /// `?require_subscriber=true` and no MQTT session subscribes to the topic.
    #[error("no MQTT subscriber matches topic '{0}'")]
    NoSubscriber(String),
    /// `?require_subscriber=true` in front of an external broker, which cannot say who
    /// subscribes.
    #[error("the external broker cannot tell whether anyone subscribes to a topic")]
    SubscribersUnknown,
    /// A CORS preflight from an origin, or asking for a method or header, not allowed.
    #[error("{0}")]
    CorsDenied(String),
    /// A bug; details go to the log, never to the client.
    #[error("internal error")]
    Internal,
}

/// The JSON body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Machine-readable snake_case code.
    #[schema(example = "invalid_topic")]
    pub error: &'static str,
    /// One sentence for people.
    #[schema(example = "a topic to publish to cannot contain the wildcards '+' or '#'")]
    pub message: String,
}

/// The refusals of every `/topics` operation, documented once: the credentials (401), the ACL
/// (401 for an anonymous caller, 403), the request rate (429). Credentials and rate are checked
/// in `auth` before the handler runs, the ACL by the bridge.
pub(crate) struct Refusals;

impl IntoResponses for Refusals {
    fn responses() -> BTreeMap<String, RefOr<ApiResponse>> {
        let unauthorized = error_response(
            "Credentials are missing where the ACL (or `allow_anonymous = false`) requires \
             them, or wrong. `WWW-Authenticate` names the schemes: Basic and Bearer.",
        )
        .header(
            "WWW-Authenticate",
            HeaderBuilder::new()
                .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                .description(Some(
                    "The challenge: `Basic realm=\"topicgate\", Bearer realm=\"topicgate\"`",
                ))
                .build(),
        );
        let forbidden = error_response("The ACL does not grant this to the caller");
        let rate =
            error_response("Over the caller's request rate").header("Retry-After", retry_after());
        BTreeMap::from([
            ("401".to_owned(), unauthorized.build().into()),
            ("403".to_owned(), forbidden.build().into()),
            ("429".to_owned(), rate.build().into()),
        ])
    }
}

/// The limits on event streams, documented for the read that opens them: per client (429,
/// which also covers the request rate there) and in total (503).
pub(crate) struct StreamLimits;

impl IntoResponses for StreamLimits {
    fn responses() -> BTreeMap<String, RefOr<ApiResponse>> {
        let per_client = error_response(
            "Over the caller's request rate, or (event stream) as many streams open as the \
             client may have",
        )
        .header("Retry-After", retry_after());
        let total = error_response("As many event streams open as the gateway serves")
            .header("Retry-After", retry_after());
        BTreeMap::from([
            ("429".to_owned(), per_client.build().into()),
            ("503".to_owned(), total.build().into()),
        ])
    }
}

/// A response documented with the JSON error body.
fn error_response(description: &str) -> ResponseBuilder {
    ResponseBuilder::new().description(description).content(
        "application/json",
        Content::new(Some(Ref::from_schema_name(ErrorBody::name()))),
    )
}

/// The `Retry-After` header of a 429 or 503, in whole seconds; the same schema as the
/// `u32` header of the 503 tuples in `topics`.
fn retry_after() -> Header {
    HeaderBuilder::new()
        .schema(Some(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int32)))
                .minimum(Some(0)),
        ))
        .description(Some("Seconds to wait before trying again"))
        .build()
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidTopic(_)
            | ApiError::InvalidParameter(_)
            | ApiError::InvalidHeader(_)
            | ApiError::BadBody => StatusCode::BAD_REQUEST,
            ApiError::NotRetained(_) | ApiError::NotFound | ApiError::NoSubscriber(_) => {
                StatusCode::NOT_FOUND
            }
            ApiError::CorsDenied(_) => StatusCode::FORBIDDEN,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Timeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unauthorized(_) | ApiError::NeedsCredentials => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::TopicLimit(_) => StatusCode::BAD_REQUEST,
            ApiError::RateLimited(_) | ApiError::ClientStreams(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable
            | ApiError::TooManyStreams(_)
            | ApiError::LoginsBusy
            | ApiError::SubscribersUnknown => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::NoReply(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidTopic(_) => "invalid_topic",
            ApiError::InvalidParameter(_) => "invalid_parameter",
            ApiError::InvalidHeader(_) => "invalid_header",
            ApiError::NotRetained(_) => "not_retained",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::BadBody => "bad_body",
            ApiError::Timeout => "timeout",
            ApiError::Unauthorized(_) | ApiError::NeedsCredentials => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::TopicLimit(_) => "invalid_topic",
            ApiError::RateLimited(_) => "rate_limited",
            ApiError::TooManyStreams(_) | ApiError::ClientStreams(_) => "too_many_streams",
            ApiError::Unavailable => "broker_unavailable",
            ApiError::LoginsBusy => "busy",
            ApiError::NoReply(_) => "no_reply",
            ApiError::NoSubscriber(_) => "no_subscriber",
            ApiError::SubscribersUnknown => "subscribers_unknown",
            ApiError::CorsDenied(_) => "cors_denied",
            ApiError::Internal => "internal_error",
        }
    }
}

impl From<TopicError> for ApiError {
    fn from(e: TopicError) -> Self {
        ApiError::InvalidTopic(e)
    }
}

impl From<ParamError> for ApiError {
    fn from(e: ParamError) -> Self {
        ApiError::InvalidParameter(e.0)
    }
}

impl From<BridgeError> for ApiError {
    fn from(e: BridgeError) -> Self {
        match e {
            BridgeError::PayloadTooLarge { limit, .. } => ApiError::PayloadTooLarge(limit),
            BridgeError::BrokerUnavailable => ApiError::Unavailable,
            BridgeError::Storage => ApiError::Internal,
            BridgeError::Denied(d) => d.into(),
        }
    }
}

impl From<CallError> for ApiError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Publish(e) => e.into(),
            CallError::NoReply(_) => ApiError::NoReply(e.to_string()),
            CallError::Closed => ApiError::Unavailable,
        }
    }
}

impl From<Denial> for ApiError {
    fn from(d: Denial) -> Self {
        match d {
            Denial::Unauthenticated => ApiError::NeedsCredentials,
            Denial::Forbidden(_) => ApiError::Forbidden(d.to_string()),
            Denial::TooLong(_) | Denial::TooDeep(_) => ApiError::TopicLimit(d.to_string()),
        }
    }
}

/// The message of a refused request (4xx), for the log line of the front service.
#[derive(Debug, Clone)]
pub(crate) struct Reason(pub(crate) String);

/// The challenge sent with every 401.
pub(crate) const CHALLENGE: &str = r#"Basic realm="topicgate", Bearer realm="topicgate""#;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = self.to_string();
        let reason = (status.is_client_error() && status != StatusCode::NOT_FOUND)
            .then(|| Reason(format!("{}: {message}", self.code())));
        let mut response = (
            status,
            Json(ErrorBody {
                error: self.code(),
                message,
            }),
        )
            .into_response();
        if let Some(reason) = reason {
            response.extensions_mut().insert(reason);
        }
        let refusal = match self {
            ApiError::Unauthorized(_) | ApiError::LoginsBusy => Some(Refusal::Login),
            ApiError::NeedsCredentials | ApiError::Forbidden(_) => Some(Refusal::Acl),
            ApiError::RateLimited(_) => Some(Refusal::Rate),
            _ => None,
        };
        if let Some(refusal) = refusal {
            // Counted by the metrics layer, which sees every response.
            response.extensions_mut().insert(refusal);
        }
        let headers = response.headers_mut();
        match self {
            ApiError::RateLimited(secs) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            ApiError::ClientStreams(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::Unauthorized(_) | ApiError::NeedsCredentials => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(CHALLENGE),
                );
            }
            // Asking again will not help: the broker never tells.
            ApiError::SubscribersUnknown => {}
            _ if status == StatusCode::SERVICE_UNAVAILABLE => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}
