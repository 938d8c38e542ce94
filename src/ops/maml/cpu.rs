//! The CPU path: a per-task engine (forward, loss head, backward, and their R-operator
//! directional derivatives) and the public operations built on it, rayon-parallel over tasks.
//!
//! Every pass works on one task's samples as row-major [N, width] matrices. Workspaces are
//! allocated once per rayon work item (the meta-gradient gives each thread one contiguous run of
//! tasks), before any task runs, and reused by every task and every inner step it handles: the
//! inner loop allocates nothing of its own. (Layer products of 2¹⁸ multiply-adds or more go to
//! `matrixmultiply`, which mallocs its packing buffer on each call: one allocation per such
//! product, none at the sinusoid's sizes, whose products all take the allocation-free small
//! kernel of `real.rs`.)
//!
//! The plain passes leave a tape (activations, δ chain, W_lᵀ) in their [`Workspace`]; the
//! R-operator passes of an HVP at the same parameters read it. The meta-gradient keeps one tape
//! per inner step, so each reverse step H_j·g costs the R-passes only: 6 products per hidden
//! layer instead of 8.
//!
//! Products go through `real.rs` (register tiles for the small MAML shapes, the blocked GEMM for
//! large ones). The meta-gradient's per-task function is also compiled for AVX-512 and chosen at
//! run time, so that the whole inlined engine, not just its products, uses 16-wide vectors.

use rayon::prelude::*;

use super::real::{is_small, mm_nn, mm_nt, mm_tn, transpose, with_act, Act, Real};
use super::Dims;
use super::{Layout, Loss, Maml, MetaDims, MetaGradient, Order, TaskBatch};
use crate::cpu::multiversion;
use crate::cpu::output_vec;
use crate::{Result, Tensor};

