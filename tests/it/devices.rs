//! Devices that only serve: push rules against an HTTP device started by the test (failures,
//! retries, dead letters, order, the outbox across a restart, answers sent back to MQTT
//! clients), pull rules with ETags, and `/rules`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes as RawBytes;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde_json::Value;
use topicgate::Config;
use topicgate::config::{PullRule, PushBody, PushRule, WhenFull};

use crate::support::{TestGateway, eventually, metric, metric_at, qos_v4, qos_v5, recv};

/// One request the device received.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    uri: String,
    headers: HeaderMap,
    body: Bytes,
    /// The status it was answered with.
    status: u16,
}

/// How the device answers.
#[derive(Clone)]
struct Script {
    /// Requests answered `fail_status` before any succeeds.
    fail_first: usize,
    fail_status: u16,
    ok_status: u16,
    ok_body: &'static str,
    ok_type: &'static str,
    /// Never answer.
    hang: bool,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            fail_first: 0,
            fail_status: 503,
            ok_status: 204,
            ok_body: "",
            ok_type: "text/plain",
            hang: false,
        }
    }
}

#[derive(Clone)]
struct DeviceState {
    seen: Arc<Mutex<Vec<Seen>>>,
    answered: Arc<AtomicUsize>,
    script: Script,
    /// The resource pulled: its value, and how many GETs carried a matching If-None-Match.
    value: Arc<Mutex<&'static str>>,
    not_modified: Arc<AtomicUsize>,
    /// While set, every push is answered 503.
    down: Arc<std::sync::atomic::AtomicBool>,
}

/// A device that is down: its port bound but not listening, so connections to it are refused
/// and no other socket (a test's or the gateway's own outgoing one) can take the port before
/// the device starts on it.
struct Down(tokio::net::TcpSocket);

impl Down {
    fn new() -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        Self(socket)
    }

    fn addr(&self) -> SocketAddr {
        self.0.local_addr().unwrap()
    }
}

/// An HTTP device on a loopback port that records every request.
struct Device {
    addr: SocketAddr,
    state: DeviceState,
    task: tokio::task::JoinHandle<()>,
}

