//! Round trips, framing and the strict rules of the codec.

use super::packet::{Auth, Will};
use super::{
    Ack, Answer, ConnAck, Connect, Decoder, Disconnect, Packet, Publish, PublishProperties, QoS,
    SubAck, Subscribe, Subscription, Unsubscribe, Version, encode, encoded_len,
};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;

const ALL: [Version; 3] = [Version::V31, Version::V311, Version::V5];

fn hex(s: &str) -> BytesMut {
    let digits: Vec<u8> = s.bytes().filter(|b| b.is_ascii_hexdigit()).collect();
    let bytes: Vec<u8> = digits
        .chunks(2)
        .map(|c| u8::from_str_radix(std::str::from_utf8(c).unwrap(), 16).unwrap())
        .collect();
    BytesMut::from(&bytes[..])
}

fn users() -> Vec<(String, String)> {
    vec![("k".into(), "v".into()), ("k".into(), "ü2".into())]
}

fn connect_for(version: Version) -> Connect {
    Connect {
        version,
        clean_start: true,
        keep_alive: 30,
        client_id: "c".into(),
        session_expiry: (version == Version::V5).then_some(60),
        authentication_method: (version == Version::V5).then(|| "m".into()),
        ..Connect::default()
    }
}

/// A server-side decoder that has read a CONNECT of this version.
fn connected(version: Version) -> Decoder {
    let mut d = Decoder::new(1 << 20);
    let mut buf = BytesMut::new();
    encode(
        &Packet::Connect(Box::new(connect_for(version))),
        version,
        &mut buf,
    );
    assert!(matches!(d.decode(&mut buf), Ok(Some(Packet::Connect(_)))));
    assert_eq!(d.version(), Some(version));
    d
}

fn connected_plain(version: Version) -> Decoder {
    let mut d = Decoder::new(1 << 20);
    let mut buf = BytesMut::new();
    let c = Connect {
        version,
        clean_start: true,
        client_id: "c".into(),
        ..Connect::default()
    };
    encode(&Packet::Connect(Box::new(c)), version, &mut buf);
    d.decode(&mut buf).unwrap().unwrap();
    d
}

/// Encodes, checks `encoded_len`, checks that every strict prefix needs more bytes without
/// consuming anything, then decodes the whole and compares.
fn round_trip(packet: &Packet, version: Version, dec: &Decoder) {
    let mut buf = BytesMut::new();
    encode(packet, version, &mut buf);
    assert_eq!(buf.len(), encoded_len(packet, version), "{packet:?}");
    for n in 0..buf.len() {
        let mut part = BytesMut::from(&buf[..n]);
        let mut d = dec.clone();
        assert!(
            d.decode(&mut part).unwrap().is_none(),
            "prefix {n} of {packet:?}"
        );
        assert_eq!(part.len(), n);
    }
    let mut d = dec.clone();
    let got = d
        .decode(&mut buf)
        .unwrap_or_else(|e| panic!("{packet:?} in {version:?}: {e}"));
    assert_eq!(got.as_ref(), Some(packet), "{version:?}");
    assert!(buf.is_empty());
}

fn from_client(packet: &Packet, version: Version) {
    round_trip(packet, version, &connected(version));
}

fn from_server(packet: &Packet, version: Version) {
    round_trip(packet, version, &Decoder::for_client(version, 1 << 20));
}

fn full_publish_props(server: bool) -> PublishProperties {
    PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(3600),
        topic_alias: Some(7),
        response_topic: Some("re/ply".into()),
        correlation_data: Some(Bytes::from_static(b"\x00\x01")),
        user_properties: users(),
        subscription_identifiers: if server {
            vec![1, 300, 268_435_455]
        } else {
            vec![]
        },
        content_type: Some("text/plain".into()),
    }
}

