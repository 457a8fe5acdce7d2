//! `distillery gen-model`: writes a Hugging Face model folder with a real architecture's exact
//! shapes and random bf16 weights, so that throughput can be measured where the real weights
//! cannot be downloaded (the GPU benchmarks use `--preset r1-distill-qwen-1.5b`).
//!
//! The folder holds `config.json`, `generation_config.json`, safetensors shards of at most
//! `--max-shard-size` bytes (with `model.safetensors.index.json` when there are several) and
//! a tokenizer copied from a local model folder. Tensors are generated and written one chunk
//! at a time, so memory stays at a few tens of MB whatever the model's size; the same seed
//! gives the same bytes on every machine.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use half::bf16;
use rayon::prelude::*;
use serde_json::{json, Value};

use distillery::config::parse_bytes;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// DeepSeek-R1-Distill-Qwen-1.5B: Qwen2, 28 layers, hidden 1536, 12 heads over 2 KV heads,
    /// intermediate 8960, vocabulary 151936, untied (1.78 B parameters, 3.55 GB in bf16).
    #[value(name = "r1-distill-qwen-1.5b")]
    R1DistillQwen1_5b,
    /// Qwen2.5-0.5B (the smallest student shape): Qwen2, 24 layers, hidden 896, 14 heads over
    /// 2 KV heads, intermediate 4864, vocabulary 151936, tied (494 M parameters).
    #[value(name = "qwen2.5-0.5b")]
    Qwen2_5_0_5b,
    /// The same family at toy size (2 layers, hidden 64, the full 151936 vocabulary), for tests.
    Tiny,
}

#[derive(Args, Debug)]
pub struct GenModelArgs {
    #[arg(long, value_enum)]
    preset: Preset,
    /// The folder to write (created; must not already hold a config.json unless --force).
    #[arg(long)]
    out: PathBuf,
    /// The model folder whose tokenizer.json and tokenizer_config.json are copied
    /// [default: the Qwen2 folder of ../shared/models with the vocabulary closest to the
    /// preset's]
    #[arg(long)]
    tokenizer_from: Option<PathBuf>,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Largest safetensors shard, e.g. 2GB or 500MiB.
    #[arg(long, default_value = "2GB", value_parser = parse_bytes)]
    max_shard_size: usize,
    /// Overwrite a folder that already holds a model.
    #[arg(long)]
    force: bool,
}

/// The architecture facts a preset fixes.
struct Shape {
    layers: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    intermediate: usize,
    vocab: usize,
    max_position_embeddings: usize,
    rope_theta: f64,
    /// The output head is the token embeddings (no `lm_head.weight`).
    tied: bool,
}

impl Preset {
    fn shape(self) -> Shape {
        match self {
            Self::R1DistillQwen1_5b => Shape {
                layers: 28,
                hidden: 1536,
                heads: 12,
                kv_heads: 2,
                intermediate: 8960,
                vocab: 151_936,
                max_position_embeddings: 131_072,
                rope_theta: 10_000.0,
                tied: false,
            },
            Self::Qwen2_5_0_5b => Shape {
                layers: 24,
                hidden: 896,
                heads: 14,
                kv_heads: 2,
                intermediate: 4864,
                vocab: 151_936,
                max_position_embeddings: 32_768,
                rope_theta: 1_000_000.0,
                tied: true,
            },
            Self::Tiny => Shape {
                layers: 2,
                hidden: 64,
                heads: 4,
                kv_heads: 2,
                intermediate: 128,
                vocab: 151_936,
                max_position_embeddings: 4096,
                rope_theta: 10_000.0,
                tied: false,
            },
        }
    }
}

/// R1-Distill-Qwen's BOS and EOS, by content: their ids are whatever the copied tokenizer
/// gives them (151646 and 151643 in the Qwen2.5 vocabulary, 0 and 1 in DeepSeek's).
const BOS: &str = "<｜begin▁of▁sentence｜>";
const EOS: &str = "<｜end▁of▁sentence｜>";
const QWEN_BOS_ID: u32 = 151_646;
const QWEN_EOS_ID: u32 = 151_643;
/// transformers' `initializer_range` for these models.
const STD: f32 = 0.02;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Init {
    Normal,
    Ones,
}

struct TensorSpec {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

impl TensorSpec {
    fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * 2
    }
}

