//! Fused linear attention (von Oswald et al. 2022; Dai et al. 2022): causal and non-causal,
//! forward and backward, with an initial recurrent state, variable-length packed sequences
//! and a fused momentum term (Dai et al. 2022, §5), on the CPU and on CUDA.
//!
//! With φ the feature map, for one (sequence, head):
//!
//! ```text
//! S_t = S_0 + Σ_{s ≤ t} φ(k_s) v_sᵀ        z_t = z_0 + Σ_{s ≤ t} φ(k_s)     (all s when non-causal)
//! o_t = scale · φ(q_t)ᵀ S_t                 (normalize: divided by φ(q_t)·z_t + eps)
//! ```
//!
//! # Back ends
//!
//! Both run the chunked algorithm (chunks of 64 rows): per chunk the masked intra-chunk
//! scores A = φ(Q)φ(K)ᵀ, the output φ(Q)·S + A·V, and the state update S += φ(K)ᵀV, with the
//! state carried in f32.
//!
//! - **CPU** (`cpu.rs`): rayon over (sequence, head) segments, and for fewer segments than
//!   threads a split forward (chunk-group states in parallel, a prefix sum, then all groups'
//!   outputs in parallel); the chunk products run through an unpacked register-blocked GEMM
//!   (`cpu_gemm.rs`, AVX-512 / AVX2 picked at run time), the forward reading q, k, v in place.
//! - **CUDA** (`cuda.rs`, `kernels/linear_attention.cu`): one chunked "core" kernel, with the
//!   state tile and z in shared memory for the whole sequence; f16/bf16 (every Dk up to 256,
//!   forward and backward) use tensor cores (`mma.sync.m16n8k16`, f32 accumulation), the rest
//!   f32 FMA. Their operands are 16-bit: the forward's state is rounded scaled by a power of
//!   two (so f16's 65504 does not cap it on long sequences), while the scores φ(q)·φ(k) within
//!   one chunk are rounded as they are and must stay within the dtype's range; the backward's
//!   gradient passes round to bf16 (f32's range), except a normalised ∂q, whose cancellation
//!   keeps it on the f32 core. The forward is one launch, or a split form (chunk-group
//!   states, a scan, then all groups' outputs in parallel) when the sequences × heads leave
//!   much of the GPU idle; the backward is two launches of the same core (the forward
//!   recomputed into ∂L/∂(numerator, denominator), then the three gradient passes side by
//!   side). O(T²) reference kernels sit beside them for the tests.
//!
//! This file holds the public API, the validation of every argument, and the dispatch. Both
//! back ends see the same `Problem`: a list of `Segment`s, one per (sequence, head), each a
//! run of consecutive rows of the `[rows, D]` matrices that q, k and v are viewed as, so the
//! dense `[B,H,T,D]` layout and the packed `cu_seqlens` layout share every kernel.

mod cpu;
mod cpu_gemm;
pub(crate) use cpu::auto_splits as cpu_auto_splits;
pub(crate) use cpu_gemm::rates_against_matrixmultiply as chunk_gemm_rates;
#[cfg(feature = "cuda")]
mod cuda;

use crate::tensor::Storage;
use crate::{DType, Error, Result, Tensor};

/// The largest head dimension (Dk and Dv) the kernels accept.
pub const MAX_HEAD_DIM: usize = 256;

/// The feature map φ applied to queries and keys inside the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FeatureMap {
    /// φ(x) = x (plain linear attention; von Oswald's construction).
    #[default]
    Identity,
    /// φ(x) = elu(x) + 1 (Katharopoulos et al. 2020): positive, so the normaliser is safe.
    EluPlusOne,
    /// φ(x) = max(x, 0).
    Relu,
}

impl FeatureMap {
    /// The code the CUDA kernels use for this map.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn code(self) -> i32 {
        match self {
            FeatureMap::Identity => 0,
            FeatureMap::EluPlusOne => 1,
            FeatureMap::Relu => 2,
        }
    }
}

