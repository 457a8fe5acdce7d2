//! The CPU kernel of paged attention: one work item per (token, kv head), in two passes over
//! the history: the scores of every position for the query heads sharing that kv head (each
//! key vector loaded once for the whole group), then per head one max and one
//! exponential-and-sum over the row, then the values (each loaded once for the group). Rows
//! and accumulators live in per-thread scratch that only grows, so nothing is allocated per
//! item.
//!
//! It reads the batch only through [`AttentionMeta`] and the cache only through block tables;
//! it knows nothing of the CUDA path or of how the cache was written.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::super::fast_math::Fused;
use super::super::fast_math::{fast_exp, MulAdd, Unfused};
use super::shared_prefix::{self, SharedPrefixes, Tile, TileInputs, TileScratch};
use super::{AttentionMeta, AttentionShape, KvElem};

/// Scratch one worker thread reuses for every (token, kv head) it handles. The buffers only
/// ever grow, so a thread allocates once for the longest context it meets.
#[derive(Default)]
struct Scratch {
    /// The group's query heads, pre-scaled, `[group][head_dim]`.
    q: Vec<f32>,
    /// Scores, then probabilities, of every context position, `[heads in flight][stride]`.
    scores: Vec<f32>,
    /// Unnormalised outputs of the heads in flight, `[heads][head_dim]`.
    acc: Vec<f32>,
}

/// What one (token, kv head) work item reads.
struct ItemInputs<'a, Q, T> {
    meta: &'a AttentionMeta,
    q: &'a [Q],
    cache: &'a [T],
    /// The shared prefixes' partial results (see `shared_prefix`).
    partials: &'a [f32],
}

/// Largest value, eight lanes at a time (a plain fold is a serial dependency chain).
#[inline(always)]
pub(super) fn max8(x: &[f32]) -> f32 {
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

/// Replaces each score by `e^(score - max)` and returns their sum, eight lanes at a time.
#[inline(always)]
pub(super) fn exp_sum<M: MulAdd>(x: &mut [f32], max: f32) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        for l in 0..8 {
            c[l] = fast_exp::<M>(c[l] - max);
            lanes[l] += c[l];
        }
    }
    let mut tail = 0.0;
    for s in chunks.into_remainder() {
        *s = fast_exp::<M>(*s - max);
        tail += *s;
    }
    lanes.iter().sum::<f32>() + tail
}

#[inline(always)]
pub(super) fn load8<T: KvElem>(x: &[T]) -> [f32; 8] {
    load::<8, T>(x)
}

#[inline(always)]
fn load<const W: usize, T: KvElem>(x: &[T]) -> [f32; W] {
    let x = &x[..W];
    std::array::from_fn(|l| x[l].to_f32())
}

/// Scores of keys `j0..j0 + W` of a block stored dimension-major against `H` query heads
/// (`q` is `[H][head_dim]`). Each key vector is loaded once for all heads; even and odd
/// dimensions accumulate separately so consecutive multiply-adds do not wait on each other.
/// `W` is 8, or 16 where the accumulators still fit the registers (`H <= 2`): two lanes of
/// eight then share each query broadcast, which halves the loads per multiply-add.
#[inline(always)]
fn score_keys<const H: usize, const W: usize, M: MulAdd, T: KvElem>(
    q: &[f32],
    keys: &[T],
    block_size: usize,
    j0: usize,
) -> [[f32; W]; H] {
    let head_dim = q.len() / H;
    let (mut even, mut odd) = ([[0f32; W]; H], [[0f32; W]; H]);
    // Walking the key rows two dimensions at a time keeps the index arithmetic out of the loop.
    let rows = keys[..head_dim * block_size].chunks_exact(2 * block_size);
    let last = rows.remainder();
    for (pair, kk) in rows.enumerate() {
        let d = 2 * pair;
        let k0 = load::<W, T>(&kk[j0..]);
        let k1 = load::<W, T>(&kk[block_size + j0..]);
        for h in 0..H {
            let (q0, q1) = (q[h * head_dim + d], q[h * head_dim + d + 1]);
            for l in 0..W {
                even[h][l] = M::mul_add(q0, k0[l], even[h][l]);
                odd[h][l] = M::mul_add(q1, k1[l], odd[h][l]);
            }
        }
    }
    if !last.is_empty() {
        let d = head_dim - 1;
        let k0 = load::<W, T>(&last[j0..]);
        for h in 0..H {
            let q0 = q[h * head_dim + d];
            for l in 0..W {
                even[h][l] = M::mul_add(q0, k0[l], even[h][l]);
            }
        }
    }
    for h in 0..H {
        for l in 0..W {
            even[h][l] += odd[h][l];
        }
    }
    even
}

