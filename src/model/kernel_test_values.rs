//! Seeded test inputs for the CPU kernels' unit tests: reproducible without a random-number
//! crate, the same on every machine, so a SIMD kernel and its scalar reference see the same
//! values wherever CI runs.

/// `n` values uniform in [-0.5, 0.5), from a 64-bit linear congruential generator seeded with
/// `seed` (Knuth's MMIX constants; the top bits are the well-mixed ones).
pub fn uniform(n: usize, seed: u64) -> impl Iterator<Item = f32> {
    let mut s = seed;
    (0..n).map(move |_| {
        s = s
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (s >> 33) as f32 / (1u64 << 31) as f32 - 0.5
    })
}