/// The targets of one task.
#[derive(Clone, Copy)]
pub(crate) enum Targets<'a, T> {
    /// [N, out] regression targets.
    Dense(&'a [T]),
    /// [N] class labels.
    Labels(&'a [u32]),
}

/// The tape of one task's plain passes at one parameter vector, for up to `rows` samples: what
/// the forward and backward passes leave behind. The R-operator passes of an HVP at the same
/// parameters read it instead of recomputing it, so the meta-gradient keeps one tape per inner
/// iterate and its reverse HVP steps skip the plain forward pass and the plain δ chain.
pub(crate) struct Workspace<T> {
    /// Pre-activations z_l [rows, fan_out(l)] of every layer.
    z: Vec<Vec<T>>,
    /// Activations h_l = σ(z_l) of the hidden layers.
    h: Vec<Vec<T>>,
    /// δ_l = dL/dz_l of every layer.
    delta: Vec<Vec<T>>,
    /// dL/dh_l of the hidden layers (the R-backward pass needs it for the σ'' term).
    dh: Vec<Vec<T>>,
    /// W_lᵀ of the last forward pass, per layer (read by the small-product path only).
    wt: Vec<Vec<T>>,
}

/// The buffers of the R-operator passes (directional derivatives along the HVP direction v).
#[derive(Default)]
pub(crate) struct RWorkspace<T> {
    /// R{z_l} of every layer, R{h_l} of the hidden layers.
    rz: Vec<Vec<T>>,
    rh: Vec<Vec<T>>,
    /// R{δ_l} of every layer.
    rdelta: Vec<Vec<T>>,
    /// R{dL/dh} of the layer below the current one.
    rdh: Vec<T>,
    /// Room for one V_lᵀ (small-product path).
    vt: Vec<T>,
}

/// One buffer of `rows · fan_out(l)` values per layer (or per hidden layer).
fn per_layer<T: Real>(layout: &Layout, rows: usize, hidden_only: bool) -> Vec<Vec<T>> {
    let count = if hidden_only { layout.layers() - 1 } else { layout.layers() };
    (0..count).map(|l| vec![T::ZERO; rows * layout.fan_out(l)]).collect()
}

impl<T: Real> Workspace<T> {
    pub fn new(layout: &Layout, rows: usize) -> Self {
        Workspace {
            z: per_layer(layout, rows, false),
            h: per_layer(layout, rows, true),
            delta: per_layer(layout, rows, false),
            dh: per_layer(layout, rows, true),
            wt: (0..layout.layers()).map(|l| vec![T::ZERO; layout.fan_in(l) * layout.fan_out(l)]).collect(),
        }
    }

    /// The number of values one workspace holds (for the meta-gradient's allocation check).
    fn len(layout: &Layout, rows: usize) -> usize {
        let widths: usize = layout.sizes[1..].iter().sum();
        let hidden = widths - layout.output();
        rows * (2 * widths + 2 * hidden) + layout.num_params
    }

    /// The network output of the last forward pass, [n, out].
    fn output(&self, layout: &Layout, n: usize) -> &[T] {
        &self.z[layout.layers() - 1][..n * layout.output()]
    }
}

impl<T: Real> RWorkspace<T> {
    pub fn new(layout: &Layout, rows: usize) -> Self {
        let largest_weight = (0..layout.layers()).map(|l| layout.fan_in(l) * layout.fan_out(l)).max();
        RWorkspace {
            rz: per_layer(layout, rows, false),
            rh: per_layer(layout, rows, true),
            rdelta: per_layer(layout, rows, false),
            rdh: vec![T::ZERO; rows * layout.max_width()],
            vt: vec![T::ZERO; largest_weight.unwrap_or(0)],
        }
    }
}

// ------------------------------------------------------------------------------------------
// The per-task passes.

/// The input of layer l: x for the first layer, else h_{l−1}.
#[inline(always)]
fn layer_input<'a, T>(layout: &Layout, l: usize, x: &'a [T], h: &'a [Vec<T>], n: usize) -> &'a [T] {
    let len = n * layout.fan_in(l);
    if l == 0 {
        &x[..len]
    } else {
        &h[l - 1][..len]
    }
}

/// Rows of `out` [n, width] all set to `bias` (products then accumulate onto them).
#[inline(always)]
fn fill_rows<T: Real>(out: &mut [T], bias: &[T]) {
    out.chunks_exact_mut(bias.len()).for_each(|row| row.copy_from_slice(bias));
}

/// Forward pass of `n` samples `x` at parameters `p`: z_l, h_l, and W_lᵀ for the small layers.
#[inline(always)]
pub(crate) fn forward<T: Real>(layout: &Layout, p: &[T], x: &[T], n: usize, ws: &mut Workspace<T>) {
    let Workspace { z, h, wt, .. } = ws;
    for l in 0..layout.layers() {
        let (fan_in, fan_out) = (layout.fan_in(l), layout.fan_out(l));
        let w = &p[layout.weight(l)];
        let input = layer_input(layout, l, x, h, n);
        let zl = &mut z[l][..n * fan_out];
        fill_rows(zl, &p[layout.bias(l)]);
        // Small products stream rows of Wᵀ (transposed once here, and reused by every
        // R-forward pass at these parameters); large ones go to the blocked GEMM.
        if is_small(n, fan_out, fan_in) {
            transpose(w, fan_out, fan_in, &mut wt[l]);
            mm_nn(input, &wt[l], zl, n, fan_in, fan_out);
        } else {
            mm_nt(input, w, zl, n, fan_out, fan_in);
        }
        if l + 1 < layout.layers() {
            with_act!(layout.activation, A => activate::<A, T>(zl, &mut h[l][..n * fan_out]));
        }
    }
}

/// R-forward pass along the parameter direction v, at the parameters `p` of the forward pass
/// whose tape `ws` holds: R{z_l} = R{h_{l−1}} W_lᵀ + h_{l−1} V_lᵀ + c_l (R{h_0} = R{x} = 0) and
/// R{h_l} = σ'(z_l) R{z_l}.
#[inline(always)]
fn forward_r<T: Real>(
    layout: &Layout,
    p: &[T],
    v: &[T],
    x: &[T],
    n: usize,
    ws: &Workspace<T>,
    r: &mut RWorkspace<T>,
) {
    let RWorkspace { rz, rh, vt, .. } = r;
    for l in 0..layout.layers() {
        let (fan_in, fan_out) = (layout.fan_in(l), layout.fan_out(l));
        let input = layer_input(layout, l, x, &ws.h, n);
        let vl = &v[layout.weight(l)];
        let hidden = rh.len();
        let (rh_below, rh_rest) = rh.split_at_mut(l.min(hidden));
        let rzl = &mut rz[l][..n * fan_out];
        fill_rows(rzl, &v[layout.bias(l)]);
        if is_small(n, fan_out, fan_in) {
            let vt = &mut vt[..fan_in * fan_out];
            transpose(vl, fan_out, fan_in, vt);
            mm_nn(input, vt, rzl, n, fan_in, fan_out);
            if l > 0 {
                mm_nn(&rh_below[l - 1][..n * fan_in], &ws.wt[l], rzl, n, fan_in, fan_out);
            }
        } else {
            mm_nt(input, vl, rzl, n, fan_out, fan_in);
            if l > 0 {
                mm_nt(&rh_below[l - 1][..n * fan_in], &p[layout.weight(l)], rzl, n, fan_out, fan_in);
            }
        }
        if l + 1 < layout.layers() {
            let (zl, hl) = (&ws.z[l][..n * fan_out], &ws.h[l][..n * fan_out]);
            let rhl = &mut rh_rest[0][..n * fan_out];
            with_act!(layout.activation, A => activate_r::<A, T>(zl, hl, rzl, rhl));
        }
    }
}

#[inline(always)]
fn activate<A: Act, T: Real>(z: &[T], h: &mut [T]) {
    for (hi, &zi) in h.iter_mut().zip(z) {
        *hi = A::value(zi);
    }
}

/// R{h} = σ'(z)·R{z}, with h = σ(z) at hand.
#[inline(always)]
fn activate_r<A: Act, T: Real>(z: &[T], h: &[T], rz: &[T], rh: &mut [T]) {
    for (((rhi, &zi), &hi), &rzi) in rh.iter_mut().zip(z).zip(h).zip(rz) {
        *rhi = A::d1_at(zi, hi) * rzi;
    }
}

/// The loss of the last forward pass; writes δ_L = dL/dz_L into the tape.
#[inline(always)]
pub(crate) fn loss_head<T: Real>(layout: &Layout, y: Targets<'_, T>, n: usize, ws: &mut Workspace<T>) -> T {
    let out_w = layout.output();
    let last = layout.layers() - 1;
    let out = &ws.z[last][..n * out_w];
    let delta = &mut ws.delta[last][..n * out_w];
    match y {
        Targets::Dense(y) => {
            let scale = T::of(2.0 / (n * out_w) as f64);
            let mut sum = T::ZERO;
            for ((d, &o), &t) in delta.iter_mut().zip(out).zip(&y[..n * out_w]) {
                let e = o - t;
                sum += e * e;
                *d = scale * e;
            }
            sum * T::of(0.5) * scale
        }
        Targets::Labels(labels) => {
            let inv_n = T::of(1.0 / n as f64);
            let mut sum = T::ZERO;
            for (s, (z, d)) in out.chunks_exact(out_w).zip(delta.chunks_exact_mut(out_w)).enumerate() {
                let label = labels[s] as usize;
                sum += softmax_row(z, d);
                sum -= z[label];
                d[label] -= T::ONE;
                d.iter_mut().for_each(|v| *v = *v * inv_n);
            }
            sum * inv_n
        }
    }
}

/// R{δ_L} = ∇²_z L · R{z_L} for the forward pass whose tape `ws` holds.
#[inline(always)]
fn loss_head_r<T: Real>(
    layout: &Layout,
    y: Targets<'_, T>,
    n: usize,
    ws: &Workspace<T>,
    r: &mut RWorkspace<T>,
) {
    let out_w = layout.output();
    let last = layout.layers() - 1;
    let rout = &r.rz[last][..n * out_w];
    let rdelta = &mut r.rdelta[last][..n * out_w];
    match y {
        Targets::Dense(_) => {
            let scale = T::of(2.0 / (n * out_w) as f64);
            for (rd, &ro) in rdelta.iter_mut().zip(rout) {
                *rd = scale * ro;
            }
        }
        Targets::Labels(_) => {
            // R{δ} = p ⊙ (R z − p·R z) / n with p = softmax(z), recomputed from the tape.
            let inv_n = T::of(1.0 / n as f64);
            let out = &ws.z[last][..n * out_w];
            for ((z, rz), rd) in
                out.chunks_exact(out_w).zip(rout.chunks_exact(out_w)).zip(rdelta.chunks_exact_mut(out_w))
            {
                softmax_row(z, rd);
                let mut p_rz = T::ZERO;
                for (&p, &r) in rd.iter().zip(rz) {
                    p_rz += p * r;
                }
                for (p, &r) in rd.iter_mut().zip(rz) {
                    *p = inv_n * *p * (r - p_rz);
                }
            }
        }
    }
}

/// Writes softmax(z) into `p`; returns logsumexp(z).
#[inline(always)]
fn softmax_row<T: Real>(z: &[T], p: &mut [T]) -> T {
    let mut max = z[0];
    for &v in &z[1..] {
        max = max.max(v);
    }
    let mut total = T::ZERO;
    for (g, &v) in p.iter_mut().zip(z) {
        *g = (v - max).exp();
        total += *g;
    }
    let inv = T::ONE / total;
    p.iter_mut().for_each(|g| *g = *g * inv);
    total.ln() + max
}

/// Backward pass from δ_L in the tape: the δ_l and dL/dh_l of every layer, and the gradient
/// into `grad` [P] when given (an HVP needs the δ chain but not the weight gradients).
#[inline(always)]
pub(crate) fn backward<T: Real>(
    layout: &Layout,
    p: &[T],
    x: &[T],
    n: usize,
    ws: &mut Workspace<T>,
    mut grad: Option<&mut [T]>,
) {
    let Workspace { z, h, delta, dh, .. } = ws;
    for l in (0..layout.layers()).rev() {
        let (fan_in, fan_out) = (layout.fan_in(l), layout.fan_out(l));
        let (delta_below, delta_rest) = delta.split_at_mut(l);
        let d = &delta_rest[0][..n * fan_out];
        // ∇W_l = δ_lᵀ h_{l−1},  ∇b_l = Σ_samples δ_l.
        if let Some(grad) = grad.as_deref_mut() {
            weight_and_bias_grad(layout, l, d, layer_input(layout, l, x, h, n), n, grad);
        }
        if l == 0 {
            break;
        }
        // dL/dh_{l−1} = δ_l W_l,  δ_{l−1} = dL/dh_{l−1} ⊙ σ'(z_{l−1}).
        let dhl = &mut dh[l - 1][..n * fan_in];
        dhl.fill(T::ZERO);
        mm_nn(d, &p[layout.weight(l)], dhl, n, fan_out, fan_in);
        let (zb, hb) = (&z[l - 1][..n * fan_in], &h[l - 1][..n * fan_in]);
        let below = &mut delta_below[l - 1][..n * fan_in];
        with_act!(layout.activation, A => act_backward::<A, T>(zb, hb, dhl, below));
    }
}

/// R-backward pass from R{δ_L}, writing R{∇L} = H·v into `hv`:
/// R{∇W_l} = R{δ_l}ᵀ h_{l−1} + δ_lᵀ R{h_{l−1}},  R{∇b_l} = Σ R{δ_l},
/// R{dL/dh_{l−1}} = R{δ_l} W_l + δ_l V_l,  R{δ_{l−1}} = R{dL/dh} ⊙ σ' + dL/dh ⊙ σ'' ⊙ R{z}.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_r<T: Real>(
    layout: &Layout,
    p: &[T],
    v: &[T],
    x: &[T],
    n: usize,
    ws: &Workspace<T>,
    r: &mut RWorkspace<T>,
    hv: &mut [T],
) {
    let RWorkspace { rz, rh, rdelta, rdh, .. } = r;
    for l in (0..layout.layers()).rev() {
        let (fan_in, fan_out) = (layout.fan_in(l), layout.fan_out(l));
        let input = layer_input(layout, l, x, &ws.h, n);
        let d = &ws.delta[l][..n * fan_out];
        let (rdelta_below, rdelta_rest) = rdelta.split_at_mut(l);
        let rd = &rdelta_rest[0][..n * fan_out];
        weight_and_bias_grad(layout, l, rd, input, n, hv);
        if l == 0 {
            break;
        }
        mm_tn(d, &rh[l - 1][..n * fan_in], &mut hv[layout.weight(l)], n, fan_out, fan_in);
        let rdhl = &mut rdh[..n * fan_in];
        rdhl.fill(T::ZERO);
        mm_nn(rd, &p[layout.weight(l)], rdhl, n, fan_out, fan_in);
        mm_nn(d, &v[layout.weight(l)], rdhl, n, fan_out, fan_in);
        let bufs = ActBackR {
            z: &ws.z[l - 1][..n * fan_in],
            h: &ws.h[l - 1][..n * fan_in],
            rz: &rz[l - 1][..n * fan_in],
            dh: &ws.dh[l - 1][..n * fan_in],
            rdh: rdhl,
            rdelta: &mut rdelta_below[l - 1][..n * fan_in],
        };
        with_act!(layout.activation, A => act_backward_r::<A, T>(bufs));
    }
}

