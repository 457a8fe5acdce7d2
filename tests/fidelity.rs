//! OpenAI/vLLM fidelity through the real daemon: prompt logprobs (echo, `prompt_logprobs`,
//! `max_tokens: 0`) agreeing with the decode path, refused and informational fields, `best_of`,
//! `continue_final_message`, `continuous_usage_stats`, `/v1/models/{id}`, `/tokenizer_info`,
//! numbers that must add up (cached tokens, text offsets in characters, top logprobs holding
//! the sampled token, a partial UTF-8 token's bytes), wire details (Unicode line separators,
//! one `created` per stream, signed seeds), the request id in the log, and configs refused at
//! start-up.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use common::daemon::{distillery_command, DaemonProcess};
use common::http::{client, ok, post, post_raw, stream};
use common::models_dir;

const MODEL: &str = "tiny-random-qwen2";

struct Daemon {
    process: DaemonProcess,
    log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    fn start(model: &str, extra: &[&str]) -> Option<Daemon> {
        let dir = models_dir()?.join(model);
        let mut cmd = distillery_command();
        cmd.arg("serve")
            .args(["--host", "127.0.0.1", "--port", "0", "--model"])
            .arg(&dir)
            .args(["--kv-cache-memory", "32MiB"])
            .args(extra);
        let log = Arc::new(Mutex::new(Vec::new()));
        let keep = log.clone();
        let process =
            DaemonProcess::spawn(cmd, &format!("the daemon ({extra:?})"), 200, move |l| {
                keep.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(l.to_string());
            });
        Some(Daemon { process, log })
    }

    fn url(&self, path: &str) -> String {
        self.process.url(path)
    }

    fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- daemon log -----\n{}\n-----", self.process.tail());
        }
    }
}

async fn refused(c: &reqwest::Client, url: &str, body: &Value, param: &str) -> Value {
    let (status, v) = post(c, url, body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body} -> {v}");
    assert_eq!(v["error"]["param"], param, "{body} -> {v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    v
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|t| t.as_u64().expect("id") as u32)
        .collect()
}

fn f32s(v: &Value) -> Vec<Option<f32>> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().map(|f| f as f32))
        .collect()
}

async fn tokenize(c: &reqwest::Client, d: &Daemon, text: &str) -> Vec<u32> {
    let v = ok(
        c,
        &d.url("/tokenize"),
        &json!({"prompt": text, "add_special_tokens": false}),
    )
    .await;
    ids(&v["tokens"])
}

async fn decode(c: &reqwest::Client, d: &Daemon, tokens: &[u32]) -> String {
    let v = ok(c, &d.url("/detokenize"), &json!({ "tokens": tokens })).await;
    v["prompt"].as_str().expect("text").to_string()
}