/// Hugging Face Qwen2 names and shapes, in the order transformers saves them.
fn tensor_specs(s: &Shape) -> Vec<TensorSpec> {
    let head_dim = s.hidden / s.heads;
    let (h, q, kv, i) = (
        s.hidden,
        s.heads * head_dim,
        s.kv_heads * head_dim,
        s.intermediate,
    );
    let mut specs = Vec::new();
    let mut push = |name: String, shape: &[usize], init: Init| {
        specs.push(TensorSpec {
            name,
            shape: shape.to_vec(),
            init,
        })
    };
    push(
        "model.embed_tokens.weight".into(),
        &[s.vocab, h],
        Init::Normal,
    );
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        push(format!("{p}.input_layernorm.weight"), &[h], Init::Ones);
        push(format!("{p}.mlp.down_proj.weight"), &[h, i], Init::Normal);
        push(format!("{p}.mlp.gate_proj.weight"), &[i, h], Init::Normal);
        push(format!("{p}.mlp.up_proj.weight"), &[i, h], Init::Normal);
        push(
            format!("{p}.post_attention_layernorm.weight"),
            &[h],
            Init::Ones,
        );
        for (proj, out) in [("k_proj", kv), ("q_proj", q), ("v_proj", kv)] {
            push(format!("{p}.self_attn.{proj}.bias"), &[out], Init::Normal);
            push(
                format!("{p}.self_attn.{proj}.weight"),
                &[out, h],
                Init::Normal,
            );
        }
        push(
            format!("{p}.self_attn.o_proj.weight"),
            &[h, q],
            Init::Normal,
        );
    }
    push("model.norm.weight".into(), &[h], Init::Ones);
    if !s.tied {
        push("lm_head.weight".into(), &[s.vocab, h], Init::Normal);
    }
    specs
}

fn config_json(s: &Shape, bos: u32, eos: u32) -> Value {
    json!({
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "hidden_act": "silu",
        "hidden_size": s.hidden,
        "initializer_range": STD,
        "intermediate_size": s.intermediate,
        "max_position_embeddings": s.max_position_embeddings,
        "max_window_layers": s.layers.min(21),
        "model_type": "qwen2",
        "num_attention_heads": s.heads,
        "num_hidden_layers": s.layers,
        "num_key_value_heads": s.kv_heads,
        "rms_norm_eps": 1e-6,
        "rope_scaling": null,
        "rope_theta": s.rope_theta,
        "sliding_window": 4096,
        "tie_word_embeddings": s.tied,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.44.0",
        "use_cache": true,
        "use_sliding_window": false,
        "vocab_size": s.vocab,
    })
}

fn generation_config_json(bos: u32, eos: u32) -> Value {
    json!({
        "_from_model_config": true,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "do_sample": true,
        "temperature": 0.6,
        "top_p": 0.95,
        "transformers_version": "4.44.0",
    })
}

