//! Request/response: `/rpc/{topic}` over HTTP and CoAP answered by MQTT 5 and MQTT 3.1.1
//! responders, timeouts, separate CoAP responses, concurrent calls, and reply topics nobody else
//! can read.

use std::time::{Duration, Instant};

use bytes::Bytes;
use coap_lite::{CoapOption, MessageClass, MessageType, RequestType};
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::Value;
use tokio::sync::mpsc;
use topicgate::config::{AclAccess, AclEntry, TokenEntry};

use crate::coap_client::{CoapClient, code, set_uint, text, uint_option};
use crate::support::{TestGateway, qos_v4, qos_v5, recv, within};

/// An MQTT 5 responder on `filter`: answers every request on its Response Topic with its
/// Correlation Data, `reply(payload)` as payload, type `text/plain` and a user property. It first
/// sends a decoy with other correlation data, which a correct gateway ignores. Requests it saw
/// go to the returned channel.
async fn responder_v5(
    gw: &TestGateway,
    id: &str,
    filter: &str,
    reply: fn(&[u8]) -> Vec<u8>,
) -> mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Publish> {
    let (client, mut requests) = gw.mqtt_v5(id, &[(filter, 1)]).await;
    let (seen_tx, seen) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(request) = requests.recv().await {
            let props = request.properties.clone().unwrap_or_default();
            let (Some(topic), Some(correlation)) = (props.response_topic, props.correlation_data)
            else {
                continue;
            };
            let decoy = PublishProperties {
                correlation_data: Some(Bytes::from_static(b"someone else")),
                ..PublishProperties::default()
            };
            let answer = PublishProperties {
                correlation_data: Some(correlation),
                content_type: Some("text/plain".to_owned()),
                user_properties: vec![("served-by".to_owned(), "v5".to_owned())],
                ..PublishProperties::default()
            };
            let qos = qos_v5(1);
            let _ = client
                .publish_with_properties(topic.clone(), qos, false, "decoy", decoy)
                .await;
            let _ = client
                .publish_with_properties(topic, qos, false, reply(&request.payload), answer)
                .await;
            let _ = seen_tx.send(request);
        }
    });
    seen
}

fn shout(payload: &[u8]) -> Vec<u8> {
    payload.to_ascii_uppercase()
}

fn echo(payload: &[u8]) -> Vec<u8> {
    payload.to_vec()
}

async fn error_code(resp: reqwest::Response) -> String {
    let body: Value = resp.json().await.expect("a JSON error body");
    assert!(body["message"].is_string(), "{body}");
    body["error"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn an_mqtt5_responder_answers_an_http_call() {
    let gw = TestGateway::start().await;
    let mut seen = responder_v5(&gw, "svc-v5", "svc/upper", shout).await;
    let resp = gw
        .client
        .post(gw.url("/rpc/svc/upper"))
        .header("content-type", "text/plain")
        .header("mqtt-user-trace", "t-1")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/plain");
    assert_eq!(resp.headers()["mqtt-user-served-by"], "v5");
    assert_eq!(resp.text().await.unwrap(), "HELLO");

    // The request carried a fresh reply topic under the reserved prefix, and the caller's
    // metadata.
    let request = recv(&mut seen).await;
    let props = request.properties.unwrap();
    let topic = props.response_topic.unwrap();
    assert!(topic.starts_with("rpc/replies/"), "{topic}");
    assert!(props.correlation_data.is_some_and(|c| !c.is_empty()));
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        props.user_properties,
        [("trace".to_owned(), "t-1".to_owned())]
    );

    // PUT calls as POST does, each with a reply topic of its own.
    let resp = gw.put("/rpc/svc/upper", "again").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "AGAIN");
    let second = recv(&mut seen).await.properties.unwrap();
    assert_ne!(second.response_topic.unwrap(), topic);
}

#[tokio::test]
async fn an_mqtt311_responder_answers_through_the_envelope() {
    let gw = TestGateway::start().await;
    let (client, mut requests) = gw.mqtt_v4("svc-v4", &[("svc/v4", 1)]).await;
    tokio::spawn(async move {
        while let Some(request) = requests.recv().await {
            let envelope: Value = serde_json::from_slice(&request.payload).unwrap();
            let reply_to = envelope["properties"]["response_topic"].as_str().unwrap();
            let answer = format!("v4 got {}", envelope["payload"].as_str().unwrap());
            let _ = client.publish(reply_to, qos_v4(1), false, answer).await;
        }
    });
    let resp = gw.post("/rpc/svc/v4?envelope=true", "ping").await;
    assert_eq!(resp.status(), 200);
    // A 3.1.1 reply has no content type.
    assert_eq!(resp.headers()["content-type"], "application/octet-stream");
    assert_eq!(resp.text().await.unwrap(), "v4 got ping");
}

