//! Quantized weights (`--quantization`) against the f32 model they came from, on the goldens'
//! prompts. A quantized model cannot match transformers bit for bit, so the bound is stated:
//! teacher-forced along each golden continuation, the log-probability each format gives the
//! golden next token differs from f32's by at most `mean` on average and `max` anywhere, and
//! the greedy choice is f32's wherever f32's top two are more than twice `max` apart (closer
//! ones are near-ties the format may flip).
//!
//! The int8 kernels are chosen at run time (candle's AVX-512 VNNI, AVX-VNNI or AVX2 ones, and
//! for Q8_0 without VNNI our own `model::q8_0_avx2`; bf16 and f16 through `model::half_matmul`'s
//! AVX-512 (BF16, F) or AVX2 kernels; the CPU is read once per process), so the AVX2 paths are
//! checked too, in a child process told to use them (`MISTRALRS_FORCE_AVX2=1`, which candle,
//! `q8_0_avx2::preferred` and `half_matmul` honour).

mod common;

use common::drift::{self, Drift};
use common::{model_dir, MODELS};
use distillery::model::{self, DTypeChoice, Decoder, Quantization};

/// The stated bounds per format: mean and max |Δ log p| of the golden next token, about 1.5x
/// the worst of the four shared models (measured: bf16 0.011-0.013 mean, 0.051-0.076 max, and
/// 0 on bench-llama-25m, a bf16 checkpoint; f16 0.0014-0.0016, 0.006-0.007; Q8_0 0.059-0.116 mean, 0.26-0.57 max; Q6_K
/// 0.13-0.25, 0.51-0.92; Q4_K 0.59-1.43, 2.6-4.3; Q4_0 0.72-1.64, 3.5-4.8). Their random
/// weights are near-uniform in magnitude (max/mean ~6), the hard case for block scales, and
/// their logits crowd (the top six within 0.5): 4-bit formats move them a lot; trained
/// weights, with a few large values per block, fare better.
const BOUNDS: [(Quantization, f32, f32); 6] = [
    (Quantization::Bf16, 0.02, 0.115),
    (Quantization::F16, 0.0025, 0.011),
    (Quantization::Q8_0, 0.15, 0.8),
    (Quantization::Q6K, 0.35, 1.3),
    (Quantization::Q4K, 2.0, 6.0),
    (Quantization::Q4_0, 2.3, 6.5),
];

fn load(name: &str) -> Option<Decoder> {
    let dir = model_dir(name)?;
    Some(model::load_decoder(&dir, DTypeChoice::F32, &candle_core::Device::Cpu).expect("loads"))
}

/// Every golden prompt of `name`, f32 against `quantized` (same cache dtype: f32).
fn drift(name: &str, f32_model: &Decoder, quantized: &Decoder, tie: f32) -> Drift {
    let f32 = candle_core::DType::F32;
    drift::measure(
        name,
        |ids| drift::logprobs(f32_model, ids, f32),
        |ids| drift::logprobs(quantized, ids, f32),
        tie,
    )
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

/// A block format quantizes half-precision matrices (`--dtype bf16`, a BF16/F16 GGUF file)
/// from their values: for a bf16 checkpoint those are f32's exactly, so the quantized model is
/// the one quantized from the f32 load, logit for logit. Already quantized weights are refused.
#[test]
fn block_formats_quantize_half_matrices_from_their_values() {
    let name = "bench-llama-25m";
    let Some(dir) = model_dir(name) else {
        return;
    };
    let cpu = candle_core::Device::Cpu;
    let q8 = |choice: DTypeChoice| {
        model::load_decoder(&dir, choice, &cpu)
            .unwrap()
            .quantized(Quantization::Q8_0)
            .unwrap()
    };
    let (from_bf16, from_f32) = (q8(DTypeChoice::Bf16), q8(DTypeChoice::F32));
    assert_eq!(from_bf16.weight_summary(), from_f32.weight_summary());
    let case = &common::golden(name).expect("golden.json").cases[0];
    let logits = |d: &Decoder| -> Vec<f32> {
        common::forward_one(d, &case.prompt_ids, false)
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .unwrap()
    };
    assert_eq!(logits(&from_bf16), logits(&from_f32));
    let err = from_f32
        .quantized(Quantization::Q4K)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("already quantized"), "{err}");
}

