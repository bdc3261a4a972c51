//! The HTTP API: the router below is the whole surface, and the OpenAPI document is generated
//! from the same handler annotations.

mod auth;
mod error;
mod ops;
mod server;

pub use server::{Listening, serve};
mod sse;
pub(crate) mod topics;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::Uri;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use error::{ApiError, ErrorBody};

use self::auth::SecuritySchemes;
use crate::bridge::{Bridge, TopicError};
use crate::config::HttpConfig;
use crate::metrics::StatusLabel;
use crate::policy::{Door, Refusal};

/// What every handler can reach: one shared allocation, since every middleware layer and
/// extractor clones the state for every request.
#[derive(Clone)]
pub(crate) struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The state's fields.
pub(crate) struct Shared {
    bridge: Bridge,
    config: Arc<HttpConfig>,
    cancel: CancellationToken,
    /// Cancelled when shutdown starts, before `cancel`: `/readyz` turns 503 while the
    /// listeners still serve.
    draining: CancellationToken,
    openapi: Arc<String>,
    /// Password checks running at once: argon2 is slow by design.
    verifier: Arc<tokio::sync::Semaphore>,
    /// Open event streams, in total and per caller.
    streams: Arc<sse::Streams>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "topicgate",
        description = "MQTT topics as HTTP resources: publish with POST/PUT, read retained values \
            with GET, list them with a `+`/`#` filter, stream live messages as server-sent events."
    ),
    tags(
        (name = "topics", description = "Publish, read, list, stream and clear topics"),
        (name = "operations", description = "Health, readiness, metrics and this document"),
    ),
    components(schemas(crate::bridge::Envelope, crate::bridge::PayloadEncoding)),
    modifiers(&SecuritySchemes)
)]
struct ApiDoc;

/// Password checks (argon2) running at once; more wait their turn.
const VERIFIERS: usize = 2;

/// Builds the router, with the OpenAPI document it serves.
pub fn router(
    bridge: Bridge,
    config: HttpConfig,
    cancel: CancellationToken,
    draining: CancellationToken,
) -> Router {
    let (api_router, api) = api_parts();
    let streams = sse::Streams::new(
        config.max_streams,
        config.max_streams_per_client,
        bridge.metrics().sse_clients.clone(),
    );
    let max_payload = bridge.max_payload();
    let state = AppState(Arc::new(Shared {
        bridge,
        config: Arc::new(config),
        cancel,
        draining,
        openapi: Arc::new(api.to_pretty_json().unwrap_or_default()),
        verifier: Arc::new(tokio::sync::Semaphore::new(VERIFIERS)),
        streams: Arc::new(streams),
    }));
    finish(api_router, state, max_payload)
}

/// The routes with their OpenAPI paths, before state is attached.
fn api_parts() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, mut api) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(
            topics::publish,
            topics::put_retained,
            topics::read,
            topics::clear
        ))
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::metrics))
        .routes(routes!(ops::openapi))
        .routes(routes!(ops::docs))
        .split_for_parts();
    // axum spells a rest-of-path parameter `{*topic}`; OpenAPI has no such syntax.
    let paths = std::mem::take(&mut api.paths.paths);
    api.paths.paths = paths
        .into_iter()
        .map(|(path, item)| (path.replace("{*", "{"), item))
        .collect();
    (router, api)
}

/// The OpenAPI document of the API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_parts().1
}

/// Time limit, status metrics and JSON for what axum answers by itself.
async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let response = match tokio::time::timeout(state.config.request_timeout, next.run(request)).await
    {
        Ok(response) => response,
        Err(_) => ApiError::Timeout.into_response(),
    };
    if let Some(&refusal) = response.extensions().get::<Refusal>() {
        state.bridge.policy().count(Door::Http, refusal);
    }
    state
        .bridge
        .metrics()
        .http_responses
        .get_or_create(&StatusLabel {
            status: response.status().as_u16(),
        })
        .inc();
    response
}

/// Authenticates and rate-limits requests for topics; the operational endpoints stay open
/// for probes and scrapers.
async fn guard(state: State<AppState>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if path == "/topics" || path.starts_with("/topics/") {
        auth::authenticate(state, request, next).await
    } else {
        next.run(request).await
    }
}

async fn not_found(uri: Uri) -> ApiError {
    match uri.path() {
        "/topics" | "/topics/" => ApiError::InvalidTopic(TopicError::Empty),
        _ => ApiError::NotFound,
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    ApiError::Internal.into_response()
}

fn finish(router: Router<AppState>, state: AppState, max_payload: usize) -> Router {
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_payload))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}
