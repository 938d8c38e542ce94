//! The crate's one error type. Every public function returns [`Result`]; nothing panics on input.

use crate::DType;

/// Everything that can go wrong in a metakernels call.
///
/// Each message says what was given and what was expected, so that the caller can fix the call
/// without reading the source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A host slice's length does not match the number of elements of the requested shape.
    #[error("data length {got} does not match shape {shape:?}, which holds {expected} elements")]
    LengthMismatch {
        /// The requested shape.
        shape: Vec<usize>,
        /// Elements the shape holds.
        expected: usize,
        /// Elements given.
        got: usize,
    },

    /// A tensor had the wrong element type for the call.
    #[error("{op}: {what} has dtype {got}, expected {expected}")]
    DTypeMismatch {
        /// The operation that checked.
        op: &'static str,
        /// Which argument.
        what: String,
        /// The dtype required.
        expected: DType,
        /// The dtype given.
        got: DType,
    },

    /// An operation does not support this dtype.
    #[error("{op}: dtype {dtype} is not supported (supported: {supported})")]
    UnsupportedDType {
        /// The operation that checked.
        op: &'static str,
        /// The dtype given.
        dtype: DType,
        /// The dtypes it does support, in words.
        supported: &'static str,
    },

    /// Two tensors of one call live on different devices.
    #[error(
        "{op}: tensors on different devices: {expected} and {got}; move them with Tensor::to_device first"
    )]
    DeviceMismatch {
        /// The operation that checked.
        op: &'static str,
        /// The device of the first tensor.
        expected: String,
        /// The device of the mismatched tensor.
        got: String,
    },

    /// A tensor's shape is wrong for the call (rank, a dimension, or agreement between tensors).
    #[error("{op}: {what} has shape {got:?}, expected {expected}")]
    ShapeMismatch {
        /// The operation that checked.
        op: &'static str,
        /// Which argument.
        what: String,
        /// What was expected, in words (e.g. `"[B,H,T,Dk] with Dk ≤ 256"`).
        expected: String,
        /// The shape given.
        got: Vec<usize>,
    },

    /// An input has no elements where the operation needs at least one.
    #[error("{op}: {what} is empty (shape {shape:?}); at least one element is needed")]
    EmptyInput {
        /// The operation that checked.
        op: &'static str,
        /// Which argument.
        what: String,
        /// The shape given.
        shape: Vec<usize>,
    },

    /// A scalar or structural argument is out of its allowed range.
    #[error("{op}: invalid {what}: {reason}")]
    InvalidArgument {
        /// The operation that checked.
        op: &'static str,
        /// Which argument.
        what: String,
        /// What was wrong and what is allowed.
        reason: String,
    },

    /// Input values are NaN or infinite where the algorithm cannot proceed.
    #[error("{op}: {what} contains non-finite values (NaN or ±inf)")]
    NonFinite {
        /// The operation that checked.
        op: &'static str,
        /// Which argument.
        what: String,
    },

    /// No CUDA device can be used; the reason says why (no driver, no device, built without CUDA).
    #[error("CUDA is unavailable: {reason}")]
    CudaUnavailable {
        /// Why, and what to do about it.
        reason: String,
    },

    /// The CUDA kernels were not compiled into this build (nvcc was not found at build time).
    #[error(
        "the CUDA kernels of module `{module}` were not built into this binary (nvcc was not found at build time); \
         run scripts/install-cuda-toolchain.sh or set NVCC/CUDA_HOME, then rebuild"
    )]
    KernelsNotBuilt {
        /// The kernel module asked for.
        module: &'static str,
    },

    /// The device (or the host, for CPU tensors) ran out of memory.
    #[error("out of memory: asked for {requested_bytes} bytes on {device}, {free_bytes} bytes free")]
    OutOfMemory {
        /// Bytes requested.
        requested_bytes: usize,
        /// Bytes the driver reported free (the host's available memory for `cpu`; 0 where unknown).
        free_bytes: usize,
        /// The device, in words.
        device: String,
    },

    /// The CUDA driver returned an error.
    #[error("CUDA driver error during {during}: {message}")]
    Driver {
        /// What the crate was doing.
        during: String,
        /// The driver's message.
        message: String,
    },
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub(crate) fn invalid(op: &'static str, what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument { op, what: what.into(), reason: reason.into() }
    }

    /// Shorthand for [`Error::ShapeMismatch`].
    pub(crate) fn shape(
        op: &'static str,
        what: impl Into<String>,
        expected: impl Into<String>,
        got: &[usize],
    ) -> Self {
        Error::ShapeMismatch { op, what: what.into(), expected: expected.into(), got: got.to_vec() }
    }
}
