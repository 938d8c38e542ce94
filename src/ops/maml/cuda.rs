//! Launches of `kernels/maml.cu` and the choice of path per call.
//!
//! The rule: the fused kernels (`maml_meta_<T>`, `mlp_op_<T>`: one thread block per task, one
//! launch for the whole batch) need a per-task workspace of activations, deltas and their R{}
//! directions for the largest sample set, plus three parameter-sized vectors for the
//! meta-gradient (`ws_elems` of `net_config`, times the element size). When it fits in the
//! device's opt-in shared memory per block (227 KiB on an H100/H200) the fused kernel runs;
//! otherwise the call takes the tiled per-layer path of `layered.rs` (batched 64×64-tile
//! products across tasks: slower, never wrong, never an error for a valid size). Tests force the
//! tiled path with `force_tiled`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::layered::{self, Engine, Input, Params, PerTask, Product};
use super::{Dims, Layout, Loss, Maml, MetaDims, MetaGradient, Order, TaskBatch};
use crate::cuda::{driver, CudaDevice, CudaFunction, CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use crate::tensor::CudaBuffer;
use crate::{DType, Element, Error, Result, Tensor};

const MODULE: &str = "maml";
const THREADS: u32 = 256;
static FORCE_TILED: AtomicBool = AtomicBool::new(false);

/// Forces the tiled per-layer path (tests use it to cover both paths on one shape).
pub(crate) fn force_tiled(on: bool) {
    FORCE_TILED.store(on, Ordering::Relaxed);
}

/// Mirrors `NetConfig` in kernels/maml.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct NetConfig {
    layers: i32,
    act: i32,
    loss: i32,
    params: i32,
    rows: i32,
    act_elems: i32,
    wide: i32,
    ws_elems: i32,
}

/// Mirrors `MetaConfig` in kernels/maml.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct MetaConfig {
    net: NetConfig,
    support: i32,
    query: i32,
    steps: i32,
    second: i32,
    lr: f64,
}

// SAFETY: plain #[repr(C)] structs of i32/f64 whose layout matches the kernels' structs field
// for field (the f64 of MetaConfig sits at offset 48 in both).
unsafe impl DeviceRepr for NetConfig {}
unsafe impl DeviceRepr for MetaConfig {}

/// The fused kernels' configuration for up to `rows` samples and `vectors` parameter-sized
/// buffers per task; `None` when a count exceeds the kernels' 32-bit indexing (such a workspace
/// is far beyond any shared memory anyway).
fn net_config(layout: &Layout, rows: usize, vectors: usize) -> Option<NetConfig> {
    let int = |v: Option<usize>| v.filter(|&v| v <= i32::MAX as usize);
    let widths: usize = layout.sizes[1..].iter().sum();
    let act_elems = int(rows.checked_mul(widths))?;
    // δ buffers hold [rows, width] of a layer output (the loss head's, and ∂L/∂h of hidden
    // layers in the backward pass), never of the input: the widest layer output bounds them.
    let wide = int(rows.checked_mul(layout.max_width()))?;
    let engine = 4usize.checked_mul(act_elems).and_then(|a| a.checked_add(4 * wide)?.checked_add(32));
    let ws = engine.and_then(|e| e.checked_add(vectors.checked_mul(layout.num_params)?));
    Some(NetConfig {
        layers: layout.layers() as i32,
        act: layout.activation as i32,
        loss: matches!(layout.loss, Loss::SoftmaxCrossEntropy) as i32,
        params: layout.num_params as i32,
        rows: int(Some(rows))? as i32,
        act_elems: act_elems as i32,
        wide: wide as i32,
        ws_elems: int(ws)? as i32,
    })
}

/// The fused kernel's configuration and dynamic shared memory (bytes per block) when its
/// workspace fits the device's opt-in limit (raising the kernel's limit when above the default
/// 48 KiB); `None` when the call must take the tiled path (too large, or forced).
fn fused_plan<T: Element>(
    dev: &CudaDevice,
    func: &CudaFunction,
    layout: &Layout,
    rows: usize,
    vectors: usize,
) -> Result<Option<(NetConfig, u32)>> {
    const NAME: &str = "the fused MAML kernel";
    let Some(cfg) = net_config(layout, rows, vectors) else { return Ok(None) };
    let bytes = cfg.ws_elems as usize * size_of::<T>();
    if bytes > dev.dynamic_shared_limit(func, NAME)? || FORCE_TILED.load(Ordering::Relaxed) {
        return Ok(None);
    }
    dev.allow_shared_bytes(func, NAME, bytes)?;
    Ok(Some((cfg, bytes as u32)))
}