/// A linear-attention layer's options. Build one and call [`LinearAttention::forward`].
///
/// q and k are `[B,H,T,Dk]`, v is `[B,H,T,Dv]`, all of one dtype (f32, f16 or bf16) on one
/// device, with 1 ≤ Dk, Dv ≤ 256 and any T ≥ 1. Accumulation and the carried state are f32.
///
/// ```
/// use metakernels::linear_attention::{FeatureMap, LinearAttention};
/// use metakernels::{Device, Tensor};
/// # fn main() -> metakernels::Result<()> {
/// let dev = Device::cpu();
/// let (t, d) = (5, 4); // B = H = 1: five steps of a 4-wide head
/// let x: Vec<f32> = (0..t * d).map(|i| (i as f32 * 0.37).sin()).collect();
/// let attn = LinearAttention { feature_map: FeatureMap::EluPlusOne, normalize: true, ..Default::default() };
///
/// // One call over all five steps ...
/// let all = Tensor::from_slice(&x, &[1, 1, t, d], &dev)?;
/// let whole = attn.forward(&all, &all, &all, None)?;
///
/// // ... equals two calls that carry the returned state (S_T, z_T) forward.
/// let head = Tensor::from_slice(&x[..2 * d], &[1, 1, 2, d], &dev)?;
/// let tail = Tensor::from_slice(&x[2 * d..], &[1, 1, 3, d], &dev)?;
/// let first = attn.forward(&head, &head, &head, None)?;
/// let second = attn.forward(&tail, &tail, &tail, Some(first.carry()))?;
///
/// let expected = whole.output.to_vec::<f32>()?;
/// let got = second.output.to_vec::<f32>()?;
/// for (a, b) in expected[2 * d..].iter().zip(&got) {
///     assert!((a - b).abs() < 1e-5);
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinearAttention {
    /// Causal (each step sees steps ≤ t) or not (every step sees the whole sequence).
    pub causal: bool,
    /// φ, applied to q and k.
    pub feature_map: FeatureMap,
    /// Divide each output row by φ(q_t)·z_t + eps.
    pub normalize: bool,
    /// Multiplies the output (before the momentum term); must be finite.
    pub scale: f32,
    /// Added to the normaliser's denominator; finite and ≥ 0.
    pub eps: f32,
}

impl Default for LinearAttention {
    /// Causal, identity feature map, no normalisation, scale 1, eps 1e-6.
    fn default() -> Self {
        LinearAttention {
            causal: true,
            feature_map: FeatureMap::Identity,
            normalize: false,
            scale: 1.0,
            eps: 1e-6,
        }
    }
}

/// A recurrent state `(S, z)` passed into a call: `state` is `[N,H,Dk,Dv]` f32, `normalizer`
/// `[N,H,Dk]` f32 (zeros when `None`); N is B, or the number of packed sequences.
///
/// Also the shape of the gradient of a final state passed to the backward.
#[derive(Clone, Copy, Debug)]
pub struct RecurrentState<'a> {
    /// S, `[N,H,Dk,Dv]` f32.
    pub state: &'a Tensor,
    /// z, `[N,H,Dk]` f32, or zeros when `None`.
    pub normalizer: Option<&'a Tensor>,
}

/// What [`LinearAttention::forward`] returns.
#[derive(Clone, Debug)]
pub struct LinearAttentionOutput {
    /// o, `[B,H,T,Dv]` in the inputs' dtype.
    pub output: Tensor,
    /// S_T, `[N,H,Dk,Dv]` f32: the state after the last step (including S_0).
    pub final_state: Tensor,
    /// z_T, `[N,H,Dk]` f32 (computed whether or not `normalize` is set).
    pub final_normalizer: Tensor,
}

impl LinearAttentionOutput {
    /// The final state and normaliser, as the initial state of the next piece of the sequence.
    pub fn carry(&self) -> RecurrentState<'_> {
        RecurrentState { state: &self.final_state, normalizer: Some(&self.final_normalizer) }
    }
}

/// What [`LinearAttention::backward`] returns.
#[derive(Clone, Debug)]
pub struct LinearAttentionGrads {
    /// ∂L/∂q, shaped and typed like q.
    pub dq: Tensor,
    /// ∂L/∂k, shaped and typed like k.
    pub dk: Tensor,
    /// ∂L/∂v, shaped and typed like v.
    pub dv: Tensor,
    /// ∂L/∂S_0, `[N,H,Dk,Dv]` f32 (also when no initial state was given: the gradient at zero).
    pub d_initial_state: Tensor,
    /// ∂L/∂z_0, `[N,H,Dk]` f32.
    pub d_initial_normalizer: Tensor,
}

