//! CPU linear attention: the chunked algorithm in f32, rayon over (sequence, head) segments,
//! every matmul-shaped step through the unpacked register-blocked [`Gemm`] of `cpu_gemm.rs`
//! (operands already sit in cache; `matrixmultiply`'s per-call packing cost as much as the
//! arithmetic at these 64-row sizes).
//!
//! Forward, per chunk of `CHUNK` rows (causal), with S and z carried in f32:
//!
//! ```text
//! A  = mask_{j≤i}(φ(Q) φ(K)ᵀ)          (row blocks stop at the diagonal)
//! O  = φ(Q)·S + A·V,  den = φ(Q)·z + rowsum(A) + eps
//! S += φ(K)ᵀ V,       z  += Σ φ(K)
//! ```
//!
//! The backward treats the normaliser as one extra value column (v' = [v, 1], S' = [S, z]) and
//! the normalisation as a gradient on the augmented output: g' = [∂L/∂num, ∂L/∂den]. Then
//! dφ(Q) is a forward-direction pass (G'S'ᵀ + mask(G'V'ᵀ)φ(K)), and dφ(K), dV a reverse pass
//! carrying dS' = ∂L/∂S' back from the final state. The momentum term (output +
//! Σ η^{t−i} v_i, and its reverse sum on dv) is a per-row recurrence folded into the same
//! loops.

use half::{bf16, f16};
use rayon::prelude::*;

use super::cpu_gemm::Gemm;
use super::{
    BackwardArgs, BackwardResult, FeatureMap, ForwardArgs, ForwardResult, KernelPath, Problem, Segment,
};
use crate::cpu::math::exp;
use crate::cpu::multiversion;
use crate::cpu::output_vec;
use crate::{DType, Error, Result, Tensor};

/// Rows per chunk: 64 keeps the three GEMMs square-ish (64×64×Dk) and the intra-chunk
/// masking waste small; measured faster than 32 and 128 at D = 64.
const CHUNK: usize = 64;

/// Rows per block of the causal chunk products: each block multiplies only up to its diagonal,
/// which skips 1/4 of the work of a full 64 × 64 masked product (32 keeps every block on the
/// register-blocked path of the GEMM, whose column block is 32 wide).
const ROW_BLOCK: usize = 32;

const OP: &str = "linear_attention (cpu)";

/// φ(x). elu + 1 takes `math::exp` (within 1 ulp, vectorises) rather than libm's `expf` (a call
/// per element, which made the elu + 1 forward 4.3× slower than the identity map's).
#[inline]
fn phi(fm: FeatureMap, x: f32) -> f32 {
    match fm {
        FeatureMap::Identity => x,
        FeatureMap::EluPlusOne => {
            if x > 0.0 {
                x + 1.0
            } else {
                exp(x)
            }
        }
        FeatureMap::Relu => x.max(0.0),
    }
}

/// dφ/dx.
#[inline]
fn dphi(fm: FeatureMap, x: f32) -> f32 {
    match fm {
        FeatureMap::Identity => 1.0,
        FeatureMap::EluPlusOne => {
            if x > 0.0 {
                1.0
            } else {
                exp(x)
            }
        }
        FeatureMap::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
    }
}

/// Head sizes of one problem; `dva` is the width of the state rows: `dv + 1` for the augmented
/// state [S, z] of the backward, `dv` in the forward (which keeps z apart).
#[derive(Clone, Copy)]
struct Dims {
    dk: usize,
    dv: usize,
    dva: usize,
}

/// Scratch for one segment at a time, allocated once per rayon worker.
struct Workspace {
    /// CHUNK × (dk + CHUNK): [φ(Q) | A].
    left: Vec<f32>,
    /// (dk + CHUNK) × dva: [S' ; V'].
    right: Vec<f32>,
    /// CHUNK × dk: φ(K).
    kf: Vec<f32>,
    /// CHUNK × CHUNK: a score block before masking.
    square: Vec<f32>,
    /// CHUNK × dva: [numerator | denominator] of the output rows.
    oa: Vec<f32>,
    /// CHUNK × dk: dφ(Q) or dφ(K) of a chunk.
    dfeat: Vec<f32>,
    /// dk × dva: ∂L/∂S' carried backwards.
    ds: Vec<f32>,
    /// dv: the momentum carry (m_t forward, the reverse sum backward).
    carry: Vec<f32>,
    /// len × dva: g' for a whole segment (causal backward).
    gp: Vec<f32>,
    /// dk × CHUNK: φ(K)ᵀ of a chunk (forward; the row stride is CHUNK).
    kft: Vec<f32>,
    /// dk: the normaliser z (forward).
    z: Vec<f32>,
    /// CHUNK: the denominators of a chunk's rows (forward).
    den: Vec<f32>,
    /// dva × dk: S'ᵀ or dS'ᵀ (backward).
    state_t: Vec<f32>,
    /// dva × CHUNK: V'ᵀ or G'ᵀ of a chunk (backward).
    rows_t: Vec<f32>,
    /// dk × CHUNK: φ(Q)ᵀ of a chunk (backward).
    qft: Vec<f32>,
}

impl Workspace {
    fn new(d: Dims) -> Self {
        Workspace {
            left: vec![0.0; CHUNK * (d.dk + CHUNK)],
            right: vec![0.0; (d.dk + CHUNK) * d.dva],
            kf: vec![0.0; CHUNK * d.dk],
            square: vec![0.0; CHUNK * CHUNK],
            oa: vec![0.0; CHUNK * d.dva],
            dfeat: vec![0.0; CHUNK * d.dk],
            ds: vec![0.0; d.dk * d.dva],
            carry: vec![0.0; d.dv],
            gp: Vec::new(),
            kft: vec![0.0; d.dk * CHUNK],
            z: vec![0.0; d.dk],
            den: vec![0.0; CHUNK],
            state_t: vec![0.0; d.dva * d.dk],
            rows_t: vec![0.0; d.dva * CHUNK],
            qft: vec![0.0; d.dk * CHUNK],
        }
    }
}

/// C (m×n, row stride ldc) = A·B (+ C when `acc`), A with strides (rsa, csa), B row-major
/// with row stride ldb: a shorthand for [`Gemm`].
#[allow(clippy::too_many_arguments)]
fn mm(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) -> Result<()> {
    Gemm { m, n, k, rsa, csa, ldb, ldc, accumulate }.run(a, b, c)
}

