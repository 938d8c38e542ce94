//! Branch-free f32 exponentials for loops over slices: libm's `expf` and `tanhf` are one call
//! per element, which keeps such a loop scalar; these compile to a handful of vector
//! instructions per lane. Used by linear attention's feature map elu + 1, momentum attention's
//! softmax, and the f32 activations and losses of MAML.

/// 1.5 · 2²³: adding and subtracting it rounds an f32 of magnitude below 2²² to an integer
/// (to nearest, ties to even).
const ROUND: f32 = 12_582_912.0;

/// x rounded to the nearest integer, as an f32 and as an i32, for |x| < 2²². The integer is
/// read from the bits of x + `ROUND` (whose low mantissa bits hold it): `as i32` would
/// saturate, which compiles to scalar compares and moves and keeps the loop from vectorising.
#[inline(always)]
fn round_to_int(x: f32) -> (f32, i32) {
    let shifted = x + ROUND;
    (shifted - ROUND, (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32))
}

/// 2^n for an integer n in [−126, 127].
#[inline(always)]
fn pow2(n: i32) -> f32 {
    f32::from_bits((n.wrapping_add(127) as u32) << 23)
}

/// 2^x for x in [−126, 127] with relative error below 2e-7, 0 below −126 (and for −∞), 2^127
/// above 127, NaN for NaN: round to nearest with `ROUND`, a degree-6 polynomial for 2^f on
/// [−½, ½], the integer part put into the exponent bits. Results below 2⁻¹²⁶ are flushed to zero
/// (what a softmax, whose arguments are ≤ 0, wants).
#[inline(always)]
pub(crate) fn exp2(x: f32) -> f32 {
    let clamped = x.clamp(-127.0, 127.0);
    let (n, n_int) = round_to_int(clamped);
    let f = clamped - n;
    // Taylor coefficients of 2^f = e^{f ln 2}: (ln 2)^i / i!.
    let p = 1.540_353e-4f32;
    let p = p * f + 1.333_355_8e-3;
    let p = p * f + 9.618_129e-3;
    let p = p * f + 5.550_411e-2;
    let p = p * f + 0.240_226_5;
    let p = p * f + std::f32::consts::LN_2;
    let p = p * f + 1.0;
    let scale = pow2(n_int);
    if x < -126.0 {
        0.0
    } else {
        p * scale
    }
}

/// e^x for every f32, within 1 ulp of the exact value (checked for every f32 in [−104, 89]:
/// worst 0.99 ulp), subnormal results included; ∞ above ln(f32::MAX), 0 below −104, NaN for NaN.
///
/// x = n ln 2 + r with |r| ≤ ½ ln 2 (ln 2 split in two parts so that n·ln2_hi is exact), e^r by
/// Cephes' minimax polynomial for `expf`, and 2^n applied as two factors 2^⌊n/2⌋ · 2^(n−⌊n/2⌋),
/// each a normal float, so that results down to 2⁻¹⁴⁹ round once, correctly.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4; // 355/512: 9 significant bits
    const LN2_LO: f32 = -2.121_944_4e-4; // ln 2 − LN2_HI
    let x = x.clamp(-104.0, 89.0); // NaN stays NaN (unlike max/min)
    let (n, n_int) = round_to_int(x * std::f32::consts::LOG2_E); // n_int in [−150, 129]
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.987_569_2e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let p = p * (r * r) + r + 1.0;
    let half = n_int >> 1;
    p * pow2(half) * pow2(n_int.wrapping_sub(half))
}

/// tanh x for every f32, within 2 ulp of the exact value (checked for every f32 in (0, 10]:
/// worst 1.33 ulp; above 10 it is 1; tanh is odd and so is this), NaN for NaN. Below
/// |x| = 0.625: x + x³·P(x²) (Cephes' minimax polynomial for `tanhf`); above:
/// 1 − 2/(e^{2|x|} + 1) through `exp`, which reaches 1 exactly once e^{2|x|} overflows.
#[inline(always)]
pub(crate) fn tanh(x: f32) -> f32 {
    let a = x.abs();
    let large = 1.0 - 2.0 / (exp(2.0 * a) + 1.0);
    let z = a * a;
    let p = -5.704_988_7e-3f32;
    let p = p * z + 2.063_909e-2;
    let p = p * z - 5.373_971_6e-2;
    let p = p * z + 0.133_314_42;
    let p = p * z - 0.333_332_8;
    let small = a + a * (z * p);
    (if a < 0.625 { small } else { large }).copysign(x)
}

/// ln(1 + u) for u in [0, 1] (NaN for NaN), within 1 ulp: with s = u/(2 + u) ∈ [0, ⅓],
/// ln(1 + u) = 2 atanh s = 2s(1 + s²/3 + s⁴/5 + …), summed to s¹⁶ (the next term is below
/// 2⁻²⁵ of the sum). No 1 + u is formed, so small u keep every bit.
#[inline(always)]
fn log1p_unit(u: f32) -> f32 {
    let s = u / (2.0 + u);
    let z = s * s;
    let p = 1.0f32 / 17.0;
    let p = p * z + 1.0 / 15.0;
    let p = p * z + 1.0 / 13.0;
    let p = p * z + 1.0 / 11.0;
    let p = p * z + 1.0 / 9.0;
    let p = p * z + 1.0 / 7.0;
    let p = p * z + 1.0 / 5.0;
    let p = p * z + 1.0 / 3.0;
    2.0 * s + 2.0 * s * (z * p)
}

