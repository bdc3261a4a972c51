//! Push and pull rules against a CoAP device started by the test (coap-lite over a real UDP
//! socket): confirmable requests resent when the device drops them, codes and Max-Age, GET with
//! ETag, and Observe registered again when the device forgets its observers.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde_json::Value;
use tokio::net::UdpSocket;
use topicgate::config::{PullRule, PushRule};

use crate::coap_client::{set_uint, uint_option};
use crate::support::{TestGateway, eventually, metric, qos_v5, recv};

/// One request the device took.
#[derive(Debug, Clone)]
struct Taken {
    method: RequestType,
    path: String,
    query: Vec<String>,
    payload: Vec<u8>,
    content_format: Option<u32>,
}

#[derive(Default)]
struct State {
    /// Requests to `relay/...` dropped unanswered before any is taken.
    drop_first: usize,
    dropped: usize,
    taken: Vec<Taken>,
    temp: String,
    observers: Vec<(SocketAddr, Vec<u8>)>,
    registrations: usize,
    valid: usize,
    sequence: u32,
    mid: u16,
    /// A body arriving in Block1 blocks, and the blocks as (num, more, szx).
    upload: Vec<u8>,
    blocks: Vec<(u32, bool, u8)>,
}

struct CoapDevice {
    addr: SocketAddr,
    socket: Arc<UdpSocket>,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CoapDevice {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn etag(value: &str) -> Vec<u8> {
    value.as_bytes().to_vec()
}

impl CoapDevice {
    async fn start(drop_first: usize) -> Self {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = socket.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            drop_first,
            temp: "21.5".to_owned(),
            mid: 0x4000,
            ..State::default()
        }));
        let (s, st) = (socket.clone(), state.clone());
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                let Ok((n, peer)) = s.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(request) = Packet::from_bytes(&buf[..n]) else {
                    continue;
                };
                let MessageClass::Request(method) = request.header.code else {
                    continue; // ACKs of notifications
                };
                let response = answer(&st, peer, method, &request);
                if let Some(response) = response {
                    let _ = s.send_to(&response.to_bytes().unwrap(), peer).await;
                }
            }
        });
        Self {
            addr,
            socket,
            state,
            task,
        }
    }

    fn taken(&self) -> Vec<Taken> {
        self.state.lock().unwrap().taken.clone()
    }

    /// Sets the value and notifies every observer with a confirmable notification.
    async fn notify(&self, value: &str) {
        let (packets, observers) = {
            let mut st = self.state.lock().unwrap();
            st.temp = value.to_owned();
            st.sequence += 1;
            let observers = st.observers.clone();
            let mut packets = Vec::new();
            for (_, token) in &observers {
                st.mid += 1;
                let mut p = representation(value, st.sequence, Some(1));
                p.header.set_type(MessageType::Confirmable);
                p.header.message_id = st.mid;
                p.set_token(token.clone());
                packets.push(p.to_bytes().unwrap());
            }
            (packets, observers)
        };
        for (bytes, (peer, _)) in packets.iter().zip(observers) {
            self.socket.send_to(bytes, peer).await.unwrap();
        }
    }

    /// Forgets every observer, as a device that restarted does, and takes a new value.
    fn restart_with(&self, value: &str) {
        let mut st = self.state.lock().unwrap();
        st.observers.clear();
        st.temp = value.to_owned();
    }
}

/// A 2.05 with the value, its ETag, and an Observe number when given.
fn representation(value: &str, observe: u32, max_age: Option<u32>) -> Packet {
    let mut p = Packet::new();
    p.header.code = MessageClass::Response(ResponseType::Content);
    p.add_option(CoapOption::ETag, etag(value));
    if observe > 0 {
        set_uint(&mut p, CoapOption::Observe, observe);
    }
    if let Some(max_age) = max_age {
        set_uint(&mut p, CoapOption::MaxAge, max_age);
    }
    set_uint(&mut p, CoapOption::ContentFormat, 0);
    p.payload = value.as_bytes().to_vec();
    p
}