/// dst[c·ld_dst + i] = src[i·ld_src + c] for i < rows, c < cols: the transposed operands the
/// row-major-B [`Gemm`] needs (O(n·d) per chunk, against O(n·d²) of arithmetic).
fn transpose(src: &[f32], rows: usize, cols: usize, ld_src: usize, dst: &mut [f32], ld_dst: usize) {
    // 8 × 8 tiles through a register block: whole rows in, whole rows out (one element at a
    // time scattered the writes a row apart and checked every index).
    const B: usize = 8;
    let (full_rows, full_cols) = (rows - rows % B, cols - cols % B);
    for i0 in (0..full_rows).step_by(B) {
        for c0 in (0..full_cols).step_by(B) {
            let mut tile = [[0f32; B]; B];
            for (r, row) in tile.iter_mut().enumerate() {
                row.copy_from_slice(&src[(i0 + r) * ld_src + c0..(i0 + r) * ld_src + c0 + B]);
            }
            for c in 0..B {
                let out = &mut dst[(c0 + c) * ld_dst + i0..(c0 + c) * ld_dst + i0 + B];
                for (r, o) in out.iter_mut().enumerate() {
                    *o = tile[r][c];
                }
            }
        }
    }
    // The ragged right columns of the tiled rows, then the ragged bottom rows.
    for i in 0..rows {
        let first = if i < full_rows { full_cols } else { 0 };
        for (c, &x) in src[i * ld_src + first..i * ld_src + cols].iter().enumerate() {
            dst[(first + c) * ld_dst + i] = x;
        }
    }
}

multiversion! {
    /// dst[i·ld_dst + c] = φ(src[i·d + c]) for `n` rows of width `d`. One loop per map, so that
    /// each vectorises (a `match` per element did not).
    fn load_features(fm: FeatureMap, src: &[f32], n: usize, d: usize, dst: &mut [f32], ld_dst: usize) {
        match fm {
            FeatureMap::Identity => map_rows(src, n, d, dst, ld_dst, |x| x),
            FeatureMap::Relu => map_rows(src, n, d, dst, ld_dst, |x| phi(FeatureMap::Relu, x)),
            FeatureMap::EluPlusOne => map_rows(src, n, d, dst, ld_dst, |x| phi(FeatureMap::EluPlusOne, x)),
        }
    }
}

/// dst[i·ld_dst + c] = f(src[i·d + c]) for `n` rows of width `d`.
#[inline(always)]
fn map_rows(src: &[f32], n: usize, d: usize, dst: &mut [f32], ld_dst: usize, f: impl Fn(f32) -> f32) {
    for (row, out) in src[..n * d].chunks_exact(d).zip(dst.chunks_mut(ld_dst)) {
        out[..d].iter_mut().zip(row).for_each(|(o, &x)| *o = f(x));
    }
}

/// Rows dk..dk+n of `right` := [v_i, 1].
fn load_values(right: &mut [f32], v: &[f32], n: usize, d: Dims) {
    for i in 0..n {
        let row = &mut right[(d.dk + i) * d.dva..(d.dk + i + 1) * d.dva];
        row[..d.dv].copy_from_slice(&v[i * d.dv..(i + 1) * d.dv]);
        if d.dva > d.dv {
            row[d.dv] = 1.0;
        }
    }
}

/// `masked[i·ld + j] = square[i·CHUNK + j]` where kept, else 0 (`lower`: j ≤ i; else j ≥ i).
fn mask_into(square: &[f32], masked: &mut [f32], n: usize, ld: usize, lower: bool) {
    for i in 0..n {
        let (src, dst) = (&square[i * CHUNK..i * CHUNK + n], &mut masked[i * ld..i * ld + n]);
        // Row slices and a select: vectorises (indexing both per element did not).
        for (j, (o, &x)) in dst.iter_mut().zip(src).enumerate() {
            let keep = if lower { j <= i } else { j >= i };
            *o = if keep { x } else { 0.0 };
        }
    }
}

/// The rows and columns of row block `i0` that a causal mask keeps: `lower` (j ≤ i) stops at the
/// block's last row, else (j ≥ i) starts at its first.
fn kept_span(i0: usize, n: usize, lower: bool) -> (usize, std::ops::Range<usize>) {
    let rows = ROW_BLOCK.min(n - i0);
    (rows, if lower { 0..i0 + rows } else { i0..n })
}

/// `square[i·CHUNK + j]` = (A·B)[i, j] where the causal mask keeps it (`lower`: j ≤ i; else
/// j ≥ i) and 0 across the diagonal within each row block's kept span, for `n` rows; A is n × k with
/// strides `(rsa, csa)`, B k × n row-major (row stride `ldb`). Row block by row block, only the
/// kept side is multiplied (about 1/4 of a full 64 × 64 product saved); entries outside a row
/// block's span are left as they were: [`masked_times`] never reads them.
#[allow(clippy::too_many_arguments)]
fn masked_scores(
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    ldb: usize,
    k: usize,
    n: usize,
    lower: bool,
    square: &mut [f32],
) -> Result<()> {
    for i0 in (0..n).step_by(ROW_BLOCK) {
        let (rows, cols) = kept_span(i0, n, lower);
        let block = Gemm { m: rows, n: cols.len(), k, rsa, csa, ldb, ldc: CHUNK, accumulate: false };
        block.run(&a[i0 * rsa..], &b[cols.start..], &mut square[i0 * CHUNK + cols.start..])?;
        for i in i0..i0 + rows {
            // Inside the span, the other side of the diagonal.
            let row = &mut square[i * CHUNK..(i + 1) * CHUNK];
            if lower {
                row[i + 1..cols.end].fill(0.0);
            } else {
                row[cols.start..i].fill(0.0);
            }
        }
    }
    Ok(())
}

/// `out` (n × width, row stride `ldo`) = M·X (+ `out` when `accumulate`) for the masked
/// `square` M of [`masked_scores`] (same `n`, `lower`), X row-major with row stride `ldx`: each
/// row block multiplies only its kept span.
#[allow(clippy::too_many_arguments)]
fn masked_times(
    square: &[f32],
    n: usize,
    lower: bool,
    x: &[f32],
    ldx: usize,
    width: usize,
    out: &mut [f32],
    ldo: usize,
    accumulate: bool,
) -> Result<()> {
    for i0 in (0..n).step_by(ROW_BLOCK) {
        let (rows, span) = kept_span(i0, n, lower);
        let block =
            Gemm { m: rows, n: width, k: span.len(), rsa: CHUNK, csa: 1, ldb: ldx, ldc: ldo, accumulate };
        block.run(&square[i0 * CHUNK + span.start..], &x[span.start * ldx..], &mut out[i0 * ldo..])?;
    }
    Ok(())
}

