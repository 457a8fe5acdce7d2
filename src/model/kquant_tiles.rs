//! What our k-quant kernels (`q4_k_vnni`, `q6_k_vnni`) share: the activations, quantized to
//! int8 once per matmul, and the pass of every activation row over tiles of 16 weight rows ×
//! one 256-value super-block.
//!
//! Activations: per 256 values (one super-block), scale = max |x| / 127, rounded half away from
//! zero, with the sums of each 32-value sub-block's quants (what Q4_K's minimums multiply) and
//! a copy offset by +128 as unsigned bytes (Q6_K's kernel takes the weights as the signed
//! operand). A row's quantization depends on that row alone, and the vectorized path rounds
//! exactly as the scalar one (`f32::round`).
//!
//! The pass: each task owns a few row tiles and walks the super-blocks in order, every row tile
//! at one super-block before the next, so that super-block's activations (256 bytes a row)
//! stay in L1 across the tiles; each (weight row, activation row) sum is accumulated in the
//! same order whatever the number of rows. Knows nothing of a tile's layout.

use rayon::prelude::*;

/// Values per super-block.
pub const QK: usize = 256;
/// Weight rows per tile: one 32-bit lane each in a 512-bit register.
pub const TILE_ROWS: usize = 16;
/// Activation rows sharing one pass over a tile (a kernel's registers hold their sums).
pub const MAX_M: usize = 8;
/// Row tiles per task: their shared super-block of activations stays in L1 between them.
const TILES_PER_TASK: usize = 4;

/// One format's two implementations of "a tile × up to [`MAX_M`] activation rows of one
/// super-block, added into `acc` (`[rows][16]`)".
pub struct TileKernels<T> {
    /// `scalar(tile, acts, sb, row, acc)`: one activation row, the reference.
    pub scalar: fn(&T, &Activations, usize, usize, &mut [f32]),
    /// `simd[M - 1](tile, next, acts, sb, first, acc)`: M rows from `first`, fetching `next`
    /// meanwhile. Unsafe: only where [`vnni_available`].
    #[cfg(target_arch = "x86_64")]
    pub simd: [SimdTile<T>; MAX_M],
}

#[cfg(target_arch = "x86_64")]
pub type SimdTile<T> = unsafe fn(&T, Option<&T>, &Activations, usize, usize, &mut [f32]);

/// `[f::<1>, …, f::<8>]`: a SIMD kernel for each number of activation rows (a constant, so
/// that its accumulators stay in registers).
macro_rules! simd_by_rows {
    ($($f:ident)::+) => {
        [
            $($f)::+::<1>,
            $($f)::+::<2>,
            $($f)::+::<3>,
            $($f)::+::<4>,
            $($f)::+::<5>,
            $($f)::+::<6>,
            $($f)::+::<7>,
            $($f)::+::<8>,
        ]
    };
}
pub(crate) use simd_by_rows;

