//! Long polling: `GET /topics/{topic}?wait=` answers at once with a value the client does not
//! hold, else with the next message, else 204 when the wait ends; filters answer with a listing
//! of what arrived.

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::task::JoinHandle;

use crate::support::{TestGateway, eventually};

/// Starts a long poll of `path` (with its `?wait=`), sending `If-None-Match` when given.
fn poll(gw: &TestGateway, path: &str, etag: Option<&str>) -> JoinHandle<reqwest::Response> {
    let mut req = gw.client.get(gw.url(path));
    if let Some(etag) = etag {
        req = req.header("if-none-match", etag);
    }
    tokio::spawn(async move { req.send().await.expect("the poll is answered") })
}

/// Publishes `payload` (not retained) to `topic` until the poll has been answered: a poll
/// that had not subscribed yet when one was sent gets a later one.
async fn publish_until_answered(
    gw: &TestGateway,
    topic: &str,
    payload: &str,
    poll: JoinHandle<reqwest::Response>,
) -> reqwest::Response {
    eventually("the poll is answered by a publish", || async {
        assert_eq!(
            gw.post(&format!("/topics/{topic}"), payload.to_owned())
                .await
                .status(),
            204
        );
        poll.is_finished().then_some(())
    })
    .await;
    poll.await.unwrap()
}

#[tokio::test]
async fn a_value_the_client_does_not_hold_is_answered_at_once() {
    let gw = TestGateway::start().await;
    assert_eq!(gw.put("/topics/lp/now", "v1").await.status(), 204);
    let started = Instant::now();
    let resp = gw.get("/topics/lp/now?wait=30s").await;
    assert_eq!(resp.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "not after the wait"
    );
    let etag = resp.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(resp.text().await.unwrap(), "v1");
    // An ETag the client holds from an older value: the current one, at once.
    let resp = gw
        .client
        .get(gw.url("/topics/lp/now?wait=30s"))
        .header("if-none-match", "\"stale\"")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["etag"].to_str().unwrap(), etag);
}

#[tokio::test]
async fn holding_the_current_value_waits_for_the_next_message() {
    let gw = TestGateway::start().await;
    assert_eq!(gw.put("/topics/lp/next", "v1").await.status(), 204);
    let etag = gw.get("/topics/lp/next").await.headers()["etag"]
        .to_str()
        .unwrap()
        .to_owned();
    let waiting = poll(&gw, "/topics/lp/next?wait=30", Some(&etag));
    let resp = publish_until_answered(&gw, "lp/next", "v2", waiting).await;
    assert_eq!(resp.status(), 200);
    // Not retained: no state of the topic to validate later, so no ETag; the client keeps v1's.
    assert!(!resp.headers().contains_key("etag"));
    assert_eq!(resp.text().await.unwrap(), "v2");

    // A retained change answers with its ETag, which the next poll sends back and waits on.
    let waiting = poll(&gw, "/topics/lp/next?wait=30", Some(&etag));
    eventually("a retained publish answers the poll", || async {
        assert_eq!(gw.put("/topics/lp/next", "v3").await.status(), 204);
        waiting.is_finished().then_some(())
    })
    .await;
    let resp = waiting.await.unwrap();
    assert_eq!(resp.status(), 200);
    let etag3 = resp.headers()["etag"].to_str().unwrap().to_owned();
    assert_ne!(etag3, etag);
    assert_eq!(resp.text().await.unwrap(), "v3");
    let started = Instant::now();
    let resp = poll(&gw, "/topics/lp/next?wait=1s", Some(&etag3))
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert!(started.elapsed() >= Duration::from_millis(900));

    // A topic with nothing retained waits too, and an MQTT publish answers it.
    let waiting = poll(&gw, "/topics/lp/mqtt?wait=30s", None);
    let (client, _) = gw.mqtt_v4("lp-pub", &[]).await;
    eventually("an MQTT publish answers the poll", || async {
        client
            .publish("lp/mqtt", rumqttc::QoS::AtLeastOnce, false, "from mqtt")
            .await
            .unwrap();
        waiting.is_finished().then_some(())
    })
    .await;
    let resp = waiting.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "from mqtt");
}

#[tokio::test]
async fn nothing_arriving_ends_the_wait_with_204() {
    let gw = TestGateway::start().await;
    assert_eq!(gw.put("/topics/lp/quiet", "v1").await.status(), 204);
    let etag = gw.get("/topics/lp/quiet").await.headers()["etag"]
        .to_str()
        .unwrap()
        .to_owned();
    for (path, etag) in [
        ("/topics/lp/empty?wait=1s", None),
        ("/topics/lp/quiet?wait=1", Some(etag.as_str())),
        ("/topics/lp/%23?wait=1s", None),
    ] {
        let started = Instant::now();
        let resp = poll(&gw, path, etag).await.unwrap();
        let took = started.elapsed();
        assert_eq!(resp.status(), 204, "{path}");
        assert!(took >= Duration::from_millis(900), "{path} waited {took:?}");
        assert!(took < Duration::from_secs(10), "{path} waited {took:?}");
        assert!(resp.bytes().await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn a_filter_answers_with_a_listing_of_what_arrived() {
    let gw = TestGateway::start().await;
    assert_eq!(gw.put("/topics/lpw/old", "before").await.status(), 204);
    let waiting = poll(&gw, "/topics/lpw/%23?wait=30s", None);
    let resp = publish_until_answered(&gw, "lpw/new", "arrived", waiting).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let listing: Value = resp.json().await.unwrap();
    assert_eq!(listing["next"], Value::Null);
    let messages = listing["messages"].as_array().unwrap();
    assert!(!messages.is_empty());
    for m in messages {
        assert_eq!(m["topic"], "lpw/new", "only what arrived: {listing}");
        assert_eq!(m["payload"], "arrived");
    }
}

#[tokio::test]
async fn waits_over_the_maximum_and_bad_combinations_are_400() {
    let gw = TestGateway::start_with(|c| c.http.max_wait = Duration::from_secs(5)).await;
    for path in [
        "/topics/lp/x?wait=6s",
        "/topics/lp/x?wait=0",
        "/topics/lp/x?wait=soon",
        "/topics/lp/x?wait=1s&stream=true",
        "/topics/lp/%23?wait=1s&limit=5",
    ] {
        let resp = gw.get(path).await;
        assert_eq!(resp.status(), 400, "{path}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "invalid_parameter", "{path}");
    }
}
