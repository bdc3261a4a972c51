//! One policy on every door: the same (principal, topic, action) matrix over HTTP, CoAP and
//! MQTT gets the same verdicts; failed logins, rates and topic limits are answered in each
//! protocol's own terms.

use std::time::Duration;

use base64::Engine;
use coap_lite::RequestType;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;
use topicgate::Config;
use topicgate::config::{AclAccess, AclEntry, TokenEntry, UserEntry};

use crate::coap_client::{CoapClient, code};
use crate::support::{TestGateway, eventually, metric, within};

/// A principal, with the credentials each protocol takes.
#[derive(Clone, Copy, Debug)]
struct Who {
    name: &'static str,
    /// User name and password (MQTT, HTTP Basic); `None` for token-only and anonymous.
    password: Option<&'static str>,
    /// Token (CoAP `?auth=`, HTTP Bearer, MQTT password of the name).
    token: Option<&'static str>,
}

const ALICE: Who = Who {
    name: "alice",
    password: Some("alice-password"),
    token: Some("alice-token-0123456789"),
};
const BOB: Who = Who {
    name: "bob",
    password: Some("bob-password"),
    token: Some("bob-token-0123456789ab"),
};
const SENSOR: Who = Who {
    name: "sensor",
    password: None,
    token: Some("sensor-token-0123456789"),
};
const ADMIN: Who = Who {
    name: "admin",
    password: Some("admin-password"),
    token: Some("admin-token-0123456789"),
};
const ANONYMOUS: Who = Who {
    name: "anonymous",
    password: None,
    token: None,
};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Act {
    Publish,
    Read,
}

/// (principal, action, topic, allowed)
const MATRIX: &[(Who, Act, &str, bool)] = &[
    (ALICE, Act::Publish, "home/kitchen/temp", true),
    (ALICE, Act::Read, "home/kitchen/temp", true),
    (ALICE, Act::Publish, "devices/alice/led", true),
    (ALICE, Act::Publish, "devices/bob/led", false),
    (ALICE, Act::Read, "devices/bob/led", false),
    (BOB, Act::Publish, "home/kitchen/temp", false),
    (BOB, Act::Read, "home/kitchen/temp", true),
    (BOB, Act::Read, "home/kitchen/humidity", false),
    (BOB, Act::Read, "devices/bob/led", true),
    (SENSOR, Act::Publish, "telemetry/s1", true),
    (SENSOR, Act::Read, "telemetry/s1", false),
    (SENSOR, Act::Publish, "public/news", false),
    (ANONYMOUS, Act::Read, "public/news", true),
    (ANONYMOUS, Act::Publish, "public/news", false),
    (ANONYMOUS, Act::Read, "home/kitchen/temp", false),
];

fn rule(user: &str, topic: &str, access: AclAccess) -> AclEntry {
    AclEntry {
        user: user.to_owned(),
        topic: topic.to_owned(),
        access,
    }
}

fn secured(c: &mut Config) {
    for who in [ALICE, BOB, ADMIN] {
        c.auth.users.push(UserEntry {
            name: who.name.to_owned(),
            password_hash: topicgate::policy::hash_password(who.password.unwrap()).unwrap(),
        });
    }
    for who in [ALICE, BOB, SENSOR, ADMIN] {
        c.auth.tokens.push(TokenEntry {
            name: who.name.to_owned(),
            token: who.token.unwrap().to_owned(),
        });
    }
    c.auth.allow_anonymous = Some(true);
    c.auth.acl = vec![
        rule("admin", "#", AclAccess::ReadWrite),
        rule("*", "devices/%u/#", AclAccess::ReadWrite),
        rule("alice", "home/#", AclAccess::ReadWrite),
        rule("bob", "home/+/temp", AclAccess::Read),
        rule("sensor", "telemetry/#", AclAccess::Write),
        rule("anonymous", "public/#", AclAccess::Read),
    ];
}

