//! CPU momentum attention: tiled online-softmax attention (FlashAttention's algorithm), with the
//! tile products on `crate::cpu::sgemm` and the momentum term as a scan fused into the same
//! task. Memory stays linear in T: the largest temporary is one `BLOCK × BLOCK` score tile per
//! task.
//!
//! Forward: rayon over (head, query tile). Each task streams the key/value tiles up to the
//! diagonal, keeps the running row max `m`, row sum `l` and unnormalised output `acc`, then adds
//! the momentum `m_t = η(m_{t−1} + v_{t−1})`, scanning only the value rows within the momentum
//! horizon of the tile (the rows the last value tiles just brought into cache).
//!
//! Backward (FlashAttention-2): each key tile loops over the query tiles at or below the
//! diagonal, recomputing `P` from the saved log-sum-exp, accumulating dK and dV in the tile.
//! With at least two heads per thread, rayon runs over heads and dQ is accumulated in the same
//! pass; with fewer, rayon runs over (head, key tile) for dK, dV and then over (head, query
//! tile) for dQ. The momentum gradient `dv_s += Σ_{t>s} η^{t−s} do_t` is a reverse scan fused
//! into each key tile, starting from the gradient rows within the horizon after it.
//!
//! Logits are kept in base 2 (`scale · log2 e` folded into the GEMM's alpha) so every
//! exponential is an `exp2`, evaluated by a branch-free polynomial the compiler vectorises.

use std::borrow::Cow;

use rayon::prelude::*;

use super::{BackwardInputs, MomentumAttentionGrads, Problem, Scan, SoftmaxParams};
use crate::cpu::math::exp2;
use crate::cpu::output_vec;
use crate::cpu::{multiversion, sgemm, Mat};
use crate::{DType, Element, Error, Result, Tensor};

/// Query and key rows per tile. 128 keeps a score tile (64 KiB) and a head-dim-256 accumulator
/// (128 KiB) in L2 while giving the GEMMs enough work to amortise their packing.
const BLOCK: usize = 128;

const LOG2_E: f32 = std::f32::consts::LOG2_E;

// ----- forward -----------------------------------------------------------------------------------

pub(super) fn forward(
    problem: &Problem,
    params: &SoftmaxParams,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    shape: &[usize],
) -> Result<Tensor> {
    let op = super::OP_FORWARD;
    let (q, k, v) = (q.host_f32(op)?, k.host_f32(op)?, v.host_f32(op)?);
    let mut out = output_vec::<f32>(problem.numel())?;
    let mut lse2 = vec![0f32; problem.bh * problem.t];
    attention_forward(problem, params, (&q, &k, &v), &mut out, &mut lse2, None)?;
    Ok(to_tensor(out, problem.dtype, shape))
}

/// The output and what the backward pass needs: the attention without momentum (in the
/// inputs' dtype) and the base-2 row log-sum-exps (f32, `[B, H, T]`).
pub(super) fn forward_with_state(
    problem: &Problem,
    params: &SoftmaxParams,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    shape: &[usize],
) -> Result<[Tensor; 3]> {
    let op = super::OP_FORWARD;
    let (q, k, v) = (q.host_f32(op)?, k.host_f32(op)?, v.host_f32(op)?);
    let mut out = output_vec::<f32>(problem.numel())?;
    let mut attn = output_vec::<f32>(problem.numel())?;
    let mut lse2 = output_vec::<f32>(problem.bh * problem.t)?;
    attention_forward(problem, params, (&q, &k, &v), &mut out, &mut lse2, Some(&mut attn))?;
    Ok([
        to_tensor(out, problem.dtype, shape),
        to_tensor(attn, problem.dtype, shape),
        Tensor::from_host_vec(lse2, &shape[..3]),
    ])
}

