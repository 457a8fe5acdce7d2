//! Batched Q6_K × int8 matrix products for x86 CPUs with AVX-512 VNNI, for two activation
//! rows and more (one row keeps candle's compact path: see [`Q6kTiles`]).
//!
//! Q4_K_M files keep the output head and about half the layers' down projections in Q6_K,
//! which took a third of a 1.5B model's decoding steps in candle's repacked kernel: it corrects
//! the −32 offset and rescales every 16-value sub-block with four float operations per
//! activation row (two of them broadcasts from general registers) and passes over the weights
//! once per four rows. Here a tile is 16 weight rows × one 256-value super-block with each
//! weight (the 6-bit value − 32) in a signed byte, up to eight activation rows share each
//! weight register, and a sub-block costs one conversion and one fused multiply-add per row.
//! `vpdpbusd` wants one unsigned operand: the activations come offset by +128
//! ([`Activations::biased_block`]), and what the offset adds, 128 × each row's scaled weight
//! sums, depends on the weights alone: one constant per row and super-block, computed at load
//! and taken off with one more fused multiply-add.
//!
//! Every activation row runs the same operations whatever the number of rows (two or more);
//! the scalar reference performs the same sequence with `f32::mul_add`, and the unit tests hold
//! the AVX-512 path to it bit for bit. Knows GGML's Q6_K block layout and nothing of models.

use super::kquant_tiles::{self, Activations, Kernel, TileKernels, QK, TILE_ROWS};

/// Bytes per GGML Q6_K block: 128 bytes of low nibbles, 64 of high bit pairs, 16 signed
/// scales, an f16 `d`.
const BLOCK_BYTES: usize = 210;

/// 16 weight rows × 256 values.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Tile {
    /// `[group g][row][byte b]`: value `4g + b` of the row, signed (−32..31).
    qs: [i8; QK * TILE_ROWS],
    /// `d × scale` per 16-value sub-block and row.
    scales: [[f32; TILE_ROWS]; 16],
    /// Per row: Σ over sub-blocks of `d × scale × 128 × (sum of the sub-block's values)`.
    bias: [f32; TILE_ROWS],
}

impl Tile {
    const ZERO: Self = Self {
        qs: [0; QK * TILE_ROWS],
        scales: [[0.0; TILE_ROWS]; 16],
        bias: [0.0; TILE_ROWS],
    };
}

/// Whether this CPU multiplies Q6_K through this module: as [`super::q4_k_vnni::preferred`],
/// with `DISTILLERY_Q6_K_KERNEL=candle` leaving Q6_K to candle for paired benchmarks.
pub fn preferred() -> bool {
    std::env::var("DISTILLERY_Q6_K_KERNEL").as_deref() != Ok("candle")
        && std::env::var("MISTRALRS_FORCE_AVX2").as_deref() != Ok("1")
        && kquant_tiles::vnni_available()
}

/// A Q6_K matrix regrouped into tiles, for two or more activation rows. The matrix keeps its
/// GGML blocks for one row (decoding at concurrency 1 streams the weights, and the tiles are
/// 1.5× the bytes), so like candle's own Q6_K paths, one row and several rows sum in different
/// orders.
pub struct Q6kTiles {
    rows: usize,
    blocks_per_row: usize,
    /// `[row tile][super-block]`.
    tiles: Vec<Tile>,
}