/// Overwrites the W_l and b_l slots of `g` with δᵀ·input and the column sums of δ.
#[inline(always)]
fn weight_and_bias_grad<T: Real>(layout: &Layout, l: usize, d: &[T], input: &[T], n: usize, g: &mut [T]) {
    let (fan_in, fan_out) = (layout.fan_in(l), layout.fan_out(l));
    let gw = &mut g[layout.weight(l)];
    gw.fill(T::ZERO);
    mm_tn(d, input, gw, n, fan_out, fan_in);
    let gb = &mut g[layout.bias(l)];
    gb.fill(T::ZERO);
    for row in d.chunks_exact(fan_out) {
        super::real::axpy(T::ONE, row, gb);
    }
}

/// δ_{l−1} = dL/dh_{l−1} ⊙ σ'(z_{l−1}), with h_{l−1} = σ(z_{l−1}) at hand.
#[inline(always)]
fn act_backward<A: Act, T: Real>(z: &[T], h: &[T], dh: &[T], delta: &mut [T]) {
    for (((d, &zi), &hi), &g) in delta.iter_mut().zip(z).zip(h).zip(dh) {
        *d = g * A::d1_at(zi, hi);
    }
}

struct ActBackR<'a, T> {
    z: &'a [T],
    h: &'a [T],
    rz: &'a [T],
    dh: &'a [T],
    rdh: &'a [T],
    rdelta: &'a mut [T],
}