/// Retained values on every topic of the matrix, written by the admin.
async fn seed(gw: &TestGateway) {
    for (_, _, topic, _) in MATRIX {
        let r = http(gw, ADMIN, reqwest::Method::PUT, topic).await;
        assert_eq!(r.status(), 204, "seed {topic}");
    }
}

async fn http(
    gw: &TestGateway,
    who: Who,
    method: reqwest::Method,
    topic: &str,
) -> reqwest::Response {
    let mut req = gw
        .client
        .request(method, gw.url(&format!("/topics/{topic}")))
        .body("v");
    if let Some(password) = who.password {
        req = req.basic_auth(who.name, Some(password));
    } else if let Some(token) = who.token {
        req = req.bearer_auth(token);
    }
    req.send().await.unwrap()
}

async fn http_allows(gw: &TestGateway, who: Who, act: Act, topic: &str) -> bool {
    let method = match act {
        Act::Publish => reqwest::Method::POST,
        Act::Read => reqwest::Method::GET,
    };
    let r = http(gw, who, method, topic).await;
    match r.status().as_u16() {
        200 | 204 => true,
        401 => {
            assert!(
                r.headers().contains_key("www-authenticate"),
                "401 challenges"
            );
            assert_eq!(who.name, "anonymous", "401 only without credentials");
            false
        }
        403 => false,
        other => panic!("unexpected HTTP {other} for {who:?} {act:?} {topic}"),
    }
}

async fn coap_allows(gw: &TestGateway, who: Who, act: Act, topic: &str) -> bool {
    let client = CoapClient::new(gw.coap).await;
    let auth = who.token.map(|t| format!("?auth={t}")).unwrap_or_default();
    let method = match act {
        Act::Publish => RequestType::Put,
        Act::Read => RequestType::Get,
    };
    let mut req = client.request(method, &format!("topics/{topic}{auth}"));
    req.payload = b"v".to_vec();
    let resp = client.call(req).await;
    match code(&resp).as_str() {
        "2.04" | "2.05" => true,
        "4.01" => {
            assert_eq!(who.name, "anonymous", "4.01 only without a token");
            false
        }
        "4.03" => false,
        other => panic!("unexpected CoAP {other} for {who:?} {act:?} {topic}"),
    }
}

/// An MQTT 5 session: every incoming packet or connection error, as text.
async fn mqtt_session(
    gw: &TestGateway,
    who: Who,
    id: &str,
) -> (AsyncClient, mpsc::UnboundedReceiver<Result<Packet, String>>) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", gw.mqtt.port());
    opts.set_keep_alive(Duration::from_secs(30));
    match (who.password, who.token) {
        (Some(p), _) => {
            opts.set_credentials(who.name, p);
        }
        (None, Some(t)) => {
            opts.set_credentials(who.name, t);
        }
        _ => {}
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(p)) => {
                    if tx.send(Ok(p)).is_err() {
                        break;
                    }
                }
                Ok(Event::Outgoing(_)) => {}
                Err(e) => {
                    let _ = tx.send(Err(format!("{e:?}")));
                    break;
                }
            }
        }
    });
    (client, rx)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Result<Packet, String>>) -> Result<Packet, String> {
    within("an MQTT packet", rx.recv())
        .await
        .expect("the session reports")
}