#[test]
fn connect_round_trips() {
    for v in ALL {
        let plain = Connect {
            version: v,
            clean_start: true,
            keep_alive: 10,
            client_id: "client-1".into(),
            will: Some(Will {
                topic: "will/t".into(),
                payload: Bytes::from_static(b"bye"),
                qos: QoS::ExactlyOnce,
                retain: true,
                ..Will::default()
            }),
            username: Some("user".into()),
            password: Some(Bytes::from_static(b"\x00pw")),
            ..Connect::default()
        };
        round_trip(
            &Packet::Connect(Box::new(plain.clone())),
            v,
            &Decoder::new(1024),
        );
        let bare = Connect {
            version: v,
            client_id: "x".into(),
            ..Connect::default()
        };
        round_trip(&Packet::Connect(Box::new(bare)), v, &Decoder::new(1024));
    }
    let full = Connect {
        version: Version::V5,
        clean_start: false,
        keep_alive: 65535,
        client_id: String::new(),
        will: Some(Will {
            topic: "w".into(),
            payload: Bytes::new(),
            qos: QoS::AtLeastOnce,
            retain: false,
            delay_interval: Some(5),
            properties: PublishProperties {
                topic_alias: None,
                ..full_publish_props(false)
            },
        }),
        username: None,
        password: Some(Bytes::from_static(b"pw")),
        session_expiry: Some(0xffff_ffff),
        receive_maximum: Some(10),
        maximum_packet_size: Some(1000),
        topic_alias_maximum: Some(0),
        request_response_information: Some(1),
        request_problem_information: Some(0),
        user_properties: users(),
        authentication_method: Some("SCRAM".into()),
        authentication_data: Some(Bytes::from_static(b"abc")),
    };
    round_trip(
        &Packet::Connect(Box::new(full)),
        Version::V5,
        &Decoder::new(1024),
    );
}

#[test]
fn connack_round_trips() {
    for v in ALL {
        let c = ConnAck {
            session_present: true,
            code: 5,
            ..ConnAck::default()
        };
        from_server(&Packet::ConnAck(Box::new(c)), v);
    }
    let full = ConnAck {
        session_present: false,
        code: 0x8c,
        session_expiry: Some(1),
        receive_maximum: Some(20),
        maximum_qos: Some(1),
        retain_available: Some(0),
        maximum_packet_size: Some(1 << 20),
        assigned_client_identifier: Some("auto-1".into()),
        topic_alias_maximum: Some(10),
        reason_string: Some("why".into()),
        user_properties: users(),
        wildcard_subscription_available: Some(1),
        subscription_identifiers_available: Some(0),
        shared_subscription_available: Some(1),
        server_keep_alive: Some(30),
        response_information: Some("resp".into()),
        server_reference: Some("other:1883".into()),
        authentication_method: Some("SCRAM".into()),
        authentication_data: Some(Bytes::from_static(b"\xff")),
    };
    from_server(&Packet::ConnAck(Box::new(full)), Version::V5);
}

#[test]
fn publish_round_trips() {
    for v in ALL {
        for (qos, id) in [
            (QoS::AtMostOnce, 0),
            (QoS::AtLeastOnce, 1),
            (QoS::ExactlyOnce, 65535),
        ] {
            let p = Publish {
                dup: qos != QoS::AtMostOnce,
                qos,
                retain: true,
                topic: "a/b/ü".into(),
                packet_id: id,
                properties: PublishProperties::default().into(),
                payload: Bytes::from(vec![7u8; 300]),
            };
            from_client(&Packet::Publish(p.clone()), v);
            from_server(&Packet::Publish(p), v);
        }
    }
    let mut p = Publish {
        qos: QoS::AtLeastOnce,
        topic: "t".into(),
        packet_id: 9,
        properties: full_publish_props(false).into(),
        payload: Bytes::from_static(b"x"),
        ..Publish::default()
    };
    from_client(&Packet::Publish(p.clone()), Version::V5);
    p.properties = full_publish_props(true).into();
    from_server(&Packet::Publish(p.clone()), Version::V5);
    // An empty topic stands for an alias in MQTT 5.
    p.topic = ByteString::new();
    from_server(&Packet::Publish(p), Version::V5);
    // A big payload needs a multi-byte remaining length.
    let big = Publish {
        topic: "t".into(),
        payload: Bytes::from(vec![1u8; 2_100_000]),
        ..Publish::default()
    };
    let mut buf = BytesMut::new();
    encode(&Packet::Publish(big.clone()), Version::V311, &mut buf);
    assert_eq!(
        buf.len(),
        encoded_len(&Packet::Publish(big.clone()), Version::V311)
    );
    let mut d = Decoder::new(4 << 20);
    let mut c = BytesMut::new();
    encode(
        &Packet::Connect(Box::new(connect_for(Version::V311))),
        Version::V311,
        &mut c,
    );
    d.decode(&mut c).unwrap();
    assert_eq!(d.decode(&mut buf).unwrap(), Some(Packet::Publish(big)));
}