/// A token generated in decode has the logprob it gets when the same tokens come back as a
/// prompt: echo scores the prompt through the prefill path, and the two agree within 1e-4.
/// The same prompt sent again (its blocks now cached) is scored all the same, and its
/// `cached_tokens` says the cache was not used for it.
#[tokio::test(flavor = "multi_thread")]
async fn prompt_logprobs_equal_the_decode_path_and_skip_the_cache() {
    let Some(d) = Daemon::start(MODEL, &["--block-size", "4"]) else {
        return;
    };
    let c = client();
    let prompt = tokenize(&c, &d, "The quick brown fox jumps over the lazy dog").await;
    let gen = ok(
        &c,
        &d.url("/v1/completions"),
        &json!({"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 0,
                "ignore_eos": true}),
    )
    .await;
    let lp = &gen["choices"][0]["logprobs"];
    let generated_lps = f32s(&lp["token_logprobs"]);
    assert_eq!(generated_lps.len(), 6, "{gen}");
    // Greedy again, one step at a time from the growing prompt: the same tokens, whose ids
    // the tokenizer gives back (each is one token of its own text).
    let mut fed = prompt.clone();
    let mut expected = Vec::new();
    for step in 0..6 {
        let v = ok(
            &c,
            &d.url("/v1/completions"),
            &json!({"prompt": fed, "max_tokens": 1, "temperature": 0, "logprobs": 0,
                    "ignore_eos": true, "prompt_logprobs": 0}),
        )
        .await;
        let choice = &v["choices"][0];
        let text = choice["text"].as_str().expect("text");
        assert_eq!(
            Some(text),
            lp["tokens"][step].as_str(),
            "step {step}: greedy again from the same tokens"
        );
        let next_lp = f32s(&choice["logprobs"]["token_logprobs"])[0].expect("logprob");
        assert!(
            (next_lp - generated_lps[step].expect("lp")).abs() < 1e-4,
            "step {step}: {next_lp} vs {:?}",
            generated_lps[step]
        );
        expected.push(next_lp);
        let candidates = tokenize(&c, &d, text).await;
        assert_eq!(candidates.len(), 1, "{text:?} is one token");
        fed.push(candidates[0]);
    }
    // The whole sequence back as a prompt, echoed with logprobs and no generation.
    let body = json!({"prompt": fed, "max_tokens": 0, "echo": true, "logprobs": 1,
                      "prompt_logprobs": 1});
    for round in 0..2 {
        let v = ok(&c, &d.url("/v1/completions"), &body).await;
        let choice = &v["choices"][0];
        let lps = f32s(&choice["logprobs"]["token_logprobs"]);
        assert_eq!(lps.len(), fed.len(), "round {round}: {v}");
        assert_eq!(lps[0], None, "the first prompt token has no logprob");
        assert!(lps[1..].iter().all(|l| l.is_some_and(|l| l <= 0.0)), "{v}");
        for (i, want) in expected.iter().enumerate() {
            let got = lps[prompt.len() + i].expect("lp");
            assert!(
                (got - want).abs() < 1e-4,
                "round {round}, token {i}: {got} vs {want}"
            );
        }
        assert_eq!(choice["finish_reason"], "length");
        assert_eq!(v["usage"]["completion_tokens"], 0);
        assert_eq!(
            v["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
            "round {round}"
        );
        assert_eq!(choice["text"], decode(&c, &d, &fed).await);
        // vLLM's shape: null, then per position the prompt token (with its rank) and the top 1.
        let pl = choice["prompt_logprobs"]
            .as_array()
            .expect("prompt_logprobs");
        assert_eq!(pl.len(), fed.len());
        assert!(pl[0].is_null());
        for (pos, entry) in pl.iter().enumerate().skip(1) {
            let own = &entry[fed[pos].to_string()];
            assert_eq!(
                own["logprob"].as_f64().map(|l| l as f32),
                lps[pos],
                "{entry}"
            );
            let rank = own["rank"].as_u64().expect("rank");
            let best = entry
                .as_object()
                .expect("map")
                .values()
                .find(|e| e["rank"] == 1)
                .expect("the top-1 entry");
            assert!(
                best["logprob"].as_f64() >= own["logprob"].as_f64(),
                "{entry}"
            );
            assert_eq!(
                rank == 1,
                entry.as_object().expect("map").len() == 1,
                "{entry}"
            );
        }
    }
    // The completion after an echoed prompt: prompt entries then the generated ones.
    let v = ok(
        &c,
        &d.url("/v1/completions"),
        &json!({"prompt": prompt, "max_tokens": 2, "echo": true, "logprobs": 2,
                "temperature": 0, "ignore_eos": true}),
    )
    .await;
    let lp2 = &v["choices"][0]["logprobs"];
    assert_eq!(f32s(&lp2["token_logprobs"]).len(), prompt.len() + 2, "{v}");
    assert!(lp2["top_logprobs"][0].is_null());
    assert_eq!(lp2["text_offset"][0], 0);
    // Chat: the rendered prompt's logprobs at the top level.
    let v = ok(
        &c,
        &d.url("/v1/chat/completions"),
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                "prompt_logprobs": 2}),
    )
    .await;
    let pl = v["prompt_logprobs"]
        .as_array()
        .expect("chat prompt_logprobs");
    assert_eq!(
        pl.len() as u64,
        v["usage"]["prompt_tokens"].as_u64().expect("n")
    );
    assert!(pl[0].is_null() && pl[1].is_object(), "{v}");
    refused(
        &c,
        &d.url("/v1/completions"),
        &json!({"prompt": "x", "prompt_logprobs": 21}),
        "prompt_logprobs",
    )
    .await;
    refused(
        &c,
        &d.url("/v1/completions"),
        &json!({"prompt": "x", "max_tokens": 0}),
        "max_tokens",
    )
    .await;
}