/// One kv head's keys and values in the cache's blocks.
pub(super) struct HeadBlocks<'a, T> {
    cache: &'a [T],
    block_len: usize,
    keys_off: usize,
    values_off: usize,
    head_len: usize,
}

impl<'a, T> HeadBlocks<'a, T> {
    pub(super) fn new(cache: &'a [T], shape: AttentionShape, kv_head: usize) -> Self {
        let head_len = shape.block_size * shape.head_dim;
        Self {
            cache,
            block_len: 2 * shape.num_kv_heads * head_len,
            keys_off: kv_head * head_len,
            values_off: (shape.num_kv_heads + kv_head) * head_len,
            head_len,
        }
    }

    /// The block's keys of this head, dimension-major.
    #[inline(always)]
    pub(super) fn keys(&self, block: u32) -> &'a [T] {
        &self.cache[block as usize * self.block_len + self.keys_off..][..self.head_len]
    }

    /// The block's values of this head, slot-major.
    #[inline(always)]
    pub(super) fn values(&self, block: u32) -> &'a [T] {
        &self.cache[block as usize * self.block_len + self.values_off..][..self.head_len]
    }
}

/// The context of one work item: where its blocks are and how many positions it sees.
struct Context<'a, T> {
    head: HeadBlocks<'a, T>,
    table: &'a [u32],
    n_ctx: usize,
    block_size: usize,
    head_dim: usize,
}

impl<'a, T: KvElem> Context<'a, T> {
    /// Positions used in block `b` of the table.
    #[inline(always)]
    fn count(&self, b: usize) -> usize {
        self.block_size.min(self.n_ctx - b * self.block_size)
    }

    #[inline(always)]
    fn keys(&self, block: u32) -> &'a [T] {
        self.head.keys(block)
    }

    #[inline(always)]
    fn values(&self, block: u32) -> &'a [T] {
        self.head.values(block)
    }
}

/// Attention of `H` query heads (`q`, `[H][head_dim]`, pre-scaled) over the whole context, in
/// two passes: all scores first (each key loaded once for the `H` heads), then per head one
/// max and one exponential-and-sum over the row, then the values (each loaded once for the
/// `H` heads). On short rows this avoids the per-block reductions and rescaling of an online
/// softmax. `rows` holds `H` rows of `stride` scores; `acc` receives the normalised outputs.
/// Returns each head's largest score and sum of exponentials, for merging with a shared
/// prefix's part.
#[inline(always)]
fn attend_heads<const H: usize, M: MulAdd, T: KvElem>(
    ctx: &Context<'_, T>,
    q: &[f32],
    rows: &mut [f32],
    stride: usize,
    acc: &mut [f32],
) -> [(f32, f32); H] {
    let Context {
        block_size,
        head_dim,
        n_ctx,
        ..
    } = *ctx;
    for (b, &block) in ctx.table.iter().enumerate() {
        let count = ctx.count(b);
        let keys = ctx.keys(block);
        let base = b * block_size;
        if block_size % 8 == 0 {
            // Whole 8-key groups even past `count`: the slots exist (holding stale data), the
            // row has room for them (`stride` is `n_ctx` rounded up to 8) and they are never
            // read back, which leaves no scalar tail here. Sixteen at a time while more than
            // eight remain: then the row has room for all sixteen too.
            let mut j0 = 0;
            while H <= 2 && block_size % 16 == 0 && j0 + 8 < count {
                let s = score_keys::<H, 16, M, T>(q, keys, block_size, j0);
                for (h, s) in s.iter().enumerate() {
                    rows[h * stride + base + j0..][..16].copy_from_slice(s);
                }
                j0 += 16;
            }
            while j0 < count {
                let s = score_keys::<H, 8, M, T>(q, keys, block_size, j0);
                for (h, s) in s.iter().enumerate() {
                    rows[h * stride + base + j0..][..8].copy_from_slice(s);
                }
                j0 += 8;
            }
        } else {
            for j in 0..count {
                for h in 0..H {
                    let qh = &q[h * head_dim..][..head_dim];
                    let mut s = 0.0;
                    for (d, &qd) in qh.iter().enumerate() {
                        s = M::mul_add(qd, keys[d * block_size + j].to_f32(), s);
                    }
                    rows[h * stride + base + j] = s;
                }
            }
        }
    }
    let mut stats = [(0f32, 0f32); H];
    let mut inv = [0f32; H];
    for h in 0..H {
        let row = &mut rows[h * stride..][..n_ctx];
        let max = max8(row);
        let sum = exp_sum::<M>(row, max);
        stats[h] = (max, sum);
        inv[h] = 1.0 / sum;
    }
    let full = head_dim / 8 * 8;
    let mut c = 0;
    // Two chunks of eight columns per walk over the probabilities where the accumulators fit.
    while H <= 2 && c + 16 <= full {
        value_columns::<H, 2, M, T>(ctx, rows, stride, &inv, acc, c);
        c += 16;
    }
    while c < full {
        value_columns::<H, 1, M, T>(ctx, rows, stride, &inv, acc, c);
        c += 8;
    }
    for d in full..head_dim {
        let mut sums = [0f32; H];
        for (b, &block) in ctx.table.iter().enumerate() {
            let values = ctx.values(block);
            let base = b * block_size;
            for j in 0..ctx.count(b) {
                let v = values[j * head_dim + d].to_f32();
                for (h, sum) in sums.iter_mut().enumerate() {
                    *sum = M::mul_add(rows[h * stride + base + j], v, *sum);
                }
            }
        }
        for h in 0..H {
            acc[h * head_dim + d] = sums[h] * inv[h];
        }
    }
    stats
}

