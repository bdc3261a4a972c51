//! HTTP publishes reach MQTT subscribers, MQTT publishes reach HTTP readers, with metadata.

use rumqttc::v5::mqttbytes::v5::PublishProperties;

use crate::support::{TestGateway, eventually, recv};

#[tokio::test]
async fn http_publish_reaches_v4_and_v5_subscribers_with_metadata() {
    let gw = TestGateway::start().await;
    let (_c4, mut v4) = gw.mqtt_v4("sub-v4", &[("home/#", 1)]).await;
    let (_c5, mut v5) = gw.mqtt_v5("sub-v5", &[("home/#", 1)]).await;

    let resp = gw
        .client
        .post(gw.url("/topics/home/temp?qos=1"))
        .header("content-type", "application/json")
        .header("mqtt-user-unit", "celsius")
        .header("mqtt-user-room", "kitchen")
        .header("mqtt-response-topic", "home/replies")
        .header("mqtt-correlation-data", "req-7")
        .body("21.5")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);

    let p = recv(&mut v4).await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("home/temp", &b"21.5"[..])
    );
    assert_eq!(p.qos, rumqttc::QoS::AtLeastOnce);
    assert!(!p.retain);

    let p = recv(&mut v5).await;
    assert_eq!(&p.topic[..], b"home/temp");
    assert_eq!(&p.payload[..], b"21.5");
    assert_eq!(p.qos, rumqttc::v5::mqttbytes::QoS::AtLeastOnce);
    let props = p.properties.expect("MQTT 5 properties");
    assert_eq!(props.content_type.as_deref(), Some("application/json"));
    assert_eq!(
        props.user_properties,
        vec![
            ("unit".to_owned(), "celsius".to_owned()),
            ("room".to_owned(), "kitchen".to_owned())
        ]
    );
    assert_eq!(props.response_topic.as_deref(), Some("home/replies"));
    assert_eq!(props.correlation_data.as_deref(), Some(&b"req-7"[..]));
}

#[tokio::test]
async fn retained_http_value_is_sent_to_later_subscribers_with_the_retain_flag() {
    let gw = TestGateway::start().await;
    let resp = gw
        .client
        .put(gw.url("/topics/home/hum"))
        .header("content-type", "text/plain;charset=utf-8")
        .body("40")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(resp.headers()["location"], "/topics/home/hum");

    let (_c4, mut v4) = gw.mqtt_v4("late-v4", &[("home/+", 0)]).await;
    let p = recv(&mut v4).await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..], p.retain),
        ("home/hum", &b"40"[..], true)
    );

    let (_c5, mut v5) = gw.mqtt_v5("late-v5", &[("home/hum", 0)]).await;
    let p = recv(&mut v5).await;
    assert!(p.retain);
    let props = p.properties.expect("properties");
    assert_eq!(
        props.content_type.as_deref(),
        Some("text/plain;charset=utf-8")
    );
}

