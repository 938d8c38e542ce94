//! The per-layer CUDA engine: forward, loss head, backward and their R-operator versions as one
//! launch per layer operation, each batched over all tasks, orchestrated here over the k inner
//! steps and the k reverse HVP steps.
//!
//! It runs with one of two products for the matrix-shaped steps (`maml_gemm_tiled_<T>`:
//! 64×64 shared-memory tiles; `maml_gemm_naive_<T>`: one thread per output element) and the same
//! element-wise kernels in between. With the tiled product it is the path for sizes whose
//! per-task workspace does not fit the fused kernel's shared memory (slower, never wrong, never
//! an error for a valid size); with the naive product it is the reference the GPU tests hold the
//! fused and tiled paths against.
//!
//! Per layer l (fan-in fi, fan-out fo, n samples; H the layer input, Δ = ∂L/∂Z, V the direction):
//! forward Z = H·Wᵀ + b, R{Z} = H·Vᵀ + R{H}·Wᵀ + R{b}; backward ∂W = Δᵀ·H, ∂H = Δ·W,
//! R{∂W} = R{Δ}ᵀ·H + Δᵀ·R{H}, R{∂H} = R{Δ}·W + Δ·V; biases by column sums.

use super::{Layout, Loss, Maml, MetaDims, Order, TaskBatch};
use crate::cuda::{driver, CudaDevice, CudaFunction, CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use crate::{Element, Error, Result};

const MODULE: &str = "maml";
const THREADS: u32 = 256;
/// Output tile edge of `maml_gemm_tiled_<T>` (`TILE_M`, `TILE_N` in maml.cu).
const TILE: usize = 64;
/// The grid's y and z limit; the kernels are grid-stride in every dimension.
const GRID_YZ: usize = 65_535;

/// Which product the engine uses for its matrix-shaped steps.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum Product {
    Tiled,
    Naive,
}

/// Mirrors `Operand` in maml.cu: element (i, j) of task t at `off + t·batch + i·rs + j·cs`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Operand {
    off: i64,
    batch: i64,
    rs: i32,
    cs: i32,
}

impl Operand {
    /// A row-major matrix with leading dimension `ld`.
    fn rows(off: usize, batch: usize, ld: usize) -> Operand {
        Operand { off: off as i64, batch: batch as i64, rs: ld as i32, cs: 1 }
    }

    /// The transpose.
    fn t(self) -> Operand {
        Operand { rs: self.cs, cs: self.rs, ..self }
    }
}

/// Mirrors `GemmShape` in maml.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct GemmShape {
    a: Operand,
    b: Operand,
    c: Operand,
    m: i32,
    n: i32,
    k: i32,
    tasks: i32,
    accumulate: i32,
    pad: i32,
}

// SAFETY: #[repr(C)] structs of i64/i32 whose layout matches the kernels' structs field for
// field (Operand: 24 bytes; GemmShape: 96 bytes, no implicit padding on either side).
unsafe impl DeviceRepr for Operand {}
unsafe impl DeviceRepr for GemmShape {}

/// Parameters (or a direction) of every task: task t's vector starts at `t·stride` (0: one
/// row broadcast to all tasks).
#[derive(Clone, Copy)]
pub(crate) struct Params<'a, T> {
    pub buf: &'a CudaSlice<T>,
    pub stride: usize,
}

impl<'a, T> Params<'a, T> {
    /// One row of `pn` values per task.
    fn rows(buf: &'a CudaSlice<T>, pn: usize) -> Params<'a, T> {
        Params { buf, stride: pn }
    }
}

/// A [T, n, width] input of the call: contiguous, task stride n·width.
#[derive(Clone, Copy)]
pub(crate) struct Input<'a, T> {
    pub x: &'a CudaSlice<T>,
    pub n: usize,
}

