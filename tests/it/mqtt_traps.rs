//! rumqttd's traps, each contained by the gateway and checked here with real clients.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{TestGateway, eventually, recv, within};

/// CONNECT (MQTT 3.1.1, clean session, client id `k0`) with the given keep-alive.
fn connect_packet(keep_alive: u16) -> Vec<u8> {
    let [hi, lo] = keep_alive.to_be_bytes();
    vec![
        0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, hi, lo, 0, 2, b'k', b'0',
    ]
}

#[tokio::test]
async fn keep_alive_zero_is_accepted_as_with_mosquitto() {
    let gw = TestGateway::start().await;
    let mut s = tokio::net::TcpStream::connect(gw.mqtt).await.unwrap();
    s.write_all(&connect_packet(0)).await.unwrap();
    let mut connack = [0u8; 4];
    within("CONNACK", s.read_exact(&mut connack)).await.unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "accepted");
    // PINGREQ answered: the session is live.
    s.write_all(&[0xC0, 0]).await.unwrap();
    let mut pong = [0u8; 2];
    within("PINGRESP", s.read_exact(&mut pong)).await.unwrap();
    assert_eq!(pong, [0xD0, 0]);
}

#[tokio::test]
async fn a_silent_client_is_cut_off_after_one_and_a_half_keep_alives_and_a_pinging_one_is_not() {
    let gw = TestGateway::start().await;
    let mut silent = tokio::net::TcpStream::connect(gw.mqtt).await.unwrap();
    silent.write_all(&connect_packet(1)).await.unwrap();
    let mut connack = [0u8; 4];
    within("CONNACK", silent.read_exact(&mut connack))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let cut_off = tokio::spawn(async move {
        let rest = read_to_close(&mut silent).await;
        (rest, started.elapsed())
    });
    let mut pinging = tokio::net::TcpStream::connect(gw.mqtt).await.unwrap();
    let mut connect = connect_packet(1);
    connect[15] = b'1';
    pinging.write_all(&connect).await.unwrap();
    within("CONNACK", pinging.read_exact(&mut connack))
        .await
        .unwrap();
    // The pinging client keeps to its keep-alive for 3 s, twice the silent one's grace: every
    // packet it sends moves its deadline on.
    for _ in 0..6 {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        pinging.write_all(&[0xC0, 0]).await.unwrap();
        let mut pong = [0u8; 2];
        within("PINGRESP", pinging.read_exact(&mut pong))
            .await
            .unwrap();
        assert_eq!(pong, [0xD0, 0]);
    }
    // MQTT 3.1.1 §3.1.2.10: closed once 1.5 s pass without a packet, and not before.
    let (rest, waited) = cut_off.await.unwrap();
    assert!(rest.is_empty(), "closed without a word: {rest:?}");
    assert!(
        waited >= std::time::Duration::from_millis(1500)
            && waited < std::time::Duration::from_secs(3),
        "cut off after {waited:?}"
    );
}

#[tokio::test]
async fn client_ids_with_slashes_and_dollars_connect() {
    let gw = TestGateway::start().await;
    let (c, mut rx) = gw.mqtt_v4("plant/sensor-1$a", &[("ids/#", 0)]).await;
    c.publish("ids/x", rumqttc::QoS::AtLeastOnce, false, "hi")
        .await
        .unwrap();
    assert_eq!(&recv(&mut rx).await.payload[..], b"hi");
}

/// Everything the server sends on `s` until it closes the connection.
async fn read_to_close(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    within("the connection closes", s.read_to_end(&mut got))
        .await
        .unwrap_or(0);
    got
}

#[tokio::test]
async fn mqtt_3_1_clients_publish_and_subscribe() {
    let gw = TestGateway::start().await;
    let mut s = tokio::net::TcpStream::connect(gw.mqtt).await.unwrap();
    // CONNECT `MQIsdp` level 3, client id "old", then SUBSCRIBE old/# at QoS 0.
    s.write_all(&[
        0x10, 17, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x02, 0, 60, 0, 3, b'o', b'l', b'd',
        0x82, 10, 0, 1, 0, 5, b'o', b'l', b'd', b'/', b'#', 0,
    ])
    .await
    .unwrap();
    let mut reply = [0u8; 9];
    within("CONNACK and SUBACK", s.read_exact(&mut reply))
        .await
        .unwrap();
    assert_eq!(reply, [0x20, 2, 0, 0, 0x90, 3, 0, 1, 0]);
    assert_eq!(gw.post("/topics/old/x", "hi").await.status(), 204);
    let mut publish = [0u8; 11];
    within("the publish", s.read_exact(&mut publish))
        .await
        .unwrap();
    assert_eq!(
        publish,
        [0x30, 9, 0, 5, b'o', b'l', b'd', b'/', b'x', b'h', b'i']
    );
}

