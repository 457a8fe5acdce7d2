//! One choice of one request as the engine tracks it: its tokens, how many are in the cache,
//! its blocks, its sampler and its timings.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::kv_manager::SeqBlocks;
use super::request::{Delivery, EngineEvent, PromptLogprob, StopConditions, Timings};
use super::sampler::{SamplingParams, SequenceSampler};
use super::steer::Steering;

pub type SeqId = u64;

/// What the choices of one request share.
pub struct RequestShared {
    pub params: SamplingParams,
    pub stop: StopConditions,
    pub delivery: Delivery,
    pub events: UnboundedSender<EngineEvent>,
    /// Set by the client per choice when it ended the choice itself (a stop string matched).
    pub stop_requested: Arc<[AtomicBool]>,
}

impl RequestShared {
    /// The client dropped its stream: the request is cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.events.is_closed()
    }

    /// The client ended this choice (a stop string): finish it without another event.
    pub fn is_stop_requested(&self, choice: usize) -> bool {
        self.stop_requested
            .get(choice)
            .is_some_and(|f| f.load(Ordering::Relaxed))
    }

    pub fn send(&self, event: EngineEvent) {
        // A closed channel is noticed as a cancellation at the next step; nothing to do here.
        let _ = self.events.send(event);
    }
}

pub struct Sequence {
    pub id: SeqId,
    pub choice: usize,
    pub request: Arc<RequestShared>,
    /// Prompt followed by the generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose K/V are in the cache.
    pub num_computed: usize,
    pub blocks: SeqBlocks,
    pub sampler: SequenceSampler,
    /// Choices after the first wait for this sequence's prompt and then share its blocks.
    pub fork_parent: Option<SeqId>,
    /// Prompt tokens found in the prefix cache (or shared from the parent) at admission.
    pub cached_prompt_tokens: usize,
    pub timings: Timings,
    /// Token events kept for [`Delivery::AtFinish`], sent just before `Finished`.
    pub held: Vec<EngineEvent>,
    /// Set once its `Finished` event is sent; the sequence leaves the queues at the step's end.
    pub finished: bool,
    /// Its steer, its constraint and the tokens they have queued (kept through preemption).
    pub(super) steering: Steering,
    /// With `prompt_logprobs`: the prompt's tokens scored so far (position 1 onwards), kept
    /// through preemption so recomputed positions are not scored twice; taken when sent.
    pub prompt_scores: Option<Vec<PromptLogprob>>,
}

impl Sequence {
    pub(super) fn new(
        id: SeqId,
        choice: usize,
        request: Arc<RequestShared>,
        prompt: &[u32],
        arrival: Instant,
        fork_parent: Option<SeqId>,
        steering: Steering,
    ) -> Self {
        let sampler = SequenceSampler::for_choice(&request.params, prompt, choice);
        // The first choice scores the prompt; the others share its blocks.
        let prompt_scores = (choice == 0 && request.params.prompt_logprobs.is_some())
            .then(|| Vec::with_capacity(prompt.len()));
        Self {
            id,
            choice,
            sampler,
            request,
            tokens: prompt.to_vec(),
            prompt_len: prompt.len(),
            num_computed: 0,
            blocks: SeqBlocks::default(),
            fork_parent,
            cached_prompt_tokens: 0,
            timings: Timings {
                arrival,
                first_scheduled: None,
                first_token: None,
                last_token: None,
            },
            held: Vec::new(),
            finished: false,
            steering,
            prompt_scores,
        }
    }

    pub fn output_len(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens still to be computed before the next sample.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    pub fn is_prefilling(&self) -> bool {
        self.num_computed < self.prompt_len
    }

    /// Scores its prompt: every prompt token is computed (no prefix-cache hit) and gets logits.
    pub fn scores_prompt(&self) -> bool {
        self.prompt_scores.is_some()
    }
}
