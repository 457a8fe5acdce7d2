//! Property 1: request bodies → every HTTP route's parse + validation, through the real
//! `distillery serve` binary over loopback HTTP: the oracle, the generators of request bodies,
//! the daemon wrapper and the directed checks.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::TestCaseError;
use serde_json::{json, Map, Value};

use crate::common::daemon::{distillery_command, DaemonProcess};
use crate::templates::{content, message, ROLES};
use crate::{any_json, builtin_tokenizer, number, run, weird_string, WEIRD};

/// The name the fuzzed daemon serves; any other `model` must get 404.
const SERVED: &str = "fuzz-model";
/// A short context, so over-long requests are easy to make and valid ones cheap to run.
const MAX_MODEL_LEN: u64 = 64;
/// A small body limit, so the 413 path is fuzzed too.
const MAX_BODY: usize = 16 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Short, mostly printable text, for contents that must stay inside the context.
fn short_text() -> BoxedStrategy<String> {
    prop_oneof![
        4 => "[a-zA-Z0-9 .,!?]{1,12}",
        1 => select(WEIRD).prop_filter("non-empty", |s| !s.is_empty()).prop_map(str::to_string),
        1 => "\\PC{1,6}",
    ]
    .boxed()
}

/// A value for a field of type `ty`: mostly of that type (in and out of range), sometimes
/// `null`, sometimes anything.
fn field_value(ty: Ty) -> BoxedStrategy<Value> {
    prop_oneof![
        24 => plausible(ty),
        1 => Just(Value::Null),
        2 => any_json(),
    ]
    .boxed()
}

const EDGE_U32S: &[u32] = &[20, 21, 63, 64, 65, 255, 256, u32::MAX];

fn u32_value() -> BoxedStrategy<Value> {
    prop_oneof![
        4 => (0u32..=8).prop_map(Value::from),
        2 => select(EDGE_U32S).prop_map(Value::from),
        1 => any::<u32>().prop_map(Value::from),
    ]
    .boxed()
}

fn token_id() -> BoxedStrategy<Value> {
    prop_oneof![
        6 => (0u32..300).prop_map(Value::from),
        1 => prop_oneof![Just(u32::MAX), Just(1 << 20)].prop_map(Value::from),
    ]
    .boxed()
}

fn plausible(ty: Ty) -> BoxedStrategy<Value> {
    match ty {
        Ty::Str => prop_oneof![
            3 => Just(Value::from(SERVED)),
            1 => weird_string().prop_map(Value::from),
        ]
        .boxed(),
        Ty::Bool => any::<bool>().prop_map(Value::Bool).boxed(),
        Ty::U32 => u32_value(),
        Ty::I64 => prop_oneof![
            4 => (-3i64..=70).prop_map(Value::from),
            1 => prop_oneof![Just(i64::MIN), Just(i64::MAX), Just(1 << 40)].prop_map(Value::from),
        ]
        .boxed(),
        Ty::F32 => number(),
        Ty::Stop => prop_oneof![
            weird_string().prop_map(Value::from),
            vec(weird_string(), 0..6).prop_map(Value::from),
        ]
        .boxed(),
        Ty::U32s | Ty::Tokens => vec(token_id(), 0..10).prop_map(Value::Array).boxed(),
        Ty::LogitBias => {
            let key = prop_oneof![
                4 => (0u32..300).prop_map(|i| i.to_string()),
                1 => weird_string(),
                1 => Just("4294967296".to_string()),
            ];
            let bias = prop_oneof![(-150.0f64..150.0).prop_map(Value::from), number()];
            btree_map(key, bias, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect()))
                .boxed()
        }
        Ty::StreamOptions => prop_oneof![
            4 => any::<bool>().prop_map(|b| json!({ "include_usage": b })),
            1 => Just(json!({})),
            1 => any_json().prop_map(|v| json!({ "include_usage": v })),
            1 => any::<bool>().prop_map(|b| json!([b])),
        ]
        .boxed(),
        Ty::Messages => vec(message(), 0..5).prop_map(Value::Array).boxed(),
        Ty::Content => content().prop_map(Option::unwrap_or_default).boxed(),
        Ty::Prompt => prop_oneof![
            3 => weird_string().prop_map(Value::from),
            1 => vec(weird_string(), 0..4).prop_map(Value::from),
            2 => vec(token_id(), 0..12).prop_map(Value::Array),
            1 => vec(vec(token_id(), 0..6).prop_map(Value::Array), 0..3).prop_map(Value::Array),
        ]
        .boxed(),
    }
}

// ---------------------------------------------------------------------------------------------
// The oracle: what the request types accept, field by field.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Ty {
    Str,
    Bool,
    U32,
    I64,
    F32,
    Stop,
    U32s,
    LogitBias,
    StreamOptions,
    Messages,
    /// A message's `content`: a string or a list of parts.
    Content,
    /// `prompt` of /v1/completions: a string, strings, token ids or lists of token ids.
    Prompt,
    Tokens,
}

/// How a struct field is declared, which decides what serde does when it is absent or null.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Need {
    /// `T`: must be present.
    Required,
    /// `Option<T>`: absent or null is `None`.
    Optional,
    /// `#[serde(default)] Option<T>`: as `Optional`, and may be left out of a sequence form.
    DefaultOptional,
    /// `#[serde(default)] T` (T not an Option): absent is the default, null is a type error.
    Default,
}

type Fields = &'static [(&'static str, Ty, Need)];

