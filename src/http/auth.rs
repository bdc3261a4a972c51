//! Who is calling: HTTP Basic or Bearer credentials turned into a [`Principal`], and the request
//! rate of that principal (or of the address, for anonymous callers), before any handler runs.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderMap, header};
use base64::Engine;
use utoipa::Modify;
use utoipa::openapi::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

use super::AppState;
use super::error::ApiError;
use crate::policy::{AuthError, LoginError, Policy, Principal};

/// The common name of the TLS client certificate a request came with.
#[derive(Debug, Clone)]
pub(crate) struct ClientName(pub(crate) String);

/// The caller of a request, as handlers see it.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    /// Who it is.
    pub(crate) principal: Principal,
    /// The address it calls from, when known.
    peer: Option<IpAddr>,
}

impl Caller {
    /// Its rate and stream bucket: the principal's name, or the address of an anonymous caller.
    pub(crate) fn key(&self) -> String {
        Policy::client_key(&self.principal, || match self.peer {
            Some(ip) => format!("addr:{ip}"),
            None => "addr:unknown".to_owned(),
        })
    }
}

/// The two schemes `/topics` accepts, as OpenAPI security schemes; each operation there lists
/// them, and no credentials at all, as alternatives (anonymous access depends on `[auth]`).
pub(crate) struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, api: &mut OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        let http = |scheme, description: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(scheme)
                    .description(Some(description))
                    .build(),
            )
        };
        components.add_security_scheme(
            "basic",
            http(
                HttpAuthScheme::Basic,
                "A user name and password of `[[auth.users]]`",
            ),
        );
        components.add_security_scheme(
            "bearer",
            http(HttpAuthScheme::Bearer, "A token of `[[auth.tokens]]`"),
        );
    }
}

/// Authenticates the request and applies the rate limit; the request comes back with its
/// [`Caller`] attached.
pub(crate) async fn identify(state: &AppState, mut request: Request) -> Result<Request, ApiError> {
    let policy = state.bridge.policy();
    // A client certificate names the caller whatever the headers say, as Mosquitto's
    // use_identity_as_username does.
    let principal = match request.extensions().get::<ClientName>() {
        Some(name) => policy.certificate(&name.0),
        None => principal(state, policy, request.headers()).await?,
    };
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|peer| peer.0.ip());
    let caller = Caller { principal, peer };
    if policy.limits_rate() {
        policy.admit(&caller.key()).map_err(ApiError::RateLimited)?;
    }
    request.extensions_mut().insert(caller);
    Ok(request)
}

async fn principal(
    state: &AppState,
    policy: &Policy,
    headers: &HeaderMap,
) -> Result<Principal, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return policy.anonymous().map_err(login_error);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::Unauthorized("the Authorization header is not ASCII".to_owned()))?;
    let (scheme, rest) = text.trim().split_once(' ').unwrap_or((text, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return policy.token(rest).map_err(login_error);
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(ApiError::Unauthorized(format!(
            "the {scheme} scheme is not supported: use Basic or Bearer"
        )));
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| {
            ApiError::Unauthorized("the Basic credentials are not base64 of user:password".into())
        })?;
    let (user, password) = decoded.split_once(':').ok_or_else(|| {
        ApiError::Unauthorized("the Basic credentials are not base64 of user:password".into())
    })?;
    if let Some(verdict) = policy.login_cached(user, password.as_bytes()) {
        return verdict.map_err(login_error);
    }
    // argon2 runs in the policy's one verifier, which every door shares and which refuses at
    // once (503) when too many checks wait. This permit only keeps HTTP's share of that line
    // to a couple of blocking threads; the rest of a flood waits here as futures, which cost
    // no thread, and the request timeout ends their wait.
    let _permit = state
        .verifier
        .acquire()
        .await
        .map_err(|_| ApiError::Internal)?;
    let (policy, user, password) = (policy.clone(), user.to_owned(), password.to_owned());
    tokio::task::spawn_blocking(move || policy.login(&user, password.as_bytes()))
        .await
        .map_err(|_| ApiError::Internal)?
        .map_err(login_error)
}

fn login_error(e: impl Into<LoginError>) -> ApiError {
    let message = match e.into() {
        LoginError::Busy => return ApiError::LoginsBusy,
        LoginError::Refused(AuthError::Required) => {
            "credentials are required: HTTP Basic or a Bearer token"
        }
        LoginError::Refused(AuthError::BadPassword) => "the user name or password is wrong",
        LoginError::Refused(AuthError::BadToken) => "the bearer token is not valid",
    };
    ApiError::Unauthorized(message.to_owned())
}

#[cfg(test)]
mod tests {
    use axum::response::IntoResponse;

    use super::*;

    #[tokio::test]
    async fn a_full_line_of_password_checks_is_a_503_to_retry() {
        let response = login_error(LoginError::Busy).into_response();
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"], "busy");
        let response = login_error(AuthError::BadPassword).into_response();
        assert_eq!(response.status(), 401);
    }
}
