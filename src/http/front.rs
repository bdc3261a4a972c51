//! What every request passes through before and after its route: identification and rate limit
//! for `/topics`, the time limit, panic containment, status metrics, a debug log line, and the
//! rate-limited info line of a refused client (`crate::refused`).
//!
//! It is one service around the whole router, with one boxed future per request. The same work
//! as stacked tower layers (two `from_fn`, `CatchPanicLayer`, `TraceLayer`, `DefaultBodyLimit`)
//! cost a boxed service clone and a boxed future per layer and per request, and a boxed body per
//! response: a fifth of a request's time in the profile of a retained GET.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::time::Instant;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tower::ServiceExt;

use super::AppState;
use super::auth;
use super::cors::Cors;
use super::emqx;
use super::error::{ApiError, Reason};
use super::{rpc, topics};
use crate::policy::{Door, Refusal};

/// The HTTP API as the listeners serve it: the router behind the front checks.
#[derive(Clone)]
pub struct App {
    router: Router,
    state: AppState,
}

impl App {
    pub(super) fn new(router: Router, state: AppState) -> Self {
        Self { router, state }
    }

    /// Answers one request.
    pub fn handle(&self, request: Request) -> BoxFuture<'static, Response> {
        Box::pin(front(self.router.clone(), self.state.clone(), request))
    }
}

async fn front(router: Router, state: AppState, request: Request) -> Response {
    // Read only when debug logging is on: the clock and the copies are not free.
    let logged = tracing::enabled!(tracing::Level::DEBUG).then(|| {
        (
            Instant::now(),
            request.method().clone(),
            request.uri().clone(),
        )
    });
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    // A call waits for its reply on top of the usual time, and answers 504 itself.
    let limit = if is_api(request.uri().path(), "/rpc") {
        state.config.request_timeout + state.bridge.max_call_timeout()
    } else {
        state.config.request_timeout
    };
    // A long poll waits on top of the usual time, and answers 204 itself.
    let limit = if request.uri().query().is_some_and(|q| q.contains("wait=")) {
        limit + state.config.max_wait
    } else {
        limit
    };
    // A preflight carries no credentials: it is answered before any are asked for, with
    // headers of its own.
    let preflight = state
        .cors
        .as_ref()
        .filter(|_| Cors::is_preflight(request.method(), request.headers()));
    let origin = state
        .cors
        .as_ref()
        .filter(|_| preflight.is_none())
        .and_then(|_| request.headers().get(axum::http::header::ORIGIN).cloned());
    // EMQX's API answers in EMQX's shape, the front's own refusals included.
    let emqx = is_api(request.uri().path(), "/api/v5");
    let refuse = |e: ApiError| {
        if emqx {
            emqx::Refused::from(e).into_response()
        } else {
            e.into_response()
        }
    };
    let work = async {
        if let Some(cors) = preflight {
            return cors.preflight(request.headers());
        }
        let path = request.uri().path();
        let request = if is_api(path, "/topics") || is_api(path, "/rpc") || emqx {
            match auth::identify(&state, request).await {
                Ok(request) => request,
                Err(refused) => return refuse(refused),
            }
        } else {
            request
        };
        match Route::of(request.method(), request.uri().path()) {
            Some(route) => route.answer(state.clone(), request).await,
            None => match router.oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            },
        }
    };
    let guarded = AssertUnwindSafe(work).catch_unwind();
    let mut response = match tokio::time::timeout(limit, guarded).await {
        Ok(Ok(response)) => response,
        Ok(Err(_)) => {
            tracing::error!("a request handler panicked");
            refuse(ApiError::Internal)
        }
        Err(_) => refuse(ApiError::Timeout),
    };
    if let (Some(cors), Some(origin)) = (&state.cors, &origin) {
        cors.decorate(origin, &mut response);
    }
    if let Some(&refusal) = response.extensions().get::<Refusal>() {
        state.bridge.policy().count(Door::Http, refusal);
    }
    let status = response.status();
    state.bridge.metrics().http_response(status.as_u16());
    if status.is_client_error()
        && status != StatusCode::NOT_FOUND
        && let Some(peer) = peer
    {
        let reason = response.extensions().get::<Reason>();
        let text = reason.map_or(status.canonical_reason().unwrap_or(""), |r| &r.0);
        crate::refused::log("http", peer, &format_args!("{} {text}", status.as_u16()));
    }
    if let Some((started, method, uri)) = logged {
        tracing::debug!(%method, %uri, status = status.as_u16(), elapsed = ?started.elapsed(), "request");
    }
    response
}

/// Whether `path` is `prefix` or under it, where credentials are asked for.
fn is_api(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The topic and call routes, taken without the router. Their handlers read the topic from the
/// path themselves, so the router's matching, its path parameters and matched path (allocations
/// each) and its boxed handler future bought nothing on the requests that matter most for speed.
/// Anything else, including these paths with other methods or nothing after the prefix, goes
/// through the router, which keeps the whole surface and its refusals.
#[derive(Clone, Copy)]
enum Route {
    Publish,
    Retain,
    Read,
    Clear,
    Call,
}

impl Route {
    fn of(method: &Method, path: &str) -> Option<Self> {
        let under = |prefix: &str| {
            path.strip_prefix(prefix)
                .is_some_and(|rest| !rest.is_empty())
        };
        if under("/topics/") {
            return match *method {
                Method::POST => Some(Self::Publish),
                Method::PUT => Some(Self::Retain),
                Method::GET => Some(Self::Read),
                Method::DELETE => Some(Self::Clear),
                _ => None,
            };
        }
        let call = under("/rpc/") && (method == Method::POST || method == Method::PUT);
        call.then_some(Self::Call)
    }

    async fn answer(self, state: AppState, request: Request) -> Response {
        match self {
            Self::Publish => topics::publish(State(state), request).await.into_response(),
            Self::Retain => topics::put_retained(State(state), request)
                .await
                .into_response(),
            Self::Read => topics::read(State(state), request).await.into_response(),
            Self::Clear => topics::clear(State(state), request).await.into_response(),
            Self::Call => rpc::call(State(state), request).await.into_response(),
        }
    }
}
