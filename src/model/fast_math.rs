//! Scalar f32 math written so that LLVM vectorises the loops that inline it, and the split
//! between code compiled for AVX2 + FMA and the portable baseline.
//!
//! libm's `expf` is an opaque call per element, which keeps any loop around it scalar; the
//! kernels here are branch-free selects and multiply-adds that inline into the caller's loop.
//! Which multiply-add they use is a type parameter, so that one source compiles both to FMA
//! instructions (inside `#[target_feature(enable = "avx2,fma")]` entry points chosen at run
//! time with [`cpu_has_avx2_fma`]) and to plain multiplies and adds everywhere else.

/// How a kernel multiply-adds. Rust never contracts `a * b + c` into an FMA by itself, and
/// `f32::mul_add` without hardware FMA is a call to libm's `fmaf`, so the choice is made per
/// compiled entry point.
pub(crate) trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

/// Fused multiply-add; only for code compiled with the `fma` target feature.
#[cfg(target_arch = "x86_64")]
pub(crate) struct Fused;

#[cfg(target_arch = "x86_64")]
impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// A multiply then an add, for targets that may lack FMA.
pub(crate) struct Unfused;

impl MulAdd for Unfused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// `e^x` to about 1e-7 relative error, inlined so the hot loop does not call into libm.
///
/// Inputs below -87 give `e^-87` rather than a subnormal or zero, and inputs above 88 give
/// `e^88` rather than infinity; NaN gives NaN.
#[inline(always)]
pub(crate) fn fast_exp<M: MulAdd>(x: f32) -> f32 {
    // Written as selects (not `clamp`, whose NaN rules block vectorisation).
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    // Adding 1.5 * 2^23 rounds x·log2(e) to the nearest integer n (ties to even) and leaves n
    // in the low mantissa bits of `t`, so 2^n comes from integer bit operations rather than a
    // saturating float-to-int conversion, which does not vectorise well.
    const ROUND: f32 = 12_582_912.0;
    let t = M::mul_add(x, std::f32::consts::LOG2_E, ROUND);
    let n = t - ROUND;
    // Cody-Waite: ln 2 split so that n * LN2_HI is exact.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let r = M::mul_add(-n, LN2_LO, M::mul_add(-n, LN2_HI, x));
    let mut p = 1.0 / 720.0;
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = M::mul_add(p, r, c);
    }
    // n is within [-126, 127] after the clamp, so n + 127 is a normal float's biased exponent;
    // the shift drops the bits of `ROUND` above it (its low 22 mantissa bits are zero).
    p * f32::from_bits(t.to_bits().wrapping_add(127) << 23)
}

/// Whether this CPU can run the `avx2,fma` entry points.
pub(crate) fn cpu_has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate_over_the_softmax_range() {
        for i in 0..=200_000 {
            let x = -90.0 + 90.0 * i as f32 / 200_000.0;
            let want = (x as f64).max(-87.0).exp();
            #[cfg(target_arch = "x86_64")]
            let both = [fast_exp::<Unfused>(x), fast_exp::<Fused>(x)];
            #[cfg(not(target_arch = "x86_64"))]
            let both = [fast_exp::<Unfused>(x)];
            for got in both {
                let err = (got as f64 - want).abs() / want;
                assert!(err < 1e-6, "e^{x}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn fast_exp_saturates_and_propagates_nan() {
        #[cfg(target_arch = "x86_64")]
        let both = [fast_exp::<Unfused>, fast_exp::<Fused>];
        #[cfg(not(target_arch = "x86_64"))]
        let both = [fast_exp::<Unfused>];
        for m in both {
            assert_eq!(m(-1000.0), m(-87.0));
            assert_eq!(m(1000.0), m(88.0));
            assert!(m(88.0).is_finite());
            assert!(m(f32::NAN).is_nan());
        }
    }
}