/// Writes `out` (`[bh, t, d]`, with the momentum term when `params.eta > 0`), the base-2
/// log-sum-exp of each row's scaled logits `lse2` (`[bh, t]`) and, when given, the attention
/// without momentum `attn`. Rayon runs over every (head, query tile).
fn attention_forward(
    problem: &Problem,
    params: &SoftmaxParams,
    (q, k, v): (&[f32], &[f32], &[f32]),
    out: &mut [f32],
    lse2: &mut [f32],
    attn: Option<&mut [f32]>,
) -> Result<()> {
    let Problem { bh, t, d, .. } = *problem;
    let head = t * d;
    let tiles_per_head = t.div_ceil(BLOCK);
    // Every (head, query tile) is one rayon task: split each buffer into its per-tile rows.
    let out_tiles = split_tiles(out, t, d);
    let lse_tiles = split_tiles(lse2, t, 1);
    let attn_tiles: Vec<Option<&mut [f32]>> = match attn {
        Some(a) => split_tiles(a, t, d).into_iter().map(Some).collect(),
        None => (0..bh * tiles_per_head).map(|_| None).collect(),
    };
    let ok = out_tiles
        .into_par_iter()
        .zip(lse_tiles)
        .zip(attn_tiles)
        .enumerate()
        .map_init(
            || ForwardScratch::new(d),
            |scratch, (i, ((out_tile, lse_tile), attn_tile))| {
                let h = i / tiles_per_head;
                let view = HeadView {
                    q: &q[h * head..][..head],
                    k: &k[h * head..][..head],
                    v: &v[h * head..][..head],
                    t,
                    d,
                };
                let q0 = (i % tiles_per_head) * BLOCK;
                forward_tile(
                    &view,
                    params,
                    q0,
                    scratch,
                    TileOut { out: out_tile, lse2: lse_tile, attn: attn_tile },
                )
            },
        )
        .all(|ok| ok);
    if !ok {
        return Err(gemm_bug(super::OP_FORWARD));
    }
    Ok(())
}

/// `buf` (`[heads, t, per_row]`) cut into the rows of each (head, query tile), heads outer.
fn split_tiles(buf: &mut [f32], t: usize, per_row: usize) -> Vec<&mut [f32]> {
    buf.chunks_mut(t * per_row).flat_map(|h| h.chunks_mut(BLOCK * per_row)).collect()
}

/// The rows one forward task writes.
struct TileOut<'a> {
    out: &'a mut [f32],
    lse2: &'a mut [f32],
    attn: Option<&'a mut [f32]>,
}

/// One head's q, k, v (`t × d` each, row-major).
struct HeadView<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    t: usize,
    d: usize,
}