#[tokio::test]
async fn an_http_client_answers_a_call_on_its_reply_topic() {
    use base64::Engine;
    let gw = TestGateway::start().await;
    let mut requests = gw.sse("svc/http", None).await;
    let call = gw.client.post(gw.url("/rpc/svc/http")).body("ping").send();
    let call = tokio::spawn(call);
    let request = requests.expect_event().await.json();
    let reply_to = request["properties"]["response_topic"].as_str().unwrap();
    let correlation = request["properties"]["correlation_data"].as_str().unwrap();
    let correlation = base64::engine::general_purpose::STANDARD
        .decode(correlation)
        .unwrap();
    let answered = gw
        .client
        .post(gw.url(&format!("/topics/{reply_to}")))
        .header("mqtt-correlation-data", correlation)
        .body("pong")
        .send()
        .await
        .unwrap();
    assert_eq!(answered.status(), 204);
    let resp = within("the call's answer", call).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "pong");
}

#[tokio::test]
async fn a_call_without_reply_is_a_504_when_its_timeout_ends() {
    let gw = TestGateway::start_with(|c| c.rpc.timeout = Duration::from_millis(300)).await;
    // Nobody subscribes: the request goes nowhere.
    for (path, asked) in [
        ("/rpc/nobody/home?timeout=1.5", Duration::from_millis(1500)),
        ("/rpc/nobody/home?timeout=700ms", Duration::from_millis(700)),
        ("/rpc/nobody/home", Duration::from_millis(300)),
    ] {
        let started = Instant::now();
        let resp = gw.post(path, "anyone?").await;
        let took = started.elapsed();
        assert_eq!(resp.status(), 504, "{path}");
        assert_eq!(error_code(resp).await, "no_reply");
        assert!(took >= asked, "{path} answered after {took:?}");
        assert!(
            took < asked + Duration::from_secs(3),
            "{path} took {took:?}"
        );
    }
}

#[tokio::test]
async fn concurrent_calls_each_get_their_own_reply() {
    let gw = TestGateway::start().await;
    let _seen = responder_v5(&gw, "svc-echo", "svc/echo/+", echo).await;
    let calls = (0..200).map(|i| {
        let client = gw.client.clone();
        let url = gw.url(&format!("/rpc/svc/echo/{}?timeout=20s", i % 7));
        async move {
            let body = format!("call {i}");
            let resp = client.post(url).body(body.clone()).send().await.unwrap();
            assert_eq!(resp.status(), 200, "{body}");
            assert_eq!(resp.text().await.unwrap(), body);
        }
    });
    within("200 calls", futures_util::future::join_all(calls)).await;
}

#[tokio::test]
async fn a_waiting_call_ends_with_503_when_the_gateway_stops() {
    let gw = TestGateway::start().await;
    let (_listener, mut requests) = gw.mqtt_v5("svc-mute", &[("svc/mute", 0)]).await;
    let call = tokio::spawn(
        gw.client
            .post(gw.url("/rpc/svc/mute?timeout=60s"))
            .body("q")
            .send(),
    );
    // The request is out: the call waits for a reply that will not come.
    recv(&mut requests).await;
    let started = Instant::now();
    gw.stop().await.expect("the gateway stops cleanly");
    let resp = within("the call", call).await.unwrap().unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(error_code(resp).await, "broker_unavailable");
    // Well within the default grace of 5 s, which a waiting call would otherwise use up.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn calls_ask_for_credentials_and_the_acl_as_publishes_do() {
    let gw = TestGateway::start_with(|c| {
        c.auth.allow_anonymous = Some(false);
        c.auth.tokens.push(TokenEntry {
            name: "caller".to_owned(),
            token: "caller-token-0123456789".to_owned(),
        });
        c.auth.acl.push(AclEntry {
            user: "caller".to_owned(),
            topic: "allowed/#".to_owned(),
            access: AclAccess::Write,
        });
    })
    .await;
    let resp = gw.post("/rpc/allowed/x", "q").await;
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().contains_key("www-authenticate"));
    let call = |path: &str| {
        gw.client
            .post(gw.url(path))
            .bearer_auth("caller-token-0123456789")
            .body("q")
            .send()
    };
    let resp = call("/rpc/elsewhere/x").await.unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(error_code(resp).await, "forbidden");
    // Allowed to publish, it is published, and nobody answers.
    let resp = call("/rpc/allowed/x?timeout=100ms").await.unwrap();
    assert_eq!(resp.status(), 504);
    let coap = CoapClient::new(gw.coap).await;
    let refused = coap.call(coap_call(&coap, "rpc/allowed/x", "q")).await;
    assert_eq!(code(&refused), "4.01");
    let target = "rpc/elsewhere/x?auth=caller-token-0123456789";
    let refused = coap.call(coap_call(&coap, target, "q")).await;
    assert_eq!(code(&refused), "4.03");
}

