//! The push client for `http://` endpoints: HTTP/1.1 keep-alive connections to the rule's one
//! origin (a template fills only the path and query), each driven by the request that uses it,
//! inside the rule's worker task. reqwest runs every connection as a task of its own that the
//! request wakes and that wakes the request back; on a loaded machine those wake-ups, not the
//! work, bounded how fast a rule could push (`bench/README.md`). HTTPS, client certificates,
//! HTTP/2 and proxies stay with reqwest: a rule uses this client only for `http://` with no
//! proxy configured in the environment.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{Connection, SendRequest, handshake};
use hyper_util::rt::TokioIo;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode, Url};
use tokio::net::TcpStream;

type Io = TokioIo<TcpStream>;

/// Idle connections kept at most; more are closed after their answer.
const MAX_IDLE: usize = 1024;

/// The connections of one rule to its origin.
pub(crate) struct Plain {
    /// `host:port`, to connect to.
    address: String,
    /// The `Host` header.
    authority: reqwest::header::HeaderValue,
    idle: Mutex<Vec<Conn>>,
}

impl std::fmt::Debug for Plain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plain")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// An answer: its status and headers, and its body up to the limit asked for.
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

/// One connection: the handle requests go through, and the connection itself, which makes
/// progress only while it is polled.
struct Conn {
    tx: SendRequest<Full<Bytes>>,
    conn: Pin<Box<Connection<Io, Full<Bytes>>>>,
}

/// How one exchange on a connection ended.
enum Exchange {
    Done(Reply, bool),
    /// The connection was found closed before the request was written: it may go on another.
    NotSent(hyper::Request<Full<Bytes>>),
    Failed(String),
}

impl Plain {
    /// The client for `origin` (`scheme://authority`), if it is `http://` and the environment
    /// names no proxy that reqwest would use.
    pub(crate) fn for_origin(origin: &str) -> Option<Self> {
        let proxied = ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"]
            .iter()
            .any(|var| std::env::var_os(var).is_some_and(|v| !v.is_empty()));
        if proxied {
            return None;
        }
        let url = Url::parse(origin).ok()?;
        if url.scheme() != "http" {
            return None;
        }
        let port = url.port_or_known_default()?;
        let address = match url.host()? {
            url::Host::Domain(d) => format!("{d}:{port}"),
            url::Host::Ipv4(a) => format!("{a}:{port}"),
            url::Host::Ipv6(a) => format!("[{a}]:{port}"),
        };
        let authority = match url.port() {
            Some(port) => format!("{}:{port}", url.host_str()?),
            None => url.host_str()?.to_owned(),
        };
        Some(Self {
            address,
            authority: authority.parse().ok()?,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Sends `body` to `target` (a path and query on this client's origin) with `headers`, on
    /// an idle connection or a new one; reads the answer's body up to `limit` bytes.
    pub(crate) async fn send(
        &self,
        method: Method,
        target: &str,
        headers: HeaderMap,
        body: Bytes,
        limit: usize,
    ) -> Result<Reply, String> {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(target)
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let all = request.headers_mut();
        *all = headers;
        all.insert(reqwest::header::HOST, self.authority.clone());
        all.entry(reqwest::header::USER_AGENT)
            .or_insert(reqwest::header::HeaderValue::from_static(super::USER_AGENT));
        all.entry(reqwest::header::ACCEPT)
            .or_insert(reqwest::header::HeaderValue::from_static("*/*"));
        // A kept connection the endpoint has closed meanwhile is found out when the request
        // cannot be written on it; it then goes on a new connection, once.
        let mut fresh = false;
        loop {
            let idle = if fresh { None } else { self.take_idle() };
            let mut conn = match idle {
                Some(conn) => conn,
                None => {
                    fresh = true;
                    self.connect().await?
                }
            };
            match conn.exchange(request, limit).await {
                Exchange::Done(reply, reusable) => {
                    if reusable {
                        self.put_back(conn);
                    }
                    return Ok(reply);
                }
                Exchange::NotSent(again) if !fresh => request = again,
                Exchange::NotSent(_) => return Err("the connection closed at once".to_owned()),
                Exchange::Failed(e) => return Err(e),
            }
        }
    }

    /// An idle connection the endpoint has not closed, if any.
    fn take_idle(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(mut conn) = idle.pop() {
            // Polled once: a connection whose peer has closed it ends here.
            if !conn.tx.is_closed() && conn.conn.as_mut().now_or_never().is_none() {
                return Some(conn);
            }
        }
        None
    }

    fn put_back(&self, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }

    async fn connect(&self) -> Result<Conn, String> {
        let stream = TcpStream::connect(&self.address)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.address))?;
        let _ = stream.set_nodelay(true);
        let (tx, conn) = handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        Ok(Conn {
            tx,
            conn: Box::pin(conn),
        })
    }
}

impl Conn {
    /// One request and its answer, the connection driven meanwhile.
    async fn exchange(&mut self, request: hyper::Request<Full<Bytes>>, limit: usize) -> Exchange {
        let Self { tx, conn } = self;
        let work = async {
            if poll_fn(|cx| tx.poll_ready(cx)).await.is_err() {
                return Exchange::NotSent(request);
            }
            let response = match tx.try_send_request(request).await {
                Ok(response) => response,
                Err(mut e) => {
                    return match e.take_message() {
                        Some(request) => Exchange::NotSent(request),
                        None => Exchange::Failed(e.into_error().to_string()),
                    };
                }
            };
            let (parts, mut incoming) = response.into_parts();
            let mut body = Vec::new();
            let mut whole = true;
            while let Some(frame) = incoming.frame().await {
                let frame = match frame {
                    Ok(frame) => frame,
                    Err(e) => return Exchange::Failed(e.to_string()),
                };
                if let Ok(chunk) = frame.into_data()
                    && !super::append_within(&mut body, &chunk, limit)
                {
                    // The rest is not read: the connection cannot carry another request.
                    whole = false;
                    break;
                }
            }
            let reply = Reply {
                status: parts.status,
                headers: parts.headers,
                body: Bytes::from(body),
            };
            Exchange::Done(reply, whole && !tx.is_closed())
        };
        tokio::pin!(work);
        let mut ended = false;
        loop {
            tokio::select! {
                outcome = &mut work => {
                    return match outcome {
                        Exchange::Done(reply, reusable) => Exchange::Done(reply, reusable && !ended),
                        other => other,
                    };
                }
                // The connection ends when the endpoint closes it (after the answer, or
                // instead of one): the request then ends too, with what it got.
                _ = conn.as_mut(), if !ended => ended = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// An endpoint that answers each request on a connection with `body`, and closes the
    /// connection after `per_connection` answers; counts the connections it accepted.
    async fn endpoint(body: &'static str, per_connection: usize) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for _ in 0..per_connection {
                        // Requests are small: one ends with its body after the blank line.
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            let mut chunk = [0; 4096];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let head = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        let text = String::from_utf8_lossy(&buf[..head]).to_lowercase();
                        let length: usize = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        while buf.len() < head + length {
                            let mut chunk = [0; 4096];
                            let n = s.read(&mut chunk).await.unwrap();
                            buf.extend_from_slice(&chunk[..n]);
                        }
                        assert!(text.starts_with("post /in/a?x=1 http/1.1\r\n"), "{text}");
                        assert!(text.contains(&format!("host: {addr}")), "{text}");
                        buf.drain(..head + length);
                        let answer = format!(
                            "HTTP/1.1 201 Created\r\ncontent-type: text/plain\r\n\
                             content-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        s.write_all(answer.as_bytes()).await.unwrap();
                    }
                });
            }
        });
        (format!("http://{addr}"), accepted)
    }

