//! The engine end to end on real models, driven step by step: correctness under random
//! arrivals, cancellations and a tiny cache; preemption; prefix caching; seeded sampling;
//! prompt scores. Forced tokens and constraints: `tests/engine_steering.rs`.

mod common;

use common::engine_run::{alone, assert_all_free, config, decoder, drain, greedy, run_all, Log};
use common::golden;
use distillery::config::EngineConfig;
use distillery::engine::{
    self, Delivery, EngineCore, EngineEvent, EngineRequest, FinishReason, RequestStream,
    SamplingParams,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

#[derive(Debug, Clone)]
struct Arrival {
    prompt: Vec<u32>,
    max_tokens: usize,
    at_step: usize,
    cancel_at: Option<usize>,
}

fn arrival() -> impl Strategy<Value = Arrival> {
    (
        proptest::collection::vec(5u32..512, 1..40),
        1usize..12,
        0usize..8,
        proptest::option::weighted(0.25, 0usize..12),
    )
        .prop_map(|(prompt, max_tokens, at_step, cancel_at)| Arrival {
            prompt,
            max_tokens,
            at_step,
            cancel_at,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random arrivals, lengths and cancellations through a deliberately tiny cache: every
    /// block comes back, every surviving request finishes exactly once, and greedy outputs equal
    /// those of the request run alone.
    #[test]
    fn random_traffic_through_a_tiny_cache(
        arrivals in proptest::collection::vec(arrival(), 1..10),
        block_size in prop::sample::select(vec![1usize, 4, 16]),
        spare_blocks in 0usize..6,
        max_seqs in 1usize..6,
        budget in 16usize..64,
        prefix in any::<bool>(),
    ) {
        let Some(dec) = decoder("tiny-llama-v512") else { return Ok(()) };
        let biggest = arrivals
            .iter()
            .map(|a| (a.prompt.len() + a.max_tokens).div_ceil(block_size))
            .max()
            .unwrap_or(1);
        let mut core = engine::build(
            dec.clone(),
            &config(biggest + spare_blocks, block_size, max_seqs, budget, prefix),
        )
        .unwrap();
        let mut streams: Vec<Option<RequestStream>> = arrivals.iter().map(|_| None).collect();
        let mut logs = vec![Log::default(); arrivals.len()];
        let mut step = 0;
        loop {
            for (i, a) in arrivals.iter().enumerate() {
                if a.at_step == step {
                    streams[i] = Some(core.submit(greedy(&a.prompt, a.max_tokens)).unwrap());
                }
                if a.cancel_at == Some(step) {
                    streams[i] = None;
                }
            }
            let pending_arrivals = arrivals.iter().any(|a| a.at_step > step);
            if !core.has_work() && !pending_arrivals {
                break;
            }
            core.step();
            for (s, l) in streams.iter_mut().zip(&mut logs) {
                if let Some(s) = s {
                    drain(s, l);
                }
            }
            step += 1;
            prop_assert!(step < 50_000, "no progress");
        }
        assert_all_free(&core);
        for (i, a) in arrivals.iter().enumerate() {
            if streams[i].is_none() {
                // Cancelled: it may have finished before the drop, but never twice.
                prop_assert!(logs[i].finishes.len() <= 1);
                continue;
            }
            prop_assert_eq!(logs[i].finishes.len(), 1, "request {} finishes: {:?}", i, logs[i]);
            prop_assert_eq!(logs[i].errors, 0);
            let got = logs[i].tokens.first().cloned().unwrap_or_default();
            prop_assert_eq!(got, alone(&dec, &a.prompt, a.max_tokens), "request {}", i);
        }
    }
}

/// Prompts from a few shared prefixes (so blocks are hit, shared and evicted) with random
/// tails.
fn shared_prefix_arrival() -> impl Strategy<Value = Arrival> {
    (
        0usize..3,
        proptest::collection::vec(5u32..512, 0..20),
        arrival(),
    )
        .prop_map(|(prefix, tail, a)| {
            let mut prompt: Vec<u32> = (0..12).map(|i| 7 + prefix as u32 * 40 + i).collect();
            prompt.extend(tail);
            Arrival { prompt, ..a }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// A mirror of the prefix cache built only from the KV events (stores insert, removals
    /// delete) equals the engine's own index after every step, through hits, evictions,
    /// preemption, cancellations and a flush. A store is never of a hash already held, a
    /// removal never of one not held, and each stored hash is the one its parent and token
    /// ids give in vLLM's scheme.
    #[test]
    fn kv_events_mirror_the_prefix_cache(
        arrivals in proptest::collection::vec(shared_prefix_arrival(), 1..10),
        block_size in prop::sample::select(vec![1usize, 4]),
        spare_blocks in 0usize..8,
        max_seqs in 1usize..6,
    ) {
        let Some(dec) = decoder("tiny-llama-v512") else { return Ok(()) };
        let biggest = arrivals
            .iter()
            .map(|a| (a.prompt.len() + a.max_tokens).div_ceil(block_size))
            .max()
            .unwrap_or(1);
        let mut core = engine::build(
            dec.clone(),
            &config(biggest + spare_blocks, block_size, max_seqs, 32, true),
        )
        .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        core.set_kv_event_sink(tx);
        let hasher = engine::BlockHasher::new("0");
        let mut mirror = std::collections::HashSet::new();
        let apply = |rx: &mut tokio::sync::mpsc::UnboundedReceiver<engine::KvEventBatch>,
                         mirror: &mut std::collections::HashSet<engine::BlockHash>|
         -> Result<(), TestCaseError> {
            while let Ok(batch) = rx.try_recv() {
                for event in batch.events {
                    match event {
                        engine::KvEvent::Stored { hashes, parent, token_ids } => {
                            prop_assert_eq!(token_ids.len(), hashes.len() * block_size);
                            let mut prev = parent;
                            for (h, block) in hashes.iter().zip(token_ids.chunks(block_size)) {
                                prop_assert_eq!(*h, hasher.hash(prev.as_ref(), block));
                                prop_assert!(mirror.insert(*h), "stored twice");
                                prev = Some(*h);
                            }
                        }
                        engine::KvEvent::Removed { hashes } => {
                            for h in hashes {
                                prop_assert!(mirror.remove(&h), "removed but never stored");
                            }
                        }
                    }
                }
            }
            Ok(())
        };
        let same = |core: &EngineCore, mirror: &std::collections::HashSet<engine::BlockHash>| {
            let mut held = core.indexed_block_hashes();
            held.sort_unstable();
            let mut seen: Vec<_> = mirror.iter().copied().collect();
            seen.sort_unstable();
            held == seen
        };
        let mut streams: Vec<Option<RequestStream>> = arrivals.iter().map(|_| None).collect();
        let mut step = 0;
        loop {
            for (i, a) in arrivals.iter().enumerate() {
                if a.at_step == step {
                    streams[i] = Some(core.submit(greedy(&a.prompt, a.max_tokens)).unwrap());
                }
                if a.cancel_at == Some(step) {
                    streams[i] = None;
                }
            }
            let pending_arrivals = arrivals.iter().any(|a| a.at_step > step);
            if !core.has_work() && !pending_arrivals {
                break;
            }
            core.step();
            apply(&mut rx, &mut mirror)?;
            prop_assert!(same(&core, &mirror), "after step {}", step);
            step += 1;
            prop_assert!(step < 50_000, "no progress");
        }
        core.reset_prefix_cache();
        apply(&mut rx, &mut mirror)?;
        prop_assert!(mirror.is_empty(), "a flush with nothing running empties the index");
        prop_assert!(same(&core, &mirror));
    }
}

/// A cache holding about half the concurrent work: sequences get preempted and recomputed,
/// and every output still equals the transformers golden.
#[test]
fn preemption_keeps_outputs_equal_to_goldens() {
    let (Some(dec), Some(golden)) = (decoder("tiny-llama-v512"), golden("tiny-llama-v512")) else {
        return;
    };
    let needed: usize = golden.cases.iter().map(|c| c.prompt_ids.len() + 32).sum();
    let biggest = golden
        .cases
        .iter()
        .map(|c| c.prompt_ids.len() + 32)
        .max()
        .unwrap();
    let blocks = biggest.div_ceil(16) + 2;
    assert!(
        blocks * 16 < needed / 2 + 64,
        "the cache must hold only a fraction of the work"
    );
    let mut core = engine::build(dec, &config(blocks, 16, 16, 512, true)).unwrap();
    let reqs = golden
        .cases
        .iter()
        .map(|c| greedy(&c.prompt_ids, 32))
        .collect();
    let logs = run_all(&mut core, reqs);
    assert!(
        core.stats().num_preemptions > 0,
        "the test must actually preempt"
    );
    for (case, log) in golden.cases.iter().zip(&logs) {
        assert_eq!(log.finishes, vec![FinishReason::Length], "{}", case.name);
        assert_eq!(log.tokens[0], case.generated_ids, "{}", case.name);
    }
    assert_all_free(&core);
}

/// 100 requests sharing a 64-token system prompt: its four blocks are computed once, and
/// outputs equal those with prefix caching off.
#[test]
fn shared_system_prompt_is_computed_once() {
    let Some(dec) = decoder("tiny-llama-v512") else {
        return;
    };
    let system: Vec<u32> = (0..64).map(|i| 5 + (i * 37) % 500).collect();
    let prompts: Vec<Vec<u32>> = (0..100u32)
        .map(|r| {
            let mut p = system.clone();
            p.extend((0..10).map(|i| 5 + (r * 13 + i * 7) % 500));
            p
        })
        .collect();
    let run = |prefix: bool| {
        let mut core = engine::build(dec.clone(), &config(2048, 16, 256, 4096, prefix)).unwrap();
        let logs = run_all(&mut core, prompts.iter().map(|p| greedy(p, 8)).collect());
        (logs, core.stats())
    };
    let (cached, st) = run(true);
    let (plain, st_plain) = run(false);
    assert_eq!(st.computed_prompt_tokens, 64 + 100 * 10, "{st:?}");
    assert_eq!(st_plain.computed_prompt_tokens, 100 * 74);
    assert_eq!(st.prefix_cache_hits, 99 * 64);
    for (a, b) in cached.iter().zip(&plain) {
        assert_eq!(a.tokens, b.tokens);
    }
}

/// A seeded sampled request yields the same tokens alone and inside a busy batch.
#[test]
fn seeded_sampling_is_independent_of_the_batch() {
    let Some(dec) = decoder("tiny-random-llama") else {
        return;
    };
    let seeded = |seed: u64| EngineRequest {
        params: SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            top_k: 50,
            seed: Some(seed),
            ..SamplingParams::default()
        },
        ..greedy(&[1, 450, 4996, 17354, 1701, 432], 24)
    };
    let mut core = engine::build(dec.clone(), &config(256, 16, 64, 2048, true)).unwrap();
    let solo = run_all(&mut core, vec![seeded(7)]);
    let mut reqs: Vec<EngineRequest> = (0..20)
        .map(|i| EngineRequest {
            params: SamplingParams {
                temperature: 0.8,
                seed: Some(100 + i),
                ..SamplingParams::default()
            },
            ..greedy(&[1, 100 + i as u32, 200, 300], 30)
        })
        .collect();
    reqs.insert(7, seeded(7));
    let busy = run_all(&mut core, reqs);
    assert_eq!(solo[0].tokens, busy[7].tokens);
    let other = run_all(&mut core, vec![seeded(8)]);
    assert_ne!(
        solo[0].tokens, other[0].tokens,
        "a different seed should differ"
    );
}

/// n = 2 choices share the prompt's blocks and both finish.
#[test]
fn n_choices_share_the_prompt() {
    let Some(dec) = decoder("tiny-llama-v512") else {
        return;
    };
    let mut core = engine::build(dec, &config(64, 4, 8, 256, false)).unwrap();
    let mut req = greedy(&(5..45).collect::<Vec<u32>>(), 6);
    req.n = 3;
    let logs = run_all(&mut core, vec![req]);
    assert_eq!(logs[0].finishes.len(), 3);
    assert_eq!(logs[0].tokens.len(), 3);
    assert_eq!(logs[0].tokens[0], logs[0].tokens[1], "greedy choices agree");
    // 40 prompt tokens: the first choice computes them all, the others only the last block.
    assert_eq!(core.stats().computed_prompt_tokens, 40 + 2 * 4);
    assert_all_free(&core);
}

/// Stop conditions: EOS ends with `stop` unless ignored; min_tokens holds EOS back.
#[test]
fn eos_and_min_tokens() {
    let Some(dec) = decoder("tiny-llama-v512") else {
        return;
    };
    let mut core = engine::build(dec.clone(), &config(64, 16, 8, 256, true)).unwrap();
    let prompt = [0u32, 40, 41, 42];
    let free_run = alone(&dec, &prompt, 6);
    // Make the 3rd greedy token a stop token: the choice ends there, without showing it.
    let mut req = greedy(&prompt, 6);
    req.stop.stop_token_ids = vec![free_run[2]];
    req.stop.ignore_eos = false;
    let logs = run_all(&mut core, vec![req.clone()]);
    let first = free_run.iter().position(|t| *t == free_run[2]).unwrap();
    assert_eq!(logs[0].tokens[0], free_run[..first].to_vec());
    assert_eq!(logs[0].finishes, vec![FinishReason::Stop]);
    // With min_tokens beyond that point the stop token is masked and never chosen early.
    req.stop.min_tokens = 6;
    let logs = run_all(&mut core, vec![req]);
    assert_eq!(logs[0].finishes, vec![FinishReason::Length]);
    assert!(!logs[0].tokens[0].contains(&free_run[2]));
}

/// Two engine replicas behind one handle: requests spread over both, each answer equals the
/// one a lone engine gives, and the handle's figures add the replicas' up.
#[test]
fn replicas_share_the_load_and_agree_with_a_single_engine() {
    let Some(dec) = decoder("tiny-llama-v512") else {
        return;
    };
    let prompts: Vec<Vec<u32>> = (0..24u32)
        .map(|i| {
            (0..5 + i % 7)
                .map(|t| 3 + (i * 31 + t * 17) % 500)
                .collect()
        })
        .collect();
    let handle = engine::spawn(
        dec.clone(),
        &EngineConfig {
            data_parallel_size: 2,
            ..config(512, 16, 8, 256, true)
        },
    )
    .expect("replicas start");
    assert_eq!(handle.num_replicas(), 2);
    assert_eq!(
        handle.limits().cache_tokens,
        256 * 16,
        "each replica holds its share of the blocks"
    );
    let mut streams: Vec<RequestStream> = prompts
        .iter()
        .map(|p| handle.submit(greedy(p, 6)).expect("admitted"))
        .collect();
    for (prompt, stream) in prompts.iter().zip(&mut streams) {
        let mut tokens = Vec::new();
        let mut finishes = 0;
        while let Some(ev) = stream.blocking_recv() {
            match ev {
                EngineEvent::Token { token, .. } => tokens.push(token),
                EngineEvent::Finished { .. } => finishes += 1,
                EngineEvent::Error { message } => panic!("engine error: {message}"),
                EngineEvent::PromptLogprobs { .. } => {}
            }
        }
        assert_eq!(finishes, 1);
        assert_eq!(tokens, alone(&dec, prompt, 6), "prompt {prompt:?}");
    }
    let per_replica = handle.replica_stats();
    let submitted: u64 = prompts.iter().map(|p| p.len() as u64).sum();
    assert_eq!(
        per_replica.iter().map(|s| s.prompt_tokens).sum::<u64>(),
        submitted
    );
    assert!(
        per_replica.iter().all(|s| s.prompt_tokens > 0),
        "every replica took requests: {per_replica:?}"
    );
    assert_eq!(handle.stats().prompt_tokens, submitted);
}

/// `Delivery::AtFinish` sends a choice's first token at once, nothing more while it runs, then
/// the rest of the same tokens as `EachToken` (with their sampling times) just before the one
/// `Finished`.
#[test]
fn at_finish_delivery_holds_tokens_until_the_choice_ends() {
    let Some(dec) = decoder("tiny-llama-v512") else {
        return;
    };
    let prompt = [0, 17, 300, 42, 9, 111];
    let expected = alone(&dec, &prompt, 12);
    let mut core = engine::build(dec, &config(64, 16, 4, 256, false)).unwrap();
    let mut stream = core
        .submit(EngineRequest {
            n: 2,
            delivery: Delivery::AtFinish,
            ..greedy(&prompt, 12)
        })
        .unwrap();
    let mut events = Vec::new();
    // Per choice, how many of its events arrived after each step that brought any.
    let mut bursts = vec![Vec::new(); 2];
    while core.has_work() {
        core.step();
        let mut counts = [0usize; 2];
        while let Some(ev) = stream.try_recv() {
            let choice = match &ev {
                EngineEvent::Token { choice, .. } | EngineEvent::Finished { choice, .. } => *choice,
                EngineEvent::Error { message } => panic!("{message}"),
                EngineEvent::PromptLogprobs { .. } => continue,
            };
            counts[choice] += 1;
            events.push(ev);
        }
        for (c, &n) in counts.iter().enumerate() {
            if n > 0 {
                bursts[c].push(n);
            }
        }
    }
    // Each choice: its first token alone, then its other 11 with its `Finished`.
    assert_eq!(bursts, vec![vec![1, 12]; 2]);
    let mut tokens = vec![Vec::new(); 2];
    let mut times = vec![Vec::new(); 2];
    let mut finished = 0;
    for ev in events {
        match ev {
            EngineEvent::Token {
                choice, token, at, ..
            } => {
                tokens[choice].push(token);
                times[choice].push(at);
            }
            EngineEvent::Finished { .. } => finished += 1,
            EngineEvent::Error { message } => panic!("{message}"),
            EngineEvent::PromptLogprobs { .. } => {}
        }
    }
    assert_eq!(finished, 2);
    assert_eq!(tokens, vec![expected.clone(), expected]);
    for t in &times {
        assert!(t.windows(2).all(|w| w[0] < w[1]), "sampled one step apart");
    }
}

/// Per scored position: the token, its logprob and the top ids of the row that scored it.
type Scores = Vec<(u32, f32, Vec<u32>)>;

/// Runs `reqs` to the end; per request its prompt scores (one event at most, before any
/// token) and its tokens.
fn scores_of(
    core: &mut EngineCore,
    reqs: Vec<EngineRequest>,
) -> (Vec<Option<Scores>>, Vec<Vec<u32>>) {
    let mut streams: Vec<RequestStream> = reqs
        .into_iter()
        .map(|r| core.submit(r).expect("admitted"))
        .collect();
    let mut out: Vec<Option<Scores>> = vec![None; streams.len()];
    let mut tokens = vec![Vec::new(); streams.len()];
    loop {
        let more = core.has_work();
        if more {
            core.step();
        }
        for (i, s) in streams.iter_mut().enumerate() {
            while let Some(ev) = s.try_recv() {
                match ev {
                    EngineEvent::PromptLogprobs { scored, .. } => {
                        assert!(out[i].is_none(), "request {i}: scores sent twice");
                        assert!(tokens[i].is_empty(), "scores come before tokens");
                        let row = |p: &engine::PromptLogprob| {
                            (p.token, p.logprob, p.top.iter().map(|t| t.0).collect())
                        };
                        out[i] = Some(scored.iter().map(row).collect());
                    }
                    EngineEvent::Token { token, .. } => tokens[i].push(token),
                    EngineEvent::Error { message } => panic!("{message}"),
                    EngineEvent::Finished { .. } => {}
                }
            }
        }
        if !more {
            return (out, tokens);
        }
    }
}

/// `params.prompt_logprobs`: every prompt token after the first is scored once, in order, by
/// the row before it — the same alone in one chunk, in small chunks, and under preemption
/// beside requests that score nothing (whose outputs stay the goldens). The scores agree with
/// transformers: a golden's prompt followed by its greedy continuation is scored with each
/// continuation token as its position's top-1.
#[test]
fn prompt_scores_survive_chunking_and_preemption_and_match_the_goldens() {
    let (Some(dec), Some(golden)) = (decoder("tiny-llama-v512"), golden("tiny-llama-v512")) else {
        return;
    };
    let scored = |prompt: &[u32]| {
        let mut r = greedy(prompt, 1);
        r.params.prompt_logprobs = Some(2);
        r
    };
    let case = &golden.cases[0];
    let full: Vec<u32> = case
        .prompt_ids
        .iter()
        .chain(&case.generated_ids)
        .copied()
        .collect();
    let mut one_chunk = engine::build(dec.clone(), &config(256, 16, 4, 4096, true)).unwrap();
    let (reference, _) = scores_of(&mut one_chunk, vec![scored(&full)]);
    let reference = reference[0].clone().expect("scored");
    assert_eq!(reference.len(), full.len() - 1);
    for (pos, (token, lp, top)) in reference.iter().enumerate() {
        assert_eq!(*token, full[pos + 1]);
        assert!(*lp <= 0.0);
        if pos + 1 >= case.prompt_ids.len() {
            let step = pos + 1 - case.prompt_ids.len();
            assert_eq!(
                top[0], case.generated_ids[step],
                "continuation token {step} is top-1"
            );
        }
    }
    assert_all_free(&one_chunk);
    // The same in chunks of 8 tokens, with the same prompt cached by the first run: the
    // scored request skips the cache and computes (and scores) every position.
    let mut chunked = engine::build(dec.clone(), &config(256, 16, 4, 8, true)).unwrap();
    let _ = run_all(&mut chunked, vec![greedy(&full, 1)]);
    let (again, _) = scores_of(&mut chunked, vec![scored(&full)]);
    let close = |a: &Scores, b: &Scores, what: &str| {
        assert_eq!(a.len(), b.len(), "{what}");
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x.0, y.0, "{what}");
            assert!((x.1 - y.1).abs() < 1e-4, "{what}: {} vs {}", x.1, y.1);
        }
    };
    close(&again[0].clone().expect("scored"), &reference, "chunked");
    // One token a step: every chunk of the prompt is a single row, and each is scored.
    let mut one_by_one = engine::build(dec.clone(), &config(256, 16, 1, 1, true)).unwrap();
    let (single, _) = scores_of(&mut one_by_one, vec![scored(&full)]);
    close(
        &single[0].clone().expect("scored"),
        &reference,
        "one token a step",
    );
    // Under preemption, beside the goldens' requests (which score nothing).
    let biggest = golden
        .cases
        .iter()
        .map(|c| c.prompt_ids.len() + 32)
        .chain([full.len() + 1])
        .max()
        .unwrap_or(0);
    let blocks = biggest.div_ceil(16) + 2;
    let mut tight = engine::build(dec, &config(blocks, 16, 16, 64, true)).unwrap();
    let mut reqs: Vec<EngineRequest> = golden
        .cases
        .iter()
        .map(|c| greedy(&c.prompt_ids, 32))
        .collect();
    reqs.insert(1, scored(&full));
    let (out, tokens) = scores_of(&mut tight, reqs);
    assert!(
        tight.stats().num_preemptions > 0,
        "the test must actually preempt"
    );
    close(&out[1].clone().expect("scored"), &reference, "preempted");
    let others: Vec<&Vec<u32>> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 1)
        .map(|(_, t)| t)
        .collect();
    for (c, t) in golden.cases.iter().zip(others) {
        assert_eq!(t, &c.generated_ids, "{}", c.name);
    }
    assert!(out.iter().enumerate().all(|(i, o)| (i == 1) == o.is_some()));
    assert_all_free(&tight);
}
