//! Launches of `kernels/kmeans.cu`: assignment (tensor cores for f16/bf16 squared L2, exact
//! f32 FFMA otherwise), the counting sort, the segmented means, and the device-resident Lloyd
//! loop whose only device-to-host copy per iteration is the convergence check.
//!
//! Status flags: every kernel that can meet bad input ORs a bit into a one-word device buffer
//! (1 = a non-finite distance or mean, 2 = a label ≥ k) instead of failing; the host reads it
//! once per public call (or once per Lloyd iteration, with the convergence check).

use super::fit::LoopHelpers;
use super::fit::{KMeans, KMeansFit};
use super::Metric;
use crate::cuda::{driver, CudaDevice, CudaSlice, LaunchConfig, PushKernelArg};
use crate::tensor::CudaBuffer;
use crate::{DType, Error, Result, Tensor};

const MODULE: &str = "kmeans";
/// Rows per block of the assignment kernels (both tile BM = 128).
const ASSIGN_ROWS: usize = 128;
const ASSIGN_THREADS: u32 = 256;
/// The tensor-core assignment keeps x's tile resident in shared memory for D up to this, and
/// streams it with the centroids beyond. Dynamic shared memory of each (`tc::smem_bytes`).
const MMA_RESIDENT_MAX_D: usize = 128;
const MMA_SMEM_RESIDENT: usize = 59_904;
const MMA_SMEM_STREAMING: usize = 45_568;
/// Sort tiles: rows per warp of the stable scatter; cursors = tiles × k are kept under 2²⁴.
const SORT_TILE_ROWS: usize = 2048;
const MAX_CURSORS: usize = 1 << 24;
const MAX_TILE_ROWS: usize = 1 << 30;
const SEG_DIMS: usize = 128;
const SEG_THREADS: u32 = 256;
/// Sorted rows per block of the segmented sums, and the cap of that grid (it strides beyond).
const SEG_CHUNK_ROWS: usize = 1024;
const MAX_SEG_BLOCKS: usize = 1 << 20;

pub(super) const STATUS_OUT_OF_RANGE: u32 = 2;