/// `x @ w.T` for `x` of `m` rows, over `tiles` (`[row tile][super-block]`, `blocks_per_row`
/// super-blocks a row) of `rows` weight rows, by `kernel`'s implementation in `fns`;
/// row-major `[m, rows]`.
pub fn matmul<T: Sync>(
    tiles: &[T],
    rows: usize,
    blocks_per_row: usize,
    x: &[f32],
    m: usize,
    kernel: Kernel,
    fns: &TileKernels<T>,
) -> Vec<f32> {
    let kernel = |tile: &T, next: Option<&T>, acts: &Activations, sb, first, acc: &mut [f32]| {
        let n = acc.len() / TILE_ROWS;
        match kernel {
            Kernel::Scalar => {
                for (i, acc) in acc.chunks_exact_mut(TILE_ROWS).enumerate() {
                    (fns.scalar)(tile, acts, sb, first + i, acc);
                }
            }
            // SAFETY: `Kernel::Avx512` is only chosen where the features were found at run
            // time (`Kernel::best`, `Kernel::on_this_cpu`); the callers pass at most MAX_M
            // rows (1 <= n <= 8), and the SIMD kernels read only the tile, `acc` ([n][16])
            // and the activations' rows `first..first + n` of super-block `sb`, which
            // `acts` holds.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { (fns.simd[n - 1])(tile, next, acts, sb, first, acc) },
        }
    };
    // The unsafe writes below cover every output value only for whole row tiles.
    assert!(
        rows.is_multiple_of(TILE_ROWS) && tiles.len() == rows / TILE_ROWS * blocks_per_row,
        "{} tiles for {rows} rows of {blocks_per_row} super-blocks",
        tiles.len()
    );
    if m == 0 {
        return Vec::new();
    }
    let kb = blocks_per_row;
    let acts = Activations::quantize(x, m, kb);
    let row_tiles = rows / TILE_ROWS;
    let per_tile = TILE_ROWS * m;
    let mut out: Vec<f32> = Vec::with_capacity(m * rows);
    let dst = Output(out.as_mut_ptr());
    (0..row_tiles.div_ceil(TILES_PER_TASK))
        .into_par_iter()
        .for_each(|task| {
            let first_tile = task * TILES_PER_TASK;
            let here = TILES_PER_TASK.min(row_tiles - first_tile);
            // Accumulated per row tile as [m][16] in a buffer of the task's own (zeroed in
            // parallel, in cache), then copied to the output's rows.
            let mut acc = vec![0f32; here * per_tile];
            for sb in 0..kb {
                for (t, acc) in acc.chunks_mut(per_tile).enumerate() {
                    let at = (first_tile + t) * kb + sb;
                    let tile = &tiles[at];
                    // The next tile in memory: this tile's next super-block.
                    let next = tiles.get(at + 1);
                    for (chunk, acc) in acc.chunks_mut(TILE_ROWS * MAX_M).enumerate() {
                        let next = if chunk == 0 { next } else { None };
                        kernel(tile, next, &acts, sb, chunk * MAX_M, acc);
                    }
                }
            }
            for (t, acc) in acc.chunks_exact(per_tile).enumerate() {
                let column = (first_tile + t) * TILE_ROWS;
                for (i, vals) in acc.chunks_exact(TILE_ROWS).enumerate() {
                    // SAFETY: `out` has capacity for m × rows values; row i's columns
                    // column..column + 16 lie within it (column + 16 <= rows), and this task
                    // alone writes them (tasks own disjoint row tiles), so the writes neither
                    // overlap nor race.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            vals.as_ptr(),
                            dst.at(i * rows + column),
                            TILE_ROWS,
                        )
                    };
                }
            }
        });
    // SAFETY: the tasks cover every row tile, each writing its 16 columns of all m rows: every
    // one of the m × rows values was initialized above.
    unsafe { out.set_len(m * rows) };
    out
}

/// The output's buffer, shared by the tasks of [`matmul`], which write disjoint parts of it.
struct Output(*mut f32);

impl Output {
    /// # Safety
    /// `offset` must lie within the buffer's capacity.
    unsafe fn at(&self, offset: usize) -> *mut f32 {
        // SAFETY: as the caller promises.
        unsafe { self.0.add(offset) }
    }
}

// SAFETY: the pointer is only written through, at places no two tasks share (see `matmul`),
// and the buffer outlives the parallel loop.
unsafe impl Sync for Output {}
unsafe impl Send for Output {}

/// Which implementation multiplies a tile: the scalar reference (every machine) or AVX-512
/// VNNI. The kernels' modules hold one function of each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernel {
    pub fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        if vnni_available() {
            return Self::Avx512;
        }
        Self::Scalar
    }

    /// Every kernel this CPU can run, the scalar reference first.
    #[cfg(test)]
    pub fn on_this_cpu() -> Vec<Self> {
        let mut k = vec![Self::Scalar];
        #[cfg(target_arch = "x86_64")]
        if vnni_available() {
            k.push(Self::Avx512);
        }
        k
    }
}

/// AVX-512 F, BW and VNNI: what the SIMD kernels are compiled for.
pub fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Seeded activations for the kernels' tests: uniform values at three magnitudes.
#[cfg(test)]
pub fn test_activations(m: usize, width: usize, seed: u64) -> Vec<f32> {
    crate::model::kernel_test_values::uniform(m * width, seed)
        .enumerate()
        .map(|(i, v)| v * (1 + i % 3) as f32)
        .collect()
}

