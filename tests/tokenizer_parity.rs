//! The tokenizer module against transformers: encode/decode cases, golden prompts and
//! chat renderings of the shared test models, the streaming detokenizer's output, and
//! chat-template features checked against jinja2 on small inline templates.

use distillery::tokenizer::{ChatMessage, ChatTemplate, IncrementalDetokenizer, Tokenizer};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MODELS: [&str; 4] = [
    "tiny-random-qwen2",
    "tiny-random-llama",
    "bench-llama-25m",
    "tiny-llama-v512",
];

#[derive(Deserialize)]
struct TokenizerCases {
    vocab_size_with_added: usize,
    special_tokens: serde_json::Value,
    cases: Vec<TokenizerCase>,
}

#[derive(Deserialize)]
struct TokenizerCase {
    name: String,
    text: String,
    ids: Vec<u32>,
    decoded: String,
    ids_with_special: Vec<u32>,
    decoded_with_special: String,
    decoded_skip_special: String,
}

#[derive(Deserialize)]
struct Golden {
    cases: Vec<GoldenCase>,
}

#[derive(Deserialize)]
struct GoldenCase {
    name: String,
    prompt: String,
    chat_rendered: bool,
    messages: Option<Vec<ChatMessage>>,
    add_generation_prompt: Option<bool>,
    add_special_tokens: bool,
    prompt_ids: Vec<u32>,
    generated_ids: Vec<u32>,
    generated_text: String,
}

