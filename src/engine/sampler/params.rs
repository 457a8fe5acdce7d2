//! A request's sampling parameters and their validation: the ranges each field may take, the
//! error that names the offending field, and the questions the rest of the sampler asks of them
//! (is this request greedy, may the engine skip the row copy).
//!
//! This module owns the parameter type and its limits and nothing else. It must not know how a
//! row is sampled (the per-sequence state lives in the parent module, the row algorithms in
//! [`super::truncation`], [`super::logprobs`] and [`super::row`]), nor about HTTP request
//! formats: the server maps its JSON onto [`SamplingParams`] and reports [`SamplingError::field`].

/// Temperatures below this are greedy, as vLLM's `_SAMPLING_EPS`: dividing by them would
/// only turn the row into infinities.
const GREEDY_TEMPERATURE: f32 = 1e-5;
/// The most top logprobs a request may ask for (OpenAI's limit).
pub const MAX_LOGPROBS: usize = 20;
const LOGIT_BIAS_LIMIT: f32 = 100.0;
const PENALTY_LIMIT: f32 = 2.0;

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
    /// `Some(k)`: also score every prompt token but the first, with the top `k` of each
    /// position (vLLM's `prompt_logprobs`; `echo` with `logprobs` asks for the same).
    pub prompt_logprobs: Option<usize>,
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
            prompt_logprobs: None,
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
        for (field, k) in [
            ("logprobs", self.logprobs),
            ("prompt_logprobs", self.prompt_logprobs),
        ] {
            if let Some(k) = k.filter(|&k| k > MAX_LOGPROBS) {
                return Err(SamplingError::OutOfRange {
                    field,
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
