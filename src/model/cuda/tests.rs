//! The CUDA operators against the CPU ones on random inputs (needs a GPU: these run only in
//! a `--features cuda` build, e.g. `deploy/gpu-check.sh`). A batch mixes decode tokens with
//! prefill chunks over a cached prefix, interleaved blocks and GQA, in every cache dtype.

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::model::batch::ForwardBatch;
use crate::model::paged_attention::{AttentionMeta, AttentionShape};

fn cuda() -> Device {
    Device::new_cuda(0).expect("these tests need a CUDA device (run them on a GPU machine)")
}

/// A batch of `(cached, new)` token counts per sequence, blocks handed out in a shuffled
/// order so that sequences interleave in the pool. Returns the batch and the blocks used.
fn batch(seqs: &[(usize, usize)], block_size: usize, rng: &mut impl Rng) -> (ForwardBatch, usize) {
    let blocks: usize = seqs
        .iter()
        .map(|&(c, n)| (c + n).div_ceil(block_size))
        .sum();
    let mut free: Vec<u32> = (0..blocks as u32 + 3).collect();
    for i in (1..free.len()).rev() {
        free.swap(i, rng.gen_range(0..=i));
    }
    let mut b = ForwardBatch::default();
    for &(cached, new) in seqs {
        let table: Vec<u32> = (0..(cached + new).div_ceil(block_size))
            .map(|_| free.pop().unwrap())
            .collect();
        let tokens: Vec<u32> = (0..new as u32).collect();
        b.push_sequence(&tokens, cached, &table, block_size);
    }
    (b, blocks + 3)
}

fn random(shape: &[usize], rng: &mut impl Rng) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let a = a.to_vec1::<f32>().unwrap();
    let b = b.to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// Fills a random history for every sequence (the whole context written in one pass, as a
/// prefill would) and then runs the batch's own tokens: write, then attend, on both devices.
fn compare(dtype: DType, shape: AttentionShape, seqs: &[(usize, usize)], tol: f32, seed: u64) {
    let gpu = cuda();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (step, num_blocks) = batch(seqs, shape.block_size, &mut rng);
    let t = step.num_tokens();
    let (h, kvh, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
    let cache_shape = (num_blocks, 2, kvh, shape.block_size * d);
    // The cached prefix: one forward writing positions 0..cached of each sequence.
    let mut prefix = ForwardBatch::default();
    for s in 0..step.num_seqs() {
        let new = (step.query_start[s + 1] - step.query_start[s]) as usize;
        let cached = step.context_lens[s] as usize - new;
        if cached > 0 {
            let table = &step.block_tables[s * step.max_blocks..(s + 1) * step.max_blocks];
            let tokens: Vec<u32> = vec![0; cached];
            prefix.push_sequence(&tokens, 0, table, shape.block_size);
        }
    }
    let on = |dev: &Device| {
        let cache = Tensor::zeros(cache_shape, dtype, dev).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 1);
        if prefix.num_tokens() > 0 {
            let p = prefix.num_tokens();
            let k = random(&[p, kvh, d], &mut rng).to_dtype(dtype).unwrap();
            let v = random(&[p, kvh, d], &mut rng).to_dtype(dtype).unwrap();
            let meta = AttentionMeta::new(&prefix, shape, dev);
            meta.write_kv(
                &cache,
                &k.to_device(dev).unwrap(),
                &v.to_device(dev).unwrap(),
            )
            .unwrap();
        }
        let q = random(&[t, h, d], &mut rng).to_dtype(dtype).unwrap();
        let k = random(&[t, kvh, d], &mut rng).to_dtype(dtype).unwrap();
        let v = random(&[t, kvh, d], &mut rng).to_dtype(dtype).unwrap();
        let meta = AttentionMeta::new(&step, shape, dev);
        meta.write_kv(
            &cache,
            &k.to_device(dev).unwrap(),
            &v.to_device(dev).unwrap(),
        )
        .unwrap();
        let out = meta.attend(&q.to_device(dev).unwrap(), &cache).unwrap();
        (
            cache.to_device(&Device::Cpu).unwrap(),
            out.to_device(&Device::Cpu).unwrap(),
        )
    };
    let (cpu_cache, cpu_out) = on(&Device::Cpu);
    let (gpu_cache, gpu_out) = on(&gpu);
    assert_eq!(gpu_out.dims(), &[t, h * d]);
    // The cache is a pure copy: identical bits.
    assert_eq!(
        max_abs_diff(&cpu_cache, &gpu_cache),
        0.0,
        "{dtype:?}: caches differ"
    );
    let diff = max_abs_diff(&cpu_out, &gpu_out);
    assert!(
        diff <= tol,
        "{dtype:?} {shape:?} {seqs:?}: attention differs by {diff}"
    );
}

