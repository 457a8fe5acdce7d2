//! Decoder throughput on `bench-llama-25m` in f32 on the CPU: prefill of one 512-token prompt,
//! and one decode step for batches of 1, 16, 64 and 256 sequences at context 128.
//! `cargo bench --bench forward`; figures go to BENCHMARKS.md.

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use distillery::model::{self, DTypeChoice, Decoder, ForwardBatch, KvCache};
use std::path::PathBuf;

const BLOCK: usize = 16;
const CONTEXT: usize = 128;

fn load() -> Option<Decoder> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/models/bench-llama-25m");
    if !dir.is_dir() {
        eprintln!(
            "!!! SKIPPING forward bench: {} not found !!!",
            dir.display()
        );
        return None;
    }
    Some(model::load_decoder(&dir, DTypeChoice::F32, &Device::Cpu).expect("model loads"))
}

/// Deterministic pseudo-random token ids.
fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed * 97) >> 7) % 31000 + 100)
        .collect()
}

fn bench(c: &mut Criterion) {
    // As the daemon does: spare candle from re-reading /proc and /sys on every matmul.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let Some(decoder) = load() else { return };
    let mut group = c.benchmark_group("forward");
    group.sample_size(10);

    let prompt = tokens(512, 1);
    let cache = KvCache::new(
        decoder.config(),
        512 / BLOCK,
        BLOCK,
        decoder.dtype(),
        decoder.device(),
    )
    .expect("cache");
    let table: Vec<u32> = (0..(512 / BLOCK) as u32).collect();
    let mut batch = ForwardBatch::default();
    batch.push_sequence(&prompt, 0, &table, BLOCK);
    group.throughput(Throughput::Elements(512));
    group.bench_function("prefill_512", |b| {
        b.iter(|| decoder.forward(&batch, &cache).expect("forward"))
    });

    for seqs in [1usize, 16, 64, 256] {
        let blocks_per_seq = (CONTEXT + 1).div_ceil(BLOCK);
        let cache = KvCache::new(
            decoder.config(),
            seqs * blocks_per_seq,
            BLOCK,
            decoder.dtype(),
            decoder.device(),
        )
        .expect("cache");
        let tables: Vec<Vec<u32>> = (0..seqs)
            .map(|s| {
                (0..blocks_per_seq as u32)
                    .map(|b| (b as usize * seqs + s) as u32)
                    .collect()
            })
            .collect();
        // Fill every sequence's 128-token context once, in chunks of 16 sequences.
        for chunk in tables.chunks(16).enumerate() {
            let mut prefill = ForwardBatch::default();
            for (i, table) in chunk.1.iter().enumerate() {
                prefill.push_sequence(&tokens(CONTEXT, (chunk.0 * 16 + i) as u32), 0, table, BLOCK);
            }
            decoder.forward(&prefill, &cache).expect("prefill");
        }
        let mut step = ForwardBatch::default();
        for (s, table) in tables.iter().enumerate() {
            step.push_sequence(&[(s as u32 % 30000) + 100], CONTEXT, table, BLOCK);
        }
        group.throughput(Throughput::Elements(seqs as u64));
        group.bench_function(format!("decode_batch_{seqs}"), |b| {
            b.iter(|| decoder.forward(&step, &cache).expect("forward"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
