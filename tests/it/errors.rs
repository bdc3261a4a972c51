//! Every error status of DESIGN §3, as JSON, and nothing a client sends can hurt others.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use topicgate::bridge::{Bridge, RetainedStore, StoreSource};
use topicgate::config::Config;
use topicgate::metrics::Metrics;
use topicgate::mqtt::Broker;
use topicgate::policy::Policy;

use crate::support::{TestGateway, recv};

async fn expect_error(resp: reqwest::Response, status: u16, code: &str) {
    assert_eq!(resp.status(), status, "status");
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], code, "{body}");
    let message = body["message"].as_str().expect("a message");
    assert!(!message.is_empty());
}

#[tokio::test]
async fn bad_topics_are_refused_with_the_reason() {
    let gw = TestGateway::start().await;
    for path in [
        "/topics/a/+/b".to_owned(),
        "/topics/a/%23".to_owned(),
        "/topics/$SYS/x".to_owned(),
        "/topics/%24SYS/x".to_owned(),
        "/topics/".to_owned(),
        "/topics/a%00b".to_owned(),
        "/topics/%FF%FE".to_owned(),
    ] {
        expect_error(gw.post(&path, "x").await, 400, "invalid_topic").await;
    }
    expect_error(gw.get("/topics/a/%23/b").await, 400, "invalid_topic").await;
    let r = gw
        .client
        .delete(gw.url("/topics/a/+"))
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "invalid_topic").await;
    // A topic over 65535 bytes does not even fit in a request line that HTTP libraries accept;
    // sent raw, it is refused before any handler runs.
    let status = raw_status(
        &gw,
        &format!(
            "POST /topics/{} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx",
            "a".repeat(65_536)
        ),
    )
    .await;
    assert!((400..500).contains(&status), "refused with {status}");
    // Empty levels are legal MQTT.
    assert_eq!(gw.post("/topics/a//b", "x").await.status(), 204);
}

/// Sends a raw HTTP/1.1 request and returns the response status.
async fn raw_status(gw: &TestGateway, request: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    crate::support::within("a response", s.read_exact(&mut head))
        .await
        .unwrap();
    std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap()
}

#[tokio::test]
async fn bad_parameters_and_headers_are_refused() {
    let gw = TestGateway::start().await;
    for q in [
        "qos=3",
        "qos=x",
        "retain=maybe",
        "expiry=0",
        "expiry=-1",
        "expiry=99999999999",
        "color=red",
    ] {
        expect_error(
            gw.post(&format!("/topics/t?{q}"), "x").await,
            400,
            "invalid_parameter",
        )
        .await;
    }
    expect_error(
        gw.get("/topics/t/%23?limit=0").await,
        400,
        "invalid_parameter",
    )
    .await;
    expect_error(
        gw.get("/topics/t/%23?limit=1001").await,
        400,
        "invalid_parameter",
    )
    .await;
    let r = gw
        .client
        .put(gw.url("/topics/t?retain=false"))
        .body("x")
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "invalid_parameter").await;
    let r = gw
        .client
        .post(gw.url("/topics/t"))
        .header("mqtt-response-topic", "a/#")
        .body("x")
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "invalid_header").await;
    let r = gw
        .client
        .post(gw.url("/topics/t"))
        .header(
            "mqtt-user-x",
            reqwest::header::HeaderValue::from_bytes(&[0xff]).unwrap(),
        )
        .body("x")
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "invalid_header").await;
}

