//! The gateway as a CoAP client (coap-lite as the codec): confirmable requests resent on the
//! RFC 7252 schedule, piggybacked and separate responses, large bodies in Block1 blocks
//! (RFC 7959), and the notifications of an Observe registration (RFC 7641), each on a UDP
//! socket of its own connected to the device.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::bridge::{content_format_for, content_type_for};

/// Default CoAP port (RFC 7252 §6.1).
const PORT: u16 = 5683;
/// Largest datagram read.
const DATAGRAM: usize = 65_535;

/// The retransmission parameters of RFC 7252 §4.8.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Transmission {
    pub(crate) ack_timeout: Duration,
    pub(crate) max_retransmit: u8,
    /// Largest Block1 block sent (16 to 1024, a power of two); larger bodies go in blocks.
    pub(crate) block_size: usize,
}

/// A device's answer, its code as class × 100 + detail (2.05 is 205, 4.04 is 404).
#[derive(Debug, Clone)]
pub(crate) struct CoapAnswer {
    pub(crate) status: u16,
    pub(crate) payload: Bytes,
    pub(crate) content_type: Option<String>,
    pub(crate) max_age: Option<u32>,
    pub(crate) etag: Option<Vec<u8>>,
    pub(crate) observe: Option<u32>,
    /// The Block1 option of the answer: (num, more, szx).
    block1: Option<(u32, bool, u8)>,
}

/// One socket to one device.
pub(crate) struct CoapSocket {
    socket: UdpSocket,
    transmission: Transmission,
    next_mid: u16,
}

/// What a request carries besides its method and URL.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Body<'a> {
    pub(crate) payload: &'a [u8],
    pub(crate) content_type: Option<&'a str>,
    pub(crate) etag: Option<&'a [u8]>,
    pub(crate) observe: Option<u32>,
    /// This request is one block of a larger body: (num, more, szx); set by
    /// [`CoapSocket::send`].
    pub(crate) block1: Option<(u32, bool, u8)>,
}

