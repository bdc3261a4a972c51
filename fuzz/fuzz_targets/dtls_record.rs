//! Datagrams from two clients through the DTLS transport of `coaps://`: ClientHellos (answered
//! with the cookie, as a client would), handshake flights and records. The input is a sequence
//! of records, each a big-endian `u16` whose top bit picks the client and whose rest is the
//! length, then that many bytes; an empty record moves the clock on by 7 s, so handshakes and
//! idle sessions expire.

#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use topicgate::fuzzing::DtlsHarness;

fuzz_target!(|data: &[u8]| {
    let mut transport = DtlsHarness::default();
    let mut rest = data;
    while let [hi, lo, tail @ ..] = rest {
        let head = u16::from_be_bytes([*hi, *lo]);
        let len = usize::from(head & 0x7fff).min(tail.len());
        let (datagram, tail) = tail.split_at(len);
        rest = tail;
        if datagram.is_empty() {
            transport.advance(Duration::from_secs(7));
            continue;
        }
        transport.datagram(head & 0x8000 != 0, datagram);
    }
});