const SAMPLING: Fields = &[
    ("temperature", Ty::F32, Need::Optional),
    ("top_p", Ty::F32, Need::Optional),
    ("top_k", Ty::I64, Need::Optional),
    ("min_p", Ty::F32, Need::Optional),
    ("n", Ty::U32, Need::Optional),
    ("stop", Ty::Stop, Need::Optional),
    ("stop_token_ids", Ty::U32s, Need::Optional),
    ("seed", Ty::I64, Need::Optional),
    ("presence_penalty", Ty::F32, Need::Optional),
    ("frequency_penalty", Ty::F32, Need::Optional),
    ("repetition_penalty", Ty::F32, Need::Optional),
    ("logit_bias", Ty::LogitBias, Need::Optional),
    ("ignore_eos", Ty::Bool, Need::Optional),
    ("min_tokens", Ty::U32, Need::Optional),
    ("skip_special_tokens", Ty::Bool, Need::Optional),
    ("stream", Ty::Bool, Need::Optional),
    ("stream_options", Ty::StreamOptions, Need::Optional),
];

const CHAT: Fields = &[
    ("model", Ty::Str, Need::Optional),
    ("messages", Ty::Messages, Need::Required),
    ("max_tokens", Ty::U32, Need::Optional),
    ("max_completion_tokens", Ty::U32, Need::Optional),
    ("logprobs", Ty::Bool, Need::Optional),
    ("top_logprobs", Ty::U32, Need::Optional),
    ("echo", Ty::Bool, Need::Optional),
    ("add_generation_prompt", Ty::Bool, Need::Optional),
];

const COMPLETION: Fields = &[
    ("model", Ty::Str, Need::Optional),
    ("prompt", Ty::Prompt, Need::Required),
    ("max_tokens", Ty::U32, Need::Optional),
    ("logprobs", Ty::U32, Need::Optional),
    ("echo", Ty::Bool, Need::Optional),
];

const TOKENIZE: Fields = &[
    ("model", Ty::Str, Need::Optional),
    ("prompt", Ty::Str, Need::Optional),
    ("messages", Ty::Messages, Need::Optional),
    ("add_special_tokens", Ty::Bool, Need::Optional),
    ("add_generation_prompt", Ty::Bool, Need::Optional),
];

const DETOKENIZE: Fields = &[
    ("model", Ty::Str, Need::Optional),
    ("tokens", Ty::Tokens, Need::Required),
];

const MESSAGE: Fields = &[
    ("role", Ty::Str, Need::Required),
    ("content", Ty::Content, Need::DefaultOptional),
    ("tool_call_id", Ty::Str, Need::DefaultOptional),
    ("name", Ty::Str, Need::DefaultOptional),
    ("reasoning_content", Ty::Str, Need::DefaultOptional),
    ("reasoning", Ty::Str, Need::DefaultOptional),
];
const PART: Fields = &[
    ("type", Ty::Str, Need::Required),
    ("text", Ty::Str, Need::DefaultOptional),
];
const STREAM_OPTIONS: Fields = &[("include_usage", Ty::Bool, Need::Default)];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Endpoint {
    Chat,
    Completions,
    Tokenize,
    Detokenize,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Self::Chat => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
            Self::Tokenize => "/tokenize",
            Self::Detokenize => "/detokenize",
        }
    }

    fn fields(self) -> Vec<(&'static str, Ty, Need)> {
        match self {
            Self::Chat => CHAT.iter().chain(SAMPLING).copied().collect(),
            Self::Completions => COMPLETION.iter().chain(SAMPLING).copied().collect(),
            Self::Tokenize => TOKENIZE.to_vec(),
            Self::Detokenize => DETOKENIZE.to_vec(),
        }
    }

    /// The field that carries the prompt, which context errors name.
    fn prompt_field(self) -> &'static str {
        match self {
            Self::Chat => "messages",
            _ => "prompt",
        }
    }

    /// Chat and completion requests flatten the sampling fields in, and serde then takes
    /// them from a map only; the others also take the sequence form of a struct.
    fn takes_sequence(self) -> bool {
        matches!(self, Self::Tokenize | Self::Detokenize)
    }
}

fn is_u32(v: &Value) -> bool {
    v.as_u64().is_some_and(|n| n <= u64::from(u32::MAX))
}

fn ty_ok(ty: Ty, v: &Value) -> bool {
    match ty {
        Ty::Content => match v {
            Value::String(_) => true,
            Value::Array(parts) => parts.iter().all(|p| struct_ok(PART, true, p)),
            _ => false,
        },
        Ty::Str => v.is_string(),
        Ty::Bool => v.is_boolean(),
        Ty::U32 => is_u32(v),
        Ty::I64 => v.as_i64().is_some(),
        // Any JSON number: past f32's range it becomes infinity, which validation refuses.
        Ty::F32 => v.is_number(),
        Ty::Stop => v.is_string() || v.as_array().is_some_and(|a| a.iter().all(Value::is_string)),
        Ty::U32s | Ty::Tokens => v.as_array().is_some_and(|a| a.iter().all(is_u32)),
        Ty::LogitBias => v
            .as_object()
            .is_some_and(|m| m.values().all(Value::is_number)),
        Ty::StreamOptions => struct_ok(STREAM_OPTIONS, true, v),
        // A message is an object: its sequence form (`["user", "hi"]`) is refused.
        Ty::Messages => v
            .as_array()
            .is_some_and(|a| a.iter().all(|m| struct_ok(MESSAGE, false, m))),
        Ty::Prompt => match v {
            Value::String(_) => true,
            Value::Array(a) => {
                a.iter().all(Value::is_string)
                    || a.iter().all(is_u32)
                    || a.iter()
                        .all(|l| l.as_array().is_some_and(|l| l.iter().all(is_u32)))
            }
            _ => false,
        },
    }
}

