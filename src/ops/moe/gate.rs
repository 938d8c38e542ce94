//! [`MixerGate`]: MixER's gate update (Nzoyem et al. 2025, code ddrous/MixER), built from this
//! crate's K-means and least squares.
//!
//! 1. K-means with mean-L1 distance on the environments' contexts, K = the number of experts,
//!    up to 20 iterations, tol 1e-4, warm-started from the previous centroids when given.
//! 2. For every cluster, the median loss of each expert over the cluster's environments.
//! 3. Greedy matching: clusters in index order each take their lowest-median expert not yet
//!    taken (ties to the lowest expert).
//! 4. Targets Y = one-hot of each environment's expert; inputs X = [ξ + N(0, σ²), 1] with
//!    σ = 1e-4 (seeded); gate W = lstsq(X, Y) `[dξ+1, K]`.
//! 5. Skipped, and reported as such, when a cluster is empty or K-means did not converge.
//!
//! Routing afterwards is argmax softmax(Wᵀ[ξ; 1]) = argmax Wᵀ[ξ; 1], hard top-1
//! ([`MixerGate::route`]). The work is small (E environments); it runs on the host, wherever
//! the tensors live, and returns tensors on the contexts' device.

use super::{lstsq, route_top1_logits, Routing};
use crate::kmeans::{Init, KMeans, Metric};
use crate::testing::Rng;
use crate::{DType, Device, Error, Result, Tensor};

const OP: &str = "MixerGate::update";

/// MixER's gate update. [`Default`] gives MixER's settings.
///
/// ```
/// use metakernels::moe::MixerGate;
/// use metakernels::{Device, Tensor};
/// # fn main() -> metakernels::Result<()> {
/// let dev = Device::cpu();
/// // Six environments in two families (contexts near 0 and near 5). Expert 1 has the low loss
/// // on the first family, expert 0 on the second.
/// let contexts = Tensor::from_slice(&[0.0f32, 0.1, 0.2, 5.0, 5.1, 5.2], &[6, 1], &dev)?;
/// let losses = [0.9f32, 0.1, 0.8, 0.2, 0.9, 0.1, 0.1, 0.9, 0.2, 0.8, 0.1, 0.9];
/// let losses = Tensor::from_slice(&losses, &[6, 2], &dev)?;
/// let update = MixerGate::default().update(&contexts, &losses, None)?;
/// assert!(update.skipped.is_none() && update.weights.is_some());
/// // The new gate (present when the update was not skipped) sends each family to its expert.
/// if let Some(weights) = &update.weights {
///     let routing = MixerGate::route(weights, &contexts)?;
///     assert_eq!(routing.expert().to_vec::<u32>()?, vec![1, 1, 1, 0, 0, 0]);
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct MixerGate {
    /// K-means iterations (MixER: 20).
    pub max_iter: usize,
    /// K-means tolerance on the centroid shift (MixER: 1e-4).
    pub tol: f64,
    /// σ of the Gaussian noise added to the contexts before the fit (MixER: 1e-4).
    pub noise_std: f64,
    /// Seed of the noise and of the k-means++ seeding used without warm centroids.
    pub seed: u64,
    /// Ridge of the least-squares fit (MixER: 0, plain least squares).
    pub ridge: f64,
}

impl Default for MixerGate {
    fn default() -> Self {
        MixerGate { max_iter: 20, tol: 1e-4, noise_std: 1e-4, seed: 0, ridge: 0.0 }
    }
}

/// Why a gate update was skipped (the caller keeps its previous gate).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// K-means left this cluster without environments.
    EmptyCluster {
        /// The empty cluster.
        cluster: usize,
    },
    /// K-means ran out of iterations before the centroid shift reached `tol`.
    NotConverged {
        /// Iterations run.
        iterations: usize,
    },
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkipReason::EmptyCluster { cluster } => {
                write!(f, "gate update skipped: cluster {cluster} is empty")
            }
            SkipReason::NotConverged { iterations } => {
                write!(f, "gate update skipped: K-means did not converge in {iterations} iterations")
            }
        }
    }
}

