//! The HTTP side of one request: the pooled hyper client (TCP_NODELAY, keep-alive), the target
//! (base URL, loopback check, bearer key), model discovery, and `send` — which times one request
//! (TTFT, every inter-chunk gap, E2E) and reads token counts from `usage` while looking at as
//! little of each response as it can: a byte search per SSE payload, one small JSON parse per
//! request.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use memchr::memmem;
use serde::{Deserialize, Serialize};

use crate::sse::SseParser;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Error texts are cut to this many bytes: enough to read, small enough to keep per request.
const ERROR_TEXT_MAX: usize = 300;

/// A pooled HTTP/1.1 client: one keep-alive connection per request in flight, reused after.
pub fn build_client() -> HttpClient {
    let mut conn = HttpConnector::new();
    // Small requests and SSE chunks must not wait on Nagle's algorithm.
    conn.set_nodelay(true);
    conn.set_keepalive(Some(Duration::from_secs(60)));
    conn.set_connect_timeout(Some(Duration::from_secs(10)));
    Client::builder(TokioExecutor::new())
        // Every connection opened for a burst stays available: reconnecting under load would
        // measure the kernel's TCP handshake, not the server.
        .pool_max_idle_per_host(usize::MAX)
        .pool_idle_timeout(Duration::from_secs(90))
        .build(conn)
}

/// Where requests go.
#[derive(Debug, Clone)]
pub struct Target {
    base: String,
    auth: Option<HeaderValue>,
}

impl Target {
    /// Parses `http://HOST:PORT`. Only loopback hosts are accepted: this tool is used on shared
    /// machines where load must never leave the box.
    pub fn new(url: &str, api_key: Option<&str>) -> Result<Target> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("--url {url:?} is not a URL"))?;
        if uri.scheme_str() != Some("http") {
            bail!("--url must be http://HOST:PORT (https is not supported), got {url:?}");
        }
        let host = uri
            .host()
            .ok_or_else(|| anyhow!("--url {url:?} has no host"))?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let loopback = bare.eq_ignore_ascii_case("localhost")
            || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            bail!("--url host {host:?} is not a loopback address (127.0.0.0/8, ::1, localhost)");
        }
        let auth = api_key
            .map(|k| HeaderValue::from_str(&format!("Bearer {k}")))
            .transpose()
            .context("--api-key holds characters not allowed in a header")?;
        let base = url.trim_end_matches('/').to_owned();
        Ok(Target { base, auth })
    }

    /// The full URI of `path` (which starts with `/`).
    pub fn uri(&self, path: &str) -> Result<Uri> {
        format!("{}{}", self.base, path)
            .parse()
            .with_context(|| format!("bad URL {}{}", self.base, path))
    }

    pub fn auth(&self) -> Option<&HeaderValue> {
        self.auth.as_ref()
    }
}

/// The first model listed by `GET /v1/models`.
pub async fn discover_model(client: &HttpClient, target: &Target) -> Result<String> {
    #[derive(Deserialize)]
    struct Models {
        data: Vec<ModelEntry>,
    }
    #[derive(Deserialize)]
    struct ModelEntry {
        id: String,
    }
    let mut req = Request::get(target.uri("/v1/models")?);
    if let Some(a) = target.auth() {
        req = req.header(AUTHORIZATION, a.clone());
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(req.body(Full::new(Bytes::new()))?),
    )
    .await
    .context("GET /v1/models timed out")?
    .context("GET /v1/models failed (is the server running?)")?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!(
            "GET /v1/models answered {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(ERROR_TEXT_MAX)])
        );
    }
    let models: Models =
        serde_json::from_slice(&body).context("GET /v1/models: not an OpenAI model list")?;
    models
        .data
        .into_iter()
        .next()
        .map(|m| m.id)
        .ok_or_else(|| anyhow!("GET /v1/models lists no model; pass --model"))
}

/// Token counts from a response's `usage` object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

/// Byte-level probes of response JSON, built once per run. A `"key"` in quotes followed by `:`
/// can only be a key: inside a JSON string the quotes would be escaped.
#[derive(Debug)]
pub struct Scanner {
    usage: memmem::FinderRev<'static>,
    content: memmem::Finder<'static>,
    text: memmem::Finder<'static>,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner {
            usage: memmem::FinderRev::new(b"\"usage\""),
            content: memmem::Finder::new(b"\"content\""),
            text: memmem::Finder::new(b"\"text\""),
        }
    }
}