impl<'a> HeadView<'a> {
    fn rows(x: &'a [f32], d: usize, start: usize, n: usize) -> Mat<'a, f32> {
        Mat::new(&x[start * d..(start + n) * d], n, d)
    }
}

/// Per-task buffers, allocated once per rayon worker split, never in the tile loop.
struct ForwardScratch {
    scores: Vec<f32>,
    acc: Vec<f32>,
    row_max: Vec<f32>,
    row_sum: Vec<f32>,
    carry: Vec<f32>,
}

impl ForwardScratch {
    fn new(d: usize) -> Self {
        ForwardScratch {
            scores: vec![0.0; BLOCK * BLOCK],
            acc: vec![0.0; BLOCK * d],
            row_max: vec![0.0; BLOCK],
            row_sum: vec![0.0; BLOCK],
            carry: vec![0.0; d],
        }
    }
}

/// The output rows `q0 .. q0 + rows` of one head. Returns false only if a GEMM refused its
/// shapes (a bug).
fn forward_tile(
    head: &HeadView<'_>,
    params: &SoftmaxParams,
    q0: usize,
    s: &mut ForwardScratch,
    tile: TileOut<'_>,
) -> bool {
    let TileOut { out, lse2, attn } = tile;
    let d = head.d;
    let rows = lse2.len();
    let q_tile = HeadView::rows(head.q, d, q0, rows);
    let acc = &mut s.acc[..rows * d];
    acc.fill(0.0);
    s.row_max[..rows].fill(f32::NEG_INFINITY);
    s.row_sum[..rows].fill(0.0);
    let kv_end = q0 + rows; // causal: no key after the last query of the tile
    let mut ok = true;
    for k0 in (0..kv_end).step_by(BLOCK) {
        let cols = BLOCK.min(kv_end - k0);
        let scores = &mut s.scores[..rows * BLOCK];
        let k_tile = HeadView::rows(head.k, d, k0, cols);
        ok &= sgemm(params.scale * LOG2_E, q_tile, k_tile.t(), 0.0, scores, BLOCK);
        if k0 + cols > q0 + 1 {
            mask_above_diagonal(scores, rows, cols, q0, k0);
        }
        online_softmax(scores, cols, &mut s.row_max[..rows], &mut s.row_sum[..rows], acc, d);
        let p = Mat { data: &s.scores[..rows * BLOCK], rows, cols, ld: BLOCK, transposed: false };
        ok &= sgemm(1.0, p, HeadView::rows(head.v, d, k0, cols), 1.0, acc, d);
    }
    for r in 0..rows {
        let inv = 1.0 / s.row_sum[r];
        out[r * d..(r + 1) * d].iter_mut().zip(&acc[r * d..(r + 1) * d]).for_each(|(o, a)| *o = a * inv);
        lse2[r] = s.row_max[r] + s.row_sum[r].log2();
    }
    if let Some(attn) = attn {
        attn.copy_from_slice(out);
    }
    if params.eta > 0.0 {
        add_momentum(head, params, q0, rows, &mut s.carry, out);
    }
    ok
}

/// Sets the scores of keys after their query to −∞ (only the diagonal-crossing tiles need it).
fn mask_above_diagonal(scores: &mut [f32], rows: usize, cols: usize, q0: usize, k0: usize) {
    for r in 0..rows {
        let first_masked = (q0 + r + 1).saturating_sub(k0);
        if first_masked < cols {
            scores[r * BLOCK + first_masked..r * BLOCK + cols].fill(f32::NEG_INFINITY);
        }
    }
}

/// `out[r] += m_{q0+r}` for the tile's rows: the carry `m_{q0}` is scanned from the value rows
/// inside the horizon (older rows weigh less than f32 resolution), then the recurrence
/// `m_{t+1} = η (m_t + v_t)` runs through the tile.
fn add_momentum(
    head: &HeadView<'_>,
    params: &SoftmaxParams,
    q0: usize,
    rows: usize,
    carry: &mut [f32],
    out: &mut [f32],
) {
    let d = head.d;
    let eta = params.eta;
    carry.fill(0.0);
    for i in q0.saturating_sub(params.horizon)..q0 {
        carry.iter_mut().zip(&head.v[i * d..(i + 1) * d]).for_each(|(c, v)| *c = eta * (*c + v));
    }
    for r in 0..rows {
        out[r * d..(r + 1) * d].iter_mut().zip(carry.iter()).for_each(|(o, c)| *o += c);
        let v_row = &head.v[(q0 + r) * d..(q0 + r + 1) * d];
        carry.iter_mut().zip(v_row).for_each(|(c, v)| *c = eta * (*c + v));
    }
}

/// The unfused baseline's separate momentum pass: `base + Σ_{s<t} η^{t−s} x_s` at every row t
/// (`Scan::Forward`, x = v, base = the attention output), or `base + Σ_{t>s} η^{t−s} x_t` at
/// every row s (`Scan::Reverse`, x = dL/do, base = the attention's dv). Rayon over heads, each
/// head's columns advanced row by row through all T rows.
pub(super) fn add_momentum_scan(
    problem: &Problem,
    eta: f32,
    base: &Tensor,
    x: &Tensor,
    scan: Scan,
) -> Result<Tensor> {
    let op = "MomentumAttention::unfused";
    let shape = base.shape().to_vec();
    let (base, x) = (base.host_f32(op)?, x.host_f32(op)?);
    let d = problem.d;
    let mut out = base.into_owned();
    out.par_chunks_mut(problem.t * d).zip(x.par_chunks(problem.t * d)).for_each(|(o, x)| {
        let mut carry = vec![0f32; d];
        let mut step = |(o_row, x_row): (&mut [f32], &[f32])| {
            o_row.iter_mut().zip(&carry).for_each(|(o, c)| *o += c);
            carry.iter_mut().zip(x_row).for_each(|(c, x)| *c = eta * (*c + x));
        };
        let rows = o.chunks_exact_mut(d).zip(x.chunks_exact(d));
        match scan {
            Scan::Forward => rows.for_each(&mut step),
            Scan::Reverse => rows.rev().for_each(&mut step),
        }
    });
    Ok(to_tensor(out, problem.dtype, &shape))
}

// ----- backward ----------------------------------------------------------------------------------

pub(super) fn backward(
    problem: &Problem,
    params: &SoftmaxParams,
    inputs: &BackwardInputs<'_>,
    shape: &[usize],
) -> Result<MomentumAttentionGrads> {
    let op = super::OP_BACKWARD;
    let BackwardInputs { q, k, v, grad_output, saved } = *inputs;
    let (q, k, v) = (q.host_f32(op)?, k.host_f32(op)?, v.host_f32(op)?);
    let grad = grad_output.host_f32(op)?;
    let n = problem.numel();

    // The attention output (no momentum) and the row log-sum-exps: saved by the forward pass,
    // or recomputed.
    let (attn, lse2): (Cow<'_, [f32]>, Cow<'_, [f32]>) = match saved {
        Some((attn, lse2)) => (attn.host_f32(op)?, Cow::Borrowed(lse2.host_slice::<f32>(op)?)),
        None => {
            let plain = params.without_momentum();
            let mut attn = vec![0f32; n];
            let mut lse2 = vec![0f32; problem.bh * problem.t];
            attention_forward(problem, &plain, (&q, &k, &v), &mut attn, &mut lse2, None)?;
            (Cow::Owned(attn), Cow::Owned(lse2))
        }
    };

    // delta_r = Σ_d do_r · attn_r: the softmax backward's row correction.
    let d = problem.d;
    let delta: Vec<f32> = grad.par_chunks(d).zip(attn.par_chunks(d)).map(|(g, o)| dot(g, o)).collect();

    let mut dq = output_vec::<f32>(n)?;
    let mut dk = output_vec::<f32>(n)?;
    let mut dv = output_vec::<f32>(n)?;
    let (t, head) = (problem.t, problem.t * d);
    let view = |h: usize| BackwardHead {
        head: HeadView {
            q: &q[h * head..][..head],
            k: &k[h * head..][..head],
            v: &v[h * head..][..head],
            t,
            d,
        },
        grad: &grad[h * head..][..head],
        lse2: &lse2[h * t..][..t],
        delta: &delta[h * t..][..t],
    };
    let ok = if problem.bh >= 2 * rayon::current_num_threads() {
        // Enough heads to keep every thread busy: one pass per head, dQ accumulated in place
        // (5 tile GEMMs per (key tile, query tile) pair).
        dq.par_chunks_mut(head)
            .zip(dk.par_chunks_mut(head))
            .zip(dv.par_chunks_mut(head))
            .enumerate()
            .map(|(h, ((dq_h, dk_h), dv_h))| {
                let x = view(h);
                let mut scratch = BackwardScratch::new(d);
                dq_h.fill(0.0);
                let mut ok = true;
                for (tile, (dk_t, dv_t)) in
                    dk_h.chunks_mut(BLOCK * d).zip(dv_h.chunks_mut(BLOCK * d)).enumerate()
                {
                    ok &=
                        key_tile_grads(&x, params, tile * BLOCK, &mut scratch, dk_t, dv_t, Some(&mut *dq_h));
                }
                ok
            })
            .all(|ok| ok)
    } else {
        // Few heads: rayon over key tiles for dK and dV, then over query tiles for dQ. Recomputing
        // S and dP for dQ costs 7 tile GEMMs per pair instead of 5, but keeps every thread busy.
        let kv_ok = dk
            .par_chunks_mut(head)
            .zip(dv.par_chunks_mut(head))
            .enumerate()
            .map(|(h, (dk_h, dv_h))| {
                let x = view(h);
                dk_h.par_chunks_mut(BLOCK * d)
                    .zip(dv_h.par_chunks_mut(BLOCK * d))
                    .enumerate()
                    .map_init(
                        || BackwardScratch::new(d),
                        |s, (tile, (dk_t, dv_t))| {
                            key_tile_grads(&x, params, tile * BLOCK, s, dk_t, dv_t, None)
                        },
                    )
                    .all(|ok| ok)
            })
            .all(|ok| ok);
        let q_ok = dq
            .par_chunks_mut(head)
            .enumerate()
            .map(|(h, dq_h)| {
                let x = view(h);
                dq_h.par_chunks_mut(BLOCK * d)
                    .enumerate()
                    .map_init(
                        || BackwardScratch::new(d),
                        |s, (tile, dq_t)| query_tile_grads(&x, params, tile * BLOCK, s, dq_t),
                    )
                    .all(|ok| ok)
            })
            .all(|ok| ok);
        kv_ok && q_ok
    };
    if !ok {
        return Err(gemm_bug(op));
    }
    Ok(MomentumAttentionGrads {
        dq: to_tensor(dq, problem.dtype, shape),
        dk: to_tensor(dk, problem.dtype, shape),
        dv: to_tensor(dv, problem.dtype, shape),
    })
}

/// One head's inputs to the backward pass.
struct BackwardHead<'a> {
    head: HeadView<'a>,
    grad: &'a [f32],
    /// Base-2 log-sum-exp of each row's scaled logits.
    lse2: &'a [f32],
    /// Σ_d do · attn per row.
    delta: &'a [f32],
}

