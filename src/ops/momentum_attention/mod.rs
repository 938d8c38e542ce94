//! Momentum attention (Dai et al. 2022, §5, eq. 16): causal attention plus a decayed sum of the
//! earlier values,
//!
//! ```text
//! o_t = Attn(q_t, k_{≤t}, v_{≤t}) + m_t,     m_t = Σ_{i<t} η^{t−i} v_i   (m_1 = 0)
//! ```
//!
//! per batch and head, on `[B, H, T, D]` tensors. With `η = 0` this is plain causal attention,
//! and it is this crate's causal attention kernel.
//!
//! This file holds the public API, the input checks and the dispatch by device; `cpu.rs` holds
//! the rayon fallback and `cuda.rs` the launches of `kernels/momentum_attention.cu`. The base
//! attention is an enum ([`Base`]) so that other bases plug in as one more match arm in
//! [`MomentumAttention::forward`] and [`MomentumAttention::backward`].
//!
//! Training: [`MomentumAttention::forward_with_state`] keeps the row log-sum-exps and the base
//! attention (FlashAttention-2's saved state, linear in T) so that
//! [`MomentumAttention::backward_with_state`] does not recompute the forward pass;
//! [`MomentumAttention::backward`] recomputes it.
//!
//! Numerics: every path accumulates in f32 and never materialises the T×T score matrix
//! (memory stays linear in T). Terms of the momentum sum whose weight is below f32 resolution
//! are skipped: with `H = ⌈24 / −log2 η⌉` lags kept, the dropped tail Σ_{n>H} ηⁿ is at most
//! 2⁻²⁴ of the whole weight Σ_{n≥1} ηⁿ (see [`momentum_horizon`]).

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;

use crate::linear_attention::LinearAttention;
use crate::tensor::Storage;
use crate::{DType, Error, Result, Tensor};

const OP_FORWARD: &str = "MomentumAttention::forward";
const OP_BACKWARD: &str = "MomentumAttention::backward";

/// The head dimensions the kernels are built for.
pub const SUPPORTED_HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// The attention that the momentum term is added to.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Base {
    /// Causal softmax attention, `softmax(scale · q_t·k_s)` over `s ≤ t`; `scale` defaults to
    /// `1/√D`.
    Softmax {
        /// Multiplies the logits; `None` means `1/√D`. Must be finite.
        scale: Option<f32>,
    },
    /// Causal linear attention ([`LinearAttention`], which must have `causal: true`), with the
    /// momentum scan fused into the linear-attention kernels
    /// ([`LinearAttention::forward_with_momentum`]). Head dims, feature map and normalisation
    /// follow the linear-attention family (any D ≤ 256, Dk may differ from Dv). There is no
    /// saved softmax state: the `*_with_state` methods return an error for this base.
    Linear(LinearAttention),
}

impl Default for Base {
    /// Softmax attention with the default scale `1/√D`.
    fn default() -> Self {
        Base::Softmax { scale: None }
    }
}

/// Causal momentum attention: `o_t = Attn(q_t, k_{≤t}, v_{≤t}) + Σ_{i<t} η^{t−i} v_i`.
///
/// `q`, `k`, `v` are `[B, H, T, D]` tensors of one dtype (f32, f16 or bf16) on one device, with
/// `D` one of [`SUPPORTED_HEAD_DIMS`] and any `T ≥ 1`. The output has the same shape and dtype.
///
/// ```
/// use metakernels::momentum_attention::MomentumAttention;
/// use metakernels::{Device, Tensor};
/// # fn main() -> metakernels::Result<()> {
/// let dev = Device::cpu();
/// let (b, h, t, d) = (1, 2, 5, 64);
/// let data: Vec<f32> = (0..b * h * t * d).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
/// let x = Tensor::from_slice(&data, &[b, h, t, d], &dev)?;
///
/// let attn = MomentumAttention::new(0.9);
/// let out = attn.forward(&x, &x, &x)?;
/// assert_eq!(out.shape(), &[b, h, t, d]);
///
/// // The first position sees only itself and has no momentum: its output is v_0.
/// let o = out.to_vec::<f32>()?;
/// assert!((o[0] - data[0]).abs() < 1e-6);
///
/// let grads = attn.backward(&x, &x, &x, &out)?;
/// assert_eq!(grads.dv.shape(), &[b, h, t, d]);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct MomentumAttention {
    /// The momentum coefficient η, in `[0, 1)`; 0 gives plain causal attention.
    pub eta: f32,
    /// The base attention.
    pub base: Base,
}

