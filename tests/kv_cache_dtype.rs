//! `--kv-cache-dtype`: an f32 model on the CPU storing its KV cache in bf16 or f16. Half the
//! bytes per token, so twice the blocks in the same `--kv-cache-memory`; each K/V value is
//! rounded once as it is written, and the drift that causes on the goldens' continuations
//! (teacher-forced, as for quantized weights) stays within a stated bound. The kernels' exact
//! agreement with a reference over the rounded values is `paged_attention`'s unit tests.

mod common;

use candle_core::DType;
use common::drift;
use common::http::{client, ok};
use common::scrape::scrape;
use common::served::Served;
use common::{model_dir, MODELS};
use distillery::model::{self, DTypeChoice};
use serde_json::json;

/// Mean and max |Δ log p| of the golden next token against an f32 cache, about 1.5x the worst
/// of the shared models (measured: bf16 0.0075-0.0133 mean, 0.037-0.074 max; f16
/// 0.0010-0.0016, 0.0053-0.0071).
const BOUNDS: [(DType, f32, f32); 2] = [(DType::BF16, 0.02, 0.11), (DType::F16, 0.0025, 0.011)];

#[test]
fn a_half_precision_cache_drifts_within_its_bound() {
    for name in MODELS {
        let Some(dir) = model_dir(name) else {
            return;
        };
        let decoder = model::load_decoder(&dir, DTypeChoice::F32, &candle_core::Device::Cpu)
            .expect("model loads");
        for (kv, mean_bound, max_bound) in BOUNDS {
            let d = drift::measure(
                name,
                |ids| drift::logprobs(&decoder, ids, DType::F32),
                |ids| drift::logprobs(&decoder, ids, kv),
                2.0 * max_bound,
            );
            eprintln!(
                "{name} {kv:?} cache: mean |Δ log p| {:.5}, max {:.5} over {} positions; greedy \
                 differs at {} of {} clear positions",
                d.mean(),
                d.max,
                d.positions,
                d.greedy_differs,
                d.greedy_checked
            );
            assert!(d.positions > 0, "{name}: no golden positions");
            assert!(
                d.mean() <= mean_bound && d.max <= max_bound,
                "{name} {kv:?}: {d:?}"
            );
            assert_eq!(d.greedy_differs, 0, "{name} {kv:?}: {d:?}");
        }
    }
}

/// The daemon with `--kv-cache-dtype bfloat16` (vLLM's spelling) holds twice the blocks of
/// the f32 cache in the same budget, says so in `cache_config_info`, and serves.
#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_holds_twice_the_blocks_in_bf16() {
    let model = "tiny-llama-v512";
    let (Some(f32_cache), Some(bf16_cache)) = (
        Served::start(model, &[]),
        Served::start(model, &["--kv-cache-dtype", "bfloat16"]),
    ) else {
        return;
    };
    let c = client();
    let mut blocks = Vec::new();
    for (d, want) in [(&f32_cache, "auto"), (&bf16_cache, "bfloat16")] {
        let s = scrape(&c, &d.url("")).await;
        let info = s
            .metrics
            .iter()
            .find(|m| m.name == "distillery:cache_config_info")
            .expect("cache_config_info");
        let label = |k: &str| {
            info.samples[0]
                .labels
                .iter()
                .find(|l| l.key == k)
                .map(|l| l.value.clone())
                .unwrap_or_else(|| panic!("cache_config_info lacks {k}"))
        };
        assert_eq!(label("cache_dtype"), want);
        blocks.push(label("num_gpu_blocks").parse::<usize>().expect("a count"));
        let v = ok(
            &c,
            &d.url("/v1/completions"),
            &json!({"model": model, "prompt": "Once upon a time", "max_tokens": 12,
                    "temperature": 0, "ignore_eos": true}),
        )
        .await;
        assert_eq!(v["usage"]["completion_tokens"], 12, "{v}");
    }
    assert!(
        (2 * blocks[0]..=2 * blocks[0] + 1).contains(&blocks[1]),
        "f32 cache {} blocks, bf16 cache {} blocks in the same budget",
        blocks[0],
        blocks[1]
    );
    assert!(
        bf16_cache
            .log_lines()
            .iter()
            .any(|l| l.contains("KV cache allocated") && l.contains("BF16")),
        "the log names the cache's dtype"
    );
}
