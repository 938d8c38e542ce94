//! K-means: nearest-centroid assignment, deterministic centroid update, a stable counting sort
//! by cluster, and Lloyd's algorithm with k-means++ / k-means‖ / random / warm-start
//! initialisation.
//!
//! `x` is `[N, D]` in f32, f16 or bf16; every distance and every centroid is accumulated in f32.
//! For f16/bf16 `x` the centroids are rounded to `x`'s dtype before distances are taken (the
//! CUDA path feeds them to tensor cores; the CPU path rounds the same way so that both devices
//! compute the same thing).
//!
//! | function | result |
//! |---|---|
//! | [`assign`] | nearest centroid per row (ties to the lowest index) and its distance |
//! | [`update`] | per-cluster means and counts, bitwise reproducible run after run |
//! | [`sort_by_cluster`] | token ids grouped by cluster (stable) and the `[K+1]` offsets |
//! | [`KMeans::fit`] | Lloyd iterations until the centroid shift ≤ `tol` or `max_iter` |
//!
//! ```
//! use metakernels::kmeans::{KMeans, Init, Metric};
//! use metakernels::{Device, Tensor};
//! # fn main() -> metakernels::Result<()> {
//! // Two well separated blobs on a line.
//! let data = [0.0f32, 0.1, 0.2, 10.0, 10.1, 10.2];
//! let x = Tensor::from_slice(&data, &[6, 1], &Device::cpu())?;
//! let fit = KMeans::new(2).init(Init::KMeansPlusPlus { seed: 7 }).fit(&x)?;
//! let labels = fit.assignment.to_vec::<u32>()?;
//! assert_eq!(labels[0], labels[2]);
//! assert_ne!(labels[0], labels[3]);
//! assert!(fit.converged);
//! # let _ = Metric::MeanL1;
//! # Ok(()) }
//! ```

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod fit;
mod init;

pub use fit::{Init, KMeans, KMeansFit};

use crate::tensor::Storage;
use crate::{DType, Error, Result, Tensor};

/// The distance between a row of `x` and a centroid.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Metric {
    /// ‖x − c‖² (on CUDA computed as ‖x‖² − 2x·c + ‖c‖², clamped at 0).
    #[default]
    SquaredL2,
    /// (1/D) Σ_d |x_d − c_d|: the mean absolute difference, MixER's choice.
    MeanL1,
}

/// The nearest centroid of every row of `x` and the distance to it.
///
/// `x`: `[N, D]` f32/f16/bf16; `centroids`: `[K, D]` f32 or `x`'s dtype, on `x`'s device.
/// Returns `(assignment [N] u32, distance [N] f32)`. Ties go to the lowest centroid index.
///
/// Errors: rank or width mismatch, `K = 0`, mixed devices, unsupported dtypes, and
/// [`Error::NonFinite`] when `x` or `centroids` hold NaN or ±inf, or a distance overflows f32
/// (on CUDA detected from the distances in the kernel's epilogue, so it costs no extra pass).
pub fn assign(x: &Tensor, centroids: &Tensor, metric: Metric) -> Result<(Tensor, Tensor)> {
    const OP: &str = "kmeans::assign";
    let (n, d) = check_points(x, OP)?;
    let k = check_centroids(centroids, x, d, OP)?;
    if k == 0 {
        return Err(Error::EmptyInput { op: OP, what: "centroids".into(), shape: centroids.shape().into() });
    }
    match x.storage() {
        Storage::Cpu(_) => {
            let xs = x.host_f32(OP)?;
            let cs = rounded_centroids(centroids, x.dtype(), OP)?;
            if cs.iter().any(|v| !v.is_finite()) {
                return Err(Error::NonFinite { op: OP, what: "centroids".into() });
            }
            let (a, dist) = cpu::assign(&xs, n, d, &cs, k, metric)?;
            if dist.iter().any(|v| !v.is_finite()) {
                return Err(non_finite(OP, centroids));
            }
            Ok((Tensor::from_host_vec(a, &[n]), Tensor::from_host_vec(dist, &[n])))
        }
        #[cfg(feature = "cuda")]
        Storage::Cuda(_) => {
            let out = cuda::assign(x, centroids, metric)?;
            if out.status_nonzero()? {
                return Err(non_finite(OP, centroids));
            }
            Ok((out.assignment, out.distance))
        }
    }
}

