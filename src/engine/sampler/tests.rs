use super::*;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, RngCore};
use std::collections::BTreeSet;

fn params() -> SamplingParams {
    SamplingParams {
        seed: Some(7),
        ..SamplingParams::default()
    }
}

fn random_row(rng: &mut StdRng, vocab: usize) -> Vec<f32> {
    (0..vocab).map(|_| rng.gen_range(-8.0f32..8.0)).collect()
}

fn sample_once(p: &SamplingParams, sampler: &mut SequenceSampler, row: &[f32]) -> Sampled {
    let mut row = row.to_vec();
    sampler.sample(p, &mut row, &mut SamplerScratch::default())
}

fn softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = row.iter().map(|&l| f64::from(l - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

fn counts(p: &SamplingParams, row: &[f32], draws: usize) -> Vec<usize> {
    let mut sampler = SequenceSampler::new(p, &[]);
    let mut scratch = SamplerScratch::default();
    let mut counts = vec![0; row.len()];
    let mut buf = Vec::new();
    for _ in 0..draws {
        buf.clear();
        buf.extend_from_slice(row);
        counts[sampler.sample(p, &mut buf, &mut scratch).token as usize] += 1;
    }
    counts
}

#[test]
fn greedy_is_argmax_with_lowest_id_on_ties() {
    let p = params();
    assert!(p.is_greedy() && p.is_plain_greedy());
    let mut s = SequenceSampler::new(&p, &[]);
    let row = [1.0, 3.0, -2.0, 3.0, f32::NAN, 0.5];
    let out = sample_once(&p, &mut s, &row);
    assert_eq!(out.token, 1);
    assert_eq!(out.logprob, None);
    assert!(out.top_logprobs.is_empty());
    assert_eq!(sample_once(&p, &mut s, &[f32::NEG_INFINITY; 3]).token, 0);
    assert_eq!(sample_once(&p, &mut s, &[]).token, 0);
}

#[test]
fn top_k_one_is_greedy_under_any_temperature() {
    let mut rng = StdRng::seed_from_u64(1);
    for temperature in [0.1, 0.7, 1.0, 5.0, 100.0] {
        let p = SamplingParams {
            temperature,
            top_k: 1,
            ..params()
        };
        let mut s = SequenceSampler::new(&p, &[]);
        for _ in 0..50 {
            let mut row = random_row(&mut rng, 300);
            row[17] = 8.0;
            row[200] = 8.0; // a tie: the lower id must win
            assert_eq!(sample_once(&p, &mut s, &row).token, 17);
            let row = random_row(&mut rng, 300);
            assert_eq!(sample_once(&p, &mut s, &row).token, argmax(&row));
        }
    }
}

#[test]
fn tiny_top_p_is_greedy() {
    let mut rng = StdRng::seed_from_u64(2);
    let p = SamplingParams {
        temperature: 1.5,
        top_p: 1e-6,
        ..params()
    };
    let mut s = SequenceSampler::new(&p, &[]);
    for _ in 0..100 {
        let row = random_row(&mut rng, 1000);
        assert_eq!(sample_once(&p, &mut s, &row).token, argmax(&row));
    }
}

#[test]
fn top_p_keeps_the_smallest_prefix_reaching_the_mass() {
    // Probabilities 0.5, 0.3, 0.15, 0.05.
    let row: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
    let seen = |top_p| {
        let p = SamplingParams {
            temperature: 1.0,
            top_p,
            ..params()
        };
        counts(&p, &row, 4000)
    };
    let c = seen(0.7);
    assert!(c[0] > 0 && c[1] > 0 && c[2] == 0 && c[3] == 0, "{c:?}");
    let c = seen(0.85);
    assert!(c[2] > 0 && c[3] == 0, "{c:?}");
    let c = seen(0.45);
    assert!(c[0] == 4000, "{c:?}");
}

#[test]
fn top_p_grows_past_the_first_rounds_on_flat_rows() {
    // Equal logits: the kept set is ids 0..9000 (ties go to lower ids), larger than the
    // first two rounds of candidates.
    let row = vec![0.0f32; 10_000];
    let p = SamplingParams {
        temperature: 1.0,
        top_p: 0.9,
        ..params()
    };
    let c = counts(&p, &row, 2_000);
    let highest = c.iter().rposition(|&n| n > 0).unwrap();
    assert!(highest < 9000 && highest > 8000, "{highest}");
}

#[test]
fn min_p_drops_tokens_below_the_scaled_maximum() {
    // Probabilities 0.5, 0.3, 0.15, 0.05; min_p 0.2 keeps p >= 0.1.
    let row: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
    let p = SamplingParams {
        temperature: 1.0,
        min_p: 0.2,
        ..params()
    };
    let c = counts(&p, &row, 4000);
    assert!(c[2] > 0 && c[3] == 0, "{c:?}");
    let p = SamplingParams { min_p: 1.0, ..p };
    assert_eq!(counts(&p, &row, 500)[0], 500);
    // min-p then top-p (vLLM v1's order): top-p's mass is over {0, 1, 2} only, where
    // token 0 alone holds 0.5 / 0.95 > 0.52, so nothing else is drawn. (With top-p first,
    // as HF orders them, 0.5 < 0.52 would keep token 1.)
    let p = SamplingParams {
        min_p: 0.2,
        top_p: 0.52,
        ..p
    };
    assert_eq!(counts(&p, &row, 4000)[0], 4000);
}

#[test]
fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
    let p = SamplingParams {
        repetition_penalty: 2.0,
        ..params()
    };
    let mut s = SequenceSampler::new(&p, &[0, 1, 1, 9]);
    s.record(4);
    s.record(0); // in prompt and output: penalised once
    let mut row = vec![3.0, -1.0, 0.5, 2.0, 4.0, 0.0];
    let out = s.sample(&p, &mut row, &mut SamplerScratch::default());
    assert_eq!(row, vec![1.5, -2.0, 0.5, 2.0, 2.0, 0.0]);
    assert_eq!(out.token, 3); // 3 and 4 tie at 2.0: the lower id
}

#[test]
fn presence_and_frequency_penalties_match_hand_computation() {
    let p = SamplingParams {
        presence_penalty: 0.5,
        frequency_penalty: 0.25,
        ..params()
    };
    let mut s = SequenceSampler::new(&p, &[2, 2, 2]);
    for t in [3, 1, 3, 3] {
        s.record(t);
    }
    let mut row = vec![1.0f32; 5];
    s.sample(&p, &mut row, &mut SamplerScratch::default());
    // token 1: once -> 1 - 0.25 - 0.5; token 3: thrice -> 1 - 0.75 - 0.5; prompt untouched.
    assert_eq!(row, vec![1.0, 0.25, 1.0, -0.25, 1.0]);
}

#[test]
fn logit_bias_of_100_forces_a_token() {
    let mut rng = StdRng::seed_from_u64(3);
    let p = SamplingParams {
        temperature: 1.0,
        logit_bias: vec![(7, 100.0)],
        ..params()
    };
    let mut s = SequenceSampler::new(&p, &[]);
    for _ in 0..200 {
        let row: Vec<f32> = (0..50).map(|_| rng.gen_range(-10.0f32..10.0)).collect();
        assert_eq!(sample_once(&p, &mut s, &row).token, 7);
    }
    let p = SamplingParams {
        logit_bias: vec![(7, -100.0)],
        ..p
    };
    let row = vec![0.0f32; 8];
    assert_eq!(counts(&p, &row, 2000)[7], 0);
}

#[test]
fn mask_tokens_blocks_ids_and_ignores_out_of_range() {
    let mut row = vec![5.0, 1.0, 2.0];
    mask_tokens(&mut row, &[0, 99]);
    assert_eq!(row, vec![f32::NEG_INFINITY, 1.0, 2.0]);
    let p = SamplingParams {
        temperature: 1.0,
        ..params()
    };
    assert_eq!(counts(&p, &row, 1000)[0], 0);
}

#[test]
fn seeded_sampling_is_deterministic_and_independent_of_other_sequences() {
    let p = SamplingParams {
        temperature: 1.0,
        top_p: 0.95,
        top_k: 40,
        seed: Some(1234),
        ..SamplingParams::default()
    };
    let mut rng = StdRng::seed_from_u64(4);
    let rows: Vec<Vec<f32>> = (0..50).map(|_| random_row(&mut rng, 500)).collect();
    let run = |seed: u64, interleave: bool| {
        let p = SamplingParams {
            seed: Some(seed),
            ..p.clone()
        };
        let mut s = SequenceSampler::new(&p, &[1, 2, 3]);
        let mut other = SequenceSampler::new(
            &SamplingParams {
                seed: None,
                top_p: 1.0,
                ..p.clone()
            },
            &[],
        );
        let mut scratch = SamplerScratch::default();
        let mut tokens = Vec::new();
        for row in &rows {
            if interleave {
                other.sample(&p, &mut row.clone(), &mut scratch);
            }
            let t = s.sample(&p, &mut row.clone(), &mut scratch).token;
            s.record(t);
            tokens.push(t);
        }
        tokens
    };
    let a = run(1234, false);
    assert_eq!(a, run(1234, false));
    assert_eq!(a, run(1234, true));
    assert_ne!(a, run(1235, false));
}

#[test]
fn seeded_choices_differ_but_repeat() {
    let p = SamplingParams {
        temperature: 1.0,
        seed: Some(9),
        ..SamplingParams::default()
    };
    let row = vec![0.0f32; 1000];
    let tokens = |choice| {
        let mut s = SequenceSampler::for_choice(&p, &[], choice);
        (0..20)
            .map(|_| sample_once(&p, &mut s, &row).token)
            .collect::<Vec<_>>()
    };
    assert_eq!(tokens(0), tokens(0));
    assert_ne!(tokens(0), tokens(1));
    let mut s = SequenceSampler::new(&p, &[]);
    let first: Vec<u32> = (0..20)
        .map(|_| sample_once(&p, &mut s, &row).token)
        .collect();
    assert_eq!(first, tokens(0));
}

#[test]
fn the_stream_of_a_seed_is_pinned() {
    // Guards the promise that a seed means the same draws across dependency upgrades.
    let mut rng = seeded_rng(42);
    let draws: Vec<u64> = (0..3).map(|_| rng.next_u64()).collect();
    assert_eq!(
        draws,
        vec![
            6424161053832095879,
            5270208426312333099,
            9102960255288774902
        ]
    );
    let u = unit_interval(&mut seeded_rng(42));
    assert!((0.0..1.0).contains(&u));
    assert_eq!(u, (draws[0] >> 11) as f64 / (1u64 << 53) as f64);
}

#[test]
fn fast_exp_matches_libm() {
    let mut worst = 0.0f32;
    for i in 0..=2_000_000 {
        let x = -87.0 * i as f32 / 2_000_000.0;
        let (got, want) = (exp_nonpositive(x), x.exp());
        worst = worst.max((got - want).abs() / want);
    }
    assert!(worst < 4.0 * f32::EPSILON, "relative error {worst}");
    assert_eq!(exp_nonpositive(0.0), 1.0);
    assert!(exp_nonpositive(f32::NEG_INFINITY) < 1e-37);
    assert!(exp_nonpositive(-1e30) < 1e-37);
}

#[test]
fn temperature_one_matches_softmax() {
    let row = [1.0f32, 2.0, 0.5, -1.0];
    let p = SamplingParams {
        temperature: 1.0,
        ..params()
    };
    let n = 20_000;
    let c = counts(&p, &row, n);
    for (i, (&count, want)) in c.iter().zip(softmax(&row)).enumerate() {
        let got = count as f64 / n as f64;
        assert!((got - want).abs() < 0.015, "token {i}: {got} vs {want}");
    }
    // Temperature 2 is softmax(row / 2).
    let p = SamplingParams {
        temperature: 2.0,
        ..p
    };
    let c = counts(&p, &row, n);
    let halved: Vec<f32> = row.iter().map(|l| l / 2.0).collect();
    for (&count, want) in c.iter().zip(softmax(&halved)) {
        assert!((count as f64 / n as f64 - want).abs() < 0.015);
    }
}

#[test]
fn logprobs_are_log_softmax_of_the_raw_row() {
    let row = [1.0f32, 2.0, 0.5, -1.0, 2.0];
    let p = SamplingParams {
        temperature: 0.8,
        top_k: 2,
        repetition_penalty: 1.3,
        logit_bias: vec![(3, 50.0)],
        logprobs: Some(3),
        ..params()
    };
    let mut s = SequenceSampler::new(&p, &[1]);
    let out = sample_once(&p, &mut s, &row);
    let want: Vec<f32> = softmax(&row).iter().map(|p| p.ln() as f32).collect();
    assert_eq!(out.token, 3);
    assert!((out.logprob.unwrap() - want[3]).abs() < 1e-5);
    let ids: Vec<u32> = out.top_logprobs.iter().map(|&(id, _)| id).collect();
    assert_eq!(ids, vec![1, 4, 0]);
    for &(id, lp) in &out.top_logprobs {
        assert!((lp - want[id as usize]).abs() < 1e-5);
    }
    // Greedy requests get them too, and k = 0 gives just the chosen token's.
    let p = SamplingParams {
        logprobs: Some(0),
        ..params()
    };
    let out = sample_once(&p, &mut SequenceSampler::new(&p, &[]), &row);
    assert_eq!(out.token, 1);
    assert!((out.logprob.unwrap() - want[1]).abs() < 1e-5);
    assert!(out.top_logprobs.is_empty());
}

#[test]
fn validate_rejects_each_bad_field_by_name() {
    let vocab = 100;
    assert_eq!(params().validate(vocab), Ok(()));
    let cases: Vec<(SamplingParams, &str, &str)> = vec![
        (
            SamplingParams {
                temperature: -0.1,
                ..params()
            },
            "temperature",
            ">= 0",
        ),
        (
            SamplingParams {
                temperature: f32::INFINITY,
                ..params()
            },
            "temperature",
            ">= 0",
        ),
        (
            SamplingParams {
                top_p: 0.0,
                ..params()
            },
            "top_p",
            "(0, 1]",
        ),
        (
            SamplingParams {
                top_p: 1.5,
                ..params()
            },
            "top_p",
            "(0, 1]",
        ),
        (
            SamplingParams {
                top_p: f32::NAN,
                ..params()
            },
            "top_p",
            "(0, 1]",
        ),
        (
            SamplingParams {
                min_p: 1.1,
                ..params()
            },
            "min_p",
            "[0, 1]",
        ),
        (
            SamplingParams {
                min_p: -0.1,
                ..params()
            },
            "min_p",
            "[0, 1]",
        ),
        (
            SamplingParams {
                repetition_penalty: 0.0,
                ..params()
            },
            "repetition_penalty",
            "> 0",
        ),
        (
            SamplingParams {
                presence_penalty: 2.5,
                ..params()
            },
            "presence_penalty",
            "[-2, 2]",
        ),
        (
            SamplingParams {
                frequency_penalty: -3.0,
                ..params()
            },
            "frequency_penalty",
            "[-2, 2]",
        ),
        (
            SamplingParams {
                logit_bias: vec![(1, 101.0)],
                ..params()
            },
            "logit_bias",
            "[-100, 100]",
        ),
        (
            SamplingParams {
                logit_bias: vec![(100, 1.0)],
                ..params()
            },
            "logit_bias",
            "vocabulary of 100",
        ),
        (
            SamplingParams {
                logprobs: Some(21),
                ..params()
            },
            "logprobs",
            "[0, 20]",
        ),
    ];
    for (p, field, range) in cases {
        let err = p.validate(vocab).unwrap_err();
        assert_eq!(err.field(), field);
        let msg = err.to_string();
        assert!(msg.starts_with(field) && msg.contains(range), "{msg}");
    }
    let err = SamplingParams {
        top_p: 1.5,
        ..params()
    }
    .validate(vocab)
    .unwrap_err();
    assert_eq!(err.to_string(), "top_p must be in (0, 1], got 1.5");
}

/// The kept set by brute force (sort everything, then min-p, top-k, top-p), as the tokens
/// that must be kept and those that may be: summing in another order moves the top-p
/// boundary by rounding, so tokens within a hair of it may go either way.
fn reference_pool(p: &SamplingParams, processed: &[f32]) -> (BTreeSet<u32>, BTreeSet<u32>) {
    let max = processed.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let floor = if p.min_p > 0.0 {
        max + p.min_p.ln()
    } else {
        f32::MIN
    };
    let mut order: Vec<u32> = (0..processed.len() as u32).collect();
    order.sort_by(|&a, &b| by_logit_desc(processed, a, b));
    order.retain(|&id| processed[id as usize] >= floor);
    if p.top_k > 0 {
        order.truncate(p.top_k);
    }
    if p.top_p >= 1.0 {
        let all: BTreeSet<u32> = order.into_iter().collect();
        return (all.clone(), all);
    }
    let w = |id: u32| f64::from(exp_nonpositive(processed[id as usize] - max));
    let total: f64 = order.iter().map(|&id| w(id)).sum();
    let budget = f64::from(p.top_p) * total;
    let slack = 1e-9 * total;
    let (mut must, mut may) = (BTreeSet::new(), BTreeSet::new());
    let mut ahead = 0.0;
    for &id in &order {
        if ahead < budget - slack {
            must.insert(id);
        }
        if ahead < budget + slack {
            may.insert(id);
        }
        ahead += w(id);
    }
    (must, may)
}

fn row_strategy() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(
        prop_oneof![8 => -30.0f32..30.0, 1 => Just(f32::NEG_INFINITY), 1 => Just(0.0f32)],
        1..300,
    )
    .prop_filter("needs a finite logit", |row| {
        row.iter().any(|l| l.is_finite())
    })
}

