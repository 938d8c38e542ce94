//! CPU K-means kernels, the same algorithms as the CUDA ones:
//!
//! - squared-L2 assignment as GEMM-shaped blocks: for a block of rows, `x·Cᵀ` through
//!   `crate::cpu::sgemm`, then an epilogue that forms ‖c‖² − 2x·c and keeps the running argmin
//!   (the N×K distance matrix never exists; only a rows×K_BLOCK scratch per task);
//! - mean-L1 assignment as blocked direct loops (no GEMM form exists);
//! - update as a stable counting sort followed by one sum per cluster in row order, which
//!   makes it bitwise reproducible whatever the thread count.

use rayon::prelude::*;

use super::Metric;
use crate::Result;

/// Rows per rayon task (and per GEMM call).
const ROW_BLOCK: usize = 256;
/// Centroids per GEMM call: bounds the scratch at ROW_BLOCK × K_BLOCK floats (512 KiB).
const K_BLOCK: usize = 512;

/// Nearest centroid and its distance for each of the `n` rows of `x` (`n × d`, row-major);
/// `c` is `k × d`. Ties go to the lowest index.
pub(crate) fn assign(
    x: &[f32],
    n: usize,
    d: usize,
    c: &[f32],
    k: usize,
    metric: Metric,
) -> Result<(Vec<u32>, Vec<f32>)> {
    let mut labels = crate::cpu::output_vec::<u32>(n)?;
    let mut dist = crate::cpu::output_vec::<f32>(n)?;
    match metric {
        Metric::SquaredL2 => assign_l2(x, d, c, k, &mut labels, &mut dist),
        Metric::MeanL1 => assign_l1(x, d, c, &mut labels, &mut dist),
    }
    Ok((labels, dist))
}

fn sq_norms(rows: &[f32], d: usize) -> Vec<f32> {
    rows.chunks_exact(d).map(|r| r.iter().map(|v| v * v).sum()).collect()
}

fn assign_l2(x: &[f32], d: usize, c: &[f32], k: usize, labels: &mut [u32], dist: &mut [f32]) {
    use crate::cpu::{sgemm, Mat};
    let c_norms = sq_norms(c, d);
    let kb = k.min(K_BLOCK);
    x.par_chunks(ROW_BLOCK * d)
        .zip(labels.par_chunks_mut(ROW_BLOCK))
        .zip(dist.par_chunks_mut(ROW_BLOCK))
        .for_each_init(
            || vec![0f32; ROW_BLOCK * kb],
            |scores, ((xb, lb), db)| {
                let rows = lb.len();
                let mut best = [(f32::INFINITY, 0u32); ROW_BLOCK];
                for k0 in (0..k).step_by(kb) {
                    let cols = kb.min(k - k0);
                    let cb = &c[k0 * d..(k0 + cols) * d];
                    // scores[rows × cols] = ‖c‖² − 2·xb·cbᵀ: the GEMM writes the whole score.
                    for row in scores[..rows * cols].chunks_exact_mut(cols) {
                        row.copy_from_slice(&c_norms[k0..k0 + cols]);
                    }
                    // invariant: the views are rows × d, d × cols and rows × cols by construction, so
                    // sgemm (which refuses inconsistent shapes) always runs.
                    let _ran =
                        sgemm(-2.0, Mat::new(xb, rows, d), Mat::new(cb, cols, d).t(), 1.0, scores, cols);
                    for (slot, row) in best[..rows].iter_mut().zip(scores.chunks_exact(cols)) {
                        let (v, j) = argmin(row);
                        if v < slot.0 {
                            *slot = (v, (k0 + j) as u32);
                        }
                    }
                }
                for (i, ((l, dd), xr)) in lb.iter_mut().zip(db.iter_mut()).zip(xb.chunks_exact(d)).enumerate()
                {
                    let xn: f32 = xr.iter().map(|v| v * v).sum();
                    let (v, j) = best[i];
                    *l = j;
                    // The expanded form can dip below zero by rounding; a distance cannot.
                    *dd = if v.is_finite() { (xn + v).max(0.0) } else { f32::NAN };
                }
            },
        );
}

/// (minimum, first index holding it) of a non-empty row; +∞ and 0 when every value is NaN.
/// Two vectorisable passes: an 8-lane min, then the first position equal to it.
#[inline]
fn argmin(row: &[f32]) -> (f32, usize) {
    let mut lanes = [f32::INFINITY; 8];
    let (head, tail) = row.split_at(row.len() - row.len() % 8);
    for chunk in head.chunks_exact(8) {
        for l in 0..8 {
            lanes[l] = lanes[l].min(chunk[l]);
        }
    }
    let m = tail.iter().fold(lanes.iter().fold(f32::INFINITY, |a, &b| a.min(b)), |a, &b| a.min(b));
    (m, row.iter().position(|&v| v == m).unwrap_or(0))
}

