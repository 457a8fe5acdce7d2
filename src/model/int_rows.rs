//! The matrices our own int8 kernels multiply (`q8_0_avx2`, `q4_k_vnni`, `q6_k_vnni`), behind
//! one type `quant::Matrix::Int8` holds: which layout, and the call into it from a tensor.
//! Knows nothing of which kernel a CPU should use (`Matrix::for_this_cpu` decides).

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{Module, Tensor};

use super::q4_k_vnni::Q4kTiles;
use super::q6_k_vnni::Q6kTiles;
use super::q8_0_avx2::Q8Rows;

/// A block-quantized matrix in the layout of one of our own int8 kernels.
pub enum IntRows {
    /// Q8_0 on CPUs with AVX2 but no VNNI, where candle has no batched kernel.
    Q8_0(Q8Rows),
    /// Q4_K on CPUs with AVX-512 VNNI, where ours keeps the int8 units busier than candle's.
    Q4K(Q4kTiles),
    /// Q6_K on the same CPUs for two activation rows and more; one row goes through candle's
    /// compact blocks (`one_row`), which stream fewer bytes.
    Q6K { tiles: Q6kTiles, one_row: QMatMul },
}

impl IntRows {
    pub fn rows(&self) -> usize {
        match self {
            Self::Q8_0(r) => r.rows(),
            Self::Q4K(t) => t.rows(),
            Self::Q6K { tiles, .. } => tiles.rows(),
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            Self::Q8_0(r) => r.bytes(),
            Self::Q4K(t) => t.bytes(),
            Self::Q6K { tiles, one_row } => {
                tiles.bytes()
                    + match one_row {
                        QMatMul::QTensor(t) => t.storage_size_in_bytes(),
                        QMatMul::Tensor(t) | QMatMul::TensorF16(t) => {
                            t.elem_count() * t.dtype().size_in_bytes()
                        }
                    }
            }
        }
    }

    pub fn format(&self) -> GgmlDType {
        match self {
            Self::Q8_0(_) => GgmlDType::Q8_0,
            Self::Q4K(_) => GgmlDType::Q4K,
            Self::Q6K { .. } => GgmlDType::Q6K,
        }
    }

    /// `x @ self.T` for `x` (`[.., width]`, padded) as a tensor `[.., rows]`.
    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut out_dims = x.dims().to_vec();
        let width = out_dims.pop().unwrap_or(0);
        let m = x.elem_count() / width.max(1);
        if let (Self::Q6K { one_row, .. }, 1) = (self, m) {
            return one_row.forward(x);
        }
        let values = x.flatten_all()?.to_vec1::<f32>()?;
        out_dims.push(self.rows());
        let out = match self {
            Self::Q8_0(r) => r.matmul(&values, m),
            Self::Q4K(t) => t.matmul(&values, m),
            Self::Q6K { tiles, .. } => tiles.matmul(&values, m),
        };
        Tensor::from_vec(out, out_dims, x.device())
    }
}
