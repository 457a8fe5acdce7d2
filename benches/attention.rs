//! The CPU paged-attention operator alone, for one decode step of many sequences that share a
//! cached system prompt (the customer-service shape): 256 sequences at context 150, 128 of it
//! in blocks every sequence shares (so the shared-prefix tiles take most of the work), at the
//! daemon's default block size. Two head layouts: tiny-llama-v512's (4 query heads over 2
//! kv heads of 16) and R1-Distill-Qwen-1.5B's (12 over 2, of 128).
//! `cargo bench --bench attention`; run before and after a kernel change on a quiet machine.

use candle_core::{Device, Tensor};
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
        let values = |n: usize, seed: f32| -> Vec<f32> {
            (0..n).map(|i| (i as f32 * 0.618 + seed).sin()).collect()
        };
        let cache_len = num_blocks * 2 * kv_heads * BLOCK * head_dim;
        let cache = Tensor::from_vec(
            values(cache_len, 0.3),
            (num_blocks, 2, kv_heads, BLOCK * head_dim),
            &Device::Cpu,
        )
        .expect("cache");
        let q = Tensor::from_vec(
            values(SEQS * heads * head_dim, 1.7),
            (SEQS, heads, head_dim),
            &Device::Cpu,
        )
        .expect("q");
        group.throughput(Throughput::Elements(SEQS as u64));
        group.bench_function(name, |b| {
            b.iter(|| meta.attend(&q, &cache).expect("attention runs"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