/// Regression targets or class labels of a sample set, [T, n, out] or [T, n].
#[derive(Clone, Copy)]
pub(crate) enum Targets<'a, T> {
    Values(&'a CudaSlice<T>),
    Labels(&'a CudaSlice<u32>),
}

const NULL: u64 = 0;

fn int(op: &'static str, what: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(op, what, format!("{v} exceeds 2^31 − 1")))
}

/// The loaded kernels of one dtype.
struct Kernels<'a> {
    dev: &'a CudaDevice,
    gemm: CudaFunction,
    product: Product,
    bias_act: CudaFunction,
    r_bias_act: CudaFunction,
    loss_rows: CudaFunction,
    task_loss: CudaFunction,
    col_sum: CudaFunction,
    act_back: CudaFunction,
    sgd_step: CudaFunction,
    descend: CudaFunction,
}

impl<'a> Kernels<'a> {
    fn load<T: Element>(dev: &'a CudaDevice, product: Product) -> Result<Kernels<'a>> {
        let f = |name: &str| dev.function(MODULE, &format!("maml_{name}_{}", T::DTYPE.as_str()));
        Ok(Kernels {
            dev,
            gemm: f(if product == Product::Tiled { "gemm_tiled" } else { "gemm_naive" })?,
            product,
            bias_act: f("bias_act")?,
            r_bias_act: f("r_bias_act")?,
            loss_rows: f("loss_rows")?,
            task_loss: f("task_loss")?,
            col_sum: f("col_sum")?,
            act_back: f("act_back")?,
            sgd_step: f("sgd_step")?,
            descend: f("descend")?,
        })
    }

    /// C (+)= A·B for every task; A is m×k, B k×n, C m×n.
    #[allow(clippy::too_many_arguments)]
    fn gemm<T: Element>(
        &self,
        a: (&CudaSlice<T>, Operand),
        b: (&CudaSlice<T>, Operand),
        c: (&mut CudaSlice<T>, Operand),
        (m, n, k): (usize, usize, usize),
        tasks: usize,
        accumulate: bool,
    ) -> Result<()> {
        const OP: &str = "maml (per-layer path)";
        let shape = GemmShape {
            a: a.1,
            b: b.1,
            c: c.1,
            m: int(OP, "rows of a layer product", m)?,
            n: int(OP, "columns of a layer product", n)?,
            k: int(OP, "inner size of a layer product", k)?,
            tasks: int(OP, "tasks", tasks)?,
            accumulate: accumulate as i32,
            pad: 0,
        };
        let cfg = match self.product {
            Product::Tiled => LaunchConfig {
                grid_dim: (
                    n.div_ceil(TILE).clamp(1, i32::MAX as usize) as u32,
                    m.div_ceil(TILE).clamp(1, GRID_YZ) as u32,
                    tasks.clamp(1, GRID_YZ) as u32,
                ),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            },
            Product::Naive => crate::cuda::grid_1d(tasks.saturating_mul(m).saturating_mul(n), THREADS),
        };
        let mut args = self.dev.stream().launch_builder(&self.gemm);
        args.arg(a.0).arg(b.0).arg(c.0).arg(&shape);
        // SAFETY: the arguments match `maml_gemm_{tiled,naive}_<T>(const T*, const T*, T*,
        // GemmShape)`; every operand's largest index (off + (tasks−1)·batch + (rows−1)·rs +
        // (cols−1)·cs) lies inside its buffer by construction of the callers below; the tiled
        // kernel takes exactly THREADS threads (its __launch_bounds__) and static shared memory.
        unsafe { args.launch(cfg) }.map_err(driver("launching the per-layer product"))?;
        Ok(())
    }
}

/// A 1-D grid-stride launch over `items` elements.
fn grid(items: usize) -> LaunchConfig {
    crate::cuda::grid_1d(items, THREADS)
}

/// Activations, deltas and their R{} directions of every task, allocated once per call.
/// `z[l]`, `rz[l]`: [T, rows, fo_l]; `h[l]`, `rh[l]` likewise for the hidden layers; deltas
/// [T, rows, max width] (current and next, swapped per layer); `row_loss` [T, rows].
pub(crate) struct Engine<'a, T> {
    k: Kernels<'a>,
    layout: &'a Layout,
    tasks: usize,
    rows: usize,
    wide: usize,
    z: Vec<CudaSlice<T>>,
    h: Vec<CudaSlice<T>>,
    rz: Vec<CudaSlice<T>>,
    rh: Vec<CudaSlice<T>>,
    d: CudaSlice<T>,
    d_next: CudaSlice<T>,
    rd: CudaSlice<T>,
    rd_next: CudaSlice<T>,
    row_loss: CudaSlice<T>,
    // Kernel integer arguments, checked once.
    tasks_i: i32,
    act: i32,
}

