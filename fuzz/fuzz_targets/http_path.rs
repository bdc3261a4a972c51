//! The HTTP topic path: the request target `/topics/` + input, percent-decoded into the text the
//! handlers give `Topic::parse` (publish, clear) or `TopicFilter::parse` (read). Nothing may
//! panic, and any decoded text, percent-encoded again, decodes to itself.

#![no_main]

use libfuzzer_sys::fuzz_target;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use topicgate::bridge::{Topic, TopicFilter};
use topicgate::fuzzing::http_topic_text;

fuzz_target!(|data: &[u8]| {
    let target = [b"/topics/".as_slice(), data].concat();
    let Some(Ok(text)) = http_topic_text(&target) else {
        return;
    };
    let topic = Topic::parse(&text);
    let filter = TopicFilter::parse(&text);
    if let Ok(topic) = &topic {
        assert_eq!(topic.as_str(), text);
        assert!(filter.is_ok(), "topic {text:?} is not a filter");
    }
    let encoded = format!("/topics/{}", utf8_percent_encode(&text, NON_ALPHANUMERIC));
    match http_topic_text(encoded.as_bytes()) {
        Some(Ok(again)) => assert_eq!(again, text, "through {encoded:?}"),
        other => panic!("{encoded:?} gave {other:?}"),
    }
});