/// R{δ} = R{dh} ⊙ σ'(z) + dh ⊙ σ''(z) ⊙ R{z}.
#[inline(always)]
fn act_backward_r<A: Act, T: Real>(b: ActBackR<'_, T>) {
    let len = b.rdelta.len();
    let (z, h, rz, dh, rdh) = (&b.z[..len], &b.h[..len], &b.rz[..len], &b.dh[..len], &b.rdh[..len]);
    for (i, out) in b.rdelta.iter_mut().enumerate() {
        let (d1, d2) = A::derivs_at(z[i], h[i]);
        *out = rdh[i] * d1 + dh[i] * d2 * rz[i];
    }
}

multiversion! {
    /// Loss and gradient of one task at `p`; leaves the tape of both passes in `ws`. In the
    /// CPU's widest vectors (also when called from `maml_task`: one dispatch per pass).
    pub(crate) fn task_grad<T: Real>(
        layout: &Layout,
        p: &[T],
        x: &[T],
        y: Targets<'_, T>,
        n: usize,
        ws: &mut Workspace<T>,
        grad: &mut [T],
    ) -> T {
        forward(layout, p, x, n, ws);
        let loss = loss_head(layout, y, n, ws);
        backward(layout, p, x, n, ws, Some(grad));
        loss
    }
}

