//! bf16 weight matrices multiplied with f32 activations on the CPU, without widening the
//! weights in memory: half of f32's bytes per token (decoding at low concurrency streams the
//! weights, so bytes are time), and twice f32's multiply-adds per instruction where the CPU has
//! AVX-512 BF16.
//!
//! The activations are rounded to bf16 once per call (round to nearest even), then each
//! product of two bf16 values is exact in f32 and the sums are f32 (`vdpbf16ps` flushes
//! subnormals, values below ~1e-38, to zero; the other kernels keep them). Three kernels compute that same sum, in different orders:
//! `vdpbf16ps` (AVX-512 BF16), an AVX2 one that widens the weights in registers (a shift) and
//! uses f32 FMAs, and a scalar reference; the kernel is chosen at run time and the unit tests
//! hold each SIMD one to the reference on CPUs that have it.
//!
//! The weights are stored interleaved for those kernels: groups of [`GROUP`] rows, and within
//! a group, for each pair of input positions, the two values of row 0, then of row 1, ... So
//! one 64-byte load holds 16 rows' next two weights, each vector lane accumulates one output
//! row, and no horizontal sums are needed; an activation pair is broadcast to every lane.
//!
//! Knows the bf16 bit layout and nothing of models or tensors' meaning.

use rayon::prelude::*;

/// Output rows interleaved together: one AVX-512 register of f32 sums.
const GROUP: usize = 16;
/// Values per interleaved step: a pair per row (what `vdpbf16ps` multiplies per lane).
const PAIR: usize = 2;
/// Row groups per rayon task.
const GROUPS_PER_TASK: usize = 4;
/// Activation rows per kernel call: each loaded weight vector meets this many from registers.
const TILE_M: usize = 6;

/// Weight rows as bf16 bits, interleaved (see the module doc); rows padded with zero rows to
/// whole groups, widths with zeros to whole pairs.
pub struct Bf16Rows {
    rows: usize,
    in_features: usize,
    /// Pairs of input positions per row (the padded width / 2).
    pairs: usize,
    bits: Vec<u16>,
    /// Chosen once, when the matrix is made.
    kernel: Kernel,
}

impl Bf16Rows {
    /// From `rows` rows of `in_features` bf16 values (their bits). `None` if the lengths
    /// disagree.
    pub fn from_bits(bits: &[u16], rows: usize, in_features: usize) -> Option<Self> {
        if bits.len() != rows * in_features || in_features == 0 {
            return None;
        }
        let pairs = in_features.div_ceil(PAIR);
        let groups = rows.div_ceil(GROUP);
        let mut packed = vec![0u16; groups * pairs * GROUP * PAIR];
        for (r, row) in bits.chunks_exact(in_features).enumerate() {
            let (g, lane) = (r / GROUP, r % GROUP);
            for (k, &v) in row.iter().enumerate() {
                packed[((g * pairs + k / PAIR) * GROUP + lane) * PAIR + k % PAIR] = v;
            }
        }
        Some(Self {
            rows,
            in_features,
            pairs,
            bits: packed,
            kernel: Kernel::best(),
        })
    }

    /// From f32 values, each rounded to the nearest bf16 (exact for weights that were bf16).
    pub fn from_f32(values: &[f32], rows: usize, in_features: usize) -> Option<Self> {
        let bits: Vec<u16> = values.iter().map(|&v| bf16_bits(v)).collect();
        Self::from_bits(&bits, rows, in_features)
    }