    async fn send(plain: &Plain, limit: usize) -> Result<Reply, String> {
        plain
            .send(
                Method::POST,
                "/in/a?x=1",
                HeaderMap::new(),
                Bytes::from("hi"),
                limit,
            )
            .await
    }

    #[tokio::test]
    async fn a_connection_is_kept_for_the_next_request() {
        let (origin, accepted) = endpoint("ok", usize::MAX).await;
        let plain = Plain::for_origin(&origin).unwrap();
        for _ in 0..10 {
            let reply = send(&plain, 1024).await.unwrap();
            assert_eq!(reply.status, 201);
            assert_eq!(reply.body, "ok");
            assert_eq!(reply.headers["content-type"], "text/plain");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    /// An endpoint that closes each connection after its answer (an idle timeout of zero):
    /// every request still gets its answer, on a new connection.
    #[tokio::test]
    async fn a_kept_connection_the_endpoint_closed_is_replaced() {
        let (origin, accepted) = endpoint("ok", 1).await;
        let plain = Plain::for_origin(&origin).unwrap();
        for _ in 0..5 {
            assert_eq!(send(&plain, 1024).await.unwrap().body, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }

    /// A body past the limit is cut there, and the connection, with the rest unread, is not
    /// used again.
    #[tokio::test]
    async fn a_body_past_the_limit_is_cut_and_its_connection_dropped() {
        let (origin, accepted) = endpoint("0123456789", usize::MAX).await;
        let plain = Plain::for_origin(&origin).unwrap();
        assert_eq!(send(&plain, 4).await.unwrap().body, "0123");
        assert_eq!(send(&plain, 1024).await.unwrap().body, "0123456789");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn nothing_listening_is_an_error_naming_the_address() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let origin = format!("http://{}", free.local_addr().unwrap());
        drop(free);
        let plain = Plain::for_origin(&origin).unwrap();
        let err = send(&plain, 1024).await.err().unwrap();
        assert!(err.starts_with("cannot connect to 127.0.0.1:"), "{err}");
    }

    #[test]
    fn only_plain_http_origins_are_served() {
        assert!(Plain::for_origin("https://example.com").is_none());
        assert!(Plain::for_origin("coap://example.com").is_none());
        let plain = Plain::for_origin("http://[::1]:8080").unwrap();
        assert_eq!(plain.address, "[::1]:8080");
        assert_eq!(plain.authority, "[::1]:8080");
        assert_eq!(
            Plain::for_origin("http://plugs.lan").unwrap().address,
            "plugs.lan:80"
        );
    }
}
