//! R1-style reasoning end to end, through the real daemon on tiny-r1-distill-qwen2 (the real
//! R1-Distill chat template over random weights): the split of `<think>…</think>` into
//! `reasoning_content`/`reasoning` and `content`, the thinking budget and its forced
//! end-of-thinking tokens (streaming, `n > 1`, preemption, no prefix caching, budget 0), the
//! model's own sampling defaults, tool-call history, the metrics, and the refusals.
//!
//! The random model never writes `</think>` by itself, which makes the split point known
//! exactly: without a budget every token is reasoning; with one, the budget's tokens, then the
//! forced message, then the answer. The answer is checked against a plain completions request
//! that feeds the same ids as a prompt, which proves the forced tokens reached the KV cache.

mod common;

use prom_text_format_parser::{Scrape, ValueType};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};

use common::daemon::distillery_command;
use common::http::{client, ok, post, stream};
use common::models_dir;
use common::served::Served;

const MODEL: &str = "tiny-r1-distill-qwen2";
const BUDGET_MESSAGE: &str = "\n</think>\n\n";

#[derive(Deserialize, Debug, Clone)]
struct ChatCase {
    name: String,
    messages: Vec<Value>,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    greedy_text_skip_special: String,
}

#[derive(Deserialize)]
struct ChatCases {
    cases: Vec<ChatCase>,
}

fn chat_cases() -> Option<Vec<ChatCase>> {
    let path = models_dir()?.join(MODEL).join("chat_cases.json");
    let text = std::fs::read_to_string(&path).expect("chat_cases.json readable");
    Some(
        serde_json::from_str::<ChatCases>(&text)
            .expect("chat_cases.json parses")
            .cases,
    )
}

/// One choice's parts as a response shows them.
#[derive(Debug, Clone, PartialEq, Default)]
struct Split {
    reasoning: Option<String>,
    content: Option<String>,
    finish: Option<String>,
}

fn split_of(message: &Value, finish: &Value) -> Split {
    let reasoning = message["reasoning_content"].as_str().map(str::to_owned);
    assert_eq!(
        message["reasoning"], message["reasoning_content"],
        "reasoning and reasoning_content hold the same text"
    );
    Split {
        reasoning,
        content: message["content"].as_str().map(str::to_owned),
        finish: finish.as_str().map(str::to_owned),
    }
}

fn choices(v: &Value) -> Vec<Split> {
    let mut all: Vec<(u64, Split)> = v["choices"]
        .as_array()
        .expect("choices")
        .iter()
        .map(|c| {
            (
                c["index"].as_u64().expect("index"),
                split_of(&c["message"], &c["finish_reason"]),
            )
        })
        .collect();
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, s)| s).collect()
}

/// Concatenated stream deltas per choice; each delta carries reasoning or content, not both.
fn streamed(events: &[Value], n: usize) -> Vec<Split> {
    let mut out = vec![Split::default(); n];
    for ev in events {
        for c in ev["choices"].as_array().expect("choices") {
            let i = c["index"].as_u64().expect("index") as usize;
            let d = &c["delta"];
            assert_eq!(d["reasoning"], d["reasoning_content"], "{d}");
            if let Some(r) = d["reasoning_content"].as_str() {
                assert!(d["content"].is_null(), "one part per delta: {d}");
                assert!(
                    out[i].content.is_none(),
                    "reasoning after content began: {d}"
                );
                out[i].reasoning.get_or_insert_with(String::new).push_str(r);
            }
            if let Some(t) = d["content"].as_str() {
                // The role chunk opens with an empty content, as OpenAI's does.
                if !t.is_empty() || d["role"].is_null() {
                    out[i].content.get_or_insert_with(String::new).push_str(t);
                }
            }
            if let Some(f) = c["finish_reason"].as_str() {
                out[i].finish = Some(f.to_owned());
            }
        }
    }
    out
}

async fn tokenize_text(c: &reqwest::Client, d: &Served, text: &str) -> Vec<u32> {
    let v = ok(
        c,
        &d.url("/tokenize"),
        &json!({"prompt": text, "add_special_tokens": false}),
    )
    .await;
    serde_json::from_value(v["tokens"].clone()).expect("ids")
}

async fn detokenize(c: &reqwest::Client, d: &Served, ids: &[u32]) -> String {
    let v = ok(c, &d.url("/detokenize"), &json!({"tokens": ids})).await;
    v["prompt"].as_str().expect("text").to_owned()
}

