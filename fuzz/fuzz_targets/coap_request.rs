//! One datagram from a client, whatever its bytes, through the CoAP endpoint's request path:
//! framing checks, decoding, option parsing and the handler. Nothing may panic, and whatever the
//! endpoint sends back must pass its own framing checks and answer the right message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use topicgate::fuzzing::CoapHarness;

/// The message type bits of a datagram's first byte.
fn kind(datagram: &[u8]) -> u8 {
    (datagram[0] >> 4) & 0b11
}

fuzz_target!(|data: &[u8]| {
    let mut endpoint = CoapHarness::default();
    let sent = endpoint.datagram(data);
    for datagram in &sent {
        assert!(
            CoapHarness::accepts(datagram),
            "the endpoint sent a datagram it refuses itself: {datagram:02x?}"
        );
    }
    // Anything answered has a message id; a confirmable message gets an ACK or a Reset with that
    // id, a non-confirmable request a non-confirmable response.
    let Some(first) = sent.first() else { return };
    if kind(data) == 0 {
        assert!(
            matches!(kind(first), 2 | 3),
            "answered a CON with {first:02x?}"
        );
        assert_eq!(first[2..4], data[2..4], "answered another message id");
    } else {
        assert_eq!(kind(first), 1, "answered a NON with {first:02x?}");
    }
});