struct BackwardScratch {
    p: Vec<f32>,
    ds: Vec<f32>,
    carry: Vec<f32>,
}

impl BackwardScratch {
    fn new(d: usize) -> Self {
        BackwardScratch { p: vec![0.0; BLOCK * BLOCK], ds: vec![0.0; BLOCK * BLOCK], carry: vec![0.0; d] }
    }
}

/// P (`rows × cols`, row stride BLOCK) of query rows `q0..` against key rows `k0..`:
/// `2^(S2 − lse2)` with `S2 = scale·log2 e · Q Kᵀ`, zero above the diagonal.
fn recompute_probabilities(
    x: &BackwardHead<'_>,
    params: &SoftmaxParams,
    (q0, rows): (usize, usize),
    (k0, cols): (usize, usize),
    p: &mut [f32],
) -> bool {
    let d = x.head.d;
    let ok = sgemm(
        params.scale * LOG2_E,
        HeadView::rows(x.head.q, d, q0, rows),
        HeadView::rows(x.head.k, d, k0, cols).t(),
        0.0,
        p,
        BLOCK,
    );
    if k0 + cols > q0 + 1 {
        mask_above_diagonal(p, rows, cols, q0, k0);
    }
    probabilities(&mut p[..rows * BLOCK], cols, &x.lse2[q0..q0 + rows]);
    ok
}