fn answer(
    state: &Mutex<State>,
    peer: SocketAddr,
    method: RequestType,
    request: &Packet,
) -> Option<Packet> {
    let mut st = state.lock().unwrap();
    let path: Vec<String> = request
        .get_option(CoapOption::UriPath)
        .map(|l| {
            l.iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default();
    let mut response = if path.first().map(String::as_str) == Some("temp") {
        if uint_option(request, CoapOption::Observe) == Some(0) {
            st.registrations += 1;
            st.sequence += 1;
            st.observers.push((peer, request.get_token().to_vec()));
            representation(&st.temp.clone(), st.sequence, Some(1))
        } else if request.get_first_option(CoapOption::ETag) == Some(&etag(&st.temp)) {
            st.valid += 1;
            let mut p = Packet::new();
            p.header.code = MessageClass::Response(ResponseType::Valid);
            p.add_option(CoapOption::ETag, etag(&st.temp));
            p
        } else {
            representation(&st.temp.clone(), 0, None)
        }
    } else {
        if st.dropped < st.drop_first {
            st.dropped += 1;
            return None;
        }
        let mut payload = request.payload.clone();
        if let Some(v) = uint_option(request, CoapOption::Block1) {
            let (num, more, szx) = (v >> 4, v & 8 != 0, (v & 7) as u8);
            st.blocks.push((num, more, szx));
            let offset = num as usize * (16 << szx);
            st.upload.truncate(offset);
            st.upload.extend_from_slice(&request.payload);
            if more {
                // 2.31 Continue, asking for blocks of 512 bytes at most.
                let mut p = Packet::new();
                p.header.code = MessageClass::Response(ResponseType::Continue);
                set_uint(
                    &mut p,
                    CoapOption::Block1,
                    (num << 4) | 8 | u32::from(szx.min(5)),
                );
                p.header.set_type(MessageType::Acknowledgement);
                p.header.message_id = request.header.message_id;
                p.set_token(request.get_token().to_vec());
                return Some(p);
            }
            payload = std::mem::take(&mut st.upload);
        }
        st.taken.push(Taken {
            method,
            path: path.join("/"),
            query: request
                .get_option(CoapOption::UriQuery)
                .map(|l| {
                    l.iter()
                        .map(|s| String::from_utf8_lossy(s).into_owned())
                        .collect()
                })
                .unwrap_or_default(),
            payload,
            content_format: uint_option(request, CoapOption::ContentFormat),
        });
        let mut p = Packet::new();
        if path.iter().any(|s| s == "bad") {
            p.header.code = MessageClass::Response(ResponseType::NotFound);
            p.payload = b"no such relay".to_vec();
        } else {
            p.header.code = MessageClass::Response(ResponseType::Changed);
            set_uint(&mut p, CoapOption::ContentFormat, 50);
            p.payload = b"{\"relay\":\"done\"}".to_vec();
        }
        p
    };
    // Piggybacked on the ACK of the confirmable request.
    response.header.set_type(MessageType::Acknowledgement);
    response.header.message_id = request.header.message_id;
    response.set_token(request.get_token().to_vec());
    Some(response)
}

fn push_rule(name: &str, filter: &str, url: String) -> PushRule {
    PushRule {
        method: topicgate::config::PushMethod::PUT,
        dead_letter_topic: Some("dead/coap".to_owned()),
        max_queued: 1000,
        ..crate::devices::rule(name, filter, url)
    }
}

fn pull_rule(device: SocketAddr, observe: bool, interval: Duration) -> PullRule {
    PullRule {
        name: "coap-temp".to_owned(),
        url: format!("coap://{device}/temp"),
        interval,
        observe,
        topic: "sensors/coap".to_owned(),
        retain: true,
        headers: Default::default(),
        principal: None,
        timeout: Duration::from_secs(5),
        max_backoff: Duration::from_secs(1),
        ca_cert: None,
        client_cert: None,
        client_key: None,
    }
}

#[tokio::test]
async fn coap_push_is_resent_until_acknowledged_in_order_and_answers_come_back() {
    let device = CoapDevice::start(2).await;
    let url = format!("coap://{}/relay/{{2}}?turn={{payload}}", device.addr);
    let gw = TestGateway::start_with(|c| {
        c.coap.ack_timeout = Duration::from_millis(50);
        c.push.push(push_rule("coap-plugs", "plugs/+/set", url));
    })
    .await;
    let (caller, mut rx) = gw
        .mqtt_v5("coap-caller", &[("me/#", 1), ("dead/#", 1)])
        .await;
    for i in 0..3 {
        let props = PublishProperties {
            response_topic: Some("me/answers".to_owned()),
            correlation_data: Some(Bytes::from(format!("c{i}"))),
            content_type: Some("text/plain".to_owned()),
            ..PublishProperties::default()
        };
        caller
            .publish_with_properties("plugs/p1/set", qos_v5(1), false, format!("on{i}"), props)
            .await
            .unwrap();
    }
    for i in 0..3 {
        let reply = recv(&mut rx).await;
        assert_eq!(reply.topic, "me/answers");
        assert_eq!(reply.payload, "{\"relay\":\"done\"}");
        let props = reply.properties.unwrap();
        assert_eq!(props.correlation_data, Some(Bytes::from(format!("c{i}"))));
        assert_eq!(props.content_type.as_deref(), Some("application/json"));
        assert!(
            props
                .user_properties
                .contains(&("status".to_owned(), "204".to_owned()))
        );
    }
    let taken = device.taken();
    assert_eq!(taken.len(), 3, "each is taken once: {taken:?}");
    for (i, t) in taken.iter().enumerate() {
        assert_eq!(t.method, RequestType::Put);
        assert_eq!(t.path, "relay/p1");
        assert_eq!(t.query, [format!("turn=on{i}")]);
        assert_eq!(t.payload, format!("on{i}").as_bytes());
        assert_eq!(t.content_format, Some(0));
    }
    // The two dropped datagrams were resent by the CON schedule, not by the outbox.
    assert_eq!(device.state.lock().unwrap().dropped, 2);
    assert_eq!(
        metric(&gw, "topicgate_push_failed_total{rule=\"coap-plugs\"}").await,
        0.0
    );

    // 4.04 is not retried: a dead letter with the status and body.
    caller
        .publish("plugs/bad/set", qos_v5(1), false, "on")
        .await
        .unwrap();
    let letter = recv(&mut rx).await;
    assert_eq!(letter.topic, "dead/coap");
    let letter: Value = serde_json::from_slice(&letter.payload).unwrap();
    assert_eq!(letter["status"], 404);
    assert_eq!(letter["reason"], "refused");
    assert_eq!(letter["body"], "no such relay");
    assert_eq!(device.taken().len(), 4);
}

#[tokio::test]
async fn coap_pull_publishes_once_while_the_device_answers_2_03_valid() {
    let device = CoapDevice::start(0).await;
    let gw = TestGateway::start_with(|c| {
        c.pull
            .push(pull_rule(device.addr, false, Duration::from_millis(20)));
    })
    .await;
    let (_sub, mut rx) = gw.mqtt_v5("coap-reader", &[("sensors/#", 1)]).await;
    assert_eq!(recv(&mut rx).await.payload, "21.5");
    eventually(
        "the device answers 2.03 Valid to reads with the ETag",
        || async { (device.state.lock().unwrap().valid >= 5).then_some(()) },
    )
    .await;
    assert!(
        rx.try_recv().is_err(),
        "an unchanged value is not published again"
    );
    device.restart_with("22.5");
    let next = recv(&mut rx).await;
    assert_eq!(next.payload, "22.5");
    let props = next.properties.unwrap();
    assert_eq!(
        props.content_type.as_deref(),
        Some("text/plain;charset=utf-8")
    );
}

#[tokio::test]
async fn an_observed_resource_is_published_per_notification_and_registered_again() {
    let device = CoapDevice::start(0).await;
    let gw = TestGateway::start_with(|c| {
        c.coap.ack_timeout = Duration::from_millis(50);
        c.pull
            .push(pull_rule(device.addr, true, Duration::from_secs(3600)));
    })
    .await;
    let (_sub, mut rx) = gw.mqtt_v5("observer", &[("sensors/#", 1)]).await;
    assert_eq!(recv(&mut rx).await.payload, "21.5");
    device.notify("22.0").await;
    assert_eq!(recv(&mut rx).await.payload, "22.0");
    assert_eq!(device.state.lock().unwrap().registrations, 1);
    // The device restarts and forgets its observer: once Max-Age (1 s) passes without a
    // notification, the gateway registers again and gets the new value.
    device.restart_with("23.0");
    assert_eq!(recv(&mut rx).await.payload, "23.0");
    assert_eq!(device.state.lock().unwrap().registrations, 2);
    device.notify("24.0").await;
    assert_eq!(recv(&mut rx).await.payload, "24.0");
    let rules: Value = gw.get("/rules").await.json().await.unwrap();
    assert_eq!(rules["pull"][0]["observe"], true);
    assert_eq!(
        metric(&gw, "topicgate_pull_up{rule=\"coap-temp\"}").await,
        1.0
    );
}

#[tokio::test]
async fn a_large_coap_push_goes_in_block1_blocks_of_the_size_the_device_asks_for() {
    let device = CoapDevice::start(0).await;
    let gw = TestGateway::start_with(|c| {
        c.coap.block_size = 1024;
        c.push.push(push_rule(
            "coap-big",
            "big/#",
            format!("coap://{}/firmware", device.addr),
        ));
    })
    .await;
    let image: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let resp = gw
        .client
        .post(gw.url("/topics/big/image"))
        .header("content-type", "application/octet-stream")
        .body(image.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let taken = eventually("the body arrives whole", || async {
        let taken = device.taken();
        (!taken.is_empty()).then_some(taken)
    })
    .await;
    assert_eq!(taken[0].payload, image);
    assert_eq!(taken[0].content_format, Some(42));
    // One block of 1024 bytes, then blocks of 512 as the device asked.
    let blocks = device.state.lock().unwrap().blocks.clone();
    assert_eq!(
        blocks,
        [
            (0, true, 6),
            (2, true, 5),
            (3, true, 5),
            (4, true, 5),
            (5, false, 5)
        ]
    );
    // The device has the body before the worker has its answer: the count follows.
    eventually("the push counted as sent", || async {
        (metric(&gw, "topicgate_push_sent_total{rule=\"coap-big\"}").await == 1.0).then_some(())
    })
    .await;
}
