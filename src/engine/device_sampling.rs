//! Sampling on the model's device where it pays: when the logits live on a GPU and every
//! sequence of the step takes the plain greedy token (no logprobs, no penalties or bias, no
//! masked tokens), the argmax runs there and only the token ids cross to the host — 4 bytes
//! per sequence instead of a 600 KB row of a 152k vocabulary. Every other step copies the
//! logits to the host and uses the host sampler, as on the CPU, where nothing here runs.

use candle_core::Tensor;

use super::sequence::Sequence;
use crate::model::ModelError;

/// Whether `s`'s next token is the argmax of its raw logits: plain greedy and nothing masked
/// (the engine masks EOS and stop ids before `min_tokens`; such a sequence is not eligible).
pub(super) fn takes_raw_argmax(s: &Sequence) -> bool {
    let stop = &s.request.stop;
    s.request.params.is_plain_greedy()
        && s.prompt_scores.is_none()
        && !s.steering.has_forced()
        && !s.steering.has_constraint()
        && (s.output_len() >= stop.min_tokens
            || (stop.ignore_eos && stop.stop_token_ids.is_empty()))
}

/// The greedy ids of every row, computed on the logits' device, when `all_eligible` holds and
/// the device has a kernel for it; `None` means "sample on the host" (always, on the CPU).
pub(super) fn greedy_ids(
    logits: &Tensor,
    all_eligible: impl FnOnce() -> bool,
) -> Result<Option<Vec<u32>>, ModelError> {
    if logits.device().is_cpu() || !all_eligible() {
        return Ok(None);
    }
    Ok(crate::model::argmax_rows_on_device(logits)?)
}
