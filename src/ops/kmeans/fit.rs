//! [`KMeans`]: Lloyd's algorithm over [`assign`](super::assign) and [`update`](super::update),
//! with seeded initialisation and re-seeding of empty clusters.
//!
//! One iteration: assign every row to its nearest centroid (inertia = Σ distances), move each
//! centroid to the mean of its rows, re-seed the clusters left empty, and stop when no centroid
//! moved more than `tol` (measured with the fit's metric). On CUDA the whole loop stays on the
//! device; the only device-to-host copy per iteration is the (shift, inertia, status) triple the
//! convergence check needs.

use super::{check_points, cpu, init, Metric};
use crate::tensor::Storage;
use crate::{DType, Error, Result, Tensor};

/// The device Lloyd loop's helper kernels (reseeding, the convergence statistics): the fast
/// one-block kernels, or their one-thread references (`kmeans::reference::fit`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum LoopHelpers {
    Fast,
    Reference,
}

const OP: &str = "KMeans::fit";

/// How [`KMeans::fit`] picks its first centroids.
#[derive(Clone, Debug)]
pub enum Init {
    /// k-means++ seeding with the given seed. Sampling weights are the metric's distance (D²
    /// for squared L2). When N·K exceeds 2²⁴ the parallel variant k-means‖ runs instead: five
    /// rounds of independent oversampling (ℓ = 2K per round), then weighted k-means++ over the
    /// candidates.
    KMeansPlusPlus {
        /// Seed of the sampling.
        seed: u64,
    },
    /// K distinct rows of `x` drawn uniformly with the given seed.
    Random {
        /// Seed of the draw.
        seed: u64,
    },
    /// These centroids, `[K, D]` f32 or `x`'s dtype, on any device (a warm start).
    Given(Tensor),
}

/// Lloyd's K-means. Build with [`KMeans::new`] and the builder methods, then call
/// [`KMeans::fit`].
///
/// **Empty clusters.** When an iteration leaves clusters empty, each is re-seeded, in order of
/// cluster index, with a distinct row of `x` among those farthest from their own centroid in that
/// iteration's assignment (farthest first; equal distances to the lowest row). A fit therefore
/// ends with no empty cluster unless it stops on that very iteration or `x` has fewer distinct
/// rows than `k`.
///
/// **Initialisation on CUDA.** Random rows are gathered on the device; k-means‖ takes its
/// distances with the device's assignment kernels and copies only per-row distances, labels and
/// the sampled rows to the host; exact k-means++ (N·K ≤ 2²⁴ and N·D ≤ 2²⁴) works on one host
/// copy of `x`. The weighted k-means++ over the k-means‖ candidates runs on the host.
#[derive(Clone, Debug)]
pub struct KMeans {
    /// Number of clusters, 1 ≤ k ≤ N.
    pub k: usize,
    /// Maximum number of Lloyd iterations (0 only assigns to the initial centroids).
    pub max_iter: usize,
    /// Stop when no centroid moves by more than this, measured with `metric` (squared L2:
    /// ‖c_new − c_old‖²; mean-L1: the mean |c_new − c_old|); ≥ 0.
    pub tol: f64,
    /// The distance.
    pub metric: Metric,
    /// The initial centroids.
    pub init: Init,
}

/// The result of [`KMeans::fit`].
#[derive(Clone, Debug)]
pub struct KMeansFit {
    /// Final centroids `[K, D]` f32.
    pub centroids: Tensor,
    /// Nearest final centroid of each row, `[N]` u32.
    pub assignment: Tensor,
    /// Σ over rows of the distance to the assigned final centroid.
    pub inertia: f64,
    /// Inertia of the assignment made in each iteration (against the centroids entering it).
    /// With squared L2 it never increases, and `inertia` ≤ its last entry.
    pub inertia_history: Vec<f64>,
    /// Lloyd iterations run.
    pub iterations: usize,
    /// Whether the centroid shift fell to `tol` or below before `max_iter` ran out.
    pub converged: bool,
}

impl KMeans {
    /// `k` clusters, squared L2, k-means++ with seed 0, up to 300 iterations, `tol` 1e-4.
    pub fn new(k: usize) -> KMeans {
        KMeans {
            k,
            max_iter: 300,
            tol: 1e-4,
            metric: Metric::SquaredL2,
            init: Init::KMeansPlusPlus { seed: 0 },
        }
    }

    /// Sets the maximum number of iterations.
    pub fn max_iter(mut self, max_iter: usize) -> KMeans {
        self.max_iter = max_iter;
        self
    }

