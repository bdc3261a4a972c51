//! The harness: a gateway on free loopback ports, real clients, and `eventually` instead of sleeps.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use topicgate::{Config, Gateway, GatewayError};

/// Upper bound for any single wait in a test.
pub(crate) const DEADLINE: Duration = Duration::from_secs(20);

/// A gateway running in this process on ports chosen by the OS.
pub(crate) struct TestGateway {
    pub(crate) http: SocketAddr,
    pub(crate) mqtt: SocketAddr,
    pub(crate) coap: SocketAddr,
    /// Set when `[tls]` names a certificate.
    pub(crate) https: Option<SocketAddr>,
    pub(crate) mqtts: Option<SocketAddr>,
    /// Set when `[[auth.psk]]` or `[tls]` names a key.
    pub(crate) coaps: Option<SocketAddr>,
    pub(crate) client: reqwest::Client,
    cancel: CancellationToken,
    task: JoinHandle<Result<(), GatewayError>>,
    _data: tempfile::TempDir,
}

impl TestGateway {
    pub(crate) async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub(crate) async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::default();
        config.http.addr = Some("127.0.0.1:0".parse().unwrap());
        config.mqtt.given_addr = Some("127.0.0.1:0".parse().unwrap());
        config.coap.addr = Some("127.0.0.1:0".parse().unwrap());
        config.http.tls_addr = "127.0.0.1:0".parse().unwrap();
        config.mqtt.tls_addr = "127.0.0.1:0".parse().unwrap();
        config.coap.dtls_addr = "127.0.0.1:0".parse().unwrap();
        let data = tempfile::tempdir().unwrap();
        config.data_dir = data.path().to_owned();
        tweak(&mut config);
        // MQTT clients talk to the embedded broker, or to the external one the gateway fronts.
        let external: Option<SocketAddr> = match config.broker.endpoint() {
            Ok(Some((host, port))) => format!("{host}:{port}").parse().ok(),
            _ => None,
        };
        let gateway = Gateway::bind(config).await.expect("gateway binds");
        let (http, coap) = (gateway.http_addr(), gateway.coap_addr());
        let (https, mqtts) = (gateway.https_addr(), gateway.mqtts_addr());
        let coaps = gateway.coaps_addr();
        let mqtt = gateway
            .mqtt_addr()
            .or(external)
            .expect("an embedded broker or an external one at an IP address");
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        let task = tokio::spawn(gateway.run(async move { stop.cancelled().await }));
        let client = reqwest::Client::builder()
            .timeout(DEADLINE)
            .build()
            .unwrap();
        let gw = Self {
            http,
            mqtt,
            coap,
            https,
            mqtts,
            coaps,
            client,
            cancel,
            task,
            _data: data,
        };
        eventually("the gateway is ready", || async {
            let r = gw.client.get(gw.url("/readyz")).send().await.ok()?;
            (r.status() == 200).then_some(())
        })
        .await;
        gw
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// Stops the gateway and returns what `run` returned.
    pub(crate) async fn stop(self) -> Result<(), GatewayError> {
        self.cancel.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the gateway stops in time")
            .expect("the gateway task does not panic")
    }

    pub(crate) async fn post(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.send_body(reqwest::Method::POST, path, body).await
    }

    pub(crate) async fn put(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.send_body(reqwest::Method::PUT, path, body).await
    }