/// The gradients of a scalar loss with respect to `q`, `k` and `v`, each `[B, H, T, D]` in the
/// inputs' dtype.
#[derive(Clone, Debug)]
pub struct MomentumAttentionGrads {
    /// ∂L/∂q.
    pub dq: Tensor,
    /// ∂L/∂k.
    pub dk: Tensor,
    /// ∂L/∂v (attention part plus the momentum part Σ_{t>s} η^{t−s} ∂L/∂o_t).
    pub dv: Tensor,
}

/// The output of [`MomentumAttention::forward_with_state`] and what the backward pass needs
/// from the forward pass: the base attention without the momentum term (in the inputs' dtype)
/// and each row's log-sum-exp (f32, `[B, H, T]`). Memory is linear in T.
#[derive(Clone, Debug)]
pub struct MomentumAttentionState {
    output: Tensor,
    attention: Tensor,
    /// Base-2 log-sum-exp of each row's scaled logits.
    lse2: Tensor,
    eta: f32,
    scale: f32,
}

impl MomentumAttentionState {
    /// The output `o = Attn(q, k, v) + m`, `[B, H, T, D]`.
    pub fn output(&self) -> &Tensor {
        &self.output
    }

    /// The output, dropping the saved state.
    pub fn into_output(self) -> Tensor {
        self.output
    }

    /// The natural-log log-sum-exp of each row's scaled logits, `log Σ_{s≤t} exp(scale·q_t·k_s)`,
    /// f32 `[B, H, T]` on the tensors' device (copied through the host).
    pub fn logsumexp(&self) -> Result<Tensor> {
        let lse: Vec<f32> = self.lse2.to_vec::<f32>()?.iter().map(|x| x * std::f32::consts::LN_2).collect();
        Tensor::from_vec(lse, self.lse2.shape(), self.lse2.device())
    }
}

impl Default for MomentumAttention {
    /// Plain causal softmax attention (η = 0, scale 1/√D).
    fn default() -> Self {
        MomentumAttention::new(0.0)
    }
}

impl MomentumAttention {
    /// Softmax momentum attention with coefficient `eta` and the default scale `1/√D`.
    pub fn new(eta: f32) -> Self {
        MomentumAttention { eta, base: Base::default() }
    }

    /// The same, with softmax scale `scale` instead of `1/√D`.
    pub fn with_scale(self, scale: f32) -> Self {
        MomentumAttention { base: Base::Softmax { scale: Some(scale) }, ..self }
    }

