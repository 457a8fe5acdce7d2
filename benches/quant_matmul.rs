//! One quantized projection (`model::quant::Matrix`) at R1-Distill-Qwen-1.5B's widest shapes
//! (the MLP's 8960 × 1536 gate/up and 1536 × 8960 down), for 1, 16 and 64 activation rows
//! (decode at c=1, 16, 64), in each block format Q4_K_M files hold, bf16 and f16 (`model::half_matmul`)
//! and f32 (candle's gemm). Throughput is in multiply-adds. `cargo bench --bench quant_matmul`; run before and after a kernel change on
//! a quiet machine. `-- bf16` (a filter) runs one format.

use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use distillery::model::quant::Matrix;
use distillery::model::Quantization;

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("quant_matmul");
    group.sample_size(10);
    for (format, q) in [
        ("q4_k", Quantization::Q4K),
        ("q6_k", Quantization::Q6K),
        ("q8_0", Quantization::Q8_0),
        ("bf16", Quantization::Bf16),
        ("f16", Quantization::F16),
        ("f32", Quantization::None),
    ] {
        for (rows, width) in [(8960, 1536), (1536, 8960)] {
            let w = Tensor::randn(0f32, 0.02, (rows, width), &Device::Cpu).expect("weights");
            let matrix = Matrix::quantized(w, q)
                .and_then(Matrix::for_this_cpu)
                .expect("quantize");
            for m in [1, 16, 64] {
                let x = Tensor::randn(0f32, 1.0, (m, width), &Device::Cpu).expect("x");
                group.throughput(Throughput::Elements((m * rows * width) as u64));
                group.bench_function(format!("{format}/{rows}x{width}/m{m}"), |b| {
                    b.iter(|| matrix.forward(&x).expect("forward"))
                });
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
