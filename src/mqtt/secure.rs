//! MQTT over TLS. rumqttd's own TLS runs the handshake inside its accept loop (one slow client
//! holds up every other) and turns certificates into tenants, so the gateway terminates TLS
//! itself and relays each connection over loopback to a second rumqttd listener. That listener's
//! codec first reads an introduction the relay writes: a secret drawn at startup, which no other
//! local process knows, and the common name of the client's certificate, which then names the
//! client instead of its CONNECT user name.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use subtle::ConstantTimeEq;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::tls::{Tls, accept};

const MAGIC: &[u8; 4] = b"TGW1";
const SECRET_LEN: usize = 16;
/// Magic, secret, then the length of the name.
const HEAD: usize = MAGIC.len() + SECRET_LEN + 2;

/// The secret shared by the relay and the inner listener's codec.
#[derive(Clone, Copy)]
pub(crate) struct Secret([u8; SECRET_LEN]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    pub(crate) fn random() -> Self {
        Self(rand::random())
    }

    /// The introduction of a connection whose client certificate is named `name`.
    pub(crate) fn introduce(&self, name: Option<&str>) -> Vec<u8> {
        let name = name.unwrap_or("").as_bytes();
        let len = u16::try_from(name.len()).unwrap_or(0);
        let mut out = Vec::with_capacity(HEAD + name.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.0);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&name[..usize::from(len)]);
        out
    }

    /// Reads an introduction off the front of `stream`: `Ok(None)` while it is incomplete,
    /// `Ok(Some(name))` once read (the name is empty without a certificate), `Err` when it is
    /// not one of this relay's.
    pub(crate) fn read(&self, stream: &mut BytesMut) -> Result<Option<String>, ()> {
        let Some(head) = stream.get(..HEAD) else {
            return Ok(None);
        };
        if &head[..4] != MAGIC || !bool::from(head[4..4 + SECRET_LEN].ct_eq(&self.0)) {
            return Err(());
        }
        let len = usize::from(u16::from_be_bytes([head[HEAD - 2], head[HEAD - 1]]));
        let Some(name) = stream.get(HEAD..HEAD + len) else {
            return Ok(None);
        };
        let name = String::from_utf8(name.to_vec()).map_err(|_| ())?;
        stream.advance(HEAD + len);
        Ok(Some(name))
    }
}

/// Accepts TLS clients on `listener` and relays each to the inner listener at `inner`.
pub(crate) async fn relay(
    listener: TcpListener,
    tls: Tls,
    inner: SocketAddr,
    secret: Secret,
    handshake: Duration,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = accept(&listener, "mqtts") => accepted,
        };
        let (tls, cancel) = (tls.clone(), cancel.clone());
        tracker.spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => {}
                res = relay_one(stream, &tls, inner, secret, handshake) => {
                    if let Err(e) = res {
                        tracing::debug!(%peer, error = %e, "MQTT over TLS connection ended");
                    }
                }
            }
        });
    }
}

async fn relay_one(
    stream: TcpStream,
    tls: &Tls,
    inner: SocketAddr,
    secret: Secret,
    handshake: Duration,
) -> io::Result<()> {
    let mut client = tls.accept(stream, handshake).await?;
    let mut broker = TcpStream::connect(inner).await?;
    let _ = broker.set_nodelay(true);
    broker
        .write_all(&secret.introduce(client.client_name.as_deref()))
        .await?;
    tokio::io::copy_bidirectional(&mut client.stream, &mut broker).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_introduction_is_read_back_whole_and_only_with_the_secret() {
        let secret = Secret::random();
        let intro = secret.introduce(Some("sensor-7"));
        let mut buf = BytesMut::from(&intro[..intro.len() - 1]);
        assert_eq!(secret.read(&mut buf), Ok(None), "incomplete");
        buf.extend_from_slice(&intro[intro.len() - 1..]);
        buf.extend_from_slice(&[0x10, 0]);
        assert_eq!(secret.read(&mut buf), Ok(Some("sensor-7".to_owned())));
        assert_eq!(&buf[..], &[0x10, 0], "the packets after it are left");

        let mut plain = BytesMut::from(&secret.introduce(None)[..]);
        assert_eq!(secret.read(&mut plain), Ok(Some(String::new())));

        let mut forged = BytesMut::from(&Secret::random().introduce(Some("admin"))[..]);
        assert_eq!(secret.read(&mut forged), Err(()));
        let mut mqtt = BytesMut::from(
            &[
                0x10u8, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ][..],
        );
        assert_eq!(
            secret.read(&mut mqtt),
            Err(()),
            "a client talking MQTT directly"
        );
    }
}