fn field_ok(ty: Ty, need: Need, v: Option<&Value>) -> bool {
    match (v, need) {
        (None, Need::Required) => false,
        (None, _) => true,
        (Some(Value::Null), Need::Optional | Need::DefaultOptional) => true,
        (Some(v), _) => ty_ok(ty, v),
    }
}

/// Whether serde takes `v` as the struct `fields`: a map, or (with `seq`) the sequence of its
/// fields in order, whose trailing `#[serde(default)]` fields may be left out.
fn struct_ok(fields: &[(&str, Ty, Need)], seq: bool, v: &Value) -> bool {
    match v {
        Value::Object(m) => fields
            .iter()
            .all(|&(name, ty, need)| field_ok(ty, need, m.get(name))),
        Value::Array(a) if seq => {
            let min = fields
                .iter()
                .rposition(|f| !matches!(f.2, Need::Default | Need::DefaultOptional))
                .map_or(0, |i| i + 1);
            a.len() >= min
                && a.len() <= fields.len()
                && fields
                    .iter()
                    .zip(a)
                    .all(|(&(_, ty, need), v)| field_ok(ty, need, Some(v)))
        }
        _ => false,
    }
}

/// What the body must get, as far as its parse goes.
#[derive(Debug)]
enum Parse {
    /// Not JSON (or nested past serde_json's limit): 400 saying so, no param.
    NotJson,
    /// JSON, but no object: 400 with no field to name.
    NotAnObject,
    /// The sequence form of a whole request (which serde takes for the structs without
    /// flattened fields): typed or not, as said; the param is a position if anything.
    Sequence(bool),
    /// These top-level fields (or a required one that is missing) are of the wrong type:
    /// 400 naming one of them.
    Wrong(BTreeSet<String>),
    /// Every field has its type: the request reaches validation.
    Typed(Map<String, Value>),
}

fn classify(ep: Endpoint, body: &[u8]) -> Parse {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return Parse::NotJson;
    };
    let m = match v {
        Value::Object(m) => m,
        ref a @ Value::Array(_) if ep.takes_sequence() => {
            return Parse::Sequence(struct_ok(&ep.fields(), true, a));
        }
        _ => return Parse::NotAnObject,
    };
    let wrong: BTreeSet<String> = ep
        .fields()
        .into_iter()
        .filter(|&(name, ty, need)| !field_ok(ty, need, m.get(name)))
        .map(|(name, _, _)| name.to_string())
        .collect();
    if wrong.is_empty() {
        Parse::Typed(m)
    } else {
        Parse::Wrong(wrong)
    }
}

/// `messages[2].content` → `messages`.
fn root(param: &str) -> &str {
    param.split(['.', '[']).next().unwrap_or(param)
}

// ---------------------------------------------------------------------------------------------
// The daemon, as a child process serving the built-in model.
// ---------------------------------------------------------------------------------------------

struct Daemon {
    process: DaemonProcess,
    /// The stderr lines reporting a panic that no case has answered for yet.
    panics: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    fn start() -> Daemon {
        let max_model_len = MAX_MODEL_LEN.to_string();
        let max_body = MAX_BODY.to_string();
        let mut cmd = distillery_command();
        cmd.env("RUST_BACKTRACE", "1")
            .arg("serve")
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(["--model", "builtin:tiny", "--served-model-name", SERVED])
            .args(["--max-model-len", &max_model_len])
            .args(["--max-body-bytes", &max_body])
            .args(["--kv-cache-memory", "8MiB"]);
        let panics = Arc::new(Mutex::new(Vec::new()));
        let p = panics.clone();
        let process = DaemonProcess::spawn(cmd, "the daemon", 60, move |line| {
            // The panic hook's line, not a log line that quotes a client's text.
            if line.starts_with("thread '") && line.contains(" panicked at ") {
                p.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(line.to_string());
            }
        });
        Daemon { process, panics }
    }

    /// Fails the case if the daemon died or logged a panic (the preprocessing pool catches
    /// panics, so a panicking template or tokenizer shows up only in the log).
    fn check_healthy(&mut self) -> Result<(), TestCaseError> {
        if let Ok(Some(status)) = self.process.child.try_wait() {
            return Err(TestCaseError::fail(format!(
                "the daemon exited ({status}); log:\n{}",
                self.process.tail()
            )));
        }
        // Taken, so that each case answers only for the panics it caused (and shrinks right).
        let panics = std::mem::take(&mut *self.panics.lock().unwrap_or_else(|e| e.into_inner()));
        if !panics.is_empty() {
            return Err(TestCaseError::fail(format!(
                "the daemon panicked: {panics:?}; log:\n{}",
                self.process.tail()
            )));
        }
        Ok(())
    }
}

struct Answer {
    status: u16,
    content_type: String,
    body: String,
}

struct Http {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
    daemon: Mutex<Daemon>,
    /// Answers by status (and what the oracle made of the body) since the last report, to
    /// show which paths a property reached.
    tally: Mutex<std::collections::BTreeMap<String, usize>>,
}

impl Http {
    fn new() -> Http {
        let daemon = Daemon::start();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let client = rt.block_on(async {
            reqwest::Client::builder()
                .no_proxy()
                .timeout(REQUEST_TIMEOUT)
                // A fresh connection per request: a 413 or a panic closes its connection, and a
                // pooled one must not carry that into the next case.
                .pool_max_idle_per_host(0)
                .build()
                .expect("reqwest client")
        });
        Http {
            rt,
            client,
            daemon: Mutex::new(daemon),
            tally: Mutex::default(),
        }
    }