/// The mean of the rows of `x` assigned to each of `k` clusters, and the cluster sizes.
///
/// `x`: `[N, D]` f32/f16/bf16; `assignment`: `[N]` u32 with every value `< k`.
/// Returns `(centroids [k, D] f32, counts [k] u32)`; the centroid of an empty cluster is all
/// zeros (see [`KMeans`] for how a fit re-seeds it).
///
/// Deterministic: rows are grouped by a stable counting sort and each cluster's sum is taken in
/// a fixed order (no floating-point atomics), so the same inputs give bitwise the same result
/// on the same device, run after run.
///
/// Errors: shape/dtype/device mismatches, `k = 0`, an assignment `≥ k`, non-finite values in
/// `x`.
pub fn update(x: &Tensor, assignment: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    const OP: &str = "kmeans::update";
    let (n, d) = check_points(x, OP)?;
    check_assignment(assignment, x, n, OP)?;
    if k == 0 || k >= i32::MAX as usize {
        return Err(Error::invalid(OP, "k", format!("k = {k}; expected 1 ≤ k < 2^31")));
    }
    match x.storage() {
        Storage::Cpu(_) => {
            let xs = x.host_f32(OP)?;
            let a = assignment.host_slice::<u32>(OP)?;
            if let Some(bad) = a.iter().find(|&&c| c as usize >= k) {
                return Err(Error::invalid(
                    OP,
                    "assignment",
                    format!("holds cluster {bad}, expected < k = {k}"),
                ));
            }
            let (c, counts) = cpu::update(&xs, d, a, k)?;
            if c.iter().any(|v| !v.is_finite()) {
                return Err(Error::NonFinite { op: OP, what: "x".into() });
            }
            Ok((Tensor::from_host_vec(c, &[k, d]), Tensor::from_host_vec(counts, &[k])))
        }
        #[cfg(feature = "cuda")]
        Storage::Cuda(_) => {
            let (c, counts, status) = cuda::update(x, assignment, k)?;
            match status {
                0 => Ok((c, counts)),
                cuda::STATUS_OUT_OF_RANGE => {
                    Err(Error::invalid(OP, "assignment", format!("holds a cluster id ≥ k = {k}")))
                }
                _ => Err(Error::NonFinite { op: OP, what: "x".into() }),
            }
        }
    }
}

/// Groups row ids by cluster with a stable counting sort (histogram, prefix sum, stable
/// scatter).
///
/// `assignment`: `[N]` u32, every value `< k`. Returns `(order [N] u32, offsets [k+1] u32)`:
/// the rows of cluster `c` are `order[offsets[c]..offsets[c+1]]`, in increasing row order.
/// This is the grouping [`update`] uses and the one MoE routing uses.
pub fn sort_by_cluster(assignment: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    const OP: &str = "kmeans::sort_by_cluster";
    if assignment.rank() != 1 {
        return Err(Error::shape(OP, "assignment", "[N]", assignment.shape()));
    }
    assignment.expect_dtype(DType::U32, OP, "assignment")?;
    if k == 0 || k >= i32::MAX as usize {
        return Err(Error::invalid(OP, "k", format!("k = {k}; expected 1 ≤ k < 2^31")));
    }
    let n = assignment.shape()[0];
    if n >= i32::MAX as usize {
        return Err(Error::shape(OP, "assignment", "[N] with N < 2^31", assignment.shape()));
    }
    match assignment.storage() {
        Storage::Cpu(_) => {
            let a = assignment.host_slice::<u32>(OP)?;
            if let Some(bad) = a.iter().find(|&&c| c as usize >= k) {
                return Err(Error::invalid(
                    OP,
                    "assignment",
                    format!("holds cluster {bad}, expected < k = {k}"),
                ));
            }
            let (order, offsets) = cpu::counting_sort(a, k)?;
            Ok((Tensor::from_host_vec(order, &[n]), Tensor::from_host_vec(offsets, &[k + 1])))
        }
        #[cfg(feature = "cuda")]
        Storage::Cuda(_) => {
            let sorted = cuda::counting_sort(assignment, k)?;
            if sorted.status_nonzero()? {
                return Err(Error::invalid(OP, "assignment", format!("holds a cluster id ≥ k = {k}")));
            }
            Ok((sorted.order, sorted.offsets))
        }
    }
}

/// The simple versions the tests hold the fast kernels against: on CUDA the reference kernels
/// of `kernels/kmeans.cu` (one thread per row / per output, distances taken directly); on the CPU
/// the CPU path. Inputs are validated as by [`assign`] and [`update`].
#[doc(hidden)]
pub mod reference {
    use super::*;

    /// Reference [`assign`](super::assign).
    pub fn assign(x: &Tensor, centroids: &Tensor, metric: Metric) -> Result<(Tensor, Tensor)> {
        const OP: &str = "kmeans::reference::assign";
        let (_, d) = check_points(x, OP)?;
        check_centroids(centroids, x, d, OP)?;
        match x.storage() {
            Storage::Cpu(_) => super::assign(x, centroids, metric),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => cuda::assign_reference(x, centroids, metric),
        }
    }

