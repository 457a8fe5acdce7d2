//! Truncation and the draw: temperature, min-p, top-k and top-p turn one row of logits into the
//! pool a token is drawn from, and one uniform number picks it by inverse CDF.
//!
//! This module owns the selection algorithms (top-k by block maxima, top-p by a histogram of
//! the mass so only the boundary bucket is sorted) and the draw, writing only into the caller's
//! [`SamplerScratch`]. It must not know about the per-sequence state (RNG, penalties, logit
//! bias: the parent module applies those and hands over the uniform number) or about logprobs,
//! and it never sorts the whole vocabulary or allocates.

use std::cmp::Ordering;

use super::row::{argmax, exp_nonpositive, max_of, sum_f64, weight, BLOCK, ROUND};
use super::{SamplerScratch, SamplingParams};

/// Top-p finds its boundary with a histogram of the mass by `max - logit`, in buckets of
/// 1/16 nat, so only the boundary bucket is ever sorted. The last bucket takes everything
/// over 32 nats below the best token, whose mass is negligible.
pub(super) const BUCKETS: usize = 512;
const BUCKETS_PER_NAT: f32 = 16.0;
const HISTOGRAMS: usize = 4;
/// Within top-p's boundary bucket the best `TOP_P_FIRST` are sorted first, and the sorted set
/// grows by `TOP_P_GROWTH` until it holds the mass: peaked rows settle in the first round.
const TOP_P_FIRST: usize = 64;
const TOP_P_GROWTH: usize = 8;
/// An untruncated draw skips whole chunks of the row by their precomputed mass.
pub(super) const CHUNK: usize = 64;

/// Which histogram bucket a kept logit falls in: how far below the best token it is,
/// rounded to the nearest bucket (any monotone rounding would do).
#[inline]
pub(super) fn bucket(l: f32, max: f32) -> usize {
    const LAST: f32 = (BUCKETS - 1) as f32;
    let d = (max - l) * BUCKETS_PER_NAT;
    let d = if d < LAST { d } else { LAST };
    // The same rounding trick as in `exp_nonpositive`: cheaper than a saturating cast.
    ((d + ROUND).to_bits().wrapping_sub(ROUND.to_bits()) as usize) & (BUCKETS - 1)
}

/// A logit below which no token is in a bucket up to `boundary` or passes `floor`: one
/// comparison then turns away almost the whole row before any bucket is computed.
pub(super) fn coarse_cutoff(max: f32, floor: f32, boundary: usize) -> f32 {
    if boundary == BUCKETS - 1 {
        // The last bucket has no lower edge.
        return floor;
    }
    // Start a bucket below the boundary's edge and step down until `bucket` itself agrees:
    // it is monotone in the logit, so everything lower is past the boundary too, whatever
    // the rounding at large magnitudes (tiny temperatures) does to the arithmetic edge.
    let mut edge = max - (boundary + 1) as f32 / BUCKETS_PER_NAT;
    let mut step = 1.0 / BUCKETS_PER_NAT;
    while bucket(edge, max) <= boundary {
        edge -= step;
        step *= 2.0;
    }
    if edge > floor {
        edge
    } else {
        floor
    }
}

/// Higher logit first, then lower id, so every selection is deterministic and `top_k = 1`
/// agrees with greedy on ties. Rows reaching it hold no NaN.
pub(super) fn by_logit_desc(logits: &[f32], a: u32, b: u32) -> Ordering {
    logits[b as usize]
        .partial_cmp(&logits[a as usize])
        .unwrap_or(Ordering::Equal)
        .then(a.cmp(&b))
}

/// What a random draw picks from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Pool {
    /// Nothing to draw: no finite maximum (all -inf, or a logit overflowed to +inf).
    Decided(u32),
    /// Every token, with weights in `scratch.weights[id]` and `scratch.chunk_mass`.
    Vocab { total: f64 },
    /// `scratch.ids`, with weights in `scratch.id_weights`.
    Ids { total: f64 },
}