/// S' := [S_0, z_0] (zeros where not given) in the first dk rows of `right`.
fn init_state(right: &mut [f32], s0: Option<&[f32]>, z0: Option<&[f32]>, d: Dims) {
    for i in 0..d.dk {
        let row = &mut right[i * d.dva..(i + 1) * d.dva];
        match s0 {
            Some(s) => row[..d.dv].copy_from_slice(&s[i * d.dv..(i + 1) * d.dv]),
            None => row[..d.dv].fill(0.0),
        }
        if d.dva > d.dv {
            row[d.dv] = z0.map_or(0.0, |z| z[i]);
        }
    }
}

/// S' += φ(K)ᵀ V' for the `n` rows loaded in `kf` and `right[dk..]`.
fn update_state(ws: &mut Workspace, n: usize, d: Dims) -> Result<()> {
    let (s, vals) = ws.right.split_at_mut(d.dk * d.dva);
    mm((d.dk, d.dva, n), &ws.kf, (1, d.dk), vals, d.dva, s, d.dva, true)
}

/// `oa` := [num | den − eps] for the `n` chunk rows: φ(Q)·S' plus (causal) the masked
/// intra-chunk part. Expects φ(Q) in `left`, φ(K) in `kf` and `kft`, V' and S' in `right`.
fn chunk_numerators(ws: &mut Workspace, n: usize, d: Dims, causal: bool) -> Result<()> {
    let ld_l = d.dk + CHUNK;
    if causal {
        mm((n, n, d.dk), &ws.left, (ld_l, 1), &ws.kft, CHUNK, &mut ws.square, CHUNK, false)?;
        mask_into(&ws.square, &mut ws.left[d.dk..], n, ld_l, true);
        mm((n, d.dva, d.dk + n), &ws.left, (ld_l, 1), &ws.right, d.dva, &mut ws.oa, d.dva, false)
    } else {
        mm((n, d.dva, d.dk), &ws.left, (ld_l, 1), &ws.right, d.dva, &mut ws.oa, d.dva, false)
    }
}

/// The options of a segment pass, copied out of the problem.
#[derive(Clone, Copy)]
struct Opts {
    fm: FeatureMap,
    causal: bool,
    normalize: bool,
    scale: f32,
    eps: f32,
    eta: Option<f32>,
}

impl Opts {
    fn of(p: &Problem) -> Opts {
        Opts {
            fm: p.cfg.feature_map,
            causal: p.cfg.causal,
            normalize: p.cfg.normalize,
            scale: p.cfg.scale,
            eps: p.cfg.eps,
            eta: p.momentum,
        }
    }

    /// scale / (den + eps), or scale.
    #[inline]
    fn factor(&self, den_minus_eps: f32) -> f32 {
        if self.normalize {
            self.scale / (den_minus_eps + self.eps)
        } else {
            self.scale
        }
    }
}

// ------------------------------------------------------------------------------------------
// forward

/// One segment's inputs (rows of q, k, v; its initial state) and outputs.
struct ForwardTask<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    s0: Option<&'a [f32]>,
    z0: Option<&'a [f32]>,
    out: &'a mut [f32],
    /// Where the final state goes (not wanted by the split form's second pass).
    s_out: Option<&'a mut [f32]>,
    z_out: Option<&'a mut [f32]>,
    /// Non-causal: add this task's own φ(K)ᵀV to the initial state (false when the initial
    /// state already is the sequence's total, in the split form).
    accumulate: bool,
}

/// φ of `n` rows of width `d`: the rows themselves for the identity map (no copy), else
/// written to `buf`.
fn features<'a>(fm: FeatureMap, src: &'a [f32], n: usize, d: usize, buf: &'a mut [f32]) -> &'a [f32] {
    if fm == FeatureMap::Identity {
        &src[..n * d]
    } else {
        load_features(fm, src, n, d, buf, d);
        &buf[..n * d]
    }
}

/// The forward of one segment. The state S (dk × dv) lives in `ws.right`, z and the
/// denominators apart (cheap row sums); q, k, v are read in place where φ is the identity, and
/// the chunk products run through the unpacked [`Gemm`]:
/// A = φ(Q)φ(K)ᵀ (upper triangle zeroed), O = φ(Q)·S + A·V, S += φ(K)ᵀV.
fn forward_segment(t: ForwardTask<'_>, o: Opts, d: Dims, ws: &mut Workspace) -> Result<()> {
    let len = t.q.len() / d.dk;
    let (dk, dv) = (d.dk, d.dv);
    let Workspace { left: qbuf, right, kf: kbuf, kft, square, z, den, carry, .. } = ws;
    let state = &mut right[..dk * dv];
    match t.s0 {
        Some(s0) => state.copy_from_slice(s0),
        None => state.fill(0.0),
    }
    match t.z0 {
        Some(z0) => z.copy_from_slice(z0),
        None => z.fill(0.0),
    }
    // S += φ(K)ᵀ V and z += Σ φ(k) over `n` rows.
    let update = |kf: &[f32], v: &[f32], n: usize, state: &mut [f32], z: &mut [f32]| -> Result<()> {
        for row in kf.chunks_exact(dk) {
            z.iter_mut().zip(row).for_each(|(z, x)| *z += x);
        }
        Gemm { m: dk, n: dv, k: n, rsa: 1, csa: dk, ldb: dv, ldc: dv, accumulate: true }.run(kf, v, state)
    };
    if !o.causal && t.accumulate {
        for t0 in (0..len).step_by(CHUNK) {
            let n = CHUNK.min(len - t0);
            let kf = features(o.fm, &t.k[t0 * dk..], n, dk, kbuf);
            update(kf, &t.v[t0 * dv..(t0 + n) * dv], n, state, z)?;
        }
    }
    carry.fill(0.0);
    for t0 in (0..len).step_by(CHUNK) {
        let n = CHUNK.min(len - t0);
        let (v, out) = (&t.v[t0 * dv..(t0 + n) * dv], &mut t.out[t0 * dv..(t0 + n) * dv]);
        let qf = features(o.fm, &t.q[t0 * dk..], n, dk, qbuf);
        let kf = if o.causal { features(o.fm, &t.k[t0 * dk..], n, dk, kbuf) } else { &[][..] };
        if o.causal {
            transpose(kf, n, dk, dk, kft, CHUNK);
            // Row block by row block, only up to the diagonal: the rest is masked anyway.
            for i0 in (0..n).step_by(ROW_BLOCK) {
                let (rows, cols) = (ROW_BLOCK.min(n - i0), (i0 + ROW_BLOCK).min(n));
                let scores = Gemm {
                    m: rows,
                    n: cols,
                    k: dk,
                    rsa: dk,
                    csa: 1,
                    ldb: CHUNK,
                    ldc: CHUNK,
                    accumulate: false,
                };
                scores.run(&qf[i0 * dk..], kft, &mut square[i0 * CHUNK..])?;
            }
            for i in 0..n {
                let block_end = ((i / ROW_BLOCK + 1) * ROW_BLOCK).min(n);
                square[i * CHUNK + i + 1..i * CHUNK + block_end].fill(0.0);
            }
        }
        if o.normalize {
            for i in 0..n {
                let inter: f32 = qf[i * dk..(i + 1) * dk].iter().zip(z.iter()).map(|(a, b)| a * b).sum();
                let intra: f32 =
                    if o.causal { square[i * CHUNK..i * CHUNK + i + 1].iter().sum() } else { 0.0 };
                den[i] = inter + intra + o.eps;
            }
        }
        Gemm { m: n, n: dv, k: dk, rsa: dk, csa: 1, ldb: dv, ldc: dv, accumulate: false }
            .run(qf, state, out)?;
        if o.causal {
            for i0 in (0..n).step_by(ROW_BLOCK) {
                let (rows, depth) = (ROW_BLOCK.min(n - i0), (i0 + ROW_BLOCK).min(n));
                let intra =
                    Gemm { m: rows, n: dv, k: depth, rsa: CHUNK, csa: 1, ldb: dv, ldc: dv, accumulate: true };
                intra.run(&square[i0 * CHUNK..], v, &mut out[i0 * dv..])?;
            }
        }
        finish_rows(out, v, o, dv, den, carry);
        if o.causal {
            update(kf, v, n, state, z)?;
        }
    }
    if let Some(s_out) = t.s_out {
        s_out.copy_from_slice(state);
    }
    if let Some(z_out) = t.z_out {
        z_out.copy_from_slice(z);
    }
    Ok(())
}

