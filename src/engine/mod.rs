//! The continuous-batching engine: request lifecycle, scheduler, KV block manager with prefix
//! caching, sampling and token-level stop conditions.
//!
//! Each replica (`--data-parallel-size`, one by default) runs on its own thread pool and owns
//! its KV cache; the weights are shared. The pool has the binary's `RAYON_NUM_THREADS`
//! (cores / replicas) threads, or all cores when that is unset, so a library user running
//! several replicas should set it. Requests arrive over a channel; each gets its own unbounded
//! event channel back, so a slow client never blocks a step, and dropping the receiving end
//! cancels the request (its blocks are freed at the next step). Knows nothing of HTTP, JSON or
//! text.

pub mod block_hash;
pub mod block_pool;
pub mod constraint;
pub mod core;
mod device_sampling;
pub mod kv_events;
pub mod kv_manager;
pub mod request;
pub mod sampler;
mod scheduler;
mod sequence;
pub mod stats;
pub mod steer;

pub use block_hash::{BlockHash, BlockHasher};
pub use constraint::{Constraint, ConstraintFactory, Progress, TokenMask};
pub use kv_events::{KvEvent, KvEventBatch, KvEventSink};
pub use request::{
    Delivery, EngineEvent, EngineRequest, FinishReason, PromptLogprob, StopConditions, SubmitError,
    Timings, TokenLogprobs,
};
pub use sampler::SamplingParams;
pub use stats::{EngineStats, StatsSnapshot, StepObserver, StepReport};
pub use steer::{Steer, SteerFactory};

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::mpsc;
use std::sync::Arc;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::config::{EngineConfig, KvCacheSize};
use crate::model::{Decoder, KvCache, ModelError};
pub use core::EngineCore;
use scheduler::SchedulerLimits;

// Nearly every command is an `Add`: boxing its request would cost an allocation per request
// to save bytes only in the rare other commands.
#[allow(clippy::large_enum_variant)]
enum Command {
    Add(
        EngineRequest,
        tokio::sync::mpsc::UnboundedSender<EngineEvent>,
        Arc<[AtomicBool]>,
    ),
    /// Drop the prefix cache's free content; the answer is how many blocks lost theirs.
    ResetPrefixCache(tokio::sync::oneshot::Sender<usize>),
}

/// What a request may ask for; checked at submission so a request that can never run is
/// refused at once instead of waiting in the queue.
#[derive(Clone, Copy, Debug)]
pub struct EngineLimits {
    pub max_model_len: usize,
    pub vocab_size: usize,
    /// Tokens the whole KV cache holds.
    pub cache_tokens: usize,
    pub block_size: usize,
}

/// A cheap, cloneable way in. The engine threads end once every handle is dropped and the
/// work in flight is done.
#[derive(Clone)]
pub struct EngineHandle {
    replicas: Arc<[Replica]>,
    limits: EngineLimits,
}

/// One engine thread behind the handle.
struct Replica {
    commands: mpsc::Sender<Command>,
    stats: Arc<EngineStats>,
    /// Cleared if the loop panicked: the replica takes no more requests.
    alive: Arc<AtomicBool>,
    /// Sequences sent its way; with the engine's own count of those it has taken in, this
    /// estimates how many are still in the channel. Relaxed loads suffice: routing only needs
    /// a recent figure, and a stale one costs balance, not correctness.
    submitted: AtomicU64,
    /// Runs the engine loop; dropped with the last handle, after the loop has seen its
    /// command channel close.
    _pool: rayon::ThreadPool,
}

impl Replica {
    /// Its figures; a dead replica keeps its counters but holds no work and no blocks.
    fn snapshot(&self) -> StatsSnapshot {
        let mut s = self.stats.snapshot();
        if !self.alive.load(Acquire) {
            s.num_running = 0;
            s.num_waiting = 0;
            s.total_blocks = 0;
            s.free_blocks = 0;
            s.cached_free_blocks = 0;
        }
        s
    }

    /// Sequences queued for, waiting in or running on this replica.
    fn load(&self) -> u64 {
        let st = &self.stats;
        let in_channel = self
            .submitted
            .load(Relaxed)
            .saturating_sub(st.sequences_added.load(Relaxed));
        in_channel + st.num_waiting.load(Relaxed) + st.num_running.load(Relaxed)
    }
}

