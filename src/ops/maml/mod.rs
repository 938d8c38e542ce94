//! Second-order MAML: exact Hessian-vector products of MLPs batched over tasks, and the exact
//! k-step meta-gradient (Finn et al. 2017; Pearlmutter 1994).
//!
//! MAML adapts parameters θ by k SGD steps on a task's support set,
//! θ_{j+1} = θ_j − α∇L_support(θ_j), and meta-learns θ through them. The exact meta-gradient of
//! the query loss after adaptation is
//!
//! ```text
//! g ← ∇L_query(θ_k);   for j = k−1 … 0:  g ← g − α · H_j g,   H_j = ∇²L_support(θ_j)
//! ```
//!
//! where every H_j g is an exact Hessian-vector product computed by the R-operator
//! (forward-over-reverse: one augmented forward pass, one augmented backward pass), never a
//! finite difference and never a materialised Hessian. The memory per task is the k inner
//! iterates θ_0 … θ_{k−1} and activations: one set on the GPU, and on the CPU one set per inner
//! step (the plain passes of step j, which the reverse HVP at θ_j reuses instead of recomputing:
//! k + 1 tapes of a few values per sample and unit). Nothing grows with an autograd graph.
//!
//! - [`Mlp`]: the network ([`Activation`], [`Loss`]), its flat parameter layout, `init`,
//!   `forward`, `loss_and_grad` and `hvp`, for T tasks at once.
//! - [`Maml`]: `meta_gradient` over a [`TaskBatch`], returning a [`MetaGradient`].
//!
//! The CPU path runs tasks in parallel with rayon, each thread over one preallocated workspace; the
//! CUDA path runs a whole meta-batch (all inner steps, the query gradient and the k reverse HVP
//! steps of every task) in one kernel launch, a thread block per task, its workspace in shared
//! memory. Sizes whose per-task workspace does not fit in a block's shared memory take a tiled
//! path instead: one launch per layer operation, batched over tasks, with 64×64-tile products
//! (slower, same results, never an error for a valid size).
//!
//! ```
//! use metakernels::maml::{Activation, Loss, Maml, Mlp, Order, TaskBatch};
//! use metakernels::{DType, Device, Tensor};
//! # fn main() -> metakernels::Result<()> {
//! let dev = Device::cpu();
//! let mlp = Mlp { sizes: vec![1, 40, 40, 1], activation: Activation::Relu, loss: Loss::Mse };
//! let theta = mlp.init(0, DType::F32, &dev)?; // [P]
//! let (t, k) = (4, 10); // 4 tasks, 10 support and 10 query points each
//! let xs: Vec<f32> = (0..t * k).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
//! let ys: Vec<f32> = xs.iter().map(|x| 2.0 * x.sin()).collect();
//! let x = Tensor::from_slice(&xs, &[t, k, 1], &dev)?;
//! let y = Tensor::from_slice(&ys, &[t, k, 1], &dev)?;
//! let batch = TaskBatch { support_x: x.clone(), support_y: y.clone(), query_x: x, query_y: y };
//! let maml = Maml { inner_steps: 1, inner_lr: 0.01, order: Order::Second, return_adapted: false };
//! let out = maml.meta_gradient(&mlp, &theta, &batch)?;
//! assert_eq!(out.grad.shape(), &[mlp.num_params()]);
//! assert_eq!(out.per_task_loss.shape(), &[t]);
//! assert!(out.loss.is_finite());
//! # Ok(()) }
//! ```

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
mod layered;
mod layout;
mod real;

use crate::tensor::Storage;
use crate::{DType, Device, Error, Result, Tensor};

pub(crate) use layout::Layout;

/// The activation applied after every layer but the last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Activation {
    /// max(z, 0); its derivative at 0 is taken as 0 and its second derivative is 0.
    Relu,
    /// tanh(z).
    Tanh,
    /// The tanh form of GELU: 0.5·z·(1 + tanh(√(2/π)·(z + 0.044715·z³))).
    Gelu,
    /// ln(1 + eᶻ), computed stably.
    Softplus,
}