#[tokio::test]
async fn unsupported_protocol_levels_get_connack_1_and_garbage_is_dropped() {
    let gw = TestGateway::start().await;
    let (_c, mut rx) = gw.mqtt_v4("bystander", &[("ok/#", 0)]).await;
    // MQTT 3.1.1 §3.1.2.2, as Mosquitto answers: CONNACK "unacceptable protocol level", then
    // the connection closes. `MQIsdp` is MQTT 3.1 only at level 3.
    let mqisdp = vec![
        0x10, 14, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 4, 0x02, 0, 60, 0, 0,
    ];
    let level = |level: u8| {
        vec![
            0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', level, 0x02, 0, 60, 0, 0,
        ]
    };
    for (i, connect) in [mqisdp, level(3), level(6), level(0x83)]
        .into_iter()
        .enumerate()
    {
        let mut s = tokio::net::TcpStream::connect(gw.mqtt).await.unwrap();
        s.write_all(&connect).await.unwrap();
        assert_eq!(
            read_to_close(&mut s).await,
            [0x20, 2, 0, 1],
            "case {i}: CONNACK 0x01, then closed"
        );
    }
    // Not a CONNECT of any MQTT, or lengths that do not add up: closed without a reply.
    let mut wrong_name = level(3);
    wrong_name[7] = b's';
    let mut name_past_packet = level(6);
    name_past_packet[1] = 6;
    for junk in [
        wrong_name,
        name_past_packet,
        vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x7f],
        vec![0xff; 64],
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
    ] {
        let mut s = tokio::net::TcpStream::connect(gw.mqtt).await.unwrap();
        s.write_all(&junk).await.unwrap();
        let got = read_to_close(&mut s).await;
        assert!(
            got.is_empty(),
            "closed without a reply for {junk:?}: {got:?}"
        );
    }
    // A new client still gets in, and the one already there still gets its messages.
    let (_c2, mut rx2) = gw.mqtt_v4("newcomer", &[("ok/#", 0)]).await;
    assert_eq!(gw.post("/topics/ok/still", "1").await.status(), 204);
    assert_eq!(&recv(&mut rx).await.payload[..], b"1");
    assert_eq!(&recv(&mut rx2).await.payload[..], b"1");
}

#[tokio::test]
async fn publishes_to_sys_reach_nobody() {
    let gw = TestGateway::start().await;
    let (_c, mut rx) = gw.mqtt_v4("watch", &[("#", 0)]).await;
    let (bad, _) = gw.mqtt_v4("bad", &[]).await;
    bad.publish("$SYS/fake", rumqttc::QoS::AtMostOnce, false, "x")
        .await
        .unwrap();
    assert_eq!(gw.post("/topics/after", "y").await.status(), 204);
    let p = recv(&mut rx).await;
    assert_eq!(p.topic, "after", "the $ publish reached nobody");
    assert_eq!(gw.get("/topics/%24SYS/fake").await.status(), 404);
}