/// Every field that would change the answer and is not implemented is a 400 naming it;
/// its inert value, the informational fields and fields no server defines pass.
#[tokio::test(flavor = "multi_thread")]
async fn unhonoured_fields_are_refused_by_name_and_the_rest_pass() {
    let Some(d) = Daemon::start(MODEL, &[]) else {
        return;
    };
    let c = client();
    let chat = d.url("/v1/chat/completions");
    let cmpl = d.url("/v1/completions");
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let with = |base: &Value, k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    let chat_base = json!({"messages": msgs, "max_tokens": 2});
    let cmpl_base = json!({"prompt": "hi", "max_tokens": 2});
    let both: Vec<(&str, Value)> = vec![
        ("response_format", json!({"type": "json_object"})),
        ("structured_outputs", json!({"json": {"type": "object"}})),
        ("guided_json", json!({"type": "object"})),
        ("guided_regex", json!("a+")),
        ("guided_choice", json!(["a", "b"])),
        ("guided_grammar", json!("start: \"a\"")),
        ("use_beam_search", json!(true)),
        ("length_penalty", json!(0.5)),
        ("include_stop_str_in_output", json!(true)),
        ("allowed_token_ids", json!([1, 2])),
        ("bad_words", json!(["x"])),
        ("truncate_prompt_tokens", json!(5)),
        ("spaces_between_special_tokens", json!(false)),
        ("return_tokens_as_token_ids", json!(true)),
        ("cache_salt", json!("tenant")),
        ("priority", json!(5)),
    ];
    for (field, value) in &both {
        refused(&c, &chat, &with(&chat_base, field, value.clone()), field).await;
        refused(&c, &cmpl, &with(&cmpl_base, field, value.clone()), field).await;
    }
    refused(
        &c,
        &cmpl,
        &with(&cmpl_base, "suffix", json!("tail")),
        "suffix",
    )
    .await;
    for (field, value) in [
        ("tool_choice", json!("auto")),
        ("tool_choice", json!("required")),
        ("functions", json!([{"name": "f"}])),
        ("modalities", json!(["text", "audio"])),
        ("chat_template", json!("{{ messages }}")),
    ] {
        refused(&c, &chat, &with(&chat_base, field, value), field).await;
    }
    let tools = json!([{"type": "function", "function": {"name": "lookup", "parameters": {}}}]);
    let e = refused(
        &c,
        &chat,
        &with(&chat_base, "tools", tools.clone()),
        "tools",
    )
    .await;
    assert!(
        e["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("tool_choice")),
        "{e}"
    );
    // Tools shown to the model with calls off: honoured.
    let mut b = with(&chat_base, "tools", tools);
    b["tool_choice"] = json!("none");
    ok(&c, &chat, &b).await;
    // Inert values, informational fields, fields nobody defines.
    let mut b = chat_base.clone();
    for (k, v) in [
        ("response_format", json!({"type": "text"})),
        ("use_beam_search", json!(false)),
        ("length_penalty", json!(1.0)),
        ("spaces_between_special_tokens", json!(true)),
        ("priority", json!(0)),
        ("user", json!("u-1")),
        ("metadata", json!({"team": "support"})),
        ("store", json!(false)),
        ("service_tier", json!("auto")),
        ("parallel_tool_calls", json!(true)),
        ("some_field_no_server_defines", json!({"x": 1})),
    ] {
        b[k] = v;
    }
    ok(&c, &chat, &b).await;
    let mut b = cmpl_base.clone();
    b["suffix"] = json!("");
    b["user"] = json!("u-1");
    ok(&c, &cmpl, &b).await;
    // A message given as an array is no message.
    refused(
        &c,
        &chat,
        &json!({"messages": [["user", "hi"]]}),
        "messages[0]",
    )
    .await;
}

/// `best_of`: the engine samples `best_of` choices and returns the `n` with the highest
/// cumulative logprob, which a seeded `n: best_of` request shows independently.
#[tokio::test(flavor = "multi_thread")]
async fn best_of_returns_the_most_likely_of_its_samples() {
    let Some(d) = Daemon::start(MODEL, &[]) else {
        return;
    };
    let c = client();
    let url = d.url("/v1/completions");
    let common = json!({"prompt": "Once upon a time", "max_tokens": 5, "temperature": 1.0,
                        "seed": 7, "ignore_eos": true});
    let mut all = common.clone();
    all["n"] = json!(4);
    all["logprobs"] = json!(0);
    let v = ok(&c, &url, &all).await;
    let mut scored: Vec<(f64, String)> = v["choices"]
        .as_array()
        .expect("choices")
        .iter()
        .map(|ch| {
            let sum = f32s(&ch["logprobs"]["token_logprobs"])
                .into_iter()
                .map(|l| f64::from(l.expect("lp")))
                .sum();
            (sum, ch["text"].as_str().expect("text").to_string())
        })
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut best = common.clone();
    best["best_of"] = json!(4);
    best["n"] = json!(2);
    let v = ok(&c, &url, &best).await;
    let got: Vec<&str> = v["choices"]
        .as_array()
        .expect("choices")
        .iter()
        .map(|ch| ch["text"].as_str().expect("text"))
        .collect();
    assert_eq!(
        got,
        vec![scored[0].1.as_str(), scored[1].1.as_str()],
        "{scored:?}"
    );
    assert!(
        v["choices"][0]["logprobs"].is_null(),
        "logprobs were not asked for"
    );
    assert_eq!(v["choices"][1]["index"], 1);
    let mut bad = common.clone();
    bad["best_of"] = json!(1);
    bad["n"] = json!(2);
    refused(&c, &url, &bad, "best_of").await;
    let mut bad = common.clone();
    bad["best_of"] = json!(3);
    bad["stream"] = json!(true);
    refused(&c, &url, &bad, "best_of").await;
}

/// `continue_final_message`: the prompt ends inside the last (assistant) message; it is the
/// closed conversation's tokens cut after that message's text.
#[tokio::test(flavor = "multi_thread")]
async fn continue_final_message_leaves_the_last_message_open() {
    let Some(d) = Daemon::start("tiny-r1-distill-qwen2", &["--reasoning-parser", "none"]) else {
        return;
    };
    let c = client();
    let messages = json!([{"role": "user", "content": "What is two plus two?"},
                          {"role": "assistant", "content": "The answer is"}]);
    let closed = ok(
        &c,
        &d.url("/tokenize"),
        &json!({"messages": messages, "add_generation_prompt": false}),
    )
    .await;
    let closed = ids(&closed["tokens"]);
    let v = ok(
        &c,
        &d.url("/v1/chat/completions"),
        &json!({"messages": messages, "continue_final_message": true,
                "add_generation_prompt": false, "max_tokens": 1, "prompt_logprobs": 0}),
    )
    .await;
    let open: Vec<u32> = v["prompt_logprobs"]
        .as_array()
        .expect("prompt_logprobs")
        .iter()
        .enumerate()
        .map(|(i, e)| match i {
            0 => closed[0],
            _ => e
                .as_object()
                .expect("map")
                .iter()
                .find(|(_, x)| x["rank"].as_u64().is_some() && x.get("decoded_token").is_some())
                .map(|(k, _)| k.parse().expect("id"))
                .expect("entry"),
        })
        .collect();
    assert!(open.len() < closed.len(), "{open:?} vs {closed:?}");
    let text = decode(&c, &d, &closed[..open.len()]).await;
    assert!(text.ends_with("The answer is"), "{text:?}");
    assert_eq!(
        v["usage"]["prompt_tokens"].as_u64(),
        Some(open.len() as u64)
    );
    // add_generation_prompt defaults to false with it, and both true is refused.
    ok(
        &c,
        &d.url("/v1/chat/completions"),
        &json!({"messages": messages, "continue_final_message": true, "max_tokens": 1}),
    )
    .await;
    refused(
        &c,
        &d.url("/v1/chat/completions"),
        &json!({"messages": messages, "continue_final_message": true,
                "add_generation_prompt": true}),
        "continue_final_message",
    )
    .await;
    // chat_template_kwargs reach the template; they cannot replace the messages.
    let v = ok(
        &c,
        &d.url("/v1/chat/completions"),
        &json!({"messages": messages, "max_tokens": 1, "prompt_logprobs": 0,
                "chat_template_kwargs": {"messages": [], "enable_thinking": false}}),
    )
    .await;
    assert!(
        v["usage"]["prompt_tokens"].as_u64() > Some(closed.len() as u64 - 2),
        "{v}"
    );
}

/// `stream_options.continuous_usage_stats`: usage (so far) on every chunk; the numbers grow
/// and end where the non-streaming answer's do. `created` is one value per stream.
#[tokio::test(flavor = "multi_thread")]
async fn streams_carry_usage_on_every_chunk_and_one_created() {
    let Some(d) = Daemon::start(MODEL, &[]) else {
        return;
    };
    let c = client();
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                   "temperature": 0, "ignore_eos": true}),
        ),
        (
            "/v1/completions",
            json!({"prompt": "hello there", "max_tokens": 6, "temperature": 0,
                   "ignore_eos": true}),
        ),
    ] {
        let whole = ok(&c, &d.url(path), &body).await;
        let mut s = body.clone();
        s["stream"] = json!(true);
        s["stream_options"] = json!({"include_usage": true, "continuous_usage_stats": true});
        let chunks = stream(&c, &d.url(path), &s).await;
        let mut last = 0;
        for ch in &chunks {
            assert_eq!(ch["created"], chunks[0]["created"], "{path}: one created");
            let u = &ch["usage"];
            assert!(u.is_object(), "{path}: usage on every chunk: {ch}");
            let done = u["completion_tokens"].as_u64().expect("n");
            assert!(done >= last, "{path}: {done} after {last}");
            last = done;
        }
        assert_eq!(
            chunks.last().map(|c| &c["usage"]),
            Some(&whole["usage"]),
            "{path}"
        );
        // Without it only the last chunk has a usage value.
        s["stream_options"] = json!({"include_usage": true});
        let chunks = stream(&c, &d.url(path), &s).await;
        let with_usage = chunks.iter().filter(|c| c["usage"].is_object()).count();
        assert_eq!(with_usage, 1, "{path}");
    }
}

