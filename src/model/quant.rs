//! Weight-only quantization of the decoder's projection matrices (`--quantization`): which
//! GGML block format each matrix gets, and the matmul through candle's quantized kernels
//! (int8 dot products, repacked for AVX-512 VNNI or AVX2 at run time), our own int8 ones where
//! candle's are missing or slower (`q8_0_avx2`, `q4_k_vnni`), or bf16/f16 weights against f32
//! activations (`half_matmul`).
//!
//! A matrix is quantized along its input dimension, in blocks of 32 (Q8_0, Q4_0) or 256
//! (k-quants) weights with a scale each, as llama.cpp's GGUF files are; the activations are
//! quantized to 8 bits once per matmul, not per weight row. Knows nothing of layers or of
//! which matrix is which: the decoder asks for one matrix at a time.

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};

use super::half_matmul::{Half, HalfRows};
pub use super::int_rows::IntRows;
use super::q4_k_vnni::{self, Q4kTiles};
use super::q6_k_vnni::{self, Q6kTiles};
use super::q8_0_avx2::{self, Q8Rows};
use super::ModelError;

/// `--quantization`: how the projection weights are stored and multiplied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quantization {
    /// The weights as loaded, in `--dtype`.
    #[default]
    None,
    /// 8-bit weights, one f16 scale per 32 (llama.cpp's Q8_0): ~1/4 of f32's bytes.
    #[value(name = "q8_0")]
    #[serde(rename = "q8_0")]
    Q8_0,
    /// 4-bit weights, one f16 scale per 32 (Q4_0).
    #[value(name = "q4_0")]
    #[serde(rename = "q4_0")]
    Q4_0,
    /// 4-bit k-quant (Q4_K), super-blocks of 256: what Q4_K_M files use for most matrices.
    #[value(name = "q4_k")]
    #[serde(rename = "q4_k")]
    Q4K,
    /// 6-bit k-quant (Q6_K), super-blocks of 256.
    #[value(name = "q6_k")]
    #[serde(rename = "q6_k")]
    Q6K,
    /// bf16 weights (a bf16 checkpoint's own values, exactly) widened in registers against
    /// f32 activations: half of f32's bytes.
    #[value(name = "bf16")]
    #[serde(rename = "bf16")]
    Bf16,
    /// f16 weights (rounded to f16), f32 activations as they are: half of f32's bytes.
    #[value(name = "f16")]
    #[serde(rename = "f16")]
    F16,
}

impl Quantization {
    pub(crate) fn ggml(self) -> Option<GgmlDType> {
        match self {
            Self::None => None,
            Self::Q8_0 => Some(GgmlDType::Q8_0),
            Self::Q4_0 => Some(GgmlDType::Q4_0),
            Self::Q4K => Some(GgmlDType::Q4K),
            Self::Q6K => Some(GgmlDType::Q6K),
            Self::Bf16 => Some(GgmlDType::BF16),
            Self::F16 => Some(GgmlDType::F16),
        }
    }

    pub fn is_none(self) -> bool {
        self == Self::None
    }

    /// Whether the model can be quantized on this device in this dtype: the quantized
    /// kernels take f32 activations and run on the CPU (the CUDA ones are untested).
    pub fn check(self, dtype: DType, device: &Device) -> Result<(), ModelError> {
        if self.is_none() {
            return Ok(());
        }
        if !device.is_cpu() {
            return Err(ModelError::Resolve(format!(
                "--quantization {}: quantized weights run on the CPU only for now; \
                 use --device cpu or --quantization none",
                self.name()
            )));
        }
        if dtype != DType::F32 {
            return Err(ModelError::Resolve(format!(
                "--quantization {} computes in f32 between the quantized matmuls: \
                 use --dtype f32 (or auto) with it, not {dtype:?}",
                self.name()
            )));
        }
        Ok(())
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4K => "q4_k",
            Self::Q6K => "q6_k",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }
}

/// Widths are padded with zero columns to a multiple of this: 256 is the k-quants' block,
/// and the repacked int8 kernels (candle's `repack_x86`) take only such widths, falling back
/// to an unbatched path ~10x slower at batch 8 and more (Qwen2.5-0.5B's 896 is one such
/// width). Zero weights against zero activations add nothing, so the result is unchanged,
/// and a Q8_0 or Q4_0 block (32 wide) never straddles the padding.
const WIDTH_MULTIPLE: usize = 256;