/// H·v of one task's loss at `p`, given the tape `ws` of the plain passes at `p` on the same
/// samples (from [`task_grad`], or from `forward` + `loss_head` + `backward`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn task_hvp_on_tape<T: Real>(
    layout: &Layout,
    p: &[T],
    v: &[T],
    x: &[T],
    y: Targets<'_, T>,
    n: usize,
    ws: &Workspace<T>,
    r: &mut RWorkspace<T>,
    hv: &mut [T],
) {
    forward_r(layout, p, v, x, n, ws, r);
    loss_head_r(layout, y, n, ws, r);
    backward_r(layout, p, v, x, n, ws, r, hv);
}

multiversion! {
    /// [`forward`] in the CPU's widest vectors.
    fn forward_wide<T: Real>(layout: &Layout, p: &[T], x: &[T], n: usize, ws: &mut Workspace<T>) {
        forward(layout, p, x, n, ws)
    }
}

multiversion! {
    /// H·v of one task's loss at `p` (the plain passes, then the R-passes), in the CPU's widest
    /// vectors.
    #[allow(clippy::too_many_arguments)]
    fn task_hvp<T: Real>(
        layout: &Layout,
        p: &[T],
        v: &[T],
        x: &[T],
        y: Targets<'_, T>,
        n: usize,
        ws: &mut Workspace<T>,
        r: &mut RWorkspace<T>,
        hv: &mut [T],
    ) {
        forward(layout, p, x, n, ws);
        loss_head(layout, y, n, ws);
        backward(layout, p, x, n, ws, None);
        task_hvp_on_tape(layout, p, v, x, y, n, ws, r, hv);
    }
}

// ------------------------------------------------------------------------------------------
// The public operations.

/// Row t of a [T, P] tensor's data, or the one row of a broadcast [P].
fn row<T>(data: &[T], t: usize, width: usize, broadcast: bool) -> &[T] {
    let t = if broadcast { 0 } else { t };
    &data[t * width..(t + 1) * width]
}

