//! Initial centroids on the host: uniform random rows, k-means++ (Arthur & Vassilvitskii
//! 2007) and, for large inputs, its parallel variant k-means‖ (Bahmani et al. 2012).
//!
//! All three are seeded and deterministic (the same seed gives the same centroids whatever the
//! thread count): k-means‖ draws each point's coin from a hash of (seed, round, row), not from
//! a shared stream.
//!
//! k-means‖ reaches the data only through [`Points`] (gather rows, nearest-centroid distances),
//! so for a CUDA tensor its distance passes run on the GPU (`kmeans::assign`) and only
//! per-row distances, labels and the sampled rows cross to the host.

use rayon::prelude::*;

use super::{cpu, Metric};
use crate::testing::Rng;
use crate::{Error, Result, Tensor};

/// What seeding needs from the data, wherever it lives.
pub(super) trait Points: Sync {
    /// Number of rows.
    fn n(&self) -> usize;
    /// Row width.
    fn d(&self) -> usize;
    /// Rows `ids` as f32, `ids.len() × d`.
    fn rows(&self, ids: &[usize]) -> Result<Vec<f32>>;
    /// For every row, the nearest of the `m` given centres (`m × d`) and the distance to it.
    fn nearest(&self, centres: &[f32], m: usize) -> Result<(Vec<u32>, Vec<f32>)>;
}

/// Host rows (already f32, rounded as the fit sees them).
pub(super) struct HostPoints<'a> {
    pub x: &'a [f32],
    pub n: usize,
    pub d: usize,
    pub metric: Metric,
}

impl Points for HostPoints<'_> {
    fn n(&self) -> usize {
        self.n
    }
    fn d(&self) -> usize {
        self.d
    }
    fn rows(&self, ids: &[usize]) -> Result<Vec<f32>> {
        Ok(gather(self.x, self.d, ids))
    }
    fn nearest(&self, centres: &[f32], m: usize) -> Result<(Vec<u32>, Vec<f32>)> {
        cpu::assign(self.x, self.n, self.d, centres, m, self.metric)
    }
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
/// Rows of a tensor on any device: distances through [`super::assign`], rows gathered on the
/// device (CUDA) before they are copied to the host.
pub(super) struct TensorPoints<'a> {
    pub x: &'a Tensor,
    pub metric: Metric,
}

impl Points for TensorPoints<'_> {
    fn n(&self) -> usize {
        self.x.shape()[0]
    }
    fn d(&self) -> usize {
        self.x.shape()[1]
    }
    fn rows(&self, ids: &[usize]) -> Result<Vec<f32>> {
        super::gather_rows_f32(self.x, ids)
    }
    fn nearest(&self, centres: &[f32], m: usize) -> Result<(Vec<u32>, Vec<f32>)> {
        let c = Tensor::from_slice(centres, &[m, self.d()], self.x.device())?;
        let (labels, dist) = super::assign(self.x, &c, self.metric)?;
        Ok((labels.to_vec()?, dist.to_vec()?))
    }
}

/// Above this many point-centroid pairs (N·K), k-means++ switches to k-means‖: k sequential
/// passes over N become a handful of rounds.
pub(super) const PARALLEL_INIT_MIN_PAIRS: usize = 1 << 24;
/// k-means‖ rounds and oversampling factor (×k per round), Bahmani et al.'s recommendation.
const PARALLEL_ROUNDS: usize = 5;
const OVERSAMPLING: f64 = 2.0;

/// `k` distinct rows of `x` chosen uniformly (Floyd's algorithm), in draw order.
pub(super) fn random_rows(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut rng = Rng::new(seed);
    let mut chosen = std::collections::HashSet::with_capacity(k);
    let mut order = Vec::with_capacity(k);
    for j in n - k..n {
        let t = rng.below(j as u64 + 1) as usize;
        let pick = if chosen.contains(&t) { j } else { t };
        chosen.insert(pick);
        order.push(pick);
    }
    order
}

/// Gathers rows `ids` of `x` (`· × d`).
pub(super) fn gather(x: &[f32], d: usize, ids: &[usize]) -> Vec<f32> {
    ids.iter().flat_map(|&i| x[i * d..(i + 1) * d].iter().copied()).collect()
}

/// k-means++ seeding on host rows, with the sampling weight the metric's own distance (D² for
/// squared L2, the mean absolute difference for mean-L1), parallel over points within each
/// step; k-means‖ instead when N·K exceeds [`PARALLEL_INIT_MIN_PAIRS`].
pub(super) fn kmeans_plus_plus(
    x: &[f32],
    n: usize,
    d: usize,
    k: usize,
    metric: Metric,
    seed: u64,
) -> Result<Vec<f32>> {
    if n.saturating_mul(k) > PARALLEL_INIT_MIN_PAIRS {
        return kmeans_parallel(&HostPoints { x, n, d, metric }, k, metric, seed);
    }
    let weights = vec![1.0f64; n];
    let ids = weighted_plus_plus(x, n, d, &weights, k, metric, &mut Rng::new(seed));
    Ok(gather(x, d, &ids))
}

