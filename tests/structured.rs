//! Structured outputs end to end, through the real daemon on the shared test models (random
//! weights): generated JSON schemas on every model, checked by a real JSON-schema validator
//! (`jsonschema`); regexes (checked by the `regex` crate), choices and a Lark grammar; finish
//! reasons; a reasoning budget ahead of a constrained answer; the refusals; the grammar
//! metrics. Tool calls are `tests/tool_calls.rs`.
//!
//! A random model picks the closing token of an open-ended value rarely, so every schema here
//! bounds its values (`maxLength`, `maxItems`, integer bounds, numbers with `multipleOf`,
//! `additionalProperties: false`). That makes a second check possible: each generated schema
//! comes with a bound on the bytes a compact instance of it takes (exact but for numbers, which
//! get a margin), and `max_tokens` is that plus one (a token is at least one byte), so a choice
//! the grammar lets run on past its schema ends with "length" and fails the test.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use jsonschema::Validator;
use prom_text_format_parser::{Scrape, ValueType};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use regex::Regex;
use reqwest::StatusCode;
use serde_json::{json, Value};

use common::constrained::{merge, sampled, tools, validator, Route};
use common::http::{client, ok, post, stream};
use common::scrape::scrape;
use common::served::{refused, Served};

/// The DeepSeek vocabulary (129k ids), no tool format in its template.
const QWEN: &str = "tiny-random-qwen2";
/// A Llama vocabulary (32k ids).
const LLAMA: &str = "tiny-random-llama";
/// R1-Distill's template over random weights: reasoning parser and DeepSeek tool calls on.
const R1: &str = "tiny-r1-distill-qwen2";

// ---------------------------------------------------------------------------------------------
// Requests and answers
// ---------------------------------------------------------------------------------------------

/// The ways a request asks for a JSON schema.
#[derive(Clone, Copy, Debug)]
enum Spelling {
    ResponseFormat,
    StructuredOutputs,
    GuidedJson,
    /// vLLM takes the schema as JSON text too.
    GuidedJsonText,
}

const SPELLINGS: [Spelling; 4] = [
    Spelling::ResponseFormat,
    Spelling::StructuredOutputs,
    Spelling::GuidedJson,
    Spelling::GuidedJsonText,
];

impl Spelling {
    fn fields(self, schema: &Value) -> Value {
        match self {
            Spelling::ResponseFormat => json!({"response_format": {"type": "json_schema",
                "json_schema": {"name": "generated", "schema": schema, "strict": true}}}),
            Spelling::StructuredOutputs => {
                json!({"structured_outputs": {"json": schema, "disable_any_whitespace": true}})
            }
            Spelling::GuidedJson => json!({ "guided_json": schema }),
            Spelling::GuidedJsonText => json!({"guided_json": schema.to_string()}),
        }
    }
}

/// `text` is one JSON value, written without whitespace outside its strings, that `schema`
/// accepts.
fn check_instance(v: &Validator, text: &str) -> Result<Value, String> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("not JSON ({e}): {text:?}"))?;
    if let Some(at) = free_whitespace(text) {
        return Err(format!(
            "whitespace outside a string at byte {at}: {text:?}"
        ));
    }
    let errors: Vec<String> = v.iter_errors(&value).map(|e| e.to_string()).collect();
    if errors.is_empty() {
        Ok(value)
    } else {
        Err(format!("{text:?} does not validate: {}", errors.join("; ")))
    }
}

