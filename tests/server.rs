//! The HTTP daemon end to end: the real `distillery serve` binary on a loopback port, driven
//! with reqwest as an OpenAI client would drive it. Greedy outputs are checked against the
//! transformers goldens; errors against OpenAI's envelope; admission, cancellation on
//! disconnect and the SIGTERM drain against their documented behaviour.
//!
//! Each test function starts its own daemon (model load is well under a second) so that the
//! flags under test stay local to it. Where `../shared/models` is absent every test prints a
//! loud SKIPPING line and passes.

mod common;

use std::collections::HashSet;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use reqwest::header::{HeaderMap, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;
use serde_json::{json, Value};

use common::daemon::{distillery_command, DaemonProcess};
use common::{golden, models_dir, Golden, GoldenCase};

const MODEL: &str = "tiny-random-qwen2";
/// The model's `max_position_embeddings`, the daemon's default context limit.
const MAX_MODEL_LEN: u64 = 2048;
/// Golden continuations are this long.
const GOLDEN_TOKENS: u64 = 32;
/// Upper bound on any single HTTP exchange, so a hung daemon fails a test instead of hanging it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Harness: the daemon as a child process.
// ---------------------------------------------------------------------------------------------

/// A running `distillery serve`; killed (and reaped) on drop. When the test is failing, the
/// last lines of its log are printed.
struct Daemon {
    process: DaemonProcess,
}

impl Daemon {
    /// Starts the daemon on the test model with `extra` flags and waits for its
    /// `distillery listening on ...` line; `None` (after a loud SKIPPING line) without models.
    fn start(extra: &[&str]) -> Option<Daemon> {
        let dir = models_dir()?.join(MODEL);
        let mut cmd = distillery_command();
        cmd.arg("serve")
            .args(["--host", "127.0.0.1", "--port", "0", "--model"])
            .arg(&dir)
            // The default 1 GiB cache is far more than these tests need.
            .args(["--kv-cache-memory", "32MiB"])
            .args(extra);
        let process =
            DaemonProcess::spawn(cmd, &format!("the daemon (flags {extra:?})"), 300, |_| {});
        assert!(
            process.base.starts_with("http://127.0.0.1:"),
            "listening line names {:?}, expected http://127.0.0.1:PORT",
            process.base
        );
        Some(Daemon { process })
    }

    fn url(&self, path: &str) -> String {
        self.process.url(path)
    }

    /// Waits for the process to exit on its own, polling with a deadline.
    async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self
                .process
                .child
                .try_wait()
                .expect("try_wait on the daemon")
            {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- daemon {} log (last lines) -----\n{}\n----- end of daemon log -----",
                self.process.base,
                self.process.tail()
            );
        }
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("reqwest client")
}

/// POSTs `body` as JSON and returns status, headers and the parsed JSON answer.
async fn post(c: &reqwest::Client, url: &str, body: &Value) -> (StatusCode, HeaderMap, Value) {
    let r = c
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    read_json(r).await
}

async fn get(c: &reqwest::Client, url: &str) -> (StatusCode, HeaderMap, String) {
    let r = c
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = r.status();
    let headers = r.headers().clone();
    let text = r.text().await.expect("response body");
    (status, headers, text)
}

async fn read_json(r: reqwest::Response) -> (StatusCode, HeaderMap, Value) {
    let status = r.status();
    let headers = r.headers().clone();
    let text = r.text().await.expect("response body");
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {text:?}"));
    (status, headers, v)
}

/// Checks OpenAI's error envelope: exactly `{"error": {"message", "type", "param", "code"}}`,
/// a non-empty message, `code` a string (or null where none is expected).
fn assert_openai_error(
    what: &str,
    (status, headers, body): (StatusCode, &HeaderMap, &Value),
    want_status: u16,
    want_type: &str,
    want_code: Option<&str>,
    want_param: Option<&str>,
) {
    assert_eq!(status.as_u16(), want_status, "{what}: status; body {body}");
    let ct = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        ct.starts_with("application/json"),
        "{what}: content-type {ct:?}"
    );
    let top = body.as_object().unwrap_or_else(|| panic!("{what}: {body}"));
    assert_eq!(
        top.keys().collect::<Vec<_>>(),
        ["error"],
        "{what}: envelope {body}"
    );
    let e = body["error"]
        .as_object()
        .unwrap_or_else(|| panic!("{what}: {body}"));
    let mut keys: Vec<&str> = e.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["code", "message", "param", "type"],
        "{what}: error fields {body}"
    );
    let message = e["message"].as_str().unwrap_or("");
    assert!(!message.is_empty(), "{what}: empty message in {body}");
    assert_eq!(e["type"], want_type, "{what}: type in {body}");
    match want_code {
        Some(code) => assert_eq!(e["code"], code, "{what}: code in {body}"),
        None => assert!(
            e["code"].is_null() || e["code"].is_string(),
            "{what}: code must be a string or null in {body}"
        ),
    }
    match want_param {
        Some(param) => assert_eq!(e["param"], param, "{what}: param in {body}"),
        None => assert!(
            e["param"].is_null() || e["param"].is_string(),
            "{what}: param must be a string or null in {body}"
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Server-sent events.
// ---------------------------------------------------------------------------------------------

enum SseEvent {
    Data(Value),
    Done,
}

/// Reads `data: ...\n\n` frames incrementally; checks the framing as it goes.
struct SseReader {
    body: BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: Vec<u8>,
    done: bool,
}

impl SseReader {
    fn new(what: &str, r: reqwest::Response) -> Self {
        assert_eq!(r.status(), StatusCode::OK, "{what}: streaming status");
        let ct = r
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        assert!(
            ct.starts_with("text/event-stream"),
            "{what}: content-type {ct:?}"
        );
        Self {
            body: r.bytes_stream().boxed(),
            buf: Vec::new(),
            done: false,
        }
    }

    /// The next frame, or `None` when the body ends.
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = self.buf.drain(..pos + 2).collect();
                let text = std::str::from_utf8(&frame[..pos]).expect("SSE frame is UTF-8");
                let data = text
                    .strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("SSE frame without `data: `: {text:?}"));
                assert!(!self.done, "an SSE frame after [DONE]: {data}");
                if data == "[DONE]" {
                    self.done = true;
                    return Some(SseEvent::Done);
                }
                let v = serde_json::from_str(data)
                    .unwrap_or_else(|e| panic!("SSE data is not JSON ({e}): {data:?}"));
                return Some(SseEvent::Data(v));
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(e)) => panic!("the event stream broke: {e}"),
                None => {
                    assert!(
                        self.buf.is_empty(),
                        "the stream ended inside a frame: {:?}",
                        String::from_utf8_lossy(&self.buf)
                    );
                    return None;
                }
            }
        }
    }

    /// The next data event; panics on `[DONE]` or the end of the body.
    async fn next_data(&mut self) -> Value {
        match self.next().await {
            Some(SseEvent::Data(v)) => v,
            Some(SseEvent::Done) => panic!("[DONE] where a data event was expected"),
            None => panic!("the stream ended where a data event was expected"),
        }
    }

    /// Every remaining data event; the stream must end with `data: [DONE]` and nothing after.
    async fn rest(mut self) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            match self.next().await {
                Some(SseEvent::Data(v)) => {
                    assert!(
                        v.get("error").is_none(),
                        "an error event inside the stream: {v}"
                    );
                    out.push(v)
                }
                Some(SseEvent::Done) => break,
                None => panic!("the stream ended without data: [DONE]"),
            }
        }
        assert!(self.next().await.is_none(), "bytes after data: [DONE]");
        out
    }
}