#[tokio::test]
async fn the_listener_closes_when_the_gateway_stops() {
    let gw = TestGateway::start().await;
    let mqtt = gw.mqtt;
    gw.stop().await.expect("clean stop");
    eventually("the MQTT port is closed", || async {
        tokio::net::TcpStream::connect(mqtt)
            .await
            .is_err()
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_keeps_up_gets_a_whole_qos0_burst() {
    // A one-message queue to the gateway's store, and a burst far larger than the router's
    // buffer for one connection: the subscriber is paused by the router (Unschedule) and woken
    // again many times, and the publisher is slowed, not its messages dropped.
    let gw = TestGateway::start_with(|c| c.bridge.link_buffer = 1).await;
    let (_sub, mut rx) = gw.mqtt_v4("burst-sub", &[("flood/#", 0)]).await;
    let (c, _) = gw.mqtt_v4("flood", &[]).await;
    const COUNT: u32 = 20_000;
    let publisher = async {
        for i in 0..COUNT {
            c.publish(
                "flood/x",
                rumqttc::QoS::AtMostOnce,
                false,
                i.to_be_bytes().to_vec(),
            )
            .await
            .unwrap();
        }
    };
    let subscriber = async {
        let mut next = 0u32;
        while next < COUNT {
            let p = recv(&mut rx).await;
            let n = u32::from_be_bytes(p.payload[..4].try_into().unwrap());
            assert_eq!(n, next, "messages arrive whole and in order");
            next += 1;
        }
    };
    tokio::join!(publisher, subscriber);
    c.publish("flood/last", rumqttc::QoS::AtLeastOnce, true, "end")
        .await
        .unwrap();
    eventually(
        "the last message reaches the store after the flood",
        || async { (gw.get("/topics/flood/last").await.status() == 200).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn retain_as_published_keeps_the_retain_flag_on_live_messages() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{Filter, RetainForwardRule};
    let gw = TestGateway::start().await;
    let (rap, mut rap_rx) = gw.mqtt_v5("rap-sub", &[]).await;
    rap.subscribe_many(vec![Filter {
        path: "rap/#".to_owned(),
        qos: QoS::AtLeastOnce,
        nolocal: false,
        preserve_retain: true,
        retain_forward_rule: RetainForwardRule::Never,
    }])
    .await
    .unwrap();
    let (_plain, mut plain_rx) = gw.mqtt_v5("plain-sub", &[("rap/#", 1)]).await;
    // The subscription is live once a probe comes through.
    let deadline = tokio::time::Instant::now() + crate::support::DEADLINE;
    loop {
        gw.post("/topics/rap/probe", "p").await;
        let wait = tokio::time::Duration::from_millis(50);
        if let Ok(Some(_)) = tokio::time::timeout(wait, rap_rx.recv()).await {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the Retain As Published subscription is live"
        );
    }
    // Probes may still be on their way; everything after them is in publish order.
    async fn next_after_probes(
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Publish>,
    ) -> rumqttc::v5::mqttbytes::v5::Publish {
        loop {
            let p = recv(rx).await;
            if &p.topic[..] != b"rap/probe" {
                return p;
            }
        }
    }

    let (publisher, _) = gw.mqtt_v4("rap-pub", &[]).await;
    publisher
        .publish("rap/x", rumqttc::QoS::AtLeastOnce, true, "1")
        .await
        .unwrap();
    let p = next_after_probes(&mut rap_rx).await;
    assert_eq!(
        (&p.topic[..], p.retain),
        (&b"rap/x"[..], true),
        "as published"
    );
    let p = next_after_probes(&mut plain_rx).await;
    assert_eq!(
        (&p.topic[..], p.retain),
        (&b"rap/x"[..], false),
        "cleared by default"
    );
    // A retained publish over HTTP too; a plain one stays plain.
    assert_eq!(
        gw.post("/topics/rap/y?retain=true", "2").await.status(),
        204
    );
    assert_eq!(gw.post("/topics/rap/z", "3").await.status(), 204);
    let p = recv(&mut rap_rx).await;
    assert_eq!((&p.topic[..], p.retain), (&b"rap/y"[..], true));
    let p = recv(&mut rap_rx).await;
    assert_eq!((&p.topic[..], p.retain), (&b"rap/z"[..], false));
}

#[tokio::test]
async fn topics_starting_with_a_multibyte_character_are_routed() {
    // rumqttd's topic matcher slices a topic's first byte as a `str`: a first character of two or
    // more bytes panicked the router thread, and with it the whole broker.
    let gw = TestGateway::start().await;
    let (_all, mut all) = gw.mqtt_v4("mb-all", &[("#", 0)]).await;
    let (_lit, mut lit) = gw.mqtt_v5("mb-literal", &[("é/#", 0), ("温度", 0)]).await;
    let (_plus, mut plus) = gw.mqtt_v4("mb-plus", &[("+/x", 0)]).await;
    let (_shared, mut shared) = gw.mqtt_v4("mb-shared", &[("$share/g/é/x", 0)]).await;
    let (publisher, _) = gw.mqtt_v4("mb-pub", &[]).await;

    publisher
        .publish("é/x", rumqttc::QoS::AtLeastOnce, false, "1")
        .await
        .unwrap();
    assert_eq!(recv(&mut all).await.topic, "é/x");
    assert_eq!(&recv(&mut lit).await.topic[..], "é/x".as_bytes());
    assert_eq!(recv(&mut plus).await.topic, "é/x");
    assert_eq!(recv(&mut shared).await.topic, "é/x");

    assert_eq!(
        gw.post("/topics/%E6%B8%A9%E5%BA%A6", "2").await.status(),
        204
    );
    assert_eq!(recv(&mut all).await.topic, "温度");
    assert_eq!(&recv(&mut lit).await.topic[..], "温度".as_bytes());

    // A topic that starts with U+0001 stays itself too (MQTT clients may not send control
    // characters, as with Mosquitto; HTTP may).
    assert_eq!(gw.put("/topics/%01a", "3").await.status(), 204);
    assert_eq!(recv(&mut all).await.topic, "\u{1}a");
    assert_eq!(
        gw.get("/readyz").await.status(),
        200,
        "the broker link is up"
    );
    let (_late, mut late) = gw.mqtt_v4("mb-late", &[("+", 0)]).await;
    let p = recv(&mut late).await;
    assert_eq!((p.topic.as_str(), p.retain), ("\u{1}a", true));
}

/// CONNECT (MQTT 3.1.1, clean session, keep-alive 60) for `client_id`.
fn connect_as(client_id: &str) -> Vec<u8> {
    let id = client_id.as_bytes();
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    body.extend_from_slice(&u16::try_from(id.len()).unwrap().to_be_bytes());
    body.extend_from_slice(id);
    let mut packet = vec![0x10, u8::try_from(body.len()).unwrap()];
    packet.extend(body);
    packet
}

/// Connects `client_id` over raw TCP: the open stream if a CONNACK accepting it arrives, `None`
/// if the connection is closed without one.
async fn try_connect(gw: &TestGateway, client_id: &str) -> Option<tokio::net::TcpStream> {
    let mut s = tokio::net::TcpStream::connect(gw.mqtt).await.ok()?;
    s.write_all(&connect_as(client_id)).await.ok()?;
    let mut connack = [0u8; 4];
    within("a CONNACK or a close", s.read_exact(&mut connack))
        .await
        .ok()?;
    (connack == [0x20, 2, 0, 0]).then_some(s)
}

#[tokio::test]
async fn a_client_refused_at_max_connections_can_come_back() {
    let gw = TestGateway::start_with(|c| c.mqtt.max_connections = 1).await;
    let mut holder = eventually("the only free connection", || try_connect(&gw, "holder")).await;
    // Full: MQTT 3.1.1 "server unavailable", MQTT 5 "quota exceeded", and the connection ends.
    for (connect, refusal) in [
        (connect_as("comeback"), [0x20, 2, 0, 3]),
        (
            vec![
                0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0, 0, 0,
            ],
            [0x20, 3, 0, 0x97],
        ),
    ] {
        let mut s = tokio::net::TcpStream::connect(gw.mqtt).await.unwrap();
        s.write_all(&connect).await.unwrap();
        let mut reply = Vec::new();
        within("the refusal and the close", s.read_to_end(&mut reply))
            .await
            .unwrap();
        assert_eq!(
            reply.get(..4),
            Some(&refusal[..]),
            "refused while the broker is full"
        );
    }
    holder.write_all(&[0xE0, 0]).await.unwrap();
    drop(holder);
    // Once the holder's slot is free, the refused client id connects like any other, and
    // after it another one.
    let mut back = eventually("the refused client back", || try_connect(&gw, "comeback")).await;
    back.write_all(&[0xE0, 0]).await.unwrap();
    drop(back);
    eventually("one more client", || try_connect(&gw, "after")).await;
}

#[tokio::test]
async fn clients_resetting_before_their_connack_leave_nothing_behind() {
    let gw = TestGateway::start_with(|c| c.mqtt.max_connections = 3).await;
    let (_watch, mut rx) = gw.mqtt_v4("reset-watch", &[("reset/#", 0)]).await;
    // Each resets right after its CONNECT: many of them before the CONNACK is written. The same
    // client id comes back every time, and new ids are used too; a leaked session would soon
    // fill the two free connections.
    for i in 0..40 {
        let id = if i % 2 == 0 {
            "flaky".to_owned()
        } else {
            format!("flaky-{i}")
        };
        // While the listener is renewed, a connection may be refused: so be it.
        let Ok(mut s) = tokio::net::TcpStream::connect(gw.mqtt).await else {
            continue;
        };
        s.set_zero_linger().unwrap();
        let _ = s.write_all(&connect_as(&id)).await;
        drop(s);
    }
    for id in ["flaky", "flaky-1", "fresh"] {
        let mut s = eventually("a client after the resets", || try_connect(&gw, id)).await;
        s.write_all(&[0xE0, 0]).await.unwrap();
    }
    assert_eq!(gw.post("/topics/reset/after", "ok").await.status(), 204);
    assert_eq!(&recv(&mut rx).await.payload[..], b"ok");
}