fn targets<'a, T: Real>(layout: &Layout, y: &'a Tensor, op: &'static str) -> Result<(Targets<'a, T>, usize)> {
    Ok(match layout.loss {
        Loss::Mse => (Targets::Dense(y.host_slice::<T>(op)?), layout.output()),
        Loss::SoftmaxCrossEntropy => (Targets::Labels(y.host_slice::<u32>(op)?), 1),
    })
}

/// The per-task slice of targets with `stride` values per sample.
fn task_targets<'a, T>(y: Targets<'a, T>, t: usize, n: usize, stride: usize) -> Targets<'a, T> {
    match y {
        Targets::Dense(v) => Targets::Dense(&v[t * n * stride..(t + 1) * n * stride]),
        Targets::Labels(v) => Targets::Labels(&v[t * n..(t + 1) * n]),
    }
}

pub(super) fn forward_op<T: Real>(
    layout: &Layout,
    dims: &Dims,
    params: &Tensor,
    x: &Tensor,
) -> Result<Tensor> {
    const OP: &str = "Mlp::forward";
    let (p, xs) = (params.host_slice::<T>(OP)?, x.host_slice::<T>(OP)?);
    let (n, pn, d_in, d_out) = (dims.samples, layout.num_params, layout.input(), layout.output());
    let mut out = output_vec::<T>(dims.tasks * n * d_out)?;
    out.par_chunks_mut(n * d_out).enumerate().for_each_init(
        || Workspace::new(layout, n),
        |ws, (t, out_row)| {
            forward_wide(layout, row(p, t, pn, dims.broadcast), &xs[t * n * d_in..], n, ws);
            out_row.copy_from_slice(ws.output(layout, n));
        },
    );
    Ok(Tensor::from_host_vec(out, &[dims.tasks, n, d_out]))
}

pub(super) fn loss_and_grad<T: Real>(
    layout: &Layout,
    dims: &Dims,
    params: &Tensor,
    x: &Tensor,
    y: &Tensor,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "Mlp::loss_and_grad";
    let (p, xs) = (params.host_slice::<T>(OP)?, x.host_slice::<T>(OP)?);
    let (ys, stride) = targets::<T>(layout, y, OP)?;
    let (n, pn, d_in) = (dims.samples, layout.num_params, layout.input());
    let mut losses = output_vec::<T>(dims.tasks)?;
    let mut grads = output_vec::<T>(dims.tasks * pn)?;
    grads.par_chunks_mut(pn).zip(losses.par_iter_mut()).enumerate().for_each_init(
        || Workspace::new(layout, n),
        |ws, (t, (g, loss))| {
            let (pt, xt) = (row(p, t, pn, dims.broadcast), &xs[t * n * d_in..]);
            *loss = task_grad(layout, pt, xt, task_targets(ys, t, n, stride), n, ws, g);
        },
    );
    Ok((Tensor::from_host_vec(losses, &[dims.tasks]), Tensor::from_host_vec(grads, &[dims.tasks, pn])))
}

pub(super) fn hvp<T: Real>(
    layout: &Layout,
    dims: &Dims,
    params: &Tensor,
    x: &Tensor,
    y: &Tensor,
    v: &Tensor,
) -> Result<Tensor> {
    const OP: &str = "Mlp::hvp";
    let (p, xs, vs) = (params.host_slice::<T>(OP)?, x.host_slice::<T>(OP)?, v.host_slice::<T>(OP)?);
    let v_broadcast = v.rank() == 1;
    let (ys, stride) = targets::<T>(layout, y, OP)?;
    let (n, pn, d_in) = (dims.samples, layout.num_params, layout.input());
    let mut out = output_vec::<T>(dims.tasks * pn)?;
    out.par_chunks_mut(pn).enumerate().for_each_init(
        || (Workspace::new(layout, n), RWorkspace::new(layout, n)),
        |(ws, r), (t, hv)| {
            let (pt, vt) = (row(p, t, pn, dims.broadcast), row(vs, t, pn, v_broadcast));
            let (xt, yt) = (&xs[t * n * d_in..], task_targets(ys, t, n, stride));
            task_hvp(layout, pt, vt, xt, yt, n, ws, r, hv);
        },
    );
    Ok(Tensor::from_host_vec(out, &[dims.tasks, pn]))
}

/// A task's meta-gradient workspace: the k inner iterates θ_0 … θ_{k−1} with the tapes of their
/// support passes (tape k is the query pass's), the R-pass buffers, the adapted θ_k, and the
/// reverse-pass vectors.
#[derive(Default)]
struct MetaWorkspace<T> {
    /// What the buffers were sized for: layer widths, sample rows, support rows, steps k.
    shape: (Vec<usize>, usize, usize, usize),
    tapes: Vec<Workspace<T>>,
    r: RWorkspace<T>,
    iterates: Vec<T>,
    adapted: Vec<T>,
    hv: Vec<T>,
}

