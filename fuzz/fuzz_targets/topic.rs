//! Topic names and filters: `Topic::parse`, `TopicFilter::parse` and matching never panic, agree
//! with a plain model of the rules, and keep their promises: a topic is a filter that matches
//! itself, `#` matches every topic not starting with `$`. The input is a filter and a topic
//! separated by the byte 0xff (never part of UTF-8); without it, both are the whole input.

#![no_main]

use libfuzzer_sys::fuzz_target;
use topicgate::bridge::{Topic, TopicError, TopicFilter};

/// Longest topic or filter in bytes.
const MAX_LEN: usize = 65_535;

fn valid_common(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_LEN && !s.contains('\0')
}

fn valid_topic(s: &str) -> bool {
    valid_common(s) && !s.contains(['+', '#']) && !s.starts_with('$')
}

fn valid_filter(s: &str) -> bool {
    let levels: Vec<&str> = s.split('/').collect();
    valid_common(s)
        && levels.iter().enumerate().all(|(i, level)| match *level {
            "#" => i + 1 == levels.len(),
            "+" => true,
            other => !other.contains(['+', '#']),
        })
}

/// MQTT matching, level by level: `+` one level, `#` this level and all below, including none.
fn matches_levels(filter: &[&str], topic: &[&str]) -> bool {
    for (i, level) in filter.iter().enumerate() {
        match (*level, topic.get(i)) {
            ("#", _) => return true,
            (_, None) => return false,
            ("+", Some(_)) => {}
            (level, Some(t)) if level != *t => return false,
            _ => {}
        }
    }
    filter.len() == topic.len()
}

fn model_matches(filter: &str, topic: &str) -> bool {
    let filter: Vec<&str> = filter.split('/').collect();
    let topic_levels: Vec<&str> = topic.split('/').collect();
    if topic.starts_with('$') && matches!(filter[0], "+" | "#") {
        return false;
    }
    matches_levels(&filter, &topic_levels)
}

fn check_one(s: &str) {
    let topic = Topic::parse(s);
    let filter = TopicFilter::parse(s);
    assert_eq!(
        topic.is_ok(),
        valid_topic(s),
        "Topic::parse({s:?}) = {topic:?}"
    );
    assert_eq!(
        filter.is_ok(),
        valid_filter(s),
        "TopicFilter::parse({s:?}) = {filter:?}"
    );
    if let Ok(filter) = &filter {
        assert_eq!(filter.as_str(), s);
        assert_eq!(filter.is_wildcard(), s.contains(['+', '#']));
        // A filter without wildcards names one topic, one starting with `$` included (it is
        // read, though it may not be published to): `Topic::parse_any`'s rules.
        let named = Topic::parse_any(s);
        assert_eq!(named.is_ok(), valid_common(s) && !s.contains(['+', '#']));
        assert_eq!(filter.as_topic().as_ref(), named.as_ref().ok());
    }
    let Ok(topic) = topic else { return };
    assert_eq!(topic.to_string(), s);
    assert_eq!(Topic::parse(&topic.to_string()).as_ref(), Ok(&topic));
    let Ok(itself) = filter else {
        panic!("topic {s:?} is not a filter");
    };
    assert!(!itself.is_wildcard());
    assert!(itself.matches(&topic), "{s:?} does not match itself");
    let every = TopicFilter::parse("#").expect("# is a filter");
    assert_eq!(every.matches(&topic), !s.starts_with('$'));
    // One `+` per level, and each level's prefix followed by `#`.
    let levels: Vec<&str> = topic.levels().collect();
    let pluses = vec!["+"; levels.len()].join("/");
    let pluses = TopicFilter::parse(&pluses).expect("+ levels are a filter");
    assert!(pluses.matches(&topic), "{pluses} does not match {s:?}");
    // A few prefixes only: a topic can have 65,535 levels; `split` always gives at least one.
    let len = levels.len();
    for n in [0, 1, len / 2, len - 1, len] {
        let mut prefix = levels[..n].to_vec();
        prefix.push("#");
        if let Ok(f) = TopicFilter::parse(&prefix.join("/")) {
            assert!(f.matches(&topic), "{f} does not match {s:?}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (filter, topic) = match data.iter().position(|b| *b == 0xff) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, data),
    };
    let (Ok(filter_text), Ok(topic_text)) =
        (std::str::from_utf8(filter), std::str::from_utf8(topic))
    else {
        // Bytes that are not UTF-8 are refused as such, never parsed.
        if std::str::from_utf8(topic).is_err() {
            assert_eq!(Topic::parse_bytes(topic), Err(TopicError::NotUtf8));
        }
        return;
    };
    assert_eq!(Topic::parse_bytes(topic), Topic::parse(topic_text));
    check_one(filter_text);
    check_one(topic_text);
    if let (Ok(f), Ok(t)) = (TopicFilter::parse(filter_text), Topic::parse(topic_text)) {
        assert_eq!(
            f.matches(&t),
            model_matches(filter_text, topic_text),
            "{filter_text:?} against {topic_text:?}"
        );
    }
});