    fn count(&self, what: String) {
        *self
            .tally
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(what)
            .or_default() += 1;
    }

    /// Prints and clears the answers' statuses counted since the last call.
    fn report(&self, name: &str) {
        let mut t = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        eprintln!("fuzz {name}: answers {:?}", *t);
        t.clear();
    }

    fn post(&self, path: &str, body: Vec<u8>) -> Result<Answer, TestCaseError> {
        let url = format!(
            "{}{path}",
            self.daemon
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .process
                .base
        );
        let answer = self.rt.block_on(async {
            let r = self
                .client
                .post(&url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body)
                .send()
                .await?;
            let status = r.status().as_u16();
            let content_type = r
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = r.text().await?;
            Ok::<_, reqwest::Error>(Answer {
                status,
                content_type,
                body,
            })
        });
        if answer.is_err() {
            // A handler that panicked drops its connection; let its log line arrive.
            std::thread::sleep(Duration::from_millis(200));
        }
        let mut daemon = self.daemon.lock().unwrap_or_else(|e| e.into_inner());
        daemon.check_healthy()?;
        let a = answer.map_err(|e| {
            TestCaseError::fail(format!(
                "POST {path}: no answer ({e}); log:\n{}",
                daemon.process.tail()
            ))
        })?;
        self.count(a.status.to_string());
        Ok(a)
    }

    fn post_json(&self, path: &str, body: &Value) -> Result<Answer, TestCaseError> {
        self.post(path, serde_json::to_vec(body).expect("serializable"))
    }
}

// ---------------------------------------------------------------------------------------------
// Checks on answers.
// ---------------------------------------------------------------------------------------------

/// The `error` object of an OpenAI error envelope, after checking its shape.
fn error_of(a: &Answer) -> Result<Map<String, Value>, TestCaseError> {
    prop_assert!(
        a.content_type.starts_with("application/json"),
        "error with content-type {:?}: {}",
        a.content_type,
        a.body
    );
    let v: Value = serde_json::from_str(&a.body)
        .map_err(|e| TestCaseError::fail(format!("error body is not JSON ({e}): {}", a.body)))?;
    let e = v
        .get("error")
        .and_then(Value::as_object)
        .cloned()
        .ok_or_else(|| TestCaseError::fail(format!("no error envelope: {}", a.body)))?;
    let message = e.get("message").and_then(Value::as_str).unwrap_or("");
    prop_assert!(!message.trim().is_empty(), "empty message: {}", a.body);
    prop_assert!(
        e.get("type").and_then(Value::as_str) == Some("invalid_request_error"),
        "a client error must be an invalid_request_error: {}",
        a.body
    );
    prop_assert!(
        matches!(e.get("param"), Some(Value::Null | Value::String(_))),
        "param must be a string or null: {}",
        a.body
    );
    Ok(e)
}

fn param_of(e: &Map<String, Value>) -> Option<&str> {
    e.get("param").and_then(Value::as_str)
}

/// Checks a 200: a complete JSON answer, or a complete stream ending in `[DONE]` with no
/// error event; `choices` (where known) is how many choices it must carry.
fn check_success(ep: Endpoint, a: &Answer, choices: Option<usize>) -> Result<(), TestCaseError> {
    if a.content_type.starts_with("text/event-stream") {
        prop_assert!(
            matches!(ep, Endpoint::Chat | Endpoint::Completions),
            "a stream from {ep:?}"
        );
        prop_assert!(
            a.body.ends_with("data: [DONE]\n\n"),
            "incomplete stream: {:?}",
            &a.body[a.body.len().saturating_sub(200)..]
        );
        let mut finished = BTreeSet::new();
        for frame in a.body.split("\n\n").filter(|f| !f.is_empty()) {
            let data = frame
                .strip_prefix("data: ")
                .ok_or_else(|| TestCaseError::fail(format!("bad SSE frame {frame:?}")))?;
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data)
                .map_err(|e| TestCaseError::fail(format!("bad SSE JSON ({e}): {data}")))?;
            prop_assert!(v.get("error").is_none(), "error inside a stream: {data}");
            for c in v["choices"].as_array().into_iter().flatten() {
                if c["finish_reason"].is_string() {
                    finished.insert(c["index"].as_u64().unwrap_or(u64::MAX));
                }
            }
        }
        if let Some(k) = choices {
            prop_assert_eq!(finished.len(), k, "choices that finished in the stream");
        }
        return Ok(());
    }
    prop_assert!(
        a.content_type.starts_with("application/json"),
        "200 with content-type {:?}",
        a.content_type
    );
    let v: Value = serde_json::from_str(&a.body)
        .map_err(|e| TestCaseError::fail(format!("200 body is not JSON ({e}): {}", a.body)))?;
    match ep {
        Endpoint::Chat | Endpoint::Completions => {
            let got = v["choices"].as_array().map(Vec::len);
            prop_assert!(got.is_some(), "no choices: {}", a.body);
            if let Some(k) = choices {
                prop_assert_eq!(got, Some(k), "number of choices");
            }
            let u = &v["usage"];
            prop_assert_eq!(
                u["prompt_tokens"].as_u64().unwrap_or(0)
                    + u["completion_tokens"].as_u64().unwrap_or(0),
                u["total_tokens"].as_u64().unwrap_or(u64::MAX),
                "usage adds up"
            );
        }
        Endpoint::Tokenize => {
            let n = v["tokens"].as_array().map(Vec::len);
            prop_assert!(n.is_some(), "no tokens: {}", a.body);
            prop_assert_eq!(v["count"].as_u64(), n.map(|n| n as u64));
        }
        Endpoint::Detokenize => prop_assert!(v["prompt"].is_string(), "no prompt: {}", a.body),
    }
    Ok(())
}

