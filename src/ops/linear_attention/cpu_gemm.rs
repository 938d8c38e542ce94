//! A small, unpacked GEMM for the CPU forward's chunk products (at most 320 × 64 × 320).
//!
//! `matrixmultiply` packs both operands on every call; for the 64-row chunk products that
//! packing costs about as much as the arithmetic. Here every operand is already in L1/L2 and
//! B is row-major, so a register-blocked loop (4 rows × 32 columns of C in registers, one row
//! of B loaded and four elements of A broadcast per step) runs without packing. Columns past the
//! last multiple of 32 (the backward's augmented width Dv + 1 = 65 leaves one, which a scalar
//! loop made cost four times the 64 others) go one column at a time down all rows, a vector
//! pass along A's contiguous direction (every caller's A has one; A strided both ways takes the
//! scalar edge loop). The body is compiled three times (AVX-512, AVX2+FMA, and the baseline)
//! and picked at run time.

use crate::{Error, Result};

const MR: usize = 4;
const NR: usize = 32;

/// C (m×n, row stride `ldc`) = A·B (+ C when `accumulate`), with A's element (i, p) at
/// `a[i·rsa + p·csa]` and B row-major k×n with row stride `ldb`.
#[derive(Clone, Copy)]
pub(super) struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub rsa: usize,
    pub csa: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub accumulate: bool,
}

impl Gemm {
    /// Checks that every index the product touches lies inside the slices.
    fn in_bounds(&self, a: &[f32], b: &[f32], c: &[f32]) -> bool {
        if self.m == 0 || self.n == 0 {
            return true;
        }
        let k_last = self.k.saturating_sub(1);
        let a_ok = self.k == 0 || (self.m - 1) * self.rsa + k_last * self.csa < a.len();
        let b_ok = self.k == 0 || (self.n <= self.ldb && k_last * self.ldb + self.n <= b.len());
        let c_ok = self.n <= self.ldc && (self.m - 1) * self.ldc + self.n <= c.len();
        a_ok && b_ok && c_ok
    }

