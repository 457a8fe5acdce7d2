//! Batched Q8_0 × Q8_0 matrix products for x86 CPUs with AVX2 but no VNNI, where candle 0.11
//! has no batched Q8_0 kernel (its repacked one needs `vpdpbusd`; without it every activation
//! row streams the whole weight matrix again, ~30 GFLOP/s at any batch).
//!
//! The activations are quantized once per call to Q8_0 (ggml's rounding), then each weight row
//! is loaded once and multiplied with every activation row while it sits in L1: the sign trick
//! llama.cpp uses (`|w|` as unsigned bytes times `x` carrying `w`'s sign, `vpmaddubsw`, which
//! cannot overflow for |w|, |x| ≤ 128), then `vpmaddwd` and one fused multiply-add of the two
//! block scales per block. A scalar reference computes the same sums on every machine; the unit
//! tests hold the AVX2 path to it on CPUs that have AVX2.
//!
//! Knows GGML's Q8_0 block layout and nothing of models or tensors' meaning.

use rayon::prelude::*;

/// Values per Q8_0 block.
const BLOCK: usize = 32;
/// Bytes per Q8_0 block: an f16 scale, then 32 signed bytes.
const BLOCK_BYTES: usize = 34;
/// Weight rows per rayon task: enough work to amortize scheduling, few enough to share out.
const ROWS_PER_TASK: usize = 16;