pub struct Activations {
    blocks_per_row: usize,
    quants: Vec<i8>,
    /// Per row and super-block: the scale.
    scales: Vec<f32>,
    /// Per row, super-block and 32-value sub-block: the scale times the sum of the quants.
    sums32: Vec<f32>,
    /// The quants + 128.
    biased: Vec<u8>,
}

impl Activations {
    /// `m` rows of `blocks_per_row × 256` values from `x` (row-major).
    pub fn quantize(x: &[f32], m: usize, blocks_per_row: usize) -> Self {
        let n = m * blocks_per_row;
        let mut quants = vec![0i8; n * QK];
        let mut scales = vec![0f32; n];
        let mut sums32 = vec![0f32; n * 8];
        let mut biased = vec![0u8; n * QK];
        let simd = avx512::available();
        // In parallel: a long row (a down projection's 8,960 values × 64 rows) takes a
        // noticeable share of a step on one thread.
        x[..n * QK]
            .par_chunks_exact(QK)
            .zip(quants.par_chunks_exact_mut(QK))
            .zip(scales.par_iter_mut())
            .zip(
                sums32
                    .par_chunks_exact_mut(8)
                    .zip(biased.par_chunks_exact_mut(QK)),
            )
            .with_min_len(16)
            .for_each(|(((x, q), d), (s32, u))| {
                *d = quantize_block_with(simd, x, q, s32);
                for (u, q) in u.iter_mut().zip(q.iter()) {
                    *u = (*q as u8) ^ 0x80;
                }
            });
        Self {
            blocks_per_row,
            quants,
            scales,
            sums32,
            biased,
        }
    }

    /// Row `i`'s quants of super-block `sb`.
    pub fn block(&self, i: usize, sb: usize) -> &[i8] {
        let at = (i * self.blocks_per_row + sb) * QK;
        &self.quants[at..at + QK]
    }

    pub fn scale(&self, i: usize, sb: usize) -> f32 {
        self.scales[i * self.blocks_per_row + sb]
    }

    /// The eight 32-value sub-blocks' scale × sum.
    pub fn sums32(&self, i: usize, sb: usize) -> &[f32] {
        let at = (i * self.blocks_per_row + sb) * 8;
        &self.sums32[at..at + 8]
    }

    /// Row `i`'s quants of super-block `sb` plus 128.
    pub fn biased_block(&self, i: usize, sb: usize) -> &[u8] {
        let at = (i * self.blocks_per_row + sb) * QK;
        &self.biased[at..at + QK]
    }
}

/// [`quantize_block`], compiled for AVX-512 where `simd`.
fn quantize_block_with(simd: bool, x: &[f32], q: &mut [i8], sums32: &mut [f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is `avx512::available()`: the features the function is compiled for
        // were found at run time; the callers pass one super-block (256 values, 8 and 16
        // sums).
        return unsafe { avx512::quantize_block(x, q, sums32) };
    }
    let _ = simd;
    quantize_block(x, q, sums32)
}