/// softplus x = ln(1 + eˣ) for every f32, as max(x, 0) + ln(1 + e^−|x|) (no overflow), within
/// 3 ulp (checked for every f32 in [−104, 30]: worst 2.80 ulp, where the result is close to
/// e^x and carries `exp`'s error and the series' roundings), NaN for NaN.
#[inline(always)]
pub(crate) fn softplus(x: f32) -> f32 {
    x.max(0.0) + log1p_unit(exp(-x.abs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between an f32 and the exact (f64) value.
    fn ulps(got: f32, want: f64) -> f64 {
        let w = want as f32;
        if got == w {
            return 0.0;
        }
        let ulp = (f32::from_bits(w.abs().to_bits() + 1) - w.abs()) as f64;
        (got as f64 - want).abs() / ulp.max(f32::from_bits(1) as f64)
    }

    #[test]
    fn exp2_is_accurate_and_saturates() {
        for i in -2000..=2000 {
            let x = i as f32 * 0.0625;
            let (got, want) = (exp2(x), (x as f64).exp2());
            if x < -126.0 {
                assert_eq!(got, 0.0);
            } else {
                assert!(((got as f64 - want) / want).abs() < 5e-7, "exp2({x}) = {got}, want {want}");
            }
        }
        assert_eq!(exp2(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp2(200.0), 2f32.powi(127));
        assert!(exp2(f32::NAN).is_nan());
    }

    /// Every STEP-th f32 in [−104, 89] (about 2.3 million), plus the edges. With STEP = 1 (all
    /// 2.2e9 of them, 26 s in release) the worst is 0.99 ulp at 70.4031.
    const STEP: usize = 997;

    #[test]
    fn exp_is_within_one_ulp() {
        let mut worst = (0.0, 0.0f32);
        let mut check = |x: f32| {
            let e = ulps(exp(x), (x as f64).exp());
            if e > worst.0 {
                worst = (e, x);
            }
        };
        let neg_end = (-104.0f32).to_bits();
        (0x8000_0000u32..=neg_end).step_by(STEP).for_each(|b| check(f32::from_bits(b)));
        (0u32..=89.0f32.to_bits()).step_by(STEP).for_each(|b| check(f32::from_bits(b)));
        for x in [0.0, -0.0, 1.0, -1.0, 88.72, -87.3, -100.0, -103.9, f32::MIN_POSITIVE] {
            check(x);
        }
        assert!(worst.0 <= 1.0, "exp({}) is {} ulp off", worst.1, worst.0);
    }

    /// Every STEP-th positive f32 below 10 (where tanh rounds to 1), plus the edges; odd
    /// symmetry covers the negatives. With STEP = 1 (all 1.09e9) the worst is 1.33 ulp at 0.62830955.
    #[test]
    fn tanh_is_within_two_ulp() {
        let mut worst = (0.0, 0.0f32);
        let mut check = |x: f32| {
            let e = ulps(tanh(x), (x as f64).tanh());
            if e > worst.0 {
                worst = (e, x);
            }
            assert_eq!(tanh(-x).to_bits(), (-tanh(x)).to_bits(), "tanh is odd at {x}");
        };
        (1u32..=10.0f32.to_bits()).step_by(STEP).for_each(|b| check(f32::from_bits(b)));
        for x in [0.625, 0.624_999_94, 1e-30, 9.0, 20.0, 44.0, 1e30] {
            check(x);
        }
        assert!(worst.0 <= 2.0, "tanh({}) is {} ulp off", worst.1, worst.0);
        assert_eq!(tanh(f32::INFINITY), 1.0);
        assert_eq!(tanh(f32::NEG_INFINITY), -1.0);
        assert_eq!(tanh(-0.0).to_bits(), (-0.0f32).to_bits());
        assert!(tanh(f32::NAN).is_nan());
    }

    /// Every STEP-th f32 in [−104, 30] (beyond, softplus is 0-ish or x itself), plus the edges.
    /// With STEP = 1 (2.2e9 values) the worst is 2.80 ulp at −2.7570076.
    #[test]
    fn softplus_is_within_three_ulp() {
        let exact = |x: f64| x.max(0.0) + (-x.abs()).exp().ln_1p();
        let mut worst = (0.0, 0.0f32);
        let mut check = |x: f32| {
            let e = ulps(softplus(x), exact(x as f64));
            if e > worst.0 {
                worst = (e, x);
            }
        };
        (0x8000_0000u32..=(-104.0f32).to_bits()).step_by(STEP).for_each(|b| check(f32::from_bits(b)));
        (0u32..=30.0f32.to_bits()).step_by(STEP).for_each(|b| check(f32::from_bits(b)));
        for x in [0.0, 1e-30, -1e-30, 20.0, -20.0, 88.0, -87.0, 1e30, -1e30] {
            check(x);
        }
        assert!(worst.0 <= 3.0, "softplus({}) is {} ulp off", worst.1, worst.0);
        assert!(softplus(f32::NAN).is_nan());
        assert_eq!(softplus(f32::INFINITY), f32::INFINITY);
        assert_eq!(softplus(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn exp_special_values() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(88.7).is_finite());
        // A subnormal result: e^−100 ≈ 3.72e-44 = 26.6 · 2^−149.
        assert_eq!(exp(-100.0), (-100f64).exp() as f32);
    }
}