impl Scanner {
    /// Whether a payload carries a `"usage": {` object (not `"usage": null`, which some servers
    /// put in every chunk): the cheap test done on every SSE chunk, so that only the chunk with
    /// the counts is kept and parsed once, at the end.
    pub fn has_usage(&self, payload: &[u8]) -> bool {
        let mut end = payload.len();
        while let Some(pos) = self.usage.rfind(&payload[..end]) {
            let after = payload[pos + b"\"usage\"".len()..].trim_ascii_start();
            if let Some(value) = after.strip_prefix(b":") {
                return value.trim_ascii_start().starts_with(b"{");
            }
            end = pos;
        }
        false
    }

    /// The last `"usage": {...}` object in a payload, parsed alone (the rest of the document is
    /// not parsed). `None` when absent or `null`.
    pub fn usage(&self, payload: &[u8]) -> Option<Usage> {
        let mut end = payload.len();
        while let Some(pos) = self.usage.rfind(&payload[..end]) {
            let after = payload[pos + b"\"usage\"".len()..].trim_ascii_start();
            if let Some(value) = after.strip_prefix(b":") {
                let value = value.trim_ascii_start();
                if !value.starts_with(b"{") {
                    return None; // "usage": null
                }
                let mut it = serde_json::Deserializer::from_slice(value).into_iter::<Usage>();
                return it.next().and_then(|r| r.ok());
            }
            // `"usage"` as a string value, not a key: look further back.
            end = pos;
        }
        None
    }

    /// Whether an SSE payload carries generated text: a non-empty `"content"` (chat delta) or
    /// `"text"` (completions) string. A role-only first chunk, a finish chunk with empty text and
    /// the usage-only chunk do not count, so TTFT is the first real token.
    pub fn has_content(&self, payload: &[u8]) -> bool {
        nonempty_string_after(payload, &self.content, b"\"content\"".len())
            || nonempty_string_after(payload, &self.text, b"\"text\"".len())
    }
}

fn nonempty_string_after(payload: &[u8], key: &memmem::Finder<'_>, key_len: usize) -> bool {
    key.find_iter(payload).any(|pos| {
        let after = payload[pos + key_len..].trim_ascii_start();
        after.strip_prefix(b":").is_some_and(|v| {
            let v = v.trim_ascii_start();
            v.len() >= 2 && v[0] == b'"' && v[1] != b'"'
        })
    })
}

/// What happened to one request. Times are milliseconds; `start_ms` is from the start of the
/// run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RequestRecord {
    pub prompt_index: u32,
    pub start_ms: f64,
    /// Open loop: how long after its scheduled arrival the request was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_ms: Option<f64>,
    /// First content chunk − send (streaming); equal to `e2e_ms` when not streaming.
    pub ttft_ms: Option<f64>,
    pub e2e_ms: f64,
    /// (E2E − TTFT) / (output tokens − 1); absent with fewer than two output tokens.
    pub tpot_ms: Option<f64>,
    /// Every gap between consecutive content chunks (streaming only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub itl_ms: Vec<f64>,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    /// Whether the counts came from the server's `usage` (otherwise output tokens are the number
    /// of content chunks and prompt tokens are unknown, 0).
    pub usage_reported: bool,
    /// 0 when no response arrived (connect error, timeout).
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Sent during the warm-up: kept in the records, left out of every figure.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub warmup: bool,
}

impl RequestRecord {
    pub fn success(&self) -> bool {
        self.error.is_none()
    }
}

/// One request's fixed inputs.
pub struct Call<'a> {
    pub client: &'a HttpClient,
    pub uri: &'a Uri,
    pub auth: Option<&'a HeaderValue>,
    pub body: Bytes,
    pub stream: bool,
    pub scanner: &'a Scanner,
    pub timeout: Duration,
    /// Capacity hint for the inter-token gaps.
    pub expected_chunks: usize,
}

