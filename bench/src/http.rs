//! A minimal HTTP/1.1 client for the load tools: one keep-alive connection, one request at a
//! time, response heads parsed by hand so that no client library sits between the tool and the
//! socket.

use std::io::Write as _;
use std::net::SocketAddr;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What the tools need of a response head.
pub struct ResponseHead {
    /// The status code.
    pub status: u16,
    /// `Content-Length`, when given.
    pub content_length: Option<usize>,
    /// Whether the body is sent in chunks.
    pub chunked: bool,
}

/// Reads a response head from `conn`; the bytes after it stay in `buf`.
pub async fn read_head(conn: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<ResponseHead> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = parse_head(&buf[..end])?;
            buf.drain(..end + 4);
            return Ok(head);
        }
        if buf.len() > 64 * 1024 {
            bail!("a response head over 64 KiB");
        }
        if buf.len() == buf.capacity() {
            buf.reserve(4096);
        }
        if conn.read_buf(buf).await? == 0 {
            bail!("the connection closed before a response");
        }
    }
}

fn parse_head(head: &[u8]) -> anyhow::Result<ResponseHead> {
    let text = std::str::from_utf8(head).context("a response head that is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("a bad status line {status_line:?}"))?;
    let mut parsed = ResponseHead {
        status,
        content_length: None,
        chunked: false,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            parsed.content_length = Some(value.parse().context("a bad Content-Length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            parsed.chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    Ok(parsed)
}

/// One keep-alive HTTP/1.1 connection for requests answered one at a time.
pub struct HttpConn {
    stream: TcpStream,
    host: String,
    buf: Vec<u8>,
    request: Vec<u8>,
}

impl HttpConn {
    /// Connects, with Nagle off: each request is one write.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            host: addr.to_string(),
            buf: Vec::with_capacity(4096),
            request: Vec::with_capacity(512),
        })
    }

    /// Sends a request and returns the response status, with the body read and dropped.
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> anyhow::Result<u16> {
        self.request.clear();
        write!(
            self.request,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        )?;
        self.request.extend_from_slice(body);
        self.stream.write_all(&self.request).await?;
        let head = read_head(&mut self.stream, &mut self.buf).await?;
        if head.chunked {
            bail!("a chunked answer to {method} {path}: not expected");
        }
        let length = head.content_length.unwrap_or(0);
        while self.buf.len() < length {
            self.buf.reserve(length - self.buf.len());
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                bail!("the connection closed inside a response body");
            }
        }
        self.buf.drain(..length);
        Ok(head.status)
    }
}

/// Percent-encodes what may not appear raw in a URL path (a topic may hold spaces, `#`, `?`...).
pub fn encode_path(topic: &str) -> String {
    let mut out = String::with_capacity(topic.len());
    for &b in topic.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/+!$&'()*,;=:@".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_gives_status_length_and_chunking() {
        let head = parse_head(b"HTTP/1.1 204 No Content\r\nContent-Length: 0").expect("head");
        assert_eq!(
            (head.status, head.content_length, head.chunked),
            (204, Some(0), false)
        );
        let head = parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked").expect("head");
        assert_eq!(
            (head.status, head.content_length, head.chunked),
            (200, None, true)
        );
        assert!(parse_head(b"garbage").is_err());
    }

    #[test]
    fn topics_are_encoded_for_a_path() {
        assert_eq!(encode_path("home/temp"), "home/temp");
        assert_eq!(encode_path("a b/#/?"), "a%20b/%23/%3F");
    }
}
