//! The committed OpenAPI document is the one served, and the docs page needs no network.

use serde_json::Value;
use topicgate::config::TokenEntry;

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

/// Checks a response against what the document says of its status: the content type, every
/// header, and the fields the JSON error body requires.
async fn assert_as_documented(doc: &Value, method: &str, resp: reqwest::Response) {
    let status = resp.status().as_str().to_owned();
    let documented = &doc["paths"]["/topics/{topic}"][method]["responses"][&status];
    assert!(
        documented.is_object(),
        "{method}: {status} is not documented"
    );
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
    let media = &documented["content"][&content_type];
    assert!(
        media.is_object(),
        "{method} {status}: {content_type} is not documented"
    );
    assert_eq!(media["schema"]["$ref"], "#/components/schemas/ErrorBody");
    let headers = documented["headers"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    for name in headers.keys() {
        assert!(
            resp.headers().contains_key(name.as_str()),
            "{method} {status}: no {name} header"
        );
    }
    let body: Value = resp.json().await.unwrap();
    let schema = &doc["components"]["schemas"]["ErrorBody"];
    for field in schema["required"].as_array().unwrap() {
        let field = field.as_str().unwrap();
        assert!(
            body[field].is_string(),
            "{method} {status}: {field} in {body}"
        );
    }
}

#[tokio::test]
async fn refusals_look_as_documented() {
    let gw = TestGateway::start_with(|c| {
        c.auth.tokens.push(TokenEntry {
            name: "reader".to_owned(),
            token: "reader-token-0123456789".to_owned(),
        });
        c.auth.allow_anonymous = Some(false);
        c.limits.rate = 1;
        c.limits.burst = 2;
    })
    .await;
    let doc: Value = gw.get("/openapi.json").await.json().await.unwrap();
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["basic"]["scheme"], "basic");
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        assert!(doc["paths"][path]["get"]["security"].is_null(), "{path}");
    }
    let url = gw.url("/topics/doc/a");
    for method in ["get", "post", "put", "delete"] {
        let op = &doc["paths"]["/topics/{topic}"][method];
        let security: Vec<Value> = op["security"].as_array().unwrap().clone();
        for alternative in [
            serde_json::json!({"basic": []}),
            serde_json::json!({"bearer": []}),
            serde_json::json!({}),
        ] {
            assert!(security.contains(&alternative), "{method}: {alternative}");
        }
        for status in ["401", "403", "429"] {
            assert!(op["responses"][status].is_object(), "{method}: {status}");
        }
        let http = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        // No credentials, a wrong token, a wrong password: 401 each time.
        let requests = [
            gw.client.request(http.clone(), &url),
            gw.client
                .request(http.clone(), &url)
                .bearer_auth("not-the-reader-token-0000"),
            gw.client
                .request(http.clone(), &url)
                .basic_auth("nobody", Some("nothing")),
        ];
        for request in requests {
            let resp = request.body("x").send().await.unwrap();
            assert_eq!(resp.status(), 401, "{method}");
            assert_as_documented(&doc, method, resp).await;
        }
    }
    // Past the burst, the refusal is a 429 with `Retry-After`, as documented.
    let mut limited = None;
    for _ in 0..5 {
        let resp = gw
            .client
            .get(&url)
            .bearer_auth("reader-token-0123456789")
            .send()
            .await
            .unwrap();
        if resp.status() == 429 {
            limited = Some(resp);
            break;
        }
    }
    let resp = limited.expect("a 429 past the burst");
    assert_as_documented(&doc, "get", resp).await;
}

#[tokio::test]
async fn the_explorer_and_its_assets_are_served_offline_outside_the_api() {
    let gw = TestGateway::start().await;
    let page = gw.get("/").await;
    assert_eq!(page.status(), 200);
    let policy = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(policy.contains("default-src 'self'"), "{policy}");
    let html = page.text().await.unwrap();
    for (asset, kind) in [
        ("/explorer/explorer.js", "text/javascript"),
        ("/explorer/explorer.css", "text/css"),
    ] {
        assert!(html.contains(asset), "the page loads {asset}");
        let resp = gw.get(asset).await;
        assert_eq!(resp.status(), 200);
        let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(content_type.starts_with(kind), "{asset}: {content_type}");
        // The SVG namespace is a name, not a resource.
        let text = resp
            .text()
            .await
            .unwrap()
            .replace("http://www.w3.org/2000/svg", "");
        for external in ["http://", "https://", "@import", "cdn"] {
            assert!(
                !text.contains(external),
                "{asset} loads nothing from elsewhere ({external})"
            );
        }
    }
    for external in ["src=\"http", "href=\"http", "@import", "cdn"] {
        assert!(!html.contains(external), "{external}");
    }
    // The page is not part of the API document, and `/docs/` is `/docs`.
    let doc: serde_json::Value = gw.get("/openapi.json").await.json().await.unwrap();
    assert!(doc["paths"]["/"].is_null());
    let docs = gw.get("/docs/").await;
    assert_eq!(docs.status(), 200);
    assert!(docs.text().await.unwrap().contains("/openapi.json"));
}
