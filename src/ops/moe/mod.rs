//! Top-1 mixture-of-experts plumbing: routing, grouped dispatch/combine, batched and grouped
//! least squares, and MixER's K-means gate update ([`MixerGate`]).
//!
//! | function | result |
//! |---|---|
//! | [`route_top1`] | each token to its nearest centroid (a K-means gate) |
//! | [`route_top1_logits`] | each token to its argmax logit, with the softmax gate probability |
//! | [`dispatch`] | rows gathered into expert-grouped order |
//! | [`combine`] | grouped rows scattered back to token order, optionally scaled per token |
//! | [`lstsq`] | batched least squares `argmin ‖XW − Y‖² + ridge‖W‖²` |
//! | [`grouped_lstsq`] | one least-squares solution per expert over its routed rows |
//! | [`MixerGate::update`] | MixER's gate: K-means clusters → experts → least-squares gate |
//!
//! ```
//! use metakernels::moe::{self, Routing};
//! use metakernels::{Device, Tensor};
//! # fn main() -> metakernels::Result<()> {
//! let dev = Device::cpu();
//! // 4 tokens, 2 experts: token logits pick experts 1, 0, 1, 0.
//! let logits = Tensor::from_slice(&[0.0f32, 2.0, 3.0, 1.0, -1.0, 0.5, 4.5, 4.0], &[4, 2], &dev)?;
//! let routing: Routing = moe::route_top1_logits(&logits)?;
//! assert_eq!(routing.order().to_vec::<u32>()?, vec![1, 3, 0, 2]); // expert 0's tokens, then 1's
//! let x = Tensor::from_slice(&[10.0f32, 11.0, 12.0, 13.0], &[4, 1], &dev)?;
//! let grouped = moe::dispatch(&x, &routing)?;
//! assert_eq!(grouped.to_vec::<f32>()?, vec![11.0, 13.0, 10.0, 12.0]);
//! let back = moe::combine(&grouped, &routing, None)?;
//! assert_eq!(back.to_vec::<f32>()?, vec![10.0, 11.0, 12.0, 13.0]);
//! # Ok(()) }
//! ```

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod gate;
mod solve;

pub use gate::{GateUpdate, MixerGate, SkipReason};

use crate::kmeans::{self, Metric};
use crate::tensor::Storage;
use crate::{DType, Device, Error, Result, Tensor};

/// Where each token goes under top-1 routing.
///
/// Built by [`route_top1`], [`route_top1_logits`] or the checked [`Routing::from_parts`], so its
/// invariants hold: `order` is a permutation of `0..N` listing expert 0's tokens, then expert
/// 1's, … each group in increasing token order (stable), and `offsets[e]..offsets[e+1]` is
/// expert `e`'s group (`offsets[0] = 0`, `offsets[K] = N`).
#[derive(Clone, Debug)]
pub struct Routing {
    expert: Tensor,
    order: Tensor,
    offsets: Tensor,
    gate_probs: Option<Tensor>,
}

impl Routing {
    /// The expert of each token, `[N]` u32.
    pub fn expert(&self) -> &Tensor {
        &self.expert
    }

    /// Token ids grouped by expert (stable), `[N]` u32.
    pub fn order(&self) -> &Tensor {
        &self.order
    }

    /// Group boundaries in `order`, `[K+1]` u32.
    pub fn offsets(&self) -> &Tensor {
        &self.offsets
    }

    /// The softmax probability of each token's chosen expert, `[N]` f32 (only from
    /// [`route_top1_logits`]).
    pub fn gate_probs(&self) -> Option<&Tensor> {
        self.gate_probs.as_ref()
    }

    /// N, the number of tokens.
    pub fn num_tokens(&self) -> usize {
        self.expert.shape()[0]
    }

    /// K, the number of experts.
    pub fn num_experts(&self) -> usize {
        self.offsets.shape()[0] - 1
    }

    /// The device the routing lives on.
    pub fn device(&self) -> &Device {
        self.expert.device()
    }