const OP: &str = "maml (per-layer path)";

impl<'a, T: Element> Engine<'a, T> {
    /// Buffers for `tasks` tasks of up to `rows` samples; `with_r`: also the R{} buffers.
    pub fn new(
        dev: &'a CudaDevice,
        layout: &'a Layout,
        product: Product,
        tasks: usize,
        rows: usize,
        with_r: bool,
    ) -> Result<Engine<'a, T>> {
        let elems = |width: usize| {
            tasks
                .checked_mul(rows)
                .and_then(|v| v.checked_mul(width))
                .ok_or_else(|| Error::invalid(OP, "tasks and samples", "the buffer sizes overflow usize"))
        };
        let layers = layout.layers();
        let alloc_layers = |count: usize| -> Result<Vec<CudaSlice<T>>> {
            (0..count).map(|l| dev.alloc::<T>(elems(layout.fan_out(l))?)).collect()
        };
        let wide = layout.max_width();
        let r_layers = |count: usize| if with_r { count } else { 0 };
        Ok(Engine {
            k: Kernels::load::<T>(dev, product)?,
            layout,
            tasks,
            rows,
            wide,
            z: alloc_layers(layers)?,
            h: alloc_layers(layers - 1)?,
            rz: alloc_layers(r_layers(layers))?,
            rh: alloc_layers(r_layers(layers - 1))?,
            d: dev.alloc::<T>(elems(wide)?)?,
            d_next: dev.alloc::<T>(elems(wide)?)?,
            rd: dev.alloc::<T>(elems(if with_r { wide } else { 1 })?)?,
            rd_next: dev.alloc::<T>(elems(if with_r { wide } else { 1 })?)?,
            row_loss: dev.alloc::<T>(elems(1)?)?,
            tasks_i: int(OP, "tasks", tasks)?,
            act: layout.activation as i32,
        })
    }

    /// The R{} buffers exist (asked for in `new`).
    fn check_r(&self) -> Result<()> {
        if self.rz.len() == self.layout.layers() {
            Ok(())
        } else {
            Err(Error::invalid(OP, "direction", "the engine was built without R{} buffers (a bug)"))
        }
    }

    /// The input operand of layer l (`x` for the first layer, else the hidden activations).
    fn input_op(&self, l: usize, x: Input<'_, T>) -> Operand {
        let fi = self.layout.fan_in(l);
        if l == 0 {
            Operand::rows(0, x.n * fi, fi)
        } else {
            Operand::rows(0, self.rows * fi, fi)
        }
    }

    /// W_l of every task as the k×n operand B(i, o) = W[o, i] of the forward product.
    fn weight_op(&self, l: usize, p: Params<'_, T>) -> Operand {
        Operand::rows(self.layout.w_offset[l], p.stride, self.layout.fan_in(l)).t()
    }

    /// Forward pass of `x` at `p`; with `v` also R{Z}, R{H} along `v`.
    pub fn forward(&mut self, p: Params<'_, T>, v: Option<Params<'_, T>>, x: Input<'_, T>) -> Result<()> {
        if v.is_some() {
            self.check_r()?;
        }
        let (tasks, n, layers) = (self.tasks, x.n, self.layout.layers());
        let n_i = int(OP, "samples", n)?;
        for l in 0..layers {
            let (fi, fo) = (self.layout.fan_in(l), self.layout.fan_out(l));
            let hidden = l + 1 < layers;
            let in_op = self.input_op(l, x);
            let out_op = Operand::rows(0, self.rows * fo, fo);
            let input = if l == 0 { x.x } else { &self.h[l - 1] };
            let w = self.weight_op(l, p);
            self.k.gemm((input, in_op), (p.buf, w), (&mut self.z[l], out_op), (n, fo, fi), tasks, false)?;
            let b_off = (self.layout.w_offset[l] + fo * fi) as i64;
            let (p_stride, z_stride, fo_i) = (p.stride as i64, (self.rows * fo) as i64, fo as i32);
            let mut args = self.k.dev.stream().launch_builder(&self.k.bias_act);
            args.arg(&mut self.z[l]);
            match hidden {
                true => args.arg(&mut self.h[l]),
                false => args.arg(&NULL),
            };
            args.arg(p.buf).arg(&b_off).arg(&p_stride).arg(&n_i).arg(&fo_i).arg(&z_stride);
            args.arg(&self.tasks_i).arg(&self.act);
            // SAFETY: matches `maml_bias_act_<T>`; z and h hold T·rows·fo ≥ T·n·fo elements,
            // p holds the bias at b_off + t·p_stride for every task.
            unsafe { args.launch(grid(tasks * n * fo)) }.map_err(driver("launching maml_bias_act"))?;
            let Some(v) = v else { continue };
            let vw = self.weight_op(l, v);
            let input = if l == 0 { x.x } else { &self.h[l - 1] };
            self.k.gemm((input, in_op), (v.buf, vw), (&mut self.rz[l], out_op), (n, fo, fi), tasks, false)?;
            if l > 0 {
                let r_in = (&self.rh[l - 1], self.input_op(l, x));
                self.k.gemm(r_in, (p.buf, w), (&mut self.rz[l], out_op), (n, fo, fi), tasks, true)?;
            }
            let v_stride = v.stride as i64;
            let mut args = self.k.dev.stream().launch_builder(&self.k.r_bias_act);
            args.arg(&mut self.rz[l]);
            match hidden {
                true => args.arg(&mut self.rh[l]),
                false => args.arg(&NULL),
            };
            args.arg(&self.z[l]).arg(v.buf).arg(&b_off).arg(&v_stride).arg(&n_i).arg(&fo_i).arg(&z_stride);
            args.arg(&self.tasks_i).arg(&self.act);
            // SAFETY: matches `maml_r_bias_act_<T>`; rz, rh, z hold T·rows·fo elements, v the
            // bias direction at b_off + t·v_stride.
            unsafe { args.launch(grid(tasks * n * fo)) }.map_err(driver("launching maml_r_bias_act"))?;
        }
        Ok(())
    }

    /// The loss of the last forward pass over n samples: the deltas ∂L/∂Z_L (and R{Δ} with
    /// `r`), and the per-task losses into `losses` when given.
    pub fn head(
        &mut self,
        targets: Targets<'_, T>,
        n: usize,
        r: bool,
        losses: Option<&mut CudaSlice<T>>,
    ) -> Result<()> {
        if r {
            self.check_r()?;
        }
        let last = self.layout.layers() - 1;
        let width = self.layout.output();
        let (z_stride, d_stride) = ((self.rows * width) as i64, (self.rows * self.wide) as i64);
        let (n_i, width_i, rows_i) = (int(OP, "samples", n)?, width as i32, int(OP, "samples", self.rows)?);
        let loss = matches!(self.layout.loss, Loss::SoftmaxCrossEntropy) as i32;
        let mut args = self.k.dev.stream().launch_builder(&self.k.loss_rows);
        args.arg(&self.z[last]);
        match r {
            true => args.arg(&self.rz[last]),
            false => args.arg(&NULL),
        };
        args.arg(&z_stride);
        match targets {
            Targets::Values(y) => args.arg(y).arg(&NULL),
            Targets::Labels(l) => args.arg(&NULL).arg(l),
        };
        args.arg(&n_i).arg(&width_i).arg(&self.tasks_i).arg(&loss).arg(&mut self.d);
        match r {
            true => args.arg(&mut self.rd),
            false => args.arg(&NULL),
        };
        args.arg(&d_stride).arg(&mut self.row_loss).arg(&rows_i);
        // SAFETY: matches `maml_loss_rows_<T>`; z, rz hold T·rows·out, y T·n·out (or labels
        // T·n, validated < out by mod.rs), d and rd T·rows·wide, row_loss T·rows elements.
        unsafe { args.launch(grid(self.tasks * n)) }.map_err(driver("launching maml_loss_rows"))?;
        if let Some(losses) = losses {
            let mut args = self.k.dev.stream().launch_builder(&self.k.task_loss);
            args.arg(&self.row_loss).arg(&rows_i).arg(&n_i).arg(losses).arg(&self.tasks_i);
            // SAFETY: matches `maml_task_loss_<T>`; row_loss holds T·rows, losses T elements.
            unsafe { args.launch(grid(self.tasks)) }.map_err(driver("launching maml_task_loss"))?;
        }
        Ok(())
    }

    /// Backward pass from the deltas of `head`: the gradient into `grad` ([T, P]) when given;
    /// with `v` (and `head(.., r = true, ..)`), H·v into `hv` ([T, P]).
    pub fn backward(
        &mut self,
        p: Params<'_, T>,
        v: Option<(Params<'_, T>, &mut CudaSlice<T>)>,
        x: Input<'_, T>,
        mut grad: Option<&mut CudaSlice<T>>,
    ) -> Result<()> {
        let mut v = v;
        if v.is_some() {
            self.check_r()?;
        }
        let (tasks, n, pn) = (self.tasks, x.n, self.layout.num_params);
        let n_i = int(OP, "samples", n)?;
        let d_batch = self.rows * self.wide;
        for l in (0..self.layout.layers()).rev() {
            let (fi, fo) = (self.layout.fan_in(l), self.layout.fan_out(l));
            let in_op = self.input_op(l, x);
            let delta = Operand::rows(0, d_batch, fo);
            let dw = Operand::rows(self.layout.w_offset[l], pn, fi);
            let b_off = self.layout.w_offset[l] + fo * fi;
            let input = if l == 0 { x.x } else { &self.h[l - 1] };
            if let Some(grad) = grad.as_deref_mut() {
                self.k.gemm(
                    (&self.d, delta.t()),
                    (input, in_op),
                    (&mut *grad, dw),
                    (fo, fi, n),
                    tasks,
                    false,
                )?;
                self.col_sum(false, b_off, grad, n_i, fo)?;
            }
            if let Some((_, hv)) = v.as_mut() {
                let hv = &mut **hv;
                self.k.gemm(
                    (&self.rd, delta.t()),
                    (input, in_op),
                    (&mut *hv, dw),
                    (fo, fi, n),
                    tasks,
                    false,
                )?;
                if l > 0 {
                    let r_in = (&self.rh[l - 1], in_op);
                    self.k.gemm((&self.d, delta.t()), r_in, (&mut *hv, dw), (fo, fi, n), tasks, true)?;
                }
                self.col_sum(true, b_off, hv, n_i, fo)?;
            }
            if l == 0 {
                break;
            }
            // ∂H = Δ·W (B(o, i) = W[o, i]); R{∂H} = R{Δ}·W + Δ·V; then through σ.
            let below = Operand::rows(0, d_batch, fi);
            let w = Operand::rows(self.layout.w_offset[l], p.stride, fi);
            self.k.gemm(
                (&self.d, delta),
                (p.buf, w),
                (&mut self.d_next, below),
                (n, fi, fo),
                tasks,
                false,
            )?;
            if let Some((vp, _)) = v.as_ref() {
                let vw = Operand::rows(self.layout.w_offset[l], vp.stride, fi);
                self.k.gemm(
                    (&self.rd, delta),
                    (p.buf, w),
                    (&mut self.rd_next, below),
                    (n, fi, fo),
                    tasks,
                    false,
                )?;
                self.k.gemm(
                    (&self.d, delta),
                    (vp.buf, vw),
                    (&mut self.rd_next, below),
                    (n, fi, fo),
                    tasks,
                    true,
                )?;
            }
            self.act_back(l - 1, n_i, fi, v.is_some())?;
            std::mem::swap(&mut self.d, &mut self.d_next);
            std::mem::swap(&mut self.rd, &mut self.rd_next);
        }
        Ok(())
    }

    /// out[t, off .. off + width] = column sums of Δ (or R{Δ} with `r`) over n rows.
    fn col_sum(&self, r: bool, off: usize, out: &mut CudaSlice<T>, n_i: i32, width: usize) -> Result<()> {
        let (d_stride, off, out_stride, width_i) =
            ((self.rows * self.wide) as i64, off as i64, self.layout.num_params as i64, width as i32);
        let mut args = self.k.dev.stream().launch_builder(&self.k.col_sum);
        args.arg(if r { &self.rd } else { &self.d }).arg(&d_stride).arg(&n_i).arg(&width_i);
        args.arg(out).arg(&off).arg(&out_stride).arg(&self.tasks_i);
        // SAFETY: matches `maml_col_sum_<T>`; d holds T·rows·wide elements, out T·P with the
        // bias block of `width` elements at `off` inside each task's row.
        unsafe { args.launch(grid(self.tasks * width)) }.map_err(driver("launching maml_col_sum")).map(|_| ())
    }

    /// d_next (and rd_next with `r`) from ∂H to the deltas of hidden layer `below`.
    fn act_back(&mut self, below: usize, n_i: i32, width: usize, r: bool) -> Result<()> {
        let (d_stride, z_stride, width_i) =
            ((self.rows * self.wide) as i64, (self.rows * width) as i64, width as i32);
        let mut args = self.k.dev.stream().launch_builder(&self.k.act_back);
        args.arg(&mut self.d_next);
        match r {
            true => args.arg(&mut self.rd_next),
            false => args.arg(&NULL),
        };
        args.arg(&d_stride).arg(&self.z[below]);
        match r {
            true => args.arg(&self.rz[below]),
            false => args.arg(&NULL),
        };
        args.arg(&z_stride).arg(&n_i).arg(&width_i).arg(&self.tasks_i).arg(&self.act);
        // SAFETY: matches `maml_act_back_<T>`; d_next, rd_next hold T·rows·wide, z and rz of
        // layer `below` T·rows·width elements (width = its fan-out).
        let items = self.tasks * n_i as usize * width;
        unsafe { args.launch(grid(items)) }.map_err(driver("launching maml_act_back")).map(|_| ())
    }

    /// The last layer's outputs [T, rows, out] (the forward result when rows = n).
    pub fn into_outputs(mut self) -> Option<CudaSlice<T>> {
        self.z.pop()
    }
}

