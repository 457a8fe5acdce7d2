//! One engine step: drop cancelled sequences, schedule, run ONE forward over the flattened
//! batch, sample, check stop conditions, send events.
//!
//! Owns the model, the KV cache and every sequence; runs on the engine thread only. Knows
//! nothing of HTTP or text: results leave as [`EngineEvent`]s on each request's channel.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{CpuStorage, Device, Storage, Tensor};
use rayon::prelude::*;
use tokio::sync::mpsc::UnboundedSender;

use super::block_hash::{BlockHash, BlockHasher};
use super::constraint::{Pick, Progress};
use super::device_sampling;
use super::kv_events::{KvEventBatch, KvEventSink};
use super::kv_manager::KvManager;
use super::request::{Delivery, EngineEvent, EngineRequest, FinishReason, TokenLogprobs};
use super::sampler::{argmax, score_prompt_token, SamplerScratch};
use super::scheduler::{Scheduled, Scheduler, SchedulerLimits};
use super::sequence::{RequestShared, Sequence};
use super::stats::{EngineStats, StatsSnapshot, StepObserver, StepReport};
use super::steer::Steering;
use super::{EngineLimits, RequestStream, SubmitError};
use crate::model::{Decoder, ForwardBatch, KvCache, ModelError};

pub struct EngineCore {
    decoder: Decoder,
    cache: KvCache,
    kv: KvManager,
    scheduler: Scheduler,
    limits: SchedulerLimits,
    engine_limits: EngineLimits,
    stats: Arc<EngineStats>,
    observer: Option<Arc<dyn StepObserver>>,
    eos_token_ids: Vec<u32>,
    next_seq_id: u64,
    // Buffers reused every step.
    batch: ForwardBatch,
    scheduled: Vec<Scheduled>,
    scratch: SamplerScratch,
    row: Vec<f32>,
    masked: Vec<u32>,
    /// Indices (in `running`, ascending) of this step's constrained sample points.
    mask_seqs: Vec<usize>,
    /// Where the prefix cache's changes go, when a router mirrors them.
    kv_events: Option<KvEventSink>,
}

impl EngineCore {
    pub fn new(
        decoder: Decoder,
        cache: KvCache,
        limits: SchedulerLimits,
        engine_limits: EngineLimits,
        prefix_caching: bool,
        hasher: BlockHasher,
    ) -> Self {
        let stats = Arc::new(EngineStats::default());
        let kv = KvManager::with_hasher(
            cache.num_blocks(),
            cache.block_size(),
            prefix_caching,
            hasher,
        );
        stats.total_blocks.store(cache.num_blocks() as u64, Relaxed);
        stats.free_blocks.store(cache.num_blocks() as u64, Relaxed);
        Self {
            eos_token_ids: decoder.config().eos_token_ids.clone(),
            decoder,
            cache,
            kv,
            scheduler: Scheduler::default(),
            limits,
            engine_limits,
            stats,
            observer: None,
            next_seq_id: 0,
            batch: ForwardBatch::default(),
            scheduled: Vec::new(),
            scratch: SamplerScratch::default(),
            row: Vec::new(),
            masked: Vec::new(),
            mask_seqs: Vec::new(),
            kv_events: None,
        }
    }

    /// Sends the prefix cache's changes to `sink` from now on, one batch per step that made
    /// any (see [`super::kv_events`]).
    pub fn set_kv_event_sink(&mut self, sink: KvEventSink) {
        self.kv.record_events();
        self.kv_events = Some(sink);
    }

    /// Every block hash the prefix cache's index holds.
    pub fn indexed_block_hashes(&self) -> Vec<BlockHash> {
        self.kv.indexed_hashes()
    }

    fn send_kv_events(&mut self) {
        if let Some(sink) = &self.kv_events {
            let events = self.kv.take_events();
            if !events.is_empty() {
                // A receiver gone (the publisher stopped) only means nobody mirrors the index.
                let _ = sink.send(KvEventBatch {
                    at: std::time::SystemTime::now(),
                    events,
                });
            }
        }
    }

    pub fn limits(&self) -> EngineLimits {
        self.engine_limits
    }

