//! The worker endpoints routers call (vllm-router, the SGLang gateway), through the real
//! daemon: `/server_info` and `/model_info` with the types the routers parse, `/get_load` in
//! both shapes following real load, the render endpoints agreeing with what a generation
//! actually runs, `/flush_cache` emptying the prefix cache, `/health_generate` running a token.

mod common;

use prom_text_format_parser::Scrape;
use reqwest::StatusCode;
use serde_json::{json, Value};

use common::http::{client, get_json, ok, post};
use common::scrape::{scrape, value};
use common::served::Served;

const LLAMA: &str = "tiny-llama-v512";
const R1: &str = "tiny-r1-distill-qwen2";

fn counter(s: &Scrape, name: &str) -> f64 {
    value(s, &format!("vllm:{name}"), &[])
}

/// Both spellings of each info endpoint answer the same, with the fields and JSON types the
/// routers read (the SGLang gateway drops every field when one has the wrong type).
#[tokio::test(flavor = "multi_thread")]
async fn server_and_model_info_describe_the_worker() {
    let Some(d) = Served::start(
        LLAMA,
        &[
            "--block-size",
            "8",
            "--data-parallel-size",
            "2",
            "--served-model-name",
            "intent",
        ],
    ) else {
        return;
    };
    let c = client();
    let info = get_json(&c, &d.url("/server_info")).await;
    assert_eq!(info, get_json(&c, &d.url("/get_server_info")).await);
    assert_eq!(info["model_id"], "intent");
    assert_eq!(info["served_model_name"], "intent");
    assert!(
        info.get("model").is_none(),
        "the gateway takes model as model_id's alias"
    );
    assert!(
        info["model_path"].as_str().unwrap().ends_with(LLAMA),
        "{info}"
    );
    assert_eq!(info["kv_block_size"], 8);
    assert_eq!(info["dp_size"], 2);
    assert_eq!(info["tp_size"], 1);
    for key in [
        "max_total_tokens",
        "max_running_requests",
        "max_prefill_tokens",
    ] {
        assert!(info[key].as_u64().is_some_and(|n| n > 0), "{key}: {info}");
    }
    assert!(info["instance_id"].as_str().is_some_and(|s| !s.is_empty()));

    let model = get_json(&c, &d.url("/model_info")).await;
    assert_eq!(model, get_json(&c, &d.url("/get_model_info")).await);
    assert_eq!(model["is_generation"], true);
    assert_eq!(model["model_type"], "llama");
    assert_eq!(model["architectures"], json!(["LlamaForCausalLM"]));
    assert_eq!(model["model_path"], info["model_path"]);
    assert_eq!(model["tokenizer_path"], info["model_path"]);
}