/// The events of one request. Dropping it cancels the request.
pub struct RequestStream {
    events: UnboundedReceiver<EngineEvent>,
    stop_requested: Arc<[AtomicBool]>,
}

impl RequestStream {
    fn new(events: UnboundedReceiver<EngineEvent>, stop_requested: Arc<[AtomicBool]>) -> Self {
        Self {
            events,
            stop_requested,
        }
    }

    /// Ends one choice early with reason `stop` (a stop string matched in its text); the
    /// engine frees it at the next step and sends nothing more for it.
    pub fn finish_choice(&self, choice: usize) {
        self.choice_stopper().finish_choice(choice)
    }

    /// A handle that can end choices while the stream itself is owned elsewhere.
    pub fn choice_stopper(&self) -> ChoiceStopper {
        ChoiceStopper(self.stop_requested.clone())
    }

    pub async fn recv(&mut self) -> Option<EngineEvent> {
        self.events.recv().await
    }

    /// The next event if one is ready (for callers that drive the engine step by step).
    pub fn try_recv(&mut self) -> Option<EngineEvent> {
        self.events.try_recv().ok()
    }

    /// For callers outside an async runtime (benchmarks, the one-shot generator).
    pub fn blocking_recv(&mut self) -> Option<EngineEvent> {
        self.events.blocking_recv()
    }
}

/// Ends choices of one request early (see [`RequestStream::finish_choice`]).
#[derive(Clone)]
pub struct ChoiceStopper(Arc<[AtomicBool]>);

