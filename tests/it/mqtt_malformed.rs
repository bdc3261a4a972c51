//! Malformed and forbidden MQTT packets over raw TCP: the broker closes each such connection, at
//! most after a CONNACK or DISCONNECT with a failure code, and keeps serving everyone else.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::mqtt_raw::{
    Reply, Version, connect, connect_raw, label, packet, props, publish, publish_with, replies,
    string, subscribe, unsubscribe, varint,
};
use crate::support::{DEADLINE, TestGateway, recv, within};

/// The payload limit of the gateway under test: small, so that going over it is cheap.
const MAX_PAYLOAD: usize = 1024;

/// One malformed exchange: optionally a valid CONNECT first (its CONNACK must accept), then
/// the bytes under test.
struct Case {
    name: String,
    connect_first: Option<Version>,
    bytes: Vec<u8>,
    /// Close the sending half after the bytes, as a client that gives up mid-packet.
    then_eof: bool,
    expect: Expect,
}

/// What the server must do with a case before it closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Close, at most after a CONNACK or DISCONNECT with a failure code.
    Refusal,
    /// Answer with exactly this 3.1.1 CONNACK return code, then close.
    ConnAck(u8),
    /// Close without sending a byte.
    Silence,
}

fn case(name: &str, bytes: Vec<u8>) -> Case {
    Case {
        name: name.to_owned(),
        connect_first: None,
        bytes,
        then_eof: false,
        expect: Expect::Refusal,
    }
}

/// A case the server must answer with CONNACK 0x01, "unacceptable protocol level" (MQTT 3.1.1
/// §3.1.2.2), before it closes.
fn unsupported_level(name: &str, bytes: Vec<u8>) -> Case {
    Case {
        expect: Expect::ConnAck(1),
        ..case(name, bytes)
    }
}

/// A case sent on a session the broker has accepted with a valid CONNECT of `version`.
fn after_connect(version: Version, name: &str, bytes: Vec<u8>) -> Case {
    Case {
        name: format!("{name} ({})", label(version)),
        connect_first: Some(version),
        bytes,
        then_eof: false,
        expect: Expect::Refusal,
    }
}

// --- the cases -------------------------------------------------------------------------------

