//! The committed OpenAPI document is the one served, and the docs page needs no network.

use crate::support::TestGateway;

const COMMITTED: &str = "openapi/topicgate.json";

#[tokio::test]
async fn served_openapi_matches_the_committed_document() {
    let gw = TestGateway::start().await;
    let served = gw.get("/openapi.json").await.text().await.unwrap();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(COMMITTED);
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, format!("{served}\n")).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed.trim_end() == served.trim_end(),
        "{COMMITTED} differs from /openapi.json; regenerate with `UPDATE_OPENAPI=1 cargo test --test it openapi` and review the diff"
    );
    let doc: serde_json::Value = serde_json::from_str(&served).unwrap();
    assert!(doc["paths"]["/topics/{topic}"]["post"].is_object());
    assert!(doc["paths"]["/topics/{topic}"]["get"].is_object());
    // A retained payload is served with whatever type it was published with.
    let read = &doc["paths"]["/topics/{topic}"]["get"]["responses"]["200"]["content"];
    assert!(read["*/*"].is_object(), "{read}");
}

#[tokio::test]
async fn docs_page_is_served_without_external_resources() {
    let gw = TestGateway::start().await;
    let resp = gw.get("/docs").await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = resp.text().await.unwrap();
    assert!(html.contains("/openapi.json"));
    for external in ["src=\"http", "href=\"http", "@import", "cdn"] {
        assert!(
            !html.contains(external),
            "the page loads nothing from elsewhere ({external})"
        );
    }
}

#[tokio::test]
async fn put_offers_no_retain_parameter_since_it_always_retains() {
    let gw = TestGateway::start().await;
    let doc: serde_json::Value = gw.get("/openapi.json").await.json().await.unwrap();
    let params = |method: &str| -> Vec<String> {
        doc["paths"]["/topics/{topic}"][method]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(params("post"), ["topic", "qos", "retain", "expiry"]);
    assert_eq!(params("put"), ["topic", "qos", "expiry"]);
    assert!(doc["paths"]["/topics/{topic}"]["put"]["responses"]["400"].is_object());

    // A redundant `retain=true` is accepted; `retain=false` contradicts the method.
    let put = |query: &'static str| {
        gw.client
            .put(gw.url(&format!("/topics/put/kept{query}")))
            .body("v")
            .send()
    };
    assert_eq!(put("?retain=true").await.unwrap().status(), 204);
    assert_eq!(put("?qos=1&expiry=60").await.unwrap().status(), 204);
    let refused = put("?retain=false").await.unwrap();
    assert_eq!(refused.status(), 400);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "invalid_parameter", "{body}");
    let kept = gw.get("/topics/put/kept").await;
    assert_eq!(kept.status(), 200);
    assert_eq!(kept.text().await.unwrap(), "v");
}
