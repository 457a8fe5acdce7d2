//! Random weights for a [`ModelConfig`]: `--load-format dummy` (benchmarking an architecture
//! whose checkpoint is not at hand) and the built-in model both get their tensors here.
//!
//! Owns the list of tensor names and shapes a decoder of a config needs, and a seeded,
//! version-stable generator for their values. Must not know what the values are for: it reads
//! no files and knows nothing of tokenizers or serving.

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::PathBuf;

use super::config::ModelConfig;
use super::weights::Weights;
use super::ModelError;

/// The seed `--load-format dummy` uses, so two runs benchmark the same numbers.
pub const DUMMY_SEED: u64 = 0;

/// Standard deviation of dummy matrices: transformers' default `initializer_range`, which real
/// configs declare, so a dummy model holds the weights an untrained one of its architecture
/// would. (The test models' 0.2 also stays finite in f16 at 28 layers x 1536 wide, but its
/// logits are about ten times larger.)
pub const DUMMY_STD: f32 = 0.02;

/// Elements generated from one seed. Fixed, not derived from the thread count, so the values
/// do not depend on how many threads rayon happens to use.
const CHUNK: usize = 1 << 16;

/// Where the tensors "came from", for `Weights`' error messages.
const ORIGIN: &str = "<random weights>";

/// Every tensor `Decoder::new` reads for `config`, with random values of standard deviation
/// [`DUMMY_STD`] (RMSNorm weights are 1.0), in `dtype` on `device`. The same `seed` gives the
/// same values on every run, platform and thread count.
pub fn random_weights(
    config: &ModelConfig,
    dtype: DType,
    device: &Device,
    seed: u64,
) -> Result<Weights, ModelError> {
    random_weights_with_std(config, dtype, device, seed, DUMMY_STD)
}

/// [`random_weights`] with a chosen standard deviation for the random (non-norm) tensors.
pub(crate) fn random_weights_with_std(
    config: &ModelConfig,
    dtype: DType,
    device: &Device,
    seed: u64,
    std: f32,
) -> Result<Weights, ModelError> {
    let mut tensors = HashMap::new();
    for spec in tensor_specs(config) {
        let tensor = match spec.init {
            Init::Ones => Tensor::ones(spec.shape.as_slice(), dtype, device),
            // Each tensor's values depend only on its name, so adding or reordering tensors
            // does not change the others.
            Init::Normal => random_tensor(
                &spec.shape,
                dtype,
                device,
                mix(seed ^ fnv1a(&spec.name)),
                std,
            ),
        }
        .map_err(|e| ModelError::Tensor {
            path: PathBuf::from(ORIGIN),
            tensor: spec.name.clone(),
            message: e.to_string(),
        })?;
        tensors.insert(spec.name, tensor);
    }
    Ok(Weights::from_tensors(tensors, PathBuf::from(ORIGIN), dtype))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Init {
    Normal,
    Ones,
}

struct TensorSpec {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

/// The Hugging Face names and shapes `Decoder::new` asks for; kept in step with it by the
/// tests, which build a decoder from these weights.
fn tensor_specs(c: &ModelConfig) -> Vec<TensorSpec> {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let q_out = c.num_attention_heads * c.head_dim;
    let kv_out = c.num_key_value_heads * c.head_dim;
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
        &[c.vocab_size, h],
        Init::Normal,
    );
    for layer in 0..c.num_hidden_layers {
        let p = format!("model.layers.{layer}");
        push(format!("{p}.input_layernorm.weight"), &[h], Init::Ones);
        push(
            format!("{p}.post_attention_layernorm.weight"),
            &[h],
            Init::Ones,
        );
        for (proj, out) in [("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)] {
            push(
                format!("{p}.self_attn.{proj}.weight"),
                &[out, h],
                Init::Normal,
            );
            if c.attention_bias {
                push(format!("{p}.self_attn.{proj}.bias"), &[out], Init::Normal);
            }
        }
        push(
            format!("{p}.self_attn.o_proj.weight"),
            &[h, q_out],
            Init::Normal,
        );
        push(format!("{p}.mlp.gate_proj.weight"), &[i, h], Init::Normal);
        push(format!("{p}.mlp.up_proj.weight"), &[i, h], Init::Normal);
        push(format!("{p}.mlp.down_proj.weight"), &[h, i], Init::Normal);
    }
    push("model.norm.weight".into(), &[h], Init::Ones);
    if !c.tie_word_embeddings {
        push("lm_head.weight".into(), &[c.vocab_size, h], Init::Normal);
    }
    specs
}

/// Generates straight into the target element type, so a bf16 embedding of 233M elements never
/// exists as an f32 copy as well.
fn random_tensor(
    shape: &[usize],
    dtype: DType,
    device: &Device,
    seed: u64,
    std: f32,
) -> candle_core::Result<Tensor> {
    let n = shape.iter().product();
    let tensor = match dtype {
        DType::F32 => Tensor::from_vec(fill(n, seed, std, |x| x), shape, &Device::Cpu)?,
        DType::F16 => Tensor::from_vec(fill(n, seed, std, f16::from_f32), shape, &Device::Cpu)?,
        DType::BF16 => Tensor::from_vec(fill(n, seed, std, bf16::from_f32), shape, &Device::Cpu)?,
        other => {
            Tensor::from_vec(fill(n, seed, std, |x| x), shape, &Device::Cpu)?.to_dtype(other)?
        }
    };
    tensor.to_device(device)
}

fn fill<T: Copy + Default + Send>(n: usize, seed: u64, std: f32, convert: fn(f32) -> T) -> Vec<T> {
    let mut out = vec![T::default(); n];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(chunk, values)| {
            let mut rng = SplitMix64(mix(seed.wrapping_add(mix(chunk as u64))));
            let scale = std / IRWIN_HALL_STD;
            for v in values {
                *v = convert(rng.centred_irwin_hall() as f32 * scale);
            }
        });
    out
}

/// SplitMix64: written out here rather than taken from `rand` so that a seed keeps its values
/// across dependency upgrades.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// The sum of four 16-bit uniforms from one draw, minus its mean: Irwin–Hall, bell-shaped
    /// within ±3.46 standard deviations ([`IRWIN_HALL_STD`]). Close enough to normal for
    /// weights nobody trained, and far cheaper than Box–Muller. Integer so that the hot loop
    /// has one int-to-float conversion and one multiply per value.
    fn centred_irwin_hall(&mut self) -> i32 {
        let r = self.next_u64();
        let sum = (r & 0xFFFF) + ((r >> 16) & 0xFFFF) + ((r >> 32) & 0xFFFF) + (r >> 48);
        // At most 4 * 65535, so it fits; 131070 is 4 * 65535 / 2.
        sum as i32 - 131_070
    }
}

