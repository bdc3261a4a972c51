//! Event streams over plain HTTP/1.1, written by the gateway itself.
//!
//! hyper gives every HTTP/1.1 connection an 8 KiB write buffer and an 8 KiB read buffer (its
//! minimum), and an event stream keeps both, each with a page touched, for as long as it is
//! open: most of what a stream costs. So when the first request of a plain connection asks for
//! an event stream, it is read here instead: looked at first (nothing is consumed until it is
//! known to be one), then read exactly to the end of its head. It is answered by the same
//! [`App`] as every other request. An event stream is then written here, each event one chunk
//! sent from the bytes all streams share; any other answer (a refusal, a retained value) is
//! written here as well, and the connection goes on with hyper. Connections opening with
//! anything else, HTTP/2 and TLS are hyper's from the start.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::SystemTime;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderName, HeaderValue, Method, Response, Version, header};
use bytes::Buf;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::App;

/// The longest request head read here; a longer one is left to hyper.
const MAX_HEAD: usize = 8 * 1024;

/// Most headers in a request read here; a request with more is left to hyper.
const MAX_HEADERS: usize = 64;

/// How the opening bytes of a connection start a request this module may take.
const OPENING: &[u8] = b"GET /topics";

/// Largest response body written here other than an event stream (an error, a retained value
/// or a page of them are far smaller).
const MAX_BODY: usize = 64 * 1024 * 1024;

/// Whether a connection that opens with `start` may be asking for an event stream.
pub(super) fn may_ask_for_events(start: &[u8]) -> bool {
    start.len() >= OPENING.len() && start.starts_with(OPENING)
}

/// A first request asking for an event stream: the request, and its head's length on the wire.
pub(super) struct Asked {
    /// Boxed: a request is ten times the size of everything else a connection's opening holds.
    request: Box<Request>,
    head: usize,
}

/// Looks at the first request of `stream` without reading it: `Some` when it is a complete
/// HTTP/1.1 GET of `/topics` without a body that asks for an event stream (by `Accept` or
/// `stream=` in its query), `None` for anything hyper should read instead.
pub(super) async fn look(stream: &TcpStream, peer: SocketAddr) -> io::Result<Option<Asked>> {
    let mut seen = vec![0u8; MAX_HEAD];
    let mut n = stream.peek(&mut seen).await?;
    loop {
        match parse(&seen[..n], peer) {
            Parsed::Asked(asked) => return Ok(Some(asked)),
            Parsed::Other => return Ok(None),
            Parsed::Partial if n < MAX_HEAD && n > 0 => {
                match super::server::peek_more(stream, &mut seen, n).await? {
                    Some(more) => n = more,
                    // Closed before the head was whole: hyper reads what there is and ends it.
                    None => return Ok(None),
                }
            }
            Parsed::Partial => return Ok(None),
        }
    }
}

enum Parsed {
    Asked(Asked),
    Partial,
    Other,
}

fn parse(seen: &[u8], peer: SocketAddr) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut headers);
    let len = match head.parse(seen) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    let (Some("GET"), Some(path), Some(1)) = (head.method, head.path, head.version) else {
        return Parsed::Other;
    };
    let mut asks = path
        .split_once('?')
        .is_some_and(|(_, q)| q.contains("stream="));
    let mut request = Request::new(Body::empty());
    for h in head.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return Parsed::Other;
        };
        // A body, or an upgrade, is hyper's to handle.
        let body = (name == header::CONTENT_LENGTH && value != "0")
            || name == header::TRANSFER_ENCODING
            || name == header::UPGRADE
            || name == header::EXPECT;
        if body {
            return Parsed::Other;
        }
        if name == header::ACCEPT
            && value
                .to_str()
                .is_ok_and(|v| v.to_ascii_lowercase().contains("text/event-stream"))
        {
            asks = true;
        }
        request.headers_mut().append(name, value);
    }
    let Ok(uri) = path.parse() else {
        return Parsed::Other;
    };
    if !asks {
        return Parsed::Other;
    }
    *request.method_mut() = Method::GET;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    request.extensions_mut().insert(ConnectInfo(peer));
    Parsed::Asked(Asked {
        request: Box::new(request),
        head: len,
    })
}