fn launch_config(tasks: usize, threads: u32, shared: u32) -> Result<LaunchConfig> {
    let blocks = u32::try_from(tasks).ok().filter(|&b| b <= i32::MAX as u32).ok_or_else(|| {
        Error::invalid("maml", "tasks", format!("{tasks} tasks exceed the grid limit 2^31 − 1"))
    })?;
    Ok(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: shared })
}

/// A device table of i32s, shared with the device's cache.
type Table = Arc<CudaSlice<i32>>;

/// The i32 tables the kernels read, layer widths and weight offsets: uploaded on a network's
/// first call, then reused (a call copies nothing for them).
fn tables(dev: &CudaDevice, layout: &Layout) -> Result<(Table, Table)> {
    let sizes: Vec<i32> = layout.sizes.iter().map(|&s| s as i32).collect();
    let offsets: Vec<i32> = layout.w_offset.iter().map(|&s| s as i32).collect();
    Ok((dev.constant_table(&sizes)?, dev.constant_table(&offsets)?))
}

fn wrap<T: Element>(buf: CudaSlice<T>, shape: &[usize], like: &Tensor) -> Tensor {
    Tensor::from_cuda_buffer(CudaBuffer::wrap(buf), shape, T::DTYPE, like.device())
}

const NULL: u64 = 0;

// ------------------------------------------------------------------------------------------
// forward / loss_and_grad / hvp

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Forward = 0,
    Grad = 1,
    Hvp = 2,
}

struct OpOutput<T> {
    out: CudaSlice<T>,
    losses: Option<CudaSlice<T>>,
}

#[allow(clippy::too_many_arguments)]
fn run_op<T: Element>(
    op: &'static str,
    mode: Mode,
    layout: &Layout,
    dims: &Dims,
    params: &Tensor,
    x: &Tensor,
    y: Option<&Tensor>,
    v: Option<&Tensor>,
) -> Result<OpOutput<T>> {
    let dev = params.cuda_device()?;
    let func = dev.function(MODULE, &format!("mlp_op_{}", T::DTYPE.as_str()))?;
    match fused_plan::<T>(dev, &func, layout, dims.samples, 0)? {
        Some((cfg, shared)) => run_op_fused(op, mode, layout, dims, params, x, y, v, &func, &cfg, shared),
        None => run_op_tiled(op, mode, layout, dims, params, x, y, v),
    }
}

/// The row stride of a [T, P] tensor, or 0 for one [P] row broadcast to all tasks.
fn task_stride(t: &Tensor, pn: usize) -> usize {
    if t.rank() == 2 {
        pn
    } else {
        0
    }
}

#[allow(clippy::too_many_arguments)]
fn run_op_fused<T: Element>(
    op: &'static str,
    mode: Mode,
    layout: &Layout,
    dims: &Dims,
    params: &Tensor,
    x: &Tensor,
    y: Option<&Tensor>,
    v: Option<&Tensor>,
    func: &CudaFunction,
    cfg: &NetConfig,
    shared: u32,
) -> Result<OpOutput<T>> {
    let dev = params.cuda_device()?;
    let (sizes, offsets) = tables(dev, layout)?;
    let out_len = match mode {
        Mode::Forward => dims.tasks * dims.samples * layout.output(),
        _ => dims.tasks * layout.num_params,
    };
    let mut out = dev.alloc::<T>(out_len)?;
    let mut losses = if mode == Mode::Grad { Some(dev.alloc::<T>(dims.tasks)?) } else { None };
    let pn = layout.num_params;
    let p_stride = if dims.broadcast { 0 } else { pn as i64 };
    let v_stride = v.map_or(0, |v| task_stride(v, pn)) as i64;
    let (mode_i, n) = (mode as i32, dims.samples as i32);
    let p = params.cuda_slice::<T>(op)?;
    let xs = x.cuda_slice::<T>(op)?;
    let cfg_launch = launch_config(dims.tasks, THREADS, shared)?;
    let mut args = dev.stream().launch_builder(func);
    args.arg(cfg).arg(&mode_i).arg(&n).arg(&*sizes).arg(&*offsets).arg(p).arg(&p_stride);
    match v {
        Some(v) => args.arg(v.cuda_slice::<T>(op)?),
        None => args.arg(&NULL),
    };
    args.arg(&v_stride).arg(xs);
    match (y, layout.loss) {
        (Some(y), Loss::Mse) => args.arg(y.cuda_slice::<T>(op)?).arg(&NULL),
        (Some(y), Loss::SoftmaxCrossEntropy) => args.arg(&NULL).arg(y.cuda_slice::<u32>(op)?),
        (None, _) => args.arg(&NULL).arg(&NULL),
    };
    args.arg(&mut out);
    match losses.as_mut() {
        Some(l) => args.arg(l),
        None => args.arg(&NULL),
    };
    // SAFETY: the argument list matches `mlp_op_<T>` in maml.cu; every buffer holds what the
    // kernel indexes: params T·P (or P with stride 0), v likewise, x T·N·in, y T·N·out or
    // labels T·N (validated by mod.rs), out T·N·out or T·P, losses T, and `shared` bytes of
    // dynamic shared memory per block hold the workspace (attribute raised when needed).
    unsafe { args.launch(cfg_launch) }.map_err(driver("launching mlp_op"))?;
    Ok(OpOutput { out, losses })
}

