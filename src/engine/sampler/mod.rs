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
//!
//! This file keeps the per-sequence state and the [`SequenceSampler::sample`] entry points;
//! `params` holds the request parameters and their validation, `truncation` the selection and
//! the draw, `logprobs` the raw logprobs, and `row` the vectorised helpers they share.

mod logprobs;
mod params;
mod row;
mod truncation;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::constraint::TokenMask;

pub use logprobs::score_prompt_token;
use logprobs::RawLogprobs;
pub use params::{SamplingError, SamplingParams, MAX_LOGPROBS};
pub use row::argmax;
use row::BLOCK;
use truncation::{draw, prepare_pool, CHUNK};

#[cfg(test)]
use row::exp_nonpositive;
#[cfg(test)]
use truncation::{bucket, by_logit_desc, coarse_cutoff, Pool, BUCKETS};

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
        self.sample_allowed(params, logits, masked, None, scratch)
    }

    /// [`Self::sample_masked`] restricted to the tokens `allowed` admits (a grammar's mask),
    /// applied with the stop-rule mask: before bias, penalties and truncation, after the raw
    /// logprobs are taken.
    pub fn sample_allowed(
        &mut self,
        params: &SamplingParams,
        logits: &mut [f32],
        masked: &[u32],
        allowed: Option<&TokenMask>,
        scratch: &mut SamplerScratch,
    ) -> Sampled {
        // Exactly one draw per step whatever the row and params, so a seeded sequence's
        // stream depends only on how many steps it has taken.
        let u = unit_interval(&mut self.rng);

        let raw = params
            .logprobs
            .map(|k| RawLogprobs::new(logits, k, scratch));
        mask_tokens(logits, masked);
        if let Some(allowed) = allowed {
            allowed.apply(logits);
        }

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

    /// For a token chosen outside the sampler (a forced token): its raw logprob and the top
    /// `k`, as [`Self::sample`] would report them had it drawn `token`. Takes the step's draw
    /// all the same, so a seeded choice's later draws do not depend on which tokens were
    /// forced. `logits` may be overwritten.
    pub fn score_forced(
        &mut self,
        params: &SamplingParams,
        logits: &mut [f32],
        token: u32,
        scratch: &mut SamplerScratch,
    ) -> Sampled {
        let _ = unit_interval(&mut self.rng);
        let Some(k) = params.logprobs else {
            return Sampled {
                token,
                logprob: None,
                top_logprobs: Vec::new(),
            };
        };
        let raw = RawLogprobs::new(logits, k, scratch);
        Sampled {
            token,
            logprob: Some(raw.logprob(scratch.raw.get(token as usize).copied())),
            top_logprobs: raw.top,
        }
    }

    /// Takes the draw of a token chosen outside the sampler without scoring it (a forced
    /// token when no logprobs are asked for): one draw per output token, however it was
    /// chosen, so a seeded choice's later draws are the same with and without logprobs.
    pub fn skip_draw(&mut self) {
        let _ = unit_interval(&mut self.rng);
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

#[cfg(test)]
mod tests;