/// Columns `c..c + 8 * C` of the `H` heads' outputs: the probabilities in `rows` times the
/// values, normalised by `inv`. Each value vector is loaded once for all `H` heads and each
/// probability once for all `C` chunks; even and odd positions accumulate separately so
/// consecutive multiply-adds do not wait on each other.
#[inline(always)]
fn value_columns<const H: usize, const C: usize, M: MulAdd, T: KvElem>(
    ctx: &Context<'_, T>,
    rows: &[f32],
    stride: usize,
    inv: &[f32; H],
    acc: &mut [f32],
    c: usize,
) {
    let (block_size, head_dim) = (ctx.block_size, ctx.head_dim);
    let (mut even, mut odd) = ([[[0f32; 8]; C]; H], [[[0f32; 8]; C]; H]);
    for (b, &block) in ctx.table.iter().enumerate() {
        let count = ctx.count(b);
        let values = ctx.values(block);
        let base = b * block_size;
        let p: [&[f32]; H] = std::array::from_fn(|h| &rows[h * stride + base..][..count]);
        let mut j = 0;
        while j + 1 < count {
            let v0: [[f32; 8]; C] =
                std::array::from_fn(|k| load8(&values[j * head_dim + c + 8 * k..]));
            let v1: [[f32; 8]; C] =
                std::array::from_fn(|k| load8(&values[(j + 1) * head_dim + c + 8 * k..]));
            for h in 0..H {
                let (p0, p1) = (p[h][j], p[h][j + 1]);
                for k in 0..C {
                    for l in 0..8 {
                        even[h][k][l] = M::mul_add(p0, v0[k][l], even[h][k][l]);
                        odd[h][k][l] = M::mul_add(p1, v1[k][l], odd[h][k][l]);
                    }
                }
            }
            j += 2;
        }
        if j < count {
            let v0: [[f32; 8]; C] =
                std::array::from_fn(|k| load8(&values[j * head_dim + c + 8 * k..]));
            for h in 0..H {
                let p0 = p[h][j];
                for k in 0..C {
                    for l in 0..8 {
                        even[h][k][l] = M::mul_add(p0, v0[k][l], even[h][k][l]);
                    }
                }
            }
        }
    }
    for h in 0..H {
        for k in 0..C {
            for l in 0..8 {
                acc[h * head_dim + c + 8 * k + l] = (even[h][k][l] + odd[h][k][l]) * inv[h];
            }
        }
    }
}

