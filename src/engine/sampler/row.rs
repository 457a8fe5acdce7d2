//! Vectorised helpers over one row of `f32` logits: argmax, maximum, first index of a value, an
//! f64 sum, a branch-free `exp` for non-positive arguments and a token's min-p weight.
//!
//! This module owns the arithmetic that must vectorise (lanes, block tests, the rounding
//! trick) and nothing else. It must not know about sampling parameters, scratch buffers or
//! which algorithm calls it: every function takes plain slices and scalars and allocates nothing.

/// Block size for top-k's block maxima and the block tests of argmax and top-n logprobs.
pub(super) const BLOCK: usize = 64;
/// Reductions keep this many partial results, so that they vectorise.
const LANES: usize = 8;
/// 1.5 * 2^23: adding it to a float of magnitude below 2^22 rounds it to an integer.
pub(super) const ROUND: f32 = 12_582_912.0;

/// As torch.argmax: the lowest id wins ties and NaN is never chosen; a row with nothing above
/// -inf (or an empty one) gives 0.
pub fn argmax(logits: &[f32]) -> u32 {
    let max = max_of(logits);
    if max == f32::NEG_INFINITY {
        return 0;
    }
    first_index_of(logits, max)
}

/// The largest value, NaN ignored; -inf for an empty row. Kept in lanes so it vectorises.
pub(super) fn max_of(xs: &[f32]) -> f32 {
    let larger = |m: f32, v: f32| if v > m { v } else { m };
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = larger(*m, v);
        }
    }
    lanes
        .iter()
        .chain(chunks.remainder())
        .fold(f32::NEG_INFINITY, |m, &v| larger(m, v))
}

/// The first index holding `value`, which must occur (0 otherwise).
fn first_index_of(xs: &[f32], value: f32) -> u32 {
    for (b, block) in xs.chunks(BLOCK).enumerate() {
        // A whole block is tested branch-free first: `position`'s early exit does not vectorise.
        if block.iter().fold(false, |hit, &v| hit | (v == value)) {
            if let Some(i) = block.iter().position(|&v| v == value) {
                return (b * BLOCK + i) as u32;
            }
        }
    }
    0
}

/// Sum in f64 (a row's mass must not lose its small tokens), in lanes so it vectorises.
pub(super) fn sum_f64(xs: &[f32]) -> f64 {
    let mut lanes = [0.0f64; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (s, &v) in lanes.iter_mut().zip(chunk) {
            *s += f64::from(v);
        }
    }
    lanes.iter().sum::<f64>()
        + chunks
            .remainder()
            .iter()
            .map(|&v| f64::from(v))
            .sum::<f64>()
}

/// e^x for x <= 0, within a few ulp of `f32::exp` (Cephes' expf), but below -87.3 (and at
/// -inf) it gives about 1e-38 instead of 0. It has no branch, libm call or saturating cast,
/// so the loops over a whole row vectorise: libm's expf would dominate the cost of a draw.
#[inline]
pub(super) fn exp_nonpositive(x: f32) -> f32 {
    let x = if x > -87.3 { x } else { -87.3 };
    // Adding 1.5 * 2^23 rounds to an integer with plain SSE2, and leaves that integer in the
    // low bits, where it can be read without a float-to-int conversion.
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    // ln 2 split in two so that n * ln 2 is subtracted without losing r's low bits.
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // n is in [-126, 0], so 2^n is a normal float: exponent field n + 127.
    y * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// A token's unnormalised probability `exp(l - max)`, or 0 below `floor` (min-p; f32::MIN
/// drops only -inf).
#[inline]
pub(super) fn weight(l: f32, max: f32, floor: f32) -> f32 {
    let w = exp_nonpositive(l - max);
    if l >= floor {
        w
    } else {
        0.0
    }
}
