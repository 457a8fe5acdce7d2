//! Batched Q4_K × int8 matrix products for x86 CPUs with AVX-512 VNNI (Q6_K's are in
//! `q6_k_vnni`, the activations' quantization in `kquant_tiles`).
//!
//! candle 0.11 has a repacked Q4_K kernel for these CPUs, but fewer than half of its vector
//! instructions are `vpdpbusd`: it shifts every high nibble into place, rescales each 32-value
//! sub-block once per activation row with four float operations, and passes over the weights
//! once per four activation rows. Here:
//!
//! - a weight tile is 16 rows × one 256-value super-block, its bytes regrouped so that one
//!   64-byte load gives four consecutive values of 16 rows; GGML stores sub-block `2p` in the
//!   low nibbles and `2p + 1` in the high nibbles of the same bytes, so the high nibbles are
//!   only masked (`0xF0`: the products come out 16× too large) and their scales divided by 16
//!   at load, which is exact;
//! - up to eight activation rows share each unpacked weight register;
//! - a sub-block costs one conversion and one fused multiply-add per activation row, and the
//!   minimums one more per sub-block and super-block, against the activations' per-sub-block
//!   sums computed once when they are quantized.
//!
//! The activations are quantized once per call, per 256 values (scale = max |x| / 127, rounded
//! half away from zero). Every activation row is computed by the same sequence of operations
//! whatever the number of rows, so a row's results do not depend on the batch (seeded sampling
//! relies on it). A scalar reference performs that same sequence (`f32::mul_add` where the
//! kernel fuses), so the unit tests hold the AVX-512 path to it bit for bit.
//!
//! Knows GGML's Q4_K block layout and nothing of models or tensors' meaning.

use super::kquant_tiles::{self, Activations, Kernel, TileKernels, QK, TILE_ROWS};

/// Bytes per GGML Q4_K block: f16 `d`, f16 `dmin`, 12 bytes of 6-bit scales and minimums,
/// 128 bytes of nibbles.
const BLOCK_BYTES: usize = 144;

/// 16 weight rows × 256 values.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Tile {
    /// `[pair p][group g][row][byte b]`: byte `b` holds value `64p + 4g + b` in its low nibble
    /// and `64p + 32 + 4g + b` in its high nibble (GGML's `qs[32p + 4g + b]`).
    qs: [u8; QK / 2 * TILE_ROWS],
    /// `d × scale` per sub-block and row; odd sub-blocks (high nibbles) divided by 16.
    scales: [[f32; TILE_ROWS]; 8],
    /// `dmin × min` per sub-block and row.
    mins: [[f32; TILE_ROWS]; 8],
}

impl Tile {
    const ZERO: Self = Self {
        qs: [0; QK / 2 * TILE_ROWS],
        scales: [[0.0; TILE_ROWS]; 8],
        mins: [[0.0; TILE_ROWS]; 8],
    };
}

/// Whether this CPU multiplies Q4_K through this module: AVX-512 F, BW and VNNI, unless
/// candle is told to act as an AVX2-only CPU (`MISTRALRS_FORCE_AVX2=1`, which the AVX2 tests
/// use). `DISTILLERY_Q4_K_KERNEL=candle` leaves Q4_K to candle, for paired benchmarks.
pub fn preferred() -> bool {
    std::env::var("DISTILLERY_Q4_K_KERNEL").as_deref() != Ok("candle")
        && std::env::var("MISTRALRS_FORCE_AVX2").as_deref() != Ok("1")
        && kquant_tiles::vnni_available()
}

/// A Q4_K matrix regrouped into tiles.
pub struct Q4kTiles {
    rows: usize,
    blocks_per_row: usize,
    /// `[row tile][super-block]`.
    tiles: Vec<Tile>,
}

/// The 6-bit scale and minimum of sub-block `j` (GGML's `get_scale_min_k4`).
fn scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

