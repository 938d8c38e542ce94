//! The float types the MAML CPU path is generic over (f32, f64), the activations as
//! zero-sized types (so that every elementwise loop is monomorphised and vectorisable), and
//! the small dense products of the per-task passes.

use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub, SubAssign};

use crate::cpu::{dgemm, math, sgemm, Mat};
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
    fn tanh(self) -> Self;
    /// ln(1 + eˢᵉˡᶠ), without overflow.
    fn softplus(self) -> Self;
    fn max(self, other: Self) -> Self;
    /// self·a + b with one rounding (an FMA instruction where the target has one).
    fn mul_add(self, a: Self, b: Self) -> Self;
    /// C = alpha·A·B + beta·C through the crate's cache-blocked GEMM.
    fn gemm(alpha: Self, a: Mat<'_, Self>, b: Mat<'_, Self>, beta: Self, c: &mut [Self], ldc: usize) -> bool;
    /// bt[cols×rows] = b[rows×cols]ᵀ.
    fn transpose(b: &[Self], rows: usize, cols: usize, bt: &mut [Self]);
}

macro_rules! real {
    ($t:ty, $gemm:ident, $transpose:ident, exp: $exp:path, tanh: $tanh:path, softplus: $softplus:path) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn of(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn exp(self) -> Self {
                $exp(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn tanh(self) -> Self {
                $tanh(self)
            }
            #[inline(always)]
            fn softplus(self) -> Self {
                $softplus(self)
            }
            #[inline(always)]
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            #[inline(always)]
            fn mul_add(self, a: Self, b: Self) -> Self {
                <$t>::mul_add(self, a, b)
            }
            fn gemm(
                alpha: Self,
                a: Mat<'_, Self>,
                b: Mat<'_, Self>,
                beta: Self,
                c: &mut [Self],
                ldc: usize,
            ) -> bool {
                $gemm(alpha, a, b, beta, c, ldc)
            }
            #[inline(always)]
            fn transpose(b: &[Self], rows: usize, cols: usize, bt: &mut [Self]) {
                $transpose(b, rows, cols, bt)
            }
        }
    };
}
// f32's transcendentals vectorise (libm's are a call per element: tanh alone was 60% of the
// 64-256-256-10 Tanh gradient); f64, the tests' reference precision, keeps libm's.
real!(f32, sgemm, transpose_f32, exp: math::exp, tanh: math::tanh, softplus: math::softplus);
real!(f64, dgemm, transpose_tiles, exp: f64::exp, tanh: f64::tanh, softplus: softplus_f64);

/// softplus as max(x, 0) + ln(1 + e^−|x|): no overflow for large x.
#[inline(always)]
fn softplus_f64(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

// ------------------------------------------------------------------------------------------
// Activations: value, first and second derivative.

/// An activation σ with σ' and σ''.
pub(crate) trait Act {
    fn value<T: Real>(z: T) -> T;
    /// (σ'(z), σ''(z)).
    fn derivs<T: Real>(z: T) -> (T, T);
    /// σ'(z) alone (cheaper where σ'' is not needed).
    #[inline(always)]
    fn d1<T: Real>(z: T) -> T {
        Self::derivs(z).0
    }
    /// (σ'(z), σ''(z)) given h = σ(z) as well (tanh needs no transcendental then).
    #[inline(always)]
    fn derivs_at<T: Real>(z: T, _h: T) -> (T, T) {
        Self::derivs(z)
    }
    /// σ'(z) given h = σ(z) as well.
    #[inline(always)]
    fn d1_at<T: Real>(z: T, _h: T) -> T {
        Self::d1(z)
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
        Self::derivs_at(z, z.tanh())
    }
    #[inline(always)]
    fn derivs_at<T: Real>(_z: T, t: T) -> (T, T) {
        let d1 = T::ONE - t * t;
        (d1, T::of(-2.0) * t * d1)
    }
    #[inline(always)]
    fn d1_at<T: Real>(_z: T, t: T) -> T {
        T::ONE - t * t
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
        z.softplus()
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
// tens of units) run on a register-tiled kernel without any allocation, compiled for AVX2+FMA
// when the CPU has it (runtime detection) and for the baseline otherwise; large ones go to the
// cache-blocked GEMM, whose packing cost is then negligible.

/// Products with at least this many multiply-adds go to the cache-blocked GEMM.
const GEMM_MIN_MACS: usize = 1 << 18;

/// Whether an [n×k]·[k×m] product takes the small-product kernel (else the blocked GEMM).
pub(crate) fn is_small(n: usize, m: usize, k: usize) -> bool {
    n * m * k < GEMM_MIN_MACS
}

/// c[n×m] += a[n×k] · b[m×k]ᵀ through the blocked GEMM (large products; small ones transpose
/// b once with [`transpose`] and use [`mm_nn`]).
pub(crate) fn mm_nt<T: Real>(a: &[T], b: &[T], c: &mut [T], n: usize, m: usize, k: usize) {
    let ok = T::gemm(T::ONE, Mat::new(a, n, k), Mat::new(b, m, k).t(), T::ONE, c, m);
    debug_assert!(ok, "mm_nt shapes");
}

/// bt[cols×rows] = b[rows×cols]ᵀ. The small-product path transposes every weight matrix (and
/// the HVP direction's) once per pass, so this runs about as often as the products themselves.
#[inline(always)]
pub(crate) fn transpose<T: Real>(b: &[T], rows: usize, cols: usize, bt: &mut [T]) {
    T::transpose(b, rows, cols, bt);
}

/// Side of the square tiles of [`transpose_tiles`].
const TILE: usize = 8;

/// The portable transpose: 8×8 tiles, each read as 8 row segments and written as 8 column
/// segments, then the edges element by element.
#[inline(always)]
fn transpose_tiles<T: Real>(b: &[T], rows: usize, cols: usize, bt: &mut [T]) {
    let (b, bt) = (&b[..rows * cols], &mut bt[..rows * cols]);
    let (full_rows, full_cols) = (rows / TILE * TILE, cols / TILE * TILE);
    for i0 in (0..full_rows).step_by(TILE) {
        for j0 in (0..full_cols).step_by(TILE) {
            let mut tile = [[T::ZERO; TILE]; TILE];
            for (i, row) in tile.iter_mut().enumerate() {
                let start = (i0 + i) * cols + j0;
                row.copy_from_slice(&b[start..start + TILE]);
            }
            for j in 0..TILE {
                let start = (j0 + j) * rows + i0;
                for (out, row) in bt[start..start + TILE].iter_mut().zip(&tile) {
                    *out = row[j];
                }
            }
        }
    }
    transpose_edges(b, rows, cols, bt, full_rows, full_cols);
}

/// The elements outside the [full_rows × full_cols] corner that the tiles covered.
#[inline(always)]
fn transpose_edges<T: Real>(
    b: &[T],
    rows: usize,
    cols: usize,
    bt: &mut [T],
    full_rows: usize,
    full_cols: usize,
) {
    for i in 0..rows {
        let first_col = if i < full_rows { full_cols } else { 0 };
        for j in first_col..cols {
            bt[j * rows + i] = b[i * cols + j];
        }
    }
}

/// f32: 8×8 tiles through AVX shuffles where the CPU has AVX, else [`transpose_tiles`].
#[inline(always)]
fn transpose_f32(b: &[f32], rows: usize, cols: usize, bt: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if rows >= TILE && cols >= TILE && std::is_x86_feature_detected!("avx") {
            // SAFETY: the CPU supports AVX (checked just above).
            unsafe { transpose_f32_avx(b, rows, cols, bt) };
            return;
        }
    }
    transpose_tiles(b, rows, cols, bt);
}

/// The classic 8×8 register transpose (unpack, shuffle, 128-bit permute) per full tile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose_f32_avx(b: &[f32], rows: usize, cols: usize, bt: &mut [f32]) {
    use std::arch::x86_64::*;
    let (b, bt) = (&b[..rows * cols], &mut bt[..rows * cols]);
    let (full_rows, full_cols) = (rows / TILE * TILE, cols / TILE * TILE);
    let (src, dst) = (b.as_ptr(), bt.as_mut_ptr());
    for i0 in (0..full_rows).step_by(TILE) {
        for j0 in (0..full_cols).step_by(TILE) {
            // SAFETY: rows i0..i0+8 ≤ rows and columns j0..j0+8 ≤ cols of b, and rows
            // j0..j0+8 ≤ cols and columns i0..i0+8 ≤ rows of bt: every access is in bounds
            // of the slices cut to rows·cols above (unaligned loads and stores).
            let r: [__m256; TILE] = std::array::from_fn(|i| _mm256_loadu_ps(src.add((i0 + i) * cols + j0)));
            // Pairs of rows interleaved, then groups of four: low[c] holds column c of rows
            // 0–3 in its low 128 bits and column c + 4 in its high ones, high[c] rows 4–7.
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let low = [
                _mm256_shuffle_ps::<0x44>(t0, t2),
                _mm256_shuffle_ps::<0xEE>(t0, t2),
                _mm256_shuffle_ps::<0x44>(t1, t3),
                _mm256_shuffle_ps::<0xEE>(t1, t3),
            ];
            let high = [
                _mm256_shuffle_ps::<0x44>(t4, t6),
                _mm256_shuffle_ps::<0xEE>(t4, t6),
                _mm256_shuffle_ps::<0x44>(t5, t7),
                _mm256_shuffle_ps::<0xEE>(t5, t7),
            ];
            for c in 0..4 {
                let column = _mm256_permute2f128_ps::<0x20>(low[c], high[c]);
                _mm256_storeu_ps(dst.add((j0 + c) * rows + i0), column);
                let column = _mm256_permute2f128_ps::<0x31>(low[c], high[c]);
                _mm256_storeu_ps(dst.add((j0 + c + 4) * rows + i0), column);
            }
        }
    }
    transpose_edges(b, rows, cols, bt, full_rows, full_cols);
}

/// c[m×k] += a[n×m]ᵀ · b[n×k].
#[inline(always)]
pub(crate) fn mm_tn<T: Real>(a: &[T], b: &[T], c: &mut [T], n: usize, m: usize, k: usize) {
    if n * m * k >= GEMM_MIN_MACS {
        let ok = T::gemm(T::ONE, Mat::new(a, n, m).t(), Mat::new(b, n, k), T::ONE, c, k);
        debug_assert!(ok, "mm_tn shapes");
        return;
    }
    gemm_acc(m, k, n, Strided { data: a, rs: 1, cs: m }, b, c);
}

/// c[n×k] += a[n×m] · b[m×k].
#[inline(always)]
pub(crate) fn mm_nn<T: Real>(a: &[T], b: &[T], c: &mut [T], n: usize, m: usize, k: usize) {
    if n * m * k >= GEMM_MIN_MACS {
        let ok = T::gemm(T::ONE, Mat::new(a, n, m), Mat::new(b, m, k), T::ONE, c, k);
        debug_assert!(ok, "mm_nn shapes");
        return;
    }
    gemm_acc(n, k, m, Strided { data: a, rs: m, cs: 1 }, b, c);
}

/// A left operand: element (r, p) at `data[r·rs + p·cs]`.
#[derive(Clone, Copy)]
struct Strided<'a, T> {
    data: &'a [T],
    rs: usize,
    cs: usize,
}

/// c[n×m] += A[n×k] · b[k×m], with b and c dense row-major.
fn gemm_acc<T: Real>(n: usize, m: usize, k: usize, a: Strided<'_, T>, b: &[T], c: &mut [T]) {
    let fits = n == 0
        || m == 0
        || k == 0
        || ((n - 1) * a.rs + (k - 1) * a.cs < a.data.len() && k * m <= b.len() && n * m <= c.len());
    debug_assert!(fits, "gemm_acc operands out of bounds");
    if !fits || n == 0 || m == 0 || k == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            unsafe { gemm_avx512(n, m, k, a, b, c) };
            return;
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            unsafe { gemm_avx2(n, m, k, a, b, c) };
            return;
        }
    }
    gemm_body::<T, false, 16>(n, m, k, a, b, c);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gemm_avx2<T: Real>(n: usize, m: usize, k: usize, a: Strided<'_, T>, b: &[T], c: &mut [T]) {
    gemm_body::<T, true, 16>(n, m, k, a, b, c);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn gemm_avx512<T: Real>(n: usize, m: usize, k: usize, a: Strided<'_, T>, b: &[T], c: &mut [T]) {
    gemm_body::<T, true, 32>(n, m, k, a, b, c);
}

/// Column strips of `WIDE` f32 values (half as many f64), then 16, 8, 4 and 1, each cut into
/// tiles of up to four rows whose accumulators stay in registers for the whole reduction over k.
#[inline(always)]
fn gemm_body<T: Real, const FMA: bool, const WIDE: usize>(
    n: usize,
    m: usize,
    k: usize,
    a: Strided<'_, T>,
    b: &[T],
    c: &mut [T],
) {
    if m == 1 && single_column::<T, FMA>(n, k, a, b, c) {
        return;
    }
    let mut j0 = 0;
    while j0 < m {
        let rest = m - j0;
        if WIDE >= 32 && rest >= 32 && size_of::<T>() == 4 {
            strip::<T, FMA, 32>(n, m, k, j0, a, b, c);
            j0 += 32;
        } else if rest >= 16 && (size_of::<T>() == 4 || WIDE >= 32) {
            strip::<T, FMA, 16>(n, m, k, j0, a, b, c);
            j0 += 16;
        } else if rest >= 8 {
            strip::<T, FMA, 8>(n, m, k, j0, a, b, c);
            j0 += 8;
        } else if rest >= 4 {
            strip::<T, FMA, 4>(n, m, k, j0, a, b, c);
            j0 += 4;
        } else {
            strip::<T, FMA, 1>(n, m, k, j0, a, b, c);
            j0 += 1;
        }
    }
}

/// c[n×1] += A[n×k] · b[k×1] (the output layer of a regression net, or a weight gradient
/// against a single input feature), vectorised along whichever side of A is contiguous: as n
/// dot products, or as k column updates. Returns false (nothing done) when neither is.
#[inline(always)]
fn single_column<T: Real, const FMA: bool>(
    n: usize,
    k: usize,
    a: Strided<'_, T>,
    b: &[T],
    c: &mut [T],
) -> bool {
    let (b, c) = (&b[..k], &mut c[..n]);
    if a.cs == 1 {
        for (i, out) in c.iter_mut().enumerate() {
            *out += dot::<T, FMA>(&a.data[i * a.rs..i * a.rs + k], b);
        }
        true
    } else if a.rs == 1 {
        for (p, &scale) in b.iter().enumerate() {
            let column = &a.data[p * a.cs..p * a.cs + n];
            for (out, &v) in c.iter_mut().zip(column) {
                *out = if FMA { scale.mul_add(v, *out) } else { *out + scale * v };
            }
        }
        true
    } else {
        false
    }
}

/// Σ x_i y_i over 16 independent lanes (so that it vectorises), then across them.
#[inline(always)]
fn dot<T: Real, const FMA: bool>(x: &[T], y: &[T]) -> T {
    const LANES: usize = 16;
    let mut acc = [T::ZERO; LANES];
    let (xs, ys) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
    let mut total = T::ZERO;
    for (&xi, &yi) in xs.remainder().iter().zip(ys.remainder()) {
        total += xi * yi;
    }
    for (xc, yc) in xs.zip(ys) {
        for ((s, &xi), &yi) in acc.iter_mut().zip(xc).zip(yc) {
            *s = if FMA { xi.mul_add(yi, *s) } else { *s + xi * yi };
        }
    }
    acc.iter().fold(total, |sum, &v| sum + v)
}

#[inline(always)]
fn strip<T: Real, const FMA: bool, const W: usize>(
    n: usize,
    m: usize,
    k: usize,
    j0: usize,
    a: Strided<'_, T>,
    b: &[T],
    c: &mut [T],
) {
    let mut i0 = 0;
    while i0 + 4 <= n {
        tile::<T, FMA, 4, W>(i0, j0, m, k, a, b, c);
        i0 += 4;
    }
    match n - i0 {
        3 => tile::<T, FMA, 3, W>(i0, j0, m, k, a, b, c),
        2 => tile::<T, FMA, 2, W>(i0, j0, m, k, a, b, c),
        1 => tile::<T, FMA, 1, W>(i0, j0, m, k, a, b, c),
        _ => {}
    }
}

/// c[i0..i0+R, j0..j0+W] += Σ_p A[i0.., p] · b[p, j0..].
///
/// Unchecked indexing: this is the innermost loop of every small product, and bounds checks
/// (plus the registers they hold) cost more than the multiply-adds at these sizes.
#[inline(always)]
fn tile<T: Real, const FMA: bool, const R: usize, const W: usize>(
    i0: usize,
    j0: usize,
    m: usize,
    k: usize,
    a: Strided<'_, T>,
    b: &[T],
    c: &mut [T],
) {
    let mut acc = [[T::ZERO; W]; R];
    let mut a_row = [0usize; R];
    for (r, offset) in a_row.iter_mut().enumerate() {
        *offset = (i0 + r) * a.rs;
    }
    let (ap, bp, cp) = (a.data.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    // SAFETY: `gemm_acc` checked (n−1)·rs + (k−1)·cs < a.len(), k·m ≤ b.len() and
    // n·m ≤ c.len(); this tile touches rows i0 + r < n, columns j0 + j < m and p < k only, so
    // every offset below is in bounds, and `c` is the only mutable borrow.
    unsafe {
        for p in 0..k {
            let b_row = bp.add(p * m + j0);
            for (acc_row, &row) in acc.iter_mut().zip(&a_row) {
                let av = *ap.add(row + p * a.cs);
                for (j, acc_v) in acc_row.iter_mut().enumerate() {
                    let bv = *b_row.add(j);
                    *acc_v = if FMA { av.mul_add(bv, *acc_v) } else { *acc_v + av * bv };
                }
            }
        }
        for (r, acc_row) in acc.iter().enumerate() {
            let c_row = cp.add((i0 + r) * m + j0);
            for (j, &v) in acc_row.iter().enumerate() {
                *c_row.add(j) += v;
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn check<T: Real + std::fmt::Debug>(of: fn(usize) -> T) {
        for rows in [1, 3, 7, 8, 9, 16, 17, 40] {
            for cols in [1, 2, 8, 10, 24, 40, 41] {
                let b: Vec<T> = (0..rows * cols).map(of).collect();
                let mut bt = vec![of(usize::MAX >> 40); rows * cols];
                transpose(&b, rows, cols, &mut bt);
                for i in 0..rows {
                    for j in 0..cols {
                        assert_eq!(bt[j * rows + i], b[i * cols + j], "{rows}×{cols} at ({i}, {j})");
                    }
                }
            }
        }
    }

    #[test]
    fn transpose_is_exact_on_tiles_and_edges() {
        check::<f32>(|i| i as f32);
        check::<f64>(|i| i as f64);
    }
}
