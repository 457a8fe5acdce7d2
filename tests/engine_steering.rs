//! The engine's steering seams on a real model, driven step by step: forced tokens (a
//! `Steer`, as the reasoning budget uses) and constraints (a `Constraint`, as structured
//! output uses): emitted, scored, cached, kept through preemption.

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::engine_run::{alone, assert_all_free, config, decoder, greedy, run_all};
use distillery::engine::{self, EngineEvent, EngineRequest, FinishReason, SamplingParams};

/// Queues `then` once, right after the choice's output reaches `after` tokens.
struct ForceAt {
    after: usize,
    seen: usize,
    then: Vec<u32>,
}

impl engine::Steer for ForceAt {
    fn observe(&mut self, _token: u32, forced: &mut std::collections::VecDeque<u32>) {
        self.seen += 1;
        if self.seen == self.after {
            forced.extend(self.then.drain(..));
        }
    }
}

fn force_at(after: usize, then: Vec<u32>) -> engine::SteerFactory {
    Arc::new(move |_| {
        Box::new(ForceAt {
            after,
            seen: 0,
            then: then.clone(),
        })
    })
}

/// Forced tokens bypass the sampler and are output like sampled ones: flagged as forced,
/// scored with the model's own logprob, written to the KV cache (what follows them is the
/// model's greedy continuation of the prompt with them), each choice of `n > 1` on its own,
/// and kept through preemption by recompute.
#[test]
fn forced_tokens_are_emitted_scored_and_cached() {
    let Some(dec) = decoder("tiny-llama-v512") else {
        return;
    };
    let prompt = [0u32, 17, 300, 42, 9, 111];
    let with_logprobs = |req: EngineRequest| EngineRequest {
        params: SamplingParams {
            logprobs: Some(5),
            ..SamplingParams::default()
        },
        ..req
    };
    // The model's second choice at the second position: a token greedy decoding never takes.
    let mut core = engine::build(dec.clone(), &config(256, 16, 8, 2048, true)).unwrap();
    let mut probe = core.submit(with_logprobs(greedy(&prompt, 2))).unwrap();
    while core.has_work() {
        core.step();
    }
    let mut scored = Vec::new();
    while let Some(ev) = probe.try_recv() {
        if let EngineEvent::Token {
            token, logprobs, ..
        } = ev
        {
            scored.push((token, logprobs.expect("asked for")));
        }
    }
    let first = scored[0].0;
    let (runner_up, runner_up_logprob) = scored[1].1.top[1];
    assert_ne!(runner_up, scored[1].0);

    let forced = vec![runner_up, 42];
    let mut stream = core
        .submit(EngineRequest {
            steer: Some(force_at(1, forced.clone())),
            constraint: None,
            ..with_logprobs(greedy(&prompt, 6))
        })
        .unwrap();
    while core.has_work() {
        core.step();
    }
    let mut out = Vec::new();
    while let Some(ev) = stream.try_recv() {
        if let EngineEvent::Token {
            token,
            logprobs,
            forced,
            ..
        } = ev
        {
            out.push((token, forced, logprobs.expect("asked for").logprob));
        }
    }
    let tokens: Vec<u32> = out.iter().map(|t| t.0).collect();
    let flags: Vec<bool> = out.iter().map(|t| t.1).collect();
    assert_eq!(flags, [false, true, true, false, false, false]);
    let mut fed = prompt.to_vec();
    fed.extend([first, runner_up, 42]);
    let mut expected = vec![first, runner_up, 42];
    expected.extend(alone(&dec, &fed, 3));
    assert_eq!(tokens, expected, "the continuation sees the forced tokens");
    assert!(
        (out[1].2 - runner_up_logprob).abs() < 1e-5,
        "a forced token's logprob is the model's: {} vs {runner_up_logprob}",
        out[1].2
    );
    assert_all_free(&core);

    // n = 2 and a cache so small that sequences are preempted: the same tokens per choice.
    let mut tight = engine::build(dec.clone(), &config(6, 4, 8, 2048, true)).unwrap();
    let reqs = (0..4)
        .map(|_| EngineRequest {
            n: 2,
            steer: Some(force_at(1, forced.clone())),
            constraint: None,
            ..greedy(&prompt, 6)
        })
        .collect();
    let logs = run_all(&mut tight, reqs);
    assert!(
        tight.stats().num_preemptions > 0,
        "the cache was tight enough"
    );
    for log in logs {
        assert_eq!(log.tokens, vec![expected.clone(), expected.clone()]);
    }
    assert_all_free(&tight);
}

