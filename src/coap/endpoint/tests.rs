//! The endpoint driven by hand: datagrams and ticks in, datagrams out, no socket and no clock.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use coap_lite::{MessageClass, MessageType, Packet, ResponseType};

use super::*;
use crate::bridge::{Message, Origin, RetainedStore, Topic};
use crate::config::{AuthConfig, LimitsConfig};
use crate::policy::Policy;

fn endpoint() -> Endpoint {
    let limits = LimitsConfig {
        rate: 0,
        ..LimitsConfig::default()
    };
    let policy = Policy::new(&AuthConfig::default(), &limits);
    let bridge = Bridge::detached(Arc::new(RetainedStore::new()), policy, 4096);
    Endpoint::new(&CoapConfig::default(), bridge)
}

fn client(port: u16) -> Source {
    Source::udp(SocketAddr::from(([192, 0, 2, 1], port)))
}

fn sent(ep: &mut Endpoint) -> Vec<Transmit> {
    std::iter::from_fn(|| ep.poll_transmit()).collect()
}

fn packet(t: &Transmit) -> Packet {
    Packet::from_bytes(&t.bytes).unwrap()
}

fn publish(ep: &mut Endpoint, topic: &str, payload: &'static [u8], now: Instant) {
    let mut message = Message::new(
        Topic::parse(topic).unwrap(),
        Bytes::from_static(payload),
        Origin::Mqtt,
    );
    message.retain = true;
    ep.bridge().inject(message);
    while let Some(received) = ep.live().map(|rx| rx.try_recv()) {
        match received {
            Ok(event) => ep.on_live(Ok(event), now),
            Err(_) => break,
        }
    }
}

/// CON GET Observe 0 /topics/t with token 0x7a, message id `mid`.
fn observe(mid: u8) -> Vec<u8> {
    [
        b"\x41\x01\x00".as_slice(),
        &[mid],
        b"\x7a\x60\x56topics\x01t",
    ]
    .concat()
}

#[test]
fn a_duplicate_con_is_answered_from_the_cache() {
    let mut ep = endpoint();
    let now = Instant::now();
    let put = b"\x40\x03\x00\x09\xb6topics\x01t\xffv";
    ep.receive(&client(1), put, now);
    let job = ep.poll_job().expect("a publish is work");
    // A duplicate while the publish runs is dropped.
    ep.receive(&client(1), put, now);
    assert!(sent(&mut ep).is_empty());
    assert!(ep.poll_job().is_none());
    ep.completed(job.id, Reply::new(ResponseType::Changed), now);
    let first = sent(&mut ep);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].peer, client(1).peer);
    // Later duplicates get the same bytes and start nothing.
    ep.receive(&client(1), put, now + Duration::from_secs(5));
    let again = sent(&mut ep);
    assert_eq!(again[0].bytes, first[0].bytes);
    assert!(ep.poll_job().is_none());
    // The same message id from another peer is another request.
    ep.receive(&client(2), put, now);
    assert!(ep.poll_job().is_some());
}

#[test]
fn an_unacknowledged_con_notification_is_resent_with_backoff_then_the_observer_dropped() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    ep.receive(&client(1), &observe(1), t0);
    assert_eq!(sent(&mut ep).len(), 1);
    assert!(
        ep.live().is_some(),
        "an observer holds the live subscription"
    );
    // The first notification after 30 s is confirmable.
    let t1 = t0 + Duration::from_secs(31);
    publish(&mut ep, "t", b"v", t1);
    let out = sent(&mut ep);
    assert_eq!(out.len(), 1);
    let con = packet(&out[0]);
    assert_eq!(con.header.get_type(), MessageType::Confirmable);
    // ACK_TIMEOUT 2 s times 1 to 1.5, then doubling: four resends, then the observer goes.
    let mut now = t1;
    let mut waits = Vec::new();
    for _ in 0..4 {
        let at = ep.poll_timeout().expect("a resend is due");
        waits.push(at - now);
        now = at;
        ep.tick(now);
        let out = sent(&mut ep);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].bytes, Bytes::from(con.to_bytes().unwrap()));
    }
    let first = waits[0].as_secs_f64();
    assert!((2.0..=3.0).contains(&first), "first wait {first}");
    for (i, w) in waits.iter().enumerate() {
        let expected = first * f64::from(1u32 << i);
        assert!((w.as_secs_f64() - expected).abs() < 1e-3, "wait {i}: {w:?}");
    }
    let at = ep.poll_timeout().expect("the last wait");
    ep.tick(at);
    assert!(sent(&mut ep).is_empty());
    assert!(ep.poll_timeout().is_none());
    assert!(ep.live().is_none(), "no observer, no subscription");
    publish(&mut ep, "t", b"w", at);
    assert!(sent(&mut ep).is_empty());
}

