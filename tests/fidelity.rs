//! OpenAI/vLLM fidelity of scores and counts, through the real daemon: prompt logprobs (echo,
//! `prompt_logprobs`, `max_tokens: 0`) agreeing with the decode path, `best_of`, usage on every
//! chunk, cached tokens, text offsets in characters, top logprobs holding the sampled token, a
//! partial UTF-8 token's bytes. The request surface (fields, routes, wire, logs, configs) is
//! `tests/api_surface.rs`.

mod common;

use serde_json::{json, Value};

use common::http::{client, ok, stream};
use common::served::{decode, f32s, refused, tokenize, Served as Daemon};

const MODEL: &str = "tiny-random-qwen2";

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