/// Where the shared test models live: `$DISTILLERY_SHARED_MODELS`, `../shared/models` from
/// the working directory, or beside the source checkout this binary was built from.
fn shared_models_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("DISTILLERY_SHARED_MODELS") {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(PathBuf::from("../shared/models"));
    dirs.push(PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/models"
    )));
    dirs
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The Qwen2 folder whose vocabulary is closest to `vocab` without exceeding it (any folder
/// with a tokenizer when no Qwen2 one has).
fn find_tokenizer_folder(vocab: usize) -> Result<PathBuf> {
    let mut best: Option<(bool, usize, PathBuf)> = None;
    for root in shared_models_dirs() {
        let Ok(entries) = std::fs::read_dir(&root) else {
            continue;
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            if !dir.join("tokenizer.json").is_file() {
                continue;
            }
            let Ok(config) = read_json(&dir.join("config.json")) else {
                continue;
            };
            let qwen2 = config["architectures"]
                .as_array()
                .is_some_and(|a| a.iter().any(|v| v == "Qwen2ForCausalLM"));
            let v = config["vocab_size"].as_u64().unwrap_or(0) as usize;
            if v == 0 || v > vocab {
                continue;
            }
            if best
                .as_ref()
                .is_none_or(|(bq, bv, _)| (qwen2, v) > (*bq, *bv))
            {
                best = Some((qwen2, v, dir));
            }
        }
        if best.is_some() {
            break;
        }
    }
    best.map(|(_, _, dir)| dir).ok_or_else(|| {
        anyhow::anyhow!(
            "no model folder with a tokenizer found in {:?}; pass --tokenizer-from DIR",
            shared_models_dirs()
        )
    })
}

/// The id of a token in tokenizer.json's added tokens or vocabulary.
fn token_id(tokenizer: &Value, content: &str) -> Option<u32> {
    let added = tokenizer["added_tokens"].as_array().and_then(|a| {
        a.iter()
            .find(|t| t["content"] == content)
            .and_then(|t| t["id"].as_u64())
    });
    added
        .or_else(|| tokenizer["model"]["vocab"][content].as_u64())
        .map(|id| id as u32)
}

/// The number of ids a tokenizer.json can produce.
fn tokenizer_len(tokenizer: &Value) -> usize {
    let vocab = tokenizer["model"]["vocab"]
        .as_object()
        .and_then(|m| m.values().filter_map(Value::as_u64).max());
    let added = tokenizer["added_tokens"]
        .as_array()
        .and_then(|a| a.iter().filter_map(|t| t["id"].as_u64()).max());
    vocab.max(added).map_or(0, |m| m as usize + 1)
}

/// Values of one tensor, chunk by chunk: a SplitMix64 stream per 64Ki-element chunk (so the
/// chunks can be generated in parallel and the bytes do not depend on the thread count),
/// Irwin–Hall of four 16-bit uniforms, scaled to `STD`.
fn fill_chunk(out: &mut [bf16], tensor_seed: u64, first: usize, init: Init) {
    const CHUNK: usize = 1 << 16;
    if init == Init::Ones {
        out.fill(bf16::ONE);
        return;
    }
    debug_assert_eq!(first % CHUNK, 0);
    // sqrt(4 * (65536^2 - 1) / 12): the standard deviation of four summed 16-bit uniforms.
    let scale = STD / 37_837.23;
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, values)| {
            let mut state = mix(tensor_seed ^ mix((first / CHUNK + c) as u64));
            for v in values {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let r = mix(state);
                let sum = (r & 0xFFFF) + ((r >> 16) & 0xFFFF) + ((r >> 32) & 0xFFFF) + (r >> 48);
                *v = bf16::from_f32((sum as i32 - 131_070) as f32 * scale);
            }
        });
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// Writes one safetensors file holding `specs`, generating each tensor as it goes.
fn write_shard(path: &Path, specs: &[&TensorSpec], seed: u64) -> Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for s in specs {
        header.insert(
            s.name.clone(),
            json!({"dtype": "BF16", "shape": s.shape, "data_offsets": [offset, offset + s.bytes()]}),
        );
        offset += s.bytes();
    }
    let mut header = serde_json::to_vec(&Value::Object(header))?;
    // The data starts 8-byte aligned, as the safetensors writers pad it.
    header.resize((8 + header.len()).div_ceil(8) * 8 - 8, b' ');
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::with_capacity(8 << 20, file);
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(&header)?;
    const BATCH: usize = 1 << 22; // elements generated per write (8 MB)
    let mut buf = vec![bf16::ZERO; BATCH];
    for s in specs {
        let n: usize = s.shape.iter().product();
        let tensor_seed = mix(seed ^ fnv1a(&s.name));
        let mut done = 0;
        while done < n {
            let len = BATCH.min(n - done);
            fill_chunk(&mut buf[..len], tensor_seed, done, s.init);
            let bytes: Vec<u8> = buf[..len].iter().flat_map(|v| v.to_le_bytes()).collect();
            w.write_all(&bytes)?;
            done += len;
        }
    }
    w.into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub fn run(args: GenModelArgs) -> Result<()> {
    let shape = args.preset.shape();
    if args.out.join("config.json").exists() && !args.force {
        bail!(
            "{} already holds a model (config.json); pass --force to overwrite it",
            args.out.display()
        );
    }
    let tok_dir = match &args.tokenizer_from {
        Some(d) => d.clone(),
        None => find_tokenizer_folder(shape.vocab)?,
    };
    let tokenizer = read_json(&tok_dir.join("tokenizer.json"))?;
    let tok_len = tokenizer_len(&tokenizer);
    if tok_len > shape.vocab {
        bail!(
            "{}: the tokenizer has {tok_len} ids, more than the preset's vocabulary of {}",
            tok_dir.display(),
            shape.vocab
        );
    }
    let bos = token_id(&tokenizer, BOS).unwrap_or(QWEN_BOS_ID);
    let eos = token_id(&tokenizer, EOS).unwrap_or(QWEN_EOS_ID);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let src = tok_dir.join(file);
        if src.is_file() {
            // Read and written rather than copied: the source's read-only mode must not come
            // along and make a later --force fail.
            let bytes =
                std::fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
            let dst = args.out.join(file);
            let _ = std::fs::remove_file(&dst);
            std::fs::write(&dst, bytes).with_context(|| format!("writing {}", dst.display()))?;
        } else if file != "special_tokens_map.json" {
            bail!("{} has no {file}", tok_dir.display());
        }
    }
    let write_json = |name: &str, v: &Value| -> Result<()> {
        let path = args.out.join(name);
        std::fs::write(&path, serde_json::to_string_pretty(v)? + "\n")
            .with_context(|| format!("writing {}", path.display()))
    };
    write_json("config.json", &config_json(&shape, bos, eos))?;
    write_json("generation_config.json", &generation_config_json(bos, eos))?;

    // Shards: tensors in order, a new shard when the next one would pass the limit.
    let specs = tensor_specs(&shape);
    let mut shards: Vec<Vec<&TensorSpec>> = vec![Vec::new()];
    let mut size = 0;
    for s in &specs {
        if size > 0 && size + s.bytes() > args.max_shard_size {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("one shard").push(s);
        size += s.bytes();
    }
    let total: usize = specs.iter().map(TensorSpec::bytes).sum();
    let params: usize = total / 2;
    let names: Vec<String> = if shards.len() == 1 {
        vec!["model.safetensors".into()]
    } else {
        (1..=shards.len())
            .map(|i| format!("model-{i:05}-of-{:05}.safetensors", shards.len()))
            .collect()
    };
    // A stale single file or index from an earlier run would shadow or confuse the new one.
    for stale in ["model.safetensors", "model.safetensors.index.json"] {
        let _ = std::fs::remove_file(args.out.join(stale));
    }
    let start = std::time::Instant::now();
    for (shard, name) in shards.iter().zip(&names) {
        eprintln!(
            "writing {} ({} tensors, {:.2} GB)",
            name,
            shard.len(),
            shard.iter().map(|s| s.bytes()).sum::<usize>() as f64 / 1e9
        );
        write_shard(&args.out.join(name), shard, args.seed)?;
    }
    if shards.len() > 1 {
        let weight_map: serde_json::Map<String, Value> = shards
            .iter()
            .zip(&names)
            .flat_map(|(shard, name)| shard.iter().map(move |s| (s.name.clone(), json!(name))))
            .collect();
        write_json(
            "model.safetensors.index.json",
            &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
        )?;
    }
    eprintln!(
        "{}: {:?}, {params} parameters ({:.2} GB bf16) in {} shard(s), tokenizer from {} \
         (bos {bos}, eos {eos}), {:.1} s",
        args.out.display(),
        args.preset,
        total as f64 / 1e9,
        shards.len(),
        tok_dir.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_1_5b_preset_has_the_published_parameter_count() {
        let specs = tensor_specs(&Preset::R1DistillQwen1_5b.shape());
        let params: usize = specs.iter().map(|s| s.bytes() / 2).sum();
        // DeepSeek-R1-Distill-Qwen-1.5B: 1,777,088,000 parameters.
        assert_eq!(params, 1_777_088_000);
        assert_eq!(specs.len(), 1 + 28 * 12 + 2);
    }

    #[test]
    fn the_0_5b_preset_has_the_published_parameter_count() {
        let specs = tensor_specs(&Preset::Qwen2_5_0_5b.shape());
        let params: usize = specs.iter().map(|s| s.bytes() / 2).sum();
        // Qwen2.5-0.5B: 494,032,768 parameters, the output head tied to the embeddings.
        assert_eq!(params, 494_032_768);
        assert!(!specs.iter().any(|s| s.name == "lm_head.weight"));
    }

    #[test]
    fn chunks_do_not_depend_on_where_a_batch_starts() {
        let mut whole = vec![bf16::ZERO; 1 << 18];
        fill_chunk(&mut whole, 42, 0, Init::Normal);
        let mut tail = vec![bf16::ZERO; 1 << 17];
        fill_chunk(&mut tail, 42, 1 << 17, Init::Normal);
        assert_eq!(&whole[1 << 17..], &tail[..]);
        let mean = whole.iter().map(|v| v.to_f32()).sum::<f32>() / whole.len() as f32;
        let var = whole.iter().map(|v| v.to_f32().powi(2)).sum::<f32>() / whole.len() as f32;
        assert!(
            mean.abs() < 1e-3 && (var.sqrt() - STD).abs() < 1e-3,
            "{mean} {var}"
        );
    }
}