/// What the connection does after a request answered here.
pub(super) enum Then {
    /// Hyper serves the requests that follow.
    GoOn,
    /// The connection is done.
    Close,
}

/// Reads the head `asked` was parsed from off `stream`, answers it with `app`, and writes the
/// answer. An event stream is written until it ends (as every stream does when the gateway
/// shuts down) or the client goes away.
pub(super) async fn answer(stream: &mut TcpStream, asked: Asked, app: &App) -> io::Result<Then> {
    let mut head = vec![0u8; asked.head];
    stream.read_exact(&mut head).await?;
    drop(head);
    let closes = asked
        .request
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| {
            v.to_str()
                .is_ok_and(|v| v.to_ascii_lowercase().contains("close"))
        });
    let response = app.handle(*asked.request).await;
    let is_stream = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|ct| {
            ct.as_bytes()
                .to_ascii_lowercase()
                .starts_with(b"text/event-stream")
        });
    if is_stream {
        write_stream(stream, response).await?;
        return Ok(Then::Close);
    }
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(io::Error::other)?;
    let mut out = head_bytes(&parts, Framing::Length(body.len()), closes);
    out.extend_from_slice(&body);
    stream.write_all(&out).await?;
    Ok(if closes { Then::Close } else { Then::GoOn })
}

/// Writes an event stream's head, then each of its frames as a chunk, while watching the read
/// side for the client going away.
async fn write_stream(stream: &mut TcpStream, response: Response<Body>) -> io::Result<()> {
    let (parts, mut body) = response.into_parts();
    let head = head_bytes(&parts, Framing::Chunked, true);
    drop(parts);
    stream.write_all(&head).await?;
    drop(head);
    let (mut reader, mut writer) = stream.split();
    let mut ignored = [0u8; 64];
    loop {
        tokio::select! {
            frame = body.frame() => match frame {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        let mut size = [0u8; CHUNK_SIZE_LINE];
                        let size = chunk_size(&mut size, data.len());
                        let mut chunk = Buf::chain(size, data).chain(&b"\r\n"[..]);
                        writer.write_all_buf(&mut chunk).await?;
                    }
                }
                Some(Err(e)) => return Err(io::Error::other(e)),
                None => return writer.write_all(b"0\r\n\r\n").await,
            },
            // Nothing a client sends can be answered while its stream is open; its end (or a
            // reset) ends the stream.
            read = reader.read(&mut ignored) => match read {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => {}
            },
        }
    }
}

/// The longest chunk size line: 16 hex digits and CRLF.
const CHUNK_SIZE_LINE: usize = 18;

/// A chunk's size line (RFC 9112 §7.1), written into `buf`.
fn chunk_size(buf: &mut [u8; CHUNK_SIZE_LINE], len: usize) -> &[u8] {
    let mut rest = &mut buf[..];
    // why: a usize has at most 16 hex digits, so the line always fits.
    write!(rest, "{len:x}\r\n").expect("a chunk size line fits");
    let written = CHUNK_SIZE_LINE - rest.len();
    &buf[..written]
}

enum Framing {
    Length(usize),
    Chunked,
}