/// Without logprobs a forced run jumps forward: it goes out in the step that queued it and the
/// next forward writes it to the cache as one chunk. The tokens are those of one token a step
/// (the logprobs run), in fewer steps; a run longer than `max_tokens` allows is cut there.
#[test]
fn a_forced_run_goes_out_at_once_and_is_cached_as_a_chunk() {
    let Some(dec) = decoder("tiny-llama-v512") else {
        return;
    };
    let prompt = [0u32, 17, 300, 42, 9, 111];
    let forced = vec![5u32, 77, 300, 42, 9, 200, 3];
    let run_with = |params: SamplingParams, max_tokens: usize| {
        let mut core = engine::build(dec.clone(), &config(64, 4, 8, 2048, true)).unwrap();
        let mut stream = core
            .submit(EngineRequest {
                params,
                steer: Some(force_at(2, forced.clone())),
                ..greedy(&prompt, max_tokens)
            })
            .unwrap();
        while core.has_work() {
            core.step();
        }
        let mut out = Vec::new();
        let mut finished = None;
        while let Some(ev) = stream.try_recv() {
            match ev {
                EngineEvent::Token {
                    token, at, forced, ..
                } => out.push((token, at, forced)),
                EngineEvent::Finished { reason, .. } => finished = Some(reason),
                EngineEvent::Error { message } => panic!("{message}"),
                EngineEvent::PromptLogprobs { .. } => {}
            }
        }
        assert_all_free(&core);
        (out, core.stats().steps, finished)
    };
    let run = |logprobs: Option<usize>, max_tokens: usize| {
        let params = SamplingParams {
            logprobs,
            ..SamplingParams::default()
        };
        run_with(params, max_tokens)
    };
    let (stepwise, stepwise_steps, _) = run(Some(1), 14);
    let (jumped, jumped_steps, reason) = run(None, 14);
    let tokens = |o: &[(u32, Instant, bool)]| o.iter().map(|t| t.0).collect::<Vec<_>>();
    assert_eq!(tokens(&jumped), tokens(&stepwise));
    assert_eq!(&tokens(&jumped)[2..9], &forced[..]);
    assert_eq!(reason, Some(FinishReason::Length));
    let flags: Vec<bool> = jumped.iter().map(|t| t.2).collect();
    assert_eq!(
        flags,
        [[false; 2].as_slice(), &[true; 7], &[false; 5]].concat()
    );
    // Stepwise: every token a step apart. Jumped: the run leaves with the token that queued it.
    assert!(stepwise.windows(2).all(|w| w[0].1 < w[1].1));
    assert!(jumped[1..9].iter().all(|t| t.1 == jumped[1].1));
    assert!(jumped[8].1 < jumped[9].1);
    // The run rides with the token that queued it and the forward after: no step of its own.
    assert_eq!(stepwise_steps - jumped_steps, 7);

    // max_tokens inside the run: cut there, by length.
    let (cut, _, reason) = run(None, 5);
    assert_eq!(tokens(&cut), tokens(&stepwise)[..5]);
    assert_eq!(reason, Some(FinishReason::Length));

    // Seeded sampling: a forced token takes its draw either way, so the tokens sampled after
    // the run are the same with logprobs (one a step) and without (jumped).
    let seeded = |logprobs| SamplingParams {
        temperature: 1.0,
        seed: Some(7),
        logprobs,
        ..SamplingParams::default()
    };
    let (a, _, _) = run_with(seeded(Some(1)), 14);
    let (b, _, _) = run_with(seeded(None), 14);
    assert_eq!(tokens(&a), tokens(&b));
    assert_eq!(&tokens(&b)[2..9], &forced[..]);
}

/// A constraint that allows `allowed` only, forces `prefix` first, and is complete after
/// `done_after` tokens (forced ones included).
struct Only {
    allowed: Vec<u32>,
    prefix: Vec<u32>,
    done_after: usize,
    seen: Vec<u32>,
}