impl ChoiceStopper {
    pub fn finish_choice(&self, choice: usize) {
        if let Some(flag) = self.0.get(choice) {
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl EngineHandle {
    pub fn limits(&self) -> EngineLimits {
        self.limits
    }

    /// The replicas' figures added up.
    pub fn stats(&self) -> StatsSnapshot {
        self.replicas
            .iter()
            .map(Replica::snapshot)
            .fold(StatsSnapshot::default(), |a, b| a + b)
    }

    /// Each replica's own figures.
    pub fn replica_stats(&self) -> Vec<StatsSnapshot> {
        self.replicas.iter().map(Replica::snapshot).collect()
    }

    pub fn num_replicas(&self) -> usize {
        self.replicas.len()
    }

    /// False once every replica has stopped after a panic: the process can only refuse work,
    /// and liveness says so, so an orchestrator restarts it.
    pub fn is_alive(&self) -> bool {
        self.replicas.iter().any(|r| r.alive.load(Acquire))
    }

    /// Drops the prefix cache's content in every block no sequence holds, on every running
    /// replica (vLLM's `reset_prefix_cache`); returns how many blocks lost theirs.
    pub async fn reset_prefix_cache(&self) -> usize {
        let mut answers = Vec::new();
        for replica in self.replicas.iter().filter(|r| r.alive.load(Acquire)) {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if replica.commands.send(Command::ResetPrefixCache(tx)).is_ok() {
                answers.push(rx);
            }
        }
        let mut dropped = 0;
        for rx in answers {
            // A replica that stopped meanwhile dropped its cache with it.
            dropped += rx.await.unwrap_or(0);
        }
        dropped
    }

    /// Validates `req` against the model and cache and queues it on the least loaded replica
    /// (the next one if that one has just stopped).
    pub fn submit(&self, req: EngineRequest) -> Result<RequestStream, SubmitError> {
        self.limits.check(&req)?;
        let mut order: Vec<&Replica> = self
            .replicas
            .iter()
            .filter(|r| r.alive.load(Acquire))
            .collect();
        order.sort_by_key(|r| r.load());
        let (tx, rx) = unbounded_channel();
        let stops: Arc<[AtomicBool]> = (0..req.n).map(|_| AtomicBool::new(false)).collect();
        let n = req.n as u64;
        let mut command = Command::Add(req, tx, stops.clone());
        for replica in order {
            match replica.commands.send(command) {
                Ok(()) => {
                    replica.submitted.fetch_add(n, Relaxed);
                    return Ok(RequestStream::new(rx, stops));
                }
                // Its loop has ended (a panic not yet marked): the request comes back intact.
                Err(mpsc::SendError(back)) => command = back,
            }
        }
        Err(SubmitError::EngineStopped)
    }
}

impl EngineLimits {
    pub fn check(&self, req: &EngineRequest) -> Result<(), SubmitError> {
        let prompt = req.prompt_ids.len();
        if prompt == 0 {
            return Err(SubmitError::EmptyPrompt);
        }
        if req.n == 0 {
            return Err(SubmitError::ZeroChoices);
        }
        if prompt + req.stop.max_tokens > self.max_model_len {
            return Err(SubmitError::ContextLength {
                max_model_len: self.max_model_len,
                prompt_tokens: prompt,
                max_tokens: req.stop.max_tokens,
            });
        }
        if let Some(&t) = req
            .prompt_ids
            .iter()
            .find(|&&t| t as usize >= self.vocab_size)
        {
            return Err(SubmitError::TokenOutOfVocab(t));
        }
        req.params
            .validate(self.vocab_size)
            .map_err(|e| SubmitError::Sampling(e.to_string()))?;
        // Every choice must be able to finish on its own, in whole blocks.
        let per_choice = (prompt + req.stop.max_tokens).div_ceil(self.block_size) * self.block_size;
        if per_choice > self.cache_tokens {
            return Err(SubmitError::TooLargeForCache {
                needed: per_choice,
                capacity: self.cache_tokens,
            });
        }
        Ok(())
    }
}

/// Allocates the KV cache from `config` and builds an engine to be driven step by step
/// (tests do this for determinism; the daemon uses [`spawn`]).
pub fn build(decoder: Decoder, config: &EngineConfig) -> Result<EngineCore, ModelError> {
    config.validate().map_err(ModelError::Resolve)?;
    let model_config = decoder.config().clone();
    let block_size = config.block_size;
    let kv_dtype = config
        .kv_cache_dtype
        .resolve(decoder.dtype(), decoder.device())?;
    let num_blocks = match config.kv_cache {
        KvCacheSize::Blocks(n) => n,
        KvCacheSize::Bytes(bytes) => {
            KvCache::blocks_for_budget(&model_config, block_size, kv_dtype, bytes)
        }
    };
    if num_blocks == 0 {
        return Err(ModelError::Resolve(
            "the KV cache budget holds no block at all; raise --kv-cache-memory (each of the \
             --data-parallel-size replicas gets an equal share of it)"
                .into(),
        ));
    }
    let cache = KvCache::new(
        &model_config,
        num_blocks,
        block_size,
        kv_dtype,
        decoder.device(),
    )?;
    let max_model_len = config
        .max_model_len
        .unwrap_or(model_config.max_position_embeddings)
        .min(model_config.max_position_embeddings);
    tracing::info!(
        num_blocks,
        block_size,
        tokens = num_blocks * block_size,
        bytes = num_blocks * KvCache::bytes_per_block(&model_config, block_size, kv_dtype),
        dtype = ?kv_dtype,
        prefix_caching = config.enable_prefix_caching,
        "KV cache allocated"
    );
    let limits = EngineLimits {
        max_model_len,
        vocab_size: model_config.vocab_size,
        cache_tokens: num_blocks * block_size,
        block_size,
    };
    Ok(EngineCore::new(
        decoder,
        cache,
        SchedulerLimits {
            max_num_seqs: config.max_num_seqs,
            max_num_batched_tokens: config.max_num_batched_tokens,
        },
        limits,
        config.enable_prefix_caching,
        BlockHasher::new(&config.prefix_caching_hash_seed),
    ))
}

/// Builds the `config.data_parallel_size` replicas of [`build`], each with an equal share of
/// the KV budget and its own copy of the decoder (the weights are shared, not copied).
pub fn build_replicas(
    decoder: Decoder,
    config: &EngineConfig,
) -> Result<Vec<EngineCore>, ModelError> {
    config.validate().map_err(ModelError::Resolve)?;
    let n = config.data_parallel_size;
    if n > 1 && !decoder.device().is_cpu() {
        return Err(ModelError::Resolve(
            "data_parallel_size > 1 is for CPU serving: one engine per device batches best".into(),
        ));
    }
    let mut share = config.clone();
    share.data_parallel_size = 1;
    share.kv_cache = match config.kv_cache {
        KvCacheSize::Bytes(b) => KvCacheSize::Bytes(b / n),
        KvCacheSize::Blocks(b) => KvCacheSize::Blocks(b / n),
    };
    (0..n).map(|_| build(decoder.clone(), &share)).collect()
}

/// Builds the engine replicas and starts their threads.
pub fn spawn(decoder: Decoder, config: &EngineConfig) -> Result<EngineHandle, ModelError> {
    start_replicas(build_replicas(decoder, config)?)
}

/// Starts the thread of an engine already built (and, for the daemon, given its step
/// observer: [`EngineCore::set_step_observer`]).
pub fn start(core: EngineCore) -> Result<EngineHandle, ModelError> {
    start_replicas(vec![core])
}

/// Starts one thread per engine replica behind a single handle.
pub fn start_replicas(cores: Vec<EngineCore>) -> Result<EngineHandle, ModelError> {
    let limits = cores
        .first()
        .map(EngineCore::limits)
        .ok_or_else(|| ModelError::Resolve("no engine to start".into()))?;
    let replicas = cores
        .into_iter()
        .enumerate()
        .map(|(i, core)| start_thread(i, core))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(EngineHandle {
        replicas: replicas.into(),
        limits,
    })
}

/// Runs the engine loop as a job on its own rayon pool rather than on a plain thread: the
/// ops that split work with rayon (candle's, and paged attention) then run on this replica's
/// threads — inline when it has one — instead of being handed to the global pool, where the
/// replicas would queue behind each other and pay a thread hand-off per op.
fn start_thread(index: usize, core: EngineCore) -> Result<Replica, ModelError> {
    let stats = core.shared_stats();
    let (tx, rx) = mpsc::channel::<Command>();
    // `RAYON_NUM_THREADS` (set by the binary to cores / replicas) sizes the global pool.
    let op_threads = rayon::current_num_threads();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(op_threads)
        .thread_name(move |i| format!("distillery-engine-{index}.{i}"))
        .build()
        .map_err(|e| ModelError::Resolve(format!("cannot start the engine threads: {e}")))?;
    let alive = Arc::new(AtomicBool::new(true));
    let flag = alive.clone();
    pool.spawn(move || run_guarded(index, &flag, move || run_loop(core, rx)));
    Ok(Replica {
        commands: tx,
        stats,
        alive,
        submitted: AtomicU64::new(0),
        _pool: pool,
    })
}

fn run_loop(mut core: EngineCore, rx: mpsc::Receiver<Command>) {
    let apply = |core: &mut EngineCore, command| match command {
        Command::Add(req, events, stops) => core.add_request(req, events, stops),
        Command::ResetPrefixCache(done) => {
            // The caller may have gone: nothing to tell then.
            let _ = done.send(core.reset_prefix_cache());
        }
    };
    loop {
        // Idle: sleep until a command comes; busy: take whatever has arrived and step.
        if !core.has_work() {
            match rx.recv() {
                Ok(command) => apply(&mut core, command),
                Err(_) => return,
            }
        }
        while let Ok(command) = rx.try_recv() {
            apply(&mut core, command);
        }
        if core.has_work() {
            core.step();
        }
    }
}

/// Runs a replica's loop so that a panic (a bug: nothing a request sends should cause one)
/// stops only that replica. Unwinding drops the engine, and with it every request's event
/// sender, so the requests in flight end at once with an error instead of hanging; the
/// replica is marked dead so no new work is routed to it. Without this, rayon would abort
/// the whole process.
fn run_guarded(index: usize, alive: &AtomicBool, body: impl FnOnce()) {
    // The engine state that saw the panic is dropped, never used again, so a broken
    // invariant inside it cannot leak into later work.
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        alive.store(false, Release);
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-text panic payload".into());
        tracing::error!(
            replica = index,
            panic = %message,
            "engine replica stopped after a panic; its requests in flight end with an error"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_replica_is_marked_dead_and_closes_its_streams() {
        let alive = AtomicBool::new(true);
        let (tx, mut rx) = unbounded_channel::<EngineEvent>();
        run_guarded(0, &alive, move || {
            let _owned_by_the_loop = tx;
            panic!("a bug in a step");
        });
        assert!(!alive.load(Acquire));
        assert!(rx.try_recv().is_err() && rx.is_closed());

        let healthy = AtomicBool::new(true);
        run_guarded(1, &healthy, || {});
        assert!(healthy.load(Acquire));
    }
}