fn assign_l1(x: &[f32], d: usize, c: &[f32], labels: &mut [u32], dist: &mut [f32]) {
    let inv_d = 1.0 / d as f32;
    x.par_chunks(ROW_BLOCK * d)
        .zip(labels.par_chunks_mut(ROW_BLOCK))
        .zip(dist.par_chunks_mut(ROW_BLOCK))
        .for_each(|((xb, lb), db)| {
            for ((xr, l), dd) in xb.chunks_exact(d).zip(lb.iter_mut()).zip(db.iter_mut()) {
                let mut best = (f32::INFINITY, 0u32);
                let mut any_nan = false;
                for (j, cr) in c.chunks_exact(d).enumerate() {
                    let v = l1(xr, cr) * inv_d;
                    any_nan |= v.is_nan();
                    if v < best.0 {
                        best = (v, j as u32);
                    }
                }
                *l = best.1;
                *dd = if any_nan || !best.0.is_finite() { f32::NAN } else { best.0 };
            }
        });
}

/// Σ |a − b| with eight independent partial sums so the compiler vectorises it.
#[inline]
pub(crate) fn l1(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, a_tail) = a.split_at(a.len() - a.len() % 8);
    let (b8, b_tail) = b.split_at(a8.len());
    for (ca, cb) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += (ca[l] - cb[l]).abs();
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(p, q)| (p - q).abs()).sum();
    acc.iter().sum::<f32>() + tail
}

/// ‖a − b‖² computed directly (used by the initialisation and the reseeding).
#[inline]
pub(crate) fn sq_l2(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, a_tail) = a.split_at(a.len() - a.len() % 8);
    let (b8, b_tail) = b.split_at(a8.len());
    for (ca, cb) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for l in 0..8 {
            let t = ca[l] - cb[l];
            acc[l] += t * t;
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(p, q)| (p - q) * (p - q)).sum();
    acc.iter().sum::<f32>() + tail
}

/// The metric's distance between two rows.
pub(crate) fn distance(metric: Metric, a: &[f32], b: &[f32]) -> f32 {
    match metric {
        Metric::SquaredL2 => sq_l2(a, b),
        Metric::MeanL1 => l1(a, b) / a.len() as f32,
    }
}

/// Stable counting sort of row ids by cluster: `(order [n], offsets [k+1])`.
/// Every label must be `< k` (checked by the callers). Errors only when the host cannot hold
/// the k + 1 offsets.
pub(crate) fn counting_sort(labels: &[u32], k: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    let mut offsets = crate::cpu::zeroed_vec::<u32>(k.saturating_add(1))?;
    for &c in labels {
        offsets[c as usize + 1] += 1;
    }
    for c in 0..k {
        offsets[c + 1] += offsets[c];
    }
    let mut next = crate::cpu::zeroed_vec::<u32>(k)?;
    next.copy_from_slice(&offsets[..k]);
    let mut order = crate::cpu::output_vec::<u32>(labels.len())?;
    for (i, &c) in labels.iter().enumerate() {
        let slot = &mut next[c as usize];
        order[*slot as usize] = i as u32;
        *slot += 1;
    }
    Ok((order, offsets))
}

/// Per-cluster means (`k × d`, zero rows for empty clusters) and counts. Each cluster's sum
/// runs over its rows in increasing row order, so the result does not depend on threads.
/// Errors only when the host cannot hold the centroids.
pub(crate) fn update(x: &[f32], d: usize, labels: &[u32], k: usize) -> Result<(Vec<f32>, Vec<u32>)> {
    let (order, offsets) = counting_sort(labels, k)?;
    let mut centroids = crate::cpu::output_vec::<f32>(k.saturating_mul(d))?;
    centroids.par_chunks_mut(d).enumerate().for_each(|(c, out)| {
        let members = &order[offsets[c] as usize..offsets[c + 1] as usize];
        out.fill(0.0);
        for &i in members {
            let row = &x[i as usize * d..(i as usize + 1) * d];
            out.iter_mut().zip(row).for_each(|(o, v)| *o += v);
        }
        if !members.is_empty() {
            let count = members.len() as f32;
            out.iter_mut().for_each(|o| *o /= count);
        }
    });
    let counts = offsets.windows(2).map(|w| w[1] - w[0]).collect();
    Ok((centroids, counts))
}