/// The outcome of [`MixerGate::update`].
#[derive(Clone, Debug)]
pub struct GateUpdate {
    /// The new gate `[dξ+1, K]` f32 (last row: the bias), or `None` when skipped.
    pub weights: Option<Tensor>,
    /// K-means centroids `[K, dξ]` f32 (the next update's warm start).
    pub centroids: Tensor,
    /// The cluster of each environment, `[E]` u32.
    pub clusters: Tensor,
    /// The expert each cluster took in the greedy matching (empty when skipped).
    pub cluster_expert: Vec<usize>,
    /// Why the update was skipped, if it was.
    pub skipped: Option<SkipReason>,
}

impl MixerGate {
    /// One gate update from `contexts` (`[E, dξ]`), `expert_losses` (`[E, K]`: the loss of
    /// every expert on every environment) and optionally the previous centroids (`[K, dξ]`).
    ///
    /// Errors: shapes that disagree, K = 0 or K > E, non-finite contexts or losses, mixed
    /// devices, and the errors of [`KMeans::fit`] and [`lstsq`].
    pub fn update(
        &self,
        contexts: &Tensor,
        expert_losses: &Tensor,
        warm_centroids: Option<&Tensor>,
    ) -> Result<GateUpdate> {
        let device = contexts.device().clone();
        device.expect_same(expert_losses.device(), OP)?;
        if contexts.rank() != 2 {
            return Err(Error::shape(OP, "contexts", "[E, dξ]", contexts.shape()));
        }
        let (e, dx) = (contexts.shape()[0], contexts.shape()[1]);
        if expert_losses.rank() != 2 || expert_losses.shape()[0] != e {
            return Err(Error::shape(
                OP,
                "expert_losses",
                format!("[{e}, K] (E of contexts)"),
                expert_losses.shape(),
            ));
        }
        let k = expert_losses.shape()[1];
        if k == 0 || k > e {
            return Err(Error::invalid(
                OP,
                "expert_losses",
                format!("K = {k} experts; expected 1 ≤ K ≤ E = {e}"),
            ));
        }
        let cpu = Device::cpu();
        let ctx = contexts.to_device(&cpu)?.to_dtype(DType::F32)?;
        let losses = expert_losses.to_device(&cpu)?.to_dtype(DType::F32)?.to_vec::<f32>()?;
        if losses.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFinite { op: OP, what: "expert_losses".into() });
        }
        let init = match warm_centroids {
            Some(c) => Init::Given(c.to_device(&cpu)?),
            None => Init::KMeansPlusPlus { seed: self.seed },
        };
        let fit =
            KMeans { k, max_iter: self.max_iter, tol: self.tol, metric: Metric::MeanL1, init }.fit(&ctx)?;
        let clusters = fit.assignment.to_vec::<u32>()?;
        let skipped = skip_reason(&clusters, k, fit.converged, fit.iterations);
        let (weights, cluster_expert) = match skipped {
            Some(_) => (None, Vec::new()),
            None => {
                let cluster_expert = greedy_match(&median_losses(&clusters, &losses, k), k);
                let w = self.fit_gate(&ctx.to_vec::<f32>()?, &clusters, &cluster_expert, e, dx, k)?;
                (Some(w.to_device(&device)?), cluster_expert)
            }
        };
        Ok(GateUpdate {
            weights,
            centroids: fit.centroids.to_device(&device)?,
            clusters: fit.assignment.to_device(&device)?,
            cluster_expert,
            skipped,
        })
    }

    /// W = lstsq([ξ + noise, 1], one-hot(expert of each environment's cluster)).
    fn fit_gate(
        &self,
        ctx: &[f32],
        clusters: &[u32],
        cluster_expert: &[usize],
        e: usize,
        dx: usize,
        k: usize,
    ) -> Result<Tensor> {
        let mut rng = Rng::new(self.seed ^ 0x6A7E);
        let mut x = Vec::with_capacity(e * (dx + 1));
        for row in ctx.chunks_exact(dx) {
            x.extend(row.iter().map(|&v| (v as f64 + self.noise_std * rng.normal()) as f32));
            x.push(1.0);
        }
        let mut y = vec![0f32; e * k];
        for (env, &c) in clusters.iter().enumerate() {
            y[env * k + cluster_expert[c as usize]] = 1.0;
        }
        let cpu = Device::cpu();
        let xt = Tensor::from_vec(x, &[e, dx + 1], &cpu)?;
        let yt = Tensor::from_vec(y, &[e, k], &cpu)?;
        lstsq(&xt, &yt, self.ridge)
    }

    /// Gate logits `[E, K]` = [ξ, 1] · W for `contexts` (`[E, dξ]`) and `weights` (`[dξ+1, K]`),
    /// computed on the host in f64 and returned as f32 on the contexts' device.
    pub fn logits(weights: &Tensor, contexts: &Tensor) -> Result<Tensor> {
        const OP: &str = "MixerGate::logits";
        if contexts.rank() != 2 {
            return Err(Error::shape(OP, "contexts", "[E, dξ]", contexts.shape()));
        }
        let (e, dx) = (contexts.shape()[0], contexts.shape()[1]);
        if weights.rank() != 2 || Some(weights.shape()[0]) != dx.checked_add(1) {
            let expected = format!("[{}, K] ([dξ+1, K])", dx.saturating_add(1));
            return Err(Error::shape(OP, "weights", expected, weights.shape()));
        }
        contexts.device().expect_same(weights.device(), OP)?;
        let k = weights.shape()[1];
        if k == 0 {
            return Err(Error::EmptyInput {
                op: OP,
                what: "weights (K = 0 experts)".into(),
                shape: weights.shape().into(),
            });
        }
        let cpu = Device::cpu();
        let w = weights.to_device(&cpu)?.to_dtype(DType::F64)?.to_vec::<f64>()?;
        let c = contexts.to_device(&cpu)?.to_dtype(DType::F64)?.to_vec::<f64>()?;
        // E·K can exceed what the host holds when dξ = 0 (the contexts then hold no data).
        let mut out = crate::cpu::output_vec::<f32>(e.saturating_mul(k))?;
        for (env, o) in out.chunks_exact_mut(k).enumerate() {
            let row = &c[env * dx..(env + 1) * dx];
            for (j, oj) in o.iter_mut().enumerate() {
                let s: f64 =
                    row.iter().enumerate().map(|(i, &v)| v * w[i * k + j]).sum::<f64>() + w[dx * k + j];
                *oj = s as f32;
            }
        }
        Tensor::from_vec(out, &[e, k], &cpu)?.to_device(contexts.device())
    }

    /// Hard top-1 routing of `contexts` by the gate: argmax softmax(Wᵀ[ξ; 1]).
    pub fn route(weights: &Tensor, contexts: &Tensor) -> Result<Routing> {
        route_top1_logits(&MixerGate::logits(weights, contexts)?)
    }
}

