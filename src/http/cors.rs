//! Cross-origin requests from browsers (`[http.cors]`): preflights answered in the front
//! service, and `Access-Control-Allow-Origin` on every response to an allowed origin.

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::config::CorsConfig;

/// Response headers a browser shows scripts without being told (Fetch's safelist).
const SAFELISTED: [HeaderName; 7] = [
    header::CACHE_CONTROL,
    header::CONTENT_LANGUAGE,
    header::CONTENT_LENGTH,
    header::CONTENT_TYPE,
    header::EXPIRES,
    header::LAST_MODIFIED,
    header::PRAGMA,
];

/// The CORS settings, ready to answer with.
#[derive(Debug)]
pub(crate) struct Cors {
    any_origin: bool,
    origins: Vec<String>,
    methods: Vec<Method>,
    methods_value: HeaderValue,
    any_header: bool,
    headers: Vec<String>,
    headers_value: HeaderValue,
    max_age: HeaderValue,
}

impl Cors {
    /// The settings of `config`; `None` when no origin is allowed (CORS off).
    pub(crate) fn new(config: &CorsConfig) -> Option<Self> {
        if config.origins.is_empty() {
            return None;
        }
        let methods: Vec<Method> = config
            .methods
            .iter()
            .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
            .collect();
        let headers: Vec<String> = config
            .headers
            .iter()
            .filter(|h| *h != "*")
            .map(|h| h.to_ascii_lowercase())
            .collect();
        let joined = |items: Vec<&str>| HeaderValue::from_str(&items.join(", ")).ok();
        Some(Self {
            any_origin: config.origins.iter().any(|o| o == "*"),
            origins: config.origins.clone(),
            methods_value: joined(methods.iter().map(Method::as_str).collect())?,
            methods,
            any_header: config.headers.iter().any(|h| h == "*"),
            headers_value: joined(headers.iter().map(String::as_str).collect())?,
            headers,
            max_age: HeaderValue::from(config.max_age.as_secs()),
        })
    }