impl Q4kTiles {
    /// `rows` rows of `width / 256` GGML Q4_K blocks each, as stored in a GGUF file or a
    /// candle `QTensor`. `None` when the bytes do not have that shape or `rows` is not a
    /// multiple of 16.
    pub fn from_blocks(raw: &[u8], rows: usize, width: usize) -> Option<Self> {
        let kb = width / QK;
        if width == 0
            || !width.is_multiple_of(QK)
            || !rows.is_multiple_of(TILE_ROWS)
            || raw.len() != rows * kb * BLOCK_BYTES
        {
            return None;
        }
        let mut tiles = vec![Tile::ZERO; rows / TILE_ROWS * kb];
        for (i, tile) in tiles.iter_mut().enumerate() {
            let (row_tile, sb) = (i / kb, i % kb);
            for r in 0..TILE_ROWS {
                let at = ((row_tile * TILE_ROWS + r) * kb + sb) * BLOCK_BYTES;
                let block = &raw[at..at + BLOCK_BYTES];
                let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
                let (scales, qs) = (&block[4..16], &block[16..]);
                for j in 0..8 {
                    let (sc, mn) = scale_min(j, scales);
                    // d is an f16 and sc six bits: the product and the division are exact.
                    let high = if j % 2 == 1 { 16.0 } else { 1.0 };
                    tile.scales[j][r] = d * f32::from(sc) / high;
                    tile.mins[j][r] = dmin * f32::from(mn);
                }
                for p in 0..4 {
                    for g in 0..8 {
                        let to = ((p * 8 + g) * TILE_ROWS + r) * 4;
                        tile.qs[to..to + 4]
                            .copy_from_slice(&qs[32 * p + 4 * g..32 * p + 4 * g + 4]);
                    }
                }
            }
        }
        Some(Self {
            rows,
            blocks_per_row: kb,
            tiles,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn width(&self) -> usize {
        self.blocks_per_row * QK
    }

    /// Bytes held: 3,072 per tile of 16 rows × 256 values (the file's Q4_K takes 2,304).
    pub fn bytes(&self) -> usize {
        self.tiles.len() * std::mem::size_of::<Tile>()
    }

    /// `x @ self.T` for `x` of `m` rows of [`Self::width`] values, row-major `[m, rows]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_with(x, m, Kernel::best())
    }

    fn matmul_with(&self, x: &[f32], m: usize, kernel: Kernel) -> Vec<f32> {
        let fns = TileKernels {
            scalar: scalar_tile,
            #[cfg(target_arch = "x86_64")]
            simd: kquant_tiles::simd_by_rows!(avx512::tile),
        };
        kquant_tiles::matmul(
            &self.tiles,
            self.rows,
            self.blocks_per_row,
            x,
            m,
            kernel,
            &fns,
        )
    }
}

/// One activation row against a tile, in exactly the kernel's order of operations.
fn scalar_tile(tile: &Tile, acts: &Activations, sb: usize, i: usize, acc: &mut [f32]) {
    let a = acts.block(i, sb);
    let (d, sums) = (acts.scale(i, sb), acts.sums32(i, sb));
    for (r, acc) in acc.iter_mut().enumerate() {
        let mut t = 0f32;
        for p in 0..4 {
            let (mut lo, mut hi) = (0i32, 0i32);
            for g in 0..8 {
                let w = &tile.qs[((p * 8 + g) * TILE_ROWS + r) * 4..][..4];
                for (b, &w) in w.iter().enumerate() {
                    lo += i32::from(w & 0x0F) * i32::from(a[64 * p + 4 * g + b]);
                    hi += i32::from(w & 0xF0) * i32::from(a[64 * p + 32 + 4 * g + b]);
                }
            }
            t = (lo as f32).mul_add(tile.scales[2 * p][r], t);
            t = (hi as f32).mul_add(tile.scales[2 * p + 1][r], t);
        }
        let mut c = t.mul_add(d, *acc);
        for (j, s) in sums.iter().enumerate() {
            c = (-tile.mins[j][r]).mul_add(*s, c);
        }
        *acc = c;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Activations, Tile, TILE_ROWS};
    use std::arch::x86_64::*;

    /// `M` activation rows from `first` against one tile, added into `acc` (`[M][16]`).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VNNI; `acc` must hold `M × 16` values and `acts`
    /// rows `first..first + M`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn tile<const M: usize>(
        tile: &Tile,
        prefetch: Option<&Tile>,
        acts: &Activations,
        sb: usize,
        first: usize,
        acc: &mut [f32],
    ) {
        debug_assert!(acc.len() >= M * TILE_ROWS);
        let a: [*const i8; M] = std::array::from_fn(|i| acts.block(first + i, sb).as_ptr());
        let lo_mask = _mm512_set1_epi8(0x0F);
        let hi_mask = _mm512_set1_epi8(0xF0u8 as i8);
        let mut t = [_mm512_setzero_ps(); M];
        for p in 0..4 {
            let mut lo = [_mm512_setzero_si512(); M];
            let mut hi = [_mm512_setzero_si512(); M];
            for g in 0..8 {
                // SAFETY: the tile holds 4 × 8 groups of 64 bytes; each activation block
                // holds 256 values, and 64p + 32 + 4g + 4 <= 256.
                let w = _mm512_load_si512(tile.qs.as_ptr().add((p * 8 + g) * 64).cast());
                if let Some(next) = prefetch {
                    // 32 steps × 2 lines cover the next tile's 48 lines.
                    let line = 2 * (p * 8 + g) * 64;
                    let base = (next as *const Tile).cast::<i8>();
                    if line < std::mem::size_of::<Tile>() {
                        _mm_prefetch::<_MM_HINT_T0>(base.add(line));
                        _mm_prefetch::<_MM_HINT_T0>(base.add(line + 64));
                    }
                }
                let (wl, wh) = (_mm512_and_si512(w, lo_mask), _mm512_and_si512(w, hi_mask));
                for i in 0..M {
                    let al = a[i].add(64 * p + 4 * g).cast::<i32>().read_unaligned();
                    let ah = a[i].add(64 * p + 32 + 4 * g).cast::<i32>().read_unaligned();
                    lo[i] = _mm512_dpbusd_epi32(lo[i], wl, _mm512_set1_epi32(al));
                    hi[i] = _mm512_dpbusd_epi32(hi[i], wh, _mm512_set1_epi32(ah));
                }
            }
            let sl = _mm512_load_ps(tile.scales[2 * p].as_ptr());
            let sh = _mm512_load_ps(tile.scales[2 * p + 1].as_ptr());
            for i in 0..M {
                t[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo[i]), sl, t[i]);
                t[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi[i]), sh, t[i]);
            }
        }
        for (i, t) in t.iter().enumerate() {
            let out = acc.as_mut_ptr().add(i * TILE_ROWS);
            let sums = acts.sums32(first + i, sb);
            let mut c = _mm512_fmadd_ps(
                *t,
                _mm512_set1_ps(acts.scale(first + i, sb)),
                _mm512_loadu_ps(out),
            );
            for (j, s) in sums.iter().enumerate() {
                c = _mm512_fnmadd_ps(_mm512_load_ps(tile.mins[j].as_ptr()), _mm512_set1_ps(*s), c);
            }
            _mm512_storeu_ps(out, c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    fn q4k(rows: usize, width: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        // Rows at several magnitudes, so scales and minimums of every size occur.
        let values: Vec<f32> = crate::model::kernel_test_values::uniform(rows * width, seed)
            .enumerate()
            .map(|(i, v)| v * (1 + (i / width) % 7) as f32 + 0.05 * ((i / 32) % 3) as f32)
            .collect();
        let w = Tensor::from_vec(values, (rows, width), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
        let deq = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
        (q.data().unwrap().to_vec(), deq.to_vec1::<f32>().unwrap())
    }

    #[test]
    fn the_reference_computes_the_dequantized_product() {
        let (rows, width, m) = (32, 512, 3);
        let (raw, w) = q4k(rows, width, 1);
        let tiles = Q4kTiles::from_blocks(&raw, rows, width).unwrap();
        let x = kquant_tiles::test_activations(m, width, 2);
        let got = tiles.matmul_with(&x, m, Kernel::Scalar);
        // The exact product of candle's dequantized weights and our quantized activations.
        let acts = Activations::quantize(&x, m, width / QK);
        for i in 0..m {
            for r in 0..rows {
                let mut want = 0f64;
                for k in 0..width {
                    let a = acts.block(i, k / QK)[k % QK] as f64 * acts.scale(i, k / QK) as f64;
                    want += w[r * width + k] as f64 * a;
                }
                let g = got[i * rows + r] as f64;
                assert!(
                    (g - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "row {i} col {r}: {g} vs {want}"
                );
            }
        }
    }

    #[test]
    fn a_row_does_not_depend_on_the_batch() {
        let (rows, width) = (32, 512);
        let (raw, _) = q4k(rows, width, 3);
        let tiles = Q4kTiles::from_blocks(&raw, rows, width).unwrap();
        let m = 11;
        let x = kquant_tiles::test_activations(m, width, 4);
        for kernel in Kernel::on_this_cpu() {
            let all = tiles.matmul_with(&x, m, kernel);
            for i in 0..m {
                let one = tiles.matmul_with(&x[i * width..(i + 1) * width], 1, kernel);
                assert_eq!(one, all[i * rows..(i + 1) * rows], "{kernel:?} row {i}");
            }
        }
    }

    #[test]
    fn every_simd_kernel_this_cpu_has_matches_the_reference_bit_for_bit() {
        let (rows, width) = (48, 768);
        let (raw, _) = q4k(rows, width, 5);
        let tiles = Q4kTiles::from_blocks(&raw, rows, width).unwrap();
        let simd: Vec<Kernel> = Kernel::on_this_cpu()
            .into_iter()
            .filter(|k| *k != Kernel::Scalar)
            .collect();
        if simd.is_empty() {
            eprintln!("no AVX-512 VNNI on this CPU: only the scalar reference was run");
        }
        for m in [1, 2, 5, 8, 9, 17] {
            let x = kquant_tiles::test_activations(m, width, 6 + m as u64);
            let want = tiles.matmul_with(&x, m, Kernel::Scalar);
            for &kernel in &simd {
                assert_eq!(
                    tiles.matmul_with(&x, m, kernel),
                    want,
                    "{kernel:?} at {m} rows"
                );
            }
        }
    }

    #[test]
    fn no_activation_rows_give_no_output() {
        let (raw, _) = q4k(16, 256, 19);
        let tiles = Q4kTiles::from_blocks(&raw, 16, 256).unwrap();
        for kernel in Kernel::on_this_cpu() {
            assert!(tiles.matmul_with(&[], 0, kernel).is_empty());
        }
    }

    #[test]
    fn shapes_that_are_not_whole_tiles_are_refused() {
        let (raw, _) = q4k(32, 256, 7);
        assert!(Q4kTiles::from_blocks(&raw, 32, 256).is_some());
        assert!(Q4kTiles::from_blocks(&raw[1..], 32, 256).is_none());
        assert!(Q4kTiles::from_blocks(&raw[..raw.len() / 2], 16, 256).is_some());
        let (raw8, _) = q4k(8, 256, 8);
        assert!(
            Q4kTiles::from_blocks(&raw8, 8, 256).is_none(),
            "8 rows: not a whole tile"
        );
        assert!(Q4kTiles::from_blocks(&[], 0, 0).is_none());
    }
}