    /// The output `o = Attn(q, k, v) + m`, `[B, H, T, D]` in the inputs' dtype.
    ///
    /// Errors for η outside `[0, 1)` or non-finite, a non-finite scale, shapes that are not one
    /// common `[B, H, T, D]` with `D` in [`SUPPORTED_HEAD_DIMS`], empty inputs, dtypes other
    /// than one common f32/f16/bf16, or tensors on different devices. With [`Base::Linear`]
    /// the linear-attention family's checks apply instead (causal layer, any Dk and Dv ≤ 256; the
    /// output is `[B, H, T, Dv]`).
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        if let Base::Linear(linear) = &self.base {
            return linear.forward_with_momentum(q, k, v, self.eta);
        }
        let (problem, params) = self.softmax_setup(OP_FORWARD, q, k, v, None)?;
        softmax_forward(&problem, &params, q, k, v)
    }

    /// Like [`forward`](Self::forward), also keeping what
    /// [`backward_with_state`](Self::backward_with_state) needs (the attention without momentum
    /// and the row log-sum-exps), so that the backward pass does not recompute the forward.
    pub fn forward_with_state(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<MomentumAttentionState> {
        let (problem, params) = self.softmax_setup(OP_FORWARD, q, k, v, None)?;
        let [output, attention, lse2] = match q.storage() {
            Storage::Cpu(_) => cpu::forward_with_state(&problem, &params, q, k, v, q.shape())?,
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => cuda::forward_with_state(&problem, &params, q, k, v, q.shape())?,
        };
        Ok(MomentumAttentionState { output, attention, lse2, eta: params.eta, scale: params.scale })
    }

    /// The gradients of a loss `L` with respect to `q`, `k`, `v`, given `grad_output = ∂L/∂o`
    /// and the `state` that [`forward_with_state`](Self::forward_with_state) returned for the
    /// same `q`, `k`, `v` and the same settings (checked: shapes, device, η and scale).
    pub fn backward_with_state(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        state: &MomentumAttentionState,
        grad_output: &Tensor,
    ) -> Result<MomentumAttentionGrads> {
        let (problem, params) = self.softmax_setup(OP_BACKWARD, q, k, v, Some(grad_output))?;
        problem.check_like(OP_BACKWARD, "state.output", &state.output, q)?;
        problem.check_like(OP_BACKWARD, "state.attention", &state.attention, q)?;
        if state.eta != params.eta || state.scale != params.scale {
            return Err(Error::invalid(
                OP_BACKWARD,
                "state",
                format!(
                    "it was computed with eta {} and scale {}, but this module has eta {} and scale {}",
                    state.eta, state.scale, params.eta, params.scale
                ),
            ));
        }
        let saved = Some((&state.attention, &state.lse2));
        softmax_backward(&problem, &params, q, k, v, grad_output, saved)
    }

    /// The gradients of a loss `L` with respect to `q`, `k`, `v`, given `grad_output = ∂L/∂o`.
    ///
    /// Recomputes what it needs of the forward pass (FlashAttention-2 style: the row
    /// log-sum-exps and the attention output, never the T×T matrix). Errors as
    /// [`forward`](Self::forward), and when `grad_output` does not match `q` in shape, dtype
    /// or device.
    pub fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        grad_output: &Tensor,
    ) -> Result<MomentumAttentionGrads> {
        if let Base::Linear(linear) = &self.base {
            let grads = linear.backward_with_momentum(q, k, v, grad_output, self.eta)?;
            return Ok(MomentumAttentionGrads { dq: grads.dq, dk: grads.dk, dv: grads.dv });
        }
        let (problem, params) = self.softmax_setup(OP_BACKWARD, q, k, v, Some(grad_output))?;
        softmax_backward(&problem, &params, q, k, v, grad_output, None)
    }
}

impl MomentumAttention {
    /// The checked shape and parameters of a softmax-base call: the base, q/k/v (and
    /// `grad_output` like q), η and the scale, each error naming `op`.
    fn softmax_setup(
        &self,
        op: &'static str,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        grad_output: Option<&Tensor>,
    ) -> Result<(Problem, SoftmaxParams)> {
        let scale = self.softmax_scale(op)?;
        let problem = Problem::check(op, q, k, v)?;
        if let Some(g) = grad_output {
            problem.check_like(op, "grad_output", g, q)?;
        }
        let eta = check_eta(op, self.eta)?;
        let params = SoftmaxParams::new(op, eta, scale, problem.d)?;
        Ok((problem, params))
    }

    /// The softmax scale of a [`Base::Softmax`] module; an error naming `op` for other bases
    /// (the saved state, the reference kernel and the unfused baseline are softmax-only).
    fn softmax_scale(&self, op: &'static str) -> Result<Option<f32>> {
        match &self.base {
            Base::Softmax { scale } => Ok(*scale),
            Base::Linear(_) => Err(Error::invalid(
                op,
                "base",
                "this method exists for the softmax base only; use forward/backward with Base::Linear",
            )),
        }
    }

    /// The forward pass by the CUDA reference kernel (one block per query row, explicit momentum
    /// sum): what the GPU tests hold the fast kernels against. CUDA tensors only.
    #[doc(hidden)]
    pub fn forward_reference_kernel(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        const OP: &str = "MomentumAttention::forward_reference_kernel";
        let (problem, params) = self.softmax_setup(OP, q, k, v, None)?;
        match q.storage() {
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => cuda::forward_reference(&problem, &params, q, k, v),
            Storage::Cpu(_) => {
                let _ = (problem, params); // only the CUDA kernel takes them
                Err(Error::DeviceMismatch { op: OP, expected: "a CUDA device".into(), got: "cpu".into() })
            }
        }
    }

