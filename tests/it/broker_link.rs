//! The gateway's link into rumqttd never stalls: a burst far larger than its buffers flows
//! through, and anything the broker had to skip is counted.

use crate::support::{TestGateway, eventually, metric};

const SENT: u64 = 50_000;

async fn burst_is_received_or_counted(gw: &TestGateway, label: &str) -> (f64, f64) {
    let (client, _) = gw.mqtt_v4("burst", &[]).await;
    for i in 0..SENT {
        client
            .publish(
                format!("bulk/{}", i % 64),
                rumqttc::QoS::AtMostOnce,
                false,
                vec![b'x'; 100],
            )
            .await
            .unwrap();
    }
    let last = std::sync::Mutex::new((0.0, 0.0));
    let (received, dropped) = eventually("every message is received or counted as lag", || async {
        let received = metric(gw, "topicgate_publishes_total{protocol=\"mqtt\"}").await;
        let dropped = metric(gw, "topicgate_lag_dropped_total{stream=\"broker_link\"}").await;
        let seen = (received, dropped);
        let previous = std::mem::replace(&mut *last.lock().unwrap(), seen);
        if previous != seen {
            eprintln!("{label}: received {received}, counted as lag {dropped}");
        }
        (received + dropped >= SENT as f64).then_some(seen)
    })
    .await;
    assert_eq!(received + dropped, SENT as f64, "nothing is counted twice");

    // The link still works after the burst.
    client
        .publish("bulk/after", rumqttc::QoS::AtLeastOnce, true, "done")
        .await
        .unwrap();
    eventually("a publish after the burst arrives", || async {
        (gw.get("/topics/bulk/after").await.status() == 200).then_some(())
    })
    .await;
    assert_eq!(metric(gw, "topicgate_broker_link_up").await, 1.0);
    (received, dropped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_messages_pass_through_the_link_when_the_segments_hold_them() {
    // 16 MiB of segments hold the whole ~6 MB burst, so however slowly the link reads (a busy
    // test machine), nothing may be skipped; how fast it reads is measured in bench/.
    let gw = TestGateway::start_with(|c| {
        // One client sends the whole burst at once, far above the default request rate.
        c.limits.rate = 0;
        c.mqtt.segment_size = 8 * 1024 * 1024;
        c.mqtt.segment_count = 2;
    })
    .await;
    let (received, dropped) = burst_is_received_or_counted(&gw, "large segments").await;
    assert_eq!(
        dropped, 0.0,
        "segments large enough for the burst lose nothing"
    );
    assert_eq!(received, SENT as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tiny_broker_buffers_lag_is_counted_and_the_link_recovers() {
    let gw = TestGateway::start_with(|c| {
        // One client sends the whole burst at once, far above the default request rate.
        c.limits.rate = 0;
        c.mqtt.segment_size = 1024;
        c.mqtt.segment_count = 1;
        c.bridge.link_buffer = 1;
    })
    .await;
    burst_is_received_or_counted(&gw, "tiny buffers").await;
}
