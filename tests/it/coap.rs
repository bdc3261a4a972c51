//! CoAP over real UDP: reads, publishes, deduplication, errors and discovery, against MQTT and
//! HTTP peers on the same gateway.

use coap_lite::{CoapOption, RequestType};

use crate::coap_client::{CoapClient, code, set_uint, text, uint_option};
use crate::support::{TestGateway, eventually, metric, recv};

#[tokio::test]
async fn get_reads_a_value_retained_over_mqtt_with_its_metadata() {
    let gw = TestGateway::start().await;
    let (mqtt, _rx) = gw.mqtt_v5("coap-pub", &[]).await;
    let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
        content_type: Some("application/json".into()),
        ..Default::default()
    };
    mqtt.publish_with_properties(
        "home/hum",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        true,
        "{\"rh\":40}",
        props,
    )
    .await
    .unwrap();
    let coap = CoapClient::new(gw.coap).await;
    let resp = eventually("the retained value over CoAP", || async {
        let resp = coap
            .call(coap.request(RequestType::Get, "topics/home/hum"))
            .await;
        (code(&resp) == "2.05").then_some(resp)
    })
    .await;
    assert_eq!(text(&resp), "{\"rh\":40}");
    assert_eq!(uint_option(&resp, CoapOption::ContentFormat), Some(50));
    assert_eq!(uint_option(&resp, CoapOption::MaxAge), Some(60));
    let etag = resp.get_first_option(CoapOption::ETag).unwrap().clone();
    assert_eq!(etag.len(), 8);

    // The /ps alias, and validation with the ETag the client holds.
    let mut req = coap.request(RequestType::Get, "ps/home/hum");
    req.add_option(CoapOption::ETag, etag.clone());
    let resp = coap.call(req).await;
    assert_eq!(code(&resp), "2.03");
    assert!(resp.payload.is_empty());
    assert_eq!(resp.get_first_option(CoapOption::ETag), Some(&etag));

    // Content negotiation: it is JSON, not CBOR.
    let mut req = coap.request(RequestType::Get, "topics/home/hum");
    set_uint(&mut req, CoapOption::Accept, 60);
    assert_eq!(code(&coap.call(req).await), "4.06");

    let resp = coap
        .call(coap.request(RequestType::Get, "topics/home/none"))
        .await;
    assert_eq!(code(&resp), "4.04");
    assert_eq!(text(&resp), "nothing is retained on home/none");
}

