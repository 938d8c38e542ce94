//! dtype conversion: the first kernel family, and the one that proves the pipeline
//! (build.rs → fatbin → module cache → launch → result).

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;

use crate::tensor::Storage;
use crate::{DType, Error, Result, Tensor};

const OP: &str = "Tensor::to_dtype";

/// Converts `x` to `dtype` on its own device, rounding to nearest even.
pub(crate) fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    if x.dtype() == dtype {
        return Ok(x.clone());
    }
    if !x.dtype().is_float() || !dtype.is_float() {
        return Err(Error::UnsupportedDType {
            op: OP,
            dtype: if x.dtype().is_float() { dtype } else { x.dtype() },
            supported: "conversions between f32, f64, f16 and bf16 (u32 converts only to itself)",
        });
    }
    match x.storage() {
        Storage::Cpu(buffer) => cpu::cast(buffer, x.shape(), dtype),
        #[cfg(feature = "cuda")]
        Storage::Cuda(buffer) => {
            cuda::cast(x.cuda_device()?, buffer, x.shape(), x.numel(), dtype, x.device())
        }
    }
}