fn cases() -> Vec<Case> {
    use Version::{V5, V311};
    let mut cases = vec![
        // Framing.
        case(
            "CONNECT with a remaining length of five bytes",
            vec![0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
        ),
        case(
            "CONNECT with a remaining length beyond the packet limit",
            connect_raw(b"MQTT", 4, 0x02, b"big", &[])
                .into_iter()
                .enumerate()
                .flat_map(|(i, b)| match i {
                    1 => vec![0xFF, 0xFF, 0xFF, 0x7F],
                    _ => vec![b],
                })
                .collect(),
        ),
        Case {
            then_eof: true,
            ..case(
                "CONNECT shorter than its remaining length, then EOF",
                connect(V311, 0x02, b"short", &[])[..12]
                    .iter()
                    .enumerate()
                    .map(|(i, &b)| if i == 1 { 100 } else { b })
                    .collect(),
            )
        },
        case(
            "half a CONNECT and then silence",
            connect(V311, 0x02, b"silent", &[])[..9].to_vec(),
        ),
        // Protocol name and level: a name that is not MQTT's is closed without a word; a level
        // the gateway does not speak is told so.
        Case {
            expect: Expect::Silence,
            ..case(
                "protocol name MQTs",
                connect_raw(b"MQTs", 4, 0x02, b"n1", &[]),
            )
        },
        Case {
            expect: Expect::Silence,
            ..case(
                "protocol name longer than the packet",
                connect_raw(b"MQTT", 3, 0x02, b"n0", &[])
                    .into_iter()
                    .enumerate()
                    .map(|(i, b)| if i == 1 { 6 } else { b })
                    .collect(),
            )
        },
        unsupported_level(
            "protocol name MQIsdp with level 4",
            connect_raw(b"MQIsdp", 4, 0x02, b"n2", &[]),
        ),
        unsupported_level(
            "protocol level 3",
            connect_raw(b"MQTT", 3, 0x02, b"n4", &[]),
        ),
        unsupported_level(
            "protocol level 6",
            connect_raw(b"MQTT", 6, 0x02, b"n5", &[]),
        ),
        unsupported_level(
            "protocol level 6 with a will and a login",
            connect_raw(b"MQTT", 6, 0xC6, b"n6", &{
                let mut rest = string(b"will/t");
                rest.extend(string(b"gone"));
                rest.extend(string(b"user"));
                rest.extend(string(b"password"));
                rest
            }),
        ),
        // First packet.
        case(
            "PUBLISH before CONNECT",
            publish(V311, 0x30, b"a/b", None, b"x"),
        ),
        case("PINGREQ before CONNECT", vec![0xC0, 0]),
        case("SUBSCRIBE before CONNECT", subscribe(V311, 0x82, &[b"a/#"])),
    ];
    for v in [V311, V5] {
        let tag = label(v);
        let mut more = vec![
            case(
                &format!("CONNECT with the reserved flag set ({tag})"),
                connect(v, 0x03, b"reserved", &[]),
            ),
            case(
                &format!("client id with U+0000 ({tag})"),
                connect(v, 0x02, b"a\0b", &[]),
            ),
            case(
                &format!("client id not UTF-8 ({tag})"),
                connect(v, 0x02, &[b'c', 0xFF, 0xFE], &[]),
            ),
            case(
                &format!("user name with U+0000 ({tag})"),
                connect(v, 0x82, b"user0", &string(b"u\0")),
            ),
            case(
                &format!("will topic with a wildcard ({tag})"),
                connect(v, 0x06, b"will", &{
                    let mut w = props(v, &[]);
                    w.extend(string(b"w/#"));
                    w.extend(string(b"gone"));
                    w
                }),
            ),
            after_connect(v, "a second CONNECT", connect(v, 0x02, b"again", &[])),
            after_connect(
                v,
                "PUBLISH with a remaining length of five bytes",
                vec![0x30, 0x80, 0x80, 0x80, 0x80, 0x01],
            ),
            after_connect(
                v,
                "PUBLISH with a remaining length beyond the packet limit",
                {
                    let mut p = vec![0x30];
                    p.extend(varint(100_000 + MAX_PAYLOAD));
                    p.extend(string(b"a/b"));
                    p
                },
            ),
            Case {
                then_eof: true,
                ..after_connect(v, "PUBLISH shorter than its remaining length, then EOF", {
                    let mut p = vec![0x30, 50];
                    p.extend(string(b"a/b"));
                    p.extend_from_slice(b"xyz");
                    p
                })
            },
            after_connect(
                v,
                "SUBSCRIBE with fixed header flags 0",
                subscribe(v, 0x80, &[b"a/#"]),
            ),
            after_connect(
                v,
                "UNSUBSCRIBE with fixed header flags 0",
                unsubscribe(v, 0xA0, &[b"a/#"]),
            ),
            after_connect(v, "PUBREL with fixed header flags 0", packet(0x60, &[0, 1])),
            after_connect(v, "PINGREQ with fixed header flags 1", vec![0xC1, 0]),
            after_connect(v, "CONNACK sent by a client", packet(0x20, &[0, 0])),
            after_connect(v, "SUBACK sent by a client", packet(0x90, &[0, 1, 0])),
            after_connect(
                v,
                "PUBLISH with QoS 3",
                publish(v, 0x36, b"a/b", Some(1), b"x"),
            ),
            after_connect(
                v,
                "PUBLISH QoS 1 with packet id 0",
                publish(v, 0x32, b"a/b", Some(0), b"x"),
            ),
            after_connect(
                v,
                "PUBLISH to a topic with U+0000",
                publish(v, 0x30, b"a\0b", None, b"x"),
            ),
            after_connect(
                v,
                "PUBLISH to a topic that is not UTF-8",
                publish(v, 0x30, &[b'a', 0xC3, 0x28], None, b"x"),
            ),
            after_connect(
                v,
                "PUBLISH to a topic with +",
                publish(v, 0x30, b"a/+/c", None, b"x"),
            ),
            after_connect(
                v,
                "PUBLISH QoS 1 to a topic with #",
                publish(v, 0x32, b"a/#", Some(1), b"x"),
            ),
            after_connect(
                v,
                "PUBLISH to an empty topic without an alias",
                publish(v, 0x30, b"", None, b"x"),
            ),
            after_connect(
                v,
                "PUBLISH with a payload over max_payload",
                publish(v, 0x30, b"a/big", None, &[b'x'; MAX_PAYLOAD + 1]),
            ),
            after_connect(v, "SUBSCRIBE without filters", subscribe(v, 0x82, &[])),
            after_connect(v, "SUBSCRIBE to a/#/b", subscribe(v, 0x82, &[b"a/#/b"])),
            after_connect(v, "SUBSCRIBE to a+", subscribe(v, 0x82, &[b"a+"])),
            after_connect(
                v,
                "SUBSCRIBE to a valid and an invalid filter",
                subscribe(v, 0x82, &[b"ok/#", b"x#"]),
            ),
            after_connect(
                v,
                "SUBSCRIBE to a filter with U+0000",
                subscribe(v, 0x82, &[b"a/\0"]),
            ),
            after_connect(
                v,
                "SUBSCRIBE to a filter that is not UTF-8",
                subscribe(v, 0x82, &[&[b'a', 0xFF]]),
            ),
            after_connect(
                v,
                "UNSUBSCRIBE from a/#/b",
                unsubscribe(v, 0xA2, &[b"a/#/b"]),
            ),
        ];
        cases.append(&mut more);
    }
    // MQTT 5 only.
    cases.extend([
        after_connect(
            V5,
            "PUBLISH to an empty topic with an alias never set",
            publish_with(V5, 0x30, b"", None, &[0x23, 0, 7], b"x"),
        ),
        after_connect(
            V5,
            "PUBLISH with a truncated property",
            publish_with(V5, 0x30, b"a/b", None, &[0x03, 0, 9, b'a'], b""),
        ),
    ]);
    cases
}

// --- running them ----------------------------------------------------------------------------

/// Reads until the server closes the connection (a reset counts as closed), or `None` if it
/// keeps it open past the deadline.
async fn read_to_close(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(DEADLINE, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Connects with a valid CONNECT of `version` and returns the stream once accepted.
async fn connected(gw: &TestGateway, version: Version, client_id: &str) -> TcpStream {
    let mut s = within("TCP connect", TcpStream::connect(gw.mqtt))
        .await
        .unwrap();
    s.write_all(&connect(version, 0x02, client_id.as_bytes(), &[]))
        .await
        .unwrap();
    let mut header = [0u8; 2];
    within("CONNACK", s.read_exact(&mut header)).await.unwrap();
    let mut body = vec![0u8; usize::from(header[1])];
    within("CONNACK body", s.read_exact(&mut body))
        .await
        .unwrap();
    assert_eq!(header[0], 0x20, "{client_id}: a CONNACK");
    assert_eq!(body.get(1), Some(&0), "{client_id}: accepted");
    s
}

/// Runs one case; the error says what the server did instead of refusing it.
async fn run(gw: &TestGateway, index: usize, case: &Case) -> Result<(), String> {
    let client_id = format!("malformed-{index}");
    let mut s = match case.connect_first {
        Some(v) => connected(gw, v, &client_id).await,
        None => within("TCP connect", TcpStream::connect(gw.mqtt))
            .await
            .unwrap(),
    };
    // The server may close before it has read everything; that is one of the outcomes.
    let _ = s.write_all(&case.bytes).await;
    if case.then_eof {
        let _ = s.shutdown().await;
    }
    let Some(got) = read_to_close(&mut s).await else {
        return Err(format!("{}: the connection stays open", case.name));
    };
    let wanted = match case.expect {
        Expect::Refusal => None,
        Expect::ConnAck(code) => Some(vec![0x20, 2, 0, code]),
        Expect::Silence => Some(Vec::new()),
    };
    if let Some(wanted) = wanted {
        if got != wanted {
            return Err(format!(
                "{}: the server sent {got:02x?}, not {wanted:02x?}",
                case.name
            ));
        }
        return Ok(());
    }
    for reply in replies(&got) {
        let refused = match (case.connect_first, &reply) {
            // A CONNACK can only answer the CONNECT under test, and must refuse it.
            (None, Reply::ConnAck(code)) => *code != 0,
            (_, Reply::Disconnect(reason)) => *reason >= 0x80,
            _ => false,
        };
        if !refused {
            return Err(format!(
                "{}: the server answered {reply:?} (all it sent: {got:02x?})",
                case.name
            ));
        }
    }
    Ok(())
}

/// A new client is still accepted: the broker takes connections, not only keeps old ones.
async fn fresh_client_is_accepted(gw: &TestGateway, index: usize) {
    let mut s = connected(gw, Version::V311, &format!("fresh-{index}")).await;
    s.write_all(&[0xE0, 0]).await.unwrap();
}

#[tokio::test]
async fn malformed_packets_close_only_their_connection() {
    let gw = TestGateway::start_with(|c| {
        c.max_payload = MAX_PAYLOAD;
        // Bounds the wait on a client that stops in the middle of its CONNECT.
        c.mqtt.connect_timeout = Duration::from_secs(1);
    })
    .await;
    let (_c4, mut rx4) = gw.mqtt_v4("bystander-v4", &[("bystander/#", 1)]).await;
    let (_c5, mut rx5) = gw.mqtt_v5("bystander-v5", &[("bystander/#", 1)]).await;
    // Sees every publish the broker routes: none of the refused ones may get through.
    let (_all, mut everything) = gw.mqtt_v4("watch-all", &[("#", 0)]).await;
    let cases = cases();
    let mut accepted = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        if let Err(e) = run(&gw, i, case).await {
            accepted.push(e);
        }

        let topic = format!("bystander/{i}");
        let resp = gw
            .post(&format!("/topics/{topic}"), case.name.clone())
            .await;
        assert_eq!(resp.status(), 204, "after {}: HTTP publish", case.name);
        let p = recv(&mut rx4).await;
        assert_eq!(p.topic, topic, "after {}: the 3.1.1 client", case.name);
        let p = recv(&mut rx5).await;
        assert_eq!(
            &p.topic[..],
            topic.as_bytes(),
            "after {}: the MQTT 5 client",
            case.name
        );
        let p = recv(&mut everything).await;
        assert_eq!(
            p.topic, topic,
            "after {}: nothing else was routed",
            case.name
        );
        assert_eq!(
            gw.get("/healthz").await.status(),
            200,
            "after {}",
            case.name
        );
        fresh_client_is_accepted(&gw, i).await;
    }
    assert!(
        accepted.is_empty(),
        "{} of {} cases were not refused:\n{}",
        accepted.len(),
        cases.len(),
        accepted.join("\n")
    );
}
