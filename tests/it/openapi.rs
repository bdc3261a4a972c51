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
