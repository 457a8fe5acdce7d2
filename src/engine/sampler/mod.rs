//! Per-request sampling of one row of logits: validating a request's sampling parameters,
//! then logit bias, repetition/presence/frequency penalties, temperature, min-p, top-k and
//! top-p, a seeded draw, and vLLM-style raw logprobs.
//!
//! This module owns the per-sequence state sampling needs (its RNG and the token counts the
//! penalties read) and nothing else. It must not know about tensors or devices, batching or
//! scheduling, stop conditions (the engine passes the ids a stop rule forbids to
//! [`SequenceSampler::sample_masked`]), text, or HTTP request formats: it takes a `&mut [f32]` row and token ids.
//!
//! It runs once per generated token per sequence on the engine thread, so it never sorts the
//! whole vocabulary and never allocates beyond the caller's reusable [`SamplerScratch`]
//! (apart from the small top-logprobs list when logprobs are requested).

use std::cmp::Ordering;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Temperatures below this are greedy, as vLLM's `_SAMPLING_EPS`: dividing by them would
/// only turn the row into infinities.
const GREEDY_TEMPERATURE: f32 = 1e-5;
/// The most top logprobs a request may ask for (OpenAI's limit).
pub const MAX_LOGPROBS: usize = 20;
const LOGIT_BIAS_LIMIT: f32 = 100.0;
const PENALTY_LIMIT: f32 = 2.0;
/// Top-p finds its boundary with a histogram of the mass by `max - logit`, in buckets of
/// 1/16 nat, so only the boundary bucket is ever sorted. The last bucket takes everything
/// over 32 nats below the best token, whose mass is negligible.
const BUCKETS: usize = 512;
const BUCKETS_PER_NAT: f32 = 16.0;
const HISTOGRAMS: usize = 4;
/// Within top-p's boundary bucket the best `TOP_P_FIRST` are sorted first, and the sorted set
/// grows by `TOP_P_GROWTH` until it holds the mass: peaked rows settle in the first round.
const TOP_P_FIRST: usize = 64;
const TOP_P_GROWTH: usize = 8;
/// An untruncated draw skips whole chunks of the row by their precomputed mass.
const CHUNK: usize = 64;
/// Block size for top-k's block maxima and the block tests of argmax and top-n logprobs.
const BLOCK: usize = 64;
/// Reductions keep this many partial results, so that they vectorise.
const LANES: usize = 8;
/// 1.5 * 2^23: adding it to a float of magnitude below 2^22 rounds it to an integer.
const ROUND: f32 = 12_582_912.0;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 (anything below 1e-5) means greedy.
    pub temperature: f32,
    /// In (0, 1]; 1 is off.
    pub top_p: f32,
    /// 0 is off; a value of at least the vocabulary size is off too.
    pub top_k: usize,
    /// In [0, 1]; 0 is off.
    pub min_p: f32,
    /// Positive; 1 is off. HF/vLLM semantics: applied once to every token seen in the prompt or
    /// the output, dividing positive logits and multiplying the others.
    pub repetition_penalty: f32,
    /// In [-2, 2], over output tokens (OpenAI semantics).
    pub presence_penalty: f32,
    /// In [-2, 2], over output tokens, times each token's count.
    pub frequency_penalty: f32,
    /// Added to the logits, each in [-100, 100].
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: Option<u64>,
    /// `Some(k)`: return the chosen token's logprob and the top `k` (`k <= 20`).
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
            logprobs: None,
        }
    }
}

#[derive(thiserror::Error, Debug, Clone, PartialEq)]
pub enum SamplingError {
    #[error("{field} must be {allowed}, got {got}")]
    OutOfRange {
        field: &'static str,
        allowed: &'static str,
        got: String,
    },
    #[error("{field} has token id {id}, outside the vocabulary of {vocab_size} tokens")]
    TokenOutOfVocab {
        field: &'static str,
        id: u32,
        vocab_size: usize,
    },
}

impl SamplingError {
    /// The offending request field, for an OpenAI error's `param`.
    pub fn field(&self) -> &'static str {
        match self {
            Self::OutOfRange { field, .. } | Self::TokenOutOfVocab { field, .. } => field,
        }
    }
}

fn check_f32(
    field: &'static str,
    value: f32,
    allowed: &'static str,
    ok: impl Fn(f32) -> bool,
) -> Result<(), SamplingError> {
    // Written as "ok or error" so that NaN, for which every comparison is false, is refused.
    if ok(value) {
        Ok(())
    } else {
        Err(SamplingError::OutOfRange {
            field,
            allowed,
            got: value.to_string(),
        })
    }
}