impl Device {
    async fn start(script: Script) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, script)
    }

    /// The device on a port held by `down` until now.
    fn start_on(down: Down, script: Script) -> Self {
        Self::serve(down.0.listen(1024).unwrap(), script)
    }

    fn serve(listener: tokio::net::TcpListener, script: Script) -> Self {
        let addr = listener.local_addr().unwrap();
        let state = DeviceState {
            seen: Arc::default(),
            answered: Arc::default(),
            script,
            value: Arc::new(Mutex::new("21.5")),
            not_modified: Arc::default(),
            down: Arc::default(),
        };
        let app = axum::Router::new()
            .route("/temp", axum::routing::get(temp))
            .fallback(record)
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, state, task }
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Bodies of the requests answered 2xx, by the topic level the URL carries (`/relay/{2}`).
    fn delivered(&self) -> HashMap<String, Vec<String>> {
        let mut by_topic: HashMap<String, Vec<String>> = HashMap::new();
        for s in self.seen() {
            if (200..300).contains(&s.status) {
                let level = s.uri.split('/').nth(2).unwrap_or("").split('?').next();
                by_topic
                    .entry(level.unwrap_or("").to_owned())
                    .or_default()
                    .push(String::from_utf8_lossy(&s.body).into_owned());
            }
        }
        by_topic
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn record(
    axum::extract::State(state): axum::extract::State<DeviceState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let script = &state.script;
    if script.hang {
        std::future::pending::<()>().await;
    }
    let n = state.answered.fetch_add(1, Ordering::SeqCst);
    let (status, response) = if n < script.fail_first || state.down.load(Ordering::SeqCst) {
        let status = StatusCode::from_u16(script.fail_status).unwrap();
        (status, (status, "device busy").into_response())
    } else {
        let status = StatusCode::from_u16(script.ok_status).unwrap();
        let response = if status == StatusCode::NO_CONTENT {
            status.into_response()
        } else {
            let headers = [
                ("content-type", script.ok_type),
                ("mqtt-user-firmware", "1.2"),
            ];
            (status, headers, script.ok_body).into_response()
        };
        (status, response)
    };
    state.seen.lock().unwrap().push(Seen {
        method,
        uri: uri.to_string(),
        headers,
        body,
        status: status.as_u16(),
    });
    response
}

async fn temp(
    axum::extract::State(state): axum::extract::State<DeviceState>,
    headers: HeaderMap,
) -> Response {
    let value = *state.value.lock().unwrap();
    let etag = format!("\"{value}\"");
    if headers
        .get("if-none-match")
        .is_some_and(|v| v.to_str().unwrap() == etag)
    {
        state.not_modified.fetch_add(1, Ordering::SeqCst);
        return StatusCode::NOT_MODIFIED.into_response();
    }
    state.answered.fetch_add(1, Ordering::SeqCst);
    (
        [("etag", etag.as_str()), ("content-type", "text/plain")],
        value,
    )
        .into_response()
}

/// A push rule to `url` with fast retries.
pub(crate) fn rule(name: &str, filter: &str, url: String) -> PushRule {
    PushRule {
        name: name.to_owned(),
        filter: filter.to_owned(),
        url,
        method: Default::default(),
        body: PushBody::Raw,
        headers: Default::default(),
        reply_topic: None,
        dead_letter_topic: None,
        principal: None,
        max_attempts: 100,
        max_age: Duration::from_secs(60),
        timeout: Duration::from_secs(5),
        backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
        max_queued: 10_000,
        when_full: WhenFull::DropOldest,
        in_flight: 32,
        ca_cert: None,
        client_cert: None,
        client_key: None,
    }
}

fn sample(name: &str, rule: &str) -> String {
    format!("topicgate_{name}_total{{rule=\"{rule}\"}}")
}

#[tokio::test]
async fn push_delivers_every_message_in_order_per_topic_after_failures() {
    let device = Device::start(Script {
        fail_first: 5,
        ..Script::default()
    })
    .await;
    let url = format!("http://{}/relay/{{2}}?turn={{payload}}", device.addr);
    let gw = TestGateway::start_with(|c| {
        let mut r = rule("plugs", "plugs/+/set", url);
        r.headers
            .insert("X-Token".to_owned(), "k-${HOME}".to_owned());
        c.push.push(r);
    })
    .await;
    let (mqtt, _rx) = gw.mqtt_v4("pusher", &[]).await;
    for i in 0..20 {
        let topic = if i % 2 == 0 {
            "plugs/a/set"
        } else {
            "plugs/b/set"
        };
        mqtt.publish(topic, qos_v4(1), false, format!("{i}"))
            .await
            .unwrap();
    }
    for i in 20..24 {
        let resp = gw.post("/topics/plugs/c%20d/set", format!("{i}")).await;
        assert_eq!(resp.status(), 204);
    }
    let delivered = eventually("every message is delivered", || async {
        let d = device.delivered();
        (d.values().map(Vec::len).sum::<usize>() == 24).then_some(d)
    })
    .await;
    let numbers = |level: &str| -> Vec<u32> {
        delivered[level]
            .iter()
            .map(|b| b.parse().unwrap())
            .collect()
    };
    assert_eq!(numbers("a"), (0..20).step_by(2).collect::<Vec<_>>());
    assert_eq!(numbers("b"), (1..20).step_by(2).collect::<Vec<_>>());
    assert_eq!(numbers("c%20d"), vec![20, 21, 22, 23]);
    let seen = device.seen();
    assert!(seen.iter().take(5).all(|s| s.status == 503));
    let ok = seen
        .iter()
        .find(|s| s.status == 204 && s.uri.starts_with("/relay/a"))
        .unwrap();
    assert_eq!(ok.method, Method::POST);
    assert_eq!(ok.uri, "/relay/a?turn=0");
    let home = std::env::var("HOME").unwrap();
    assert_eq!(ok.headers["x-token"], format!("k-{home}").as_str());
    // The device has every body before the worker has every answer: the count follows.
    eventually("24 counted as sent", || async {
        (metric(&gw, &sample("push_sent", "plugs")).await == 24.0).then_some(())
    })
    .await;
    assert_eq!(metric(&gw, &sample("push_failed", "plugs")).await, 5.0);
    assert_eq!(metric(&gw, &sample("push_retried", "plugs")).await, 5.0);
    assert_eq!(
        metric(&gw, "topicgate_push_queued{rule=\"plugs\"}").await,
        0.0
    );
}

#[tokio::test]
async fn a_4xx_is_dead_lettered_at_once_and_a_dead_endpoint_after_max_attempts() {
    let refusing = Device::start(Script {
        fail_first: usize::MAX,
        fail_status: 404,
        ..Script::default()
    })
    .await;
    let down = Device::start(Script {
        fail_first: usize::MAX,
        ..Script::default()
    })
    .await;
    let gw = TestGateway::start_with(|c| {
        let mut r = rule(
            "refusing",
            "lamps/#",
            format!("http://{}/lamp", refusing.addr),
        );
        r.dead_letter_topic = Some("dead/lamps".to_owned());
        c.push.push(r);
        let mut r = rule("down", "fans/#", format!("http://{}/fan", down.addr));
        r.dead_letter_topic = Some("dead/fans".to_owned());
        r.max_attempts = 3;
        r.body = PushBody::Envelope;
        c.push.push(r);
    })
    .await;
    let (_sub, mut dead) = gw.mqtt_v4("dead-reader", &[("dead/#", 1)]).await;
    assert_eq!(gw.post("/topics/lamps/1", "on").await.status(), 204);
    let letter = recv(&mut dead).await;
    assert_eq!(letter.topic, "dead/lamps");
    let letter: Value = serde_json::from_slice(&letter.payload).unwrap();
    assert_eq!(letter["rule"], "refusing");
    assert_eq!(letter["reason"], "refused");
    assert_eq!(letter["status"], 404);
    assert_eq!(letter["body"], "device busy");
    assert_eq!(letter["attempts"], 1);
    assert_eq!(letter["message"]["topic"], "lamps/1");
    assert_eq!(letter["message"]["payload"], "on");
    assert_eq!(refusing.seen().len(), 1, "a 404 is not retried");

    assert_eq!(gw.post("/topics/fans/2", "fast").await.status(), 204);
    let letter = recv(&mut dead).await;
    assert_eq!(letter.topic, "dead/fans");
    let letter: Value = serde_json::from_slice(&letter.payload).unwrap();
    assert_eq!(letter["reason"], "max_attempts");
    assert_eq!(letter["status"], 503);
    assert_eq!(letter["attempts"], 3);
    let seen = down.seen();
    assert_eq!(seen.len(), 3);
    // The envelope body: the message as the event streams carry it.
    let sent: Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(sent["topic"], "fans/2");
    assert_eq!(sent["payload"], "fast");
    assert_eq!(seen[0].headers["content-type"], "application/json");

    assert_eq!(
        metric(&gw, &sample("push_dead_letters", "refusing")).await,
        1.0
    );
    assert_eq!(metric(&gw, &sample("push_dead_letters", "down")).await, 1.0);
    assert_eq!(metric(&gw, &sample("push_retried", "down")).await, 2.0);
    assert_eq!(metric(&gw, &sample("push_sent", "down")).await, 0.0);
}

/// A topic level `..` in a path position would climb the device's path: the message is given
/// up at once, and the messages around it go.
#[tokio::test]
async fn a_level_that_would_climb_the_url_path_is_dead_lettered_unsent() {
    let device = Device::start(Script::default()).await;
    let gw = TestGateway::start_with(|c| {
        let mut r = rule(
            "climb",
            "valves/+/set",
            format!("http://{}/api/{{2}}/set", device.addr),
        );
        r.dead_letter_topic = Some("dead/valves".to_owned());
        c.push.push(r);
    })
    .await;
    let (client, mut dead) = gw.mqtt_v4("climber", &[("dead/#", 1)]).await;
    for level in ["v1", "..", "v2"] {
        client
            .publish(
                format!("valves/{level}/set"),
                rumqttc::QoS::AtLeastOnce,
                false,
                "open",
            )
            .await
            .unwrap();
    }
    let letter = recv(&mut dead).await;
    let letter: Value = serde_json::from_slice(&letter.payload).unwrap();
    assert_eq!(letter["reason"], "unaddressable");
    assert_eq!(letter["attempts"], 0);
    assert_eq!(letter["message"]["topic"], "valves/../set");
    assert!(
        letter["error"].as_str().unwrap().contains("path segment"),
        "{letter}"
    );
    let seen = eventually("the other two arrive", || async {
        let seen = device.seen();
        (seen.len() == 2).then_some(seen)
    })
    .await;
    let mut uris: Vec<_> = seen.iter().map(|r| r.uri.to_string()).collect();
    uris.sort();
    assert_eq!(uris, ["/api/v1/set", "/api/v2/set"]);
    assert_eq!(
        metric(&gw, &sample("push_dead_letters", "climb")).await,
        1.0
    );
}

#[tokio::test]
async fn the_outbox_keeps_undelivered_messages_across_a_restart() {
    let down = Down::new();
    let port = down.addr();
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_owned();
    let configure = |c: &mut Config| {
        c.data_dir = dir.clone();
        let mut r = rule("meter", "meters/#", format!("http://{port}/in/{{2}}"));
        r.backoff = Duration::from_millis(20);
        r.max_backoff = Duration::from_millis(50);
        c.push.push(r);
    };
    let gw = TestGateway::start_with(configure).await;
    for i in 0..10 {
        let topic = if i % 2 == 0 { "meters/x" } else { "meters/y" };
        assert_eq!(
            gw.post(&format!("/topics/{topic}"), format!("{i}"))
                .await
                .status(),
            204
        );
    }
    eventually("the device was tried", || async {
        (metric(&gw, &sample("push_failed", "meter")).await >= 2.0).then_some(())
    })
    .await;
    assert_eq!(
        metric(&gw, "topicgate_push_queued{rule=\"meter\"}").await,
        10.0
    );
    gw.stop().await.expect("the gateway stops cleanly");

    let device = Device::start_on(down, Script::default());
    let gw = TestGateway::start_with(configure).await;
    let delivered = eventually("every message arrives after the restart", || async {
        let d = device.delivered();
        (d.values().map(Vec::len).sum::<usize>() == 10).then_some(d)
    })
    .await;
    assert_eq!(delivered["x"], ["0", "2", "4", "6", "8"]);
    assert_eq!(delivered["y"], ["1", "3", "5", "7", "9"]);
    eventually("the outbox is empty", || async {
        (metric(&gw, "topicgate_push_queued{rule=\"meter\"}").await == 0.0).then_some(())
    })
    .await;
    gw.stop().await.expect("the gateway stops cleanly");
}

#[tokio::test]
async fn an_mqtt5_request_gets_the_device_s_answer_and_a_reply_topic_serves_3_1_1() {
    let device = Device::start(Script {
        ok_status: 201,
        ok_body: "{\"relay\":\"on\"}",
        ok_type: "application/json",
        ..Script::default()
    })
    .await;
    let gw = TestGateway::start_with(|c| {
        let mut r = rule(
            "plugs",
            "plugs/+/set",
            format!("http://{}/relay/{{2}}", device.addr),
        );
        r.method = topicgate::config::PushMethod::PUT;
        r.reply_topic = Some("plugs/{2}/state".to_owned());
        c.push.push(r);
    })
    .await;
    let (caller, mut replies) = gw.mqtt_v5("caller", &[("me/replies", 1)]).await;
    let (_v4, mut states) = gw.mqtt_v4("v4-reader", &[("plugs/+/state", 1)]).await;
    let props = PublishProperties {
        response_topic: Some("me/replies".to_owned()),
        correlation_data: Some(RawBytes::from_static(b"call-42")),
        content_type: Some("text/plain".to_owned()),
        ..PublishProperties::default()
    };
    caller
        .publish_with_properties("plugs/p7/set", qos_v5(1), false, "on", props)
        .await
        .unwrap();
    let reply = recv(&mut replies).await;
    assert_eq!(reply.topic, "me/replies");
    assert_eq!(reply.payload, "{\"relay\":\"on\"}");
    let props = reply.properties.expect("the reply has properties");
    assert_eq!(props.correlation_data.as_deref(), Some(&b"call-42"[..]));
    assert_eq!(props.content_type.as_deref(), Some("application/json"));
    assert_eq!(
        props.user_properties,
        [
            ("status".to_owned(), "201".to_owned()),
            ("firmware".to_owned(), "1.2".to_owned())
        ]
    );
    let state = recv(&mut states).await;
    assert_eq!(state.topic, "plugs/p7/state");
    assert_eq!(state.payload, "{\"relay\":\"on\"}");
    let seen = device.seen();
    assert_eq!(seen[0].method, Method::PUT);
    assert_eq!(seen[0].uri, "/relay/p7");
    assert_eq!(seen[0].headers["content-type"], "text/plain");
}

#[tokio::test]
async fn pull_publishes_a_value_once_while_its_etag_holds_and_again_when_it_changes() {
    let device = Device::start(Script::default()).await;
    let gw = TestGateway::start_with(|c| {
        c.pull.push(PullRule {
            name: "temp".to_owned(),
            url: format!("http://{}/temp", device.addr),
            interval: Duration::from_millis(20),
            observe: false,
            topic: "sensors/7/temp".to_owned(),
            retain: true,
            headers: Default::default(),
            principal: None,
            timeout: Duration::from_secs(5),
            max_backoff: Duration::from_secs(1),
            ca_cert: None,
            client_cert: None,
            client_key: None,
        });
    })
    .await;
    let (_sub, mut rx) = gw.mqtt_v4("temp-reader", &[("sensors/#", 1)]).await;
    let first = recv(&mut rx).await;
    assert_eq!(first.payload, "21.5");
    // Several conditional reads later, the value was still published once.
    eventually("the device answers 304 to conditional reads", || async {
        (device.state.not_modified.load(Ordering::SeqCst) >= 5).then_some(())
    })
    .await;
    assert_eq!(
        metric(
            &gw,
            "topicgate_pull_reads_total{rule=\"temp\",outcome=\"changed\"}"
        )
        .await,
        1.0
    );
    assert!(
        rx.try_recv().is_err(),
        "an unchanged value is not published again"
    );
    let retained = gw.get("/topics/sensors/7/temp").await;
    assert_eq!(retained.text().await.unwrap(), "21.5");
    *device.state.value.lock().unwrap() = "22.0";
    let second = recv(&mut rx).await;
    assert_eq!(second.payload, "22.0");
    assert_eq!(metric(&gw, "topicgate_pull_up{rule=\"temp\"}").await, 1.0);
}

#[tokio::test]
async fn rules_are_listed_with_their_state_and_no_secret() {
    let device = Device::start(Script::default()).await;
    let gw = TestGateway::start_with(|c| {
        let mut r = rule(
            "plugs",
            "plugs/#",
            format!("http://{}/p/{{2}}", device.addr),
        );
        r.headers
            .insert("Authorization".to_owned(), "Bearer ${HOME}".to_owned());
        r.dead_letter_topic = Some("dead/plugs".to_owned());
        c.push.push(r);
        c.pull.push(PullRule {
            name: "temp".to_owned(),
            url: format!("http://{}/temp", device.addr),
            interval: Duration::from_secs(3600),
            observe: false,
            topic: "sensors/temp".to_owned(),
            retain: true,
            headers: Default::default(),
            principal: None,
            timeout: Duration::from_secs(5),
            max_backoff: Duration::from_secs(60),
            ca_cert: None,
            client_cert: None,
            client_key: None,
        });
    })
    .await;
    assert_eq!(gw.post("/topics/plugs/1", "on").await.status(), 204);
    let rules: Value = eventually("the push is counted", || async {
        let rules: Value = gw.get("/rules").await.json().await.ok()?;
        (rules["push"][0]["sent"] == 1 && rules["pull"][0]["changed"] == 1).then_some(rules)
    })
    .await;
    let push = &rules["push"][0];
    assert_eq!(push["name"], "plugs");
    assert_eq!(push["filter"], "plugs/#");
    assert_eq!(
        push["url"],
        format!("http://{}/p/{{2}}", device.addr).as_str()
    );
    assert_eq!(push["headers"]["authorization"], "<redacted>");
    assert_eq!(push["dead_letter_topic"], "dead/plugs");
    assert_eq!(push["queued"], 0);
    assert_eq!(push["last"]["status"], 204);
    let pull = &rules["pull"][0];
    assert_eq!(pull["topic"], "sensors/temp");
    assert_eq!(pull["last"]["status"], 200);
    let text = gw.get("/rules").await.text().await.unwrap();
    let home = std::env::var("HOME").unwrap();
    assert!(!text.contains(&format!("Bearer {home}")), "{text}");
    // Documented in the OpenAPI document.
    let doc: Value = gw.get("/openapi.json").await.json().await.unwrap();
    assert!(doc["paths"]["/rules"]["get"].is_object());
    assert!(doc["components"]["schemas"]["RulesReport"].is_object());
}

#[tokio::test]
async fn a_hanging_endpoint_holds_up_neither_another_rule_nor_the_broker() {
    let hanging = Device::start(Script {
        hang: true,
        ..Script::default()
    })
    .await;
    let device = Device::start(Script::default()).await;
    let gw = TestGateway::start_with(|c| {
        c.push
            .push(rule("stuck", "x/#", format!("http://{}/x", hanging.addr)));
        c.push.push(rule(
            "fine",
            "y/#",
            format!("http://{}/y/{{2}}", device.addr),
        ));
    })
    .await;
    let (_sub, mut rx) = gw.mqtt_v4("watcher", &[("x/#", 1)]).await;
    for i in 0..5 {
        assert_eq!(gw.post("/topics/x/1", format!("{i}")).await.status(), 204);
        assert_eq!(gw.post("/topics/y/1", format!("{i}")).await.status(), 204);
        assert_eq!(recv(&mut rx).await.payload, format!("{i}").as_str());
    }
    eventually("the other rule delivers", || async {
        (device.delivered().get("1").map(Vec::len) == Some(5)).then_some(())
    })
    .await;
    assert_eq!(
        metric(&gw, "topicgate_push_queued{rule=\"stuck\"}").await,
        5.0
    );
}

/// The binary with a config file, killed when dropped.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A config file in `data` with one push rule, `meter`, taking `meters/+` to `device`, plus
/// `extra` lines.
fn meter_config(data: &tempfile::TempDir, device: SocketAddr, extra: &str) -> std::path::PathBuf {
    let config = data.path().join("topicgate.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[[push]]\nname = \"meter\"\nfilter = \"meters/+\"\n\
             url = \"http://{device}/in/{{2}}\"\n{extra}",
            data.path().join("data")
        ),
    )
    .unwrap();
    config
}