fn skip_reason(clusters: &[u32], k: usize, converged: bool, iterations: usize) -> Option<SkipReason> {
    let mut counts = vec![0usize; k];
    for &c in clusters {
        counts[c as usize] += 1;
    }
    if let Some(cluster) = counts.iter().position(|&c| c == 0) {
        return Some(SkipReason::EmptyCluster { cluster });
    }
    (!converged).then_some(SkipReason::NotConverged { iterations })
}

/// medians[c][j]: the median (numpy's: mean of the two middle values for even counts) loss of
/// expert j over the environments of cluster c. Every cluster is non-empty here.
fn median_losses(clusters: &[u32], losses: &[f32], k: usize) -> Vec<Vec<f64>> {
    (0..k)
        .map(|c| {
            (0..k)
                .map(|j| {
                    let mut v: Vec<f64> = clusters
                        .iter()
                        .enumerate()
                        .filter(|(_, &cl)| cl as usize == c)
                        .map(|(env, _)| losses[env * k + j] as f64)
                        .collect();
                    v.sort_by(f64::total_cmp);
                    let m = v.len();
                    if m % 2 == 1 {
                        v[m / 2]
                    } else {
                        0.5 * (v[m / 2 - 1] + v[m / 2])
                    }
                })
                .collect()
        })
        .collect()
}

/// Clusters in index order each take their lowest-median expert not yet taken.
fn greedy_match(medians: &[Vec<f64>], k: usize) -> Vec<usize> {
    let mut taken = vec![false; k];
    medians
        .iter()
        .map(|row| {
            let best =
                (0..k).filter(|&j| !taken[j]).min_by(|&a, &b| row[a].total_cmp(&row[b]).then(a.cmp(&b)));
            // invariant: K clusters and K experts, so an untaken expert always remains.
            let j = best.unwrap_or(0);
            taken[j] = true;
            j
        })
        .collect()
}