    /// Sets the convergence tolerance on the centroid shift.
    pub fn tol(mut self, tol: f64) -> KMeans {
        self.tol = tol;
        self
    }

    /// Sets the metric.
    pub fn metric(mut self, metric: Metric) -> KMeans {
        self.metric = metric;
        self
    }

    /// Sets the initialisation.
    pub fn init(mut self, init: Init) -> KMeans {
        self.init = init;
        self
    }

    /// Runs Lloyd's algorithm on `x` (`[N, D]` f32/f16/bf16).
    ///
    /// Errors: `k = 0` or `k > N`, a negative or non-finite `tol`, non-finite values in `x`,
    /// given centroids of the wrong shape or dtype, and the errors of [`assign`](super::assign).
    pub fn fit(&self, x: &Tensor) -> Result<KMeansFit> {
        self.fit_with(x, LoopHelpers::Fast)
    }

    /// [`fit`](Self::fit) with the device loop's helpers chosen (the CPU loop has one kind).
    pub(super) fn fit_with(&self, x: &Tensor, helpers: LoopHelpers) -> Result<KMeansFit> {
        let (n, d) = check_points(x, OP)?;
        if self.k == 0 || self.k > n {
            return Err(Error::invalid(OP, "k", format!("k = {}, expected 1 ≤ k ≤ N = {n}", self.k)));
        }
        if !self.tol.is_finite() || self.tol < 0.0 {
            return Err(Error::invalid(OP, "tol", format!("{}; expected a finite value ≥ 0", self.tol)));
        }
        let given = match &self.init {
            Init::Given(c) => Some(self.given_centroids(c, x.dtype(), d)?),
            _ => None,
        };
        match x.storage() {
            Storage::Cpu(_) => {
                let _ = helpers; // one CPU loop
                let xs = x.host_f32(OP)?;
                if xs.iter().any(|v| !v.is_finite()) {
                    return Err(Error::NonFinite { op: OP, what: "x".into() });
                }
                let c0 = match given {
                    Some(c) => c,
                    None => self.seed_centroids(&xs, n, d)?,
                };
                self.lloyd_cpu(&xs, n, d, x.dtype(), c0)
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => {
                let c0 = match given {
                    Some(c) => c,
                    None => self.seed_on_device(x, n, d)?,
                };
                super::cuda::lloyd(x, &c0, self, helpers)
            }
        }
    }

    fn given_centroids(&self, c: &Tensor, x_dtype: DType, d: usize) -> Result<Vec<f32>> {
        if c.shape() != [self.k, d] {
            return Err(Error::shape(
                OP,
                "Init::Given centroids",
                format!("[{}, {d}] ([k, D])", self.k),
                c.shape(),
            ));
        }
        if c.dtype() != DType::F32 && c.dtype() != x_dtype {
            return Err(Error::DTypeMismatch {
                op: OP,
                what: "Init::Given centroids".into(),
                expected: DType::F32,
                got: c.dtype(),
            });
        }
        let host = c.to_device(&crate::Device::cpu())?;
        let v = host.host_f32(OP)?.into_owned();
        if v.iter().any(|e| !e.is_finite()) {
            return Err(Error::NonFinite { op: OP, what: "Init::Given centroids".into() });
        }
        Ok(v)
    }

    fn seed_centroids(&self, xs: &[f32], n: usize, d: usize) -> Result<Vec<f32>> {
        match self.init {
            Init::KMeansPlusPlus { seed } => init::kmeans_plus_plus(xs, n, d, self.k, self.metric, seed),
            Init::Random { seed } => Ok(init::gather(xs, d, &init::random_rows(n, self.k, seed))),
            // invariant: Given is resolved by the caller before seeding.
            Init::Given(_) => Ok(Vec::new()),
        }
    }

    /// Seeding for a CUDA `x`: random rows and k-means‖ gather rows and take distances on the
    /// device; exact k-means++ (small N·K) works on one host copy of `x`, taken only when it
    /// is small (N·D ≤ 2²⁴), else k-means‖ runs instead.
    #[cfg(feature = "cuda")]
    fn seed_on_device(&self, x: &Tensor, n: usize, d: usize) -> Result<Vec<f32>> {
        let points = init::TensorPoints { x, metric: self.metric };
        let c = match self.init {
            Init::Random { seed } => init::Points::rows(&points, &init::random_rows(n, self.k, seed))?,
            Init::KMeansPlusPlus { .. }
                if n.saturating_mul(self.k) <= init::PARALLEL_INIT_MIN_PAIRS
                    && n.saturating_mul(d) <= 1 << 24 =>
            {
                let host = x.to_device(&crate::Device::cpu())?;
                let xs = host.host_f32(OP)?;
                if xs.iter().any(|v| !v.is_finite()) {
                    return Err(Error::NonFinite { op: OP, what: "x".into() });
                }
                self.seed_centroids(&xs, n, d)?
            }
            Init::KMeansPlusPlus { seed } => init::kmeans_parallel(&points, self.k, self.metric, seed)?,
            // invariant: Given is resolved by the caller before seeding.
            Init::Given(_) => Vec::new(),
        };
        if c.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFinite { op: OP, what: "x".into() });
        }
        Ok(c)
    }

    fn lloyd_cpu(&self, xs: &[f32], n: usize, d: usize, dtype: DType, mut c: Vec<f32>) -> Result<KMeansFit> {
        let k = self.k;
        let round = |c: &[f32]| -> Vec<f32> { round_to(c, dtype) };
        let mut history = Vec::new();
        let mut converged = false;
        let mut iterations = 0;
        for it in 1..=self.max_iter {
            let (labels, dist) = cpu::assign(xs, n, d, &round(&c), k, self.metric)?;
            history.push(inertia(&dist)?);
            let (mut next, counts) = cpu::update(xs, d, &labels, k)?;
            reseed_empty(xs, d, &counts, &dist, &mut next);
            let shift = max_shift(&c, &next, d, self.metric);
            c = next;
            iterations = it;
            if shift <= self.tol {
                converged = true;
                break;
            }
        }
        let (labels, dist) = cpu::assign(xs, n, d, &round(&c), k, self.metric)?;
        let inertia = inertia(&dist)?;
        Ok(KMeansFit {
            centroids: Tensor::from_host_vec(c, &[k, d]),
            assignment: Tensor::from_host_vec(labels, &[n]),
            inertia,
            inertia_history: history,
            iterations,
            converged,
        })
    }
}