/// One super-block: its scale returned, its quants into `q`, the sub-blocks' sums into
/// `sums32`. The reference for `avx512::quantize_block`.
fn quantize_block(x: &[f32], q: &mut [i8], sums32: &mut [f32]) -> f32 {
    let mut lanes = [0f32; 16];
    for c in x.chunks_exact(16) {
        for (l, v) in lanes.iter_mut().zip(c) {
            let a = v.abs();
            *l = if a > *l { a } else { *l };
        }
    }
    let amax = lanes.iter().fold(0f32, |a, &l| if l > a { l } else { a });
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut s16 = [0i32; 16];
    for ((x, q), s) in x.chunks_exact(16).zip(q.chunks_exact_mut(16)).zip(&mut s16) {
        let mut r16 = [0i32; 16];
        for ((v, q), r16) in x.iter().zip(q.iter_mut()).zip(r16.iter_mut()) {
            let y = v * id;
            let t = y.trunc();
            let r = if (y - t).abs() >= 0.5 {
                t + 1f32.copysign(y)
            } else {
                t
            };
            let r = r.clamp(-127.0, 127.0) as i32;
            *q = r as i8;
            *r16 = r;
        }
        *s = r16.iter().sum();
    }
    for (j, s) in sums32.iter_mut().enumerate() {
        *s = d * (s16[2 * j] + s16[2 * j + 1]) as f32;
    }
    d
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
    }

    /// [`super::quantize_block`] in AVX-512: the same result for finite inputs (the maximum
    /// is order-independent, the rounding is emulated exactly, the sums are integers).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BW; `x` and `q` hold 256 values, `sums32` 8,
    /// and `sums32` 8.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn quantize_block(x: &[f32], q: &mut [i8], sums32: &mut [f32]) -> f32 {
        use std::arch::x86_64::*;
        debug_assert!(x.len() >= super::QK && q.len() >= super::QK);
        let mut m = _mm512_setzero_ps();
        for c in 0..16 {
            // SAFETY: 16 × 16 values, within x's 256.
            let v = _mm512_abs_ps(_mm512_loadu_ps(x.as_ptr().add(16 * c)));
            // A NaN is skipped as the scalar `a > l` comparison skips it.
            m = _mm512_max_ps(v, m);
        }
        let amax = _mm512_reduce_max_ps(m);
        let d = amax / 127.0;
        let id = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let sign = _mm512_set1_epi32(i32::MIN);
        let one = _mm512_set1_ps(1.0);
        let half = _mm512_set1_ps(0.5);
        let mut s16 = [0i32; 16];
        for (c, s) in s16.iter_mut().enumerate() {
            let y = _mm512_mul_ps(_mm512_loadu_ps(x.as_ptr().add(16 * c)), id);
            let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
            let away = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_abs_ps(_mm512_sub_ps(y, t)), half);
            let step = _mm512_castsi512_ps(_mm512_or_si512(
                _mm512_and_si512(_mm512_castps_si512(y), sign),
                _mm512_castps_si512(one),
            ));
            let r = _mm512_mask_add_ps(t, away, t, step);
            let r = _mm512_max_ps(
                _mm512_min_ps(r, _mm512_set1_ps(127.0)),
                _mm512_set1_ps(-127.0),
            );
            let ri = _mm512_cvttps_epi32(r);
            _mm_storeu_si128(q.as_mut_ptr().add(16 * c).cast(), _mm512_cvtepi32_epi8(ri));
            *s = _mm512_reduce_add_epi32(ri);
        }
        for (j, s) in sums32.iter_mut().enumerate() {
            *s = d * (s16[2 * j] + s16[2 * j + 1]) as f32;
        }
        d
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx512 {
    pub fn available() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activations_round_half_away_from_zero_on_every_path() {
        // Half-way points of both signs (127 sets the scale to 1), seeded values, and zeros.
        let mut x: Vec<f32> = (0..QK).map(|i| (i as f32 - 128.0) * 0.5).collect();
        x[0] = 127.0;
        x.extend(
            crate::model::kernel_test_values::uniform(QK, 9)
                .enumerate()
                .map(|(i, v)| v * (1 + i % 3) as f32),
        );
        x.extend(std::iter::repeat_n(0.0, QK));
        let acts = Activations::quantize(&x, 3, 1);
        for (b, block) in x.chunks_exact(QK).enumerate() {
            let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            assert_eq!(acts.scale(b, 0), d);
            let want: Vec<i8> = block
                .iter()
                .map(|v| (v * id).round().clamp(-127.0, 127.0) as i8)
                .collect();
            assert_eq!(acts.block(b, 0), &want[..], "block {b}");
            let sum =
                |r: std::ops::Range<usize>| -> i32 { want[r].iter().map(|&q| i32::from(q)).sum() };
            for (j, s) in acts.sums32(b, 0).iter().enumerate() {
                assert_eq!(*s, d * sum(32 * j..32 * (j + 1)) as f32);
            }
            let biased: Vec<u8> = want.iter().map(|&q| (i32::from(q) + 128) as u8).collect();
            assert_eq!(acts.biased_block(b, 0), &biased[..]);
        }
        // The scalar path gives what this CPU's path gave.
        let (mut q, mut s32) = (vec![0i8; QK], vec![0f32; 8]);
        for (b, block) in x.chunks_exact(QK).enumerate() {
            let d = quantize_block(block, &mut q, &mut s32);
            assert_eq!(d, acts.scale(b, 0));
            assert_eq!(&q[..], acts.block(b, 0));
            assert_eq!(&s32[..], acts.sums32(b, 0));
        }
    }
}
