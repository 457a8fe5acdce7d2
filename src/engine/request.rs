//! What goes into the engine and what comes back out of it, per request.
//!
//! Knows token ids and sampling parameters; knows nothing of HTTP, JSON or text.

use std::sync::Arc;
use std::time::Instant;

use super::constraint::ConstraintFactory;
use super::sampler::SamplingParams;
use super::steer::SteerFactory;

/// Token-level conditions that end a choice. Stop *strings* are text and are decided where
/// the text is made (the server's output path), which then finishes the request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StopConditions {
    pub max_tokens: usize,
    pub min_tokens: usize,
    pub ignore_eos: bool,
    pub stop_token_ids: Vec<u32>,
}

#[derive(Clone)]
pub struct EngineRequest {
    pub prompt_ids: Arc<[u32]>,
    pub params: SamplingParams,
    pub stop: StopConditions,
    /// Choices to generate from the one prompt; they share the prompt's KV blocks.
    pub n: usize,
    /// When the request reached the server (TTFT and queue time count from here).
    pub arrival: Instant,
    pub delivery: Delivery,
    /// Forced tokens ([`super::steer`]): one steer per choice, or none.
    pub steer: Option<SteerFactory>,
    /// Constrained decoding ([`super::constraint`]): one constraint per choice, or none.
    pub constraint: Option<ConstraintFactory>,
}

impl std::fmt::Debug for EngineRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineRequest")
            .field("prompt_ids", &self.prompt_ids.len())
            .field("params", &self.params)
            .field("stop", &self.stop)
            .field("n", &self.n)
            .field("delivery", &self.delivery)
            .field("steer", &self.steer.is_some())
            .field("constraint", &self.constraint.is_some())
            .finish()
    }
}

/// When a choice's tokens are sent back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Delivery {
    /// Each token as soon as it is sampled: for streaming, and for a caller that checks stop
    /// strings as the text grows (it must see tokens early to end the choice early).
    #[default]
    EachToken,
    /// The first token at once (it ends the wait in the queue), the rest together just before
    /// the choice's `Finished`: the caller is woken twice per choice instead of once per
    /// token. For a caller that shows nothing until the end.
    AtFinish,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS or stop token (or, decided outside the engine, a stop string).
    Stop,
    /// `max_tokens` reached.
    Length,
    /// Cancelled: the client went away.
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Abort => "abort",
        }
    }
}

/// When things happened to one choice, on one monotonic clock.
#[derive(Clone, Copy, Debug)]
pub struct Timings {
    pub arrival: Instant,
    pub first_scheduled: Option<Instant>,
    pub first_token: Option<Instant>,
    pub last_token: Option<Instant>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// One prompt token scored by the model, from the row of the position before it.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptLogprob {
    pub token: u32,
    pub logprob: f32,
    /// 1 for the row's most likely token.
    pub rank: u32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Clone, Debug)]
pub enum EngineEvent {
    /// With `prompt_logprobs`: every prompt token after the first, in order; sent once per
    /// request, before its first token.
    PromptLogprobs {
        /// The prompt's first token, which nothing scores.
        first: u32,
        scored: Vec<PromptLogprob>,
    },
    /// A generated token of choice `choice`, to be shown to the client.
    Token {
        choice: usize,
        token: u32,
        logprobs: Option<TokenLogprobs>,
        /// On a choice's first token only: when it was first scheduled, so the caller can
        /// time queue and prefill even for a choice it ends itself (a stop string), which
        /// gets no `Finished` event.
        first_scheduled: Option<Instant>,
        /// When it was sampled; with [`Delivery::AtFinish`] that is earlier than it arrives.
        at: Instant,
        /// Prompt tokens found in the prefix cache when the choice started (also known to a
        /// caller that ends the choice itself, which gets no `Finished`).
        cached_prompt_tokens: usize,
        /// Queued by the choice's steer rather than sampled.
        forced: bool,
    },
    /// Choice `choice` is done; exactly one per choice.
    Finished {
        choice: usize,
        reason: FinishReason,
        /// The id of the EOS/stop token that ended it, which is counted but not shown.
        stop_token: Option<u32>,
        prompt_tokens: usize,
        completion_tokens: usize,
        cached_prompt_tokens: usize,
        timings: Timings,
    },
    /// The engine failed while running this request; no more events follow.
    Error { message: String },
}

/// Why a request was refused before it reached the queue.
#[derive(thiserror::Error, Debug, Clone, PartialEq)]
pub enum SubmitError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "This model's maximum context length is {max_model_len} tokens. However, you requested \
         {} tokens ({prompt_tokens} in the messages, {max_tokens} in the completion). Please \
         reduce the length of the messages or completion.",
        prompt_tokens + max_tokens
    )]
    ContextLength {
        max_model_len: usize,
        prompt_tokens: usize,
        max_tokens: usize,
    },
    #[error(
        "the request needs {needed} tokens of KV cache but an engine's whole cache holds \
         {capacity}; lower max_tokens"
    )]
    TooLargeForCache { needed: usize, capacity: usize },
    #[error("token id {0} is outside the model's vocabulary")]
    TokenOutOfVocab(u32),
    #[error("n must be at least 1")]
    ZeroChoices,
    #[error("invalid sampling parameters: {0}")]
    Sampling(String),
    #[error("the engine has stopped")]
    EngineStopped,
}