#[tokio::test]
async fn put_and_post_reach_mqtt_and_http_with_content_format() {
    let gw = TestGateway::start().await;
    let (_sub, mut rx) = gw.mqtt_v4("coap-sub", &[("dev/#", 1)]).await;
    let coap = CoapClient::new(gw.coap).await;

    let mut put = coap.request(RequestType::Put, "topics/dev/cbor");
    set_uint(&mut put, CoapOption::ContentFormat, 60);
    put.payload = vec![0xa1, 0x61, 0x61, 0x01];
    assert_eq!(code(&coap.call(put).await), "2.04");
    let p = recv(&mut rx).await;
    assert_eq!((p.topic.as_str(), p.retain), ("dev/cbor", false));
    assert_eq!(&p.payload[..], [0xa1, 0x61, 0x61, 0x01]);
    let r = gw.get("/topics/dev/cbor").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/cbor");

    // JSON published over HTTP reads back as Content-Format 50.
    let r = gw
        .client
        .put(gw.url("/topics/dev/json"))
        .header("content-type", "application/json")
        .body("[1]")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    recv(&mut rx).await;
    let resp = coap
        .call(coap.request(RequestType::Get, "topics/dev/json"))
        .await;
    assert_eq!(uint_option(&resp, CoapOption::ContentFormat), Some(50));

    // POST: CON defaults to QoS 1, NON to QoS 0, ?qos= overrides; ?retain=true retains.
    let mut post = coap.request(RequestType::Post, "topics/dev/con?retain=true");
    post.payload = b"c".to_vec();
    assert_eq!(code(&coap.call(post).await), "2.04");
    let mut non = coap.request(RequestType::Post, "topics/dev/non?retain=true");
    non.payload = b"n".to_vec();
    non.header.set_type(coap_lite::MessageType::NonConfirmable);
    let resp = coap.call(non).await;
    assert_eq!(
        resp.header.get_type(),
        coap_lite::MessageType::NonConfirmable
    );
    assert_eq!(code(&resp), "2.04");
    let mut post = coap.request(
        RequestType::Post,
        "topics/dev/two?retain=true&qos=2&expiry=60",
    );
    post.payload = b"2".to_vec();
    assert_eq!(code(&coap.call(post).await), "2.04");
    let mut plain = coap.request(RequestType::Post, "topics/dev/plain");
    plain.payload = b"p".to_vec();
    assert_eq!(code(&coap.call(plain).await), "2.04");
    for _ in 0..4 {
        recv(&mut rx).await;
    }
    let list: serde_json::Value = gw.get("/topics/dev/%23").await.json().await.unwrap();
    let qos_of = |topic: &str| {
        list["messages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["topic"] == topic)
            .map(|m| (m["qos"].as_u64().unwrap(), m["retain"].as_bool().unwrap()))
    };
    assert_eq!(qos_of("dev/con"), Some((1, true)), "{list}");
    assert_eq!(qos_of("dev/non"), Some((0, true)));
    assert_eq!(qos_of("dev/two"), Some((2, true)));
    assert_eq!(qos_of("dev/plain"), None, "a plain POST is not retained");
    let two = list["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["topic"] == "dev/two")
        .unwrap();
    assert!(
        two["properties"]["message_expiry_interval"]
            .as_u64()
            .unwrap()
            <= 60
    );
    assert_eq!(
        metric(
            &gw,
            "topicgate_coap_requests_total{method=\"POST\",code=\"2.04\"}"
        )
        .await,
        4.0
    );
    assert!(metric(&gw, "topicgate_publishes_total{protocol=\"coap\"}").await >= 5.0);
}

#[tokio::test]
async fn delete_clears_for_every_protocol() {
    let gw = TestGateway::start().await;
    let coap = CoapClient::new(gw.coap).await;
    let mut put = coap.request(RequestType::Put, "topics/del/me");
    put.payload = b"v".to_vec();
    assert_eq!(code(&coap.call(put).await), "2.04");
    let (_sub, mut rx) = gw.mqtt_v4("coap-del", &[("del/me", 0)]).await;
    assert_eq!(
        &recv(&mut rx).await.payload[..],
        b"v",
        "retained on subscribe"
    );
    let del = coap.request(RequestType::Delete, "topics/del/me");
    assert_eq!(code(&coap.call(del).await), "2.02");
    assert!(recv(&mut rx).await.payload.is_empty());
    assert_eq!(gw.get("/topics/del/me").await.status(), 404);
    let del = coap.request(RequestType::Delete, "topics/del/me");
    assert_eq!(code(&coap.call(del).await), "4.04");
}

#[tokio::test]
async fn bad_requests_get_coap_error_codes() {
    let gw = TestGateway::start_with(|c| c.max_payload = 2048).await;
    let coap = CoapClient::new(gw.coap).await;
    let cases: Vec<(&str, coap_lite::Packet, &str)> = vec![
        (
            "wildcard topic",
            coap.request(RequestType::Put, "topics/a/+"),
            "4.00",
        ),
        (
            "$ topic",
            coap.request(RequestType::Post, "topics/$SYS/x"),
            "4.00",
        ),
        (
            "empty topic",
            coap.request(RequestType::Put, "topics"),
            "4.00",
        ),
        (
            "bad qos",
            coap.request(RequestType::Post, "topics/a?qos=3"),
            "4.00",
        ),
        (
            "bad expiry",
            coap.request(RequestType::Post, "topics/a?expiry=0"),
            "4.00",
        ),
        (
            "unknown query",
            coap.request(RequestType::Post, "topics/a?foo=1"),
            "4.00",
        ),
        (
            "PUT without retain",
            coap.request(RequestType::Put, "topics/a?retain=false"),
            "4.00",
        ),
        (
            "no such resource",
            coap.request(RequestType::Get, "other/a"),
            "4.04",
        ),
        (
            "method",
            coap.request(RequestType::Fetch, "topics/a"),
            "4.05",
        ),
        (
            "discovery method",
            coap.request(RequestType::Post, ".well-known/core"),
            "4.05",
        ),
    ];
    for (what, req, want) in cases {
        let resp = coap.call(req).await;
        assert_eq!(code(&resp), want, "{what}: {}", text(&resp));
    }
    let mut req = coap.request(RequestType::Put, "topics/a/+");
    req.payload = b"x".to_vec();
    assert_eq!(
        text(&coap.call(req).await),
        "a topic to publish to cannot contain the wildcards '+' or '#'"
    );

    let mut critical = coap.request(RequestType::Get, "topics/a");
    critical.add_option(CoapOption::Unknown(65001), b"x".to_vec());
    let resp = coap.call(critical).await;
    assert_eq!(code(&resp), "4.02");
    let mut elective = coap.request(RequestType::Get, "topics/a");
    elective.add_option(CoapOption::Unknown(65000), b"x".to_vec());
    assert_eq!(code(&coap.call(elective).await), "4.04");

    let mut odd_format = coap.request(RequestType::Put, "topics/a");
    set_uint(&mut odd_format, CoapOption::ContentFormat, 9999);
    assert_eq!(code(&coap.call(odd_format).await), "4.15");

    let mut big = coap.request(RequestType::Put, "topics/a");
    big.payload = vec![b'x'; 3000];
    let resp = coap.call(big).await;
    assert_eq!(code(&resp), "4.13");
    assert_eq!(uint_option(&resp, CoapOption::Size1), Some(2048));
    assert_eq!(
        gw.get("/topics/a").await.status(),
        404,
        "nothing was published"
    );
}

#[tokio::test]
async fn a_duplicate_is_answered_from_the_cache_and_published_once() {
    let gw = TestGateway::start().await;
    let (_sub, mut rx) = gw.mqtt_v4("coap-dup", &[("dup/#", 1)]).await;
    let coap = CoapClient::new(gw.coap).await;
    let mut post = coap.request(RequestType::Post, "topics/dup/x");
    post.payload = b"once".to_vec();
    let bytes = post.to_bytes_unlimited().unwrap();
    coap.send_raw(&bytes).await;
    let first = coap.recv_raw().await;
    coap.send_raw(&bytes).await;
    let second = coap.recv_raw().await;
    assert_eq!(first, second, "the duplicate gets the same response");
    assert_eq!(&recv(&mut rx).await.payload[..], b"once");
    // A sentinel published afterwards is the next message: the duplicate was not published.
    let mut sentinel = coap.request(RequestType::Post, "topics/dup/x");
    sentinel.payload = b"sentinel".to_vec();
    assert_eq!(code(&coap.call(sentinel).await), "2.04");
    assert_eq!(&recv(&mut rx).await.payload[..], b"sentinel");
    assert_eq!(metric(&gw, "topicgate_coap_duplicates_total").await, 1.0);
    // A duplicate sent the moment the response arrives is answered too, every time.
    for i in 0..30 {
        let mut post = coap.request(RequestType::Post, "topics/dup/fast");
        post.payload = format!("{i}").into_bytes();
        let bytes = post.to_bytes_unlimited().unwrap();
        coap.send_raw(&bytes).await;
        let first = coap.recv_raw().await;
        coap.send_raw(&bytes).await;
        assert_eq!(coap.recv_raw().await, first, "repeat {i}");
    }
    for i in 0..30 {
        assert_eq!(recv(&mut rx).await.payload, format!("{i}").into_bytes());
    }
    // The same message id from another endpoint is another request.
    let other = CoapClient::new(gw.coap).await;
    other.send_raw(&bytes).await;
    other.recv_raw().await;
    assert_eq!(&recv(&mut rx).await.payload[..], b"once");
}

#[tokio::test]
async fn malformed_datagrams_get_reset_or_silence_and_never_stop_the_endpoint() {
    let gw = TestGateway::start().await;
    let coap = CoapClient::new(gw.coap).await;
    let resets: &[(&[u8], u16)] = &[
        (&[0x49, 0x01, 0x12, 0x34], 0x1234),             // token length 9
        (&[0x4f, 0x01, 0x12, 0x35], 0x1235),             // token length 15
        (&[0x40, 0x01, 0x12, 0x36, 0xf1, 0x00], 0x1236), // option delta 15
        (&[0x40, 0x01, 0x12, 0x37, 0x1f, 0x00], 0x1237), // option length 15
        (&[0x40, 0x02, 0x12, 0x38, 0xff], 0x1238),       // payload marker, no payload
        (&[0x40, 0x00, 0x12, 0x39], 0x1239),             // ping
        (&[0x40, 0x45, 0x12, 0x3a], 0x123a),             // a response nobody asked for
        (&[0x40, 0x20, 0x12, 0x3b], 0x123b),             // reserved class 1
    ];
    for (datagram, mid) in resets {
        coap.send_raw(datagram).await;
        let rst = coap.recv_raw().await;
        assert_eq!(
            rst,
            [0x70, 0x00, (mid >> 8) as u8, *mid as u8],
            "{datagram:02x?}"
        );
    }
    // Silence: too short, another version, malformed non-confirmable, stray ACK and RST.
    for datagram in [
        &[0x40, 0x01][..],
        &[0x80, 0x01, 0, 1],
        &[0x59, 0x01, 0, 2],
        &[0x50, 0x02, 0, 3, 0xff],
        &[0x60, 0x00, 0, 4],
        &[0x70, 0x00, 0, 5],
        &[],
    ] {
        coap.send_raw(datagram).await;
    }
    // The next datagram is the answer to a valid request: nothing answered the silent ones.
    let resp = coap
        .call(coap.request(RequestType::Get, ".well-known/core"))
        .await;
    assert_eq!(code(&resp), "2.05");
    let mut unknown_method = coap.request(RequestType::Get, "topics/a");
    unknown_method.header.code = coap_lite::MessageClass::Reserved(0x1f);
    assert_eq!(code(&coap.call(unknown_method).await), "4.05");
}

#[tokio::test]
async fn discovery_lists_topics_in_link_format() {
    let gw = TestGateway::start().await;
    let r = gw
        .client
        .put(gw.url("/topics/home/temp"))
        .header("content-type", "text/plain")
        .body("21")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let coap = CoapClient::new(gw.coap).await;
    let resp = coap
        .call(coap.request(RequestType::Get, ".well-known/core"))
        .await;
    assert_eq!(code(&resp), "2.05");
    assert_eq!(uint_option(&resp, CoapOption::ContentFormat), Some(40));
    assert_eq!(
        text(&resp),
        "</topics>;rt=\"core.ps\";ct=40,</ps>;rt=\"core.ps\";ct=40,\
         </topics/home/temp>;rt=\"core.ps.data\";ct=0;obs"
    );
    let resp = coap
        .call(coap.request(RequestType::Get, ".well-known/core?rt=core.ps.data"))
        .await;
    assert_eq!(
        text(&resp),
        "</topics/home/temp>;rt=\"core.ps.data\";ct=0;obs"
    );
    let resp = coap
        .call(coap.request(RequestType::Get, ".well-known/core?href=/ps*"))
        .await;
    assert_eq!(text(&resp), "</ps>;rt=\"core.ps\";ct=40");
    let resp = coap.call(coap.request(RequestType::Get, "topics")).await;
    assert_eq!(
        text(&resp),
        "</topics/home/temp>;rt=\"core.ps.data\";ct=0;obs"
    );
}

#[tokio::test]
async fn requests_in_flight_together_are_all_answered_while_an_observer_is_notified() {
    let gw = TestGateway::start().await;
    assert!(
        gw.put("/topics/burst/x", "kept")
            .await
            .status()
            .is_success()
    );
    let watcher = CoapClient::new(gw.coap).await;
    let mut observe = watcher.request(RequestType::Get, "topics/burst/seen");
    set_uint(&mut observe, CoapOption::Observe, 0);
    assert_eq!(code(&watcher.call(observe).await), "2.05");

    // Rounds of 50 requests in flight at once (as many answers as the client's socket buffer
    // holds unread), with a publish for the observer in the middle of them.
    let coap = CoapClient::new(gw.coap).await;
    for round in 0..6 {
        let mut sent = std::collections::BTreeSet::new();
        for i in 0..50 {
            let get = coap.request(RequestType::Get, "topics/burst/x");
            sent.insert(get.header.message_id);
            coap.send(&get).await;
            if round == 3 && i == 25 {
                let post = gw.post("/topics/burst/seen", "news").await;
                assert!(post.status().is_success());
            }
        }
        let mut answered = std::collections::BTreeSet::new();
        while answered.len() < sent.len() {
            let reply = coap.recv().await;
            assert_eq!(code(&reply), "2.05");
            assert_eq!(text(&reply), "kept");
            answered.insert(reply.header.message_id);
        }
        assert_eq!(answered, sent, "every request answered once, by its own id");
    }
    let note = watcher.recv().await;
    assert_eq!(
        text(&note),
        "news",
        "the observer was not held up by the burst"
    );
}