/// A `[out, in]` weight matrix, dense or quantized, applied as `x @ w.T`.
#[derive(Clone)]
pub enum Matrix {
    Dense(Tensor),
    /// `in_features` is the width before padding to [`WIDTH_MULTIPLE`].
    Quantized {
        matmul: QMatMul,
        in_features: usize,
    },
    /// Blocks regrouped for one of our own int8 kernels ([`IntRows`]); `in_features` as for
    /// `Quantized`.
    Int8 {
        rows: std::sync::Arc<IntRows>,
        in_features: usize,
    },
    /// bf16 or f16 weights against f32 activations ([`half_matmul`](super::half_matmul)).
    Half(std::sync::Arc<HalfRows>),
    /// Projections of one input that could not be merged into one matrix (a GGUF file may
    /// store a layer's q, k and v in different formats): their outputs side by side.
    Parts(Vec<Matrix>),
}

/// A half-precision matrix's values as a dense f32 tensor (exact).
fn rows_as_f32(rows: &HalfRows) -> Result<Tensor, ModelError> {
    Ok(Tensor::from_vec(
        rows.to_f32(),
        (rows.rows(), rows.in_features()),
        &Device::Cpu,
    )?)
}

impl Matrix {
    /// `weight` quantized in the format `q` names (`None` keeps it dense).
    pub fn quantized(weight: Tensor, q: Quantization) -> Result<Self, ModelError> {
        let Some(format) = q.ggml() else {
            return Ok(Self::Dense(weight));
        };
        let (rows, in_features) = weight.dims2()?;
        // candle rounds f32 to the nearest bf16 / f16 (ties to even); a weight already in
        // that format is kept as it is, without an f32 copy.
        if format == GgmlDType::BF16 {
            let bits: Vec<u16> = weight
                .to_dtype(DType::BF16)?
                .flatten_all()?
                .to_vec1::<half::bf16>()?
                .into_iter()
                .map(half::bf16::to_bits)
                .collect();
            return Self::half(Half::Bf16, &bits, rows, in_features);
        }
        if format == GgmlDType::F16 {
            let bits: Vec<u16> = weight
                .to_dtype(DType::F16)?
                .flatten_all()?
                .to_vec1::<half::f16>()?
                .into_iter()
                .map(half::f16::to_bits)
                .collect();
            return Self::half(Half::F16, &bits, rows, in_features);
        }
        let pad = in_features.next_multiple_of(WIDTH_MULTIPLE) - in_features;
        let weight = weight.to_dtype(DType::F32)?.pad_with_zeros(1, 0, pad)?;
        let qt = QTensor::quantize(&weight, format)?;
        Ok(Self::Quantized {
            matmul: QMatMul::from_qtensor(qt)?,
            in_features,
        })
    }

    /// A matrix stored as GGML blocks (a GGUF tensor's bytes), `rows` by `width`. F32 becomes
    /// dense, BF16 and F16 a [`Matrix::Half`]; block formats are padded as
    /// [`Matrix::quantized`] pads.
    pub fn from_blocks(
        format: GgmlDType,
        raw: &[u8],
        rows: usize,
        width: usize,
    ) -> Result<Self, ModelError> {
        let device = Device::Cpu;
        let (block, size) = (format.block_size(), format.type_size());
        if rows == 0 || width == 0 || !width.is_multiple_of(block) {
            return Err(ModelError::Resolve(format!(
                "{rows} x {width} is not rows of whole {format:?} blocks of {block}"
            )));
        }
        // candle reads the blocks without checking the slice's length.
        if raw.len() != rows * (width / block) * size {
            return Err(ModelError::Resolve(format!(
                "{} bytes for {rows} x {width} {format:?}, which takes {}",
                raw.len(),
                rows * (width / block) * size
            )));
        }
        if let Some(half) = match format {
            GgmlDType::BF16 => Some(Half::Bf16),
            GgmlDType::F16 => Some(Half::F16),
            _ => None,
        } {
            let bits: Vec<u16> = raw
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect();
            let matrix = Self::half(half, &bits, rows, width)?;
            // Without a SIMD kernel for the format, f32 (as such files used to load) is faster.
            return match matrix {
                Self::Half(rows) if !super::half_matmul::fast_on_this_cpu(half) => {
                    Ok(Self::Dense(rows_as_f32(&rows)?))
                }
                other => Ok(other),
            };
        }
        if format == GgmlDType::F32 {
            let qt = qtensor_from_ggml(format, raw, vec![rows, width], &device)?;
            return Ok(Self::Dense(qt.dequantize(&device)?));
        }
        // candle's Q5_0 dot product is its scalar reference (~20x slower than its Q8_0 one),
        // and Q4_K_M files hold Q5_0 wherever a width is not a multiple of 256. Every Q5_0
        // block is exactly a Q8_0 block (same scale, the same small integers), and both dot
        // products multiply those integers with the same Q8_0 activations: the results are
        // the same, for 1.5x the bytes of those matrices.
        let transcoded;
        let (format, raw) = if format == GgmlDType::Q5_0 {
            transcoded = q5_0_as_q8_0(raw);
            (GgmlDType::Q8_0, transcoded.as_slice())
        } else {
            (format, raw)
        };
        let padded = width.next_multiple_of(WIDTH_MULTIPLE);
        let row_bytes = width / format.block_size() * format.type_size();
        let padded_row_bytes = padded / format.block_size() * format.type_size();
        let bytes = if padded == width {
            raw.to_vec()
        } else {
            // An all-zero block is zero in every GGML block format (its scales are zero).
            let mut out = vec![0u8; rows * padded_row_bytes];
            for (src, dst) in raw
                .chunks_exact(row_bytes)
                .zip(out.chunks_exact_mut(padded_row_bytes))
            {
                dst[..row_bytes].copy_from_slice(src);
            }
            out
        };
        let qt = qtensor_from_ggml(format, &bytes, vec![rows, padded], &device)?;
        Ok(Self::Quantized {
            matmul: QMatMul::from_qtensor(qt)?,
            in_features: width,
        })
    }

