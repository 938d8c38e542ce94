//! CPU casts: rayon over blocks of elements; each block converts through f32 (exact for every
//! source but f64) or directly for f64 targets.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::tensor::HostBuffer;
use crate::{DType, Element, Result, Tensor};

/// Elements per rayon task: large enough to amortise scheduling, small enough to balance.
const BLOCK: usize = 1 << 15;

pub(super) fn cast(src: &HostBuffer, shape: &[usize], dtype: DType) -> Result<Tensor> {
    match src {
        HostBuffer::F32(v) => cast_from(v, shape, dtype),
        HostBuffer::F64(v) => cast_from(v, shape, dtype),
        HostBuffer::F16(v) => cast_from(v, shape, dtype),
        HostBuffer::BF16(v) => cast_from(v, shape, dtype),
        // invariant: the caller rejects u32 before dispatching.
        HostBuffer::U32(v) => Ok(Tensor::from_host_vec(v.clone(), shape)),
    }
}

fn cast_from<S: Element>(src: &[S], shape: &[usize], dtype: DType) -> Result<Tensor> {
    Ok(match dtype {
        DType::F32 => Tensor::from_host_vec(convert::<S, f32>(src)?, shape),
        DType::F64 => Tensor::from_host_vec(convert::<S, f64>(src)?, shape),
        DType::F16 => Tensor::from_host_vec(convert::<S, f16>(src)?, shape),
        DType::BF16 => Tensor::from_host_vec(convert::<S, bf16>(src)?, shape),
        DType::U32 => Tensor::from_host_vec(convert::<S, u32>(src)?, shape),
    })
}

fn convert<S: Element, D: Element>(src: &[S]) -> Result<Vec<D>> {
    let mut out = crate::cpu::output_vec::<D>(src.len())?;
    out.par_chunks_mut(BLOCK).zip(src.par_chunks(BLOCK)).for_each(|(dst, src)| convert_block(src, dst));
    Ok(out)
}

/// Converts one block. f32 ↔ f16/bf16 use `half`'s slice conversions (F16C / SIMD where the CPU
/// has them); f64 sources and targets go through f64 so that f64 → f16 rounds once.
fn convert_block<S: Element, D: Element>(src: &[S], dst: &mut [D]) {
    use half::slice::HalfFloatSliceExt;
    // The casts succeed exactly when S or D is the type named, which the dtype tags decide.
    let src_f32 = bytemuck::try_cast_slice::<S, f32>(src).ok().filter(|_| S::DTYPE == DType::F32);
    let dst_f32 =
        (D::DTYPE == DType::F32).then(|| bytemuck::try_cast_slice_mut::<D, f32>(dst).ok()).flatten();
    match (src_f32, dst_f32, S::DTYPE, D::DTYPE) {
        (Some(s), None, _, DType::F16) => {
            if let Ok(d) = bytemuck::try_cast_slice_mut::<D, f16>(dst) {
                return d.convert_from_f32_slice(s);
            }
        }
        (Some(s), None, _, DType::BF16) => {
            if let Ok(d) = bytemuck::try_cast_slice_mut::<D, bf16>(dst) {
                return d.convert_from_f32_slice(s);
            }
        }
        (None, Some(d), DType::F16, _) => {
            if let Ok(s) = bytemuck::try_cast_slice::<S, f16>(src) {
                return s.convert_to_f32_slice(d);
            }
        }
        (None, Some(d), DType::BF16, _) => {
            if let Ok(s) = bytemuck::try_cast_slice::<S, bf16>(src) {
                return s.convert_to_f32_slice(d);
            }
        }
        _ => {}
    }
    convert_scalar(src, dst)
}

fn convert_scalar<S: Element, D: Element>(src: &[S], dst: &mut [D]) {
    if S::DTYPE == DType::F64 || D::DTYPE == DType::F64 {
        dst.iter_mut().zip(src).for_each(|(d, s)| *d = D::from_f64(s.to_f64()));
    } else {
        dst.iter_mut().zip(src).for_each(|(d, s)| *d = D::from_f32(s.to_f32()));
    }
}