/// Which kernels run a call (for tests and benchmarks).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelPath {
    /// The rule documented in `cuda.rs`: the split form when its estimated waves beat the
    /// fused form's (few, long sequences), fused otherwise.
    Auto,
    /// The O(T²) reference kernels.
    Reference,
    /// One chunked launch per pass.
    Fused,
    /// Chunk-group states, a scan, then all groups' outputs in parallel (forward only; the
    /// backward and momentum calls fall back to fused).
    Split,
    /// Fused, on the f32 SIMT core whatever the dtype (CUDA tensor cores off): the baseline the
    /// benchmarks measure the tensor-core kernels against. Fused on the CPU.
    Simt,
}

/// One (sequence, head): `len` consecutive rows from `row0` of the `[rows, D]` views of q, k,
/// v, o; its state is number `state` of the `[N·H, Dk, Dv]` state tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    pub row0: usize,
    pub len: usize,
    pub state: usize,
}

/// Everything a back end needs besides the tensors.
#[derive(Clone, Debug)]
pub(crate) struct Problem {
    pub cfg: LinearAttention,
    /// The momentum decay η (causal only), or `None`.
    pub momentum: Option<f32>,
    pub dk: usize,
    pub dv: usize,
    /// Rows of the `[rows, D]` views.
    pub rows: usize,
    /// Sorted by `row0`; they tile `0..rows` exactly.
    pub segments: Vec<Segment>,
}

impl Problem {
    /// Number of states (N·H).
    pub fn states(&self) -> usize {
        self.segments.len()
    }
}

/// The tensors of a forward call, validated.
pub(crate) struct ForwardArgs<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub s0: Option<&'a Tensor>,
    pub z0: Option<&'a Tensor>,
}

/// The extra tensors of a backward call, validated.
pub(crate) struct BackwardArgs<'a> {
    pub grad_output: &'a Tensor,
    pub grad_state: Option<&'a Tensor>,
    pub grad_normalizer: Option<&'a Tensor>,
}

/// Raw results of a back end's forward: output in the inputs' dtype, states f32.
pub(crate) struct ForwardResult {
    pub output: Tensor,
    pub state: Tensor,
    pub normalizer: Tensor,
}

const FORWARD: &str = "LinearAttention::forward";
const BACKWARD: &str = "LinearAttention::backward";