/// The loss of the network's output against the targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Loss {
    /// Mean over samples and outputs of (ŷ − y)²; targets y: [T, N, out] of the parameter dtype.
    Mse,
    /// Softmax cross-entropy of the outputs (logits), mean over samples; targets are `u32` class
    /// labels [T, N], each below the output width.
    SoftmaxCrossEntropy,
}

/// A multilayer perceptron h_l = σ(W_l h_{l−1} + b_l), with no activation after the last layer.
///
/// # Parameter layout
///
/// One flat vector of [`Mlp::num_params`] values: for each layer l = 1 … L in order, the weight
/// W_l (`sizes[l] × sizes[l−1]`, row-major: row o holds the weights into output unit o), then
/// the bias b_l (`sizes[l]`). Parameters of T tasks are the rows of a `[T, P]` tensor, or one
/// `[P]` row shared by (broadcast to) every task.
///
/// Every method works on f32 or f64 tensors, on the CPU or a CUDA device; all tensors of a call
/// must share one dtype and one device (labels are `u32`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Mlp {
    /// Layer widths, input first, output last: at least two entries, each at least 1.
    pub sizes: Vec<usize>,
    /// The hidden-layer activation.
    pub activation: Activation,
    /// The loss used by [`Mlp::loss_and_grad`], [`Mlp::hvp`] and [`Maml::meta_gradient`].
    pub loss: Loss,
}

/// First- or second-order MAML.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Order {
    /// Drops the Hessian terms: the meta-gradient is the query gradient at the adapted
    /// parameters (FOMAML).
    First,
    /// The exact meta-gradient, with k Hessian-vector products per task.
    Second,
}

/// The support and query sets of T tasks.
///
/// `support_x`: [T, Ns, in]; `support_y`: [T, Ns, out] for [`Loss::Mse`] or [T, Ns] `u32` labels
/// for [`Loss::SoftmaxCrossEntropy`]; likewise `query_x` / `query_y` with Nq samples (Ns and Nq
/// may differ).
#[derive(Clone, Debug)]
pub struct TaskBatch {
    /// Support inputs [T, Ns, in].
    pub support_x: Tensor,
    /// Support targets [T, Ns, out] or labels [T, Ns].
    pub support_y: Tensor,
    /// Query inputs [T, Nq, in].
    pub query_x: Tensor,
    /// Query targets [T, Nq, out] or labels [T, Nq].
    pub query_y: Tensor,
}

/// The MAML meta-gradient computation: k inner SGD steps of rate α on each task's support set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Maml {
    /// k ≥ 1 inner SGD steps.
    pub inner_steps: usize,
    /// The inner learning rate α (finite).
    pub inner_lr: f64,
    /// First or second order.
    pub order: Order,
    /// Whether to return the adapted parameters θ_k of every task.
    pub return_adapted: bool,
}

/// The result of [`Maml::meta_gradient`].
#[derive(Clone, Debug)]
pub struct MetaGradient {
    /// The meta-loss: the mean over tasks of the query loss at the adapted parameters.
    pub loss: f64,
    /// The meta-gradient `[P]`: the mean over tasks of d L_query(θ_k) / d θ.
    pub grad: Tensor,
    /// The query loss of each task at its adapted parameters `[T]`.
    pub per_task_loss: Tensor,
    /// The adapted parameters θ_k of every task [T, P], when asked for.
    pub adapted: Option<Tensor>,
}

impl Mlp {
    /// The number of parameters P: `Σ_l sizes[l]·sizes[l−1] + sizes[l]`.
    ///
    /// Saturates at `usize::MAX` for absurd sizes (which every other method rejects).
    pub fn num_params(&self) -> usize {
        self.sizes
            .windows(2)
            .try_fold(0usize, |acc, w| w[0].checked_mul(w[1])?.checked_add(w[1])?.checked_add(acc))
            .unwrap_or(usize::MAX)
    }