/// Query heads handled together: each key and value vector is loaded once per this many
/// heads, and their accumulators (two per head) still fit the 16 vector registers.
const MAX_HEADS_IN_FLIGHT: usize = 4;

/// Attention for the query heads of kv head `idx % kv_heads` at token `idx / kv_heads`,
/// written to `out` (`group * head_dim` values).
#[inline(always)]
fn attend_item<M: MulAdd, Q: KvElem, T: KvElem>(
    inp: &ItemInputs<'_, Q, T>,
    scratch: &mut Scratch,
    idx: usize,
    out: &mut [Q],
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
    let (t, g) = (idx / num_kv_heads, idx % num_kv_heads);
    let (seq, pos) = m.token_seq[t];
    // A token in a shared-prefix group attends here only past the prefix, whose part comes
    // from the group's tiles; the prefix is whole blocks, so the table just starts later.
    let prefix = m.prefixes.rows_of(t, g, group);
    let skip = prefix.map_or(0, |(p, _)| p.blocks.len());
    let n_ctx = pos as usize + 1 - skip * block_size;
    let ctx = Context {
        head: HeadBlocks::new(inp.cache, m.shape, g),
        table: &m.block_tables[seq as usize * m.max_blocks + skip..][..n_ctx.div_ceil(block_size)],
        n_ctx,
        block_size,
        head_dim,
    };
    scratch.q.clear();
    scratch.q.extend(
        inp.q[(t * num_heads + g * group) * head_dim..][..item_len]
            .iter()
            .map(|x| x.to_f32() * m.scale),
    );
    let stride = n_ctx.div_ceil(8) * 8;
    let in_flight = group.min(MAX_HEADS_IN_FLIGHT);
    // Grow only: every score read is written first, so stale contents need no clearing.
    if scratch.scores.len() < in_flight * stride {
        scratch.scores.resize(in_flight * stride, 0.0);
    }
    if scratch.acc.len() < in_flight * head_dim {
        scratch.acc.resize(in_flight * head_dim, 0.0);
    }
    let mut h0 = 0;
    while h0 < group {
        let n = (group - h0).min(MAX_HEADS_IN_FLIGHT);
        let q = &scratch.q[h0 * head_dim..(h0 + n) * head_dim];
        let rows = &mut scratch.scores[..n * stride];
        let acc = &mut scratch.acc[..n * head_dim];
        let mut stats = [(0f32, 0f32); MAX_HEADS_IN_FLIGHT];
        match n {
            1 => stats[..1].copy_from_slice(&attend_heads::<1, M, T>(&ctx, q, rows, stride, acc)),
            2 => stats[..2].copy_from_slice(&attend_heads::<2, M, T>(&ctx, q, rows, stride, acc)),
            3 => stats[..3].copy_from_slice(&attend_heads::<3, M, T>(&ctx, q, rows, stride, acc)),
            _ => stats = attend_heads::<MAX_HEADS_IN_FLIGHT, M, T>(&ctx, q, rows, stride, acc),
        }
        if let Some((_, row0)) = prefix {
            for (h, &(max, sum)) in stats[..n].iter().enumerate() {
                let prefix = shared_prefix::row_state(inp.partials, row0 + h0 + h, head_dim);
                merge(&mut acc[h * head_dim..][..head_dim], (max, sum), prefix);
            }
        }
        for (o, &a) in out[h0 * head_dim..(h0 + n) * head_dim]
            .iter_mut()
            .zip(acc.iter())
        {
            *o = Q::from_f32(a);
        }
        h0 += n;
    }
}

/// Folds a shared prefix's part (max score, sum of exponentials, unnormalised output) into
/// `acc`, the normalised output over the rest of the context with its own max and sum.
#[inline(always)]
fn merge(acc: &mut [f32], (max, sum): (f32, f32), (p_max, p_sum, p_out): (f32, f32, &[f32])) {
    let top = max.max(p_max);
    let (w_rest, w_prefix) = ((max - top).exp() * sum, (p_max - top).exp());
    let inv = 1.0 / (w_rest + p_sum * w_prefix);
    for (a, &p) in acc.iter_mut().zip(p_out) {
        *a = (*a * w_rest + p * w_prefix) * inv;
    }
}