    /// The backward pass by the CUDA reference kernels (one block per query row for dq, then one
    /// per key row for dk and dv, the momentum term by an explicit sum): what the GPU tests hold
    /// the fast backward against. CUDA tensors only.
    #[doc(hidden)]
    pub fn backward_reference_kernel(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        grad_output: &Tensor,
    ) -> Result<MomentumAttentionGrads> {
        const OP: &str = "MomentumAttention::backward_reference_kernel";
        let (problem, params) = self.softmax_setup(OP, q, k, v, Some(grad_output))?;
        match q.storage() {
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => {
                let inputs = BackwardInputs { q, k, v, grad_output, saved: None };
                cuda::backward_reference(&problem, &params, &inputs, q.shape())
            }
            Storage::Cpu(_) => {
                let _ = (problem, params); // only the CUDA kernels take them
                Err(Error::DeviceMismatch { op: OP, expected: "a CUDA device".into(), got: "cpu".into() })
            }
        }
    }
}

impl MomentumAttention {
    /// The unfused composition the fused kernels are measured against: attention with η = 0,
    /// then a separate pass that adds the momentum scan `m_t = η (m_{t−1} + v_{t−1})` (all lags)
    /// on the same device. Same result as [`forward`](Self::forward) up to rounding and the
    /// skipped sub-resolution lags; kept for benchmarks and tests.
    #[doc(hidden)]
    pub fn forward_unfused(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        const OP: &str = "MomentumAttention::forward_unfused";
        let (problem, params) = self.softmax_setup(OP, q, k, v, None)?;
        match q.storage() {
            Storage::Cpu(_) => {
                let attn = cpu::forward(&problem, &params.without_momentum(), q, k, v, q.shape())?;
                cpu::add_momentum_scan(&problem, params.eta, &attn, v, Scan::Forward)
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => cuda::forward_unfused(&problem, &params, q, k, v),
        }
    }

    /// The unfused backward the fused kernels are measured against: the attention backward with
    /// η = 0, then a separate reverse pass adding the momentum term's gradient
    /// `Σ_{t>s} η^{t−s} dL/do_t` into dv, on the same device. Same result as
    /// [`backward`](Self::backward) up to rounding and the skipped sub-resolution lags; kept for
    /// benchmarks and tests.
    #[doc(hidden)]
    pub fn backward_unfused(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        grad_output: &Tensor,
    ) -> Result<MomentumAttentionGrads> {
        const OP: &str = "MomentumAttention::backward_unfused";
        let (problem, params) = self.softmax_setup(OP, q, k, v, Some(grad_output))?;
        let inputs = BackwardInputs { q, k, v, grad_output, saved: None };
        match q.storage() {
            Storage::Cpu(_) => {
                let grads = cpu::backward(&problem, &params.without_momentum(), &inputs, q.shape())?;
                let dv = cpu::add_momentum_scan(&problem, params.eta, &grads.dv, grad_output, Scan::Reverse)?;
                Ok(MomentumAttentionGrads { dv, ..grads })
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => cuda::backward_unfused(&problem, &params, &inputs, q.shape()),
        }
    }
}

/// The direction of the unfused baselines' separate momentum pass: over earlier rows (the
/// forward's `m_t`) or later ones (its gradient into dv).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Scan {
    Forward,
    Reverse,
}

/// How many lags of the momentum sum the kernels keep for coefficient `eta`: the smallest `H`
/// with `η^H ≤ 2⁻²⁴`, so that the dropped tail Σ_{n>H} ηⁿ is at most 2⁻²⁴ of Σ_{n≥1} ηⁿ (below
/// f32 resolution of the sum's scale). 0 for η = 0; capped at `u32::MAX`.
pub fn momentum_horizon(eta: f32) -> usize {
    if eta <= 0.0 || !eta.is_finite() {
        return 0;
    }
    let lags = (24.0 / -(eta as f64).log2()).ceil();
    if lags.is_finite() && lags < u32::MAX as f64 {
        (lags as usize).max(1)
    } else {
        u32::MAX as usize
    }
}

// ----- shapes and parameters -------------------------------------------------------------------

/// The common shape of one call: `bh = B·H` independent heads of `t × d`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Problem {
    pub(crate) bh: usize,
    pub(crate) t: usize,
    pub(crate) d: usize,
    pub(crate) dtype: DType,
}