impl<T: Real> MetaWorkspace<T> {
    fn new(layout: &Layout, rows: usize, support: usize, steps: usize) -> Self {
        let pn = layout.num_params;
        MetaWorkspace {
            shape: (layout.sizes.clone(), rows, support, steps),
            tapes: (0..=steps).map(|_| Workspace::new(layout, rows)).collect(),
            r: RWorkspace::new(layout, support),
            iterates: vec![T::ZERO; steps * pn],
            adapted: vec![T::ZERO; pn],
            hv: vec![T::ZERO; pn],
        }
    }
}

thread_local! {
    /// The meta-gradient workspace this thread used last, kept for the next call of the same
    /// shape: a training loop then allocates no workspace and touches no fresh pages per call.
    static CACHED_WORKSPACE: std::cell::RefCell<Option<Box<dyn std::any::Any>>> =
        const { std::cell::RefCell::new(None) };
}

/// Workspaces of at most this many bytes are kept between calls (larger ones are freed).
const CACHE_MAX_BYTES: usize = 4 << 20;

/// A meta-gradient workspace on loan from this thread's cache (or new); returned to the cache
/// of the thread that drops it.
struct CachedWorkspace<T: Real> {
    ws: MetaWorkspace<T>,
    bytes: usize,
}

impl<T: Real> CachedWorkspace<T> {
    fn take(layout: &Layout, rows: usize, support: usize, steps: usize, bytes: usize) -> Self {
        let shape = (layout.sizes.clone(), rows, support, steps);
        let cached = CACHED_WORKSPACE
            .with(|c| c.borrow_mut().take())
            .and_then(|b| b.downcast::<MetaWorkspace<T>>().ok())
            .filter(|ws| ws.shape == shape);
        let ws = match cached {
            Some(ws) => *ws,
            None => MetaWorkspace::new(layout, rows, support, steps),
        };
        CachedWorkspace { ws, bytes }
    }
}

impl<T: Real> Drop for CachedWorkspace<T> {
    fn drop(&mut self) {
        if self.bytes <= CACHE_MAX_BYTES {
            let ws = std::mem::take(&mut self.ws);
            // A thread being torn down has no cache left: the workspace is just freed then.
            let _ = CACHED_WORKSPACE.try_with(|c| *c.borrow_mut() = Some(Box::new(ws)));
        }
    }
}

/// One task's data views.
struct TaskData<'a, T> {
    xs: &'a [T],
    ys: Targets<'a, T>,
    xq: &'a [T],
    yq: Targets<'a, T>,
}

multiversion! {
    /// One task of MAML: writes the meta-gradient into `g` and the adapted parameters into
    /// `adapted`; returns the query loss. The whole per-task engine is inlined into it, so its
    /// elementwise loops take the CPU's widest vectors.
    fn maml_task<T: Real>(
        layout: &Layout,
        maml: &Maml,
        dims: &MetaDims,
        theta: &[T],
        data: &TaskData<'_, T>,
        ws: &mut MetaWorkspace<T>,
        g: &mut [T],
    ) -> T {
        let (pn, k) = (layout.num_params, maml.inner_steps);
        let lr = T::of(maml.inner_lr);
        let MetaWorkspace { tapes, r, iterates, adapted, hv, .. } = ws;
        iterates[..pn].copy_from_slice(theta);
        // Inner loop: θ_{j+1} = θ_j − α ∇L_support(θ_j); the gradient lands in `hv` as scratch.
        for j in 0..k {
            let (done, next) = iterates.split_at_mut((j + 1) * pn);
            let current = &done[j * pn..];
            task_grad(layout, current, data.xs, data.ys, dims.support, &mut tapes[j], hv);
            let target: &mut [T] = if j + 1 < k { &mut next[..pn] } else { adapted };
            for ((t, &c), &d) in target.iter_mut().zip(current).zip(hv.iter()) {
                *t = c - lr * d;
            }
        }
        let loss = task_grad(layout, adapted, data.xq, data.yq, dims.query, &mut tapes[k], g);
        if maml.order == Order::Second {
            // g ← (I − α H_j) g for j = k−1 … 0.
            for j in (0..k).rev() {
                let theta_j = &iterates[j * pn..(j + 1) * pn];
                let tape = &tapes[j];
                task_hvp_on_tape(layout, theta_j, g, data.xs, data.ys, dims.support, tape, r, hv);
                for (gi, &h) in g.iter_mut().zip(hv.iter()) {
                    *gi -= lr * h;
                }
            }
        }
        loss
    }
}

