//! Launches of `kernels/momentum_attention.cu`.
//!
//! Forward: one launch of `mattn_fwd_<dtype>_d<D>` (tensor cores for f16/bf16, SIMT for f32),
//! grid = (B·H, query tiles). Backward: the forward again with η = 0 (attention output and base-2
//! log-sum-exp), `mattn_bwd_delta_<dtype>`, the backward kernel (`mattn_bwd_mma_<dtype>_d<D>` on
//! tensor cores for f16/bf16, the SIMT `mattn_bwd_f32_d<D>` for f32; one block per key tile, dQ
//! by f32 atomics into a zeroed buffer), and `mattn_dq_finish_<dtype>`. Every temporary is
//! linear in T.

use half::{bf16, f16};

use super::{BackwardInputs, MomentumAttentionGrads, Problem, Scan, SoftmaxParams};
use crate::cuda::{driver, grid_1d, CudaDevice, CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
use crate::tensor::CudaBuffer;
use crate::{DType, Element, Error, Result, Tensor};

const MODULE: &str = "momentum_attention";
const THREADS: u32 = 128;
const LOG2_E: f32 = std::f32::consts::LOG2_E;

/// Rows per query tile (forward) or key tile (backward) and dynamic shared memory of a kernel;
/// mirrors `FwdTile`, `SimtTile`, `BwdTile`, `BwdMmaTile` and `BwdMmaWideTile` in the .cu file.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    rows_per_block: usize,
    smem_bytes: usize,
}

fn forward_geometry(dtype: DType, d: usize) -> Geometry {
    if dtype == DType::F32 {
        let ld = d + 1;
        Geometry { rows_per_block: 32, smem_bytes: (3 * 32 * ld + 32 * 33) * 4 }
    } else {
        let bc = if d == 256 { 32 } else { 64 };
        Geometry { rows_per_block: 64, smem_bytes: (64 + 2 * bc) * (d + 8) * 2 }
    }
}

/// The backward kernel for a dtype and head dim, and its geometry: tensor cores for f16/bf16
/// (64 keys per block at D ≤ 128, `BwdMmaTile`; 32 keys per block at D = 256, `BwdMmaWideTile`),
/// SIMT for f32 (32 keys per block, `BwdTile`).
fn backward_kernel(dtype: DType, d: usize) -> (String, Geometry) {
    const PAD: usize = 8;
    let ld = d + PAD;
    let mma_name = || format!("mattn_bwd_mma_{}_d{d}", dtype.as_str());
    match (dtype, d) {
        (DType::F32, _) => {
            let ld = d + 1;
            let smem_bytes = (4 * 32 * ld + 2 * 32 * 33 + 2 * 32) * 4;
            (format!("mattn_bwd_f32_d{d}"), Geometry { rows_per_block: 32, smem_bytes })
        }
        (_, 256) => {
            // K, V, Q, dO tiles of 32 rows; Pᵀ and dSᵀ [32][32 + PAD]; lse2 and delta.
            let smem_bytes = 4 * 32 * ld * 2 + 2 * 32 * (32 + PAD) * 2 + 2 * 32 * 4;
            (mma_name(), Geometry { rows_per_block: 32, smem_bytes })
        }
        _ => {
            // K, V tiles of 64 rows, Q, dO of 32; dSᵀ [64][32 + PAD]; lse2 and delta.
            let smem_bytes = (2 * 64 + 2 * 32) * ld * 2 + 64 * (32 + PAD) * 2 + 2 * 32 * 4;
            (mma_name(), Geometry { rows_per_block: 64, smem_bytes })
        }
    }
}

