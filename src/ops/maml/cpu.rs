//! The CPU path: a per-task engine (forward, loss head, backward, and their R-operator
//! directional derivatives) and the public operations built on it, rayon-parallel over tasks.
//!
//! Every pass works on one task's samples as row-major [N, width] matrices. Workspaces are
//! allocated once per rayon work item, before any task runs, and reused by every task and every
//! inner step it handles: the inner loop allocates nothing.
//!
//! Products go through `real.rs` (register tiles for the small MAML shapes, the blocked GEMM for
//! large ones). The meta-gradient's per-task function is also compiled for AVX-512 and chosen at
//! run time, so that the whole inlined engine, not just its products, uses 16-wide vectors.

use rayon::prelude::*;

use super::real::{is_small, mm_nn, mm_nt, mm_tn, transpose, with_act, Act, Real};
use super::Dims;
use super::{Layout, Loss, Maml, MetaDims, MetaGradient, Order, TaskBatch};
use crate::testing::output_vec;
use crate::{Result, Tensor};

/// The targets of one task.
#[derive(Clone, Copy)]
pub(crate) enum Targets<'a, T> {
    /// [N, out] regression targets.
    Dense(&'a [T]),
    /// [N] class labels.
    Labels(&'a [u32]),
}

/// The buffers of one task's passes, for up to `rows` samples.
pub(crate) struct Workspace<T> {
    /// Pre-activations z_l [rows, fan_out(l)] of every layer.
    z: Vec<Vec<T>>,
    /// Activations σ(z_l) of the hidden layers.
    h: Vec<Vec<T>>,
    /// R{z_l}, R{h_l}: directional derivatives along the HVP direction.
    rz: Vec<Vec<T>>,
    rh: Vec<Vec<T>>,
    /// δ = dL/dz of the current layer and of the one below (ping-pong), with their R{}.
    delta: Vec<T>,
    delta_below: Vec<T>,
    rdelta: Vec<T>,
    rdelta_below: Vec<T>,
    /// dL/dh of the layer below, and its R{}.
    dh: Vec<T>,
    rdh: Vec<T>,
    /// W_lᵀ of the current pass, per layer, and room for one V_lᵀ (small-product path).
    wt: Vec<Vec<T>>,
    vt: Vec<T>,
}

impl<T: Real> Workspace<T> {
    pub fn new(layout: &Layout, rows: usize) -> Self {
        let per_layer = |hidden_only: bool| -> Vec<Vec<T>> {
            let count = if hidden_only { layout.layers() - 1 } else { layout.layers() };
            (0..count).map(|l| vec![T::ZERO; rows * layout.fan_out(l)]).collect()
        };
        let wide = rows * layout.max_width().max(layout.input());
        Workspace {
            z: per_layer(false),
            h: per_layer(true),
            rz: per_layer(false),
            rh: per_layer(true),
            delta: vec![T::ZERO; wide],
            delta_below: vec![T::ZERO; wide],
            rdelta: vec![T::ZERO; wide],
            rdelta_below: vec![T::ZERO; wide],
            dh: vec![T::ZERO; wide],
            rdh: vec![T::ZERO; wide],
            wt: (0..layout.layers()).map(|l| vec![T::ZERO; layout.fan_in(l) * layout.fan_out(l)]).collect(),
            vt: vec![
                T::ZERO;
                (0..layout.layers()).map(|l| layout.fan_in(l) * layout.fan_out(l)).max().unwrap_or(0)
            ],
        }
    }

    /// The network output of the last forward pass, [n, out].
    fn output(&self, layout: &Layout, n: usize) -> &[T] {
        &self.z[layout.layers() - 1][..n * layout.output()]
    }
}

// ------------------------------------------------------------------------------------------
// The per-task passes.

/// Forward pass of `n` samples `x` at parameters `p`; with `dir = Some(v)` also the R-forward
/// pass R{z_l}, R{h_l} along the parameter direction v.
#[inline(always)]
pub(crate) fn forward<T: Real>(
    layout: &Layout,
    p: &[T],
    dir: Option<&[T]>,
    x: &[T],
    n: usize,
    ws: &mut Workspace<T>,
) {
    let Workspace { z, h, rz, rh, wt, vt, .. } = ws;
    for l in 0..layout.layers() {
        let (fan_in, fan_out) = (layout.fan_in(l), layout.fan_out(l));
        let (w, b) = (&p[layout.weight(l)], &p[layout.bias(l)]);
        let input: &[T] = if l == 0 { &x[..n * fan_in] } else { &h[l - 1][..n * fan_in] };
        // Small products stream rows of Wᵀ (transposed once per pass and layer, reused by the
        // R-forward pass); large ones go to the blocked GEMM with a transposed view.
        let small = is_small(n, fan_out, fan_in);
        if small {
            transpose(w, fan_out, fan_in, &mut wt[l]);
        }
        let zl = &mut z[l][..n * fan_out];
        zl.chunks_exact_mut(fan_out).for_each(|row| row.copy_from_slice(b));
        if small {
            mm_nn(input, &wt[l], zl, n, fan_in, fan_out);
        } else {
            mm_nt(input, w, zl, n, fan_out, fan_in);
        }
        // R{z_l} = R{h_{l−1}} W_lᵀ + h_{l−1} V_lᵀ + c_l   (R{h_0} = R{x} = 0).
        if let Some(v) = dir {
            let rzl = &mut rz[l][..n * fan_out];
            rzl.chunks_exact_mut(fan_out).for_each(|row| row.copy_from_slice(&v[layout.bias(l)]));
            let vl = &v[layout.weight(l)];
            if small {
                let vt = &mut vt[..fan_in * fan_out];
                transpose(vl, fan_out, fan_in, vt);
                mm_nn(input, vt, rzl, n, fan_in, fan_out);
                if l > 0 {
                    mm_nn(&rh[l - 1][..n * fan_in], &wt[l], rzl, n, fan_in, fan_out);
                }
            } else {
                mm_nt(input, vl, rzl, n, fan_out, fan_in);
                if l > 0 {
                    mm_nt(&rh[l - 1][..n * fan_in], w, rzl, n, fan_out, fan_in);
                }
            }
        }
        if l + 1 < layout.layers() {
            let hl = &mut h[l][..n * fan_out];
            let zl = &z[l][..n * fan_out];
            match dir {
                None => with_act!(layout.activation, A => activate::<A, T>(zl, hl)),
                Some(_) => {
                    let (rzl, rhl) = (&rz[l][..n * fan_out], &mut rh[l][..n * fan_out]);
                    with_act!(layout.activation, A => activate_r::<A, T>(zl, hl, rzl, rhl))
                }
            }
        }
    }
}

#[inline(always)]
fn activate<A: Act, T: Real>(z: &[T], h: &mut [T]) {
    for (hi, &zi) in h.iter_mut().zip(z) {
        *hi = A::value(zi);
    }
}

/// h = σ(z) and R{h} = σ'(z)·R{z}.
#[inline(always)]
fn activate_r<A: Act, T: Real>(z: &[T], h: &mut [T], rz: &[T], rh: &mut [T]) {
    for (((hi, rhi), &zi), &rzi) in h.iter_mut().zip(rh.iter_mut()).zip(z).zip(rz) {
        let (value, d1) = A::value_and_d1(zi);
        *hi = value;
        *rhi = d1 * rzi;
    }
}

/// The loss of the last forward pass; writes δ_L = dL/dz_L into the workspace, and with
/// `r = true` also R{δ_L} = ∇²_z L · R{z_L}.
#[inline(always)]
pub(crate) fn loss_head<T: Real>(
    layout: &Layout,
    y: Targets<'_, T>,
    n: usize,
    ws: &mut Workspace<T>,
    r: bool,
) -> T {
    let out_w = layout.output();
    let last = layout.layers() - 1;
    let out = &ws.z[last][..n * out_w];
    let rout = &ws.rz[last][..n * out_w];
    let delta = &mut ws.delta[..n * out_w];
    let rdelta = &mut ws.rdelta[..n * out_w];
    match y {
        Targets::Dense(y) => {
            let scale = T::of(2.0 / (n * out_w) as f64);
            let mut sum = T::ZERO;
            for ((d, &o), &t) in delta.iter_mut().zip(out).zip(&y[..n * out_w]) {
                let e = o - t;
                sum += e * e;
                *d = scale * e;
            }
            if r {
                for (rd, &ro) in rdelta.iter_mut().zip(rout) {
                    *rd = scale * ro;
                }
            }
            sum * T::of(0.5) * scale
        }
        Targets::Labels(labels) => {
            let inv_n = T::of(1.0 / n as f64);
            let mut sum = T::ZERO;
            for s in 0..n {
                let row = s * out_w..(s + 1) * out_w;
                sum += softmax_row(&out[row.clone()], labels[s] as usize, &mut delta[row.clone()]);
                // delta holds p − onehot; R{δ} = p ⊙ (R z − p·R z) / n, p = δ + onehot.
                if r {
                    let (d, rz, rd) = (&delta[row.clone()], &rout[row.clone()], &mut rdelta[row]);
                    let label = labels[s] as usize;
                    let prob = |c: usize| if c == label { d[c] + T::ONE } else { d[c] };
                    let mut p_rz = T::ZERO;
                    for (c, &r) in rz.iter().enumerate() {
                        p_rz += prob(c) * r;
                    }
                    for (c, (out, &r)) in rd.iter_mut().zip(rz).enumerate() {
                        *out = inv_n * prob(c) * (r - p_rz);
                    }
                }
                delta[s * out_w..(s + 1) * out_w].iter_mut().for_each(|d| *d = *d * inv_n);
            }
            sum * inv_n
        }
    }
}

/// One sample's cross-entropy: returns logsumexp(z) − z[label] and writes softmax(z) − onehot.
#[inline(always)]
fn softmax_row<T: Real>(z: &[T], label: usize, grad: &mut [T]) -> T {
    let mut max = z[0];
    for &v in &z[1..] {
        max = max.max(v);
    }
    let mut total = T::ZERO;
    for (g, &v) in grad.iter_mut().zip(z) {
        *g = (v - max).exp();
        total += *g;
    }
    let inv = T::ONE / total;
    grad.iter_mut().for_each(|g| *g = *g * inv);
    grad[label] -= T::ONE;
    total.ln() + max - z[label]
}

/// Backward pass from δ_L in the workspace: writes the gradient into `grad` [P] when given;
/// with `dir = Some((v, hv))` also the R-backward pass, writing R{∇L} = H·v into `hv`. (An
/// HVP needs the δ chain of the plain backward pass but not the weight gradients, so it passes
/// no `grad` and saves one product per layer.)
#[inline(always)]
pub(crate) fn backward<T: Real>(
    layout: &Layout,
    p: &[T],
    dir: Option<(&[T], &mut [T])>,
    x: &[T],
    n: usize,
    ws: &mut Workspace<T>,
    mut grad: Option<&mut [T]>,
) {
    let Workspace { z, h, rz, rh, delta, delta_below, rdelta, rdelta_below, dh, rdh, .. } = ws;
    let (v, mut hv) = match dir {
        Some((v, hv)) => (Some(v), Some(hv)),
        None => (None, None),
    };
    for l in (0..layout.layers()).rev() {
        let (fan_in, fan_out) = (layout.fan_in(l), layout.fan_out(l));
        let input: &[T] = if l == 0 { &x[..n * fan_in] } else { &h[l - 1][..n * fan_in] };
        let d = &delta[..n * fan_out];
        // ∇W_l = δ_lᵀ h_{l−1},  ∇b_l = Σ_samples δ_l.
        if let Some(grad) = grad.as_deref_mut() {
            weight_and_bias_grad(layout, l, d, input, n, grad);
        }
        if let Some(hv) = hv.as_deref_mut() {
            // R{∇W_l} = R{δ_l}ᵀ h_{l−1} + δ_lᵀ R{h_{l−1}},  R{∇b_l} = Σ R{δ_l}.
            weight_and_bias_grad(layout, l, &rdelta[..n * fan_out], input, n, hv);
            if l > 0 {
                mm_tn(d, &rh[l - 1][..n * fan_in], &mut hv[layout.weight(l)], n, fan_out, fan_in);
            }
        }
        if l == 0 {
            break;
        }
        // dL/dh_{l−1} = δ_l W_l;  R{dL/dh_{l−1}} = R{δ_l} W_l + δ_l V_l.
        let w = &p[layout.weight(l)];
        let dhl = &mut dh[..n * fan_in];
        dhl.fill(T::ZERO);
        mm_nn(d, w, dhl, n, fan_out, fan_in);
        let (zb, hb) = (&z[l - 1][..n * fan_in], &h[l - 1][..n * fan_in]);
        match v {
            None => {
                let below = &mut delta_below[..n * fan_in];
                with_act!(layout.activation, A => act_backward::<A, T>(zb, hb, dhl, below));
            }
            Some(v) => {
                let rdhl = &mut rdh[..n * fan_in];
                rdhl.fill(T::ZERO);
                mm_nn(&rdelta[..n * fan_out], w, rdhl, n, fan_out, fan_in);
                mm_nn(d, &v[layout.weight(l)], rdhl, n, fan_out, fan_in);
                let bufs = ActBackR {
                    z: zb,
                    h: hb,
                    rz: &rz[l - 1][..n * fan_in],
                    dh: dhl,
                    rdh: rdhl,
                    delta: &mut delta_below[..n * fan_in],
                    rdelta: &mut rdelta_below[..n * fan_in],
                };
                with_act!(layout.activation, A => act_backward_r::<A, T>(bufs));
            }
        }
        std::mem::swap(delta, delta_below);
        std::mem::swap(rdelta, rdelta_below);
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
    delta: &'a mut [T],
    rdelta: &'a mut [T],
}

/// δ = dh ⊙ σ'(z) and R{δ} = R{dh} ⊙ σ'(z) + dh ⊙ σ''(z) ⊙ R{z}.
#[inline(always)]
fn act_backward_r<A: Act, T: Real>(b: ActBackR<'_, T>) {
    for i in 0..b.z.len() {
        let (d1, d2) = A::derivs_at(b.z[i], b.h[i]);
        b.delta[i] = b.dh[i] * d1;
        b.rdelta[i] = b.rdh[i] * d1 + b.dh[i] * d2 * b.rz[i];
    }
}

/// Loss and gradient of one task at `p`.
#[inline(always)]
pub(crate) fn task_grad<T: Real>(
    layout: &Layout,
    p: &[T],
    x: &[T],
    y: Targets<'_, T>,
    n: usize,
    ws: &mut Workspace<T>,
    grad: &mut [T],
) -> T {
    forward(layout, p, None, x, n, ws);
    let loss = loss_head(layout, y, n, ws, false);
    backward(layout, p, None, x, n, ws, Some(grad));
    loss
}

/// H·v of one task's loss at `p`; returns the loss.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn task_hvp<T: Real>(
    layout: &Layout,
    p: &[T],
    v: &[T],
    x: &[T],
    y: Targets<'_, T>,
    n: usize,
    ws: &mut Workspace<T>,
    hv: &mut [T],
) -> T {
    forward(layout, p, Some(v), x, n, ws);
    let loss = loss_head(layout, y, n, ws, true);
    backward(layout, p, Some((v, hv)), x, n, ws, None);
    loss
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
    let mut out = output_vec::<T>(dims.tasks * n * d_out);
    out.par_chunks_mut(n * d_out).enumerate().for_each_init(
        || Workspace::new(layout, n),
        |ws, (t, out_row)| {
            forward(layout, row(p, t, pn, dims.broadcast), None, &xs[t * n * d_in..], n, ws);
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
    let mut losses = output_vec::<T>(dims.tasks);
    let mut grads = output_vec::<T>(dims.tasks * pn);
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
    let mut out = output_vec::<T>(dims.tasks * pn);
    out.par_chunks_mut(pn).enumerate().for_each_init(
        || Workspace::new(layout, n),
        |ws, (t, hv)| {
            let (pt, vt) = (row(p, t, pn, dims.broadcast), row(vs, t, pn, v_broadcast));
            let yt = task_targets(ys, t, n, stride);
            task_hvp(layout, pt, vt, &xs[t * n * d_in..], yt, n, ws, hv);
        },
    );
    Ok(Tensor::from_host_vec(out, &[dims.tasks, pn]))
}

/// A task's meta-gradient workspace: the net buffers, the k inner iterates θ_0 … θ_{k−1}, the
/// adapted θ_k, and the reverse-pass vectors.
struct MetaWorkspace<T> {
    net: Workspace<T>,
    iterates: Vec<T>,
    adapted: Vec<T>,
    hv: Vec<T>,
    /// The current task's meta-gradient.
    g: Vec<T>,
}

/// One task's data views.
struct TaskData<'a, T> {
    xs: &'a [T],
    ys: Targets<'a, T>,
    xq: &'a [T],
    yq: Targets<'a, T>,
}

/// One task of MAML: writes the meta-gradient into `g` and the adapted parameters into
/// `adapted`; returns the query loss.
#[inline(always)]
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
    let MetaWorkspace { net, iterates, adapted, hv, .. } = ws;
    iterates[..pn].copy_from_slice(theta);
    // Inner loop: θ_{j+1} = θ_j − α ∇L_support(θ_j); the gradient lands in `hv` as scratch.
    for j in 0..k {
        let (done, next) = iterates.split_at_mut((j + 1) * pn);
        let current = &done[j * pn..];
        task_grad(layout, current, data.xs, data.ys, dims.support, net, hv);
        let target: &mut [T] = if j + 1 < k { &mut next[..pn] } else { adapted };
        for ((t, &c), &d) in target.iter_mut().zip(current).zip(hv.iter()) {
            *t = c - lr * d;
        }
    }
    let loss = task_grad(layout, adapted, data.xq, data.yq, dims.query, net, g);
    if maml.order == Order::Second {
        // g ← (I − α H_j) g for j = k−1 … 0.
        for j in (0..k).rev() {
            let theta_j = &iterates[j * pn..(j + 1) * pn];
            task_hvp(layout, theta_j, g, data.xs, data.ys, dims.support, net, hv);
            for (gi, &h) in g.iter_mut().zip(hv.iter()) {
                *gi -= lr * h;
            }
        }
    }
    loss
}

/// [`maml_task`] compiled for AVX-512 or AVX2+FMA when the CPU has them (the whole per-task
/// engine is inlined into one function, so its elementwise loops use wide vectors too), else
/// for the baseline target. (`avx512f` as a target feature needs Rust 1.89.)
fn maml_task_dispatch<T: Real>(
    layout: &Layout,
    maml: &Maml,
    dims: &MetaDims,
    theta: &[T],
    data: &TaskData<'_, T>,
    ws: &mut MetaWorkspace<T>,
    g: &mut [T],
) -> T {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            return unsafe { maml_task_avx512(layout, maml, dims, theta, data, ws, g) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { maml_task_avx2(layout, maml, dims, theta, data, ws, g) };
        }
    }
    maml_task(layout, maml, dims, theta, data, ws, g)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn maml_task_avx2<T: Real>(
    layout: &Layout,
    maml: &Maml,
    dims: &MetaDims,
    theta: &[T],
    data: &TaskData<'_, T>,
    ws: &mut MetaWorkspace<T>,
    g: &mut [T],
) -> T {
    maml_task(layout, maml, dims, theta, data, ws, g)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn maml_task_avx512<T: Real>(
    layout: &Layout,
    maml: &Maml,
    dims: &MetaDims,
    theta: &[T],
    data: &TaskData<'_, T>,
    ws: &mut MetaWorkspace<T>,
    g: &mut [T],
) -> T {
    maml_task(layout, maml, dims, theta, data, ws, g)
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
    let iterate_len = maml.inner_steps * pn;
    if Vec::<T>::new().try_reserve_exact(iterate_len).is_err() {
        return Err(crate::Error::invalid(
            OP,
            "inner_steps",
            format!("cannot allocate the {iterate_len} stored iterate values of a task"),
        ));
    }
    // Tasks run in fixed groups (independent of the thread count); each group sums its tasks'
    // meta-gradients in order, and the group sums are added in order: the result is
    // deterministic, and no [T, P] buffer is allocated per call unless θ_k is asked for.
    let groups = tasks.div_ceil(TASK_GROUP);
    let results: Vec<GroupResult<T>> = (0..groups)
        .into_par_iter()
        .map_init(
            || MetaWorkspace {
                net: Workspace::new(layout, rows),
                iterates: vec![T::ZERO; maml.inner_steps * pn],
                adapted: vec![T::ZERO; pn],
                hv: vec![T::ZERO; pn],
                g: vec![T::ZERO; pn],
            },
            |ws, group| {
                let members = group * TASK_GROUP..((group + 1) * TASK_GROUP).min(tasks);
                let mut out = GroupResult {
                    grad_sum: vec![T::ZERO; pn],
                    losses: Vec::with_capacity(members.len()),
                    adapted: Vec::with_capacity(if maml.return_adapted { members.len() * pn } else { 0 }),
                };
                let (ns, nq) = (dims.support, dims.query);
                for t in members {
                    let data = TaskData {
                        xs: &xs[t * ns * d_in..(t + 1) * ns * d_in],
                        ys: task_targets(ys, t, ns, stride),
                        xq: &xq[t * nq * d_in..(t + 1) * nq * d_in],
                        yq: task_targets(yq, t, nq, stride),
                    };
                    let mut g = std::mem::take(&mut ws.g);
                    out.losses.push(maml_task_dispatch(layout, maml, dims, theta, &data, ws, &mut g));
                    super::real::axpy(T::ONE, &g, &mut out.grad_sum);
                    ws.g = g;
                    if maml.return_adapted {
                        out.adapted.extend_from_slice(&ws.adapted);
                    }
                }
                out
            },
        )
        .collect();
    Ok(finish_meta(maml, tasks, pn, results))
}

/// Tasks per group of the CPU meta-gradient (see `meta_gradient`).
const TASK_GROUP: usize = 2;

/// What one group of tasks produces.
struct GroupResult<T> {
    grad_sum: Vec<T>,
    losses: Vec<T>,
    adapted: Vec<T>,
}

/// The mean over tasks (group sums added in group order) and the output tensors.
fn finish_meta<T: Real>(maml: &Maml, tasks: usize, pn: usize, results: Vec<GroupResult<T>>) -> MetaGradient {
    let mut sum = vec![T::ZERO; pn];
    let mut losses = Vec::with_capacity(tasks);
    let mut adapted = Vec::with_capacity(if maml.return_adapted { tasks * pn } else { 0 });
    for r in results {
        super::real::axpy(T::ONE, &r.grad_sum, &mut sum);
        losses.extend(r.losses);
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