/// Per-task results of a meta-gradient path: gradients [T, P], losses [T], adapted parameters
/// θ_k [T, P].
pub(crate) struct PerTask<T> {
    pub grads: CudaSlice<T>,
    pub losses: CudaSlice<T>,
    pub adapted: CudaSlice<T>,
}

/// The k inner steps, the query gradient and (second order) the k reverse HVP steps of every
/// task, one launch per layer operation; `params` is the one broadcast row θ [P].
#[allow(clippy::too_many_arguments)]
pub(crate) fn meta_gradient<T: Element>(
    dev: &CudaDevice,
    layout: &Layout,
    maml: &Maml,
    meta: &MetaDims,
    product: Product,
    params: &CudaSlice<T>,
    xs: &CudaSlice<T>,
    ys: Targets<'_, T>,
    xq: &CudaSlice<T>,
    yq: Targets<'_, T>,
) -> Result<PerTask<T>> {
    let (tasks, pn, steps) = (meta.tasks, layout.num_params, maml.inner_steps);
    let second = maml.order == Order::Second;
    let mut e = Engine::<T>::new(dev, layout, product, tasks, meta.support.max(meta.query), second)?;
    let support = Input { x: xs, n: meta.support };
    let query = Input { x: xq, n: meta.query };
    let (pn_i, tasks_i) = (int(OP, "parameters", pn)?, e.tasks_i);
    // thetas[j] = θ_{j+1}; θ_0 = params (broadcast).
    let mut thetas = (0..steps).map(|_| dev.alloc::<T>(tasks * pn)).collect::<Result<Vec<_>>>()?;
    let mut g = dev.alloc::<T>(tasks * pn)?;
    let mut hv = dev.alloc::<T>(tasks * pn)?;
    let mut losses = dev.alloc::<T>(tasks)?;
    let theta0 = Params { buf: params, stride: 0 };
    for j in 0..steps {
        let (done, next) = thetas.split_at_mut(j);
        let theta = done.last().map_or(theta0, |t| Params::rows(t, pn));
        e.forward(theta, None, support)?;
        e.head(ys, support.n, false, None)?;
        e.backward(theta, None, support, Some(&mut hv))?;
        let src_stride = theta.stride as i64;
        let mut args = dev.stream().launch_builder(&e.k.sgd_step);
        args.arg(&mut next[0]).arg(theta.buf).arg(&src_stride).arg(&hv).arg(&maml.inner_lr);
        args.arg(&pn_i).arg(&tasks_i);
        // SAFETY: matches `maml_sgd_step_<T>`; dst and hv hold T·P elements, src P (stride 0)
        // or T·P (stride P).
        unsafe { args.launch(grid(tasks * pn)) }.map_err(driver("launching maml_sgd_step"))?;
    }
    let adapted_view = thetas.last().map_or(theta0, |t| Params::rows(t, pn));
    e.forward(adapted_view, None, query)?;
    e.head(yq, query.n, false, Some(&mut losses))?;
    e.backward(adapted_view, None, query, Some(&mut g))?;
    if second {
        for j in (0..steps).rev() {
            let theta = if j == 0 { theta0 } else { Params::rows(&thetas[j - 1], pn) };
            e.forward(theta, Some(Params::rows(&g, pn)), support)?;
            e.head(ys, support.n, true, None)?;
            e.backward(theta, Some((Params::rows(&g, pn), &mut hv)), support, None)?;
            let total = (tasks * pn) as i64;
            let mut args = dev.stream().launch_builder(&e.k.descend);
            args.arg(&mut g).arg(&hv).arg(&maml.inner_lr).arg(&total);
            // SAFETY: matches `maml_descend_<T>`; g and hv hold `total` = T·P elements.
            unsafe { args.launch(grid(tasks * pn)) }.map_err(driver("launching maml_descend"))?;
        }
    }
    let adapted =
        thetas.pop().ok_or_else(|| Error::invalid("Maml::meta_gradient", "inner_steps", "must be ≥ 1"))?;
    Ok(PerTask { grads: g, losses, adapted })
}

