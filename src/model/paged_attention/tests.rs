//! Both kernels against dense softmax attention computed straight from the inputs, on
//! random shapes, prefill chunks over a cached prefix, shuffled block tables and a pool
//! whose unused slots hold garbage (so a kernel that reads past a context shows up).

use candle_core::{DType, Device, Tensor, WithDType};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::*;

struct Case {
    shape: AttentionShape,
    /// What the cache stores.
    dtype: DType,
    /// What q, k and v come in (the model's dtype): the cache's, or f32 around a half cache.
    compute: DType,
    /// Per sequence: (positions already cached, new tokens this step).
    seqs: Vec<(usize, usize)>,
    /// Leading positions (whole blocks, all cached) that every sequence has in the same
    /// blocks, as prefix caching leaves a shared system prompt.
    shared: usize,
}

/// The head layout of `kv_heads` kv heads with `group` query heads each.
fn heads(kv_heads: usize, group: usize, head_dim: usize, block_size: usize) -> AttentionShape {
    AttentionShape {
        num_heads: kv_heads * group,
        num_kv_heads: kv_heads,
        head_dim,
        block_size,
    }
}

fn tensor(v: &[f32], shape: &[usize], dtype: DType) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("tensor")
}

/// `v` as the cache's element type would store it.
fn rounded(v: &[f32], dtype: DType) -> Vec<f32> {
    tensor(v, &[v.len()], dtype)
        .to_dtype(DType::F32)
        .and_then(|t| t.to_vec1())
        .expect("round trip")
}

fn uniform(n: usize, range: f32, rng: &mut StdRng) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-range..range)).collect()
}

/// The portable kernel on the same inputs as `attend`.
fn portable<Q: KvElem + WithDType, T: KvElem + WithDType>(
    meta: &AttentionMeta,
    q: &Tensor,
    cache: &Tensor,
) -> Vec<f32> {
    let q = q.flatten_all().and_then(|t| t.to_vec1::<Q>()).expect("q");
    let cache = cache
        .flatten_all()
        .and_then(|t| t.to_vec1::<T>())
        .expect("cache");
    cpu::attend(meta, &q, &cache, false)
        .into_iter()
        .map(KvElem::to_f32)
        .collect()
}