    /// Runs the product; errors (computing nothing) when a view is out of bounds.
    pub fn run(&self, a: &[f32], b: &[f32], c: &mut [f32]) -> Result<()> {
        if !self.in_bounds(a, b, c) {
            return Err(Error::invalid(
                "linear_attention (cpu)",
                "internal GEMM",
                "operand out of bounds (a metakernels bug; please report)",
            ));
        }
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports AVX-512F (checked just above).
                unsafe { self.run_avx512(a, b, c) };
                return Ok(());
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                unsafe { self.run_avx2(a, b, c) };
                return Ok(());
            }
        }
        self.body(a, b, c);
        Ok(())
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn run_avx512(&self, a: &[f32], b: &[f32], c: &mut [f32]) {
        self.body(a, b, c)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, a: &[f32], b: &[f32], c: &mut [f32]) {
        self.body(a, b, c)
    }

    #[inline(always)]
    fn body(&self, a: &[f32], b: &[f32], c: &mut [f32]) {
        let full_cols = self.n - self.n % NR;
        let row_blocks = self.m - self.m % MR;
        for j0 in (0..full_cols).step_by(NR) {
            for i0 in (0..row_blocks).step_by(MR) {
                self.block(a, b, c, i0, j0);
            }
            self.edge(a, b, c, row_blocks..self.m, j0..j0 + NR);
        }
        // m = 0 or k = 0 reads neither A nor B (`in_bounds` then checks neither); `column` would.
        if self.m > 0 && self.k > 0 && (self.rsa == 1 || self.csa == 1) {
            let mut scratch = Vec::new();
            for j in full_cols..self.n {
                self.column(a, b, c, j, &mut scratch);
            }
        } else {
            self.edge(a, b, c, 0..self.m, full_cols..self.n);
        }
    }

    /// The MR × NR register block of C at (i0, j0).
    #[inline(always)]
    fn block(&self, a: &[f32], b: &[f32], c: &mut [f32], i0: usize, j0: usize) {
        let mut acc = [[0f32; NR]; MR];
        for p in 0..self.k {
            let row: &[f32; NR] = match b[p * self.ldb + j0..p * self.ldb + j0 + NR].try_into() {
                Ok(r) => r,
                // invariant: the slice has exactly NR elements.
                Err(_) => return,
            };
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let x = a[(i0 + r) * self.rsa + p * self.csa];
                for (o, &y) in acc_r.iter_mut().zip(row) {
                    *o = x.mul_add(y, *o);
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            let out = &mut c[(i0 + r) * self.ldc + j0..(i0 + r) * self.ldc + j0 + NR];
            if self.accumulate {
                out.iter_mut().zip(acc_r).for_each(|(o, x)| *o += x);
            } else {
                out.copy_from_slice(acc_r);
            }
        }
    }

    /// Column j of C over all rows, for A with contiguous columns (`rsa` = 1: C[:, j] gathers
    /// A[:, p]·B[p, j] over p, a vector axpy each) or contiguous rows (`csa` = 1: a dot product of
    /// each A row with B's column j, packed once into `scratch`).
    #[inline(always)]
    fn column(&self, a: &[f32], b: &[f32], c: &mut [f32], j: usize, scratch: &mut Vec<f32>) {
        // Plain loops throughout, no closures: a closure is not certain to be inlined into the
        // `target_feature` wrappers, and outside them mul_add is a call to libm's fmaf.
        let (m, k) = (self.m, self.k);
        scratch.clear();
        if self.rsa == 1 {
            scratch.resize(m, 0.0);
            for p in 0..k {
                let x = b[p * self.ldb + j];
                for (o, &y) in scratch.iter_mut().zip(&a[p * self.csa..p * self.csa + m]) {
                    *o = y.mul_add(x, *o);
                }
            }
            for (i, &x) in scratch.iter().enumerate() {
                self.put(c, i, j, x);
            }
        } else {
            for p in 0..k {
                scratch.push(b[p * self.ldb + j]);
            }
            for i in 0..m {
                self.put(c, i, j, dot(&a[i * self.rsa..i * self.rsa + k], scratch));
            }
        }
    }

    /// C[i, j] = x (+ C[i, j] when accumulating).
    #[inline(always)]
    fn put(&self, c: &mut [f32], i: usize, j: usize, x: f32) {
        let out = &mut c[i * self.ldc + j];
        *out = if self.accumulate { *out + x } else { x };
    }

    /// Rows `rows` × columns `cols` of C, one row at a time (the ragged edges).
    #[inline(always)]
    fn edge(
        &self,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
    ) {
        if cols.is_empty() {
            return;
        }
        let width = cols.len();
        for i in rows {
            let out = &mut c[i * self.ldc + cols.start..i * self.ldc + cols.end];
            if !self.accumulate {
                out.fill(0.0);
            }
            for p in 0..self.k {
                let x = a[i * self.rsa + p * self.csa];
                let row = &b[p * self.ldb + cols.start..p * self.ldb + cols.start + width];
                for (o, &y) in out.iter_mut().zip(row) {
                    *o = x.mul_add(y, *o);
                }
            }
        }
    }
}

/// x·y in 16 independent lanes (a single running sum would not vectorise).
#[inline(always)]
fn dot(x: &[f32], y: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let (xs, ys) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
    let mut tail = 0f32;
    for (&a, &b) in xs.remainder().iter().zip(ys.remainder()) {
        tail = a.mul_add(b, tail);
    }
    for (xc, yc) in xs.zip(ys) {
        for ((s, &a), &b) in acc.iter_mut().zip(xc).zip(yc) {
            *s = a.mul_add(b, *s);
        }
    }
    let mut sum = tail;
    for s in acc {
        sum += s;
    }
    sum
}