async fn mqtt_allows(gw: &TestGateway, who: Who, act: Act, topic: &str, n: usize) -> bool {
    let (client, mut rx) = mqtt_session(gw, who, &format!("matrix-{n}")).await;
    match next(&mut rx).await {
        Ok(Packet::ConnAck(ack)) => {
            assert_eq!(format!("{:?}", ack.code), "Success", "{who:?} connects")
        }
        other => panic!("CONNACK expected, got {other:?}"),
    }
    match act {
        Act::Publish => {
            client
                .publish(topic, QoS::AtLeastOnce, false, "v")
                .await
                .unwrap();
            loop {
                match next(&mut rx).await {
                    Ok(Packet::PubAck(ack)) => {
                        return format!("{:?}", ack.reason) == "Success";
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        assert!(e.contains("NotAuthorized"), "a refused PUBACK: {e}");
                        return false;
                    }
                }
            }
        }
        Act::Read => {
            client.subscribe(topic, QoS::AtMostOnce).await.unwrap();
            loop {
                match next(&mut rx).await {
                    Ok(Packet::SubAck(ack)) => {
                        return matches!(ack.return_codes[0], SubscribeReasonCode::Success(_));
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        assert!(e.contains("NotAuthorized"), "a refused SUBACK: {e}");
                        return false;
                    }
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acl_matrix_gets_the_same_verdicts_on_http_coap_and_mqtt() {
    let gw = TestGateway::start_with(secured).await;
    seed(&gw).await;
    // An admin watches everything published over MQTT: a denied publish reaches nobody.
    let (watch, mut seen) = mqtt_session(&gw, ADMIN, "watcher").await;
    assert!(matches!(next(&mut seen).await, Ok(Packet::ConnAck(_))));
    watch.subscribe("#", QoS::AtLeastOnce).await.unwrap();
    loop {
        if let Ok(Packet::SubAck(_)) = next(&mut seen).await {
            break;
        }
    }
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), seen.recv()).await {}

    let mut mismatches = Vec::new();
    for (n, &(who, act, topic, allowed)) in MATRIX.iter().enumerate() {
        let verdicts = [
            ("http", http_allows(&gw, who, act, topic).await),
            ("coap", coap_allows(&gw, who, act, topic).await),
            ("mqtt", mqtt_allows(&gw, who, act, topic, n).await),
        ];
        for (protocol, got) in verdicts {
            if got != allowed {
                mismatches.push(format!("{protocol}: {} {act:?} {topic}: {got}", who.name));
            }
        }
    }
    assert!(mismatches.is_empty(), "verdicts differ: {mismatches:#?}");

    // Only the permitted publishes reached the watcher (three protocols each).
    watch
        .publish("end/marker", QoS::AtLeastOnce, false, "end")
        .await
        .unwrap();
    let mut topics = Vec::new();
    loop {
        match next(&mut seen).await {
            Ok(Packet::Publish(p)) if p.topic == "end/marker" => break,
            Ok(Packet::Publish(p)) => topics.push(String::from_utf8_lossy(&p.topic).into_owned()),
            Ok(_) => {}
            Err(e) => panic!("watcher lost: {e}"),
        }
    }
    for (_, act, topic, _) in MATRIX {
        if *act != Act::Publish {
            continue;
        }
        let count = topics.iter().filter(|t| t == topic).count();
        let allowed_rows = MATRIX
            .iter()
            .filter(|(_, a, t, ok)| *a == Act::Publish && t == topic && *ok)
            .count();
        assert_eq!(count, 3 * allowed_rows, "{topic}: {topics:?}");
    }
    assert!(
        metric(
            &gw,
            "topicgate_refusals_total{protocol=\"mqtt\",reason=\"acl\"}"
        )
        .await
            >= 6.0
    );
    assert!(
        metric(
            &gw,
            "topicgate_refusals_total{protocol=\"coap\",reason=\"acl\"}"
        )
        .await
            >= 6.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_listings_and_streams_carry_only_readable_topics() {
    let gw = TestGateway::start_with(secured).await;
    seed(&gw).await;
    // Bob may read home/+/temp only: home/# is narrowed, not refused.
    let listing: serde_json::Value = gw
        .get_as("/topics/home/%23", "bob", "bob-password")
        .await
        .json()
        .await
        .unwrap();
    let listed: Vec<&str> = listing["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["topic"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["home/kitchen/temp"]);

    let (bob, mut rx) = mqtt_session(&gw, BOB, "bob-narrowed").await;
    assert!(matches!(next(&mut rx).await, Ok(Packet::ConnAck(_))));
    bob.subscribe("home/#", QoS::AtMostOnce).await.unwrap();
    let mut retained = Vec::new();
    loop {
        match next(&mut rx).await {
            Ok(Packet::SubAck(ack)) => {
                assert!(matches!(
                    ack.return_codes[0],
                    SubscribeReasonCode::Success(_)
                ));
            }
            Ok(Packet::Publish(p)) => {
                retained.push(String::from_utf8_lossy(&p.topic).into_owned());
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(retained, ["home/kitchen/temp"]);
    for topic in ["home/hall/humidity", "home/hall/temp"] {
        let r = http(&gw, ALICE, reqwest::Method::POST, topic).await;
        assert_eq!(r.status(), 204);
    }
    match next(&mut rx).await {
        Ok(Packet::Publish(p)) => assert_eq!(p.topic, "home/hall/temp"),
        other => panic!("{other:?}"),
    }
    let stray = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await;
    assert!(stray.is_err(), "nothing else arrives: {stray:?}");

    // The same over SSE: the retained snapshot and live messages are filtered alike.
    let resp = gw
        .client
        .get(gw.url("/topics/home/%23"))
        .header("accept", "text/event-stream")
        .basic_auth("bob", Some("bob-password"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    use futures_util::StreamExt;
    let r = http(&gw, ALICE, reqwest::Method::POST, "home/attic/humidity").await;
    assert_eq!(r.status(), 204);
    let r = http(&gw, ALICE, reqwest::Method::POST, "home/attic/temp").await;
    assert_eq!(r.status(), 204);
    within("the SSE events", async {
        while !text.contains("home/attic/temp") {
            let chunk = body.next().await.unwrap().unwrap();
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await;
    assert!(text.contains("home/kitchen/temp"), "{text}");
    assert!(!text.contains("humidity"), "{text}");

    // A filter that can match nothing readable is refused everywhere.
    let r = gw.get_as("/topics/office/%23", "bob", "bob-password").await;
    assert_eq!(r.status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_anonymous_access_every_door_asks_for_credentials() {
    let gw = TestGateway::start_with(|c| {
        secured(c);
        c.auth.allow_anonymous = Some(false);
    })
    .await;
    // HTTP: 401 with a challenge, for no, wrong and unknown credentials alike.
    let r = gw
        .client
        .get(gw.url("/topics/public/news"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["www-authenticate"],
        r#"Basic realm="topicgate", Bearer realm="topicgate""#
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "unauthorized");
    let wrong = base64::engine::general_purpose::STANDARD.encode("alice:nope");
    let r = gw
        .client
        .get(gw.url("/topics/public/news"))
        .header("authorization", format!("Basic {wrong}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = gw
        .client
        .get(gw.url("/topics/public/news"))
        .bearer_auth("not-a-token-at-all")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Probes stay open.
    assert_eq!(gw.get("/healthz").await.status(), 200);

    // CoAP: 4.01 without a token or with a wrong one.
    let coap = CoapClient::new(gw.coap).await;
    let resp = coap
        .call(coap.request(RequestType::Get, "topics/public/news"))
        .await;
    assert_eq!(code(&resp), "4.01");
    let resp = coap
        .call(coap.request(
            RequestType::Get,
            "topics/public/news?auth=wrong-token-000000",
        ))
        .await;
    assert_eq!(code(&resp), "4.01");

    // MQTT 5: CONNACK 0x87 without credentials, 0x86 with a wrong password.
    let (_c, mut rx) = mqtt_session(&gw, ANONYMOUS, "anon").await;
    let e = next(&mut rx).await.unwrap_err();
    assert!(e.contains("NotAuthorized"), "{e}");
    let bad = Who {
        password: Some("wrong"),
        ..ALICE
    };
    let (_c, mut rx) = mqtt_session(&gw, bad, "alice").await;
    let e = next(&mut rx).await.unwrap_err();
    assert!(e.contains("BadUserNamePassword"), "{e}");

    // MQTT 3.1.1: return code 5 without credentials.
    let mut opts = rumqttc::MqttOptions::new("anon-v4", "127.0.0.1", gw.mqtt.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (_c, mut eventloop) = rumqttc::AsyncClient::new(opts, 8);
    let e = within("a refused 3.1.1 CONNECT", eventloop.poll())
        .await
        .unwrap_err();
    assert!(format!("{e:?}").contains("NotAuthorized"), "{e:?}");

    for protocol in ["http", "coap", "mqtt"] {
        let sample =
            format!("topicgate_refusals_total{{protocol=\"{protocol}\",reason=\"login\"}}");
        assert!(metric(&gw, &sample).await >= 2.0, "{sample}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rates_and_topic_limits_are_answered_in_each_protocols_terms() {
    let gw = TestGateway::start_with(|c| {
        c.limits.rate = 1;
        c.limits.burst = 3;
        c.limits.max_topic_levels = 3;
    })
    .await;
    // Topic depth: 400 / 4.00.
    assert_eq!(gw.post("/topics/a/b/c/d", "x").await.status(), 400);
    let coap = CoapClient::new(gw.coap).await;
    let mut put = coap.request(RequestType::Put, "topics/a/b/c/d");
    put.payload = b"x".to_vec();
    assert_eq!(code(&coap.call(put).await), "4.00");

    // HTTP: the burst, then 429 with Retry-After.
    let mut limited = None;
    for _ in 0..5 {
        let r = gw.post("/topics/rate/x", "x").await;
        if r.status() == 429 {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("a 429 within five requests");
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    // CoAP: its own bucket (its address is the same, its burst spent by HTTP): 4.29.
    let mut got = String::new();
    for _ in 0..5 {
        let resp = coap
            .call(coap.request(RequestType::Get, "topics/rate/x"))
            .await;
        got = code(&resp);
        if got == "4.29" {
            break;
        }
    }
    assert_eq!(got, "4.29");

    // MQTT: over the rate, the publisher is slowed (its socket is not read for a while), not
    // disconnected, and every message arrives.
    let (_watch, mut watch) = gw.mqtt_v4("rate-watch", &[("rate/m", 0)]).await;
    let (client, mut rx) = mqtt_session(&gw, ANONYMOUS, "fast").await;
    assert!(matches!(next(&mut rx).await, Ok(Packet::ConnAck(_))));
    for i in 0..6 {
        client
            .publish("rate/m", QoS::AtMostOnce, false, format!("{i}"))
            .await
            .unwrap();
    }
    for i in 0..6 {
        let p = crate::support::recv(&mut watch).await;
        assert_eq!(
            p.payload,
            format!("{i}").as_bytes(),
            "message {i} arrives in order"
        );
    }
    client
        .publish("rate/m", QoS::AtLeastOnce, false, "still connected")
        .await
        .unwrap();
    let acked = within("the PUBACK of a later publish", async {
        loop {
            match rx.recv().await {
                Some(Ok(Packet::PubAck(_))) => return true,
                Some(Ok(Packet::Disconnect(_))) | Some(Err(_)) | None => return false,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(acked, "the slowed publisher stays connected");
    eventually("the rate refusals are counted", || async {
        let n = metric(
            &gw,
            "topicgate_refusals_total{protocol=\"mqtt\",reason=\"rate\"}",
        )
        .await;
        (n >= 1.0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn event_streams_are_limited_per_client() {
    let gw = TestGateway::start_with(|c| c.http.max_streams_per_client = 1).await;
    let first = gw
        .client
        .get(gw.url("/topics/s/%23?stream=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let again = gw
        .client
        .get(gw.url("/topics/s/%23?stream=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 429);
    assert_eq!(again.headers()["retry-after"], "1");
    let body: serde_json::Value = again.json().await.unwrap();
    assert_eq!(body["error"], "too_many_streams");
    assert_eq!(metric(&gw, "topicgate_sse_clients").await, 1.0);
    // The place is given back when the first stream ends.
    drop(first);
    eventually("the stream is no longer counted", || async {
        (metric(&gw, "topicgate_sse_clients").await == 0.0).then_some(())
    })
    .await;
    eventually("a stream can be opened again", || async {
        let r = gw
            .client
            .get(gw.url("/topics/s/%23?stream=true"))
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
}