#[tokio::test]
async fn mqtt_publishes_are_readable_over_http() {
    let gw = TestGateway::start().await;
    let (c5, _) = gw.mqtt_v5("pub-v5", &[]).await;
    let props = PublishProperties {
        content_type: Some("application/cbor".to_owned()),
        user_properties: vec![("k".to_owned(), "v".to_owned())],
        ..PublishProperties::default()
    };
    c5.publish_with_properties(
        "plant/1/raw",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        true,
        vec![0xa1u8, 0x01, 0xff],
        props,
    )
    .await
    .unwrap();
    let (c4, _) = gw.mqtt_v4("pub-v4", &[]).await;
    c4.publish("plant/2/temp", rumqttc::QoS::ExactlyOnce, true, "19")
        .await
        .unwrap();

    let resp = eventually("the MQTT 5 retained value over HTTP", || async {
        let r = gw.get("/topics/plant/1/raw").await;
        (r.status() == 200).then_some(r)
    })
    .await;
    assert_eq!(resp.headers()["content-type"], "application/cbor");
    assert_eq!(resp.headers()["mqtt-user-k"], "v");
    let etag = resp.headers()["etag"].to_str().unwrap().to_owned();
    assert!(resp.headers().contains_key("last-modified"));
    assert_eq!(&resp.bytes().await.unwrap()[..], &[0xa1, 0x01, 0xff]);

    let again = gw
        .client
        .get(gw.url("/topics/plant/1/raw"))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    assert_eq!(again.headers()["etag"].to_str().unwrap(), etag);

    let list: serde_json::Value = eventually("both topics listed", || async {
        let v: serde_json::Value = gw.get("/topics/plant/%23").await.json().await.ok()?;
        (v["messages"].as_array()?.len() == 2).then_some(v)
    })
    .await;
    let m = &list["messages"];
    assert_eq!(m[0]["topic"], "plant/1/raw");
    assert_eq!(m[0]["payload_encoding"], "base64");
    assert_eq!(m[0]["payload"], "oQH/");
    assert_eq!(m[0]["qos"], 1);
    assert_eq!(m[0]["content_type"], "application/cbor");
    assert_eq!(m[0]["properties"]["user_properties"][0]["name"], "k");
    assert_eq!(m[1]["topic"], "plant/2/temp");
    assert_eq!(m[1]["payload"], "19");
    assert_eq!(m[1]["payload_encoding"], "utf8");
    assert_eq!(m[1]["qos"], 2);
    assert_eq!(list["next"], serde_json::Value::Null);

    let single: serde_json::Value = gw.get("/topics/plant/+/temp").await.json().await.unwrap();
    assert_eq!(single["messages"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn wildcard_listing_pages_with_limit_and_cursor() {
    let gw = TestGateway::start().await;
    for i in 0..5 {
        let r = gw
            .client
            .put(gw.url(&format!("/topics/page/{i}")))
            .body("v")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
    }
    let first: serde_json::Value = gw
        .get("/topics/page/%23?limit=2")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first["messages"].as_array().unwrap().len(), 2);
    assert_eq!(first["next"], "page/1");
    let rest: serde_json::Value = gw
        .get("/topics/page/%23?limit=10&cursor=page/1")
        .await
        .json()
        .await
        .unwrap();
    let topics: Vec<_> = rest["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["topic"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(topics, ["page/2", "page/3", "page/4"]);
    assert_eq!(rest["next"], serde_json::Value::Null);
}

#[tokio::test]
async fn only_an_empty_retained_publish_clears_a_retained_value() {
    let gw = TestGateway::start().await;
    let (c4, _) = gw.mqtt_v4("writer", &[]).await;
    c4.publish("dev/state", rumqttc::QoS::AtLeastOnce, true, "on")
        .await
        .unwrap();
    eventually("the value is retained", || async {
        (gw.get("/topics/dev/state").await.status() == 200).then_some(())
    })
    .await;

    // An empty non-retained publish reaches subscribers but keeps the value.
    let (_watch, mut watch) = gw.mqtt_v4("watcher", &[("dev/state", 0)]).await;
    assert_eq!(&recv(&mut watch).await.payload[..], b"on");
    c4.publish("dev/state", rumqttc::QoS::AtLeastOnce, false, "")
        .await
        .unwrap();
    let p = recv(&mut watch).await;
    assert!(p.payload.is_empty() && !p.retain);
    let r = gw.get("/topics/dev/state").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "on");
    // A new MQTT subscriber still gets it from the broker side too.
    let (_late, mut late) = gw.mqtt_v4("late", &[("dev/state", 0)]).await;
    assert_eq!(&recv(&mut late).await.payload[..], b"on");

    // An empty HTTP POST (non-retained) keeps it as well.
    assert_eq!(gw.post("/topics/dev/state", "").await.status(), 204);
    assert_eq!(gw.get("/topics/dev/state").await.status(), 200);

    // An empty retained publish clears it for everyone.
    c4.publish("dev/state", rumqttc::QoS::AtLeastOnce, true, "")
        .await
        .unwrap();
    eventually("the value is cleared", || async {
        (gw.get("/topics/dev/state").await.status() == 404).then_some(())
    })
    .await;
    let (_after, mut after) = gw.mqtt_v4("after", &[("dev/#", 0)]).await;
    c4.publish("dev/marker", rumqttc::QoS::AtLeastOnce, false, "m")
        .await
        .unwrap();
    let p = recv(&mut after).await;
    assert_eq!(
        p.topic, "dev/marker",
        "no retained dev/state is sent any more"
    );
}

#[tokio::test]
async fn http_delete_clears_for_mqtt_subscribers_too() {
    let gw = TestGateway::start().await;
    gw.client
        .put(gw.url("/topics/lamp"))
        .body("1")
        .send()
        .await
        .unwrap();
    let (_c, mut rx) = gw.mqtt_v4("lamp-watch", &[("lamp", 0)]).await;
    assert_eq!(&recv(&mut rx).await.payload[..], b"1");
    let r = gw
        .client
        .delete(gw.url("/topics/lamp"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    // The PUT may still have been on its way through the broker when the subscription started,
    // and then arrives live too.
    let mut p = recv(&mut rx).await;
    while &p.payload[..] == b"1" && !p.retain {
        p = recv(&mut rx).await;
    }
    assert!(p.payload.is_empty(), "{p:?}");
    assert_eq!(gw.get("/topics/lamp").await.status(), 404);
    let again = gw
        .client
        .delete(gw.url("/topics/lamp"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404);
}

#[tokio::test]
async fn expiry_is_carried_both_ways_and_expired_values_are_gone() {
    let gw = TestGateway::start().await;
    let (_c5, mut v5) = gw.mqtt_v5("exp-v5", &[("exp/#", 0)]).await;
    assert_eq!(
        gw.post("/topics/exp/a?expiry=60&retain=true", "x")
            .await
            .status(),
        204
    );
    let p = recv(&mut v5).await;
    let left = p
        .properties
        .and_then(|p| p.message_expiry_interval)
        .expect("expiry");
    assert!((59..=60).contains(&left), "{left}");
    let r = gw.get("/topics/exp/a").await;
    let left: u32 = r.headers()["mqtt-message-expiry-interval"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((59..=60).contains(&left), "{left}");

    assert_eq!(
        gw.post("/topics/exp/b?expiry=1&retain=true", "y")
            .await
            .status(),
        204
    );
    eventually("the value expires", || async {
        (gw.get("/topics/exp/b").await.status() == 404).then_some(())
    })
    .await;
}

#[tokio::test]
async fn will_messages_are_delivered_and_retained() {
    let gw = TestGateway::start().await;
    let mut opts = rumqttc::MqttOptions::new("dying", "127.0.0.1", gw.mqtt.port());
    opts.set_last_will(rumqttc::LastWill::new(
        "dev/dying/status",
        "offline",
        rumqttc::QoS::AtLeastOnce,
        true,
    ));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 10);
    let conn = tokio::spawn(async move {
        loop {
            if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) =
                eventloop.poll().await
            {
                return eventloop;
            }
        }
    });
    let eventloop = crate::support::within("CONNACK", conn).await.unwrap();
    drop(client);
    drop(eventloop); // the socket closes without DISCONNECT: the will fires
    let r = eventually("the will is retained", || async {
        let r = gw.get("/topics/dev/dying/status").await;
        (r.status() == 200).then_some(r)
    })
    .await;
    assert_eq!(r.text().await.unwrap(), "offline");
}
