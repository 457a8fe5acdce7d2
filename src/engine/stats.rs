//! Live engine figures, written by the engine thread with relaxed atomics and read by anyone
//! (tests, the metrics endpoint) without taking a lock the engine could wait on.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// What one engine step that ran a batch did, handed to a [`StepObserver`] by reference (no
/// allocation per step).
#[derive(Clone, Copy, Debug, Default)]
pub struct StepReport {
    /// Sequences in the batch.
    pub num_seqs: usize,
    /// Tokens computed (prefill chunks plus one per decoding sequence).
    pub num_tokens: usize,
    /// Dropping cancelled sequences and scheduling.
    pub schedule: Duration,
    /// The model's forward pass (and the logits' copy to the host).
    pub forward: Duration,
    /// Sampling, stop checks, events, freeing finished sequences.
    pub sample: Duration,
}

/// Watches steps from the engine thread (the metrics histograms implement it). It runs inside
/// the step, so it must be quick and must never block: record into atomics, nothing more.
pub trait StepObserver: Send + Sync {
    fn on_step(&self, step: &StepReport);
}

#[derive(Default, Debug)]
pub struct EngineStats {
    pub num_running: AtomicU64,
    pub num_waiting: AtomicU64,
    pub total_blocks: AtomicU64,
    pub free_blocks: AtomicU64,
    pub cached_free_blocks: AtomicU64,
    /// Prompt tokens the model actually computed (prefix hits excluded).
    pub computed_prompt_tokens: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub prefix_cache_queries: AtomicU64,
    pub prefix_cache_hits: AtomicU64,
    pub num_preemptions: AtomicU64,
    pub steps: AtomicU64,
    pub finished_stop: AtomicU64,
    pub finished_length: AtomicU64,
    pub finished_abort: AtomicU64,
    /// Sequences taken in (a request with `n` choices counts `n`).
    pub sequences_added: AtomicU64,
}

/// A plain copy of [`EngineStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub num_running: u64,
    pub num_waiting: u64,
    pub total_blocks: u64,
    pub free_blocks: u64,
    pub cached_free_blocks: u64,
    pub computed_prompt_tokens: u64,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    pub num_preemptions: u64,
    pub steps: u64,
    pub finished_stop: u64,
    pub finished_length: u64,
    pub finished_abort: u64,
}

/// Adds up the figures of several engine replicas.
impl std::ops::Add for StatsSnapshot {
    type Output = Self;

    fn add(self, o: Self) -> Self {
        Self {
            num_running: self.num_running + o.num_running,
            num_waiting: self.num_waiting + o.num_waiting,
            total_blocks: self.total_blocks + o.total_blocks,
            free_blocks: self.free_blocks + o.free_blocks,
            cached_free_blocks: self.cached_free_blocks + o.cached_free_blocks,
            computed_prompt_tokens: self.computed_prompt_tokens + o.computed_prompt_tokens,
            prompt_tokens: self.prompt_tokens + o.prompt_tokens,
            generation_tokens: self.generation_tokens + o.generation_tokens,
            prefix_cache_queries: self.prefix_cache_queries + o.prefix_cache_queries,
            prefix_cache_hits: self.prefix_cache_hits + o.prefix_cache_hits,
            num_preemptions: self.num_preemptions + o.num_preemptions,
            steps: self.steps + o.steps,
            finished_stop: self.finished_stop + o.finished_stop,
            finished_length: self.finished_length + o.finished_length,
            finished_abort: self.finished_abort + o.finished_abort,
        }
    }
}

impl EngineStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            num_running: self.num_running.load(Relaxed),
            num_waiting: self.num_waiting.load(Relaxed),
            total_blocks: self.total_blocks.load(Relaxed),
            free_blocks: self.free_blocks.load(Relaxed),
            cached_free_blocks: self.cached_free_blocks.load(Relaxed),
            computed_prompt_tokens: self.computed_prompt_tokens.load(Relaxed),
            prompt_tokens: self.prompt_tokens.load(Relaxed),
            generation_tokens: self.generation_tokens.load(Relaxed),
            prefix_cache_queries: self.prefix_cache_queries.load(Relaxed),
            prefix_cache_hits: self.prefix_cache_hits.load(Relaxed),
            num_preemptions: self.num_preemptions.load(Relaxed),
            steps: self.steps.load(Relaxed),
            finished_stop: self.finished_stop.load(Relaxed),
            finished_length: self.finished_length.load(Relaxed),
            finished_abort: self.finished_abort.load(Relaxed),
        }
    }
}
