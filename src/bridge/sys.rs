//! The broker's `$SYS` topics, by Mosquitto's names, and the gateway's own figures under
//! `$SYS/broker/http/` and `$SYS/broker/coap/`: published retained every `mqtt.sys_interval`,
//! so MQTT subscribers, HTTP, SSE and CoAP all read them like any topic.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::message::{Message, Origin};
use super::{Bridge, Topic};
use crate::metrics::ProtocolLabel;
use crate::mqtt::BrokerStats;

/// The windows of Mosquitto's `load/.../1min`, `5min` and `15min` averages, in seconds.
const WINDOWS: [(&str, f64); 3] = [("1min", 60.0), ("5min", 300.0), ("15min", 900.0)];

/// The counters whose per-minute rates are averaged under `load/`.
const LOADS: [(&str, &str); 6] = [
    ("messages/received", "messages/received"),
    ("messages/sent", "messages/sent"),
    ("publish/messages/received", "publish/received"),
    ("publish/messages/sent", "publish/sent"),
    ("bytes/received", "bytes/received"),
    ("bytes/sent", "bytes/sent"),
];

/// Exponentially weighted per-minute rates, as Mosquitto computes its load figures.
#[derive(Debug, Default)]
struct Load {
    last: Vec<i64>,
    averages: Vec<[f64; 3]>,
    connections: i64,
    connection_averages: [f64; 3],
}

impl Load {
    /// Folds in counter values `elapsed` after the previous ones; the new averages by name.
    fn update(&mut self, values: &[i64], connections: i64, elapsed: f64) -> Vec<(String, f64)> {
        if self.last.is_empty() {
            self.last = values.to_vec();
            self.averages = vec![[0.0; 3]; values.len()];
            self.connections = connections;
        }
        let fold = |avg: &mut [f64; 3], delta: i64| {
            let per_minute = delta.max(0) as f64 * 60.0 / elapsed.max(0.001);
            for (a, (_, window)) in avg.iter_mut().zip(WINDOWS) {
                *a += (per_minute - *a) * (1.0 - (-elapsed / window).exp());
            }
        };
        let mut out = Vec::new();
        for (i, (_, name)) in LOADS.iter().enumerate() {
            fold(&mut self.averages[i], values[i] - self.last[i]);
            for (w, (label, _)) in WINDOWS.iter().enumerate() {
                out.push((format!("load/{name}/{label}"), self.averages[i][w]));
            }
        }
        fold(
            &mut self.connection_averages,
            connections - self.connections,
        );
        for (w, (label, _)) in WINDOWS.iter().enumerate() {
            out.push((
                format!("load/connections/{label}"),
                self.connection_averages[w],
            ));
        }
        self.last = values.to_vec();
        self.connections = connections;
        out
    }
}

/// Publishes the `$SYS` topics now and every `interval` until cancelled.
pub async fn run(
    bridge: Bridge,
    stats: Arc<BrokerStats>,
    interval: Duration,
    cancel: CancellationToken,
) {
    let started = Instant::now();
    let mut load = Load::default();
    let mut last = Instant::now();
    let version = format!("topicgate {}", env!("CARGO_PKG_VERSION"));
    publish(&bridge, "version", version).await;
    loop {
        let snapshot = stats.snapshot();
        let value = |name: &str| {
            snapshot
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(0, |(_, v)| *v)
        };
        let mut figures: Vec<(String, String)> = snapshot
            .iter()
            .map(|(name, v)| ((*name).to_owned(), v.to_string()))
            .collect();
        let uptime = started.elapsed().as_secs();
        figures.push(("uptime".to_owned(), format!("{uptime} seconds")));
        figures.push((
            "retained messages/count".to_owned(),
            bridge.inner.store.len().to_string(),
        ));
        let values: Vec<i64> = LOADS.iter().map(|(name, _)| value(name)).collect();
        let elapsed = last.elapsed().as_secs_f64();
        last = Instant::now();
        for (name, avg) in load.update(&values, value("clients/total"), elapsed) {
            figures.push((name, format!("{avg:.2}")));
        }
        figures.extend(gateway_figures(&bridge));
        for (name, payload) in figures {
            publish(&bridge, &name, payload).await;
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = cancel.cancelled() => return,
        }
    }
}

/// What the HTTP and CoAP sides did, from the gateway's metrics.
fn gateway_figures(bridge: &Bridge) -> Vec<(String, String)> {
    let m = bridge.metrics();
    let count = |family: &prometheus_client::metrics::family::Family<ProtocolLabel, _>,
                 protocol: &'static str| {
        let counter: &prometheus_client::metrics::counter::Counter =
            &family.get_or_create(&ProtocolLabel { protocol });
        counter.get().to_string()
    };
    vec![
        (
            "http/publish/received".to_owned(),
            count(&m.publishes, "http"),
        ),
        (
            "coap/publish/received".to_owned(),
            count(&m.publishes, "coap"),
        ),
        (
            "http/streams/connected".to_owned(),
            m.sse_clients.get().to_string(),
        ),
        (
            "coap/observers/count".to_owned(),
            m.coap_observers.get().to_string(),
        ),
    ]
}

async fn publish(bridge: &Bridge, name: &str, payload: String) {
    let Ok(topic) = Topic::parse_any(&format!("$SYS/broker/{name}")) else {
        return;
    };
    let mut message = Message::new(topic, payload, Origin::Broker);
    message.retain = true;
    message.content_type = Some("text/plain;charset=utf-8".to_owned());
    if let Err(e) = bridge.publish_authorized(message).await {
        tracing::debug!(error = %e, "a $SYS figure was not published");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_averages_follow_the_rate_of_each_counter() {
        let mut load = Load::default();
        load.update(&[0; 6], 0, 10.0);
        // 600 messages in 10 s: 3,600 a minute; after a long steady run every average gets there.
        let mut n = 0;
        let mut figures = Vec::new();
        for _ in 0..1000 {
            n += 600;
            figures = load.update(&[n, 0, 0, 0, 0, 0], 0, 10.0);
        }
        let get = |name: &str| figures.iter().find(|(n, _)| n == name).unwrap().1;
        assert!((get("load/messages/received/1min") - 3600.0).abs() < 1.0);
        assert!((get("load/messages/received/15min") - 3600.0).abs() < 1.0);
        assert_eq!(get("load/messages/sent/5min"), 0.0);
        // One step of a new rate moves the 1 min average more than the 15 min one.
        let figures = load.update(&[n, 0, 0, 0, 0, 0], 0, 10.0);
        let get = |name: &str| figures.iter().find(|(n, _)| n == name).unwrap().1;
        assert!(get("load/messages/received/1min") < get("load/messages/received/15min"));
    }
}
