//! The request surface as OpenAI/vLLM clients meet it, through the real daemon: refused and
//! informational fields, `continue_final_message` and `chat_template_kwargs`,
//! `/v1/models/{id}` and `/tokenizer_info`, Unicode line separators and signed seeds, the
//! request id in the log, and configs refused at start-up.

mod common;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use common::daemon::distillery_command;
use common::http::{client, get_json, ok, post_raw};
use common::models_dir;
use common::served::{decode, ids, refused, tokenize, Served as Daemon};

const MODEL: &str = "tiny-random-qwen2";

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
        ("guided_whitespace_pattern", json!("\\s*")),
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
        ("functions", json!([{"name": "f"}])),
        ("modalities", json!(["text", "audio"])),
        ("chat_template", json!("{{ messages }}")),
    ] {
        refused(&c, &chat, &with(&chat_base, field, value), field).await;
    }
    // This model's template writes no tool calls: asking for them names the flag.
    let tools = json!([{"type": "function", "function": {"name": "lookup", "parameters": {}}}]);
    let e = refused(
        &c,
        &chat,
        &with(&chat_base, "tools", tools.clone()),
        "tool_choice",
    )
    .await;
    assert!(
        e["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("--tool-call-parser")),
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

/// `GET /v1/models/{id}`, vLLM's model card fields and `GET /tokenizer_info`.
#[tokio::test(flavor = "multi_thread")]
async fn model_routes_and_tokenizer_info() {
    let Some(d) = Daemon::start(MODEL, &[]) else {
        return;
    };
    let c = client();
    let card: Value = get_json(&c, &d.url(&format!("/v1/models/{MODEL}"))).await;
    assert_eq!(card["id"], MODEL);
    assert_eq!(card["object"], "model");
    assert!(
        card["root"].as_str().is_some_and(|r| r.ends_with(MODEL)),
        "{card}"
    );
    assert!(card["max_model_len"].as_u64() > Some(0));
    let list: Value = get_json(&c, &d.url("/v1/models")).await;
    assert_eq!(list["data"][0], card);
    let r = c
        .get(d.url("/v1/models/no-such-model"))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let e: Value = r.json().await.expect("JSON");
    assert_eq!(e["error"]["code"], "model_not_found", "{e}");
    let info: Value = get_json(&c, &d.url("/tokenizer_info")).await;
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
