//! The templates of a rule: a URL whose path and query take `{1}`, `{2}`… (topic levels) and
//! `{payload}`, percent-encoded; a reply topic that takes topic levels; header values that
//! take `${VAR}` from the environment once, at startup.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::bridge::{Message, Topic};

/// Everything but RFC 3986's unreserved characters is encoded: a substituted value can never
/// add a path level, a query parameter or a fragment.
const VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Why a template cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// The URL has no scheme and host the gateway can call.
    #[error("`url` {0}")]
    Url(String),
    /// A placeholder is not `{N}` or `{payload}`, or stands where it may not.
    #[error("{0}")]
    Placeholder(String),
    /// A header value names an environment variable that is not set.
    #[error("header `{header}` uses ${{{var}}}, which is not set in the environment")]
    MissingVar {
        /// The header name.
        header: String,
        /// The variable.
        var: String,
    },
}

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Level(usize),
    Payload,
}

/// A push rule's URL: a fixed origin, then a path and query with placeholders.
#[derive(Debug, Clone)]
pub(crate) struct UrlTemplate {
    /// `scheme://authority`, never substituted.
    origin: String,
    rest: Vec<Part>,
    schemes: &'static [&'static str],
}

impl UrlTemplate {
    /// Parses a URL template whose scheme is one of `schemes`.
    pub(crate) fn parse(
        url: &str,
        schemes: &'static [&'static str],
    ) -> Result<Self, TemplateError> {
        let (scheme, after) = url
            .split_once("://")
            .ok_or_else(|| TemplateError::Url(format!("{url:?} has no scheme")))?;
        if !schemes.contains(&scheme) {
            return Err(TemplateError::Url(format!(
                "{url:?}: the scheme must be one of {}",
                schemes.join(", ")
            )));
        }
        let end = after.find(['/', '?', '#']).unwrap_or(after.len());
        let (authority, rest) = after.split_at(end);
        if authority.is_empty() {
            return Err(TemplateError::Url(format!("{url:?} has no host")));
        }
        if authority.contains(['{', '}']) {
            return Err(TemplateError::Url(format!(
                "{url:?}: placeholders may fill only the path and query, never the host or port"
            )));
        }
        if rest.contains('#') {
            return Err(TemplateError::Url(format!("{url:?} has a fragment")));
        }
        let origin = format!("{scheme}://{authority}");
        let mut rest = parts(rest, true)?;
        // The request target always starts at the root: `http://host?x` asks for `/?x`.
        if !matches!(rest.first(), Some(Part::Text(t)) if t.starts_with('/')) {
            rest.insert(0, Part::Text("/".to_owned()));
        }
        let t = Self {
            origin,
            rest,
            schemes,
        };
        // The template with every placeholder filled must be a URL with that host, written as a
        // URL parser writes it back: a filled target is then used as it is, never rewritten.
        let sample = t.fill_with(|_| "x".to_owned());
        let parsed = reqwest::Url::parse(&format!("{}{sample}", t.origin))
            .map_err(|e| TemplateError::Url(format!("{url:?} is not a URL: {e}")))?;
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(TemplateError::Url(format!("{url:?} has no host")));
        }
        let normal = &parsed[url::Position::BeforePath..url::Position::AfterQuery];
        if normal != sample {
            return Err(TemplateError::Url(format!(
                "{url:?} is not in normal form: write its path and query as {normal:?}"
            )));
        }
        Ok(t)
    }

    /// `scheme://authority`, which no value ever changes.
    pub(crate) fn origin(&self) -> &str {
        &self.origin
    }

    /// The highest topic level the template names.
    pub(crate) fn max_level(&self) -> usize {
        max_level(&self.rest)
    }

    /// The path and query for `message`, from its leading `/`: levels it lacks are empty.
    /// Refused when a value would make a whole path segment `.` or `..`, which a server (or a
    /// URL parser) would resolve into climbing the path.
    pub(crate) fn fill_target(&self, message: &Message) -> Result<String, TemplateError> {
        let levels: Vec<&str> = message.topic.levels().collect();
        let target = self.fill_with(|part| match part {
            Part::Level(n) => {
                utf8_percent_encode(levels.get(n - 1).copied().unwrap_or(""), VALUE).to_string()
            }
            Part::Payload => percent_encoding::percent_encode(&message.payload, VALUE).to_string(),
            Part::Text(_) => String::new(),
        });
        let path = target.split('?').next().unwrap_or_default();
        if path.split('/').any(is_dot_segment) {
            return Err(TemplateError::Url(
                "a topic level or the payload would make a `.` or `..` path segment".to_owned(),
            ));
        }
        Ok(target)
    }

    /// The whole URL for a target [`Self::fill_target`] made.
    pub(crate) fn url(&self, target: &str) -> Result<reqwest::Url, TemplateError> {
        let parsed = reqwest::Url::parse(&format!("{}{target}", self.origin))
            .map_err(|e| TemplateError::Url(e.to_string()))?;
        // Belt and braces: values are encoded, so the scheme cannot have changed.
        if !self.schemes.contains(&parsed.scheme()) {
            return Err(TemplateError::Url("the scheme changed".to_owned()));
        }
        Ok(parsed)
    }

    /// The template as configured, for `/rules`.
    pub(crate) fn display(&self) -> String {
        let rest = self.fill_with(|part| match part {
            Part::Level(n) => format!("{{{n}}}"),
            Part::Payload => "{payload}".to_owned(),
            Part::Text(_) => String::new(),
        });
        format!("{}{rest}", self.origin)
    }

    /// The path and query with each placeholder replaced by `value`.
    fn fill_with(&self, mut value: impl FnMut(&Part) -> String) -> String {
        let mut out = String::with_capacity(64);
        for part in &self.rest {
            match part {
                Part::Text(t) => out.push_str(t),
                other => out.push_str(&value(other)),
            }
        }
        out
    }
}