#[test]
fn ack_round_trips() {
    type Make = fn(Ack) -> Packet;
    let kinds: [(Make, u8); 4] = [
        (Packet::PubAck, 0x10),
        (Packet::PubRec, 0x80),
        (Packet::PubRel, 0x92),
        (Packet::PubComp, 0x92),
    ];
    for (make, code) in kinds {
        for v in ALL {
            let a = Ack {
                packet_id: 0x1234,
                ..Ack::default()
            };
            from_client(&make(a.clone()), v);
            from_server(&make(a), v);
        }
        for (reason, reason_string, user_properties) in [
            (code, None, vec![]),
            (0, Some("r".to_string()), vec![]),
            (code, Some("r".to_string()), users()),
        ] {
            let a = Ack {
                packet_id: 1,
                reason,
                reason_string,
                user_properties,
            };
            from_client(&make(a.clone()), Version::V5);
            from_server(&make(a), Version::V5);
        }
    }
    // The short forms are written when nothing else needs saying.
    let mut buf = BytesMut::new();
    encode(
        &Packet::PubAck(Ack {
            packet_id: 0x1234,
            ..Ack::default()
        }),
        Version::V5,
        &mut buf,
    );
    assert_eq!(&buf[..], &hex("40 02 12 34")[..]);
    buf.clear();
    encode(
        &Packet::PubAck(Ack {
            packet_id: 0x1234,
            reason: 0x10,
            ..Ack::default()
        }),
        Version::V5,
        &mut buf,
    );
    assert_eq!(&buf[..], &hex("40 03 12 34 10")[..]);
    buf.clear();
    encode(
        &Packet::PubRel(Ack {
            packet_id: 1,
            ..Ack::default()
        }),
        Version::V311,
        &mut buf,
    );
    assert_eq!(&buf[..], &hex("62 02 00 01")[..]);
}

#[test]
fn subscribe_round_trips() {
    for v in ALL {
        let s = Subscribe {
            packet_id: 5,
            subscriptions: vec![
                Subscription {
                    filter: "a/+/c".into(),
                    qos: QoS::AtLeastOnce,
                    ..Subscription::default()
                },
                Subscription {
                    filter: "$share/g/x/#".into(),
                    qos: QoS::ExactlyOnce,
                    ..Subscription::default()
                },
                Subscription {
                    filter: "#".into(),
                    ..Subscription::default()
                },
            ],
            ..Subscribe::default()
        };
        from_client(&Packet::Subscribe(s), v);
        let u = Unsubscribe {
            packet_id: 6,
            filters: vec!["a/+/c".into(), "+".into(), "$share/g/#".into()],
            ..Unsubscribe::default()
        };
        from_client(&Packet::Unsubscribe(u), v);
    }
    let s = Subscribe {
        packet_id: 65535,
        subscription_identifier: Some(268_435_455),
        user_properties: users(),
        subscriptions: vec![
            Subscription {
                filter: "a".into(),
                qos: QoS::ExactlyOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: 2,
            },
            Subscription {
                filter: "$share/g/b".into(),
                qos: QoS::AtMostOnce,
                no_local: false,
                retain_as_published: true,
                retain_handling: 1,
            },
        ],
    };
    from_client(&Packet::Subscribe(s), Version::V5);
    let u = Unsubscribe {
        packet_id: 1,
        user_properties: users(),
        filters: vec!["a".into()],
    };
    from_client(&Packet::Unsubscribe(u), Version::V5);
}