    /// The matrix in the format `q` names, from the values it holds: a dense one quantized; a
    /// half-precision one (a BF16/F16 GGUF file's, or `--dtype bf16`/`f16`'s) widened, which
    /// is exact, then quantized or rounded to the other half format; one already in that
    /// format, or in GGML blocks, as it is.
    pub fn requantized(self, q: Quantization) -> Result<Self, ModelError> {
        match self {
            Self::Dense(t) => Self::quantized(t, q),
            Self::Half(rows) if q.ggml() != self.format() => {
                Self::quantized(rows_as_f32(&rows)?, q)
            }
            other => Ok(other),
        }
    }

    /// Whether any of it is in GGML blocks (quantized already).
    pub fn has_blocks(&self) -> bool {
        match self {
            Self::Quantized { .. } | Self::Int8 { .. } => true,
            Self::Parts(parts) => parts.iter().any(Matrix::has_blocks),
            Self::Dense(_) | Self::Half(_) => false,
        }
    }

    fn half(format: Half, bits: &[u16], n: usize, width: usize) -> Result<Self, ModelError> {
        let rows = HalfRows::from_bits(format, bits, n, width).ok_or_else(|| {
            ModelError::Resolve(format!("{n} x {width}: not a {format:?} matrix"))
        })?;
        Ok(Self::Half(std::sync::Arc::new(rows)))
    }

    /// Projections of the same input as one matrix: dense ones concatenated by row, quantized
    /// ones of one format by their blocks' bytes (rows are whole blocks), any other mix as
    /// [`Matrix::Parts`].
    pub fn stack(parts: Vec<Matrix>) -> Result<Self, ModelError> {
        let dense: Vec<&Tensor> = parts
            .iter()
            .filter_map(|p| match p {
                Self::Dense(t) => Some(t),
                _ => None,
            })
            .collect();
        if dense.len() == parts.len() {
            return Ok(Self::Dense(Tensor::cat(&dense, 0)?));
        }
        let half: Vec<&HalfRows> = parts
            .iter()
            .filter_map(|p| match p {
                Self::Half(rows) => Some(rows.as_ref()),
                _ => None,
            })
            .collect();
        if half.len() == parts.len() {
            if let Some(rows) = HalfRows::concat(&half) {
                return Ok(Self::Half(std::sync::Arc::new(rows)));
            }
        }
        let blocks: Vec<(&QTensor, usize)> = parts
            .iter()
            .filter_map(|p| match p {
                Self::Quantized {
                    matmul: QMatMul::QTensor(t),
                    in_features,
                } => Some((t.as_ref(), *in_features)),
                _ => None,
            })
            .collect();
        let mergeable = blocks.len() == parts.len()
            && blocks
                .windows(2)
                .all(|w| w[0].0.dtype() == w[1].0.dtype() && w[0].1 == w[1].1);
        let Some(&(first, in_features)) = blocks.first().filter(|_| mergeable) else {
            return Ok(Self::Parts(parts));
        };
        let mut bytes = Vec::new();
        let mut rows = 0;
        for (t, _) in &blocks {
            rows += t.shape().dims2()?.0;
            bytes.extend_from_slice(&t.data()?);
        }
        let padded = first.shape().dims2()?.1;
        let qt = qtensor_from_ggml(first.dtype(), &bytes, vec![rows, padded], &Device::Cpu)?;
        Ok(Self::Quantized {
            matmul: QMatMul::from_qtensor(qt)?,
            in_features,
        })
    }

