//! Event streams: retained first, live after, resume, reset, heartbeat, lag isolation, shutdown.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{SseReader, TestGateway, eventually, metric, within};

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
    publish_paced(&c4, &mut fast, "load", 8 * 1024, 4000, 100).await;

    // Reading again, the stalled reader first gets what its socket held, then the news.
    let mut stalled = stalled;
    let (_, dropped) = read_until_lagged(&mut stalled).await;
    assert!(dropped > 0);
    let after: f64 =
        crate::support::metric(&gw, "topicgate_lag_dropped_total{stream=\"sse\"}").await;
    assert!(after >= dropped as f64);
}

/// A stalled stream holds no more than `http.sse_history_bytes` of messages: far fewer messages
/// than `http.sse_buffer` pass it, but more bytes than the hub keeps, and it is told it lagged.
#[tokio::test]
async fn a_stalled_reader_holds_no_more_than_the_history_bytes() {
    let gw = TestGateway::start_with(|c| {
        c.max_payload = 64 * 1024;
        c.http.sse_buffer = 1024;
        c.http.sse_history_bytes = 256 * 1024;
    })
    .await;
    let stalled = gw.sse("big/%23", None).await;
    let mut fast = gw.sse("big/%23", None).await;
    let (c4, _) = gw.mqtt_v4("big-pub", &[]).await;
    let total = 1000;
    // In tens (160 KiB), well within what the hub keeps, so the reader that reads keeps up.
    publish_paced(&c4, &mut fast, "big", 16 * 1024, total, 10).await;
    // Its socket's buffers may have taken more while it was stalled (the kernel grows them), so
    // it can have lagged, caught up and lagged again before it reads: every gap is told, and
    // what comes after the last one is the hub's last 256 KiB, about 15 messages.
    let mut stalled = stalled;
    let (mut seen, mut dropped) = read_until_lagged(&mut stalled).await;
    let mut after = 0;
    let mut last = String::new();
    crate::support::within("the messages after the gap", async {
        while seen + dropped < total as u64 {
            let ev = stalled.expect_event().await;
            if ev.event == "lagged" {
                dropped += ev.json()["dropped"].as_u64().expect("dropped count");
                after = 0;
                continue;
            }
            assert_eq!(ev.event, "message");
            last = ev.json()["topic"].as_str().unwrap().to_owned();
            seen += 1;
            after += 1;
        }
    })
    .await;
    assert_eq!(seen + dropped, total as u64);
    assert_eq!(last, format!("big/{}", total - 1));
    assert!((1..=16).contains(&after), "{seen} {dropped} {after}");
}

/// Publishes `total` QoS 0 messages of `size` bytes to `prefix/0`, `prefix/1`…, `batch` at a
/// time, each batch read in full by `fast` before the next goes, so `fast` never falls behind.
async fn publish_paced(
    c4: &rumqttc::AsyncClient,
    fast: &mut SseReader,
    prefix: &str,
    size: usize,
    total: usize,
    batch: usize,
) {
    let payload = "p".repeat(size);
    for first in (0..total).step_by(batch) {
        for n in first..first + batch {
            c4.publish(
                format!("{prefix}/{n}"),
                rumqttc::QoS::AtMostOnce,
                false,
                payload.clone(),
            )
            .await
            .unwrap();
        }
        for n in first..first + batch {
            let ev = fast.expect_event().await;
            assert_eq!(ev.event, "message", "the fast reader never lags");
            assert_eq!(ev.json()["topic"], format!("{prefix}/{n}"));
        }
    }
}

/// Reads `stream` up to its `lagged` event: the messages before it, and how many it says were
/// dropped.
async fn read_until_lagged(stream: &mut SseReader) -> (u64, u64) {
    let mut seen = 0;
    loop {
        let ev = stream.expect_event().await;
        if ev.event == "lagged" {
            return (seen, ev.json()["dropped"].as_u64().expect("dropped count"));
        }
        assert_eq!(ev.event, "message");
        seen += 1;
    }
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

/// Reads one HTTP/1.1 response head off `stream`, and whatever followed it in the same reads.
async fn read_head(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut got = Vec::new();
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = got.split_off(end + 4);
            return (String::from_utf8(got).unwrap(), rest);
        }
        let mut buf = [0u8; 4096];
        let n = within("a response head", stream.read(&mut buf))
            .await
            .unwrap();
        assert!(n > 0, "the connection closed before a response head");
        got.extend_from_slice(&buf[..n]);
    }
}