/// The same item compiled for AVX2 + FMA, which the baseline x86-64 target lacks.
///
/// # Safety
/// The CPU must support AVX2 and FMA; callers check with `is_x86_feature_detected!`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_item_avx2<Q: KvElem, T: KvElem>(
    inp: &ItemInputs<'_, Q, T>,
    scratch: &mut Scratch,
    idx: usize,
    out: &mut [Q],
) {
    attend_item::<Fused, Q, T>(inp, scratch, idx, out)
}

fn attend_item_best<Q: KvElem, T: KvElem>(
    inp: &ItemInputs<'_, Q, T>,
    avx2: bool,
    scratch: &mut Scratch,
    idx: usize,
    out: &mut [Q],
) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2` is true only when `is_x86_feature_detected!` found both AVX2 and FMA
        // on this CPU, which is the sole requirement of `attend_item_avx2`.
        unsafe { attend_item_avx2(inp, scratch, idx, out) };
        return;
    }
    let _ = avx2;
    attend_item::<Unfused, Q, T>(inp, scratch, idx, out)
}

/// Attention of every token in `meta`'s batch on the CPU; `avx2` picks the AVX2 + FMA build
/// of the kernel (the caller checked the CPU), otherwise the portable one.
pub(super) fn attend<Q: KvElem, T: KvElem>(
    meta: &AttentionMeta,
    q: &[Q],
    cache: &[T],
    avx2: bool,
) -> Vec<Q> {
    let s = meta.shape;
    let item_len = s.num_heads / s.num_kv_heads * s.head_dim;
    // Below this many multiply-adds the thread hand-off costs more than it saves; and a
    // one-thread pool would only move the work to that thread, serialising every engine
    // thread that shares the pool behind it.
    const PARALLEL_WORK: usize = 1 << 18;
    let serial =
        meta.work * s.num_heads * s.head_dim < PARALLEL_WORK || rayon::current_num_threads() <= 1;
    let partials = shared_prefix_partials(meta, q, cache, avx2, serial);
    let inp = ItemInputs {
        meta,
        q,
        cache,
        partials: &partials,
    };
    let mut out = vec![Q::from_f32(0.0); q.len()];
    if serial {
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

/// The partial results of every shared-prefix tile, `[tiles][ROWS][2 + head_dim]`.
fn shared_prefix_partials<Q: KvElem, T: KvElem>(
    meta: &AttentionMeta,
    q: &[Q],
    cache: &[T],
    avx2: bool,
    serial: bool,
) -> Vec<f32> {
    let prefixes = &meta.prefixes;
    let tile_len = SharedPrefixes::tile_len(meta.shape.head_dim);
    let mut partials = vec![0f32; prefixes.tiles.len() * tile_len];
    let inp = TileInputs {
        shape: meta.shape,
        scale: meta.scale,
        q,
        cache,
    };
    let run = |scratch: &mut TileScratch, (out, &tile): (&mut [f32], &Tile)| {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: `avx2` is true only when `is_x86_feature_detected!` found both AVX2 and
            // FMA on this CPU, which is the sole requirement of `run_tile_avx2`.
            unsafe { run_tile_avx2(&inp, prefixes, tile, scratch, out) };
            return;
        }
        let _ = avx2;
        shared_prefix::run_tile::<Unfused, Q, T>(&inp, prefixes, tile, scratch, out)
    };
    if serial {
        let mut scratch = TileScratch::default();
        for item in partials.chunks_mut(tile_len).zip(&prefixes.tiles) {
            run(&mut scratch, item);
        }
    } else {
        partials
            .par_chunks_mut(tile_len)
            .zip(&prefixes.tiles)
            .for_each_init(TileScratch::default, run);
    }
    partials
}

/// A shared-prefix tile compiled for AVX2 + FMA.
///
/// # Safety
/// The CPU must support AVX2 and FMA; callers check with `is_x86_feature_detected!`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_tile_avx2<Q: KvElem, T: KvElem>(
    inp: &TileInputs<'_, Q, T>,
    prefixes: &SharedPrefixes,
    tile: Tile,
    scratch: &mut TileScratch,
    out: &mut [f32],
) {
    shared_prefix::run_tile::<Fused, Q, T>(inp, prefixes, tile, scratch, out)
}