/// The 256 unsigned 6-bit values of a GGML Q6_K block (`dequantize_row_q6_K` before the
/// offset and scale).
fn values(block: &[u8]) -> [u8; QK] {
    let (ql, qh) = (&block[..128], &block[128..192]);
    let mut v = [0u8; QK];
    for h in 0..2 {
        let (ql, qh) = (&ql[64 * h..], &qh[32 * h..]);
        for l in 0..32 {
            let base = 128 * h + l;
            v[base] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
            v[base + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
            v[base + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            v[base + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    v
}

impl Q6kTiles {
    /// `rows` rows of `width / 256` GGML Q6_K blocks each. `None` when the bytes do not have
    /// that shape or `rows` is not a multiple of 16.
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
                let d = half::f16::from_le_bytes([block[208], block[209]]).to_f32();
                for j in 0..16 {
                    // d is an f16 and the scale eight bits: the product is exact.
                    tile.scales[j][r] = d * f32::from(block[192 + j] as i8);
                }
                let v = values(block);
                for (k, v) in v.iter().enumerate() {
                    tile.qs[((k / 4) * TILE_ROWS + r) * 4 + k % 4] = *v as i8 - 32;
                }
                let mut bias = 0f32;
                for (j, sub) in v.chunks_exact(16).enumerate() {
                    let sum: i32 = sub.iter().map(|&v| i32::from(v) - 32).sum();
                    bias = ((128 * sum) as f32).mul_add(tile.scales[j][r], bias);
                }
                tile.bias[r] = bias;
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

    /// Bytes held: 5,184 per tile of 16 rows × 256 values (the file's Q6_K takes 3,360).
    pub fn bytes(&self) -> usize {
        self.tiles.len() * std::mem::size_of::<Tile>()
    }

    /// `x @ self.T` for `x` of `m` rows of the width, row-major `[m, rows]`.
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
    let a = acts.biased_block(i, sb);
    let d = acts.scale(i, sb);
    for (r, acc) in acc.iter_mut().enumerate() {
        let mut t = 0f32;
        for j in 0..16 {
            let mut isum = 0i32;
            for g in 4 * j..4 * j + 4 {
                let w = &tile.qs[(g * TILE_ROWS + r) * 4..][..4];
                for (b, &w) in w.iter().enumerate() {
                    isum += i32::from(w) * i32::from(a[4 * g + b]);
                }
            }
            t = (isum as f32).mul_add(tile.scales[j][r], t);
        }
        let c = t.mul_add(d, *acc);
        *acc = (-tile.bias[r]).mul_add(d, c);
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
        let a: [*const u8; M] = std::array::from_fn(|i| acts.biased_block(first + i, sb).as_ptr());
        let mut t = [_mm512_setzero_ps(); M];
        for j in 0..16 {
            if let Some(next) = prefetch {
                // 16 sub-blocks × 5 lines, and the last line, cover the next tile's 81 lines.
                let base = (next as *const Tile).cast::<i8>();
                for line in 5 * j..5 * j + if j == 15 { 6 } else { 5 } {
                    _mm_prefetch::<_MM_HINT_T0>(base.add(line * 64));
                }
            }
            let mut isum = [_mm512_setzero_si512(); M];
            for g in 4 * j..4 * j + 4 {
                // SAFETY: the tile holds 64 groups of 64 bytes; each activation block holds
                // 256 values, and 4g + 4 <= 256.
                let w = _mm512_load_si512(tile.qs.as_ptr().add(g * 64).cast());
                for i in 0..M {
                    let x = a[i].add(4 * g).cast::<i32>().read_unaligned();
                    // Unsigned activations × signed weights.
                    isum[i] = _mm512_dpbusd_epi32(isum[i], _mm512_set1_epi32(x), w);
                }
            }
            let s = _mm512_load_ps(tile.scales[j].as_ptr());
            for i in 0..M {
                t[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i]), s, t[i]);
            }
        }
        let bias = _mm512_load_ps(tile.bias.as_ptr());
        for (i, t) in t.iter().enumerate() {
            let out = acc.as_mut_ptr().add(i * TILE_ROWS);
            let d = _mm512_set1_ps(acts.scale(first + i, sb));
            let c = _mm512_fmadd_ps(*t, d, _mm512_loadu_ps(out));
            _mm512_storeu_ps(out, _mm512_fnmadd_ps(bias, d, c));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    fn q6k(rows: usize, width: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let values: Vec<f32> = crate::model::kernel_test_values::uniform(rows * width, seed)
            .enumerate()
            .map(|(i, v)| v * (1 + (i / width) % 7) as f32 * (1 + (i / 16) % 3) as f32)
            .collect();
        let w = Tensor::from_vec(values, (rows, width), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q6K).unwrap();
        let deq = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
        (q.data().unwrap().to_vec(), deq.to_vec1::<f32>().unwrap())
    }

    #[test]
    fn the_reference_computes_the_dequantized_product() {
        let (rows, width, m) = (32, 512, 3);
        let (raw, w) = q6k(rows, width, 11);
        let tiles = Q6kTiles::from_blocks(&raw, rows, width).unwrap();
        let x = kquant_tiles::test_activations(m, width, 12);
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
    fn a_row_does_not_depend_on_how_many_rows_come_with_it() {
        let (rows, width) = (32, 512);
        let (raw, _) = q6k(rows, width, 13);
        let tiles = Q6kTiles::from_blocks(&raw, rows, width).unwrap();
        let m = 11;
        let x = kquant_tiles::test_activations(m, width, 14);
        for kernel in Kernel::on_this_cpu() {
            let all = tiles.matmul_with(&x, m, kernel);
            for i in 0..m - 1 {
                let two = tiles.matmul_with(&x[i * width..(i + 2) * width], 2, kernel);
                assert_eq!(
                    two,
                    all[i * rows..(i + 2) * rows],
                    "{kernel:?} rows {i}, {}",
                    i + 1
                );
            }
        }
    }

    #[test]
    fn every_simd_kernel_this_cpu_has_matches_the_reference_bit_for_bit() {
        let (rows, width) = (48, 768);
        let (raw, _) = q6k(rows, width, 15);
        let tiles = Q6kTiles::from_blocks(&raw, rows, width).unwrap();
        let simd: Vec<Kernel> = Kernel::on_this_cpu()
            .into_iter()
            .filter(|k| *k != Kernel::Scalar)
            .collect();
        if simd.is_empty() {
            eprintln!("no AVX-512 VNNI on this CPU: only the scalar reference was run");
        }
        for m in [1, 2, 5, 8, 9, 17] {
            let x = kquant_tiles::test_activations(m, width, 16 + m as u64);
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
    fn shapes_that_are_not_whole_tiles_are_refused() {
        let (raw, _) = q6k(32, 256, 17);
        assert!(Q6kTiles::from_blocks(&raw, 32, 256).is_some());
        assert!(Q6kTiles::from_blocks(&raw[1..], 32, 256).is_none());
        let (raw8, _) = q6k(8, 256, 18);
        assert!(
            Q6kTiles::from_blocks(&raw8, 8, 256).is_none(),
            "8 rows: not a whole tile"
        );
        assert!(Q6kTiles::from_blocks(&[], 0, 0).is_none());
    }
}
