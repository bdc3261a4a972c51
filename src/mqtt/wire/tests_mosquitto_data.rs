//! Judges the codec against Eclipse Mosquitto's broker byte-sequence test data
//! (test/broker/data/*.json), read at test time from a bare git mirror of the mosquitto
//! repository; skipped with a note when the mirror is absent.

#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::process::Command;

use super::{Connect, Decoder, Packet, Version, encode};
use bytes::BytesMut;

const FILES: &[&str] = &[
    "AUTH",
    "CONNACK",
    "CONNECT",
    "DISCONNECT",
    "FLOW",
    "FORBIDDEN",
    "PINGREQ",
    "PINGRESP",
    "PUBACK",
    "PUBCOMP",
    "PUBLISH",
    "PUBREC",
    "PUBREL",
    "REGRESSION",
    "SUBACK",
    "SUBSCRIBE",
    "UNSUBACK",
    "UNSUBSCRIBE",
    "ZZ-broker-check",
];

#[derive(Debug, Clone)]
enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(kv) => kv.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    fn str(&self) -> &str {
        match self {
            Json::Str(s) => s,
            _ => "",
        }
    }
    fn arr(&self) -> &[Json] {
        match self {
            Json::Arr(a) => a,
            _ => &[],
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> bool {
        match self.get(key) {
            Some(Json::Bool(b)) => *b,
            _ => default,
        }
    }
    fn num_or(&self, key: &str, default: f64) -> f64 {
        match self.get(key) {
            Some(Json::Num(n)) => *n,
            _ => default,
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn value(&mut self) -> Json {
        self.ws();
        match self.s[self.i] {
            b'{' => {
                self.i += 1;
                let mut kv = Vec::new();
                loop {
                    self.ws();
                    if self.s[self.i] == b'}' {
                        self.i += 1;
                        return Json::Obj(kv);
                    }
                    let Json::Str(k) = self.value() else {
                        panic!("object key is not a string at {}", self.i)
                    };
                    self.ws();
                    assert_eq!(self.s[self.i], b':');
                    self.i += 1;
                    let v = self.value();
                    kv.push((k, v));
                    self.ws();
                    if self.s[self.i] == b',' {
                        self.i += 1;
                    }
                }
            }
            b'[' => {
                self.i += 1;
                let mut a = Vec::new();
                loop {
                    self.ws();
                    if self.s[self.i] == b']' {
                        self.i += 1;
                        return Json::Arr(a);
                    }
                    a.push(self.value());
                    self.ws();
                    if self.s[self.i] == b',' {
                        self.i += 1;
                    }
                }
            }
            b'"' => {
                self.i += 1;
                let mut out = Vec::new();
                while self.s[self.i] != b'"' {
                    if self.s[self.i] == b'\\' {
                        self.i += 1;
                        match self.s[self.i] {
                            b'n' => out.push(b'\n'),
                            b't' => out.push(b'\t'),
                            b'u' => {
                                let hex = std::str::from_utf8(&self.s[self.i + 1..self.i + 5])
                                    .expect("hex escape");
                                let c = char::from_u32(u32::from_str_radix(hex, 16).unwrap())
                                    .unwrap_or('?');
                                let mut b = [0; 4];
                                out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
                                self.i += 4;
                            }
                            c => out.push(c),
                        }
                    } else {
                        out.push(self.s[self.i]);
                    }
                    self.i += 1;
                }
                self.i += 1;
                Json::Str(String::from_utf8_lossy(&out).into_owned())
            }
            b't' => {
                self.i += 4;
                Json::Bool(true)
            }
            b'f' => {
                self.i += 5;
                Json::Bool(false)
            }
            b'n' => {
                self.i += 4;
                Json::Null
            }
            _ => {
                let start = self.i;
                while self.i < self.s.len()
                    && matches!(
                        self.s[self.i],
                        b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
                    )
                {
                    self.i += 1;
                }
                let t = std::str::from_utf8(&self.s[start..self.i]).unwrap();
                Json::Num(t.parse().unwrap_or_else(|_| panic!("bad number {t:?}")))
            }
        }
    }
}

fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| b.is_ascii_hexdigit()).collect();
    digits
        .chunks(2)
        .map(|c| u8::from_str_radix(std::str::from_utf8(c).unwrap(), 16).unwrap())
        .collect()
}

fn to_hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn mirror() -> Option<String> {
    let base = std::env::var("MIRRORS").unwrap_or_else(|_| "/work/.mirror".into());
    let dir = format!("{base}/eclipse+mosquitto/repo");
    std::path::Path::new(&dir).exists().then_some(dir)
}

fn label(group: &str, ver: u8) -> &'static str {
    let first = group.split_whitespace().next().unwrap_or("");
    match first {
        "v3.1.1" => "v3.1.1",
        "v3.1" => "v3.1",
        f if f.starts_with("v5") => "v5",
        _ => match ver {
            3 => "v3.1",
            5 => "v5",
            _ => "v3.1.1",
        },
    }
}

enum Verdict {
    Agree,
    Disagree(String),
    /// Not decided by the codec: what the broker has to do (for the report).
    Broker(String),
}

