//! The paged KV cache: one `[num_blocks, 2, kv_heads, block_size * head_dim]` tensor per layer
//! (the layout inside a block is `paged_attention`'s business), allocated once at start-up from
//! a memory budget.
//!
//! It owns memory, not bookkeeping: which block belongs to which sequence is the engine's
//! block manager's business.
//!
//! On the CPU the budget is a byte count (`--kv-cache-memory`). On a CUDA device it is
//! vLLM's `--gpu-memory-utilization`: once the weights are loaded, the pool gets what is left
//! of that fraction of the device's memory after what is already in use (weights, CUDA
//! context, other processes) and a reserve for one step's activations
//! ([`KvCache::activation_reserve`], an estimate from the model's shape, not a profiling run).

use candle_core::{DType, Device, Tensor};

use super::config::ModelConfig;
use super::ModelError;

/// `--kv-cache-dtype`: what the cache stores. `auto` is the model's compute dtype. On the CPU
/// an f32 model may store bf16 or f16 instead: half the bytes per token, so twice the tokens
/// in the same `--kv-cache-memory` and half the bytes attention streams at long contexts;
/// each K/V value is rounded once as it is written, and attention still computes in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheDtype {
    #[default]
    Auto,
    #[value(alias = "float32")]
    #[serde(alias = "float32")]
    F32,
    #[value(alias = "bfloat16")]
    #[serde(alias = "bfloat16")]
    Bf16,
    #[value(alias = "float16")]
    #[serde(alias = "float16")]
    F16,
}

impl KvCacheDtype {
    /// The cache's dtype for a model computing in `compute` on `device`, or why not: only the
    /// CPU kernels read a cache in another dtype than the model's, and only from f32.
    pub fn resolve(self, compute: DType, device: &Device) -> Result<DType, ModelError> {
        let want = match self {
            Self::Auto => return Ok(compute),
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        };
        if want == compute || (device.is_cpu() && compute == DType::F32) {
            return Ok(want);
        }
        Err(ModelError::Resolve(format!(
            "--kv-cache-dtype {}: the model computes in {compute:?}{}, and the cache can differ \
             from that only for an f32 model on the CPU; use --kv-cache-dtype auto",
            self.name(),
            if device.is_cpu() { "" } else { " on a GPU" },
        )))
    }

    /// The name vLLM gives it (`cache_config_info`'s `cache_dtype` label).
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::F32 => "float32",
            Self::Bf16 => "bfloat16",
            Self::F16 => "float16",
        }
    }
}

pub struct KvCache {
    layers: Vec<Tensor>,
    num_blocks: usize,
    block_size: usize,
}

impl KvCache {
    /// Bytes one block takes across all layers (K and V).
    pub fn bytes_per_block(config: &ModelConfig, block_size: usize, dtype: DType) -> usize {
        2 * config.num_hidden_layers
            * block_size
            * config.num_key_value_heads
            * config.head_dim
            * dtype.size_in_bytes()
    }

    /// How many blocks fit in `bytes`.
    pub fn blocks_for_budget(
        config: &ModelConfig,
        block_size: usize,
        dtype: DType,
        bytes: usize,
    ) -> usize {
        bytes / Self::bytes_per_block(config, block_size, dtype).max(1)
    }

