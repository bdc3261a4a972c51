//! CoAP over DTLS (`coaps://`) with OpenSSL's own DTLS client over real UDP: PSK and
//! certificate handshakes with RFC 7252's CCM_8 suites, principals under the ACL, and a flood
//! of ClientHellos from spoofed loopback addresses that allocates nothing; and with an Mbed TLS
//! client sending a Connection ID, an observer that keeps its session from a new port.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
use openssl::pkey::PKey;
use openssl::ssl::{ErrorCode, Ssl, SslContext, SslMethod, SslOptions, SslStream, SslVerifyMode};
use openssl::x509::X509;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use topicgate::Config;
use topicgate::config::{AclAccess, AclEntry, PskEntry, TokenEntry};
use topicgate::dtls::Client;

use crate::support::{DEADLINE, TestGateway, eventually, metric};

const ADMIN_TOKEN: &str = "admin-token-0123456789";
const KEY: &str = "kitchen-secret-1";

/// A connected UDP socket as the library's byte stream: one datagram per read and write.
struct Udp(UdpSocket);

impl Read for Udp {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.recv(buf)
    }
}

impl Write for Udp {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.send(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How the client authenticates.
enum Credentials {
    Psk(&'static str, &'static str),
    /// A certificate and key (PEM), with the suite to ask for.
    Certificate(String, String),
}

/// A blocking DTLS client; its handshake and every wait end within `DEADLINE`.
struct DtlsClient {
    stream: SslStream<Udp>,
    mid: u16,
}

impl DtlsClient {
    fn connect(server: SocketAddr, credentials: Credentials, suite: &str) -> io::Result<Self> {
        Self::connect_within(server, credentials, suite, DEADLINE)
    }

    fn connect_within(
        server: SocketAddr,
        credentials: Credentials,
        suite: &str,
        within: Duration,
    ) -> io::Result<Self> {
        let from = "127.0.0.1:0";
        let socket = UdpSocket::bind(from)?;
        socket.connect(server)?;
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut b = SslContext::builder(SslMethod::dtls_client()).map_err(io::Error::other)?;
        b.set_cipher_list(suite).map_err(io::Error::other)?;
        b.set_verify(SslVerifyMode::NONE);
        match credentials {
            Credentials::Psk(identity, key) => b.set_psk_client_callback(move |_, _, id, psk| {
                id[..identity.len()].copy_from_slice(identity.as_bytes());
                id[identity.len()] = 0;
                psk[..key.len()].copy_from_slice(key.as_bytes());
                Ok(key.len())
            }),
            Credentials::Certificate(cert, key) => {
                let cert = X509::from_pem(cert.as_bytes()).map_err(io::Error::other)?;
                let key = PKey::private_key_from_pem(key.as_bytes()).map_err(io::Error::other)?;
                b.set_certificate(&cert).map_err(io::Error::other)?;
                b.set_private_key(&key).map_err(io::Error::other)?;
            }
        }
        b.set_options(SslOptions::NO_QUERY_MTU);
        let mut ssl = Ssl::new(&b.build()).map_err(io::Error::other)?;
        ssl.set_mtu(1200).map_err(io::Error::other)?;
        let mut stream = SslStream::new(ssl, Udp(socket)).map_err(io::Error::other)?;
        let deadline = Instant::now() + within;
        loop {
            match stream.connect() {
                Ok(()) => break,
                Err(e) if e.code() == ErrorCode::WANT_READ && Instant::now() < deadline => {}
                Err(e) => return Err(io::Error::other(e.to_string())),
            }
        }
        Ok(Self { stream, mid: 1 })
    }

    /// Sends a confirmable request and returns the response to it.
    fn call(&mut self, method: RequestType, path: &str, payload: &[u8]) -> io::Result<Packet> {
        self.call_with(method, path, payload, |_| {})
    }

    /// As [`Self::call`], with options added by `tweak`.
    fn call_with(
        &mut self,
        method: RequestType,
        path: &str,
        payload: &[u8],
        tweak: impl FnOnce(&mut Packet),
    ) -> io::Result<Packet> {
        self.mid += 1;
        let mut p = Packet::new();
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(method);
        p.header.message_id = self.mid;
        p.set_token(self.mid.to_be_bytes().to_vec());
        for segment in path.split('/') {
            p.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
        }
        p.payload = payload.to_vec();
        tweak(&mut p);
        let bytes = p
            .to_bytes()
            .map_err(|e| io::Error::other(format!("{e:?}")))?;
        self.stream.ssl_write(&bytes).map_err(io::Error::other)?;
        let deadline = Instant::now() + DEADLINE;
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            match self.stream.ssl_read(&mut buf) {
                Ok(n) => {
                    let r = Packet::from_bytes(&buf[..n])
                        .map_err(|e| io::Error::other(format!("{e:?}")))?;
                    if r.header.message_id == self.mid {
                        return Ok(r);
                    }
                }
                Err(e) if e.code() == ErrorCode::WANT_READ => {}
                Err(e) => return Err(io::Error::other(e.to_string())),
            }
        }
        Err(io::ErrorKind::TimedOut.into())
    }
}

fn code(p: &Packet) -> String {
    p.header.code.to_string()
}

fn configure(c: &mut Config) {
    c.auth.allow_anonymous = Some(false);
    c.auth.tokens.push(TokenEntry {
        name: "admin".to_owned(),
        token: ADMIN_TOKEN.to_owned(),
    });
    c.auth.psk.push(PskEntry {
        identity: "sensor-7".to_owned(),
        key: KEY.to_owned(),
        name: None,
    });
    for (user, topic) in [("admin", "#"), ("*", "sensors/%u/#")] {
        c.auth.acl.push(AclEntry {
            user: user.to_owned(),
            topic: topic.to_owned(),
            access: AclAccess::ReadWrite,
        });
    }
}

/// Runs blocking client work off the runtime that serves the gateway.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("the client does not panic")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psk_and_certificate_clients_act_as_their_principals() {
    let dir = tempfile::tempdir().unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&server_key)
        .unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "test CA");
    let ca = ca.self_signed(&ca_key).unwrap();
    let client_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "sensor-7");
    let client = params.clone().signed_by(&client_key, &ca, &ca_key).unwrap();
    std::fs::write(dir.path().join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.path().join("server.key"), server_key.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    let path = dir.path().to_owned();
    let gw = TestGateway::start_with(|c| {
        configure(c);
        c.tls.cert = Some(path.join("server.pem"));
        c.tls.key = Some(path.join("server.key"));
        c.tls.client_ca = Some(path.join("ca.pem"));
    })
    .await;
    let coaps = gw.coaps.expect("a coaps:// socket");
    let put = gw
        .client
        .put(gw.url("/topics/sensors/sensor-7/t"))
        .bearer_auth(ADMIN_TOKEN)
        .body("21")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 204);

    let (cert, key) = (client.pem(), client_key.serialize_pem());
    // The same name, signed by no CA the gateway trusts.
    let rogue_key = KeyPair::generate().unwrap();
    let rogue = params.self_signed(&rogue_key).unwrap();
    let rogue = (rogue.pem(), rogue_key.serialize_pem());
    let answers = blocking(move || {
        let mut answers = Vec::new();
        for (credentials, suite) in [
            (Credentials::Psk("sensor-7", KEY), "PSK-AES128-CCM8"),
            (
                Credentials::Certificate(cert, key),
                "ECDHE-ECDSA-AES128-CCM8",
            ),
        ] {
            let mut c = DtlsClient::connect(coaps, credentials, suite).unwrap();
            let got = c
                .call(RequestType::Get, "topics/sensors/sensor-7/t", b"")
                .unwrap();
            let denied = c.call(RequestType::Get, "topics/other/t", b"").unwrap();
            let put = c
                .call(RequestType::Put, "topics/sensors/sensor-7/t", b"22")
                .unwrap();
            answers.push((code(&got), got.payload, code(&denied), code(&put)));
        }
        let wrong = DtlsClient::connect_within(
            coaps,
            Credentials::Psk("sensor-7", "wrong-key-123456"),
            "PSK-AES128-CCM8",
            Duration::from_secs(2),
        );
        let unverified = DtlsClient::connect_within(
            coaps,
            Credentials::Certificate(rogue.0, rogue.1),
            "ECDHE-ECDSA-AES128-CCM8",
            Duration::from_secs(2),
        );
        (answers, wrong.is_err(), unverified.is_err())
    })
    .await;
    let (answers, wrong_refused, unverified_refused) = answers;
    assert_eq!(
        answers[0],
        (
            "2.05".to_owned(),
            b"21".to_vec(),
            "4.03".to_owned(),
            "2.04".to_owned()
        )
    );
    assert_eq!(
        answers[1],
        (
            "2.05".to_owned(),
            b"22".to_vec(),
            "4.03".to_owned(),
            "2.04".to_owned()
        )
    );
    assert!(wrong_refused, "a wrong key never completes the handshake");
    assert!(
        unverified_refused,
        "a client certificate no trusted CA signed fails the handshake"
    );
    let got = gw
        .client
        .get(gw.url("/topics/sensors/sensor-7/t"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(got.text().await.unwrap(), "22");
    assert_eq!(
        metric(&gw, "topicgate_dtls_handshake_results_total{reason=\"ok\"}").await,
        2.0
    );
}

/// The first datagram of a DTLS client: a ClientHello without cookie.
fn client_hello() -> Vec<u8> {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(sink.local_addr().unwrap()).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(1)))
        .unwrap();
    let mut b = SslContext::builder(SslMethod::dtls_client()).unwrap();
    b.set_psk_client_callback(|_, _, id, psk| {
        id[..2].copy_from_slice(b"x\0");
        psk[..8].copy_from_slice(b"12345678");
        Ok(8)
    });
    // A ClientHello in one record, as the gateway's stateless check reads only those (as
    // OpenSSL's own DTLSv1_listen does); without an MTU the library cuts records at 256 bytes.
    b.set_options(SslOptions::NO_QUERY_MTU);
    let mut ssl = Ssl::new(&b.build()).unwrap();
    ssl.set_mtu(1200).unwrap();
    let mut stream = SslStream::new(ssl, Udp(socket)).unwrap();
    let _ = stream.connect();
    let mut buf = [0u8; 2048];
    let n = sink.recv(&mut buf).unwrap();
    buf[..n].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_flood_from_spoofed_addresses_holds_nothing_and_clients_are_served() {
    let gw = TestGateway::start_with(|c| {
        configure(c);
        c.coap.dtls_max_handshakes = 4;
    })
    .await;
    let coaps = gw.coaps.expect("a coaps:// socket");
    // Spawned now, so it handshakes while the flood runs.
    let legit = tokio::task::spawn_blocking(move || {
        let credentials = Credentials::Psk("sensor-7", KEY);
        let mut c = DtlsClient::connect(coaps, credentials, "PSK-AES128-CCM8").unwrap();
        code(
            &c.call(RequestType::Get, "topics/sensors/sensor-7/none", b"")
                .unwrap(),
        )
    });
    // 1200 ClientHellos from 600 loopback addresses that never read the answer, as spoofed
    // sources would not; in batches of 100, each waited for, so that the socket's receive
    // buffer (about 200 datagrams) does not drop them before they are counted.
    let hello = blocking(client_hello).await;
    assert!(
        topicgate::dtls::hello::parse(&hello).is_some(),
        "{hello:02x?}"
    );
    let sockets: Vec<Arc<UdpSocket>> = (0..600)
        .map(|i| {
            Arc::new(UdpSocket::bind((format!("127.1.{}.{}", i / 250, 1 + i % 250), 0)).unwrap())
        })
        .collect();
    let mut sent = 0;
    for batch in sockets.chunks(100).cycle().take(12) {
        let (batch, hello) = (batch.to_vec(), hello.clone());
        blocking(move || {
            for s in batch {
                s.send_to(&hello, coaps).unwrap();
            }
        })
        .await;
        sent += 100;
        eventually("the flood answered", || async {
            let answered = metric(&gw, "topicgate_dtls_hello_verify_requests_total").await;
            (answered >= f64::from(sent) * 0.9).then_some(())
        })
        .await;
    }
    let answer = legit.await.expect("the client does not panic");
    assert_eq!(
        answer, "4.04",
        "the legitimate client is served during the flood"
    );
    // The flood left nothing behind: the legitimate session is all there is.
    assert_eq!(metric(&gw, "topicgate_dtls_handshakes").await, 0.0);
    assert_eq!(metric(&gw, "topicgate_dtls_sessions").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observation_ends_with_its_session() {
    let gw = TestGateway::start_with(configure).await;
    let coaps = gw.coaps.expect("a coaps:// socket");
    let observer = blocking(move || {
        let credentials = Credentials::Psk("sensor-7", KEY);
        let mut c = DtlsClient::connect(coaps, credentials, "PSK-AES128-CCM8").unwrap();
        let r = c
            .call_with(RequestType::Get, "topics/sensors/sensor-7/obs", b"", |p| {
                p.add_option(CoapOption::Observe, vec![]);
            })
            .unwrap();
        assert_eq!(code(&r), "2.05");
        c
    })
    .await;
    eventually("the observation", || async {
        (metric(&gw, "topicgate_coap_observers").await == 1.0).then_some(())
    })
    .await;
    // close_notify: the session ends, and its observation with it, without a notification.
    blocking(move || {
        let mut c = observer;
        let _ = c.stream.shutdown();
    })
    .await;
    eventually("the observation ended", || async {
        (metric(&gw, "topicgate_coap_observers").await == 0.0).then_some(())
    })
    .await;
    assert_eq!(metric(&gw, "topicgate_dtls_sessions").await, 0.0);
}

/// A blocking CoAP client over the gateway's own DTLS library, with a Connection ID: its
/// session state outlives its socket, as a client behind a NAT that rebinds its port.
struct CidClient {
    socket: UdpSocket,
    server: SocketAddr,
    dtls: Client,
    mid: u16,
    /// Packets read but not yet asked for.
    pending: Vec<Packet>,
}

impl CidClient {
    fn connect(server: SocketAddr) -> Self {
        let dtls = Client::psk("sensor-7", KEY.as_bytes(), true).unwrap();
        let mut c = Self {
            socket: Self::socket(server),
            server,
            dtls,
            mid: 1,
            pending: Vec::new(),
        };
        let deadline = Instant::now() + DEADLINE;
        while !c.dtls.handshake().unwrap() {
            assert!(Instant::now() < deadline, "no handshake");
            c.flush();
            c.receive();
        }
        assert!(
            c.dtls.has_connection_id(),
            "the server agreed to a Connection ID"
        );
        c
    }

    fn socket(server: SocketAddr) -> UdpSocket {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(server).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        socket
    }

    /// Goes on from a new socket, so a new port, with the same session.
    fn rebind(&mut self) {
        self.socket = Self::socket(self.server);
    }

    /// Sends what the library wrote; returns the datagrams.
    fn flush(&mut self) -> Vec<Vec<u8>> {
        let datagrams = self.dtls.transmit();
        for d in &datagrams {
            self.socket.send(d).unwrap();
        }
        datagrams
    }

    /// Waits up to the socket's read timeout for one datagram and hands it to the library.
    fn receive(&mut self) {
        let mut buf = [0u8; 2048];
        if let Ok(n) = self.socket.recv(&mut buf) {
            self.dtls.receive(&buf[..n]);
        }
    }

    /// Seals and sends a packet; returns the datagrams it went in.
    fn send(&mut self, p: &Packet) -> Vec<Vec<u8>> {
        self.dtls.send(&p.to_bytes().unwrap()).unwrap();
        self.flush()
    }

    /// A confirmable request; returns the datagrams it went in.
    fn request(&mut self, path: &str, tweak: impl FnOnce(&mut Packet)) -> Vec<Vec<u8>> {
        self.mid += 1;
        let mut p = Packet::new();
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(RequestType::Get);
        p.header.message_id = self.mid;
        p.set_token(self.mid.to_be_bytes().to_vec());
        for segment in path.split('/') {
            p.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
        }
        tweak(&mut p);
        self.send(&p)
    }

    /// The next packet `pick` takes, within `DEADLINE`; confirmable ones are acknowledged.
    fn next(&mut self, what: &str, pick: impl Fn(&Packet) -> bool) -> Packet {
        let deadline = Instant::now() + DEADLINE;
        loop {
            for p in self.dtls.read().unwrap() {
                let p = Packet::from_bytes(&p).unwrap();
                if p.header.get_type() == MessageType::Confirmable {
                    let mut ack = Packet::new();
                    ack.header.set_type(MessageType::Acknowledgement);
                    ack.header.message_id = p.header.message_id;
                    self.send(&ack);
                }
                self.pending.push(p);
            }
            if let Some(i) = self.pending.iter().position(&pick) {
                return self.pending.remove(i);
            }
            assert!(Instant::now() < deadline, "no {what}");
            self.receive();
        }
    }

    /// The response to the last request (each request has a token of its own).
    fn response(&mut self) -> Packet {
        let token = self.mid.to_be_bytes().to_vec();
        self.next("response", |p| p.get_token() == token.as_slice())
    }

    /// The next notification with `payload` for the observation with `token`.
    fn notification(&mut self, token: &[u8], payload: &[u8]) -> Packet {
        self.next("notification", |p| {
            p.get_token() == token && p.payload == payload && p.get_observe_value().is_some()
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_keeps_its_notifications_across_a_port_change_with_a_connection_id() {
    let gw = TestGateway::start_with(configure).await;
    let coaps = gw.coaps.expect("a coaps:// socket");
    let publish = |value: &'static str| {
        let gw = &gw;
        async move {
            let put = gw
                .client
                .put(gw.url("/topics/sensors/sensor-7/cid"))
                .bearer_auth(ADMIN_TOKEN)
                .body(value)
                .send()
                .await
                .unwrap();
            assert_eq!(put.status(), 204);
        }
    };
    publish("1").await;
    let (mut c, token) = blocking(move || {
        let mut c = CidClient::connect(coaps);
        c.request("topics/sensors/sensor-7/cid", |p| {
            p.add_option(CoapOption::Observe, vec![]);
        });
        let r = c.response();
        assert_eq!(
            (code(&r), r.payload.as_slice()),
            ("2.05".to_owned(), &b"1"[..])
        );
        (c, r.get_token().to_vec())
    })
    .await;
    eventually("the observation", || async {
        (metric(&gw, "topicgate_coap_observers").await == 1.0).then_some(())
    })
    .await;

    // The client's NAT gives it a new port; its next record carries the Connection ID.
    let (mut c, sent) = blocking(move || {
        c.rebind();
        let sent = c.request("topics/sensors/sensor-7/none", |_| {});
        assert_eq!(code(&c.response()), "4.04");
        (c, sent)
    })
    .await;
    assert_eq!(
        metric(&gw, "topicgate_dtls_address_changes_total").await,
        1.0
    );
    publish("2").await;
    let observation = token.clone();
    let mut c = blocking(move || {
        c.notification(&observation, b"2");
        c
    })
    .await;

    // From a third port: that record again (a replay), and a record with the session's
    // Connection ID whose ciphertext was changed. Neither takes the session away.
    let intruder = UdpSocket::bind("127.0.0.1:0").unwrap();
    intruder.set_nonblocking(true).unwrap();
    for d in &sent {
        intruder.send_to(d, coaps).unwrap();
    }
    c.dtls.send(b"\x40\x00\x12\x34").unwrap();
    let mut forged = c.dtls.transmit().remove(0);
    let last = forged.len() - 1;
    forged[last] ^= 1;
    intruder.send_to(&forged, coaps).unwrap();
    // A request after them: once answered, the gateway has read both (one socket, in order).
    let mut c = blocking(move || {
        c.request("topics/sensors/sensor-7/none", |_| {});
        assert_eq!(code(&c.response()), "4.04");
        c
    })
    .await;
    publish("3").await;
    blocking(move || c.notification(&token, b"3")).await;
    let mut buf = [0u8; 2048];
    assert!(
        intruder.recv_from(&mut buf).is_err(),
        "nothing goes to the intruder"
    );
    assert_eq!(
        metric(&gw, "topicgate_dtls_address_changes_total").await,
        1.0
    );
}
