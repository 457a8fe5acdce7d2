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