    /// A routing from its parts, checked on the host (this copies them there): `expert [N]`,
    /// `order [N]`, `offsets [K+1]`, all u32 on one device, consistent with one another.
    ///
    /// Errors when a shape or dtype is wrong, N ≥ 2³¹, an expert id is `≥ K`, `offsets` is not
    /// non-decreasing from 0 to N (offsets that do not match N), or `order` is not the stable
    /// grouping of `expert`.
    pub fn from_parts(expert: &Tensor, order: &Tensor, offsets: &Tensor) -> Result<Routing> {
        const OP: &str = "Routing::from_parts";
        for (t, what) in [(expert, "expert"), (order, "order"), (offsets, "offsets")] {
            t.expect_dtype(DType::U32, OP, what)?;
            if t.rank() != 1 {
                return Err(Error::shape(OP, what, "a vector", t.shape()));
            }
            expert.device().expect_same(t.device(), OP)?;
        }
        let n = expert.shape()[0];
        if n >= i32::MAX as usize {
            // The same bound as routings made by sort_by_cluster; the kernels index tokens as i32.
            return Err(Error::shape(OP, "expert", "[N] with N < 2^31", expert.shape()));
        }
        if order.shape()[0] != n {
            return Err(Error::shape(OP, "order", format!("[{n}] (N of expert)"), order.shape()));
        }
        if offsets.shape()[0] < 2 {
            return Err(Error::shape(OP, "offsets", "[K+1] with K ≥ 1", offsets.shape()));
        }
        let k = offsets.shape()[0] - 1;
        let e = expert.to_vec::<u32>()?;
        let off = offsets.to_vec::<u32>()?;
        if off[0] != 0 || off[k] as usize != n || off.windows(2).any(|w| w[0] > w[1]) {
            return Err(Error::invalid(
                OP,
                "offsets",
                format!(
                    "expected non-decreasing from 0 to N = {n}, got first {} and last {}",
                    off[0], off[k]
                ),
            ));
        }
        if let Some(bad) = e.iter().find(|&&x| x as usize >= k) {
            return Err(Error::invalid(OP, "expert", format!("holds expert {bad}, expected < K = {k}")));
        }
        let (want_order, want_offsets) = cpu_sort(&e, k);
        if want_offsets != off || want_order != order.to_vec::<u32>()? {
            return Err(Error::invalid(OP, "order/offsets", "not the stable grouping of `expert`"));
        }
        Ok(Routing {
            expert: expert.clone(),
            order: order.clone(),
            offsets: offsets.clone(),
            gate_probs: None,
        })
    }

    fn from_experts(expert: Tensor, k: usize, gate_probs: Option<Tensor>) -> Result<Routing> {
        let (order, offsets) = kmeans::sort_by_cluster(&expert, k)?;
        Ok(Routing { expert, order, offsets, gate_probs })
    }
}

fn cpu_sort(e: &[u32], k: usize) -> (Vec<u32>, Vec<u32>) {
    let mut offsets = vec![0u32; k + 1];
    for &x in e {
        offsets[x as usize + 1] += 1;
    }
    for i in 0..k {
        offsets[i + 1] += offsets[i];
    }
    let mut next = offsets.clone();
    let mut order = vec![0u32; e.len()];
    for (i, &x) in e.iter().enumerate() {
        order[next[x as usize] as usize] = i as u32;
        next[x as usize] += 1;
    }
    (order, offsets)
}

/// Routes every row of `x` (`[N, D]`) to its nearest centroid (`[K, D]`) under `metric`: a
/// K-means gate. Ties go to the lowest expert. See [`kmeans::assign`] for dtypes and errors.
pub fn route_top1(x: &Tensor, centroids: &Tensor, metric: Metric) -> Result<Routing> {
    let (expert, _) = kmeans::assign(x, centroids, metric)?;
    Routing::from_experts(expert, centroids.shape()[0], None)
}

