//! Property 2: chat messages → chat-template rendering, in process, with the real templates
//! of the built-in model and of every folder under `../shared/models` that has one.

use std::time::Instant;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::TestCaseError;
use serde_json::{json, Map, Value};

use distillery::tokenizer::{ChatMessage, Tokenizer};

use crate::common;
use crate::{any_json, builtin_tokenizer, run, weird_string};

pub(crate) const ROLES: &[&str] = &["system", "user", "assistant", "tool", "developer"];

fn role() -> BoxedStrategy<Value> {
    prop_oneof![
        24 => select(ROLES).prop_map(Value::from),
        1 => weird_string().prop_map(Value::from),
        1 => any_json(),
    ]
    .boxed()
}

fn content_part() -> BoxedStrategy<Value> {
    let kind = prop_oneof![
        12 => Just(Value::from("text")),
        2 => select(&["image_url", "input_audio", "refusal", "TEXT"][..]).prop_map(Value::from),
        1 => any_json(),
    ];
    let text = prop_oneof![
        12 => weird_string().prop_map(|s| Some(Value::from(s))),
        2 => Just(Some(Value::Null)),
        2 => Just(None),
        1 => any_json().prop_map(Some),
    ];
    prop_oneof![
        20 => (kind, text, any::<bool>()).prop_map(|(kind, text, extra)| {
            let mut m = Map::new();
            m.insert("type".into(), kind);
            if let Some(t) = text {
                m.insert("text".into(), t);
            }
            if extra {
                m.insert("image_url".into(), json!({ "url": "data:," }));
            }
            Value::Object(m)
        }),
        1 => (weird_string(), weird_string()).prop_map(|(k, t)| json!([k, t])),
        1 => any_json(),
    ]
    .boxed()
}

pub(crate) fn content() -> BoxedStrategy<Option<Value>> {
    prop_oneof![
        12 => weird_string().prop_map(|s| Some(Value::from(s))),
        4 => vec(content_part(), 0..4).prop_map(|p| Some(Value::Array(p))),
        2 => Just(Some(Value::Null)),
        2 => Just(None),
        1 => any_json().prop_map(Some),
    ]
    .boxed()
}

/// An OpenAI chat message, mostly well formed, with the odd extra key or wrong shape.
pub(crate) fn message() -> BoxedStrategy<Value> {
    let extra = prop_oneof![
        6 => Just(None),
        1 => Just(Some(("name".to_string(), Value::from("fuzzer")))),
        1 => Just(Some((
            "tool_calls".to_string(),
            json!([{ "id": "call_1", "type": "function",
                     "function": { "name": "f", "arguments": "{}" } }]),
        ))),
        1 => Just(Some(("tool_call_id".to_string(), Value::from("call_1")))),
        1 => (weird_string(), any_json()).prop_map(Some),
    ];
    prop_oneof![
        30 => (prop::option::weighted(0.97, role()), content(), extra).prop_map(
            |(role, content, extra)| {
                let mut m = Map::new();
                if let Some(r) = role {
                    m.insert("role".into(), r);
                }
                if let Some(c) = content {
                    m.insert("content".into(), c);
                }
                if let Some((k, v)) = extra {
                    m.insert(k, v);
                }
                Value::Object(m)
            }
        ),
        // The sequence form serde would take for a struct: refused, a message is an object.
        1 => (select(ROLES), weird_string()).prop_map(|(r, c)| json!([r, c])),
        1 => vec(any_json(), 0..4).prop_map(Value::Array),
        1 => any_json(),
    ]
    .boxed()
}
// ---------------------------------------------------------------------------------------------
// Property 2: chat messages → template rendering, in process.
// ---------------------------------------------------------------------------------------------

/// Every real template there is: the built-in model's, and each model folder's.
fn templates() -> Vec<(String, Tokenizer)> {
    let mut out = vec![("builtin:tiny".to_string(), builtin_tokenizer())];
    let Some(dir) = common::models_dir() else {
        eprintln!(
            "\n!!! SKIPPING the model folders' chat templates: ../shared/models is absent; \
             fuzzing the built-in template only !!!\n"
        );
        return out;
    };
    let mut folders: Vec<_> = std::fs::read_dir(&dir)
        .expect("models dir readable")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("tokenizer.json").is_file())
        .collect();
    folders.sort();
    for folder in folders {
        let name = folder
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let tokenizer =
            Tokenizer::from_dir(&folder).unwrap_or_else(|e| panic!("{name}: tokenizer loads: {e}"));
        if tokenizer.chat_template().is_some() {
            out.push((name, tokenizer));
        } else {
            eprintln!("fuzz: {name} has no chat template");
        }
    }
    out
}

/// What the server hands a template: role and content strings (parts joined, null empty).
fn as_server_messages(messages: &[Value]) -> Vec<ChatMessage> {
    messages
        .iter()
        .filter_map(|m| {
            let role = m.get("role")?.as_str()?;
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect(),
                _ => String::new(),
            };
            Some(ChatMessage::new(role, content))
        })
        .collect()
}

fn check_render(
    name: &str,
    what: &str,
    result: Result<String, distillery::tokenizer::TokenizerError>,
) -> Result<Option<String>, TestCaseError> {
    match result {
        Ok(text) => Ok(Some(text)),
        Err(e) => {
            let message = e.to_string();
            prop_assert!(
                message.starts_with("chat template") && message.len() > "chat template: ".len(),
                "{name}: {what}: unclear error {message:?}"
            );
            Ok(None)
        }
    }
}

#[test]
fn chat_templates_render_or_refuse_any_message_list() {
    let templates = templates();
    let started = Instant::now();
    let messages = prop_oneof![
        8 => vec(message(), 0..6),
        1 => Just(Vec::new()),
        1 => vec(any_json(), 0..3),
    ];
    run(
        "chat templates, arbitrary messages",
        512,
        10,
        (messages, any::<bool>()),
        |(messages, add_generation_prompt)| {
            let plain = as_server_messages(&messages);
            for (name, tokenizer) in &templates {
                let template = tokenizer.chat_template().expect("has a template");
                check_render(
                    name,
                    "OpenAI messages",
                    template.render_serialized(&messages, add_generation_prompt, None),
                )?;
                check_render(
                    name,
                    "server messages",
                    tokenizer.apply_chat_template(&plain, add_generation_prompt),
                )?;
            }
            Ok(())
        },
    );
    let contents = vec(prop_oneof![3 => weird_string(), 1 => "[a-z ]{0,40}"], 1..7);
    run(
        "chat templates, user/assistant turns",
        512,
        11,
        (contents, any::<bool>()),
        |(contents, add_generation_prompt)| {
            let messages: Vec<ChatMessage> = contents
                .iter()
                .enumerate()
                .map(|(i, c)| ChatMessage::new(["user", "assistant"][i % 2], c.as_str()))
                .collect();
            for (name, tokenizer) in &templates {
                let rendered = check_render(
                    name,
                    "alternating turns",
                    tokenizer.apply_chat_template(&messages, add_generation_prompt),
                )?;
                if let Some(text) = rendered {
                    for m in &messages {
                        prop_assert!(
                            text.contains(m.text()),
                            "{name}: {} content {:?} is not in the rendering {text:?}",
                            m.role,
                            m.content
                        );
                    }
                }
            }
            Ok(())
        },
    );
    eprintln!(
        "fuzz: {} templates took {:.2} s",
        templates.len(),
        started.elapsed().as_secs_f64()
    );
}