#[test]
fn suback_round_trips() {
    for v in ALL {
        let s = SubAck {
            packet_id: 3,
            codes: vec![0, 1, 2, 0x80],
            ..SubAck::default()
        };
        from_server(&Packet::SubAck(s), v);
        let u = SubAck {
            packet_id: 3,
            codes: if v == Version::V5 {
                vec![0, 0x11]
            } else {
                vec![]
            },
            ..SubAck::default()
        };
        from_server(&Packet::UnsubAck(u), v);
    }
    let s = SubAck {
        packet_id: 3,
        reason_string: Some("r".into()),
        user_properties: users(),
        codes: vec![0x8f],
    };
    from_server(&Packet::SubAck(s.clone()), Version::V5);
    from_server(&Packet::UnsubAck(s), Version::V5);
    // Before MQTT 5 an UNSUBACK carries no codes.
    let mut buf = BytesMut::new();
    let u = SubAck {
        packet_id: 0x1234,
        codes: vec![0x11],
        ..SubAck::default()
    };
    encode(&Packet::UnsubAck(u), Version::V311, &mut buf);
    assert_eq!(&buf[..], &hex("b0 02 12 34")[..]);
}

#[test]
fn ping_disconnect_auth_round_trips() {
    for v in ALL {
        from_client(&Packet::PingReq, v);
        from_server(&Packet::PingResp, v);
        from_client(&Packet::Disconnect(Disconnect::default()), v);
    }
    let d = Disconnect {
        reason: 0x04,
        session_expiry: Some(10),
        reason_string: Some("bye".into()),
        user_properties: users(),
        server_reference: Some("s".into()),
    };
    from_client(&Packet::Disconnect(d.clone()), Version::V5);
    from_server(&Packet::Disconnect(d), Version::V5);
    from_client(
        &Packet::Disconnect(Disconnect {
            reason: 0x80,
            ..Disconnect::default()
        }),
        Version::V5,
    );
    from_server(
        &Packet::Disconnect(Disconnect {
            reason: 0x8b,
            ..Disconnect::default()
        }),
        Version::V5,
    );
    let a = Auth {
        reason: 0x18,
        authentication_method: Some("SCRAM".into()),
        authentication_data: Some(Bytes::from_static(b"d")),
        reason_string: Some("r".into()),
        user_properties: users(),
    };
    from_client(&Packet::Auth(a.clone()), Version::V5);
    from_server(&Packet::Auth(a), Version::V5);
    from_client(&Packet::Auth(Auth::default()), Version::V5);
    let mut buf = BytesMut::new();
    encode(
        &Packet::Disconnect(Disconnect {
            reason: 0x81,
            ..Disconnect::default()
        }),
        Version::V5,
        &mut buf,
    );
    assert_eq!(&buf[..], &hex("e0 01 81")[..]);
}

#[test]
fn answers_encode() {
    let mut buf = BytesMut::new();
    Answer::ConnAck {
        version: Version::V311,
        code: 1,
    }
    .encode(&mut buf);
    assert_eq!(&buf[..], &hex("20 02 00 01")[..]);
    buf.clear();
    Answer::ConnAck {
        version: Version::V5,
        code: 0x84,
    }
    .encode(&mut buf);
    assert_eq!(&buf[..], &hex("20 03 00 84 00")[..]);
    buf.clear();
    Answer::Disconnect(0x95).encode(&mut buf);
    assert_eq!(&buf[..], &hex("e0 01 95")[..]);
    buf.clear();
    Answer::Close.encode(&mut buf);
    assert!(buf.is_empty());
}

/// Decodes `bytes` on a fresh connection of `version` and expects a refusal with `answer`.
fn refused(version: Version, bytes: &str, answer: Answer) {
    let mut d = connected(version);
    refused_by(&mut d, bytes, answer);
}

fn refused_by(d: &mut Decoder, bytes: &str, answer: Answer) {
    let mut buf = hex(bytes);
    match d.decode(&mut buf) {
        Err(e) => assert_eq!(e.answer, answer, "{bytes}: {}", e.detail),
        Ok(p) => panic!("{bytes} accepted: {p:?}"),
    }
}

fn accepted(version: Version, bytes: &str) -> Packet {
    let mut d = connected(version);
    let mut buf = hex(bytes);
    let p = d
        .decode(&mut buf)
        .unwrap_or_else(|e| panic!("{bytes}: {e}"))
        .unwrap_or_else(|| panic!("{bytes}: incomplete"));
    assert!(buf.is_empty(), "{bytes}: bytes left");
    p
}

fn first_packet(bytes: &str) -> Result<Option<Packet>, Answer> {
    let mut d = Decoder::new(1 << 20);
    let mut buf = hex(bytes);
    d.decode(&mut buf).map_err(|e| e.answer)
}

