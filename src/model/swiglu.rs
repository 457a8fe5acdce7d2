//! SwiGLU's activation, `silu(gate) * up`, read straight from the fused `[T, 2 * I]` output of
//! the gate and up projections (gate in the first half of each row, up in the second).
//!
//! On the CPU it is one pass writing `[T, I]`, instead of two strided views, a silu pass and a
//! multiply pass with a temporary each; elsewhere the same thing is spelled with candle ops.
//! Knows nothing of layers or batches.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor, D};
use half::{bf16, f16, slice::HalfFloatSliceExt};

#[cfg(target_arch = "x86_64")]
use super::fast_math::Fused;
use super::fast_math::{cpu_has_avx2_fma, fast_exp, MulAdd, Unfused};

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

/// `silu(g) * u = g / (1 + e^-g) * u` over a slice, computed in f32.
///
/// `fast_exp` saturates at `e^88`, so a large negative `g` gives a tiny `g / e^88` where
/// libm's infinity would give -0, and a large positive one gives exactly `g`; NaN propagates.
#[inline(always)]
fn swiglu_slice<M: MulAdd>(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + fast_exp::<M>(-g)) * u;
    }
}

/// Storage types the CPU op reads; the math is always f32.
trait Elem: Copy + Default {
    /// Writes each `[gate | up]` row of `x` (rows of `width`) as one row of `out`.
    fn rows<M: MulAdd>(x: &[Self], width: usize, out: &mut [Self]);
}

impl Elem for f32 {
    #[inline(always)]
    fn rows<M: MulAdd>(x: &[f32], width: usize, out: &mut [f32]) {
        let half = width / 2;
        for (row, o) in x.chunks_exact(width).zip(out.chunks_exact_mut(half)) {
            let (gate, up) = row.split_at(half);
            swiglu_slice::<M>(gate, up, o);
        }
    }
}

/// Elements converted per block: stack buffers small enough to stay in L1, long enough that
/// the slice conversions (F16C when the CPU has it) and the vector loop amortise their setup.
const HALF_BLOCK: usize = 256;

