//! # metakernels
//!
//! Hand-written CUDA kernels for meta-learning compute, each with a fast CPU fallback, behind a
//! small safe tensor API.
//!
//! | family | papers |
//! |---|---|
//! | fused linear attention | von Oswald et al. 2022; Dai et al. 2022 |
//! | momentum attention | Dai et al. 2022, §5 |
//! | second-order MAML | Finn et al. 2017; Pearlmutter 1994 |
//! | MoE K-means gating | Nzoyem et al. 2025 (MixER) |
//!
//! Every operation takes [`Tensor`]s on one [`Device`] and returns new tensors on the same
//! device: CUDA kernels on a GPU, rayon-parallel code on the CPU. Every public function
//! returns [`Result`]; no input makes the library panic.
//!
//! ```
//! use metakernels::{DType, Device, Tensor};
//! # fn main() -> metakernels::Result<()> {
//! let dev = Device::best(); // CUDA 0 when usable, else the CPU
//! let x = Tensor::from_slice(&[0.5f32, -1.25, 3.0, 8.0], &[2, 2], &dev)?;
//! let y = x.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
//! assert_eq!(y.to_vec::<f32>()?, vec![0.5, -1.25, 3.0, 8.0]);
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

#[doc(hidden)]
pub mod bench_support;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod device;
mod dtype;
mod error;
mod ops;
mod tensor;
#[doc(hidden)]
pub mod testing;

pub use device::Device;
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use tensor::Tensor;

pub use half::{bf16, f16};
pub use ops::{kmeans, linear_attention, maml, moe, momentum_attention};

/// Whether the CUDA kernels were compiled into this binary (false when nvcc was not found at
/// build time, or without the `cuda` feature). CPU operations work either way.
pub fn kernels_built() -> bool {
    #[cfg(feature = "cuda")]
    {
        cuda::kernels_built()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}
