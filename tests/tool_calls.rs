//! Tool calls end to end, through the real daemon: DeepSeek's format (R1-Distill's template,
//! auto-detected) and Hermes' (`<tool_call>`, Qwen2.5's template in a test fixture) with
//! `tool_choice` required, named and auto, `parallel_tool_calls`, whole and streamed, every
//! call's arguments checked against its tool's schema by a real JSON-schema validator; a
//! template without a tool format refuses them.

mod common;

use std::collections::{BTreeSet, HashMap};

use jsonschema::Validator;
use serde_json::{json, Value};

use common::constrained::{merge, sampled, tools, validator, Route};
use common::fixtures::hermes_qwen2;
use common::http::{client, ok, stream};
use common::served::{refused, Served};

/// The DeepSeek vocabulary (129k ids), no tool format in its template.
const QWEN: &str = "tiny-random-qwen2";
/// R1-Distill's template over random weights: reasoning parser and DeepSeek tool calls on.
const R1: &str = "tiny-r1-distill-qwen2";

/// Each tool's name and a validator of its parameters.
fn tool_validators() -> HashMap<String, Validator> {
    tools()
        .as_array()
        .expect("tools")
        .iter()
        .map(|t| {
            let f = &t["function"];
            (
                f["name"].as_str().expect("name").to_string(),
                validator(&f["parameters"]),
            )
        })
        .collect()
}

/// One call: its name and arguments text.
type Call = (String, String);

