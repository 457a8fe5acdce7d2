//! The paged KV cache: one `[num_blocks, 2, kv_heads, block_size * head_dim]` tensor per layer
//! (the layout inside a block is `paged_attention`'s business), allocated once at start-up from
//! a memory budget.
//!
//! It owns memory, not bookkeeping: which block belongs to which sequence is the engine's
//! block manager's business.

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