const M: Answer = Answer::Disconnect(0x81);
const P: Answer = Answer::Disconnect(0x82);
const C: Answer = Answer::Close;

#[test]
fn reserved_header_flags() {
    for (bytes, v5) in [
        ("60 02 00 01", "60 03 00 01 00"),
        ("80 06 00 01 00 01 61 00", "80 07 00 01 00 00 01 61 00"),
        ("a0 05 00 01 00 01 61", "a0 06 00 01 00 00 01 61"),
        ("41 02 00 01", "41 02 00 01"),
        ("c1 00", "c1 00"),
        ("e1 00", "e1 00"),
    ] {
        refused(Version::V311, bytes, C);
        refused(Version::V5, v5, M);
    }
    refused(Version::V311, "36 05 00 01 61 00 01", C);
    refused(Version::V5, "36 06 00 01 61 00 01 00", M);
    refused(Version::V5, "38 04 00 01 61 00", M);
    refused(Version::V5, "38 04 00 01 61 00", M);
}

#[test]
fn packet_id_zero() {
    refused(Version::V5, "32 06 00 01 61 00 00 00", P);
    refused(Version::V311, "32 05 00 01 61 00 00", C);
    refused(Version::V5, "40 02 00 00", P);
    refused(Version::V5, "62 02 00 00", P);
    refused(Version::V5, "82 07 00 00 00 00 01 61 00", M);
    refused(Version::V5, "a2 06 00 00 00 00 01 61", M);
}

#[test]
fn connect_rules() {
    // Reserved flag bit, will flags, password without user name.
    assert_eq!(
        first_packet("10 0d 00 04 4d 51 54 54 04 03 00 0a 00 01 70"),
        Err(C)
    );
    assert_eq!(
        first_packet("10 0d 00 04 4d 51 54 54 04 0a 00 0a 00 01 70"),
        Err(C)
    );
    assert_eq!(
        first_packet("10 0d 00 04 4d 51 54 54 04 22 00 0a 00 01 70"),
        Err(C)
    );
    assert_eq!(
        first_packet("10 13 00 04 4d 51 54 54 04 1e 00 0a 00 01 70 00 01 70 00 01 70"),
        Err(C)
    );
    assert_eq!(
        first_packet("10 10 00 04 4d 51 54 54 04 42 00 0a 00 01 70 00 01 70"),
        Err(C)
    );
    assert!(matches!(
        first_packet("10 11 00 04 4d 51 54 54 05 42 00 0a 00 00 01 70 00 01 70"),
        Ok(Some(Packet::Connect(_)))
    ));
    // Header flags.
    assert_eq!(
        first_packet("12 0d 00 04 4d 51 54 54 04 02 00 0a 00 01 70"),
        Err(C)
    );
    // Protocol names and levels.
    let v31 = Answer::ConnAck {
        version: Version::V31,
        code: 1,
    };
    let v311 = Answer::ConnAck {
        version: Version::V311,
        code: 1,
    };
    assert_eq!(
        first_packet("10 0f 00 06 4d 51 49 73 64 70 04 02 00 0a 00 01 70"),
        Err(v31)
    );
    assert_eq!(
        first_packet("10 0d 00 04 4d 51 54 54 03 02 00 0a 00 01 70"),
        Err(v311)
    );
    assert_eq!(
        first_packet("10 0d 00 04 4d 51 54 54 06 02 00 0a 00 01 70"),
        Err(v311)
    );
    assert_eq!(
        first_packet("10 0d 00 04 4d 51 54 58 04 02 00 0a 00 01 70"),
        Err(C)
    );
    // Client identifiers.
    assert_eq!(
        first_packet("10 0d 00 04 4d 51 54 54 04 02 00 0a 00 01 00"),
        Err(C),
        "U+0000"
    );
    assert_eq!(
        first_packet("10 0e 00 04 4d 51 54 54 04 02 00 0a 00 02 c3 28"),
        Err(C),
        "invalid UTF-8"
    );
    let rejected = Answer::ConnAck {
        version: Version::V311,
        code: 2,
    };
    assert_eq!(
        first_packet("10 0c 00 04 4d 51 54 54 04 00 00 0a 00 00"),
        Err(rejected)
    );
    assert_eq!(
        first_packet("10 0e 00 06 4d 51 49 73 64 70 03 02 00 0a 00 00"),
        Err(Answer::ConnAck {
            version: Version::V31,
            code: 2
        })
    );
    assert!(matches!(
        first_packet("10 0d 00 04 4d 51 54 54 05 00 00 0a 00 00 00"),
        Ok(Some(Packet::Connect(_)))
    ));
    // Missing and extra fields.
    assert_eq!(first_packet("10 0a 00 04 4d 51 54 54 04 02 00 0a"), Err(C));
    assert_eq!(
        first_packet("10 10 00 04 4d 51 54 54 04 02 00 0a 00 01 70 00 01 70"),
        Err(C)
    );
    // CONNECT properties out of range, duplicated or not allowed.
    for props in [
        "02 21 00 00",
        "05 27 00 00 00 00",
        "02 17 02",
        "02 19 02",
        "02 23 00 01",
        "0a 11 00 00 00 01 11 00 00 00 01",
    ] {
        let body = hex(&format!("00 04 4d 51 54 54 05 02 00 0a {props} 00 01 70"));
        let mut p = hex("10");
        p.extend_from_slice(&[body.len() as u8]);
        p.extend_from_slice(&body);
        let mut d = Decoder::new(1024);
        assert_eq!(
            d.decode(&mut p).map_err(|e| e.answer).err(),
            Some(C),
            "{props}"
        );
    }
    // First packet not a CONNECT; a second CONNECT.
    assert_eq!(first_packet("c0 00"), Err(C));
    assert_eq!(first_packet("20 02 00 00"), Err(C));
    refused(
        Version::V5,
        "10 0d 00 04 4d 51 54 54 04 02 00 0a 00 01 70",
        P,
    );
    refused(
        Version::V311,
        "10 0d 00 04 4d 51 54 54 04 02 00 0a 00 01 70",
        C,
    );
}