/// Sends one request and times it. Never fails: every failure becomes the record's `error`.
pub async fn send(call: Call<'_>, run_start: Instant, prompt_index: u32) -> RequestRecord {
    let sent = Instant::now();
    let mut rec = RequestRecord {
        prompt_index,
        start_ms: ms(sent.duration_since(run_start)),
        ..RequestRecord::default()
    };
    let timeout = call.timeout;
    match tokio::time::timeout(timeout, exchange(call, sent, &mut rec)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => rec.error = Some(truncate(format!("{e:#}"))),
        Err(_) => rec.error = Some(format!("timed out after {:.1} s", timeout.as_secs_f64())),
    }
    if rec.error.is_some() {
        rec.e2e_ms = ms(sent.elapsed());
    }
    rec
}

async fn exchange(call: Call<'_>, sent: Instant, rec: &mut RequestRecord) -> Result<()> {
    // Built again only for a resend: no per-request copy of the headers otherwise.
    let request = || {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(call.uri.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(a) = call.auth {
            req = req.header(AUTHORIZATION, a.clone());
        }
        req.body(Full::new(call.body.clone()))
    };
    let resp = match call.client.request(request()?).await {
        // A server that closes a keep-alive connection just after a response (llama-server
        // does after each stream) races the pool: the request goes out on a connection whose
        // close is already on the wire, and comes back with no response at all. Nothing was
        // processed, so it is sent once more on a fresh connection, as curl and browsers do
        // by checking a connection before reusing it.
        Err(e) if closed_before_response(&e) => call.client.request(request()?).await?,
        other => other?,
    };
    rec.status = resp.status().as_u16();
    let mut body = resp.into_body();
    if !(200..300).contains(&rec.status) {
        let bytes = body.collect().await?.to_bytes();
        bail!(
            "HTTP {}: {}",
            rec.status,
            String::from_utf8_lossy(&bytes[..bytes.len().min(ERROR_TEXT_MAX)])
        );
    }
    if !call.stream {
        let bytes = body.collect().await?.to_bytes();
        let e2e = ms(sent.elapsed());
        rec.e2e_ms = e2e;
        rec.ttft_ms = Some(e2e);
        if is_error_payload(&bytes) {
            bail!(
                "{}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(ERROR_TEXT_MAX)])
            );
        }
        if let Some(u) = call.scanner.usage(&bytes) {
            rec.usage_reported = true;
            rec.prompt_tokens = u.prompt_tokens;
            rec.output_tokens = u.completion_tokens;
            rec.tpot_ms = tpot(e2e, e2e, u.completion_tokens);
        }
        return Ok(());
    }

    let mut parser = SseParser::new();
    let mut first: Option<Instant> = None;
    let mut last = sent;
    let mut content_chunks = 0u64;
    let mut usage_payload: Option<Bytes> = None;
    let mut done = false;
    rec.itl_ms.reserve(call.expected_chunks);
    let mut on_event = |ev: crate::sse::SseEvent, now: Instant| -> Result<()> {
        if ev.is_done() {
            done = true;
        } else if ev.is_error() {
            bail!(
                "error event: {}",
                String::from_utf8_lossy(&ev.data[..ev.data.len().min(ERROR_TEXT_MAX)])
            );
        } else {
            if call.scanner.has_content(&ev.data) {
                content_chunks += 1;
                if first.is_none() {
                    first = Some(now);
                } else {
                    rec.itl_ms.push(ms(now.duration_since(last)));
                }
                last = now;
            }
            if call.scanner.has_usage(&ev.data) {
                usage_payload = Some(ev.data);
            }
        }
        Ok(())
    };
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        // All events in one read share its arrival time: that is when the client saw them.
        let now = Instant::now();
        if let Ok(data) = frame.into_data() {
            parser.push(&data);
            while let Some(ev) = parser.next_event() {
                on_event(ev, now)?;
            }
        }
    }
    if let Some(ev) = parser.finish() {
        on_event(ev, Instant::now())?;
    }
    let e2e = ms(sent.elapsed());
    rec.e2e_ms = e2e;
    let ttft = first.map(|f| ms(f.duration_since(sent)));
    rec.ttft_ms = ttft;
    match usage_payload.as_deref().and_then(|p| call.scanner.usage(p)) {
        Some(u) => {
            rec.usage_reported = true;
            rec.prompt_tokens = u.prompt_tokens;
            rec.output_tokens = u.completion_tokens;
        }
        None => rec.output_tokens = content_chunks,
    }
    rec.tpot_ms = ttft.and_then(|t| tpot(e2e, t, rec.output_tokens));
    if !done {
        bail!("stream ended without data: [DONE]");
    }
    Ok(())
}