/// `GET /v1/models/{id}`, vLLM's model card fields and `GET /tokenizer_info`.
#[tokio::test(flavor = "multi_thread")]
async fn model_routes_and_tokenizer_info() {
    let Some(d) = Daemon::start(MODEL, &[]) else {
        return;
    };
    let c = client();
    let card: Value = c
        .get(d.url(&format!("/v1/models/{MODEL}")))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON");
    assert_eq!(card["id"], MODEL);
    assert_eq!(card["object"], "model");
    assert!(
        card["root"].as_str().is_some_and(|r| r.ends_with(MODEL)),
        "{card}"
    );
    assert!(card["max_model_len"].as_u64() > Some(0));
    let list: Value = c
        .get(d.url("/v1/models"))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON");
    assert_eq!(list["data"][0], card);
    let r = c
        .get(d.url("/v1/models/no-such-model"))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let e: Value = r.json().await.expect("JSON");
    assert_eq!(e["error"]["code"], "model_not_found", "{e}");
    let info: Value = c
        .get(d.url("/tokenizer_info"))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON");
    let eos = info["eos_token"].as_str().expect("eos_token");
    assert_eq!(tokenize(&c, &d, eos).await.len(), 1, "{eos:?} is one token");
    assert!(info["chat_template"].is_string());
    assert!(info["tokenizer_class"].is_string());
    assert!(info.get("added_tokens_decoder").is_none());
    // A served name with a slash, as hub ids have, sent unencoded.
    let Some(named) = Daemon::start(MODEL, &["--served-model-name", "Org/Tiny-1"]) else {
        return;
    };
    let r = c
        .get(named.url("/v1/models/Org/Tiny-1"))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), StatusCode::OK);
    let card: Value = r.json().await.expect("JSON");
    assert_eq!(card["id"], "Org/Tiny-1");
}

