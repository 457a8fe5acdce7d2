//! Property-based fuzzing of the two places where untrusted input meets the daemon:
//!
//! 1. request bodies → JSON parsing → validation, driven through the real `distillery serve`
//!    binary over loopback HTTP (so the bytes take exactly the handlers' path: body limit,
//!    field-path parse errors, model check, range checks, template, context check), against
//!    an oracle of what serde may accept for each field's type;
//! 2. chat messages → chat-template rendering, in process, with the real templates of the
//!    built-in model and of every folder under `../shared/models` that has one.
//!
//! Both are bounded and deterministic: a fixed case count, a fixed ChaCha seed and no failure
//! persistence, so a CI run is the same run every time (about 5 s in release on 2 cores).
//! `DISTILLERY_FUZZ_CASES=N` multiplies the case counts and `DISTILLERY_FUZZ_SEED=S` picks
//! another seed, for longer runs by hand.
//!
//! The HTTP properties need no model folder: the daemon serves `builtin:tiny`. Where
//! `../shared/models` is absent the template property says so loudly and fuzzes the
//! built-in template only.
//!
//! This file holds the bounded-run and seed helpers and the weird-value generators both
//! properties share; `requests.rs` is property 1 and `templates.rs` property 2.

#[path = "../common/mod.rs"]
mod common;
mod requests;
mod templates;

use std::time::Instant;

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};
use serde_json::Value;

use distillery::model::{builtin, DTypeChoice};
use distillery::tokenizer::Tokenizer;

// ---------------------------------------------------------------------------------------------
// Bounded, deterministic runs.
// ---------------------------------------------------------------------------------------------

fn env_u64(key: &str) -> Option<u64> {
    std::env::var(key).ok()?.trim().parse().ok()
}

/// Runs `test` over `cases` values of `strategy` from a fixed seed (salted per property so
/// the properties do not walk the same random stream); panics with the shrunk input.
fn run<S: Strategy>(
    name: &str,
    cases: u32,
    salt: u64,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let cases = cases * env_u64("DISTILLERY_FUZZ_CASES").unwrap_or(1).max(1) as u32;
    let seed = env_u64("DISTILLERY_FUZZ_SEED").unwrap_or(0x6469_7374_696c_6c65);
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..16].copy_from_slice(&salt.to_le_bytes());
    let config = Config {
        cases,
        failure_persistence: None,
        rng_algorithm: RngAlgorithm::ChaCha,
        max_shrink_iters: 512,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes));
    let started = Instant::now();
    match runner.run(&strategy, test) {
        Ok(()) => eprintln!(
            "fuzz {name}: {cases} cases passed in {:.2} s",
            started.elapsed().as_secs_f64()
        ),
        Err(TestError::Fail(why, input)) => {
            panic!("fuzz {name} failed: {why}\nminimal failing input: {input:#?}")
        }
        Err(TestError::Abort(why)) => panic!("fuzz {name} aborted: {why}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Generators of weird but JSON-representable values.
// ---------------------------------------------------------------------------------------------

/// Text of the kinds that trip parsers, tokenizers and templates: controls, BOMs, bidi and
/// combining marks, astral and private-use code points, template and special-token syntax.
const WEIRD: &[&str] = &[
    "",
    " ",
    "\0",
    "\u{1}\u{1f}\u{7f}",
    "\u{feff}",
    "\u{202e}abc\u{202c}",
    "e\u{301}\u{301}\u{301}",
    "\u{fffd}",
    "\u{10ffff}",
    "\u{e000}",
    "🦀",
    "👨\u{200d}👩\u{200d}👧",
    "ǅİßﬃ",
    "日本語のテキスト",
    "\r\n",
    "\t\u{b}\u{c}",
    "\"",
    "\\",
    "\\u0000",
    "{{ messages }}",
    "{% for m in messages %}",
    "{#",
    "}}",
    "%}",
    "<s>",
    "</s>",
    "<|user|>",
    "<|assistant|>",
    "<｜User｜>",
    "<｜end▁of▁sentence｜>",
    "[INST]",
    "<<SYS>>",
    "data: [DONE]\n\n",
    "null",
    "1e308",
    "fuzz-model",
];

const LONG_CHARS: &[char] = &['a', 'é', '日', '🦀', '\0', '"'];

fn weird_string() -> BoxedStrategy<String> {
    prop_oneof![
        4 => any::<String>(),
        3 => select(WEIRD).prop_map(str::to_string),
        3 => "[a-z ]{0,12}",
        2 => vec(select(WEIRD), 0..6).prop_map(|v| v.concat()),
        1 => "\\PC{0,40}",
        // Long text: some bodies go over the limit (413), many prompts over the context.
        1 => (select(LONG_CHARS), 0usize..6000)
            .prop_map(|(c, n)| c.to_string().repeat(n)),
    ]
    .boxed()
}
const EDGE_INTS: &[i64] = &[
    i64::MIN,
    -(1 << 53) - 1,
    -1,
    0,
    20,
    21,
    255,
    256,
    u32::MAX as i64,
    u32::MAX as i64 + 1,
    i64::MAX,
];

/// Floats at the edges: negative zero, subnormals, past f32's range, integral values.
const EDGE_FLOATS: &[f64] = &[
    -0.0,
    0.0,
    0.5,
    1.0,
    2.0,
    -1.5,
    1e-320,
    5e-324,
    1e308,
    -1e308,
    f64::MAX,
    3.4e38,
    3.5e38,
    4294967296.0,
    1e19,
];

fn number() -> BoxedStrategy<Value> {
    prop_oneof![
        3 => (-3i64..=70).prop_map(Value::from),
        2 => select(EDGE_INTS).prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => Just(Value::from(u64::MAX)),
        3 => select(EDGE_FLOATS).prop_map(Value::from),
        2 => any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        2 => (-3.0f64..3.0).prop_map(Value::from),
    ]
    .boxed()
}

/// Field names of every request type, so that arbitrary objects often look like requests.
const FIELD_NAMES: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "role",
    "content",
    "type",
    "text",
    "max_tokens",
    "n",
    "stop",
    "temperature",
    "stream",
    "include_usage",
    "tokens",
    "logit_bias",
];

/// Any JSON value at all, a few levels deep.
fn any_json() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        3 => number(),
        3 => weird_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        let key = prop_oneof![select(FIELD_NAMES).prop_map(str::to_string), weird_string()];
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            btree_map(key, inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .boxed()
}

fn builtin_tokenizer() -> Tokenizer {
    let (_, tokenizer) = builtin::load("tiny", DTypeChoice::F32, &candle_core::Device::Cpu)
        .expect("the built-in model loads");
    tokenizer
}
