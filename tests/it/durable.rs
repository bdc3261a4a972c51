//! The retained store on disk: values survive a restart whatever protocol retained them, expired
//! ones do not, and a store that is busy or unreadable stops startup without being touched.

use std::path::Path;

use coap_lite::{CoapOption, RequestType};
use topicgate::{Config, Gateway};

use crate::coap_client::{CoapClient, code, set_uint, text, uint_option};
use crate::support::{TestGateway, eventually, recv};

async fn start_in(dir: &Path) -> TestGateway {
    let dir = dir.to_owned();
    TestGateway::start_with(move |c| c.data_dir = dir).await
}

#[tokio::test]
async fn retained_values_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start_in(dir.path()).await;
    let r = gw
        .client
        .put(gw.url("/topics/keep/http"))
        .header("content-type", "application/json")
        .header("mqtt-user-unit", "celsius")
        .body("{\"t\":21}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let coap = CoapClient::new(gw.coap).await;
    let mut put = coap.request(RequestType::Put, "topics/keep/coap");
    set_uint(&mut put, CoapOption::ContentFormat, 60);
    put.payload = vec![0xf5];
    assert_eq!(code(&coap.call(put).await), "2.04");
    let (mqtt, _) = gw.mqtt_v4("keeper", &[]).await;
    mqtt.publish("keep/mqtt", rumqttc::QoS::AtLeastOnce, true, "40")
        .await
        .unwrap();
    eventually("the MQTT value is retained", || async {
        (gw.get("/topics/keep/mqtt").await.status() == 200).then_some(())
    })
    .await;
    assert_eq!(
        gw.post("/topics/keep/gone?retain=true", "x").await.status(),
        204
    );
    let r = gw
        .client
        .delete(gw.url("/topics/keep/gone"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        gw.post("/topics/keep/live", "not retained").await.status(),
        204
    );
    assert_eq!(
        gw.post("/topics/keep/brief?retain=true&expiry=1", "x")
            .await
            .status(),
        204
    );
    eventually("the brief value expires", || async {
        (gw.get("/topics/keep/brief").await.status() == 404).then_some(())
    })
    .await;
    gw.stop().await.unwrap();

    let gw = start_in(dir.path()).await;
    let r = gw.get("/topics/keep/http").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(r.headers()["mqtt-user-unit"], "celsius");
    assert_eq!(r.text().await.unwrap(), "{\"t\":21}");
    let r = gw.get("/topics/keep/coap").await;
    assert_eq!(r.headers()["content-type"], "application/cbor");
    assert_eq!(
        gw.get("/topics/keep/mqtt").await.text().await.unwrap(),
        "40"
    );
    for gone in ["gone", "live", "brief"] {
        assert_eq!(
            gw.get(&format!("/topics/keep/{gone}")).await.status(),
            404,
            "{gone}"
        );
    }
    // MQTT subscribers and CoAP readers get the reloaded values too.
    let (_sub, mut rx) = gw.mqtt_v4("after", &[("keep/mqtt", 0)]).await;
    let p = recv(&mut rx).await;
    assert!(p.retain);
    assert_eq!(&p.payload[..], b"40");
    let coap = CoapClient::new(gw.coap).await;
    let resp = coap
        .call(coap.request(RequestType::Get, "topics/keep/http"))
        .await;
    assert_eq!(text(&resp), "{\"t\":21}");
    assert_eq!(uint_option(&resp, CoapOption::ContentFormat), Some(50));
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn a_busy_or_unreadable_store_stops_startup_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start_in(dir.path()).await;
    let mut config = Config::default();
    config.http.addr = Some("127.0.0.1:0".parse().unwrap());
    config.mqtt.given_addr = Some("127.0.0.1:0".parse().unwrap());
    config.coap.addr = Some("127.0.0.1:0".parse().unwrap());
    config.data_dir = dir.path().to_owned();
    let err = Gateway::bind(config.clone()).await.err().expect("refused");
    assert!(
        err.to_string().contains("in use by another topicgate"),
        "{err}"
    );
    gw.stop().await.unwrap();

    let broken = tempfile::tempdir().unwrap();
    let file = broken.path().join("retained.redb");
    let junk: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&file, &junk).unwrap();
    config.data_dir = broken.path().to_owned();
    let err = Gateway::bind(config).await.err().expect("refused");
    assert!(err.to_string().contains("left untouched"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), junk);
}