/// `cached_tokens` per request, never above `prompt_tokens` (`n: 4` shares one prompt).
#[tokio::test(flavor = "multi_thread")]
async fn cached_tokens_count_each_prompt_once() {
    let Some(d) = Daemon::start(MODEL, &["--block-size", "4"]) else {
        return;
    };
    let c = client();
    let body = json!({"prompt": "a prompt long enough to fill several blocks of four tokens",
                      "n": 4, "max_tokens": 2, "temperature": 1.0, "seed": 1});
    let mut greedy = String::new();
    for round in 0..3 {
        let mut body = body.clone();
        if round == 2 {
            // Ended by a stop string, which the engine hears of without a `Finished`.
            body["stop"] = json!([greedy.chars().skip(1).take(3).collect::<String>()]);
            body["n"] = json!(1);
            body["temperature"] = json!(0);
        }
        let v = ok(&c, &d.url("/v1/completions"), &body).await;
        if round == 1 {
            let g = ok(
                &c,
                &d.url("/v1/completions"),
                &json!({"prompt": body["prompt"], "max_tokens": 2, "temperature": 0}),
            )
            .await;
            greedy = g["choices"][0]["text"].as_str().expect("text").to_string();
        }
        let prompt = v["usage"]["prompt_tokens"].as_u64().expect("prompt");
        let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .expect("cached");
        assert!(cached <= prompt, "round {round}: {cached} > {prompt}");
        if round > 0 {
            assert!(
                cached > 0,
                "round {round}: the prompt is cached by now: {v}"
            );
        }
        if round == 2 && greedy.chars().count() > 3 {
            assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        }
    }
}

