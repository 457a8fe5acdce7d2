//! The HTTP client side of the integration tests: one client setting for all of them, and the
//! request helpers whose failure messages name the request and the answer.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

/// No proxy (the daemon is on loopback), a minute per request.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("reqwest client")
}

/// GETs `url`, which must answer 200: its JSON.
pub async fn get_json(c: &reqwest::Client, url: &str) -> Value {
    let r = c
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(r.status(), StatusCode::OK, "GET {url}");
    r.json().await.expect("JSON")
}

/// POSTs `body` as JSON: the status and the body's text.
pub async fn post_raw(c: &reqwest::Client, url: &str, body: &Value) -> (StatusCode, String) {
    let r = c
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = r.status();
    (status, r.text().await.expect("body"))
}

/// POSTs `body` as JSON: the status and the body parsed as JSON.
pub async fn post(c: &reqwest::Client, url: &str, body: &Value) -> (StatusCode, Value) {
    let (status, text) = post_raw(c, url, body).await;
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: {e}: {text}"));
    (status, v)
}

/// POSTs `body`, which must get a 200; its JSON.
pub async fn ok(c: &reqwest::Client, url: &str, body: &Value) -> Value {
    let (status, v) = post(c, url, body).await;
    assert_eq!(status, StatusCode::OK, "{body} -> {v}");
    v
}

/// The data events of an SSE response (a 200 ending `data: [DONE]`), parsed, the last one
/// dropped; none may be an error event.
pub async fn stream(c: &reqwest::Client, url: &str, body: &Value) -> Vec<Value> {
    let (status, text) = post_raw(c, url, body).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let frames: Vec<&str> = text.split("\n\n").filter(|f| !f.is_empty()).collect();
    assert_eq!(frames.last(), Some(&"data: [DONE]"), "{text}");
    frames[..frames.len() - 1]
        .iter()
        .map(|f| {
            let data = f.strip_prefix("data: ").expect("data frame");
            let v: Value = serde_json::from_str(data).expect("JSON event");
            assert!(v.get("error").is_none(), "error event: {v}");
            v
        })
        .collect()
}
