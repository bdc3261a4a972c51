//! The MQTT session rules, byte by byte over real sockets: `$` topics and `$SYS`, Session
//! Expiry, UNSUBACK, DISCONNECT forms and wills, delivery QoS, Maximum Packet Size, No Local and
//! client ids.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use topicgate::config::{AclAccess, AclEntry};

use crate::mqtt_raw::{Version, connect, packet, props, publish, string};
use crate::support::{TestGateway, eventually, within};

/// A client that speaks raw bytes and reads whole packets.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    /// Connects and returns the client with its CONNACK.
    async fn open(gw: &TestGateway, connect: Vec<u8>) -> (Self, Vec<u8>) {
        let stream = TcpStream::connect(gw.mqtt).await.unwrap();
        Self::open_on(stream, connect).await
    }

    /// [`Raw::open`] on a connected stream.
    async fn open_on(stream: TcpStream, connect: Vec<u8>) -> (Self, Vec<u8>) {
        let mut raw = Self {
            stream,
            buf: Vec::new(),
        };
        raw.send(&connect).await;
        let connack = raw.next().await.expect("a CONNACK");
        (raw, connack)
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next whole packet, or `None` when the server closed the connection.
    async fn next(&mut self) -> Option<Vec<u8>> {
        within("a packet from the server", async {
            loop {
                if let Some(len) = whole(&self.buf) {
                    return Some(self.buf.drain(..len).collect());
                }
                let mut chunk = [0u8; 4096];
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
    }

    /// The next packet that is not a `$SYS` publish.
    async fn next_not_sys(&mut self) -> Option<Vec<u8>> {
        loop {
            let p = self.next().await?;
            if !(p[0] >> 4 == 3 && topic_of(&p).starts_with("$SYS")) {
                return Some(p);
            }
        }
    }

    /// Whether nothing arrives before a PINGRESP: what was sent before the PINGREQ was dropped.
    async fn nothing_before_pingresp(&mut self) -> bool {
        self.send(&[0xC0, 0]).await;
        self.next().await == Some(vec![0xD0, 0])
    }
}

/// The length of the first whole packet in `buf`.
fn whole(buf: &[u8]) -> Option<usize> {
    let mut len = 0usize;
    for i in 1..5 {
        let b = *buf.get(i)?;
        len |= usize::from(b & 0x7F) << (7 * (i - 1));
        if b & 0x80 == 0 {
            let total = i + 1 + len;
            return (buf.len() >= total).then_some(total);
        }
    }
    None
}

/// The topic of a PUBLISH packet.
fn topic_of(p: &[u8]) -> String {
    let mut at = 1;
    while p[at] & 0x80 != 0 {
        at += 1;
    }
    at += 1;
    let len = usize::from(u16::from_be_bytes([p[at], p[at + 1]]));
    String::from_utf8_lossy(&p[at + 2..at + 2 + len]).into_owned()
}

/// An MQTT 5 CONNECT with raw CONNECT properties.
fn connect_v5(flags: u8, client_id: &[u8], raw_props: &[u8]) -> Vec<u8> {
    let mut body = string(b"MQTT");
    body.extend_from_slice(&[5, flags, 0, 60]);
    body.extend(props(Version::V5, raw_props));
    body.extend(string(client_id));
    packet(0x10, &body)
}

/// A SUBSCRIBE with packet id 1 of filters with their option bytes.
fn subscribe(version: Version, raw_props: &[u8], filters: &[(&[u8], u8)]) -> Vec<u8> {
    let mut body = 1u16.to_be_bytes().to_vec();
    body.extend(props(version, raw_props));
    for (f, options) in filters {
        body.extend(string(f));
        body.push(*options);
    }
    packet(0x82, &body)
}

fn unsubscribe(version: Version, filters: &[&[u8]]) -> Vec<u8> {
    crate::mqtt_raw::unsubscribe(version, 0xA2, filters)
}

#[tokio::test]
async fn sys_counts_every_publish_and_packet_both_ways() {
    let gw = TestGateway::start_with(|c| c.mqtt.sys_interval = Duration::from_millis(100)).await;
    let (mut sub, _) = Raw::open(&gw, connect(Version::V311, 0x02, b"count-sub", &[])).await;
    sub.send(&subscribe(Version::V311, &[], &[(b"count/x", 1)]))
        .await;
    assert_eq!(sub.next_not_sys().await.unwrap(), [0x90, 3, 0, 1, 1]);
    let (mut publisher, _) = Raw::open(&gw, connect(Version::V311, 0x02, b"count-pub", &[])).await;
    const N: u16 = 25;
    let before = eventually("$SYS/broker/publish/messages/received", || {
        sys_figure(&gw, "publish/messages/received")
    })
    .await;
    for id in 1..=N {
        publisher
            .send(&publish(Version::V311, 0x32, b"count/x", Some(id), b"n"))
            .await;
        assert_eq!(publisher.next().await.unwrap()[0], 0x40, "PUBACK");
        let delivered = sub.next_not_sys().await.unwrap();
        assert_eq!(delivered[0], 0x32);
        let id = &delivered[delivered.len() - 3..delivered.len() - 1];
        sub.send(&[0x40, 2, id[0], id[1]]).await;
    }
    // Each connection adds its counts once per batch; they all arrive.
    for (name, at_least) in [
        ("publish/messages/received", before + u64::from(N)),
        ("publish/messages/sent", u64::from(N)),
        ("messages/received", 2 * u64::from(N)),
        ("messages/sent", 2 * u64::from(N)),
        ("bytes/received", 10 * u64::from(N)),
        ("bytes/sent", 10 * u64::from(N)),
    ] {
        eventually(
            &format!("$SYS/broker/{name} to reach {at_least}"),
            || async { sys_figure(&gw, name).await.filter(|&n| n >= at_least) },
        )
        .await;
    }
}

#[tokio::test]
async fn dollar_filters_are_granted_and_sys_statistics_arrive_everywhere() {
    let gw = TestGateway::start_with(|c| c.mqtt.sys_interval = Duration::from_millis(200)).await;
    let (mut c, connack) = Raw::open(&gw, connect(Version::V311, 0x02, b"sys", &[])).await;
    assert_eq!(connack, [0x20, 2, 0, 0]);
    // What MQTT Explorer sends on connect, with ordinary filters mixed in.
    c.send(&subscribe(
        Version::V311,
        &[],
        &[(b"$SYS/#", 0), (b"a/#", 1), (b"$foo/#", 0)],
    ))
    .await;
    assert_eq!(c.next().await.unwrap(), [0x90, 5, 0, 1, 0, 1, 0]);
    let mut seen = Vec::new();
    // The gateway's own figures come last in each round.
    while !seen
        .iter()
        .any(|t: &String| t == "$SYS/broker/coap/observers/count")
    {
        let p = c.next().await.expect("still connected");
        seen.push(topic_of(&p));
    }
    assert!(
        seen.iter().all(|t| t.starts_with("$SYS/broker/")),
        "{seen:?}"
    );
    assert!(seen.iter().any(|t| t == "$SYS/broker/clients/connected"));
    assert!(
        seen.iter()
            .any(|t| t == "$SYS/broker/load/messages/received/1min")
    );

    // Readable over HTTP like any topic, never writable.
    let version = gw.get("/topics/%24SYS/broker/version").await;
    assert_eq!(version.status(), 200);
    assert!(version.text().await.unwrap().starts_with("topicgate "));
    let listing = gw.get("/topics/%24SYS/broker/%23").await;
    assert_eq!(listing.status(), 200);
    assert!(
        listing
            .text()
            .await
            .unwrap()
            .contains("$SYS/broker/subscriptions/count")
    );
    assert_eq!(
        gw.post("/topics/%24SYS/broker/version", "x").await.status(),
        400
    );
}

#[tokio::test]
async fn dollar_topics_reach_only_dollar_filters() {
    let gw = TestGateway::start_with(|c| c.mqtt.sys_interval = Duration::ZERO).await;
    let (mut all, _) = Raw::open(&gw, connect(Version::V311, 0x02, b"all", &[])).await;
    all.send(&subscribe(Version::V311, &[], &[(b"#", 0), (b"+/x", 0)]))
        .await;
    assert_eq!(all.next().await.unwrap()[0], 0x90);
    let (mut custom, _) = Raw::open(&gw, connect(Version::V311, 0x02, b"custom", &[])).await;
    custom
        .send(&subscribe(Version::V311, &[], &[(b"$custom/#", 0)]))
        .await;
    assert_eq!(custom.next().await.unwrap()[0], 0x90);

    let (mut publisher, _) = Raw::open(&gw, connect(Version::V311, 0x02, b"pub", &[])).await;
    publisher
        .send(&publish(Version::V311, 0x32, b"$custom/x", Some(7), b"d"))
        .await;
    assert_eq!(publisher.next().await.unwrap(), [0x40, 2, 0, 7], "accepted");
    let p = custom.next().await.unwrap();
    assert_eq!(topic_of(&p), "$custom/x");
    // A publish to $SYS is dropped (acknowledged: MQTT 3.1.1 cannot say no), the client stays.
    publisher
        .send(&publish(Version::V311, 0x32, b"$SYS/fake", Some(8), b"d"))
        .await;
    assert_eq!(publisher.next().await.unwrap(), [0x40, 2, 0, 8]);
    publisher
        .send(&publish(Version::V311, 0x30, b"plain/x", None, b"d"))
        .await;
    let p = all.next().await.unwrap();
    assert_eq!(
        topic_of(&p),
        "plain/x",
        "the $ topics never reached '#' or '+/x'"
    );
    assert_eq!(gw.get("/topics/%24SYS/fake").await.status(), 404);
}

#[tokio::test]
async fn session_expiry_keeps_a_session_as_long_as_asked() {
    let gw = TestGateway::start().await;
    // Session Expiry Interval property (0x11) of `secs`.
    let expiry = |secs: u32| {
        let mut p = vec![0x11];
        p.extend_from_slice(&secs.to_be_bytes());
        p
    };
    let present = |connack: &[u8]| connack[2] & 1 == 1;

    // Clean start with an expiry: the session outlives the connection, queued messages too.
    let (mut c, connack) = Raw::open(&gw, connect_v5(0x02, b"exp", &expiry(60))).await;
    assert!(!present(&connack));
    c.send(&subscribe(Version::V5, &[], &[(b"exp/x", 1)])).await;
    assert_eq!(c.next().await.unwrap()[0], 0x90);
    c.send(&[0xE0, 0]).await;
    assert_eq!(c.next().await, None);
    assert_eq!(
        gw.post("/topics/exp/x?qos=1", "while away").await.status(),
        204
    );
    let (mut c, connack) = Raw::open(&gw, connect_v5(0x00, b"exp", &expiry(0))).await;
    assert!(present(&connack), "resumed: {connack:?}");
    let p = c.next().await.unwrap();
    assert_eq!((p[0], topic_of(&p)), (0x32, "exp/x".to_owned()));
    c.send(&[0xE0, 0]).await;
    assert_eq!(c.next().await, None);
    // Expiry 0 on that connection: the session ended with it.
    let (_c, connack) = Raw::open(&gw, connect_v5(0x00, b"exp", &expiry(0))).await;
    assert!(!present(&connack), "{connack:?}");

    // An expiry of one second: gone once it has passed.
    let (mut c, _) = Raw::open(&gw, connect_v5(0x02, b"short", &expiry(1))).await;
    c.send(&[0xE0, 0]).await;
    assert_eq!(c.next().await, None);
    eventually("the session expires", || async {
        let (mut c, connack) = Raw::open(&gw, connect_v5(0x00, b"short", &expiry(1))).await;
        c.send(&[0xE0, 0]).await;
        // A probe that finds the session renews it for another second: wait it out between
        // probes, so the one that finds it gone says so.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        (!present(&connack)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn every_unsubscribe_is_acknowledged_with_a_code_per_filter() {
    let gw = TestGateway::start().await;
    let (mut c, _) = Raw::open(&gw, connect_v5(0x02, b"unsub5", &[])).await;
    c.send(&subscribe(Version::V5, &[], &[(b"held", 0)])).await;
    assert_eq!(c.next().await.unwrap()[0], 0x90);
    c.send(&unsubscribe(Version::V5, &[b"held", b"never"]))
        .await;
    assert_eq!(c.next().await.unwrap(), [0xB0, 5, 0, 1, 0, 0x00, 0x11]);
    let (mut c, _) = Raw::open(&gw, connect(Version::V311, 0x02, b"unsub4", &[])).await;
    c.send(&unsubscribe(Version::V311, &[b"never"])).await;
    assert_eq!(c.next().await.unwrap(), [0xB0, 2, 0, 1]);
}

#[tokio::test]
async fn disconnect_forms_and_the_will() {
    let gw = TestGateway::start().await;
    let (mut watch, _) = Raw::open(&gw, connect(Version::V311, 0x02, b"will-watch", &[])).await;
    watch
        .send(&subscribe(Version::V311, &[], &[(b"will/#", 0)]))
        .await;
    assert_eq!(watch.next().await.unwrap()[0], 0x90);
    // CONNECT with a will "gone" on will/<id>, MQTT 5: empty will properties.
    let with_will = |id: &[u8]| {
        let mut rest = vec![0];
        rest.extend(string(&[b"will/".as_slice(), id].concat()));
        rest.extend(string(b"gone"));
        will_connect(id, &rest)
    };
    // DISCONNECT with no reason byte, and with reason 0: closed at once, no will.
    for (id, bye) in [(b"a".as_slice(), vec![0xE0, 0]), (b"b", vec![0xE0, 1, 0])] {
        let (mut c, connack) = Raw::open(&gw, with_will(id)).await;
        assert_eq!(connack[3], 0, "accepted");
        c.send(&bye).await;
        assert_eq!(c.next().await, None, "closed at once");
    }
    // Reason 0x04: disconnect with the will.
    let (mut c, _) = Raw::open(&gw, with_will(b"c")).await;
    c.send(&[0xE0, 1, 0x04]).await;
    assert_eq!(c.next().await, None);
    let p = watch.next().await.unwrap();
    assert_eq!(
        topic_of(&p),
        "will/c",
        "only the will asked for is published"
    );
    // A connection that just drops publishes its will too.
    let (c, _) = Raw::open(&gw, with_will(b"d")).await;
    drop(c);
    assert_eq!(topic_of(&watch.next().await.unwrap()), "will/d");
}

/// An MQTT 5 CONNECT (clean start, will flag) whose will fields `rest` follow the client id.
fn will_connect(id: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut body = string(b"MQTT");
    body.extend_from_slice(&[5, 0x06, 0, 60, 0]);
    body.extend(string(id));
    body.extend_from_slice(rest);
    packet(0x10, &body)
}

#[tokio::test]
async fn delivery_qos_is_the_lower_of_published_and_granted() {
    let gw = TestGateway::start().await;
    let (mut c, _) = Raw::open(&gw, connect(Version::V311, 0x02, b"qos", &[])).await;
    c.send(&subscribe(Version::V311, &[], &[(b"q/#", 2)])).await;
    assert_eq!(c.next().await.unwrap(), [0x90, 3, 0, 1, 2]);
    assert_eq!(gw.post("/topics/q/one?qos=1", "1").await.status(), 204);
    let p = c.next().await.unwrap();
    assert_eq!(p[0], 0x32, "QoS 1, not the granted 2: {p:?}");
    assert_eq!(gw.post("/topics/q/zero", "0").await.status(), 204);
    assert_eq!(c.next().await.unwrap()[0], 0x30);
    // A retained message goes to a new subscriber at its own QoS too, not always at 0.
    assert_eq!(gw.put("/topics/r/kept?qos=1", "k").await.status(), 204);
    let (mut late, _) = Raw::open(&gw, connect(Version::V311, 0x02, b"late", &[])).await;
    late.send(&subscribe(Version::V311, &[], &[(b"r/#", 2)]))
        .await;
    assert_eq!(late.next().await.unwrap()[0], 0x90);
    assert_eq!(late.next().await.unwrap()[0], 0x33, "retained, QoS 1");
}

#[tokio::test]
async fn the_clients_maximum_packet_size_is_honoured() {
    let gw = TestGateway::start().await;
    // Maximum Packet Size (0x27) 64 bytes.
    let (mut c, connack) = Raw::open(&gw, connect_v5(0x02, b"small", &[0x27, 0, 0, 0, 64])).await;
    assert_eq!(connack[3], 0);
    c.send(&subscribe(Version::V5, &[], &[(b"m/#", 0)])).await;
    assert_eq!(c.next().await.unwrap()[0], 0x90);
    assert_eq!(
        gw.post("/topics/m/big", vec![b'x'; 200]).await.status(),
        204
    );
    assert_eq!(gw.post("/topics/m/small", "fits").await.status(), 204);
    let p = c.next().await.unwrap();
    assert_eq!(
        topic_of(&p),
        "m/small",
        "the one over 64 bytes was not sent"
    );
}

#[tokio::test]
async fn no_local_keeps_a_clients_own_messages_from_it() {
    let gw = TestGateway::start().await;
    let (mut c, _) = Raw::open(&gw, connect_v5(0x02, b"nl", &[])).await;
    // Options 0x04: No Local, QoS 0.
    c.send(&subscribe(Version::V5, &[], &[(b"nl/#", 0x04)]))
        .await;
    assert_eq!(c.next().await.unwrap()[0], 0x90);
    c.send(&publish_v5(b"nl/own", b"mine")).await;
    assert_eq!(gw.post("/topics/nl/other", "theirs").await.status(), 204);
    let p = c.next().await.unwrap();
    assert_eq!(topic_of(&p), "nl/other");
    assert!(c.nothing_before_pingresp().await);
}

fn rule(user: &str, topic: &str, access: AclAccess) -> AclEntry {
    AclEntry {
        user: user.to_owned(),
        topic: topic.to_owned(),
        access,
    }
}

fn publish_v5(topic: &[u8], payload: &[u8]) -> Vec<u8> {
    crate::mqtt_raw::publish(Version::V5, 0x30, topic, None, payload)
}

#[tokio::test]
async fn an_empty_client_id_is_judged_by_each_connect_alone() {
    let gw = TestGateway::start().await;
    // MQTT 3.1.1: an empty id needs a clean session.
    let (_, refused) = Raw::open(&gw, connect(Version::V311, 0x00, b"", &[])).await;
    assert_eq!(refused, [0x20, 2, 0, 2]);
    let (mut c, accepted) = Raw::open(&gw, connect(Version::V311, 0x02, b"", &[])).await;
    assert_eq!(accepted, [0x20, 2, 0, 0]);
    assert!(c.nothing_before_pingresp().await);
    // MQTT 5: the server assigns one (Assigned Client Identifier, 0x12).
    let (_, connack) = Raw::open(&gw, connect_v5(0x02, b"", &[])).await;
    assert!(connack.contains(&0x12), "{connack:?}");
}

#[tokio::test]
async fn a_subscriber_can_read_the_next_message_after_a_refused_filter() {
    let gw = TestGateway::start_with(|c| {
        c.auth.acl = vec![
            rule("*", "#", AclAccess::ReadWrite),
            rule("*", "secret/#", AclAccess::Deny),
        ];
    })
    .await;
    let (mut c, _) = Raw::open(&gw, connect_v5(0x02, b"deny", &[])).await;
    c.send(&subscribe(
        Version::V5,
        &[],
        &[(b"secret/x", 0), (b"open/#", 0), (b"#", 0)],
    ))
    .await;
    assert_eq!(c.next().await.unwrap(), [0x90, 6, 0, 1, 0, 0x87, 0, 0]);
    assert_eq!(gw.post("/topics/secret/y", "s").await.status(), 401);
    assert_eq!(gw.post("/topics/open/y", "o").await.status(), 204);
    let p = c.next_not_sys().await.unwrap();
    assert_eq!(topic_of(&p), "open/y");
}

#[tokio::test]
async fn mqtt_over_websocket_talks_with_tcp_clients() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let gw = TestGateway::start().await;
    let mut request = format!("ws://{}/mqtt", gw.http)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "mqtt".parse().unwrap());
    let tcp = TcpStream::connect(gw.http).await.unwrap();
    let (mut ws, response) = within("the upgrade", tokio_tungstenite::client_async(request, tcp))
        .await
        .unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "mqtt");
    async fn next<S>(ws: &mut S) -> Vec<u8>
    where
        S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
            + Unpin,
    {
        loop {
            match within("a WebSocket message", ws.next()).await {
                Some(Ok(Message::Binary(b))) => return b.to_vec(),
                Some(Ok(_)) => {}
                other => panic!("{other:?}"),
            }
        }
    }
    // One message holding CONNECT and SUBSCRIBE: packets are a byte stream across messages.
    let mut both = connect(Version::V311, 0x02, b"ws-client", &[]);
    both.extend(subscribe(Version::V311, &[], &[(b"ws/#", 0)]));
    ws.send(Message::Binary(both.into())).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 9 {
        got.extend(next(&mut ws).await);
    }
    assert_eq!(got, [0x20, 2, 0, 0, 0x90, 3, 0, 1, 0]);

    let (mut tcp, _) = Raw::open(&gw, connect(Version::V311, 0x02, b"tcp-client", &[])).await;
    tcp.send(&subscribe(Version::V311, &[], &[(b"ws/#", 0)]))
        .await;
    assert_eq!(tcp.next().await.unwrap()[0], 0x90);
    tcp.send(&publish(Version::V311, 0x30, b"ws/from-tcp", None, b"1"))
        .await;
    let p = next(&mut ws).await;
    assert_eq!(topic_of(&p), "ws/from-tcp");
    // A packet split over two messages.
    let from_ws = publish(Version::V311, 0x30, b"ws/from-ws", None, b"2");
    let (a, b) = from_ws.split_at(5);
    ws.send(Message::Binary(a.to_vec().into())).await.unwrap();
    ws.send(Message::Binary(b.to_vec().into())).await.unwrap();
    loop {
        let p = tcp.next().await.unwrap();
        if topic_of(&p) == "ws/from-ws" {
            break;
        }
    }
    // Without the subprotocol, or without an upgrade, the endpoint says what it expects.
    let plain = gw.get("/mqtt").await;
    assert_eq!(plain.status(), 400);
    assert!(plain.text().await.unwrap().contains("WebSocket"));
}

/// The value of the Message Expiry Interval (0x02) of an MQTT 5 PUBLISH at QoS 0.
fn expiry_of(p: &[u8]) -> Option<u32> {
    let mut at = 1;
    while p[at] & 0x80 != 0 {
        at += 1;
    }
    at += 1;
    let topic_len = usize::from(u16::from_be_bytes([p[at], p[at + 1]]));
    at += 2 + topic_len;
    if p[0] & 0x06 != 0 {
        at += 2;
    }
    let props_len = usize::from(p[at]);
    let props = &p[at + 1..at + 1 + props_len];
    props
        .windows(5)
        .find(|w| w[0] == 0x02)
        .map(|w| u32::from_be_bytes([w[1], w[2], w[3], w[4]]))
}

#[tokio::test]
async fn a_kept_session_gets_its_messages_with_the_time_they_have_left() {
    let gw = TestGateway::start().await;
    let (mut c, _) = Raw::open(&gw, connect_v5(0x02, b"away", &[0x11, 0, 0, 0, 60])).await;
    c.send(&subscribe(Version::V5, &[], &[(b"away/#", 0)]))
        .await;
    assert_eq!(c.next().await.unwrap()[0], 0x90);
    c.send(&[0xE0, 0]).await;
    assert_eq!(c.next().await, None);
    // Published with 3 s to live while the client is away; read more than a second later.
    let (mut p, _) = Raw::open(&gw, connect_v5(0x02, b"away-pub", &[])).await;
    p.send(&crate::mqtt_raw::publish_with(
        Version::V5,
        0x30,
        b"away/x",
        None,
        &[0x02, 0, 0, 0, 3],
        b"soon gone",
    ))
    .await;
    assert!(p.nothing_before_pingresp().await);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (mut c, connack) = Raw::open(&gw, connect_v5(0x00, b"away", &[])).await;
    assert_eq!(connack[2] & 1, 1, "resumed");
    let got = c.next().await.unwrap();
    assert_eq!(topic_of(&got), "away/x");
    let left = expiry_of(&got).expect("the expiry is sent");
    assert!((1..=2).contains(&left), "{left} s left of 3, counted once");
}

/// A publish that only a kept session's subscription matches is kept for it, from a client
/// and from HTTP alike, and nothing else is.
#[tokio::test]
async fn messages_wait_for_a_session_that_is_away_and_only_for_its_filters() {
    let gw = TestGateway::start().await;
    let (mut c, _) = Raw::open(&gw, connect(Version::V311, 0x00, b"away311", &[])).await;
    c.send(&subscribe(Version::V311, &[], &[(b"kept/+", 1)]))
        .await;
    assert_eq!(c.next().await.unwrap()[0], 0x90);
    c.send(&[0xE0, 0]).await;
    assert_eq!(c.next().await, None);
    assert_eq!(gw.post("/topics/kept/http?qos=1", "h").await.status(), 204);
    assert_eq!(
        gw.post("/topics/unread/http?qos=1", "u").await.status(),
        204
    );
    let (mut p, _) = Raw::open(&gw, connect(Version::V311, 0x02, b"away-pub311", &[])).await;
    p.send(&crate::mqtt_raw::publish_with(
        Version::V311,
        0x30,
        b"kept/mqtt",
        None,
        &[],
        b"m",
    ))
    .await;
    assert!(p.nothing_before_pingresp().await);

    let (mut c, connack) = Raw::open(&gw, connect(Version::V311, 0x00, b"away311", &[])).await;
    assert_eq!(connack, [0x20, 2, 1, 0], "session present");
    let mut got = Vec::new();
    for _ in 0..2 {
        let p = c.next_not_sys().await.expect("a kept message");
        got.push(topic_of(&p));
        if p[0] & 0x06 != 0 {
            let id = 2 + 2 + topic_of(&p).len();
            c.send(&[0x40, 2, p[id], p[id + 1]]).await;
        }
    }
    got.sort();
    assert_eq!(got, ["kept/http", "kept/mqtt"]);
    assert!(c.nothing_before_pingresp().await);
}

#[tokio::test]
async fn unacknowledged_deliveries_are_sent_again_on_resumption() {
    let gw = TestGateway::start().await;
    let (mut c, _) = Raw::open(&gw, connect(Version::V311, 0x00, b"slow-acker", &[])).await;
    c.send(&subscribe(Version::V311, &[], &[(b"redo/#", 1)]))
        .await;
    assert_eq!(c.next().await.unwrap()[0], 0x90);
    assert_eq!(gw.post("/topics/redo/x?qos=1", "again").await.status(), 204);
    let first = c.next().await.unwrap();
    assert_eq!(first[0], 0x32, "QoS 1, not acknowledged");
    drop(c);
    let (mut c, connack) = Raw::open(&gw, connect(Version::V311, 0x00, b"slow-acker", &[])).await;
    assert_eq!(connack, [0x20, 2, 1, 0], "session present");
    let again = c.next().await.unwrap();
    assert_eq!(again[0], 0x3A, "QoS 1 with DUP set");
    assert_eq!(topic_of(&again), "redo/x");
    assert_eq!(again[again.len() - 5..], *b"again");
}

#[tokio::test]
async fn topics_are_sent_under_aliases_the_client_takes() {
    let gw = TestGateway::start().await;
    // Topic Alias Maximum (0x22) 1.
    let (mut c, _) = Raw::open(&gw, connect_v5(0x02, b"alias", &[0x22, 0, 1])).await;
    c.send(&subscribe(Version::V5, &[], &[(b"al/#", 0)])).await;
    assert_eq!(c.next().await.unwrap()[0], 0x90);
    for topic in ["/topics/al/a", "/topics/al/a", "/topics/al/b"] {
        assert_eq!(gw.post(topic, "v").await.status(), 204);
    }
    let first = c.next().await.unwrap();
    assert_eq!(topic_of(&first), "al/a");
    assert!(
        first.windows(3).any(|w| w == [0x23, 0, 1]),
        "sets alias 1: {first:?}"
    );
    let second = c.next().await.unwrap();
    assert_eq!(topic_of(&second), "", "the topic stands as its alias");
    assert!(second.windows(3).any(|w| w == [0x23, 0, 1]));
    let third = c.next().await.unwrap();
    assert_eq!(topic_of(&third), "al/b", "no alias left for another topic");
    assert!(!third.windows(1).any(|w| w == [0x23]));
}

#[tokio::test]
async fn deliveries_to_mqtt_clients_are_counted() {
    let gw = TestGateway::start().await;
    let (mut c, _) = Raw::open(&gw, connect(Version::V311, 0x02, b"counted", &[])).await;
    c.send(&subscribe(Version::V311, &[], &[(b"count/#", 0)]))
        .await;
    assert_eq!(c.next().await.unwrap()[0], 0x90);
    assert_eq!(gw.post("/topics/count/x", "1").await.status(), 204);
    assert_eq!(topic_of(&c.next().await.unwrap()), "count/x");
    eventually("the delivery is in the metrics", || async {
        let n = crate::support::metric(&gw, "topicgate_deliveries_total{protocol=\"mqtt\"}").await;
        (n >= 1.0).then_some(())
    })
    .await;
}

/// A gateway whose router keeps 2 KiB per filter: a few messages of backlog.
async fn small_log_gateway() -> TestGateway {
    TestGateway::start_with(|c| {
        c.mqtt.segment_size = 1024;
        c.mqtt.segment_count = 2;
        c.mqtt.sys_interval = Duration::from_millis(200);
    })
    .await
}

/// A subscriber on `filter` that has its SUBACK.
async fn subscriber(gw: &TestGateway, id: &[u8], filter: &[u8]) -> Raw {
    let (mut c, _) = Raw::open(gw, connect(Version::V311, 0x02, id, &[])).await;
    c.send(&subscribe(Version::V311, &[], &[(filter, 0)])).await;
    assert_eq!(c.next().await.unwrap()[0], 0x90);
    c
}

/// `count` QoS 0 publishes to `topic` in one write, each payload its number and `pad` bytes.
fn burst(topic: &[u8], count: u32, pad: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    for i in 0..count {
        let mut payload = i.to_be_bytes().to_vec();
        payload.resize(4 + pad, b'x');
        bytes.extend(publish(Version::V311, 0x30, topic, None, &payload));
    }
    bytes
}

/// The number a [`burst`] message carries.
fn number_of(p: &[u8]) -> u32 {
    let at = 2 + varint_len(p) + 2 + topic_of(p).len() - 1;
    u32::from_be_bytes(p[at..at + 4].try_into().unwrap())
}

fn varint_len(p: &[u8]) -> usize {
    p[1..].iter().position(|b| b & 0x80 == 0).unwrap() + 1
}

async fn sys_figure(gw: &TestGateway, name: &str) -> Option<u64> {
    let r = gw.get(&format!("/topics/%24SYS/broker/{name}")).await;
    if r.status() != 200 {
        return None;
    }
    r.text().await.ok()?.trim().parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos0_burst_is_slowed_to_its_subscriber_not_dropped() {
    // 20,000 messages in one write, through a router log that holds about 18 of them: the
    // publisher is read only as fast as the subscriber takes them.
    let gw = small_log_gateway().await;
    let mut sub = subscriber(&gw, b"burst-sub", b"burst/#").await;
    let (mut publisher, _) = Raw::open(&gw, connect(Version::V311, 0x02, b"burst-pub", &[])).await;
    const COUNT: u32 = 20_000;
    let bytes = burst(b"burst/x", COUNT, 96);
    let receive = async {
        for expected in 0..COUNT {
            let p = sub.next_not_sys().await.expect("still connected");
            assert_eq!(number_of(&p), expected, "every message, in order");
        }
    };
    tokio::join!(publisher.send(&bytes), receive);
    assert_eq!(
        sys_figure(&gw, "publish/messages/dropped")
            .await
            .unwrap_or(0),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_subscriber_holds_publishers_back_only_for_a_while_and_its_losses_are_counted() {
    let gw = small_log_gateway().await;
    // A small receive buffer, so that the gateway's writes to it soon block.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(gw.mqtt).await.unwrap();
    let (mut stuck, _) =
        Raw::open_on(stream, connect(Version::V311, 0x02, b"stuck-sub", &[])).await;
    stuck
        .send(&subscribe(Version::V311, &[], &[(b"stuck/#", 0)]))
        .await;
    assert_eq!(stuck.next().await.unwrap()[0], 0x90);
    let mut healthy = subscriber(&gw, b"healthy-sub", b"stuck/#").await;
    let (mut publisher, _) = Raw::open(&gw, connect(Version::V311, 0x02, b"stuck-pub", &[])).await;
    // 16 MB: more than the stuck subscriber's socket buffers hold.
    const COUNT: u32 = 2_000;
    let bytes = burst(b"stuck/x", COUNT, 8 * 1024);
    let receive = async {
        for expected in 0..COUNT {
            let p = healthy.next_not_sys().await.expect("still connected");
            assert_eq!(
                number_of(&p),
                expected,
                "the healthy subscriber loses nothing"
            );
        }
    };
    tokio::join!(publisher.send(&bytes), receive);
    eventually("the stuck subscriber is counted", || async {
        (sys_figure(&gw, "clients/stuck").await? == 1).then_some(())
    })
    .await;
    // Read at last, it gets what the router still held; what it skipped is counted as dropped.
    let mut received = 0u64;
    let mut last = None;
    while last != Some(COUNT - 1) {
        let p = stuck.next_not_sys().await.expect("still connected");
        let n = number_of(&p);
        assert!(last.is_none_or(|l| n > l), "in order");
        last = Some(n);
        received += 1;
    }
    assert!(
        received < u64::from(COUNT),
        "the stuck subscriber lost some"
    );
    eventually("its losses are counted", || async {
        let dropped = sys_figure(&gw, "publish/messages/dropped").await?;
        (dropped == u64::from(COUNT) - received).then_some(())
    })
    .await;
    let lagged =
        crate::support::metric(&gw, "topicgate_lag_dropped_total{stream=\"broker_link\"}").await;
    assert_eq!(
        lagged,
        (u64::from(COUNT) - received) as f64,
        "in the metrics too"
    );
}

/// The Subscription Identifiers (0x0B) of an MQTT 5 PUBLISH.
fn subscription_ids(p: &[u8]) -> Vec<u32> {
    fn varint(p: &[u8], at: &mut usize) -> u32 {
        let (mut n, mut shift) = (0u32, 0);
        loop {
            let b = p[*at];
            *at += 1;
            n |= u32::from(b & 0x7F) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                return n;
            }
        }
    }
    let mut at = 1;
    varint(p, &mut at);
    at += 2 + usize::from(u16::from_be_bytes([p[at], p[at + 1]]));
    if p[0] & 0x06 != 0 {
        at += 2;
    }
    let end = varint(p, &mut at) as usize + at;
    let mut ids = Vec::new();
    while at < end {
        let id = p[at];
        at += 1;
        let string =
            |at: &mut usize| *at += 2 + usize::from(u16::from_be_bytes([p[*at], p[*at + 1]]));
        match id {
            0x0B => ids.push(varint(p, &mut at)),
            0x01 => at += 1,
            0x02 => at += 4,
            0x23 => at += 2,
            0x03 | 0x08 | 0x09 => string(&mut at),
            0x26 => {
                string(&mut at);
                string(&mut at);
            }
            other => panic!("unexpected property {other:#x} in {p:?}"),
        }
    }
    ids
}

#[tokio::test]
async fn a_message_through_overlapping_subscriptions_arrives_once_with_every_identifier() {
    let gw = TestGateway::start().await;
    let (mut c, _) = Raw::open(&gw, connect_v5(0x02, b"ids", &[])).await;
    // Subscription Identifier (0x0B) 2 on `ov/a`, 3 on `ov/#`, both QoS 1.
    c.send(&subscribe(Version::V5, &[0x0B, 2], &[(b"ov/a", 1)]))
        .await;
    assert_eq!(c.next().await.unwrap()[0], 0x90);
    c.send(&subscribe(Version::V5, &[0x0B, 3], &[(b"ov/#", 1)]))
        .await;
    assert_eq!(c.next().await.unwrap()[0], 0x90);
    assert_eq!(gw.post("/topics/ov/a?qos=1", "both").await.status(), 204);
    let p = c.next_not_sys().await.unwrap();
    assert_eq!((p[0], topic_of(&p).as_str()), (0x32, "ov/a"));
    let mut ids = subscription_ids(&p);
    ids.sort_unstable();
    assert_eq!(ids, [2, 3], "{p:?}");
    assert!(c.nothing_before_pingresp().await, "a second copy was sent");
    assert_eq!(gw.post("/topics/ov/b?qos=1", "one").await.status(), 204);
    let p = c.next_not_sys().await.unwrap();
    assert_eq!(
        (topic_of(&p).as_str(), subscription_ids(&p)),
        ("ov/b", vec![3])
    );

    // MQTT 3.1.1 clients get one copy too, as from Mosquitto.
    let (mut old, _) = Raw::open(&gw, connect(Version::V311, 0x02, b"old", &[])).await;
    old.send(&subscribe(Version::V311, &[], &[(b"d/a", 0), (b"d/#", 0)]))
        .await;
    assert_eq!(old.next().await.unwrap()[0], 0x90);
    assert_eq!(gw.post("/topics/d/a", "once").await.status(), 204);
    assert_eq!(topic_of(&old.next_not_sys().await.unwrap()), "d/a");
    assert!(
        old.nothing_before_pingresp().await,
        "a second copy was sent"
    );

    // Whatever the order of the copies, one goes at the highest QoS granted (MQTT-3.3.4-2).
    let (mut mixed, _) = Raw::open(&gw, connect(Version::V311, 0x02, b"mixed", &[])).await;
    mixed
        .send(&subscribe(Version::V311, &[], &[(b"e/a", 0), (b"e/#", 1)]))
        .await;
    assert_eq!(mixed.next().await.unwrap()[0], 0x90);
    assert_eq!(gw.post("/topics/e/a?qos=1", "max").await.status(), 204);
    let first = mixed.next_not_sys().await.unwrap();
    let qos1 = first[0] == 0x32 || mixed.next_not_sys().await.unwrap()[0] == 0x32;
    assert!(qos1, "no copy at QoS 1");
}

/// Joining the identifiers of overlapping subscriptions never makes a PUBLISH larger than the
/// client's Maximum Packet Size: when the joined copy would not fit, each copy goes alone.
#[tokio::test]
async fn overlapping_copies_go_apart_when_joined_they_would_pass_the_maximum_packet_size() {
    let gw = TestGateway::start().await;
    async fn overlap(c: &mut Raw) {
        for ids in [(2, &b"mp/a"[..]), (3, &b"mp/#"[..])] {
            c.send(&subscribe(Version::V5, &[0x0B, ids.0], &[(ids.1, 1)]))
                .await;
            assert_eq!(c.next().await.unwrap()[0], 0x90);
        }
    }
    // The size of one copy with one identifier, from a client with no limit.
    let (mut probe, _) = Raw::open(&gw, connect_v5(0x02, b"mp-probe", &[])).await;
    probe
        .send(&subscribe(Version::V5, &[0x0B, 3], &[(b"mp/#", 1)]))
        .await;
    assert_eq!(probe.next().await.unwrap()[0], 0x90);
    assert_eq!(gw.post("/topics/mp/a?qos=1", "sized").await.status(), 204);
    let single = probe.next_not_sys().await.unwrap().len();

    // One byte more than a single copy: a second identifier (two bytes) does not fit.
    let limit = u32::try_from(single + 1).unwrap().to_be_bytes();
    let (mut small, _) = Raw::open(
        &gw,
        connect_v5(
            0x02,
            b"mp-small",
            &[0x27, limit[0], limit[1], limit[2], limit[3]],
        ),
    )
    .await;
    overlap(&mut small).await;
    assert_eq!(gw.post("/topics/mp/a?qos=1", "sized").await.status(), 204);
    let mut ids = Vec::new();
    for _ in 0..2 {
        let p = small.next_not_sys().await.expect("both copies arrive");
        assert!(p.len() <= single + 1, "{} bytes over the limit", p.len());
        assert_eq!(topic_of(&p), "mp/a");
        ids.extend(subscription_ids(&p));
        // QoS 1: acknowledge, so the next copy is not held back.
        let id = 2 + 2 + "mp/a".len();
        small.send(&[0x40, 2, p[id], p[id + 1]]).await;
    }
    ids.sort_unstable();
    assert_eq!(ids, [2, 3]);

    // With room for both, the same message comes once with both identifiers.
    let (mut roomy, _) = Raw::open(&gw, connect_v5(0x02, b"mp-roomy", &[0x27, 0, 0, 1, 0])).await;
    overlap(&mut roomy).await;
    assert_eq!(gw.post("/topics/mp/a?qos=1", "sized").await.status(), 204);
    let p = roomy.next_not_sys().await.unwrap();
    let mut ids = subscription_ids(&p);
    ids.sort_unstable();
    assert_eq!(ids, [2, 3], "{p:?}");
}
