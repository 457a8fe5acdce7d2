//! The grammars compiled by llguidance over a real vocabulary: what they admit, what they
//! refuse, and that what they admit parses back into the calls it spells.

use super::*;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::TokEnv;
use llguidance::{Matcher, ParserFactory};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::sync::OnceLock;

const TOKENIZER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/models/tiny-r1-distill-qwen2/tokenizer.json"
);

struct Env {
    tok_env: TokEnv,
    factory: ParserFactory,
}

/// The DeepSeek-R1-distill vocabulary, which holds DeepSeek's markers as added tokens.
fn env() -> Option<&'static Env> {
    static ENV: OnceLock<Option<Env>> = OnceLock::new();
    let env = ENV.get_or_init(|| {
        if !std::path::Path::new(TOKENIZER).exists() {
            return None;
        }
        let tok_env = toktrie_hf_tokenizers::ByteTokenizer::from_file(TOKENIZER)
            .unwrap()
            .into_tok_env(None)
            .unwrap();
        let mut factory = ParserFactory::new_simple(&tok_env).unwrap();
        factory.quiet();
        Some(Env { tok_env, factory })
    });
    if env.is_none() {
        eprintln!("SKIPPING: ../shared/models absent");
    }
    env.as_ref()
}

impl Env {
    fn matcher(&self, grammar: &str) -> Result<Matcher, String> {
        let parser = self
            .factory
            .create_parser(TopLevelGrammar::from_lark(grammar.to_string()))
            .map_err(|e| e.to_string())?;
        Ok(Matcher::new(Ok(parser)))
    }

    /// Whether the grammar admits exactly these tokens (and then may end).
    fn admits(&self, grammar: &str, tokens: &[u32]) -> bool {
        let mut m = self.matcher(grammar).unwrap();
        let consumed = m.try_consume_tokens(tokens).unwrap();
        consumed == tokens.len() && m.is_accepting().unwrap()
    }

    /// Text spelled out byte by byte as the trie knows it, never as an added `<…>` token.
    fn bytes_of(&self, text: &str) -> Vec<u32> {
        self.tok_env.tok_trie().greedy_tokenize(text.as_bytes())
    }

    /// Text as the model would write it: markers as their single tokens.
    fn tokens_of(&self, text: &str) -> Vec<u32> {
        self.tok_env.tokenize(text)
    }

    fn marker_is_token(&self) -> impl Fn(&str) -> bool + '_ {
        |m| self.tok_env.tok_trie().get_special_token(m).is_some()
    }
}

