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
//! The CPU kernels run one work item per (token, kv head): the group of query heads sharing
//! that kv head is scored against each cached key once, in one pass with an online softmax and
//! per-thread scratch reused across items (nothing is allocated per item). With the `cuda`
//! feature the same two candle ops run on a CUDA device through the kernels of `super::cuda`
//! (same layout, same semantics); the batch metadata is uploaded once per forward and shared
//! by every layer.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, InplaceOp3, Layout, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use super::batch::ForwardBatch;

/// Element types the cache can hold; math is always done in f32.
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
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl KvElem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
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
    /// The metadata on the CUDA device, uploaded by the first op that runs there.
    #[cfg(feature = "cuda")]
    device_meta: std::sync::OnceLock<super::cuda::DeviceMeta>,
}

impl AttentionMeta {
    pub fn new(batch: &ForwardBatch, shape: AttentionShape) -> Self {
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
    fn write<T: KvElem>(
        &self,
        cache: &mut [T],
        cache_l: &Layout,
        k: &[T],
        k_l: &Layout,
        v: &[T],
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
                    cache[k_base + d * block_size + offset] = k[src + d];
                }
                let v_base = block_base + (num_kv_heads + g) * head_len + offset * head_dim;
                cache[v_base..v_base + head_dim].copy_from_slice(&v[src..src + head_dim]);
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

/// Scratch one worker thread reuses for every (token, kv head) it handles.
#[derive(Default)]
struct Scratch {
    q: Vec<f32>,
    scores: Vec<f32>,
    acc: Vec<f32>,
}

/// What one (token, kv head) work item reads.
struct ItemInputs<'a, T> {
    meta: &'a AttentionMeta,
    q: &'a [T],
    cache: &'a [T],
}

/// `e^x` to about 1e-7 relative error, inlined so the hot loop does not call into libm.
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
    // Written as selects (not `clamp`, whose NaN rules block vectorisation).
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    // Cody-Waite: ln 2 split so that n * LN2_HI is exact.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // n is within [-126, 127] after the clamp, so the exponent bits are a normal float's.
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Largest value, eight lanes at a time (a plain fold is a serial dependency chain).
#[inline(always)]
fn max8(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            lanes[l] = if c[l] > lanes[l] { c[l] } else { lanes[l] };
        }
    }
    let mut m = tail
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for l in lanes {
        m = if l > m { l } else { m };
    }
    m
}