fn models_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models");
    if dir.is_dir() {
        return Some(dir);
    }
    eprintln!(
        "\n!!! SKIPPING: ../shared/models not found ({}); tokenizer parity tests need it !!!\n",
        dir.display()
    );
    None
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> T {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Each model folder with its tokenizer, or nothing where the models are absent.
fn models() -> Vec<(&'static str, PathBuf, Arc<Tokenizer>)> {
    let Some(root) = models_dir() else {
        return Vec::new();
    };
    MODELS
        .iter()
        .map(|name| {
            let dir = root.join(name);
            let tokenizer = Tokenizer::from_dir(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
            (*name, dir, Arc::new(tokenizer))
        })
        .collect()
}

/// Streams `ids` one by one; returns the deltas (finish's last) and the concatenation.
fn stream(mut detok: IncrementalDetokenizer, ids: &[u32]) -> (Vec<Option<String>>, String) {
    let mut deltas: Vec<Option<String>> = ids.iter().map(|&id| detok.push(id).unwrap()).collect();
    deltas.push(detok.finish().unwrap());
    let text = deltas.iter().flatten().map(String::as_str).collect();
    (deltas, text)
}

#[test]
fn tokenizer_cases_match_transformers() {
    for (name, dir, tok) in models() {
        let cases: TokenizerCases = read_json(&dir.join("tokenizer_cases.json"));
        assert_eq!(tok.vocab_size(), cases.vocab_size_with_added, "{name}");
        for c in &cases.cases {
            let what = format!("{name}/{}", c.name);
            assert_eq!(tok.encode(&c.text, false).unwrap(), c.ids, "{what}: ids");
            assert_eq!(
                tok.encode(&c.text, true).unwrap(),
                c.ids_with_special,
                "{what}: ids_with_special"
            );
            assert_eq!(
                tok.decode(&c.ids, false).unwrap(),
                c.decoded,
                "{what}: decoded"
            );
            assert_eq!(
                tok.decode(&c.ids_with_special, false).unwrap(),
                c.decoded_with_special,
                "{what}: decoded_with_special"
            );
            assert_eq!(
                tok.decode(&c.ids_with_special, true).unwrap(),
                c.decoded_skip_special,
                "{what}: decoded_skip_special"
            );
        }
        for key in ["bos_token", "eos_token"] {
            let want = &cases.special_tokens[key];
            let content = want["content"].as_str().unwrap();
            let id = want["id"].as_u64().unwrap() as u32;
            let got = if key == "bos_token" {
                tok.bos_token()
            } else {
                tok.eos_token()
            };
            assert_eq!(got, Some(content), "{name}: {key}");
            assert_eq!(tok.token_to_id(content), Some(id), "{name}: {key} id");
            assert_eq!(
                tok.id_to_token(id).as_deref(),
                Some(content),
                "{name}: {key}"
            );
        }
        let eos_id = cases.special_tokens["eos_token"]["id"].as_u64().unwrap() as u32;
        assert_eq!(tok.eos_token_id(), Some(eos_id), "{name}: eos_token_id");
    }
}

#[test]
fn golden_prompts_encode_render_and_decode() {
    for (name, dir, tok) in models() {
        let golden: Golden = read_json(&dir.join("golden.json"));
        let mut chat_cases = 0;
        for c in &golden.cases {
            let what = format!("{name}/{}", c.name);
            assert_eq!(
                tok.encode(&c.prompt, c.add_special_tokens).unwrap(),
                c.prompt_ids,
                "{what}: prompt_ids"
            );
            if c.chat_rendered {
                let messages = c.messages.as_ref().expect("chat case has messages");
                let agp = c.add_generation_prompt.unwrap_or(false);
                let rendered = tok.apply_chat_template(messages, agp).unwrap();
                assert_eq!(rendered, c.prompt, "{what}: rendered chat template");
                chat_cases += 1;
            }
            assert_eq!(
                tok.decode(&c.generated_ids, false).unwrap(),
                c.generated_text,
                "{what}: generated_text"
            );
        }
        assert!(
            chat_cases >= 2,
            "{name}: expected chat cases in golden.json"
        );
    }
}

/// Chat prompts encoded turn by turn, the leading turns reused from earlier prompts, give
/// exactly the ids of encoding the whole text, and the reuse stays on for every model here.
#[test]
fn chat_prompts_reusing_earlier_turns_encode_like_the_whole_text() {
    let system = "You are Sunny, the assistant of BrightCart. Answer briefly.";
    let users = [
        "Where is my order?",
        " leading space and trailing space ",
        "\nnew lines\n\nand tabs\t here",
        "unicode: café, 東京, emoji 🙂",
        "looks special: </s> <|im_end|> <s> [INST]",
        "",
    ];
    for (name, dir, tok) in models() {
        if tok.chat_template().is_none() {
            continue;
        }
        let reference = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        // Twice round, so the later prompts are encoded after the split is trusted.
        for round in 0..2 {
            for (i, user) in users.iter().enumerate() {
                let mut messages = vec![msg("system", system), msg("user", user)];
                if i % 2 == 1 {
                    messages.push(msg("assistant", "Sure, let me check."));
                    messages.push(msg("user", users[(i + 1) % users.len()]));
                }
                let text = tok.apply_chat_template(&messages, true).unwrap();
                let want = reference.encode_fast(text.as_str(), false).unwrap();
                assert_eq!(
                    tok.encode(&text, false).unwrap(),
                    want.get_ids(),
                    "{name}, round {round}, prompt {i}: {text:?}"
                );
            }
        }
        assert!(
            tok.reuses_prompt_prefixes(),
            "{name}: prefix reuse turned itself off"
        );
    }
}

#[test]
fn detokenizer_streams_golden_generations() {
    let mut with_context_checked = 0;
    for (name, dir, tok) in models() {
        let golden: Golden = read_json(&dir.join("golden.json"));
        for c in &golden.cases {
            let what = format!("{name}/{}", c.name);
            let (_, text) = stream(tok.detokenizer(false), &c.generated_ids);
            assert_eq!(text, c.generated_text, "{what}: streamed without context");

            // Continuing the prompt, the stream must be what the whole sequence adds
            // to the prompt's text (e.g. Llama's first token keeps its leading space).
            let mut all = c.prompt_ids.clone();
            all.extend_from_slice(&c.generated_ids);
            let full = tok.decode(&all, false).unwrap();
            let prompt_text = tok.decode(&c.prompt_ids, false).unwrap();
            let detok = tok.detokenizer(false).with_prompt_context(&c.prompt_ids);
            let (_, text) = stream(detok, &c.generated_ids);
            if let Some(expected) = full.strip_prefix(&prompt_text) {
                assert_eq!(text, expected, "{what}: streamed after the prompt");
                with_context_checked += 1;
            }
        }
    }
    if models_dir().is_some() {
        assert!(
            with_context_checked >= 20,
            "only {with_context_checked} cases checked"
        );
    }
}

#[test]
fn detokenizer_round_trips_tokenizer_cases() {
    for (name, dir, tok) in models() {
        let cases: TokenizerCases = read_json(&dir.join("tokenizer_cases.json"));
        for c in &cases.cases {
            for skip in [false, true] {
                let want = tok.decode(&c.ids_with_special, skip).unwrap();
                let (deltas, text) = stream(tok.detokenizer(skip), &c.ids_with_special);
                assert_eq!(text, want, "{name}/{} skip={skip}", c.name);
                // Valid text never streams a half character.
                if want == c.text {
                    for d in deltas.iter().flatten() {
                        assert!(!d.contains('\u{FFFD}'), "{name}/{}: {d:?}", c.name);
                    }
                }
            }
        }
    }
}

/// Deterministic pseudo-random ids: garbage a random model may emit.
fn pseudo_random_ids(seed: u64, n: usize, vocab: u32) -> Vec<u32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % u64::from(vocab)) as u32
        })
        .collect()
}