/// Scales (and normalises) the output rows in place and adds the momentum term.
fn finish_rows(out: &mut [f32], v: &[f32], o: Opts, dv: usize, den: &[f32], carry: &mut [f32]) {
    for (i, row) in out.chunks_exact_mut(dv).enumerate() {
        let f = if o.normalize { o.scale / den[i] } else { o.scale };
        row.iter_mut().for_each(|y| *y *= f);
        if let Some(eta) = o.eta {
            // m_t is added to row t, then m_{t+1} = η (m_t + v_t).
            let v_row = &v[i * dv..(i + 1) * dv];
            for ((y, m), &vx) in row.iter_mut().zip(carry.iter_mut()).zip(v_row) {
                *y += *m;
                *m = eta * (*m + vx);
            }
        }
    }
}

pub(super) fn forward(p: &Problem, a: &ForwardArgs<'_>, path: KernelPath) -> Result<ForwardResult> {
    let d = Dims { dk: p.dk, dv: p.dv, dva: p.dv };
    let (q, k, v) = (a.q.host_f32(OP)?, a.k.host_f32(OP)?, a.v.host_f32(OP)?);
    let s0 = a.s0.map(|s| s.host_slice::<f32>(OP)).transpose()?;
    let z0 = a.z0.map(|z| z.host_slice::<f32>(OP)).transpose()?;
    let mut out = output_vec::<f32>(p.rows * d.dv)?;
    let mut s_out = output_vec::<f32>(p.states() * d.dk * d.dv)?;
    let mut z_out = output_vec::<f32>(p.states() * d.dk)?;
    let o = Opts::of(p);
    let inputs = Inputs { q: &q, k: &k, v: &v, s0, z0 };
    let groups = split_groups(p, path);
    if groups > 1 {
        split_forward(p, &inputs, d, o, groups, (&mut out, &mut s_out, &mut z_out))?;
    } else {
        fused_forward(p, &inputs, d, o, (&mut out, &mut s_out, &mut z_out))?;
    }
    let output_shape = with_last(a.q.shape(), d.dv);
    Ok(ForwardResult {
        output: to_dtype(out, &output_shape, a.q.dtype()),
        state: Tensor::from_host_vec(s_out, &[p.states(), d.dk, d.dv]),
        normalizer: Tensor::from_host_vec(z_out, &[p.states(), d.dk]),
    })
}

/// The whole inputs of a forward, as f32 rows.
struct Inputs<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    s0: Option<&'a [f32]>,
    z0: Option<&'a [f32]>,
}

/// Output, final states and final normalisers of a forward.
type Outputs<'a> = (&'a mut [f32], &'a mut [f32], &'a mut [f32]);

/// The number of chunk groups per sequence for the split form, or 1 (fused). `Auto` splits
/// when there are at least [`SPLIT_THREADS_PER_SEQUENCE`] rayon threads per (sequence, head);
/// never with a momentum term (whose carry crosses the groups).
fn split_groups(p: &Problem, path: KernelPath) -> usize {
    let threads = rayon::current_num_threads();
    let max_chunks = p.segments.iter().map(|s| s.len.div_ceil(CHUNK)).max().unwrap_or(1);
    let wanted = (2 * threads).div_ceil(p.segments.len()).max(2);
    match path {
        _ if p.momentum.is_some() => 1,
        KernelPath::Split => wanted.min(max_chunks),
        KernelPath::Auto if auto_splits(p.segments.len()) => wanted.min(max_chunks),
        _ => 1,
    }
}

/// The split form does about 1.4× the fused form's work (the chunk states are a pass of their
/// own), and two threads of a shared machine gave 1.6×, not 2×, one thread's rate: measured at
/// (1,1,4096,64) on two threads, the split form took 0.96 ms where the fused one, on one thread,
/// took 0.71 (`cargo bench --bench linear_attention`, its "split rule" lines). So splitting pays
/// only with a clear margin of idle threads: three per (sequence, head).
const SPLIT_THREADS_PER_SEQUENCE: usize = 3;

/// Whether `Auto` takes the split form for `sequences` (sequence, head)s on this thread pool.
pub(crate) fn auto_splits(sequences: usize) -> bool {
    sequences.saturating_mul(SPLIT_THREADS_PER_SEQUENCE) <= rayon::current_num_threads()
}

