//! Engine throughput without HTTP: 2000 customer-service requests (one shared 40-token system
//! prompt, a 15-token question, 16 output tokens; 32 on bench-llama-25m) pushed through the
//! engine thread at once, after one warm-up pass of the same size. Prints requests/s and
//! output tokens/s per model and pass. `DISTILLERY_DATA_PARALLEL_SIZE=N` runs N replicas.
//! `cargo bench --bench engine [-- MODEL...]`

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use distillery::config::EngineConfig;
use distillery::engine::{
    self, Delivery, EngineEvent, EngineRequest, SamplingParams, StopConditions,
};
use distillery::model::{self, DTypeChoice};

const REQUESTS: usize = 2000;
/// Measured passes, after one warm-up pass.
const PASSES: usize = 3;

/// The daemon's allocator, so that allocation costs here are the daemon's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Request `i` of a pass. Each pass has its own system prompt, so nothing it computes is in
/// the prefix cache from an earlier pass and every pass repeats the same work.
fn prompt(pass: usize, i: usize, vocab: u32) -> Vec<u32> {
    let system = (0..40u32).map(|t| 5 + (t * 37 + pass as u32 * 11) % (vocab - 10));
    let question = (0..15u32).map(|t| 5 + ((i as u32 * 7919 + t * 104_729) % (vocab - 10)));
    system.chain(question).collect()
}

fn run(name: &str, max_tokens: usize) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/models")
        .join(name);
    if !dir.is_dir() {
        eprintln!("!!! SKIPPING {name}: {} not found !!!", dir.display());
        return;
    }
    let decoder = model::load_decoder(&dir, DTypeChoice::F32, &Device::Cpu).expect("model loads");
    let vocab = decoder.config().vocab_size as u32;
    let config = EngineConfig {
        data_parallel_size: replicas(),
        ..EngineConfig::default()
    };
    let handle = engine::spawn(decoder, &config).expect("engine starts");
    // Pass 0 warms up (first touch of the KV pages, allocator pools) and is not reported.
    for pass in 0..=PASSES {
        let before = handle.stats();
        let requests: Vec<EngineRequest> = (0..REQUESTS)
            .map(|i| EngineRequest {
                prompt_ids: Arc::from(prompt(pass, i, vocab)),
                params: SamplingParams::default(),
                stop: StopConditions {
                    max_tokens,
                    ignore_eos: true,
                    ..Default::default()
                },
                n: 1,
                arrival: Instant::now(),
                delivery: Delivery::AtFinish,
                steer: None,
                constraint: None,
            })
            .collect();
        let start = Instant::now();
        let mut streams: Vec<_> = requests
            .into_iter()
            .map(|r| handle.submit(r).expect("admitted"))
            .collect();
        let mut tokens = 0usize;
        for s in &mut streams {
            while let Some(ev) = s.blocking_recv() {
                if let EngineEvent::Token { .. } = ev {
                    tokens += 1;
                }
            }
        }
        let secs = start.elapsed().as_secs_f64();
        if pass == 0 {
            continue;
        }
        let st = handle.stats();
        println!(
            "{name:18} pass {pass}: {REQUESTS} req x {max_tokens} tok: {:8.0} req/s {:9.0} output \
             tok/s  ({:.2} s, {} replicas, {} steps, prompt tokens computed {} of {})",
            REQUESTS as f64 / secs,
            tokens as f64 / secs,
            secs,
            handle.num_replicas(),
            st.steps - before.steps,
            st.computed_prompt_tokens - before.computed_prompt_tokens,
            st.prompt_tokens - before.prompt_tokens,
        );
    }
}

/// Engine replicas: `DISTILLERY_DATA_PARALLEL_SIZE`, as the daemon reads it (default 1).
fn replicas() -> usize {
    std::env::var("DISTILLERY_DATA_PARALLEL_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

fn main() {
    // As the daemon does: spare candle from re-reading /proc and /sys on every matmul, and
    // give each engine replica its share of the cores.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", (n / replicas()).max(1).to_string());
    }
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    for (name, max_tokens) in [
        ("tiny-llama-v512", 16),
        ("tiny-random-llama", 16),
        ("bench-llama-25m", 32),
    ] {
        if wanted.is_empty() || wanted.iter().any(|w| w == name) {
            run(name, max_tokens);
        }
    }
}