/// Completions' `text_offset` counts characters of the returned text; `top_logprobs` hold
/// the sampled token; chat's `bytes` are a token's own bytes, also when it ends inside a
/// character.
#[tokio::test(flavor = "multi_thread")]
async fn offsets_tops_and_bytes_add_up() {
    let Some(d) = Daemon::start(MODEL, &[]) else {
        return;
    };
    let c = client();
    let prompt = "héllo wörld — ünïcödé";
    let v = ok(
        &c,
        &d.url("/v1/completions"),
        &json!({"prompt": prompt, "max_tokens": 12, "echo": true, "logprobs": 1,
                "temperature": 1.5, "seed": 3, "ignore_eos": true}),
    )
    .await;
    let ch = &v["choices"][0];
    let text = ch["text"].as_str().expect("text");
    let lp = &ch["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_str().expect("str"))
        .collect();
    let offsets: Vec<usize> = lp["text_offset"]
        .as_array()
        .expect("offsets")
        .iter()
        .map(|o| o.as_u64().expect("n") as usize)
        .collect();
    let chars: Vec<char> = text.chars().collect();
    for (i, t) in tokens.iter().enumerate() {
        if t.contains('\u{FFFD}') {
            continue; // a token inside a character: its text is not in the answer
        }
        let at: String = chars[offsets[i]..].iter().collect();
        assert!(
            at.starts_with(t),
            "token {i} {t:?} at char {}: {at:?}",
            offsets[i]
        );
    }
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
    let lps = f32s(&lp["token_logprobs"]);
    for (i, top) in lp["top_logprobs"]
        .as_array()
        .expect("tops")
        .iter()
        .enumerate()
        .skip(1)
    {
        let top = top.as_object().expect("map");
        assert!(top.len() <= 2, "{top:?}");
        let own = top
            .get(tokens[i])
            .and_then(Value::as_f64)
            .expect("sampled token in top");
        assert_eq!(Some(own as f32), lps[i]);
        // (Their order, best first, is the serializer's: `protocol`'s unit test.)
    }
    // Skipped special tokens add no characters: a forced pad token is not in the text.
    let pad = tokenize(&c, &d, "<｜▁pad▁｜>").await;
    assert_eq!(pad.len(), 1);
    let v = ok(
        &c,
        &d.url("/v1/completions"),
        &json!({"prompt": "ab", "max_tokens": 3, "echo": true, "logprobs": 0,
                "logit_bias": {pad[0].to_string(): 100}, "ignore_eos": true}),
    )
    .await;
    let ch = &v["choices"][0];
    assert_eq!(ch["text"], "ab");
    let offsets = ch["logprobs"]["text_offset"]
        .as_array()
        .expect("offsets")
        .clone();
    assert_eq!(offsets[offsets.len() - 3..], [json!(2), json!(2), json!(2)]);
    // A character split over two tokens: each token's bytes are its own.
    let crab = "🦀";
    let parts = tokenize(&c, &d, crab).await;
    assert!(parts.len() >= 2, "{crab} is split: {parts:?}");
    let mut bytes = Vec::new();
    for &t in &parts {
        let v = ok(
            &c,
            &d.url("/v1/chat/completions"),
            &json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1,
                    "logprobs": true, "top_logprobs": 1, "ignore_eos": true,
                    "logit_bias": {t.to_string(): 100}}),
        )
        .await;
        let entry = &v["choices"][0]["logprobs"]["content"][0];
        bytes.extend(
            entry["bytes"]
                .as_array()
                .expect("bytes")
                .iter()
                .map(|b| b.as_u64().expect("byte") as u8),
        );
    }
    assert_eq!(bytes, crab.as_bytes());
}