/// Temperature, min-p, top-k and top-p, in vLLM v1's order (min-p is applied before top-k and
/// top-p, so top-p's mass is taken over the tokens min-p kept). Weights are `exp(l - max)`,
/// unnormalised: the draw scales by their total instead.
pub(super) fn prepare_pool(
    params: &SamplingParams,
    logits: &mut [f32],
    scratch: &mut SamplerScratch,
) -> Pool {
    let t = params.temperature;
    for l in logits.iter_mut() {
        // A NaN would make the orderings below inconsistent; it can never be a sensible pick.
        *l = if l.is_nan() {
            f32::NEG_INFINITY
        } else {
            *l / t
        };
    }
    let logits: &[f32] = logits;
    let max = max_of(logits);
    if !max.is_finite() {
        return Pool::Decided(argmax(logits));
    }
    // min-p keeps p >= min_p * p_max, i.e. l >= max + ln(min_p).
    let floor = if params.min_p > 0.0 {
        max + params.min_p.ln()
    } else {
        f32::MIN
    };
    if params.top_k > 0 && params.top_k < logits.len() {
        select_top_k(logits, floor, params.top_k, scratch);
        if params.top_p < 1.0 {
            let total: f64 = scratch
                .ids
                .iter()
                .map(|&id| f64::from(exp_nonpositive(logits[id as usize] - max)))
                .sum();
            let budget = f64::from(params.top_p) * total;
            keep_top_p(&mut scratch.ids, 0, logits, max, 0.0, budget);
        }
    } else {
        let total = vocab_weights(logits, max, floor, scratch);
        if params.top_p >= 1.0 {
            return Pool::Vocab { total };
        }
        select_nucleus(logits, max, floor, params.top_p, total, scratch);
    }
    let mut total = 0.0f64;
    scratch.id_weights.clear();
    scratch.id_weights.extend(scratch.ids.iter().map(|&id| {
        let w = exp_nonpositive(logits[id as usize] - max);
        total += f64::from(w);
        w
    }));
    Pool::Ids { total }
}

/// Fills `scratch.weights` for the whole row and `scratch.chunk_mass`; returns the total.
fn vocab_weights(logits: &[f32], max: f32, floor: f32, scratch: &mut SamplerScratch) -> f64 {
    scratch.weights.clear();
    scratch
        .weights
        .extend(logits.iter().map(|&l| weight(l, max, floor)));
    scratch.chunk_mass.clear();
    let mut total = 0.0f64;
    for chunk in scratch.weights.chunks(CHUNK) {
        let mass = sum_f64(chunk);
        scratch.chunk_mass.push(mass);
        total += mass;
    }
    total
}

/// Leaves in `scratch.ids` the `k` best tokens at or above `floor` (all of them if fewer).
fn select_top_k(logits: &[f32], floor: f32, k: usize, scratch: &mut SamplerScratch) {
    let maxima = &mut scratch.block_max;
    maxima.clear();
    maxima.extend(logits.chunks(BLOCK).map(max_of));
    // The k best block maxima are k distinct tokens, so no token below the k-th best maximum
    // can be among the k best: one vectorised pass and a select over the maxima bound the
    // candidates to a few more than k.
    let cutoff = if k <= maxima.len() {
        let (_, kth, _) = maxima
            .select_nth_unstable_by(k - 1, |a, b| b.partial_cmp(a).unwrap_or(Ordering::Equal));
        if *kth > floor {
            *kth
        } else {
            floor
        }
    } else {
        floor
    };
    let ids = &mut scratch.ids;
    ids.clear();
    ids.extend((0..logits.len() as u32).filter(|&id| logits[id as usize] >= cutoff));
    if ids.len() > k {
        ids.select_nth_unstable_by(k - 1, |&a, &b| by_logit_desc(logits, a, b));
        ids.truncate(k);
    }
}