    /// Several matrices of one width as one, their rows in order. `None` if the widths differ.
    pub fn concat(parts: &[&Bf16Rows]) -> Option<Self> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.in_features != first.in_features) {
            return None;
        }
        let bits: Vec<u16> = parts.iter().flat_map(|p| p.unpacked()).collect();
        Self::from_bits(&bits, parts.iter().map(|p| p.rows).sum(), first.in_features)
    }

    /// The rows as plain row-major bits (what [`Self::from_bits`] took).
    fn unpacked(&self) -> Vec<u16> {
        let mut out = Vec::with_capacity(self.rows * self.in_features);
        for r in 0..self.rows {
            let (g, lane) = (r / GROUP, r % GROUP);
            out.extend((0..self.in_features).map(|k| {
                self.bits[((g * self.pairs + k / PAIR) * GROUP + lane) * PAIR + k % PAIR]
            }));
        }
        out
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Bytes held (padding included).
    pub fn bytes(&self) -> usize {
        self.bits.len() * 2
    }

    /// `x @ self.T` for `x` of `m` rows of [`Self::in_features`] values, row-major `[m, rows]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_with(x, m, self.kernel)
    }

    fn matmul_with(&self, x: &[f32], m: usize, kernel: Kernel) -> Vec<f32> {
        let acts = Activations::round(x, m, self.in_features, self.pairs, kernel);
        let group_len = self.pairs * GROUP * PAIR;
        // Each task fills `[m, its rows]`; the blocks are put side by side at the end.
        let blocks: Vec<Vec<f32>> = self
            .bits
            .par_chunks(GROUPS_PER_TASK * group_len)
            .map(|weights| {
                let task_groups = weights.len() / group_len;
                let mut out = vec![0f32; m * task_groups * GROUP];
                for (g, w) in weights.chunks_exact(group_len).enumerate() {
                    for i in (0..m).step_by(TILE_M) {
                        let mr = (m - i).min(TILE_M);
                        let sums = tile(w, &acts, i, mr, self.pairs, kernel);
                        for (ii, row) in sums.iter().enumerate().take(mr) {
                            let at = (i + ii) * task_groups * GROUP + g * GROUP;
                            out[at..at + GROUP].copy_from_slice(row);
                        }
                    }
                }
                out
            })
            .collect();
        let n = self.rows;
        let mut out = vec![0f32; m * n];
        let mut col = 0;
        for block in &blocks {
            let width = block.len() / m.max(1);
            let take = width.min(n - col);
            for i in 0..m {
                out[i * n + col..i * n + col + take]
                    .copy_from_slice(&block[i * width..i * width + take]);
            }
            col += take;
        }
        out
    }
}

/// The sums of one row group `w` (interleaved, `pairs` steps) for activation rows
/// `i..i + mr`, `mr` at most [`TILE_M`].
fn tile(
    w: &[u16],
    acts: &Activations,
    i: usize,
    mr: usize,
    pairs: usize,
    kernel: Kernel,
) -> [[f32; GROUP]; TILE_M] {
    let mut sums = [[0f32; GROUP]; TILE_M];
    match kernel {
        Kernel::Scalar => {
            for (ii, out) in sums.iter_mut().enumerate().take(mr) {
                let x = acts.widened(i + ii);
                for (step, xs) in w.chunks_exact(GROUP * PAIR).zip(x.chunks_exact(PAIR)) {
                    for (o, wv) in out.iter_mut().zip(step.chunks_exact(PAIR)) {
                        *o += widen(wv[0]) * xs[0] + widen(wv[1]) * xs[1];
                    }
                }
            }
        }
        // SAFETY (both arms): the kernel is only chosen where its features were detected at
        // run time (`Kernel::best`; the tests check before forcing one); `w` holds `pairs`
        // interleaved steps and each activation row `pairs` pairs, which is all they read.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Bf16 => {
            let x = |ii: usize| acts.pairs(i + ii.min(mr - 1));
            let rows = [x(0), x(1), x(2), x(3), x(4), x(5)];
            unsafe {
                match mr {
                    1 => avx512::tile::<1>(w, &rows, pairs, &mut sums),
                    2 => avx512::tile::<2>(w, &rows, pairs, &mut sums),
                    3 => avx512::tile::<3>(w, &rows, pairs, &mut sums),
                    4 => avx512::tile::<4>(w, &rows, pairs, &mut sums),
                    5 => avx512::tile::<5>(w, &rows, pairs, &mut sums),
                    _ => avx512::tile::<6>(w, &rows, pairs, &mut sums),
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => {
            let x = |ii: usize| acts.widened(i + ii.min(mr - 1));
            let rows = [x(0), x(1), x(2), x(3), x(4), x(5)];
            unsafe {
                match mr {
                    1 => avx2::tile::<1>(w, &rows, pairs, &mut sums),
                    2 => avx2::tile::<2>(w, &rows, pairs, &mut sums),
                    3 => avx2::tile::<3>(w, &rows, pairs, &mut sums),
                    _ => {
                        // Three rows at a time keep 6 accumulators + 4 weights of 16 registers.
                        avx2::tile::<3>(w, &rows, pairs, &mut sums);
                        let (more, rest) = (&rows[3..], &mut sums[3..]);
                        match mr {
                            4 => avx2::tile::<1>(w, more, pairs, rest),
                            5 => avx2::tile::<2>(w, more, pairs, rest),
                            _ => avx2::tile::<3>(w, more, pairs, rest),
                        }
                    }
                }
            }
        }
    }
    sums
}

/// The nearest bf16 to `v` (ties to even), as bits; NaN stays NaN.
fn bf16_bits(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}

fn widen(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx512Bf16,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    /// AVX-512 BF16, else AVX2, else the reference. `MISTRALRS_FORCE_AVX2=1` (candle's switch
    /// for its own kernels) skips AVX-512 here too, so one machine can test both paths.
    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let forced = std::env::var("MISTRALRS_FORCE_AVX2").as_deref() == Ok("1");
            if avx512::available() && !forced {
                return Self::Avx512Bf16;
            }
            if avx2::available() {
                return Self::Avx2;
            }
        }
        Self::Scalar
    }
}

