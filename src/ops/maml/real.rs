//! The float types the MAML CPU path is generic over (f32, f64), the activations as
//! zero-sized types (so that every elementwise loop is monomorphised and vectorisable), and
//! the small dense products of the per-task passes.

use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub, SubAssign};

use crate::cpu::{dgemm, sgemm, Mat};
use crate::Element;

/// f32 or f64.
pub(crate) trait Real:
    Element
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + PartialOrd
{
    const ZERO: Self;
    const ONE: Self;
    fn of(v: f64) -> Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn ln_1p(self) -> Self;
    fn tanh(self) -> Self;
    fn abs(self) -> Self;
    fn max(self, other: Self) -> Self;
    /// C = alpha·A·B + beta·C through the crate's cache-blocked GEMM.
    fn gemm(alpha: Self, a: Mat<'_, Self>, b: Mat<'_, Self>, beta: Self, c: &mut [Self], ldc: usize) -> bool;
}

macro_rules! real {
    ($t:ty, $gemm:ident) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn of(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn ln_1p(self) -> Self {
                <$t>::ln_1p(self)
            }
            #[inline(always)]
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            #[inline(always)]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline(always)]
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            fn gemm(alpha: Self, a: Mat<'_, Self>, b: Mat<'_, Self>, beta: Self, c: &mut [Self], ldc: usize) -> bool {
                $gemm(alpha, a, b, beta, c, ldc)
            }
        }
    };
}
real!(f32, sgemm);
real!(f64, dgemm);

// ------------------------------------------------------------------------------------------
// Activations: value, first and second derivative.

/// An activation σ with σ' and σ''.
pub(crate) trait Act {
    fn value<T: Real>(z: T) -> T;
    /// (σ'(z), σ''(z)).
    fn derivs<T: Real>(z: T) -> (T, T);
    /// σ'(z) alone (cheaper where σ'' is not needed).
    fn d1<T: Real>(z: T) -> T {
        Self::derivs(z).0
    }
}

pub(crate) struct Relu;
pub(crate) struct Tanh;
pub(crate) struct Gelu;
pub(crate) struct Softplus;

impl Act for Relu {
    #[inline(always)]
    fn value<T: Real>(z: T) -> T {
        if z > T::ZERO {
            z
        } else {
            T::ZERO
        }
    }
    #[inline(always)]
    fn derivs<T: Real>(z: T) -> (T, T) {
        (if z > T::ZERO { T::ONE } else { T::ZERO }, T::ZERO)
    }
}

impl Act for Tanh {
    #[inline(always)]
    fn value<T: Real>(z: T) -> T {
        z.tanh()
    }
    #[inline(always)]
    fn derivs<T: Real>(z: T) -> (T, T) {
        let t = z.tanh();
        let d1 = T::ONE - t * t;
        (d1, T::of(-2.0) * t * d1)
    }
}

const GELU_C: f64 = 0.797_884_560_802_865_4; // √(2/π)
const GELU_A: f64 = 0.044_715;

impl Act for Gelu {
    #[inline(always)]
    fn value<T: Real>(z: T) -> T {
        let u = T::of(GELU_C) * (z + T::of(GELU_A) * z * z * z);
        T::of(0.5) * z * (T::ONE + u.tanh())
    }
    #[inline(always)]
    fn derivs<T: Real>(z: T) -> (T, T) {
        // g = ½z(1 + tanh u), u = c(z + a z³):
        // g'  = ½(1 + t) + ½ z (1 − t²) u'
        // g'' = (1 − t²) (u' + ½ z (u'' − 2 t u'²)),  u' = c(1 + 3a z²), u'' = 6 c a z.
        let (c, a) = (T::of(GELU_C), T::of(GELU_A));
        let half = T::of(0.5);
        let t = (c * (z + a * z * z * z)).tanh();
        let sech2 = T::ONE - t * t;
        let du = c * (T::ONE + T::of(3.0) * a * z * z);
        let ddu = T::of(6.0) * c * a * z;
        let d1 = half * (T::ONE + t) + half * z * sech2 * du;
        let d2 = sech2 * (du + half * z * (ddu - T::of(2.0) * t * du * du));
        (d1, d2)
    }
}

impl Act for Softplus {
    #[inline(always)]
    fn value<T: Real>(z: T) -> T {
        z.max(T::ZERO) + (-z.abs()).exp().ln_1p()
    }
    #[inline(always)]
    fn derivs<T: Real>(z: T) -> (T, T) {
        let s = sigmoid(z);
        (s, s * (T::ONE - s))
    }
    #[inline(always)]
    fn d1<T: Real>(z: T) -> T {
        sigmoid(z)
    }
}