/// Routes every token to its largest logit (`logits`: `[N, K]` f32/f16/bf16; ties to the lowest
/// expert) and records the softmax probability of that expert, `1 / Σ_j exp(l_j − l_max)`.
///
/// Errors: rank, dtype, `K = 0`, non-finite logits.
pub fn route_top1_logits(logits: &Tensor) -> Result<Routing> {
    const OP: &str = "moe::route_top1_logits";
    if logits.rank() != 2 {
        return Err(Error::shape(OP, "logits", "[N, K]", logits.shape()));
    }
    check_float(logits, OP, "logits")?;
    let (n, k) = (logits.shape()[0], logits.shape()[1]);
    if k == 0 || k >= i32::MAX as usize || n >= i32::MAX as usize {
        return Err(Error::shape(OP, "logits", "[N, K] with 1 ≤ K < 2^31 and N < 2^31", logits.shape()));
    }
    let (expert, probs) = match logits.storage() {
        Storage::Cpu(_) => {
            let l = logits.host_f32(OP)?;
            if l.iter().any(|v| !v.is_finite()) {
                return Err(Error::NonFinite { op: OP, what: "logits".into() });
            }
            let (e, p) = cpu::top1_logits(&l, n, k)?;
            (Tensor::from_host_vec(e, &[n]), Tensor::from_host_vec(p, &[n]))
        }
        #[cfg(feature = "cuda")]
        Storage::Cuda(_) => cuda::top1_logits(logits)?,
    };
    Routing::from_experts(expert, k, Some(probs))
}

/// Gathers the rows of `x` (`[N, D]`, any float dtype) into expert-grouped order:
/// `grouped[j] = x[order[j]]`.
///
/// Errors: `x`'s N differs from the routing's, rank, dtype or device mismatch.
pub fn dispatch(x: &Tensor, routing: &Routing) -> Result<Tensor> {
    const OP: &str = "moe::dispatch";
    check_rows(x, routing, OP, "x")?;
    let (n, d) = (x.shape()[0], x.shape()[1]);
    match x.storage() {
        Storage::Cpu(_) => {
            let order = routing.order.host_slice::<u32>(OP)?;
            cpu::gather_rows(x, order, n, d)
        }
        #[cfg(feature = "cuda")]
        Storage::Cuda(_) => cuda::dispatch(x, routing),
    }
}

/// Scatters expert-grouped rows back to token order: `out[order[j]] = w[order[j]] · grouped[j]`
/// (`w` = 1 without `weights`). `grouped`: `[N, D']` any float dtype; `weights`: `[N]` f32 in
/// token order (e.g. [`Routing::gate_probs`]). The output has `grouped`'s dtype.
///
/// Errors: N mismatch with the routing, rank, dtype or device mismatch.
pub fn combine(grouped: &Tensor, routing: &Routing, weights: Option<&Tensor>) -> Result<Tensor> {
    const OP: &str = "moe::combine";
    check_rows(grouped, routing, OP, "grouped")?;
    let n = grouped.shape()[0];
    if let Some(w) = weights {
        grouped.device().expect_same(w.device(), OP)?;
        w.expect_dtype(DType::F32, OP, "weights")?;
        if w.shape() != [n] {
            return Err(Error::shape(OP, "weights", format!("[{n}] (one per token)"), w.shape()));
        }
    }
    match grouped.storage() {
        Storage::Cpu(_) => {
            let order = routing.order.host_slice::<u32>(OP)?;
            let w = weights.map(|w| w.host_slice::<f32>(OP)).transpose()?;
            cpu::combine(grouped, order, w, OP)
        }
        #[cfg(feature = "cuda")]
        Storage::Cuda(_) => cuda::combine(grouped, routing, weights),
    }
}