fn params_strategy() -> impl Strategy<Value = SamplingParams> {
    (
        prop_oneof![1 => Just(0.0f32), 4 => 0.05f32..3.0],
        prop_oneof![1 => Just(1.0f32), 2 => 0.01f32..1.0],
        prop_oneof![1 => Just(0usize), 1 => 1usize..50, 1 => 250usize..400],
        prop_oneof![1 => Just(0.0f32), 1 => 0.0f32..=1.0],
        (0.5f32..2.0, -2.0f32..=2.0, -2.0f32..=2.0),
        prop::collection::vec((0u32..300, -100.0f32..=100.0), 0..4),
        any::<u64>(),
        prop::option::of(0usize..=20),
    )
        .prop_map(
            |(t, top_p, top_k, min_p, (rp, pres, freq), bias, seed, lp)| SamplingParams {
                temperature: t,
                top_p,
                top_k,
                min_p,
                repetition_penalty: rp,
                presence_penalty: pres,
                frequency_penalty: freq,
                logit_bias: bias,
                seed: Some(seed),
                logprobs: lp,
                prompt_logprobs: None,
            },
        )
}

proptest! {
    #[test]
    fn sampled_token_is_in_vocab_with_a_finite_processed_logit(
        row in row_strategy(),
        mut p in params_strategy(),
        prompt in prop::collection::vec(0u32..400, 0..20),
        outputs in prop::collection::vec(0u32..400, 0..20),
    ) {
        p.logit_bias.retain(|&(id, _)| (id as usize) < row.len());
        prop_assert_eq!(p.validate(row.len()), Ok(()));
        let mut s = SequenceSampler::new(&p, &prompt);
        for &t in &outputs {
            s.record(t);
        }
        let mut scratch = SamplerScratch::default();
        for _ in 0..3 {
            let mut processed = row.clone();
            let out = s.sample(&p, &mut processed, &mut scratch);
            prop_assert!((out.token as usize) < row.len());
            prop_assert!(processed[out.token as usize].is_finite());
            prop_assert_eq!(out.logprob.is_some(), p.logprobs.is_some());
            if let Some(k) = p.logprobs {
                prop_assert_eq!(out.top_logprobs.len(), k.min(row.len()));
                prop_assert!(out.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1));
            }
        }
    }

    #[test]
    fn pool_matches_brute_force(row in row_strategy(), p in params_strategy()) {
        prop_assume!(!p.is_greedy());
        let mut processed = row.clone();
        let mut scratch = SamplerScratch::default();
        let pool = prepare_pool(&p, &mut processed, &mut scratch);
        let got: BTreeSet<u32> = match pool {
            Pool::Decided(t) => BTreeSet::from([t]),
            Pool::Vocab { .. } => (0..row.len() as u32)
                .filter(|&id| scratch.weights[id as usize] > 0.0)
                .collect(),
            Pool::Ids { .. } => scratch.ids.iter().copied().collect(),
        };
        let (must, may) = reference_pool(&p, &processed);
        prop_assert!(must.is_subset(&got), "missing {:?}", must.difference(&got));
        prop_assert!(got.is_subset(&may), "extra {:?}", got.difference(&may));
    }

    #[test]
    fn pool_matches_brute_force_on_long_rows(
        row in prop::collection::vec(
            prop_oneof![8 => -20.0f32..20.0, 1 => Just(f32::NEG_INFINITY), 1 => Just(2.5f32)],
            1000..5000,
        ).prop_filter("needs a finite logit", |row| row.iter().any(|l| l.is_finite())),
        p in params_strategy(),
        k in prop_oneof![1 => Just(0usize), 2 => 1usize..40, 1 => 40usize..200],
    ) {
        let p = SamplingParams { top_k: k, ..p };
        prop_assume!(!p.is_greedy());
        let mut processed = row.clone();
        let mut scratch = SamplerScratch::default();
        let got: BTreeSet<u32> = match prepare_pool(&p, &mut processed, &mut scratch) {
            Pool::Decided(t) => BTreeSet::from([t]),
            Pool::Vocab { .. } => (0..row.len() as u32)
                .filter(|&id| scratch.weights[id as usize] > 0.0)
                .collect(),
            Pool::Ids { .. } => scratch.ids.iter().copied().collect(),
        };
        let (must, may) = reference_pool(&p, &processed);
        prop_assert!(must.is_subset(&got), "missing {:?}", must.difference(&got));
        prop_assert!(got.is_subset(&may), "extra {:?}", got.difference(&may));
    }

    #[test]
    fn coarse_cutoff_never_drops_a_bucket_up_to_the_boundary(
        max in prop_oneof![-1e3f32..1e3, -1e7f32..1e7, 1e7f32..3e8],
        below in prop_oneof![0.0f32..40.0, 0.0f32..1.0],
        scale in prop_oneof![Just(1.0f32), Just(1e-3), Just(1e3)],
        boundary in 0usize..BUCKETS,
    ) {
        let l = max - below * scale;
        let cutoff = coarse_cutoff(max, f32::MIN, boundary);
        if bucket(l, max) <= boundary {
            prop_assert!(l >= cutoff, "{l} below {cutoff}");
        }
    }

    #[test]
    fn argmax_is_the_first_maximum(
        row in prop::collection::vec(
            prop_oneof![
                6 => -3.0f32..3.0,
                2 => Just(1.0f32),
                1 => Just(f32::NAN),
                1 => Just(f32::NEG_INFINITY),
            ],
            0..400,
        ),
    ) {
        let mut want = 0;
        for (i, &v) in row.iter().enumerate() {
            if v > row[want] || row[want].is_nan() && !v.is_nan() {
                want = i;
            }
        }
        if row.iter().all(|v| v.is_nan() || *v == f32::NEG_INFINITY) {
            want = 0;
        }
        prop_assert_eq!(argmax(&row) as usize, want);
    }
}

#[test]
fn masked_ids_are_never_drawn_but_keep_their_raw_logprobs() {
    let p = SamplingParams {
        logprobs: Some(2),
        ..params()
    };
    let mut s = SequenceSampler::new(&p, &[]);
    // Id 0 is the model's favourite but masked (say EOS before min_tokens).
    let mut row = vec![4.0f32, 1.0, 2.0, 0.5];
    let out = s.sample_masked(&p, &mut row, &[0], &mut SamplerScratch::default());
    assert_eq!(out.token, 2);
    let norm = [4.0f32, 1.0, 2.0, 0.5]
        .iter()
        .map(|l| (l - 4.0).exp())
        .sum::<f32>()
        .ln();
    let raw = |l: f32| l - 4.0 - norm;
    let chosen = out.logprob.expect("logprobs were requested");
    assert!((chosen - raw(2.0)).abs() < 1e-5, "{chosen} vs {}", raw(2.0));
    assert_eq!(
        out.top_logprobs[0].0, 0,
        "the masked id still tops the raw list"
    );
    assert!((out.top_logprobs[0].1 - raw(4.0)).abs() < 1e-5);
}