/// The mean over tasks of [T, P] rows (the same kernel as the fused path's).
pub(crate) fn mean_rows<T: Element>(
    dev: &CudaDevice,
    rows: &CudaSlice<T>,
    tasks: usize,
    pn: usize,
) -> Result<CudaSlice<T>> {
    let mean_fn = dev.function(MODULE, &format!("maml_mean_rows_{}", T::DTYPE.as_str()))?;
    let mut mean = dev.alloc::<T>(pn)?;
    let (tasks_i, pn_i) = (int(OP, "tasks", tasks)?, int(OP, "parameters", pn)?);
    let mut args = dev.stream().launch_builder(&mean_fn);
    args.arg(rows).arg(&mut mean).arg(&tasks_i).arg(&pn_i);
    // SAFETY: rows holds tasks·P elements and mean P; the kernel is grid-stride over P.
    unsafe { args.launch(grid(pn)) }.map_err(driver("launching maml_mean_rows"))?;
    Ok(mean)
}

/// The inputs of `meta_gradient` from a validated batch.
pub(crate) fn targets<'a, T: Element>(
    layout: &Layout,
    y: &'a crate::Tensor,
    op: &'static str,
) -> Result<Targets<'a, T>> {
    Ok(match layout.loss {
        Loss::Mse => Targets::Values(y.cuda_slice::<T>(op)?),
        Loss::SoftmaxCrossEntropy => Targets::Labels(y.cuda_slice::<u32>(op)?),
    })
}

/// Support and query inputs of a batch on the device.
pub(crate) fn batch_inputs<'a, T: Element>(
    batch: &'a TaskBatch,
    op: &'static str,
) -> Result<(&'a CudaSlice<T>, &'a CudaSlice<T>)> {
    Ok((batch.support_x.cuda_slice::<T>(op)?, batch.query_x.cuda_slice::<T>(op)?))
}
