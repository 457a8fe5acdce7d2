//! Helpers shared by integration tests: where the shared test models live, how their
//! golden files read, and the daemon binary as a child process ([`daemon`]).
#![allow(dead_code)]

pub mod constrained;
pub mod daemon;
pub mod drift;
pub mod engine_run;
pub mod fixtures;
pub mod http;
pub mod scrape;
pub mod served;

use serde::Deserialize;
use std::path::PathBuf;

pub const MODELS: [&str; 4] = [
    "tiny-random-qwen2",
    "tiny-random-llama",
    "bench-llama-25m",
    "tiny-llama-v512",
];

/// `$DISTILLERY_MODELS_DIR` (a GPU machine, where test binaries run far from the checkout),
/// else `../shared/models`, or `None` (after a loud message) where CI's checkout lacks it.
pub fn models_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("DISTILLERY_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/models"));
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "\n!!! SKIPPING: {} not found; model parity tests need ../shared/models beside the checkout !!!\n",
            dir.display()
        );
        None
    }
}

/// Where model tests run: `DISTILLERY_TEST_DEVICE` = `cpu` (the default), `cuda` or `cuda:N`
/// (a `--features cuda` build on a GPU machine: deploy/gpu-check.sh).
pub fn test_device() -> candle_core::Device {
    let choice: distillery::model::DeviceChoice = std::env::var("DISTILLERY_TEST_DEVICE")
        .map(|v| {
            v.parse()
                .expect("DISTILLERY_TEST_DEVICE: cpu, cuda or cuda:N")
        })
        .unwrap_or_default();
    choice.open().expect("DISTILLERY_TEST_DEVICE opens")
}

/// The dtype model tests compute in: `DISTILLERY_TEST_DTYPE` = `f32` (the default) or `bf16`
/// / `f16`. In half precision the parity tests check only the first
/// [`HALF_PRECISION_IDS`] greedy ids of each golden and skip the logit tolerances.
pub fn test_dtype() -> distillery::model::DTypeChoice {
    use distillery::model::DTypeChoice;
    match std::env::var("DISTILLERY_TEST_DTYPE").as_deref() {
        Err(_) | Ok("f32") => DTypeChoice::F32,
        Ok("bf16") => DTypeChoice::Bf16,
        Ok("f16") => DTypeChoice::F16,
        Ok(other) => panic!("DISTILLERY_TEST_DTYPE: f32, bf16 or f16, got {other:?}"),
    }
}

/// How many leading greedy ids must match the goldens in half precision.
pub const HALF_PRECISION_IDS: usize = 8;

#[derive(Deserialize, Debug, Clone)]
pub struct Golden {
    pub model: String,
    pub cases: Vec<GoldenCase>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct GoldenCase {
    pub name: String,
    pub prompt: String,
    pub chat_rendered: bool,
    pub messages: Option<Vec<serde_json::Value>>,
    pub add_special_tokens: bool,
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub generated_text: String,
    pub steps: Vec<GoldenStep>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct GoldenStep {
    pub step: usize,
    pub top10: Vec<(u32, f64)>,
    pub argmax: u32,
}

/// The folder of one shared model. With `DISTILLERY_MODELS_DIR` set, a model left out of it
/// (deploy/gpu-check.sh carries only some, to fit a transfer limit) is skipped loudly.
pub fn model_dir(model: &str) -> Option<PathBuf> {
    let dir = models_dir()?.join(model);
    if !dir.is_dir() && std::env::var_os("DISTILLERY_MODELS_DIR").is_some() {
        eprintln!("\n!!! SKIPPING {model}: not in $DISTILLERY_MODELS_DIR !!!\n");
        return None;
    }
    Some(dir)
}

pub fn golden(model: &str) -> Option<Golden> {
    let path = model_dir(model)?.join("golden.json");
    let text = std::fs::read_to_string(&path).expect("golden.json readable");
    Some(serde_json::from_str(&text).expect("golden.json parses"))
}

/// Logits of one sequence run alone in one forward over a fresh cache (blocks of 16): the last
/// token's row, or with `all_logits` every token's.
pub fn forward_one(
    decoder: &distillery::model::Decoder,
    ids: &[u32],
    all_logits: bool,
) -> candle_core::Tensor {
    forward_one_cached_as(decoder, ids, all_logits, decoder.dtype())
}

/// [`forward_one`] with a KV cache storing `kv` (`--kv-cache-dtype`).
pub fn forward_one_cached_as(
    decoder: &distillery::model::Decoder,
    ids: &[u32],
    all_logits: bool,
    kv: candle_core::DType,
) -> candle_core::Tensor {
    use distillery::model::{ForwardBatch, KvCache};
    let bs = 16;
    let blocks = ids.len().div_ceil(bs);
    let cache = KvCache::new(decoder.config(), blocks, bs, kv, decoder.device()).expect("cache");
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut batch = ForwardBatch::default();
    batch.push_sequence(ids, 0, &table, bs);
    batch.all_logits = all_logits;
    decoder.forward(&batch, &cache).expect("forward")
}