/// The logistic function, stable for large |z|.
#[inline(always)]
fn sigmoid<T: Real>(z: T) -> T {
    if z >= T::ZERO {
        T::ONE / (T::ONE + (-z).exp())
    } else {
        let e = z.exp();
        e / (T::ONE + e)
    }
}

/// Runs `$body` with the type alias `$a` bound to the activation type of `$act`.
macro_rules! with_act {
    ($act:expr, $a:ident => $body:expr) => {
        match $act {
            $crate::ops::maml::Activation::Relu => {
                type $a = $crate::ops::maml::real::Relu;
                $body
            }
            $crate::ops::maml::Activation::Tanh => {
                type $a = $crate::ops::maml::real::Tanh;
                $body
            }
            $crate::ops::maml::Activation::Gelu => {
                type $a = $crate::ops::maml::real::Gelu;
                $body
            }
            $crate::ops::maml::Activation::Softplus => {
                type $a = $crate::ops::maml::real::Softplus;
                $body
            }
        }
    };
}
pub(crate) use with_act;

// ------------------------------------------------------------------------------------------
// Dense products, all accumulating into C. Small products (the MAML regime: tens of samples,
// tens of units) run as register-friendly loops without any allocation; large ones go to the
// cache-blocked GEMM, whose packing cost is then negligible.

/// Products with fewer multiply-adds than this use the direct loops.
const DIRECT_MAX_FLOPS: usize = 1 << 17;

/// c[n×m] += a[n×k] · b[m×k]ᵀ.
pub(crate) fn mm_nt<T: Real>(a: &[T], b: &[T], c: &mut [T], n: usize, m: usize, k: usize) {
    if n * m * k >= DIRECT_MAX_FLOPS {
        let ok = T::gemm(T::ONE, Mat::new(a, n, k), Mat::new(b, m, k).t(), T::ONE, c, m);
        debug_assert!(ok, "mm_nt shapes");
        return;
    }
    for (a_row, c_row) in a.chunks_exact(k).zip(c.chunks_exact_mut(m)).take(n) {
        for (b_row, c_val) in b.chunks_exact(k).zip(c_row.iter_mut()) {
            *c_val += dot(a_row, b_row);
        }
    }
}

/// c[m×k] += a[n×m]ᵀ · b[n×k].
pub(crate) fn mm_tn<T: Real>(a: &[T], b: &[T], c: &mut [T], n: usize, m: usize, k: usize) {
    if n * m * k >= DIRECT_MAX_FLOPS {
        let ok = T::gemm(T::ONE, Mat::new(a, n, m).t(), Mat::new(b, n, k), T::ONE, c, k);
        debug_assert!(ok, "mm_tn shapes");
        return;
    }
    for (a_row, b_row) in a.chunks_exact(m).zip(b.chunks_exact(k)).take(n) {
        for (&s, c_row) in a_row.iter().zip(c.chunks_exact_mut(k)) {
            axpy(s, b_row, c_row);
        }
    }
}

/// c[n×k] += a[n×m] · b[m×k].
pub(crate) fn mm_nn<T: Real>(a: &[T], b: &[T], c: &mut [T], n: usize, m: usize, k: usize) {
    if n * m * k >= DIRECT_MAX_FLOPS {
        let ok = T::gemm(T::ONE, Mat::new(a, n, m), Mat::new(b, m, k), T::ONE, c, k);
        debug_assert!(ok, "mm_nn shapes");
        return;
    }
    for (a_row, c_row) in a.chunks_exact(m).zip(c.chunks_exact_mut(k)).take(n) {
        for (&s, b_row) in a_row.iter().zip(b.chunks_exact(k)) {
            axpy(s, b_row, c_row);
        }
    }
}

/// y += s·x.
#[inline(always)]
pub(crate) fn axpy<T: Real>(s: T, x: &[T], y: &mut [T]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += s * xi;
    }
}

/// Σ a_i b_i with eight independent partial sums (vectorisable without reassociation).
#[inline(always)]
pub(crate) fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    const LANES: usize = 8;
    let mut acc = [T::ZERO; LANES];
    let chunks = a.chunks_exact(LANES).zip(b.chunks_exact(LANES));
    for (ca, cb) in chunks {
        for j in 0..LANES {
            acc[j] += ca[j] * cb[j];
        }
    }
    let tail = a.len() - a.len() % LANES;
    let mut sum = T::ZERO;
    for (&x, &y) in a[tail..].iter().zip(&b[tail..]) {
        sum += x * y;
    }
    let (lo, hi) = acc.split_at(LANES / 2);
    let mut pairs = [T::ZERO; LANES / 2];
    for j in 0..LANES / 2 {
        pairs[j] = lo[j] + hi[j];
    }
    sum + (pairs[0] + pairs[2]) + (pairs[1] + pairs[3])
}