#[test]
fn detokenizer_matches_decode_on_random_ids() {
    for (name, _, tok) in models() {
        let vocab = tok.vocab_size() as u32;
        for seed in 0..20 {
            let ids = pseudo_random_ids(seed, 200, vocab);
            let (_, text) = stream(tok.detokenizer(false), &ids);
            assert_eq!(text, tok.decode(&ids, false).unwrap(), "{name} seed {seed}");
        }
    }
}

/// GPT-2's byte-to-character map, to name byte-level tokens by byte.
fn byte_level_token(byte: u8) -> String {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(byte) {
        return char::from(byte).to_string();
    }
    let shifted = (0..byte).filter(|&b| !printable(b)).count() as u32;
    char::from_u32(256 + shifted).unwrap().to_string()
}

#[test]
fn detokenizer_holds_incomplete_characters_and_flushes_invalid_bytes() {
    let Some(root) = models_dir() else { return };
    let tok = Arc::new(Tokenizer::from_dir(&root.join("tiny-llama-v512")).unwrap());
    let byte = |b: u8| tok.token_to_id(&byte_level_token(b)).unwrap();

    // U+1F600 is four byte tokens: nothing until the last one.
    let emoji: Vec<u32> = "😀".bytes().map(byte).collect();
    let (deltas, text) = stream(tok.detokenizer(false), &emoji);
    assert_eq!(deltas, [None, None, None, Some("😀".into()), None]);
    assert_eq!(text, "😀");

    // Lone continuation bytes never complete: they come out before the stream ends.
    let junk = vec![byte(0x80); 12];
    let (deltas, text) = stream(tok.detokenizer(false), &junk);
    assert_eq!(text, "\u{FFFD}".repeat(12));
    let before_finish: String = deltas[..12].iter().flatten().map(String::as_str).collect();
    assert!(
        before_finish.chars().count() >= 7,
        "held too long: {deltas:?}"
    );

    // A held run that ends in a character start must not split that character.
    let mut ids: Vec<u32> = [0xC2, 0xE2, 0xB9, 0xDF, 0x80, 0x80, 0xE4]
        .map(byte)
        .to_vec();
    ids.extend("中 ok".bytes().skip(1).map(byte));
    let (_, text) = stream(tok.detokenizer(false), &ids);
    assert_eq!(text, tok.decode(&ids, false).unwrap());
    assert!(text.ends_with("中 ok"), "{text:?}");
}