#[tokio::test]
async fn bad_calls_are_refused_with_400() {
    let gw = TestGateway::start().await;
    for (path, code) in [
        ("/rpc/a/+", "invalid_topic"),
        ("/rpc/a/%23", "invalid_topic"),
        ("/rpc/", "invalid_topic"),
        ("/rpc", "invalid_topic"),
        ("/rpc/%24SYS/x", "invalid_topic"),
        ("/rpc/a?timeout=61", "invalid_parameter"),
        ("/rpc/a?timeout=0", "invalid_parameter"),
        ("/rpc/a?timeout=soon", "invalid_parameter"),
        ("/rpc/a?envelope=maybe", "invalid_parameter"),
        ("/rpc/a?retain=true", "invalid_parameter"),
    ] {
        let resp = gw.post(path, "x").await;
        assert_eq!(resp.status(), 400, "{path}");
        assert_eq!(error_code(resp).await, code, "{path}");
    }
    let resp = gw
        .client
        .post(gw.url("/rpc/a"))
        .header("mqtt-response-topic", "mine")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(error_code(resp).await, "invalid_header");
}

#[tokio::test]
async fn nobody_can_read_reply_topics() {
    let gw = TestGateway::start().await;
    let _seen = responder_v5(&gw, "svc-secret", "svc/secret", shout).await;

    // An MQTT client is refused the reply prefix outright...
    let mut opts = MqttOptions::new("snoop", "127.0.0.1", gw.mqtt.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (snoop, mut eventloop) = AsyncClient::new(opts, 64);
    let (acks_tx, mut acks) = mpsc::unbounded_channel();
    let (got_tx, mut got) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            match event {
                Event::Incoming(Packet::SubAck(ack)) => drop(acks_tx.send(ack.return_codes)),
                Event::Incoming(Packet::Publish(p)) => drop(got_tx.send(p.topic)),
                _ => {}
            }
        }
    });
    for filter in ["rpc/replies/#", "rpc/replies/+"] {
        snoop.subscribe(filter, qos_v5(0)).await.unwrap();
        let codes = within("SUBACK", acks.recv()).await.unwrap();
        assert_eq!(codes, [SubscribeReasonCode::NotAuthorized], "{filter}");
    }
    // ...and a wider subscription, an event stream and a listing carry no reply.
    snoop.subscribe("#", qos_v5(0)).await.unwrap();
    let codes = within("SUBACK", acks.recv()).await.unwrap();
    assert!(matches!(codes[0], SubscribeReasonCode::Success(_)));
    let mut stream = gw.sse("%23", None).await;

    let resp = gw.post("/rpc/svc/secret", "psst").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "PSST");
    // A marker published after the reply: whoever sees it has been sent the reply before it,
    // had the reply been readable.
    assert_eq!(gw.put("/topics/marker", "m").await.status(), 204);
    let mut topics = Vec::new();
    loop {
        let topic = String::from_utf8(recv(&mut got).await.to_vec()).unwrap();
        let done = topic == "marker";
        topics.push(topic);
        if done {
            break;
        }
    }
    assert!(topics.contains(&"svc/secret".to_owned()), "{topics:?}");
    assert!(!topics.iter().any(|t| t.starts_with("rpc/")), "{topics:?}");
    let mut streamed = Vec::new();
    loop {
        let event = stream.expect_event().await;
        let topic = event.json()["topic"].as_str().unwrap().to_owned();
        let done = topic == "marker";
        streamed.push(topic);
        if done {
            break;
        }
    }
    assert!(
        !streamed.iter().any(|t| t.starts_with("rpc/")),
        "{streamed:?}"
    );

    // Reads over HTTP: a filter over the prefix and a single reply topic are refused, even
    // one with a retained value, and a wider listing leaves it out.
    assert_eq!(
        gw.put("/topics/rpc/replies/planted", "r").await.status(),
        204
    );
    for path in ["/topics/rpc/replies/%23", "/topics/rpc/replies/planted"] {
        assert_eq!(gw.get(path).await.status(), 403, "{path}");
    }
    let listing = gw.get("/topics/%23").await.text().await.unwrap();
    assert!(listing.contains("marker"), "{listing}");
    assert!(!listing.contains("rpc/replies/"), "{listing}");
}