    /// Fresh parameters `[P]` of `dtype` (f32 or f64) on `device`.
    ///
    /// Scheme (PyTorch's `nn.Linear` default): every weight and bias of layer l is drawn
    /// independently and uniformly from [−1/√fan_in, 1/√fan_in), fan_in = sizes[l−1], from a
    /// SplitMix64 stream seeded with `seed` and consumed in parameter-layout order. The values
    /// are drawn in f64 and rounded once, so the same seed gives the same parameters on every
    /// device.
    pub fn init(&self, seed: u64, dtype: DType, device: &Device) -> Result<Tensor> {
        let layout = Layout::new(self, "Mlp::init")?;
        check_float_dtype(dtype, "Mlp::init")?;
        let mut rng = crate::testing::Rng::new(seed);
        let mut values = Vec::with_capacity(layout.num_params);
        for l in 0..layout.layers() {
            let bound = 1.0 / (layout.fan_in(l) as f64).sqrt();
            let count = layout.fan_out(l) * (layout.fan_in(l) + 1);
            values.extend((0..count).map(|_| rng.uniform_in(-bound, bound)));
        }
        let host = Tensor::from_vec(values, &[layout.num_params], &Device::cpu())?.to_dtype(dtype)?;
        host.to_device(device)
    }

    /// The network's outputs [T, N, out] for parameters [T, P] (or `[P]`, broadcast) and inputs
    /// x [T, N, in].
    pub fn forward(&self, params: &Tensor, x: &Tensor) -> Result<Tensor> {
        const OP: &str = "Mlp::forward";
        let layout = Layout::new(self, OP)?;
        let dims = check_inputs(&layout, OP, params, x, None)?;
        match (params.storage(), params.dtype()) {
            (Storage::Cpu(_), DType::F32) => cpu::forward_op::<f32>(&layout, &dims, params, x),
            (Storage::Cpu(_), _) => cpu::forward_op::<f64>(&layout, &dims, params, x),
            #[cfg(feature = "cuda")]
            (Storage::Cuda(_), _) => cuda::forward(&layout, &dims, params, x),
        }
    }

    /// The loss of every task `[T]` and its gradient with respect to that task's parameters
    /// [T, P], for parameters [T, P] (or `[P]`, broadcast), inputs [T, N, in] and targets
    /// ([T, N, out], or [T, N] `u32` labels for cross-entropy).
    pub fn loss_and_grad(&self, params: &Tensor, x: &Tensor, y: &Tensor) -> Result<(Tensor, Tensor)> {
        const OP: &str = "Mlp::loss_and_grad";
        let layout = Layout::new(self, OP)?;
        let dims = check_inputs(&layout, OP, params, x, Some(y))?;
        match (params.storage(), params.dtype()) {
            (Storage::Cpu(_), DType::F32) => cpu::loss_and_grad::<f32>(&layout, &dims, params, x, y),
            (Storage::Cpu(_), _) => cpu::loss_and_grad::<f64>(&layout, &dims, params, x, y),
            #[cfg(feature = "cuda")]
            (Storage::Cuda(_), _) => cuda::loss_and_grad(&layout, &dims, params, x, y),
        }
    }

    /// The exact Hessian-vector product H_t v_t [T, P] of every task's loss, where H_t is the
    /// Hessian of task t's loss at its parameters and v_t the t-th row of `v` ([T, P], or `[P]`
    /// broadcast).
    ///
    /// Computed by the R-operator (Pearlmutter 1994): one forward pass with its directional
    /// derivative, one backward pass with its directional derivative. Cost: about twice a
    /// gradient.
    pub fn hvp(&self, params: &Tensor, x: &Tensor, y: &Tensor, v: &Tensor) -> Result<Tensor> {
        const OP: &str = "Mlp::hvp";
        let layout = Layout::new(self, OP)?;
        let dims = check_inputs(&layout, OP, params, x, Some(y))?;
        check_params_like(&layout, OP, "v", v, params, dims.tasks)?;
        match (params.storage(), params.dtype()) {
            (Storage::Cpu(_), DType::F32) => cpu::hvp::<f32>(&layout, &dims, params, x, y, v),
            (Storage::Cpu(_), _) => cpu::hvp::<f64>(&layout, &dims, params, x, y, v),
            #[cfg(feature = "cuda")]
            (Storage::Cuda(_), _) => cuda::hvp(&layout, &dims, params, x, y, v),
        }
    }
}