    /// Reference [`sort_by_cluster`](super::sort_by_cluster) (single thread on CUDA).
    pub fn sort_by_cluster(assignment: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
        // Validates (and, on CUDA, checks the labels) through the fast path first.
        let fast = super::sort_by_cluster(assignment, k)?;
        match assignment.storage() {
            Storage::Cpu(_) => Ok(fast),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => cuda::counting_sort_reference(assignment, k),
        }
    }

    /// [`KMeans::fit`] whose device loop runs the one-thread references of its helpers
    /// (`reseed_empty_reference_*`, `shift_inertia_reference_f32`); the CPU fit on the CPU.
    pub fn fit(km: &KMeans, x: &Tensor) -> Result<KMeansFit> {
        km.fit_with(x, fit::LoopHelpers::Reference)
    }

    /// Reference [`update`](super::update); labels must be `< k`.
    pub fn update(x: &Tensor, assignment: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
        const OP: &str = "kmeans::reference::update";
        let (n, _) = check_points(x, OP)?;
        check_assignment(assignment, x, n, OP)?;
        match x.storage() {
            Storage::Cpu(_) => super::update(x, assignment, k),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => cuda::update_reference(x, assignment, k),
        }
    }
}

/// Rows `ids` of `x` as host f32 (gathered on the device first for CUDA tensors).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn gather_rows_f32(x: &Tensor, ids: &[usize]) -> Result<Vec<f32>> {
    const OP: &str = "kmeans (gather rows)";
    let d = x.shape()[1];
    match x.storage() {
        Storage::Cpu(_) => Ok(init::gather(&x.host_f32(OP)?, d, ids)),
        #[cfg(feature = "cuda")]
        Storage::Cuda(_) => cuda::gather_rows_f32(x, ids),
    }
}

// ----- validation shared by the entry points ----------------------------------------------

/// `x` must be `[N, D]` with N, D ≥ 1, a float dtype of f32/f16/bf16. Returns (N, D).
fn check_points(x: &Tensor, op: &'static str) -> Result<(usize, usize)> {
    if x.rank() != 2 {
        return Err(Error::shape(op, "x", "[N, D]", x.shape()));
    }
    if !matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::UnsupportedDType { op, dtype: x.dtype(), supported: "f32, f16, bf16" });
    }
    let (n, d) = (x.shape()[0], x.shape()[1]);
    if n == 0 || d == 0 {
        return Err(Error::EmptyInput { op, what: "x".into(), shape: x.shape().into() });
    }
    if n >= i32::MAX as usize || d >= i32::MAX as usize {
        return Err(Error::shape(op, "x", "[N, D] with N, D < 2^31", x.shape()));
    }
    Ok((n, d))
}

/// `centroids` must be `[K, D]`, f32 or `x`'s dtype, on `x`'s device. Returns K.
fn check_centroids(c: &Tensor, x: &Tensor, d: usize, op: &'static str) -> Result<usize> {
    x.device().expect_same(c.device(), op)?;
    if c.rank() != 2 || c.shape()[1] != d {
        return Err(Error::shape(op, "centroids", format!("[K, {d}] (D of x)"), c.shape()));
    }
    if c.dtype() != DType::F32 && c.dtype() != x.dtype() {
        return Err(Error::DTypeMismatch {
            op,
            what: "centroids".into(),
            expected: x.dtype(),
            got: c.dtype(),
        });
    }
    if c.shape()[0] >= i32::MAX as usize {
        return Err(Error::shape(op, "centroids", "[K, D] with K < 2^31", c.shape()));
    }
    Ok(c.shape()[0])
}

fn check_assignment(a: &Tensor, x: &Tensor, n: usize, op: &'static str) -> Result<()> {
    x.device().expect_same(a.device(), op)?;
    a.expect_dtype(DType::U32, op, "assignment")?;
    if a.shape() != [n] {
        return Err(Error::shape(op, "assignment", format!("[{n}] (N of x)"), a.shape()));
    }
    Ok(())
}

/// Host centroids as f32, rounded through `x`'s dtype when that is f16/bf16.
fn rounded_centroids<'a>(
    c: &'a Tensor,
    x_dtype: DType,
    op: &'static str,
) -> Result<std::borrow::Cow<'a, [f32]>> {
    let cs = c.host_f32(op)?;
    Ok(match x_dtype {
        DType::F16 => cs.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect::<Vec<_>>().into(),
        DType::BF16 => cs.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect::<Vec<_>>().into(),
        _ => cs,
    })
}

/// Which input is at fault is cheap to tell on the host for the (small) centroids; otherwise it
/// is `x` (or a distance that overflowed).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn non_finite(op: &'static str, c: &Tensor) -> Error {
    let centroids_bad = c
        .to_device(&crate::Device::cpu())
        .and_then(|h| h.host_f32(op).map(|v| v.iter().any(|e| !e.is_finite())))
        .unwrap_or(false);
    Error::NonFinite { op, what: if centroids_bad { "centroids" } else { "x" }.into() }
}
