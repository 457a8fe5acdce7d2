//! OpenAI request fields → the engine's sampling parameters and stop conditions, with every
//! range checked here so the error names the field (400) before anything is queued.

use std::sync::Arc;
use std::time::Instant;

use super::error::ApiError;
use super::protocol::SamplingFields;
use crate::engine::{Delivery, EngineRequest, SamplingParams, StopConditions};

/// Most choices one request may ask for.
pub const MAX_N: u32 = 64;
/// Most stop strings, as OpenAI allows.
pub const MAX_STOPS: usize = 4;

/// The model's own sampling defaults (its `generation_config.json`, unless
/// `--generation-config` says otherwise): a request that omits a field gets the model's value,
/// and OpenAI's only where the model has none.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct SamplingDefaults {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f32>,
}

/// What the server needs besides the engine request.
pub struct Prepared {
    pub params: SamplingParams,
    pub stop: StopConditions,
    pub stop_strings: Vec<String>,
    pub n: usize,
    pub skip_special_tokens: bool,
    pub stream: bool,
    pub include_usage: bool,
    /// Usage on every chunk (needs `include_usage`).
    pub continuous_usage: bool,
}

/// What a request asks to see of the model's scores.
#[derive(Clone, Copy, Debug, Default)]
pub struct Scores {
    /// Top-N logprobs of each generated token.
    pub logprobs: Option<u32>,
    /// Top-N logprobs of each prompt token (and the prompt token's own).
    pub prompt_logprobs: Option<u32>,
    /// `max_tokens: 0` is allowed: the prompt alone is wanted (completions' `echo`).
    pub prompt_only: bool,
}

pub fn prepare(
    f: &SamplingFields,
    max_tokens: Option<u32>,
    scores: Scores,
    vocab_size: usize,
    defaults: &SamplingDefaults,
) -> Result<Prepared, ApiError> {
    let Scores {
        logprobs,
        prompt_logprobs,
        prompt_only,
    } = scores;
    let n = f.n.unwrap_or(1);
    if n == 0 || n > MAX_N {
        return Err(ApiError::invalid(
            format!("n must be between 1 and {MAX_N}, got {n}"),
            Some("n"),
        ));
    }
    for (field, v) in [("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)] {
        if let Some(lp) = v.filter(|&lp| lp > 20) {
            return Err(ApiError::invalid(
                format!("{field} must be at most 20, got {lp}"),
                Some(field),
            ));
        }
    }
    let top_k = match f.top_k.or(defaults.top_k) {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                format!("top_k must be -1 (off) or a positive integer, got {k}"),
                Some("top_k"),
            ))
        }
    };
    let mut logit_bias = Vec::new();
    for (k, v) in f.logit_bias.iter().flatten() {
        let id: u32 = k.parse().map_err(|_| {
            ApiError::invalid(
                format!("logit_bias keys must be token ids, got {k:?}"),
                Some("logit_bias"),
            )
        })?;
        logit_bias.push((id, *v));
    }
    let params = SamplingParams {
        temperature: f.temperature.or(defaults.temperature).unwrap_or(1.0),
        top_p: f.top_p.or(defaults.top_p).unwrap_or(1.0),
        top_k,
        min_p: f.min_p.or(defaults.min_p).unwrap_or(0.0),
        repetition_penalty: f
            .repetition_penalty
            .or(defaults.repetition_penalty)
            .unwrap_or(1.0),
        presence_penalty: f.presence_penalty.unwrap_or(0.0),
        frequency_penalty: f.frequency_penalty.unwrap_or(0.0),
        logit_bias,
        // The seed's bits: -1 and u64::MAX seed the same generator.
        seed: f.seed.map(|s| s as u64),
        logprobs: logprobs.map(|l| l as usize),
        prompt_logprobs: prompt_logprobs.map(|l| l as usize),
    };
    params
        .validate(vocab_size)
        .map_err(|e| ApiError::invalid(e.to_string(), Some(e.field())))?;
    let stop_strings: Vec<String> = f
        .stop
        .clone()
        .map(|s| s.into_vec())
        .unwrap_or_default()
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
    if stop_strings.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            format!("stop may hold at most {MAX_STOPS} sequences"),
            Some("stop"),
        ));
    }
    let stop_token_ids = f.stop_token_ids.clone().unwrap_or_default();
    if let Some(&t) = stop_token_ids.iter().find(|&&t| t as usize >= vocab_size) {
        return Err(ApiError::invalid(
            format!("stop_token_ids has {t}, outside the vocabulary of {vocab_size}"),
            Some("stop_token_ids"),
        ));
    }
    let max_tokens = max_tokens.map(|m| m as usize);
    if max_tokens == Some(0) && !prompt_only {
        return Err(ApiError::invalid(
            "max_tokens must be at least 1 (0 only with echo, for the prompt alone)",
            Some("max_tokens"),
        ));
    }
    let min_tokens = f.min_tokens.unwrap_or(0) as usize;
    if max_tokens.is_some_and(|m| min_tokens > m) {
        return Err(ApiError::invalid(
            "min_tokens must not exceed max_tokens",
            Some("min_tokens"),
        ));
    }
    Ok(Prepared {
        params,
        stop: StopConditions {
            // Resolved against the prompt length by `engine_request`.
            max_tokens: max_tokens.unwrap_or(0),
            min_tokens,
            ignore_eos: f.ignore_eos.unwrap_or(false),
            stop_token_ids,
        },
        stop_strings,
        n: n as usize,
        skip_special_tokens: f.skip_special_tokens.unwrap_or(true),
        stream: f.stream.unwrap_or(false),
        include_usage: f.stream_options.as_ref().is_some_and(|o| o.include_usage),
        continuous_usage: f
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage && o.continuous_usage_stats),
    })
}

impl Prepared {
    /// The engine request for one prompt. With no `max_tokens` the rest of the context is the
    /// limit (as vLLM does for chat).
    pub fn engine_request(
        &self,
        prompt: Arc<[u32]>,
        explicit_max: bool,
        max_model_len: usize,
        arrival: Instant,
    ) -> EngineRequest {
        let mut stop = self.stop.clone();
        if !explicit_max {
            stop.max_tokens = max_model_len.saturating_sub(prompt.len()).max(1);
        }
        EngineRequest {
            prompt_ids: prompt,
            params: self.params.clone(),
            stop,
            n: self.n,
            arrival,
            // Nothing is shown before the end unless streaming, and stop strings are checked
            // as text grows (to end the choice early), so only they need each token at once.
            delivery: if self.stream || !self.stop_strings.is_empty() {
                Delivery::EachToken
            } else {
                Delivery::AtFinish
            },
            steer: None,
            constraint: None,
        }
    }
}