#[test]
fn strings_and_topics() {
    for topic in [
        "00 03 61 00 62",
        "00 02 c3 28",
        "00 03 ed a0 80",
        "00 01 01",
        "00 02 c2 9f",
        "00 03 ef bf bf",
    ] {
        let body = hex(&format!("{topic} 00"));
        let mut p = hex("30");
        p.extend_from_slice(&[body.len() as u8]);
        p.extend_from_slice(&body);
        let mut d = connected(Version::V5);
        assert_eq!(
            d.decode(&mut p).map_err(|e| e.answer).err(),
            Some(M),
            "{topic}"
        );
    }
    refused(Version::V5, "30 04 00 01 2b 00", M);
    refused(Version::V5, "30 06 00 03 61 2f 23 00", M);
    refused(Version::V5, "30 03 00 00 00", M);
    refused(Version::V311, "30 02 00 00", C);
    assert!(matches!(
        accepted(Version::V5, "30 06 00 00 03 23 00 05"),
        Packet::Publish(p) if p.topic.is_empty() && p.properties.topic_alias == Some(5)
    ));
    assert!(matches!(
        accepted(Version::V311, "30 06 00 04 f0 aa 9b 94"),
        Packet::Publish(p) if p.topic == "\u{2a6d4}"
    ));
    // User property with U+0000 in its name.
    refused(Version::V5, "40 0b 00 01 00 07 26 00 01 00 00 01 61", M);
}

#[test]
fn topic_filters() {
    for (filter, answer) in [
        ("", M),
        ("a/#/b", M),
        ("a+", M),
        ("#a", M),
        ("+a", M),
        ("a/b#", M),
        ("$share//a", P),
        ("$share/g+/a", P),
        ("$share/g#/a", P),
        ("$share/g", P),
        ("$share/g/", P),
    ] {
        let mut body = hex("00 01 00");
        body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
        body.extend_from_slice(filter.as_bytes());
        let mut unsub = BytesMut::from(&[0xa2, body.len() as u8][..]);
        unsub.extend_from_slice(&body);
        body.extend_from_slice(&[0]);
        let mut sub = BytesMut::from(&[0x82, body.len() as u8][..]);
        sub.extend_from_slice(&body);
        for buf in [sub, unsub] {
            let mut d = connected(Version::V5);
            let mut b = buf.clone();
            assert_eq!(
                d.decode(&mut b).map_err(|e| e.answer).err(),
                Some(answer),
                "{filter:?}"
            );
        }
    }
    for ok in ["+", "#", "+/+", "a/+/#", "/", "$SYS/#", "$share/g/+/x/#"] {
        let mut body = hex("00 01 00");
        body.extend_from_slice(&(ok.len() as u16).to_be_bytes());
        body.extend_from_slice(ok.as_bytes());
        body.extend_from_slice(&[1]);
        let mut sub = BytesMut::from(&[0x82, body.len() as u8][..]);
        sub.extend_from_slice(&body);
        let mut d = connected(Version::V5);
        assert!(d.decode(&mut sub).unwrap().is_some(), "{ok:?}");
    }
}