/// Runs one case; returns the largest error of either kernel against the reference.
fn run_case(case: &Case, rng: &mut StdRng) -> f32 {
    let AttentionShape {
        num_heads: h,
        num_kv_heads: kvh,
        head_dim: d,
        block_size: bs,
    } = case.shape;
    let (dtype, compute) = (case.dtype, case.compute);
    let blocks: usize = case.seqs.iter().map(|&(c, n)| (c + n).div_ceil(bs)).sum();
    let num_blocks = blocks + 3;
    let mut free: Vec<u32> = (0..num_blocks as u32).collect();
    free.shuffle(rng);
    let shared_table: Vec<u32> = (0..case.shared / bs)
        .map(|_| free.pop().expect("enough blocks"))
        .collect();
    let shared_k = rounded(&uniform(case.shared * kvh * d, 1.0, rng), compute);
    let shared_v = rounded(&uniform(case.shared * kvh * d, 1.0, rng), compute);
    // Per sequence: its block table and the K/V rows (`[ctx][kvh][d]`) of every position.
    let mut tables = Vec::new();
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    for &(cached, new) in &case.seqs {
        let ctx = cached + new;
        let own = ctx - case.shared;
        let mut table = shared_table.clone();
        table.extend((table.len()..ctx.div_ceil(bs)).map(|_| free.pop().expect("enough blocks")));
        tables.push(table);
        let mut k = shared_k.clone();
        k.extend(rounded(&uniform(own * kvh * d, 1.0, rng), compute));
        keys.push(k);
        let mut v = shared_v.clone();
        v.extend(rounded(&uniform(own * kvh * d, 1.0, rng), compute));
        values.push(v);
    }
    // Garbage everywhere a context does not reach; large enough to wreck any output that
    // reads it.
    let cache_len = num_blocks * 2 * kvh * bs * d;
    let cache = tensor(
        &uniform(cache_len, 50.0, rng),
        &[num_blocks, 2, kvh, bs * d],
        dtype,
    );
    let (mut prefix, mut step) = (ForwardBatch::default(), ForwardBatch::default());
    let (mut prefix_k, mut prefix_v, mut step_k, mut step_v) = (vec![], vec![], vec![], vec![]);
    for (s, &(cached, new)) in case.seqs.iter().enumerate() {
        let row = kvh * d;
        if cached > 0 {
            prefix.push_sequence(&vec![0; cached], 0, &tables[s], bs);
            prefix_k.extend_from_slice(&keys[s][..cached * row]);
            prefix_v.extend_from_slice(&values[s][..cached * row]);
        }
        step.push_sequence(&vec![0; new], cached, &tables[s], bs);
        step_k.extend_from_slice(&keys[s][cached * row..]);
        step_v.extend_from_slice(&values[s][cached * row..]);
    }
    for (batch, k, v) in [(&prefix, &prefix_k, &prefix_v), (&step, &step_k, &step_v)] {
        let n = batch.num_tokens();
        if n > 0 {
            AttentionMeta::new(batch, case.shape, &Device::Cpu)
                .write_kv(
                    &cache,
                    &tensor(k, &[n, kvh, d], compute),
                    &tensor(v, &[n, kvh, d], compute),
                )
                .expect("write_kv");
        }
    }
    let t = step.num_tokens();
    let q = rounded(&uniform(t * h * d, 1.0, rng), compute);
    let q_t = tensor(&q, &[t, h, d], compute);
    let meta = AttentionMeta::new(&step, case.shape, &Device::Cpu);
    let out = meta
        .attend(&q_t, &cache)
        .and_then(|o| o.to_dtype(DType::F32))
        .and_then(|o| o.flatten_all())
        .and_then(|o| o.to_vec1::<f32>())
        .expect("attend");
    let slow = match (compute, dtype) {
        (DType::F32, DType::F32) => portable::<f32, f32>(&meta, &q_t, &cache),
        (DType::F32, DType::F16) => portable::<f32, f16>(&meta, &q_t, &cache),
        (DType::F32, DType::BF16) => portable::<f32, bf16>(&meta, &q_t, &cache),
        (DType::F16, _) => portable::<f16, f16>(&meta, &q_t, &cache),
        _ => portable::<bf16, bf16>(&meta, &q_t, &cache),
    };
    // The reference reads what the cache holds: each K/V value rounded as it was written.
    let keys: Vec<Vec<f32>> = keys.iter().map(|k| rounded(k, dtype)).collect();
    let values: Vec<Vec<f32>> = values.iter().map(|v| rounded(v, dtype)).collect();
    // Dense reference, in f64, with no paging at all.
    let group = h / kvh;
    let scale = 1.0 / (d as f64).sqrt();
    let mut worst = 0f32;
    let mut tok = 0;
    for (s, &(cached, new)) in case.seqs.iter().enumerate() {
        for i in 0..new {
            let (n_ctx, tok) = (cached + i + 1, tok + i);
            for head in 0..h {
                let g = head / group;
                let qv = &q[(tok * h + head) * d..][..d];
                let kv = |rows: &[f32], p: usize| rows[(p * kvh + g) * d..][..d].to_vec();
                let scores: Vec<f64> = (0..n_ctx)
                    .map(|p| {
                        let k = kv(&keys[s], p);
                        qv.iter()
                            .zip(&k)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|&x| (x - max).exp()).collect();
                let total: f64 = w.iter().sum();
                for dd in 0..d {
                    let want: f64 = (0..n_ctx)
                        .map(|p| w[p] * values[s][(p * kvh + g) * d + dd] as f64)
                        .sum::<f64>()
                        / total;
                    for got in [
                        out[(tok * h + head) * d + dd],
                        slow[(tok * h + head) * d + dd],
                    ] {
                        let err = (got as f64 - want).abs() / (1.0 + want.abs());
                        worst = worst.max(err as f32);
                    }
                }
            }
        }
        tok += new;
    }
    worst
}

/// (compute, cache) pairs the CPU ops take: one dtype throughout, or an f32 model with a half
/// cache (`--kv-cache-dtype`).
const DTYPES: [(DType, DType); 5] = [
    (DType::F32, DType::F32),
    (DType::F16, DType::F16),
    (DType::BF16, DType::BF16),
    (DType::F32, DType::BF16),
    (DType::F32, DType::F16),
];

fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 2e-3,
        _ => 1.6e-2,
    }
}

fn random_case(rng: &mut StdRng, max_ctx: usize) -> Case {
    let block_size = *[1, 2, 4, 8, 16, 32].choose(rng).expect("block sizes");
    let head_dim = *[4, 5, 12, 16, 20, 64].choose(rng).expect("head dims");
    let group = *[1, 2, 4].choose(rng).expect("groups");
    let num_kv_heads = rng.gen_range(1..=3);
    let (compute, dtype) = *DTYPES.choose(rng).expect("dtypes");
    let seqs = (0..rng.gen_range(1..=4))
        .map(|_| {
            let ctx = rng.gen_range(1..=max_ctx);
            let new = rng.gen_range(1..=ctx.min(6));
            (ctx - new, new)
        })
        .collect();
    Case {
        shape: heads(num_kv_heads, group, head_dim, block_size),
        dtype,
        compute,
        seqs,
        shared: 0,
    }
}

fn check(case: &Case, rng: &mut StdRng) {
    let err = run_case(case, rng);
    assert!(
        err <= tolerance(case.dtype),
        "{:?} {:?} {:?}: error {err}",
        case.dtype,
        case.shape,
        case.seqs
    );
}

#[test]
fn matches_dense_attention_on_random_batches() {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    for _ in 0..300 {
        let case = random_case(&mut rng, 90);
        check(&case, &mut rng);
    }
}

