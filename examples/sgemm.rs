//! Measures candle's f32 matmul rate on this machine at the decoder's shapes, so benchmark
//! figures can be stated as a fraction of what the CPU can do. `cargo run --release --example sgemm`.

use candle_core::{Device, Tensor};
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for (m, k, n) in [
        (1, 384, 32000),
        (64, 384, 1024),
        (64, 384, 32000),
        (256, 384, 1024),
        (512, 384, 1024),
        (1024, 1024, 1024),
    ] {
        let a = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let wt = w.t()?;
        let _ = a.matmul(&wt)?;
        let iters = (2e9 / (2.0 * (m * k * n) as f64)).clamp(3.0, 2000.0) as usize;
        let start = Instant::now();
        for _ in 0..iters {
            let _ = a.matmul(&wt)?;
        }
        let secs = start.elapsed().as_secs_f64() / iters as f64;
        let wt_contig = wt.contiguous()?;
        let start = Instant::now();
        for _ in 0..iters {
            let _ = a.matmul(&wt_contig)?;
        }
        let secs_c = start.elapsed().as_secs_f64() / iters as f64;
        println!(
            "sgemm m={m:5} k={k:5} n={n:6}: x @ W^T (view) {:8.1} GFLOP/s {:9.3} ms | x @ Wt (contiguous) {:8.1} GFLOP/s {:9.3} ms",
            2.0 * (m * k * n) as f64 / secs / 1e9,
            secs * 1e3,
            2.0 * (m * k * n) as f64 / secs_c / 1e9,
            secs_c * 1e3
        );
    }
    Ok(())
}