#[test]
fn subscribe_rules() {
    refused(Version::V5, "82 03 00 01 00", M);
    refused(Version::V311, "82 02 00 01", C);
    refused(Version::V5, "a2 03 00 01 00", M);
    refused(Version::V5, "82 07 00 01 00 00 01 61 40", M);
    refused(Version::V5, "82 07 00 01 00 00 01 61 30", M);
    refused(Version::V5, "82 07 00 01 00 00 01 61 03", M);
    refused(Version::V311, "82 06 00 01 00 01 61 04", C);
    refused(
        Version::V5,
        "82 10 00 01 00 00 0a 24 73 68 61 72 65 2f 70 2f 70 04",
        P,
    );
    refused(Version::V5, "82 09 00 01 02 0b 00 00 01 61 00", M);
    refused(Version::V5, "82 0b 00 01 04 0b 01 0b 01 00 01 61 00", P);
    refused(Version::V5, "82 09 00 01 02 01 00 00 01 61 00", M);
    assert!(matches!(
        accepted(Version::V5, "82 07 00 01 00 00 01 61 2e"),
        Packet::Subscribe(s) if s.subscriptions[0].retain_handling == 2
            && s.subscriptions[0].no_local && s.subscriptions[0].retain_as_published
            && s.subscriptions[0].qos == QoS::ExactlyOnce
    ));
}

#[test]
fn bodies_that_must_be_empty() {
    refused(Version::V311, "c0 01 00", C);
    refused(Version::V5, "c0 01 00", C);
    refused(Version::V311, "e0 01 00", C);
    refused(Version::V311, "40 03 00 01 00", C);
}

#[test]
fn properties() {
    refused(Version::V5, "30 08 00 01 61 02 05 00 ff ff", M);
    refused(Version::V5, "30 07 00 01 61 02 24 00 ff", P);
    refused(Version::V5, "30 08 00 01 61 04 01 01 01 01", P);
    refused(Version::V5, "30 07 00 01 61 02 01 02 ff", P);
    refused(Version::V5, "30 07 00 01 61 03 23 00 00", P);
    refused(Version::V5, "30 07 00 01 61 05 01 01 ff", M);
    refused(Version::V5, "30 07 00 01 61 03 08 00 01", M);
    refused(Version::V5, "30 09 00 01 61 05 08 00 02 61 2b", P);
    // Unknown beats not-allowed when both are present: the whole block is read first.
    refused(Version::V5, "30 0a 00 01 61 06 24 00 08 00 01 00", M);
    // A client's Subscription Identifier is read and dropped.
    assert!(matches!(
        accepted(Version::V5, "30 07 00 01 61 02 0b 01 78"),
        Packet::Publish(p) if p.properties.subscription_identifiers.is_empty()
    ));
    // Property lists that allow only some properties.
    refused(Version::V5, "40 08 00 01 00 04 03 00 01 61", P);
    refused(Version::V5, "e0 04 00 02 24 00", P);
    refused(Version::V5, "e0 03 00 01 11", M);
}