async fn stream(c: &reqwest::Client, what: &str, url: &str, body: &Value) -> Vec<Value> {
    let r = c
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{what}: POST {url}: {e}"));
    SseReader::new(what, r).rest().await
}

// ---------------------------------------------------------------------------------------------
// Response checks.
// ---------------------------------------------------------------------------------------------

fn usage_of(what: &str, u: &Value) -> (u64, u64) {
    let p = u["prompt_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("{what}: usage {u}"));
    let c = u["completion_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("{what}: usage {u}"));
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(p + c),
        "{what}: total_tokens in {u}"
    );
    (p, c)
}

/// A one-choice `/v1/completions` answer: its text, finish reason and usage.
fn check_completion(
    what: &str,
    v: &Value,
    text: &str,
    finish: &str,
    prompt_tokens: u64,
    completion_tokens: u64,
) {
    assert_eq!(v["object"], "text_completion", "{what}: {v}");
    assert_eq!(v["model"], MODEL, "{what}: model in {v}");
    assert!(
        v["id"].as_str().is_some_and(|id| id.starts_with("cmpl-")),
        "{what}: id in {v}"
    );
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 1, "{what}: one choice in {v}");
    assert_eq!(choices[0]["index"], 0, "{what}");
    assert_eq!(choices[0]["text"], text, "{what}: text");
    assert_eq!(choices[0]["finish_reason"], finish, "{what}: finish_reason");
    assert_eq!(
        usage_of(what, &v["usage"]),
        (prompt_tokens, completion_tokens),
        "{what}: usage (prompt_tokens, completion_tokens)"
    );
}

/// A one-choice chat answer's content, after checking its shape.
fn chat_content(what: &str, v: &Value) -> String {
    assert_eq!(v["object"], "chat.completion", "{what}: {v}");
    assert_eq!(v["model"], MODEL, "{what}: model in {v}");
    assert!(
        v["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("chatcmpl-")),
        "{what}: id in {v}"
    );
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 1, "{what}: one choice in {v}");
    assert_eq!(choices[0]["index"], 0, "{what}");
    assert_eq!(choices[0]["message"]["role"], "assistant", "{what}");
    choices[0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: content in {v}"))
        .to_string()
}

/// The golden text as `skip_special_tokens=true` shows it: the DeepSeek placeholder tokens
/// (`<｜place▁holder▁no▁N｜>`, special in this tokenizer) removed.
fn without_placeholders(text: &str) -> String {
    const OPEN: &str = "<｜place▁holder▁no▁";
    const CLOSE: &str = "｜>";
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        out.push_str(&rest[..start]);
        let after = &rest[start + OPEN.len()..];
        let end = after.find(CLOSE).expect("placeholder closes");
        rest = &after[end + CLOSE.len()..];
    }
    out.push_str(rest);
    out
}

fn case<'a>(g: &'a Golden, name: &str) -> &'a GoldenCase {
    g.cases
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("golden case {name} missing"))
}

fn plain_cases(g: &Golden) -> impl Iterator<Item = &GoldenCase> {
    g.cases.iter().filter(|c| !c.chat_rendered)
}

fn chat_cases(g: &Golden) -> impl Iterator<Item = &GoldenCase> {
    g.cases.iter().filter(|c| c.chat_rendered)
}

/// Greedy, exactly 32 tokens, special tokens shown: what the goldens are.
fn golden_sampling() -> Value {
    json!({
        "temperature": 0,
        "max_tokens": GOLDEN_TOKENS,
        "ignore_eos": true,
        "skip_special_tokens": false,
    })
}

fn merged(base: Value, extra: Value) -> Value {
    let mut base = base;
    let obj = base.as_object_mut().expect("object");
    for (k, v) in extra.as_object().expect("object") {
        obj.insert(k.clone(), v.clone());
    }
    base
}

// ---------------------------------------------------------------------------------------------
// Goldens through both endpoints.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn completions_and_chat_reproduce_the_goldens() {
    let Some(g) = golden(MODEL) else { return };
    let Some(d) = Daemon::start(&[]) else { return };
    let c = client();
    let completions = d.url("/v1/completions");
    let chat = d.url("/v1/chat/completions");

    // Token-id prompts, every case (a chat case's ids are its rendered template).
    for case in &g.cases {
        let what = format!("completions, {} as token ids", case.name);
        let body = merged(
            golden_sampling(),
            json!({"model": MODEL, "prompt": case.prompt_ids}),
        );
        let (status, _, v) = post(&c, &completions, &body).await;
        assert_eq!(status, StatusCode::OK, "{what}: {v}");
        check_completion(
            &what,
            &v,
            &case.generated_text,
            "length",
            case.prompt_ids.len() as u64,
            GOLDEN_TOKENS,
        );
    }

    // Text prompts: plain text is encoded with add_special_tokens=true, like the goldens.
    let mut with_placeholders = 0;
    for case in plain_cases(&g) {
        let what = format!("completions, {} as text", case.name);
        let body = merged(golden_sampling(), json!({"prompt": case.prompt}));
        let (status, _, v) = post(&c, &completions, &body).await;
        assert_eq!(status, StatusCode::OK, "{what}: {v}");
        check_completion(
            &what,
            &v,
            &case.generated_text,
            "length",
            case.prompt_ids.len() as u64,
            GOLDEN_TOKENS,
        );

        // The default skip_special_tokens=true hides the special placeholder tokens.
        let what = format!("completions, {} with special tokens skipped", case.name);
        let expected = without_placeholders(&case.generated_text);
        with_placeholders += usize::from(expected != case.generated_text);
        let body = json!({"prompt": case.prompt, "temperature": 0, "max_tokens": GOLDEN_TOKENS,
                          "ignore_eos": true});
        let (status, _, v) = post(&c, &completions, &body).await;
        assert_eq!(status, StatusCode::OK, "{what}: {v}");
        check_completion(
            &what,
            &v,
            &expected,
            "length",
            case.prompt_ids.len() as u64,
            GOLDEN_TOKENS,
        );
    }
    assert!(
        with_placeholders > 0,
        "no plain golden case generates a special token; the skip check proves nothing"
    );

    // Chat: the server renders the template; the reply is the generated ids decoded alone.
    let mut chats = 0;
    for case in chat_cases(&g) {
        chats += 1;
        let what = format!("chat, {}", case.name);
        let messages = case.messages.clone().expect("chat case has messages");
        let body = merged(
            golden_sampling(),
            json!({"model": MODEL, "messages": messages}),
        );
        let (status, _, v) = post(&c, &chat, &body).await;
        assert_eq!(status, StatusCode::OK, "{what}: {v}");
        let content = chat_content(&what, &v);
        assert_eq!(
            content,
            case.generated_text,
            "{what}: content{}",
            if content.trim_start() == case.generated_text.trim_start() {
                " (differs only by leading whitespace)"
            } else {
                ""
            }
        );
        assert_eq!(v["choices"][0]["finish_reason"], "length", "{what}");
        assert_eq!(
            usage_of(&what, &v["usage"]),
            (case.prompt_ids.len() as u64, GOLDEN_TOKENS),
            "{what}: usage"
        );
    }
    assert!(chats >= 2, "expected chat cases in golden.json");
}

