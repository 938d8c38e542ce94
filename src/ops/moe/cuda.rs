//! Launches of `kernels/moe.cu`: top-1 routing from logits, dispatch/combine row moves, and
//! the batched least squares (device normal equations + on-chip Cholesky, host f64 for what the
//! device flags or cannot hold).

use super::solve::solve_normal;
use super::Routing;
use crate::cuda::{driver, CudaDevice, CudaSlice, LaunchConfig, PushKernelArg};
use crate::tensor::CudaBuffer;
use crate::{DType, Device, Error, Result, Tensor};

const MODULE: &str = "moe";
/// Warps per block (one row or token per warp) and the grid cap of the grid-stride kernels.
const ROW_THREADS: u32 = 256;
const MAX_BLOCKS: usize = 65_535;
/// The on-chip Cholesky holds n·(n + r) floats; the normal-equation kernel stages n + r columns.
const CHOLESKY_MAX_N: usize = 64;
const CHOLESKY_MAX_FLOATS: usize = 8192;
const GRAM_MAX_COLS: usize = 256;
/// Relative pivot threshold for systems whose Gram matrix was formed in f32 on the device.
const DEVICE_REL_TOL: f64 = 1e-6;

fn row_grid(rows: usize) -> LaunchConfig {
    let warps = (ROW_THREADS / 32) as usize;
    let blocks = rows.div_ceil(warps).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// (expert [N] u32, probability [N] f32), or NonFinite.
pub(super) fn top1_logits(logits: &Tensor) -> Result<(Tensor, Tensor)> {
    const OP: &str = "moe::route_top1_logits";
    let dev = logits.cuda_device()?.clone();
    let (n, k) = (logits.shape()[0], logits.shape()[1]);
    let mut expert = dev.alloc::<u32>(n)?;
    let mut probs = dev.alloc::<f32>(n)?;
    let mut status = dev.alloc_zeros::<u32>(1)?;
    let name = format!("top1_logits_{}", logits.dtype().as_str());
    let f = dev.function(MODULE, &name)?;
    let (ni, ki) = (n as i32, k as i32);
    macro_rules! go {
        ($t:ty) => {{
            let l = logits.cuda_slice::<$t>(OP)?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(l).arg(&ni).arg(&ki).arg(&mut expert).arg(&mut probs).arg(&mut status);
            // SAFETY: one warp per row (grid-stride); logits n·k, outputs n each.
            unsafe { b.launch(row_grid(n)) }.map_err(driver(format!("launching {name}")))?;
        }};
    }
    match logits.dtype() {
        DType::F32 => go!(f32),
        DType::F16 => go!(half::f16),
        DType::BF16 => go!(half::bf16),
        other => return Err(Error::UnsupportedDType { op: OP, dtype: other, supported: "f32, f16, bf16" }),
    }
    if dev.dtoh(&status, 1)?[0] != 0 {
        return Err(Error::NonFinite { op: OP, what: "logits".into() });
    }
    let device = logits.device();
    Ok((
        Tensor::from_cuda_buffer(CudaBuffer::U32(expert), &[n], DType::U32, device),
        Tensor::from_cuda_buffer(CudaBuffer::F32(probs), &[n], DType::F32, device),
    ))
}

pub(super) fn dispatch(x: &Tensor, routing: &Routing) -> Result<Tensor> {
    move_rows(x, routing, false)
}

pub(super) fn combine(grouped: &Tensor, routing: &Routing, weights: Option<&Tensor>) -> Result<Tensor> {
    match weights {
        None => move_rows(grouped, routing, true),
        Some(w) => scatter_scaled(grouped, routing, w, Kernels::Fast),
    }
}

/// `combine` with the one-thread-per-byte (unweighted) or one-thread-per-element (weighted)
/// reference kernels.
pub(super) fn combine_reference(
    grouped: &Tensor,
    routing: &Routing,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    match weights {
        None => move_rows_reference(grouped, routing, true),
        Some(w) => scatter_scaled(grouped, routing, w, Kernels::Reference),
    }
}

/// The weighted combine: `scatter_scaled_<dtype>` (one warp per row, 4-element vectors) or its
/// reference (one thread per element).
fn scatter_scaled(grouped: &Tensor, routing: &Routing, w: &Tensor, kernels: Kernels) -> Result<Tensor> {
    const OP: &str = "moe::combine";
    let dev = grouped.cuda_device()?.clone();
    let (n, d) = (grouped.shape()[0], grouped.shape()[1]);
    check_row_bytes(d * grouped.dtype().size_in_bytes(), grouped, OP)?;
    let idx = routing.order.cuda_slice::<u32>(OP)?;
    let ws = w.cuda_slice::<f32>(OP)?;
    let name = match kernels {
        Kernels::Fast => format!("scatter_scaled_{}", grouped.dtype().as_str()),
        Kernels::Reference => format!("scatter_scaled_reference_{}", grouped.dtype().as_str()),
    };
    let cfg = match kernels {
        Kernels::Fast => row_grid(n),
        Kernels::Reference => crate::cuda::grid_1d(n * d, 256),
    };
    let f = dev.function(MODULE, &name)?;
    let (ni, di) = (n as i32, d as i32);
    macro_rules! go {
        ($t:ty, $variant:ident) => {{
            let src = grouped.cuda_slice::<$t>(OP)?;
            let mut out = dev.alloc::<$t>(n * d)?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(src).arg(idx).arg(ws).arg(&ni).arg(&di).arg(&mut out);
            // SAFETY: one warp per grouped row (fast) or a grid-stride loop over its elements
            // (reference); order is a permutation of 0..n (Routing's invariant), so every output
            // row is written exactly once; 4-element vectors only when d % 4 == 0 (rows then
            // stay 4-element aligned).
            unsafe { b.launch(cfg) }.map_err(driver(format!("launching {name}")))?;
            CudaBuffer::$variant(out)
        }};
    }
    let buffer = match grouped.dtype() {
        DType::F32 => go!(f32, F32),
        DType::F16 => go!(half::f16, F16),
        DType::BF16 => go!(half::bf16, BF16),
        other => return Err(Error::UnsupportedDType { op: OP, dtype: other, supported: "f32, f16, bf16" }),
    };
    Ok(Tensor::from_cuda_buffer(buffer, &[n, d], grouped.dtype(), grouped.device()))
}

/// The row kernels take a row's length (in elements or bytes) as an i32.
fn check_row_bytes(row_bytes: usize, t: &Tensor, op: &'static str) -> Result<()> {
    if row_bytes > i32::MAX as usize {
        return Err(Error::shape(op, "rows", "[N, D] with rows under 2³¹ bytes on CUDA", t.shape()));
    }
    Ok(())
}

/// Gather (`scatter = false`: dst[j] = src[order[j]]) or scatter (dst[order[j]] = src[j]) of
/// whole rows, moved as the widest vectors that divide a row's bytes.
fn move_rows(src: &Tensor, routing: &Routing, scatter: bool) -> Result<Tensor> {
    const OP: &str = "moe::dispatch/combine";
    let dev = src.cuda_device()?.clone();
    let (n, d) = (src.shape()[0], src.shape()[1]);
    let idx = routing.order.cuda_slice::<u32>(OP)?;
    let row_bytes = d * src.dtype().size_in_bytes();
    check_row_bytes(row_bytes, src, OP)?;
    let scatter_i = i32::from(scatter);
    let ni = n as i32;
    macro_rules! go {
        ($t:ty, $variant:ident) => {{
            let s = src.cuda_slice::<$t>(OP)?;
            let mut out = dev.alloc::<$t>(n * d)?;
            if n > 0 && d > 0 {
                let (kernel, width) = match row_bytes {
                    b if b % 16 == 0 => ("move_rows_v16", 16),
                    b if b % 4 == 0 => ("move_rows_v4", 4),
                    _ => ("move_rows_v2", 2),
                };
                let vecs = (row_bytes / width) as i32;
                let f = dev.function(MODULE, kernel)?;
                let mut b = dev.stream().launch_builder(&f);
                b.arg(s).arg(idx).arg(&ni).arg(&vecs).arg(&scatter_i).arg(&mut out);
                // SAFETY: the kernel takes raw bytes as `width`-byte vectors; allocations are
                // 256-byte aligned and every row starts at a multiple of `width` bytes because
                // `width` divides the row size. idx is a permutation of 0..n.
                unsafe { b.launch(row_grid(n)) }.map_err(driver(format!("launching {kernel}")))?;
            }
            CudaBuffer::$variant(out)
        }};
    }
    let buffer = match src.dtype() {
        DType::F32 => go!(f32, F32),
        DType::F16 => go!(half::f16, F16),
        DType::BF16 => go!(half::bf16, BF16),
        other => return Err(Error::UnsupportedDType { op: OP, dtype: other, supported: "f32, f16, bf16" }),
    };
    Ok(Tensor::from_cuda_buffer(buffer, &[n, d], src.dtype(), src.device()))
}

/// Segments are contiguous: offsets [S+1] from their bounds.
fn segment_offsets(segments: &[(usize, usize)]) -> Vec<u32> {
    let mut off = Vec::with_capacity(segments.len() + 1);
    off.push(segments.first().map_or(0, |s| s.0) as u32);
    off.extend(segments.iter().map(|s| s.1 as u32));
    off
}

/// The device normal equations G = [XᵀX | XᵀY], `[S, n, n + r]` f32.
#[allow(clippy::too_many_arguments)]
fn gram(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    y: &CudaSlice<f32>,
    seg: &CudaSlice<u32>,
    systems: usize,
    n: usize,
    r: usize,
    reference: bool,
) -> Result<CudaSlice<f32>> {
    if !reference && n.saturating_add(r) > GRAM_MAX_COLS {
        // The callers route wider systems to the host; launching would overrun the staging tile.
        return Err(Error::invalid(
            "moe (cuda)",
            "normal equations",
            "n + r > 256 on the tiled kernel (a bug)",
        ));
    }
    // Saturating: a product past usize (wide x with no rows) is an allocation the device refuses.
    let total = systems.saturating_mul(n).saturating_mul(n.saturating_add(r));
    let mut g = dev.alloc::<f32>(total)?;
    let (ni, ri, si) = (n as i32, r as i32, systems as i32);
    if reference {
        let f = dev.function(MODULE, "normal_equations_reference_f32")?;
        let cfg = LaunchConfig {
            grid_dim: (total.div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = dev.stream().launch_builder(&f);
        b.arg(x).arg(y).arg(seg).arg(&si).arg(&ni).arg(&ri).arg(&mut g);
        // SAFETY: one thread per entry of g; segments index rows of x (· × n) and y (· × r).
        unsafe { b.launch(cfg) }.map_err(driver("launching normal_equations_reference_f32"))?;
    } else {
        let f = dev.function(MODULE, "normal_equations_f32")?;
        let cfg =
            LaunchConfig { grid_dim: (systems as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut b = dev.stream().launch_builder(&f);
        b.arg(x).arg(y).arg(seg).arg(&ni).arg(&ri).arg(&mut g);
        // SAFETY: one block per system; n + r ≤ 256 columns fit the kernel's staging tile
        // (checked above); g holds systems·n·(n + r) floats.
        unsafe { b.launch(cfg) }.map_err(driver("launching normal_equations_f32"))?;
    }
    Ok(g)
}

/// Least squares over contiguous row segments on the device (see `moe::lstsq` for the method).
#[allow(clippy::too_many_arguments)]
pub(super) fn lstsq_segments(
    x: &Tensor,
    y: &Tensor,
    n: usize,
    r: usize,
    segments: &[(usize, usize)],
    ridge: f64,
    out_shape: &[usize],
    op: &'static str,
) -> Result<Tensor> {
    let device = x.device();
    if segments.is_empty() {
        return Tensor::zeros(out_shape, DType::F32, device);
    }
    if n.saturating_add(r) > GRAM_MAX_COLS {
        // Too wide for the staging tile: the documented host path (f64 throughout).
        let cpu = Device::cpu();
        let w = super::solve::solve_segments(
            &x.to_device(&cpu)?,
            &y.to_device(&cpu)?,
            n,
            r,
            segments,
            ridge,
            out_shape,
            op,
        )?;
        return w.to_device(device);
    }
    if segments.last().is_some_and(|s| s.1 > u32::MAX as usize) {
        return Err(Error::shape(op, "x", "[..., M, n] with under 2³² rows in all on CUDA", x.shape()));
    }
    let dev = x.cuda_device()?.clone();
    let x32 = x.to_dtype(DType::F32)?;
    let y32 = y.to_dtype(DType::F32)?;
    let seg = dev.htod(&segment_offsets(segments))?;
    let g = gram(
        &dev,
        x32.cuda_slice::<f32>(op)?,
        y32.cuda_slice::<f32>(op)?,
        &seg,
        segments.len(),
        n,
        r,
        false,
    )?;
    solve_on_device(&dev, &g, segments.len(), n, r, ridge, out_shape, device, op, Kernels::Fast)
}

/// The fast kernels, or the simple ones the GPU tests hold them against.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kernels {
    Fast,
    Reference,
}

#[allow(clippy::too_many_arguments)]
fn solve_on_device(
    dev: &CudaDevice,
    g: &CudaSlice<f32>,
    systems: usize,
    n: usize,
    r: usize,
    ridge: f64,
    out_shape: &[usize],
    device: &Device,
    op: &'static str,
    kernels: Kernels,
) -> Result<Tensor> {
    let on_chip = n <= CHOLESKY_MAX_N && n * (n + r) <= CHOLESKY_MAX_FLOATS;
    let mut flags = vec![FLAG_HOST; systems];
    let mut w = dev.alloc::<f32>(systems * n * r)?;
    if on_chip {
        let mut dflags = dev.alloc::<u32>(systems)?;
        match kernels {
            Kernels::Fast => cholesky_solve(dev, g, systems, n, r, ridge, &mut w, &mut dflags)?,
            Kernels::Reference => {
                cholesky_solve_reference(dev, g, systems, n, r, ridge, &mut w, &mut dflags)?
            }
        }
        flags = dev.dtoh(&dflags, systems)?;
    }
    if flags.iter().any(|&f| f & 2 != 0) {
        return Err(Error::NonFinite { op, what: "x or y".into() });
    }
    if flags.iter().any(|&f| f != 0) {
        // Rank-deficient (or too large for the chip) systems: f64 on the host from the device's
        // normal equations, then patched into the result.
        let gh = dev.dtoh(g, systems * n * (n + r))?;
        let mut wh = if on_chip { dev.dtoh(&w, systems * n * r)? } else { vec![0f32; systems * n * r] };
        for s in (0..systems).filter(|&s| flags[s] != 0) {
            let gs = &gh[s * n * (n + r)..(s + 1) * n * (n + r)];
            let a: Vec<f64> = (0..n * n).map(|e| gs[(e / n) * (n + r) + e % n] as f64).collect();
            let b: Vec<f64> = (0..n * r).map(|e| gs[(e / r) * (n + r) + n + e % r] as f64).collect();
            if a.iter().chain(&b).any(|v| !v.is_finite()) {
                return Err(Error::NonFinite { op, what: "x or y".into() });
            }
            let sol = solve_normal(a, b, n, r, ridge, DEVICE_REL_TOL);
            wh[s * n * r..(s + 1) * n * r].iter_mut().zip(&sol).for_each(|(o, &v)| *o = v as f32);
        }
        w = dev.htod(&wh)?;
    }
    Ok(Tensor::from_cuda_buffer(CudaBuffer::F32(w), out_shape, DType::F32, device))
}

/// `cholesky_solve_f32`: one block per system, the factor in shared memory.
#[allow(clippy::too_many_arguments)]
fn cholesky_solve(
    dev: &CudaDevice,
    g: &CudaSlice<f32>,
    systems: usize,
    n: usize,
    r: usize,
    ridge: f64,
    w: &mut CudaSlice<f32>,
    flags: &mut CudaSlice<u32>,
) -> Result<()> {
    let f = dev.function(MODULE, "cholesky_solve_f32")?;
    let (ni, ri, ridge32) = (n as i32, r as i32, ridge as f32);
    let cfg = LaunchConfig { grid_dim: (systems as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    let mut b = dev.stream().launch_builder(&f);
    b.arg(g).arg(&ni).arg(&ri).arg(&ridge32).arg(w).arg(flags);
    // SAFETY: one block per system; n·(n + r) ≤ 8192 floats fit its shared array (the caller's
    // on-chip test); g holds systems·n·(n + r), w systems·n·r floats, flags one per system.
    unsafe { b.launch(cfg) }.map_err(driver("launching cholesky_solve_f32"))?;
    Ok(())
}

/// `cholesky_solve_reference_f32`: one thread per system, its factor in a global copy of `g`.
#[allow(clippy::too_many_arguments)]
fn cholesky_solve_reference(
    dev: &CudaDevice,
    g: &CudaSlice<f32>,
    systems: usize,
    n: usize,
    r: usize,
    ridge: f64,
    w: &mut CudaSlice<f32>,
    flags: &mut CudaSlice<u32>,
) -> Result<()> {
    let mut work = dev.alloc::<f32>(systems * n * (n + r))?;
    let f = dev.function(MODULE, "cholesky_solve_reference_f32")?;
    let (si, ni, ri, ridge32) = (systems as i32, n as i32, r as i32, ridge as f32);
    let cfg = LaunchConfig {
        grid_dim: (systems.div_ceil(64) as u32, 1, 1),
        block_dim: (64, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = dev.stream().launch_builder(&f);
    b.arg(g).arg(&si).arg(&ni).arg(&ri).arg(&ridge32).arg(&mut work).arg(w).arg(flags);
    // SAFETY: one thread per system (the last block's surplus threads return); g and work hold
    // systems·n·(n + r), w systems·n·r floats, flags one per system.
    unsafe { b.launch(cfg) }.map_err(driver("launching cholesky_solve_reference_f32"))?;
    Ok(())
}

/// Host-solve marker for systems the chip does not take.
const FLAG_HOST: u32 = 4;

/// Reference least squares for the GPU tests: the one-thread-per-entry normal equations, then
/// the one-thread-per-system Cholesky (the host paths for rank-deficient and large systems are
/// [`lstsq_segments`]'s).
pub(super) fn lstsq_reference(
    x: &Tensor,
    y: &Tensor,
    segments: &[(usize, usize)],
    ridge: f64,
) -> Result<Tensor> {
    const OP: &str = "moe::reference::lstsq";
    let rank = x.rank();
    let (n, r, batch) = (x.shape()[rank - 1], y.shape()[rank - 1], segments.len());
    let mut out_shape = x.shape()[..rank - 2].to_vec();
    out_shape.extend([n, r]);
    let dev = x.cuda_device()?.clone();
    let x32 = x.to_dtype(DType::F32)?;
    let y32 = y.to_dtype(DType::F32)?;
    let seg = dev.htod(&segment_offsets(segments))?;
    let g = gram(&dev, x32.cuda_slice::<f32>(OP)?, y32.cuda_slice::<f32>(OP)?, &seg, batch, n, r, true)?;
    solve_on_device(&dev, &g, batch, n, r, ridge, &out_shape, x.device(), OP, Kernels::Reference)
}

/// One thread per row: the reference for [`top1_logits`].
pub(super) fn top1_logits_reference(logits: &Tensor) -> Result<(Tensor, Tensor)> {
    const OP: &str = "moe::reference::route_top1_logits";
    let dev = logits.cuda_device()?.clone();
    let (n, k) = (logits.shape()[0], logits.shape()[1]);
    let mut expert = dev.alloc::<u32>(n)?;
    let mut probs = dev.alloc::<f32>(n)?;
    let name = format!("top1_logits_reference_{}", logits.dtype().as_str());
    let f = dev.function(MODULE, &name)?;
    let (ni, ki) = (n as i32, k as i32);
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(128).max(1) as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    macro_rules! go {
        ($t:ty) => {{
            let l = logits.cuda_slice::<$t>(OP)?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(l).arg(&ni).arg(&ki).arg(&mut expert).arg(&mut probs);
            // SAFETY: one thread per row; logits n·k, outputs n each.
            unsafe { b.launch(cfg) }.map_err(driver(format!("launching {name}")))?;
        }};
    }
    match logits.dtype() {
        DType::F32 => go!(f32),
        DType::F16 => go!(half::f16),
        DType::BF16 => go!(half::bf16),
        other => return Err(Error::UnsupportedDType { op: OP, dtype: other, supported: "f32, f16, bf16" }),
    }
    let device = logits.device();
    Ok((
        Tensor::from_cuda_buffer(CudaBuffer::U32(expert), &[n], DType::U32, device),
        Tensor::from_cuda_buffer(CudaBuffer::F32(probs), &[n], DType::F32, device),
    ))
}

/// One thread per byte: the reference for dispatch (`scatter = false`) and unweighted combine.
pub(super) fn move_rows_reference(src: &Tensor, routing: &Routing, scatter: bool) -> Result<Tensor> {
    const OP: &str = "moe::reference::dispatch/combine";
    let dev = src.cuda_device()?.clone();
    let (n, d) = (src.shape()[0], src.shape()[1]);
    let row_bytes = d * src.dtype().size_in_bytes();
    check_row_bytes(row_bytes, src, OP)?;
    let idx = routing.order.cuda_slice::<u32>(OP)?;
    let f = dev.function(MODULE, "move_bytes_reference")?;
    let (ni, rbi, si) = (n as i32, row_bytes as i32, i32::from(scatter));
    let total = n * row_bytes;
    let cfg = LaunchConfig {
        grid_dim: (total.div_ceil(256).max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    macro_rules! go {
        ($t:ty, $variant:ident) => {{
            let s = src.cuda_slice::<$t>(OP)?;
            let mut out = dev.alloc::<$t>(n * d)?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(s).arg(idx).arg(&ni).arg(&rbi).arg(&si).arg(&mut out);
            // SAFETY: one thread per byte of n rows of row_bytes; idx is a permutation of 0..n.
            unsafe { b.launch(cfg) }.map_err(driver("launching move_bytes_reference"))?;
            CudaBuffer::$variant(out)
        }};
    }
    let buffer = match src.dtype() {
        DType::F32 => go!(f32, F32),
        DType::F16 => go!(half::f16, F16),
        DType::BF16 => go!(half::bf16, BF16),
        other => return Err(Error::UnsupportedDType { op: OP, dtype: other, supported: "f32, f16, bf16" }),
    };
    Ok(Tensor::from_cuda_buffer(buffer, &[n, d], src.dtype(), src.device()))
}
