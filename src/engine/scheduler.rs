//! Decides each step's batch: which sequences run and how many tokens each computes.
//!
//! vLLM v1's policy, written our way: one token budget per step; running sequences first
//! (their decode token, or the next chunk of a prefill), then waiting sequences FCFS with what
//! is left (chunked prefill falls out of the budget). When the cache cannot grow a running
//! sequence, the most recently admitted running sequence is preempted by recompute: its blocks
//! are freed and it goes back to the front of the queue.
//!
//! Knows sequences, budgets and the KV manager; knows nothing of the model or of sampling.

use std::collections::{HashSet, VecDeque};

use super::block_hash::BlockHash;
use super::kv_manager::KvManager;
use super::sequence::Sequence;

pub struct SchedulerLimits {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
}

/// One running sequence's share of a step.
#[derive(Clone, Copy, Debug)]
pub struct Scheduled {
    /// Index into `Scheduler::running`.
    pub index: usize,
    pub num_tokens: usize,
}

#[derive(Default)]
pub struct Scheduler {
    pub waiting: VecDeque<Sequence>,
    pub running: Vec<Sequence>,
    pub num_preemptions: u64,
}

impl Scheduler {
    /// Fills `out` with this step's work. Sequences may move between the queues.
    pub fn schedule(
        &mut self,
        limits: &SchedulerLimits,
        kv: &mut KvManager,
        now: std::time::Instant,
        out: &mut Vec<Scheduled>,
    ) {
        out.clear();
        let mut budget = limits.max_num_batched_tokens;
        let mut preempted_any = false;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let want = self.running[i].pending().min(budget);
            loop {
                let seq = &mut self.running[i];
                let target = seq.num_computed + want;
                if kv.reserve(&mut seq.blocks, target) {
                    out.push(Scheduled {
                        index: i,
                        num_tokens: want,
                    });
                    budget -= want;
                    i += 1;
                    break;
                }
                // Out of blocks: recompute the most recently admitted sequence later.
                preempted_any = true;
                let victim = self.running.len() - 1;
                self.preempt(victim, kv);
                if victim == i {
                    break; // it was this sequence itself
                }
            }
        }
        // After a preemption the cache is tight: admitting more would only thrash.
        if preempted_any {
            return;
        }
        // Full prompt blocks that running prefills are about to compute: a waiting prompt that
        // needs one of them next waits a step and then hits the cache instead of computing
        // the same block again (a burst sharing one system prompt computes it once).
        let mut inflight = HashSet::new();
        for seq in self.running.iter().filter(|s| s.is_prefilling()) {
            kv.pending_hashes(&seq.blocks, &seq.tokens, seq.prompt_len, &mut inflight);
        }
        let mut pos = 0;
        while budget > 0 && self.running.len() < limits.max_num_seqs && pos < self.waiting.len() {
            if !self.may_start(&self.waiting[pos]) {
                pos += 1;
                continue;
            }
            let Some(mut seq) = self.waiting.remove(pos) else {
                break;
            };
            // A prompt being scored is computed whole: a cached block has K/V but no logits.
            if seq.num_computed == 0 && !seq.scores_prompt() {
                let (hit, miss) = self.claim_cached(&mut seq, kv);
                if miss.is_some_and(|h| inflight.contains(&h)) {
                    kv.unclaim(&mut seq.blocks, seq.tokens.len(), hit);
                    self.waiting.insert(pos, seq);
                    pos += 1;
                    continue;
                }
                seq.num_computed = hit;
                if seq.timings.first_scheduled.is_none() {
                    seq.cached_prompt_tokens = hit;
                }
            }
            let want = seq.pending().min(budget);
            if !kv.reserve(&mut seq.blocks, seq.num_computed + want) {
                kv.free(&mut seq.blocks);
                seq.num_computed = 0;
                self.waiting.insert(pos, seq);
                break;
            }
            kv.pending_hashes(&seq.blocks, &seq.tokens, seq.prompt_len, &mut inflight);
            seq.timings.first_scheduled.get_or_insert(now);
            budget -= want;
            out.push(Scheduled {
                index: self.running.len(),
                num_tokens: want,
            });
            self.running.push(seq);
        }
    }

    /// FCFS, except that a forked choice waits (without blocking those behind it) until its
    /// parent's prompt is in the cache.
    fn may_start(&self, seq: &Sequence) -> bool {
        match seq.fork_parent {
            None => true,
            Some(parent) => self.parent_state(parent) != ParentState::Prefilling,
        }
    }

    fn parent_state(&self, parent: u64) -> ParentState {
        if let Some(p) = self.running.iter().find(|s| s.id == parent) {
            if p.is_prefilling() {
                ParentState::Prefilling
            } else {
                ParentState::Ready
            }
        } else if self.waiting.iter().any(|s| s.id == parent) {
            ParentState::Prefilling
        } else {
            ParentState::Gone
        }
    }

    /// Blocks a new sequence can start from: its parent's full prompt blocks, or else the
    /// longest cached prefix.
    fn claim_cached(&self, seq: &mut Sequence, kv: &mut KvManager) -> (usize, Option<BlockHash>) {
        if let Some(parent) = seq.fork_parent {
            if let Some(p) = self
                .running
                .iter()
                .find(|s| s.id == parent && !s.is_prefilling())
            {
                let full = (seq.prompt_len - 1) / kv.block_size();
                return (kv.fork_prefix(&mut seq.blocks, &p.blocks, full), None);
            }
        }
        kv.claim_prefix_or_miss(&mut seq.blocks, &seq.tokens)
    }

    fn preempt(&mut self, index: usize, kv: &mut KvManager) {
        let mut seq = self.running.remove(index);
        kv.free(&mut seq.blocks);
        seq.num_computed = 0;
        self.num_preemptions += 1;
        self.waiting.push_front(seq);
    }
}

#[derive(PartialEq, Eq)]
enum ParentState {
    Prefilling,
    Ready,
    Gone,
}
