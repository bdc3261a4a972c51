//! HTTPS and MQTT over TLS with certificates made for the test: server authentication, client
//! certificates naming the caller, and the deadlines that keep slow clients from holding
//! connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use topicgate::Config;
use topicgate::config::{AclAccess, AclEntry, TokenEntry};

use crate::support::{TestGateway, within};

const ADMIN_TOKEN: &str = "admin-token-0123456789";

/// A CA, a server certificate for localhost signed by it, and a client certificate.
struct Pki {
    ca: CertificateDer<'static>,
    client_chain: Vec<CertificateDer<'static>>,
    client_key: Vec<u8>,
    dir: tempfile::TempDir,
}

impl Pki {
    fn new(client_name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "topicgate test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();

        let server_key = KeyPair::generate().unwrap();
        let server_params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        let server = server_params.signed_by(&server_key, &ca, &ca_key).unwrap();

        let client_key = KeyPair::generate().unwrap();
        let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        client_params
            .distinguished_name
            .push(DnType::CommonName, client_name);
        let client = client_params.signed_by(&client_key, &ca, &ca_key).unwrap();

        let path = dir.path();
        std::fs::write(path.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(path.join("server.pem"), server.pem()).unwrap();
        std::fs::write(path.join("server.key"), server_key.serialize_pem()).unwrap();
        Self {
            ca: ca.der().clone(),
            client_chain: vec![client.der().clone()],
            client_key: client_key.serialize_der(),
            dir,
        }
    }

    fn configure(&self, c: &mut Config, require_client_cert: bool) {
        let dir = self.dir.path();
        c.tls.cert = Some(dir.join("server.pem"));
        c.tls.key = Some(dir.join("server.key"));
        c.tls.client_ca = Some(dir.join("ca.pem"));
        c.tls.require_client_cert = require_client_cert;
    }

    /// A TLS client trusting the test CA, presenting the client certificate or none.
    fn connector(&self, with_certificate: bool) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let config = if with_certificate {
            let key = PrivateKeyDer::try_from(self.client_key.clone()).unwrap();
            builder
                .with_client_auth_cert(self.client_chain.clone(), key)
                .unwrap()
        } else {
            builder.with_no_client_auth()
        };
        TlsConnector::from(Arc::new(config))
    }
}

fn acl(c: &mut Config) {
    c.auth.allow_anonymous = Some(false);
    c.auth.tokens.push(TokenEntry {
        name: "admin".to_owned(),
        token: ADMIN_TOKEN.to_owned(),
    });
    for (user, topic) in [("admin", "#"), ("sensor-7", "sensors/%u/#")] {
        c.auth.acl.push(AclEntry {
            user: user.to_owned(),
            topic: topic.to_owned(),
            access: AclAccess::ReadWrite,
        });
    }
}

async fn tls_connect(
    connector: &TlsConnector,
    addr: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    within("the TLS handshake", connector.connect(name, tcp)).await
}

