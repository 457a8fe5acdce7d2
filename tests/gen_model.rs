//! `distillery gen-model`: the tiny preset's folder (sharded, with an index) loads in the
//! model runtime and `distillery generate` produces tokens from it.

use std::path::PathBuf;
use std::process::Command;

use candle_core::Device;
use distillery::model::{self, DTypeChoice, ForwardBatch, KvCache, ModelConfig};
use distillery::tokenizer::Tokenizer;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_distillery"))
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("distillery-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    TempDir(dir)
}

#[test]
fn the_tiny_preset_loads_and_generates() {
    let shared =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/models/tiny-random-qwen2");
    if !shared.is_dir() {
        eprintln!(
            "\n!!! SKIPPING: {} not found (gen-model copies its tokenizer) !!!\n",
            shared.display()
        );
        return;
    }
    let dir = temp_dir("gen-model");
    let out = dir.0.join("tiny");
    let status = bin()
        .args([
            "gen-model",
            "--preset",
            "tiny",
            "--max-shard-size",
            "10MB",
            "--out",
        ])
        .arg(&out)
        .arg("--tokenizer-from")
        .arg(&shared)
        .status()
        .unwrap();
    assert!(status.success());
    for file in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors.index.json",
        "model-00001-of-00003.safetensors",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    // A second run refuses to overwrite without --force, and overwrites with it.
    let again = bin()
        .args(["gen-model", "--preset", "tiny", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    let config = ModelConfig::from_dir(&out).unwrap();
    assert_eq!(config.vocab_size, 151_936);
    assert!(!config.tie_word_embeddings);
    assert_eq!(config.torch_dtype.as_deref(), Some("bfloat16"));
    // The tokenizer's own ids for R1-Distill's BOS/EOS (DeepSeek's vocabulary: 0 and 1).
    assert_eq!(config.bos_token_id, Some(0));
    assert_eq!(config.eos_token_ids, vec![1]);

    let decoder = model::load_decoder(&out, DTypeChoice::Auto, &Device::Cpu).unwrap();
    let tokenizer = Tokenizer::from_dir(&out).unwrap();
    let ids = tokenizer.encode("Hello there", true).unwrap();
    let cache = KvCache::new(decoder.config(), 4, 16, decoder.dtype(), decoder.device()).unwrap();
    let mut batch = ForwardBatch::default();
    batch.push_sequence(&ids, 0, &[0, 1], 16);
    let logits = decoder.forward(&batch, &cache).unwrap();
    assert_eq!(logits.dims(), &[1, 151_936]);

    let gen = bin()
        .args([
            "generate",
            "--prompt",
            "Hello there",
            "--max-tokens",
            "6",
            "--ignore-eos",
            "--model",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        gen.status.success(),
        "{}",
        String::from_utf8_lossy(&gen.stderr)
    );
}