    /// The block format, or `None` when dense (the first quantized part's, for parts).
    pub fn format(&self) -> Option<GgmlDType> {
        match self {
            Self::Quantized {
                matmul: QMatMul::QTensor(t),
                ..
            } => Some(t.dtype()),
            Self::Int8 { rows, .. } => Some(rows.format()),
            Self::Half(rows) => Some(match rows.format() {
                Half::Bf16 => GgmlDType::BF16,
                Half::F16 => GgmlDType::F16,
            }),
            Self::Parts(parts) => parts.iter().find_map(Matrix::format),
            _ => None,
        }
    }

    /// The matrix in the form this CPU multiplies fastest: Q8_0 blocks go to our AVX2 kernel
    /// where candle's batched int8 kernels need VNNI the CPU lacks, Q4_K and Q6_K blocks to
    /// ours for AVX-512 VNNI where the CPU has it (and the rows come in whole tiles); anything
    /// else is kept. Called once the matrices are final (stacked), before the first forward.
    pub fn for_this_cpu(self) -> Result<Self, ModelError> {
        match self {
            Self::Quantized {
                matmul: QMatMul::QTensor(t),
                in_features,
            } if t.dtype() == GgmlDType::Q8_0 && q8_0_avx2::preferred() => {
                let (rows, width) = t.shape().dims2()?;
                let rows = Q8Rows::from_blocks(&t.data()?, rows, width).ok_or_else(|| {
                    ModelError::Resolve(format!("{rows} x {width} Q8_0: not whole blocks"))
                })?;
                Ok(Self::Int8 {
                    rows: std::sync::Arc::new(IntRows::Q8_0(rows)),
                    in_features,
                })
            }
            Self::Quantized {
                matmul: QMatMul::QTensor(t),
                in_features,
            } if t.dtype() == GgmlDType::Q4K && q4_k_vnni::preferred() => {
                let (rows, width) = t.shape().dims2()?;
                match Q4kTiles::from_blocks(&t.data()?, rows, width) {
                    Some(tiles) => Ok(Self::Int8 {
                        rows: std::sync::Arc::new(IntRows::Q4K(tiles)),
                        in_features,
                    }),
                    // Rows not in whole tiles of 16: candle's kernels take them.
                    None => Ok(Self::Quantized {
                        matmul: QMatMul::QTensor(t),
                        in_features,
                    }),
                }
            }
            Self::Quantized {
                matmul: QMatMul::QTensor(t),
                in_features,
            } if t.dtype() == GgmlDType::Q6K && q6_k_vnni::preferred() => {
                let (rows, width) = t.shape().dims2()?;
                match Q6kTiles::from_blocks(&t.data()?, rows, width) {
                    Some(tiles) => Ok(Self::Int8 {
                        rows: std::sync::Arc::new(IntRows::Q6K {
                            tiles,
                            one_row: QMatMul::QTensor(t),
                        }),
                        in_features,
                    }),
                    None => Ok(Self::Quantized {
                        matmul: QMatMul::QTensor(t),
                        in_features,
                    }),
                }
            }
            Self::Parts(parts) => Ok(Self::Parts(
                parts
                    .into_iter()
                    .map(Self::for_this_cpu)
                    .collect::<Result<_, _>>()?,
            )),
            other => Ok(other),
        }
    }

    pub fn is_dense(&self) -> bool {
        matches!(self, Self::Dense(_))
    }