/// A tiled launch: heads on x, tiles of `geometry.rows_per_block` rows on y, with
/// `geometry.smem_bytes` of dynamic shared memory (opted into above 48 KiB).
fn tiled_config(
    dev: &CudaDevice,
    func: &CudaFunction,
    problem: &Problem,
    geometry: Geometry,
    op: &'static str,
) -> Result<LaunchConfig> {
    const MAX_GRID_Y: usize = 65_535;
    let tiles = problem.t.div_ceil(geometry.rows_per_block);
    if tiles > MAX_GRID_Y || problem.bh > i32::MAX as usize {
        return Err(Error::invalid(
            op,
            "shape",
            format!(
                "B·H = {} and T = {} exceed the CUDA launch limits (B·H < 2^31, T ≤ {})",
                problem.bh,
                problem.t,
                MAX_GRID_Y * geometry.rows_per_block
            ),
        ));
    }
    dev.allow_shared_bytes(func, op, geometry.smem_bytes)?;
    Ok(LaunchConfig {
        // Heads on x (up to 2^31 − 1), tiles on y; the kernels take the longest tiles first.
        grid_dim: (problem.bh as u32, tiles as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: geometry.smem_bytes as u32,
    })
}

// ----- forward -----------------------------------------------------------------------------------

pub(super) fn forward(
    problem: &Problem,
    params: &SoftmaxParams,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    shape: &[usize],
) -> Result<Tensor> {
    let dev = q.cuda_device()?;
    let out = match problem.dtype {
        DType::F16 => CudaBuffer::wrap(forward_typed::<f16>(dev, problem, params, q, k, v, false)?.out),
        DType::BF16 => CudaBuffer::wrap(forward_typed::<bf16>(dev, problem, params, q, k, v, false)?.out),
        _ => CudaBuffer::wrap(forward_typed::<f32>(dev, problem, params, q, k, v, false)?.out),
    };
    Ok(Tensor::from_cuda_buffer(out, shape, problem.dtype, q.device()))
}

/// The output, the attention without momentum and the base-2 row log-sum-exps `[B, H, T]`.
pub(super) fn forward_with_state(
    problem: &Problem,
    params: &SoftmaxParams,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    shape: &[usize],
) -> Result<[Tensor; 3]> {
    fn typed<T: Element>(
        problem: &Problem,
        params: &SoftmaxParams,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        shape: &[usize],
    ) -> Result<[Tensor; 3]> {
        let dev = q.cuda_device()?;
        let fwd = forward_typed::<T>(dev, problem, params, q, k, v, true)?;
        let attn = fwd
            .attn
            .ok_or_else(|| Error::invalid(super::OP_FORWARD, "state", "attention not saved (a bug)"))?;
        let tensor = |b, shape: &[usize], dtype| Tensor::from_cuda_buffer(b, shape, dtype, q.device());
        Ok([
            tensor(CudaBuffer::wrap(fwd.out), shape, T::DTYPE),
            tensor(CudaBuffer::wrap(attn), shape, T::DTYPE),
            tensor(CudaBuffer::wrap(fwd.lse2), &shape[..3], DType::F32),
        ])
    }
    match problem.dtype {
        DType::F16 => typed::<f16>(problem, params, q, k, v, shape),
        DType::BF16 => typed::<bf16>(problem, params, q, k, v, shape),
        _ => typed::<f32>(problem, params, q, k, v, shape),
    }
}

/// What one forward launch produced.
struct Forward<T> {
    out: CudaSlice<T>,
    /// The attention without momentum, when asked for.
    attn: Option<CudaSlice<T>>,
    /// Base-2 row log-sum-exps, `[bh, t]`.
    lse2: CudaSlice<f32>,
}

fn forward_typed<T: Element>(
    dev: &CudaDevice,
    problem: &Problem,
    params: &SoftmaxParams,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    save_attention: bool,
) -> Result<Forward<T>> {
    let op = super::OP_FORWARD;
    let (qs, ks, vs) = (q.cuda_slice::<T>(op)?, k.cuda_slice::<T>(op)?, v.cuda_slice::<T>(op)?);
    let mut out = dev.alloc::<T>(problem.numel())?;
    let mut attn = if save_attention { Some(dev.alloc::<T>(problem.numel())?) } else { None };
    let mut lse2 = dev.alloc::<f32>(problem.bh * problem.t)?;
    let name = format!("mattn_fwd_{}_d{}", T::DTYPE.as_str(), problem.d);
    let func = dev.function(MODULE, &name)?;
    let cfg = tiled_config(dev, &func, problem, forward_geometry(T::DTYPE, problem.d), op)?;
    let t_len = problem.t as i32;
    let scale_log2 = params.scale * LOG2_E;
    let horizon = params.horizon.min(problem.t) as i32; // lags past T change nothing; keeps int math in range
    let null_pointer: u64 = 0; // attn_out == nullptr: the kernel skips that store
    let mut args = dev.stream().launch_builder(&func);
    args.arg(qs).arg(ks).arg(vs).arg(&mut out);
    match attn.as_mut() {
        Some(a) => args.arg(a),
        None => args.arg(&null_pointer),
    };
    args.arg(&mut lse2).arg(&t_len).arg(&scale_log2).arg(&params.eta).arg(&horizon);
    // SAFETY: q, k, v, out (and attn when given) hold bh·t·d elements of T and lse2 bh·t floats
    // (checked by Problem::check and the allocations above); a null attn_out is skipped by the
    // kernel; the grid covers every (query tile, head) and each block writes only its own rows;
    // the argument list matches MK_FWD in the .cu file.
    unsafe { args.launch(cfg) }.map_err(driver(format!("launching {name}")))?;
    Ok(Forward { out, attn, lse2 })
}

/// The reference kernel (one block per query row; explicit momentum sum), for the GPU tests.
#[doc(hidden)]
pub(crate) fn forward_reference(
    problem: &Problem,
    params: &SoftmaxParams,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<Tensor> {
    fn typed<T: Element>(
        problem: &Problem,
        params: &SoftmaxParams,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        let op = "momentum_attention::forward_reference";
        let dev = q.cuda_device()?;
        let (qs, ks, vs) = (q.cuda_slice::<T>(op)?, k.cuda_slice::<T>(op)?, v.cuda_slice::<T>(op)?);
        let mut out = dev.alloc::<T>(problem.numel())?;
        let name = format!("mattn_fwd_reference_{}", T::DTYPE.as_str());
        let func = dev.function(MODULE, &name)?;
        if problem.t > i32::MAX as usize || problem.bh > 65_535 {
            return Err(Error::invalid(op, "shape", "too large for the reference kernel"));
        }
        let cfg = LaunchConfig {
            grid_dim: (problem.t as u32, problem.bh as u32, 1),
            block_dim: (problem.d as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (t_len, d) = (problem.t as i32, problem.d as i32);
        let mut args = dev.stream().launch_builder(&func);
        args.arg(qs).arg(ks).arg(vs).arg(&mut out).arg(&t_len).arg(&d).arg(&params.scale).arg(&params.eta);
        // SAFETY: buffers hold bh·t·d elements; one block of d threads per (row, head) writes
        // its own row; arguments match mattn_fwd_reference_<dtype>.
        unsafe { args.launch(cfg) }.map_err(driver(format!("launching {name}")))?;
        Ok(Tensor::from_cuda_buffer(CudaBuffer::wrap(out), q.shape(), T::DTYPE, q.device()))
    }
    match problem.dtype {
        DType::F16 => typed::<f16>(problem, params, q, k, v),
        DType::BF16 => typed::<bf16>(problem, params, q, k, v),
        _ => typed::<f32>(problem, params, q, k, v),
    }
}

/// The backward by `mattn_bwd_reference_rows_<dtype>` (dq and each row's softmax statistics and
/// Δ) then `mattn_bwd_reference_cols_<dtype>` (dk, dv with the momentum term): one block of D
/// threads per row, the obvious algorithm. What the GPU tests hold the fast backward against.
pub(crate) fn backward_reference(
    problem: &Problem,
    params: &SoftmaxParams,
    inputs: &BackwardInputs<'_>,
    shape: &[usize],
) -> Result<MomentumAttentionGrads> {
    fn typed<T: Element>(
        dev: &CudaDevice,
        problem: &Problem,
        params: &SoftmaxParams,
        inputs: &BackwardInputs<'_>,
    ) -> Result<Grads<T>> {
        let op = "MomentumAttention::backward_reference_kernel";
        if problem.t > i32::MAX as usize || problem.bh > 65_535 {
            return Err(Error::invalid(op, "shape", "too large for the reference kernel"));
        }
        let (q, k) = (inputs.q.cuda_slice::<T>(op)?, inputs.k.cuda_slice::<T>(op)?);
        let (v, g) = (inputs.v.cuda_slice::<T>(op)?, inputs.grad_output.cuda_slice::<T>(op)?);
        let n = problem.numel();
        let mut stats = dev.alloc::<f32>(problem.bh * problem.t * 3)?;
        let (mut dq, mut dk, mut dv) = (dev.alloc::<T>(n)?, dev.alloc::<T>(n)?, dev.alloc::<T>(n)?);
        let cfg = LaunchConfig {
            grid_dim: (problem.t as u32, problem.bh as u32, 1),
            block_dim: (problem.d as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (t_len, d) = (problem.t as i32, problem.d as i32);
        let rows = format!("mattn_bwd_reference_rows_{}", T::DTYPE.as_str());
        let func = dev.function(MODULE, &rows)?;
        let mut args = dev.stream().launch_builder(&func);
        args.arg(q).arg(k).arg(v).arg(g).arg(&mut stats).arg(&mut dq).arg(&t_len).arg(&d).arg(&params.scale);
        // SAFETY: q, k, v, g, dq hold bh·t·d elements and stats bh·t·3 floats; one block of d
        // threads per (row, head) writes its own row; arguments match the kernel.
        unsafe { args.launch(cfg) }.map_err(driver(format!("launching {rows}")))?;
        let cols = format!("mattn_bwd_reference_cols_{}", T::DTYPE.as_str());
        let func = dev.function(MODULE, &cols)?;
        let mut args = dev.stream().launch_builder(&func);
        args.arg(q).arg(k).arg(v).arg(g).arg(&stats).arg(&mut dk).arg(&mut dv);
        args.arg(&t_len).arg(&d).arg(&params.scale).arg(&params.eta);
        // SAFETY: as above; one block per (key row, head) writes that row of dk and dv.
        unsafe { args.launch(cfg) }.map_err(driver(format!("launching {cols}")))?;
        Ok((dq, dk, dv))
    }
    grads_by_dtype(problem, params, inputs, shape, (typed, typed, typed))
}

/// Attention with η = 0, then `mattn_momentum_scan_<dtype>` in place (one thread per head
/// column, all T rows): the unfused baseline.
pub(crate) fn forward_unfused(
    problem: &Problem,
    params: &SoftmaxParams,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<Tensor> {
    fn typed<T: Element>(
        problem: &Problem,
        params: &SoftmaxParams,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        let dev = q.cuda_device()?;
        let plain = params.without_momentum();
        let mut out = forward_typed::<T>(dev, problem, &plain, q, k, v, false)?.out;
        let v = v.cuda_slice::<T>("MomentumAttention::forward_unfused")?;
        momentum_scan(dev, problem, params.eta, v, &mut out, Scan::Forward)?;
        Ok(Tensor::from_cuda_buffer(CudaBuffer::wrap(out), q.shape(), T::DTYPE, q.device()))
    }
    match problem.dtype {
        DType::F16 => typed::<f16>(problem, params, q, k, v),
        DType::BF16 => typed::<bf16>(problem, params, q, k, v),
        _ => typed::<f32>(problem, params, q, k, v),
    }
}

/// The attention backward with η = 0, then `mattn_momentum_scan_reverse_<dtype>` adding the
/// momentum term's gradient into dv: the unfused baseline of the backward.
pub(super) fn backward_unfused(
    problem: &Problem,
    params: &SoftmaxParams,
    inputs: &BackwardInputs<'_>,
    shape: &[usize],
) -> Result<MomentumAttentionGrads> {
    fn typed<T: Element>(
        dev: &CudaDevice,
        problem: &Problem,
        params: &SoftmaxParams,
        inputs: &BackwardInputs<'_>,
    ) -> Result<Grads<T>> {
        let plain = params.without_momentum();
        let (dq, dk, mut dv) = backward_typed::<T>(dev, problem, &plain, inputs)?;
        let grad = inputs.grad_output.cuda_slice::<T>("MomentumAttention::backward_unfused")?;
        momentum_scan(dev, problem, params.eta, grad, &mut dv, Scan::Reverse)?;
        Ok((dq, dk, dv))
    }
    grads_by_dtype(problem, params, inputs, shape, (typed, typed, typed))
}

/// `out += Σ η^{|t−s|} x` along T in place, over earlier rows (`Scan::Forward`) or later ones
/// (`Scan::Reverse`): `mattn_momentum_scan[_reverse]_<dtype>`, one thread per head column.
fn momentum_scan<T: Element>(
    dev: &CudaDevice,
    problem: &Problem,
    eta: f32,
    x: &CudaSlice<T>,
    out: &mut CudaSlice<T>,
    scan: Scan,
) -> Result<()> {
    let direction = match scan {
        Scan::Forward => "",
        Scan::Reverse => "reverse_",
    };
    let name = format!("mattn_momentum_scan_{direction}{}", T::DTYPE.as_str());
    let func = dev.function(MODULE, &name)?;
    let (t_len, d, columns) = (problem.t as u64, problem.d as u64, (problem.bh * problem.d) as u64);
    let mut args = dev.stream().launch_builder(&func);
    args.arg(x).arg(out).arg(&columns).arg(&t_len).arg(&d).arg(&eta);
    // SAFETY: x and out hold bh·t·d elements; one thread per (head, column) of the bh·d covered
    // by the grid-stride loop; arguments match mattn_momentum_scan[_reverse]_<dtype>.
    unsafe { args.launch(grid_1d(problem.bh * problem.d, 128)) }
        .map_err(driver(format!("launching {name}")))?;
    Ok(())
}

// ----- backward ----------------------------------------------------------------------------------

pub(super) fn backward(
    problem: &Problem,
    params: &SoftmaxParams,
    inputs: &BackwardInputs<'_>,
    shape: &[usize],
) -> Result<MomentumAttentionGrads> {
    grads_by_dtype(problem, params, inputs, shape, (backward_typed, backward_typed, backward_typed))
}

type Grads<T> = (CudaSlice<T>, CudaSlice<T>, CudaSlice<T>);

fn wrap3<T: Element>((a, b, c): Grads<T>) -> (CudaBuffer, CudaBuffer, CudaBuffer) {
    (CudaBuffer::wrap(a), CudaBuffer::wrap(b), CudaBuffer::wrap(c))
}

/// One storage type's instance of a backward: dq, dk, dv as device buffers.
type TypedBackward<T> = fn(&CudaDevice, &Problem, &SoftmaxParams, &BackwardInputs<'_>) -> Result<Grads<T>>;

/// Runs the f16, bf16 or f32 instance of a backward, as the problem's dtype says, and wraps its
/// gradients as tensors of `shape`.
fn grads_by_dtype(
    problem: &Problem,
    params: &SoftmaxParams,
    inputs: &BackwardInputs<'_>,
    shape: &[usize],
    (half, brain, single): (TypedBackward<f16>, TypedBackward<bf16>, TypedBackward<f32>),
) -> Result<MomentumAttentionGrads> {
    let q = inputs.q;
    let dev = q.cuda_device()?;
    let (dq, dk, dv) = match problem.dtype {
        DType::F16 => wrap3(half(dev, problem, params, inputs)?),
        DType::BF16 => wrap3(brain(dev, problem, params, inputs)?),
        _ => wrap3(single(dev, problem, params, inputs)?),
    };
    let tensor = |b| Tensor::from_cuda_buffer(b, shape, problem.dtype, q.device());
    Ok(MomentumAttentionGrads { dq: tensor(dq), dk: tensor(dk), dv: tensor(dv) })
}

fn backward_typed<T: Element>(
    dev: &CudaDevice,
    problem: &Problem,
    params: &SoftmaxParams,
    inputs: &BackwardInputs<'_>,
) -> Result<Grads<T>> {
    let op = super::OP_BACKWARD;
    let BackwardInputs { q, k, v, grad_output, saved } = *inputs;
    let n = problem.numel();
    let rows = problem.bh * problem.t;
    let dtype = T::DTYPE.as_str();
    // Attention output without momentum, and the log-sum-exps: saved, or recomputed.
    let recomputed;
    let (attn, lse2) = match saved {
        Some((attn, lse2)) => (attn.cuda_slice::<T>(op)?, lse2.cuda_slice::<f32>(op)?),
        None => {
            let plain = params.without_momentum();
            recomputed = forward_typed::<T>(dev, problem, &plain, q, k, v, false)?;
            (&recomputed.out, &recomputed.lse2)
        }
    };
    let (qs, ks, vs) = (q.cuda_slice::<T>(op)?, k.cuda_slice::<T>(op)?, v.cuda_slice::<T>(op)?);
    let gs = grad_output.cuda_slice::<T>(op)?;

    // delta_t = Σ_d dO·O_attn: one warp per row.
    let mut delta = dev.alloc::<f32>(rows)?;
    {
        let name = format!("mattn_bwd_delta_{dtype}");
        let func = dev.function(MODULE, &name)?;
        let blocks = rows.div_ceil(8);
        if blocks > i32::MAX as usize {
            return Err(Error::invalid(op, "shape", format!("{rows} rows exceed the CUDA grid limit")));
        }
        let cfg =
            LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let (rows_arg, d) = (rows as u64, problem.d as i32);
        let mut args = dev.stream().launch_builder(&func);
        args.arg(gs).arg(attn).arg(&mut delta).arg(&rows_arg).arg(&d);
        // SAFETY: grad and attn hold rows·d elements, delta rows floats; one warp per row,
        // 8 warps per block cover every row; arguments match mattn_bwd_delta_<dtype>.
        unsafe { args.launch(cfg) }.map_err(driver(format!("launching {name}")))?;
    }

    let mut dq_acc = dev.alloc_zeros::<f32>(n)?;
    let mut dk = dev.alloc::<T>(n)?;
    let mut dv = dev.alloc::<T>(n)?;
    {
        let (name, geometry) = backward_kernel(T::DTYPE, problem.d);
        let func = dev.function(MODULE, &name)?;
        let cfg = tiled_config(dev, &func, problem, geometry, op)?;
        let t_len = problem.t as i32;
        let horizon = params.horizon.min(problem.t) as i32; // lags past T change nothing; keeps int math in range
        let mut args = dev.stream().launch_builder(&func);
        args.arg(qs).arg(ks).arg(vs).arg(gs).arg(lse2).arg(&delta);
        args.arg(&mut dq_acc).arg(&mut dk).arg(&mut dv);
        args.arg(&t_len).arg(&params.scale).arg(&params.eta).arg(&horizon);
        // SAFETY: every tensor buffer holds bh·t·d elements, lse2 and delta bh·t floats; each
        // block writes the dK/dV rows of its own key tile and adds to dq_acc atomically;
        // arguments match MK_BWD.
        unsafe { args.launch(cfg) }.map_err(driver(format!("launching {name}")))?;
    }

    let mut dq = dev.alloc::<T>(n)?;
    {
        let name = format!("mattn_dq_finish_{dtype}");
        let func = dev.function(MODULE, &name)?;
        let n_arg = n as u64;
        let mut args = dev.stream().launch_builder(&func);
        args.arg(&dq_acc).arg(&mut dq).arg(&n_arg);
        // SAFETY: both buffers hold n elements; grid-stride loop; arguments match
        // mattn_dq_finish_<dtype>.
        unsafe { args.launch(grid_1d(n, 256)) }.map_err(driver(format!("launching {name}")))?;
    }
    Ok((dq, dk, dv))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sm_80's opt-in limit (163 KiB); sm_90 allows 227 KiB.
    const SM80_MAX_SHARED: usize = 163 * 1024;

    #[test]
    fn every_kernel_fits_sm80_shared_memory_and_its_epilogue_staging() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for d in super::super::SUPPORTED_HEAD_DIMS {
                let fwd = forward_geometry(dtype, d);
                let (name, bwd) = backward_kernel(dtype, d);
                for (what, g) in [("forward", fwd), (name.as_str(), bwd)] {
                    assert!(g.smem_bytes <= SM80_MAX_SHARED, "{what} {dtype} d={d}: {} bytes", g.smem_bytes);
                    // Each epilogue stages its tile's rows as f32 [rows][D + 4] (the SIMT kernels
                    // [rows][D + 1]) in the same shared memory.
                    assert!(g.rows_per_block * (d + 4) * 4 <= g.smem_bytes || dtype == DType::F32);
                }
            }
        }
    }

    #[test]
    fn backward_kernel_choice_and_shared_bytes_mirror_the_cu_file() {
        // BwdMmaTile: (2·64 + 2·32)·(D + 8)·2 + 64·40·2 + 256.
        assert_eq!(backward_kernel(DType::F16, 64).0, "mattn_bwd_mma_f16_d64");
        assert_eq!(backward_kernel(DType::BF16, 128).1.smem_bytes, 192 * 136 * 2 + 5120 + 256);
        // BwdMmaWideTile at D = 256: 4·32·264·2 + 2·32·40·2 + 256 = 72,960 bytes, 32 keys per block.
        let (name, g) = backward_kernel(DType::BF16, 256);
        assert_eq!((name.as_str(), g.rows_per_block, g.smem_bytes), ("mattn_bwd_mma_bf16_d256", 32, 72_960));
        assert_eq!(backward_kernel(DType::F32, 256).0, "mattn_bwd_f32_d256");
    }
}