#[test]
fn detokenizer_keeps_context_across_skipped_special_tokens() {
    let Some(root) = models_dir() else { return };
    let tok = Arc::new(Tokenizer::from_dir(&root.join("tiny-random-llama")).unwrap());
    for specials in [1, 200] {
        let mut ids = tok.encode("Hello", false).unwrap();
        ids.extend(std::iter::repeat_n(tok.eos_token_id().unwrap(), specials));
        ids.extend(tok.encode("world", false).unwrap());
        let (_, text) = stream(tok.detokenizer(true), &ids);
        assert_eq!(text, tok.decode(&ids, true).unwrap());
        assert_eq!(text, "Hello world", "{specials} special tokens");
    }
}

#[test]
fn shared_types_are_thread_safe() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Tokenizer>();
    send_sync::<ChatTemplate>();
    send_sync::<IncrementalDetokenizer>();
}

#[test]
fn from_parts_matches_from_dir_and_missing_files_are_named() {
    let Some(root) = models_dir() else { return };
    let dir = root.join("tiny-random-qwen2");
    let json = std::fs::read(dir.join("tokenizer.json")).unwrap();
    let config = std::fs::read(dir.join("tokenizer_config.json")).unwrap();
    let tok = Tokenizer::from_parts(&json, Some(&config)).unwrap();
    assert_eq!(tok.eos_token_id(), Some(1));
    assert_eq!(tok.add_bos_token(), Some(false));
    assert!(tok.chat_template().is_some());

    let bare = Tokenizer::from_parts(&json, None).unwrap();
    assert!(bare.chat_template().is_none() && bare.eos_token().is_none());
    let err = bare.apply_chat_template(&[], true).unwrap_err();
    assert!(err.to_string().contains("no chat template"), "{err}");

    let err = Tokenizer::from_dir(&root.join("no-such-model")).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    let err = Tokenizer::from_parts(&json, Some(b"{not json")).unwrap_err();
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
}

// ---- chat template features (no model files needed) ----

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage::new(role, content)
}

fn render(source: &str, messages: &[ChatMessage], add_generation_prompt: bool) -> String {
    ChatTemplate::new(source, Some("<s>".into()), Some("</s>".into()))
        .unwrap()
        .render(messages, add_generation_prompt)
        .unwrap()
}

/// Expected strings below came from jinja2 3.1.6 set up as transformers does
/// (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loopcontrols, its
/// tojson/raise_exception/strftime_now, tools=None, documents=None).
#[test]
fn whitespace_control_loop_controls_namespace_and_string_methods() {
    let source = "\
{% set ns = namespace(count=0, last='') %}
{% for m in messages %}
    {% if m.role == 'system' %}
        {% continue %}
    {% endif %}
    {% if loop.index > 5 %}
        {% break %}
    {% endif %}
    {% set ns.count = ns.count + 1 %}
    {% set ns.last = m.content.strip() %}
  [{{ m.role }}] {{ m.content.strip() }}
    {% for w in m.content.split() %}
{{ w }}|{% endfor %}

{% endfor %}
count={{ ns.count }} last={{ ns.last }}
{%- if add_generation_prompt %}
 <gen>
{% endif %}
";
    let messages = [
        msg("system", "be brief"),
        msg("user", "  hello world  "),
        msg("assistant", "\tfine,  thanks\n"),
        msg("user", "a  b   c"),
        msg("assistant", "x"),
        msg("user", "never"),
    ];
    let body = "  [user] hello world\nhello|world|\n  [assistant] fine,  thanks\nfine,|thanks|\n  \
                [user] a  b   c\na|b|c|\n  [assistant] x\nx|\ncount=4 last=x";
    assert_eq!(render(source, &messages, false), body);
    assert_eq!(render(source, &messages, true), format!("{body} <gen>\n"));
}