/// The status line and headers of a response, with the framing and `Date` that hyper would add.
fn head_bytes(parts: &axum::http::response::Parts, framing: Framing, closes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .status
            .canonical_reason()
            .unwrap_or_default()
            .as_bytes(),
    );
    out.extend_from_slice(b"\r\n");
    let mut line = |name: &[u8], value: &[u8]| {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    for (name, value) in &parts.headers {
        let framing = name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::CONNECTION;
        if !framing {
            line(name.as_str().as_bytes(), value.as_bytes());
        }
    }
    if !parts.headers.contains_key(header::DATE) {
        line(
            b"date",
            httpdate::fmt_http_date(SystemTime::now()).as_bytes(),
        );
    }
    // A 204 or 304 has no body, and no framing header says otherwise (RFC 9110 §8.6, §15.4.5).
    let bodiless = matches!(parts.status.as_u16(), 204 | 304);
    match framing {
        Framing::Length(_) if bodiless => {}
        Framing::Length(len) => line(b"content-length", len.to_string().as_bytes()),
        Framing::Chunked => line(b"transfer-encoding", b"chunked"),
    }
    if closes {
        line(b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    fn asked(head: &str) -> Option<Asked> {
        match parse(head.as_bytes(), peer()) {
            Parsed::Asked(asked) => Some(asked),
            _ => None,
        }
    }

    #[test]
    fn only_bodiless_http11_gets_asking_for_events_are_taken() {
        let head = "GET /topics/a/%23 HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n";
        let taken = asked(head).expect("an event stream request");
        assert_eq!(taken.head, head.len());
        assert_eq!(taken.request.uri().path(), "/topics/a/%23");
        assert_eq!(taken.request.headers()["host"], "x");
        assert!(asked("GET /topics/a?stream=true HTTP/1.1\r\nHost: x\r\n\r\n").is_some());

        for other in [
            "GET /topics/a HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /topics/a HTTP/1.0\r\nAccept: text/event-stream\r\n\r\n",
            "POST /topics/a HTTP/1.1\r\nAccept: text/event-stream\r\n\r\n",
            "GET /topics/a HTTP/1.1\r\nAccept: text/event-stream\r\nContent-Length: 3\r\n\r\n",
            "GET /topics/a HTTP/1.1\r\nAccept: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /topics/a HTTP/1.1\r\nAccept: text/event-stream\r\nUpgrade: websocket\r\n\r\n",
            "GET /topics/a HTTP/1.1\r\nAccept: text/event-stream\r\nBad Name: x\r\n\r\n",
        ] {
            assert!(asked(other).is_none(), "{other}");
        }
        assert!(matches!(
            parse(b"GET /topics/a HTTP/1.1\r\nAccept: text/ev", peer()),
            Parsed::Partial
        ));
    }

    #[test]
    fn any_change_to_a_head_is_taken_whole_or_left_to_hyper() {
        let head = b"GET /topics/a/%23?stream=true HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n";
        for at in 0..head.len() {
            for byte in [0u8, b' ', b'\r', b'\n', b':', b'%', b'?', 0x7f, 0xff] {
                let mut changed = head.to_vec();
                changed[at] = byte;
                for cut in [changed.len(), at + 1] {
                    if let Parsed::Asked(asked) = parse(&changed[..cut], peer()) {
                        assert!(asked.head <= cut);
                        assert_eq!(asked.request.method(), Method::GET);
                    }
                }
            }
        }
    }

    #[test]
    fn heads_carry_hypers_framing_and_date() {
        let response = Response::builder()
            .status(404)
            .header("content-type", "application/json")
            .header("content-length", "999")
            .body(())
            .unwrap();
        let (parts, ()) = response.into_parts();
        let head = String::from_utf8(head_bytes(&parts, Framing::Length(12), true)).unwrap();
        assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"), "{head}");
        assert!(
            head.contains("\r\ncontent-type: application/json\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\ncontent-length: 12\r\n"), "{head}");
        assert!(!head.contains("999"), "{head}");
        assert!(head.contains("\r\ndate: "), "{head}");
        assert!(head.ends_with("\r\nconnection: close\r\n\r\n"), "{head}");
        let (parts, ()) = Response::builder()
            .status(304)
            .body(())
            .unwrap()
            .into_parts();
        let head = String::from_utf8(head_bytes(&parts, Framing::Length(0), false)).unwrap();
        assert!(head.starts_with("HTTP/1.1 304 Not Modified\r\n"), "{head}");
        assert!(!head.contains("content-length"), "{head}");
        let mut line = [0u8; CHUNK_SIZE_LINE];
        assert_eq!(chunk_size(&mut line, 255), b"ff\r\n");
        assert_eq!(chunk_size(&mut line, usize::MAX), b"ffffffffffffffff\r\n");
    }
}
