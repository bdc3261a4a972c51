//! EMQX 5's publish API: `POST /api/v5/publish` and `/api/v5/publish/bulk` with EMQX's request
//! bodies, answered with EMQX's statuses and shapes, under the gateway's credentials and ACL.

use serde_json::{Value, json};
use topicgate::config::{AclAccess, AclEntry, TokenEntry};

use crate::support::{TestGateway, recv};

async fn post_json(gw: &TestGateway, path: &str, body: &Value) -> (u16, Value) {
    let resp = gw
        .client
        .post(gw.url(path))
        .json(body)
        .send()
        .await
        .expect("answered");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("a JSON body"))
}

fn is_id(v: &Value) -> bool {
    v["id"]
        .as_str()
        .is_some_and(|id| id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()))
}

#[tokio::test]
async fn the_documented_example_reaches_an_mqtt5_subscriber_with_its_properties() {
    let gw = TestGateway::start().await;
    let (_client, mut rx) = gw.mqtt_v5("sub-emqx", &[("api/example/topic", 1)]).await;
    let (status, body) = post_json(
        &gw,
        "/api/v5/publish",
        &json!({
            "topic": "api/example/topic",
            "qos": 1,
            "clientid": "api_example_client",
            "payload": "hello emqx api",
            "properties": {
                "payload_format_indicator": 0,
                "message_expiry_interval": 60,
                "response_topic": "some_other_topic",
                "correlation_data": "string",
                "user_properties": {"foo": "bar"},
                "content_type": "text/plain"
            },
            "retain": false
        }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(is_id(&body), "{body}");
    let got = recv(&mut rx).await;
    assert_eq!(got.topic, "api/example/topic");
    assert_eq!(got.payload, "hello emqx api");
    let props = got.properties.expect("MQTT 5 properties");
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(props.response_topic.as_deref(), Some("some_other_topic"));
    assert_eq!(props.correlation_data.as_deref(), Some(&b"string"[..]));
    assert_eq!(
        props.user_properties,
        [("foo".to_owned(), "bar".to_owned())]
    );
    assert!(props.message_expiry_interval.is_some_and(|s| s <= 60));
}

#[tokio::test]
async fn a_base64_payload_nobody_subscribes_to_is_retained_and_answered_202() {
    let gw = TestGateway::start().await;
    let (status, body) = post_json(
        &gw,
        "/api/v5/publish",
        &json!({"topic": "emqx/b64", "payload": "AAEC/w==", "payload_encoding": "base64",
                "retain": true}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        body,
        json!({"reason_code": 16, "message": "no_matching_subscribers"})
    );
    let resp = gw.get("/topics/emqx/b64").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(&resp.bytes().await.unwrap()[..], &[0, 1, 2, 255]);
}

#[tokio::test]
async fn a_batch_answers_per_message_with_emqx_overall_status() {
    let gw = TestGateway::start().await;
    let (_client, mut rx) = gw.mqtt_v5("sub-bulk", &[("bulk/+", 0)]).await;
    let both = json!([
        {"topic": "bulk/a", "payload": "one"},
        {"topic": "bulk/b", "payload": "dHdv", "payload_encoding": "base64", "qos": 1}
    ]);
    let (status, body) = post_json(&gw, "/api/v5/publish/bulk", &both).await;
    assert_eq!(status, 200, "{body}");
    let items = body.as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert!(items.iter().all(is_id), "{body}");
    assert_ne!(items[0]["id"], items[1]["id"]);
    assert_eq!(recv(&mut rx).await.payload, "one");
    assert_eq!(recv(&mut rx).await.payload, "two");

    // One message nobody subscribes to: 202, and its item says why.
    let mixed = json!([
        {"topic": "bulk/c", "payload": "three"},
        {"topic": "elsewhere", "payload": "four"}
    ]);
    let (status, body) = post_json(&gw, "/api/v5/publish/bulk", &mixed).await;
    assert_eq!(status, 202, "{body}");
    assert!(is_id(&body[0]), "{body}");
    assert_eq!(
        body[1],
        json!({"reason_code": 16, "message": "no_matching_subscribers"})
    );
    assert_eq!(recv(&mut rx).await.payload, "three");
}

#[tokio::test]
async fn a_batch_with_one_bad_message_is_refused_whole() {
    let gw = TestGateway::start().await;
    let batch = json!([
        {"topic": "whole/good", "payload": "kept back", "retain": true},
        {"topic": "whole/#", "payload": "wildcard"}
    ]);
    let (status, body) = post_json(&gw, "/api/v5/publish/bulk", &batch).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "BAD_REQUEST");
    assert!(
        body["message"].as_str().unwrap().contains("item 1"),
        "{body}"
    );
    // Checked before anything was published: the good one is not retained.
    assert_eq!(gw.get("/topics/whole/good").await.status(), 404);
    let (status, body) = post_json(&gw, "/api/v5/publish/bulk", &json!([])).await;
    assert_eq!((status, &body["code"]), (400, &json!("BAD_REQUEST")));
}

#[tokio::test]
async fn bad_requests_are_400_in_emqx_shape() {
    let gw = TestGateway::start().await;
    let resp = gw.get("/api/v5/publish").await;
    assert_eq!(resp.status(), 405);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "METHOD_NOT_ALLOWED");
    let resp = gw.post("/api/v5/publish", "{not json").await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "BAD_REQUEST");
    assert!(body["message"].is_string());
    for bad in [
        json!({"payload": "no topic"}),
        json!({"topic": "t"}),
        json!({"topic": "a/+", "payload": "x"}),
        json!({"topic": "t", "payload": "x", "qos": 3}),
        json!({"topic": "t", "payload": "%%", "payload_encoding": "base64"}),
        json!({"topic": "t", "payload": "x", "payload_encoding": "hex"}),
        json!({"topic": "t", "payload": "x", "properties": {"user_properties": {"k": 1}}}),
    ] {
        let (status, body) = post_json(&gw, "/api/v5/publish", &bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["code"], "BAD_REQUEST", "{bad}");
    }
}

