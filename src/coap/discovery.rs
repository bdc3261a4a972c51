//! Resource discovery (RFC 6690): `/.well-known/core` and the topic collections in link format,
//! filtered by one `?attr=value` query, where a trailing `*` matches a prefix.

use std::fmt::Write;

use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use crate::bridge::{Bridge, TopicFilter, content_format_for};
use crate::policy::Principal;

/// Topics listed at most; the rest are reached with a `#` filter GET.
pub(crate) const LISTED_TOPICS: usize = 1000;

/// Characters escaped in a topic written as a URI path.
const PATH: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'\\')
    .add(b'^')
    .add(b'|');

/// One link: its target and attributes, values unquoted.
struct Link {
    href: String,
    attrs: Vec<(&'static str, String)>,
    observable: bool,
}

/// A link-format filter: `(attribute, value)` with an optional trailing `*`.
pub(crate) type Query<'a> = Option<(&'a str, &'a str)>;

/// The link-format document; `collections` adds `/topics` and `/ps` themselves.
/// Only topics `who` may read are listed.
pub(crate) fn links(
    bridge: &Bridge,
    who: &Principal,
    collections: bool,
    query: Query<'_>,
) -> String {
    let mut all = Vec::new();
    if collections {
        for root in ["topics", "ps"] {
            all.push(Link {
                href: format!("/{root}"),
                attrs: vec![("rt", "core.ps".to_owned()), ("ct", "40".to_owned())],
                observable: false,
            });
        }
    }
    let every = TopicFilter::parse("#").ok();
    // A principal that may read nothing sees the collections only.
    let page = every.and_then(|f| bridge.list(&f, who, None, LISTED_TOPICS).ok());
    for message in page.iter().flat_map(|p| p.messages.iter()) {
        let mut attrs = vec![("rt", "core.ps.data".to_owned())];
        if let Some(ct) = message.content_type.as_deref().and_then(content_format_for) {
            attrs.push(("ct", ct.to_string()));
        }
        all.push(Link {
            href: format!(
                "/topics/{}",
                utf8_percent_encode(message.topic.as_str(), PATH)
            ),
            attrs,
            observable: true,
        });
    }
    let mut out = String::new();
    for link in all.iter().filter(|l| selected(l, query)) {
        if !out.is_empty() {
            out.push(',');
        }
        let _ = write!(out, "<{}>", link.href);
        for (name, value) in &link.attrs {
            if *name == "ct" {
                let _ = write!(out, ";{name}={value}");
            } else {
                let _ = write!(out, ";{name}=\"{value}\"");
            }
        }
        if link.observable {
            out.push_str(";obs");
        }
    }
    out
}

fn selected(link: &Link, query: Query<'_>) -> bool {
    let Some((name, wanted)) = query else {
        return true;
    };
    let matches = |value: &str| match wanted.strip_suffix('*') {
        Some(prefix) => value.starts_with(prefix),
        None => value == wanted,
    };
    match name {
        "href" => matches(&link.href),
        "obs" => link.observable,
        // rt may hold several space-separated types.
        "rt" => link
            .attrs
            .iter()
            .filter(|(n, _)| *n == "rt")
            .any(|(_, v)| v.split(' ').any(matches)),
        _ => link
            .attrs
            .iter()
            .filter(|(n, _)| *n == name)
            .any(|(_, v)| matches(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(href: &str, rt: &str) -> Link {
        Link {
            href: href.to_owned(),
            attrs: vec![("rt", rt.to_owned()), ("ct", "50".to_owned())],
            observable: true,
        }
    }

    #[test]
    fn queries_filter_by_attribute_and_prefix() {
        let l = link("/topics/home/temp", "core.ps.data");
        assert!(selected(&l, None));
        assert!(selected(&l, Some(("rt", "core.ps.data"))));
        assert!(!selected(&l, Some(("rt", "core.ps"))));
        assert!(selected(&l, Some(("rt", "core.ps*"))));
        assert!(selected(&l, Some(("href", "/topics/home*"))));
        assert!(!selected(&l, Some(("href", "/ps*"))));
        assert!(selected(&l, Some(("ct", "50"))));
        assert!(!selected(&l, Some(("ct", "0"))));
        assert!(!selected(&l, Some(("if", "x"))));
    }
}
