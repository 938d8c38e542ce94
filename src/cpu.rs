//! Shared CPU building blocks for the families' fallbacks: a checked GEMM over the
//! `matrixmultiply` crate (cache-blocked, SIMD microkernels), used wherever CPU work is
//! matmul-shaped.

/// A row-major matrix view: `rows × cols` elements of `data`, row stride `ld` (≥ cols), or its
/// transpose when `transposed` (then `data` is `cols × rows` with row stride `ld`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mat<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
    pub transposed: bool,
}

impl<'a, T> Mat<'a, T> {
    /// A dense row-major `rows × cols` matrix.
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
        Mat { data, rows, cols, ld: cols, transposed: false }
    }

    /// The transpose of this view (no copy).
    pub fn t(self) -> Self {
        Mat { rows: self.cols, cols: self.rows, transposed: !self.transposed, ..self }
    }

    /// (row stride, column stride) of the logical matrix, in elements.
    fn strides(&self) -> (isize, isize) {
        if self.transposed {
            (1, self.ld as isize)
        } else {
            (self.ld as isize, 1)
        }
    }

    /// Whether every element the view addresses lies inside `data`.
    fn in_bounds(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let (stored_rows, stored_cols) =
            if self.transposed { (self.cols, self.rows) } else { (self.rows, self.cols) };
        stored_cols <= self.ld && (stored_rows - 1) * self.ld + stored_cols <= self.data.len()
    }
}

/// C = alpha · A·B + beta · C for f32, with C dense row-major `a.rows × b.cols` (row stride
/// `ldc`). Single-threaded: callers parallelise over independent products with rayon.
///
/// Returns `false` (and computes nothing) if the shapes disagree or a view is out of bounds,
/// so a caller's bug cannot become out-of-bounds memory access.
pub(crate) fn sgemm(
    alpha: f32,
    a: Mat<'_, f32>,
    b: Mat<'_, f32>,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) -> bool {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let c_ok = m == 0 || n == 0 || (n <= ldc && (m - 1) * ldc + n <= c.len());
    if b.rows != k || !a.in_bounds() || !b.in_bounds() || !c_ok {
        return false;
    }
    if m == 0 || n == 0 {
        return true;
    }
    let (rsa, csa) = a.strides();
    let (rsb, csb) = b.strides();
    // SAFETY: the bounds checks above guarantee every index the strides produce is inside the
    // slices; `c` is borrowed mutably and cannot alias `a` or `b`.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.data.as_ptr(),
            rsa,
            csa,
            b.data.as_ptr(),
            rsb,
            csb,
            beta,
            c.as_mut_ptr(),
            ldc as isize,
            1,
        );
    }
    true
}

/// The f64 counterpart of [`sgemm`].
pub(crate) fn dgemm(
    alpha: f64,
    a: Mat<'_, f64>,
    b: Mat<'_, f64>,
    beta: f64,
    c: &mut [f64],
    ldc: usize,
) -> bool {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let c_ok = m == 0 || n == 0 || (n <= ldc && (m - 1) * ldc + n <= c.len());
    if b.rows != k || !a.in_bounds() || !b.in_bounds() || !c_ok {
        return false;
    }
    if m == 0 || n == 0 {
        return true;
    }
    let (rsa, csa) = a.strides();
    let (rsb, csb) = b.strides();
    // SAFETY: as in `sgemm`.
    unsafe {
        matrixmultiply::dgemm(
            m,
            k,
            n,
            alpha,
            a.data.as_ptr(),
            rsa,
            csa,
            b.data.as_ptr(),
            rsb,
            csb,
            beta,
            c.as_mut_ptr(),
            ldc as isize,
            1,
        );
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgemm_matches_naive_with_transposes() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect(); // stored n×k
        let mut c = vec![1.0f32; m * n];
        assert!(sgemm(2.0, Mat::new(&a, m, k), Mat::new(&bt, n, k).t(), 0.5, &mut c, n));
        for i in 0..m {
            for j in 0..n {
                let dot: f32 = (0..k).map(|p| a[i * k + p] * bt[j * k + p]).sum();
                assert!((c[i * n + j] - (2.0 * dot + 0.5)).abs() < 1e-5);
            }
        }
        assert!(
            !sgemm(1.0, Mat::new(&a, m, k), Mat::new(&bt, n, k), 0.0, &mut c, n),
            "k mismatch must be refused"
        );
    }
}