/// Σ distances in f64, or NonFinite when a distance overflowed.
fn inertia(dist: &[f32]) -> Result<f64> {
    let s: f64 = dist.iter().map(|&v| v as f64).sum();
    if s.is_finite() {
        Ok(s)
    } else {
        Err(Error::NonFinite { op: OP, what: "x (its distances overflow f32)".into() })
    }
}

/// The centroids as the assignment sees them: rounded through f16/bf16 when `x` is.
pub(super) fn round_to(c: &[f32], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F16 => c.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
        DType::BF16 => c.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect(),
        _ => c.to_vec(),
    }
}

/// The largest distance (under `metric`) between a centroid and its successor.
pub(super) fn max_shift(old: &[f32], new: &[f32], d: usize, metric: Metric) -> f64 {
    old.chunks_exact(d)
        .zip(new.chunks_exact(d))
        .map(|(a, b)| cpu::distance(metric, a, b) as f64)
        .fold(0.0, f64::max)
}

/// Re-seeds every empty cluster (in index order) with a distinct row among those farthest from
/// their centroid in `dist` (farthest first, equal distances to the lowest row).
pub(super) fn reseed_empty(xs: &[f32], d: usize, counts: &[u32], dist: &[f32], centroids: &mut [f32]) {
    let empty: Vec<usize> = counts.iter().enumerate().filter(|(_, &c)| c == 0).map(|(j, _)| j).collect();
    if empty.is_empty() {
        return;
    }
    for (cluster, row) in empty.iter().zip(farthest_rows(dist, empty.len())) {
        centroids[cluster * d..(cluster + 1) * d].copy_from_slice(&xs[row * d..(row + 1) * d]);
    }
}

/// The `m` rows of largest distance, farthest first, equal distances in row order.
pub(super) fn farthest_rows(dist: &[f32], m: usize) -> Vec<usize> {
    let mut ids: Vec<usize> = (0..dist.len()).collect();
    let key = |&i: &usize| (std::cmp::Reverse(ordered(dist[i])), i);
    let m = m.min(ids.len());
    if m < ids.len() {
        ids.select_nth_unstable_by_key(m, key);
        ids.truncate(m);
    }
    ids.sort_unstable_by_key(key);
    ids
}

/// A total order on finite f32 distances (≥ 0).
fn ordered(v: f32) -> u32 {
    v.max(0.0).to_bits()
}