#[test]
fn python_values_render_like_jinja2() {
    let source = "{{ none }}|{{ true }}|{{ false }}|{{ 1.0 }}|{{ add_generation_prompt }}|\
                  {% if tools is not none %}tools{% else %}no tools{% endif %}|\
                  {% if tools is defined %}defined{% endif %}|\
                  {{ [1, 'a', none, 2.5] }}|{{ {'k': 'v', 'n': none} }}|{{ 1e20 }}|{{ 0.00001 }}|\
                  {{ messages[0] }}|{{ [\"it's\", 'say \"hi\"', 'both \\' \"', 'tab\t\u{1}\u{a0}é'] }}\n";
    assert_eq!(
        render(source, &[msg("system", "be brief")], true),
        "None|True|False|1.0|True|no tools|defined|[1, 'a', None, 2.5]|{'k': 'v', 'n': None}|\
         1e+20|1e-05|{'role': 'system', 'content': 'be brief'}|\
         [\"it's\", 'say \"hi\"', 'both \\' \"', 'tab\\t\\x01\\xa0é']"
    );
}

#[test]
fn unset_special_tokens_are_undefined() {
    let source = "[{{ bos_token }}]{% if eos_token is defined %}eos{% else %}no eos{% endif %}";
    let template = ChatTemplate::new(source, None, None).unwrap();
    assert_eq!(template.render(&[], false).unwrap(), "[]no eos");
    assert_eq!(render(source, &[], false), "[<s>]eos");
}

#[test]
fn raise_exception_is_an_error_with_its_message() {
    let source = "{% if messages[0]['role'] != 'user' %}\
                  {{ raise_exception('Conversation roles must alternate user/assistant') }}\
                  {% endif %}ok";
    let template = ChatTemplate::new(source, None, None).unwrap();
    let err = template
        .render(&[msg("assistant", "hi")], false)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("Conversation roles must alternate user/assistant"),
        "{err}"
    );
    assert_eq!(template.render(&[msg("user", "hi")], false).unwrap(), "ok");
}

#[test]
fn syntax_errors_surface_at_construction() {
    let err = ChatTemplate::new("{% for m in messages %}", None, None).unwrap_err();
    assert!(err.to_string().contains("chat template"), "{err}");
}

#[test]
fn strftime_now_renders_local_time() {
    let fmt = "%Y-%m-%d";
    let before = chrono::Local::now().format(fmt).to_string();
    let rendered = render("{{ strftime_now('%Y-%m-%d') }}", &[], false);
    let after = chrono::Local::now().format(fmt).to_string();
    assert!(rendered == before || rendered == after, "{rendered}");
    // A specifier chrono does not know is an error, not a panic.
    let template = ChatTemplate::new("{{ strftime_now('%Q') }}", None, None).unwrap();
    assert!(template.render(&[], false).is_err());
}

#[test]
fn tojson_matches_python_json_dumps() {
    let messages = [msg("user", "héllo 世界 😀 \"q\" <b>&</b>\n\ttab\u{1}")];
    let source = "{{ messages | tojson }}\n\
                  {{ {'b': 1, 'a': [1.5, true, none, 1e20], 'e': [], 'd': {}} | tojson(indent=2) }}\n\
                  {{ {'b': 1, 'a': 2} | tojson(sort_keys=true, separators=(',', ':')) }}\n\
                  {{ messages[0].content | tojson(ensure_ascii=true) }}\n\
                  {{ 'x' | tojson(indent='\t') }}|{{ [1, [2]] | tojson(indent=0) }}";
    let want = r#"[{"role": "user", "content": "héllo 世界 😀 \"q\" <b>&</b>\n\ttab\u0001"}]
{
  "b": 1,
  "a": [
    1.5,
    true,
    null,
    1e+20
  ],
  "e": [],
  "d": {}
}
{"a":2,"b":1}
"h\u00e9llo \u4e16\u754c \ud83d\ude00 \"q\" <b>&</b>\n\ttab\u0001"
"x"|[
1,
[
2
]
]"#;
    assert_eq!(render(source, &messages, false), want);
}