fn judge(case: &Json) -> Verdict {
    let ver = case.num_or("ver", 4.0) as u8;
    let mut dec = Decoder::new(268_435_460);
    let mut buf = BytesMut::new();
    if case.bool_or("connect", true) {
        let version = match ver {
            3 => Version::V31,
            5 => Version::V5,
            _ => Version::V311,
        };
        let c = Connect {
            version,
            clean_start: true,
            keep_alive: 60,
            client_id: "oracle".into(),
            ..Connect::default()
        };
        encode(&Packet::Connect(Box::new(c)), version, &mut buf);
        match dec.decode(&mut buf) {
            Ok(Some(Packet::Connect(_))) => {}
            other => panic!("synthetic CONNECT did not decode: {other:?}"),
        }
    }
    let expect_disconnect = case.bool_or("expect_disconnect", true);
    let msgs = case.get("msgs").map(Json::arr).unwrap_or(&[]);
    let mut last: Option<Packet> = None;
    for (idx, step) in msgs.iter().enumerate() {
        let kind = step.get("type").map(Json::str).unwrap_or("");
        if kind != "send" {
            continue;
        }
        buf.extend_from_slice(&hex(step.get("payload").map(Json::str).unwrap_or("")));
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(p)) => last = Some(p),
                Ok(None) => break,
                Err(e) => {
                    let mut ours = BytesMut::new();
                    e.answer.encode(&mut ours);
                    let rest = &msgs[idx + 1..];
                    let mut expected = Vec::new();
                    let mut later_send = false;
                    for s in rest {
                        match s.get("type").map(Json::str).unwrap_or("") {
                            "recv" if !later_send => {
                                expected.extend(hex(s.get("payload").map(Json::str).unwrap_or("")))
                            }
                            _ => later_send = true,
                        }
                    }
                    return if expect_disconnect && !later_send && expected == ours[..] {
                        Verdict::Agree
                    } else {
                        Verdict::Disagree(format!(
                            "codec refused step {} ({}: {:?}) sending [{}]; data expects [{}]{}{}",
                            idx + 1,
                            e.detail,
                            e.answer,
                            to_hex(&ours),
                            to_hex(&expected),
                            if later_send { ", then more steps" } else { "" },
                            if expect_disconnect {
                                ""
                            } else {
                                ", connection alive"
                            },
                        ))
                    };
                }
            }
        }
    }
    let steps = msgs
        .iter()
        .map(|s| {
            let kind = s.get("type").map(Json::str).unwrap_or("");
            match kind {
                "send" => format!(
                    "send {}",
                    to_hex(&hex(s.get("payload").map(Json::str).unwrap_or("")))
                ),
                "recv" => format!(
                    "recv {}",
                    to_hex(&hex(s.get("payload").map(Json::str).unwrap_or("")))
                ),
                _ => format!(
                    "publish {} qos {} from another client",
                    s.get("topic").map(Json::str).unwrap_or(""),
                    s.num_or("qos", 0.0)
                ),
            }
        })
        .collect::<Vec<_>>()
        .join("; ");
    if !buf.is_empty() {
        return Verdict::Broker(format!("incomplete packet left waiting: {steps}"));
    }
    if !expect_disconnect {
        return Verdict::Agree;
    }
    let last_is_send = msgs
        .iter()
        .rev()
        .find(|s| s.get("type").map(Json::str) != Some("recv"))
        .is_some_and(|s| s.get("type").map(Json::str) == Some("send"));
    let ends_with_send = msgs.last().and_then(|s| s.get("type")).map(Json::str) == Some("send");
    if let Some(Packet::Disconnect(_)) = last
        && last_is_send
        && ends_with_send
    {
        return Verdict::Agree;
    }
    Verdict::Broker(format!("decoded cleanly, broker must close: {steps}"))
}

#[test]
fn mosquitto_broker_data() {
    let Some(git_dir) = mirror() else {
        println!("mosquitto mirror not found (set MIRRORS); skipping the data check");
        return;
    };
    let mut totals: BTreeMap<&str, (usize, usize, usize)> = BTreeMap::new();
    let mut disagreements = Vec::new();
    let mut broker_side = Vec::new();
    for file in FILES {
        let out = Command::new("git")
            .arg("--git-dir")
            .arg(&git_dir)
            .arg("show")
            .arg(format!("v2.0.20:test/broker/data/{file}.json"))
            .output()
            .expect("git runs");
        if !out.status.success() {
            println!("cannot read {file}.json from {git_dir}; skipping the data check");
            return;
        }
        let doc = Parser {
            s: &out.stdout,
            i: 0,
        }
        .value();
        for group in doc.arr() {
            if group.bool_or("disable", false) {
                continue;
            }
            let gname = group.get("group").map(Json::str).unwrap_or("");
            for case in group.get("tests").map(Json::arr).unwrap_or(&[]) {
                let ver = case.num_or("ver", 4.0) as u8;
                let proto = label(gname, ver);
                let name = format!(
                    "{file} :: {gname} {}",
                    case.get("name").map(Json::str).unwrap_or("")
                );
                let t = totals.entry(proto).or_default();
                t.2 += 1;
                match judge(case) {
                    Verdict::Agree => {
                        t.0 += 1;
                        t.1 += 1;
                    }
                    Verdict::Disagree(why) => {
                        t.1 += 1;
                        disagreements.push(format!("[{proto}] {name}: {why}"));
                    }
                    Verdict::Broker(what) => broker_side.push(format!("[{proto}] {name}: {what}")),
                }
            }
        }
    }
    for (proto, (agree, judged, total)) in &totals {
        println!("mosquitto data {proto}: {agree} agreeing / {judged} judged / {total} total");
    }
    println!("not decided by the codec ({}):", broker_side.len());
    for s in &broker_side {
        println!("  {s}");
    }
    println!("disagreements ({}):", disagreements.len());
    for d in &disagreements {
        println!("  {d}");
    }
    assert!(
        disagreements.is_empty(),
        "{} disagreements with the mosquitto data",
        disagreements.len()
    );
}
