//! CORS: preflights answered for allowed origins (without credentials) and refused for others,
//! `Access-Control-Allow-Origin` on actual responses and event streams, nothing when off.

use std::time::Duration;

use futures_util::StreamExt;
use topicgate::config::TokenEntry;

use crate::support::{TestGateway, within};

const DASH: &str = "https://dash.example";
const TOKEN: &str = "dash-token-0123456789";

async fn gateway() -> TestGateway {
    TestGateway::start_with(|c| {
        c.http.cors.origins = vec![DASH.to_owned()];
        // Every request needs credentials: a preflight must still be answered without them.
        c.auth.allow_anonymous = Some(false);
        c.auth.tokens.push(TokenEntry {
            name: "dash".to_owned(),
            token: TOKEN.to_owned(),
        });
    })
    .await
}

async fn preflight(
    gw: &TestGateway,
    origin: &str,
    method: &str,
    headers: &str,
) -> reqwest::Response {
    gw.client
        .request(reqwest::Method::OPTIONS, gw.url("/topics/open/a"))
        .header("origin", origin)
        .header("access-control-request-method", method)
        .header("access-control-request-headers", headers)
        .send()
        .await
        .unwrap()
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name).map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn a_preflight_from_an_allowed_origin_is_answered_204() {
    let gw = gateway().await;
    let resp = preflight(&gw, DASH, "PUT", "content-type, authorization").await;
    assert_eq!(resp.status(), 204);
    assert_eq!(header(&resp, "access-control-allow-origin"), Some(DASH));
    let methods = header(&resp, "access-control-allow-methods").unwrap();
    assert!(
        methods.contains("PUT") && methods.contains("DELETE"),
        "{methods}"
    );
    let headers = header(&resp, "access-control-allow-headers").unwrap();
    assert!(
        headers.contains("content-type") && headers.contains("authorization"),
        "{headers}"
    );
    assert_eq!(header(&resp, "access-control-max-age"), Some("600"));
}

#[tokio::test]
async fn a_preflight_from_another_origin_or_for_other_headers_is_refused() {
    let gw = gateway().await;
    for (origin, method, headers) in [
        ("https://evil.example", "PUT", "content-type"),
        (DASH, "PATCH", ""),
        (DASH, "POST", "x-not-listed"),
    ] {
        let resp = preflight(&gw, origin, method, headers).await;
        assert_eq!(resp.status(), 403, "{origin} {method} {headers}");
        assert_eq!(header(&resp, "access-control-allow-origin"), None);
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "cors_denied");
    }
}

#[tokio::test]
async fn actual_responses_and_event_streams_carry_the_allowed_origin() {
    let gw = gateway().await;
    let resp = gw
        .client
        .put(gw.url("/topics/open/a"))
        .bearer_auth(TOKEN)
        .body("v")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let get = |origin: &'static str| {
        gw.client
            .get(gw.url("/topics/open/a"))
            .bearer_auth(TOKEN)
            .header("origin", origin)
            .send()
    };
    let resp = get(DASH).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "access-control-allow-origin"), Some(DASH));
    let exposed = header(&resp, "access-control-expose-headers").unwrap();
    assert!(exposed.contains("etag"), "{exposed}");
    let resp = get("https://evil.example").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "access-control-allow-origin"), None);

    // Refusals carry it too, so that the page can read why.
    let resp = gw
        .client
        .get(gw.url("/topics/closed/a"))
        .header("origin", DASH)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(header(&resp, "access-control-allow-origin"), Some(DASH));

    let resp = within(
        "the stream opens",
        gw.client
            .get(gw.url("/topics/open/%23"))
            .bearer_auth(TOKEN)
            .header("accept", "text/event-stream")
            .header("origin", DASH)
            .timeout(Duration::from_secs(3600))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-type"), Some("text/event-stream"));
    assert_eq!(header(&resp, "access-control-allow-origin"), Some(DASH));
    let mut body = resp.bytes_stream();
    let first = within("the first event", body.next())
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&first).contains("open/a"));
}

#[tokio::test]
async fn any_origin_is_answered_with_a_star() {
    let gw = TestGateway::start_with(|c| {
        c.http.cors.origins = vec!["*".to_owned()];
        c.http.cors.headers = vec!["*".to_owned()];
    })
    .await;
    let resp = preflight(&gw, "https://any.example", "POST", "mqtt-user-site").await;
    assert_eq!(resp.status(), 204);
    assert_eq!(header(&resp, "access-control-allow-origin"), Some("*"));
    assert_eq!(
        header(&resp, "access-control-allow-headers"),
        Some("mqtt-user-site")
    );
}

#[tokio::test]
async fn cors_is_off_by_default() {
    let gw = TestGateway::start().await;
    let resp = preflight(&gw, DASH, "PUT", "content-type").await;
    assert_eq!(resp.status(), 405);
    assert_eq!(header(&resp, "access-control-allow-origin"), None);
    assert_eq!(gw.put("/topics/a", "v").await.status(), 204);
    let resp = gw
        .client
        .get(gw.url("/topics/a"))
        .header("origin", DASH)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "access-control-allow-origin"), None);
}