/// Greedy text of a completions request on raw ids (no template, no reasoning split).
async fn complete_ids(c: &reqwest::Client, d: &Served, ids: &[u32], max_tokens: usize) -> String {
    let v = ok(
        c,
        &d.url("/v1/completions"),
        &json!({"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true}),
    )
    .await;
    v["choices"][0]["text"].as_str().expect("text").to_owned()
}

async fn scrape(c: &reqwest::Client, d: &Served) -> Scrape {
    common::scrape::scrape(c, &d.url("")).await
}

fn metric(s: &Scrape, name: &str) -> f64 {
    common::scrape::value(s, name, &[])
}

fn hist_count(s: &Scrape, name: &str) -> f64 {
    common::scrape::sample(s, name, &[], ValueType::Count)
}

fn chat(messages: &[Value], extra: Value) -> Value {
    let mut body = json!({"messages": messages, "temperature": 0, "ignore_eos": true});
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    body
}

/// Every case: the template's ids, all 24 greedy tokens reported as reasoning, no content.
#[tokio::test(flavor = "multi_thread")]
async fn every_chat_case_is_rendered_exactly_and_all_reasoning() {
    let Some(cases) = chat_cases() else { return };
    let Some(d) = Served::start(MODEL, &[]) else {
        return;
    };
    let c = client();
    for case in &cases {
        let what = &case.name;
        let v = ok(&c, &d.url("/tokenize"), &json!({"messages": case.messages})).await;
        let ids: Vec<u32> = serde_json::from_value(v["tokens"].clone()).unwrap();
        assert_eq!(ids, case.prompt_ids, "{what}: /tokenize");

        let v = ok(
            &c,
            &d.url("/v1/chat/completions"),
            &chat(&case.messages, json!({"max_tokens": 24})),
        )
        .await;
        assert_eq!(v["usage"]["prompt_tokens"], case.prompt_ids.len(), "{what}");
        assert_eq!(v["usage"]["completion_tokens"], 24, "{what}");
        assert_eq!(
            v["usage"]["completion_tokens_details"]["reasoning_tokens"], 24,
            "{what}: every token is reasoning"
        );
        let got = &choices(&v)[0];
        assert_eq!(got.content, None, "{what}: no </think>, so content is null");
        if case.name == "multi_turn_strips_old_reasoning" {
            // This prompt holds <｜end▁of▁sentence｜>, which is also the tokenizer's pad token,
            // and transformers' generate() masked it out of attention when it made the fixture
            // (a numpy forward matches the fixture only with that mask). A server attends to
            // every prompt token, as vLLM does, so only the shape is checked here.
            assert_eq!(
                got.reasoning.as_ref().map(|r| r.is_empty()),
                Some(false),
                "{what}"
            );
            continue;
        }
        assert_eq!(
            got.reasoning.as_deref(),
            Some(case.greedy_text_skip_special.as_str()),
            "{what}: the greedy tokens, as transformers decodes them"
        );
        assert_eq!(
            detokenize(&c, &d, &case.greedy_ids).await,
            case.greedy_text_skip_special,
            "{what}: the ids decode to that text"
        );
        assert_eq!(got.finish.as_deref(), Some("length"));
    }
}

/// The parts a budget of `budget` must give for `case`: the first `budget` greedy tokens and
/// the message's text before `</think>` as reasoning, and as content what follows `</think>`
/// plus the model's own continuation of those ids.
async fn expected_with_budget(
    c: &reqwest::Client,
    d: &Served,
    case: &ChatCase,
    budget: usize,
    max_tokens: usize,
) -> Split {
    let message = tokenize_text(c, d, BUDGET_MESSAGE).await;
    let end = message
        .iter()
        .position(|&t| t == 128822)
        .expect("the message holds </think>");
    let mut ids = case.prompt_ids.clone();
    ids.extend_from_slice(&case.greedy_ids[..budget]);
    ids.extend_from_slice(&message);
    let answer = complete_ids(c, d, &ids, max_tokens - budget - message.len()).await;
    let mut reasoning = detokenize(c, d, &case.greedy_ids[..budget]).await;
    reasoning.push_str(&detokenize(c, d, &message[..end]).await);
    let content = detokenize(c, d, &message[end + 1..]).await + &answer;
    Split {
        reasoning: Some(reasoning),
        content: Some(content),
        finish: Some("length".into()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_budget_forces_the_end_of_thinking_and_the_model_answers() {
    let Some(cases) = chat_cases() else { return };
    let case = &cases[0];
    let Some(d) = Served::start(MODEL, &[]) else {
        return;
    };
    let c = client();
    let url = d.url("/v1/chat/completions");
    let max_tokens = 16;
    let want = expected_with_budget(&c, &d, case, 5, max_tokens).await;
    let body = chat(
        &case.messages,
        json!({"max_tokens": max_tokens, "max_reasoning_tokens": 5, "logprobs": true}),
    );
    let v = ok(&c, &url, &body).await;
    assert_eq!(choices(&v)[0], want, "non-streaming");
    // 5 sampled + the message's "\n" before </think>; the marker is not counted.
    assert_eq!(
        v["usage"]["completion_tokens_details"]["reasoning_tokens"],
        6
    );
    assert_eq!(
        v["usage"]["completion_tokens"], max_tokens,
        "forced tokens are output"
    );
    // The first five tokens are the greedy ones; each forced token has the model's logprob.
    let lp = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(lp.len(), max_tokens);
    for e in lp {
        let l = e["logprob"].as_f64().unwrap();
        assert!(l.is_finite() && l <= 0.0, "{e}");
    }
    let forced_end = &lp[6];
    assert_eq!(forced_end["token"], "</think>");
    assert!(
        forced_end["logprob"].as_f64().unwrap() < -1.0,
        "a token the random model would not pick has a low logprob: {forced_end}"
    );

    let mut s = body.clone();
    s["stream"] = json!(true);
    let events = stream(&c, &url, &s).await;
    assert_eq!(streamed(&events, 1)[0], want, "streaming");

    // include_reasoning: false hides the reasoning, not the answer.
    let mut hidden = body.clone();
    hidden["include_reasoning"] = json!(false);
    let v = ok(&c, &url, &hidden).await;
    let m = &v["choices"][0]["message"];
    assert!(
        m.get("reasoning_content").is_none() && m.get("reasoning").is_none(),
        "{m}"
    );
    assert_eq!(m["content"].as_str(), want.content.as_deref());
    hidden["stream"] = json!(true);
    let events = stream(&c, &url, &hidden).await;
    let got = streamed(&events, 1);
    assert_eq!(got[0].reasoning, None);
    assert_eq!(got[0].content, want.content);

    // Budget 0: the end of thinking goes into the prompt; all output is content.
    let message = tokenize_text(&c, &d, BUDGET_MESSAGE).await;
    let v = ok(
        &c,
        &url,
        &chat(
            &case.messages,
            json!({"max_tokens": 8, "max_reasoning_tokens": 0}),
        ),
    )
    .await;
    assert_eq!(
        v["usage"]["prompt_tokens"],
        case.prompt_ids.len() + message.len()
    );
    let mut ids = case.prompt_ids.clone();
    ids.extend_from_slice(&message);
    let got = &choices(&v)[0];
    assert_eq!(got.reasoning, None);
    assert_eq!(
        got.content.as_deref(),
        Some(complete_ids(&c, &d, &ids, 8).await.as_str())
    );
    assert_eq!(
        v["usage"]["completion_tokens_details"]["reasoning_tokens"],
        0
    );

    // max_tokens bounds the whole output: a budget beyond it never forces anything.
    let v = ok(
        &c,
        &url,
        &chat(
            &case.messages,
            json!({"max_tokens": 4, "max_reasoning_tokens": 10}),
        ),
    )
    .await;
    assert_eq!(choices(&v)[0].content, None);
    assert_eq!(
        v["usage"]["completion_tokens_details"]["reasoning_tokens"],
        4
    );
    // So do stop strings: one inside the reasoning ends the choice there.
    let reasoning = want.reasoning.clone().unwrap();
    let cut = reasoning
        .find(" tested")
        .expect("the greedy text holds \" tested\"");
    let v = ok(
        &c,
        &url,
        &chat(
            &case.messages,
            json!({"max_tokens": 16, "max_reasoning_tokens": 5, "stop": [" tested"]}),
        ),
    )
    .await;
    assert_eq!(
        choices(&v)[0],
        Split {
            reasoning: Some(reasoning[..cut].to_owned()),
            content: None,
            finish: Some("stop".into()),
        }
    );
    // And one inside the answer ends it there, the reasoning whole.
    let content = want.content.clone().unwrap();
    let stop: String = content.chars().skip(4).take(3).collect();
    let v = ok(
        &c,
        &url,
        &chat(
            &case.messages,
            json!({"max_tokens": 16, "max_reasoning_tokens": 5, "stop": [stop]}),
        ),
    )
    .await;
    let got = &choices(&v)[0];
    assert_eq!(got.reasoning, want.reasoning);
    assert_eq!(got.finish.as_deref(), Some("stop"));
    assert!(
        content.starts_with(got.content.as_deref().unwrap_or(""))
            && got.content.as_ref().map_or(0, |c| c.len()) < content.len(),
        "{got:?} vs {content:?}"
    );

    let s = scrape(&c, &d).await;
    assert!(metric(&s, "distillery:reasoning_budget_cutoffs_total") >= 4.0);
    assert!(metric(&s, "distillery:reasoning_tokens_total") >= 6.0 * 4.0 + 4.0);
    assert!(hist_count(&s, "distillery:request_reasoning_tokens") >= 6.0);
}

/// The same budgeted requests with `n: 2` sampled choices, under preemption and without
/// prefix caching, give what one roomy daemon gives.
#[tokio::test(flavor = "multi_thread")]
async fn budgets_hold_per_choice_under_preemption_and_without_prefix_caching() {
    let Some(cases) = chat_cases() else { return };
    let Some(roomy) = Served::start(MODEL, &[]) else {
        return;
    };
    let c = client();
    let body = |case: &ChatCase, seed: u64| {
        chat(
            &case.messages,
            json!({"max_tokens": 24, "max_reasoning_tokens": 5, "n": 2, "temperature": 0.8,
                   "seed": seed}),
        )
    };
    let greedy_body = |case: &ChatCase| {
        chat(
            &case.messages,
            json!({"max_tokens": 24, "max_reasoning_tokens": 5, "n": 2}),
        )
    };
    let mut want = Vec::new();
    let mut want_greedy = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let v = ok(
            &c,
            &roomy.url("/v1/chat/completions"),
            &body(case, i as u64),
        )
        .await;
        let got = choices(&v);
        assert_ne!(got[0], got[1], "{}: seeds differ per choice", case.name);
        for g in &got {
            assert!(g.reasoning.is_some() && g.content.is_some(), "{g:?}");
        }
        assert_eq!(
            v["usage"]["completion_tokens_details"]["reasoning_tokens"],
            12
        );
        let mut s = body(case, i as u64);
        s["stream"] = json!(true);
        let events = stream(&c, &roomy.url("/v1/chat/completions"), &s).await;
        assert_eq!(streamed(&events, 2), got, "{}: streaming, n = 2", case.name);
        want.push(got);
        let v = ok(&c, &roomy.url("/v1/chat/completions"), &greedy_body(case)).await;
        want_greedy.push(choices(&v));
    }
    // 4 KiB a block here: 12 blocks, while two choices of 47 to ~85 tokens want 8 to 16.
    // Under preemption the choices are greedy: seeded sampling after a recompute can differ
    // from the uninterrupted run without any budget too (a known, separate issue: see the
    // session's closing note), so it would not test the budget.
    let variants: [(&[&str], bool); 2] = [
        (&["--kv-cache-memory", "48KiB"], false),
        (&["--no-enable-prefix-caching"], true),
    ];
    for (flags, sampled) in variants {
        let Some(d) = Served::start(MODEL, flags) else {
            return;
        };
        let tasks: Vec<_> = cases
            .iter()
            .enumerate()
            .flat_map(|(i, case)| {
                let want = if sampled { &want[i] } else { &want_greedy[i] }.clone();
                (0..3).map(move |_| (i, case.clone(), want.clone()))
            })
            .map(|(i, case, want)| {
                let c = c.clone();
                let url = d.url("/v1/chat/completions");
                let b = if sampled {
                    body(&case, i as u64)
                } else {
                    greedy_body(&case)
                };
                tokio::spawn(async move {
                    let v = ok(&c, &url, &b).await;
                    assert_eq!(choices(&v), want, "{} under {flags:?}", case.name);
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("request task");
        }
        if !sampled {
            let s = scrape(&c, &d).await;
            assert!(
                metric(&s, "vllm:num_preemptions_total") > 0.0,
                "the small pool preempted"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn server_budget_and_effort_budgets_apply_to_requests_that_set_none() {
    let Some(cases) = chat_cases() else { return };
    let case = &cases[1];
    let Some(d) = Served::start(
        MODEL,
        &[
            "--reasoning-budget",
            "3",
            "--reasoning-effort-budgets",
            "low=2,high=-1",
        ],
    ) else {
        return;
    };
    let c = client();
    let url = d.url("/v1/chat/completions");
    let tokens = |v: &Value| v["usage"]["completion_tokens_details"]["reasoning_tokens"].clone();
    let v = ok(&c, &url, &chat(&case.messages, json!({"max_tokens": 12}))).await;
    assert_eq!(
        choices(&v)[0],
        expected_with_budget(&c, &d, case, 3, 12).await
    );
    assert_eq!(tokens(&v), 4);
    let v = ok(
        &c,
        &url,
        &chat(
            &case.messages,
            json!({"max_tokens": 12, "reasoning_effort": "low"}),
        ),
    )
    .await;
    assert_eq!(
        choices(&v)[0],
        expected_with_budget(&c, &d, case, 2, 12).await
    );
    let v = ok(
        &c,
        &url,
        &chat(
            &case.messages,
            json!({"max_tokens": 12, "reasoning_effort": "high"}),
        ),
    )
    .await;
    assert_eq!(tokens(&v), 12, "high is unbounded here");
    assert_eq!(choices(&v)[0].content, None);
    let v = ok(
        &c,
        &url,
        &chat(
            &case.messages,
            json!({"max_tokens": 12, "reasoning_effort": "low", "max_reasoning_tokens": 6}),
        ),
    )
    .await;
    assert_eq!(
        tokens(&v),
        7,
        "max_reasoning_tokens wins over reasoning_effort"
    );
    // Completions stay raw text: no budget, no split.
    let v = ok(
        &c,
        &d.url("/v1/completions"),
        &json!({"prompt": case.prompt_ids, "max_tokens": 12, "temperature": 0}),
    )
    .await;
    assert_eq!(
        v["choices"][0]["text"].as_str(),
        Some(detokenize(&c, &d, &case.greedy_ids[..12]).await.as_str())
    );
    assert!(v["usage"].get("completion_tokens_details").is_none());
}

/// Seeded requests that omit the sampling fields sample as the model's generation config says
/// (temperature 0.6, top_p 0.95), unless `--generation-config vllm`.
#[tokio::test(flavor = "multi_thread")]
async fn requests_without_sampling_fields_get_the_models_defaults() {
    let Some(cases) = chat_cases() else { return };
    let case = &cases[0];
    let c = client();
    let run = |d: &Served, fields: Value| {
        let c = c.clone();
        let url = d.url("/v1/chat/completions");
        let mut body = json!({"messages": case.messages, "max_tokens": 24, "seed": 11,
                               "include_reasoning": true});
        for (k, v) in fields.as_object().unwrap() {
            body[k] = v.clone();
        }
        async move { choices(&ok(&c, &url, &body).await)[0].clone() }
    };
    let Some(d) = Served::start(MODEL, &[]) else {
        return;
    };
    let models: Value = c
        .get(d.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        models["data"][0]["sampling_defaults"],
        json!({"temperature": 0.6, "top_p": 0.95})
    );
    assert_eq!(models["data"][0]["reasoning_parser"], "deepseek_r1");
    let omitted = run(&d, json!({})).await;
    assert_eq!(
        omitted,
        run(&d, json!({"temperature": 0.6, "top_p": 0.95})).await
    );
    assert_ne!(
        omitted,
        run(&d, json!({"temperature": 1.0, "top_p": 1.0})).await
    );
    drop(d);

    let Some(d) = Served::start(MODEL, &["--generation-config", "vllm"]) else {
        return;
    };
    let omitted = run(&d, json!({})).await;
    assert_eq!(
        omitted,
        run(&d, json!({"temperature": 1.0, "top_p": 1.0})).await
    );
    assert_ne!(
        omitted,
        run(&d, json!({"temperature": 0.6, "top_p": 0.95})).await
    );
}

/// History turns with reasoning and tool calls reach the template as transformers passes
/// them; tools are given to the template.
#[tokio::test(flavor = "multi_thread")]
async fn history_reasoning_and_tool_calls_reach_the_template() {
    let Some(cases) = chat_cases() else { return };
    let Some(d) = Served::start(MODEL, &[]) else {
        return;
    };
    let c = client();
    let tokenize = |body: Value| {
        let c = c.clone();
        let url = d.url("/tokenize");
        async move { ok(&c, &url, &body).await["tokens"].clone() }
    };
    let multi = cases
        .iter()
        .find(|c| c.name == "multi_turn_strips_old_reasoning")
        .expect("case");
    // The answer sent back with its reasoning in the field vLLM returned it in: R1's template
    // drops history reasoning, so the prompt is the same.
    let mut with_field = multi.messages.clone();
    with_field[1] = json!({"role": "assistant", "content": "\n\nHello! How can I help?",
                           "reasoning_content": "The user greets me."});
    assert_eq!(
        tokenize(json!({"messages": with_field})).await,
        json!(multi.prompt_ids)
    );
    with_field[1]["reasoning"] = with_field[1]["reasoning_content"].take();
    assert_eq!(
        tokenize(json!({"messages": with_field})).await,
        json!(multi.prompt_ids)
    );
    let v = ok(
        &c,
        &d.url("/v1/chat/completions"),
        &chat(&with_field, json!({"max_tokens": 2})),
    )
    .await;
    assert_eq!(v["usage"]["prompt_tokens"], multi.prompt_ids.len());

    let tools = json!([{"type": "function", "function": {"name": "order_status",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "integer"}}}}}]);
    let tool = cases
        .iter()
        .find(|c| c.name == "tool_call_history")
        .expect("case");
    assert_eq!(
        tokenize(json!({"messages": tool.messages, "tools": tools})).await,
        json!(tool.prompt_ids),
        "R1's template does not list tools: the same ids"
    );
    let v = ok(
        &c,
        &d.url("/v1/chat/completions"),
        &chat(
            &tool.messages,
            json!({"max_tokens": 2, "tools": tools, "tool_choice": "none"}),
        ),
    )
    .await;
    assert_eq!(v["usage"]["prompt_tokens"], tool.prompt_ids.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn reasoning_fields_are_refused_where_they_cannot_be_honoured() {
    let Some(_) = models_dir() else { return };
    // tiny-random-qwen2 has the <think> tokens but a template that never writes <think>: auto
    // leaves the parser off.
    let Some(d) = Served::start("tiny-random-qwen2", &[]) else {
        return;
    };
    let c = client();
    let url = d.url("/v1/chat/completions");
    let msgs = json!([{"role": "user", "content": "hi"}]);
    for (field, value) in [
        ("max_reasoning_tokens", json!(4)),
        ("reasoning_effort", json!("low")),
    ] {
        let (status, v) = post(
            &c,
            &url,
            &json!({"messages": msgs, field: value, "max_tokens": 2}),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{field}: {v}");
        assert_eq!(v["error"]["param"], field);
    }
    let v = ok(&c, &url, &json!({"messages": msgs, "max_tokens": 2})).await;
    let m = &v["choices"][0]["message"];
    assert!(
        m["content"].is_string() && m.get("reasoning_content").is_none(),
        "{m}"
    );
    assert!(v["usage"].get("completion_tokens_details").is_none());
    drop(d);

    let Some(d) = Served::start(MODEL, &[]) else {
        return;
    };
    let url = d.url("/v1/chat/completions");
    for body in [
        json!({"messages": msgs, "reasoning_effort": "extreme"}),
        json!({"messages": msgs, "max_reasoning_tokens": -1}),
    ] {
        let (status, v) = post(&c, &url, &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert!(
            v["error"]["param"].as_str().unwrap().contains("reasoning"),
            "{v}"
        );
    }
    drop(d);

    // Settings that cannot work stop the daemon at start-up, naming the flag.
    let dir = models_dir().unwrap();
    for (model, flags, says) in [
        (
            "tiny-llama-v512",
            vec!["--reasoning-parser", "deepseek_r1"],
            "--reasoning-parser",
        ),
        (
            MODEL,
            vec!["--reasoning-budget-message", "stop thinking"],
            "--reasoning-budget-message",
        ),
        (MODEL, vec!["--reasoning-budget", "-5"], "reasoning_budget"),
    ] {
        let out = distillery_command()
            .arg("serve")
            .args(["--host", "127.0.0.1", "--port", "0", "--model"])
            .arg(dir.join(model))
            .args(&flags)
            .output()
            .expect("run the daemon");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} must not start");
        assert!(err.contains(says), "{flags:?}: {err}");
    }
}