#[tokio::test(flavor = "multi_thread")]
async fn streaming_matches_non_streaming() {
    let Some(g) = golden(MODEL) else { return };
    let Some(d) = Daemon::start(&[]) else { return };
    let c = client();
    let plain = case(&g, "plain_en");
    let chatty = case(&g, "chat_single_turn");

    for include_usage in [false, true] {
        // Completions.
        let what = format!("completions stream, include_usage={include_usage}");
        let mut body = merged(
            golden_sampling(),
            json!({"prompt": plain.prompt_ids, "stream": true}),
        );
        if include_usage {
            body["stream_options"] = json!({"include_usage": true});
        }
        let events = stream(&c, &what, &d.url("/v1/completions"), &body).await;
        assert!(events.len() >= 2, "{what}: {} events", events.len());
        let id = events[0]["id"].clone();
        let (mut text, mut finishes, mut usages) = (String::new(), Vec::new(), Vec::new());
        for (i, ev) in events.iter().enumerate() {
            assert_eq!(ev["object"], "text_completion", "{what}: event {i}: {ev}");
            assert_eq!(ev["id"], id, "{what}: one id for the whole stream");
            assert_eq!(ev["model"], MODEL, "{what}: event {i}");
            check_usage_slot(&what, i, ev, include_usage, &mut usages);
            for ch in ev["choices"].as_array().expect("choices") {
                assert_eq!(ch["index"], 0, "{what}: event {i}");
                text.push_str(ch["text"].as_str().expect("text"));
                if !ch["finish_reason"].is_null() {
                    finishes.push(ch["finish_reason"].clone());
                }
            }
        }
        assert_eq!(text, plain.generated_text, "{what}: concatenated text");
        assert_eq!(finishes, [json!("length")], "{what}: finish reasons");
        check_final_usage(
            &what,
            &events,
            include_usage,
            &usages,
            plain.prompt_ids.len(),
        );

        // Chat.
        let what = format!("chat stream, include_usage={include_usage}");
        let mut body = merged(
            golden_sampling(),
            json!({"messages": chatty.messages, "stream": true}),
        );
        if include_usage {
            body["stream_options"] = json!({"include_usage": true});
        }
        let events = stream(&c, &what, &d.url("/v1/chat/completions"), &body).await;
        assert!(events.len() >= 2, "{what}: {} events", events.len());
        let first = &events[0]["choices"][0];
        assert_eq!(first["index"], 0, "{what}: first chunk {}", events[0]);
        assert_eq!(
            first["delta"]["role"], "assistant",
            "{what}: the first chunk names the role: {}",
            events[0]
        );
        let id = events[0]["id"].clone();
        let (mut text, mut finishes, mut usages) = (String::new(), Vec::new(), Vec::new());
        for (i, ev) in events.iter().enumerate() {
            assert_eq!(
                ev["object"], "chat.completion.chunk",
                "{what}: event {i}: {ev}"
            );
            assert_eq!(ev["id"], id, "{what}: one id for the whole stream");
            assert_eq!(ev["model"], MODEL, "{what}: event {i}");
            check_usage_slot(&what, i, ev, include_usage, &mut usages);
            for ch in ev["choices"].as_array().expect("choices") {
                assert_eq!(ch["index"], 0, "{what}: event {i}");
                if i > 0 {
                    assert!(
                        ch["delta"].get("role").is_none(),
                        "{what}: role repeated in event {i}: {ev}"
                    );
                }
                if let Some(t) = ch["delta"].get("content") {
                    text.push_str(t.as_str().expect("content is a string"));
                }
                if !ch["finish_reason"].is_null() {
                    finishes.push(ch["finish_reason"].clone());
                }
            }
        }
        assert_eq!(text, chatty.generated_text, "{what}: concatenated deltas");
        assert_eq!(finishes, [json!("length")], "{what}: finish reasons");
        check_final_usage(
            &what,
            &events,
            include_usage,
            &usages,
            chatty.prompt_ids.len(),
        );
    }
}

/// Without include_usage no chunk has a `usage` key; with it every chunk has one, collected.
fn check_usage_slot(what: &str, i: usize, ev: &Value, include: bool, usages: &mut Vec<usize>) {
    match ev.get("usage") {
        None => assert!(!include, "{what}: event {i} lacks \"usage\": {ev}"),
        Some(u) => {
            assert!(include, "{what}: event {i} has \"usage\" unasked: {ev}");
            if !u.is_null() {
                usages.push(i);
            }
        }
    }
}

/// With include_usage exactly one chunk carries usage: the last, with `choices: []`.
fn check_final_usage(
    what: &str,
    events: &[Value],
    include: bool,
    usages: &[usize],
    prompt_len: usize,
) {
    if !include {
        assert!(usages.is_empty(), "{what}");
        return;
    }
    let last = events.len() - 1;
    assert_eq!(usages, [last], "{what}: only the last chunk carries usage");
    let ev = &events[last];
    assert_eq!(
        ev["choices"],
        json!([]),
        "{what}: the usage chunk has no choices: {ev}"
    );
    assert_eq!(
        usage_of(what, &ev["usage"]),
        (prompt_len as u64, GOLDEN_TOKENS),
        "{what}: streamed usage"
    );
}

// ---------------------------------------------------------------------------------------------
// n, stop strings, logprobs, seeds.
// ---------------------------------------------------------------------------------------------