    /// Whether a request is a preflight: `OPTIONS` with `Origin` and
    /// `Access-Control-Request-Method`.
    pub(crate) fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
        method == Method::OPTIONS
            && headers.contains_key(header::ORIGIN)
            && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    }

    /// The answer to a preflight: 204 with the `Access-Control-*` headers, or 403 without them.
    pub(crate) fn preflight(&self, headers: &HeaderMap) -> Response {
        match self.check(headers) {
            Ok(allow_headers) => {
                let mut response = axum::http::StatusCode::NO_CONTENT.into_response();
                let out = response.headers_mut();
                if let Some(origin) = headers.get(header::ORIGIN) {
                    self.allow(origin, out);
                }
                out.insert(
                    header::ACCESS_CONTROL_ALLOW_METHODS,
                    self.methods_value.clone(),
                );
                if let Some(v) = allow_headers {
                    out.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
                }
                out.insert(header::ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
                for name in [
                    "origin",
                    "access-control-request-method",
                    "access-control-request-headers",
                ] {
                    out.append(header::VARY, HeaderValue::from_static(name));
                }
                response
            }
            Err(e) => e.into_response(),
        }
    }

    /// Checks a preflight; the `Access-Control-Allow-Headers` to answer with.
    fn check(&self, headers: &HeaderMap) -> Result<Option<HeaderValue>, ApiError> {
        let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
        if !origin.is_some_and(|o| self.admits(o)) {
            return Err(ApiError::CorsDenied(format!(
                "origin {} is not allowed",
                origin.unwrap_or("(not text)")
            )));
        }
        let method = headers
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|v| Method::from_bytes(v.as_bytes()).ok());
        if !method.as_ref().is_some_and(|m| self.methods.contains(m)) {
            return Err(ApiError::CorsDenied(
                "the method asked for is not allowed".to_owned(),
            ));
        }
        let asked = headers
            .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let asked: Vec<String> = asked
            .split(',')
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        if self.any_header {
            return Ok(HeaderValue::from_str(&asked.join(", ")).ok());
        }
        if let Some(refused) = asked.iter().find(|h| !self.headers.contains(h)) {
            return Err(ApiError::CorsDenied(format!(
                "the request header {refused} is not allowed"
            )));
        }
        Ok(Some(self.headers_value.clone()))
    }

    /// Adds `Access-Control-Allow-Origin` (and the headers a script may read) to the response
    /// of a request from an allowed origin.
    pub(crate) fn decorate(&self, origin: &HeaderValue, response: &mut Response) {
        if !origin.to_str().is_ok_and(|o| self.admits(o)) {
            // The answer would differ for another origin: caches must tell them apart.
            response
                .headers_mut()
                .append(header::VARY, HeaderValue::from_static("origin"));
            return;
        }
        let out = response.headers_mut();
        let exposed: Vec<&str> = out
            .keys()
            .filter(|name| !SAFELISTED.contains(name))
            .map(HeaderName::as_str)
            .collect();
        if let Ok(v) = HeaderValue::from_str(&exposed.join(", "))
            && !exposed.is_empty()
        {
            out.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v);
        }
        self.allow(origin, out);
    }

    fn allow(&self, origin: &HeaderValue, out: &mut HeaderMap) {
        if self.any_origin {
            out.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
        } else {
            out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            out.append(header::VARY, HeaderValue::from_static("origin"));
        }
    }

    fn admits(&self, origin: &str) -> bool {
        self.any_origin || self.origins.iter().any(|o| o.eq_ignore_ascii_case(origin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(origins: &[&str], headers: &[&str]) -> Cors {
        let config = CorsConfig {
            origins: origins.iter().map(|s| (*s).to_owned()).collect(),
            headers: headers.iter().map(|s| (*s).to_owned()).collect(),
            ..CorsConfig::default()
        };
        Cors::new(&config).unwrap()
    }

    fn preflight(origin: &str, method: &str, headers: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ORIGIN, HeaderValue::from_str(origin).unwrap());
        h.insert(
            header::ACCESS_CONTROL_REQUEST_METHOD,
            HeaderValue::from_str(method).unwrap(),
        );
        h.insert(
            header::ACCESS_CONTROL_REQUEST_HEADERS,
            HeaderValue::from_str(headers).unwrap(),
        );
        h
    }

    #[test]
    fn off_without_origins() {
        assert!(Cors::new(&CorsConfig::default()).is_none());
    }

    #[test]
    fn preflights_name_origin_method_and_headers() {
        let c = cors(
            &["https://dash.example"],
            &["authorization", "content-type"],
        );
        let ok = c.check(&preflight(
            "https://dash.example",
            "PUT",
            "Content-Type, authorization",
        ));
        assert_eq!(
            ok.unwrap().unwrap(),
            "authorization, content-type",
            "the configured list"
        );
        for (origin, method, headers) in [
            ("https://evil.example", "PUT", ""),
            ("https://dash.example", "PATCH", ""),
            ("https://dash.example", "PUT", "x-other"),
        ] {
            assert!(c.check(&preflight(origin, method, headers)).is_err());
        }
        let any = cors(&["*"], &["*"]);
        let ok = any.check(&preflight("https://x.example", "POST", "mqtt-user-a"));
        assert_eq!(ok.unwrap().unwrap(), "mqtt-user-a");
    }

    #[test]
    fn responses_expose_what_is_not_safelisted() {
        let c = cors(&["https://dash.example"], &[]);
        let mut response = Response::new(axum::body::Body::empty());
        response
            .headers_mut()
            .insert(header::ETAG, HeaderValue::from_static("\"1\""));
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        c.decorate(
            &HeaderValue::from_static("https://other.example"),
            &mut response,
        );
        assert!(
            !response
                .headers()
                .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN)
        );
        assert_eq!(
            response.headers_mut().remove(header::VARY).unwrap(),
            "origin"
        );
        c.decorate(
            &HeaderValue::from_static("https://dash.example"),
            &mut response,
        );
        let h = response.headers();
        assert_eq!(
            h[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://dash.example"
        );
        assert_eq!(h[header::ACCESS_CONTROL_EXPOSE_HEADERS], "etag");
        assert_eq!(h[header::VARY], "origin");
    }
}
