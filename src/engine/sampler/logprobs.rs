//! vLLM-style raw logprobs: the log_softmax of the row as the model gave it, before any mask,
//! bias, penalty, temperature or truncation, and its top-n entries.
//!
//! This module owns that computation and the copy of the raw row it keeps in the caller's
//! [`SamplerScratch`]. It must not know how the token is chosen (the parent module asks it for
//! the chosen token's logprob afterwards) or how logprobs are formatted for a response.

use super::row::{max_of, sum_f64, weight, BLOCK};
use super::SamplerScratch;
use crate::engine::request::PromptLogprob;

/// vLLM v1's default "raw" logprobs: log_softmax of the row as the model gave it. The row is
/// copied to `scratch.raw` so the chosen token's value survives the in-place processing.
pub(super) struct RawLogprobs {
    max: f32,
    log_sum_exp: f32,
    pub(super) top: Vec<(u32, f32)>,
}

impl RawLogprobs {
    pub(super) fn new(logits: &[f32], k: usize, scratch: &mut SamplerScratch) -> Self {
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

    pub(super) fn logprob(&self, raw_logit: Option<f32>) -> f32 {
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

/// A prompt token's raw logprob given the row that predicted it, its rank in that row (1 is
/// the most likely; ties share the better rank, as vLLM counts), and the top `k` of the row.
pub fn score_prompt_token(
    logits: &[f32],
    token: u32,
    k: usize,
    scratch: &mut SamplerScratch,
) -> PromptLogprob {
    let raw = RawLogprobs::new(logits, k, scratch);
    let own = logits.get(token as usize).copied();
    let rank = match own {
        Some(l) if !l.is_nan() => 1 + logits.iter().filter(|&&v| v > l).count() as u32,
        _ => logits.len() as u32,
    };
    PromptLogprob {
        token,
        logprob: raw.logprob(own),
        rank,
        top: raw.top,
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