/// Batched least squares: for each batch index, `W = argmin ‖XW − Y‖² + ridge·‖W‖²`, i.e.
/// `(XᵀX + ridge·I) W = XᵀY`.
///
/// `x`: `[..., M, n]`, `y`: `[..., M, r]` (same leading dims), f32/f16/bf16 on one device;
/// returns `[..., n, r]` f32. `ridge` must be finite and ≥ 0.
///
/// **Method.** Normal equations and a Cholesky factorisation (CPU: f64 throughout; CUDA: f32
/// normal equations formed by a tiled kernel and factorised on chip, one block per system,
/// for n ≤ 64 and n·(n + r) ≤ 8192; larger systems are factorised on the host in f64 from the
/// device's normal equations). Forming XᵀX squares the condition number: use `ridge > 0` for
/// ill-conditioned X.
///
/// **Rank deficiency.** When a Cholesky pivot falls to `n·1e-13` (CPU) or `n·1e-6` (CUDA, f32)
/// of the largest diagonal entry, that system is solved instead through a symmetric
/// eigendecomposition (Jacobi, f64, on the host), dropping eigenvalues below the same relative
/// threshold: the minimum-norm solution `W = pinv(X)·Y`. An expert with no rows and ridge 0
/// gets W = 0.
///
/// ```
/// use metakernels::{moe, Device, Tensor};
/// # fn main() -> metakernels::Result<()> {
/// let dev = Device::cpu();
/// // Two systems of 3 rows (a batch dimension of 2): y = 2·x₀ − x₁ in the first, x₀ + 3·x₁ in
/// // the second, with no noise, so least squares recovers the weights.
/// let x = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 1.0, 1.0, -1.0];
/// let y = [2.0f32, -1.0, 1.0, 7.0, 5.0, -2.0];
/// let x = Tensor::from_slice(&x, &[2, 3, 2], &dev)?;
/// let y = Tensor::from_slice(&y, &[2, 3, 1], &dev)?;
/// let w = moe::lstsq(&x, &y, 0.0)?; // [2, 2, 1]
/// let want = [2.0f32, -1.0, 1.0, 3.0];
/// for (got, want) in w.to_vec::<f32>()?.iter().zip(want) {
///     assert!((got - want).abs() < 1e-5);
/// }
/// # Ok(()) }
/// ```
pub fn lstsq(x: &Tensor, y: &Tensor, ridge: f64) -> Result<Tensor> {
    const OP: &str = "moe::lstsq";
    check_ridge(ridge, OP)?;
    x.device().expect_same(y.device(), OP)?;
    check_float(x, OP, "x")?;
    check_float(y, OP, "y")?;
    if x.rank() < 2 || y.rank() != x.rank() || x.shape()[..x.rank() - 1] != y.shape()[..y.rank() - 1] {
        return Err(Error::shape(
            OP,
            "y",
            format!("[..., M, r] matching x {:?} in all but the last dim", x.shape()),
            y.shape(),
        ));
    }
    let rank = x.rank();
    let (n, r) = (x.shape()[rank - 1], y.shape()[rank - 1]);
    if n == 0 || r == 0 {
        return Err(Error::EmptyInput {
            op: OP,
            what: "x or y (n or r is 0)".into(),
            shape: x.shape().into(),
        });
    }
    let mut out_shape = x.shape()[..rank - 2].to_vec();
    out_shape.extend([n, r]);
    let segments = batch_segments(x, OP)?;
    solve::solve_segments(x, y, n, r, &segments, ridge, &out_shape, OP)
}

/// The rows `(b·M, (b+1)·M)` of each system `b` of a batched x (`[..., M, n]`, rank ≥ 2). With
/// M = 0 the batch dimensions hold no data and can be huge: their product overflowing usize is
/// a shape error, and segments the host cannot hold are [`Error::OutOfMemory`].
fn batch_segments(x: &Tensor, op: &'static str) -> Result<Vec<(usize, usize)>> {
    let rank = x.rank();
    let m = x.shape()[rank - 2];
    let Some(batch) = crate::tensor::checked_numel(&x.shape()[..rank - 2]) else {
        return Err(Error::shape(
            op,
            "x",
            "[..., M, n] whose batch dimensions multiply within usize",
            x.shape(),
        ));
    };
    let mut segments = crate::cpu::vec_with_capacity(batch)?;
    segments.extend((0..batch).map(|b| (b * m, (b + 1) * m)));
    Ok(segments)
}