    /// `(out, in)`: the rows, and the width before any padding.
    pub fn dims(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            Self::Dense(t) => t.dims2(),
            Self::Quantized {
                matmul,
                in_features,
            } => {
                let rows = match matmul {
                    QMatMul::QTensor(t) => t.shape().dims2()?.0,
                    QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dims2()?.0,
                };
                Ok((rows, *in_features))
            }
            Self::Int8 { rows, in_features } => Ok((rows.rows(), *in_features)),
            Self::Half(rows) => Ok((rows.rows(), rows.in_features())),
            Self::Parts(parts) => {
                let mut rows = 0;
                let mut width = 0;
                for p in parts {
                    let (r, w) = p.dims()?;
                    rows += r;
                    width = w;
                }
                Ok((rows, width))
            }
        }
    }

    /// Bytes the weights occupy (padding included).
    pub fn bytes(&self) -> usize {
        let dense = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        match self {
            Self::Dense(t) => dense(t),
            Self::Quantized { matmul, .. } => match matmul {
                QMatMul::QTensor(t) => t.storage_size_in_bytes(),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => dense(t),
            },
            Self::Int8 { rows, .. } => rows.bytes(),
            Self::Half(rows) => rows.bytes(),
            Self::Parts(parts) => parts.iter().map(Matrix::bytes).sum(),
        }
    }
}

const Q5_0_BLOCK_BYTES: usize = 22;
const Q8_0_BLOCK_BYTES: usize = 34;

/// Q5_0 blocks (f16 scale, 32 high bits, 16 bytes of low nibbles; value = (q - 16) * d) as
/// the Q8_0 blocks holding the same values (f16 scale, 32 signed bytes; value = q * d).
fn q5_0_as_q8_0(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() / Q5_0_BLOCK_BYTES * Q8_0_BLOCK_BYTES);
    for block in raw.chunks_exact(Q5_0_BLOCK_BYTES) {
        let (scale, rest) = block.split_at(2);
        let (high, low) = rest.split_at(4);
        let high = u32::from_le_bytes([high[0], high[1], high[2], high[3]]);
        out.extend_from_slice(scale);
        let value = |nibble: u8, j: usize| {
            let q = nibble | ((((high >> j) & 1) as u8) << 4);
            (q as i8 - 16) as u8
        };
        out.extend(low.iter().enumerate().map(|(j, b)| value(b & 0x0F, j)));
        out.extend(low.iter().enumerate().map(|(j, b)| value(b >> 4, j + 16)));
    }
    out
}

/// `x` as the quantized kernels read it: contiguous f32, its width zero-padded to
/// [`WIDTH_MULTIPLE`].
fn padded_input(x: &Tensor, in_features: usize) -> candle_core::Result<Tensor> {
    let width = x.dim(D::Minus1)?;
    if width != in_features {
        candle_core::bail!("input width {width}, the matrix takes {in_features}");
    }
    let pad = width.next_multiple_of(WIDTH_MULTIPLE) - width;
    x.pad_with_zeros(D::Minus1, 0, pad)?.contiguous()
}