/// Sum, eight lanes at a time.
#[inline(always)]
fn sum8(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..8 {
            lanes[l] += c[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `scores[j] = q · key_j` for the first `scores.len()` keys of a block stored
/// dimension-major. Eight keys at a time in registers, with separate accumulators for even and
/// odd dimensions so consecutive multiply-adds do not wait on each other.
#[inline(always)]
fn block_scores_into<T: KvElem>(q: &[f32], keys: &[T], block_size: usize, scores: &mut [f32]) {
    let count = scores.len();
    let mut j0 = 0;
    while j0 + 8 <= count {
        let (mut even, mut odd) = ([0f32; 8], [0f32; 8]);
        let mut d = 0;
        while d + 1 < q.len() {
            let (q0, q1) = (q[d], q[d + 1]);
            let k0 = &keys[d * block_size + j0..d * block_size + j0 + 8];
            let k1 = &keys[(d + 1) * block_size + j0..(d + 1) * block_size + j0 + 8];
            for l in 0..8 {
                even[l] += q0 * k0[l].to_f32();
                odd[l] += q1 * k1[l].to_f32();
            }
            d += 2;
        }
        if d < q.len() {
            let k0 = &keys[d * block_size + j0..d * block_size + j0 + 8];
            for l in 0..8 {
                even[l] += q[d] * k0[l].to_f32();
            }
        }
        for l in 0..8 {
            scores[j0 + l] = even[l] + odd[l];
        }
        j0 += 8;
    }
    for (j, s) in scores.iter_mut().enumerate().skip(j0) {
        *s = q
            .iter()
            .enumerate()
            .map(|(d, &qd)| qd * keys[d * block_size + j].to_f32())
            .sum();
    }
}

/// `acc += Σ_j p_j · value_j` for values stored slot-major, eight dimensions at a time held
/// in registers across all slots, with separate accumulators for even and odd slots.
#[inline(always)]
fn accumulate_values<T: KvElem>(p: &[f32], values: &[T], head_dim: usize, acc: &mut [f32]) {
    let full = head_dim / 8 * 8;
    for c in (0..full).step_by(8) {
        let (mut even, mut odd) = ([0f32; 8], [0f32; 8]);
        let mut j = 0;
        while j + 1 < p.len() {
            let v0 = &values[j * head_dim + c..j * head_dim + c + 8];
            let v1 = &values[(j + 1) * head_dim + c..(j + 1) * head_dim + c + 8];
            for l in 0..8 {
                even[l] += p[j] * v0[l].to_f32();
                odd[l] += p[j + 1] * v1[l].to_f32();
            }
            j += 2;
        }
        if j < p.len() {
            let v0 = &values[j * head_dim + c..j * head_dim + c + 8];
            for l in 0..8 {
                even[l] += p[j] * v0[l].to_f32();
            }
        }
        for l in 0..8 {
            acc[c + l] += even[l] + odd[l];
        }
    }
    for (d, a) in acc.iter_mut().enumerate().skip(full) {
        *a += p
            .iter()
            .enumerate()
            .map(|(j, &pj)| pj * values[j * head_dim + d].to_f32())
            .sum::<f32>();
    }
}

/// Attention for the query heads of kv head `idx % kv_heads` at token `idx / kv_heads`,
/// written to `out` (`group * head_dim` values). One pass over the history, a block at a time,
/// with an online softmax: scores of a block, its max, exponentials, then its values.
#[inline(always)]
fn attend_item<T: KvElem>(
    inp: &ItemInputs<'_, T>,
    scratch: &mut Scratch,
    idx: usize,
    out: &mut [T],
) {
    let m = inp.meta;
    let AttentionShape {
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
    } = m.shape;
    let group = num_heads / num_kv_heads;
    let item_len = group * head_dim;
    let head_len = block_size * head_dim;
    let (t, g) = (idx / num_kv_heads, idx % num_kv_heads);
    let (seq, pos) = m.token_seq[t];
    let n_ctx = pos as usize + 1;
    let table = &m.block_tables[seq as usize * m.max_blocks..][..n_ctx.div_ceil(block_size)];
    scratch.q.clear();
    scratch.q.extend(
        inp.q[(t * num_heads + g * group) * head_dim..][..item_len]
            .iter()
            .map(|x| x.to_f32() * m.scale),
    );
    // Per head: running max and running sum of exponentials; then one block of scores.
    scratch.scores.clear();
    scratch.scores.resize(2 * group + block_size, 0.0);
    let (stats, block_scores) = scratch.scores.split_at_mut(2 * group);
    let (maxes, sums) = stats.split_at_mut(group);
    maxes.fill(f32::NEG_INFINITY);
    scratch.acc.clear();
    scratch.acc.resize(item_len, 0.0);
    for (b, &block) in table.iter().enumerate() {
        let count = block_size.min(n_ctx - b * block_size);
        let block_base = block as usize * 2 * num_kv_heads * head_len;
        let keys = &inp.cache[block_base + g * head_len..][..head_len];
        let values = &inp.cache[block_base + (num_kv_heads + g) * head_len..][..head_len];
        // With blocks a multiple of 8 long, score whole 8-key groups even past `count` (the
        // slots exist, holding stale data) and ignore the extra scores: no scalar tail.
        let padded = if block_size % 8 == 0 {
            count.div_ceil(8) * 8
        } else {
            count
        };
        for h in 0..group {
            let q = &scratch.q[h * head_dim..(h + 1) * head_dim];
            let scores = &mut block_scores[..padded];
            block_scores_into(q, keys, block_size, scores);
            let block_max = max8(&scores[..count]);
            let acc = &mut scratch.acc[h * head_dim..(h + 1) * head_dim];
            if block_max > maxes[h] {
                // A new maximum: rescale what was accumulated under the old one.
                let rescale = fast_exp(maxes[h] - block_max);
                sums[h] *= rescale;
                acc.iter_mut().for_each(|a| *a *= rescale);
                maxes[h] = block_max;
            }
            let mx = maxes[h];
            scores.iter_mut().for_each(|s| *s = fast_exp(*s - mx));
            sums[h] += sum8(&scores[..count]);
            accumulate_values(&scores[..count], values, head_dim, acc);
        }
    }
    for h in 0..group {
        let inv = 1.0 / sums[h];
        let acc = &scratch.acc[h * head_dim..(h + 1) * head_dim];
        for (o, a) in out[h * head_dim..(h + 1) * head_dim].iter_mut().zip(acc) {
            *o = T::from_f32(a * inv);
        }
    }
}

/// The same item compiled for AVX2 + FMA, which the baseline x86-64 target lacks.
///
/// # Safety
/// The CPU must support AVX2 and FMA; callers check with `is_x86_feature_detected!`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_item_avx2<T: KvElem>(
    inp: &ItemInputs<'_, T>,
    scratch: &mut Scratch,
    idx: usize,
    out: &mut [T],
) {
    attend_item(inp, scratch, idx, out)
}

fn attend_item_best<T: KvElem>(
    inp: &ItemInputs<'_, T>,
    avx2: bool,
    scratch: &mut Scratch,
    idx: usize,
    out: &mut [T],
) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2` is true only when `is_x86_feature_detected!` found both AVX2 and FMA
        // on this CPU, which is the sole requirement of `attend_item_avx2`.
        unsafe { attend_item_avx2(inp, scratch, idx, out) };
        return;
    }
    let _ = avx2;
    attend_item(inp, scratch, idx, out)
}

fn cpu_has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl PagedAttention<'_> {
    fn run<T: KvElem>(&self, q: &[T], cache: &[T]) -> Vec<T> {
        let m = self.meta;
        let s = m.shape;
        let item_len = s.num_heads / s.num_kv_heads * s.head_dim;
        let inp = ItemInputs { meta: m, q, cache };
        let avx2 = cpu_has_avx2_fma();
        let mut out = vec![T::from_f32(0.0); q.len()];
        // Below this many multiply-adds the thread hand-off costs more than it saves.
        const PARALLEL_WORK: usize = 1 << 18;
        if m.work * s.num_heads * s.head_dim < PARALLEL_WORK {
            let mut scratch = Scratch::default();
            for (idx, chunk) in out.chunks_mut(item_len).enumerate() {
                attend_item_best(&inp, avx2, &mut scratch, idx, chunk);
            }
        } else {
            out.par_chunks_mut(item_len)
                .enumerate()
                .for_each_init(Scratch::default, |scratch, (idx, chunk)| {
                    attend_item_best(&inp, avx2, scratch, idx, chunk)
                });
        }
        out
    }

    fn checked<T: KvElem>(
        &self,
        q: &[T],
        q_l: &Layout,
        cache: &[T],
        cache_l: &Layout,
    ) -> candle_core::Result<Vec<T>> {
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
        Ok(self.run(q, cache))
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