/// sqrt(4 * (65536^2 - 1) / 12): the standard deviation of four summed 16-bit uniforms.
const IRWIN_HALL_STD: f32 = 37_837.23;

/// SplitMix64's output function: a bijective 64-bit mixer.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A stable hash of a tensor name (std's hasher may change between releases).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{argmax_rows, Decoder, ForwardBatch, KvCache};
    use std::path::Path;

    fn shared_model(name: &str) -> Option<std::path::PathBuf> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/models")
            .join(name);
        if dir.join("config.json").is_file() {
            Some(dir)
        } else {
            eprintln!("skipping: {} is absent", dir.display());
            None
        }
    }

    #[test]
    fn generator_is_stable_and_roughly_standard_normal() {
        let values = fill(200_000, 42, 1.0, |x| x);
        // Pinned (computed independently in Python): if these change, every seeded model
        // changes with them, the built-in one included.
        let pinned: [f32; 4] = [-1.555_32, -0.202_419_7, -1.492_947_6, -0.111_636_08];
        assert!(
            values.iter().zip(pinned).all(|(v, p)| (v - p).abs() < 1e-6),
            "{:?}",
            &values[..4]
        );
        assert_eq!(fill(3, 42, 1.0, |x| x), &values[..3]);
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = values
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "variance {var}");
        assert!(values.iter().all(|v| v.abs() < 3.5));
        assert_ne!(fill(8, 1, 1.0, |x| x), fill(8, 2, 1.0, |x| x));
    }

    #[test]
    fn bf16_and_f32_generation_agree() {
        let a = fill(CHUNK * 2 + 7, 9, 0.2, |x| x);
        let b = fill(CHUNK * 2 + 7, 9, 0.2, bf16::from_f32);
        assert!(a
            .iter()
            .zip(&b)
            .all(|(x, y)| (x - y.to_f32()).abs() <= x.abs() / 128.0));
    }

    #[test]
    fn dummy_qwen2_builds_a_decoder_with_finite_logits() {
        let Some(dir) = shared_model("tiny-random-qwen2") else {
            return;
        };
        let config = ModelConfig::from_dir(&dir).unwrap();
        assert!(config.tie_word_embeddings && config.attention_bias);
        let device = Device::Cpu;
        let weights = random_weights(&config, DType::F32, &device, DUMMY_SEED).unwrap();
        assert!(weights.contains("model.layers.1.self_attn.v_proj.bias"));
        assert!(!weights.contains("lm_head.weight"));
        let decoder = Decoder::new(config.clone(), weights, &device).unwrap();
        let bs = 16;
        let cache = KvCache::new(&config, 2, bs, DType::F32, &device).unwrap();
        let mut batch = ForwardBatch::default();
        batch.push_sequence(&[0, 5, 17, 300, 9], 0, &[0], bs);
        let logits = decoder.forward(&batch, &cache).unwrap();
        assert_eq!(logits.dims(), &[1, config.vocab_size]);
        let values = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(values.iter().all(|v| v.is_finite()));
        assert_eq!(argmax_rows(&logits).unwrap().len(), 1);
    }

    #[test]
    fn untied_llama_gets_an_lm_head() {
        let Some(dir) = shared_model("tiny-llama-v512") else {
            return;
        };
        let config = ModelConfig::from_dir(&dir).unwrap();
        let weights = random_weights(&config, DType::BF16, &Device::Cpu, 1).unwrap();
        assert!(weights.contains("lm_head.weight"));
        assert!(!weights.contains("model.layers.0.self_attn.q_proj.bias"));
        assert_eq!(weights.dtype(), DType::BF16);
        Decoder::new(config, weights, &Device::Cpu).unwrap();
    }

    /// The size `--load-format dummy` exists for. Ignored by default: it takes gigabytes.
    #[test]
    #[ignore]
    fn qwen2_1_5b_generates_in_bf16_quickly() {
        let config = ModelConfig::from_json(
            r#"{"architectures":["Qwen2ForCausalLM"],"vocab_size":151936,"hidden_size":1536,
            "intermediate_size":8960,"num_hidden_layers":28,"num_attention_heads":12,
            "num_key_value_heads":2,"rms_norm_eps":1e-6,"tie_word_embeddings":false}"#,
            None,
        )
        .unwrap();
        let start = std::time::Instant::now();
        let weights = random_weights(&config, DType::BF16, &Device::Cpu, DUMMY_SEED).unwrap();
        let elapsed = start.elapsed();
        eprintln!("1.5B dummy weights in bf16: {elapsed:?}");
        Decoder::new(config, weights, &Device::Cpu).unwrap();
        assert!(elapsed.as_secs() < 30, "took {elapsed:?}");
    }
}
