//! Entry points for the fuzz targets in `fuzz/`: the parsers of untrusted input that are not
//! public API, reachable from outside the crate. Not part of the supported interface.

use axum::http::Uri;

pub use crate::coap::fuzzing::CoapHarness;
use crate::http::ApiError;

/// The percent-decoded topic text of an HTTP request target under `/topics/`, as the topic
/// handlers read it before `Topic::parse` or `TopicFilter::parse`; `None` for a target that is
/// not a URI.
pub fn http_topic_text(target: &[u8]) -> Option<Result<String, ApiError>> {
    let uri = Uri::try_from(target).ok()?;
    Some(crate::http::topics::path_text(&uri))
}
