//! Attention over the paged KV cache, and the write of new K/V into it.
//!
//! The cache of one layer is a single tensor `[num_blocks, 2, kv_heads, block_size * head_dim]`.
//! Within a block, one kv head's keys are stored dimension-major (`[head_dim][block_size]`) so
//! the scores of a whole block are a few vector multiply-adds with no horizontal sums, and its
//! values slot-major (`[block_size][head_dim]`) so accumulating them is one vector axpy per
//! slot. A token's slot is `block * block_size + offset`. The operators read sequences'
//! history only through their block tables, so the blocks of different sequences may be
//! interleaved anywhere in the pool.
//!
//! The CPU kernel is in `cpu`. With the `cuda` feature the same two candle ops run on a CUDA
//! device through the kernels of `super::cuda` (same layout, same semantics); the batch
//! metadata is uploaded once per forward and shared by every layer.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Device, InplaceOp3, Layout, Shape, Tensor};
use half::{bf16, f16};

use super::batch::ForwardBatch;
use super::fast_math::cpu_has_avx2_fma;

/// Element types the cache and the queries can hold; math is always done in f32.
pub trait KvElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl KvElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl KvElem for f16 {
    /// Branch-free, so the kernels' loads vectorise (`half`'s conversion checks for F16C at
    /// run time and converts one value per call); exact, as a unit test checks for all 2^16.
    /// The magnitude's bits placed as an f32's, times 2^112, rebias the exponent and
    /// normalise a subnormal in one exact multiply; infinities and NaNs come out >= 2^16 and
    /// get the top exponent.
    #[inline(always)]
    fn to_f32(self) -> f32 {
        let h = self.to_bits() as u32;
        let scaled = f32::from_bits((h & 0x7fff) << 13) * f32::from_bits(0x7780_0000);
        let special = 0u32.wrapping_sub((scaled >= 65536.0) as u32) & 0x7f80_0000;
        f32::from_bits(scaled.to_bits() | special | (h & 0x8000) << 16)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl KvElem for bf16 {
    /// The bits moved up (exact). `half`'s own conversion also quiets a NaN, a branch that
    /// keeps the kernels' loads from vectorising; a NaN stays a NaN here either way.
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// The shape facts both ops need.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

/// Per-forward metadata derived once from the batch and shared by every layer.
pub struct AttentionMeta {
    shape: AttentionShape,
    scale: f32,
    slots: Vec<u32>,
    /// For each token: (its sequence, its position in that sequence).
    token_seq: Vec<(u32, u32)>,
    context_lens: Vec<u32>,
    block_tables: Vec<u32>,
    max_blocks: usize,
    /// Total (query token × cached token) pairs, to decide whether threads pay off.
    work: usize,
    /// Leading blocks that several of the batch's tokens share, attended once per tile of
    /// query rows on the CPU (the CUDA kernels do not use them).
    prefixes: shared_prefix::SharedPrefixes,
    /// The metadata on the CUDA device, uploaded by the first op that runs there.
    #[cfg(feature = "cuda")]
    device_meta: std::sync::OnceLock<super::cuda::DeviceMeta>,
}

impl AttentionMeta {
    /// `device` is where the ops will run: only the CPU kernel reads the shared prefixes, so
    /// other devices skip finding them.
    pub fn new(batch: &ForwardBatch, shape: AttentionShape, device: &Device) -> Self {
        let mut token_seq = Vec::with_capacity(batch.num_tokens());
        let mut work = 0usize;
        for s in 0..batch.num_seqs() {
            let (start, end) = (batch.query_start[s], batch.query_start[s + 1]);
            let ctx = batch.context_lens[s];
            for t in start..end {
                let pos = ctx - (end - t);
                token_seq.push((s as u32, pos));
                work += pos as usize + 1;
            }
        }
        Self {
            shape,
            scale: 1.0 / (shape.head_dim as f32).sqrt(),
            slots: batch.slot_mapping.clone(),
            token_seq,
            context_lens: batch.context_lens.clone(),
            block_tables: batch.block_tables.clone(),
            max_blocks: batch.max_blocks,
            work,
            prefixes: if device.is_cpu() {
                shared_prefix::SharedPrefixes::find(batch, shape)
            } else {
                shared_prefix::SharedPrefixes::default()
            },
            #[cfg(feature = "cuda")]
            device_meta: std::sync::OnceLock::new(),
        }
    }

    /// Writes `k` and `v` (`[T, kv_heads, head_dim]`) into `cache` at this batch's slots.
    pub fn write_kv(&self, cache: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<()> {
        cache.inplace_op3(k, v, &WriteKv { meta: self })
    }

    /// Attention of `q` (`[T, heads, head_dim]`) over the cache; returns `[T, heads * head_dim]`.
    pub fn attend(&self, q: &Tensor, cache: &Tensor) -> candle_core::Result<Tensor> {
        q.apply_op2_no_bwd(cache, &PagedAttention { meta: self })
    }
}

fn contiguous<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

struct WriteKv<'a> {
    meta: &'a AttentionMeta,
}

impl WriteKv<'_> {
    /// `S` is the model's compute dtype and `T` the cache's: on the CPU an f32 model may keep
    /// its cache in bf16 or f16 (`--kv-cache-dtype`), each value rounded as it is stored.
    fn write<T: KvElem, S: KvElem>(
        &self,
        cache: &mut [T],
        cache_l: &Layout,
        k: &[S],
        k_l: &Layout,
        v: &[S],
        v_l: &Layout,
    ) -> candle_core::Result<()> {
        let (start, end) = cache_l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("kv cache must be contiguous".into()))?;
        let cache = &mut cache[start..end];
        let k = contiguous(k, k_l, "k")?;
        let v = contiguous(v, v_l, "v")?;
        let AttentionShape {
            num_kv_heads,
            head_dim,
            block_size,
            ..
        } = self.meta.shape;
        let row = num_kv_heads * head_dim;
        if k.len() != self.meta.slots.len() * row || v.len() != k.len() {
            candle_core::bail!("k/v do not match the batch's token count");
        }
        let head_len = block_size * head_dim;
        for (t, &slot) in self.meta.slots.iter().enumerate() {
            let (block, offset) = (slot as usize / block_size, slot as usize % block_size);
            let block_base = block * 2 * num_kv_heads * head_len;
            if block_base + 2 * num_kv_heads * head_len > cache.len() {
                candle_core::bail!("slot {slot} is outside the kv cache");
            }
            for g in 0..num_kv_heads {
                let src = t * row + g * head_dim;
                let k_base = block_base + g * head_len;
                for d in 0..head_dim {
                    cache[k_base + d * block_size + offset] = T::from_f32(k[src + d].to_f32());
                }
                let v_base = block_base + (num_kv_heads + g) * head_len + offset * head_dim;
                for (c, x) in cache[v_base..v_base + head_dim]
                    .iter_mut()
                    .zip(&v[src..src + head_dim])
                {
                    *c = T::from_f32(x.to_f32());
                }
            }
        }
        Ok(())
    }
}

impl InplaceOp3 for WriteKv<'_> {
    fn name(&self) -> &'static str {
        "paged-write-kv"
    }

    fn cpu_fwd(
        &self,
        cache: &mut CpuStorage,
        cache_l: &Layout,
        k: &CpuStorage,
        k_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> candle_core::Result<()> {
        match (cache, k, v) {
            (CpuStorage::F32(c), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                self.write(c, cache_l, k, k_l, v, v_l)
            }
            (CpuStorage::F16(c), CpuStorage::F16(k), CpuStorage::F16(v)) => {
                self.write(c, cache_l, k, k_l, v, v_l)
            }
            (CpuStorage::BF16(c), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                self.write(c, cache_l, k, k_l, v, v_l)
            }
            (CpuStorage::BF16(c), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                self.write(c, cache_l, k, k_l, v, v_l)
            }
            (CpuStorage::F16(c), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                self.write(c, cache_l, k, k_l, v, v_l)
            }
            (c, k, _) => candle_core::bail!(
                "paged-write-kv: unsupported dtypes cache {:?}, k {:?}",
                c.dtype(),
                k.dtype()
            ),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        cache: &mut candle_core::CudaStorage,
        cache_l: &Layout,
        k: &candle_core::CudaStorage,
        k_l: &Layout,
        v: &candle_core::CudaStorage,
        v_l: &Layout,
    ) -> candle_core::Result<()> {
        let m = self.meta;
        let s = m.shape;
        // The CPU op's bounds check, on the host copy of the slots: no device round trip.
        let block_len = 2 * s.num_kv_heads * s.block_size * s.head_dim;
        let blocks = cache_l.shape().elem_count() / block_len.max(1);
        if let Some(slot) = m
            .slots
            .iter()
            .find(|&&slot| slot as usize / s.block_size >= blocks)
        {
            candle_core::bail!("slot {slot} is outside the kv cache");
        }
        let meta = m.device_meta(cache.device())?;
        super::cuda::write_kv(cache, cache_l, k, k_l, v, v_l, meta, &m.kernel_shape())
    }
}

#[cfg(feature = "cuda")]
impl AttentionMeta {
    fn device_meta(
        &self,
        dev: &candle_core::CudaDevice,
    ) -> candle_core::Result<&super::cuda::DeviceMeta> {
        if let Some(meta) = self.device_meta.get() {
            return Ok(meta);
        }
        let meta =
            super::cuda::DeviceMeta::upload(dev, &self.slots, &self.token_seq, &self.block_tables)?;
        Ok(self.device_meta.get_or_init(|| meta))
    }

    fn kernel_shape(&self) -> super::cuda::KernelShape {
        let s = self.shape;
        super::cuda::KernelShape {
            num_tokens: self.token_seq.len(),
            num_heads: s.num_heads,
            num_kv_heads: s.num_kv_heads,
            head_dim: s.head_dim,
            block_size: s.block_size,
            max_blocks: self.max_blocks,
            scale: self.scale,
        }
    }

    /// The CPU op's check that every block a token reads lies inside a cache of `slots` slots.
    fn tables_in_bounds(&self, slots: usize) -> bool {
        let s = self.shape;
        self.block_tables
            .chunks(self.max_blocks.max(1))
            .zip(&self.context_lens)
            .all(|(table, &ctx)| {
                table[..(ctx as usize).div_ceil(s.block_size)]
                    .iter()
                    .all(|&b| (b as usize + 1) * s.block_size <= slots)
            })
    }
}

struct PagedAttention<'a> {
    meta: &'a AttentionMeta,
}