/// forward / loss_and_grad / hvp through the tiled per-layer engine.
#[allow(clippy::too_many_arguments)]
fn run_op_tiled<T: Element>(
    op: &'static str,
    mode: Mode,
    layout: &Layout,
    dims: &Dims,
    params: &Tensor,
    x: &Tensor,
    y: Option<&Tensor>,
    v: Option<&Tensor>,
) -> Result<OpOutput<T>> {
    let dev = params.cuda_device()?;
    let pn = layout.num_params;
    let p = Params { buf: params.cuda_slice::<T>(op)?, stride: if dims.broadcast { 0 } else { pn } };
    let input = Input { x: x.cuda_slice::<T>(op)?, n: dims.samples };
    let with_r = mode == Mode::Hvp;
    let mut engine = Engine::<T>::new(dev, layout, Product::Tiled, dims.tasks, dims.samples, with_r)?;
    let direction = match v {
        Some(v) if with_r => Some(Params { buf: v.cuda_slice::<T>(op)?, stride: task_stride(v, pn) }),
        _ => None,
    };
    engine.forward(p, direction, input)?;
    let Some(y) = y else {
        let out =
            engine.into_outputs().ok_or(Error::invalid(op, "sizes", "an MLP without layers (a bug)"))?;
        return Ok(OpOutput { out, losses: None });
    };
    let targets = layered::targets::<T>(layout, y, op)?;
    let mut out = dev.alloc::<T>(dims.tasks * pn)?;
    if let Some(direction) = direction {
        engine.head(targets, dims.samples, true, None)?;
        engine.backward(p, Some((direction, &mut out)), input, None)?;
        return Ok(OpOutput { out, losses: None });
    }
    let mut losses = dev.alloc::<T>(dims.tasks)?;
    engine.head(targets, dims.samples, false, Some(&mut losses))?;
    engine.backward(p, None, input, Some(&mut out))?;
    Ok(OpOutput { out, losses: Some(losses) })
}

fn by_dtype<R>(
    dtype: DType,
    f32_fn: impl FnOnce() -> Result<R>,
    f64_fn: impl FnOnce() -> Result<R>,
) -> Result<R> {
    match dtype {
        DType::F32 => f32_fn(),
        DType::F64 => f64_fn(),
        other => Err(Error::UnsupportedDType { op: "maml", dtype: other, supported: "f32, f64" }),
    }
}

pub(super) fn forward(layout: &Layout, dims: &Dims, params: &Tensor, x: &Tensor) -> Result<Tensor> {
    fn go<T: Element>(layout: &Layout, dims: &Dims, params: &Tensor, x: &Tensor) -> Result<Tensor> {
        let r = run_op::<T>("Mlp::forward", Mode::Forward, layout, dims, params, x, None, None)?;
        Ok(wrap(r.out, &[dims.tasks, dims.samples, layout.output()], params))
    }
    by_dtype(params.dtype(), || go::<f32>(layout, dims, params, x), || go::<f64>(layout, dims, params, x))
}