    async fn send_body(
        &self,
        method: reqwest::Method,
        path: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.client
            .request(method.clone(), self.url(path))
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path} is not answered: {e}"))
    }

    pub(crate) async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("GET is answered")
    }

    /// A GET of `path` with HTTP Basic credentials.
    pub(crate) async fn get_as(&self, path: &str, user: &str, password: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .basic_auth(user, Some(password))
            .send()
            .await
            .expect("GET is answered")
    }

    /// A 3.1.1 client whose incoming publishes arrive on the returned channel, once subscribed.
    pub(crate) async fn mqtt_v4(
        &self,
        id: &str,
        subscribe: &[(&str, u8)],
    ) -> (
        rumqttc::AsyncClient,
        mpsc::UnboundedReceiver<rumqttc::Publish>,
    ) {
        use rumqttc::{Event, Packet};
        let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", self.mqtt.port());
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 1024);
        let (tx, rx) = mpsc::unbounded_channel();
        let (acked_tx, mut acked_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(p);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = acked_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        for (filter, qos) in subscribe {
            client
                .subscribe(*filter, qos_v4(*qos))
                .await
                .expect("subscribe is queued");
            within("SUBACK", acked_rx.recv()).await;
        }
        (client, rx)
    }

    /// An MQTT 5 client whose incoming publishes arrive on the returned channel, once subscribed.
    pub(crate) async fn mqtt_v5(
        &self,
        id: &str,
        subscribe: &[(&str, u8)],
    ) -> (
        rumqttc::v5::AsyncClient,
        mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Publish>,
    ) {
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::{Event, MqttOptions};
        let mut opts = MqttOptions::new(id, "127.0.0.1", self.mqtt.port());
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(opts, 1024);
        let (tx, rx) = mpsc::unbounded_channel();
        let (acked_tx, mut acked_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(p);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = acked_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        for (filter, qos) in subscribe {
            client
                .subscribe(*filter, qos_v5(*qos))
                .await
                .expect("subscribe is queued");
            within("SUBACK", acked_rx.recv()).await;
        }
        (client, rx)
    }

    /// Opens an event stream of `filter` (already URL-encoded), optionally resuming.
    pub(crate) async fn sse(&self, filter: &str, last_event_id: Option<&str>) -> SseReader {
        let mut req = self
            .client
            .get(self.url(&format!("/topics/{filter}")))
            .header("accept", "text/event-stream")
            .timeout(Duration::from_secs(3600));
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let resp = within("the stream opens", req.send())
            .await
            .expect("stream opens");
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        SseReader {
            body: Box::pin(resp.bytes_stream()),
            buffer: String::new(),
        }
    }
}

pub(crate) fn qos_v4(q: u8) -> rumqttc::QoS {
    match q {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

pub(crate) fn qos_v5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS;
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// One server-sent event.
#[derive(Debug, Clone, Default)]
pub(crate) struct SseEvent {
    pub(crate) event: String,
    pub(crate) id: Option<String>,
    pub(crate) data: String,
}

impl SseEvent {
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).expect("event data is JSON")
    }
}

/// Reads events off a streaming response.
pub(crate) struct SseReader {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<Bytes>> + Send>>,
    buffer: String,
}

impl SseReader {
    /// The next event (comments skipped), or `None` when the stream ends.
    pub(crate) async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut ev = SseEvent::default();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        ev.event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        ev.id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        ev.data.push_str(v.trim_start());
                    }
                }
                if ev.event.is_empty() && ev.data.is_empty() {
                    continue; // a comment such as the heartbeat
                }
                return Some(ev);
            }
            let chunk = within("the next event", self.body.next()).await?;
            self.buffer.push_str(&String::from_utf8_lossy(&chunk.ok()?));
        }
    }

    /// The next event, which must exist.
    pub(crate) async fn expect_event(&mut self) -> SseEvent {
        self.next_event().await.expect("the stream goes on")
    }
}

/// Awaits `fut`, failing the test after [`DEADLINE`].
pub(crate) async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Polls `probe` until it returns `Some`, failing the test after [`DEADLINE`].
pub(crate) async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The value of one sample in the gateway's `/metrics`, e.g. `topicgate_publishes_total{protocol="mqtt"}`.
pub(crate) async fn metric(gw: &TestGateway, sample: &str) -> f64 {
    let text = gw.get("/metrics").await.text().await.unwrap();
    sample_value(&text, sample).unwrap_or(0.0)
}

/// The value of one sample in the `/metrics` of a gateway process listening on `http`, if it
/// answers and has it.
pub(crate) async fn metric_at(http: std::net::SocketAddr, sample: &str) -> Option<f64> {
    let response = reqwest::get(format!("http://{http}/metrics")).await.ok()?;
    sample_value(&response.text().await.ok()?, sample)
}

fn sample_value(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
}

/// Receives the next publish from a client channel within the deadline.
pub(crate) async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    within("an MQTT publish", rx.recv())
        .await
        .expect("the MQTT client is still connected")
}