/// A POST of `body` to `topic` on the gateway at `http`, which takes it.
async fn publish_to(client: &reqwest::Client, http: SocketAddr, topic: &str, body: String) {
    let resp = client
        .post(format!("http://{http}/topics/{topic}"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

async fn spawn_gateway(config: &std::path::Path, http: SocketAddr) -> Process {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_topicgate"))
        .arg("--config")
        .arg(config)
        .args(["--http-addr", &http.to_string()])
        .args(["--mqtt-addr", "127.0.0.1:0", "--coap-addr", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let process = Process(child);
    let client = reqwest::Client::new();
    eventually("the gateway is ready", || async {
        let r = client
            .get(format!("http://{http}/readyz"))
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    process
}

#[tokio::test]
async fn nothing_accepted_is_lost_when_the_gateway_is_killed() {
    let down = Down::new();
    let device_addr = down.addr();
    let data = tempfile::tempdir().unwrap();
    let config = meter_config(
        &data,
        device_addr,
        "backoff = \"20ms\"\nmax_backoff = \"50ms\"\n",
    );
    let http = free_port();
    let gateway = spawn_gateway(&config, http).await;
    let client = reqwest::Client::new();
    for i in 0..20 {
        let topic = if i % 2 == 0 { "meters/x" } else { "meters/y" };
        publish_to(&client, http, topic, format!("{i}")).await;
    }
    // SIGKILL: no shutdown, no flush.
    drop(gateway);
    let device = Device::start_on(down, Script::default());
    let _gateway = spawn_gateway(&config, free_port()).await;
    let delivered = eventually("every accepted message arrives", || async {
        let d = device.delivered();
        (d.values().map(Vec::len).sum::<usize>() >= 20).then_some(d)
    })
    .await;
    let expect =
        |from: u32| -> Vec<String> { (from..20).step_by(2).map(|i| i.to_string()).collect() };
    // The device was down before the kill: nothing was in flight, so nothing comes twice.
    assert_eq!(delivered["x"], expect(0));
    assert_eq!(delivered["y"], expect(1));
}

/// What a rule has delivered is not pushed again after a `kill -9`, though its removal from
/// the outbox is written without an fsync (the delivery log): the kill comes within
/// milliseconds of the last delivery, before any later commit.
#[tokio::test]
async fn what_was_delivered_before_a_kill_is_not_pushed_again() {
    let device = Device::start(Script::default()).await;
    let data = tempfile::tempdir().unwrap();
    let config = meter_config(&data, device.addr, "");
    let http = free_port();
    let gateway = spawn_gateway(&config, http).await;
    let client = reqwest::Client::new();
    for i in 0..300 {
        publish_to(&client, http, &format!("meters/{i}"), format!("{i}")).await;
    }
    eventually(
        "every message is delivered and out of the queue",
        || async {
            let queued = metric_at(http, "topicgate_push_queued{rule=\"meter\"}").await;
            (queued == Some(0.0)).then_some(())
        },
    )
    .await;
    drop(gateway);
    let http = free_port();
    let _gateway = spawn_gateway(&config, http).await;
    publish_to(&client, http, "meters/last", "last".to_owned()).await;
    let delivered = eventually("the message after the restart arrives", || async {
        let d = device.delivered();
        d.contains_key("last").then_some(d)
    })
    .await;
    for i in 0..300 {
        assert_eq!(delivered[&i.to_string()], [i.to_string()], "meters/{i}");
    }
    assert_eq!(delivered.values().map(Vec::len).sum::<usize>(), 301);
}

#[tokio::test]
async fn an_unreachable_pulled_device_shows_in_the_metrics_and_rules() {
    let down = free_port();
    let gw = TestGateway::start_with(|c| {
        c.pull.push(PullRule {
            name: "gone".to_owned(),
            url: format!("http://{down}/temp"),
            interval: Duration::from_millis(10),
            observe: false,
            topic: "sensors/gone".to_owned(),
            retain: true,
            headers: Default::default(),
            principal: None,
            timeout: Duration::from_secs(1),
            max_backoff: Duration::from_millis(40),
            ca_cert: None,
            client_cert: None,
            client_key: None,
        });
    })
    .await;
    eventually("failed reads are counted", || async {
        let failed = metric(
            &gw,
            "topicgate_pull_reads_total{rule=\"gone\",outcome=\"failed\"}",
        );
        (failed.await >= 3.0).then_some(())
    })
    .await;
    assert_eq!(metric(&gw, "topicgate_pull_up{rule=\"gone\"}").await, 0.0);
    let rules: Value = gw.get("/rules").await.json().await.unwrap();
    assert!(rules["pull"][0]["last"]["error"].is_string(), "{rules}");
    assert_eq!(gw.get("/topics/sensors/gone").await.status(), 404);
}

/// A test CA with a server certificate for 127.0.0.1 and a client certificate, as PEM files.
fn pki(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "devices test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&server_key, &ca, &ca_key)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    client_params
        .distinguished_name
        .push(DnType::CommonName, "gateway-a");
    let client = client_params.signed_by(&client_key, &ca, &ca_key).unwrap();
    for (name, pem) in [
        ("ca.pem", ca.pem()),
        ("server.pem", server.pem()),
        ("server.key", server_key.serialize_pem()),
        ("client.pem", client.pem()),
        ("client.key", client_key.serialize_pem()),
    ] {
        std::fs::write(dir.join(name), pem).unwrap();
    }
}

#[tokio::test]
async fn an_https_endpoint_that_requires_a_client_certificate_gets_the_rule_s() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let d = dir.path().to_owned();
    // The device: another gateway whose HTTPS listener requires a certificate of the test CA.
    let device = TestGateway::start_with(|c| {
        c.tls.cert = Some(d.join("server.pem"));
        c.tls.key = Some(d.join("server.key"));
        c.tls.client_ca = Some(d.join("ca.pem"));
        c.tls.require_client_cert = true;
    })
    .await;
    let https = device.https.unwrap();
    let (_sub, mut rx) = device.mqtt_v4("remote-reader", &[("remote/#", 1)]).await;
    let gw = TestGateway::start_with(|c| {
        let url = format!("https://{https}/topics/remote/{{2}}");
        let mut r = rule("mtls", "tls/+", url.clone());
        r.ca_cert = Some(d.join("ca.pem"));
        r.client_cert = Some(d.join("client.pem"));
        r.client_key = Some(d.join("client.key"));
        c.push.push(r);
        let mut r = rule("no-cert", "nocert/+", url);
        r.ca_cert = Some(d.join("ca.pem"));
        c.push.push(r);
    })
    .await;
    assert_eq!(gw.post("/topics/tls/x", "over mTLS").await.status(), 204);
    let got = recv(&mut rx).await;
    assert_eq!(got.topic, "remote/x");
    assert_eq!(got.payload, "over mTLS");
    assert_eq!(gw.post("/topics/nocert/y", "refused").await.status(), 204);
    eventually("the rule without a certificate fails", || async {
        (metric(&gw, &sample("push_failed", "no-cert")).await >= 2.0).then_some(())
    })
    .await;
    assert_eq!(metric(&gw, &sample("push_sent", "no-cert")).await, 0.0);
    assert!(rx.try_recv().is_err());
}

#[tokio::test]
async fn a_device_down_under_load_gets_every_message_in_order_per_topic_once_back() {
    let device = Device::start(Script::default()).await;
    device.state.down.store(true, Ordering::SeqCst);
    let url = format!("http://{}/relay/{{2}}", device.addr);
    let gw = TestGateway::start_with(|c| {
        let mut r = rule("load", "load/+", url);
        r.backoff = Duration::from_millis(10);
        r.max_backoff = Duration::from_millis(50);
        c.push.push(r);
    })
    .await;
    const TOPICS: usize = 8;
    const PER_TOPIC: usize = 150;
    let mut publishers = Vec::new();
    for t in 0..TOPICS {
        let (client, _rx) = gw.mqtt_v4(&format!("load-{t}"), &[]).await;
        publishers.push(tokio::spawn(async move {
            for i in 0..PER_TOPIC {
                client
                    .publish(format!("load/t{t}"), qos_v4(1), false, i.to_string())
                    .await
                    .unwrap();
            }
            client
        }));
    }
    let mut clients = Vec::new();
    for p in publishers {
        clients.push(p.await.unwrap());
    }
    let total = (TOPICS * PER_TOPIC) as f64;
    eventually("every message waits in the outbox", || async {
        (metric(&gw, "topicgate_push_queued{rule=\"load\"}").await == total).then_some(())
    })
    .await;
    assert!(device.delivered().is_empty());
    device.state.down.store(false, Ordering::SeqCst);
    let delivered = eventually("every message arrives once the device is back", || async {
        let d = device.delivered();
        (d.values().map(Vec::len).sum::<usize>() == TOPICS * PER_TOPIC).then_some(d)
    })
    .await;
    let expected: Vec<String> = (0..PER_TOPIC).map(|i| i.to_string()).collect();
    for t in 0..TOPICS {
        assert_eq!(delivered[&format!("t{t}")], expected, "topic load/t{t}");
    }
    eventually("every message counted as sent", || async {
        (metric(&gw, &sample("push_sent", "load")).await == total).then_some(())
    })
    .await;
    drop(clients);
}

/// A device whose every answer takes a while, and which notes how many requests it holds at
/// once, in all and for each topic level.
#[derive(Clone, Default)]
struct SlowDevice {
    holding: Arc<Mutex<HashMap<String, usize>>>,
    most: Arc<Mutex<(usize, usize)>>,
    bodies: Arc<Mutex<HashMap<String, Vec<String>>>>,
}

async fn slow(
    axum::extract::State(device): axum::extract::State<SlowDevice>,
    uri: Uri,
    body: Bytes,
) -> StatusCode {
    let level = uri.path().rsplit('/').next().unwrap_or("").to_owned();
    {
        let mut holding = device.holding.lock().unwrap();
        *holding.entry(level.clone()).or_default() += 1;
        let all: usize = holding.values().sum();
        let mut most = device.most.lock().unwrap();
        most.0 = most.0.max(all);
        most.1 = most.1.max(holding[&level]);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    device
        .bodies
        .lock()
        .unwrap()
        .entry(level.clone())
        .or_default()
        .push(String::from_utf8_lossy(&body).into_owned());
    *device.holding.lock().unwrap().get_mut(&level).unwrap() -= 1;
    StatusCode::NO_CONTENT
}

#[tokio::test]
async fn a_rule_sends_to_several_topics_at_once_and_to_one_topic_in_order() {
    let device = SlowDevice::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .fallback(slow)
        .with_state(device.clone());
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let gw = TestGateway::start_with(|c| {
        let mut r = rule("fan", "fan/+", format!("http://{addr}/fan/{{2}}"));
        r.in_flight = 4;
        c.push.push(r);
    })
    .await;
    const TOPICS: usize = 8;
    const EACH: usize = 5;
    for i in 0..EACH {
        for t in 0..TOPICS {
            let resp = gw.post(&format!("/topics/fan/t{t}"), format!("{i}")).await;
            assert_eq!(resp.status(), 204);
        }
    }
    eventually("every message is delivered", || async {
        let bodies = device.bodies.lock().unwrap();
        (bodies.values().map(Vec::len).sum::<usize>() == TOPICS * EACH).then_some(())
    })
    .await;
    let expected: Vec<String> = (0..EACH).map(|i| i.to_string()).collect();
    for (topic, bodies) in device.bodies.lock().unwrap().iter() {
        assert_eq!(bodies, &expected, "in order on {topic}");
    }
    let (all, per_topic) = *device.most.lock().unwrap();
    assert_eq!(per_topic, 1, "one request at a time for each topic");
    assert!(all > 1, "topics are served at once");
    assert!(all <= 4, "never more than in_flight: {all}");
    server.abort();
}