/// Polls `/get_load` until `done` holds of it (the engine publishes its figures at the end of
/// each step), for at most ten seconds.
async fn load_until(c: &reqwest::Client, url: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let load = get_json(c, url).await;
        if done(&load) || std::time::Instant::now() > deadline {
            return load;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// SGLang's shape by default (one entry per replica), vllm-router's with the flag; both count
/// a request in flight and its tokens, and read zero when it is over.
#[tokio::test(flavor = "multi_thread")]
async fn get_load_follows_requests_in_both_shapes() {
    let Some(d) = Served::start(LLAMA, &["--data-parallel-size", "2"]) else {
        return;
    };
    let c = client();
    let url = d.url("/get_load");
    let idle = get_json(&c, &url).await;
    let ranks = idle.as_array().expect("an array, one entry per replica");
    assert_eq!(ranks.len(), 2, "{idle}");
    for (i, r) in ranks.iter().enumerate() {
        assert_eq!(r["dp_rank"], i);
        for key in ["num_reqs", "num_waiting_reqs", "num_tokens"] {
            assert_eq!(r[key], 0, "{key} idle: {idle}");
        }
    }
    // A long streamed request: its first bytes mean it runs.
    let mut body = json!({"prompt": "a long one", "max_tokens": 1500, "ignore_eos": true,
                          "stream": true});
    let mut busy = c
        .post(d.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .expect("POST");
    assert_eq!(busy.status(), StatusCode::OK);
    busy.chunk().await.expect("a first chunk");
    let total = |v: &Value, key: &str| -> u64 {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| r[key].as_u64().unwrap())
            .sum()
    };
    let loaded = load_until(&c, &url, |v| total(v, "num_tokens") > 0).await;
    assert_eq!(total(&loaded, "num_reqs"), 1, "{loaded}");
    assert!(total(&loaded, "num_tokens") > 0, "{loaded}");
    drop(busy);
    let after = load_until(&c, &url, |v| total(v, "num_reqs") == 0).await;
    assert_eq!(
        total(&after, "num_tokens"),
        0,
        "the cancelled request let go: {after}"
    );

    let Some(v) = Served::start(LLAMA, &["--get-load-format", "vllm"]) else {
        return;
    };
    let url = v.url("/get_load");
    assert_eq!(get_json(&c, &url).await, json!({"load": 0}));
    body["max_tokens"] = json!(1500);
    let mut busy = c
        .post(v.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .expect("POST");
    busy.chunk().await.expect("a first chunk");
    let loaded = load_until(&c, &url, |l| l["load"] == 1).await;
    assert_eq!(loaded, json!({"load": 1}));
    assert_eq!(
        get_json(&c, &v.url("/load")).await,
        json!({"server_load": 1})
    );
}

/// What render says a request runs is what it runs: the chat render's ids have the length
/// the chat's usage reports (a reasoning model's forced end of thinking included) and equal
/// `/tokenize`'s where no thinking is cut; the completions render gives one entry per prompt,
/// ids passed through as given.
#[tokio::test(flavor = "multi_thread")]
async fn render_gives_the_prompt_a_request_runs() {
    let Some(d) = Served::start(R1, &[]) else {
        return;
    };
    let c = client();
    let messages = json!([{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Where is my order?"}]);
    for budget in [json!(null), json!(0)] {
        let body = json!({"messages": messages, "max_tokens": 2, "max_reasoning_tokens": budget,
                          "temperature": 0.7, "tools": [{"type": "function", "function":
                              {"name": "track", "parameters": {"type": "object"}}}]});
        let rendered = ok(&c, &d.url("/v1/chat/completions/render"), &body).await;
        let ids = rendered["token_ids"].as_array().expect("token_ids").len();
        assert!(rendered["features"].is_null());
        assert_eq!(rendered["num_tokens"], ids);
        let prompt = rendered["prompt"].as_str().expect("the rendered text");
        assert!(prompt.contains("Where is my order?"), "{prompt:?}");
        let ran = ok(&c, &d.url("/v1/chat/completions"), &body).await;
        assert_eq!(ran["usage"]["prompt_tokens"], ids, "budget {budget}");
        let tokenized = ok(
            &c,
            &d.url("/tokenize"),
            &json!({"messages": messages, "tools": body["tools"]}),
        )
        .await;
        let plain = tokenized["tokens"].as_array().unwrap();
        if budget.is_null() {
            assert_eq!(&rendered["token_ids"], &tokenized["tokens"]);
        } else {
            // No thinking: the end of the thought is part of the prompt.
            assert!(ids > plain.len());
            assert_eq!(
                rendered["token_ids"].as_array().unwrap()[..plain.len()],
                plain[..]
            );
            assert!(prompt.ends_with("</think>\n\n"), "{prompt:?}");
        }
    }
    let url = d.url("/v1/completions/render");
    let many = ok(&c, &url, &json!({"prompt": ["one", "two three"]})).await;
    let many = many.as_array().expect("one entry per prompt");
    assert_eq!(many.len(), 2);
    for (entry, text) in many.iter().zip(["one", "two three"]) {
        assert_eq!(entry["prompt"], text);
        let want = ok(&c, &d.url("/tokenize"), &json!({ "prompt": text })).await;
        assert_eq!(entry["token_ids"], want["tokens"]);
    }
    let ids = ok(&c, &url, &json!({"prompt": [[5, 6, 7]]})).await;
    assert_eq!(ids[0]["token_ids"], json!([5, 6, 7]));
    assert!(ids[0]["prompt"].is_null());
    let (status, err) = post(&c, &url, &json!({"prompt": [[999_999]]})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert_eq!(err["error"]["param"], "prompt");
    let (status, err) = post(
        &c,
        &d.url("/v1/chat/completions/render"),
        &json!({"model": "other", "messages": messages}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{err}");
}

/// `/flush_cache` (and `/reset_prefix_cache`) forget every cached block nobody holds: the same
/// prompt that hit the cache before the flush misses after it. `/health_generate` runs one
/// token through the engine.
#[tokio::test(flavor = "multi_thread")]
async fn flush_cache_forgets_cached_prompts_and_health_generate_generates() {
    let Some(d) = Served::start(LLAMA, &["--block-size", "8"]) else {
        return;
    };
    let c = client();
    let base = d.url("");
    let prompt = "the same long system prompt, said once and then said again, ".repeat(4);
    let body = json!({"prompt": prompt, "max_tokens": 1});
    // The engine's own count, fixed at admission (the metrics are published a step later).
    let cached_tokens = |v: &Value| {
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or_else(|| panic!("cached_tokens in {v}"))
    };
    ok(&c, &d.url("/v1/completions"), &body).await;
    let repeat = ok(&c, &d.url("/v1/completions"), &body).await;
    assert!(
        cached_tokens(&repeat) > 0,
        "the repeat hit the cache: {repeat}"
    );

    for (path, some) in [("/flush_cache", true), ("/reset_prefix_cache", false)] {
        let r = c.post(d.url(path)).send().await.expect("POST");
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        let v: Value = r.json().await.expect("JSON");
        let dropped = v["blocks_dropped"].as_u64().expect("blocks_dropped");
        assert_eq!(dropped > 0, some, "{path}: {v}");
    }
    // The flush publishes the engine's figures before it answers.
    let s = scrape(&c, &base).await;
    assert_eq!(
        value(&s, "distillery:kv_cache_blocks", &[("state", "cached")]),
        0.0
    );
    let after = ok(&c, &d.url("/v1/completions"), &body).await;
    assert_eq!(
        cached_tokens(&after),
        0,
        "nothing cached after the flush: {after}"
    );

    let s3 = scrape(&c, &base).await;
    let r = c.get(d.url("/health_generate")).send().await.expect("GET");
    assert_eq!(r.status(), StatusCode::OK);
    let s4 = scrape(&c, &base).await;
    assert_eq!(
        counter(&s4, "generation_tokens_total") - counter(&s3, "generation_tokens_total"),
        1.0,
        "one token through the engine"
    );
}

/// `--data-parallel-size auto` (the default): a replica per core for a model whose steps are
/// overhead-bound, one replica for a compute-bound one. `/server_info` reports the count.
#[tokio::test(flavor = "multi_thread")]
async fn auto_replicas_follow_the_models_shape() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (model, want) in [(LLAMA, cores), ("bench-llama-25m", 1)] {
        let Some(d) = Served::start(model, &["--data-parallel-size", "auto"]) else {
            return;
        };
        let info = get_json(&client(), &d.url("/server_info")).await;
        assert_eq!(info["dp_size"], want, "{model}: {info}");
    }
}