pub(super) fn meta_gradient<T: Real>(
    layout: &Layout,
    maml: &Maml,
    dims: &MetaDims,
    params: &Tensor,
    batch: &TaskBatch,
) -> Result<MetaGradient> {
    const OP: &str = "Maml::meta_gradient";
    let theta = params.host_slice::<T>(OP)?;
    let (xs, xq) = (batch.support_x.host_slice::<T>(OP)?, batch.query_x.host_slice::<T>(OP)?);
    let (ys, stride) = targets::<T>(layout, &batch.support_y, OP)?;
    let (yq, _) = targets::<T>(layout, &batch.query_y, OP)?;
    let (pn, d_in, tasks) = (layout.num_params, layout.input(), dims.tasks);
    let rows = dims.support.max(dims.query);
    // Fail with an error, not an abort, when the iterates of a task cannot be allocated.
    // Per task: k iterates of P values and k + 1 tapes (saturating: absurd k must fail here).
    let tape_len = Workspace::<T>::len(layout, rows);
    let iterate_len = pn.saturating_add(tape_len).saturating_mul(maml.inner_steps).saturating_add(tape_len);
    let workspace_bytes = iterate_len.saturating_mul(size_of::<T>());
    if Vec::<T>::new().try_reserve_exact(iterate_len).is_err() {
        return Err(crate::Error::invalid(
            OP,
            "inner_steps",
            format!("cannot allocate the {iterate_len} stored iterate and tape values of a task"),
        ));
    }
    // One result per task, summed in task order at the end: the meta-gradient does not depend
    // on the thread count. Tasks all cost the same, so each thread takes one contiguous run of
    // them and builds its workspace once. (Rayon halves ranges while both halves keep at least
    // `with_min_len` items, so the floor here gives each of the threads one run.)
    let per_thread = (tasks / rayon::current_num_threads().max(1)).max(1);
    let (ns, nq) = (dims.support, dims.query);
    let results: Vec<TaskResult<T>> = (0..tasks)
        .into_par_iter()
        .with_min_len(per_thread)
        .map_init(
            || CachedWorkspace::<T>::take(layout, rows, ns, maml.inner_steps, workspace_bytes),
            |cached, t| {
                let ws = &mut cached.ws;
                let data = TaskData {
                    xs: &xs[t * ns * d_in..(t + 1) * ns * d_in],
                    ys: task_targets(ys, t, ns, stride),
                    xq: &xq[t * nq * d_in..(t + 1) * nq * d_in],
                    yq: task_targets(yq, t, nq, stride),
                };
                let mut grad = vec![T::ZERO; pn];
                let loss = maml_task(layout, maml, dims, theta, &data, ws, &mut grad);
                let adapted = if maml.return_adapted { ws.adapted.clone() } else { Vec::new() };
                TaskResult { grad, loss, adapted }
            },
        )
        .collect();
    Ok(finish_meta(maml, tasks, pn, results))
}

/// What one task produces: its meta-gradient, query loss, and θ_k when asked for.
struct TaskResult<T> {
    grad: Vec<T>,
    loss: T,
    adapted: Vec<T>,
}

/// The mean over tasks (summed in task order) and the output tensors.
fn finish_meta<T: Real>(maml: &Maml, tasks: usize, pn: usize, results: Vec<TaskResult<T>>) -> MetaGradient {
    let mut sum = vec![T::ZERO; pn];
    let mut losses = Vec::with_capacity(tasks);
    let mut adapted = Vec::with_capacity(if maml.return_adapted { tasks * pn } else { 0 });
    for r in results {
        super::real::axpy(T::ONE, &r.grad, &mut sum);
        losses.push(r.loss);
        adapted.extend(r.adapted);
    }
    let inv = T::of(1.0 / tasks as f64);
    sum.iter_mut().for_each(|v| *v = *v * inv);
    let loss = losses.iter().map(|l| l.to_f64()).sum::<f64>() / tasks as f64;
    MetaGradient {
        loss,
        grad: Tensor::from_host_vec(sum, &[pn]),
        per_task_loss: Tensor::from_host_vec(losses, &[tasks]),
        adapted: maml.return_adapted.then(|| Tensor::from_host_vec(adapted, &[tasks, pn])),
    }
}