/// An echoed text prompt's offsets count in the text as sent, which holds no BOS: on a
/// tokenizer that adds one (Llama's), the BOS takes no room and every other token is found
/// where its offset says.
#[tokio::test(flavor = "multi_thread")]
async fn echo_offsets_point_into_the_text_sent_when_a_bos_was_added() {
    let Some(d) = Daemon::start("tiny-llama-v512", &[]) else {
        return;
    };
    let c = client();
    for prompt in ["Hi a", "Hello world, again", "naïve café"] {
        let v = ok(
            &c,
            &d.url("/v1/completions"),
            &json!({"prompt": prompt, "max_tokens": 2, "echo": true, "logprobs": 0,
                    "temperature": 0, "ignore_eos": true}),
        )
        .await;
        let ch = &v["choices"][0];
        let text: Vec<char> = ch["text"].as_str().expect("text").chars().collect();
        let lp = &ch["logprobs"];
        let tokens = lp["tokens"].as_array().expect("tokens");
        let offsets = lp["text_offset"].as_array().expect("offsets");
        assert_eq!(tokens[0], "<s>", "{v}");
        assert_eq!(offsets[0], 0);
        let mut last = 0;
        for (t, o) in tokens.iter().zip(offsets).skip(1) {
            let (t, o) = (t.as_str().expect("str"), o.as_u64().expect("n") as usize);
            assert!(
                o >= last,
                "{prompt:?}: offsets go back at {t:?}: {offsets:?}"
            );
            last = o;
            if ["<s>", "</s>", "<unk>"].contains(&t) {
                continue; // special: skipped in the text, it takes no room there
            }
            // Bytes that never became a character (a random model's) show as U+FFFD in
            // front of the token that ended them.
            let at: String = text[o..].iter().collect();
            let at = at.trim_start_matches('\u{FFFD}');
            if t.contains('\u{FFFD}') {
                continue;
            }
            assert!(
                at.trim_start().starts_with(t.trim_start()),
                "{prompt:?}: {t:?} at {o}: {at:?}"
            );
        }
    }
}

/// U+2028, U+2029 and U+0085 never appear raw in a response (line readers split on them);
/// the escaped text decodes to the same string. Seeds take any signed 64-bit integer.
#[tokio::test(flavor = "multi_thread")]
async fn line_separators_are_escaped_and_seeds_are_signed() {
    let Some(d) = Daemon::start(MODEL, &[]) else {
        return;
    };
    let c = client();
    let prompt = "one\u{2028}two\u{2029}three\u{85}four";
    let body = json!({"prompt": prompt, "max_tokens": 1, "echo": true});
    let (status, raw) = post_raw(&c, &d.url("/v1/completions"), &body).await;
    assert_eq!(status, StatusCode::OK);
    for ch in ['\u{2028}', '\u{2029}', '\u{85}'] {
        assert!(!raw.contains(ch), "{ch:?} raw in {raw}");
    }
    let v: Value = serde_json::from_str(&raw).expect("JSON");
    assert!(v["choices"][0]["text"]
        .as_str()
        .is_some_and(|t| t.starts_with(prompt)));
    let mut s = body.clone();
    s["stream"] = json!(true);
    let (_, raw) = post_raw(&c, &d.url("/v1/completions"), &s).await;
    assert!(
        !raw.contains('\u{2028}') && raw.contains("\\u2028"),
        "{raw}"
    );
    for seed in [json!(-1), json!(i64::MIN), json!(i64::MAX)] {
        let b = json!({"prompt": "x", "max_tokens": 3, "temperature": 1.0, "seed": seed});
        let a = ok(&c, &d.url("/v1/completions"), &b).await;
        let again = ok(&c, &d.url("/v1/completions"), &b).await;
        assert_eq!(
            a["choices"][0]["text"], again["choices"][0]["text"],
            "seed {seed}"
        );
    }
}