/// One task per (sequence, head), in parallel.
fn fused_forward(
    p: &Problem,
    x: &Inputs<'_>,
    d: Dims,
    o: Opts,
    (out, s_out, z_out): Outputs<'_>,
) -> Result<()> {
    let (q, k, v, s0, z0) = (x.q, x.k, x.v, x.s0, x.z0);
    let outs = split_rows(out, &p.segments, d.dv);
    let s_outs = split_states(s_out, &p.segments, d.dk * d.dv)?;
    let z_outs = split_states(z_out, &p.segments, d.dk)?;
    let tasks: Vec<ForwardTask<'_>> = p
        .segments
        .iter()
        .zip(outs)
        .zip(s_outs.into_iter().zip(z_outs))
        .map(|((seg, out), (s_out, z_out))| ForwardTask {
            q: rows(q, seg, d.dk),
            k: rows(k, seg, d.dk),
            v: rows(v, seg, d.dv),
            s0: s0.map(|s| state(s, seg, d.dk * d.dv)),
            z0: z0.map(|z| state(z, seg, d.dk)),
            out,
            s_out: Some(s_out),
            z_out: Some(z_out),
            accumulate: true,
        })
        .collect();
    tasks.into_par_iter().try_for_each_init(|| Workspace::new(d), |ws, t| forward_segment(t, o, d, ws))
}

/// Split form: each sequence is cut into `groups` runs of whole chunks; pass 1 computes every
/// run's local (S, z) in parallel, a prefix sum gives each run its initial state (and each
/// sequence its final state), and pass 2 computes all runs' outputs in parallel.
fn split_forward(
    p: &Problem,
    x: &Inputs<'_>,
    d: Dims,
    o: Opts,
    groups: usize,
    (out, s_out, z_out): Outputs<'_>,
) -> Result<()> {
    let (sz, dk, dv) = (d.dk * d.dv, d.dk, d.dv);
    let mut runs = Vec::with_capacity(p.segments.len() * groups);
    for (index, seg) in p.segments.iter().enumerate() {
        let per = seg.len.div_ceil(CHUNK).div_ceil(groups) * CHUNK;
        for g in 0..groups {
            let (start, end) = ((g * per).min(seg.len), ((g + 1) * per).min(seg.len));
            runs.push(Segment { row0: seg.row0 + start, len: end - start, state: index });
        }
    }
    // Pass 1: local states.
    let mut local_s = vec![0f32; runs.len() * sz];
    let mut local_z = vec![0f32; runs.len() * dk];
    runs.par_iter().zip(local_s.par_chunks_mut(sz)).zip(local_z.par_chunks_mut(dk)).try_for_each_init(
        || Workspace::new(d),
        |ws, ((run, s), z)| local_state(o.fm, rows(x.k, run, dk), rows(x.v, run, dv), d, ws, s, z),
    )?;
    // Prefix sums (sequential: a few states per sequence).
    let mut init_s = vec![0f32; runs.len() * sz];
    let mut init_z = vec![0f32; runs.len() * dk];
    for (index, seg) in p.segments.iter().enumerate() {
        let mut acc_s = x.s0.map_or_else(|| vec![0f32; sz], |s| state(s, seg, sz).to_vec());
        let mut acc_z = x.z0.map_or_else(|| vec![0f32; dk], |z| state(z, seg, dk).to_vec());
        for r in index * groups..(index + 1) * groups {
            init_s[r * sz..(r + 1) * sz].copy_from_slice(&acc_s);
            init_z[r * dk..(r + 1) * dk].copy_from_slice(&acc_z);
            acc_s.iter_mut().zip(&local_s[r * sz..(r + 1) * sz]).for_each(|(a, b)| *a += b);
            acc_z.iter_mut().zip(&local_z[r * dk..(r + 1) * dk]).for_each(|(a, b)| *a += b);
        }
        if !o.causal {
            // Every row of a non-causal sequence sees its total state.
            for r in index * groups..(index + 1) * groups {
                init_s[r * sz..(r + 1) * sz].copy_from_slice(&acc_s);
                init_z[r * dk..(r + 1) * dk].copy_from_slice(&acc_z);
            }
        }
        s_out[seg.state * sz..(seg.state + 1) * sz].copy_from_slice(&acc_s);
        z_out[seg.state * dk..(seg.state + 1) * dk].copy_from_slice(&acc_z);
    }
    // Pass 2: outputs.
    let tasks: Vec<ForwardTask<'_>> = runs
        .iter()
        .zip(split_rows(out, &runs, dv))
        .enumerate()
        .map(|(r, (run, out))| ForwardTask {
            q: rows(x.q, run, dk),
            k: rows(x.k, run, dk),
            v: rows(x.v, run, dv),
            s0: Some(&init_s[r * sz..(r + 1) * sz]),
            z0: Some(&init_z[r * dk..(r + 1) * dk]),
            out,
            s_out: None,
            z_out: None,
            accumulate: false,
        })
        .collect();
    tasks.into_par_iter().try_for_each_init(|| Workspace::new(d), |ws, t| forward_segment(t, o, d, ws))
}

/// S = Σ φ(k)ᵀ v and z = Σ φ(k) over the rows of one run, from zero.
fn local_state(
    fm: FeatureMap,
    k: &[f32],
    v: &[f32],
    d: Dims,
    ws: &mut Workspace,
    s: &mut [f32],
    z: &mut [f32],
) -> Result<()> {
    let len = k.len() / d.dk;
    s.fill(0.0);
    z.fill(0.0);
    for t0 in (0..len).step_by(CHUNK) {
        let n = CHUNK.min(len - t0);
        let kf = features(fm, &k[t0 * d.dk..], n, d.dk, &mut ws.kf);
        for row in kf.chunks_exact(d.dk) {
            z.iter_mut().zip(row).for_each(|(z, x)| *z += x);
        }
        let update =
            Gemm { m: d.dk, n: d.dv, k: n, rsa: 1, csa: d.dk, ldb: d.dv, ldc: d.dv, accumulate: true };
        update.run(kf, &v[t0 * d.dv..(t0 + n) * d.dv], s)?;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// backward

/// One segment's inputs to the backward.
#[derive(Clone, Copy)]
struct BackwardIn<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    g: &'a [f32],
    s0: Option<&'a [f32]>,
    z0: Option<&'a [f32]>,
    gs: Option<&'a [f32]>,
    gz: Option<&'a [f32]>,
}

/// One segment's gradient outputs.
struct BackwardOut<'a> {
    dq: &'a mut [f32],
    dk: &'a mut [f32],
    dv: &'a mut [f32],
    ds0: &'a mut [f32],
    dz0: &'a mut [f32],
}