impl Maml {
    /// The meta-loss and meta-gradient of `mlp` at `params` (`[P]`) over the tasks of `batch`.
    ///
    /// For each task: k SGD steps of rate α on the support set from θ_0 = `params`, the query
    /// loss and gradient at θ_k, then (second order) the k reverse steps g ← g − α·H_j g with
    /// exact Hessian-vector products at the stored iterates. Returns the mean over tasks.
    ///
    /// Errors: `inner_steps` = 0, non-finite `inner_lr`, `params` not of shape `[P]`, any tensor of
    /// the batch of the wrong shape, dtype or device, labels ≥ the number of classes.
    pub fn meta_gradient(&self, mlp: &Mlp, params: &Tensor, batch: &TaskBatch) -> Result<MetaGradient> {
        const OP: &str = "Maml::meta_gradient";
        let (layout, meta) = self.validate(mlp, params, batch, OP)?;
        match (params.storage(), params.dtype()) {
            (Storage::Cpu(_), DType::F32) => cpu::meta_gradient::<f32>(&layout, self, &meta, params, batch),
            (Storage::Cpu(_), _) => cpu::meta_gradient::<f64>(&layout, self, &meta, params, batch),
            #[cfg(feature = "cuda")]
            (Storage::Cuda(_), _) => {
                cuda::meta_gradient(&layout, self, &meta, params, batch, cuda::Path::Auto)
            }
        }
    }

    /// [`Maml::meta_gradient`] through the simple reference kernels on a CUDA device: one launch
    /// per layer operation, batched over tasks, each kernel one thread per output element with
    /// plain loops. The baseline the GPU tests and benchmarks hold the fused and tiled paths
    /// against. Errors on the CPU.
    #[doc(hidden)]
    pub fn meta_gradient_reference(
        &self,
        mlp: &Mlp,
        params: &Tensor,
        batch: &TaskBatch,
    ) -> Result<MetaGradient> {
        const OP: &str = "Maml::meta_gradient_reference";
        if params.device().is_cpu() {
            return Err(Error::DeviceMismatch {
                op: OP,
                expected: "a CUDA device".into(),
                got: "cpu".into(),
            });
        }
        #[cfg(feature = "cuda")]
        {
            let (layout, meta) = self.validate(mlp, params, batch, OP)?;
            cuda::meta_gradient(&layout, self, &meta, params, batch, cuda::Path::Reference)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (mlp, batch);
            Err(Error::CudaUnavailable { reason: "built without the `cuda` feature".into() })
        }
    }
}

/// Makes every CUDA MAML operation take the tiled per-layer path even where the fused kernel's
/// workspace would fit in shared memory (tests cover both paths on one shape with it).
/// Process-wide; a no-op without CUDA.
#[doc(hidden)]
pub fn force_tiled(on: bool) {
    #[cfg(feature = "cuda")]
    cuda::force_tiled(on);
    #[cfg(not(feature = "cuda"))]
    let _ = on;
}

impl Maml {
    /// Checks the arguments of a meta-gradient call; returns the layout and the batch sizes.
    fn validate(
        &self,
        mlp: &Mlp,
        params: &Tensor,
        batch: &TaskBatch,
        op: &'static str,
    ) -> Result<(Layout, MetaDims)> {
        let layout = Layout::new(mlp, op)?;
        if self.inner_steps == 0 {
            return Err(Error::invalid(op, "inner_steps", "must be at least 1 (got 0)"));
        }
        // The k stored iterates of a task must be addressable (and, below, allocatable).
        if self.inner_steps.checked_mul(layout.num_params).is_none_or(|n| n > isize::MAX as usize / 8) {
            return Err(Error::invalid(
                op,
                "inner_steps",
                format!(
                    "{} steps of {} parameters do not fit in memory",
                    self.inner_steps, layout.num_params
                ),
            ));
        }
        if !self.inner_lr.is_finite() {
            return Err(Error::invalid(op, "inner_lr", format!("must be finite (got {})", self.inner_lr)));
        }
        if params.shape() != [layout.num_params] {
            return Err(Error::shape(
                op,
                "params",
                format!("[P] = [{}] for sizes {:?}", layout.num_params, layout.sizes),
                params.shape(),
            ));
        }
        let support = check_inputs(&layout, op, params, &batch.support_x, Some(&batch.support_y))?;
        let query = check_inputs(&layout, op, params, &batch.query_x, Some(&batch.query_y))?;
        if support.tasks != query.tasks {
            return Err(Error::shape(
                op,
                "query_x",
                format!("[T, Nq, in] with T = {} tasks like support_x", support.tasks),
                batch.query_x.shape(),
            ));
        }
        Ok((layout, MetaDims { tasks: support.tasks, support: support.samples, query: query.samples }))
    }
}