/// A reply topic with `{1}`, `{2}`… taken from the pushed message's topic.
#[derive(Debug, Clone)]
pub(crate) struct TopicTemplate {
    parts: Vec<Part>,
    source: String,
}

impl TopicTemplate {
    /// Parses a topic template; `{payload}` is not allowed in one.
    pub(crate) fn parse(template: &str) -> Result<Self, TemplateError> {
        let parts = parts(template, false)?;
        // Levels filled with a plain value must make a topic a publish can go to.
        let sample: String = parts
            .iter()
            .map(|p| match p {
                Part::Text(t) => t.as_str(),
                _ => "x",
            })
            .collect();
        Topic::parse(&sample)
            .map_err(|e| TemplateError::Placeholder(format!("{template:?} is not a topic: {e}")))?;
        Ok(Self {
            parts,
            source: template.to_owned(),
        })
    }

    /// The template as a filter: each placeholder a `+` level (when it fills a whole level).
    pub(crate) fn as_filter(&self) -> String {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Text(t) => t.as_str(),
                _ => "+",
            })
            .collect()
    }

    /// The highest topic level the template names.
    pub(crate) fn max_level(&self) -> usize {
        max_level(&self.parts)
    }

    /// The topic for a message on `topic`, or `None` when a level makes it invalid.
    pub(crate) fn fill(&self, topic: &Topic) -> Option<Topic> {
        let levels: Vec<&str> = topic.levels().collect();
        let text: String = self
            .parts
            .iter()
            .map(|p| match p {
                Part::Text(t) => t.as_str(),
                Part::Level(n) => levels.get(n - 1).copied().unwrap_or(""),
                Part::Payload => "",
            })
            .collect();
        Topic::parse(&text).ok()
    }

    /// The template as configured.
    pub(crate) fn as_str(&self) -> &str {
        &self.source
    }
}