/// g' rows for `n` rows from `oa` (the recomputed [num | den − eps]) and the output gradient:
/// [scale·g/den, −scale·(g·num)/den²] when normalising, [scale·g, 0] otherwise.
fn augmented_grad(o: Opts, d: Dims, oa: &[f32], g: &[f32], gp: &mut [f32], n: usize) {
    for i in 0..n {
        let (oa, g) = (&oa[i * d.dva..(i + 1) * d.dva], &g[i * d.dv..(i + 1) * d.dv]);
        let row = &mut gp[i * d.dva..(i + 1) * d.dva];
        let f = o.factor(oa[d.dv]);
        for (r, &x) in row.iter_mut().zip(g) {
            *r = f * x;
        }
        row[d.dv] = if o.normalize {
            let dot: f32 = g.iter().zip(oa).map(|(a, b)| a * b).sum();
            -f * dot / (oa[d.dv] + o.eps)
        } else {
            0.0
        };
    }
}

multiversion! {
    /// dst[i·d + c] = grad[i·d + c] · φ'(x[i·d + c]), one loop per map (as `load_features`).
    fn chain_feature(fm: FeatureMap, grad: &[f32], x: &[f32], dst: &mut [f32]) {
        #[inline(always)]
        fn chain(grad: &[f32], x: &[f32], dst: &mut [f32], dphi: impl Fn(f32) -> f32) {
            dst.iter_mut().zip(grad).zip(x).for_each(|((o, &g), &x)| *o = g * dphi(x));
        }
        match fm {
            FeatureMap::Identity => chain(grad, x, dst, |_| 1.0),
            FeatureMap::Relu => chain(grad, x, dst, |x| dphi(FeatureMap::Relu, x)),
            FeatureMap::EluPlusOne => chain(grad, x, dst, |x| dphi(FeatureMap::EluPlusOne, x)),
        }
    }
}

/// ∂L/∂S' := [∂L/∂S_T, ∂L/∂z_T] (zeros where not given).
fn init_grad_state(ds: &mut [f32], gs: Option<&[f32]>, gz: Option<&[f32]>, d: Dims) {
    init_state(ds, gs, gz, d);
}

fn backward_segment(
    t: BackwardIn<'_>,
    out: BackwardOut<'_>,
    o: Opts,
    d: Dims,
    ws: &mut Workspace,
) -> Result<()> {
    if o.causal {
        causal_dq_pass(t, out.dq, o, d, ws)?;
        causal_dkv_pass(t, out.dk, out.dv, o, d, ws)?;
    } else {
        noncausal_backward(t, out.dq, out.dk, out.dv, o, d, ws)?;
    }
    for i in 0..d.dk {
        out.ds0[i * d.dv..(i + 1) * d.dv].copy_from_slice(&ws.ds[i * d.dva..i * d.dva + d.dv]);
        out.dz0[i] = ws.ds[i * d.dva + d.dv];
    }
    Ok(())
}

/// φ(K) of `n` rows into `kf` and its transpose into `kft` (backward layout).
fn load_keys_both(fm: FeatureMap, k: &[f32], n: usize, d: Dims, ws: &mut Workspace) {
    load_features(fm, k, n, d.dk, &mut ws.kf, d.dk);
    transpose(&ws.kf, n, d.dk, d.dk, &mut ws.kft, CHUNK);
}

/// Forward direction: recompute each chunk's outputs, form g', and
/// dφ(Q) = G' S'ᵀ_prev + mask_{j≤i}(G' V'ᵀ) φ(K). Leaves g' of every row in `ws.gp`.
fn causal_dq_pass(t: BackwardIn<'_>, dq: &mut [f32], o: Opts, d: Dims, ws: &mut Workspace) -> Result<()> {
    let (len, ld_l, dva) = (t.q.len() / d.dk, d.dk + CHUNK, d.dva);
    init_state(&mut ws.right, t.s0, t.z0, d);
    ws.gp.resize(len * dva, 0.0);
    for t0 in (0..len).step_by(CHUNK) {
        let n = CHUNK.min(len - t0);
        load_features(o.fm, &t.q[t0 * d.dk..], n, d.dk, &mut ws.left, ld_l);
        load_keys_both(o.fm, &t.k[t0 * d.dk..], n, d, ws);
        load_values(&mut ws.right, &t.v[t0 * d.dv..], n, d);
        chunk_numerators(ws, n, d, true)?;
        let gp = &mut ws.gp[t0 * dva..(t0 + n) * dva];
        augmented_grad(o, d, &ws.oa, &t.g[t0 * d.dv..], gp, n);
        let gp = &ws.gp[t0 * dva..(t0 + n) * dva];
        // dφ(Q) = G' S'ᵀ + mask(G' V'ᵀ) φ(K)
        transpose(&ws.right, d.dk, dva, dva, &mut ws.state_t, d.dk);
        mm((n, d.dk, dva), gp, (dva, 1), &ws.state_t, d.dk, &mut ws.dfeat, d.dk, false)?;
        transpose(&ws.right[d.dk * dva..], n, dva, dva, &mut ws.rows_t, CHUNK);
        masked_scores(gp, (dva, 1), &ws.rows_t, CHUNK, dva, n, true, &mut ws.square)?;
        masked_times(&ws.square, n, true, &ws.kf, d.dk, d.dk, &mut ws.dfeat, d.dk, true)?;
        let rows = t0 * d.dk..(t0 + n) * d.dk;
        chain_feature(o.fm, &ws.dfeat[..n * d.dk], &t.q[rows.clone()], &mut dq[rows]);
        update_state(ws, n, d)?;
    }
    Ok(())
}