impl LinearAttention {
    /// Runs the layer on `[B,H,T,D]` tensors, starting from `initial` (zeros when `None`).
    ///
    /// Errors on wrong ranks or shapes, mixed dtypes or devices, an unsupported dtype, a head
    /// dimension above 256, empty inputs, or a non-finite `scale` / bad `eps`.
    pub fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        initial: Option<RecurrentState<'_>>,
    ) -> Result<LinearAttentionOutput> {
        self.forward_on_path(q, k, v, initial, KernelPath::Auto)
    }

    /// Gradients of a loss L with respect to q, k, v and the initial state, given
    /// `grad_output` = ∂L/∂o (`[B,H,T,Dv]`, the inputs' dtype) and optionally ∂L/∂(final
    /// state, final normaliser) (f32). The forward is recomputed inside; nothing is stored.
    pub fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        initial: Option<RecurrentState<'_>>,
        grad_output: &Tensor,
        grad_final: Option<RecurrentState<'_>>,
    ) -> Result<LinearAttentionGrads> {
        self.backward_on_path(q, k, v, initial, grad_output, grad_final, KernelPath::Auto)
    }

    /// Like [`forward`](Self::forward) on packed variable-length sequences: q, k, v are
    /// `[1,H,ΣT,D]`, sequence n occupies steps `cu_seqlens[n]..cu_seqlens[n+1]`, and each
    /// starts from its own state (`initial` and the returned states are `[N,H,..]`).
    ///
    /// `cu_seqlens` must start at 0, increase strictly, and end at ΣT.
    pub fn forward_varlen(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cu_seqlens: &[usize],
        initial: Option<RecurrentState<'_>>,
    ) -> Result<LinearAttentionOutput> {
        let problem = self.varlen_problem(FORWARD, q, k, v, cu_seqlens)?;
        let args = forward_args(FORWARD, &problem, q, k, v, initial)?;
        let r = dispatch_forward(&problem, &args, KernelPath::Auto)?;
        Ok(self.wrap_forward(r, &[cu_seqlens.len() - 1, q.shape()[1]], problem.dk, problem.dv))
    }

    /// The backward of [`forward_varlen`](Self::forward_varlen).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_varlen(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cu_seqlens: &[usize],
        initial: Option<RecurrentState<'_>>,
        grad_output: &Tensor,
        grad_final: Option<RecurrentState<'_>>,
    ) -> Result<LinearAttentionGrads> {
        let problem = self.varlen_problem(BACKWARD, q, k, v, cu_seqlens)?;
        let args = forward_args(BACKWARD, &problem, q, k, v, initial)?;
        let grads = backward_args(&problem, q, grad_output, grad_final)?;
        dispatch_backward(&problem, &args, &grads, &[cu_seqlens.len() - 1, q.shape()[1]], KernelPath::Auto)
    }

    /// Causal linear attention plus the momentum term of Dai et al. (2022, eq. 16):
    /// `o_t + m_t` with `m_t = Σ_{i<t} η^{t−i} v_i` (so `m_1 = 0`), fused into the same pass.
    /// No initial state. `eta` must be finite and in [0, 1); the layer must be causal.
    pub fn forward_with_momentum(&self, q: &Tensor, k: &Tensor, v: &Tensor, eta: f32) -> Result<Tensor> {
        self.forward_with_momentum_on_path(q, k, v, eta, KernelPath::Auto)
    }

    /// The backward of [`forward_with_momentum`](Self::forward_with_momentum): as
    /// [`backward`](Self::backward), with `dv_s += Σ_{t>s} η^{t−s} do_t` fused in.
    pub fn backward_with_momentum(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        grad_output: &Tensor,
        eta: f32,
    ) -> Result<LinearAttentionGrads> {
        self.backward_with_momentum_on_path(q, k, v, grad_output, eta, KernelPath::Auto)
    }

    /// [`forward`](Self::forward) on a chosen kernel path (the tests and benchmarks compare
    /// them; `Auto` is what `forward` runs). On the CPU, `Split` forces the split form and
    /// `Reference` means fused.
    #[doc(hidden)]
    pub fn forward_on_path(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        initial: Option<RecurrentState<'_>>,
        path: KernelPath,
    ) -> Result<LinearAttentionOutput> {
        let problem = self.dense_problem(FORWARD, q, k, v, None)?;
        let args = forward_args(FORWARD, &problem, q, k, v, initial)?;
        let r = dispatch_forward(&problem, &args, path)?;
        Ok(self.wrap_forward(r, &[q.shape()[0], q.shape()[1]], problem.dk, problem.dv))
    }

    /// [`backward`](Self::backward) on a chosen CUDA kernel path. Ignored on the CPU.
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    pub fn backward_on_path(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        initial: Option<RecurrentState<'_>>,
        grad_output: &Tensor,
        grad_final: Option<RecurrentState<'_>>,
        path: KernelPath,
    ) -> Result<LinearAttentionGrads> {
        let problem = self.dense_problem(BACKWARD, q, k, v, None)?;
        let args = forward_args(BACKWARD, &problem, q, k, v, initial)?;
        let grads = backward_args(&problem, q, grad_output, grad_final)?;
        dispatch_backward(&problem, &args, &grads, &[q.shape()[0], q.shape()[1]], path)
    }

    /// [`forward_with_momentum`](Self::forward_with_momentum) on a chosen CUDA kernel path.
    #[doc(hidden)]
    pub fn forward_with_momentum_on_path(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        eta: f32,
        path: KernelPath,
    ) -> Result<Tensor> {
        const OP: &str = "LinearAttention::forward_with_momentum";
        let problem = self.dense_problem(OP, q, k, v, Some(eta))?;
        let args = forward_args(OP, &problem, q, k, v, None)?;
        Ok(dispatch_forward(&problem, &args, path)?.output)
    }

    /// [`backward_with_momentum`](Self::backward_with_momentum) on a chosen CUDA kernel path.
    #[doc(hidden)]
    pub fn backward_with_momentum_on_path(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        grad_output: &Tensor,
        eta: f32,
        path: KernelPath,
    ) -> Result<LinearAttentionGrads> {
        const OP: &str = "LinearAttention::backward_with_momentum";
        let problem = self.dense_problem(OP, q, k, v, Some(eta))?;
        let args = forward_args(OP, &problem, q, k, v, None)?;
        let grads = backward_args(&problem, q, grad_output, None)?;
        dispatch_backward(&problem, &args, &grads, &[q.shape()[0], q.shape()[1]], path)
    }

    /// The unfused O(T²) composition the benchmarks measure the chunked kernels against, on
    /// the GPU: per head A = mask(φ(Q)φ(K)ᵀ) materialised as f32 [T,T] (one launch), then
    /// scale · A·V, divided by rowsum(A) + eps when normalising (a second launch). The same
    /// output as [`forward`](Self::forward) without an initial state, up to rounding. CUDA
    /// tensors only; needs B·H·T² f32 of device memory.
    #[doc(hidden)]
    pub fn forward_quadratic(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        const OP: &str = "LinearAttention::forward_quadratic";
        let problem = self.dense_problem(OP, q, k, v, None)?;
        match q.storage() {
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => cuda::forward_quadratic(&problem, q, k, v),
            Storage::Cpu(_) => {
                let _ = problem; // only the CUDA kernels take it
                Err(Error::DeviceMismatch { op: OP, expected: "a CUDA device".into(), got: "cpu".into() })
            }
        }
    }

    /// The unfused O(T²) training step the benchmarks measure forward+backward against, on the
    /// GPU, as autograd runs it: [`forward_quadratic`](Self::forward_quadratic)'s A and O, then
    /// from the saved A: dA = mask(dO·Vᵀ), dV = scale·Aᵀ·dO, dQ = scale·dA·K, dK = scale·dAᵀ·Q
    /// (six launches, A and dA materialised). Returns [O, dQ, dK, dV], equal to
    /// [`forward`](Self::forward) and [`backward`](Self::backward) without states up to rounding.
    /// The identity feature map without normalisation only; CUDA tensors only; needs 2·B·H·T² f32
    /// of device memory.
    #[doc(hidden)]
    pub fn forward_backward_quadratic(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        grad_output: &Tensor,
    ) -> Result<[Tensor; 4]> {
        const OP: &str = "LinearAttention::forward_backward_quadratic";
        let problem = self.dense_problem(OP, q, k, v, None)?;
        if self.feature_map != FeatureMap::Identity || self.normalize {
            return Err(Error::invalid(
                OP,
                "options",
                "the quadratic backward covers the identity map, unnormalised",
            ));
        }
        let _ = backward_args(&problem, q, grad_output, None)?; // grad_output's checks
        match q.storage() {
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => cuda::forward_backward_quadratic(&problem, q, k, v, grad_output),
            Storage::Cpu(_) => {
                let _ = problem; // only the CUDA kernels take it
                Err(Error::DeviceMismatch { op: OP, expected: "a CUDA device".into(), got: "cpu".into() })
            }
        }
    }

    fn wrap_forward(&self, r: ForwardResult, lead: &[usize], dk: usize, dv: usize) -> LinearAttentionOutput {
        LinearAttentionOutput {
            output: r.output,
            final_state: reshape_known(&r.state, &[lead[0], lead[1], dk, dv]),
            final_normalizer: reshape_known(&r.normalizer, &[lead[0], lead[1], dk]),
        }
    }

    /// Checks the options (and η), returning the momentum to run with.
    fn check_options(&self, op: &'static str, momentum: Option<f32>) -> Result<()> {
        if !self.scale.is_finite() {
            return Err(Error::invalid(op, "scale", format!("{} is not finite", self.scale)));
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(Error::invalid(op, "eps", format!("{} is not finite and ≥ 0", self.eps)));
        }
        if let Some(eta) = momentum {
            if !(eta.is_finite() && (0.0..1.0).contains(&eta)) {
                return Err(Error::invalid(op, "eta", format!("{eta} is not in [0, 1)")));
            }
            if !self.causal {
                return Err(Error::invalid(op, "causal", "momentum attention is causal; set causal: true"));
            }
        }
        Ok(())
    }

    fn dense_problem(
        &self,
        op: &'static str,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        momentum: Option<f32>,
    ) -> Result<Problem> {
        self.check_options(op, momentum)?;
        let (b, h, t, dk, dv) = check_qkv(op, q, k, v)?;
        let segments = (0..b * h).map(|bh| Segment { row0: bh * t, len: t, state: bh }).collect();
        Ok(Problem { cfg: *self, momentum, dk, dv, rows: b * h * t, segments })
    }

    fn varlen_problem(
        &self,
        op: &'static str,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cu_seqlens: &[usize],
    ) -> Result<Problem> {
        self.check_options(op, None)?;
        let (b, h, total, dk, dv) = check_qkv(op, q, k, v)?;
        if b != 1 {
            return Err(Error::shape(op, "q", "[1,H,ΣT,Dk] for packed sequences", q.shape()));
        }
        check_cu_seqlens(op, cu_seqlens, total)?;
        let n = cu_seqlens.len() - 1;
        let mut segments = Vec::with_capacity(n * h);
        for head in 0..h {
            for (seq, w) in cu_seqlens.windows(2).enumerate() {
                segments.push(Segment { row0: head * total + w[0], len: w[1] - w[0], state: seq * h + head });
            }
        }
        Ok(Problem { cfg: *self, momentum: None, dk, dv, rows: h * total, segments })
    }
}

