//! CoAP Observe and block-wise transfer over real UDP: notifications from every protocol,
//! deregistration, dead observers, the latest-value rule, caps, Block2 and Block1.

use std::time::Duration;

use coap_lite::{CoapOption, MessageType, Packet, RequestType};

use crate::coap_client::{CoapClient, block, code, set_block, set_uint, text, uint_option};
use crate::support::{TestGateway, eventually, metric};

/// Registers an observation of `target` and returns the registration response.
async fn observe(coap: &CoapClient, target: &str) -> (Packet, Packet) {
    let mut req = coap.request(RequestType::Get, target);
    set_uint(&mut req, CoapOption::Observe, 0);
    let resp = coap.call(req.clone()).await;
    (req, resp)
}

/// The next notification for `token`, skipping anything else.
async fn notification(coap: &CoapClient, token: &[u8]) -> Packet {
    loop {
        let p = coap.recv().await;
        if p.get_token() == token {
            return p;
        }
    }
}

/// Publishes 1, 2, ... over HTTP until a notification comes confirmable, which must happen
/// within 100 (never acknowledging any); returns it.
async fn publish_until_confirmable(
    gw: &TestGateway,
    coap: &CoapClient,
    req: &Packet,
    path: &str,
) -> Packet {
    for i in 1..=100 {
        gw.post(path, i.to_string()).await;
        let n = notification(coap, req.get_token()).await;
        assert_eq!(text(&n), i.to_string());
        if n.header.get_type() == MessageType::Confirmable {
            return n;
        }
    }
    panic!("no confirmable notification within 100");
}

