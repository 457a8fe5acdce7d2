//! Weight-only quantization of the decoder's projection matrices (`--quantization`): which
//! GGML block format each matrix gets, and the matmul through candle's quantized kernels
//! (int8 dot products, repacked for AVX-512 VNNI or AVX2 at run time).
//!
//! A matrix is quantized along its input dimension, in blocks of 32 (Q8_0, Q4_0) or 256
//! (k-quants) weights with a scale each, as llama.cpp's GGUF files are; the activations are
//! quantized to 8 bits once per matmul, not per weight row. Knows nothing of layers or of
//! which matrix is which: the decoder asks for one matrix at a time.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};

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
}

impl Quantization {
    fn ggml(self) -> Option<GgmlDType> {
        match self {
            Self::None => None,
            Self::Q8_0 => Some(GgmlDType::Q8_0),
            Self::Q4_0 => Some(GgmlDType::Q4_0),
            Self::Q4K => Some(GgmlDType::Q4K),
            Self::Q6K => Some(GgmlDType::Q6K),
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
}

impl Matrix {
    /// `weight` quantized in the format `q` names (`None` keeps it dense).
    pub fn quantized(weight: Tensor, q: Quantization) -> Result<Self, ModelError> {
        let Some(format) = q.ggml() else {
            return Ok(Self::Dense(weight));
        };
        let (_, in_features) = weight.dims2()?;
        let pad = in_features.next_multiple_of(WIDTH_MULTIPLE) - in_features;
        let weight = weight.to_dtype(DType::F32)?.pad_with_zeros(1, 0, pad)?;
        let qt = QTensor::quantize(&weight, format)?;
        Ok(Self::Quantized {
            matmul: QMatMul::from_qtensor(qt)?,
            in_features,
        })
    }

    /// The block format, or `None` when dense.
    pub fn format(&self) -> Option<GgmlDType> {
        match self {
            Self::Quantized {
                matmul: QMatMul::QTensor(t),
                ..
            } => Some(t.dtype()),
            _ => None,
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
        }
    }
}

impl Module for Matrix {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(w) => x.matmul(&w.t()?),
            Self::Quantized {
                matmul,
                in_features,
            } => {
                let width = x.dim(D::Minus1)?;
                if width != *in_features {
                    candle_core::bail!("input width {width}, the matrix takes {in_features}");
                }
                let pad = width.next_multiple_of(WIDTH_MULTIPLE) - width;
                // The quantized kernels read a contiguous f32 input.
                matmul.forward(&x.pad_with_zeros(D::Minus1, 0, pad)?.contiguous()?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        for (q, tolerance) in [
            (Quantization::Q8_0, 0.01),
            (Quantization::Q6K, 0.03),
            (Quantization::Q4K, 0.1),
            (Quantization::Q4_0, 0.1),
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