impl Module for Matrix {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(w) => x.matmul(&w.t()?),
            Self::Quantized {
                matmul,
                in_features,
            } => matmul.forward(&padded_input(x, *in_features)?),
            Self::Int8 { rows, in_features } => rows.forward(&padded_input(x, *in_features)?),
            Self::Half(rows) => {
                let mut out_dims = x.dims().to_vec();
                let width = out_dims.pop().unwrap_or(0);
                if width != rows.in_features() {
                    candle_core::bail!(
                        "input width {width}, the matrix takes {}",
                        rows.in_features()
                    );
                }
                let m = x.elem_count() / width.max(1);
                let values = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                out_dims.push(rows.rows());
                Tensor::from_vec(rows.matmul(&values, m), out_dims, x.device())
            }
            Self::Parts(parts) => {
                // The input is padded once for all the quantized parts, not once per part.
                let mut padded: Option<Tensor> = None;
                let mut outs = Vec::with_capacity(parts.len());
                for p in parts {
                    outs.push(match p {
                        Self::Quantized {
                            matmul,
                            in_features,
                        } => {
                            let input = match &padded {
                                Some(t) => t,
                                None => padded.insert(padded_input(x, *in_features)?),
                            };
                            matmul.forward(input)?
                        }
                        other => other.forward(x)?,
                    });
                }
                Tensor::cat(&outs, D::Minus1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q5_0_blocks_become_the_q8_0_blocks_of_the_same_values() {
        let device = Device::Cpu;
        // Seeded values over several scales, so every 5-bit code and both nibbles occur.
        let values: Vec<f32> = (0..64 * 256)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0 * (1 + i % 5) as f32)
            .collect();
        let w = Tensor::from_vec(values, (64, 256), &device).unwrap();
        let q5 = QTensor::quantize(&w, GgmlDType::Q5_0).unwrap();
        let raw = q5.data().unwrap();
        let m = Matrix::from_blocks(GgmlDType::Q5_0, &raw, 64, 256).unwrap();
        assert_eq!(m.format(), Some(GgmlDType::Q8_0));
        let Matrix::Quantized {
            matmul: QMatMul::QTensor(q8),
            ..
        } = &m
        else {
            panic!("a quantized matrix");
        };
        let a = q5.dequantize(&device).unwrap().flatten_all().unwrap();
        let b = q8.dequantize(&device).unwrap().flatten_all().unwrap();
        assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
    }

    #[test]
    fn a_quantized_matmul_is_close_to_the_dense_one() {
        let dev = Device::Cpu;
        // 96 wide: padded to 256, so the padding is exercised too.
        for width in [256, 96] {
            close_for_every_format(&dev, width);
        }
    }

    fn close_for_every_format(dev: &Device, width: usize) {
        let w = Tensor::randn(0f32, 0.05, (48, width), dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (5, width), dev).unwrap();
        let dense = Matrix::Dense(w.clone()).forward(&x).unwrap();
        // About twice the worst of repeated runs (the inputs are unseeded): Q8_0 0.0065-0.0102,
        // Q6_K 0.017-0.021, Q4_K 0.064-0.082, Q4_0 0.076-0.093 (weights and activations both
        // quantized).
        for (q, tolerance) in [
            (Quantization::Q8_0, 0.02),
            (Quantization::Q6K, 0.04),
            (Quantization::Q4K, 0.16),
            (Quantization::Q4_0, 0.18),
        ] {
            let m = Matrix::quantized(w.clone(), q).unwrap();
            assert!(m.format().is_some(), "{q:?}");
            let padded = width.next_multiple_of(WIDTH_MULTIPLE);
            assert!(
                m.bytes() < 48 * padded * 4 / 3,
                "{q:?}: {} bytes",
                m.bytes()
            );
            let got = m.forward(&x).unwrap();
            let err = (&got - &dense).unwrap().sqr().unwrap().mean_all().unwrap();
            let scale = dense.sqr().unwrap().mean_all().unwrap();
            let rel = (err.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap()).sqrt();
            assert!(rel < tolerance, "{q:?}: relative RMS error {rel}");
        }
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap();
        d.max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn stacked_blocks_and_parts_compute_what_their_matrices_do() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 96), &dev).unwrap();
        let a = Tensor::randn(0f32, 0.05, (32, 96), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.05, (16, 96), &dev).unwrap();
        let qa = Matrix::quantized(a, Quantization::Q8_0).unwrap();
        let qb = Matrix::quantized(b.clone(), Quantization::Q8_0).unwrap();
        let separate = Tensor::cat(&[qa.forward(&x).unwrap(), qb.forward(&x).unwrap()], 1);
        let merged = Matrix::stack(vec![qa.clone(), qb]).unwrap();
        assert!(matches!(merged, Matrix::Quantized { .. }));
        assert_eq!(
            max_abs_diff(&merged.forward(&x).unwrap(), &separate.unwrap()),
            0.0
        );
        // Mixed formats stay parts, and still compute side by side.
        let qb6 = Matrix::quantized(b, Quantization::Q6K).unwrap();
        let mixed = Matrix::stack(vec![qa.clone(), qb6.clone()]).unwrap();
        assert!(matches!(mixed, Matrix::Parts(_)));
        let want = Tensor::cat(&[qa.forward(&x).unwrap(), qb6.forward(&x).unwrap()], 1);
        assert_eq!(
            max_abs_diff(&mixed.forward(&x).unwrap(), &want.unwrap()),
            0.0
        );
    }

    #[test]
    fn blocks_from_a_file_compute_like_the_same_blocks_quantized_here() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.05, (16, 96), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 96), &dev).unwrap();
        // Unpadded Q8_0 bytes, as a GGUF file holds them.
        let qt = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let raw = qt.data().unwrap().to_vec();
        let from_file = Matrix::from_blocks(GgmlDType::Q8_0, &raw, 16, 96).unwrap();
        let here = Matrix::quantized(w, Quantization::Q8_0).unwrap();
        let got = from_file.forward(&x).unwrap();
        assert_eq!(max_abs_diff(&got, &here.forward(&x).unwrap()), 0.0);
    }

    #[test]
    fn quantization_needs_f32_on_the_cpu() {
        assert!(Quantization::Q8_0.check(DType::F32, &Device::Cpu).is_ok());
        let err = Quantization::Q8_0
            .check(DType::BF16, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--dtype f32"), "{err}");
        assert!(Quantization::None.check(DType::BF16, &Device::Cpu).is_ok());
    }
}
