//! SwiGLU's activation, `silu(gate) * up`, read straight from the fused `[T, 2 * I]` output of
//! the gate and up projections (gate in the first half of each row, up in the second).
//!
//! On the CPU it is one pass writing `[T, I]`, instead of two strided views, a silu pass and a
//! multiply pass with a temporary each; elsewhere the same thing is spelled with candle ops.
//! Knows nothing of layers or batches.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor, D};
use half::{bf16, f16};

/// `silu(x[.., :I]) * x[.., I:]` for `x` of shape `[T, 2 * I]`.
pub fn swiglu(gate_up: &Tensor) -> candle_core::Result<Tensor> {
    let half = gate_up.dim(D::Minus1)? / 2;
    if matches!(gate_up.device(), Device::Cpu) {
        return gate_up.apply_op1_no_bwd(&SwiGlu);
    }
    let gate = gate_up.narrow(D::Minus1, 0, half)?;
    let up = gate_up.narrow(D::Minus1, half, half)?;
    candle_nn::ops::silu(&gate)? * up
}

struct SwiGlu;

/// `x * sigmoid(x)`, computed in f32 whatever the storage type.
#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn rows<T: Copy>(x: &[T], width: usize, to: impl Fn(T) -> f32, from: impl Fn(f32) -> T) -> Vec<T> {
    let half = width / 2;
    let mut out = Vec::with_capacity(x.len() / 2);
    for row in x.chunks_exact(width) {
        let (gate, up) = row.split_at(half);
        out.extend(
            gate.iter()
                .zip(up)
                .map(|(&g, &u)| from(silu(to(g)) * to(u))),
        );
    }
    out
}

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims();
        let width = dims.last().copied().unwrap_or(0);
        if width % 2 != 0 {
            candle_core::bail!("swiglu: last dimension {width} is odd");
        }
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("swiglu: input must be contiguous");
        };
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = width / 2;
        }
        let storage = match s {
            CpuStorage::F32(x) => CpuStorage::F32(rows(&x[start..end], width, |v| v, |v| v)),
            CpuStorage::F16(x) => {
                CpuStorage::F16(rows(&x[start..end], width, f16::to_f32, f16::from_f32))
            }
            CpuStorage::BF16(x) => {
                CpuStorage::BF16(rows(&x[start..end], width, bf16::to_f32, bf16::from_f32))
            }
            other => candle_core::bail!("swiglu: unsupported dtype {:?}", other.dtype()),
        };
        Ok((storage, Shape::from(out_dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn matches_silu_times_up_in_every_dtype() -> candle_core::Result<()> {
        let x = Tensor::randn(0f32, 3.0, (7, 2 * 13), &Device::Cpu)?;
        let gate = x.narrow(1, 0, 13)?;
        let up = x.narrow(1, 13, 13)?;
        let want = (candle_nn::ops::silu(&gate)? * up)?;
        // Relative to the size of the result: half types round it to 11 or 8 bits.
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 2e-3), (DType::BF16, 1e-2)] {
            let got = swiglu(&x.to_dtype(dtype)?)?.to_dtype(DType::F32)?;
            assert_eq!(got.dims(), &[7, 13]);
            let scale = (want.abs()? + 1.0)?;
            let diff = ((got - &want)?.abs()? / scale)?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(diff < tol, "{dtype:?}: max relative difference {diff}");
        }
        Ok(())
    }

    #[test]
    fn rejects_an_odd_width() {
        let x = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
        assert!(swiglu(&x).is_err());
    }
}
