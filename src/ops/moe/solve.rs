//! Least squares over row segments: normal equations, Cholesky, and a minimum-norm fallback
//! through a Jacobi eigendecomposition when a system is rank deficient.
//!
//! The CPU path works in f64 throughout (Gram matrices by `crate::cpu::dgemm`, one rayon task
//! per system). The CUDA path forms f32 Gram matrices on the device and factorises small systems
//! on chip; the host finishes whatever the device flags or cannot hold (see `moe::lstsq`).

use rayon::prelude::*;

use crate::tensor::Storage;
use crate::{Error, Result, Tensor};

/// Relative pivot threshold of the f64 host solver (× n × largest diagonal entry).
pub(super) const HOST_REL_TOL: f64 = 1e-13;

/// Solves one system per segment `(begin, end)` of rows of `x` (`· × n`) and `y` (`· × r`);
/// returns `[segments, n, r]` f32 reshaped to `out_shape`.
#[allow(clippy::too_many_arguments)]
pub(super) fn solve_segments(
    x: &Tensor,
    y: &Tensor,
    n: usize,
    r: usize,
    segments: &[(usize, usize)],
    ridge: f64,
    out_shape: &[usize],
    op: &'static str,
) -> Result<Tensor> {
    match x.storage() {
        Storage::Cpu(_) => {
            let xs = x.host_f32(op)?;
            let ys = y.host_f32(op)?;
            if xs.iter().chain(ys.iter()).any(|v| !v.is_finite()) {
                return Err(Error::NonFinite { op, what: "x or y".into() });
            }
            check_scratch(n, r, segments.len())?;
            let mut out = crate::cpu::output_vec::<f32>(segments.len().saturating_mul(n).saturating_mul(r))?;
            out.par_chunks_mut(n * r).zip(segments.par_iter()).for_each(|(w, &(b, e))| {
                let (a, rhs) = gram(&xs[b * n..e * n], &ys[b * r..e * r], n, r);
                let sol = solve_normal(a, rhs, n, r, ridge, HOST_REL_TOL);
                w.iter_mut().zip(&sol).for_each(|(o, &v)| *o = v as f32);
            });
            Ok(Tensor::from_host_vec(out, out_shape))
        }
        #[cfg(feature = "cuda")]
        Storage::Cuda(_) => super::cuda::lstsq_segments(x, y, n, r, segments, ridge, out_shape, op),
    }
}

/// The systems' f64 scratch, refused up front when the host cannot hold it (rather than aborting
/// in the allocator): each system holds its n × n Gram matrix about three times (the matrix, its
/// copy for the minimum-norm fallback, the eigenvectors) and its n × r right-hand side and
/// solution as often, one system per thread at a time. A wide x asks for far more than its data:
/// n = 10⁵ unknowns is 80 GB per matrix.
fn check_scratch(n: usize, r: usize, systems: usize) -> Result<()> {
    let in_flight = systems.min(rayon::current_num_threads());
    let per_system = n.checked_add(r).and_then(|cols| cols.checked_mul(n)).and_then(|e| e.checked_mul(3 * 8));
    crate::cpu::check_host_memory(per_system.and_then(|b| b.checked_mul(in_flight)))
}

/// (XᵀX, XᵀY) in f64 for the rows of one segment.
fn gram(x: &[f32], y: &[f32], n: usize, r: usize) -> (Vec<f64>, Vec<f64>) {
    use crate::cpu::{dgemm, Mat};
    let m = x.len() / n.max(1);
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let y64: Vec<f64> = y.iter().map(|&v| v as f64).collect();
    let mut a = vec![0f64; n * n];
    let mut b = vec![0f64; n * r];
    let xm = Mat::new(&x64, m, n);
    // invariant: the views are m × n, m × r, n × n and n × r by construction, so dgemm (which
    // refuses inconsistent shapes) always runs.
    let _ran =
        dgemm(1.0, xm.t(), xm, 0.0, &mut a, n) && dgemm(1.0, xm.t(), Mat::new(&y64, m, r), 0.0, &mut b, r);
    (a, b)
}