/// A stop string from the middle of `text`: `len` characters starting near the middle, none
/// of them a replacement character or part of a special-token spelling. Returns it with the
/// text that must come back (everything before its first occurrence).
fn stop_from_middle(text: &str, len: usize) -> (String, String) {
    let chars: Vec<char> = text.chars().collect();
    for start in chars.len() / 2..chars.len() - len {
        let window: String = chars[start..start + len].iter().collect();
        if window
            .chars()
            .all(|ch| ch != '\u{fffd}' && ch != '<' && ch != '>' && ch != '｜' && ch != '▁')
        {
            let cut = text.find(&window).expect("window occurs");
            assert!(cut > 0, "the stop string must not be at the very start");
            return (window, text[..cut].to_string());
        }
    }
    panic!("no usable stop string in {text:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn n_stop_logprobs_and_seeds() {
    let Some(g) = golden(MODEL) else { return };
    let Some(d) = Daemon::start(&[]) else { return };
    let c = client();
    let completions = d.url("/v1/completions");
    let chat = d.url("/v1/chat/completions");
    let plain = case(&g, "short");
    let chatty = case(&g, "chat_multi_turn");

    // n=2: two greedy choices, both the golden.
    let body = merged(golden_sampling(), json!({"prompt": plain.prompt, "n": 2}));
    let (status, _, v) = post(&c, &completions, &body).await;
    assert_eq!(status, StatusCode::OK, "completions n=2: {v}");
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 2, "completions n=2: {v}");
    for (i, ch) in choices.iter().enumerate() {
        assert_eq!(ch["index"], i, "completions n=2: choice order");
        assert_eq!(
            ch["text"], plain.generated_text,
            "completions n=2: choice {i}"
        );
        assert_eq!(ch["finish_reason"], "length", "completions n=2: choice {i}");
    }
    let (_, completion_tokens) = usage_of("completions n=2", &v["usage"]);
    assert_eq!(
        completion_tokens,
        2 * GOLDEN_TOKENS,
        "completions n=2: usage"
    );

    let body = merged(
        golden_sampling(),
        json!({"messages": chatty.messages, "n": 2}),
    );
    let (status, _, v) = post(&c, &chat, &body).await;
    assert_eq!(status, StatusCode::OK, "chat n=2: {v}");
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 2, "chat n=2: {v}");
    for (i, ch) in choices.iter().enumerate() {
        assert_eq!(ch["index"], i, "chat n=2: choice order");
        assert_eq!(
            ch["message"]["content"], chatty.generated_text,
            "chat n=2: choice {i}"
        );
        assert_eq!(ch["finish_reason"], "length", "chat n=2: choice {i}");
    }
    let (_, completion_tokens) = usage_of("chat n=2", &v["usage"]);
    assert_eq!(completion_tokens, 2 * GOLDEN_TOKENS, "chat n=2: usage");

    // Stop strings: the text ends right before the stop string, which is not included.
    let (stop, before) = stop_from_middle(&plain.generated_text, 3);
    let what = format!("completions stop {stop:?}");
    let body = merged(
        golden_sampling(),
        json!({"prompt": plain.prompt, "stop": [stop]}),
    );
    let (status, _, v) = post(&c, &completions, &body).await;
    assert_eq!(status, StatusCode::OK, "{what}: {v}");
    assert_eq!(v["choices"][0]["text"], before, "{what}: text");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{what}");
    let (_, used) = usage_of(&what, &v["usage"]);
    assert!(
        (1..GOLDEN_TOKENS).contains(&used),
        "{what}: completion_tokens {used}"
    );

    let what = format!("completions stream stop {stop:?}");
    let body = merged(
        golden_sampling(),
        json!({"prompt": plain.prompt, "stop": stop, "stream": true}),
    );
    let events = stream(&c, &what, &completions, &body).await;
    let text: String = events
        .iter()
        .flat_map(|e| e["choices"].as_array().cloned().unwrap_or_default())
        .map(|ch| ch["text"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(text, before, "{what}: streamed text");
    let finishes: Vec<Value> = events
        .iter()
        .flat_map(|e| e["choices"].as_array().cloned().unwrap_or_default())
        .map(|ch| ch["finish_reason"].clone())
        .filter(|r| !r.is_null())
        .collect();
    assert_eq!(finishes, [json!("stop")], "{what}: finish reasons");

    let (stop, before) = stop_from_middle(&chatty.generated_text, 2);
    let what = format!("chat stop {stop:?}");
    let body = merged(
        golden_sampling(),
        json!({"messages": chatty.messages, "stop": stop}),
    );
    let (status, _, v) = post(&c, &chat, &body).await;
    assert_eq!(status, StatusCode::OK, "{what}: {v}");
    assert_eq!(chat_content(&what, &v), before, "{what}: content");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{what}");

    // Completions logprobs: parallel lists, one entry per completion token, <= 3 alternatives.
    let what = "completions logprobs=3";
    let body = merged(
        golden_sampling(),
        json!({"prompt": plain.prompt, "logprobs": 3}),
    );
    let (status, _, v) = post(&c, &completions, &body).await;
    assert_eq!(status, StatusCode::OK, "{what}: {v}");
    check_completion(
        what,
        &v,
        &plain.generated_text,
        "length",
        plain.prompt_ids.len() as u64,
        GOLDEN_TOKENS,
    );
    let lp = &v["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().expect("logprobs.tokens");
    let token_logprobs = lp["token_logprobs"]
        .as_array()
        .expect("logprobs.token_logprobs");
    let tops = lp["top_logprobs"]
        .as_array()
        .expect("logprobs.top_logprobs");
    let offsets = lp["text_offset"].as_array().expect("logprobs.text_offset");
    for (name, len) in [
        ("tokens", tokens.len()),
        ("token_logprobs", token_logprobs.len()),
        ("top_logprobs", tops.len()),
        ("text_offset", offsets.len()),
    ] {
        assert_eq!(len as u64, GOLDEN_TOKENS, "{what}: length of {name}");
    }
    for (i, (l, top)) in token_logprobs.iter().zip(tops).enumerate() {
        let l = l
            .as_f64()
            .unwrap_or_else(|| panic!("{what}: token_logprobs[{i}]"));
        assert!(
            l.is_finite() && l <= 0.0,
            "{what}: token_logprobs[{i}] = {l}"
        );
        let top = top.as_object().expect("top_logprobs entry is an object");
        assert!(
            (1..=3).contains(&top.len()),
            "{what}: top_logprobs[{i}] has {} entries",
            top.len()
        );
        for (t, tl) in top {
            let tl = tl.as_f64().expect("top logprob is a number");
            assert!(tl.is_finite() && tl <= 0.0, "{what}: top {t:?} = {tl}");
            // Greedy: the chosen token is the most likely one.
            assert!(
                tl <= l + 1e-4,
                "{what}: step {i}: {t:?} ({tl}) beats the chosen ({l})"
            );
        }
    }
    let offsets: Vec<u64> = offsets
        .iter()
        .map(|o| o.as_u64().expect("offset"))
        .collect();
    assert!(
        offsets.windows(2).all(|w| w[0] <= w[1]),
        "{what}: text_offset not monotonic: {offsets:?}"
    );

    // Chat logprobs: one entry per token, two alternatives each.
    let what = "chat logprobs top_logprobs=2";
    let body = merged(
        golden_sampling(),
        json!({"messages": chatty.messages, "logprobs": true, "top_logprobs": 2}),
    );
    let (status, _, v) = post(&c, &chat, &body).await;
    assert_eq!(status, StatusCode::OK, "{what}: {v}");
    assert_eq!(chat_content(what, &v), chatty.generated_text, "{what}");
    let content = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: logprobs.content in {v}"));
    assert_eq!(content.len() as u64, GOLDEN_TOKENS, "{what}: entries");
    for (i, e) in content.iter().enumerate() {
        let l = e["logprob"].as_f64().expect("logprob");
        assert!(l.is_finite() && l <= 0.0, "{what}: [{i}].logprob = {l}");
        let token = e["token"].as_str().expect("token");
        let bytes: Vec<u8> = e["bytes"]
            .as_array()
            .expect("bytes")
            .iter()
            .map(|b| b.as_u64().expect("byte") as u8)
            .collect();
        assert_eq!(bytes, token.as_bytes(), "{what}: [{i}].bytes");
        let top = e["top_logprobs"].as_array().expect("top_logprobs");
        assert_eq!(top.len(), 2, "{what}: [{i}].top_logprobs: {e}");
        for t in top {
            let tl = t["logprob"].as_f64().expect("logprob");
            assert!(
                tl.is_finite() && tl <= l + 1e-4,
                "{what}: [{i}]: {t} vs {l}"
            );
        }
    }

    // Seeds: the same seed gives the same sample; another seed (almost surely) another.
    let sampled = |seed: u64| {
        json!({"prompt": plain.prompt, "temperature": 1.0, "seed": seed, "max_tokens": 16,
               "ignore_eos": true, "skip_special_tokens": false})
    };
    let mut texts = Vec::new();
    for seed in [42, 42, 43] {
        let (status, _, v) = post(&c, &completions, &sampled(seed)).await;
        assert_eq!(status, StatusCode::OK, "seed {seed}: {v}");
        assert_eq!(usage_of("seeded", &v["usage"]).1, 16, "seed {seed}");
        texts.push(v["choices"][0]["text"].as_str().expect("text").to_string());
    }
    assert_eq!(texts[0], texts[1], "seed 42 twice must give the same text");
    assert_ne!(
        texts[0], texts[2],
        "seeds 42 and 43 gave the same 16 sampled tokens"
    );
}

/// OpenAI and vLLM report the prompt once per request, however many choices share it.
#[tokio::test(flavor = "multi_thread")]

async fn usage_counts_the_prompt_once_for_n_choices() {
    let Some(g) = golden(MODEL) else { return };
    let Some(d) = Daemon::start(&[]) else { return };
    let c = client();
    let plain = case(&g, "plain_en");
    let body = merged(golden_sampling(), json!({"prompt": plain.prompt, "n": 2}));
    let (status, _, v) = post(&c, &d.url("/v1/completions"), &body).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        usage_of("completions n=2", &v["usage"]),
        (plain.prompt_ids.len() as u64, 2 * GOLDEN_TOKENS),
        "completions n=2: usage (prompt_tokens, completion_tokens)"
    );
    let chatty = case(&g, "chat_single_turn");
    let body = merged(
        golden_sampling(),
        json!({"messages": chatty.messages, "n": 2}),
    );
    let (status, _, v) = post(&c, &d.url("/v1/chat/completions"), &body).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        usage_of("chat n=2", &v["usage"]),
        (chatty.prompt_ids.len() as u64, 2 * GOLDEN_TOKENS),
        "chat n=2: usage (prompt_tokens, completion_tokens)"
    );
}

