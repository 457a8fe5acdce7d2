//! The CPU paged-attention operator alone, for one decode step of many sequences that share a
//! cached system prompt (the customer-service shape): 256 sequences at context 150, 128 of it
//! in blocks every sequence shares (so the shared-prefix tiles take most of the work), at the
//! daemon's default block size. Two head layouts: tiny-llama-v512's (4 query heads over 2
//! kv heads of 16) and R1-Distill-Qwen-1.5B's (12 over 2, of 128).
//! A second group decodes 16 sequences at context 4,096 with no shared blocks (R1-Distill's
//! layout), with the cache in f32, bf16 and f16 (`--kv-cache-dtype`): there attention streams
//! the whole history from memory, so the cache's bytes are its time.
//! `cargo bench --bench attention`; run before and after a kernel change on a quiet machine.

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use distillery::model::paged_attention::{AttentionMeta, AttentionShape};
use distillery::model::ForwardBatch;

const SEQS: usize = 256;
const CONTEXT: usize = 150;
const SHARED: usize = 128;
const BLOCK: usize = 8;

fn bench(c: &mut Criterion) {
    // The daemon's engine replica runs its ops on one thread each (two replicas, two cores).
    std::env::set_var("RAYON_NUM_THREADS", "1");
    let mut group = c.benchmark_group("paged_attention_decode");
    group.sample_size(20);
    for (name, heads, kv_heads, head_dim) in
        [("h4-kv2-d16", 4, 2, 16), ("h12-kv2-d128", 12, 2, 128)]
    {
        let shape = AttentionShape {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            block_size: BLOCK,
        };
        let shared_blocks = SHARED / BLOCK;
        let own_blocks = CONTEXT.div_ceil(BLOCK) - shared_blocks;
        let num_blocks = shared_blocks + SEQS * own_blocks;
        let mut batch = ForwardBatch::default();
        for s in 0..SEQS {
            let mut table: Vec<u32> = (0..shared_blocks as u32).collect();
            table.extend((0..own_blocks).map(|b| (shared_blocks + s * own_blocks + b) as u32));
            // One new token at position CONTEXT - 1.
            batch.push_sequence(&[1], CONTEXT - 1, &table, BLOCK);
        }
        let meta = AttentionMeta::new(&batch, shape, &Device::Cpu);
        let (cache, q) = inputs(shape, num_blocks, SEQS);
        group.throughput(Throughput::Elements(SEQS as u64));
        group.bench_function(name, |b| {
            b.iter(|| meta.attend(&q, &cache).expect("attention runs"))
        });
    }
    group.finish();
    long_contexts(c);
}

fn long_contexts(c: &mut Criterion) {
    const SEQS: usize = 16;
    const CONTEXT: usize = 4096;
    let (heads, kv_heads, head_dim) = (12, 2, 128);
    let shape = AttentionShape {
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        block_size: BLOCK,
    };
    let per_seq = CONTEXT / BLOCK;
    let mut batch = ForwardBatch::default();
    for s in 0..SEQS {
        let table: Vec<u32> = (0..per_seq).map(|b| (s * per_seq + b) as u32).collect();
        batch.push_sequence(&[1], CONTEXT - 1, &table, BLOCK);
    }
    let meta = AttentionMeta::new(&batch, shape, &Device::Cpu);
    let (f32_cache, q) = inputs(shape, SEQS * per_seq, SEQS);
    let mut group = c.benchmark_group("paged_attention_decode_ctx4096");
    group.sample_size(20);
    group.throughput(Throughput::Elements(SEQS as u64));
    for (name, dtype) in [
        ("cache-f32", DType::F32),
        ("cache-bf16", DType::BF16),
        ("cache-f16", DType::F16),
    ] {
        let cache = f32_cache.to_dtype(dtype).expect("cache in its dtype");
        group.bench_function(name, |b| {
            b.iter(|| meta.attend(&q, &cache).expect("attention runs"))
        });
    }
    group.finish();
}

/// A pool of `num_blocks` blocks and the queries of `seqs` decoding tokens, filled with
/// smooth deterministic values.
fn inputs(shape: AttentionShape, num_blocks: usize, seqs: usize) -> (Tensor, Tensor) {
    let values = |n: usize, seed: f32| -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.618 + seed).sin()).collect()
    };
    let (kv_heads, head_dim) = (shape.num_kv_heads, shape.head_dim);
    let cache = Tensor::from_vec(
        values(num_blocks * 2 * kv_heads * BLOCK * head_dim, 0.3),
        (num_blocks, 2, kv_heads, BLOCK * head_dim),
        &Device::Cpu,
    )
    .expect("cache");
    let q = Tensor::from_vec(
        values(seqs * shape.num_heads * head_dim, 1.7),
        (seqs, shape.num_heads, head_dim),
        &Device::Cpu,
    )
    .expect("q");
    (cache, q)
}

criterion_group!(benches, bench);
criterion_main!(benches);