impl CoapSocket {
    /// A socket connected to the device of `url` (`coap://host[:port]/...`).
    pub(crate) async fn connect(
        url: &reqwest::Url,
        transmission: Transmission,
    ) -> Result<Self, String> {
        let host = url.host_str().ok_or("the URL has no host")?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = url.port().unwrap_or(PORT);
        let addr: SocketAddr = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("{host} has no address"))?;
        let local: SocketAddr = if addr.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        let socket = UdpSocket::bind(local).await.map_err(|e| e.to_string())?;
        socket.connect(addr).await.map_err(|e| e.to_string())?;
        Ok(Self {
            socket,
            transmission,
            next_mid: rand::random(),
        })
    }

    /// [`Self::call`], with a body over the block size sent in Block1 blocks (RFC 7959 §2.5),
    /// each acknowledged with 2.31 Continue, in smaller blocks when the device asks for them.
    pub(crate) async fn send(
        &mut self,
        method: RequestType,
        url: &reqwest::Url,
        body: &Body<'_>,
        token: &[u8],
        deadline: Instant,
    ) -> Result<CoapAnswer, String> {
        let payload = body.payload;
        if payload.len() <= self.transmission.block_size {
            return self.call(method, url, body, token, deadline).await;
        }
        // szx: the block size is 2^(szx + 4), 16 to 1024 bytes.
        let mut szx = (self.transmission.block_size.trailing_zeros().clamp(4, 10) - 4) as u8;
        let mut offset = 0;
        loop {
            let size = 16usize << szx;
            let end = (offset + size).min(payload.len());
            let more = end < payload.len();
            let num = u32::try_from(offset / size).map_err(|_| "the body is too large")?;
            let block = Body {
                payload: &payload[offset..end],
                block1: Some((num, more, szx)),
                ..*body
            };
            let answer = self.call(method, url, &block, token, deadline).await?;
            if !more || answer.status != 231 {
                return Ok(answer);
            }
            if let Some((_, _, asked)) = answer.block1 {
                szx = szx.min(asked);
            }
            offset = end;
        }
    }

    /// A confirmable request to `url` and its response, resent until acknowledged; a
    /// separate response is waited for until `deadline`.
    pub(crate) async fn call(
        &mut self,
        method: RequestType,
        url: &reqwest::Url,
        body: &Body<'_>,
        token: &[u8],
        deadline: Instant,
    ) -> Result<CoapAnswer, String> {
        let mid = self.mid();
        let packet = request(method, url, body, token, mid);
        let bytes = packet.to_bytes().map_err(|e| e.to_string())?;
        // The first wait is random between ACK_TIMEOUT and 1.5 times it, then doubles.
        let mut wait = self
            .transmission
            .ack_timeout
            .mul_f64(1.0 + rand::random::<f64>() / 2.0);
        let mut sent = 0;
        let mut acknowledged = false;
        loop {
            if !acknowledged {
                self.socket
                    .send(&bytes)
                    .await
                    .map_err(|e| format!("cannot send: {e}"))?;
                sent += 1;
            }
            let until = if acknowledged {
                deadline
            } else {
                (Instant::now() + wait).min(deadline)
            };
            match self.receive(mid, token, until).await? {
                Received::Response(answer) => return Ok(answer),
                Received::Acknowledged => acknowledged = true,
                Received::Nothing if acknowledged || Instant::now() >= deadline => {
                    return Err("no response in time".to_owned());
                }
                Received::Nothing if sent > usize::from(self.transmission.max_retransmit) => {
                    return Err(format!("no acknowledgement after {sent} transmissions"));
                }
                Received::Nothing => wait *= 2,
            }
        }
    }

    /// The next notification for `token` until `until`; `Ok(None)` when none came.
    pub(crate) async fn notification(
        &mut self,
        token: &[u8],
        until: Instant,
    ) -> Result<Option<CoapAnswer>, String> {
        // No request is outstanding: no message id can match.
        match self.receive(None, token, until).await? {
            Received::Response(answer) => Ok(Some(answer)),
            Received::Acknowledged | Received::Nothing => Ok(None),
        }
    }

    fn mid(&mut self) -> u16 {
        self.next_mid = self.next_mid.wrapping_add(1);
        self.next_mid
    }

    /// Reads datagrams until the response to `mid`/`token`, its empty ACK, or `until`.
    async fn receive(
        &mut self,
        mid: impl Into<Option<u16>>,
        token: &[u8],
        until: Instant,
    ) -> Result<Received, String> {
        let mid = mid.into();
        loop {
            match tokio::time::timeout_at(until, self.socket.readable()).await {
                Err(_) => return Ok(Received::Nothing),
                Ok(Err(e)) => return Err(format!("cannot read the socket: {e}")),
                Ok(Ok(())) => {}
            }
            // A buffer only while a datagram is read: an observation waiting for its next
            // notification holds none (a thousand of them held 64 MiB).
            let mut buf = Vec::with_capacity(DATAGRAM);
            match self.socket.try_recv_buf(&mut buf) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                // An ICMP error (port unreachable) from an earlier send: the device is down.
                Err(e) => return Err(format!("the device is unreachable: {e}")),
            }
            let Ok(p) = Packet::from_bytes(&buf) else {
                continue;
            };
            drop(buf);
            let kind = p.header.get_type();
            let ours = Some(p.header.message_id) == mid;
            match (kind, p.header.code) {
                (MessageType::Reset, _) if ours => {
                    return Err("the device answered with a Reset".to_owned());
                }
                (MessageType::Acknowledgement, MessageClass::Empty) if ours => {
                    return Ok(Received::Acknowledged);
                }
                (_, MessageClass::Response(_)) if p.get_token() == token => {
                    if kind == MessageType::Confirmable {
                        self.reply(MessageType::Acknowledgement, p.header.message_id)
                            .await;
                    }
                    if kind == MessageType::Acknowledgement && !ours {
                        continue;
                    }
                    return Ok(Received::Response(answer(&p)));
                }
                // A confirmable message nobody here waits for: an old observation's
                // notification. The Reset ends it (RFC 7641 §3.6).
                (MessageType::Confirmable, _) => {
                    self.reply(MessageType::Reset, p.header.message_id).await;
                }
                _ => {}
            }
        }
    }

    async fn reply(&self, kind: MessageType, mid: u16) {
        let mut p = Packet::new();
        p.header.set_type(kind);
        p.header.code = MessageClass::Empty;
        p.header.message_id = mid;
        if let Ok(bytes) = p.to_bytes() {
            // Lost, the peer sends again and is answered again.
            let _ = self.socket.send(&bytes).await;
        }
    }
}

enum Received {
    Response(CoapAnswer),
    Acknowledged,
    Nothing,
}

/// A fresh token for a request or an observation.
pub(crate) fn token() -> Vec<u8> {
    rand::random::<u64>().to_be_bytes().to_vec()
}

