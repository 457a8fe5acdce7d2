//! Driving an `EngineCore` step by step on a shared model, for the engine's integration tests
//! (`tests/engine.rs`, `tests/engine_steering.rs`): a config, greedy requests, and each
//! request's stream collected into a [`Log`].

use std::sync::Arc;
use std::time::Instant;

use distillery::config::{EngineConfig, KvCacheSize};
use distillery::engine::{
    self, Delivery, EngineCore, EngineEvent, EngineRequest, FinishReason, RequestStream,
    SamplingParams, StopConditions,
};
use distillery::model::{self, DTypeChoice, Decoder};

pub fn decoder(name: &str) -> Option<Decoder> {
    let dir = super::models_dir()?.join(name);
    // DISTILLERY_TEST_DEVICE=cuda runs the engine (and its device-side greedy path) on a GPU.
    let device = super::test_device();
    Some(model::load_decoder(&dir, DTypeChoice::F32, &device).expect("model loads"))
}

pub fn config(
    blocks: usize,
    block_size: usize,
    seqs: usize,
    budget: usize,
    prefix: bool,
) -> EngineConfig {
    EngineConfig {
        block_size,
        max_num_seqs: seqs,
        max_num_batched_tokens: budget,
        kv_cache: KvCacheSize::Blocks(blocks),
        kv_cache_dtype: Default::default(),
        enable_prefix_caching: prefix,
        max_model_len: None,
        data_parallel_size: 1,
        prefix_caching_hash_seed: "0".into(),
    }
}

pub fn greedy(prompt: &[u32], max_tokens: usize) -> EngineRequest {
    EngineRequest {
        prompt_ids: Arc::from(prompt),
        params: SamplingParams::default(),
        stop: StopConditions {
            max_tokens,
            ignore_eos: true,
            ..Default::default()
        },
        n: 1,
        arrival: Instant::now(),
        delivery: Delivery::EachToken,
        steer: None,
        constraint: None,
    }
}

/// What one request's stream said.
#[derive(Default, Debug, Clone)]
pub struct Log {
    pub tokens: Vec<Vec<u32>>,
    pub finishes: Vec<FinishReason>,
    pub errors: usize,
}

pub fn drain(stream: &mut RequestStream, log: &mut Log) {
    while let Some(ev) = stream.try_recv() {
        match ev {
            EngineEvent::Token { choice, token, .. } => {
                if log.tokens.len() <= choice {
                    log.tokens.resize(choice + 1, Vec::new());
                }
                log.tokens[choice].push(token);
            }
            EngineEvent::Finished { reason, .. } => log.finishes.push(reason),
            EngineEvent::Error { .. } => log.errors += 1,
            EngineEvent::PromptLogprobs { .. } => {}
        }
    }
}

/// Runs requests to completion in `core`, all submitted up front.
pub fn run_all(core: &mut EngineCore, reqs: Vec<EngineRequest>) -> Vec<Log> {
    let mut streams: Vec<RequestStream> = reqs
        .into_iter()
        .map(|r| core.submit(r).expect("admitted"))
        .collect();
    let mut logs = vec![Log::default(); streams.len()];
    let mut steps = 0;
    while core.has_work() {
        core.step();
        steps += 1;
        assert!(steps < 100_000, "engine made no progress");
        for (s, l) in streams.iter_mut().zip(&mut logs) {
            drain(s, l);
        }
    }
    for (s, l) in streams.iter_mut().zip(&mut logs) {
        drain(s, l);
    }
    logs
}

pub fn alone(decoder: &Decoder, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let mut core = engine::build(decoder.clone(), &config(512, 16, 1, 4096, false)).unwrap();
    let logs = run_all(&mut core, vec![greedy(prompt, max_tokens)]);
    logs[0].tokens.first().cloned().unwrap_or_default()
}

pub fn assert_all_free(core: &EngineCore) {
    let st = core.stats();
    assert_eq!(st.num_running, 0);
    assert_eq!(st.num_waiting, 0);
    assert_eq!(st.free_blocks, st.total_blocks, "blocks leaked: {st:?}");
}