/// Reads chunks of a chunked body, after `rest`, until their data holds `wanted`; returns the data.
async fn read_chunks_until(stream: &mut TcpStream, mut rest: Vec<u8>, wanted: &str) -> String {
    let mut data = Vec::new();
    loop {
        // Take every whole chunk in `rest`.
        while let Some(line) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = std::str::from_utf8(&rest[..line]).unwrap();
            let size = usize::from_str_radix(size, 16).expect("a chunk size line");
            if rest.len() < line + 2 + size + 2 {
                break;
            }
            assert_ne!(size, 0, "the stream ended");
            data.extend_from_slice(&rest[line + 2..line + 2 + size]);
            assert_eq!(&rest[line + 2 + size..line + 4 + size], b"\r\n");
            rest.drain(..line + 4 + size);
        }
        let text = String::from_utf8_lossy(&data).into_owned();
        if text.contains(wanted) {
            return text;
        }
        let mut buf = [0u8; 4096];
        let n = within("a chunk", stream.read(&mut buf)).await.unwrap();
        assert!(n > 0, "the connection closed mid-stream");
        rest.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn a_stream_over_plain_http11_is_chunked_and_ends_with_its_client() {
    let gw = TestGateway::start().await;
    assert!(
        gw.put("/topics/wire/kept", "old")
            .await
            .status()
            .is_success()
    );
    let mut stream = TcpStream::connect(gw.http).await.unwrap();
    stream
        .write_all(
            b"GET /topics/wire/%23 HTTP/1.1\r\nHost: gw\r\nAccept: text/event-stream\r\n\r\n",
        )
        .await
        .unwrap();
    let (head, rest) = read_head(&mut stream).await;
    let lower = head.to_ascii_lowercase();
    assert!(lower.starts_with("http/1.1 200 ok\r\n"), "{head}");
    assert!(
        lower.contains("\r\ncontent-type: text/event-stream"),
        "{head}"
    );
    assert!(
        lower.contains("\r\ntransfer-encoding: chunked\r\n"),
        "{head}"
    );
    assert!(lower.contains("\r\ndate: "), "{head}");
    assert!(!lower.contains("content-length"), "{head}");
    let retained = read_chunks_until(&mut stream, rest, "\n\n").await;
    assert!(retained.starts_with("event: message\n"), "{retained}");
    assert!(retained.contains(r#""payload":"old""#), "{retained}");

    assert!(
        gw.post("/topics/wire/live", "new")
            .await
            .status()
            .is_success()
    );
    let live = read_chunks_until(&mut stream, Vec::new(), r#""payload":"new""#).await;
    assert!(live.contains(r#""topic":"wire/live""#), "{live}");
    assert_eq!(
        metric(&gw, "topicgate_sse_clients").await,
        1.0,
        "the stream is counted"
    );

    drop(stream);
    eventually("the stream's end to be noticed", || async {
        (metric(&gw, "topicgate_sse_clients").await == 0.0).then_some(())
    })
    .await;
}

/// A slow client's request, arriving in pieces, is read as one head once its last piece comes.
#[tokio::test]
async fn a_stream_request_arriving_in_pieces_is_answered() {
    let gw = TestGateway::start().await;
    assert!(gw.put("/topics/slow/kept", "v").await.status().is_success());
    let mut stream = TcpStream::connect(gw.http).await.unwrap();
    stream.set_nodelay(true).unwrap();
    for piece in [
        &b"GET /topics/slow/%23 HTTP/1.1\r\nHo"[..],
        b"st: gw\r\nAccept: text/event-",
        b"stream\r\n\r\n",
    ] {
        stream.write_all(piece).await.unwrap();
        // The client is slow: each piece reaches the gateway on its own.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (head, rest) = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    let retained = read_chunks_until(&mut stream, rest, "\n\n").await;
    assert!(retained.contains(r#""topic":"slow/kept""#), "{retained}");
}

#[tokio::test]
async fn a_refused_stream_leaves_its_connection_to_the_next_request() {
    let gw = TestGateway::start().await;
    let mut stream = TcpStream::connect(gw.http).await.unwrap();
    // '#' must be the last level: 400, written as a whole response.
    stream
        .write_all(b"GET /topics/a/%23/b HTTP/1.1\r\nHost: gw\r\nAccept: text/event-stream\r\n\r\n")
        .await
        .unwrap();
    let (head, mut body) = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .expect("a content-length")
        .parse()
        .unwrap();
    while body.len() < length {
        let mut buf = [0u8; 1024];
        let n = within("the error body", stream.read(&mut buf))
            .await
            .unwrap();
        assert!(n > 0);
        body.extend_from_slice(&buf[..n]);
    }
    let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(error["error"].is_string(), "{error}");

    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
}

#[tokio::test]
async fn a_not_modified_answer_to_a_stream_request_has_no_body_and_the_connection_goes_on() {
    let gw = TestGateway::start().await;
    assert!(gw.put("/topics/wire/same", "v").await.status().is_success());
    let got = gw.get("/topics/wire/same").await;
    let etag = got.headers()["etag"].to_str().unwrap().to_owned();

    let mut stream = TcpStream::connect(gw.http).await.unwrap();
    let ask = format!(
        "GET /topics/wire/same?stream=false HTTP/1.1\r\nHost: gw\r\n\
         Accept: text/event-stream\r\nIf-None-Match: {etag}\r\n\r\n"
    );
    stream.write_all(ask.as_bytes()).await.unwrap();
    let (head, rest) = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 304 Not Modified\r\n"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(!lower.contains("content-length"), "{head}");
    assert!(!lower.contains("transfer-encoding"), "{head}");
    assert!(rest.is_empty(), "a 304 carries no body");

    stream
        .write_all(b"GET /topics/wire/same HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let (head, mut body) = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    while body.is_empty() {
        let mut buf = [0u8; 64];
        let n = within("the body", stream.read(&mut buf)).await.unwrap();
        assert!(n > 0);
        body.extend_from_slice(&buf[..n]);
    }
    assert_eq!(body, b"v");
}