/// One HTTP/1.1 request on its own connection; the status code and the body.
async fn request<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String) {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    // A peer closing without close_notify is fine here: the whole response was read.
    let _ = within("the HTTP response", stream.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("an HTTP response, got {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
    (status, body.unwrap_or_default())
}

#[tokio::test]
async fn https_serves_the_api_and_a_client_certificate_names_the_caller() {
    let pki = Pki::new("sensor-7");
    let gw = TestGateway::start_with(|c| {
        pki.configure(c, false);
        acl(c);
    })
    .await;
    let https = gw.https.expect("an HTTPS listener");
    let (anonymous, certified) = (pki.connector(false), pki.connector(true));

    let tls = tls_connect(&anonymous, https).await.unwrap();
    let (status, _) = request(tls, "GET", "/healthz", "", "").await;
    assert_eq!(status, 200, "the API over HTTPS");
    let tls = tls_connect(&anonymous, https).await.unwrap();
    let (status, body) = request(tls, "POST", "/topics/sensors/sensor-7/t", "", "1").await;
    assert_eq!(status, 401, "no certificate, no credentials: {body}");

    let tls = tls_connect(&certified, https).await.unwrap();
    let (status, body) = request(tls, "PUT", "/topics/sensors/sensor-7/t", "", "21.5").await;
    assert_eq!(status, 204, "the certificate's CN is the user: {body}");
    let tls = tls_connect(&certified, https).await.unwrap();
    let (status, _) = request(tls, "POST", "/topics/sensors/other/t", "", "1").await;
    assert_eq!(status, 403, "and the ACL applies to it");

    let bearer = format!("Authorization: Bearer {ADMIN_TOKEN}\r\n");
    let tls = tls_connect(&anonymous, https).await.unwrap();
    let (status, body) = request(tls, "GET", "/topics/sensors/sensor-7/t", &bearer, "").await;
    assert_eq!((status, body.as_str()), (200, "21.5"), "a token over HTTPS");
    let plain = TcpStream::connect(gw.http).await.unwrap();
    let (status, body) = request(plain, "GET", "/topics/sensors/sensor-7/t", &bearer, "").await;
    assert_eq!(
        (status, body.as_str()),
        (200, "21.5"),
        "plain HTTP still served"
    );
}

#[tokio::test]
async fn a_required_client_certificate_is_enforced_in_the_handshake() {
    let pki = Pki::new("sensor-7");
    let gw = TestGateway::start_with(|c| pki.configure(c, true)).await;
    let refused = async {
        let mut tls = tls_connect(&pki.connector(false), gw.https.unwrap()).await?;
        // TLS 1.3 reports the refusal on the first read.
        tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await?;
        let mut buf = [0u8; 64];
        match tls.read(&mut buf).await? {
            0 => Err(std::io::Error::other("closed")),
            _ => Ok(()),
        }
    };
    assert!(refused.await.is_err(), "no certificate, no HTTPS");
    let tls = tls_connect(&pki.connector(true), gw.https.unwrap())
        .await
        .unwrap();
    assert_eq!(request(tls, "GET", "/healthz", "", "").await.0, 200);
}

/// CONNECT (MQTT 3.1.1, clean session) with no user name.
const CONNECT: [u8; 16] = [
    0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b't', b'1',
];

/// PUBLISH QoS 0, retained, to `topic`.
fn publish(topic: &str, payload: &str) -> Vec<u8> {
    let mut body = u16::try_from(topic.len()).unwrap().to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(payload.as_bytes());
    let mut packet = vec![0x31, u8::try_from(body.len()).unwrap()];
    packet.extend(body);
    packet
}

#[tokio::test]
async fn mqtt_over_tls_takes_the_certificate_as_the_user() {
    let pki = Pki::new("sensor-7");
    let gw = TestGateway::start_with(|c| {
        pki.configure(c, false);
        acl(c);
    })
    .await;
    let mqtts = gw.mqtts.expect("an MQTT over TLS listener");

    let mut anonymous = tls_connect(&pki.connector(false), mqtts).await.unwrap();
    anonymous.write_all(&CONNECT).await.unwrap();
    let mut connack = [0u8; 4];
    within("CONNACK", anonymous.read_exact(&mut connack))
        .await
        .unwrap();
    assert_eq!(
        connack,
        [0x20, 2, 0, 5],
        "anonymous refused: not authorized"
    );

    let mut sensor = tls_connect(&pki.connector(true), mqtts).await.unwrap();
    sensor.write_all(&CONNECT).await.unwrap();
    within("CONNACK", sensor.read_exact(&mut connack))
        .await
        .unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "the certificate logs in");
    sensor
        .write_all(&publish("sensors/other/t", "denied"))
        .await
        .unwrap();
    sensor
        .write_all(&publish("sensors/sensor-7/t", "19.0"))
        .await
        .unwrap();
    // PINGREQ/PINGRESP: both publishes were handled before it.
    sensor.write_all(&[0xC0, 0]).await.unwrap();
    let mut pong = [0u8; 2];
    within("PINGRESP", sensor.read_exact(&mut pong))
        .await
        .unwrap();
    assert_eq!(pong, [0xD0, 0]);

    let admin = |path: &str| gw.client.get(gw.url(path)).bearer_auth(ADMIN_TOKEN).send();
    let allowed = crate::support::eventually("the retained publish", || async {
        let r = admin("/topics/sensors/sensor-7/t").await.ok()?;
        (r.status() == 200).then_some(r.text().await.ok()?)
    })
    .await;
    assert_eq!(allowed, "19.0");
    assert_eq!(
        admin("/topics/sensors/other/t").await.unwrap().status(),
        404,
        "the publish outside the ACL was dropped"
    );
}

#[tokio::test]
async fn slow_clients_are_cut_off_and_connections_are_bounded() {
    let pki = Pki::new("sensor-7");
    let gw = TestGateway::start_with(|c| {
        pki.configure(c, false);
        c.http.header_timeout = Duration::from_millis(300);
        c.http.max_connections = 2;
    })
    .await;
    // Headers that never end, and a TLS handshake that never starts: both closed.
    let mut slow = TcpStream::connect(gw.http).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = within("the slow request is cut off", slow.read_to_end(&mut buf)).await;
    let mut silent = TcpStream::connect(gw.https.unwrap()).await.unwrap();
    let n = within(
        "the silent TLS client is cut off",
        silent.read(&mut [0u8; 16]),
    )
    .await;
    assert!(matches!(n, Ok(0) | Err(_)), "closed without a handshake");

    // Two idle connections take both slots: a third waits until one of them goes.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(gw.http).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 12];
        within("a served request", s.read_exact(&mut first))
            .await
            .unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
        held.push(s);
    }
    let mut third = TcpStream::connect(gw.http).await.unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let early =
        tokio::time::timeout(Duration::from_millis(100), third.read_to_end(&mut reply)).await;
    assert!(early.is_err(), "not served while both slots are held");
    drop(held);
    within(
        "the waiting connection is served",
        third.read_to_end(&mut reply),
    )
    .await
    .unwrap();
    assert!(reply.starts_with(b"HTTP/1.1 200"), "{reply:?}");
}