/// A reshape whose element count is known to match.
fn reshape_known(t: &Tensor, shape: &[usize]) -> Tensor {
    t.reshape(shape).unwrap_or_else(|_| t.clone())
}

fn check_cu_seqlens(op: &'static str, cu: &[usize], total: usize) -> Result<()> {
    let bad = |reason: String| Err(Error::invalid(op, "cu_seqlens", reason));
    if cu.len() < 2 {
        return bad(format!("{cu:?} has {} entries; at least 2 (0 and ΣT) are needed", cu.len()));
    }
    if cu[0] != 0 {
        return bad(format!("starts at {}, expected 0", cu[0]));
    }
    if let Some(w) = cu.windows(2).find(|w| w[1] <= w[0]) {
        return bad(format!("is not strictly increasing ({} then {})", w[0], w[1]));
    }
    if cu[cu.len() - 1] != total {
        return bad(format!("ends at {}, expected ΣT = {total} (q's dimension 2)", cu[cu.len() - 1]));
    }
    Ok(())
}

/// Checks q, k, v; returns (B, H, T, Dk, Dv).
fn check_qkv(
    op: &'static str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<(usize, usize, usize, usize, usize)> {
    for (what, t) in [("q", q), ("k", k), ("v", v)] {
        if t.rank() != 4 {
            return Err(Error::shape(op, what, "rank 4: [B,H,T,D]", t.shape()));
        }
        q.device().expect_same(t.device(), op)?;
        t.expect_dtype(q.dtype(), op, what)?;
    }
    if !matches!(q.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::UnsupportedDType { op, dtype: q.dtype(), supported: "f32, f16, bf16" });
    }
    let s = q.shape();
    let (b, h, t, dk) = (s[0], s[1], s[2], s[3]);
    if k.shape() != s {
        return Err(Error::shape(op, "k", format!("q's shape {s:?}"), k.shape()));
    }
    let dv = v.shape()[3];
    if v.shape()[..3] != s[..3] {
        return Err(Error::shape(op, "v", format!("[{b},{h},{t},Dv] like q's [B,H,T]"), v.shape()));
    }
    if q.numel() == 0 || v.numel() == 0 {
        let what = if q.numel() == 0 { "q" } else { "v" };
        let shape = if q.numel() == 0 { q.shape() } else { v.shape() };
        return Err(Error::EmptyInput { op, what: what.into(), shape: shape.to_vec() });
    }
    if dk > MAX_HEAD_DIM {
        return Err(Error::shape(op, "q", format!("[B,H,T,Dk] with Dk ≤ {MAX_HEAD_DIM}"), s));
    }
    if dv > MAX_HEAD_DIM {
        return Err(Error::shape(op, "v", format!("[B,H,T,Dv] with Dv ≤ {MAX_HEAD_DIM}"), v.shape()));
    }
    Ok((b, h, t, dk, dv))
}