/// A CoAP POST of `payload` to `target` (`rpc/...?query`), confirmable.
fn coap_call(client: &CoapClient, target: &str, payload: &str) -> coap_lite::Packet {
    let mut request = client.request(RequestType::Post, target);
    request.payload = payload.as_bytes().to_vec();
    request
}

#[tokio::test]
async fn a_coap_call_is_answered_in_the_ack_when_the_reply_is_quick() {
    let gw = TestGateway::start().await;
    let mut seen = responder_v5(&gw, "svc-coap", "svc/coap", shout).await;
    let client = CoapClient::new(gw.coap).await;
    let mut request = coap_call(&client, "rpc/svc/coap", "hello");
    set_uint(&mut request, CoapOption::ContentFormat, 0);
    let response = client.call(request).await;
    assert_eq!(code(&response), "2.05");
    assert_eq!(text(&response), "HELLO");
    // The reply's text/plain is Content-Format 0.
    assert_eq!(uint_option(&response, CoapOption::ContentFormat), Some(0));
    let props = recv(&mut seen).await.properties.unwrap();
    assert!(props.response_topic.unwrap().starts_with("rpc/replies/"));
    assert_eq!(
        props.content_type.as_deref(),
        Some("text/plain;charset=utf-8")
    );
}

#[tokio::test]
async fn a_slow_reply_is_acknowledged_first_then_sent_separately_until_acknowledged() {
    let ack_timeout = Duration::from_millis(400);
    let gw = TestGateway::start_with(|c| c.coap.ack_timeout = ack_timeout).await;
    // The responder answers only when the test says so.
    let (client, mut requests) = gw.mqtt_v5("svc-slow", &[("svc/slow", 1)]).await;
    let (go_tx, mut go) = mpsc::unbounded_channel::<()>();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(request) = requests.recv().await {
            let _ = seen_tx.send(());
            if go.recv().await.is_none() {
                break;
            }
            let props = request.properties.unwrap();
            let answer = PublishProperties {
                correlation_data: props.correlation_data,
                ..PublishProperties::default()
            };
            let topic = props.response_topic.unwrap();
            let _ = client
                .publish_with_properties(topic, qos_v5(1), false, "at last", answer)
                .await;
        }
    });

    let coap = CoapClient::new(gw.coap).await;
    let request = coap_call(&coap, "rpc/svc/slow?timeout=10s", "q");
    coap.send(&request).await;
    recv(&mut seen).await;
    // Half the ACK timeout on, the request is acknowledged with an empty ACK.
    let ack = coap.recv().await;
    assert_eq!(ack.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(ack.header.code, MessageClass::Empty);
    assert_eq!(ack.header.message_id, request.header.message_id);
    // A retransmission of the request gets that ACK again and is not published again.
    coap.send(&request).await;
    let again = coap.recv().await;
    assert_eq!(again.header.code, MessageClass::Empty);
    assert_eq!(again.header.message_id, request.header.message_id);

    go_tx.send(()).unwrap();
    let response = coap.recv().await;
    assert_eq!(response.header.get_type(), MessageType::Confirmable);
    assert_eq!(code(&response), "2.05");
    assert_eq!(response.get_token(), request.get_token());
    assert_eq!(text(&response), "at last");
    // Unacknowledged, it is sent again under the same message id; acknowledged, it stops.
    let resent = coap.recv().await;
    assert_eq!(resent.header.message_id, response.header.message_id);
    assert_eq!(text(&resent), "at last");
    coap.ack(response.header.message_id).await;
    assert!(coap.try_recv(ack_timeout * 4).await.is_none());
    assert!(seen.try_recv().is_err(), "the duplicate was published");
}