#[tokio::test]
async fn not_found_and_wrong_method() {
    let gw = TestGateway::start().await;
    expect_error(gw.get("/topics/never/published").await, 404, "not_retained").await;
    expect_error(gw.get("/nothing/here").await, 404, "not_found").await;
    let r = gw
        .client
        .patch(gw.url("/topics/a"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert!(r.headers().contains_key("allow"));
    expect_error(r, 405, "method_not_allowed").await;
    let r = gw.client.post(gw.url("/healthz")).send().await.unwrap();
    expect_error(r, 405, "method_not_allowed").await;
}

#[tokio::test]
async fn oversized_payloads_get_413_and_mqtt_clients_are_unaffected() {
    let gw = TestGateway::start_with(|c| c.max_payload = 64 * 1024).await;
    let (_c, mut rx) = gw.mqtt_v4("bystander", &[("big/#", 0)]).await;
    expect_error(
        gw.post("/topics/big/x", vec![0u8; 64 * 1024 + 1]).await,
        413,
        "payload_too_large",
    )
    .await;
    // Without a Content-Length the limit still holds.
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(
        (0..100).map(|_| Ok::<_, std::io::Error>(vec![1u8; 1024])),
    ));
    expect_error(
        gw.post("/topics/big/x", body).await,
        413,
        "payload_too_large",
    )
    .await;
    assert_eq!(
        gw.post("/topics/big/x", vec![7u8; 64 * 1024])
            .await
            .status(),
        204
    );
    let p = recv(&mut rx).await;
    assert_eq!(
        p.payload.len(),
        64 * 1024,
        "only the publish within the limit arrives"
    );

    // An MQTT client over the limit is disconnected; the others go on.
    let (big, _) = gw.mqtt_v4("too-big", &[]).await;
    big.publish(
        "big/mqtt",
        rumqttc::QoS::AtMostOnce,
        false,
        vec![0u8; 64 * 1024 + 1],
    )
    .await
    .unwrap();
    assert_eq!(gw.post("/topics/big/y", "ok").await.status(), 204);
    let p = recv(&mut rx).await;
    assert_eq!(p.topic, "big/y");
}

#[tokio::test]
async fn publishes_get_503_when_the_broker_link_is_down() {
    let config = Config::default();
    let mqtt = config.mqtt.clone();
    let store = Arc::new(RetainedStore::new());
    let broker = Broker::bind(
        &mqtt,
        &["127.0.0.1:0".parse().unwrap()],
        config.max_payload,
        Arc::new(StoreSource(store.clone())),
        Policy::open(),
        None,
    )
    .unwrap();
    let tracker = TaskTracker::new();
    let link_cancel = CancellationToken::new();
    let (link, _ready) = broker.run(16, &tracker, link_cancel.clone()).unwrap();
    let bridge = Bridge::new(
        store,
        link,
        Arc::new(Metrics::default()),
        Policy::open(),
        1024,
        16,
        topicgate::bridge::History {
            messages: 16,
            bytes: 1 << 20,
        },
        Default::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let http_cancel = CancellationToken::new();
    let router = topicgate::http::router(
        bridge.clone(),
        config.http.clone(),
        http_cancel.clone(),
        CancellationToken::new(),
        None,
    );
    let listening = topicgate::http::Listening {
        max_connections: 16,
        header_timeout: std::time::Duration::from_secs(5),
        tls: None,
    };
    tokio::spawn(topicgate::http::serve(
        listener,
        router,
        listening,
        http_cancel.clone(),
    ));
    let client = reqwest::Client::new();
    let url = |p: &str| format!("http://{addr}{p}");

    assert_eq!(
        client
            .post(url("/topics/a"))
            .body("x")
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    link_cancel.cancel();
    crate::support::eventually("the link is down", || async {
        (!bridge.is_ready()).then_some(())
    })
    .await;

    let r = client
        .post(url("/topics/a"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["retry-after"], "1");
    expect_error(r, 503, "broker_unavailable").await;
    let r = client.get(url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        client.get(url("/healthz")).send().await.unwrap().status(),
        200
    );
    http_cancel.cancel();
}

#[tokio::test]
async fn a_request_slower_than_the_timeout_gets_408() {
    let gw =
        TestGateway::start_with(|c| c.http.request_timeout = std::time::Duration::from_millis(200))
            .await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    // The body never comes.
    s.write_all(b"POST /topics/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&response).contains("}") {
        let n = crate::support::within("the 408", s.read(&mut buf))
            .await
            .unwrap();
        assert!(n > 0, "answered before closing");
        response.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains(r#""error":"timeout""#), "{text}");
    assert_eq!(gw.post("/topics/fast", "x").await.status(), 204);
}

/// One plain port serves HTTP/1.1 and HTTP/2 with prior knowledge, told apart by the first
/// bytes, even when they arrive one write at a time.
#[tokio::test]
async fn http1_and_http2_prior_knowledge_share_the_port() {
    use tokio::io::AsyncReadExt;
    let gw = TestGateway::start().await;

    // The preface in two writes, then an empty SETTINGS frame: the server answers with its own
    // SETTINGS frame (type 4).
    let mut s = in_two_writes(
        &gw,
        b"PRI * HTTP/2",
        b".0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0",
    )
    .await;
    let mut frame = [0u8; 9];
    crate::support::within("a SETTINGS frame", s.read_exact(&mut frame))
        .await
        .unwrap();
    assert_eq!(frame[3], 4, "frame header {frame:?}");

    // An HTTP/1.1 request starting with the same letter as the preface.
    let request = b"OST /topics/split HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nz";
    let mut s = in_two_writes(&gw, b"P", request).await;
    let mut head = [0u8; 12];
    crate::support::within("a response", s.read_exact(&mut head))
        .await
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 204");
}

/// A connection to the HTTP port that has sent `first`, then, after giving the server a turn,
/// `rest`.
async fn in_two_writes(gw: &TestGateway, first: &[u8], rest: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    s.write_all(first).await.unwrap();
    s.flush().await.unwrap();
    tokio::task::yield_now().await;
    s.write_all(rest).await.unwrap();
    s
}

/// A client that closes its side partway through its first request (an event-stream request
/// or the HTTP/2 preface, both looked at before hyper reads them) has its connection closed at
/// once, not held until the header deadline.
#[tokio::test]
async fn a_head_cut_short_by_the_client_closes_its_connection_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = TestGateway::start_with(|c| {
        c.http.header_timeout = std::time::Duration::from_secs(3600);
    })
    .await;
    for opening in [
        &b"GET /topics/cut/%23 HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"[..],
        &b"PRI * HTTP/2.0\r\n"[..],
    ] {
        let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
        s.write_all(opening).await.unwrap();
        s.shutdown().await.unwrap();
        let mut answer = Vec::new();
        crate::support::within("the connection to close", s.read_to_end(&mut answer))
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&answer);
        assert!(!text.contains(" 200 "), "{text}");
    }
    assert_eq!(gw.post("/topics/after", "x").await.status(), 204);
}