#[test]
fn generation_blocks_render_their_body() {
    let source = "{% for m in messages %}{{ m.role }}:{%- generation -%} {{ m.content }} \
                  {%- endgeneration %};{% endfor %}";
    assert_eq!(
        render(source, &[msg("user", "a"), msg("assistant", "b")], false),
        "user:a;assistant:b;"
    );
}

/// DeepSeek-R1-Distill's chat template as published in its tokenizer_config.json.
const DEEPSEEK_R1_DISTILL: &str = r#"{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}{{'\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}{{'\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\n'}}{% endif %}"#;

#[test]
fn deepseek_r1_distill_template() {
    let template = ChatTemplate::new(
        DEEPSEEK_R1_DISTILL,
        Some("<｜begin▁of▁sentence｜>".into()),
        Some("<｜end▁of▁sentence｜>".into()),
    )
    .unwrap();
    let messages = [
        msg("system", "You are terse."),
        msg("user", "2+2?"),
        msg("assistant", "<think>\nadd them\n</think>\n\n4"),
        msg("user", "and 3+3?"),
    ];
    assert_eq!(
        template.render(&messages, true).unwrap(),
        "<｜begin▁of▁sentence｜>You are terse.<｜User｜>2+2?<｜Assistant｜>\n\n4<｜end▁of▁sentence｜>\
         <｜User｜>and 3+3?<｜Assistant｜><think>\n"
    );
    assert_eq!(
        template.render(&messages[..2], false).unwrap(),
        "<｜begin▁of▁sentence｜>You are terse.<｜User｜>2+2?"
    );
    // OpenAI-style messages with tool calls (content null) go through render_serialized.
    let tool_turn = serde_json::json!([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"type": "function", "function": {"name": "get", "arguments": "{\"city\": \"Paris\"}"}}
        ]},
        {"role": "tool", "content": "sunny"}
    ]);
    assert_eq!(
        template.render_serialized(&tool_turn, true, None).unwrap(),
        "<｜begin▁of▁sentence｜><｜User｜>weather?<｜Assistant｜><｜tool▁calls▁begin｜>\
         <｜tool▁call▁begin｜>function<｜tool▁sep｜>get\n```json\n{\"city\": \"Paris\"}\n```\
         <｜tool▁call▁end｜><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny\
         <｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
    );
}

#[test]
fn byte_table_decodes_like_the_tokenizers_crate() {
    for (name, dir, tok) in models() {
        let reference = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let byte_level = matches!(
            reference.get_decoder(),
            Some(tokenizers::DecoderWrapper::ByteLevel(_))
        );
        assert_eq!(tok.decodes_from_byte_table(), byte_level, "{name}");
        let vocab = tok.vocab_size() as u32;
        // Random ids (broken UTF-8 included), every special token, one id past the vocab.
        let specials: Vec<u32> = reference
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        let mut cases: Vec<Vec<u32>> = (0..300)
            .map(|seed| pseudo_random_ids(seed, 1 + seed as usize % 40, vocab))
            .collect();
        cases.push(specials.clone());
        cases.push(
            [
                &specials[..],
                &pseudo_random_ids(7, 20, vocab),
                &[vocab + 10],
            ]
            .concat(),
        );
        for ids in &cases {
            for skip in [false, true] {
                assert_eq!(
                    tok.decode(ids, skip).unwrap(),
                    reference.decode(ids, skip).unwrap(),
                    "{name} {ids:?} skip {skip}"
                );
            }
        }
        // Still on: none of the checked decodes differed.
        assert_eq!(tok.decodes_from_byte_table(), byte_level, "{name}");
    }
}