#[tokio::test]
async fn observers_are_notified_of_publishes_from_every_protocol() {
    let gw = TestGateway::start().await;
    let coap = CoapClient::new(gw.coap).await;
    let (req, resp) = observe(&coap, "topics/home/temp").await;
    assert_eq!(
        code(&resp),
        "2.05",
        "registered although nothing is retained"
    );
    assert!(resp.payload.is_empty());
    let mut last = uint_option(&resp, CoapOption::Observe).expect("Observe in the response");
    assert_eq!(metric(&gw, "topicgate_coap_observers").await, 1.0);

    let (mqtt, _rx) = gw.mqtt_v4("obs-pub", &[]).await;
    let other = CoapClient::new(gw.coap).await;
    assert_eq!(gw.post("/topics/home/temp", "21.5").await.status(), 204);
    let n = notification(&coap, req.get_token()).await;
    assert_eq!((code(&n), text(&n)), ("2.05".to_owned(), "21.5".to_owned()));
    let mut seen = vec![n];
    mqtt.publish("home/temp", rumqttc::QoS::AtLeastOnce, false, "22")
        .await
        .unwrap();
    seen.push(notification(&coap, req.get_token()).await);
    let mut put = other.request(RequestType::Put, "topics/home/temp");
    set_uint(&mut put, CoapOption::ContentFormat, 0);
    put.payload = b"23".to_vec();
    assert_eq!(code(&other.call(put).await), "2.04");
    seen.push(notification(&coap, req.get_token()).await);
    assert_eq!(
        seen.iter().map(text).collect::<Vec<_>>(),
        ["21.5", "22", "23"]
    );
    for n in &seen {
        assert_eq!(n.header.get_type(), MessageType::NonConfirmable);
        let seq = uint_option(n, CoapOption::Observe).unwrap();
        assert!(seq > last, "sequence numbers increase");
        last = seq;
    }
    assert_eq!(uint_option(&seen[2], CoapOption::ContentFormat), Some(0));

    // Deregistering ends it.
    let mut cancel = coap.request(RequestType::Get, "topics/home/temp");
    cancel.set_token(req.get_token().to_vec());
    set_uint(&mut cancel, CoapOption::Observe, 1);
    let resp = coap.call(cancel).await;
    assert_eq!(code(&resp), "2.05");
    assert_eq!(text(&resp), "23");
    assert_eq!(resp.get_first_option(CoapOption::Observe), None);
    assert_eq!(metric(&gw, "topicgate_coap_observers").await, 0.0);
    assert_eq!(
        metric(
            &gw,
            "topicgate_coap_observers_removed_total{reason=\"deregistered\"}"
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn filter_observers_get_one_json_envelope_per_publish() {
    let gw = TestGateway::start().await;
    assert_eq!(
        gw.client
            .put(gw.url("/topics/home/a"))
            .body("1")
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    let coap = CoapClient::new(gw.coap).await;
    let (req, resp) = observe(&coap, "topics/home/+").await;
    assert_eq!(uint_option(&resp, CoapOption::ContentFormat), Some(50));
    let listing: serde_json::Value = serde_json::from_slice(&resp.payload).unwrap();
    assert_eq!(listing["messages"][0]["topic"], "home/a");
    gw.post("/topics/office/x", "no").await;
    gw.post("/topics/home/b", "2").await;
    let n = notification(&coap, req.get_token()).await;
    let body: serde_json::Value = serde_json::from_slice(&n.payload).unwrap();
    assert_eq!(body["messages"].as_array().unwrap().len(), 1);
    assert_eq!(body["messages"][0]["topic"], "home/b");
    assert_eq!(body["messages"][0]["payload"], "2");
    assert_eq!(body["next"], serde_json::Value::Null);
}

#[tokio::test]
async fn a_reset_ends_an_observation() {
    let gw = TestGateway::start().await;
    let coap = CoapClient::new(gw.coap).await;
    let (req, _) = observe(&coap, "topics/rst").await;
    gw.post("/topics/rst", "1").await;
    let n = notification(&coap, req.get_token()).await;
    coap.reset(n.header.message_id).await;
    eventually("the observer is removed", || async {
        (metric(&gw, "topicgate_coap_observers").await == 0.0).then_some(())
    })
    .await;
    assert_eq!(
        metric(
            &gw,
            "topicgate_coap_observers_removed_total{reason=\"reset\"}"
        )
        .await,
        1.0
    );
    // A later publish reaches a fresh observer but not the reset one.
    let fresh = CoapClient::new(gw.coap).await;
    let (fresh_req, _) = observe(&fresh, "topics/rst").await;
    gw.post("/topics/rst", "2").await;
    assert_eq!(
        text(&notification(&fresh, fresh_req.get_token()).await),
        "2"
    );
    assert!(coap.try_recv(Duration::from_millis(200)).await.is_none());
}

#[tokio::test]
async fn an_observer_that_stops_acknowledging_is_removed_and_a_slow_one_gets_the_latest() {
    let gw = TestGateway::start_with(|c| {
        c.coap.ack_timeout = Duration::from_millis(300);
        c.coap.max_retransmit = 1;
    })
    .await;
    let coap = CoapClient::new(gw.coap).await;
    let (req, _) = observe(&coap, "topics/slow").await;
    let con = publish_until_confirmable(&gw, &coap, &req, "/topics/slow").await;
    // While it waits for its ACK, newer values replace each other.
    for v in ["a", "b", "c"] {
        gw.post("/topics/slow", v).await;
    }
    let again = notification(&coap, req.get_token()).await;
    assert_eq!(
        again.header.message_id, con.header.message_id,
        "retransmitted"
    );
    assert_eq!(text(&again), text(&con));
    coap.ack(con.header.message_id).await;
    assert_eq!(text(&notification(&coap, req.get_token()).await), "c");
    gw.post("/topics/slow", "d").await;
    assert_eq!(text(&notification(&coap, req.get_token()).await), "d");
    assert!(metric(&gw, "topicgate_coap_retransmissions_total").await >= 1.0);

    // Another observer that never acknowledges is given up after the retransmissions.
    let deaf = CoapClient::new(gw.coap).await;
    let (deaf_req, _) = observe(&deaf, "topics/deaf").await;
    publish_until_confirmable(&gw, &deaf, &deaf_req, "/topics/deaf").await;
    eventually("the deaf observer is removed", || async {
        let gone = metric(
            &gw,
            "topicgate_coap_observers_removed_total{reason=\"timeout\"}",
        )
        .await;
        (gone == 1.0).then_some(())
    })
    .await;
    assert_eq!(metric(&gw, "topicgate_coap_observers").await, 1.0);
}

#[tokio::test]
async fn observers_are_capped_and_told_at_shutdown() {
    let gw = TestGateway::start_with(|c| c.coap.max_observers = 1).await;
    let coap = CoapClient::new(gw.coap).await;
    let (req, resp) = observe(&coap, "topics/cap/a").await;
    assert_eq!(code(&resp), "2.05");
    let (_, resp) = observe(&coap, "topics/cap/b").await;
    assert_eq!(code(&resp), "5.03");
    assert_eq!(uint_option(&resp, CoapOption::MaxAge), Some(1));
    // Re-registering with the same token replaces rather than adds.
    let mut again = req.clone();
    again.header.message_id = again.header.message_id.wrapping_add(1000);
    let resp = coap.call(again).await;
    assert_eq!(code(&resp), "2.05");
    gw.stop().await.unwrap();
    let last = notification(&coap, req.get_token()).await;
    assert_eq!(code(&last), "5.03");
    assert_eq!(last.get_first_option(CoapOption::Observe), None);
}

#[tokio::test]
async fn large_values_travel_in_blocks_both_ways() {
    let gw = TestGateway::start_with(|c| c.max_payload = 8192).await;
    let value: Vec<u8> = (0..5000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let r = gw
        .client
        .put(gw.url("/topics/big/down"))
        .body(value.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let coap = CoapClient::new(gw.coap).await;

    // Block2 in the server's 1 KiB blocks, then in the 64-byte blocks a client asks for.
    for (szx, size) in [(6u8, 1024usize), (2, 64)] {
        let mut got = Vec::new();
        let mut etag = None;
        for num in 0.. {
            let mut req = coap.request(RequestType::Get, "topics/big/down");
            if num > 0 || szx != 6 {
                set_block(&mut req, CoapOption::Block2, num, false, szx);
            }
            let resp = coap.call(req).await;
            assert_eq!(code(&resp), "2.05");
            let (n, more, s) = block(&resp, CoapOption::Block2).expect("Block2");
            assert_eq!((n, s), (num, szx));
            if num == 0 {
                assert_eq!(uint_option(&resp, CoapOption::Size2), Some(5000));
            }
            let tag = resp.get_first_option(CoapOption::ETag).cloned();
            assert!(etag.is_none() || etag == tag, "one representation");
            etag = tag;
            assert!(resp.payload.len() <= size);
            got.extend_from_slice(&resp.payload);
            if !more {
                break;
            }
        }
        assert_eq!(got, value);
    }
    let mut past = coap.request(RequestType::Get, "topics/big/down");
    set_block(&mut past, CoapOption::Block2, 5, false, 6);
    assert_eq!(code(&coap.call(past).await), "4.02");

    // Block1: three blocks, acknowledged with 2.31 until the last.
    let upload: Vec<u8> = value.iter().rev().copied().take(2500).collect();
    for (num, chunk) in upload.chunks(1024).enumerate() {
        let last = (num + 1) * 1024 >= upload.len();
        let mut req = coap.request(RequestType::Put, "topics/big/up");
        set_block(&mut req, CoapOption::Block1, num as u32, !last, 6);
        req.payload = chunk.to_vec();
        let resp = coap.call(req).await;
        assert_eq!(code(&resp), if last { "2.04" } else { "2.31" });
        assert_eq!(
            block(&resp, CoapOption::Block1),
            Some((num as u32, !last, 6))
        );
    }
    let r = gw.get("/topics/big/up").await;
    assert_eq!(&r.bytes().await.unwrap()[..], &upload[..]);

    // A missing block, and an upload that grows past the limit.
    let mut skip = coap.request(RequestType::Put, "topics/big/gap");
    set_block(&mut skip, CoapOption::Block1, 1, true, 6);
    skip.payload = vec![0; 1024];
    assert_eq!(code(&coap.call(skip).await), "4.08");
    let mut status = String::new();
    for num in 0..9 {
        let mut req = coap.request(RequestType::Put, "topics/big/huge");
        set_block(&mut req, CoapOption::Block1, num, true, 6);
        req.payload = vec![0; 1024];
        let resp = coap.call(req).await;
        status = code(&resp);
        if status != "2.31" {
            assert_eq!(uint_option(&resp, CoapOption::Size1), Some(8192));
            break;
        }
    }
    assert_eq!(status, "4.13");
    let mut announced = coap.request(RequestType::Put, "topics/big/huge");
    set_block(&mut announced, CoapOption::Block1, 0, true, 6);
    set_uint(&mut announced, CoapOption::Size1, 100_000);
    announced.payload = vec![0; 1024];
    assert_eq!(code(&coap.call(announced).await), "4.13");
    assert_eq!(gw.get("/topics/big/huge").await.status(), 404);
}

#[tokio::test]
async fn a_notification_larger_than_a_block_carries_the_first_block() {
    let gw = TestGateway::start().await;
    let coap = CoapClient::new(gw.coap).await;
    let mut req = coap.request(RequestType::Get, "topics/big/obs");
    set_uint(&mut req, CoapOption::Observe, 0);
    set_block(&mut req, CoapOption::Block2, 0, false, 4);
    let resp = coap.call(req.clone()).await;
    assert_eq!(code(&resp), "2.05");
    let value: Vec<u8> = (0..600u32).map(|i| b'A' + (i % 26) as u8).collect();
    let r = gw
        .client
        .put(gw.url("/topics/big/obs"))
        .body(value.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    // The registration asked for 256-byte blocks: the notification is the first of three.
    let n = notification(&coap, req.get_token()).await;
    assert_eq!(block(&n, CoapOption::Block2), Some((0, true, 4)));
    assert_eq!(uint_option(&n, CoapOption::Size2), Some(600));
    let etag = n.get_first_option(CoapOption::ETag).cloned();
    let mut got = n.payload.clone();
    for num in 1..3 {
        let mut more = coap.request(RequestType::Get, "topics/big/obs");
        set_block(&mut more, CoapOption::Block2, num, false, 4);
        let part = coap.call(more).await;
        assert_eq!(part.get_first_option(CoapOption::ETag).cloned(), etag);
        got.extend_from_slice(&part.payload);
    }
    assert_eq!(got, value);
}