/// How many choices a typed request asks for, where that is known without the tokenizer.
fn expected_choices(ep: Endpoint, m: &Map<String, Value>) -> Option<usize> {
    let n = m.get("n").and_then(Value::as_u64).unwrap_or(1) as usize;
    match ep {
        Endpoint::Chat => Some(n),
        Endpoint::Completions => {
            let prompts = match m.get("prompt")? {
                Value::Array(a) if a.first().is_some_and(Value::is_array) => a.len(),
                Value::Array(a) if a.first().is_some_and(Value::is_string) => a.len(),
                _ => 1,
            };
            Some(n * prompts)
        }
        _ => None,
    }
}

/// The whole contract for one body sent to one endpoint.
fn check_request(http: &Http, ep: Endpoint, body: Vec<u8>) -> Result<(), TestCaseError> {
    let expect = classify(ep, &body);
    let size = body.len();
    let a = http.post(ep.path(), body)?;
    let label = match &expect {
        _ if size > MAX_BODY => "over the limit",
        Parse::NotJson => "not JSON",
        Parse::NotAnObject => "not an object",
        Parse::Sequence(_) => "sequence",
        Parse::Wrong(_) => "mistyped",
        Parse::Typed(_) => "typed",
    };
    http.count(format!("{label} → {}", a.status));
    prop_assert!(
        matches!(a.status, 200 | 400 | 404 | 413),
        "status {} (only 200, 400, 404 and 413 are right for one request to an idle \
         server): {}",
        a.status,
        a.body
    );
    if size > MAX_BODY {
        prop_assert_eq!(a.status, 413, "a {} byte body: {}", size, a.body);
        let e = error_of(&a)?;
        prop_assert_eq!(e.get("code"), Some(&json!("request_too_large")));
        return Ok(());
    }
    prop_assert!(a.status != 413, "413 for a {} byte body", size);
    match expect {
        Parse::NotJson => {
            // serde reads as it parses: a wrong type before the broken byte is reported first.
            prop_assert_eq!(a.status, 400, "not JSON: {}", a.body);
            error_of(&a)?;
        }
        Parse::NotAnObject => {
            prop_assert_eq!(a.status, 400, "not a request object: {}", a.body);
            let e = error_of(&a)?;
            prop_assert_eq!(param_of(&e), None, "no field to name: {}", a.body);
        }
        Parse::Sequence(typed) => match a.status {
            200 if typed => check_success(ep, &a, None)?,
            400 | 404 => drop(error_of(&a)?),
            s => prop_assert!(false, "status {s} for a sequence-form request: {}", a.body),
        },
        Parse::Wrong(wrong) => {
            prop_assert_eq!(a.status, 400, "wrong types in {:?}: {}", wrong, a.body);
            let e = error_of(&a)?;
            let param = param_of(&e);
            prop_assert!(
                param.is_some_and(|p| wrong.contains(root(p))),
                "param {param:?} names none of the mistyped fields {wrong:?}: {}",
                a.body
            );
        }
        Parse::Typed(m) => {
            let model = m.get("model").and_then(Value::as_str);
            if model.is_some_and(|name| name != SERVED) {
                prop_assert_eq!(a.status, 404, "unknown model: {}", a.body);
                let e = error_of(&a)?;
                prop_assert_eq!(e.get("code"), Some(&json!("model_not_found")));
                prop_assert_eq!(param_of(&e), Some("model"));
                return Ok(());
            }
            match a.status {
                200 => check_success(ep, &a, expected_choices(ep, &m))?,
                400 => {
                    let e = error_of(&a)?;
                    let param = param_of(&e);
                    if e.get("code") == Some(&json!("context_length_exceeded")) {
                        prop_assert_eq!(param, Some(ep.prompt_field()), "{}", a.body);
                    } else {
                        // Validation must name a field the client sent (or the required one
                        // it left out: tokenize wants exactly one of prompt and messages).
                        let named = param.is_some_and(|p| {
                            m.contains_key(root(p)) || root(p) == ep.prompt_field()
                        });
                        prop_assert!(named, "param {param:?} is not a field sent: {}", a.body);
                    }
                }
                s => prop_assert!(false, "status {s} for a typed request: {}", a.body),
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Request generators.
// ---------------------------------------------------------------------------------------------

/// An object with a random subset of `ep`'s fields (the required one usually present), each
/// valued mostly by its type, plus the odd unknown key.
fn request_object(ep: Endpoint) -> BoxedStrategy<Value> {
    let fields: Vec<BoxedStrategy<Option<(String, Value)>>> = ep
        .fields()
        .into_iter()
        .map(|(name, ty, need)| {
            let p = if need == Need::Required { 0.95 } else { 0.2 };
            prop::option::weighted(p, field_value(ty))
                .prop_map(move |v| v.map(|v| (name.to_string(), v)))
                .boxed()
        })
        .collect();
    let unknown = prop::option::weighted(0.15, (weird_string(), any_json()));
    (fields, unknown)
        .prop_map(|(fields, unknown)| {
            let mut m: Map<String, Value> = fields.into_iter().flatten().collect();
            if let Some((k, v)) = unknown {
                m.entry(k).or_insert(v);
            }
            Value::Object(m)
        })
        .boxed()
}

/// A request body; shown as text when a case fails.
#[derive(Clone)]
struct Body(Vec<u8>);

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Body({:?})", String::from_utf8_lossy(&self.0))
    }
}

fn request_body(ep: Endpoint) -> BoxedStrategy<Body> {
    prop_oneof![
        12 => request_object(ep),
        1 => any_json(),
    ]
    .prop_map(|v| Body(serde_json::to_vec(&v).expect("serializable")))
    .boxed()
}

/// Bytes that are mostly not JSON: random bytes, broken or padded JSON, escapes serde_json
/// refuses, nesting past its limit.
fn raw_body() -> BoxedStrategy<Body> {
    let valid = || request_object(Endpoint::Completions).prop_map(|v| v.to_string());
    prop_oneof![
        3 => vec(any::<u8>(), 0..200),
        2 => (valid(), any::<prop::sample::Index>()).prop_map(|(s, i)| {
            // Cut short at a random byte.
            s.as_bytes()[..i.index(s.len() + 1)].to_vec()
        }),
        2 => (valid(), any::<prop::sample::Index>(), any::<u8>()).prop_map(|(s, i, b)| {
            let mut v = s.into_bytes();
            let at = i.index(v.len());
            v[at] = b;
            v
        }),
        2 => (valid(), select(&[
            " ", "\n", "x", "}", "]", ",", "{}", "{\"prompt\":\"x\"}", "\u{0}", "//", "\u{feff}"
        ][..]))
        .prop_map(|(s, tail)| format!("{s}{tail}").into_bytes()),
        1 => valid().prop_map(|s| format!("\u{feff}{s}").into_bytes()),
        2 => select(&[
            r#"{"prompt":"\ud800"}"#,
            r#"{"prompt":"\udc00\ud800"}"#,
            r#"{"prompt":"ok","max_tokens":1e400}"#,
            r#"{"prompt":"ok","n":123456789012345678901234567890}"#,
            r#"{"prompt":"ok","temperature":-1e999}"#,
            r#"{"prompt":"ok","temperature":NaN}"#,
            r#"{"prompt":"ok","temperature":Infinity}"#,
            r#"{"prompt":"ok","n":01}"#,
            r#"{"prompt":"ok","n":1.}"#,
            r#"{"prompt":'ok'}"#,
            r#"{prompt:"ok"}"#,
            r#"{"prompt":"ok",}"#,
            r#"{"prompt":"ok","prompt":"twice"}"#,
            r#"{"prompt":"ok","n":1,"n":2}"#,
            r#"{"prompt":"a\u0000b"}"#,
            "{\"prompt\":\"raw\ncontrol\"}",
            "",
            "null",
            "{}",
            "[]",
        ][..])
        .prop_map(|s| s.as_bytes().to_vec()),
        1 => (1usize..3000).prop_map(|d| format!("{}1{}", "[".repeat(d), "]".repeat(d)).into_bytes()),
        1 => (1usize..3000).prop_map(|d| {
            format!("{{\"prompt\":{}\"x\"{}}}", "[".repeat(d), "]".repeat(d)).into_bytes()
        }),
    ]
    .prop_map(Body)
    .boxed()
}

/// A request that passes every check: it must get 200, or (only for its length) a
/// context_length_exceeded.
fn valid_request(ep: Endpoint, vocab: u32) -> BoxedStrategy<Value> {
    let token = move || 5..vocab;
    let sampling = (
        (
            prop::option::of(prop_oneof![Just(0.0f64), 0.0f64..2.0]),
            prop::option::of(prop_oneof![Just(1.0f64), 0.01f64..=1.0]),
            prop::option::of(-1i64..50),
            prop::option::of(0.0f64..=1.0),
            prop::option::of(1u32..=3),
            prop::option::of(vec("[a-z]{1,3}", 0..=4)),
            prop::option::of(vec(token(), 0..3)),
            prop::option::of(any::<i64>()),
        ),
        (
            prop::option::of(-2.0f64..=2.0),
            prop::option::of(-2.0f64..=2.0),
            prop::option::of(0.5f64..2.0),
            prop::option::of(btree_map(
                token().prop_map(|t| t.to_string()),
                -100.0f64..=100.0,
                0..3,
            )),
            prop::option::of(any::<bool>()),
            prop::option::of(any::<bool>()),
            prop::option::of(any::<bool>()),
            prop::option::of(any::<bool>()),
        ),
    )
        .prop_map(
            |((t, p, k, mp, n, stop, sti, seed), (pp, fp, rp, lb, ie, sst, st, iu))| {
                let mut m = Map::new();
                let mut put = |k: &str, v: Option<Value>| {
                    if let Some(v) = v {
                        m.insert(k.to_string(), v);
                    }
                };
                put("temperature", t.map(Value::from));
                put("top_p", p.map(Value::from));
                put("top_k", k.map(Value::from));
                put("min_p", mp.map(Value::from));
                put("n", n.map(Value::from));
                put("stop", stop.map(Value::from));
                put("stop_token_ids", sti.map(Value::from));
                put("seed", seed.map(Value::from));
                put("presence_penalty", pp.map(Value::from));
                put("frequency_penalty", fp.map(Value::from));
                put("repetition_penalty", rp.map(Value::from));
                put("logit_bias", lb.map(|b| json!(b)));
                put("ignore_eos", ie.map(Value::from));
                put("skip_special_tokens", sst.map(Value::from));
                put("stream", st.map(Value::from));
                put("stream_options", iu.map(|b| json!({ "include_usage": b })));
                m
            },
        );
    let model = prop::option::of(Just(SERVED));
    let max_and_min = prop::option::of((1u32..=8, 0u32..=8))
        .prop_map(|mm| mm.map(|(max, min)| (max, min.min(max))));
    match ep {
        Endpoint::Chat => {
            let msg = (select(ROLES), prop_oneof![
                3 => short_text().prop_map(Value::from),
                1 => vec(short_text(), 0..3).prop_map(|t| {
                    Value::Array(t.into_iter().map(|t| json!({"type": "text", "text": t})).collect())
                }),
                1 => Just(Value::Null),
            ])
                .prop_map(|(r, c)| json!({ "role": r, "content": c }));
            (
                sampling,
                model,
                vec(msg, 1..4),
                max_and_min,
                any::<bool>(),
                prop::option::of((any::<bool>(), 0u32..=20)),
                prop::option::of(any::<bool>()),
                prop::option::of(any::<bool>()),
            )
                .prop_map(
                    |(mut m, model, msgs, mm, completion_field, lp, echo, agp)| {
                        m.insert("messages".into(), Value::Array(msgs));
                        if let Some(model) = model {
                            m.insert("model".into(), model.into());
                        }
                        if let Some((max, min)) = mm {
                            let key = if completion_field {
                                "max_completion_tokens"
                            } else {
                                "max_tokens"
                            };
                            m.insert(key.into(), max.into());
                            m.insert("min_tokens".into(), min.into());
                        }
                        if let Some((logprobs, top)) = lp {
                            m.insert("logprobs".into(), logprobs.into());
                            if logprobs {
                                m.insert("top_logprobs".into(), top.into());
                            }
                        }
                        if let Some(e) = echo {
                            m.insert("echo".into(), e.into());
                        }
                        if let Some(g) = agp {
                            m.insert("add_generation_prompt".into(), g.into());
                        }
                        Value::Object(m)
                    },
                )
                .boxed()
        }
        _ => {
            let prompt = prop_oneof![
                3 => short_text().prop_map(Value::from),
                1 => vec(short_text(), 1..3).prop_map(Value::from),
                2 => vec(token(), 1..12).prop_map(Value::from),
                1 => vec(vec(token(), 1..6), 1..3).prop_map(|l| json!(l)),
            ];
            (
                sampling,
                model,
                prompt,
                max_and_min,
                prop::option::of(0u32..=20),
                prop::option::of(any::<bool>()),
            )
                .prop_map(|(mut m, model, prompt, mm, logprobs, echo)| {
                    m.insert("prompt".into(), prompt);
                    if let Some(model) = model {
                        m.insert("model".into(), model.into());
                    }
                    if let Some((max, min)) = mm {
                        m.insert("max_tokens".into(), max.into());
                        m.insert("min_tokens".into(), min.into());
                    }
                    if let Some(l) = logprobs {
                        m.insert("logprobs".into(), l.into());
                    }
                    if let Some(e) = echo {
                        m.insert("echo".into(), e.into());
                    }
                    Value::Object(m)
                })
                .boxed()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Property 1: request bytes → parse → validation, over HTTP.
// ---------------------------------------------------------------------------------------------

/// Bugs found while writing this fuzzer, pinned: each body with the status and param it must
/// get (the properties below find them too, but only by chance).
fn regressions(http: &Http) -> Result<(), TestCaseError> {
    let cases: &[(Endpoint, &str, u16, Option<&str>)] = &[
        // A flattened sampling field with a wrong number: serde's message quotes the value
        // in backticks, which was taken for the field name (param "5.5").
        (
            Endpoint::Completions,
            r#"{"prompt":"hi","n":5.5}"#,
            400,
            Some("n"),
        ),
        (
            Endpoint::Completions,
            r#"{"prompt":"hi","n":18446744073709551615}"#,
            400,
            Some("n"),
        ),
        (
            Endpoint::Chat,
            r#"{"messages":[],"ignore_eos":1}"#,
            400,
            Some("ignore_eos"),
        ),
        (
            Endpoint::Chat,
            r#"{"messages":[],"top_k":-1.0}"#,
            400,
            Some("top_k"),
        ),
        // A body that is no object has no field to name (param was "3", "true", ...).
        (Endpoint::Completions, "3", 400, None),
        (Endpoint::Chat, "true", 400, None),
        (Endpoint::Chat, "-1.5", 400, None),
        // Nor has an array, whose positions the sampling fields' re-parse named ("[0]").
        (Endpoint::Chat, r#"[""]"#, 400, None),
        (Endpoint::Completions, "[1.0, 2]", 400, None),
        // Trailing bytes after the object were ignored.
        (Endpoint::Completions, r#"{"prompt":"hi"} x"#, 400, None),
        (
            Endpoint::Completions,
            r#"{"prompt":"a"}{"prompt":"b"}"#,
            400,
            None,
        ),
        // Valid JSON whose message has one element too many: serde_json calls that
        // "trailing characters", which was answered as unparsable JSON with no param.
        (
            Endpoint::Chat,
            r#"{"messages":[["user","hi",null]]}"#,
            400,
            Some("messages[0]"),
        ),
        // Chat's own names for fields that validation checks under completions' names.
        (
            Endpoint::Chat,
            r#"{"messages":[{"role":"user","content":"hi"}],"max_completion_tokens":0}"#,
            400,
            Some("max_completion_tokens"),
        ),
        (
            Endpoint::Chat,
            r#"{"messages":[{"role":"user","content":"hi"}],"logprobs":true,"top_logprobs":21}"#,
            400,
            Some("top_logprobs"),
        ),
    ];
    for &(ep, body, status, param) in cases {
        let a = http.post(ep.path(), body.as_bytes().to_vec())?;
        prop_assert_eq!(a.status, status, "{} {}: {}", ep.path(), body, a.body);
        let e = error_of(&a)?;
        prop_assert_eq!(param_of(&e), param, "{} {}: {}", ep.path(), body, a.body);
    }
    Ok(())
}

#[test]
fn request_bodies_get_a_validated_request_or_a_client_error() {
    let http = Http::new();
    let vocab = builtin_tokenizer().vocab_size() as u32;
    let started = Instant::now();

    if let Err(e) = regressions(&http) {
        panic!("regression: {e}");
    }
    for (ep, cases, salt) in [
        (Endpoint::Chat, 512, 1),
        (Endpoint::Completions, 512, 2),
        (Endpoint::Tokenize, 192, 3),
        (Endpoint::Detokenize, 128, 4),
    ] {
        let name = format!("{} bodies", ep.path());
        run(&name, cases, salt, request_body(ep), |body| {
            check_request(&http, ep, body.0)
        });
        http.report(&name);
    }
    run(
        "raw bytes",
        384,
        5,
        (
            select(&[Endpoint::Chat, Endpoint::Completions][..]),
            raw_body(),
        ),
        |(ep, body)| check_request(&http, ep, body.0),
    );
    http.report("raw bytes");
    for (ep, salt) in [(Endpoint::Chat, 6), (Endpoint::Completions, 7)] {
        let name = format!("valid {} requests", ep.path());
        run(&name, 160, salt, valid_request(ep, vocab), |req| {
            let a = http.post_json(ep.path(), &req)?;
            match a.status {
                200 => check_success(ep, &a, None),
                400 => {
                    let e = error_of(&a)?;
                    prop_assert_eq!(
                        e.get("code"),
                        Some(&json!("context_length_exceeded")),
                        "a valid request refused: {}",
                        a.body
                    );
                    Ok(())
                }
                s => Err(TestCaseError::fail(format!("status {s}: {}", a.body))),
            }
        });
        http.report(&name);
    }
    context_limits(&http, vocab);
    eprintln!(
        "fuzz: the request path took {:.2} s in all",
        started.elapsed().as_secs_f64()
    );
}

/// Directed: a well-formed request whose prompt plus `max_tokens` passes the context gets
/// `context_length_exceeded` naming the prompt's field; one that fits gets 200.
fn context_limits(http: &Http, vocab: u32) {
    let ctx = MAX_MODEL_LEN;
    let max_tokens = || {
        prop_oneof![
            3 => 1u64..=ctx + 8,
            1 => select(vec![ctx, ctx + 1, 1 << 31, u64::from(u32::MAX)]),
        ]
    };
    run(
        "context limit, /v1/completions",
        128,
        8,
        (
            vec(5..vocab, 1..=ctx as usize + 4),
            max_tokens(),
            1u32..=2,
            any::<bool>(),
        ),
        |(ids, max, n, stream)| {
            let len = ids.len() as u64;
            let req = json!({ "prompt": ids, "max_tokens": max, "n": n, "stream": stream });
            let a = http.post_json("/v1/completions", &req)?;
            if len + max > ctx {
                prop_assert_eq!(a.status, 400, "{} + {} tokens: {}", len, max, a.body);
                let e = error_of(&a)?;
                prop_assert_eq!(e.get("code"), Some(&json!("context_length_exceeded")));
                prop_assert_eq!(param_of(&e), Some("prompt"));
            } else {
                prop_assert_eq!(a.status, 200, "{} + {} tokens: {}", len, max, a.body);
                check_success(Endpoint::Completions, &a, Some(n as usize))?;
            }
            Ok(())
        },
    );
    http.report("context limit, /v1/completions");
    let msg = (
        select(&["system", "user", "assistant", "developer"][..]),
        "[a-z ]{0,24}",
    )
        .prop_map(|(r, c)| json!({ "role": r, "content": c }));
    run(
        "context limit, /v1/chat/completions",
        128,
        9,
        (
            vec(msg, 1..4),
            prop::option::of(max_tokens()),
            any::<bool>(),
            any::<bool>(),
        ),
        |(messages, max, completion_field, stream)| {
            // The prompt's length as the daemon counts it, by the same template and tokenizer.
            let t = http.post_json("/tokenize", &json!({ "messages": messages }))?;
            prop_assert_eq!(t.status, 200, "tokenize: {}", t.body);
            let len = serde_json::from_str::<Value>(&t.body)
                .ok()
                .and_then(|v| v["count"].as_u64())
                .ok_or_else(|| TestCaseError::fail(format!("tokenize: {}", t.body)))?;
            let mut req = json!({ "messages": messages, "stream": stream });
            if let Some(max) = max {
                let key = if completion_field {
                    "max_completion_tokens"
                } else {
                    "max_tokens"
                };
                req[key] = json!(max);
            }
            let a = http.post_json("/v1/chat/completions", &req)?;
            // Without max_tokens the rest of the context is the limit, at least one token.
            let wanted = len + max.unwrap_or(ctx.saturating_sub(len).max(1));
            if wanted > ctx {
                prop_assert_eq!(a.status, 400, "{} tokens wanted: {}", wanted, a.body);
                let e = error_of(&a)?;
                prop_assert_eq!(e.get("code"), Some(&json!("context_length_exceeded")));
                prop_assert_eq!(param_of(&e), Some("messages"));
            } else {
                prop_assert_eq!(a.status, 200, "{} tokens wanted: {}", wanted, a.body);
                check_success(Endpoint::Chat, &a, Some(1))?;
            }
            Ok(())
        },
    );
    http.report("context limit, /v1/chat/completions (with /tokenize)");
}