/// Whether this CPU should multiply Q8_0 through this module rather than candle: AVX2 and FMA
/// without AVX-512 VNNI or AVX-VNNI (or candle told to act as such with
/// `MISTRALRS_FORCE_AVX2=1`, so the two paths can be compared on one machine).
/// `DISTILLERY_Q8_0_KERNEL=candle` leaves Q8_0 to candle, for paired benchmarks.
pub fn preferred() -> bool {
    if std::env::var("DISTILLERY_Q8_0_KERNEL").as_deref() == Ok("candle") {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        let forced = std::env::var("MISTRALRS_FORCE_AVX2").as_deref() == Ok("1");
        let vnni = (is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni"))
            || is_x86_feature_detected!("avxvnni");
        avx2 && (forced || !vnni)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Rows of Q8_0 blocks unpacked for the kernel: one f32 scale and 32 bytes per block.
pub struct Q8Rows {
    rows: usize,
    blocks_per_row: usize,
    scales: Vec<f32>,
    quants: Vec<i8>,
}

impl Q8Rows {
    /// `rows` rows of `width / 32` GGML Q8_0 blocks each, as stored in a GGUF file or a
    /// candle `QTensor`. `None` when the bytes do not have that shape.
    pub fn from_blocks(raw: &[u8], rows: usize, width: usize) -> Option<Self> {
        if !width.is_multiple_of(BLOCK) || raw.len() != rows * width / BLOCK * BLOCK_BYTES {
            return None;
        }
        let n = rows * width / BLOCK;
        let mut scales = Vec::with_capacity(n);
        let mut quants = Vec::with_capacity(n * BLOCK);
        for block in raw.chunks_exact(BLOCK_BYTES) {
            scales.push(half::f16::from_le_bytes([block[0], block[1]]).to_f32());
            quants.extend(block[2..].iter().map(|&b| b as i8));
        }
        Some(Self {
            rows,
            blocks_per_row: width / BLOCK,
            scales,
            quants,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn width(&self) -> usize {
        self.blocks_per_row * BLOCK
    }

    /// Bytes held: an f32 scale and 32 bytes per block.
    pub fn bytes(&self) -> usize {
        self.scales.len() * 4 + self.quants.len()
    }

    /// `x @ self.T` for `x` of `m` rows of [`Self::width`] values, row-major `[m, rows]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_with(x, m, Kernel::best())
    }

    fn matmul_with(&self, x: &[f32], m: usize, kernel: Kernel) -> Vec<f32> {
        let acts = Activations::quantize(x, m, self.blocks_per_row);
        let n = self.rows;
        // Computed column-major (each task owns whole weight rows), transposed at the end.
        let mut out_t = vec![0f32; n * m];
        out_t
            .par_chunks_mut(ROWS_PER_TASK * m)
            .enumerate()
            .for_each(|(task, out)| {
                for (i, col) in out.chunks_exact_mut(m).enumerate() {
                    let row = task * ROWS_PER_TASK + i;
                    self.dot_row(row, &acts, col, kernel);
                }
            });
        if m == 1 {
            // One row: column-major is row-major.
            return out_t;
        }
        let mut out = vec![0f32; m * n];
        for (j, col) in out_t.chunks_exact(m).enumerate() {
            for (i, v) in col.iter().enumerate() {
                out[i * n + j] = *v;
            }
        }
        out
    }

    /// Weight row `row` against every activation row, into `out[0..m]`.
    fn dot_row(&self, row: usize, acts: &Activations, out: &mut [f32], kernel: Kernel) {
        let nb = self.blocks_per_row;
        let w_q = &self.quants[row * nb * BLOCK..(row + 1) * nb * BLOCK];
        let w_d = &self.scales[row * nb..(row + 1) * nb];
        match kernel {
            Kernel::Scalar => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = scalar_dot(w_q, w_d, acts.row_quants(i), acts.row_scales(i));
                }
            }
            // SAFETY (both calls): `Kernel::Avx2` is only chosen where `avx2` and `fma` were
            // detected at run time (`Kernel::best`, and the tests check before forcing it);
            // every slice passed holds `nb` whole blocks, which is all the kernels read.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                // Four activation rows at a time: each weight block is loaded once for four
                // independent accumulator chains (one chain stalls on the FMA's latency).
                let mut tiles = out.chunks_exact_mut(4);
                let mut i = 0;
                for tile in &mut tiles {
                    let x_q = [0, 1, 2, 3].map(|r| acts.row_quants(i + r));
                    let x_d = [0, 1, 2, 3].map(|r| acts.row_scales(i + r));
                    tile.copy_from_slice(&unsafe { avx2_dot4(w_q, w_d, x_q, x_d, nb) });
                    i += 4;
                }
                for o in tiles.into_remainder() {
                    *o = unsafe { avx2_dot(w_q, w_d, acts.row_quants(i), acts.row_scales(i), nb) };
                    i += 1;
                }
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Self::Avx2;
        }
        Self::Scalar
    }
}

/// The activations as Q8_0 blocks (ggml's `quantize_row_q8_0`: scale = max |x| / 127, values
/// rounded half away from zero), so they lie in [-127, 127].
struct Activations {
    blocks_per_row: usize,
    scales: Vec<f32>,
    quants: Vec<i8>,
}

impl Activations {
    fn quantize(x: &[f32], m: usize, blocks_per_row: usize) -> Self {
        let n = m * blocks_per_row;
        let mut scales = Vec::with_capacity(n);
        let mut quants = Vec::with_capacity(n * BLOCK);
        for block in x[..n * BLOCK].chunks_exact(BLOCK) {
            let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
            // The scale as the f16 ggml stores, so the products match candle's Q8_0 path.
            let d = half::f16::from_f32(amax / 127.0).to_f32();
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            scales.push(d);
            quants.extend(
                block
                    .iter()
                    .map(|v| (v * id).round().clamp(-127.0, 127.0) as i8),
            );
        }
        Self {
            blocks_per_row,
            scales,
            quants,
        }
    }

    fn row_quants(&self, i: usize) -> &[i8] {
        let len = self.blocks_per_row * BLOCK;
        &self.quants[i * len..(i + 1) * len]
    }

    fn row_scales(&self, i: usize) -> &[f32] {
        &self.scales[i * self.blocks_per_row..(i + 1) * self.blocks_per_row]
    }
}

fn scalar_dot(w_q: &[i8], w_d: &[f32], x_q: &[i8], x_d: &[f32]) -> f32 {
    w_q.chunks_exact(BLOCK)
        .zip(x_q.chunks_exact(BLOCK))
        .zip(w_d.iter().zip(x_d))
        .map(|((w, x), (dw, dx))| {
            let s: i32 = w.iter().zip(x).map(|(&a, &b)| a as i32 * b as i32).sum();
            s as f32 * (dw * dx)
        })
        .sum()
}

/// # Safety
/// The CPU must have AVX2 and FMA; `w_q` and `x_q` must hold at least `nb * 32` values and
/// `w_d`, `x_d` at least `nb` scales.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_dot(w_q: &[i8], w_d: &[f32], x_q: &[i8], x_d: &[f32], nb: usize) -> f32 {
    use std::arch::x86_64::*;
    debug_assert!(w_q.len() >= nb * BLOCK && x_q.len() >= nb * BLOCK);
    debug_assert!(w_d.len() >= nb && x_d.len() >= nb);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    for b in 0..nb {
        // SAFETY: block b lies inside both slices (the caller's contract); unaligned loads.
        let w = _mm256_loadu_si256(w_q.as_ptr().add(b * BLOCK) as *const __m256i);
        let x = _mm256_loadu_si256(x_q.as_ptr().add(b * BLOCK) as *const __m256i);
        // |w| as unsigned bytes, x with w's sign: their products are w * x, and a pair of them
        // sums to at most 2 * 128 * 127, inside vpmaddubsw's i16.
        let w_abs = _mm256_sign_epi8(w, w);
        let x_signed = _mm256_sign_epi8(x, w);
        let pairs = _mm256_maddubs_epi16(w_abs, x_signed);
        let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
        let scale = _mm256_set1_ps(*w_d.get_unchecked(b) * *x_d.get_unchecked(b));
        acc = _mm256_fmadd_ps(scale, sums, acc);
    }
    hsum(acc)
}

/// [`avx2_dot`] of one weight row against four activation rows.
///
/// # Safety
/// As for [`avx2_dot`], for each of the four rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_dot4(
    w_q: &[i8],
    w_d: &[f32],
    x_q: [&[i8]; 4],
    x_d: [&[f32]; 4],
    nb: usize,
) -> [f32; 4] {
    use std::arch::x86_64::*;
    debug_assert!(w_q.len() >= nb * BLOCK && w_d.len() >= nb);
    debug_assert!(x_q.iter().all(|x| x.len() >= nb * BLOCK) && x_d.iter().all(|d| d.len() >= nb));
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); 4];
    for b in 0..nb {
        // SAFETY: block b lies inside every slice (the caller's contract); unaligned loads.
        let w = _mm256_loadu_si256(w_q.as_ptr().add(b * BLOCK) as *const __m256i);
        let w_abs = _mm256_sign_epi8(w, w);
        let dw = *w_d.get_unchecked(b);
        for r in 0..4 {
            let x = _mm256_loadu_si256(x_q[r].as_ptr().add(b * BLOCK) as *const __m256i);
            let pairs = _mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(x, w));
            let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
            let scale = _mm256_set1_ps(dw * *x_d[r].get_unchecked(b));
            acc[r] = _mm256_fmadd_ps(scale, sums, acc[r]);
        }
    }
    [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])]
}