/// Reverse direction, carrying dS' from the final state:
/// dφ(K) = mask_{t≥s}(V' G'ᵀ) φ(Q) + V' dS'ᵀ,  dV = mask_{t≥s}(φ(K) φ(Q)ᵀ) G' + φ(K) dS',
/// then dS' += φ(Q)ᵀ G'. The momentum's reverse sum is added to dV row by row.
fn causal_dkv_pass(
    t: BackwardIn<'_>,
    dk_out: &mut [f32],
    dv_out: &mut [f32],
    o: Opts,
    d: Dims,
    ws: &mut Workspace,
) -> Result<()> {
    let (len, ld_l, dva) = (t.q.len() / d.dk, d.dk + CHUNK, d.dva);
    init_grad_state(&mut ws.ds, t.gs, t.gz, d);
    ws.carry.fill(0.0);
    let chunks: Vec<usize> = (0..len).step_by(CHUNK).collect();
    for &t0 in chunks.iter().rev() {
        let n = CHUNK.min(len - t0);
        load_features(o.fm, &t.q[t0 * d.dk..], n, d.dk, &mut ws.left, ld_l);
        load_features(o.fm, &t.k[t0 * d.dk..], n, d.dk, &mut ws.kf, d.dk);
        load_values(&mut ws.right, &t.v[t0 * d.dv..], n, d);
        let gp = &ws.gp[t0 * dva..(t0 + n) * dva];
        let vals = &ws.right[d.dk * dva..(d.dk + n) * dva];
        // dφ(K) = mask(V' G'ᵀ) φ(Q) + V' dS'ᵀ
        transpose(gp, n, dva, dva, &mut ws.rows_t, CHUNK);
        masked_scores(vals, (dva, 1), &ws.rows_t, CHUNK, dva, n, false, &mut ws.square)?;
        masked_times(&ws.square, n, false, &ws.left, ld_l, d.dk, &mut ws.dfeat, d.dk, false)?;
        transpose(&ws.ds, d.dk, dva, dva, &mut ws.state_t, d.dk);
        mm((n, d.dk, dva), vals, (dva, 1), &ws.state_t, d.dk, &mut ws.dfeat, d.dk, true)?;
        let rows = t0 * d.dk..(t0 + n) * d.dk;
        chain_feature(o.fm, &ws.dfeat[..n * d.dk], &t.k[rows.clone()], &mut dk_out[rows]);
        // dV = mask(φ(K) φ(Q)ᵀ) G' + φ(K) dS'   (the first dv columns of dV')
        transpose(&ws.left, n, d.dk, ld_l, &mut ws.qft, CHUNK);
        masked_scores(&ws.kf, (d.dk, 1), &ws.qft, CHUNK, d.dk, n, false, &mut ws.square)?;
        let dv = &mut dv_out[t0 * d.dv..(t0 + n) * d.dv];
        masked_times(&ws.square, n, false, gp, dva, d.dv, dv, d.dv, false)?;
        mm((n, d.dv, d.dk), &ws.kf, (d.dk, 1), &ws.ds, dva, dv, d.dv, true)?;
        if let Some(eta) = o.eta {
            add_momentum_grad(eta, &t.g[t0 * d.dv..(t0 + n) * d.dv], dv, &mut ws.carry, d.dv);
        }
        // dS' += φ(Q)ᵀ G'
        mm((d.dk, dva, n), &ws.left, (1, ld_l), gp, dva, &mut ws.ds, dva, true)?;
    }
    Ok(())
}

/// dv_s += r_s with r_s = Σ_{t>s} η^{t−s} g_t, walking the chunk's rows backwards; `r` carries
/// r across chunks (r of the segment's last row is 0).
fn add_momentum_grad(eta: f32, g: &[f32], dv: &mut [f32], r: &mut [f32], width: usize) {
    for s in (0..dv.len() / width).rev() {
        let (dv_row, g_row) = (&mut dv[s * width..(s + 1) * width], &g[s * width..(s + 1) * width]);
        for ((y, rc), &gx) in dv_row.iter_mut().zip(r.iter_mut()).zip(g_row) {
            *y += *rc;
            *rc = eta * (*rc + gx);
        }
    }
}

/// Non-causal: S'_T = S'_0 + Σ φ(K)ᵀV'; per chunk g', dφ(Q) = G' S'_Tᵀ and dS' += φ(Q)ᵀG';
/// then dφ(K) = V' dS'ᵀ and dV = φ(K) dS' with the full dS'.
fn noncausal_backward(
    t: BackwardIn<'_>,
    dq: &mut [f32],
    dk_out: &mut [f32],
    dv_out: &mut [f32],
    o: Opts,
    d: Dims,
    ws: &mut Workspace,
) -> Result<()> {
    let (len, ld_l, dva) = (t.q.len() / d.dk, d.dk + CHUNK, d.dva);
    init_state(&mut ws.right, t.s0, t.z0, d);
    for t0 in (0..len).step_by(CHUNK) {
        let n = CHUNK.min(len - t0);
        load_features(o.fm, &t.k[t0 * d.dk..], n, d.dk, &mut ws.kf, d.dk);
        load_values(&mut ws.right, &t.v[t0 * d.dv..], n, d);
        update_state(ws, n, d)?;
    }
    init_grad_state(&mut ws.ds, t.gs, t.gz, d);
    ws.gp.resize(CHUNK * dva, 0.0);
    transpose(&ws.right, d.dk, dva, dva, &mut ws.state_t, d.dk);
    for t0 in (0..len).step_by(CHUNK) {
        let n = CHUNK.min(len - t0);
        load_features(o.fm, &t.q[t0 * d.dk..], n, d.dk, &mut ws.left, ld_l);
        chunk_numerators(ws, n, d, false)?;
        augmented_grad(o, d, &ws.oa, &t.g[t0 * d.dv..], &mut ws.gp, n);
        let gp = &ws.gp[..n * dva];
        mm((n, d.dk, dva), gp, (dva, 1), &ws.state_t, d.dk, &mut ws.dfeat, d.dk, false)?;
        let rows = t0 * d.dk..(t0 + n) * d.dk;
        chain_feature(o.fm, &ws.dfeat[..n * d.dk], &t.q[rows.clone()], &mut dq[rows]);
        mm((d.dk, dva, n), &ws.left, (1, ld_l), gp, dva, &mut ws.ds, dva, true)?;
    }
    transpose(&ws.ds, d.dk, dva, dva, &mut ws.state_t, d.dk);
    for t0 in (0..len).step_by(CHUNK) {
        let n = CHUNK.min(len - t0);
        load_features(o.fm, &t.k[t0 * d.dk..], n, d.dk, &mut ws.kf, d.dk);
        load_values(&mut ws.right, &t.v[t0 * d.dv..], n, d);
        let vals = &ws.right[d.dk * dva..(d.dk + n) * dva];
        mm((n, d.dk, dva), vals, (dva, 1), &ws.state_t, d.dk, &mut ws.dfeat, d.dk, false)?;
        let rows = t0 * d.dk..(t0 + n) * d.dk;
        chain_feature(o.fm, &ws.dfeat[..n * d.dk], &t.k[rows.clone()], &mut dk_out[rows]);
        let dv = &mut dv_out[t0 * d.dv..(t0 + n) * d.dv];
        mm((n, d.dv, d.dk), &ws.kf, (d.dk, 1), &ws.ds, dva, dv, d.dv, false)?;
    }
    Ok(())
}

