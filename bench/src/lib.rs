//! What the load tools share: a latency histogram, the one-line JSON report each tool prints last
//! on stdout (read by `bench/run`), a clock for timestamps carried in payloads, RSS readings, a
//! pacing thread for paced runs, and a bare MQTT 5 responder.

pub mod http;
pub mod pace;
pub mod responder;

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Map, Value};

/// Runs the future `task` makes on a thread of its own with a runtime of its own, as a
/// device (a responder, a subscriber) is a process of its own: on the load's thread its work
/// would wait behind the load's and count in the latencies measured. The thread's result is
/// the future's.
pub fn on_own_thread<T, F, Fut>(
    name: &str,
    task: F,
) -> std::io::Result<std::thread::JoinHandle<anyhow::Result<T>>>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(task())
        })
}

/// Nanoseconds since the first call in this process: the timestamp a tool writes into a payload
/// and compares against when it reads the payload back in the same process.
pub fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// A fresh 16-digit hex token for topic prefixes and client ids, so runs never see each other's
/// messages (the standard library's per-process random hash keys, no random number crate).
pub fn random_hex() -> String {
    let hash = RandomState::new().hash_one((std::process::id(), now_ns()));
    format!("{hash:016x}")
}

/// Writes `now_ns()` into the first 8 bytes of a payload of `size` bytes (at least 8).
pub fn stamped(size: usize) -> Vec<u8> {
    let mut payload = vec![b'x'; size.max(8)];
    payload[..8].copy_from_slice(&now_ns().to_be_bytes());
    payload
}

/// The latency since a payload made by `stamped`, or `None` when it is too short to carry one.
pub fn age(payload: &[u8]) -> Option<Duration> {
    let sent = u64::from_be_bytes(payload.get(..8)?.try_into().ok()?);
    Some(Duration::from_nanos(now_ns().saturating_sub(sent)))
}

/// Latencies in microseconds, 3 significant digits, up to one minute.
#[derive(Clone)]
pub struct Latencies(Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        // why: the bounds are constants that hdrhistogram accepts (1 µs .. 60 s, 3 digits).
        Self(Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"))
    }
}

impl Latencies {
    /// Records one latency; longer than a minute counts as a minute.
    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.0.saturating_record(micros.max(1));
    }

    /// Adds another histogram's samples to this one.
    pub fn merge(&mut self, other: &Latencies) {
        // why: both histograms have the same bounds, so adding cannot go out of range.
        self.0.add(&other.0).expect("histograms with equal bounds");
    }

    /// How many latencies were recorded.
    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The latency at quantile `q` (0.0..=1.0) in microseconds, 0 when nothing was recorded.
    pub fn quantile_us(&self, q: f64) -> u64 {
        if self.0.is_empty() {
            0
        } else {
            self.0.value_at_quantile(q)
        }
    }
}

/// The summary a tool prints as its last line on stdout, one JSON object: what ran, how much
/// got through per second and, when measured, latency percentiles in microseconds.
#[derive(Serialize)]
pub struct Report {
    /// The tool and scenario, e.g. `mqtt qos1 1-1`.
    pub scenario: String,
    /// Operations that completed (messages received, responses read, events seen).
    pub count: u64,
    /// Wall-clock seconds of the measured phase.
    pub seconds: f64,
    /// `count / seconds`.
    pub rate: f64,
    /// Median latency in microseconds.
    pub p50_us: u64,
    /// 99th percentile latency in microseconds.
    pub p99_us: u64,
    /// Largest latency in microseconds.
    pub max_us: u64,
    /// Scenario-specific figures: timeouts, errors, memory, lost messages.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Report {
    /// A report of `count` operations over `elapsed`, with percentiles from `latencies`.
    pub fn new(
        scenario: impl Into<String>,
        count: u64,
        elapsed: Duration,
        latencies: &Latencies,
    ) -> Self {
        let seconds = elapsed.as_secs_f64();
        Self {
            scenario: scenario.into(),
            count,
            seconds,
            rate: if seconds > 0.0 {
                count as f64 / seconds
            } else {
                0.0
            },
            p50_us: latencies.quantile_us(0.5),
            p99_us: latencies.quantile_us(0.99),
            max_us: latencies.quantile_us(1.0),
            extra: Map::new(),
        }
    }

    /// Adds a scenario-specific figure.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_owned(), value.into());
        self
    }

    /// Prints a readable line on stderr and the JSON object on stdout.
    pub fn print(&self) {
        eprintln!(
            "{}: {} in {:.2} s = {:.0}/s, p50 {} µs, p99 {} µs, max {} µs {}",
            self.scenario,
            self.count,
            self.seconds,
            self.rate,
            self.p50_us,
            self.p99_us,
            self.max_us,
            Value::Object(self.extra.clone()),
        );
        // why: a Report holds only numbers, strings and maps, which always serialize.
        let line = serde_json::to_string(self).expect("a report serializes");
        #[allow(clippy::print_stdout)] // the report is the tool's output
        {
            println!("{line}");
        }
    }
}

/// The resident set size of process `pid` in KiB, from `/proc/<pid>/status`.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Parses a duration such as `5s`, `250ms` or `2m` for a command-line flag.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((text, "s"), |i| text.split_at(i));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("not a duration: {text}"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("unknown unit in {text}: use ms, s or m")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamped_payload_reads_back_its_age() {
        let payload = stamped(100);
        assert_eq!(payload.len(), 100);
        let age = age(&payload).expect("a stamp");
        assert!(age < Duration::from_secs(5), "{age:?}");
        assert_eq!(super::age(b"short"), None);
    }

    #[test]
    fn quantiles_come_from_what_was_recorded() {
        let mut l = Latencies::default();
        assert_eq!(l.quantile_us(0.99), 0);
        for micros in 1..=100 {
            l.record(Duration::from_micros(micros));
        }
        assert_eq!(l.count(), 100);
        assert_eq!(l.quantile_us(0.5), 50);
        assert_eq!(l.quantile_us(0.99), 99);
        assert_eq!(l.quantile_us(1.0), 100);
    }

    #[test]
    fn durations_parse_in_the_units_flags_use() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn the_report_is_one_json_object_with_the_extras_inline() {
        let mut l = Latencies::default();
        l.record(Duration::from_micros(10));
        let r = Report::new("t", 10, Duration::from_secs(2), &l).with("timeouts", 3);
        let v: Value = serde_json::to_value(&r).expect("json");
        assert_eq!(v["rate"], 5.0);
        assert_eq!(v["timeouts"], 3);
        assert_eq!(v["p99_us"], 10);
    }
}