/// The sum of the eight lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(acc: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
    let one = _mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1));
    _mm_cvtss_f32(one)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeded values of several magnitudes (a few zero blocks among them).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        crate::model::kernel_test_values::uniform(n, seed)
            .enumerate()
            .map(|(i, v)| {
                if (i / BLOCK) % 13 == 5 {
                    0.0
                } else {
                    v * (1 + (i / BLOCK) % 4) as f32
                }
            })
            .collect()
    }

    fn q8_0_bytes(w: &[f32]) -> Vec<u8> {
        let acts = Activations::quantize(w, 1, w.len() / BLOCK);
        let mut raw = Vec::new();
        for (d, q) in acts.scales.iter().zip(acts.quants.chunks_exact(BLOCK)) {
            raw.extend_from_slice(&half::f16::from_f32(*d).to_le_bytes());
            raw.extend(q.iter().map(|&v| v as u8));
        }
        raw
    }

    #[test]
    fn the_scalar_reference_is_the_exact_product_of_the_blocks() {
        let (rows, width, m) = (3, 64, 2);
        let w = values(rows * width, 1);
        let x = values(m * width, 2);
        let q = Q8Rows::from_blocks(&q8_0_bytes(&w), rows, width).expect("whole blocks");
        let out = q.matmul_with(&x, m, Kernel::Scalar);
        let acts = Activations::quantize(&x, m, width / BLOCK);
        for i in 0..m {
            for j in 0..rows {
                let mut want = 0f64;
                for k in 0..width {
                    let wv = q.quants[j * width + k] as f64 * q.scales[j * 2 + k / BLOCK] as f64;
                    let xv =
                        acts.quants[i * width + k] as f64 * acts.scales[i * 2 + k / BLOCK] as f64;
                    want += wv * xv;
                }
                let got = out[i * rows + j] as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{got} {want}"
                );
            }
        }
        // And close to the float product: Q8_0's error on both sides.
        for i in 0..m {
            for j in 0..rows {
                let exact: f32 = (0..width)
                    .map(|k| x[i * width + k] * w[j * width + k])
                    .sum();
                let got = out[i * rows + j];
                assert!(
                    (got - exact).abs() < 0.05 * (1.0 + exact.abs()),
                    "{got} {exact}"
                );
            }
        }
    }

    #[test]
    fn the_avx2_kernel_matches_the_scalar_reference() {
        #[cfg(target_arch = "x86_64")]
        {
            if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
                eprintln!("!!! SKIPPING the AVX2 Q8_0 kernel test: this CPU has no AVX2/FMA !!!");
                return;
            }
            // Shapes around the task size and the block count, batches of 1 to 9 rows,
            // extreme values (-127/127 weights against -127/127 activations).
            for (rows, width, m) in [(1, 32, 1), (17, 256, 3), (40, 1024, 9), (33, 96, 4)] {
                let mut w = values(rows * width, rows as u64);
                w[0] = -1.0;
                w[1] = 1.0;
                let mut x = values(m * width, width as u64);
                x[0] = 1.0;
                x[1] = -1.0;
                let q = Q8Rows::from_blocks(&q8_0_bytes(&w), rows, width).expect("whole blocks");
                let want = q.matmul_with(&x, m, Kernel::Scalar);
                let got = q.matmul_with(&x, m, Kernel::Avx2);
                for (g, r) in got.iter().zip(&want) {
                    assert!((g - r).abs() <= 1e-5 * r.abs().max(1.0), "{g} {r}");
                }
            }
        }
    }

    #[test]
    fn blocks_of_the_wrong_size_are_refused() {
        assert!(Q8Rows::from_blocks(&[0; 34], 1, 32).is_some());
        assert!(Q8Rows::from_blocks(&[0; 33], 1, 32).is_none());
        assert!(Q8Rows::from_blocks(&[0; 34], 1, 16).is_none());
    }
}