/// Where JSON text has whitespace outside its strings, if anywhere.
fn free_whitespace(text: &str) -> Option<usize> {
    let (mut in_string, mut escaped) = (false, false);
    for (i, ch) in text.char_indices() {
        if in_string {
            match (escaped, ch) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if ch == '"' {
            in_string = true;
        } else if ch.is_whitespace() {
            return Some(i);
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Generated schemas
// ---------------------------------------------------------------------------------------------

/// A generated schema, the most bytes a compact instance of it takes, and a rougher size (the
/// most characters), which keeps the generated answers short enough for the 2-core budget.
#[derive(Clone, Debug)]
struct Gen {
    schema: Value,
    max_bytes: usize,
    size: usize,
}

impl Gen {
    fn new(schema: Value, max_bytes: usize, size: usize) -> Gen {
        Gen {
            schema,
            max_bytes,
            size,
        }
    }
}

/// Anchored patterns and the length of their longest match (ASCII).
const PATTERNS: [(&str, usize); 4] = [
    ("^[a-z]{1,6}$", 6),
    ("^[A-Z][0-9]{2}$", 3),
    ("^[0-9a-f]{4}-[0-9a-f]{2}$", 7),
    ("^(yes|no|maybe)$", 5),
];

/// Object keys, some of which need escaping or are not ASCII.
const KEYS: [&str; 7] = ["id", "name", "the key", "ключ", "quo\"te", "x_y", "emoji😀"];

/// Values for `enum` and `const`: strings one of which is another's prefix, escapes, Unicode,
/// numbers, and compound values.
fn enum_pool() -> Vec<Value> {
    vec![
        json!("red"),
        json!("reddish"),
        json!("a \"quoted\" word"),
        json!("ünïcödé ✓"),
        json!(0),
        json!(42),
        json!(-7),
        json!(2.5),
        json!(true),
        json!(null),
        json!([1, "two"]),
        json!({"k": "v"}),
    ]
}

fn digits(i: i64) -> usize {
    i.to_string().len()
}

fn leaf() -> BoxedStrategy<Gen> {
    prop_oneof![
        (-99i64..=99, 0i64..=150).prop_map(|(lo, span)| {
            let hi = lo + span;
            // llguidance may write zero as "-0".
            let n = digits(lo).max(digits(hi)).max(2);
            Gen::new(
                json!({"type": "integer", "minimum": lo, "maximum": hi}),
                n,
                n,
            )
        }),
        // Without multipleOf, the random model writes decimals until max_tokens.
        (-20i64..=20, 1i64..=30).prop_map(|(lo, span)| {
            let hi = lo + span;
            let n = digits(lo).max(digits(hi)) + 6;
            Gen::new(
                json!({"type": "number", "minimum": lo, "maximum": hi, "multipleOf": 0.25}),
                n,
                n,
            )
        }),
        (0usize..=3, 1usize..=12).prop_map(|(min, max)| {
            // A character is at most 12 bytes: an escaped surrogate pair.
            Gen::new(
                json!({"type": "string", "minLength": min.min(max), "maxLength": max}),
                2 + 12 * max,
                2 + max,
            )
        }),
        prop::sample::select(&PATTERNS[..]).prop_map(|(p, n)| Gen::new(
            json!({"type": "string", "pattern": p}),
            2 + n,
            2 + n
        )),
        prop::sample::subsequence(enum_pool(), 1..=4).prop_map(|values| {
            let n = values
                .iter()
                .map(|v| v.to_string().len())
                .max()
                .unwrap_or(0);
            Gen::new(json!({ "enum": values }), n, n)
        }),
        prop::sample::select(enum_pool()).prop_map(|v| {
            let n = v.to_string().len();
            Gen::new(json!({ "const": v }), n, n)
        }),
        Just(Gen::new(json!({"type": "boolean"}), 5, 5)),
        Just(Gen::new(json!({"type": "null"}), 4, 4)),
    ]
    .boxed()
}

/// An object of 1-4 of `inner`'s schemas, some required, no other keys.
fn object(inner: BoxedStrategy<Gen>) -> BoxedStrategy<Gen> {
    prop::collection::vec((inner, any::<bool>()), 1..=4)
        .prop_flat_map(|props| {
            let n = props.len();
            (
                Just(props),
                prop::sample::subsequence(KEYS.to_vec(), n).prop_shuffle(),
            )
        })
        .prop_map(|(props, keys)| {
            let mut properties = serde_json::Map::new();
            let mut required = Vec::new();
            let (mut bytes, mut size) = (2 + props.len() - 1, 2 + props.len() - 1);
            for ((g, req), key) in props.into_iter().zip(keys) {
                let quoted = Value::from(key).to_string().len();
                bytes += quoted + 1 + g.max_bytes;
                size += quoted + 1 + g.size;
                properties.insert(key.to_string(), g.schema);
                if req {
                    required.push(key);
                }
            }
            Gen::new(
                json!({"type": "object", "properties": properties, "required": required,
                       "additionalProperties": false}),
                bytes,
                size,
            )
        })
        .boxed()
}

/// Nested objects, arrays (at most 3 items) and `anyOf`, at most 3 levels deep.
fn schema() -> BoxedStrategy<Gen> {
    leaf()
        .prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                object(inner.clone()),
                (inner.clone(), 0usize..=2, 1usize..=3).prop_map(|(g, min, max)| Gen::new(
                    json!({"type": "array", "items": g.schema, "minItems": min.min(max),
                           "maxItems": max}),
                    2 + max * g.max_bytes + (max - 1),
                    2 + max * g.size + (max - 1),
                )),
                prop::collection::vec(inner, 2..=3).prop_map(|alts| Gen::new(
                    json!({"anyOf": alts.iter().map(|g| g.schema.clone()).collect::<Vec<_>>()}),
                    alts.iter().map(|g| g.max_bytes).max().unwrap_or(0),
                    alts.iter().map(|g| g.size).max().unwrap_or(0),
                )),
            ]
        })
        .boxed()
}

/// An object at the top, as a structured answer is.
fn top_schema() -> impl Strategy<Value = Gen> {
    object(schema()).prop_filter("short enough to generate on 2 cores", |g| {
        g.size <= 160 && g.max_bytes < 1800
    })
}

/// One generated schema on one model: one request of `N` choices (choice i samples from seed +
/// i), its route and spelling picked by the case's number (2 x 4 combinations); every choice
/// must end "stop" and validate. The number of outputs checked.
async fn schema_case(
    c: &reqwest::Client,
    d: &Served,
    model: &str,
    case: usize,
    g: &Gen,
) -> Result<usize, String> {
    const N: usize = 8;
    let route = [Route::Chat, Route::Completions][case % 2];
    let spelling = SPELLINGS[(case / 2) % SPELLINGS.len()];
    let mut fields = sampled(1000 * case as u64 + 17, N, g.max_bytes + 1);
    merge(&mut fields, spelling.fields(&g.schema));
    if model == R1 && route == Route::Chat {
        merge(&mut fields, json!({"max_reasoning_tokens": 0}));
    }
    let body = route.body("Answer in JSON.", fields);
    let v = ok(c, &d.url(route.path()), &body).await;
    let validate = validator(&g.schema);
    let outputs = route.outputs(&v);
    if outputs.len() != N {
        return Err(format!("{N} choices asked, got {v}"));
    }
    for (i, (text, finish)) in outputs.iter().enumerate() {
        let what = format!(
            "{model}, {route:?}, {spelling:?}, choice {i} of seed {}, schema {}",
            body["seed"], g.schema
        );
        if finish != "stop" {
            return Err(format!(
                "{what}: finish_reason {finish} within {} tokens: {text:?}",
                g.max_bytes + 1
            ));
        }
        check_instance(&validate, text).map_err(|e| format!("{what}: {e}"))?;
    }
    Ok(outputs.len())
}

/// Property: on every shared model, at temperature 1, whatever bounded schema is asked for
/// (nested objects with required and optional keys and no others, arrays with item bounds,
/// enums and consts of any JSON, anchored patterns, bounded integers, numbers with
/// `multipleOf`, `anyOf`, booleans, null), every choice is one compact JSON value that the
/// `jsonschema` validator accepts, and it ends with "stop" within the schema's byte bound.
/// Both routes and all spellings (`response_format`, `structured_outputs.json`, `guided_json`
/// as an object and as text). Proptest drives it with a fixed seed per model and shrinks a
/// failing schema to a small one.
#[test]
fn every_model_writes_json_its_generated_schema_accepts() {
    const CASES: u32 = 24;
    let Some(_) = common::models_dir() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let c = client();
    let models: Vec<&str> = common::MODELS.iter().copied().chain([R1]).collect();
    let mut total = 0;
    for (m, model) in models.iter().enumerate() {
        // bench-llama-25m's KV takes 18 KiB a token in f32.
        let Some(d) = Served::start(model, &["--kv-cache-memory", "256MiB"]) else {
            continue;
        };
        let started = std::time::Instant::now();
        let checked = AtomicUsize::new(0);
        let case = AtomicUsize::new(0);
        let mut seed = [0u8; 32];
        seed[0] = m as u8 + 1;
        let mut runner = TestRunner::new_with_rng(
            Config {
                cases: CASES,
                failure_persistence: None,
                max_shrink_iters: 64,
                ..Config::default()
            },
            TestRng::from_seed(RngAlgorithm::ChaCha, &seed),
        );
        let result = runner.run(&top_schema(), |g| {
            let k = case.fetch_add(1, Ordering::Relaxed);
            let n = rt
                .block_on(schema_case(&c, &d, model, k, &g))
                .map_err(TestCaseError::fail)?;
            checked.fetch_add(n, Ordering::Relaxed);
            Ok(())
        });
        if let Err(e) = result {
            panic!("{model}: {e}");
        }
        let n = checked.into_inner();
        eprintln!(
            "{model}: {n} outputs of {CASES} generated schemas validated in {:.1?}",
            started.elapsed()
        );
        total += n;
    }
    eprintln!("generated schemas: {total} outputs checked with jsonschema in all");
    assert!(total >= 8 * CASES as usize, "at least one model ran");
}

// ---------------------------------------------------------------------------------------------
// Regex, choice, Lark
// ---------------------------------------------------------------------------------------------

/// Regexes (llguidance's syntax and the regex crate's agree on these) and the most characters
/// a match has.
const REGEXES: [(&str, usize); 6] = [
    (r"[a-z]{3,8}", 8),
    (r"(yes|no|maybe)-[0-9a-f]{4}", 10),
    (r"\d{3}-\d{4}", 8),
    (r"[A-Z][a-z]{1,5}( [A-Z][a-z]{1,5}){0,2}", 20),
    (r"-?(0|[1-9][0-9]{0,3})\.[0-9]{2}", 8),
    (r#"[^\n"]{2,6}!"#, 7),
];

const CHOICES: [&str; 6] = [
    "red",
    "reddish",
    "blue",
    "ünïcödé ✓",
    "two words",
    "a \"quote\"",
];

const LARK: &str = "start: greeting \" \" name\ngreeting: \"hi\" | \"hello\"\nname: /[a-z]{2,5}/\n";
/// What [`LARK`] generates.
const LARK_AS_REGEX: &str = "^(?:(hi|hello) [a-z]{2,5})$";

async fn regex_choice_lark(c: &reqwest::Client, d: &Served, model: &str) -> usize {
    let mut checked = 0;
    let mut case = 0u64;
    let mut run = |route: Route, fields: Value, max_chars: usize| {
        case += 1;
        let mut body = sampled(977 * case, 8, 4 * max_chars + 1);
        merge(&mut body, fields);
        let body = route.body("Say something.", body);
        let url = d.url(route.path());
        async move {
            let v = ok(c, &url, &body).await;
            let outputs = route.outputs(&v);
            assert_eq!(outputs.len(), 8, "{v}");
            for (text, finish) in &outputs {
                assert_eq!(finish, "stop", "{model} {body}: {text:?}");
            }
            (body, outputs)
        }
    };
    for (i, (rx, max_chars)) in REGEXES.iter().enumerate() {
        let (route, fields) = if i % 2 == 0 {
            (Route::Completions, json!({ "guided_regex": rx }))
        } else {
            (Route::Chat, json!({"structured_outputs": {"regex": rx}}))
        };
        let (body, outputs) = run(route, fields, *max_chars).await;
        let anchored = Regex::new(&format!("^(?:{rx})$")).expect("the test's regex");
        for (text, _) in outputs {
            assert!(anchored.is_match(&text), "{model} {body}: {text:?}");
            checked += 1;
        }
    }
    let mut seen = BTreeSet::new();
    for (route, fields) in [
        (Route::Chat, json!({ "guided_choice": CHOICES })),
        (
            Route::Completions,
            json!({"structured_outputs": {"choice": CHOICES}}),
        ),
    ] {
        let (body, outputs) = run(route, fields, 10).await;
        for (text, _) in outputs {
            assert!(CHOICES.contains(&text.as_str()), "{model} {body}: {text:?}");
            seen.insert(text);
            checked += 1;
        }
    }
    assert!(
        seen.len() > 1,
        "{model}: 16 samples at temperature 1 all chose {seen:?}"
    );
    let lark = Regex::new(LARK_AS_REGEX).expect("regex");
    for (route, fields) in [
        (Route::Completions, json!({ "guided_grammar": LARK })),
        (
            Route::Chat,
            json!({"structured_outputs": {"grammar": LARK}}),
        ),
    ] {
        let (body, outputs) = run(route, fields, 11).await;
        for (text, _) in outputs {
            assert!(lark.is_match(&text), "{model} {body}: {text:?}");
            checked += 1;
        }
    }
    checked
}

/// At temperature 1 with several seeds, on the DeepSeek vocabulary (129k ids, byte-level BPE)
/// and a Llama one (32k, sentencepiece-style): every `guided_regex` / `structured_outputs.regex`
/// output matches its regex whole (the regex crate, anchored), every `guided_choice` /
/// `structured_outputs.choice` output is one of the choices (one being another's prefix; more
/// than one chosen), every Lark grammar output matches the equivalent regex; all end "stop".
#[tokio::test(flavor = "multi_thread")]
async fn regex_choice_and_lark_outputs_match_on_deepseek_and_llama_vocabularies() {
    let c = client();
    let mut checked = 0;
    for model in [QWEN, LLAMA] {
        let Some(d) = Served::start(model, &[]) else {
            return;
        };
        checked += regex_choice_lark(&c, &d, model).await;
    }
    eprintln!("regex, choice and Lark: {checked} outputs checked");
}

// ---------------------------------------------------------------------------------------------
// Finish reasons, json_object, reasoning
// ---------------------------------------------------------------------------------------------

/// At least 42 characters whatever is chosen.
fn three_keys() -> Value {
    json!({"type": "object",
           "properties": {"alpha": {"type": "string", "minLength": 4, "maxLength": 6},
                          "beta": {"type": "integer", "minimum": 100, "maximum": 999},
                          "gamma": {"enum": ["left", "right"]}},
           "required": ["alpha", "beta", "gamma"], "additionalProperties": false})
}

/// Concatenated `text` / `delta.content` of a stream, per choice, and each choice's finish.
fn streamed_texts(route: Route, events: &[Value], n: usize) -> Vec<(String, String)> {
    let mut out = vec![(String::new(), String::new()); n];
    for e in events {
        for ch in e["choices"].as_array().expect("choices") {
            let i = ch["index"].as_u64().expect("index") as usize;
            let text = match route {
                Route::Chat => &ch["delta"]["content"],
                Route::Completions => &ch["text"],
            };
            if let Some(t) = text.as_str() {
                out[i].0.push_str(t);
            }
            if let Some(f) = ch["finish_reason"].as_str() {
                assert!(out[i].1.is_empty(), "two finish reasons: {e}");
                out[i].1 = f.to_string();
            }
        }
    }
    out
}

/// A JSON schema cut by `max_tokens` ends "length" with text that is no complete instance; the
/// same schema with room ends "stop" with one, and its stream carries the same text and
/// reason (same seed, same tokens). `json_object` (both spellings) writes an object from the
/// first character.
#[tokio::test(flavor = "multi_thread")]
async fn json_ends_stop_when_complete_and_length_when_cut() {
    let Some(d) = Served::start(LLAMA, &[]) else {
        return;
    };
    let c = client();
    let schema = three_keys();
    let validate = validator(&schema);
    for route in [Route::Chat, Route::Completions] {
        for (max_tokens, want) in [(3, "length"), (200, "stop")] {
            let mut fields = sampled(31, 4, max_tokens);
            merge(&mut fields, json!({ "guided_json": schema }));
            let body = route.body("JSON please.", fields);
            let v = ok(&c, &d.url(route.path()), &body).await;
            let outputs = route.outputs(&v);
            assert_eq!(outputs.len(), 4, "{v}");
            for (text, finish) in &outputs {
                assert_eq!(finish, want, "{route:?} max_tokens {max_tokens}: {text:?}");
                let complete = check_instance(&validate, text);
                assert_eq!(complete.is_ok(), want == "stop", "{text:?}: {complete:?}");
            }
            let mut streamed = body.clone();
            streamed["stream"] = json!(true);
            let events = stream(&c, &d.url(route.path()), &streamed).await;
            assert_eq!(
                streamed_texts(route, &events, 4),
                outputs,
                "{route:?} max_tokens {max_tokens}: the stream and the whole answer"
            );
        }
    }
    for (route, fields) in [
        (
            Route::Chat,
            json!({"response_format": {"type": "json_object"}}),
        ),
        (
            Route::Completions,
            json!({"structured_outputs": {"json_object": true}}),
        ),
    ] {
        let mut body = sampled(5, 4, 6);
        merge(&mut body, fields);
        let body = route.body("An object.", body);
        let v = ok(&c, &d.url(route.path()), &body).await;
        for (text, finish) in route.outputs(&v) {
            assert!(text.starts_with('{'), "{body}: {text:?}");
            if finish == "stop" {
                let parsed: Value = serde_json::from_str(&text).expect("a finished object");
                assert!(parsed.is_object(), "{text:?}");
            } else {
                assert_eq!(finish, "length", "{text:?}");
            }
        }
    }
}

/// With a reasoning budget (`max_reasoning_tokens: 4`), the thinking is free text shown as
/// `reasoning_content`, and only the answer after `</think>` is constrained: it parses and
/// validates, and the choice ends "stop".
#[tokio::test(flavor = "multi_thread")]
async fn a_reasoning_budget_leaves_the_thinking_free_and_constrains_the_answer() {
    let Some(d) = Served::start(R1, &[]) else {
        return;
    };
    let c = client();
    let schema = three_keys();
    let validate = validator(&schema);
    let mut fields = sampled(7, 4, 120);
    merge(
        &mut fields,
        json!({"max_reasoning_tokens": 4,
               "response_format": {"type": "json_schema",
                                   "json_schema": {"name": "three", "schema": schema}}}),
    );
    let body = Route::Chat.body("Think, then answer in JSON.", fields);
    let v = ok(&c, &d.url(Route::Chat.path()), &body).await;
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 4, "{v}");
    for ch in choices {
        let m = &ch["message"];
        let reasoning = m["reasoning_content"].as_str().unwrap_or_default();
        assert!(
            !reasoning.is_empty(),
            "the budget's thinking is shown: {ch}"
        );
        assert_eq!(ch["finish_reason"], "stop", "{ch}");
        let content = m["content"].as_str().expect("an answer");
        // The forced end of thinking ("\n</think>\n\n") leaves its newlines in the content.
        check_instance(&validate, content.trim_start())
            .unwrap_or_else(|e| panic!("{e} (message {m})"));
    }
    let thought = v["usage"]["completion_tokens_details"]["reasoning_tokens"]
        .as_u64()
        .expect("reasoning_tokens");
    assert!(thought >= 4 * 4, "4 choices of 4 reasoning tokens: {v}");
}

// ---------------------------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------------------------

/// An object schema of `n` integer properties with long names: about 75 bytes each.
fn huge_schema(n: usize) -> Value {
    let properties: serde_json::Map<String, Value> = (0..n)
        .map(|i| {
            (
                format!("property_{i:06}_with_a_long_name_to_fill_space"),
                json!({"type": "integer", "minimum": 0, "maximum": 9}),
            )
        })
        .collect();
    json!({"type": "object", "properties": properties, "additionalProperties": false})
}

/// A normal constrained request answers and validates, and `/health` says 200.
async fn still_serves(c: &reqwest::Client, d: &Served, chat_extra: &Value) {
    let schema = three_keys();
    let mut fields = chat_extra.clone();
    merge(&mut fields, sampled(3, 2, 200));
    merge(&mut fields, json!({ "guided_json": schema }));
    let v = ok(
        c,
        &d.url(Route::Chat.path()),
        &Route::Chat.body("ok?", fields),
    )
    .await;
    let validate = validator(&schema);
    for (text, finish) in Route::Chat.outputs(&v) {
        assert_eq!(finish, "stop", "{text:?}");
        check_instance(&validate, &text).unwrap_or_else(|e| panic!("{e}"));
    }
    let r = c.get(d.url("/health")).send().await.expect("GET /health");
    assert_eq!(r.status(), StatusCode::OK);
}

/// Each bad constraint is a 400 (`invalid_request_error`) whose `param` names the field: a
/// schema of an unknown type, a schema that is JSON text that doesn't parse, a regex that
/// doesn't compile, a schema of over a megabyte and a Lark grammar over 256 KiB, two
/// constraints at once, `response_format` with tool_choice required, a named tool_choice
/// naming no tool, a tool of another type, a tool whose parameters are no object. Then the
/// daemon still answers a constrained request and `/health`.
#[tokio::test(flavor = "multi_thread")]
async fn bad_constraints_are_400s_naming_the_field_and_the_daemon_carries_on() {
    let Some(d) = Served::start(R1, &[]) else {
        return;
    };
    let c = client();
    let chat = json!({"max_tokens": 8, "max_reasoning_tokens": 0});
    let huge = huge_schema(15_000);
    assert!(huge.to_string().len() > 1 << 20, "a megabyte of schema");
    let lark = format!(
        "start: \"a\"\n{}",
        (0..20_000)
            .map(|i| format!("rule_{i}: \"r{i}\"\n"))
            .collect::<String>()
    );
    assert!(lark.len() > 256 * 1024);
    let weather = json!({"type": "function", "function": {"name": "get_weather",
                         "parameters": {"type": "object"}}});
    let cases: Vec<(Route, Value, &str)> = vec![
        (
            Route::Chat,
            json!({"response_format": {"type": "json_schema",
                   "json_schema": {"name": "bad", "schema": {"type": "nonsense"}}}}),
            "response_format.json_schema.schema",
        ),
        (
            Route::Completions,
            json!({"guided_json": {"type": "nonsense"}}),
            "guided_json",
        ),
        (
            Route::Completions,
            json!({"guided_json": "{\"type\": \"object\", "}),
            "guided_json",
        ),
        (
            Route::Chat,
            json!({"structured_outputs": {"json": "{not json"}}),
            "structured_outputs.json",
        ),
        (
            Route::Completions,
            json!({"guided_regex": "[a-z"}),
            "guided_regex",
        ),
        (
            Route::Chat,
            json!({"structured_outputs": {"regex": "[a-z"}}),
            "structured_outputs.regex",
        ),
        (
            Route::Chat,
            json!({"response_format": {"type": "json_schema",
                   "json_schema": {"name": "huge", "schema": huge}}}),
            "response_format.json_schema.schema",
        ),
        (
            Route::Completions,
            json!({ "guided_json": huge }),
            "guided_json",
        ),
        (
            Route::Completions,
            json!({ "guided_grammar": lark }),
            "guided_grammar",
        ),
        (
            Route::Completions,
            json!({"guided_regex": "[a-z]+", "guided_choice": ["a", "b"]}),
            "guided_choice",
        ),
        (
            Route::Chat,
            json!({"response_format": {"type": "json_object"}, "tool_choice": "required",
                   "tools": [weather]}),
            "tool_choice",
        ),
        (
            Route::Chat,
            json!({"tool_choice": {"type": "function", "function": {"name": "nowhere"}},
                   "tools": [weather]}),
            "tool_choice",
        ),
        (
            Route::Chat,
            json!({"tools": [{"type": "retrieval"}]}),
            "tools[0].type",
        ),
        (
            Route::Chat,
            json!({"tool_choice": "required", "tools": [{"type": "function",
                   "function": {"name": "f", "parameters": {"type": "string"}}}]}),
            "tools",
        ),
    ];
    for (route, fields, param) in cases {
        let mut body = match route {
            Route::Chat => chat.clone(),
            Route::Completions => json!({"max_tokens": 8}),
        };
        merge(&mut body, fields);
        let body = route.body("hi", body);
        let v = refused(&c, &d.url(route.path()), &body, param).await;
        let msg = v["error"]["message"].as_str().expect("message");
        assert!(
            !msg.is_empty() && msg.len() < 2000,
            "a short message: {msg}"
        );
    }
    still_serves(&c, &d, &chat).await;
}

/// A grammar that admits no output at all (a `$ref` to itself, a regex no string matches, Lark
/// rules that never end) is the client's mistake: a 400 naming the field, like any schema
/// llguidance refuses. The daemon carries on after each.
#[tokio::test(flavor = "multi_thread")]
async fn grammars_that_admit_nothing_are_400s() {
    let Some(d) = Served::start(QWEN, &[]) else {
        return;
    };
    let c = client();
    for (fields, param) in [
        (
            json!({"guided_json": {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}}),
            "guided_json",
        ),
        (json!({"guided_json": {"$ref": "#"}}), "guided_json"),
        (json!({ "guided_regex": r"[^\s\S]" }), "guided_regex"),
        (
            json!({"guided_grammar": "start: a\na: a \"x\"\n"}),
            "guided_grammar",
        ),
    ] {
        let mut body = json!({"max_tokens": 8});
        merge(&mut body, fields);
        refused(
            &c,
            &d.url("/v1/completions"),
            &Route::Completions.body("hi", body),
            param,
        )
        .await;
    }
    still_serves(&c, &d, &json!({})).await;
}

/// A recursive schema that does admit instances (a tree: `{"$ref": "#"}` under a property)
/// compiles and its outputs validate; a self-referential one that admits nothing never hangs
/// the daemon nor takes it down (its status is [`grammars_that_admit_nothing_are_400s`]'s
/// matter).
#[tokio::test(flavor = "multi_thread")]
async fn recursive_refs_neither_hang_nor_harm_the_daemon() {
    let Some(d) = Served::start(QWEN, &[]) else {
        return;
    };
    let c = client();
    let url = d.url("/v1/completions");
    let tree = json!({"type": "object",
                      "properties": {"v": {"type": "integer", "minimum": 0, "maximum": 9},
                                     "kids": {"type": "array", "maxItems": 2,
                                              "items": {"$ref": "#"}}},
                      "required": ["v"], "additionalProperties": false});
    let validate = validator(&tree);
    let mut body = sampled(40, 8, 400);
    merge(&mut body, json!({ "guided_json": tree }));
    let v = ok(&c, &url, &Route::Completions.body("a tree", body)).await;
    for (text, finish) in Route::Completions.outputs(&v) {
        // Nesting is unbounded: a deep tree may be cut; what is finished validates.
        if finish == "stop" {
            check_instance(&validate, &text).unwrap_or_else(|e| panic!("{e}"));
        } else {
            assert_eq!(finish, "length", "{text:?}");
        }
    }
    let degenerate = json!({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"});
    let mut body = json!({"max_tokens": 8});
    merge(&mut body, json!({ "guided_json": degenerate }));
    let (status, v) = post(&c, &url, &Route::Completions.body("hi", body)).await;
    assert_ne!(status, StatusCode::OK, "nothing can satisfy it: {v}");
    assert!(v["error"]["message"].is_string(), "an error envelope: {v}");
    still_serves(&c, &d, &json!({})).await;
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

/// A sample of `name` carrying `labels`, of the given kind; 0 before its first observation.
fn metric(s: &Scrape, name: &str, labels: &[(&str, &str)], kind: ValueType) -> f64 {
    s.metrics
        .iter()
        .filter(|m| m.name == name)
        .flat_map(|m| m.samples.iter())
        .find(|x| {
            x.value.value_type == kind
                && labels
                    .iter()
                    .all(|(k, v)| x.labels.iter().any(|l| l.key == *k && l.value == *v))
        })
        .map_or(0.0, |x| x.value.value.as_f64())
}

/// The grammar metrics as one request's worth of change shows them.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Grammar {
    compiles: f64,
    hits: f64,
    misses: f64,
    masks: f64,
}

fn grammar_metrics(s: &Scrape) -> Grammar {
    Grammar {
        compiles: metric(
            s,
            "distillery:grammar_compile_seconds",
            &[],
            ValueType::Count,
        ),
        hits: metric(
            s,
            "distillery:grammar_cache_hits_total",
            &[],
            ValueType::Sample,
        ),
        misses: metric(
            s,
            "distillery:grammar_cache_misses_total",
            &[],
            ValueType::Sample,
        ),
        masks: metric(s, "distillery:grammar_mask_seconds", &[], ValueType::Count),
    }
}

fn constrained(s: &Scrape, kind: &str) -> f64 {
    metric(
        s,
        "distillery:constrained_requests_total",
        &[("kind", kind)],
        ValueType::Sample,
    )
}

/// The same schema twice: the first compiles (a miss, one compile observed), the second is a
/// cache hit and observes no compile; each samples under masks (at least one mask observation,
/// at most one per generated token and choice end). constrained_requests_total counts both by
/// kind json_schema, and a tool call, json_object, regex, choice and Lark request each under
/// their kind.
#[tokio::test(flavor = "multi_thread")]
async fn grammar_metrics_count_compiles_cache_hits_masks_and_kinds() {
    let Some(d) = Served::start(R1, &[]) else {
        return;
    };
    let c = client();
    let url = d.url(Route::Chat.path());
    let schema = three_keys();
    let mut body = sampled(9, 2, 200);
    merge(
        &mut body,
        json!({"max_reasoning_tokens": 0, "guided_json": schema}),
    );
    let body = Route::Chat.body("metrics", body);
    let s0 = scrape(&c, &d.url("")).await;
    let g0 = grammar_metrics(&s0);
    let mut seen = vec![g0];
    for _ in 0..2 {
        let v = ok(&c, &url, &body).await;
        let tokens = v["usage"]["completion_tokens"].as_f64().expect("usage");
        let g = grammar_metrics(&scrape(&c, &d.url("")).await);
        let before = *seen.last().unwrap();
        assert!(
            g.masks > before.masks && g.masks - before.masks <= tokens + 2.0,
            "mask observations {} -> {} for {tokens} tokens",
            before.masks,
            g.masks
        );
        seen.push(g);
    }
    let (g0, g1, g2) = (seen[0], seen[1], seen[2]);
    assert_eq!(g1.misses - g0.misses, 1.0, "first: a miss {seen:?}");
    assert_eq!(g1.hits, g0.hits, "first: no hit {seen:?}");
    assert_eq!(g1.compiles - g0.compiles, 1.0, "first: compiled {seen:?}");
    assert_eq!(g2.hits - g1.hits, 1.0, "second: a hit {seen:?}");
    assert!(g2.hits >= 1.0);
    assert_eq!(g2.misses, g1.misses, "second: no miss {seen:?}");
    assert_eq!(
        g2.compiles, g1.compiles,
        "second: no compile observed {seen:?}"
    );
    let s2 = scrape(&c, &d.url("")).await;
    assert_eq!(
        constrained(&s2, "json_schema") - constrained(&s0, "json_schema"),
        2.0
    );

    let base = json!({"max_reasoning_tokens": 0, "max_tokens": 64, "temperature": 1.0,
                      "seed": 4});
    let kinds = [
        (
            "tool_call",
            json!({"tools": tools(), "tool_choice": "required", "max_tokens": 400}),
        ),
        (
            "json_object",
            json!({"response_format": {"type": "json_object"}}),
        ),
        ("regex", json!({"guided_regex": "[a-z]{2,4}"})),
        ("choice", json!({"guided_choice": ["yes", "no"]})),
        ("grammar", json!({ "guided_grammar": LARK })),
    ];
    let before = scrape(&c, &d.url("")).await;
    for (_, fields) in &kinds {
        let mut b = base.clone();
        merge(&mut b, fields.clone());
        ok(&c, &url, &Route::Chat.body("kinds", b)).await;
    }
    let after = scrape(&c, &d.url("")).await;
    for (kind, _) in &kinds {
        assert_eq!(
            constrained(&after, kind) - constrained(&before, kind),
            1.0,
            "constrained_requests_total{{kind={kind:?}}}"
        );
    }
    assert_eq!(
        constrained(&after, "json_schema"),
        constrained(&before, "json_schema"),
        "no other kind counted"
    );
    assert!(
        metric(
            &after,
            "distillery:grammar_compile_seconds",
            &[],
            ValueType::Sum
        ) > 0.0
    );
}

/// A request refused for its grammar was never decoded under one: it is not a constrained
/// request, and a grammar that failed to compile is no cache hit when it comes again.
#[tokio::test(flavor = "multi_thread")]
async fn refused_grammars_are_not_counted_as_constrained_requests() {
    let Some(d) = Served::start(LLAMA, &[]) else {
        return;
    };
    let c = client();
    let before = scrape(&c, &d.url("")).await;
    for _ in 0..2 {
        let body = Route::Completions.body("x", json!({"max_tokens": 4, "guided_regex": "[a-z"}));
        refused(&c, &d.url("/v1/completions"), &body, "guided_regex").await;
    }
    let after = scrape(&c, &d.url("")).await;
    assert_eq!(constrained(&after, "regex"), constrained(&before, "regex"));
    assert_eq!(
        grammar_metrics(&after).hits,
        grammar_metrics(&before).hits,
        "a refused grammar is no cache hit"
    );
}

/// A stop rule and a grammar that together leave nothing to sample (`min_tokens` forbids the
/// very tokens, or the end, that the grammar alone allows): the grammar wins and the choice
/// ends cleanly, greedy and sampled alike, instead of a failed request.
#[tokio::test(flavor = "multi_thread")]
async fn a_grammar_that_allows_only_what_min_tokens_forbids_still_answers() {
    let Some(d) = Served::start(LLAMA, &[]) else {
        return;
    };
    let c = client();
    let tokenize = |text: &str| json!({"prompt": text, "add_special_tokens": false});
    let a = ok(&c, &d.url("/tokenize"), &tokenize("a")).await["tokens"][0].clone();
    let b = ok(&c, &d.url("/tokenize"), &tokenize("b")).await["tokens"][0].clone();
    for temperature in [0.0, 1.0] {
        // Only `a` or `b`, both stop tokens, and at least one token first.
        let body = Route::Completions.body(
            "hi",
            json!({"max_tokens": 4, "temperature": temperature, "seed": 5,
                   "guided_regex": "[ab]", "stop_token_ids": [a, b], "min_tokens": 1}),
        );
        let v = ok(&c, &d.url("/v1/completions"), &body).await;
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        // The empty answer: only the end is allowed, and min_tokens forbids it.
        let body = Route::Completions.body(
            "hi",
            json!({"max_tokens": 4, "temperature": temperature, "seed": 5,
                   "guided_regex": "", "min_tokens": 2}),
        );
        let v = ok(&c, &d.url("/v1/completions"), &body).await;
        assert_eq!(v["choices"][0]["text"], "", "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    }
    still_serves(&c, &d, &json!({})).await;
}

/// Greedy decoding under a grammar asks it about the model's best token first and shares one
/// lexer among requests: answers sent together are valid, and each is the answer the same
/// request gets alone, on a large and a small vocabulary.
#[tokio::test(flavor = "multi_thread")]
async fn greedy_answers_under_a_grammar_are_valid_and_do_not_depend_on_company() {
    for model in [QWEN, "tiny-llama-v512"] {
        let Some(d) = Served::start(model, &[]) else {
            return;
        };
        let c = client();
        let schema = three_keys();
        let v = validator(&schema);
        let body = |i: usize| {
            Route::Chat.body(
                &format!("question number {i}"),
                json!({"max_tokens": 200, "temperature": 0,
                       "response_format": {"type": "json_schema",
                                           "json_schema": {"name": "k", "schema": schema}}}),
            )
        };
        let url = d.url("/v1/chat/completions");
        let together = futures_util::future::join_all((0..16).map(|i| {
            let (c, url, body) = (c.clone(), url.clone(), body(i));
            async move { ok(&c, &url, &body).await }
        }))
        .await;
        for (i, answer) in together.iter().enumerate() {
            let (text, finish) = Route::Chat.outputs(answer).remove(0);
            assert_eq!(finish, "stop", "{model}: {answer}");
            check_instance(&v, &text).unwrap_or_else(|e| panic!("{model}: {e}"));
            if i % 5 == 0 {
                let alone = ok(&c, &url, &body(i)).await;
                assert_eq!(Route::Chat.outputs(&alone).remove(0).0, text, "{model}");
            }
        }
    }
}
