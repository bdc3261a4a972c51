//! Password logins: credentials sent to an open gateway are taken as anonymous on every door,
//! and a flood of wrong passwords is answered, each request in time, by the bounded verifier.

use std::time::Duration;

use coap_lite::RequestType;
use futures_util::future::join_all;
use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet};
use topicgate::config::UserEntry;

use crate::coap_client::{CoapClient, code};
use crate::support::{TestGateway, eventually, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_sent_to_an_open_gateway_are_taken_as_anonymous() {
    let gw = TestGateway::start().await;

    // HTTP Basic, as `curl -u someone:secret` sends it, and a Bearer token.
    let r = gw
        .client
        .put(gw.url("/topics/open/basic"))
        .basic_auth("someone", Some("secret"))
        .body("1")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    eventually("the retained value, read with a Bearer token", || async {
        let r = gw
            .client
            .get(gw.url("/topics/open/basic"))
            .bearer_auth("not-a-configured-token")
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;

    // CoAP ?auth=.
    let coap = CoapClient::new(gw.coap).await;
    let get = coap.request(RequestType::Get, "topics/open/basic?auth=anything");
    assert_eq!(code(&coap.call(get).await), "2.05");

    // MQTT 3.1.1 CONNECT with a user name and password.
    let mut opts = MqttOptions::new("sends-credentials", "127.0.0.1", gw.mqtt.port());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_credentials("someone", "secret");
    let (_client, mut eventloop) = AsyncClient::new(opts, 8);
    let ack = within("a CONNACK", eventloop.poll()).await.unwrap();
    match ack {
        Event::Incoming(Packet::ConnAck(ack)) => assert_eq!(ack.code, ConnectReturnCode::Success),
        other => panic!("CONNACK expected, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_wrong_passwords_is_each_answered_in_time() {
    let gw = TestGateway::start_with(|c| {
        c.auth.users.push(UserEntry {
            name: "alice".to_owned(),
            password_hash: topicgate::policy::hash_password("alice-password").unwrap(),
        });
        c.auth.allow_anonymous = Some(true);
    })
    .await;
    let wrong = (0..60).map(|i| {
        gw.client
            .get(gw.url("/topics/flood"))
            .basic_auth("alice", Some(format!("guess-{i}")))
            .send()
    });
    let answers = within("60 wrong passwords are answered", join_all(wrong)).await;
    let (mut refused, mut busy) = (0, 0);
    for answer in answers {
        let r = answer.expect("every request is answered");
        match r.status().as_u16() {
            401 => refused += 1,
            503 => {
                assert_eq!(r.headers()["retry-after"], "1");
                let body: serde_json::Value = r.json().await.unwrap();
                assert_eq!(body["error"], "busy");
                busy += 1;
            }
            other => panic!("401 or 503 expected, got {other}"),
        }
    }
    assert_eq!(refused + busy, 60);

    // A wrong password is not taken as anonymous, even with anonymous access on.
    let r = gw.get_as("/topics/flood", "alice", "guess-0").await;
    assert_eq!(r.status(), 401);
    // The right one still gets in.
    let r = gw.get_as("/topics/flood", "alice", "alice-password").await;
    assert_eq!(
        r.status(),
        404,
        "nothing retained there, but alice is let in"
    );
}