impl PagedAttention<'_> {
    fn checked<Q: KvElem, T: KvElem>(
        &self,
        q: &[Q],
        q_l: &Layout,
        cache: &[T],
        cache_l: &Layout,
    ) -> candle_core::Result<Vec<Q>> {
        let q = contiguous(q, q_l, "q")?;
        let cache = contiguous(cache, cache_l, "kv cache")?;
        let s = self.meta.shape;
        if q.len() != self.meta.token_seq.len() * s.num_heads * s.head_dim {
            candle_core::bail!("q does not match the batch's token count");
        }
        let slots = cache.len() / (2 * s.num_kv_heads * s.head_dim);
        // The cache holds whole blocks, so `slots` is a multiple of the block size.
        let in_bounds = self
            .meta
            .block_tables
            .chunks(self.meta.max_blocks.max(1))
            .zip(&self.meta.context_lens)
            .all(|(table, &ctx)| {
                table[..(ctx as usize).div_ceil(s.block_size)]
                    .iter()
                    .all(|&b| (b as usize + 1) * s.block_size <= slots)
            });
        if !in_bounds {
            candle_core::bail!("a block table points outside the kv cache");
        }
        Ok(cpu::attend(self.meta, q, cache, cpu_has_avx2_fma()))
    }
}

impl CustomOp2 for PagedAttention<'_> {
    fn name(&self) -> &'static str {
        "paged-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_l: &Layout,
        cache: &CpuStorage,
        cache_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = self.meta.shape;
        let shape = Shape::from((self.meta.token_seq.len(), s.num_heads * s.head_dim));
        let storage = match (q, cache) {
            (CpuStorage::F32(q), CpuStorage::F32(c)) => {
                CpuStorage::F32(self.checked(q, q_l, c, cache_l)?)
            }
            (CpuStorage::F16(q), CpuStorage::F16(c)) => {
                CpuStorage::F16(self.checked(q, q_l, c, cache_l)?)
            }
            (CpuStorage::BF16(q), CpuStorage::BF16(c)) => {
                CpuStorage::BF16(self.checked(q, q_l, c, cache_l)?)
            }
            (CpuStorage::F32(q), CpuStorage::BF16(c)) => {
                CpuStorage::F32(self.checked(q, q_l, c, cache_l)?)
            }
            (CpuStorage::F32(q), CpuStorage::F16(c)) => {
                CpuStorage::F32(self.checked(q, q_l, c, cache_l)?)
            }
            (q, c) => candle_core::bail!(
                "paged-attention: unsupported dtypes q {:?}, cache {:?}",
                q.dtype(),
                c.dtype()
            ),
        };
        Ok((storage, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        q_l: &Layout,
        cache: &candle_core::CudaStorage,
        cache_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let m = self.meta;
        let s = m.shape;
        let slots = cache_l.shape().elem_count() / (2 * s.num_kv_heads * s.head_dim).max(1);
        if !m.tables_in_bounds(slots) {
            candle_core::bail!("a block table points outside the kv cache");
        }
        let meta = m.device_meta(q.device())?;
        super::cuda::paged_attention(q, q_l, cache, cache_l, meta, &m.kernel_shape())
    }
}

mod cpu;
mod shared_prefix;
#[cfg(test)]
mod tests;
