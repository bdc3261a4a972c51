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

/// Feeds what an MQTT client sent to the codec as the broker reads it, packet after packet,
/// until it needs more bytes or refuses one; every packet it accepts is written again and must
/// be accepted again, as is. Returns the number of packets read.
pub fn mqtt_stream(bytes: &[u8]) -> usize {
    use bytes::BytesMut;

    use crate::mqtt::wire::{Decoder, Packet, encode};

    let mut decoder = Decoder::new(1 << 20);
    let mut buf = BytesMut::from(bytes);
    let mut read = 0;
    let mut connect = None;
    while let Ok(Some(packet)) = decoder.decode(&mut buf) {
        read += 1;
        let Some(first) = &connect else {
            connect = Some(packet);
            continue;
        };
        let Packet::Connect(c) = first else {
            unreachable!("the first packet decoded is always a CONNECT")
        };
        let mut again = BytesMut::new();
        encode(first, c.version, &mut again);
        encode(&packet, c.version, &mut again);
        let mut fresh = Decoder::new(1 << 20);
        let reread = fresh
            .decode(&mut again)
            .and_then(|_| fresh.decode(&mut again));
        assert!(
            matches!(reread, Ok(Some(_))),
            "{packet:?} written as {:?} is refused: {reread:?}",
            c.version
        );
    }
    read
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_mqtt_seed_streams_are_read_whole() {
        let v311 = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00\x82\x06\x00\x01\x00\x01#\x01\x32\x09\x00\x03a/b\x00\x07hi\xc0\x00\xe0\x00";
        assert_eq!(super::mqtt_stream(v311), 5);
        let v5 = b"\x10\x0d\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x00\x30\x0b\x00\x03a/b\x03\x23\x00\x01hi\xe0\x01\x04";
        assert_eq!(super::mqtt_stream(v5), 3);
    }
}