/// Leaves in `scratch.ids` the top-p nucleus of the whole row, given the row's weights and
/// their `total`. Buckets wholly inside the nucleus are taken as they are; only the bucket
/// where the mass crosses `top_p` is sorted.
fn select_nucleus(
    logits: &[f32],
    max: f32,
    floor: f32,
    top_p: f32,
    total: f64,
    scratch: &mut SamplerScratch,
) {
    let budget = f64::from(top_p) * total;
    // Branch-free (tokens below `floor` add their weight, 0, like any other) and spread over
    // interleaved histograms: on real rows most tokens land in the last bucket, and one
    // histogram would queue every update on that one slot.
    let mut lanes = [[0.0f64; BUCKETS]; HISTOGRAMS];
    let mut chunks = logits
        .chunks_exact(HISTOGRAMS)
        .zip(scratch.weights.chunks_exact(HISTOGRAMS));
    for (ls, ws) in &mut chunks {
        for ((lane, &l), &w) in lanes.iter_mut().zip(ls).zip(ws) {
            lane[bucket(l, max)] += f64::from(w);
        }
    }
    let tail = logits.len() - logits.len() % HISTOGRAMS;
    for (&l, &w) in logits[tail..].iter().zip(&scratch.weights[tail..]) {
        lanes[0][bucket(l, max)] += f64::from(w);
    }
    let mut mass = [0.0f64; BUCKETS];
    for lane in &lanes {
        for (m, &x) in mass.iter_mut().zip(lane) {
            *m += x;
        }
    }
    // Every token of a bucket before `boundary` has less than `budget` ahead of it, and every
    // token after it at least `budget`; the last bucket is the boundary if rounding leaves
    // the running sum short.
    let mut before = 0.0f64;
    let mut boundary = BUCKETS - 1;
    for (b, &m) in mass[..BUCKETS - 1].iter().enumerate() {
        if before + m >= budget {
            boundary = b;
            break;
        }
        before += m;
    }
    let cutoff = coarse_cutoff(max, floor, boundary);
    let (ids, crossing) = (&mut scratch.ids, &mut scratch.crossing);
    ids.clear();
    crossing.clear();
    for (id, &l) in logits.iter().enumerate() {
        if l >= cutoff {
            match bucket(l, max).cmp(&boundary) {
                Ordering::Less => ids.push(id as u32),
                Ordering::Equal => crossing.push(id as u32),
                Ordering::Greater => {}
            }
        }
    }
    let start = ids.len();
    ids.extend_from_slice(crossing);
    keep_top_p(ids, start, logits, max, before, budget);
}

/// Truncates `ids[start..]` to the tokens that still fit the nucleus, best first: a token is
/// kept while the mass ahead of it (`kept_mass` for everything before `start`) is below
/// `budget`, as vLLM's cumulative-sum mask. Candidates are sorted a growing slice at a time,
/// so a peaked distribution sorts only the few it keeps.
fn keep_top_p(
    ids: &mut Vec<u32>,
    start: usize,
    logits: &[f32],
    max: f32,
    mut kept_mass: f64,
    budget: f64,
) {
    let cmp = |a: &u32, b: &u32| by_logit_desc(logits, *a, *b);
    let mut sorted = start;
    let mut size = TOP_P_FIRST;
    while sorted < ids.len() {
        let end = start.saturating_add(size).min(ids.len());
        let wanted = end - sorted;
        let tail = &mut ids[sorted..];
        if wanted < tail.len() {
            tail.select_nth_unstable_by(wanted - 1, cmp);
        }
        ids[sorted..end].sort_unstable_by(cmp);
        for j in sorted..end {
            if kept_mass >= budget {
                ids.truncate(j);
                return;
            }
            kept_mass += f64::from(exp_nonpositive(logits[ids[j] as usize] - max));
        }
        sorted = end;
        size = size.saturating_mul(TOP_P_GROWTH);
    }
}

/// Inverse-CDF draw with one uniform number `u`: the first token whose cumulative weight
/// passes `u * total`.
pub(super) fn draw(pool: Pool, scratch: &SamplerScratch, u: f64) -> u32 {
    match pool {
        Pool::Decided(token) => token,
        Pool::Vocab { total } => {
            draw_by_chunks(&scratch.weights, &scratch.chunk_mass, u * total) as u32
        }
        Pool::Ids { total } => {
            let j = walk(&scratch.id_weights, 0.0, u * total);
            scratch.ids.get(j).copied().unwrap_or(0)
        }
    }
}

/// Skips whole chunks by their mass, then walks the chunk where `target` falls.
fn draw_by_chunks(weights: &[f32], chunk_mass: &[f64], target: f64) -> usize {
    let mut before = 0.0f64;
    for (c, &mass) in chunk_mass.iter().enumerate() {
        if before + mass > target {
            let start = c * CHUNK;
            let end = (start + CHUNK).min(weights.len());
            return start + walk(&weights[start..end], before, target);
        }
        before += mass;
    }
    // Only reached through rounding when u is within an ulp of 1.
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0)
}

/// The first index where the running sum (starting at `before`) passes `target`, or the last
/// one with weight when rounding keeps the sum short.
fn walk(weights: &[f32], mut before: f64, target: f64) -> usize {
    let mut last_positive = 0;
    for (j, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            before += f64::from(w);
            last_positive = j;
            if before > target {
                return j;
            }
        }
    }
    last_positive
}