    /// Bytes set aside for one step's activations: the live intermediates of a layer for
    /// `max_tokens` tokens (twice, for temporaries), the f32 logits of `max_seqs` rows and
    /// their half-precision source, and a fixed 256 MiB for cuBLAS workspaces and allocator
    /// slack. Deliberately generous: too small a reserve fails a step with out-of-memory,
    /// too large only costs KV blocks.
    pub fn activation_reserve(
        config: &ModelConfig,
        max_tokens: usize,
        max_seqs: usize,
        dtype: DType,
    ) -> usize {
        let elem = dtype.size_in_bytes();
        let per_token = 4 * config.hidden_size
            + 3 * config.intermediate_size
            + (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim;
        let layer = 2 * max_tokens * per_token * elem;
        let logits = 2 * max_seqs.min(max_tokens) * config.vocab_size * (elem + 4);
        layer + logits + (256 << 20)
    }

    /// The pool's bytes under `--gpu-memory-utilization fraction`, from the device's `free`
    /// and `total` memory measured after the weights were loaded.
    pub fn budget_from_utilization(
        free: usize,
        total: usize,
        fraction: f64,
        reserve: usize,
    ) -> Result<usize, String> {
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(format!(
                "gpu_memory_utilization must be in (0, 1], got {fraction}"
            ));
        }
        let allowed = (total as f64 * fraction) as usize;
        let in_use = total.saturating_sub(free);
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        match allowed.checked_sub(in_use + reserve) {
            Some(budget) if budget > 0 => Ok(budget),
            _ => Err(format!(
                "no room for a KV cache: {:.2} GiB allowed ({fraction} of {:.2} GiB), \
                 {:.2} GiB already in use (weights, CUDA context, other processes) and \
                 {:.2} GiB reserved for activations; raise --gpu-memory-utilization, \
                 lower --max-num-batched-tokens, or free the GPU",
                gib(allowed),
                gib(total),
                gib(in_use),
                gib(reserve)
            )),
        }
    }

    pub fn new(
        config: &ModelConfig,
        num_blocks: usize,
        block_size: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let shape = (
            num_blocks,
            2,
            config.num_key_value_heads,
            block_size * config.head_dim,
        );
        let layers = (0..config.num_hidden_layers)
            .map(|_| Tensor::zeros(shape, dtype, device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            num_blocks,
            block_size,
        })
    }

    pub fn layer(&self, i: usize) -> &Tensor {
        &self.layers[i]
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only an f32 model on the CPU keeps its cache in another dtype. (On the CPU every
    /// `--dtype` computes in f32 around its weight matrices, so the refusals are a GPU's:
    /// a model computing in bf16 there.)
    #[test]
    fn a_cache_dtype_other_than_the_model_s_needs_an_f32_model() {
        let cpu = Device::Cpu;
        assert_eq!(
            KvCacheDtype::Auto.resolve(DType::BF16, &cpu).ok(),
            Some(DType::BF16)
        );
        assert_eq!(
            KvCacheDtype::Bf16.resolve(DType::F32, &cpu).ok(),
            Some(DType::BF16)
        );
        assert_eq!(
            KvCacheDtype::F16.resolve(DType::F32, &cpu).ok(),
            Some(DType::F16)
        );
        assert_eq!(
            KvCacheDtype::Bf16.resolve(DType::BF16, &cpu).ok(),
            Some(DType::BF16)
        );
        let err = KvCacheDtype::F16
            .resolve(DType::BF16, &cpu)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("--kv-cache-dtype float16") && err.contains("BF16"),
            "{err}"
        );
    }

    #[test]
    fn utilization_budget_is_the_fraction_minus_use_and_reserve() {
        let gib = 1usize << 30;
        // 80 GiB card, 4 GiB in use after the weights, 0.9 allowed, 1 GiB reserve.
        let b = KvCache::budget_from_utilization(76 * gib, 80 * gib, 0.9, gib).unwrap();
        assert_eq!(b, (80.0 * gib as f64 * 0.9) as usize - 5 * gib);
        let err = KvCache::budget_from_utilization(gib, 80 * gib, 0.9, gib).unwrap_err();
        assert!(err.contains("no room for a KV cache"), "{err}");
        assert!(KvCache::budget_from_utilization(gib, 80 * gib, 0.0, 0).is_err());
        assert!(KvCache::budget_from_utilization(gib, 80 * gib, 1.5, 0).is_err());
        assert!(KvCache::budget_from_utilization(gib, 80 * gib, f64::NAN, 0).is_err());
    }

    #[test]
    fn the_reserve_grows_with_the_batch() {
        let c = ModelConfig::from_json(
            r#"{"architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936,
                "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                "num_attention_heads": 12, "num_key_value_heads": 2,
                "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
                "rope_theta": 10000.0, "tie_word_embeddings": false}"#,
            None,
        )
        .unwrap();
        let small = KvCache::activation_reserve(&c, 64, 8, DType::BF16);
        let large = KvCache::activation_reserve(&c, 2048, 256, DType::BF16);
        assert!(small >= 256 << 20 && large > small);
    }
}