impl Problem {
    fn check(op: &'static str, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Problem> {
        let expected = "[B, H, T, D] with D in {64, 128, 256}";
        if q.rank() != 4 {
            return Err(Error::shape(op, "q", expected, q.shape()));
        }
        let [b, h, t, d] = [q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]];
        if !SUPPORTED_HEAD_DIMS.contains(&d) {
            return Err(Error::shape(op, "q", expected, q.shape()));
        }
        if q.numel() == 0 {
            return Err(Error::EmptyInput { op, what: "q".into(), shape: q.shape().to_vec() });
        }
        if !matches!(q.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::UnsupportedDType { op, dtype: q.dtype(), supported: "f32, f16, bf16" });
        }
        let problem = Problem { bh: b * h, t, d, dtype: q.dtype() };
        problem.check_like(op, "k", k, q)?;
        problem.check_like(op, "v", v, q)?;
        Ok(problem)
    }

    /// `x` must have `q`'s shape, dtype and device.
    fn check_like(&self, op: &'static str, what: &str, x: &Tensor, q: &Tensor) -> Result<()> {
        if x.shape() != q.shape() {
            return Err(Error::shape(op, what, format!("{:?}, the shape of q", q.shape()), x.shape()));
        }
        x.expect_dtype(q.dtype(), op, what)?;
        q.device().expect_same(x.device(), op)
    }

    pub(crate) fn numel(&self) -> usize {
        self.bh * self.t * self.d
    }
}

fn check_eta(op: &'static str, eta: f32) -> Result<f32> {
    if eta.is_finite() && (0.0..1.0).contains(&eta) {
        Ok(eta)
    } else {
        Err(Error::invalid(
            op,
            "eta",
            format!("got {eta}; the momentum coefficient must be finite and in [0, 1)"),
        ))
    }
}

/// The resolved parameters of the softmax base.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SoftmaxParams {
    /// Logit scale (1/√D unless given).
    pub(crate) scale: f32,
    /// Momentum coefficient η.
    pub(crate) eta: f32,
    /// Lags of the momentum sum kept ([`momentum_horizon`]).
    pub(crate) horizon: usize,
}

impl SoftmaxParams {
    /// The same scale without the momentum term (η = 0): the attention part alone, which the
    /// unfused baselines and the recomputing backward run before their own momentum step.
    pub(crate) fn without_momentum(&self) -> SoftmaxParams {
        SoftmaxParams { eta: 0.0, horizon: 0, ..*self }
    }

    fn new(op: &'static str, eta: f32, scale: Option<f32>, d: usize) -> Result<SoftmaxParams> {
        let scale = scale.unwrap_or(1.0 / (d as f32).sqrt());
        if !scale.is_finite() {
            return Err(Error::invalid(
                op,
                "scale",
                format!("got {scale}; the softmax scale must be finite"),
            ));
        }
        Ok(SoftmaxParams { scale, eta, horizon: momentum_horizon(eta) })
    }
}

// ----- dispatch ----------------------------------------------------------------------------------

fn softmax_forward(
    problem: &Problem,
    params: &SoftmaxParams,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<Tensor> {
    match q.storage() {
        Storage::Cpu(_) => cpu::forward(problem, params, q, k, v, q.shape()),
        #[cfg(feature = "cuda")]
        Storage::Cuda(_) => cuda::forward(problem, params, q, k, v, q.shape()),
    }
}

/// The tensors of one backward call.
pub(crate) struct BackwardInputs<'a> {
    pub(crate) q: &'a Tensor,
    pub(crate) k: &'a Tensor,
    pub(crate) v: &'a Tensor,
    pub(crate) grad_output: &'a Tensor,
    /// (attention without momentum, base-2 log-sum-exps) saved by the forward pass; recomputed
    /// when `None`.
    pub(crate) saved: Option<(&'a Tensor, &'a Tensor)>,
}

fn softmax_backward(
    problem: &Problem,
    params: &SoftmaxParams,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    grad_output: &Tensor,
    saved: Option<(&Tensor, &Tensor)>,
) -> Result<MomentumAttentionGrads> {
    let inputs = BackwardInputs { q, k, v, grad_output, saved };
    match q.storage() {
        Storage::Cpu(_) => cpu::backward(problem, params, &inputs, q.shape()),
        #[cfg(feature = "cuda")]
        Storage::Cuda(_) => cuda::backward(problem, params, &inputs, q.shape()),
    }
}
