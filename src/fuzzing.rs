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

/// The DTLS transport of `coaps://` with one PSK identity, fed datagrams from two client
/// addresses. A HelloVerifyRequest it sends is answered at once with the same ClientHello
/// carrying the cookie, as a client would, so the datagrams that follow reach the library's
/// handshake and, past it, the record layer.
pub struct DtlsHarness {
    transport: crate::dtls::Transport,
    now: std::time::Instant,
    out: Vec<crate::dtls::Output>,
}

impl Default for DtlsHarness {
    fn default() -> Self {
        use crate::dtls::{Psk, Settings, Transport};
        let settings = Settings {
            psks: vec![Psk {
                identity: "sensor".to_owned(),
                key: b"0123456789abcdef".to_vec(),
                principal: "sensor".to_owned(),
            }],
            certificate: None,
            max_sessions: 8,
            max_handshakes: 4,
            max_handshakes_per_address: 4,
            handshake_timeout: std::time::Duration::from_secs(10),
            idle_timeout: std::time::Duration::from_secs(60),
        };
        let now = std::time::Instant::now();
        let meters = crate::metrics::DtlsMeters::default();
        let transport = match Transport::new(settings, meters, now) {
            Ok(t) => t,
            Err(e) => panic!("the harness's settings are good: {e}"),
        };
        Self {
            transport,
            now,
            out: Vec::new(),
        }
    }
}

impl DtlsHarness {
    /// Feeds one datagram from the first or second client; returns the datagrams sent back.
    pub fn datagram(&mut self, second: bool, bytes: &[u8]) -> usize {
        use crate::dtls::{Output, hello};
        let from = std::net::SocketAddr::from(([127, 0, 0, 1], if second { 2 } else { 1 }));
        self.out.clear();
        self.transport.receive(self.now, from, bytes, &mut self.out);
        let cookie = self.out.iter().find_map(|o| match o {
            Output::Transmit { bytes, .. } => {
                hello::verify_request_cookie(bytes).map(<[u8]>::to_vec)
            }
            _ => None,
        });
        if let (Some(cookie), Some(ch)) = (cookie, hello::parse(bytes))
            && let Some(again) = hello::with_cookie(bytes, &ch, &cookie)
        {
            self.transport
                .receive(self.now, from, &again, &mut self.out);
        }
        let answered = self.out.len();
        for o in std::mem::take(&mut self.out) {
            if let Output::Received { session, bytes, .. } = o {
                self.transport.send(session, &bytes, &mut self.out);
            }
        }
        assert!(self.transport.sessions() <= 8 && self.transport.handshakes() <= 4);
        answered
    }

    /// Moves the clock on and runs the transport's timers.
    pub fn advance(&mut self, by: std::time::Duration) {
        self.now += by;
        self.out.clear();
        self.transport.tick(self.now, &mut self.out);
    }
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

    #[test]
    fn the_dtls_seed_hello_reaches_the_library() {
        let seed = include_bytes!("../fuzz/corpus/dtls_record/client_hello");
        let mut harness = super::DtlsHarness::default();
        // The HelloVerifyRequest, then the server's flight to the hello with its cookie.
        assert!(harness.datagram(false, &seed[2..]) >= 2);
    }
}