/// dS = P ∘ (dO Vᵀ − delta) for the same tile pair, into `ds`.
fn recompute_ds(
    x: &BackwardHead<'_>,
    (q0, rows): (usize, usize),
    (k0, cols): (usize, usize),
    p: &[f32],
    ds: &mut [f32],
) -> bool {
    let d = x.head.d;
    let g_tile = HeadView::rows(x.grad, d, q0, rows);
    let ok = sgemm(1.0, g_tile, HeadView::rows(x.head.v, d, k0, cols).t(), 0.0, ds, BLOCK);
    for r in 0..rows {
        let delta_r = x.delta[q0 + r];
        let (p_row, ds_row) = (&p[r * BLOCK..r * BLOCK + cols], &mut ds[r * BLOCK..r * BLOCK + cols]);
        ds_row.iter_mut().zip(p_row).for_each(|(ds, p)| *ds = p * (*ds - delta_r));
    }
    ok
}

/// dK and dV of key rows `k0 .. k0 + cols` (the tiles' lengths say how many), looping over the
/// query tiles at or below the diagonal; adds `scale · dS K` to `dq` (the whole head's) when
/// given. Returns false only if a GEMM refused its shapes.
fn key_tile_grads(
    x: &BackwardHead<'_>,
    params: &SoftmaxParams,
    k0: usize,
    s: &mut BackwardScratch,
    dk_tile: &mut [f32],
    dv_tile: &mut [f32],
    mut dq: Option<&mut [f32]>,
) -> bool {
    let HeadView { t, d, .. } = x.head;
    let cols = dk_tile.len() / d;
    let k_tile = HeadView::rows(x.head.k, d, k0, cols);
    dk_tile.fill(0.0);
    dv_tile.fill(0.0);
    let mut ok = true;
    // BLOCK-aligned query tiles, so the first starts at k0.
    for q0 in (k0..t).step_by(BLOCK) {
        let rows = BLOCK.min(t - q0);
        ok &= recompute_probabilities(x, params, (q0, rows), (k0, cols), &mut s.p);
        let p = Mat { data: &s.p, rows, cols, ld: BLOCK, transposed: false };
        ok &= sgemm(1.0, p.t(), HeadView::rows(x.grad, d, q0, rows), 1.0, dv_tile, d); // dV += Pᵀ dO
        ok &= recompute_ds(x, (q0, rows), (k0, cols), &s.p, &mut s.ds);
        let ds = Mat { data: &s.ds, rows, cols, ld: BLOCK, transposed: false };
        if let Some(dq) = dq.as_deref_mut() {
            ok &= sgemm(params.scale, ds, k_tile, 1.0, &mut dq[q0 * d..(q0 + rows) * d], d);
            // dQ += dS K
        }
        let q_tile = HeadView::rows(x.head.q, d, q0, rows);
        ok &= sgemm(params.scale, ds.t(), q_tile, 1.0, dk_tile, d); // dK += dSᵀ Q
    }
    if params.eta > 0.0 {
        add_momentum_grad(x.grad, params, d, k0, cols, &mut s.carry, dv_tile);
    }
    ok
}