fn closed_before_response(e: &hyper_util::client::legacy::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<hyper::Error>())
        .is_some_and(hyper::Error::is_incomplete_message)
}

fn tpot(e2e: f64, ttft: f64, output_tokens: u64) -> Option<f64> {
    (output_tokens > 1).then(|| (e2e - ttft) / (output_tokens - 1) as f64)
}

/// A non-streaming body that is an error envelope despite a 2xx status.
fn is_error_payload(body: &[u8]) -> bool {
    body.trim_ascii_start()
        .strip_prefix(b"{")
        .is_some_and(|r| r.trim_ascii_start().starts_with(b"\"error\""))
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn truncate(mut s: String) -> String {
    if s.len() > ERROR_TEXT_MAX {
        let mut cut = ERROR_TEXT_MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_found_without_parsing_the_document() {
        let sc = Scanner::default();
        let body = br#"{"id":"x","choices":[{"message":{"content":"the \"usage\" word"}}],"usage":{"prompt_tokens":48,"completion_tokens":16,"total_tokens":64}}"#;
        assert_eq!(
            sc.usage(body),
            Some(Usage {
                prompt_tokens: 48,
                completion_tokens: 16
            })
        );
        assert_eq!(sc.usage(br#"{"choices":[],"usage": null}"#), None);
        assert!(!sc.has_usage(br#"{"choices":[{"delta":{"content":"x"}}],"usage":null}"#));
        assert!(sc.has_usage(br#"{"choices":[],"usage":{"prompt_tokens":1}}"#));
        assert!(!sc.has_usage(br#"{"choices":[{"text":"usage"}]}"#));
        assert_eq!(sc.usage(br#"{"choices":[{"text":"usage"}]}"#), None);
        // A string value "usage" after the real key must not hide it.
        let tricky = br#"{"usage" : {"prompt_tokens":1,"completion_tokens":2},"x":"usage"}"#;
        assert_eq!(sc.usage(tricky).map(|u| u.completion_tokens), Some(2));
    }

    #[test]
    fn content_chunks_are_told_from_role_finish_and_usage_chunks() {
        let sc = Scanner::default();
        assert!(sc.has_content(br#"{"choices":[{"delta":{"content":"Hi"}}]}"#));
        assert!(sc.has_content(br#"{"choices":[{"text": " there"}]}"#));
        assert!(!sc.has_content(br#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#));
        assert!(!sc.has_content(br#"{"choices":[{"delta":{},"finish_reason":"length"}]}"#));
        assert!(!sc.has_content(br#"{"choices":[],"usage":{"completion_tokens":3}}"#));
        assert!(!sc.has_content(br#"{"choices":[{"delta":{"content":null}}]}"#));
        assert!(!sc.has_content(br#"{"choices":[{"delta":{"reasoning_content":"hmm"}}]}"#));
    }

    #[test]
    fn only_loopback_targets() {
        for ok in [
            "http://127.0.0.1:8000",
            "http://localhost:1",
            "http://[::1]:80/",
            "http://127.1.2.3:9",
        ] {
            assert!(Target::new(ok, None).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1:80",
            "http://example.com",
            "https://127.0.0.1:1",
            "nonsense url",
        ] {
            assert!(Target::new(bad, None).is_err(), "{bad}");
        }
        let t = Target::new("http://127.0.0.1:8000/", Some("k")).unwrap();
        assert_eq!(
            t.uri("/v1/models").unwrap().to_string(),
            "http://127.0.0.1:8000/v1/models"
        );
        assert_eq!(t.auth().unwrap(), "Bearer k");
    }

    #[test]
    fn tpot_needs_two_tokens() {
        assert_eq!(tpot(100.0, 10.0, 1), None);
        assert_eq!(tpot(100.0, 10.0, 10), Some(10.0));
    }
}