// ---------------------------------------------------------------------------------------------
// Info and tokenizer endpoints.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn info_and_tokenizer_endpoints() {
    let Some(g) = golden(MODEL) else { return };
    let Some(d) = Daemon::start(&[]) else { return };
    let c = client();

    let (status, _, text) = get(&c, &d.url("/v1/models")).await;
    assert_eq!(status, StatusCode::OK, "/v1/models: {text}");
    let v: Value = serde_json::from_str(&text).expect("/v1/models is JSON");
    assert_eq!(v["object"], "list", "{v}");
    let data = v["data"].as_array().expect("data");
    assert_eq!(data.len(), 1, "{v}");
    assert_eq!(data[0]["id"], MODEL, "{v}");
    assert_eq!(data[0]["object"], "model", "{v}");
    assert_eq!(data[0]["max_model_len"], MAX_MODEL_LEN, "{v}");

    let (status, _, _) = get(&c, &d.url("/health")).await;
    assert_eq!(status, StatusCode::OK, "/health");
    let (status, _, text) = get(&c, &d.url("/ready")).await;
    assert_eq!(status, StatusCode::OK, "/ready: {text}");
    let (status, _, text) = get(&c, &d.url("/version")).await;
    assert_eq!(status, StatusCode::OK, "/version: {text}");
    let v: Value = serde_json::from_str(&text).expect("/version is JSON");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"), "{v}");

    let (status, headers, text) = get(&c, &d.url("/openapi.json")).await;
    assert_eq!(status, StatusCode::OK, "/openapi.json");
    assert_eq!(
        headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let v: Value = serde_json::from_str(&text).expect("/openapi.json parses as JSON");
    assert!(v["openapi"].is_string(), "openapi version field");
    for path in [
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/v1/models/{id}",
        "/tokenizer_info",
        "/server_info",
        "/get_server_info",
        "/model_info",
        "/get_model_info",
        "/get_load",
        "/load",
        "/kv_event_sources",
        "/health_generate",
        "/flush_cache",
        "/reset_prefix_cache",
        "/v1/chat/completions/render",
        "/v1/completions/render",
    ] {
        assert!(v["paths"].get(path).is_some(), "/openapi.json lacks {path}");
    }

    // /tokenize and /detokenize against the goldens.
    for case in plain_cases(&g) {
        let what = format!("/tokenize {}", case.name);
        let (status, _, v) = post(&c, &d.url("/tokenize"), &json!({"prompt": case.prompt})).await;
        assert_eq!(status, StatusCode::OK, "{what}: {v}");
        assert_eq!(v["tokens"], json!(case.prompt_ids), "{what}: tokens");
        assert_eq!(v["count"], case.prompt_ids.len(), "{what}: count");
        assert_eq!(v["max_model_len"], MAX_MODEL_LEN, "{what}");

        let what = format!("/detokenize {}", case.name);
        let (status, _, v) = post(
            &c,
            &d.url("/detokenize"),
            &json!({"tokens": case.prompt_ids}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{what}: {v}");
        assert_eq!(v["prompt"], case.prompt, "{what}: round trip");

        let (status, _, v) = post(
            &c,
            &d.url("/detokenize"),
            &json!({"tokens": case.generated_ids}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{what} generated: {v}");
        assert_eq!(v["prompt"], case.generated_text, "{what}: generated ids");
    }
    for case in chat_cases(&g) {
        let what = format!("/tokenize messages {}", case.name);
        let (status, _, v) = post(
            &c,
            &d.url("/tokenize"),
            &json!({"model": MODEL, "messages": case.messages}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{what}: {v}");
        assert_eq!(v["tokens"], json!(case.prompt_ids), "{what}: tokens");
    }

    // Unknown routes and wrong methods also answer in the envelope.
    let r = c.get(d.url("/v1/nothing")).send().await.expect("GET");
    let (status, headers, v) = read_json(r).await;
    assert_openai_error(
        "unknown route",
        (status, &headers, &v),
        404,
        "invalid_request_error",
        Some("not_found"),
        None,
    );
    let r = c.get(d.url("/v1/completions")).send().await.expect("GET");
    let (status, headers, v) = read_json(r).await;
    assert_openai_error(
        "GET /v1/completions",
        (status, &headers, &v),
        405,
        "invalid_request_error",
        None,
        None,
    );
}

// ---------------------------------------------------------------------------------------------
// Errors.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn request_errors_answer_in_the_openai_envelope() {
    let Some(g) = golden(MODEL) else { return };
    let Some(d) = Daemon::start(&[]) else { return };
    let c = client();
    let endpoints = [
        (
            "completions",
            d.url("/v1/completions"),
            json!({"prompt": "Hello"}),
        ),
        (
            "chat",
            d.url("/v1/chat/completions"),
            json!({"messages": [{"role": "user", "content": "Hello"}]}),
        ),
    ];

    for (name, url, base) in &endpoints {
        // Malformed JSON.
        let r = c
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .body("{\"prompt\": \"Hello\", \"max_tokens\": ")
            .send()
            .await
            .expect("POST");
        let (status, headers, v) = read_json(r).await;
        assert_openai_error(
            &format!("{name}: malformed JSON"),
            (status, &headers, &v),
            400,
            "invalid_request_error",
            None,
            None,
        );

        // A wrong type names its field.
        let body = merged(base.clone(), json!({"max_tokens": "ten"}));
        let (status, headers, v) = post(&c, url, &body).await;
        assert_openai_error(
            &format!("{name}: max_tokens \"ten\""),
            (status, &headers, &v),
            400,
            "invalid_request_error",
            None,
            Some("max_tokens"),
        );

        // A model we do not serve.
        let body = merged(base.clone(), json!({"model": "gpt-4", "max_tokens": 1}));
        let (status, headers, v) = post(&c, url, &body).await;
        assert_openai_error(
            &format!("{name}: unknown model"),
            (status, &headers, &v),
            404,
            "invalid_request_error",
            Some("model_not_found"),
            Some("model"),
        );
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("gpt-4"),
            "{name}: the message names the model: {v}"
        );

        // Out-of-range sampling parameter.
        let body = merged(base.clone(), json!({"temperature": -1, "max_tokens": 1}));
        let (status, headers, v) = post(&c, url, &body).await;
        assert_openai_error(
            &format!("{name}: temperature -1"),
            (status, &headers, &v),
            400,
            "invalid_request_error",
            None,
            Some("temperature"),
        );
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("temperature"),
            "{name}: the message names temperature: {v}"
        );

        // Unknown fields are ignored, as OpenAI does.
        let body = merged(
            base.clone(),
            json!({"max_tokens": 2, "temperature": 0, "frobnicate": {"x": [1, 2]},
                   "user": "someone", "metadata": null}),
        );
        let (status, _, v) = post(&c, url, &body).await;
        assert_eq!(status, StatusCode::OK, "{name}: unknown fields: {v}");
        assert_eq!(
            usage_of(name, &v["usage"]).1,
            2,
            "{name}: unknown fields: {v}"
        );
    }

    // Prompt plus max_tokens over the 2048-token context.
    let long = case(&g, "long_en");
    let prompt_len = long.prompt_ids.len() as u64;
    let max_tokens = MAX_MODEL_LEN - prompt_len + 100;
    let body = json!({"prompt": long.prompt_ids, "max_tokens": max_tokens});
    let (status, headers, v) = post(&c, &d.url("/v1/completions"), &body).await;
    assert_openai_error(
        "completions over the context",
        (status, &headers, &v),
        400,
        "invalid_request_error",
        Some("context_length_exceeded"),
        None,
    );
    let message = v["error"]["message"].as_str().unwrap_or("");
    let requested = (prompt_len + max_tokens).to_string();
    assert!(
        message.contains(&MAX_MODEL_LEN.to_string()) && message.contains(&requested),
        "completions over the context: message should name {MAX_MODEL_LEN} and {requested}: \
         {message:?}"
    );

    let chatty = case(&g, "chat_multi_turn");
    let prompt_len = chatty.prompt_ids.len() as u64;
    let max_tokens = MAX_MODEL_LEN - prompt_len + 1;
    let body = json!({"messages": chatty.messages, "max_tokens": max_tokens});
    let (status, headers, v) = post(&c, &d.url("/v1/chat/completions"), &body).await;
    assert_openai_error(
        "chat over the context",
        (status, &headers, &v),
        400,
        "invalid_request_error",
        Some("context_length_exceeded"),
        None,
    );
    let message = v["error"]["message"].as_str().unwrap_or("");
    let requested = (prompt_len + max_tokens).to_string();
    assert!(
        message.contains(&MAX_MODEL_LEN.to_string()) && message.contains(&requested),
        "chat over the context: message should name {MAX_MODEL_LEN} and {requested}: \
         {message:?}"
    );

    // Still healthy after all that.
    let (status, _, v) = post(
        &c,
        &d.url("/v1/completions"),
        &json!({"prompt": "Hello", "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "after the errors: {v}");
}

/// A completions request has no `messages`; its context error must not point there.
#[tokio::test(flavor = "multi_thread")]
async fn completions_context_error_points_at_the_prompt() {
    let Some(g) = golden(MODEL) else { return };
    let Some(d) = Daemon::start(&[]) else { return };
    let c = client();
    let long = case(&g, "long_en");
    let max_tokens = MAX_MODEL_LEN - long.prompt_ids.len() as u64 + 100;
    let body = json!({"prompt": long.prompt_ids, "max_tokens": max_tokens});
    let (status, headers, v) = post(&c, &d.url("/v1/completions"), &body).await;
    assert_openai_error(
        "completions over the context",
        (status, &headers, &v),
        400,
        "invalid_request_error",
        Some("context_length_exceeded"),
        None,
    );
    let param = &v["error"]["param"];
    assert!(
        param.is_null() || param == "prompt",
        "completions over the context: param should be \"prompt\" (or null), got {param}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_over_the_limit_is_413() {
    let Some(d) = Daemon::start(&["--max-body-bytes", "1024"]) else {
        return;
    };
    let c = client();
    let big = json!({"prompt": "x".repeat(4096), "max_tokens": 1});
    for path in ["/v1/completions", "/v1/chat/completions", "/tokenize"] {
        let (status, headers, v) = post(&c, &d.url(path), &big).await;
        assert_openai_error(
            &format!("{path}: 4 KB body with a 1 KB limit"),
            (status, &headers, &v),
            413,
            "invalid_request_error",
            None,
            None,
        );
    }
    // A body under the limit still goes through.
    let (status, _, v) = post(
        &c,
        &d.url("/v1/completions"),
        &json!({"prompt": "Hello", "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "small body: {v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn api_keys_guard_v1_and_tokenize() {
    let Some(d) = Daemon::start(&["--api-key", "k1", "--api-key", "k2"]) else {
        return;
    };
    let c = client();
    let body = json!({"prompt": "Hello", "max_tokens": 1});
    let completions = d.url("/v1/completions");

    let r = c.post(&completions).json(&body).send().await.expect("POST");
    let (status, headers, v) = read_json(r).await;
    assert_openai_error(
        "no Authorization header",
        (status, &headers, &v),
        401,
        "invalid_request_error",
        Some("invalid_api_key"),
        None,
    );
    for auth in ["Bearer k3", "Bearer k1k2", "Bearer ", "k1", "Basic k1"] {
        let r = c
            .post(&completions)
            .header("authorization", auth)
            .json(&body)
            .send()
            .await
            .expect("POST");
        let (status, headers, v) = read_json(r).await;
        assert_openai_error(
            &format!("Authorization: {auth:?}"),
            (status, &headers, &v),
            401,
            "invalid_request_error",
            Some("invalid_api_key"),
            None,
        );
    }
    for key in ["k1", "k2"] {
        let r = c
            .post(&completions)
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .expect("POST");
        let (status, _, v) = read_json(r).await;
        assert_eq!(status, StatusCode::OK, "Bearer {key}: {v}");
    }
    let r = c.get(d.url("/v1/models")).send().await.expect("GET");
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "/v1/models without a key"
    );
    let r = c
        .get(d.url("/v1/models"))
        .bearer_auth("k2")
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), StatusCode::OK, "/v1/models with k2");
    let r = c
        .post(d.url("/tokenize"))
        .json(&json!({"prompt": "Hello"}))
        .send()
        .await
        .expect("POST");
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "/tokenize without a key"
    );

    // Probes need no key.
    for path in ["/health", "/ready"] {
        let (status, _, text) = get(&c, &d.url(path)).await;
        assert_eq!(status, StatusCode::OK, "{path} without a key: {text}");
    }
}

// ---------------------------------------------------------------------------------------------
// Admission under a flood.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_gets_503_with_retry_after_and_the_rest_complete() {
    let Some(d) = Daemon::start(&["--max-waiting-requests", "2", "--max-num-seqs", "1"]) else {
        return;
    };
    let c = client();
    let url = d.url("/v1/completions");
    const FLOOD: usize = 40;
    const TOKENS: u64 = 200;
    let body = json!({"prompt": "Hello", "max_tokens": TOKENS, "ignore_eos": true,
                      "temperature": 0});
    let tasks: Vec<_> = (0..FLOOD)
        .map(|_| {
            let (c, url, body) = (c.clone(), url.clone(), body.clone());
            tokio::spawn(async move {
                let r = c.post(&url).json(&body).send().await.expect("POST");
                read_json(r).await
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.expect("request task"));
    }

    let (mut overloaded, mut ok) = (0, 0);
    let mut texts = HashSet::new();
    for (i, (status, headers, v)) in results.iter().enumerate() {
        match status.as_u16() {
            503 => {
                overloaded += 1;
                assert_openai_error(
                    &format!("flood request {i}"),
                    (*status, headers, v),
                    503,
                    "server_error",
                    Some("server_overloaded"),
                    None,
                );
                let retry = headers
                    .get(RETRY_AFTER)
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or_else(|| panic!("flood request {i}: 503 without Retry-After"));
                let secs: u64 = retry
                    .parse()
                    .unwrap_or_else(|_| panic!("Retry-After {retry:?} is not seconds"));
                assert!(secs >= 1, "Retry-After {secs}");
            }
            200 => {
                ok += 1;
                check_completion(
                    &format!("flood request {i}"),
                    v,
                    v["choices"][0]["text"].as_str().unwrap_or(""),
                    "length",
                    1,
                    TOKENS,
                );
                texts.insert(v["choices"][0]["text"].as_str().unwrap_or("").to_string());
            }
            other => panic!("flood request {i}: status {other} (only 200 or 503 allowed): {v}"),
        }
    }
    assert!(
        overloaded >= 1,
        "{FLOOD} concurrent requests with --max-waiting-requests 2 got no 503"
    );
    assert!(ok >= 1, "every request of the flood was refused");
    assert_eq!(
        texts.len(),
        1,
        "greedy outputs of one prompt differ: {texts:?}"
    );

    // The daemon recovers: admission permits were given back.
    let (status, _, v) = post(&c, &url, &json!({"prompt": "Hello", "max_tokens": 1})).await;
    assert_eq!(status, StatusCode::OK, "after the flood: {v}");
}

// ---------------------------------------------------------------------------------------------
// Cancellation when the client goes away.
// ---------------------------------------------------------------------------------------------

/// A greedy completion of `max_tokens` tokens; returns how long it took.
async fn timed_completion(c: &reqwest::Client, d: &Daemon, max_tokens: u64) -> Duration {
    let body = json!({"prompt": "Hello", "max_tokens": max_tokens, "ignore_eos": true,
                      "temperature": 0});
    let t = Instant::now();
    let (status, _, v) = post(c, &d.url("/v1/completions"), &body).await;
    let took = t.elapsed();
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(usage_of("timed", &v["usage"]).1, max_tokens, "{v}");
    took
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_goes_away_frees_the_engine() {
    // One sequence at a time: a short request can only run once the long one is gone.
    let Some(d) = Daemon::start(&["--max-num-seqs", "1"]) else {
        return;
    };
    let c = client();
    const LONG: u64 = 2000;

    // Time per generated token, net of the fixed per-request cost.
    let one = timed_completion(&c, &d, 1)
        .await
        .min(timed_completion(&c, &d, 1).await);
    let many = timed_completion(&c, &d, 201).await;
    let per_token = many.saturating_sub(one) / 200;
    assert!(per_token > Duration::ZERO, "per-token time not measurable");
    // If the long request kept running, a short one would wait for ~1900 more tokens.
    let bound = per_token * (LONG as u32 - 100) / 4;
    eprintln!("per token {per_token:?}; a short request must finish within {bound:?}");

    let long_body = |stream: bool| {
        json!({"prompt": "Hello", "max_tokens": LONG, "ignore_eos": true, "temperature": 0,
               "stream": stream})
    };

    // Control: while a long stream runs and is read, a short request waits behind it.
    let control_tokens = 400u64;
    let r = c
        .post(d.url("/v1/completions"))
        .json(
            &json!({"prompt": "Hello", "max_tokens": control_tokens, "ignore_eos": true,
                      "temperature": 0, "stream": true}),
        )
        .send()
        .await
        .expect("control stream");
    let mut control = SseReader::new("control stream", r);
    control.next_data().await;
    let blocked = timed_completion(&c, &d, 1).await;
    let rest = control.rest().await;
    let last = rest.last().expect("control stream events");
    assert_eq!(
        last["choices"][0]["finish_reason"], "length",
        "control stream ran to its end: {last}"
    );
    assert!(
        blocked >= per_token * (control_tokens as u32) / 5,
        "control: with --max-num-seqs 1 a short request should wait behind a running \
         {control_tokens}-token one, but took only {blocked:?} (per token {per_token:?}); \
         the cancellation checks below would prove nothing"
    );

    // A streaming client reads one chunk and disconnects.
    {
        let own = client();
        let r = own
            .post(d.url("/v1/completions"))
            .json(&long_body(true))
            .send()
            .await
            .expect("long stream");
        let mut reader = SseReader::new("long stream", r);
        let first = reader.next_data().await;
        assert!(
            first["choices"][0]["text"].is_string(),
            "first chunk: {first}"
        );
        // Dropping the reader, the response and the client closes the connection.
    }
    let after_stream = timed_completion(&c, &d, 1).await;
    assert!(
        after_stream < bound,
        "after a streaming client disconnected, a 1-token request took {after_stream:?} \
         (bound {bound:?}, per token {per_token:?}): the {LONG}-token generation kept running"
    );

    // A non-streaming client gives up (client-side timeout) while its request runs.
    {
        let give_up = (per_token * 50).max(Duration::from_millis(200));
        let own = reqwest::Client::builder()
            .no_proxy()
            .timeout(give_up)
            .build()
            .expect("client");
        let err = own
            .post(d.url("/v1/completions"))
            .json(&long_body(false))
            .send()
            .await
            .expect_err("the long request should outlast the client's timeout");
        assert!(err.is_timeout(), "expected a client timeout, got {err}");
    }
    let after_timeout = timed_completion(&c, &d, 1).await;
    assert!(
        after_timeout < bound,
        "after a non-streaming client timed out, a 1-token request took {after_timeout:?} \
         (bound {bound:?}, per token {per_token:?}): the {LONG}-token generation kept running"
    );
}

// ---------------------------------------------------------------------------------------------
// Graceful drain on SIGTERM.
// ---------------------------------------------------------------------------------------------

/// A client that never reuses a pooled connection.
fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_streams_and_exits_zero() {
    let Some(mut d) = Daemon::start(&["--shutdown-grace", "30"]) else {
        return;
    };
    const TOKENS: u64 = 300;
    let c = client();
    let r = c
        .post(d.url("/v1/completions"))
        .json(
            &json!({"prompt": "Hello", "max_tokens": TOKENS, "ignore_eos": true,
                      "temperature": 0, "stream": true,
                      "stream_options": {"include_usage": true}}),
        )
        .send()
        .await
        .expect("stream");
    let mut reader = SseReader::new("in-flight stream", r);
    let first = reader.next_data().await;

    let pid = d.process.child.id().to_string();
    let kill = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(kill.success(), "kill -TERM {pid}: {kill}");

    // The drain begins: readiness turns 503, then the listener closes.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match fresh_client().get(d.url("/ready")).send().await {
            Err(_) => break,
            Ok(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE => break,
            Ok(r) => assert_eq!(r.status(), StatusCode::OK, "/ready before the drain"),
        }
        assert!(
            Instant::now() < deadline,
            "/ready still 200 10 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // New work on a new connection is refused.
    match fresh_client()
        .post(d.url("/v1/completions"))
        .json(&json!({"prompt": "Hello", "max_tokens": 1}))
        .send()
        .await
    {
        Err(_) => {}
        Ok(r) => {
            let (status, headers, v) = read_json(r).await;
            assert_openai_error(
                "a new request during the drain",
                (status, &headers, &v),
                503,
                "server_error",
                Some("server_overloaded"),
                None,
            );
        }
    }

    // The in-flight stream runs to its end.
    let mut events = vec![first];
    events.extend(reader.rest().await);
    let text: String = events
        .iter()
        .flat_map(|e| e["choices"].as_array().cloned().unwrap_or_default())
        .map(|ch| ch["text"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(!text.is_empty(), "the drained stream carried no text");
    let last = events.last().expect("events");
    assert_eq!(last["choices"], json!([]), "usage chunk: {last}");
    assert_eq!(
        usage_of("drained stream", &last["usage"]),
        (1, TOKENS),
        "the in-flight stream must finish all {TOKENS} tokens"
    );

    let status = d.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after the drain: {status}"
    );
}

// ---------------------------------------------------------------------------------------------
// The per-request log line.
// ---------------------------------------------------------------------------------------------

/// By default every finished and every refused request gets a log line; with
/// `--disable-log-requests` neither does, while the metrics still count them.
#[tokio::test(flavor = "multi_thread")]
async fn disable_log_requests_drops_the_request_lines_but_not_the_counts() {
    let Some(models) = models_dir() else {
        return;
    };
    for (flags, expect_lines) in [(&[][..], 1), (&["--disable-log-requests"][..], 0)] {
        let mut cmd = distillery_command();
        cmd.arg("serve")
            .args(["--host", "127.0.0.1", "--port", "0", "--model"])
            .arg(models.join(MODEL))
            .args(["--kv-cache-memory", "32MiB"])
            .args(flags);
        let (tx, lines) = std::sync::mpsc::channel::<String>();
        // The hook (and its sender) lives as long as the daemon's stderr is open.
        let mut d = DaemonProcess::spawn(cmd, "the daemon", 300, move |line| {
            let _ = tx.send(line.to_string());
        });
        let c = client();
        let ok = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
        let (status, _, v) = post(&c, &d.url("/v1/chat/completions"), &ok).await;
        assert_eq!(status, 200, "{v}");
        let bad = json!({"model": "no-such-model", "messages": [], "max_tokens": 2});
        let (status, _, v) = post(&c, &d.url("/v1/chat/completions"), &bad).await;
        assert_eq!(status, 404, "{v}");
        let (_, _, metrics) = get(&c, &d.url("/metrics")).await;
        let successes: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("distillery:request_success_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(successes, 1.0, "flags {flags:?}: the request is counted");

        let pid = d.child.id().to_string();
        let kill = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(kill.is_ok_and(|s| s.success()), "kill -TERM {pid}");
        let status = tokio::task::block_in_place(|| d.child.wait()).expect("wait");
        assert_eq!(status.code(), Some(0), "flags {flags:?}: {status}");
        // The daemon has exited: its stderr ends, and with it the hook's sender.
        let log: Vec<String> = lines.iter().collect();
        let count = |what: &str| log.iter().filter(|l| l.contains(what)).count();
        assert_eq!(
            count("request finished"),
            expect_lines,
            "flags {flags:?}: {log:#?}"
        );
        assert_eq!(
            count("request rejected"),
            expect_lines,
            "flags {flags:?}: {log:#?}"
        );
    }
}