/// The activations rounded to bf16, each row padded with a zero to whole pairs: as bits (a
/// pair per u32, little-endian: the even position in the low half, as `vdpbf16ps` pairs
/// them) for AVX-512 BF16, as the f32 values of those bits for the other kernels.
struct Activations {
    pairs: usize,
    bits: Vec<u32>,
    widened: Vec<f32>,
}

impl Activations {
    fn round(x: &[f32], m: usize, in_features: usize, pairs: usize, kernel: Kernel) -> Self {
        let mut rounded = vec![0u16; m * pairs * PAIR];
        for (src, dst) in x
            .chunks_exact(in_features)
            .zip(rounded.chunks_exact_mut(pairs * PAIR))
            .take(m)
        {
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = bf16_bits(v);
            }
        }
        let (bits, widened) = match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Bf16 => (
                rounded
                    .chunks_exact(PAIR)
                    .map(|p| p[0] as u32 | (p[1] as u32) << 16)
                    .collect(),
                Vec::new(),
            ),
            _ => (Vec::new(), rounded.iter().map(|&b| widen(b)).collect()),
        };
        Self {
            pairs,
            bits,
            widened,
        }
    }

    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn pairs(&self, i: usize) -> &[u32] {
        &self.bits[i * self.pairs..(i + 1) * self.pairs]
    }

    fn widened(&self, i: usize) -> &[f32] {
        &self.widened[i * self.pairs * PAIR..(i + 1) * self.pairs * PAIR]
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{GROUP, PAIR, TILE_M};
    use std::arch::x86_64::*;

    /// Steps (64-byte lines) ahead to prefetch.
    const PREFETCH: usize = 16;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512bf16")
    }

    /// `sums[i][lane] = Σ x[i] · w[lane]` for the first `M` activation rows of `x`.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX-512 BF16; `w` must hold `pairs` interleaved steps of
    /// `GROUP * PAIR` values and each of the first `M` rows of `x` at least `pairs` pairs.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn tile<const M: usize>(
        w: &[u16],
        x: &[&[u32]; TILE_M],
        pairs: usize,
        sums: &mut [[f32; GROUP]; TILE_M],
    ) {
        debug_assert!(w.len() >= pairs * GROUP * PAIR);
        debug_assert!(x.iter().take(M).all(|r| r.len() >= pairs));
        // Even and odd steps into separate sums: with one activation row a single chain
        // would wait on `vdpbf16ps`'s latency every step.
        let mut acc = [[_mm512_setzero_ps(); M]; 2];
        for p in 0..pairs {
            // A hint only (never faults): the line PREFETCH steps ahead, so DRAM streams
            // while this one computes.
            _mm_prefetch::<_MM_HINT_T0>(
                w.as_ptr().wrapping_add((p + PREFETCH) * GROUP * PAIR) as *const i8
            );
            // SAFETY: step p lies inside `w` (the caller's contract); unaligned 64-byte load.
            let wv: __m512bh = std::mem::transmute(_mm512_loadu_si512(
                w.as_ptr().add(p * GROUP * PAIR) as *const _,
            ));
            for (a, row) in acc[p & 1].iter_mut().zip(x) {
                // SAFETY: p < pairs <= row.len().
                let xv: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*row.get_unchecked(p) as i32));
                *a = _mm512_dpbf16_ps(*a, xv, wv);
            }
        }
        for ((out, a), b) in sums.iter_mut().zip(&acc[0]).zip(&acc[1]) {
            _mm512_storeu_ps(out.as_mut_ptr(), _mm512_add_ps(*a, *b));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{GROUP, PAIR};
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// `sums[i][lane] = Σ x[i] · w[lane]` for the first `M` rows of `x` (`M` at most 3), the
    /// bf16 weights widened in registers: a bf16's bits are the top half of the f32's, so the
    /// even position of a pair is its u32 shifted left 16 and the odd one its top half masked.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `w` must hold `pairs` interleaved steps of
    /// `GROUP * PAIR` values and each of the first `M` rows of `x` at least `2 * pairs` values.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile<const M: usize>(
        w: &[u16],
        x: &[&[f32]],
        pairs: usize,
        sums: &mut [[f32; GROUP]],
    ) {
        debug_assert!(w.len() >= pairs * GROUP * PAIR && x.len() >= M && sums.len() >= M);
        debug_assert!(x.iter().take(M).all(|r| r.len() >= pairs * PAIR));
        let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        // Two registers of eight lanes per activation row: the group's 16 output rows.
        let mut acc = [[_mm256_setzero_ps(); 2]; M];
        for p in 0..pairs {
            let base = w.as_ptr().add(p * GROUP * PAIR);
            // SAFETY: step p lies inside `w`; two unaligned 32-byte loads of 8 rows' pairs.
            let halves = [
                _mm256_loadu_si256(base as *const __m256i),
                _mm256_loadu_si256(base.add(GROUP) as *const __m256i),
            ];
            let even = halves.map(|v| _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
            let odd = halves.map(|v| _mm256_castsi256_ps(_mm256_and_si256(v, high)));
            for (a, row) in acc.iter_mut().zip(x) {
                // SAFETY: 2p + 1 < 2 * pairs <= row.len().
                let x0 = _mm256_set1_ps(*row.get_unchecked(p * PAIR));
                let x1 = _mm256_set1_ps(*row.get_unchecked(p * PAIR + 1));
                for h in 0..2 {
                    a[h] = _mm256_fmadd_ps(even[h], x0, a[h]);
                    a[h] = _mm256_fmadd_ps(odd[h], x1, a[h]);
                }
            }
        }
        for (out, a) in sums.iter_mut().zip(&acc) {
            _mm256_storeu_ps(out.as_mut_ptr(), a[0]);
            _mm256_storeu_ps(out.as_mut_ptr().add(8), a[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeded values of several magnitudes.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        crate::model::kernel_test_values::uniform(n, seed)
            .enumerate()
            .map(|(i, v)| v * (1 + i % 7) as f32)
            .collect()
    }

    #[test]
    fn the_reference_is_the_product_of_the_rounded_values() {
        // 130 rows: three tasks' outputs put side by side.
        let (rows, width, m) = (130, 40, 3);
        let w = values(rows * width, 1);
        let x = values(m * width, 2);
        let b = Bf16Rows::from_f32(&w, rows, width).expect("shape");
        let out = b.matmul_with(&x, m, Kernel::Scalar);
        for i in 0..m {
            for j in 0..rows {
                let want: f64 = (0..width)
                    .map(|k| {
                        let wv = widen(bf16_bits(w[j * width + k])) as f64;
                        let xv = widen(bf16_bits(x[i * width + k])) as f64;
                        wv * xv
                    })
                    .sum();
                let got = out[i * rows + j] as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{got} {want}"
                );
                // And within bf16's rounding of the f32 product: each factor moves by at most
                // 2^-9 of itself, so each product by ~2^-8, the sum by 2^-8 of Σ|w·x| (2^-7 here).
                let exact: f32 = (0..width)
                    .map(|k| w[j * width + k] * x[i * width + k])
                    .sum();
                let scale: f32 = (0..width)
                    .map(|k| (w[j * width + k] * x[i * width + k]).abs())
                    .sum();
                assert!((got as f32 - exact).abs() <= scale / 128.0, "{got} {exact}");
            }
        }
    }

    /// Each SIMD kernel against the reference, over shapes around the tile and task sizes and
    /// widths that need padding; a kernel this CPU lacks is skipped, loudly.
    #[test]
    fn every_simd_kernel_this_cpu_has_matches_the_reference() {
        #[cfg(target_arch = "x86_64")]
        for (kernel, present) in [
            (Kernel::Avx512Bf16, avx512::available()),
            (Kernel::Avx2, avx2::available()),
        ] {
            if !present {
                eprintln!("!!! SKIPPING the {kernel:?} bf16 kernel test: this CPU lacks it !!!");
                continue;
            }
            // Over 64 rows: several tasks' blocks put side by side; 4 and 10 activation rows:
            // the AVX2 kernel's split tiles.
            for (rows, width, m) in [
                (1, 32, 1),
                (17, 96, 5),
                (40, 1000, 9),
                (3, 7, 2),
                (130, 33, 4),
                (130, 64, 10),
            ] {
                let w = values(rows * width, rows as u64);
                let x = values(m * width, width as u64);
                let b = Bf16Rows::from_f32(&w, rows, width).expect("shape");
                let want = b.matmul_with(&x, m, Kernel::Scalar);
                let got = b.matmul_with(&x, m, kernel);
                for (g, r) in got.iter().zip(&want) {
                    assert!(
                        (g - r).abs() <= 1e-4 * r.abs().max(1.0),
                        "{kernel:?}: {g} {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn mismatched_lengths_are_refused() {
        assert!(Bf16Rows::from_bits(&[0; 64], 2, 32).is_some());
        assert!(Bf16Rows::from_bits(&[0; 63], 2, 32).is_none());
        assert!(Bf16Rows::from_bits(&[], 0, 0).is_none());
    }
}
