//! The HTTP API: the router below is the whole surface, and the OpenAPI document is generated
//! from the same handler annotations; the topic explorer (`explorer`) is served beside it.

mod auth;
mod cors;
mod direct;
mod emqx;
mod error;
mod explorer;
mod front;
mod ops;
mod poll;
mod rpc;
mod server;

pub use front::App;
pub use server::{Listening, serve};
mod sse;
pub(crate) mod topics;
mod ws;

pub use ws::{MqttAcceptor, PendingStream, WsStream};

use std::sync::Arc;

use axum::Router;
use axum::http::Uri;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use error::{ApiError, ErrorBody};

use self::auth::SecuritySchemes;
use crate::bridge::{Bridge, TopicError};
use crate::config::HttpConfig;

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
    /// Where MQTT over WebSocket connections go; `None` in front of an external broker.
    mqtt: Option<MqttAcceptor>,
    /// Cross-origin settings; `None` when CORS is off.
    cors: Option<cors::Cors>,
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
        (name = "rpc", description = "Request/response: publish a request with a fresh MQTT 5 Response Topic and Correlation Data, answer with its reply"),
        (name = "emqx", description = "EMQX 5's publish API: its request bodies and its answers"),
        (name = "operations", description = "Health, readiness, metrics, device rules and this document"),
    ),
    components(schemas(crate::bridge::Envelope, crate::bridge::PayloadEncoding)),
    modifiers(&SecuritySchemes)
)]
struct ApiDoc;

/// Password checks (argon2) running at once; more wait their turn.
const VERIFIERS: usize = 2;

/// Builds the API, with the OpenAPI document it serves.
pub fn router(
    bridge: Bridge,
    config: HttpConfig,
    cancel: CancellationToken,
    draining: CancellationToken,
    mqtt: Option<MqttAcceptor>,
) -> App {
    let (api_router, api) = api_parts();
    let streams = sse::Streams::new(
        config.max_streams,
        config.max_streams_per_client,
        bridge.metrics().sse_clients.clone(),
    );
    let cors = cors::Cors::new(&config.cors);
    let state = AppState(Arc::new(Shared {
        cors,
        bridge,
        config: Arc::new(config),
        cancel,
        draining,
        openapi: Arc::new(api.to_pretty_json().unwrap_or_default()),
        verifier: Arc::new(tokio::sync::Semaphore::new(VERIFIERS)),
        streams: Arc::new(streams),
        mqtt,
    }));
    finish(api_router, state)
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
        .routes(routes!(rpc::call, rpc::call_put))
        .routes(routes!(emqx::publish))
        .routes(routes!(emqx::publish_bulk))
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::metrics))
        .routes(routes!(ops::rules))
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

async fn not_found(uri: Uri) -> Response {
    let error = match uri.path() {
        "/topics" | "/topics/" | "/rpc" | "/rpc/" => ApiError::InvalidTopic(TopicError::Empty),
        _ => ApiError::NotFound,
    };
    answer(&uri, error)
}

async fn method_not_allowed(uri: Uri) -> Response {
    answer(&uri, ApiError::MethodNotAllowed)
}

/// An error in the shape of the API the path belongs to: EMQX's under `/api/v5`.
fn answer(uri: &Uri, error: ApiError) -> Response {
    if uri.path().starts_with("/api/v5/") {
        emqx::Refused::from(error).into_response()
    } else {
        error.into_response()
    }
}

fn finish(router: Router<AppState>, state: AppState) -> App {
    // Outside the OpenAPI document: pages for people (the explorer, and `/docs/` as `/docs`),
    // and MQTT over WebSocket, which is no REST resource.
    let router = router
        .route("/", get(explorer::page))
        .route("/explorer/explorer.js", get(explorer::script))
        .route("/explorer/explorer.css", get(explorer::style))
        .route("/docs/", get(ops::docs))
        .route("/mqtt", get(ws::upgrade))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state.clone());
    App::new(router, state)
}