/// Weighted k-means++ over the rows of `x`: returns `k` distinct row ids (distinct as long as
/// there are k rows of positive weight at positive distance; otherwise it tops up with the
/// lowest unused ids).
fn weighted_plus_plus(
    x: &[f32],
    n: usize,
    d: usize,
    weights: &[f64],
    k: usize,
    metric: Metric,
    rng: &mut Rng,
) -> Vec<usize> {
    let first = sample(weights, rng).unwrap_or(0);
    let mut ids = vec![first];
    let mut nearest: Vec<f32> =
        (0..n).into_par_iter().map(|i| row_distance(x, d, i, first, metric)).collect();
    while ids.len() < k {
        let mass: Vec<f64> = nearest.iter().zip(weights).map(|(&dist, &w)| dist as f64 * w).collect();
        let next = match sample(&mass, rng) {
            Some(i) => i,
            // Every remaining point coincides with a chosen centroid: any unused row will do.
            None => match (0..n).find(|i| !ids.contains(i)) {
                Some(i) => i,
                None => break,
            },
        };
        ids.push(next);
        nearest.par_iter_mut().enumerate().for_each(|(i, best)| {
            *best = best.min(row_distance(x, d, i, next, metric));
        });
    }
    ids
}

fn row_distance(x: &[f32], d: usize, i: usize, j: usize, metric: Metric) -> f32 {
    cpu::distance(metric, &x[i * d..(i + 1) * d], &x[j * d..(j + 1) * d])
}

/// An index drawn with probability proportional to `mass`, or `None` when the mass is zero.
fn sample(mass: &[f64], rng: &mut Rng) -> Option<usize> {
    let total: f64 = mass.iter().sum();
    if !total.is_finite() || total <= 0.0 {
        return None;
    }
    let target = rng.uniform() * total;
    let mut acc = 0.0;
    for (i, &m) in mass.iter().enumerate() {
        acc += m;
        if acc > target && m > 0.0 {
            return Some(i);
        }
    }
    mass.iter().rposition(|&m| m > 0.0)
}

/// k-means‖: a few rounds in which every point joins the candidate set independently with
/// probability ℓ·d(x)/φ (ℓ = 2k), then weighted k-means++ over the candidates, each weighted by
/// the number of points nearest to it. Distances go through [`Points::nearest`] (GEMM-shaped
/// on the CPU, the assignment kernels on CUDA).
pub(super) fn kmeans_parallel(pts: &dyn Points, k: usize, metric: Metric, seed: u64) -> Result<Vec<f32>> {
    const OP: &str = "KMeans::fit (k-means‖ seeding)";
    let (n, d) = (pts.n(), pts.d());
    let mut rng = Rng::new(seed);
    let first = rng.below(n as u64) as usize;
    let mut candidates = vec![first];
    let mut is_candidate = vec![false; n];
    is_candidate[first] = true;
    let (_, mut nearest) = pts.nearest(&pts.rows(&[first])?, 1)?;
    if nearest.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFinite { op: OP, what: "x".into() });
    }
    for round in 0..PARALLEL_ROUNDS {
        let phi: f64 = nearest.par_iter().map(|&v| v as f64).sum();
        if phi.is_nan() || phi <= 0.0 {
            break;
        }
        let scale = OVERSAMPLING * k as f64 / phi;
        let picked: Vec<usize> = (0..n)
            .into_par_iter()
            .filter(|&i| !is_candidate[i] && coin(seed, round as u64, i as u64) < scale * nearest[i] as f64)
            .collect();
        if picked.is_empty() {
            continue;
        }
        let (_, dist) = pts.nearest(&pts.rows(&picked)?, picked.len())?;
        nearest.par_iter_mut().zip(&dist).for_each(|(b, &v)| *b = b.min(v));
        for &i in &picked {
            is_candidate[i] = true;
        }
        candidates.extend(picked);
    }
    if candidates.len() <= k {
        // Too few candidates (tiny spread): top up with uniformly drawn unused rows.
        for i in random_rows(n, n.min(k + candidates.len()), seed ^ 0xA5A5) {
            if candidates.len() == k {
                break;
            }
            if !is_candidate[i] {
                is_candidate[i] = true;
                candidates.push(i);
            }
        }
        return pts.rows(&candidates);
    }
    let rows = pts.rows(&candidates)?;
    let (labels, _) = pts.nearest(&rows, candidates.len())?;
    let mut weights = vec![0f64; candidates.len()];
    for &l in &labels {
        weights[l as usize] += 1.0;
    }
    let picked = weighted_plus_plus(&rows, candidates.len(), d, &weights, k, metric, &mut rng);
    Ok(gather(&rows, d, &picked))
}

/// A uniform number in [0, 1) from (seed, round, row): SplitMix64 finalisers over the mixed key.
fn coin(seed: u64, round: u64, row: u64) -> f64 {
    let mut rng =
        Rng::new(seed ^ round.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ row.wrapping_mul(0x8CB9_2BA7_2F3D_8DD7));
    rng.uniform()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tensor-backed k-means‖ (the CUDA route) and the host one agree on CPU data.
    #[test]
    fn kmeans_parallel_through_tensors_matches_host() {
        let (n, d, k) = (3000, 3, 20);
        let mut rng = Rng::new(5);
        let x: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
        let t = Tensor::from_slice(&x, &[n, d], &crate::Device::cpu());
        assert!(t.is_ok());
        let Ok(t) = t else { return };
        for metric in [Metric::SquaredL2, Metric::MeanL1] {
            let host = kmeans_parallel(&HostPoints { x: &x, n, d, metric }, k, metric, 9);
            let dev = kmeans_parallel(&TensorPoints { x: &t, metric }, k, metric, 9);
            assert_eq!(host.ok(), dev.ok());
        }
    }
}