impl engine::Constraint for Only {
    fn begin(&mut self, forced: &mut std::collections::VecDeque<u32>) -> Result<(), String> {
        forced.extend(&self.prefix);
        Ok(())
    }

    fn is_active(&self) -> bool {
        true
    }

    fn fill_mask(
        &mut self,
        mask: &mut engine::TokenMask,
        _forced: &mut std::collections::VecDeque<u32>,
    ) -> Result<(), String> {
        mask.words.clear();
        for &id in &self.allowed {
            let w = id as usize / 32;
            if mask.words.len() <= w {
                mask.words.resize(w + 1, 0);
            }
            mask.words[w] |= 1 << (id % 32);
        }
        Ok(())
    }

    fn force(&mut self, _forced: &mut std::collections::VecDeque<u32>) -> Result<(), String> {
        Ok(())
    }

    fn allows(&mut self, token: u32) -> Result<bool, String> {
        Ok(self.allowed.contains(&token))
    }

    fn observe(
        &mut self,
        token: u32,
        _forced: &mut std::collections::VecDeque<u32>,
    ) -> Result<engine::Progress, String> {
        let from_prefix = self.seen.len() < self.prefix.len();
        if !from_prefix && !self.allowed.contains(&token) {
            return Err(format!("{token} was not allowed"));
        }
        self.seen.push(token);
        Ok(if self.seen.len() >= self.done_after {
            engine::Progress::Done
        } else {
            engine::Progress::Open
        })
    }
}

fn only(allowed: Vec<u32>, prefix: Vec<u32>, done_after: usize) -> engine::ConstraintFactory {
    Arc::new(move |_| {
        Box::new(Only {
            allowed: allowed.clone(),
            prefix: prefix.clone(),
            done_after,
            seen: Vec::new(),
        })
    })
}

/// The constraint seam: its forced prefix comes first, every sampled token is one it allows
/// (greedy and seeded sampling alike, each choice of `n > 1`, through preemption by
/// recompute), and once it is complete the choice ends with `stop` before `max_tokens`.
#[test]
fn a_constraint_masks_every_sample_forces_its_prefix_and_ends_the_choice() {
    let Some(dec) = decoder("tiny-llama-v512") else {
        return;
    };
    let prompt = [0u32, 17, 300, 42, 9, 111];
    // Tokens the unconstrained greedy continuation does not take, so the mask must act.
    let free = alone(&dec, &prompt, 8);
    let allowed: Vec<u32> = (400..420).filter(|t| !free.contains(t)).collect();
    let sampled = |seed: u64| SamplingParams {
        temperature: 1.0,
        seed: Some(seed),
        ..SamplingParams::default()
    };
    let mut tight = engine::build(dec.clone(), &config(8, 4, 8, 2048, true)).unwrap();
    let reqs: Vec<EngineRequest> = (0..6)
        .map(|i| EngineRequest {
            n: 2,
            params: if i % 2 == 0 {
                SamplingParams::default()
            } else {
                sampled(i)
            },
            constraint: Some(only(allowed.clone(), vec![7, 8], 6)),
            ..greedy(&prompt, 20)
        })
        .collect();
    let logs = run_all(&mut tight, reqs);
    assert!(
        tight.stats().num_preemptions > 0,
        "the cache was tight enough"
    );
    for log in &logs {
        assert_eq!(log.errors, 0);
        assert_eq!(log.finishes, vec![FinishReason::Stop, FinishReason::Stop]);
        for tokens in &log.tokens {
            assert_eq!(tokens.len(), 6, "{tokens:?}");
            assert_eq!(tokens[..2], [7, 8], "the forced prefix first");
            assert!(
                tokens[2..].iter().all(|t| allowed.contains(t)),
                "{tokens:?} leaves {allowed:?}"
            );
        }
    }
    assert_all_free(&tight);
    // Unconstrained requests beside constrained ones are untouched.
    let mut core = engine::build(dec.clone(), &config(256, 16, 8, 2048, true)).unwrap();
    let logs = run_all(
        &mut core,
        vec![
            greedy(&prompt, 8),
            EngineRequest {
                constraint: Some(only(allowed.clone(), vec![], 3)),
                ..greedy(&prompt, 8)
            },
        ],
    );
    assert_eq!(logs[0].tokens[0], free);
    assert_eq!(logs[1].tokens[0].len(), 3);
    assert_all_free(&core);
}