pub(super) fn loss_and_grad(
    layout: &Layout,
    dims: &Dims,
    params: &Tensor,
    x: &Tensor,
    y: &Tensor,
) -> Result<(Tensor, Tensor)> {
    fn go<T: Element>(
        layout: &Layout,
        dims: &Dims,
        params: &Tensor,
        x: &Tensor,
        y: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let r = run_op::<T>("Mlp::loss_and_grad", Mode::Grad, layout, dims, params, x, Some(y), None)?;
        let losses =
            r.losses.ok_or(Error::invalid("Mlp::loss_and_grad", "losses", "not produced (a bug)"))?;
        Ok((wrap(losses, &[dims.tasks], params), wrap(r.out, &[dims.tasks, layout.num_params], params)))
    }
    by_dtype(
        params.dtype(),
        || go::<f32>(layout, dims, params, x, y),
        || go::<f64>(layout, dims, params, x, y),
    )
}

pub(super) fn hvp(
    layout: &Layout,
    dims: &Dims,
    params: &Tensor,
    x: &Tensor,
    y: &Tensor,
    v: &Tensor,
) -> Result<Tensor> {
    fn go<T: Element>(
        layout: &Layout,
        dims: &Dims,
        p: &Tensor,
        x: &Tensor,
        y: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        let r = run_op::<T>("Mlp::hvp", Mode::Hvp, layout, dims, p, x, Some(y), Some(v))?;
        Ok(wrap(r.out, &[dims.tasks, layout.num_params], p))
    }
    by_dtype(
        params.dtype(),
        || go::<f32>(layout, dims, params, x, y, v),
        || go::<f64>(layout, dims, params, x, y, v),
    )
}

// ------------------------------------------------------------------------------------------
// The meta-gradient.

/// Which meta-gradient path to run.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Path {
    /// The fused kernel when its workspace fits in shared memory, else the tiled per-layer path.
    Auto,
    /// The per-layer path with the naive product: the reference.
    Reference,
}

pub(super) fn meta_gradient(
    layout: &Layout,
    maml: &Maml,
    meta: &MetaDims,
    params: &Tensor,
    batch: &TaskBatch,
    path: Path,
) -> Result<MetaGradient> {
    by_dtype(
        params.dtype(),
        || meta_typed::<f32>(layout, maml, meta, params, batch, path),
        || meta_typed::<f64>(layout, maml, meta, params, batch, path),
    )
}

fn meta_typed<T: Element>(
    layout: &Layout,
    maml: &Maml,
    meta: &MetaDims,
    params: &Tensor,
    batch: &TaskBatch,
    path: Path,
) -> Result<MetaGradient> {
    const OP: &str = "Maml::meta_gradient";
    let dev = params.cuda_device()?;
    let (tasks, pn) = (meta.tasks, layout.num_params);
    let func = dev.function(MODULE, &format!("maml_meta_{}", T::DTYPE.as_str()))?;
    let fused = match path {
        Path::Auto => fused_plan::<T>(dev, &func, layout, meta.support.max(meta.query), 3)?,
        Path::Reference => None,
    };
    let (per_task, mean) = match fused {
        Some((net, shared)) => {
            let fused = meta_fused::<T>(dev, layout, maml, meta, params, batch, &net, &func, shared)?;
            (fused.per_task, fused.mean)
        }
        None => {
            let product = if path == Path::Reference { Product::Naive } else { Product::Tiled };
            let (xs, xq) = layered::batch_inputs::<T>(batch, OP)?;
            let ys = layered::targets::<T>(layout, &batch.support_y, OP)?;
            let yq = layered::targets::<T>(layout, &batch.query_y, OP)?;
            let p = params.cuda_slice::<T>(OP)?;
            (layered::meta_gradient::<T>(dev, layout, maml, meta, product, p, xs, ys, xq, yq)?, None)
        }
    };
    let mean = match mean {
        Some(mean) => mean,
        None => layered::mean_rows::<T>(dev, &per_task.grads, tasks, pn)?,
    };
    let host_losses = dev.dtoh(&per_task.losses, tasks)?;
    let loss = host_losses.iter().map(|l| l.to_f64()).sum::<f64>() / tasks as f64;
    Ok(MetaGradient {
        loss,
        grad: wrap(mean, &[pn], params),
        per_task_loss: wrap(per_task.losses, &[tasks], params),
        adapted: maml.return_adapted.then(|| wrap(per_task.adapted, &[tasks, pn], params)),
    })
}