/// dQ of query rows `q0 .. q0 + rows` (`dq_tile`'s length says how many), looping over the key
/// tiles up to the diagonal. Returns false only if a GEMM refused its shapes.
fn query_tile_grads(
    x: &BackwardHead<'_>,
    params: &SoftmaxParams,
    q0: usize,
    s: &mut BackwardScratch,
    dq_tile: &mut [f32],
) -> bool {
    let d = x.head.d;
    let rows = dq_tile.len() / d;
    dq_tile.fill(0.0);
    let mut ok = true;
    for k0 in (0..q0 + rows).step_by(BLOCK) {
        let cols = BLOCK.min(q0 + rows - k0);
        ok &= recompute_probabilities(x, params, (q0, rows), (k0, cols), &mut s.p);
        ok &= recompute_ds(x, (q0, rows), (k0, cols), &s.p, &mut s.ds);
        let ds = Mat { data: &s.ds, rows, cols, ld: BLOCK, transposed: false };
        ok &= sgemm(params.scale, ds, HeadView::rows(x.head.k, d, k0, cols), 1.0, dq_tile, d);
    }
    ok
}

/// `dv_s += c_s` for the tile's rows, `c_s = Σ_{t>s} η^{t−s} do_t`. The carry into the tile,
/// `c_{k0+cols−1}`, is scanned from the gradient rows within the horizon after the tile (older
/// lags weigh less than f32 resolution); then the reverse recurrence `c_{s−1} = η (c_s + do_s)`
/// runs down the tile.
fn add_momentum_grad(
    grad: &[f32],
    params: &SoftmaxParams,
    d: usize,
    k0: usize,
    cols: usize,
    carry: &mut [f32],
    dv_tile: &mut [f32],
) {
    let eta = params.eta;
    let t = grad.len() / d;
    let after = k0 + cols;
    carry.fill(0.0);
    for row in (after..t.min(after.saturating_add(params.horizon))).rev() {
        carry.iter_mut().zip(&grad[row * d..(row + 1) * d]).for_each(|(c, g)| *c = eta * (*c + g));
    }
    for r in (0..cols).rev() {
        dv_tile[r * d..(r + 1) * d].iter_mut().zip(carry.iter()).for_each(|(g, c)| *g += c);
        let g_row = &grad[(k0 + r) * d..(k0 + r + 1) * d];
        carry.iter_mut().zip(g_row).for_each(|(c, g)| *c = eta * (*c + g));
    }
}

