//! Quantized weights (`--quantization`) against the f32 model they came from, on the goldens'
//! prompts. A quantized model cannot match transformers bit for bit, so the bound is stated:
//! teacher-forced along each golden continuation, the log-probability each format gives the
//! golden next token differs from f32's by at most `mean` on average and `max` anywhere, and
//! the greedy choice is f32's wherever f32's top two are more than twice `max` apart (closer
//! ones are near-ties the format may flip).
//!
//! The int8 kernels are chosen at run time (candle's AVX-512 VNNI, AVX-VNNI or AVX2 ones, and
//! for Q8_0 without VNNI our own `model::q8_0_avx2`; bf16 through `model::bf16_matmul`'s
//! AVX-512 BF16 or AVX2 kernel; the CPU is read once per process), so the AVX2 paths are
//! checked too, in a child process told to use them (`MISTRALRS_FORCE_AVX2=1`, which candle,
//! `q8_0_avx2::preferred` and `bf16_matmul` honour).

mod common;

use candle_core::D;
use common::{golden, model_dir, MODELS};
use distillery::model::{self, DTypeChoice, Decoder, Quantization};

/// The stated bounds per format: mean and max |Δ log p| of the golden next token, about 1.5x
/// the worst of the four shared models (measured: bf16 0.015-0.021 mean, 0.065-0.083 max
/// (the weights and activations rounded to bf16); Q8_0 0.059-0.116 mean, 0.26-0.57 max; Q6_K
/// 0.13-0.25, 0.51-0.92; Q4_K 0.59-1.43, 2.6-4.3; Q4_0 0.72-1.64, 3.5-4.8). Their random
/// weights are near-uniform in magnitude (max/mean ~6), the hard case for block scales, and
/// their logits crowd (the top six within 0.5): 4-bit formats move them a lot; trained
/// weights, with a few large values per block, fare better.
const BOUNDS: [(Quantization, f32, f32); 5] = [
    (Quantization::Bf16, 0.035, 0.13),
    (Quantization::Q8_0, 0.15, 0.8),
    (Quantization::Q6K, 0.35, 1.3),
    (Quantization::Q4K, 2.0, 6.0),
    (Quantization::Q4_0, 2.3, 6.5),
];

fn load(name: &str) -> Option<Decoder> {
    let dir = model_dir(name)?;
    Some(model::load_decoder(&dir, DTypeChoice::F32, &candle_core::Device::Cpu).expect("loads"))
}