#[tokio::test]
async fn credentials_and_the_acl_apply_as_to_every_publish() {
    let gw = TestGateway::start_with(|c| {
        c.auth.allow_anonymous = Some(false);
        c.auth.tokens.push(TokenEntry {
            name: "backend".to_owned(),
            token: "backend-token-0123456789".to_owned(),
        });
        c.auth.acl.push(AclEntry {
            user: "backend".to_owned(),
            topic: "allowed/#".to_owned(),
            access: AclAccess::Write,
        });
    })
    .await;
    let msg = |topic: &str| json!({"topic": topic, "payload": "x"});
    let (status, body) = post_json(&gw, "/api/v5/publish", &msg("allowed/a")).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["code"], "UNAUTHORIZED");
    let send = |path: &'static str, body: Value| {
        gw.client
            .post(gw.url(path))
            .bearer_auth("backend-token-0123456789")
            .json(&body)
            .send()
    };
    let resp = send("/api/v5/publish", msg("denied/a")).await.unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.json::<Value>().await.unwrap()["code"], "FORBIDDEN");
    let resp = send("/api/v5/publish", msg("allowed/a")).await.unwrap();
    assert_eq!(resp.status(), 202);
    // One refused topic refuses the batch before anything is published.
    let batch = json!([msg("allowed/b"), msg("denied/b")]);
    let resp = send("/api/v5/publish/bulk", batch).await.unwrap();
    assert_eq!(resp.status(), 403);
}

#[tokio::test]
async fn in_front_of_an_external_broker_a_publish_counts_as_delivered() {
    let broker = TestGateway::start().await;
    let gw = TestGateway::start_with(|c| c.broker.url = format!("mqtt://{}", broker.mqtt)).await;
    let (status, body) = post_json(
        &gw,
        "/api/v5/publish",
        &json!({"topic": "ext/a", "payload": "x"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(is_id(&body));
}