/// Header values with `${VAR}` replaced from the environment (through `env`).
pub(crate) fn resolve_headers(
    headers: &std::collections::BTreeMap<String, String>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<reqwest::header::HeaderMap, TemplateError> {
    use reqwest::header::{HeaderName, HeaderValue};
    let mut map = reqwest::header::HeaderMap::new();
    for (name, template) in headers {
        let mut value = String::new();
        let mut rest = template.as_str();
        while let Some(start) = rest.find("${") {
            value.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after.find('}').ok_or_else(|| {
                TemplateError::Placeholder(format!("header `{name}` has an unclosed ${{"))
            })?;
            let var = &after[..end];
            value.push_str(&env(var).ok_or_else(|| TemplateError::MissingVar {
                header: name.clone(),
                var: var.to_owned(),
            })?);
            rest = &after[end + 1..];
        }
        value.push_str(rest);
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| TemplateError::Placeholder(format!("`{name}` is not a header name")))?;
        let mut value = HeaderValue::from_str(&value).map_err(|_| {
            // The value may hold a secret: it is not repeated.
            TemplateError::Placeholder(format!("header `{name}` has a value HTTP cannot carry"))
        })?;
        value.set_sensitive(true);
        map.insert(header, value);
    }
    Ok(map)
}

fn parts(text: &str, payload_allowed: bool) -> Result<Vec<Part>, TemplateError> {
    let mut parts = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find('{') {
        if start > 0 {
            parts.push(Part::Text(rest[..start].to_owned()));
        }
        let after = &rest[start + 1..];
        let end = after
            .find('}')
            .ok_or_else(|| TemplateError::Placeholder(format!("{text:?} has an unclosed {{")))?;
        let name = &after[..end];
        parts.push(match name {
            "payload" if payload_allowed => Part::Payload,
            _ => match name.parse::<usize>() {
                Ok(n) if n >= 1 => Part::Level(n),
                _ => {
                    return Err(TemplateError::Placeholder(format!(
                        "{text:?}: {{{name}}} is not a placeholder (use {{1}}, {{2}}…{})",
                        if payload_allowed { " or {payload}" } else { "" }
                    )));
                }
            },
        });
        rest = &after[end + 1..];
    }
    if rest.contains('}') {
        return Err(TemplateError::Placeholder(format!(
            "{text:?} has a stray }}"
        )));
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_owned()));
    }
    Ok(parts)
}

/// A path segment that URL resolution treats as `.` or `..` (RFC 3986 section 5.2.4; the
/// WHATWG URL standard also reads `%2e` as a dot).
fn is_dot_segment(segment: &str) -> bool {
    (1..=6).contains(&segment.len()) && {
        let dots = segment.to_ascii_lowercase().replace("%2e", ".");
        dots == "." || dots == ".."
    }
}