impl SamplingParams {
    /// Checks every field against its allowed range; the error names the field and the range.
    pub fn validate(&self, vocab_size: usize) -> Result<(), SamplingError> {
        check_f32("temperature", self.temperature, "finite and >= 0", |t| {
            t.is_finite() && t >= 0.0
        })?;
        check_f32("top_p", self.top_p, "in (0, 1]", |p| p > 0.0 && p <= 1.0)?;
        check_f32("min_p", self.min_p, "in [0, 1]", |p| {
            (0.0..=1.0).contains(&p)
        })?;
        check_f32(
            "repetition_penalty",
            self.repetition_penalty,
            "finite and > 0",
            |r| r.is_finite() && r > 0.0,
        )?;
        let penalty = |p: f32| (-PENALTY_LIMIT..=PENALTY_LIMIT).contains(&p);
        check_f32(
            "presence_penalty",
            self.presence_penalty,
            "in [-2, 2]",
            penalty,
        )?;
        check_f32(
            "frequency_penalty",
            self.frequency_penalty,
            "in [-2, 2]",
            penalty,
        )?;
        for &(id, bias) in &self.logit_bias {
            if id as usize >= vocab_size {
                return Err(SamplingError::TokenOutOfVocab {
                    field: "logit_bias",
                    id,
                    vocab_size,
                });
            }
            check_f32("logit_bias", bias, "in [-100, 100]", |b| {
                (-LOGIT_BIAS_LIMIT..=LOGIT_BIAS_LIMIT).contains(&b)
            })?;
        }
        if let Some(k) = self.logprobs {
            if k > MAX_LOGPROBS {
                return Err(SamplingError::OutOfRange {
                    field: "logprobs",
                    allowed: "in [0, 20]",
                    got: k.to_string(),
                });
            }
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE
    }

    /// Greedy with nothing that changes the row or needs a softmax: the token is the argmax
    /// of the raw logits, so the engine may skip copying the row into the sampler.
    pub fn is_plain_greedy(&self) -> bool {
        self.is_greedy()
            && self.logprobs.is_none()
            && self.logit_bias.is_empty()
            && self.repetition_penalty == 1.0
            && self.presence_penalty == 0.0
            && self.frequency_penalty == 0.0
    }
}

/// Buffers reused across calls (one per engine thread) so a step allocates nothing per row.
#[derive(Debug, Default)]
pub struct SamplerScratch {
    /// A truncated pool's token ids.
    ids: Vec<u32>,
    /// Their weights, in the same order.
    id_weights: Vec<f32>,
    /// Top-p's boundary bucket, before it joins `ids`.
    crossing: Vec<u32>,
    /// Top-k's block maxima.
    block_max: Vec<f32>,
    /// Weight of every token of the row.
    weights: Vec<f32>,
    /// Mass of each `CHUNK` of `weights`.
    chunk_mass: Vec<f64>,
    /// The row as the model gave it, for raw logprobs.
    raw: Vec<f32>,
}

impl SamplerScratch {
    /// Reserves for rows of `vocab_size` logits so the first steps do not grow the buffers.
    pub fn with_vocab(vocab_size: usize) -> Self {
        Self {
            ids: Vec::with_capacity(vocab_size),
            id_weights: Vec::with_capacity(vocab_size),
            crossing: Vec::with_capacity(vocab_size),
            block_max: Vec::with_capacity(vocab_size.div_ceil(BLOCK)),
            weights: Vec::with_capacity(vocab_size),
            chunk_mass: Vec::with_capacity(vocab_size.div_ceil(CHUNK)),
            raw: Vec::with_capacity(vocab_size),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// The chosen token's raw logprob, when logprobs were requested.
    pub logprob: Option<f32>,
    /// The `k` best raw logprobs, best first (lower id first on ties); empty unless requested.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Sets `ids`' logits to -inf so they cannot be sampled; ids outside the row are ignored.
pub fn mask_tokens(logits: &mut [f32], ids: &[u32]) {
    for &id in ids {
        if let Some(l) = logits.get_mut(id as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// The sampling state of one sequence (one choice of one request).
#[derive(Debug)]
pub struct SequenceSampler {
    rng: ChaCha8Rng,
    /// The prompt's distinct tokens, sorted; kept only when the request has a repetition
    /// penalty, because long prompts would otherwise cost memory for nothing.
    prompt_tokens: Vec<u32>,
    /// (token, times emitted), sorted by token: outputs are short, so a sorted vec beats a map.
    output_counts: Vec<(u32, u32)>,
}

impl SequenceSampler {
    /// `params` must be the ones later passed to [`Self::sample`]: the prompt's tokens are
    /// kept only if they carry a repetition penalty.
    pub fn new(params: &SamplingParams, prompt_ids: &[u32]) -> Self {
        Self::for_choice(params, prompt_ids, 0)
    }

    /// Like [`Self::new`] for choice `choice` of an `n > 1` request: a seeded request's choices
    /// use `seed + choice` (as vLLM does), so they differ from one another yet stay
    /// reproducible.
    pub fn for_choice(params: &SamplingParams, prompt_ids: &[u32], choice: usize) -> Self {
        let rng = match params.seed {
            Some(seed) => seeded_rng(seed.wrapping_add(choice as u64)),
            None => ChaCha8Rng::from_entropy(),
        };
        let prompt_tokens = if params.repetition_penalty == 1.0 {
            Vec::new()
        } else {
            let mut tokens = prompt_ids.to_vec();
            tokens.sort_unstable();
            tokens.dedup();
            tokens
        };
        Self {
            rng,
            prompt_tokens,
            output_counts: Vec::new(),
        }
    }

    /// Applies bias, penalties, temperature, min-p, top-k and top-p to `logits` and picks a
    /// token. On return `logits` holds the row after bias, penalties and (unless greedy)
    /// temperature, NaN turned to -inf; the truncations only restrict the draw and are not
    /// written back, as that would cost another pass over the row.
    /// An empty row, or one with no finite logit, gives its argmax (token 0 when all are -inf).
    pub fn sample(
        &mut self,
        params: &SamplingParams,
        logits: &mut [f32],
        scratch: &mut SamplerScratch,
    ) -> Sampled {
        self.sample_masked(params, logits, &[], scratch)
    }

    /// [`Self::sample`] with `masked` ids excluded from the draw (EOS and stop ids before
    /// `min_tokens`). Logprobs still describe the model's raw distribution, as vLLM reports
    /// them: the mask is a stop rule, not part of the model's output.
    pub fn sample_masked(
        &mut self,
        params: &SamplingParams,
        logits: &mut [f32],
        masked: &[u32],
        scratch: &mut SamplerScratch,
    ) -> Sampled {
        // Exactly one draw per step whatever the row and params, so a seeded sequence's
        // stream depends only on how many steps it has taken.
        let u = unit_interval(&mut self.rng);

        let raw = params
            .logprobs
            .map(|k| RawLogprobs::new(logits, k, scratch));
        mask_tokens(logits, masked);

        apply_logit_bias(logits, &params.logit_bias);
        self.apply_penalties(params, logits);

        let token = if params.is_greedy() {
            argmax(logits)
        } else {
            let pool = prepare_pool(params, logits, scratch);
            draw(pool, scratch, u)
        };

        match raw {
            Some(raw) => Sampled {
                token,
                logprob: Some(raw.logprob(scratch.raw.get(token as usize).copied())),
                top_logprobs: raw.top,
            },
            None => Sampled {
                token,
                logprob: None,
                top_logprobs: Vec::new(),
            },
        }
    }

    /// Must be told each token the sequence actually emits (the penalties count them).
    pub fn record(&mut self, token: u32) {
        match self
            .output_counts
            .binary_search_by_key(&token, |&(id, _)| id)
        {
            Ok(i) => self.output_counts[i].1 = self.output_counts[i].1.saturating_add(1),
            Err(i) => self.output_counts.insert(i, (token, 1)),
        }
    }

    fn apply_penalties(&self, params: &SamplingParams, logits: &mut [f32]) {
        let rp = params.repetition_penalty;
        if rp != 1.0 {
            let penalize = |logits: &mut [f32], id: u32| {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 { *l / rp } else { *l * rp };
                }
            };
            for &id in &self.prompt_tokens {
                penalize(logits, id);
            }
            // A token in both prompt and output is penalised once, as with vLLM's mask union.
            for &(id, _) in &self.output_counts {
                if self.prompt_tokens.binary_search(&id).is_err() {
                    penalize(logits, id);
                }
            }
        }
        let (presence, frequency) = (params.presence_penalty, params.frequency_penalty);
        if presence != 0.0 || frequency != 0.0 {
            for &(id, count) in &self.output_counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= frequency * count as f32;
                    *l -= presence;
                }
            }
        }
    }
}

/// The seed is the ChaCha key itself rather than `seed_from_u64`'s expansion, so a seed gives
/// the same tokens across rand releases (rand_chacha fixes the stream for a key).
fn seeded_rng(seed: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

/// A uniform draw in [0, 1) built by hand from 53 random bits, again so that it cannot change
/// with rand's `Standard` distribution.
fn unit_interval(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

fn apply_logit_bias(logits: &mut [f32], bias: &[(u32, f32)]) {
    for &(id, b) in bias {
        if let Some(l) = logits.get_mut(id as usize) {
            *l += b;
        }
    }
}

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
fn max_of(xs: &[f32]) -> f32 {
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
fn sum_f64(xs: &[f32]) -> f64 {
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
fn exp_nonpositive(x: f32) -> f32 {
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
fn weight(l: f32, max: f32, floor: f32) -> f32 {
    let w = exp_nonpositive(l - max);
    if l >= floor {
        w
    } else {
        0.0
    }
}

/// Which histogram bucket a kept logit falls in: how far below the best token it is,
/// rounded to the nearest bucket (any monotone rounding would do).
#[inline]
fn bucket(l: f32, max: f32) -> usize {
    const LAST: f32 = (BUCKETS - 1) as f32;
    let d = (max - l) * BUCKETS_PER_NAT;
    let d = if d < LAST { d } else { LAST };
    // The same rounding trick as in `exp_nonpositive`: cheaper than a saturating cast.
    ((d + ROUND).to_bits().wrapping_sub(ROUND.to_bits()) as usize) & (BUCKETS - 1)
}

/// A logit below which no token is in a bucket up to `boundary` or passes `floor`: one
/// comparison then turns away almost the whole row before any bucket is computed.
fn coarse_cutoff(max: f32, floor: f32, boundary: usize) -> f32 {
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
fn by_logit_desc(logits: &[f32], a: u32, b: u32) -> Ordering {
    logits[b as usize]
        .partial_cmp(&logits[a as usize])
        .unwrap_or(Ordering::Equal)
        .then(a.cmp(&b))
}

/// What a random draw picks from.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Pool {
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
fn prepare_pool(params: &SamplingParams, logits: &mut [f32], scratch: &mut SamplerScratch) -> Pool {
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
fn draw(pool: Pool, scratch: &SamplerScratch, u: f64) -> u32 {
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

/// vLLM v1's default "raw" logprobs: log_softmax of the row as the model gave it. The row is
/// copied to `scratch.raw` so the chosen token's value survives the in-place processing.
struct RawLogprobs {
    max: f32,
    log_sum_exp: f32,
    top: Vec<(u32, f32)>,
}

impl RawLogprobs {
    fn new(logits: &[f32], k: usize, scratch: &mut SamplerScratch) -> Self {
        scratch.raw.clear();
        scratch.raw.extend_from_slice(logits);
        let max = max_of(logits);
        let log_sum_exp = if max.is_finite() {
            // `weights` is free until the pool is prepared; f32::MIN as floor drops NaN too.
            scratch.weights.clear();
            scratch
                .weights
                .extend(logits.iter().map(|&l| weight(l, max, f32::MIN)));
            (f64::from(max) + sum_f64(&scratch.weights).ln()) as f32
        } else {
            max
        };
        let mut top = Vec::with_capacity(k + 1);
        top_n(logits, k, &mut top);
        let mut raw = Self {
            max,
            log_sum_exp,
            top: Vec::new(),
        };
        for entry in &mut top {
            entry.1 = raw.logprob(Some(entry.1));
        }
        raw.top = top;
        raw
    }

    fn logprob(&self, raw_logit: Option<f32>) -> f32 {
        match raw_logit {
            Some(l) if !l.is_nan() => {
                if self.max.is_finite() {
                    l - self.log_sum_exp
                } else if l == self.max {
                    // The limit of log_softmax as the +inf logits dominate (or all are -inf).
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            }
            _ => f32::NEG_INFINITY,
        }
    }
}

/// The `n` largest values, best first, lower id first on ties; NaN ranks as -inf.
fn top_n(values: &[f32], n: usize, out: &mut Vec<(u32, f32)>) {
    out.clear();
    if n == 0 {
        return;
    }
    for (b, block) in values.chunks(BLOCK).enumerate() {
        // Once the list is full, almost every block is beaten by its worst entry: skip it on
        // a vectorised maximum instead of testing its values one by one.
        if out.len() == n && out.last().is_some_and(|&(_, worst)| max_of(block) <= worst) {
            continue;
        }
        for (i, &v) in block.iter().enumerate() {
            let v = if v.is_nan() { f32::NEG_INFINITY } else { v };
            if out.len() == n && out.last().is_some_and(|&(_, worst)| v <= worst) {
                continue;
            }
            // Equal values go after those already in: they have lower ids.
            let at = out.partition_point(|&(_, w)| w >= v);
            out.insert(at, ((b * BLOCK + i) as u32, v));
            out.truncate(n);
        }
    }
}

#[cfg(test)]
mod tests;