fn cfg(grid: (u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid.0, grid.1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

fn suffix(dtype: DType) -> &'static str {
    dtype.as_str()
}

/// Calls `$body` with `$s` bound to `x`'s typed device slice.
macro_rules! with_slice {
    ($x:expr, $op:expr, |$s:ident| $body:expr) => {
        match $x.dtype() {
            DType::F32 => {
                let $s = $x.cuda_slice::<f32>($op)?;
                $body
            }
            DType::F16 => {
                let $s = $x.cuda_slice::<half::f16>($op)?;
                $body
            }
            DType::BF16 => {
                let $s = $x.cuda_slice::<half::bf16>($op)?;
                $body
            }
            other => {
                return Err(Error::UnsupportedDType { op: $op, dtype: other, supported: "f32, f16, bf16" })
            }
        }
    };
}

/// The outputs of an assignment plus its status word.
pub(super) struct AssignOut {
    pub assignment: Tensor,
    pub distance: Tensor,
    status: CudaSlice<u32>,
    dev: CudaDevice,
}

impl AssignOut {
    /// Reads the status word (synchronises): whether any distance was non-finite.
    pub fn status_nonzero(&self) -> Result<bool> {
        Ok(self.dev.dtoh(&self.status, 1)?[0] != 0)
    }
}

pub(super) fn assign(x: &Tensor, centroids: &Tensor, metric: Metric) -> Result<AssignOut> {
    let dev = x.cuda_device()?.clone();
    let n = x.shape()[0];
    let mut status = dev.alloc_zeros::<u32>(1)?;
    let (labels, dist) = assign_raw(&dev, x, centroids, metric, &mut status)?;
    Ok(AssignOut {
        assignment: Tensor::from_cuda_buffer(CudaBuffer::U32(labels), &[n], DType::U32, x.device()),
        distance: Tensor::from_cuda_buffer(CudaBuffer::F32(dist), &[n], DType::F32, x.device()),
        status,
        dev,
    })
}

/// Launches the assignment; centroids of any float dtype are rounded to `x`'s first.
fn assign_raw(
    dev: &CudaDevice,
    x: &Tensor,
    centroids: &Tensor,
    metric: Metric,
    status: &mut CudaSlice<u32>,
) -> Result<(CudaSlice<u32>, CudaSlice<f32>)> {
    const OP: &str = "kmeans::assign";
    let (n, d, k) = (x.shape()[0], x.shape()[1], centroids.shape()[0]);
    let c = centroids.to_dtype(x.dtype())?;
    let mut labels = dev.alloc::<u32>(n)?;
    let mut dist = dev.alloc::<f32>(n)?;
    let mut c_norms = dev.alloc::<f32>(k)?;
    let sfx = suffix(x.dtype());
    let (ni, ki, di) = (n as i32, k as i32, d as i32);
    // (kernel, ‖c‖² needed, dynamic shared memory bytes)
    let (kernel, norms_needed, smem) = match (metric, x.dtype()) {
        (Metric::SquaredL2, DType::F16 | DType::BF16) if d <= MMA_RESIDENT_MAX_D => {
            (format!("assign_l2_mma_xres_{sfx}"), true, MMA_SMEM_RESIDENT)
        }
        (Metric::SquaredL2, DType::F16 | DType::BF16) => {
            (format!("assign_l2_mma_{sfx}"), true, MMA_SMEM_STREAMING)
        }
        (Metric::SquaredL2, _) => (format!("assign_simt_l2_{sfx}"), true, 0),
        (Metric::MeanL1, _) => (format!("assign_simt_l1_{sfx}"), false, 0),
    };
    let xs_c = &c;
    with_slice!(x, OP, |xs| {
        with_slice!(xs_c, OP, |cs| {
            if norms_needed {
                let f = dev.function(MODULE, &format!("row_sq_norms_{sfx}"))?;
                let blocks = k.div_ceil(8).clamp(1, 65_535) as u32;
                let mut b = dev.stream().launch_builder(&f);
                b.arg(cs).arg(&ki).arg(&di).arg(&mut c_norms);
                // SAFETY: reads k·d elements of the centroids, writes k floats; sizes match.
                unsafe { b.launch(cfg((blocks, 1), 256)) }.map_err(driver("launching row_sq_norms"))?;
            }
            let f = dev.function(MODULE, &kernel)?;
            dev.allow_shared_bytes(&f, &kernel, smem)?;
            let blocks = n.div_ceil(ASSIGN_ROWS) as u32;
            let launch = LaunchConfig { shared_mem_bytes: smem as u32, ..cfg((blocks, 1), ASSIGN_THREADS) };
            let mut b = dev.stream().launch_builder(&f);
            b.arg(xs).arg(cs).arg(&c_norms).arg(&ni).arg(&ki).arg(&di);
            b.arg(&mut labels).arg(&mut dist).arg(&mut *status);
            // SAFETY: x holds n·d and c k·d elements of the kernel's type, c_norms k floats,
            // labels/dist n elements each; every access in the kernel is bounds-checked; the
            // tensor-core kernels get the dynamic shared memory they carve (sizes asserted in
            // kernels/kmeans.cu), opted in above 48 KiB.
            unsafe { b.launch(launch) }.map_err(driver(format!("launching {kernel}")))?;
        })
    });
    Ok((labels, dist))
}

/// The result of a counting sort on the device.
pub(super) struct Sorted {
    pub order: Tensor,
    pub offsets: Tensor,
    pub counts: CudaSlice<u32>,
    status: CudaSlice<u32>,
    dev: CudaDevice,
}

impl Sorted {
    /// Reads the status word (synchronises): whether a label was ≥ k.
    pub fn status_nonzero(&self) -> Result<bool> {
        Ok(self.dev.dtoh(&self.status, 1)?[0] != 0)
    }
}

pub(super) fn counting_sort(labels: &Tensor, k: usize) -> Result<Sorted> {
    let dev = labels.cuda_device()?.clone();
    let n = labels.shape()[0];
    let mut status = dev.alloc_zeros::<u32>(1)?;
    let l = labels.cuda_slice::<u32>("kmeans::sort_by_cluster")?;
    let (order, offsets, counts) = counting_sort_raw(&dev, l, n, k, &mut status)?;
    let device = labels.device();
    Ok(Sorted {
        order: Tensor::from_cuda_buffer(CudaBuffer::U32(order), &[n], DType::U32, device),
        offsets: Tensor::from_cuda_buffer(CudaBuffer::U32(offsets), &[k + 1], DType::U32, device),
        counts,
        status,
        dev,
    })
}

/// Histogram per tile → per-tile prefix per cluster → cluster offsets → stable scatter.
/// Returns (order [n], offsets [k+1], counts [k]).
fn counting_sort_raw(
    dev: &CudaDevice,
    labels: &CudaSlice<u32>,
    n: usize,
    k: usize,
    status: &mut CudaSlice<u32>,
) -> Result<(CudaSlice<u32>, CudaSlice<u32>, CudaSlice<u32>)> {
    // Capped at 2³⁰ so that it (and tile · tile_rows < n) stays an i32 for N near 2³¹.
    let tile_rows =
        SORT_TILE_ROWS.max(n.div_ceil((MAX_CURSORS / k).max(1)).next_multiple_of(32)).min(MAX_TILE_ROWS);
    let tiles = n.div_ceil(tile_rows).max(1);
    let mut cursors = dev.alloc_zeros::<u32>(tiles * k)?;
    let mut counts = dev.alloc::<u32>(k)?;
    let mut offsets = dev.alloc::<u32>(k + 1)?;
    let mut order = dev.alloc::<u32>(n)?;
    let (ni, ki, ti, tri) = (n as i32, k as i32, tiles as i32, tile_rows as i32);
    let s = dev.stream();

    let f = dev.function(MODULE, "tile_histogram_u32")?;
    let mut b = s.launch_builder(&f);
    b.arg(labels).arg(&ni).arg(&ki).arg(&tri).arg(&mut cursors).arg(&mut *status);
    // SAFETY: labels holds n values; cursors tiles·k; out-of-range labels are flagged, not used.
    unsafe { b.launch(cfg((tiles as u32, 1), 256)) }.map_err(driver("launching tile_histogram_u32"))?;

    let f = dev.function(MODULE, "scan_tiles_u32")?;
    let mut b = s.launch_builder(&f);
    b.arg(&mut cursors).arg(&ti).arg(&ki).arg(&mut counts);
    // SAFETY: cursors holds tiles·k values and counts k; 32 clusters per 256-thread block.
    unsafe { b.launch(cfg((k.div_ceil(32) as u32, 1), 256)) }.map_err(driver("launching scan_tiles_u32"))?;

    let f = dev.function(MODULE, "scan_offsets_u32")?;
    let mut b = s.launch_builder(&f);
    b.arg(&counts).arg(&ki).arg(&mut offsets);
    // SAFETY: counts holds k values, offsets k + 1; a single block of 1024 threads.
    unsafe { b.launch(cfg((1, 1), 1024)) }.map_err(driver("launching scan_offsets_u32"))?;

    let f = dev.function(MODULE, "stable_scatter_u32")?;
    let mut b = s.launch_builder(&f);
    b.arg(labels).arg(&ni).arg(&ki).arg(&tri).arg(&offsets).arg(&mut cursors).arg(&mut order);
    // SAFETY: one warp per tile (4 per block); positions are offsets + cursor + rank < n for
    // labels < k, the only ones scattered.
    unsafe { b.launch(cfg((tiles.div_ceil(4) as u32, 1), 128)) }
        .map_err(driver("launching stable_scatter_u32"))?;
    Ok((order, offsets, counts))
}

/// Per-cluster means of `x`'s rows, read in sorted order, in two deterministic stages: sums over
/// fixed chunks of `SEG_CHUNK_ROWS` sorted rows of each cluster (so one huge cluster spreads over
/// many blocks), then each cluster's chunk sums added in chunk order. No host synchronisation:
/// the chunk count is only known on the device, so the first grid covers the bound
/// ⌈n / chunk⌉ + min(n, k) and surplus blocks exit at once.
fn segment_means_raw(
    dev: &CudaDevice,
    x: &Tensor,
    order: &Tensor,
    offsets: &Tensor,
    k: usize,
    status: &mut CudaSlice<u32>,
) -> Result<CudaSlice<f32>> {
    const OP: &str = "kmeans::update";
    let (n, d) = (x.shape()[0], x.shape()[1]);
    if d.div_ceil(SEG_DIMS) > 65_535 {
        return Err(Error::shape(OP, "x", "[N, D] with D ≤ 8388480 on CUDA", x.shape()));
    }
    let o = order.cuda_slice::<u32>(OP)?;
    let off = offsets.cuda_slice::<u32>(OP)?;
    let (ki, di, chunk_i) = (k as i32, d as i32, SEG_CHUNK_ROWS as i32);
    let max_chunks = n.div_ceil(SEG_CHUNK_ROWS) + n.min(k);
    let mut chunk_start = dev.alloc::<u32>(k + 1)?;
    let mut partial = dev.alloc::<f32>(max_chunks * d)?;
    let mut centroids = dev.alloc::<f32>(k * d)?;
    let s = dev.stream();

    let f = dev.function(MODULE, "scan_chunks_u32")?;
    let mut b = s.launch_builder(&f);
    b.arg(off).arg(&ki).arg(&chunk_i).arg(&mut chunk_start);
    // SAFETY: offsets holds k + 1 values, chunk_start k + 1; a single block of 1024 threads.
    unsafe { b.launch(cfg((1, 1), 1024)) }.map_err(driver("launching scan_chunks_u32"))?;

    let name = format!("segment_partials_{}", suffix(x.dtype()));
    let f = dev.function(MODULE, &name)?;
    let blocks = max_chunks.min(MAX_SEG_BLOCKS) as u32;
    with_slice!(x, OP, |xs| {
        let mut b = s.launch_builder(&f);
        b.arg(xs).arg(o).arg(off).arg(&chunk_start).arg(&ki).arg(&di).arg(&chunk_i).arg(&mut partial);
        // SAFETY: grid (chunks, ⌈d/128⌉) within limits (checked above; chunks grid-strided);
        // order holds n row ids < n and offsets k + 1 bounds into it; the chunk count is at most
        // max_chunks, the rows of partial.
        unsafe { b.launch(cfg((blocks, d.div_ceil(SEG_DIMS) as u32), SEG_THREADS)) }
            .map_err(driver(format!("launching {name}")))?;
    });

    let f = dev.function(MODULE, "segment_finish_f32")?;
    let mut b = s.launch_builder(&f);
    b.arg(&partial).arg(off).arg(&chunk_start).arg(&ki).arg(&di).arg(&mut centroids).arg(&mut *status);
    // SAFETY: grid-stride over k·d outputs; reads the partial rows chunk_start[c]..[c+1] < max_chunks.
    unsafe { b.launch(crate::cuda::grid_1d(k * d, 256)) }.map_err(driver("launching segment_finish_f32"))?;
    Ok(centroids)
}

/// (centroids [k, d] f32, counts [k] u32, status word).
pub(super) fn update(x: &Tensor, assignment: &Tensor, k: usize) -> Result<(Tensor, Tensor, u32)> {
    let dev = x.cuda_device()?.clone();
    let d = x.shape()[1];
    let sorted = counting_sort(assignment, k)?;
    let mut status = dev.alloc_zeros::<u32>(1)?;
    let centroids = segment_means_raw(&dev, x, &sorted.order, &sorted.offsets, k, &mut status)?;
    let s = dev.dtoh(&status, 1)?[0] | dev.dtoh(&sorted.status, 1)?[0];
    let device = x.device();
    Ok((
        Tensor::from_cuda_buffer(CudaBuffer::F32(centroids), &[k, d], DType::F32, device),
        Tensor::from_cuda_buffer(CudaBuffer::U32(sorted.counts), &[k], DType::U32, device),
        if s & STATUS_OUT_OF_RANGE != 0 { STATUS_OUT_OF_RANGE } else { s },
    ))
}

/// Lloyd's loop on the device, from host centroids `c0` (`[k, d]` f32).
pub(super) fn lloyd(x: &Tensor, c0: &[f32], km: &KMeans, helpers: LoopHelpers) -> Result<KMeansFit> {
    const OP: &str = "KMeans::fit";
    let dev = x.cuda_device()?.clone();
    let device = x.device();
    let (n, d, k) = (x.shape()[0], x.shape()[1], km.k);
    let l1 = i32::from(km.metric == Metric::MeanL1);
    let mut c = Tensor::from_slice(c0, &[k, d], device)?;
    let mut status = dev.alloc_zeros::<u32>(1)?;
    let mut stats = dev.alloc::<f64>(3)?;
    let mut history = Vec::new();
    let (mut iterations, mut converged) = (0, false);
    for it in 1..=km.max_iter {
        let (labels, dist) = assign_raw(&dev, x, &c, km.metric, &mut status)?;
        let (order, offsets, counts) = counting_sort_raw(&dev, &labels, n, k, &mut status)?;
        let order = Tensor::from_cuda_buffer(CudaBuffer::U32(order), &[n], DType::U32, device);
        let offsets = Tensor::from_cuda_buffer(CudaBuffer::U32(offsets), &[k + 1], DType::U32, device);
        let mut next = segment_means_raw(&dev, x, &order, &offsets, k, &mut status)?;
        reseed_empty(&dev, x, &counts, &dist, &mut next, helpers)?;
        let old = c.cuda_slice::<f32>(OP)?;
        shift_inertia(&dev, (old, &next), (k, d, l1), (&dist, n), &status, &mut stats, helpers)?;
        // The convergence check: the loop's only device-to-host copy.
        let host = dev.dtoh(&stats, 3)?;
        if host[2] != 0.0 {
            return Err(Error::NonFinite { op: OP, what: "x (or its distances overflow f32)".into() });
        }
        history.push(host[1]);
        c = Tensor::from_cuda_buffer(CudaBuffer::F32(next), &[k, d], DType::F32, device);
        iterations = it;
        if host[0] <= km.tol {
            converged = true;
            break;
        }
    }
    let (labels, dist) = assign_raw(&dev, x, &c, km.metric, &mut status)?;
    let cs = c.cuda_slice::<f32>(OP)?;
    shift_inertia(&dev, (cs, cs), (k, d, l1), (&dist, n), &status, &mut stats, helpers)?;
    let host = dev.dtoh(&stats, 3)?;
    if host[2] != 0.0 || !host[1].is_finite() {
        return Err(Error::NonFinite { op: OP, what: "x (or its distances overflow f32)".into() });
    }
    Ok(KMeansFit {
        centroids: c,
        assignment: Tensor::from_cuda_buffer(CudaBuffer::U32(labels), &[n], DType::U32, device),
        inertia: host[1],
        inertia_history: history,
        iterations,
        converged,
    })
}

/// Empty clusters take the farthest rows: `reseed_empty_<dtype>` (one block) or its one-thread
/// reference.
fn reseed_empty(
    dev: &CudaDevice,
    x: &Tensor,
    counts: &CudaSlice<u32>,
    dist: &CudaSlice<f32>,
    centroids: &mut CudaSlice<f32>,
    helpers: LoopHelpers,
) -> Result<()> {
    const OP: &str = "KMeans::fit";
    let (n, d) = (x.shape()[0] as i32, x.shape()[1] as i32);
    let k = (counts.len()) as i32;
    let (name, threads) = match helpers {
        LoopHelpers::Fast => (format!("reseed_empty_{}", suffix(x.dtype())), 1024),
        LoopHelpers::Reference => (format!("reseed_empty_reference_{}", suffix(x.dtype())), 1),
    };
    let f = dev.function(MODULE, &name)?;
    with_slice!(x, OP, |xs| {
        let mut b = dev.stream().launch_builder(&f);
        b.arg(xs).arg(&n).arg(&d).arg(&k).arg(counts).arg(dist).arg(&mut *centroids);
        // SAFETY: one block; reads n·d of x, k counts, n distances; writes rows of centroids
        // (k·d floats) of empty clusters only.
        unsafe { b.launch(cfg((1, 1), threads)) }.map_err(driver(format!("launching {name}")))?;
    });
    Ok(())
}

/// The convergence statistics {max centroid shift, inertia, status} into `stats`:
/// `shift_inertia_f32` (one block) or its one-thread reference.
fn shift_inertia(
    dev: &CudaDevice,
    (old, new): (&CudaSlice<f32>, &CudaSlice<f32>),
    (k, d, l1): (usize, usize, i32),
    (dist, n): (&CudaSlice<f32>, usize),
    status: &CudaSlice<u32>,
    stats: &mut CudaSlice<f64>,
    helpers: LoopHelpers,
) -> Result<()> {
    let (ki, di, ni) = (k as i32, d as i32, n as i32);
    let (name, threads) = match helpers {
        LoopHelpers::Fast => ("shift_inertia_f32", 1024),
        LoopHelpers::Reference => ("shift_inertia_reference_f32", 1),
    };
    let f = dev.function(MODULE, name)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(old).arg(new).arg(&ki).arg(&di).arg(&l1).arg(dist).arg(&ni).arg(status).arg(stats);
    // SAFETY: one block; old/new hold k·d floats, dist n, status 1, stats 3 doubles.
    unsafe { b.launch(cfg((1, 1), threads)) }.map_err(driver(format!("launching {name}")))?;
    Ok(())
}

/// Rows `ids` of `x` (all `< N`), converted to f32 on the device and copied to the host.
pub(super) fn gather_rows_f32(x: &Tensor, ids: &[usize]) -> Result<Vec<f32>> {
    const OP: &str = "kmeans (gather rows)";
    let dev = x.cuda_device()?.clone();
    let d = x.shape()[1];
    let m = ids.len();
    if m == 0 {
        return Ok(Vec::new());
    }
    let idx: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    let idx = dev.htod(&idx)?;
    let mut out = dev.alloc::<f32>(m * d)?;
    let (mi, di) = (m as i32, d as i32);
    let name = format!("gather_rows_{}", suffix(x.dtype()));
    let f = dev.function(MODULE, &name)?;
    with_slice!(x, OP, |xs| {
        let mut b = dev.stream().launch_builder(&f);
        b.arg(xs).arg(&idx).arg(&mi).arg(&di).arg(&mut out);
        // SAFETY: one warp per gathered row (grid-stride); ids < n index rows of x (n·d),
        // out holds m·d floats.
        unsafe { b.launch(cfg((m.div_ceil(8).clamp(1, 65_535) as u32, 1), 256)) }
            .map_err(driver(format!("launching {name}")))?;
    });
    dev.dtoh(&out, m * d)
}

// ----- reference kernels, for the GPU tests ------------------------------------------------

/// Direct one-thread-per-row assignment (no GEMM form, no tiling).
pub(super) fn assign_reference(x: &Tensor, centroids: &Tensor, metric: Metric) -> Result<(Tensor, Tensor)> {
    const OP: &str = "kmeans::reference::assign";
    let dev = x.cuda_device()?.clone();
    let (n, d, k) = (x.shape()[0], x.shape()[1], centroids.shape()[0]);
    let c = centroids.to_dtype(x.dtype())?;
    let mut labels = dev.alloc::<u32>(n)?;
    let mut dist = dev.alloc::<f32>(n)?;
    let (ni, ki, di, l1) = (n as i32, k as i32, d as i32, i32::from(metric == Metric::MeanL1));
    let name = format!("assign_reference_{}", suffix(x.dtype()));
    let f = dev.function(MODULE, &name)?;
    let cref = &c;
    with_slice!(x, OP, |xs| {
        with_slice!(cref, OP, |cs| {
            let mut b = dev.stream().launch_builder(&f);
            b.arg(xs).arg(cs).arg(&ni).arg(&ki).arg(&di).arg(&l1).arg(&mut labels).arg(&mut dist);
            // SAFETY: one thread per row; x n·d, c k·d, outputs n.
            unsafe { b.launch(cfg((n.div_ceil(128) as u32, 1), 128)) }
                .map_err(driver(format!("launching {name}")))?;
        })
    });
    let device = x.device();
    Ok((
        Tensor::from_cuda_buffer(CudaBuffer::U32(labels), &[n], DType::U32, device),
        Tensor::from_cuda_buffer(CudaBuffer::F32(dist), &[n], DType::F32, device),
    ))
}

/// Single-thread stable counting sort; labels must be < k.
pub(super) fn counting_sort_reference(labels: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    const OP: &str = "kmeans::reference::sort_by_cluster";
    let dev = labels.cuda_device()?.clone();
    let n = labels.shape()[0];
    let l = labels.cuda_slice::<u32>(OP)?;
    let mut offsets = dev.alloc::<u32>(k + 1)?;
    let mut order = dev.alloc::<u32>(n)?;
    let (ni, ki) = (n as i32, k as i32);
    let f = dev.function(MODULE, "counting_sort_reference_u32")?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(l).arg(&ni).arg(&ki).arg(&mut offsets).arg(&mut order);
    // SAFETY: one thread; labels n values < k (checked by the caller), offsets k + 1, order n.
    unsafe { b.launch(cfg((1, 1), 1)) }.map_err(driver("launching counting_sort_reference_u32"))?;
    let device = labels.device();
    Ok((
        Tensor::from_cuda_buffer(CudaBuffer::U32(order), &[n], DType::U32, device),
        Tensor::from_cuda_buffer(CudaBuffer::U32(offsets), &[k + 1], DType::U32, device),
    ))
}

/// Direct one-thread-per-(cluster, dim) update.
pub(super) fn update_reference(x: &Tensor, labels: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    const OP: &str = "kmeans::reference::update";
    let dev = x.cuda_device()?.clone();
    let (n, d) = (x.shape()[0], x.shape()[1]);
    let mut centroids = dev.alloc::<f32>(k * d)?;
    let mut counts = dev.alloc::<u32>(k)?;
    let l = labels.cuda_slice::<u32>(OP)?;
    let (ni, ki, di) = (n as i32, k as i32, d as i32);
    let name = format!("update_reference_{}", suffix(x.dtype()));
    let f = dev.function(MODULE, &name)?;
    with_slice!(x, OP, |xs| {
        let mut b = dev.stream().launch_builder(&f);
        b.arg(xs).arg(l).arg(&ni).arg(&ki).arg(&di).arg(&mut centroids).arg(&mut counts);
        // SAFETY: one thread per (cluster, dim) of k·d; labels n; outputs k·d and k.
        unsafe { b.launch(cfg(((k * d).div_ceil(256) as u32, 1), 256)) }
            .map_err(driver(format!("launching {name}")))?;
    });
    let device = x.device();
    Ok((
        Tensor::from_cuda_buffer(CudaBuffer::F32(centroids), &[k, d], DType::F32, device),
        Tensor::from_cuda_buffer(CudaBuffer::U32(counts), &[k], DType::U32, device),
    ))
}
