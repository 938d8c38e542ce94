//! Launches of `kernels/cast.cu`: one kernel per (source, target) pair, named
//! `cast_<src>_to_<dst>`, four elements per thread, grid-stride.

use half::{bf16, f16};

use crate::cuda::{grid_1d, CudaDevice, CudaSlice, DeviceRepr, PushKernelArg};
use crate::tensor::CudaBuffer;
use crate::{DType, Device, Result, Tensor};

const THREADS: u32 = 256;
const ELEMENTS_PER_THREAD: usize = 4;

pub(super) fn cast(
    dev: &CudaDevice,
    src: &CudaBuffer,
    shape: &[usize],
    numel: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let out = match dtype {
        DType::F32 => CudaBuffer::F32(cast_to::<f32>(dev, src, numel, dtype)?),
        DType::F64 => CudaBuffer::F64(cast_to::<f64>(dev, src, numel, dtype)?),
        DType::F16 => CudaBuffer::F16(cast_to::<f16>(dev, src, numel, dtype)?),
        DType::BF16 => CudaBuffer::BF16(cast_to::<bf16>(dev, src, numel, dtype)?),
        DType::U32 => CudaBuffer::U32(cast_to::<u32>(dev, src, numel, dtype)?),
    };
    Ok(Tensor::from_cuda_buffer(out, shape, dtype, device))
}

fn cast_to<D: DeviceRepr>(
    dev: &CudaDevice,
    src: &CudaBuffer,
    numel: usize,
    dtype: DType,
) -> Result<CudaSlice<D>> {
    let mut out = dev.alloc::<D>(numel)?;
    match src {
        CudaBuffer::F32(s) => launch(dev, "f32", s, &mut out, numel, dtype)?,
        CudaBuffer::F64(s) => launch(dev, "f64", s, &mut out, numel, dtype)?,
        CudaBuffer::F16(s) => launch(dev, "f16", s, &mut out, numel, dtype)?,
        CudaBuffer::BF16(s) => launch(dev, "bf16", s, &mut out, numel, dtype)?,
        CudaBuffer::U32(s) => launch(dev, "u32", s, &mut out, numel, dtype)?,
    }
    Ok(out)
}

fn launch<S: DeviceRepr, D: DeviceRepr>(
    dev: &CudaDevice,
    src_name: &str,
    src: &CudaSlice<S>,
    dst: &mut CudaSlice<D>,
    numel: usize,
    dtype: DType,
) -> Result<()> {
    if numel == 0 {
        return Ok(());
    }
    let name = format!("cast_{src_name}_to_{}", dtype.as_str());
    let func = dev.function("cast", &name)?;
    let n = numel as u64;
    let cfg = grid_1d(numel.div_ceil(ELEMENTS_PER_THREAD), THREADS);
    let mut args = dev.stream().launch_builder(&func);
    args.arg(src).arg(dst).arg(&n);
    // SAFETY: the kernel reads `n` elements of `src` and writes `n` of `dst`; both hold at least
    // `n` elements, and the argument types match the kernel's signature in cast.cu.
    unsafe { args.launch(cfg) }.map_err(crate::cuda::driver(format!("launching {name}")))?;
    Ok(())
}
