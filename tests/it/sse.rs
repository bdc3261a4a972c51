//! Event streams: retained first, live after, resume, reset, heartbeat, lag isolation, shutdown.

use std::time::Duration;

use crate::support::{TestGateway, within};

#[tokio::test]
async fn stream_sends_retained_then_live_from_mqtt_and_http() {
    let gw = TestGateway::start().await;
    gw.client
        .put(gw.url("/topics/home/hum"))
        .body("40")
        .send()
        .await
        .unwrap();
    gw.client
        .put(gw.url("/topics/other/x"))
        .body("no")
        .send()
        .await
        .unwrap();
    let mut s = gw.sse("home/%23", None).await;

    let first = s.expect_event().await;
    assert_eq!(first.event, "message");
    let env = first.json();
    assert_eq!(
        (env["topic"].as_str(), env["payload"].as_str()),
        (Some("home/hum"), Some("40"))
    );
    assert_eq!(env["retain"], true);
    let id = first.id.expect("events have ids");
    let (epoch, seq) = id.split_once('-').expect("id is <epoch>-<seq>");
    assert!(
        epoch.parse::<u64>().is_ok() && seq.parse::<u64>().is_ok(),
        "{id}"
    );

    let (c4, _) = gw.mqtt_v4("sse-pub", &[]).await;
    c4.publish("home/temp", rumqttc::QoS::AtMostOnce, false, "21")
        .await
        .unwrap();
    let live = s.expect_event().await.json();
    assert_eq!(
        (live["topic"].as_str(), live["payload"].as_str()),
        (Some("home/temp"), Some("21"))
    );
    assert_eq!(live["retain"], false);

    gw.client
        .post(gw.url("/topics/home/temp"))
        .header("content-type", "application/json")
        .body("22")
        .send()
        .await
        .unwrap();
    let live = s.expect_event().await.json();
    assert_eq!(live["payload"], "22");
    assert_eq!(live["content_type"], "application/json");
}

#[tokio::test]
async fn query_parameter_opens_a_stream_and_heartbeats_keep_it_alive() {
    let gw = TestGateway::start_with(|c| c.http.sse_heartbeat = Duration::from_millis(100)).await;
    let resp = gw
        .client
        .get(gw.url("/topics/quiet/%23?stream=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.bytes_stream();
    use futures_util::StreamExt;
    let chunk = within("a heartbeat", body.next()).await.unwrap().unwrap();
    assert!(
        String::from_utf8_lossy(&chunk).starts_with(":"),
        "{chunk:?}"
    );
}

#[tokio::test]
async fn reconnecting_with_last_event_id_replays_what_was_missed() {
    let gw = TestGateway::start().await;
    let mut s = gw.sse("feed/%23", None).await;
    gw.post("/topics/feed/a", "1").await;
    let seen = s.expect_event().await;
    drop(s);
    gw.post("/topics/feed/b", "2").await;
    gw.post("/topics/unrelated", "x").await;
    gw.post("/topics/feed/c", "3").await;

    let mut resumed = gw.sse("feed/%23", seen.id.as_deref()).await;
    let a = resumed.expect_event().await;
    let b = resumed.expect_event().await;
    assert_eq!(a.json()["payload"], "2");
    assert_eq!(b.json()["payload"], "3");
    assert_ne!(a.id, b.id);
    gw.post("/topics/feed/d", "4").await;
    assert_eq!(resumed.expect_event().await.json()["payload"], "4");
}

#[tokio::test]
async fn resuming_beyond_the_history_sends_reset_then_the_retained_snapshot() {
    let gw = TestGateway::start_with(|c| c.http.sse_history = 2).await;
    let mut s = gw.sse("hist/%23", None).await;
    gw.post("/topics/hist/a?retain=true", "kept").await;
    let seen = s.expect_event().await;
    drop(s);
    for i in 0..5 {
        gw.post(&format!("/topics/hist/n{i}"), "x").await;
    }
    let mut again = gw.sse("hist/%23", seen.id.as_deref()).await;
    let reset = again.expect_event().await;
    assert_eq!(reset.event, "reset");
    let snap = again.expect_event().await;
    assert_eq!(snap.event, "message");
    assert_eq!(snap.json()["payload"], "kept");

    // An id from another process (another epoch) is never resumed either.
    let mut foreign = gw.sse("hist/%23", Some("1-1")).await;
    assert_eq!(foreign.expect_event().await.event, "reset");
}

#[tokio::test]
async fn a_stalled_reader_lags_alone_and_is_told_how_much_it_lost() {
    let gw = TestGateway::start_with(|c| c.http.sse_buffer = 256).await;
    let stalled = gw.sse("load/%23", None).await;
    let mut fast = gw.sse("load/%23", None).await;
    let (c4, _) = gw.mqtt_v4("lag-pub", &[]).await;

    // Enough data to fill the stalled reader's socket buffers many times over, paced so that
    // the fast reader, which keeps reading, never falls behind.
    let payload = "p".repeat(8 * 1024);
    let total = 4000;
    let mut received = 0;
    for batch in 0..(total / 100) {
        for i in 0..100 {
            let n = batch * 100 + i;
            c4.publish(
                format!("load/{n}"),
                rumqttc::QoS::AtMostOnce,
                false,
                payload.clone(),
            )
            .await
            .unwrap();
        }
        while received < (batch + 1) * 100 {
            let ev = fast.expect_event().await;
            assert_eq!(ev.event, "message", "the fast reader never lags");
            assert_eq!(ev.json()["topic"], format!("load/{received}"));
            received += 1;
        }
    }

    // Reading again, the stalled reader first gets what its socket held, then the news.
    let mut stalled = stalled;
    let lagged = loop {
        let ev = stalled.expect_event().await;
        if ev.event == "lagged" {
            break ev;
        }
        assert_eq!(ev.event, "message");
    };
    let dropped = lagged.json()["dropped"].as_u64().expect("dropped count");
    assert!(dropped > 0);
    let after: f64 =
        crate::support::metric(&gw, "topicgate_lag_dropped_total{stream=\"sse\"}").await;
    assert!(after >= dropped as f64);
}

#[tokio::test]
async fn streams_end_cleanly_on_shutdown() {
    let gw = TestGateway::start().await;
    let mut s = gw.sse("x/%23", None).await;
    let stopping = tokio::spawn(async move { gw.stop().await });
    assert!(s.next_event().await.is_none(), "the stream ends");
    within("shutdown", stopping)
        .await
        .unwrap()
        .expect("clean exit");
}
