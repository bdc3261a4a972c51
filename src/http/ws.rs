//! MQTT over WebSocket at `/mqtt` (subprotocol `mqtt`): the HTTP side answers the upgrade and
//! turns the WebSocket's binary messages into a byte stream that the broker serves like a TCP
//! connection.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::AppState;
use super::auth::ClientName;
use super::error::ApiError;

/// A WebSocket connection whose upgrade has been answered, resolving once the client has it.
pub type PendingStream = Pin<Box<dyn Future<Output = Option<WsStream>> + Send>>;

/// Serves MQTT on an upgraded connection: the stream, the peer, and the common name of its TLS
/// client certificate.
pub type MqttAcceptor = Arc<dyn Fn(PendingStream, SocketAddr, Option<String>) + Send + Sync>;

/// The subprotocols MQTT over WebSocket is offered under (MQTT 5 §6: `mqtt`; older clients
/// ask for `mqttv3.1`).
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// `GET /mqtt`: upgrades to a WebSocket and hands it to the broker.
pub(crate) async fn upgrade(State(state): State<AppState>, mut request: Request) -> Response {
    let Some(acceptor) = state.mqtt.clone() else {
        return ApiError::NotFound.into_response();
    };
    let headers = request.headers();
    let Some(key) = websocket_key(headers) else {
        return ApiError::InvalidHeader(
            "this is the MQTT over WebSocket endpoint: it takes a WebSocket upgrade (version 13)"
                .to_owned(),
        )
        .into_response();
    };
    let Some(protocol) = subprotocol(headers) else {
        return ApiError::InvalidHeader(
            "MQTT over WebSocket needs the subprotocol \"mqtt\" (Sec-WebSocket-Protocol)"
                .to_owned(),
        )
        .into_response();
    };
    let accept = derive_accept_key(key.as_bytes());
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)), |c| c.0);
    let certified = request
        .extensions()
        .get::<ClientName>()
        .map(|c| c.0.clone());
    let on_upgrade = hyper::upgrade::on(&mut request);
    let pending: PendingStream = Box::pin(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let socket = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(WebSocketConfig::default()),
                )
                .await;
                Some(WsStream::new(socket))
            }
            Err(e) => {
                tracing::info!(%peer, error = %e, "MQTT WebSocket upgrade failed");
                None
            }
        }
    });
    acceptor(pending, peer, certified);
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = response.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).unwrap_or(HeaderValue::from_static("")),
    );
    h.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(protocol),
    );
    response
}

/// The key of a well-formed WebSocket upgrade request (RFC 6455 §4.2.1).
fn websocket_key(headers: &HeaderMap) -> Option<&str> {
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has(header::UPGRADE, "websocket") || !has(header::CONNECTION, "upgrade") {
        return None;
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION)?.as_bytes() != b"13" {
        return None;
    }
    headers.get(header::SEC_WEBSOCKET_KEY)?.to_str().ok()
}

/// The first subprotocol the client offers that MQTT is served under.
fn subprotocol(headers: &HeaderMap) -> Option<&'static str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|offered| {
            SUBPROTOCOLS
                .iter()
                .find(|p| p.eq_ignore_ascii_case(offered.trim()))
                .copied()
        })
}

/// The bytes of a WebSocket's binary messages as one stream, both ways: what MQTT over
/// WebSocket is (a packet may span messages, a message may hold several packets).
pub struct WsStream {
    socket: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>,
    /// What is left of the last message read.
    pending: Bytes,
}

impl WsStream {
    fn new(socket: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>) -> Self {
        Self {
            socket,
            pending: Bytes::new(),
        }
    }
}

fn ws_error(e: tokio_tungstenite::tungstenite::Error) -> io::Error {
    io::Error::other(e)
}

impl AsyncRead for WsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.socket).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => self.pending = data,
                // Pings are answered by the WebSocket layer itself; text has no place here.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "MQTT over WebSocket is sent in binary messages",
                    )));
                }
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(ws_error(e))),
            }
        }
    }
}

impl AsyncWrite for WsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.socket).poll_ready(cx)).map_err(ws_error)?;
        Pin::new(&mut self.socket)
            .start_send(Message::Binary(Bytes::copy_from_slice(data)))
            .map_err(ws_error)?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_flush(cx).map_err(ws_error)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_close(cx).map_err(ws_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn an_upgrade_is_recognised_and_mqtt_chosen_among_the_offers() {
        let ok = headers(&[
            ("upgrade", "websocket"),
            ("connection", "keep-alive, Upgrade"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-protocol", "wamp, MQTT"),
        ]);
        assert_eq!(websocket_key(&ok), Some("dGhlIHNhbXBsZSBub25jZQ=="));
        assert_eq!(subprotocol(&ok), Some("mqtt"));
        // RFC 6455 §1.3's example.
        assert_eq!(
            derive_accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        let old = headers(&[("sec-websocket-protocol", "mqttv3.1")]);
        assert_eq!(subprotocol(&old), Some("mqttv3.1"));
        assert_eq!(
            subprotocol(&headers(&[("sec-websocket-protocol", "chat")])),
            None
        );
        let no_upgrade = headers(&[("sec-websocket-version", "13"), ("sec-websocket-key", "x")]);
        assert_eq!(websocket_key(&no_upgrade), None);
    }
}
