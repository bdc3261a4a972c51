//! Device rules on several gateways in front of one broker (a first gateway serves as the
//! external broker): a push rule's messages are shared so each is pushed once in total, and a
//! pull rule reads the device from one gateway at a time, another taking over when it stops.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Uri};
use topicgate::Config;
use topicgate::config::{PullRule, PushRule};

use crate::support::{TestGateway, eventually, metric, qos_v4, recv};

/// What the device saw: pushed bodies by URL, and which gateway made each read.
#[derive(Clone, Default)]
struct Seen {
    pushed: Arc<Mutex<Vec<(String, String)>>>,
    reads: Arc<Mutex<Vec<String>>>,
    value: Arc<AtomicU64>,
}

/// An HTTP device on a loopback port: `POST /relay/...` records a push, `GET /temp` a read
/// (by its `x-gateway` header) and answers a new value each time.
struct Device {
    addr: SocketAddr,
    seen: Seen,
    task: tokio::task::JoinHandle<()>,
}

impl Device {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Seen::default();
        let app = axum::Router::new()
            .route("/temp", axum::routing::get(read))
            .fallback(push)
            .with_state(seen.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, seen, task }
    }

    fn pushed(&self) -> Vec<(String, String)> {
        self.seen.pushed.lock().unwrap().clone()
    }

    fn reads(&self) -> Vec<String> {
        self.seen.reads.lock().unwrap().clone()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn push(axum::extract::State(seen): axum::extract::State<Seen>, uri: Uri, body: Bytes) {
    let body = String::from_utf8_lossy(&body).into_owned();
    seen.pushed
        .lock()
        .unwrap()
        .push((uri.path().to_owned(), body));
}

async fn read(
    axum::extract::State(seen): axum::extract::State<Seen>,
    headers: HeaderMap,
) -> String {
    let who = headers
        .get("x-gateway")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?");
    seen.reads.lock().unwrap().push(who.to_owned());
    seen.value.fetch_add(1, Ordering::SeqCst).to_string()
}

fn push_rule(device: SocketAddr) -> PushRule {
    crate::devices::rule("relay", "shared/+", format!("http://{device}/relay/{{2}}"))
}

fn pull_rule(device: SocketAddr, gateway: &str) -> PullRule {
    PullRule {
        name: "temp".to_owned(),
        url: format!("http://{device}/temp"),
        interval: Duration::from_millis(50),
        observe: false,
        topic: "sensors/temp".to_owned(),
        retain: true,
        headers: [("x-gateway".to_owned(), gateway.to_owned())].into(),
        principal: None,
        timeout: Duration::from_secs(5),
        max_backoff: Duration::from_secs(1),
        ca_cert: None,
        client_cert: None,
        client_key: None,
    }
}

/// A gateway in front of `broker`, with a short keep-alive so leases move quickly.
async fn front(broker: &TestGateway, rules: impl FnOnce(&mut Config)) -> TestGateway {
    let url = format!("mqtt://{}", broker.mqtt);
    TestGateway::start_with(|c| {
        c.broker.url = url;
        c.broker.keep_alive = Duration::from_secs(5);
        rules(c);
    })
    .await
}

async fn sent(gw: &TestGateway) -> f64 {
    metric(gw, "topicgate_push_sent_total{rule=\"relay\"}").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_push_each_message_once_in_total() {
    let device = Device::start().await;
    let broker = TestGateway::start().await;
    let a = front(&broker, |c| c.push.push(push_rule(device.addr))).await;
    let b = front(&broker, |c| c.push.push(push_rule(device.addr))).await;
    // Both gateways have joined the rule's shared group once the broker splits messages
    // between them; messages published before would go to the first member alone.
    let (mqtt, _rx) = broker.mqtt_v4("publisher", &[]).await;
    let mut expected = Vec::new();
    let mut n = 0;
    eventually("both gateways take part in the shared subscription", || {
        n += 1;
        let body = format!("warm-{n}");
        expected.push(("/relay/w".to_owned(), body.clone()));
        let mqtt = mqtt.clone();
        let (a, b) = (&a, &b);
        async move {
            mqtt.publish("shared/w", qos_v4(1), false, body)
                .await
                .unwrap();
            let (sa, sb) = (sent(a).await, sent(b).await);
            (sa > 0.0 && sb > 0.0).then_some(())
        }
    })
    .await;
    // Over MQTT to the broker, and over HTTP through each gateway.
    for i in 0..30 {
        let body = format!("m{i}");
        match i % 3 {
            0 => {
                mqtt.publish("shared/x", qos_v4(1), false, body.clone())
                    .await
                    .unwrap();
                expected.push(("/relay/x".to_owned(), body));
            }
            1 => {
                let r = a.post("/topics/shared/y?qos=1", body.clone()).await;
                assert_eq!(r.status(), 204);
                expected.push(("/relay/y".to_owned(), body));
            }
            _ => {
                let r = b.post("/topics/shared/z?qos=1", body.clone()).await;
                assert_eq!(r.status(), 204);
                expected.push(("/relay/z".to_owned(), body));
            }
        }
    }
    let total = expected.len() as f64;
    // Both gateways have seen every message and emptied their outboxes: whatever either of
    // them was going to push has been pushed.
    eventually(
        "every message is seen by both gateways and pushed",
        || async {
            let mut done = true;
            for gw in [&a, &b] {
                let seen = metric(gw, "topicgate_publishes_total{protocol=\"mqtt\"}").await
                    + metric(gw, "topicgate_publishes_total{protocol=\"http\"}").await;
                let queued = metric(gw, "topicgate_push_queued{rule=\"relay\"}").await;
                done &= seen >= total && queued == 0.0;
            }
            (done && device.pushed().len() >= expected.len()).then_some(())
        },
    )
    .await;
    let (sa, sb) = (sent(&a).await, sent(&b).await);
    assert_eq!(
        sa + sb,
        total,
        "pushed by A {sa} and by B {sb}: once each in total"
    );
    let mut pushed = device.pushed();
    pushed.sort();
    expected.sort();
    assert_eq!(pushed, expected, "every message once, none twice");
    assert!(sa > 0.0 && sb > 0.0, "the work is shared: A {sa}, B {sb}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_rule_runs_on_one_gateway_and_another_takes_over_when_it_stops() {
    let device = Device::start().await;
    let broker = TestGateway::start().await;
    let a = front(&broker, |c| c.pull.push(pull_rule(device.addr, "a"))).await;
    let b = front(&broker, |c| c.pull.push(pull_rule(device.addr, "b"))).await;
    let (_sub, mut values) = broker.mqtt_v4("reader", &[("sensors/temp", 0)]).await;
    // Twenty reads at 50 ms: several heartbeats of the lease, long enough for two holders to
    // show up if both ran.
    let reads = eventually("the device is read twenty times", || async {
        let reads = device.reads();
        (reads.len() >= 20).then_some(reads)
    })
    .await;
    let holder = reads[0].clone();
    assert!(
        reads.iter().all(|r| *r == holder),
        "one gateway at a time reads the device: {reads:?}"
    );
    recv(&mut values).await;
    let (stopped, other) = if holder == "a" { (a, b) } else { (b, a) };
    stopped.stop().await.unwrap();
    let at_stop = device.reads().len();
    let taken_over = eventually("the other gateway takes over", || async {
        let reads = device.reads();
        let after = reads[at_stop..].to_vec();
        (after.len() >= 10).then_some(after)
    })
    .await;
    let expected = if holder == "a" { "b" } else { "a" };
    assert!(
        taken_over.iter().all(|r| r == expected),
        "after {holder} stopped only {expected} reads: {taken_over:?}"
    );
    drop(other);
}