/// Log-softmax rows for every position of `ids`, one sequence in one forward.
fn logprobs(decoder: &Decoder, ids: &[u32]) -> Vec<Vec<f32>> {
    let logits = common::forward_one(decoder, ids, true);
    candle_nn::ops::log_softmax(&logits, D::Minus1)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn argmax(row: &[f32]) -> (usize, f32) {
    let mut best = (0, f32::NEG_INFINITY);
    let mut second = f32::NEG_INFINITY;
    for (i, &v) in row.iter().enumerate() {
        if v > best.1 {
            second = best.1;
            best = (i, v);
        } else if v > second {
            second = v;
        }
    }
    (best.0, best.1 - second)
}

#[derive(Default, Debug)]
struct Drift {
    positions: usize,
    sum: f64,
    max: f32,
    greedy_checked: usize,
    greedy_differs: usize,
}

/// Every golden prompt of `name`, f32 against `quantized`.
fn drift(name: &str, f32_model: &Decoder, quantized: &Decoder, tie: f32) -> Drift {
    let mut d = Drift::default();
    for case in golden(name).expect("golden.json").cases {
        let ids: Vec<u32> = case
            .prompt_ids
            .iter()
            .chain(&case.generated_ids)
            .copied()
            .collect();
        let reference = logprobs(f32_model, &ids);
        let got = logprobs(quantized, &ids);
        // Row i predicts ids[i + 1]: score the prompt's last position and the continuation.
        for i in case.prompt_ids.len() - 1..ids.len() - 1 {
            let next = ids[i + 1] as usize;
            let delta = (got[i][next] - reference[i][next]).abs();
            d.positions += 1;
            d.sum += delta as f64;
            d.max = d.max.max(delta);
            let (want, gap) = argmax(&reference[i]);
            if gap > tie {
                d.greedy_checked += 1;
                d.greedy_differs += usize::from(argmax(&got[i]).0 != want);
            }
        }
    }
    d
}

fn check_every_format() {
    for name in MODELS {
        let Some(f32_model) = load(name) else {
            return;
        };
        for (q, mean_bound, max_bound) in BOUNDS {
            let quantized = f32_model.clone().quantized(q).expect("quantizes");
            let d = drift(name, &f32_model, &quantized, 2.0 * max_bound);
            let mean = (d.sum / d.positions as f64) as f32;
            eprintln!(
                "{name} {q:?}: mean |Δ log p| {mean:.5}, max {:.5} over {} positions; greedy \
                 differs at {} of {} clear positions",
                d.max, d.positions, d.greedy_differs, d.greedy_checked
            );
            assert!(d.positions > 0, "{name}: no golden positions");
            assert!(
                mean <= mean_bound && d.max <= max_bound,
                "{name} {q:?}: mean {mean} (bound {mean_bound}), max {} (bound {max_bound})",
                d.max
            );
            assert_eq!(
                d.greedy_differs, 0,
                "{name} {q:?}: greedy choice differs from f32 where its top two are clearly apart"
            );
        }
    }
}

#[test]
fn quantized_models_stay_within_the_stated_bounds_of_f32() {
    check_every_format();
}

/// Run by the test below in a child process whose kernels are forced to the AVX2 path.
#[test]
#[ignore = "run through avx2_kernels_stay_within_the_same_bounds"]
fn bounds_in_this_process() {
    check_every_format();
}

#[test]
fn avx2_kernels_stay_within_the_same_bounds() {
    if !cfg!(target_arch = "x86_64") || !std::arch::is_x86_feature_detected!("avx2") {
        eprintln!("\n!!! SKIPPING the AVX2 kernels: this CPU has no AVX2 !!!\n");
        return;
    }
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "bounds_in_this_process",
            "--ignored",
            "--nocapture",
        ])
        // candle's x86 kernel choice: AVX2 only, even where VNNI is present.
        .env("MISTRALRS_FORCE_AVX2", "1")
        .status()
        .unwrap();
    assert!(status.success(), "the AVX2 kernels broke the bounds");
}

#[test]
fn quantization_is_refused_outside_f32_on_the_cpu() {
    let Some(dir) = model_dir("tiny-llama-v512") else {
        return;
    };
    let bf16 = model::load_decoder(&dir, DTypeChoice::Bf16, &candle_core::Device::Cpu).unwrap();
    let err = bf16
        .quantized(Quantization::Q8_0)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("--dtype f32"), "{err}");
}

/// `--dtype bf16` on the CPU: an f32 model around bf16 matrices (half the bytes), drifting
/// from f32 no more than `--quantization bf16` may.
#[test]
fn bf16_on_the_cpu_is_bf16_matrices_around_f32() {
    let name = "tiny-llama-v512";
    let (Some(f32_model), Some(dir)) = (load(name), model_dir(name)) else {
        return;
    };
    let bf16 = model::load_decoder(&dir, DTypeChoice::Bf16, &candle_core::Device::Cpu).unwrap();
    assert_eq!(bf16.dtype(), candle_core::DType::F32);
    let (bytes, formats) = bf16.weight_summary();
    let (f32_bytes, _) = f32_model.weight_summary();
    assert_eq!(formats, vec!["BF16".to_string()]);
    assert!(
        bytes * 2 <= f32_bytes * 11 / 10,
        "{bytes} bytes against f32's {f32_bytes}"
    );
    let (_, mean_bound, max_bound) = BOUNDS[0];
    let d = drift(name, &f32_model, &bf16, 2.0 * max_bound);
    let mean = (d.sum / d.positions as f64) as f32;
    assert!(
        d.positions > 0 && mean <= mean_bound && d.max <= max_bound,
        "{d:?}"
    );
    assert_eq!(d.greedy_differs, 0, "{d:?}");
    // Asking for bf16 again is asking for what it is; any other format is refused.
    assert!(bf16.clone().quantized(Quantization::Bf16).is_ok());
    assert!(bf16.quantized(Quantization::Q8_0).is_err());
}