/// `--dtype bf16` / `f16` on the CPU: an f32 model around half-precision matrices (half the
/// bytes), drifting from f32 no more than `--quantization bf16` / `f16` may.
#[test]
fn half_dtypes_on_the_cpu_are_half_matrices_around_f32() {
    let name = "tiny-llama-v512";
    let (Some(f32_model), Some(dir)) = (load(name), model_dir(name)) else {
        return;
    };
    for (choice, q, format) in [
        (DTypeChoice::Bf16, Quantization::Bf16, "BF16"),
        (DTypeChoice::F16, Quantization::F16, "F16"),
    ] {
        let half = model::load_decoder(&dir, choice, &candle_core::Device::Cpu).unwrap();
        assert_eq!(half.dtype(), candle_core::DType::F32);
        let (bytes, formats) = half.weight_summary();
        let (f32_bytes, _) = f32_model.weight_summary();
        assert_eq!(formats, vec![format.to_string()]);
        assert!(
            bytes * 2 <= f32_bytes * 11 / 10,
            "{bytes} bytes against f32's {f32_bytes}"
        );
        let (_, mean_bound, max_bound) = *BOUNDS.iter().find(|b| b.0 == q).expect("a bound");
        let d = drift(name, &f32_model, &half, 2.0 * max_bound);
        let mean = (d.sum / d.positions as f64) as f32;
        assert!(
            d.positions > 0 && mean <= mean_bound && d.max <= max_bound,
            "{format}: {d:?}"
        );
        assert_eq!(d.greedy_differs, 0, "{format}: {d:?}");
        // Asking for the same format again is asking for what it is; the other half format
        // rounds the matrices again; a block format quantizes their values.
        assert_eq!(
            half.clone().quantized(q).unwrap().weight_summary().1,
            formats
        );
        let q8 = half.clone().quantized(Quantization::Q8_0).unwrap();
        assert_eq!(q8.weight_summary().1, vec!["Q8_0".to_string()]);
        let (other, other_name) = if q == Quantization::Bf16 {
            (Quantization::F16, "F16")
        } else {
            (Quantization::Bf16, "BF16")
        };
        let again = half.quantized(other).unwrap();
        assert_eq!(again.weight_summary().1, vec![other_name.to_string()]);
    }
}

/// `--dtype auto` on the CPU: a bf16 checkpoint (bench-llama-25m) keeps bf16 matrices where
/// this CPU has a bf16 kernel, an f32 one stays f32, and `--quantization` (which quantizes f32
/// weights) makes auto mean f32 again.
#[test]
fn auto_on_the_cpu_keeps_a_bf16_checkpoint_bf16() {
    let (Some(bf16_dir), Some(f32_dir)) =
        (model_dir("bench-llama-25m"), model_dir("tiny-llama-v512"))
    else {
        return;
    };
    let cpu = candle_core::Device::Cpu;
    let formats = |dir: &std::path::Path, choice: DTypeChoice| {
        model::load_decoder(dir, choice, &cpu)
            .unwrap()
            .weight_summary()
            .1
    };
    let want = if model::half_matmul::fast_on_this_cpu(model::half_matmul::Half::Bf16) {
        "BF16"
    } else {
        eprintln!("!!! no AVX-512F or AVX2+FMA here: auto keeps f32 for the bf16 checkpoint !!!");
        "F32"
    };
    assert_eq!(
        formats(&bf16_dir, DTypeChoice::Auto),
        vec![want.to_string()]
    );
    assert_eq!(
        formats(&f32_dir, DTypeChoice::Auto),
        vec!["F32".to_string()]
    );

    assert_eq!(
        DTypeChoice::Auto.under(Quantization::None),
        DTypeChoice::Auto
    );
    assert_eq!(
        DTypeChoice::Auto.under(Quantization::Bf16),
        DTypeChoice::Auto
    );
    assert_eq!(
        DTypeChoice::Auto.under(Quantization::F16),
        DTypeChoice::Auto
    );
    assert_eq!(
        DTypeChoice::Bf16.under(Quantization::Q8_0),
        DTypeChoice::Bf16
    );
    let auto_q8 = DTypeChoice::Auto.under(Quantization::Q8_0);
    assert_eq!(auto_q8, DTypeChoice::F32);
    let q8 = model::load_decoder(&bf16_dir, auto_q8, &cpu)
        .unwrap()
        .quantized(Quantization::Q8_0)
        .unwrap();
    assert_eq!(q8.weight_summary().1, vec!["Q8_0".to_string()]);
}