/// One least-squares solution per expert over its routed rows: for expert `e`, rows
/// `offsets[e]..offsets[e+1]` of `grouped_x` (`[N, n]`) and `grouped_y` (`[N, r]`), both in
/// the routing's grouped order (see [`dispatch`]). Returns `[K, n, r]` f32. Method, ridge and
/// rank-deficient behaviour as [`lstsq`] (an expert with no rows and ridge 0 gets W = 0).
///
/// The routing's offsets are read on the host (one small copy) to size the segments.
pub fn grouped_lstsq(
    grouped_x: &Tensor,
    grouped_y: &Tensor,
    routing: &Routing,
    ridge: f64,
) -> Result<Tensor> {
    const OP: &str = "moe::grouped_lstsq";
    check_ridge(ridge, OP)?;
    check_rows(grouped_x, routing, OP, "grouped_x")?;
    check_rows(grouped_y, routing, OP, "grouped_y")?;
    check_float(grouped_x, OP, "grouped_x")?;
    check_float(grouped_y, OP, "grouped_y")?;
    let (n, r) = (grouped_x.shape()[1], grouped_y.shape()[1]);
    if n == 0 || r == 0 {
        return Err(Error::EmptyInput {
            op: OP,
            what: "grouped_x or grouped_y".into(),
            shape: grouped_x.shape().into(),
        });
    }
    let off = routing.offsets.to_vec::<u32>()?;
    let segments: Vec<(usize, usize)> = off.windows(2).map(|w| (w[0] as usize, w[1] as usize)).collect();
    let k = routing.num_experts();
    solve::solve_segments(grouped_x, grouped_y, n, r, &segments, ridge, &[k, n, r], OP)
}

fn check_rows(t: &Tensor, routing: &Routing, op: &'static str, what: &str) -> Result<()> {
    routing.device().expect_same(t.device(), op)?;
    check_float(t, op, what)?;
    let n = routing.num_tokens();
    if t.rank() != 2 || t.shape()[0] != n {
        return Err(Error::shape(op, what, format!("[{n}, D] (N of the routing)"), t.shape()));
    }
    Ok(())
}

fn check_float(t: &Tensor, op: &'static str, what: &str) -> Result<()> {
    if matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        Ok(())
    } else {
        Err(Error::DTypeMismatch { op, what: what.into(), expected: DType::F32, got: t.dtype() })
    }
}

fn check_ridge(ridge: f64, op: &'static str) -> Result<()> {
    if ridge.is_finite() && ridge >= 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(op, "ridge", format!("{ridge}; expected a finite value ≥ 0")))
    }
}

/// The simple versions the GPU tests hold the fast kernels against (on the CPU, the CPU path).
#[doc(hidden)]
pub mod reference {
    use super::*;

    /// [`route_top1_logits`](super::route_top1_logits) with one thread per row on CUDA.
    pub fn route_top1_logits(logits: &Tensor) -> Result<Routing> {
        let fast = super::route_top1_logits(logits)?; // validation
        match logits.storage() {
            Storage::Cpu(_) => Ok(fast),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => {
                let (expert, probs) = cuda::top1_logits_reference(logits)?;
                Routing::from_experts(expert, logits.shape()[1], Some(probs))
            }
        }
    }

    /// [`dispatch`](super::dispatch) with one thread per byte on CUDA.
    pub fn dispatch(x: &Tensor, routing: &Routing) -> Result<Tensor> {
        let fast = super::dispatch(x, routing)?; // validation
        match x.storage() {
            Storage::Cpu(_) => Ok(fast),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => cuda::move_rows_reference(x, routing, false),
        }
    }

    /// [`combine`](super::combine) with one thread per byte (unweighted) or per element
    /// (weighted) on CUDA.
    pub fn combine(grouped: &Tensor, routing: &Routing, weights: Option<&Tensor>) -> Result<Tensor> {
        let fast = super::combine(grouped, routing, weights)?; // validation
        match grouped.storage() {
            Storage::Cpu(_) => Ok(fast),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => cuda::combine_reference(grouped, routing, weights),
        }
    }

    /// [`lstsq`](super::lstsq) with the one-thread-per-entry normal-equation kernel and the
    /// one-thread-per-system Cholesky on CUDA.
    pub fn lstsq(x: &Tensor, y: &Tensor, ridge: f64) -> Result<Tensor> {
        match x.storage() {
            Storage::Cpu(_) => super::lstsq(x, y, ridge),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => {
                // Same validation as the fast path.
                let _ = super::lstsq(x, y, ridge)?;
                cuda::lstsq_reference(x, y, &super::batch_segments(x, "moe::reference::lstsq")?, ridge)
            }
        }
    }
}