/// At most this many per-task gradient entries (tasks × P) are averaged by the last block of
/// `maml_meta` itself: one block reads 256 KiB (f32) in about the time of a separate launch.
/// Larger meta-batches launch `maml_mean_rows` across the GPU instead.
const MEAN_IN_LAUNCH_MAX: usize = 1 << 16;

/// The fused path's results: per task, and the mean gradient when the launch took it.
struct Fused<T> {
    per_task: PerTask<T>,
    mean: Option<CudaSlice<T>>,
}

/// The whole meta-gradient in one launch of `maml_meta_<T>`, workspace in `shared` bytes of
/// dynamic shared memory per block; the mean over tasks too, up to [`MEAN_IN_LAUNCH_MAX`].
#[allow(clippy::too_many_arguments)]
fn meta_fused<T: Element>(
    dev: &CudaDevice,
    layout: &Layout,
    maml: &Maml,
    meta: &MetaDims,
    params: &Tensor,
    batch: &TaskBatch,
    net: &NetConfig,
    func: &CudaFunction,
    shared: u32,
) -> Result<Fused<T>> {
    const OP: &str = "Maml::meta_gradient";
    let (tasks, pn) = (meta.tasks, layout.num_params);
    let steps =
        i32::try_from(maml.inner_steps).map_err(|_| Error::invalid(OP, "inner_steps", "exceeds 2^31 − 1"))?;
    let cfg = MetaConfig {
        net: *net,
        support: meta.support as i32,
        query: meta.query as i32,
        steps,
        second: (maml.order == Order::Second) as i32,
        lr: maml.inner_lr,
    };
    let iterate_len = tasks
        .checked_mul(maml.inner_steps - 1)
        .and_then(|v| v.checked_mul(pn))
        .ok_or_else(|| Error::invalid(OP, "inner_steps", "the stored iterates overflow usize"))?;
    let iterates = dev.alloc::<T>(iterate_len)?;
    let mut adapted = dev.alloc::<T>(tasks * pn)?;
    let mut grads = dev.alloc::<T>(tasks * pn)?;
    let mut losses = dev.alloc::<T>(tasks)?;
    let (sizes, offsets) = tables(dev, layout)?;
    let (xs, xq) = layered::batch_inputs::<T>(batch, OP)?;
    let p = params.cuda_slice::<T>(OP)?;
    let mut args = dev.stream().launch_builder(func);
    args.arg(&cfg).arg(&*sizes).arg(&*offsets).arg(p).arg(xs);
    match layout.loss {
        Loss::Mse => args.arg(batch.support_y.cuda_slice::<T>(OP)?).arg(&NULL),
        Loss::SoftmaxCrossEntropy => args.arg(&NULL).arg(batch.support_y.cuda_slice::<u32>(OP)?),
    };
    args.arg(xq);
    match layout.loss {
        Loss::Mse => args.arg(batch.query_y.cuda_slice::<T>(OP)?).arg(&NULL),
        Loss::SoftmaxCrossEntropy => args.arg(&NULL).arg(batch.query_y.cuda_slice::<u32>(OP)?),
    };
    args.arg(&iterates).arg(&mut adapted).arg(&mut grads).arg(&mut losses);
    let counter = dev.block_counter()?;
    let mut mean = if tasks * pn <= MEAN_IN_LAUNCH_MAX { Some(dev.alloc::<T>(pn)?) } else { None };
    match mean.as_mut() {
        Some(mean) => args.arg(mean),
        None => args.arg(&NULL),
    };
    args.arg(&*counter);
    // SAFETY: the argument list matches `maml_meta_<T>` in maml.cu; support/query inputs and
    // targets have the shapes mod.rs validated (T·Ns·in, T·Ns·out or T·Ns labels, likewise for
    // the query), iterates hold T·(k−1)·P (at least one element), adapted and grads T·P,
    // losses T, mean P (or null), the counter is the device's (0 between launches, and this
    // device's one stream runs launches one after another), and `shared` bytes of dynamic
    // shared memory per block hold the workspace (attribute raised in `fused_plan`).
    unsafe { args.launch(launch_config(tasks, THREADS, shared)?) }.map_err(driver("launching maml_meta"))?;
    Ok(Fused { per_task: PerTask { grads, losses, adapted }, mean })
}
