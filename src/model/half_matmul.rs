//! Half-precision (bf16 or f16) weight matrices multiplied with f32 activations on the CPU,
//! without widening the weights in memory: half of f32's bytes per token (decoding at low
//! concurrency streams the weights, so bytes are time).
//!
//! The activations stay f32; each kernel widens the weights in registers (bf16: a shift, its
//! bits are the top half of an f32's; f16: `vcvtph2ps`) and multiplies with f32 FMAs. Kernels:
//! AVX-512F (both formats; on this project's machine ~1.5x the rate of AVX-512 BF16's
//! `vdpbf16ps`, which would also round the activations to bf16), AVX2 for bf16, AVX2 with F16C
//! for f16, and a scalar reference per format; chosen at run time, and the unit tests hold each
//! SIMD kernel to the reference on CPUs that have it.
//!
//! The weights are stored interleaved for those kernels: groups of [`GROUP`] rows, and within
//! a group, for each pair of input positions, the two values of row 0, then of row 1, ... So
//! one 64-byte load holds 16 rows' next two weights; the kernels accumulate a row's even and
//! odd positions in neighbouring lanes (or two registers, AVX2 bf16) added once at the end, so
//! no horizontal sums run per step; an activation pair is broadcast to every lane. Each row's
//! sum runs in the same order whatever the number of activation rows, so a row's result does
//! not depend on the batch.
//!
//! Knows the bf16 and f16 bit layouts and nothing of models or tensors' meaning.

use rayon::prelude::*;

/// Output rows interleaved together: one AVX-512 register of f32 sums.
const GROUP: usize = 16;
/// Values per interleaved step: a pair per row (a row's two neighbouring lanes).
const PAIR: usize = 2;
/// Row groups per rayon task.
const GROUPS_PER_TASK: usize = 4;
/// Activation rows per kernel call: each loaded weight vector meets this many from registers.
const TILE_M: usize = 6;

/// Which half-precision format a matrix holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Half {
    Bf16,
    F16,
}

impl Half {
    /// The nearest value of this format to `v` (ties to even), as bits; NaN stays NaN.
    fn bits(self, v: f32) -> u16 {
        match self {
            Self::Bf16 => half::bf16::from_f32(v).to_bits(),
            Self::F16 => half::f16::from_f32(v).to_bits(),
        }
    }

    fn widen(self, b: u16) -> f32 {
        match self {
            Self::Bf16 => f32::from_bits((b as u32) << 16),
            Self::F16 => half::f16::from_bits(b).to_f32(),
        }
    }
}

/// Weight rows as bf16 or f16 bits, interleaved (see the module doc); rows padded with zero
/// rows to whole groups, widths with zeros to whole pairs.
pub struct HalfRows {
    format: Half,
    rows: usize,
    in_features: usize,
    /// Pairs of input positions per row (the padded width / 2).
    pairs: usize,
    bits: Vec<u16>,
    /// Chosen once, when the matrix is made.
    kernel: Kernel,
}