fn max_level(parts: &[Part]) -> usize {
    parts
        .iter()
        .filter_map(|p| match p {
            Part::Level(n) => Some(*n),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::Origin;

    const HTTP: &[&str] = &["http", "https"];

    fn msg(topic: &str, payload: &'static [u8]) -> Message {
        Message::new(Topic::parse(topic).unwrap(), payload, Origin::Mqtt)
    }

    /// The whole URL for `message`, as a rule not on its own HTTP client calls it.
    fn fill(t: &UrlTemplate, message: &Message) -> Result<reqwest::Url, TemplateError> {
        t.url(&t.fill_target(message)?)
    }

    #[test]
    fn values_fill_path_and_query_encoded() {
        let t = UrlTemplate::parse("http://plugs.lan:8080/relay/{2}?turn={payload}", HTTP).unwrap();
        let m = msg("plugs/a b?x=1&y%/set", b"on&off=1");
        let target = t.fill_target(&m).unwrap();
        assert_eq!(target, "/relay/a%20b%3Fx%3D1%26y%25?turn=on%26off%3D1");
        let url = fill(&t, &m).unwrap();
        assert_eq!(url.as_str(), format!("http://plugs.lan:8080{target}"));
        assert_eq!(url.host_str(), Some("plugs.lan"));
        // A level that tries to climb the path stays one encoded segment.
        let url = fill(&t, &msg("plugs/..%2F..", b"")).unwrap();
        assert_eq!(url.path(), "/relay/..%252F..");
        assert_eq!(t.max_level(), 2);
        assert_eq!(
            t.display(),
            "http://plugs.lan:8080/relay/{2}?turn={payload}"
        );
    }

    #[test]
    fn a_value_that_would_be_a_dot_segment_is_refused() {
        let t = UrlTemplate::parse("http://plugs.lan/api/{1}/set?v={payload}", HTTP).unwrap();
        for level in [".", ".."] {
            let err = t.fill_target(&msg(&format!("{level}/x"), b"")).unwrap_err();
            assert!(err.to_string().contains("path segment"), "{err}");
        }
        // Two values that make one segment together are caught as well.
        let t = UrlTemplate::parse("http://plugs.lan/api/{1}{2}", HTTP).unwrap();
        assert!(t.fill_target(&msg("./.", b"")).is_err());
        // Dots in the query, or beside other characters, climb nothing.
        let t = UrlTemplate::parse("http://plugs.lan/api/{1}.json?v={payload}", HTTP).unwrap();
        assert_eq!(
            t.fill_target(&msg("../x", b"..")).unwrap(),
            "/api/...json?v=.."
        );
        assert_eq!(
            fill(&t, &msg("../x", b"..")).unwrap().path(),
            "/api/...json"
        );
    }

    #[test]
    fn a_template_is_taken_only_in_normal_form() {
        // No path at all asks for the root.
        let t = UrlTemplate::parse("http://plugs.lan?turn={payload}", HTTP).unwrap();
        assert_eq!(t.fill_target(&msg("a", b"on")).unwrap(), "/?turn=on");
        assert_eq!(
            UrlTemplate::parse("http://plugs.lan", HTTP)
                .unwrap()
                .fill_target(&msg("a", b""))
                .unwrap(),
            "/"
        );
        for (url, normal) in [
            ("http://plugs.lan/a b/{1}", "/a%20b/x"),
            ("http://plugs.lan/a/../{1}", "/x"),
            ("http://plugs.lan/%2e/{1}", "/x"),
        ] {
            let err = UrlTemplate::parse(url, HTTP).unwrap_err().to_string();
            assert!(err.contains(&format!("{normal:?}")), "{url}: {err}");
        }
    }

    #[test]
    fn placeholders_never_reach_scheme_host_or_port() {
        for url in [
            "http://{1}/x",
            "http://host:{1}/x",
            "{1}://host/x",
            "ftp://host/x",
            "http:///x",
            "http://host/{x}",
            "http://host/{0}",
            "http://host/x#{1}",
            "plugs.lan/x",
        ] {
            assert!(UrlTemplate::parse(url, HTTP).is_err(), "{url}");
        }
    }

    #[test]
    fn reply_topics_take_levels() {
        let t = TopicTemplate::parse("plugs/{1}/state").unwrap();
        let topic = t.fill(&Topic::parse("p7/set").unwrap()).unwrap();
        assert_eq!(topic.as_str(), "plugs/p7/state");
        assert_eq!(t.as_filter(), "plugs/+/state");
        assert!(TopicTemplate::parse("a/{payload}").is_err());
        assert!(TopicTemplate::parse("a/#").is_err());
    }

    #[test]
    fn header_values_come_from_the_environment() {
        let headers = [("Authorization".to_owned(), "Bearer ${TOKEN}".to_owned())]
            .into_iter()
            .collect();
        let map =
            resolve_headers(&headers, |v| (v == "TOKEN").then(|| "s3cret".to_owned())).unwrap();
        assert_eq!(map["authorization"], "Bearer s3cret");
        assert!(map["authorization"].is_sensitive());
        let err = resolve_headers(&headers, |_| None).unwrap_err().to_string();
        assert!(
            err.contains("${TOKEN}") && err.contains("Authorization"),
            "{err}"
        );
    }
}
