//! The compiled constraint driven by hand, as the engine drives it, on a real tokenizer.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;

use serde_json::json;

use super::*;
use crate::engine::{Constraint, Progress, TokenMask};
use crate::tokenizer::Tokenizer;

fn tokenizer(name: &str) -> Option<Arc<Tokenizer>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/models")
        .join(name);
    if !dir.exists() {
        eprintln!("!!! SKIPPING: {} is absent !!!", dir.display());
        return None;
    }
    Some(Arc::new(Tokenizer::from_dir(&dir).expect("tokenizer")))
}

/// Drives `c` greedily on the lowest allowed id at each point (forced tokens first) until it
/// is done; returns the tokens.
fn drive(c: &mut dyn Constraint, limit: usize) -> (Vec<u32>, bool) {
    let mut out = Vec::new();
    let mut forced = VecDeque::new();
    let mut mask = TokenMask::default();
    for _ in 0..limit {
        let token = match forced.pop_front() {
            Some(t) => t,
            None => {
                c.fill_mask(&mut mask, &mut forced).expect("mask");
                if let Some(t) = forced.pop_front() {
                    out.push(t);
                    if c.observe(t, &mut forced).expect("observe") == Progress::Done {
                        return (out, true);
                    }
                    continue;
                }
                let Some(t) = (0..mask.words.len() as u32 * 32)
                    .rev()
                    .find(|&i| mask.allows(i))
                else {
                    return (out, true);
                };
                t
            }
        };
        out.push(token);
        if c.observe(token, &mut forced).expect("observe") == Progress::Done {
            return (out, true);
        }
    }
    (out, false)
}

#[test]
fn a_json_schema_constrains_choice_by_choice_with_forced_tokens() {
    let Some(tok) = tokenizer("tiny-r1-distill-qwen2") else {
        return;
    };
    let grammars = Grammars::new(tok.clone(), &[1], 129280, None);
    let schema = json!({"type": "object", "properties": {
        "intent": {"enum": ["a", "b", "refund"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["intent", "n"], "additionalProperties": false});
    let compiled = grammars
        .compile(&GrammarSpec::JsonSchema(schema.clone()), Kind::JsonSchema)
        .expect("compiles");
    let factory = compiled.factory(compiled.starts(1, false), Gate::Open, None);
    let mut c = factory(0);
    let (ids, done) = drive(c.as_mut(), 64);
    let text = tok.decode(&ids, false).unwrap();
    assert!(done, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect(&text);
    assert!(
        v["n"].as_i64().is_some_and(|n| (0..=99).contains(&n)),
        "{text}"
    );
}