fn request(
    method: RequestType,
    url: &reqwest::Url,
    body: &Body<'_>,
    token: &[u8],
    mid: u16,
) -> Packet {
    let mut p = Packet::new();
    p.header.set_type(MessageType::Confirmable);
    p.header.code = MessageClass::Request(method);
    p.header.message_id = mid;
    p.set_token(token.to_vec());
    // Options must go in in number order: ETag 4, Observe 6, Uri-Path 11, Content-Format 12,
    // Uri-Query 15; coap-lite sorts them by number when it encodes.
    if let Some(etag) = body.etag {
        p.add_option(CoapOption::ETag, etag.to_vec());
    }
    if let Some(observe) = body.observe {
        p.add_option(CoapOption::Observe, uint(observe));
    }
    for segment in url.path_segments().into_iter().flatten() {
        if !segment.is_empty() {
            p.add_option(CoapOption::UriPath, decode(segment));
        }
    }
    if let Some(format) = body.content_type.and_then(content_format_for) {
        p.add_option(CoapOption::ContentFormat, uint(u32::from(format)));
    }
    for item in url.query().into_iter().flat_map(|q| q.split('&')) {
        if !item.is_empty() {
            p.add_option(CoapOption::UriQuery, decode(item));
        }
    }
    if let Some((num, more, szx)) = body.block1 {
        let value = (num << 4) | (u32::from(more) << 3) | u32::from(szx);
        p.add_option(CoapOption::Block1, uint(value));
    }
    p.payload = body.payload.to_vec();
    p
}

fn answer(p: &Packet) -> CoapAnswer {
    let code = u8::from(p.header.code);
    CoapAnswer {
        status: u16::from(code >> 5) * 100 + u16::from(code & 0x1f),
        payload: Bytes::copy_from_slice(&p.payload),
        content_type: option_uint(p, CoapOption::ContentFormat)
            .and_then(|f| u16::try_from(f).ok())
            .and_then(content_type_for)
            .map(str::to_owned),
        max_age: option_uint(p, CoapOption::MaxAge),
        etag: p.get_first_option(CoapOption::ETag).cloned(),
        observe: option_uint(p, CoapOption::Observe),
        block1: option_uint(p, CoapOption::Block1).map(|v| (v >> 4, v & 8 != 0, (v & 7) as u8)),
    }
}

fn decode(text: &str) -> Vec<u8> {
    percent_encoding::percent_decode_str(text).collect()
}

/// An unsigned option value, shortest encoding (RFC 7252 §3.2).
fn uint(value: u32) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    bytes[skip..].to_vec()
}

fn option_uint(p: &Packet, option: CoapOption) -> Option<u32> {
    let value = p.get_first_option(option)?;
    (value.len() <= 4).then(|| value.iter().fold(0u32, |a, b| (a << 8) | u32::from(*b)))
}

/// Whether notification `new` is fresher than `old` (RFC 7641 §3.4), `elapsed` after it.
pub(crate) fn is_fresher(old: u32, new: u32, elapsed: Duration) -> bool {
    const HALF: u32 = 1 << 23;
    (old < new && new - old < HALF)
        || (old > new && old - new > HALF)
        || elapsed > Duration::from_secs(128)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_the_url_as_options() {
        let url = reqwest::Url::parse("coap://h/relay/a%20b?turn=on%26off").unwrap();
        let body = Body {
            payload: b"x",
            content_type: Some("application/json"),
            ..Body::default()
        };
        let p = request(RequestType::Put, &url, &body, &[1, 2], 7);
        let bytes = p.to_bytes().unwrap();
        let p = Packet::from_bytes(&bytes).unwrap();
        let path: Vec<&Vec<u8>> = p.get_option(CoapOption::UriPath).unwrap().iter().collect();
        assert_eq!(path, [&b"relay".to_vec(), &b"a b".to_vec()]);
        assert_eq!(
            p.get_first_option(CoapOption::UriQuery).unwrap(),
            b"turn=on&off"
        );
        assert_eq!(option_uint(&p, CoapOption::ContentFormat), Some(50));
        assert_eq!(p.header.get_type(), MessageType::Confirmable);
        assert_eq!(p.payload, b"x");
    }

    #[test]
    fn codes_read_as_numbers_and_notifications_as_fresh_or_stale() {
        let mut p = Packet::new();
        p.header.code = MessageClass::from(0x84); // 4.04
        assert_eq!(answer(&p).status, 404);
        p.header.code = MessageClass::from(0x45); // 2.05
        assert_eq!(answer(&p).status, 205);
        assert!(is_fresher(5, 6, Duration::ZERO));
        assert!(!is_fresher(6, 5, Duration::ZERO));
        assert!(is_fresher((1 << 24) - 1, 2, Duration::ZERO));
        assert!(is_fresher(6, 5, Duration::from_secs(129)));
    }
}
