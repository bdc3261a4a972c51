//! Topics on their way through rumqttd's router: a mark in front of those its topic matcher
//! cannot take, put on by the client codec and the gateway's link, removed on the way out.

use bytes::{Bytes, BytesMut};

/// Put in front of a topic (and filter) whose first byte is not ASCII or is `$` on its way
/// through the router, and in front of one that starts with this byte already, so that the
/// mapping stays one-to-one. rumqttd's `matches` slices the first byte of a topic as a `str` (a
/// first character of two or more bytes panicked the router thread) and matches no `$` topic at
/// all; marked, both are matched level by level, and the session applies MQTT's rule that a
/// filter starting with a wildcard does not match `$` topics.
const ROUTER_MARK: u8 = 0x01;

fn needs_mark(text: &[u8]) -> bool {
    text.first()
        .is_some_and(|&b| b >= 0x80 || b == ROUTER_MARK || b == b'$')
}

/// Whether a publish on `topic` goes to the router at all. A reply to a gateway call does not:
/// it goes only to the call waiting for it, through the bridge, since no session may read reply
/// topics, and the router would keep an entry for its topic, new on every call, as long as it
/// runs.
pub(super) fn routed(topic: &str) -> bool {
    !topic.starts_with(crate::policy::REPLY_PREFIX)
}

/// A topic as it travels through the router.
pub(super) fn to_router(topic: Bytes) -> Bytes {
    if !needs_mark(&topic) {
        return topic;
    }
    let mut marked = BytesMut::with_capacity(topic.len() + 1);
    marked.extend_from_slice(&[ROUTER_MARK]);
    marked.extend_from_slice(&topic);
    marked.freeze()
}

/// A topic that came out of the router, as its publisher wrote it.
pub(super) fn from_router(topic: Bytes) -> Bytes {
    if topic.first() == Some(&ROUTER_MARK) {
        topic.slice(1..)
    } else {
        topic
    }
}

/// A subscription filter as the router must see it to match the topics of [`to_router`].
pub(super) fn filter_to_router(filter: &str) -> String {
    let (group, inner) = match filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
    {
        Some((group, inner)) => (Some(group), inner),
        None => (None, filter),
    };
    let mut out = String::with_capacity(filter.len() + 1);
    if let Some(group) = group {
        out.push_str("$share/");
        out.push_str(group);
        out.push('/');
    }
    if needs_mark(inner.as_bytes()) {
        out.push(char::from(ROUTER_MARK));
    }
    out.push_str(inner);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_through_the_router_start_with_ascii_and_come_back_unchanged() {
        for topic in ["a/b", "é/x", "温度", "\u{1}a", "\u{1}\u{1}", "", "+"] {
            let marked = to_router(Bytes::from(topic));
            assert!(marked.first().is_none_or(|b| b.is_ascii()), "{topic:?}");
            assert_eq!(from_router(marked), topic.as_bytes(), "{topic:?}");
        }
        assert_ne!(
            to_router(Bytes::from("é")),
            to_router(Bytes::from("\u{1}é"))
        );
        for (topic, filter) in [
            ("é/x", "é/#"),
            ("é/x", "+/x"),
            ("é/x", "#"),
            ("温度", "温度"),
        ] {
            let marked = to_router(Bytes::from(topic));
            let marked = std::str::from_utf8(&marked).unwrap();
            assert!(
                rumqttd::protocol::matches(marked, &filter_to_router(filter)),
                "{topic} {filter}"
            );
        }
        assert!(!rumqttd::protocol::matches(
            "\u{1}é",
            &filter_to_router("\u{1}")
        ));
        assert_eq!(filter_to_router("$share/g/é/#"), "$share/g/\u{1}é/#");
        assert_eq!(filter_to_router("$share/g/a/#"), "$share/g/a/#");
        let sys = to_router(Bytes::from("$SYS/broker/uptime"));
        let sys = std::str::from_utf8(&sys).unwrap();
        assert!(rumqttd::protocol::matches(sys, &filter_to_router("$SYS/#")));
        assert_eq!(
            from_router(Bytes::from(sys.to_owned())),
            "$SYS/broker/uptime"
        );
    }
}
