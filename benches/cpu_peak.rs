//! The CPU's own ceilings, to state kernels' figures as fractions of them: 512-bit `vpdpbusd`
//! (int8 multiply-adds, AVX-512 VNNI) and `vfmadd231ps` (f32) with sixteen independent
//! accumulators in registers, on one thread and on every core at once. Throughput is in
//! multiply-adds. `cargo bench --bench cpu_peak`; skipped where the CPU lacks AVX-512 VNNI.
//! Run it on a quiet machine: a second thread's figure is only the peak if nothing else runs.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// Loop trips per call: 16 instructions each.
const TRIPS: u64 = 1 << 20;

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must have AVX-512 F and VNNI.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn dpbusd(trips: u64) -> i32 {
        let (a, b) = (_mm512_set1_epi8(3), _mm512_set1_epi8(5));
        let mut acc = [_mm512_setzero_si512(); 16];
        for _ in 0..trips {
            for x in acc.iter_mut() {
                *x = _mm512_dpbusd_epi32(*x, a, b);
            }
            // Keeps the loop a loop (the compiler would otherwise fold the trips).
            std::arch::asm!("", options(nomem, nostack));
        }
        _mm512_reduce_add_epi32(
            acc.iter()
                .fold(_mm512_setzero_si512(), |s, x| _mm512_add_epi32(s, *x)),
        )
    }

    /// # Safety
    /// The CPU must have AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fmadd(trips: u64) -> f32 {
        let (a, b) = (_mm512_set1_ps(0.999), _mm512_set1_ps(0.001));
        let mut acc = [_mm512_setzero_ps(); 16];
        for _ in 0..trips {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
            std::arch::asm!("", options(nomem, nostack));
        }
        _mm512_reduce_add_ps(
            acc.iter()
                .fold(_mm512_setzero_ps(), |s, x| _mm512_add_ps(s, *x)),
        )
    }
}

fn bench(c: &mut Criterion) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = c;
    #[cfg(target_arch = "x86_64")]
    {
        if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni")) {
            eprintln!("cpu_peak: no AVX-512 VNNI on this CPU, nothing measured");
            return;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut group = c.benchmark_group("cpu_peak");
        group.sample_size(10);
        for threads in [1, cores] {
            let run = |f: fn(u64) -> f64| {
                std::thread::scope(|s| {
                    let hs: Vec<_> = (0..threads).map(|_| s.spawn(move || f(TRIPS))).collect();
                    hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum::<f64>()
                })
            };
            // SAFETY (both): the features were detected above.
            let dp: fn(u64) -> f64 = |t| unsafe { simd::dpbusd(t) } as f64;
            let fm: fn(u64) -> f64 = |t| unsafe { simd::fmadd(t) } as f64;
            group.throughput(Throughput::Elements(TRIPS * 16 * 64 * threads as u64));
            group.bench_function(format!("vpdpbusd/{threads}-threads"), |b| {
                b.iter(|| run(dp))
            });
            group.throughput(Throughput::Elements(TRIPS * 16 * 16 * threads as u64));
            group.bench_function(format!("vfmadd231ps/{threads}-threads"), |b| {
                b.iter(|| run(fm))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