/// GFLOP/s of this GEMM and of `matrixmultiply` (the crate's checked `sgemm`) on one thread, for
/// m×k · k×n products whose operands stay in cache, best of five rounds of about 2²⁴
/// multiply-adds each: the measurement behind using this one for the chunk products.
pub(crate) fn rates_against_matrixmultiply(m: usize, k: usize, n: usize) -> (f64, f64) {
    let fill = |len: usize| -> Vec<f32> { (0..len).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect() };
    let (a, b, mut c) = (fill(m * k), fill(k * n), vec![0f32; m * n]);
    let gemm = Gemm { m, n, k, rsa: k, csa: 1, ldb: n, ldc: n, accumulate: false };
    let reps = (1usize << 24) / (m * n * k).max(1) + 1;
    let mut gflops = |product: &mut dyn FnMut(&mut [f32])| {
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let start = std::time::Instant::now();
            for _ in 0..reps {
                product(&mut c);
                std::hint::black_box(&mut c);
            }
            best = best.min(start.elapsed().as_secs_f64());
        }
        2.0 * (m * n * k * reps) as f64 / best / 1e9
    };
    let ours = gflops(&mut |c| {
        let _ = gemm.run(&a, &b, c);
    });
    let packed = gflops(&mut |c| {
        let (a, b) = (crate::cpu::Mat::new(&a, m, k), crate::cpu::Mat::new(&b, k, n));
        crate::cpu::sgemm(1.0, a, b, 0.0, c, n);
    });
    (ours, packed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_on_ragged_shapes() {
        for (m, n, k) in [
            (64, 64, 64),
            (5, 33, 7),
            (1, 1, 1),
            (67, 65, 3),
            (4, 32, 0),
            (64, 65, 64),
            (8, 47, 5),
            (7, 3, 9),
            (3, 5, 0),
            (0, 5, 3),
            (2, 31, 17),
            (33, 97, 40),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
            // B and C with padded rows (NaN in B's padding; C's must come back untouched).
            let (ldb, ldc) = (n + 3, n + 2);
            let mut bp = vec![f32::NAN; k * ldb];
            for p in 0..k {
                bp[p * ldb..p * ldb + n].copy_from_slice(&b[p * n..(p + 1) * n]);
            }
            // A's layouts, one per column path: transposed with padded columns (rsa = 1),
            // row-major with padded rows (csa = 1), and strided both ways; NaN wherever A is not.
            let layouts = [(1, m + 1), (k + 1, 1), (2 * k + 1, 2)];
            for ((rsa, csa), accumulate) in layouts.into_iter().flat_map(|l| [(l, false), (l, true)]) {
                // Each operand exactly as long as `in_bounds` requires: a read past it panics.
                let a_len = if m == 0 || k == 0 { 0 } else { (m - 1) * rsa + (k - 1) * csa + 1 };
                let mut stored = vec![f32::NAN; a_len];
                for i in 0..m {
                    for p in 0..k {
                        stored[i * rsa + p * csa] = a[i * k + p];
                    }
                }
                let b_len = if k == 0 || m == 0 { 0 } else { (k - 1) * ldb + n };
                let c_len = if m == 0 { 0 } else { (m - 1) * ldc + n };
                let mut c = vec![-7.0f32; c_len];
                for i in 0..m {
                    c[i * ldc..i * ldc + n].fill(1.0);
                }
                let g = Gemm { m, n, k, rsa, csa, ldb, ldc, accumulate };
                for (variant, c) in each_variant(&g, &stored, &bp[..b_len], &c) {
                    for i in 0..m {
                        for j in 0..ldc.min(c_len - i * ldc) {
                            let what = format!(
                                "{variant} {m}x{n}x{k} rsa {rsa} csa {csa} acc {accumulate} ({i},{j})"
                            );
                            if j >= n {
                                assert_eq!(c[i * ldc + j], -7.0, "{what}: padding written");
                                continue;
                            }
                            let dot: f32 = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
                            let expect = dot + if accumulate { 1.0 } else { 0.0 };
                            assert!(
                                (c[i * ldc + j] - expect).abs() < 1e-4,
                                "{what}: {} vs {expect}",
                                c[i * ldc + j]
                            );
                        }
                    }
                }
            }
        }
    }

    /// C from each compiled body this CPU can run (`run` picks only the widest): the dispatching
    /// `run`, the baseline, and AVX2 + FMA when present.
    fn each_variant(g: &Gemm, a: &[f32], b: &[f32], c0: &[f32]) -> Vec<(&'static str, Vec<f32>)> {
        let mut c = c0.to_vec();
        assert!(g.run(a, b, &mut c).is_ok());
        let mut out = vec![("run", c)];
        let mut c = c0.to_vec();
        g.body(a, b, &mut c);
        out.push(("baseline", c));
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            let mut c = c0.to_vec();
            // SAFETY: the CPU supports AVX2 and FMA (checked just above); `run` checked the views.
            unsafe { g.run_avx2(a, b, &mut c) };
            out.push(("avx2", c));
        }
        out
    }

    #[test]
    fn out_of_bounds_views_are_errors() {
        let g = Gemm { m: 3, n: 5, k: 2, rsa: 2, csa: 1, ldb: 5, ldc: 5, accumulate: false };
        let (a, b, mut c) = (vec![0f32; 6], vec![0f32; 10], vec![0f32; 15]);
        assert!(g.run(&a, &b, &mut c).is_ok());
        assert!(g.run(&a[..5], &b, &mut c).is_err());
        assert!(g.run(&a, &b[..9], &mut c).is_err());
        assert!(g.run(&a, &b, &mut c[..14]).is_err());
        assert!(Gemm { ldb: 4, ..g }.run(&a, &b, &mut c).is_err());
        assert!(Gemm { ldc: 4, ..g }.run(&a, &b, &mut c).is_err());
    }
}