#[tokio::test]
async fn a_coap_call_without_reply_is_a_5_04_when_its_timeout_ends() {
    let gw = TestGateway::start_with(|c| c.coap.ack_timeout = Duration::from_millis(400)).await;
    let coap = CoapClient::new(gw.coap).await;
    // Within the ACK wait: piggybacked.
    let started = Instant::now();
    let response = coap
        .call(coap_call(&coap, "rpc/nobody/home?timeout=100ms", "q"))
        .await;
    assert_eq!(code(&response), "5.04");
    assert!(started.elapsed() >= Duration::from_millis(100));
    // Beyond it: an empty ACK, then a confirmable 5.04.
    let started = Instant::now();
    let request = coap_call(&coap, "rpc/nobody/home?timeout=1s", "q");
    coap.send(&request).await;
    let ack = coap.recv().await;
    assert_eq!(ack.header.code, MessageClass::Empty);
    let response = coap.recv().await;
    let took = started.elapsed();
    assert_eq!(response.header.get_type(), MessageType::Confirmable);
    assert_eq!(code(&response), "5.04");
    assert_eq!(response.get_token(), request.get_token());
    assert!(took >= Duration::from_secs(1), "{took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    coap.ack(response.header.message_id).await;
}

#[tokio::test]
async fn bad_coap_calls_are_refused() {
    let gw = TestGateway::start().await;
    let coap = CoapClient::new(gw.coap).await;
    for (target, expected) in [
        ("rpc/a/+", "4.00"),
        ("rpc/a/#", "4.00"),
        ("rpc/a?timeout=61", "4.00"),
        ("rpc/a?retain=true", "4.00"),
    ] {
        let response = coap.call(coap_call(&coap, target, "x")).await;
        assert_eq!(code(&response), expected, "{target}");
    }
    let get = coap.call(coap.request(RequestType::Get, "rpc/a")).await;
    assert_eq!(code(&get), "4.05");
    // Nobody reads reply topics over CoAP either.
    let read = coap
        .call(coap.request(RequestType::Get, "topics/rpc/replies/x"))
        .await;
    assert_eq!(code(&read), "4.03");
}

#[tokio::test]
async fn require_subscriber_refuses_a_call_nobody_subscribes_to_at_once() {
    let gw = TestGateway::start().await;
    let started = Instant::now();
    let resp = gw
        .post("/rpc/nobody/home?require_subscriber=true&timeout=30s", "q")
        .await;
    assert_eq!(resp.status(), 404);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refused at once, not after the timeout"
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "no_subscriber");
    assert!(
        body["message"].as_str().unwrap().contains("nobody/home"),
        "{body}"
    );
    let resp = gw
        .post("/rpc/nobody/home?require_subscriber=maybe", "q")
        .await;
    assert_eq!(resp.status(), 400);

    // With a subscriber on a matching filter, the same call goes out and is answered.
    let _seen = responder_v5(&gw, "svc-home", "nobody/+", echo).await;
    let resp = gw
        .post("/rpc/nobody/home?require_subscriber=true", "q")
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "q");
    // `false` is the default: a call nobody subscribes to waits for its timeout.
    let resp = gw
        .post(
            "/rpc/elsewhere/x?require_subscriber=false&timeout=100ms",
            "q",
        )
        .await;
    assert_eq!(resp.status(), 504);
}

#[tokio::test]
async fn require_subscriber_in_front_of_an_external_broker_is_503_without_retry_after() {
    let broker = TestGateway::start().await;
    let gw = TestGateway::start_with(|c| c.broker.url = format!("mqtt://{}", broker.mqtt)).await;
    let resp = gw.post("/rpc/svc/x?require_subscriber=true", "q").await;
    assert_eq!(resp.status(), 503);
    assert!(!resp.headers().contains_key("retry-after"));
    assert_eq!(error_code(resp).await, "subscribers_unknown");
}

#[tokio::test]
async fn a_coap_call_requiring_a_subscriber_is_refused_at_once_without_one() {
    let gw = TestGateway::start().await;
    let client = CoapClient::new(gw.coap).await;
    let started = Instant::now();
    let response = client
        .call(coap_call(
            &client,
            "rpc/nobody/coap?require_subscriber=true&timeout=30s",
            "q",
        ))
        .await;
    assert_eq!(code(&response), "4.04");
    assert!(text(&response).contains("nobody/coap"));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refused at once, not after the timeout"
    );
    let response = client
        .call(coap_call(
            &client,
            "rpc/nobody/coap?require_subscriber=maybe",
            "q",
        ))
        .await;
    assert_eq!(code(&response), "4.00");
    // With a subscriber, the same call goes out and is answered.
    let _seen = responder_v5(&gw, "svc-coap-home", "nobody/+", echo).await;
    let response = client
        .call(coap_call(
            &client,
            "rpc/nobody/coap?require_subscriber=true",
            "q",
        ))
        .await;
    assert_eq!(code(&response), "2.05");
    assert_eq!(text(&response), "q");
}