const SHAPES: [AttentionShape; 3] = [
    // R1-Distill-Qwen-1.5B: 12 heads over 2 kv heads of 128.
    AttentionShape {
        num_heads: 12,
        num_kv_heads: 2,
        head_dim: 128,
        block_size: 16,
    },
    // The test models' 16-wide heads, odd block size.
    AttentionShape {
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        block_size: 1,
    },
    // Head dim not a multiple of 32, MHA, the largest head.
    AttentionShape {
        num_heads: 3,
        num_kv_heads: 3,
        head_dim: 80,
        block_size: 32,
    },
];

/// Decode tokens at short and long contexts, a prefill chunk over a cached prefix, a fresh
/// prompt longer than one 128-key tile.
const SEQS: [(usize, usize); 5] = [(0, 1), (37, 1), (300, 1), (20, 45), (0, 200)];

#[test]
fn cuda_ops_match_cpu_in_f32() {
    for (i, shape) in SHAPES.into_iter().enumerate() {
        compare(DType::F32, shape, &SEQS, 1e-5, 10 + i as u64);
    }
}

#[test]
fn cuda_ops_match_cpu_in_bf16_and_f16() {
    for (i, shape) in SHAPES.into_iter().enumerate() {
        // Outputs are rounded to the storage type once; sums of differently ordered f32 can
        // land one rounding step apart.
        compare(DType::BF16, shape, &SEQS, 1.6e-2, 20 + i as u64);
        compare(DType::F16, shape, &SEQS, 2e-3, 30 + i as u64);
    }
}

#[test]
fn head_dim_256_works() {
    let shape = AttentionShape {
        num_heads: 8,
        num_kv_heads: 1,
        head_dim: 256,
        block_size: 16,
    };
    compare(DType::F32, shape, &[(5, 3), (130, 1)], 1e-5, 40);
}

#[test]
fn device_argmax_matches_the_host_sampler() {
    let gpu = cuda();
    let vocab = 151_936;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut rows: Vec<Vec<f32>> = (0..6)
        .map(|_| (0..vocab).map(|_| rng.gen_range(-5.0f32..5.0)).collect())
        .collect();
    // Ties: the lowest id wins.
    rows[1][100] = 50.0;
    rows[1][90_000] = 50.0;
    rows[1][5] = 50.0;
    // NaN is never chosen.
    rows[2][7] = f32::NAN;
    rows[2][8] = 60.0;
    // Nothing above -inf: 0.
    rows[3].iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
    // The last id.
    rows[4][vocab - 1] = 99.0;
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    let logits = Tensor::from_vec(flat, (rows.len(), vocab), &gpu).unwrap();
    let got = crate::model::cuda::argmax_rows(&logits).unwrap().unwrap();
    let want: Vec<u32> = rows
        .iter()
        .map(|r| crate::engine::sampler::argmax(r))
        .collect();
    assert_eq!(got, want);
    assert_eq!(&got[1..5], &[5, 8, 0, (vocab - 1) as u32]);
    // A non-contiguous-start view (rows 2..) works too.
    let tail = logits.narrow(0, 2, 4).unwrap();
    let got = crate::model::cuda::argmax_rows(&tail).unwrap().unwrap();
    assert_eq!(got, want[2..]);
}