fn tools() -> Vec<ToolSpec> {
    vec![
        ToolSpec {
            name: "get_weather".to_string(),
            parameters: json!({
                "type": "object",
                "properties": {
                    "city": {"type": "string", "enum": ["Paris", "Tokyo"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city"],
                "additionalProperties": false,
            }),
        },
        ToolSpec {
            name: "get_time".to_string(),
            parameters: json!({
                "type": "object",
                "properties": {"utc": {"type": "boolean"}},
                "required": ["utc"],
                "additionalProperties": false,
            }),
        },
    ]
}

fn ds(calls: &[(&str, &str)]) -> String {
    let calls: Vec<String> = calls
        .iter()
        .map(|(name, args)| {
            format!("<｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n{args}\n```<｜tool▁call▁end｜>")
        })
        .collect();
    format!(
        "<｜tool▁calls▁begin｜>{}<｜tool▁calls▁end｜>",
        calls.join("\n")
    )
}

fn hermes(calls: &[(&str, &str)]) -> String {
    let calls: Vec<String> = calls
        .iter()
        .map(|(name, args)| {
            format!("<tool_call>\n{{\"name\": {name:?}, \"arguments\": {args}}}\n</tool_call>")
        })
        .collect();
    calls.join("\n")
}

fn llama(calls: &[(&str, &str)]) -> String {
    let calls: Vec<String> = calls
        .iter()
        .map(|(name, args)| format!("{{\"name\": {name:?}, \"parameters\": {args}}}"))
        .collect();
    calls.join("; ")
}

const PARIS: (&str, &str) = ("get_weather", r#"{"city": "Paris", "days": 3}"#);
const TIME: (&str, &str) = ("get_time", r#"{"utc": true}"#);

/// Calls of a format, spelled as `spell` writes them.
type Spell = fn(&[(&str, &str)]) -> String;

fn cases() -> [(ToolFormat, Spell); 3] {
    [
        (ToolFormat::Deepseek, ds),
        (ToolFormat::Hermes, hermes),
        (ToolFormat::Llama3Json, llama),
    ]
}

#[test]
fn grammars_admit_well_formed_calls_and_nothing_else() {
    let Some(env) = env() else { return };
    for (format, spell) in cases() {
        let single = format.call_grammar(&tools(), false).unwrap();
        let parallel = format.call_grammar(&tools(), true).unwrap();
        let good = [
            spell(&[PARIS]),
            spell(&[TIME]),
            spell(&[("get_time", r#"{"utc": false}"#)]),
        ];
        for text in &good {
            for grammar in [&single, &parallel] {
                assert!(
                    env.admits(grammar, &env.bytes_of(text)),
                    "{format:?} {text:?}"
                );
            }
            // What the grammar admits is what the parser reads back.
            assert_eq!(format.parse(text).calls.len(), 1, "{text:?}");
        }
        let two = spell(&[PARIS, TIME]);
        assert!(env.admits(&parallel, &env.bytes_of(&two)), "{format:?}");
        assert!(!env.admits(&single, &env.bytes_of(&two)), "{format:?}");
        assert_eq!(format.parse(&two).calls.len(), 2);

        let bad = [
            spell(&[("get_wether", r#"{"city": "Paris"}"#)]),
            spell(&[("get_weather", r#"{"city": "Lima"}"#)]),
            spell(&[("get_weather", r#"{"days": 3}"#)]),
            spell(&[("get_weather", r#"{"city": "Paris", "days": 8}"#)]),
            spell(&[("get_weather", r#"{"city": "Paris", "extra": 1}"#)]),
            spell(&[("get_time", r#"{"utc":true}"#)]),
            spell(&[("get_time", r#"{ "utc": true}"#)]),
            spell(&[("get_time", r#"[true]"#)]),
            format!("Sure! {}", spell(&[TIME])),
            format!("{}\n", spell(&[TIME])),
            String::new(),
        ];
        for text in &bad {
            for grammar in [&single, &parallel] {
                assert!(
                    !env.admits(grammar, &env.bytes_of(text)),
                    "{format:?} {text:?}"
                );
            }
        }
    }
}

#[test]
fn markers_that_are_tokens_need_token_references() {
    let Some(env) = env() else { return };
    let text = ds(&[PARIS]);
    let tokens = env.tokens_of(&text);
    let marker = env
        .tok_env
        .tok_trie()
        .get_special_token("<｜tool▁calls▁begin｜>")
        .unwrap();
    assert_eq!(tokens.first(), Some(&marker));
    // llguidance's trie keeps `<…>` added tokens apart from text: the text literal refuses the
    // token the model writes...
    let as_text = ToolFormat::Deepseek.call_grammar(&tools(), true).unwrap();
    assert!(!env.admits(&as_text, &tokens));
    // ...and the token reference admits it.
    let is_token = env.marker_is_token();
    let as_token = ToolFormat::Deepseek
        .call_grammar_with(&tools(), true, &is_token)
        .unwrap();
    assert!(as_token.contains("calls_begin: <｜tool▁calls▁begin｜>\n"));
    assert!(env.admits(&as_token, &tokens));
    let two = ds(&[PARIS, TIME]);
    assert!(env.admits(&as_token, &env.tokens_of(&two)));
    assert!(!env.admits(&as_token, &env.tokens_of(&format!("x{two}"))));

    // Hermes' markers aren't in this vocabulary: the predicate keeps them as text.
    let hermes_grammar = ToolFormat::Hermes
        .call_grammar_with(&tools(), false, &is_token)
        .unwrap();
    assert!(hermes_grammar.contains("call_open: \"<tool_call>\"\n"));
    assert!(env.admits(&hermes_grammar, &env.tokens_of(&hermes(&[TIME]))));
}

#[test]
fn names_are_escaped() {
    let Some(env) = env() else { return };
    let name = "we\"ird\\na\u{7f}me é";
    let tools = vec![ToolSpec {
        name: name.to_string(),
        parameters: json!({"type": "object"}),
    }];
    let json_name = serde_json::to_string(name).unwrap();
    let texts = [
        (
            ToolFormat::Deepseek,
            format!("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n{{}}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),
        ),
        (
            ToolFormat::Hermes,
            format!("<tool_call>\n{{\"name\": {json_name}, \"arguments\": {{}}}}\n</tool_call>"),
        ),
        (
            ToolFormat::Llama3Json,
            format!("{{\"name\": {json_name}, \"parameters\": {{}}}}"),
        ),
    ];
    for (format, text) in texts {
        let grammar = format.call_grammar(&tools, false).unwrap();
        assert!(
            env.admits(&grammar, &env.bytes_of(&text)),
            "{format:?}\n{grammar}"
        );
        let parsed = format.parse(&text);
        assert_eq!(parsed.calls, vec![call(name, "{}")], "{format:?}");
    }
}

fn call(name: &str, arguments: &str) -> ParsedCall {
    ParsedCall {
        name: name.to_string(),
        arguments: arguments.to_string(),
    }
}

#[test]
fn schemas_that_cannot_be_embedded_are_errors() {
    let tool = |parameters| {
        vec![ToolSpec {
            name: "f".to_string(),
            parameters,
        }]
    };
    for format in [
        ToolFormat::Deepseek,
        ToolFormat::Hermes,
        ToolFormat::Llama3Json,
    ] {
        assert!(format.call_grammar(&[], false).is_err());
        for parameters in [
            json!("object"),
            json!(false),
            json!({"type": "string"}),
            json!(3),
        ] {
            let err = format.call_grammar(&tool(parameters), false).unwrap_err();
            assert!(err.contains("tool \"f\""), "{err}");
        }
        // Without a type, the arguments are still an object.
        let grammar = format.call_grammar(&tool(json!({})), false).unwrap();
        assert!(grammar.contains(r#""type":"object""#), "{grammar}");
        assert!(format.call_grammar(&tool(json!(true)), false).is_ok());
    }
    let Some(env) = env() else { return };
    for format in [
        ToolFormat::Deepseek,
        ToolFormat::Hermes,
        ToolFormat::Llama3Json,
    ] {
        for parameters in [
            json!({"type": "object", "properties": {"a": {"type": "strnig"}}}),
            json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}),
            json!({"type": "object", "properties": "a"}),
        ] {
            let grammar = format
                .call_grammar(&tool(parameters.clone()), false)
                .unwrap();
            assert!(env.matcher(&grammar).is_err(), "{format:?} {parameters}");
        }
        // A schema that refers into itself still resolves once embedded.
        let with_defs = json!({
            "type": "object",
            "properties": {"p": {"$ref": "#/$defs/point"}},
            "required": ["p"],
            "$defs": {"point": {"type": "integer"}},
        });
        let grammar = format.call_grammar(&tool(with_defs), false).unwrap();
        assert!(env.matcher(&grammar).is_ok(), "{format:?}");
    }
}

/// Random walks through each grammar's token masks: every output it lets a model write
/// parses back into calls to the given tools, with arguments valid for their schemas.
#[test]
fn sampled_outputs_parse_into_valid_calls() {
    let Some(env) = env() else { return };
    let tools = tools();
    let trie = env.tok_env.tok_trie();
    let eos = trie.eos_token();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let is_token = env.marker_is_token();
    for format in [
        ToolFormat::Deepseek,
        ToolFormat::Hermes,
        ToolFormat::Llama3Json,
    ] {
        for parallel in [false, true] {
            let grammar = format
                .call_grammar_with(&tools, parallel, &is_token)
                .unwrap();
            for _ in 0..6 {
                let mut m = env.matcher(&grammar).unwrap();
                let mut tokens = Vec::new();
                while !m.is_stopped() && tokens.len() < 400 {
                    let allowed: Vec<u32> = m
                        .compute_mask()
                        .unwrap()
                        .to_list()
                        .into_iter()
                        .filter(|&t| t != eos)
                        .collect();
                    if m.is_accepting().unwrap() && (allowed.is_empty() || rng.gen_bool(0.5)) {
                        break;
                    }
                    let &token = allowed.choose(&mut rng).unwrap();
                    m.consume_token(token).unwrap();
                    tokens.push(token);
                }
                assert!(m.is_accepting().unwrap(), "{format:?}: ran out of tokens");
                let text = trie.decode_str(&tokens);
                let parsed = format.parse(&text);
                assert_eq!(parsed.content, None, "{text:?}");
                assert!(!parsed.calls.is_empty(), "{text:?}");
                assert!(parallel || parsed.calls.len() == 1, "{text:?}");
                for call in &parsed.calls {
                    let tool = tools.iter().find(|t| t.name == call.name).unwrap();
                    let arguments: serde_json::Value =
                        serde_json::from_str(&call.arguments).unwrap();
                    assert!(
                        jsonschema::is_valid(&tool.parameters, &arguments),
                        "{text:?}"
                    );
                }
            }
        }
    }
}

#[test]
#[ignore = "prints the grammars for a two-tool example"]
fn print_grammars() {
    for format in [
        ToolFormat::Deepseek,
        ToolFormat::Hermes,
        ToolFormat::Llama3Json,
    ] {
        println!(
            "--- {} (parallel)\n{}",
            format.name(),
            format.call_grammar(&tools(), true).unwrap()
        );
    }
}

#[test]
fn json_string_writes_what_serde_json_writes() {
    for s in ["plain", "q\"b\\s/", "\n\r\t\u{8}\u{c}\u{1}\u{1f}\u{7f}é🌍"] {
        assert_eq!(grammar::json_string(s), serde_json::to_string(s).unwrap());
    }
    assert_eq!(grammar::literal("a\u{7f}"), "\"a\\u007f\"");
}