#[test]
fn matches_dense_attention_on_odd_shapes_and_long_contexts() {
    let mut rng = StdRng::seed_from_u64(7);
    // Groups beyond the heads the kernel keeps in flight, every power-of-two block size,
    // and contexts of one position and of thousands.
    for (group, block_size, head_dim, seqs) in [
        (8, 16, 16, vec![(0, 1), (40, 3)]),
        (5, 4, 12, vec![(0, 1), (17, 2)]),
        (3, 64, 20, vec![(250, 4)]),
        (2, 256, 16, vec![(0, 1), (300, 2), (2900, 1)]),
        (6, 128, 8, vec![(1500, 2)]),
    ] {
        for (compute, dtype) in DTYPES {
            let case = Case {
                shape: heads(2, group, head_dim, block_size),
                dtype,
                compute,
                seqs: seqs.clone(),
                shared: 0,
            };
            check(&case, &mut rng);
        }
    }
}

#[test]
fn matches_dense_attention_over_shared_prefixes() {
    // Many sequences whose leading blocks are the same blocks (the shared-prefix path),
    // decoding and prefilling, with group sizes and head sizes on both sides of its tiles.
    let mut rng = StdRng::seed_from_u64(11);
    let (mut grouped_tokens, mut all_tokens) = (0, 0);
    for _ in 0..120 {
        let block_size = *[8, 16, 32].choose(&mut rng).expect("block sizes");
        let head_dim = *[8, 16, 24, 64].choose(&mut rng).expect("head dims");
        let group = *[1, 2, 3, 6].choose(&mut rng).expect("groups");
        let num_kv_heads = rng.gen_range(1..=2);
        let shared = block_size * rng.gen_range(1..=6);
        let seqs = (0..rng.gen_range(1..=9))
            .map(|_| {
                let cached = shared + rng.gen_range(0..40);
                (cached, rng.gen_range(1..=5))
            })
            .collect();
        let (compute, dtype) = *DTYPES.choose(&mut rng).expect("dtypes");
        let case = Case {
            shape: heads(num_kv_heads, group, head_dim, block_size),
            dtype,
            compute,
            seqs,
            shared,
        };
        let grouped = {
            let mut b = ForwardBatch::default();
            let table: Vec<u32> = (0..64).collect();
            for &(cached, new) in &case.seqs {
                b.push_sequence(
                    &vec![0; new],
                    cached,
                    &table[..(cached + new).div_ceil(block_size)],
                    block_size,
                );
            }
            let meta = AttentionMeta::new(&b, case.shape, &Device::Cpu);
            meta.prefixes
                .groups
                .iter()
                .map(|g| g.tokens.len())
                .sum::<usize>()
        };
        grouped_tokens += grouped;
        all_tokens += case.seqs.iter().map(|&(_, n)| n).sum::<usize>();
        check(&case, &mut rng);
    }
    // Most tokens went through the shared-prefix tiles (a sequence with a much shorter cached
    // prefix than its neighbours, or a lone decode token, is left to the per-token pass).
    assert!(
        grouped_tokens * 10 > all_tokens * 7,
        "{grouped_tokens} of {all_tokens} tokens in groups"
    );
}

#[test]
fn shared_prefixes_group_sequences_by_what_they_share() {
    let bs = 8;
    let mut b = ForwardBatch::default();
    // Three tokens prefilled behind a two-block hit of the first prompt.
    b.push_sequence(&[1, 2, 3], 2 * bs, &[0, 1, 300], bs);
    // Five decoding sequences on a four-block prompt, two on a prompt sharing only block 0.
    for i in 0..5 {
        b.push_sequence(&[1], 4 * bs + 5, &[0, 1, 2, 3, 100 + i], bs);
    }
    for i in 0..2 {
        b.push_sequence(&[1], 4 * bs + 5, &[0, 10, 11, 12, 200 + i], bs);
    }
    // A lone decode token on a prompt of its own: nothing to share.
    b.push_sequence(&[1], 4 * bs + 5, &[50, 51, 52, 53, 54], bs);
    let found = shared_prefix::SharedPrefixes::find(&b, heads(2, 2, 16, bs));
    let mut groups: Vec<Vec<u32>> = found.groups.iter().map(|g| g.blocks.clone()).collect();
    groups.sort();
    assert_eq!(
        groups,
        vec![vec![0, 1], vec![0, 1, 2, 3], vec![0, 10, 11, 12]]
    );
    // Every token but the lone one's takes its prefix from a group.
    let tokens: usize = found.groups.iter().map(|g| g.tokens.len()).sum();
    assert_eq!(tokens, 3 + 5 + 2);
}

#[test]
fn half_values_widen_exactly() {
    for bits in 0..=u16::MAX {
        let (h, b) = (f16::from_bits(bits), bf16::from_bits(bits));
        for (got, want) in [
            (KvElem::to_f32(h), h.to_f32()),
            (KvElem::to_f32(b), b.to_f32()),
        ] {
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{bits:#06x}: {got:e} against half's {want:e}"
            );
        }
    }
}
