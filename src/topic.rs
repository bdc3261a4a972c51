//! Topic names and topic filters, checked once where they enter the gateway (DESIGN §2).

use std::fmt;

/// Longest topic or filter, in bytes: the MQTT string limit.
const MAX_LEN: usize = 65_535;

/// Why a topic or filter was refused; the text is shown to clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Nothing after `/topics/`.
    #[error("the topic is empty")]
    Empty,
    /// `+` or `#` in a topic name.
    #[error("a topic to publish to cannot contain the wildcards '+' or '#'")]
    Wildcard,
    /// Topics starting with `$` belong to the broker.
    #[error("topics starting with '$' are reserved for the broker")]
    Reserved,
    /// The decoded path is not UTF-8.
    #[error("the topic is not valid UTF-8")]
    NotUtf8,
    /// U+0000 is not allowed in MQTT strings.
    #[error("the topic contains the character U+0000")]
    Nul,
    /// Longer than an MQTT string may be.
    #[error("the topic is longer than 65535 bytes")]
    TooLong,
    /// A `#` not alone at the last level, or a `+` sharing a level.
    #[error("'#' must be the last level and '+' a whole level of a topic filter")]
    BadWildcard,
}

/// A topic name a message can be published to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Topic(Box<str>);

impl Topic {
    /// Checks a topic name against DESIGN §2.
    pub fn parse(s: &str) -> Result<Self, TopicError> {
        check_common(s)?;
        if s.contains(['+', '#']) {
            return Err(TopicError::Wildcard);
        }
        if s.starts_with('$') {
            return Err(TopicError::Reserved);
        }
        Ok(Self(s.into()))
    }

    /// A topic that may start with `$`: one the broker itself publishes (`$SYS`), or an MQTT
    /// client's, or one being read. Publishing from HTTP or CoAP goes through [`Topic::parse`].
    pub fn parse_any(s: &str) -> Result<Self, TopicError> {
        check_common(s)?;
        if s.contains(['+', '#']) {
            return Err(TopicError::Wildcard);
        }
        Ok(Self(s.into()))
    }

    /// Checks raw bytes, refusing invalid UTF-8.
    pub fn parse_bytes(b: &[u8]) -> Result<Self, TopicError> {
        Self::parse(std::str::from_utf8(b).map_err(|_| TopicError::NotUtf8)?)
    }

    /// The topic as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The levels between slashes; empty levels included.
    pub fn levels(&self) -> std::str::Split<'_, char> {
        self.0.split('/')
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A topic filter: a topic name, possibly with `+` and `#` wildcards.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TopicFilter(Box<str>);

impl TopicFilter {
    /// Checks a filter against MQTT's wildcard rules and DESIGN §2.
    pub fn parse(s: &str) -> Result<Self, TopicError> {
        check_common(s)?;
        let mut levels = s.split('/').peekable();
        while let Some(level) = levels.next() {
            let last = levels.peek().is_none();
            let ok = match level {
                "#" => last,
                "+" => true,
                l => !l.contains(['+', '#']),
            };
            if !ok {
                return Err(TopicError::BadWildcard);
            }
        }
        Ok(Self(s.into()))
    }

    /// The filter as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the filter has a wildcard (and so names many topics).
    pub fn is_wildcard(&self) -> bool {
        self.0.contains(['+', '#'])
    }

    /// The one topic a filter without wildcards names (`$` topics included: they are read).
    pub fn as_topic(&self) -> Option<Topic> {
        Topic::parse_any(&self.0).ok()
    }

    /// The filter's levels.
    pub fn levels(&self) -> std::str::Split<'_, char> {
        self.0.split('/')
    }

    /// MQTT matching: `+` one level, `#` this level and all below, wildcards at the first level
    /// do not match `$` topics.
    pub fn matches(&self, topic: &Topic) -> bool {
        matches(&self.0, topic.as_str())
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// MQTT matching of a topic name by a filter, both as text (the ACL matches its patterns
/// this way): `+` one level, `#` this level and all below, wildcards at the first level do not
/// match `$` topics.
pub fn matches(filter: &str, topic: &str) -> bool {
    let mut t = topic.split('/');
    for (i, f) in filter.split('/').enumerate() {
        if f == "#" {
            return !(i == 0 && topic.starts_with('$'));
        }
        match t.next() {
            None => return false,
            Some(level) if f == "+" => {
                if i == 0 && level.starts_with('$') {
                    return false;
                }
            }
            Some(level) if level != f => return false,
            Some(_) => {}
        }
    }
    t.next().is_none()
}

fn check_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_LEN {
        return Err(TopicError::TooLong);
    }
    if s.contains('\0') {
        return Err(TopicError::Nul);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(filter: &str, topic: &str) -> bool {
        TopicFilter::parse(filter)
            .unwrap()
            .matches(&Topic(topic.into()))
    }

    #[test]
    fn topic_rules() {
        assert!(Topic::parse("a//b").is_ok());
        assert!(Topic::parse("/").is_ok());
        assert_eq!(Topic::parse(""), Err(TopicError::Empty));
        assert_eq!(Topic::parse("a/+"), Err(TopicError::Wildcard));
        assert_eq!(Topic::parse("a/#"), Err(TopicError::Wildcard));
        assert_eq!(Topic::parse("$SYS/x"), Err(TopicError::Reserved));
        assert_eq!(Topic::parse("a\0"), Err(TopicError::Nul));
        assert_eq!(Topic::parse(&"x".repeat(65_536)), Err(TopicError::TooLong));
        assert!(Topic::parse(&"x".repeat(65_535)).is_ok());
        assert_eq!(Topic::parse_bytes(&[0xff]), Err(TopicError::NotUtf8));
    }

    #[test]
    fn filter_rules() {
        for ok in ["#", "+", "a/+/b", "a/#", "+/+", "a//#", "$SYS/#"] {
            assert!(TopicFilter::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["a/#/b", "a#", "a/b+", "++", "#/a", ""] {
            assert!(TopicFilter::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn matching_follows_mqtt() {
        assert!(m("home/#", "home/temp"));
        assert!(m("home/#", "home"));
        assert!(m("home/+", "home/temp"));
        assert!(!m("home/+", "home/temp/x"));
        assert!(!m("home/+", "home"));
        assert!(m("+/+", "/x"));
        assert!(m("a//b", "a//b"));
        assert!(m("a/+/b", "a//b"));
        assert!(!m("a/b", "a/b/c"));
        assert!(m("#", "a"));
        assert!(!m("#", "$SYS/x"));
        assert!(!m("+/x", "$SYS/x"));
        assert!(m("$SYS/#", "$SYS/x"));
    }
}