/// Checks an f32 state tensor of `expected` shape on `q`'s device.
fn check_state(op: &'static str, what: &str, t: &Tensor, q: &Tensor, expected: &[usize]) -> Result<()> {
    q.device().expect_same(t.device(), op)?;
    t.expect_dtype(DType::F32, op, what)?;
    if t.shape() != expected {
        return Err(Error::shape(op, what, format!("{expected:?} f32"), t.shape()));
    }
    Ok(())
}

/// The shape of the state tensors: `[N, H, Dk, Dv]` and `[N, H, Dk]`.
fn state_shapes(problem: &Problem, q: &Tensor) -> ([usize; 4], [usize; 3]) {
    let h = q.shape()[1];
    let n = problem.states() / h;
    ([n, h, problem.dk, problem.dv], [n, h, problem.dk])
}

fn forward_args<'a>(
    op: &'static str,
    problem: &Problem,
    q: &'a Tensor,
    k: &'a Tensor,
    v: &'a Tensor,
    initial: Option<RecurrentState<'a>>,
) -> Result<ForwardArgs<'a>> {
    let (s_shape, z_shape) = state_shapes(problem, q);
    let (mut s0, mut z0) = (None, None);
    if let Some(init) = initial {
        check_state(op, "initial state", init.state, q, &s_shape)?;
        s0 = Some(init.state);
        if let Some(z) = init.normalizer {
            check_state(op, "initial normalizer", z, q, &z_shape)?;
            z0 = Some(z);
        }
    }
    Ok(ForwardArgs { q, k, v, s0, z0 })
}