/// Solves (A + ridge·I) W = B for W (`n × r`), A symmetric positive semi-definite (`n × n`).
///
/// Cholesky first; if a pivot falls to `rel_tol · n · max diag`, the minimum-norm solution
/// through the eigendecomposition instead.
pub(super) fn solve_normal(
    mut a: Vec<f64>,
    b: Vec<f64>,
    n: usize,
    r: usize,
    ridge: f64,
    rel_tol: f64,
) -> Vec<f64> {
    for i in 0..n {
        a[i * n + i] += ridge;
    }
    let max_diag = (0..n).map(|i| a[i * n + i]).fold(0.0, f64::max);
    let threshold = rel_tol * n as f64 * max_diag;
    let original = a.clone();
    if max_diag > 0.0 && cholesky_in_place(&mut a, n, threshold) {
        let mut w = b;
        for col in 0..r {
            // L z = b, then Lᵀ w = z.
            for i in 0..n {
                let mut s = w[i * r + col];
                for p in 0..i {
                    s -= a[i * n + p] * w[p * r + col];
                }
                w[i * r + col] = s / a[i * n + i];
            }
            for i in (0..n).rev() {
                let mut s = w[i * r + col];
                for p in i + 1..n {
                    s -= a[p * n + i] * w[p * r + col];
                }
                w[i * r + col] = s / a[i * n + i];
            }
        }
        return w;
    }
    min_norm(original, &b, n, r, rel_tol)
}

/// Lower Cholesky factor in place (lower triangle); false when a pivot is ≤ `threshold`.
fn cholesky_in_place(a: &mut [f64], n: usize, threshold: f64) -> bool {
    for j in 0..n {
        let mut diag = a[j * n + j];
        for p in 0..j {
            diag -= a[j * n + p] * a[j * n + p];
        }
        if diag.is_nan() || diag <= threshold {
            return false;
        }
        let l = diag.sqrt();
        a[j * n + j] = l;
        for i in j + 1..n {
            let mut s = a[i * n + j];
            for p in 0..j {
                s -= a[i * n + p] * a[j * n + p];
            }
            a[i * n + j] = s / l;
        }
    }
    true
}

/// W = V · diag(1/λ, 0 for small λ) · Vᵀ · B: the minimum-norm solution (pinv(A)·B, which for
/// A = XᵀX, B = XᵀY is pinv(X)·Y).
fn min_norm(a: Vec<f64>, b: &[f64], n: usize, r: usize, rel_tol: f64) -> Vec<f64> {
    let (lambda, v) = jacobi_eigen(a, n);
    let max_l = lambda.iter().fold(0.0f64, |m, &l| m.max(l.abs()));
    let cutoff = rel_tol * n as f64 * max_l;
    // t = Vᵀ B scaled by 1/λ, then W = V t.
    let mut t = vec![0f64; n * r];
    for i in 0..n {
        if lambda[i] <= cutoff || lambda[i] <= 0.0 {
            continue;
        }
        for col in 0..r {
            let s: f64 = (0..n).map(|p| v[p * n + i] * b[p * r + col]).sum();
            t[i * r + col] = s / lambda[i];
        }
    }
    let mut w = vec![0f64; n * r];
    for p in 0..n {
        for col in 0..r {
            w[p * r + col] = (0..n).map(|i| v[p * n + i] * t[i * r + col]).sum();
        }
    }
    w
}

/// Cyclic Jacobi eigendecomposition of a symmetric matrix: (eigenvalues, V with eigenvectors as
/// columns, row-major).
fn jacobi_eigen(mut a: Vec<f64>, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0f64; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    let total: f64 = a.iter().map(|x| x * x).sum();
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|p| (0..n).filter(move |&q| q != p).map(move |q| (p, q)))
            .map(|(p, q)| a[p * n + q].powi(2))
            .sum();
        if off <= 1e-30 * total || off == 0.0 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| a[i * n + i]).collect(), v)
}