#[test]
fn server_only_packets_and_auth() {
    refused(Version::V5, "20 03 00 00 00", P);
    refused(Version::V5, "90 04 00 01 00 00", P);
    refused(Version::V5, "b0 04 00 01 00 00", P);
    refused(Version::V5, "d0 00", P);
    refused(Version::V5, "00 00", P);
    refused(Version::V311, "20 02 00 00", C);
    refused(Version::V311, "f0 00", C);
    assert!(matches!(
        accepted(Version::V5, "f0 02 19 00"),
        Packet::Auth(a) if a.reason == 0x19
    ));
    let mut d = connected_plain(Version::V5);
    refused_by(&mut d, "f0 00", P);
    refused(Version::V5, "f0 01 18", M);
    refused(Version::V5, "f0 02 01 00", P);
    assert_eq!(
        accepted(Version::V5, "f0 00"),
        Packet::Auth(Auth::default())
    );
}

#[test]
fn short_forms_and_reason_codes() {
    assert_eq!(
        accepted(Version::V5, "e0 00"),
        Packet::Disconnect(Disconnect::default())
    );
    assert_eq!(
        accepted(Version::V5, "e0 01 04"),
        Packet::Disconnect(Disconnect {
            reason: 4,
            ..Disconnect::default()
        })
    );
    for kind in ["40", "50", "62", "70"] {
        let p = accepted(Version::V5, &format!("{kind} 02 00 01"));
        let reason = if kind == "40" || kind == "50" {
            "10"
        } else {
            "92"
        };
        let q = accepted(Version::V5, &format!("{kind} 03 00 01 {reason}"));
        let r = accepted(Version::V5, &format!("{kind} 04 00 01 {reason} 00"));
        assert_ne!(p, q);
        assert_eq!(q, r);
    }
    refused(Version::V5, "40 03 00 01 92", P);
    refused(Version::V5, "62 03 00 01 10", P);
    refused(Version::V5, "70 03 00 01 80", P);
    refused(Version::V5, "e0 01 05", C);
    refused(Version::V5, "e0 01 8e", C);
    refused(Version::V5, "40 05 00 01 00 00 00", M);
    refused(Version::V5, "40 01 00", M);
    // Raising the Session Expiry Interval after connecting with 0.
    let mut d = connected_plain(Version::V5);
    refused_by(&mut d, "e0 07 00 05 11 00 00 00 01", P);
    let mut d = connected(Version::V5);
    let mut b = hex("e0 07 00 05 11 00 00 00 01");
    assert!(d.decode(&mut b).unwrap().is_some());
}

#[test]
fn framing() {
    // Two packets in one buffer come off one at a time.
    let mut d = connected(Version::V311);
    let mut buf = hex("c0 00 30 06 00 01 61 70 61 79");
    assert_eq!(d.decode(&mut buf).unwrap(), Some(Packet::PingReq));
    assert_eq!(buf.len(), 8);
    let base = buf.as_ptr() as usize;
    match d.decode(&mut buf).unwrap() {
        Some(Packet::Publish(p)) => {
            assert_eq!(&p.payload[..], b"pay");
            // The payload is a slice of the input, not a copy.
            let at = p.payload.as_ptr() as usize;
            assert!(at >= base && at < base + 8);
        }
        other => panic!("{other:?}"),
    }
    assert!(buf.is_empty());
    assert_eq!(d.decode(&mut buf).unwrap(), None);
    // A fifth remaining-length byte is malformed.
    refused(Version::V5, "30 ff ff ff ff 01", M);
    assert_eq!(first_packet("10 ff ff ff ff 7f"), Err(C));
    // A non-minimal remaining length is fine.
    assert_eq!(accepted(Version::V311, "c0 80 00"), Packet::PingReq);
    // A field running past the frame.
    refused(Version::V5, "82 07 00 01 00 00 09 61 00", M);
}

#[test]
fn oversize_rejected_from_the_header() {
    let mut d = connected(Version::V5);
    d.set_max_packet_size(100);
    let mut buf = hex("30 ff 01");
    let e = d.decode(&mut buf).unwrap_err();
    assert_eq!(e.answer, Answer::Disconnect(0x95));
    let mut d = connected(Version::V311);
    d.set_max_packet_size(100);
    let mut buf = hex("30 63");
    assert_eq!(d.decode(&mut buf).unwrap_err().answer, C);
    // Exactly the maximum is fine (2 header bytes + 98).
    let mut buf = hex("30 62");
    assert_eq!(d.decode(&mut buf).unwrap(), None);
    let mut d = Decoder::new(20);
    let mut buf = hex("10 7f");
    assert_eq!(d.decode(&mut buf).unwrap_err().answer, C);
}