// ----- vectorised row kernels ---------------------------------------------------------------------

multiversion! {
    /// One online-softmax step over a score tile (`row_max.len()` rows of `cols` base-2 logits,
    /// row stride BLOCK): updates each row's running max and sum, replaces the scores by
    /// `2^(s − max)`, and rescales the row's accumulator (`d` wide) by `2^(old max − new max)`.
    /// A row that has seen only −∞ logits (products past f32's range) subtracts 0 instead of
    /// its max, as the CUDA kernels do: −∞ − −∞ would be NaN, where those keys weigh nothing.
    fn online_softmax(
        scores: &mut [f32],
        cols: usize,
        row_max: &mut [f32],
        row_sum: &mut [f32],
        acc: &mut [f32],
        d: usize,
    ) {
        for (r, (max, sum)) in row_max.iter_mut().zip(row_sum.iter_mut()).enumerate() {
            let row = &mut scores[r * BLOCK..r * BLOCK + cols];
            let new_max = max.max(row_max_of(row));
            let base = if new_max == f32::NEG_INFINITY { 0.0 } else { new_max };
            let rescale = if *max == f32::NEG_INFINITY { 0.0 } else { exp2(*max - base) };
            *max = new_max;
            *sum = *sum * rescale + exp2_in_place_sum(row, base);
            if rescale != 1.0 {
                acc[r * d..(r + 1) * d].iter_mut().for_each(|a| *a *= rescale);
            }
        }
    }
}

multiversion! {
    /// `p ← 2^(p − lse2_r)` for each row r of a score tile (`cols` wide, row stride BLOCK).
    fn probabilities(p: &mut [f32], cols: usize, lse2: &[f32]) {
        for (r, lse) in lse2.iter().enumerate() {
            p[r * BLOCK..r * BLOCK + cols].iter_mut().for_each(|s| *s = exp2(*s - lse));
        }
    }
}

// ----- small vectorisable helpers -----------------------------------------------------------------

/// Replaces each score s by 2^(s − max) and returns their sum (16 partial sums so it vectorises).
#[inline(always)]
fn exp2_in_place_sum(row: &mut [f32], max: f32) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = row.chunks_exact_mut(16);
    for chunk in &mut chunks {
        for (lane, s) in lanes.iter_mut().zip(chunk.iter_mut()) {
            *s = exp2(*s - max);
            *lane += *s;
        }
    }
    let mut total: f32 = lanes.iter().sum();
    for s in chunks.into_remainder() {
        *s = exp2(*s - max);
        total += *s;
    }
    total
}

#[inline(always)]
fn row_max_of(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = row.chunks_exact(16);
    for chunk in &mut chunks {
        for (lane, &s) in lanes.iter_mut().zip(chunk) {
            *lane = if s > *lane { s } else { *lane };
        }
    }
    chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &s| if s > m { s } else { m })
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (xa, xb) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += xa[i] * xb[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// A host tensor of `dtype` holding `values` (rounded to nearest even).
fn to_tensor(values: Vec<f32>, dtype: DType, shape: &[usize]) -> Tensor {
    fn convert<T: Element>(values: &[f32]) -> Vec<T> {
        values.par_iter().map(|&x| T::from_f32(x)).collect()
    }
    match dtype {
        DType::F16 => Tensor::from_host_vec(convert::<half::f16>(&values), shape),
        DType::BF16 => Tensor::from_host_vec(convert::<half::bf16>(&values), shape),
        _ => Tensor::from_host_vec(values, shape),
    }
}

fn gemm_bug(op: &'static str) -> Error {
    Error::invalid(
        op,
        "tile GEMM",
        "a tile product was refused its shapes (a metakernels bug; please report)",
    )
}