impl HalfRows {
    /// From `rows` rows of `in_features` values of `format` (their bits). `None` if the
    /// lengths disagree.
    pub fn from_bits(format: Half, bits: &[u16], rows: usize, in_features: usize) -> Option<Self> {
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
            format,
            rows,
            in_features,
            pairs,
            bits: packed,
            kernel: Kernel::best(format),
        })
    }

    /// From f32 values, each rounded to the nearest value of `format` (exact for weights
    /// that were in it).
    pub fn from_f32(format: Half, values: &[f32], rows: usize, in_features: usize) -> Option<Self> {
        let bits: Vec<u16> = values.iter().map(|&v| format.bits(v)).collect();
        Self::from_bits(format, &bits, rows, in_features)
    }

    /// Several matrices of one width and format as one, their rows in order. `None` if the
    /// widths or formats differ.
    pub fn concat(parts: &[&HalfRows]) -> Option<Self> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.in_features != first.in_features || p.format != first.format)
        {
            return None;
        }
        let bits: Vec<u16> = parts.iter().flat_map(|p| p.unpacked()).collect();
        Self::from_bits(
            first.format,
            &bits,
            parts.iter().map(|p| p.rows).sum(),
            first.in_features,
        )
    }

    pub fn format(&self) -> Half {
        self.format
    }

    /// The values, widened, row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        self.unpacked()
            .into_iter()
            .map(|b| self.format.widen(b))
            .collect()
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
        let acts = Activations::new(x, m, self.in_features, self.pairs);
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
    let x = |ii: usize| acts.row(i + ii.min(mr - 1));
    match kernel {
        Kernel::Scalar(format) => {
            for (ii, out) in sums.iter_mut().enumerate().take(mr) {
                let x = acts.row(i + ii);
                for (step, xs) in w.chunks_exact(GROUP * PAIR).zip(x.chunks_exact(PAIR)) {
                    for (o, wv) in out.iter_mut().zip(step.chunks_exact(PAIR)) {
                        *o += format.widen(wv[0]) * xs[0] + format.widen(wv[1]) * xs[1];
                    }
                }
            }
        }
        // SAFETY (every SIMD arm): the kernel is only chosen where its features were detected
        // at run time (`Kernel::best`; the tests check before forcing one); `w` holds `pairs`
        // interleaved steps and each activation row `2 * pairs` values, which is all they read.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512(format) => {
            let rows = [x(0), x(1), x(2), x(3), x(4), x(5)];
            let bf16 = format == Half::Bf16;
            unsafe {
                match (mr, bf16) {
                    (1, true) => avx512::tile::<1, true>(w, &rows, pairs, &mut sums),
                    (2, true) => avx512::tile::<2, true>(w, &rows, pairs, &mut sums),
                    (3, true) => avx512::tile::<3, true>(w, &rows, pairs, &mut sums),
                    (4, true) => avx512::tile::<4, true>(w, &rows, pairs, &mut sums),
                    (5, true) => avx512::tile::<5, true>(w, &rows, pairs, &mut sums),
                    (_, true) => avx512::tile::<6, true>(w, &rows, pairs, &mut sums),
                    (1, false) => avx512::tile::<1, false>(w, &rows, pairs, &mut sums),
                    (2, false) => avx512::tile::<2, false>(w, &rows, pairs, &mut sums),
                    (3, false) => avx512::tile::<3, false>(w, &rows, pairs, &mut sums),
                    (4, false) => avx512::tile::<4, false>(w, &rows, pairs, &mut sums),
                    (5, false) => avx512::tile::<5, false>(w, &rows, pairs, &mut sums),
                    (_, false) => avx512::tile::<6, false>(w, &rows, pairs, &mut sums),
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2Bf16 => {
            let rows = [x(0), x(1), x(2), x(3), x(4), x(5)];
            unsafe {
                match mr {
                    1 => avx2_bf16::tile::<1>(w, &rows, pairs, &mut sums),
                    2 => avx2_bf16::tile::<2>(w, &rows, pairs, &mut sums),
                    3 => avx2_bf16::tile::<3>(w, &rows, pairs, &mut sums),
                    _ => {
                        // Three rows at a time keep 6 accumulators + 4 weights of 16 registers.
                        avx2_bf16::tile::<3>(w, &rows, pairs, &mut sums);
                        let (more, rest) = (&rows[3..], &mut sums[3..]);
                        match mr {
                            4 => avx2_bf16::tile::<1>(w, more, pairs, rest),
                            5 => avx2_bf16::tile::<2>(w, more, pairs, rest),
                            _ => avx2_bf16::tile::<3>(w, more, pairs, rest),
                        }
                    }
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2F16 => {
            // Two rows at a time keep 8 accumulators + 4 weights of 16 registers.
            for start in (0..mr).step_by(2) {
                let rows = [x(start), x(start + 1)];
                let out = &mut sums[start..];
                unsafe {
                    if mr - start == 1 {
                        avx2_f16::tile::<1>(w, &rows, pairs, out);
                    } else {
                        avx2_f16::tile::<2>(w, &rows, pairs, out);
                    }
                }
            }
        }
    }
    sums
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Scalar(Half),
    #[cfg(target_arch = "x86_64")]
    Avx512(Half),
    #[cfg(target_arch = "x86_64")]
    Avx2Bf16,
    #[cfg(target_arch = "x86_64")]
    Avx2F16,
}

/// Whether this CPU has a SIMD kernel for `format` here (AVX-512 or AVX2): only then is a
/// half-precision matrix faster than f32's (the scalar reference is ~10x slower).
pub fn fast_on_this_cpu(format: Half) -> bool {
    !matches!(Kernel::best(format), Kernel::Scalar(_))
}

impl Kernel {
    /// AVX-512, else AVX2, else the reference. `MISTRALRS_FORCE_AVX2=1` (candle's switch for
    /// its own kernels) skips AVX-512 here too, so one machine can test both paths.
    fn best(format: Half) -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let forced = std::env::var("MISTRALRS_FORCE_AVX2").as_deref() == Ok("1");
            if avx512::available() && !forced {
                return Self::Avx512(format);
            }
            match format {
                Half::Bf16 if avx2_bf16::available() => return Self::Avx2Bf16,
                Half::F16 if avx2_f16::available() => return Self::Avx2F16,
                _ => {}
            }
        }
        Self::Scalar(format)
    }
}

/// The activations, each row padded with zeros to whole pairs.
struct Activations {
    pairs: usize,
    values: Vec<f32>,
}

impl Activations {
    fn new(x: &[f32], m: usize, in_features: usize, pairs: usize) -> Self {
        let mut values = vec![0f32; m * pairs * PAIR];
        for (src, dst) in x
            .chunks_exact(in_features)
            .zip(values.chunks_exact_mut(pairs * PAIR))
            .take(m)
        {
            dst[..in_features].copy_from_slice(src);
        }
        Self { pairs, values }
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.pairs * PAIR..(i + 1) * self.pairs * PAIR]
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
    }

    /// `sums[i][row] = Σ x[i] · w[row]` for the first `M` activation rows of `x`, the weights
    /// (bf16 if `BF16`, else f16) widened in registers. A step's 16 rows x 2 positions widen
    /// to two registers of 8 rows' (even, odd) lane pairs, multiplied by the activation pair
    /// broadcast as (x0, x1, x0, x1, ...); each row's two lanes are added at the end. (Faster
    /// here than `vdpbf16ps`, which also needs the activations rounded to bf16.)
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `w` must hold `pairs` interleaved steps of `GROUP * PAIR`
    /// values and each of the first `M` rows of `x` at least `2 * pairs` values.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile<const M: usize, const BF16: bool>(
        w: &[u16],
        x: &[&[f32]; TILE_M],
        pairs: usize,
        sums: &mut [[f32; GROUP]; TILE_M],
    ) {
        debug_assert!(w.len() >= pairs * GROUP * PAIR);
        debug_assert!(x.iter().take(M).all(|r| r.len() >= pairs * PAIR));
        let mut acc = [[_mm512_setzero_ps(); 2]; M];
        for p in 0..pairs {
            // A hint only (never faults): the line PREFETCH steps ahead, so DRAM streams
            // while this one computes.
            _mm_prefetch::<_MM_HINT_T0>(
                w.as_ptr().wrapping_add((p + PREFETCH) * GROUP * PAIR) as *const i8
            );
            let base = w.as_ptr().add(p * GROUP * PAIR);
            // A bf16's bits are the top half of the f32's.
            let widen = |v: __m256i| {
                if BF16 {
                    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16))
                } else {
                    _mm512_cvtph_ps(v)
                }
            };
            // SAFETY: step p lies inside `w`; two unaligned 32-byte loads of 8 rows' pairs.
            let lo = widen(_mm256_loadu_si256(base as *const __m256i));
            let hi = widen(_mm256_loadu_si256(base.add(GROUP) as *const __m256i));
            for (a, row) in acc.iter_mut().zip(x) {
                // SAFETY: 2p + 1 < 2 * pairs <= row.len(): the pair's 8 bytes, unaligned.
                let pair = std::ptr::read_unaligned(row.as_ptr().add(p * PAIR) as *const f64);
                let xv = _mm512_castpd_ps(_mm512_set1_pd(pair));
                a[0] = _mm512_fmadd_ps(lo, xv, a[0]);
                a[1] = _mm512_fmadd_ps(hi, xv, a[1]);
            }
        }
        for (out, a) in sums.iter_mut().zip(&acc) {
            let mut lanes = [0f32; 2 * GROUP];
            _mm512_storeu_ps(lanes.as_mut_ptr(), a[0]);
            _mm512_storeu_ps(lanes.as_mut_ptr().add(GROUP), a[1]);
            for (o, pair) in out.iter_mut().zip(lanes.chunks_exact(PAIR)) {
                *o = pair[0] + pair[1];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2_bf16 {
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

#[cfg(target_arch = "x86_64")]
mod avx2_f16 {
    use super::{GROUP, PAIR};
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    /// As `avx512::tile` with 8-lane registers: a step widens to four registers of 4
    /// rows' (even, odd) lane pairs. `M` at most 2.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `w` must hold `pairs` interleaved steps of
    /// `GROUP * PAIR` values and each of the first `M` rows of `x` at least `2 * pairs` values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile<const M: usize>(
        w: &[u16],
        x: &[&[f32]],
        pairs: usize,
        sums: &mut [[f32; GROUP]],
    ) {
        debug_assert!(w.len() >= pairs * GROUP * PAIR && x.len() >= M && sums.len() >= M);
        debug_assert!(x.iter().take(M).all(|r| r.len() >= pairs * PAIR));
        let mut acc = [[_mm256_setzero_ps(); 4]; M];
        for p in 0..pairs {
            let base = w.as_ptr().add(p * GROUP * PAIR);
            // SAFETY: step p lies inside `w`; four unaligned 16-byte loads of 4 rows' pairs.
            let wv: [__m256; 4] = std::array::from_fn(|q| {
                _mm256_cvtph_ps(_mm_loadu_si128(base.add(q * 8) as *const __m128i))
            });
            for (a, row) in acc.iter_mut().zip(x) {
                // SAFETY: 2p + 1 < 2 * pairs <= row.len(): the pair's 8 bytes, unaligned.
                let pair = std::ptr::read_unaligned(row.as_ptr().add(p * PAIR) as *const f64);
                let xv = _mm256_castpd_ps(_mm256_set1_pd(pair));
                for q in 0..4 {
                    a[q] = _mm256_fmadd_ps(wv[q], xv, a[q]);
                }
            }
        }
        for (out, a) in sums.iter_mut().zip(&acc) {
            let mut lanes = [0f32; 2 * GROUP];
            for (q, v) in a.iter().enumerate() {
                _mm256_storeu_ps(lanes.as_mut_ptr().add(q * 8), *v);
            }
            for (o, pair) in out.iter_mut().zip(lanes.chunks_exact(PAIR)) {
                *o = pair[0] + pair[1];
            }
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

    /// The reference is the f32 product of the rounded weights with the activations as they
    /// are, within the format's rounding of the exact product: each weight moves by at most
    /// 2^-9 (bf16) or 2^-11 (f16) of itself, so the sum by that much of Σ|w·x|.
    #[test]
    fn the_reference_rounds_only_the_weights() {
        // 130 rows: three tasks' outputs put side by side.
        let (rows, width, m) = (130, 40, 3);
        let w = values(rows * width, 1);
        let x = values(m * width, 2);
        for (format, rel) in [(Half::Bf16, 1.0 / 512.0), (Half::F16, 1.0 / 2048.0)] {
            let b = HalfRows::from_f32(format, &w, rows, width).expect("shape");
            let out = b.matmul_with(&x, m, Kernel::Scalar(format));
            for i in 0..m {
                for j in 0..rows {
                    let (row, xs) = (&w[j * width..][..width], &x[i * width..][..width]);
                    let want: f64 = row
                        .iter()
                        .zip(xs)
                        .map(|(&wv, &xv)| format.widen(format.bits(wv)) as f64 * xv as f64)
                        .sum();
                    let got = out[i * rows + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "{format:?}: {got} {want}"
                    );
                    let exact: f64 = row.iter().zip(xs).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let scale: f64 = row
                        .iter()
                        .zip(xs)
                        .map(|(&a, &b)| (a * b).abs() as f64)
                        .sum();
                    assert!(
                        (got - exact).abs() <= scale * rel * 1.01 + 1e-5,
                        "{format:?}: {got} {exact}"
                    );
                }
            }
        }
    }

    /// Each SIMD kernel against the reference of its format, over shapes around the tile and
    /// task sizes and widths that need padding; a kernel this CPU lacks is skipped, loudly.
    #[test]
    fn every_simd_kernel_this_cpu_has_matches_the_reference() {
        #[cfg(target_arch = "x86_64")]
        for (kernel, format, present) in [
            (Kernel::Avx512(Half::Bf16), Half::Bf16, avx512::available()),
            (Kernel::Avx2Bf16, Half::Bf16, avx2_bf16::available()),
            (Kernel::Avx512(Half::F16), Half::F16, avx512::available()),
            (Kernel::Avx2F16, Half::F16, avx2_f16::available()),
        ] {
            if !present {
                eprintln!("!!! SKIPPING the {kernel:?} kernel test: this CPU lacks it !!!");
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
                let b = HalfRows::from_f32(format, &w, rows, width).expect("shape");
                let want = b.matmul_with(&x, m, Kernel::Scalar(format));
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
        for f in [Half::Bf16, Half::F16] {
            assert!(HalfRows::from_bits(f, &[0; 64], 2, 32).is_some());
            assert!(HalfRows::from_bits(f, &[0; 63], 2, 32).is_none());
            assert!(HalfRows::from_bits(f, &[], 0, 0).is_none());
        }
        let (a, b) = (
            HalfRows::from_bits(Half::Bf16, &[0; 64], 2, 32).expect("bf16"),
            HalfRows::from_bits(Half::F16, &[0; 64], 2, 32).expect("f16"),
        );
        assert!(HalfRows::concat(&[&a, &b]).is_none(), "formats differ");
        assert!(HalfRows::concat(&[&a, &a]).is_some());
    }
}
