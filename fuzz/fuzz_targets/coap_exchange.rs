//! Several datagrams from one client through one CoAP endpoint, so that state carries over:
//! deduplication, Block1 uploads, observations, the notifications of later publishes and their
//! resends. The input is a sequence of records, each a big-endian `u16` length and that many
//! bytes; an empty record moves the clock on by 100 s, firing the timers due on the way (resends,
//! observers given up), so that uploads and remembered responses expire.

#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use topicgate::fuzzing::CoapHarness;

fuzz_target!(|data: &[u8]| {
    let mut endpoint = CoapHarness::default();
    let mut rest = data;
    while let [hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (datagram, tail) = tail.split_at(len);
        rest = tail;
        let sent = if datagram.is_empty() {
            endpoint.advance(Duration::from_secs(100))
        } else {
            endpoint.datagram(datagram)
        };
        for sent in sent {
            assert!(
                CoapHarness::accepts(&sent),
                "the endpoint sent a datagram it refuses itself: {sent:02x?}"
            );
        }
    }
});