fn backward_args<'a>(
    problem: &Problem,
    q: &Tensor,
    grad_output: &'a Tensor,
    grad_final: Option<RecurrentState<'a>>,
) -> Result<BackwardArgs<'a>> {
    let op = BACKWARD;
    q.device().expect_same(grad_output.device(), op)?;
    grad_output.expect_dtype(q.dtype(), op, "grad_output")?;
    let mut expected = q.shape().to_vec();
    expected[3] = problem.dv;
    if grad_output.shape() != expected {
        return Err(Error::shape(
            op,
            "grad_output",
            format!("{expected:?} like the output"),
            grad_output.shape(),
        ));
    }
    let (s_shape, z_shape) = state_shapes(problem, q);
    let (mut grad_state, mut grad_normalizer) = (None, None);
    if let Some(g) = grad_final {
        check_state(op, "grad of the final state", g.state, q, &s_shape)?;
        grad_state = Some(g.state);
        if let Some(z) = g.normalizer {
            check_state(op, "grad of the final normalizer", z, q, &z_shape)?;
            grad_normalizer = Some(z);
        }
    }
    Ok(BackwardArgs { grad_output, grad_state, grad_normalizer })
}

fn dispatch_forward(problem: &Problem, args: &ForwardArgs<'_>, path: KernelPath) -> Result<ForwardResult> {
    match args.q.storage() {
        Storage::Cpu(_) => cpu::forward(problem, args, path),
        #[cfg(feature = "cuda")]
        Storage::Cuda(_) => cuda::forward(problem, args, path),
    }
}

fn dispatch_backward(
    problem: &Problem,
    args: &ForwardArgs<'_>,
    grads: &BackwardArgs<'_>,
    lead: &[usize],
    path: KernelPath,
) -> Result<LinearAttentionGrads> {
    #[cfg(not(feature = "cuda"))]
    let _ = path;
    let raw = match args.q.storage() {
        Storage::Cpu(_) => cpu::backward(problem, args, grads)?,
        #[cfg(feature = "cuda")]
        Storage::Cuda(_) => cuda::backward(problem, args, grads, path)?,
    };
    Ok(LinearAttentionGrads {
        d_initial_state: reshape_known(&raw.d_state, &[lead[0], lead[1], problem.dk, problem.dv]),
        d_initial_normalizer: reshape_known(&raw.d_normalizer, &[lead[0], lead[1], problem.dk]),
        dq: raw.dq,
        dk: raw.dk,
        dv: raw.dv,
    })
}

/// Raw results of a back end's backward.
pub(crate) struct BackwardResult {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
    pub d_state: Tensor,
    pub d_normalizer: Tensor,
}