    pub fn shared_stats(&self) -> Arc<EngineStats> {
        self.stats.clone()
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Who hears about every step that runs a batch (the daemon's metrics).
    pub fn set_step_observer(&mut self, observer: Option<Arc<dyn StepObserver>>) {
        self.observer = observer;
    }

    /// Validates and queues a request, for callers that drive the engine themselves.
    pub fn submit(&mut self, req: EngineRequest) -> Result<RequestStream, SubmitError> {
        self.engine_limits.check(&req)?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let stops: Arc<[AtomicBool]> = (0..req.n).map(|_| AtomicBool::new(false)).collect();
        self.add_request(req, tx, stops.clone());
        Ok(RequestStream::new(rx, stops))
    }

    pub fn has_work(&self) -> bool {
        !self.scheduler.running.is_empty() || !self.scheduler.waiting.is_empty()
    }

    /// Queues a request (already validated by the handle) as `n` sequences.
    pub fn add_request(
        &mut self,
        req: EngineRequest,
        events: UnboundedSender<EngineEvent>,
        stop_requested: Arc<[AtomicBool]>,
    ) {
        let shared = Arc::new(RequestShared {
            params: req.params,
            stop: req.stop,
            delivery: req.delivery,
            events,
            stop_requested,
        });
        let parent = self.next_seq_id;
        for choice in 0..req.n {
            let id = self.next_seq_id;
            self.next_seq_id += 1;
            let fork = (choice > 0).then_some(parent);
            self.scheduler.waiting.push_back(Sequence::new(
                id,
                choice,
                shared.clone(),
                &req.prompt_ids,
                req.arrival,
                fork,
                Steering::new(req.steer.as_ref(), req.constraint.as_ref(), choice),
            ));
        }
        self.stats
            .prompt_tokens
            .fetch_add((req.prompt_ids.len() * req.n) as u64, Relaxed);
        self.publish();
        // After the waiting count: a handle balancing replicas may count these sequences twice
        // for a moment, never zero times.
        self.stats.sequences_added.fetch_add(req.n as u64, Relaxed);
    }

    /// Runs one step. A model failure fails every request in the batch (they get an `Error`
    /// event); the engine itself keeps going.
    pub fn step(&mut self) {
        let start = Instant::now();
        self.drop_cancelled();
        let now = Instant::now();
        self.scheduler
            .schedule(&self.limits, &mut self.kv, now, &mut self.scheduled);
        if self.scheduled.is_empty() {
            self.send_kv_events();
            self.publish();
            return;
        }
        let scheduled = Instant::now();
        let mut forward_done = None;
        if let Err(e) = self.run_batch(&mut forward_done) {
            tracing::error!(error = %e, "engine step failed");
            let message = e.to_string();
            for s in &mut self.scheduler.running {
                s.request.send(EngineEvent::Error {
                    message: message.clone(),
                });
                s.finished = true;
            }
        }
        let kv = &mut self.kv;
        self.scheduler.running.retain_mut(|s| {
            if s.finished {
                kv.free(&mut s.blocks);
            }
            !s.finished
        });
        self.stats.steps.fetch_add(1, Relaxed);
        self.send_kv_events();
        self.publish();
        if let Some(observer) = &self.observer {
            let end = Instant::now();
            let forward_done = forward_done.unwrap_or(end);
            observer.on_step(&StepReport {
                num_seqs: self.scheduled.len(),
                num_tokens: self.scheduled.iter().map(|s| s.num_tokens).sum(),
                schedule: scheduled.duration_since(start),
                forward: forward_done.duration_since(scheduled),
                sample: end.duration_since(forward_done),
            });
        }
    }

    /// Sets `forward_done` once the logits are on the host, to split the step's time.
    fn run_batch(&mut self, forward_done: &mut Option<Instant>) -> Result<(), ModelError> {
        let bs = self.kv.block_size();
        self.batch.clear();
        for sch in &self.scheduled {
            let s = &self.scheduler.running[sch.index];
            let range = s.num_computed..s.num_computed + sch.num_tokens;
            self.batch
                .push_sequence(&s.tokens[range], s.num_computed, &s.blocks.table, bs);
            if s.prompt_scores.is_some() && s.is_prefilling() {
                self.batch.score_every_token_of_last();
            }
        }
        self.mask_seqs.clear();
        for sch in &self.scheduled {
            let s = &self.scheduler.running[sch.index];
            let samples =
                s.num_computed + sch.num_tokens >= s.tokens.len() && s.request.stop.max_tokens > 0;
            if samples && s.steering.needs_mask() {
                self.mask_seqs.push(sch.index);
            }
            // (Plain greedy ones look for forced tokens only: see sample_and_emit.)
        }
        let logits = if self.mask_seqs.is_empty() {
            self.decoder.forward(&self.batch, &self.cache)?
        } else {
            // The grammar masks are computed beside the forward, each on its own thread.
            self.mask_seqs.sort_unstable();
            let (decoder, batch, cache) = (&self.decoder, &self.batch, &self.cache);
            let (running, want) = (&mut self.scheduler.running, &self.mask_seqs);
            let (logits, ()) = rayon::join(
                || decoder.forward(batch, cache),
                || {
                    running.par_iter_mut().enumerate().for_each(|(i, s)| {
                        if want.binary_search(&i).is_ok() {
                            let lazy = s.request.params.is_plain_greedy()
                                && s.output_len() >= s.request.stop.min_tokens;
                            s.steering.prepare_mask(!lazy);
                        }
                    })
                },
            );
            logits?
        };
        let vocab = logits.dim(1)?;
        // On a GPU with an all-greedy step, only the chosen ids come back (empty `all` below).
        let device_ids = device_sampling::greedy_ids(&logits, || {
            self.batch.every_token.is_empty()
                && self.scheduled.iter().all(|sch| {
                    device_sampling::takes_raw_argmax(&self.scheduler.running[sch.index])
                })
        })?;
        let logits = match (&device_ids, logits.device()) {
            (Some(_), _) | (None, Device::Cpu) => logits,
            (None, _) => logits.to_device(&Device::Cpu)?,
        };
        let mut body = |all: &[f32]| {
            let now = Instant::now();
            *forward_done = Some(now);
            let mut next_row = 0;
            for (i, sch) in self.scheduled.iter().enumerate() {
                let s = &mut self.scheduler.running[sch.index];
                let rows = self.batch.logit_rows_of(i);
                let first_row = next_row;
                next_row += rows;
                let row = next_row - 1;
                // A scored sequence is prefilling (its scores go out when that ends), so it is
                // marked and its rows are one per token of the chunk, however short.
                if s.prompt_scores.is_some() && device_ids.is_none() {
                    let run = &all[first_row * vocab..next_row * vocab];
                    score_prompt(s, run, vocab, &mut self.scratch);
                }
                let computed_prompt = s
                    .prompt_len
                    .saturating_sub(s.num_computed)
                    .min(sch.num_tokens);
                self.stats
                    .computed_prompt_tokens
                    .fetch_add(computed_prompt as u64, Relaxed);
                s.num_computed += sch.num_tokens;
                self.kv
                    .register_full_blocks(&mut s.blocks, &s.tokens, s.num_computed);
                if s.num_computed < s.tokens.len() {
                    continue; // mid-prefill: no token yet
                }
                if let Some(scored) = s.prompt_scores.take() {
                    s.request.send(EngineEvent::PromptLogprobs {
                        first: s.tokens[0],
                        scored,
                    });
                }
                if s.request.stop.max_tokens == 0 {
                    // Only the prompt was asked for (echo with `max_tokens: 0`).
                    finish(s, FinishReason::Length, None, &self.stats);
                    continue;
                }
                let (logits, chosen) = match &device_ids {
                    Some(ids) => (&[][..], Some(ids[row])),
                    None => (&all[row * vocab..(row + 1) * vocab], None),
                };
                sample_and_emit(
                    s,
                    logits,
                    chosen,
                    &self.eos_token_ids,
                    &mut self.row,
                    &mut self.masked,
                    &mut self.scratch,
                    now,
                    &self.stats,
                );
            }
        };
        if device_ids.is_some() {
            body(&[]);
            return Ok(());
        }
        with_host_rows(&logits, body)
    }

    /// Drops the cached content of every block no sequence holds; returns how many blocks.
    pub fn reset_prefix_cache(&mut self) -> usize {
        let n = self.kv.forget_free_cached();
        self.send_kv_events();
        self.publish();
        n
    }

    fn drop_cancelled(&mut self) {
        let kv = &mut self.kv;
        let stats = &self.stats;
        let mut drop_seq = |s: &mut Sequence| {
            // A stop string ends a choice and, when it was the last one, the client's response
            // with it, closing the channel: it is still a stop, not an abort.
            let reason = if s.request.is_stop_requested(s.choice) {
                FinishReason::Stop
            } else if s.request.is_cancelled() {
                FinishReason::Abort
            } else {
                return true;
            };
            kv.free(&mut s.blocks);
            count_finish(stats, reason);
            false
        };
        self.scheduler.running.retain_mut(&mut drop_seq);
        self.scheduler.waiting.retain_mut(drop_seq);
    }

    fn publish(&self) {
        let st = &self.stats;
        st.num_running
            .store(self.scheduler.running.len() as u64, Relaxed);
        st.num_waiting
            .store(self.scheduler.waiting.len() as u64, Relaxed);
        st.free_blocks
            .store(self.kv.num_free_blocks() as u64, Relaxed);
        st.cached_free_blocks
            .store(self.kv.num_cached_free_blocks() as u64, Relaxed);
        st.prefix_cache_queries
            .store(self.kv.counters.queries, Relaxed);
        st.prefix_cache_hits.store(self.kv.counters.hits, Relaxed);
        st.num_preemptions
            .store(self.scheduler.num_preemptions, Relaxed);
    }
}

/// Calls `f` with the logits as one host slice, borrowing CPU storage instead of copying it.
fn with_host_rows<R>(logits: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R, ModelError> {
    let (storage, layout) = logits.storage_and_layout();
    if let (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) =
        (&*storage, layout.contiguous_offsets())
    {
        return Ok(f(&data[start..end]));
    }
    drop(storage);
    let copy = logits.flatten_all()?.to_vec1::<f32>()?;
    Ok(f(&copy))
}

fn count_finish(stats: &EngineStats, reason: FinishReason) {
    match reason {
        FinishReason::Stop => stats.finished_stop.fetch_add(1, Relaxed),
        FinishReason::Length => stats.finished_length.fetch_add(1, Relaxed),
        FinishReason::Abort => stats.finished_abort.fetch_add(1, Relaxed),
    };
}

/// Picks the next token of `s` (or takes `chosen`, the greedy id the device computed) and
/// tells its client, finishing the choice when a stop condition holds. The token and the
/// finish are counted in `stats` before the client hears of them, so a client that scrapes
/// the metrics after its response sees its request counted.
#[allow(clippy::too_many_arguments)]
fn sample_and_emit(
    s: &mut Sequence,
    logits: &[f32],
    chosen: Option<u32>,
    eos_token_ids: &[u32],
    row: &mut Vec<f32>,
    masked: &mut Vec<u32>,
    scratch: &mut SamplerScratch,
    now: Instant,
    stats: &EngineStats,
) {
    let req = s.request.clone();
    let stop = &req.stop;
    masked.clear();
    if s.output_len() < stop.min_tokens {
        if !stop.ignore_eos {
            masked.extend_from_slice(eos_token_ids);
        }
        masked.extend_from_slice(&stop.stop_token_ids);
    }
    // Plain greedy needs no mask when the constraint allows the model's best token.
    let lazy = masked.is_empty() && req.params.is_plain_greedy();
    if chosen.is_none() {
        s.steering.prepare_mask(!lazy);
    }
    let forced = s.steering.next_forced();
    let allowed = match (forced.or(chosen), lazy) {
        (Some(_), _) | (None, true) => None,
        (None, false) => match s.steering.mask() {
            Ok(mask) => mask,
            Err(e) => return fail(s, e, stats),
        },
    };
    if allowed.is_some_and(|m| !masked.is_empty() && m.only_within(masked)) {
        // The grammar allows only what a stop rule forbids (its end before min_tokens): the
        // grammar wins, as a valid answer is what was asked for.
        masked.clear();
    }
    if allowed.is_some_and(|m| m.is_empty()) {
        // Nothing may follow (a grammar that ended without a stop token): the choice is done.
        return finish(s, FinishReason::Stop, None, stats);
    }
    let (token, logprobs) = if let Some(token) = forced {
        // The model's own view of a token it did not choose, when logprobs are asked for (a
        // device-side greedy step has no host row, but such a step never asks for them).
        let scores = req.params.logprobs.is_some() && !logits.is_empty();
        if !scores {
            s.sampler.skip_draw();
        }
        let logprobs = scores.then(|| {
            row.clear();
            row.extend_from_slice(logits);
            let scored = s.sampler.score_forced(&req.params, row, token, scratch);
            TokenLogprobs {
                logprob: scored.logprob.unwrap_or(f32::NEG_INFINITY),
                top: scored.top_logprobs,
            }
        });
        (token, logprobs)
    } else if let Some(token) = chosen {
        (token, None)
    } else if lazy {
        let best = argmax(logits);
        let token = match s.steering.greedy(logits, best) {
            Ok(None) => best,
            Ok(Some(Pick::Token(t))) => t,
            // Nothing may follow (a grammar that ended without a stop token).
            Ok(Some(Pick::Nothing)) => return finish(s, FinishReason::Stop, None, stats),
            Err(e) => return fail(s, e, stats),
        };
        (token, None)
    } else {
        row.clear();
        row.extend_from_slice(logits);
        let sampled = s
            .sampler
            .sample_allowed(&req.params, row, masked, allowed, scratch);
        let logprobs = sampled.logprob.map(|logprob| TokenLogprobs {
            logprob,
            top: sampled.top_logprobs,
        });
        (sampled.token, logprobs)
    };
    if emit(
        s,
        &req,
        token,
        logprobs,
        forced.is_some(),
        eos_token_ids,
        now,
        stats,
    ) {
        return;
    }
    // Jump forward: the rest of a forced run needs no logits (unless their logprobs are
    // asked for), so it goes out now and the next forward writes it to the cache as one
    // chunk, as a prefill continues, instead of one token a step.
    if req.params.logprobs.is_none() {
        while let Some(token) = s.steering.next_forced() {
            s.sampler.skip_draw();
            if emit(s, &req, token, None, true, eos_token_ids, now, stats) {
                return;
            }
        }
    }
}

/// Appends `token` to the output of `s`, tells its steer, constraint and client, and finishes
/// the choice when a stop condition holds (then returns true).
#[allow(clippy::too_many_arguments)]
fn emit(
    s: &mut Sequence,
    req: &RequestShared,
    token: u32,
    logprobs: Option<TokenLogprobs>,
    forced: bool,
    eos_token_ids: &[u32],
    now: Instant,
    stats: &EngineStats,
) -> bool {
    let stop = &req.stop;
    s.sampler.record(token);
    s.tokens.push(token);
    let progress = match s.steering.observe(token) {
        Ok(p) => p,
        Err(e) => {
            fail(s, e, stats);
            return true;
        }
    };
    stats.generation_tokens.fetch_add(1, Relaxed);
    let first = s.timings.first_token.is_none();
    s.timings.first_token.get_or_insert(now);
    s.timings.last_token = Some(now);
    let is_stop_token = (!stop.ignore_eos && eos_token_ids.contains(&token))
        || stop.stop_token_ids.contains(&token);
    if !is_stop_token {
        let event = EngineEvent::Token {
            choice: s.choice,
            token,
            logprobs,
            first_scheduled: if first {
                s.timings.first_scheduled
            } else {
                None
            },
            cached_prompt_tokens: s.cached_prompt_tokens,
            at: now,
            forced,
        };
        // The first token always goes at once: it ends the request's wait in the queue,
        // which the caller bounds (admission) and times (TTFT).
        match req.delivery {
            Delivery::AtFinish if !first => s.held.push(event),
            _ => req.send(event),
        }
    }
    let reason = if is_stop_token || progress == Progress::Done {
        FinishReason::Stop
    } else if s.output_len() >= stop.max_tokens {
        FinishReason::Length
    } else {
        return false;
    };
    finish(s, reason, is_stop_token.then_some(token), stats);
    true
}

/// Ends the request of `s` with an error (its constraint broke: a bug, not the client's).
fn fail(s: &mut Sequence, message: String, stats: &EngineStats) {
    tracing::error!(error = %message, "constrained decoding failed");
    s.finished = true;
    count_finish(stats, FinishReason::Abort);
    s.request.send(EngineEvent::Error {
        message: format!("constrained decoding failed: {message}"),
    });
}

/// Ends `s`: counts the finish, then sends its held tokens and its `Finished` event.
fn finish(s: &mut Sequence, reason: FinishReason, stop_token: Option<u32>, stats: &EngineStats) {
    s.finished = true;
    count_finish(stats, reason);
    let req = s.request.clone();
    for event in s.held.drain(..) {
        req.send(event);
    }
    req.send(EngineEvent::Finished {
        choice: s.choice,
        reason,
        stop_token,
        prompt_tokens: s.prompt_len,
        completion_tokens: s.output_len(),
        cached_prompt_tokens: s.cached_prompt_tokens,
        timings: s.timings,
    });
}

/// Scores the prompt tokens that `run` (this step's rows of `s`, one per token computed)
/// predicts: row `j` is position `num_computed + j`, whose logits score the token after it.
/// Positions already scored before a preemption are skipped.
fn score_prompt(s: &mut Sequence, run: &[f32], vocab: usize, scratch: &mut SamplerScratch) {
    let k = s.request.params.prompt_logprobs.unwrap_or(0);
    let Some(scores) = s.prompt_scores.as_mut() else {
        return;
    };
    for (j, row) in run.chunks_exact(vocab).enumerate() {
        let next = s.num_computed + j + 1;
        if next >= s.prompt_len || next != scores.len() + 1 {
            continue;
        }
        scores.push(score_prompt_token(row, s.tokens[next], k, scratch));
    }
}