pub(super) fn backward(p: &Problem, a: &ForwardArgs<'_>, b: &BackwardArgs<'_>) -> Result<BackwardResult> {
    let d = Dims { dk: p.dk, dv: p.dv, dva: p.dv + 1 };
    let (q, k, v) = (a.q.host_f32(OP)?, a.k.host_f32(OP)?, a.v.host_f32(OP)?);
    let g = b.grad_output.host_f32(OP)?;
    let s0 = a.s0.map(|s| s.host_slice::<f32>(OP)).transpose()?;
    let z0 = a.z0.map(|z| z.host_slice::<f32>(OP)).transpose()?;
    let gs = b.grad_state.map(|s| s.host_slice::<f32>(OP)).transpose()?;
    let gz = b.grad_normalizer.map(|z| z.host_slice::<f32>(OP)).transpose()?;
    let mut dq = output_vec::<f32>(p.rows * d.dk)?;
    let mut dk = output_vec::<f32>(p.rows * d.dk)?;
    let mut dv = output_vec::<f32>(p.rows * d.dv)?;
    let mut ds0 = output_vec::<f32>(p.states() * d.dk * d.dv)?;
    let mut dz0 = output_vec::<f32>(p.states() * d.dk)?;

    let row_outs = split_rows(&mut dq, &p.segments, d.dk)
        .into_iter()
        .zip(split_rows(&mut dk, &p.segments, d.dk))
        .zip(split_rows(&mut dv, &p.segments, d.dv));
    let state_outs = split_states(&mut ds0, &p.segments, d.dk * d.dv)?.into_iter().zip(split_states(
        &mut dz0,
        &p.segments,
        d.dk,
    )?);
    let tasks: Vec<(BackwardIn<'_>, BackwardOut<'_>)> = p
        .segments
        .iter()
        .zip(row_outs)
        .zip(state_outs)
        .map(|((seg, ((dq, dk), dv)), (ds0, dz0))| {
            let inputs = BackwardIn {
                q: rows(&q, seg, d.dk),
                k: rows(&k, seg, d.dk),
                v: rows(&v, seg, d.dv),
                g: rows(&g, seg, d.dv),
                s0: s0.map(|s| state(s, seg, d.dk * d.dv)),
                z0: z0.map(|z| state(z, seg, d.dk)),
                gs: gs.map(|s| state(s, seg, d.dk * d.dv)),
                gz: gz.map(|z| state(z, seg, d.dk)),
            };
            (inputs, BackwardOut { dq, dk, dv, ds0, dz0 })
        })
        .collect();
    let o = Opts::of(p);
    tasks
        .into_par_iter()
        .try_for_each_init(|| Workspace::new(d), |ws, (t, out)| backward_segment(t, out, o, d, ws))?;

    let dtype = a.q.dtype();
    Ok(BackwardResult {
        dq: to_dtype(dq, a.q.shape(), dtype),
        dk: to_dtype(dk, a.k.shape(), dtype),
        dv: to_dtype(dv, a.v.shape(), dtype),
        d_state: Tensor::from_host_vec(ds0, &[p.states(), d.dk, d.dv]),
        d_normalizer: Tensor::from_host_vec(dz0, &[p.states(), d.dk]),
    })
}

// ------------------------------------------------------------------------------------------
// layout helpers

/// The rows of `seg` in a `[rows, width]` matrix.
fn rows<'a>(data: &'a [f32], seg: &Segment, width: usize) -> &'a [f32] {
    &data[seg.row0 * width..(seg.row0 + seg.len) * width]
}

/// The state of `seg` in a `[states, width]` matrix.
fn state<'a>(data: &'a [f32], seg: &Segment, width: usize) -> &'a [f32] {
    &data[seg.state * width..(seg.state + 1) * width]
}

/// Splits a `[rows, width]` buffer into the segments' row blocks (segments tile the rows in
/// order).
fn split_rows<'a>(mut buf: &'a mut [f32], segments: &[Segment], width: usize) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(segments.len());
    for seg in segments {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(seg.len * width);
        out.push(head);
        buf = tail;
    }
    out
}

/// Splits a `[states, width]` buffer into the segments' states, in segment order.
fn split_states<'a>(buf: &'a mut [f32], segments: &[Segment], width: usize) -> Result<Vec<&'a mut [f32]>> {
    let mut slots: Vec<Option<&'a mut [f32]>> = buf.chunks_mut(width).map(Some).collect();
    segments
        .iter()
        .map(|seg| {
            slots.get_mut(seg.state).and_then(Option::take).ok_or_else(|| {
                Error::invalid(OP, "segments", "a state is used twice (a metakernels bug; please report)")
            })
        })
        .collect()
}

fn with_last(shape: &[usize], last: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    if let Some(l) = s.last_mut() {
        *l = last;
    }
    s
}

/// An f32 result as a tensor of `dtype` (round to nearest even).
fn to_dtype(data: Vec<f32>, shape: &[usize], dtype: DType) -> Tensor {
    use half::slice::HalfFloatSliceExt;
    match dtype {
        DType::F16 => {
            let mut h = vec![f16::ZERO; data.len()];
            h.convert_from_f32_slice(&data);
            Tensor::from_host_vec(h, shape)
        }
        DType::BF16 => {
            let mut h = vec![bf16::ZERO; data.len()];
            h.convert_from_f32_slice(&data);
            Tensor::from_host_vec(h, shape)
        }
        _ => Tensor::from_host_vec(data, shape),
    }
}

#[cfg(test)]
mod tests {
    use super::transpose;

    #[test]
    fn transpose_matches_the_definition_on_ragged_shapes() {
        for (rows, cols) in [(64, 65), (64, 64), (7, 3), (1, 1), (9, 17), (0, 5), (16, 0)] {
            let (ld_src, ld_dst) = (cols + 3, rows + 2);
            let src: Vec<f32> = (0..rows * ld_src).map(|i| i as f32).collect();
            let mut dst = vec![-1.0f32; cols * ld_dst];
            transpose(&src, rows, cols, ld_src, &mut dst, ld_dst);
            for c in 0..cols {
                for i in 0..ld_dst {
                    let want = if i < rows { src[i * ld_src + c] } else { -1.0 };
                    assert_eq!(dst[c * ld_dst + i], want, "{rows}x{cols} at ({c}, {i})");
                }
            }
        }
    }
}