/// Task count, samples per task, and whether parameters are one broadcast row.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub tasks: usize,
    pub samples: usize,
    pub broadcast: bool,
}

/// The sizes of a meta-batch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MetaDims {
    pub tasks: usize,
    pub support: usize,
    pub query: usize,
}

fn check_float_dtype(dtype: DType, op: &'static str) -> Result<()> {
    match dtype {
        DType::F32 | DType::F64 => Ok(()),
        other => Err(Error::UnsupportedDType { op, dtype: other, supported: "f32, f64" }),
    }
}

/// Validates params [T, P] or `[P]`, x [T, N, in] and (when given) the targets; returns the dims.
fn check_inputs(
    layout: &Layout,
    op: &'static str,
    params: &Tensor,
    x: &Tensor,
    y: Option<&Tensor>,
) -> Result<Dims> {
    check_float_dtype(params.dtype(), op)?;
    params.device().expect_same(x.device(), op)?;
    x.expect_dtype(params.dtype(), op, "x")?;
    let &[tasks, samples, width] = x.shape() else {
        return Err(Error::shape(op, "x", format!("[T, N, {}]", layout.input()), x.shape()));
    };
    if width != layout.input() {
        return Err(Error::shape(op, "x", format!("[T, N, {}] (sizes[0])", layout.input()), x.shape()));
    }
    if tasks == 0 || samples == 0 {
        return Err(Error::EmptyInput { op, what: "x".into(), shape: x.shape().to_vec() });
    }
    let broadcast = check_params_like(layout, op, "params", params, params, tasks)?;
    if let Some(y) = y {
        check_targets(layout, op, y, params, tasks, samples)?;
    }
    Ok(Dims { tasks, samples, broadcast })
}

/// Checks that `t` is [tasks, P] or `[P]` with the dtype and device of `like`; returns whether
/// it is the broadcast `[P]` form.
fn check_params_like(
    layout: &Layout,
    op: &'static str,
    what: &str,
    t: &Tensor,
    like: &Tensor,
    tasks: usize,
) -> Result<bool> {
    like.device().expect_same(t.device(), op)?;
    t.expect_dtype(like.dtype(), op, what)?;
    let p = layout.num_params;
    match t.shape() {
        [n] if *n == p => Ok(true),
        [rows, n] if *rows == tasks && *n == p => Ok(false),
        got => Err(Error::shape(
            op,
            what,
            format!("[{tasks}, {p}] or [{p}] (T tasks, P parameters of sizes {:?})", layout.sizes),
            got,
        )),
    }
}

fn check_targets(
    layout: &Layout,
    op: &'static str,
    y: &Tensor,
    params: &Tensor,
    tasks: usize,
    samples: usize,
) -> Result<()> {
    params.device().expect_same(y.device(), op)?;
    match layout.loss {
        Loss::Mse => {
            y.expect_dtype(params.dtype(), op, "targets y")?;
            if y.shape() != [tasks, samples, layout.output()] {
                return Err(Error::shape(
                    op,
                    "targets y",
                    format!("[{tasks}, {samples}, {}] like x with the output width", layout.output()),
                    y.shape(),
                ));
            }
            Ok(())
        }
        Loss::SoftmaxCrossEntropy => {
            y.expect_dtype(DType::U32, op, "labels y")?;
            if y.shape() != [tasks, samples] {
                return Err(Error::shape(op, "labels y", format!("[{tasks}, {samples}] (u32)"), y.shape()));
            }
            let classes = layout.output();
            let labels = y.to_vec::<u32>()?;
            if let Some(bad) = labels.iter().find(|&&c| c as usize >= classes) {
                return Err(Error::invalid(
                    op,
                    "labels y",
                    format!("label {bad} is not below the number of classes {classes} (sizes.last())"),
                ));
            }
            Ok(())
        }
    }
}