/// A choice's calls, each checked: an id, type function, a name among `allowed`, arguments that
/// the tool's schema accepts.
fn checked_calls(
    msg: &Value,
    validators: &HashMap<String, Validator>,
    allowed: &[&str],
) -> Vec<Call> {
    let calls = msg["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("no tool_calls: {msg}"));
    assert!(!calls.is_empty(), "{msg}");
    let mut ids = BTreeSet::new();
    calls
        .iter()
        .map(|call| {
            let id = call["id"].as_str().expect("an id");
            assert!(!id.is_empty() && ids.insert(id), "ids distinct: {msg}");
            assert_eq!(call["type"], "function", "{call}");
            let name = call["function"]["name"].as_str().expect("a name");
            assert!(allowed.contains(&name), "{name} not among {allowed:?}");
            let args = call["function"]["arguments"]
                .as_str()
                .expect("arguments are a string");
            let value: Value = serde_json::from_str(args)
                .unwrap_or_else(|e| panic!("{name}'s arguments are no JSON ({e}): {args:?}"));
            let errors: Vec<String> = validators[name]
                .iter_errors(&value)
                .map(|e| e.to_string())
                .collect();
            assert!(errors.is_empty(), "{name}({args}): {errors:?}");
            (name.to_string(), args.to_string())
        })
        .collect()
}

/// A streamed chat's calls per choice, reassembled by index: the first chunk of a call has its
/// id, type and name (and empty arguments), later ones fragments of its arguments. Also each
/// choice's finish reason and any content.
fn streamed_calls(events: &[Value], n: usize) -> Vec<(Vec<Call>, String, String)> {
    let mut out = vec![(Vec::<Call>::new(), String::new(), String::new()); n];
    for e in events {
        for ch in e["choices"].as_array().expect("choices") {
            let i = ch["index"].as_u64().expect("index") as usize;
            let delta = &ch["delta"];
            if let Some(t) = delta["content"].as_str() {
                out[i].2.push_str(t);
            }
            for tc in delta["tool_calls"].as_array().into_iter().flatten() {
                let index = tc["index"].as_u64().expect("index") as usize;
                let calls = &mut out[i].0;
                if let Some(id) = tc["id"].as_str() {
                    assert!(!id.is_empty(), "{tc}");
                    assert_eq!(index, calls.len(), "calls start in order: {e}");
                    assert_eq!(tc["type"], "function", "{tc}");
                    let name = tc["function"]["name"].as_str().expect("first chunk: name");
                    assert_eq!(tc["function"]["arguments"], "", "{tc}");
                    calls.push((name.to_string(), String::new()));
                } else {
                    assert!(index < calls.len(), "arguments before their call: {e}");
                    assert!(tc["function"].get("name").is_none(), "{tc}");
                    let frag = tc["function"]["arguments"].as_str().expect("fragment");
                    calls[index].1.push_str(frag);
                }
            }
            if let Some(f) = ch["finish_reason"].as_str() {
                out[i].1 = f.to_string();
            }
        }
    }
    out
}

/// `tool_choice` required (two tools) and named, `parallel_tool_calls` true and false, their
/// streams, and auto, on a daemon whose model has a tool format. `extra`: what every request
/// adds (the reasoning model skips thinking).
async fn tool_calls_hold(c: &reqwest::Client, d: &Served, extra: &Value, what: &str) {
    let url = d.url(Route::Chat.path());
    let validators = tool_validators();
    let both = ["get_weather", "lookup_order"];
    let request = |seed: u64, n: usize, fields: Value| {
        let mut body = sampled(seed, n, 1024);
        merge(&mut body, extra.clone());
        merge(&mut body, json!({ "tools": tools() }));
        merge(&mut body, fields);
        Route::Chat.body("Where is order AB123, and what's the weather?", body)
    };
    let named = json!({"type": "function", "function": {"name": "lookup_order"}});
    let mut multi = 0;
    let mut choices = 0;
    for (seed, fields, allowed) in [
        // Choice i samples from seed + i: seeds far apart.
        (100, json!({"tool_choice": "required"}), &both[..]),
        (
            200,
            json!({"tool_choice": "required", "parallel_tool_calls": true}),
            &both[..],
        ),
        (300, json!({ "tool_choice": named }), &["lookup_order"][..]),
    ] {
        let body = request(seed, 4, fields);
        let v = ok(c, &url, &body).await;
        let mut whole = Vec::new();
        for ch in v["choices"].as_array().expect("choices") {
            let msg = &ch["message"];
            assert_eq!(ch["finish_reason"], "tool_calls", "{what}: {ch}");
            assert!(msg["content"].is_null(), "{what}: only calls: {msg}");
            let calls = checked_calls(msg, &validators, allowed);
            multi += usize::from(calls.len() > 1);
            choices += 1;
            whole.push(calls);
        }
        assert_eq!(whole.len(), 4, "{v}");
        // The same seed streamed: the same calls, by index, argument fragments joined.
        let mut s = body.clone();
        s["stream"] = json!(true);
        let events = stream(c, &url, &s).await;
        let streamed = streamed_calls(&events, 4);
        for (i, (calls, finish, content)) in streamed.into_iter().enumerate() {
            assert_eq!(calls, whole[i], "{what}: choice {i} of {s}");
            assert_eq!(finish, "tool_calls", "{what}: choice {i}");
            assert!(content.is_empty(), "{what}: content {content:?}");
        }
    }
    assert!(
        multi > 0,
        "{what}: parallel_tool_calls true (explicit and by default) made one call in each of \
         {choices} choices"
    );
    // One call at most, whatever the seed.
    for seed in [1100, 1200, 1300] {
        let body = request(
            seed,
            4,
            json!({"tool_choice": "required", "parallel_tool_calls": false}),
        );
        let v = ok(c, &url, &body).await;
        for ch in v["choices"].as_array().expect("choices") {
            assert_eq!(ch["finish_reason"], "tool_calls", "{what}: {ch}");
            let calls = checked_calls(&ch["message"], &validators, &both);
            assert_eq!(calls.len(), 1, "{what}: parallel_tool_calls false: {ch}");
        }
    }
    // auto (explicit, and the default with tools): the model chooses; a random one writes text.
    for fields in [json!({"tool_choice": "auto"}), json!({})] {
        let mut body = request(2100, 2, fields);
        body["max_tokens"] = json!(24);
        let v = ok(c, &url, &body).await;
        for ch in v["choices"].as_array().expect("choices") {
            let msg = &ch["message"];
            if msg["tool_calls"].is_array() {
                checked_calls(msg, &validators, &both);
                assert_eq!(ch["finish_reason"], "tool_calls", "{ch}");
            } else {
                let text = msg["content"].as_str().expect("content or calls");
                assert!(!text.is_empty(), "{what}: {ch}");
                assert!(
                    ["stop", "length"].contains(&ch["finish_reason"].as_str().unwrap()),
                    "{ch}"
                );
            }
        }
    }
}

/// DeepSeek's format (`<｜tool▁calls▁begin｜>`, auto-detected from R1-Distill's template), the
/// thinking skipped: `tool_choice` required over two tools and named give `tool_calls` (names
/// among the tools, the named one when named; arguments valid for that tool's schema), null
/// content, finish "tool_calls"; streamed with the same seed, `delta.tool_calls` reassemble to
/// the same calls; `parallel_tool_calls` makes several calls at least once, and false exactly
/// one; auto answers 200. With a thinking budget, the thinking is free text and the calls'
/// grammar starts after it.
#[tokio::test(flavor = "multi_thread")]
async fn deepseek_tool_calls_are_valid_whole_and_streamed() {
    let Some(d) = Served::start(R1, &[]) else {
        return;
    };
    let c = client();
    tool_calls_hold(&c, &d, &json!({"max_reasoning_tokens": 0}), "deepseek").await;

    let mut body = sampled(4000, 4, 1024);
    merge(
        &mut body,
        json!({"max_reasoning_tokens": 4, "tools": tools(), "tool_choice": "required"}),
    );
    let body = Route::Chat.body("Think, then call.", body);
    let v = ok(&c, &d.url(Route::Chat.path()), &body).await;
    let validators = tool_validators();
    for ch in v["choices"].as_array().expect("choices") {
        let msg = &ch["message"];
        let thought = msg["reasoning_content"].as_str().unwrap_or_default();
        assert!(!thought.is_empty(), "the budget's thinking is shown: {ch}");
        assert_eq!(ch["finish_reason"], "tool_calls", "{ch}");
        checked_calls(msg, &validators, &["get_weather", "lookup_order"]);
    }
}

/// Hermes' format (`<tool_call>` blocks; Qwen2.5's template on tiny-random-qwen2, assembled in
/// a temporary folder): the same as for DeepSeek.
#[tokio::test(flavor = "multi_thread")]
async fn hermes_tool_calls_are_valid_whole_and_streamed() {
    let Some(folder) = hermes_qwen2() else {
        return;
    };
    let d = Served::serve(folder.path(), "hermes-qwen2", &[]);
    let c = client();
    tool_calls_hold(&c, &d, &json!({}), "hermes").await;
}

/// A model whose chat template writes no tool calls (tiny-random-qwen2 as shipped) refuses
/// tool_choice auto (explicit or the default with tools), required and named, naming
/// `tool_choice` and the flag that would help; tool_choice "none" passes.
#[tokio::test(flavor = "multi_thread")]
async fn a_template_without_a_tool_format_refuses_tool_calls() {
    let Some(d) = Served::start(QWEN, &[]) else {
        return;
    };
    let c = client();
    let url = d.url(Route::Chat.path());
    let body = |fields: Value| {
        let mut b = json!({"max_tokens": 4, "tools": tools()});
        merge(&mut b, fields);
        Route::Chat.body("hi", b)
    };
    for fields in [
        json!({"tool_choice": "auto"}),
        json!({}),
        json!({"tool_choice": "required"}),
        json!({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    ] {
        let v = refused(&c, &url, &body(fields), "tool_choice").await;
        let msg = v["error"]["message"].as_str().expect("message");
        assert!(msg.contains("--tool-call-parser"), "{msg}");
    }
    let v = ok(&c, &url, &body(json!({"tool_choice": "none"}))).await;
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
}