/// The client's `x-request-id` is in the daemon's log line for that request, in both log
/// formats, so the proxy's log joins the daemon's.
#[tokio::test(flavor = "multi_thread")]
async fn the_request_id_is_in_the_log_line() {
    for format in ["pretty", "json"] {
        let Some(d) = Daemon::start(MODEL, &["--log-format", format]) else {
            return;
        };
        let c = client();
        let id = format!("join-me-{format}-42");
        let r = c
            .post(d.url("/v1/chat/completions"))
            .header("x-request-id", &id)
            .json(&json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
            .send()
            .await
            .expect("POST");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["x-request-id"], id.as_str());
        let _ = r.text().await;
        let refused_id = format!("refused-{format}");
        let r = c
            .post(d.url("/v1/completions"))
            .header("x-request-id", &refused_id)
            .json(&json!({"prompt": "x", "suffix": "y"}))
            .send()
            .await
            .expect("POST");
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let _ = r.text().await;
        // The line is written before the response's last byte leaves: no waiting needed
        // beyond the log pipe, which is read by another thread; poll it briefly.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let lines = d.log_lines();
            let finished = lines
                .iter()
                .any(|l| l.contains("request finished") && l.contains(&id));
            let rejected = lines
                .iter()
                .any(|l| l.contains("request rejected") && l.contains(&refused_id));
            if finished && rejected {
                if format == "json" {
                    let line = lines.iter().find(|l| l.contains(&id)).expect("line");
                    let v: Value = serde_json::from_str(line).expect("a JSON log line");
                    assert_eq!(v["fields"]["request_id"], id.as_str(), "{v}");
                }
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{format}: no log line with {id} / {refused_id}:\n{}",
                lines.join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A folder removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("distillery-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        Self(p)
    }

    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Configs the loader cannot honour are refused at start-up with the field's name.
#[test]
fn configs_that_would_lie_are_refused_at_start_up() {
    let Some(models) = models_dir() else {
        return;
    };
    let src = models.join("tiny-llama-v512");
    for (field, edit) in [
        (
            "use_sliding_window",
            json!({"use_sliding_window": true, "sliding_window": 16, "max_window_layers": 1}),
        ),
        (
            "quantization_config",
            json!({"quantization_config": {"quant_method": "gptq"}}),
        ),
        (
            "rope_scaling",
            json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
        ),
    ] {
        let dir = TempDir::new(field);
        for entry in std::fs::read_dir(&src).expect("model dir") {
            let entry = entry.expect("entry");
            let name = entry.file_name();
            if name != "config.json" {
                std::os::unix::fs::symlink(entry.path(), dir.path().join(&name)).expect("link");
            }
        }
        let mut config: Value = serde_json::from_str(
            &std::fs::read_to_string(src.join("config.json")).expect("config"),
        )
        .expect("JSON");
        for (k, v) in edit.as_object().expect("map") {
            config[k] = v.clone();
        }
        std::fs::write(dir.path().join("config.json"), config.to_string()).expect("write");
        let out = distillery_command()
            .args(["serve", "--host", "127.0.0.1", "--port", "0", "--model"])
            .arg(dir.path())
            .output()
            .expect("run");
        assert!(!out.status.success(), "{field}: started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(field), "{field}: {err}");
    }
}