/// Half-type rows through f32 stack buffers, so the same vectorised loop does the math.
#[inline(always)]
fn half_rows<M: MulAdd, T: Copy>(x: &[T], width: usize, out: &mut [T])
where
    [T]: HalfFloatSliceExt,
{
    let half = width / 2;
    let mut gate32 = [0f32; HALF_BLOCK];
    let mut up32 = [0f32; HALF_BLOCK];
    let mut out32 = [0f32; HALF_BLOCK];
    for (row, o) in x.chunks_exact(width).zip(out.chunks_exact_mut(half)) {
        let (gate, up) = row.split_at(half);
        let blocks = gate
            .chunks(HALF_BLOCK)
            .zip(up.chunks(HALF_BLOCK))
            .zip(o.chunks_mut(HALF_BLOCK));
        for ((g, u), o) in blocks {
            let n = g.len();
            g.convert_to_f32_slice(&mut gate32[..n]);
            u.convert_to_f32_slice(&mut up32[..n]);
            swiglu_slice::<M>(&gate32[..n], &up32[..n], &mut out32[..n]);
            o.convert_from_f32_slice(&out32[..n]);
        }
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn rows<M: MulAdd>(x: &[f16], width: usize, out: &mut [f16]) {
        half_rows::<M, f16>(x, width, out)
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn rows<M: MulAdd>(x: &[bf16], width: usize, out: &mut [bf16]) {
        half_rows::<M, bf16>(x, width, out)
    }
}

/// The rows compiled for AVX2 + FMA, which the baseline x86-64 target lacks.
///
/// # Safety
/// The CPU must support AVX2 and FMA; callers check with `cpu_has_avx2_fma`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2<T: Elem>(x: &[T], width: usize, out: &mut [T]) {
    T::rows::<Fused>(x, width, out)
}

/// `[.., width]` in, `[.., width / 2]` out, with the kernel chosen by the caller so that tests
/// cover the portable one too.
fn rows_with<T: Elem>(x: &[T], width: usize, avx2: bool) -> Vec<T> {
    let mut out = vec![T::default(); x.len() / 2];
    // `chunks_exact(0)` panics; a zero-width input has nothing to compute.
    if width == 0 {
        return out;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2` is true only when `cpu_has_avx2_fma` found both AVX2 and FMA on this
        // CPU, which is the sole requirement of `rows_avx2`.
        unsafe { rows_avx2(x, width, &mut out) };
        return out;
    }
    let _ = avx2;
    T::rows::<Unfused>(x, width, &mut out);
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
        let avx2 = cpu_has_avx2_fma();
        let storage = match s {
            CpuStorage::F32(x) => CpuStorage::F32(rows_with(&x[start..end], width, avx2)),
            CpuStorage::F16(x) => CpuStorage::F16(rows_with(&x[start..end], width, avx2)),
            CpuStorage::BF16(x) => CpuStorage::BF16(rows_with(&x[start..end], width, avx2)),
            other => candle_core::bail!("swiglu: unsupported dtype {:?}", other.dtype()),
        };
        Ok((storage, Shape::from(out_dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    const ROWS: usize = 7;
    /// Wider than `HALF_BLOCK` and not a multiple of the vector width, so block and loop
    /// tails are covered.
    const HALF: usize = 301;

    /// `[ROWS, 2 * HALF]` of N(0, 3) with saturating gates (beyond the ±88 where `e^-g` leaves
    /// f32's range) and a NaN gate planted in it.
    fn inputs() -> candle_core::Result<Tensor> {
        let mut x = Tensor::randn(0f32, 3.0, (ROWS, 2 * HALF), &Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let w = 2 * HALF;
        for (i, g) in [100.0, -100.0, 90.0, -90.0, 20.0, -20.0, f32::NAN]
            .into_iter()
            .enumerate()
        {
            x[i * w + 5 * i] = g;
        }
        // Exactly zero gate and up, and a NaN up.
        x[w + 1] = 0.0;
        x[2 * w + HALF + 2] = 0.0;
        x[3 * w + HALF + 3] = f32::NAN;
        Tensor::from_vec(x, (ROWS, w), &Device::Cpu)
    }

    fn reference(x: &Tensor) -> candle_core::Result<Vec<f32>> {
        let gate = x.narrow(1, 0, HALF)?;
        let up = x.narrow(1, HALF, HALF)?;
        (candle_nn::ops::silu(&gate)? * up)?
            .flatten_all()?
            .to_vec1::<f32>()
    }

    /// Largest `|got - want| / (1 + |want|)`, after checking that NaNs are where they should be.
    fn max_relative_error(what: &str, got: &[f32], want: &[f32]) -> f32 {
        assert_eq!(got.len(), want.len(), "{what}");
        let mut worst = 0f32;
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert_eq!(
                g.is_nan(),
                w.is_nan(),
                "{what}: element {i}: got {g}, want {w}"
            );
            if !w.is_nan() {
                worst = worst.max((g - w).abs() / (1.0 + w.abs()));
            }
        }
        worst
    }

    #[test]
    fn matches_silu_times_up_in_every_dtype() -> candle_core::Result<()> {
        let x = inputs()?;
        let want = reference(&x)?;
        // Relative to the size of the result: half types round it to 11 or 8 bits.
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 2e-3), (DType::BF16, 1e-2)] {
            let got = swiglu(&x.to_dtype(dtype)?)?.to_dtype(DType::F32)?;
            assert_eq!(got.dims(), &[ROWS, HALF]);
            let got = got.flatten_all()?.to_vec1::<f32>()?;
            let diff = max_relative_error(&format!("{dtype:?}"), &got, &want);
            assert!(diff < tol, "{dtype:?}: max relative difference {diff}");
        }
        Ok(())
    }

    #[test]
    fn both_kernels_match_silu_times_up() -> candle_core::Result<()> {
        let x = inputs()?;
        let want = reference(&x)?;
        let data = x.flatten_all()?.to_vec1::<f32>()?;
        let mut kernels = vec![false];
        if cpu_has_avx2_fma() {
            kernels.push(true);
        }
        for avx2 in kernels {
            let got = rows_with(&data, 2 * HALF, avx2);
            let diff = max_relative_error(&format!("avx2 {avx2}"), &got, &want);
            assert!(diff < 1e-5, "avx2 {avx2}: max relative difference {diff}");
        }
        Ok(())
    }

    #[test]
    fn saturating_gates_follow_silu_limits() {
        let data = [100.0, -100.0, 1e30, -1e30, 2.0, 3.0, 2.0, 3.0];
        let got = rows_with(&data, 8, cpu_has_avx2_fma());
        // silu(g) = g for large g, and vanishes (no NaN from inf / inf) for very negative g.
        assert_eq!(got[0], 200.0);
        assert_eq!(got[2], 2e30);
        assert!(got[1].abs() < 1e-30 && got[1] <= 0.0, "{}", got[1]);
        assert!(got[3].abs() < 1e-6 && got[3] <= 0.0, "{}", got[3]);
    }

    #[test]
    fn accepts_a_zero_width() -> candle_core::Result<()> {
        let x = Tensor::zeros((3, 0), DType::F32, &Device::Cpu)?;
        assert_eq!(swiglu(&x)?.dims(), &[3, 0]);
        Ok(())
    }

    #[test]
    fn rejects_an_odd_width() {
        let x = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
        assert!(swiglu(&x).is_err());
    }
}
