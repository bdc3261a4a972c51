//! Operational endpoints: liveness, readiness, metrics, the device rules, the OpenAPI document
//! and its docs page.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;

/// The push and pull rules with their state: counters, outbox depth, the last outcome. Header
/// values are redacted.
#[utoipa::path(get, path = "/rules", tag = "operations",
    responses((status = 200, description = "Every configured rule", body = crate::bridge::RulesReport)))]
pub(crate) async fn rules(State(state): State<AppState>) -> Json<crate::bridge::RulesReport> {
    Json(state.bridge.rules())
}

/// The offline API documentation page; it renders `/openapi.json` in the browser.
const DOCS_PAGE: &str = include_str!("docs.html");

/// Health of the gateway.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Health {
    /// `ok`, or `unavailable` with the failing checks.
    status: &'static str,
    /// Whether the gateway's link into the broker is up.
    broker_link: bool,
    /// Whether the gateway is shutting down.
    shutting_down: bool,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", body = Health)))]
pub(crate) async fn healthz(State(state): State<AppState>) -> Json<Health> {
    Json(health(&state))
}

/// Readiness: the broker link is up, every listener is bound and the gateway is not stopping.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "Not ready", body = Health),
    ))]
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
    let h = health(&state);
    let status = if h.status == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(h)).into_response()
}

fn health(state: &AppState) -> Health {
    let broker_link = state.bridge.is_ready();
    let shutting_down = state.draining.is_cancelled();
    Health {
        status: if broker_link && !shutting_down {
            "ok"
        } else {
            "unavailable"
        },
        broker_link,
        shutting_down,
    }
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text", body = String, content_type = "text/plain")))]
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    let text = state.bridge.refreshed_metrics().render();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

/// This API's OpenAPI document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "OpenAPI 3.1 document", body = Object, content_type = "application/json")))]
pub(crate) async fn openapi(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        state.openapi.as_str().to_owned(),
    )
        .into_response()
}

/// Browsable API documentation, served without any external resource.
#[utoipa::path(get, path = "/docs", tag = "operations",
    responses((status = 200, description = "HTML page", body = String, content_type = "text/html")))]
pub(crate) async fn docs() -> Html<&'static str> {
    Html(DOCS_PAGE)
}