#[test]
fn an_acknowledged_notification_sends_the_pending_one() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    ep.receive(&client(1), &observe(1), t0);
    sent(&mut ep);
    let t1 = t0 + Duration::from_secs(31);
    publish(&mut ep, "t", b"a", t1);
    let con = packet(&sent(&mut ep)[0]);
    // Messages while the CON is in flight: only the latest is kept.
    publish(&mut ep, "t", b"b", t1);
    publish(&mut ep, "t", b"c", t1);
    assert!(sent(&mut ep).is_empty());
    let ack = [0x60, 0, 0, 0];
    let mut ack = ack.to_vec();
    ack[2..4].copy_from_slice(&con.header.message_id.to_be_bytes());
    ep.receive(&client(1), &ack, t1);
    let out = sent(&mut ep);
    assert_eq!(out.len(), 1);
    assert_eq!(packet(&out[0]).payload, b"c");
    assert_eq!(
        packet(&out[0]).header.get_type(),
        MessageType::NonConfirmable
    );
}

#[test]
fn a_slow_call_is_acknowledged_then_answered_separately() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    // CON POST /rpc/dev token 0x01, message id 0x0042.
    let call = b"\x41\x02\x00\x42\x01\xb3rpc\x03dev\xffq";
    ep.receive(&client(1), call, t0);
    let job = ep.poll_job().expect("a call is work");
    assert!(sent(&mut ep).is_empty());
    // Half the ACK timeout later the empty ACK goes, and answers duplicates.
    let at = ep.poll_timeout().expect("the early ACK");
    assert_eq!(at - t0, Duration::from_secs(1));
    ep.tick(at);
    let ack = sent(&mut ep);
    assert_eq!(ack.len(), 1);
    let p = packet(&ack[0]);
    assert_eq!(
        (p.header.get_type(), p.header.code, p.header.message_id),
        (MessageType::Acknowledgement, MessageClass::Empty, 0x42)
    );
    ep.receive(&client(1), call, at);
    assert_eq!(sent(&mut ep)[0].bytes, ack[0].bytes);
    // The reply goes as a CON of its own with the request's token, resent until ACKed.
    let mut reply = Reply::new(ResponseType::Content);
    reply.payload = Bytes::from_static(b"r");
    ep.completed(job.id, reply, at);
    let out = sent(&mut ep);
    let separate = packet(&out[0]);
    assert_eq!(separate.header.get_type(), MessageType::Confirmable);
    assert_eq!(separate.get_token(), [1]);
    assert_eq!(separate.payload, b"r");
    let resend = ep.poll_timeout().expect("a resend");
    ep.tick(resend);
    assert_eq!(sent(&mut ep)[0].bytes, out[0].bytes);
    let mut ack = vec![0x60, 0, 0, 0];
    ack[2..4].copy_from_slice(&separate.header.message_id.to_be_bytes());
    ep.receive(&client(1), &ack, resend);
    assert!(ep.poll_timeout().is_none());
    assert_eq!(ep.jobs_running(), 0);
}

#[test]
fn a_quick_call_is_answered_in_the_ack() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    ep.receive(&client(1), b"\x41\x02\x00\x42\x01\xb3rpc\x03dev\xffq", t0);
    let job = ep.poll_job().expect("a call is work");
    ep.completed(job.id, Reply::new(ResponseType::Content), t0);
    let p = packet(&sent(&mut ep)[0]);
    assert_eq!(p.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(p.header.code, MessageClass::Response(ResponseType::Content));
    assert!(ep.poll_timeout().is_none(), "the early ACK is disarmed");
}

#[test]
fn sessions_are_peers_whatever_their_address_and_carry_their_principal() {
    let mut ep = endpoint();
    let now = Instant::now();
    let session = |port| Source {
        peer: Peer::Session(7),
        addr: SocketAddr::from(([198, 51, 100, 1], port)),
        principal: Some(Principal::Named("sensor".into())),
    };
    ep.receive(&session(1000), &observe(1), now);
    assert_eq!(sent(&mut ep)[0].peer, Peer::Session(7));
    // The client's address changed; the duplicate is still the same exchange.
    ep.receive(&session(2000), &observe(1), now);
    let out = sent(&mut ep);
    assert_eq!((out.len(), out[0].peer), (1, Peer::Session(7)));
    publish(&mut ep, "t", b"v", now);
    assert_eq!(sent(&mut ep)[0].peer, Peer::Session(7));
    // The authenticated principal is the publisher: `?auth=` is not asked for.
    ep.receive(&session(2000), b"\x40\x03\x00\x02\xb6topics\x01u\xffv", now);
    match ep.poll_job().map(|j| j.work) {
        Some(Work::Publish(_, _, who)) => assert_eq!(who, Principal::Named("sensor".into())),
        other => panic!("expected a publish, got {other:?}"),
    }
}

#[test]
fn max_pending_bounds_the_jobs_and_close_says_goodbye() {
    let mut ep = endpoint();
    let now = Instant::now();
    for mid in 0..=CoapConfig::default().max_pending as u16 {
        let put = [
            b"\x40\x03".as_slice(),
            &mid.to_be_bytes(),
            b"\xb6topics\x01t\xffv",
        ]
        .concat();
        ep.receive(&client(1), &put, now);
    }
    let out = sent(&mut ep);
    assert_eq!(out.len(), 1);
    assert_eq!(
        packet(&out[0]).header.code,
        MessageClass::Response(ResponseType::ServiceUnavailable)
    );
    ep.receive(&client(2), &observe(1), now);
    sent(&mut ep);
    ep.close();
    let bye = sent(&mut ep);
    assert_eq!(bye.len(), 1);
    assert_eq!(
        packet(&bye[0]).header.code,
        MessageClass::Response(ResponseType::ServiceUnavailable)
    );
}

#[test]
fn a_forgotten_peer_loses_its_observations() {
    let mut ep = endpoint();
    let now = Instant::now();
    ep.receive(&client(1), &observe(1), now);
    ep.receive(&client(2), &observe(1), now);
    sent(&mut ep);
    ep.forget(client(1).peer);
    publish(&mut ep, "t", b"v", now);
    let out = sent(&mut ep);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].peer, client(2).peer);
    ep.forget(client(2).peer);
    assert!(ep.live().is_none());
}

#[test]
fn a_reset_to_a_notification_ends_the_observation() {
    let mut ep = endpoint();
    let t0 = Instant::now();
    ep.receive(&client(1), &observe(1), t0);
    sent(&mut ep);
    publish(&mut ep, "t", b"v", t0 + Duration::from_secs(31));
    let con = packet(&sent(&mut ep)[0]);
    let mut rst = vec![0x70, 0, 0, 0];
    rst[2..4].copy_from_slice(&con.header.message_id.to_be_bytes());
    ep.receive(&client(1), &rst, t0 + Duration::from_secs(32));
    assert!(ep.poll_timeout().is_none(), "no resend is left");
    assert!(ep.live().is_none());
}

#[test]
fn no_response_silences_a_non_and_leaves_a_con_its_empty_ack() {
    let mut ep = endpoint();
    let now = Instant::now();
    // GET /topics/none (4.04), No-Response 8 (no 4.xx): NON gets nothing, CON an empty ACK.
    let get =
        |kind: u8, mid: u8| [&[kind, 0x01, 0, mid][..], b"\xb6topics\x04none\xd1\xea\x08"].concat();
    ep.receive(&client(1), &get(0x50, 1), now);
    assert!(sent(&mut ep).is_empty());
    ep.receive(&client(1), &get(0x40, 2), now);
    let p = packet(&sent(&mut ep)[0]);
    assert_eq!(
        (p.header.get_type(), p.header.code),
        (MessageType::Acknowledgement, MessageClass::Empty)
    );
}
