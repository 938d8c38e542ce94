//! CPU MoE kernels: argmax/softmax routing per token, and dispatch/combine as parallel row
//! gathers (combine inverts the permutation first, so every output row is written by exactly one
//! task and no scatter races exist).

use half::{bf16, f16};
use rayon::prelude::*;

use crate::cpu::math::exp;
use crate::cpu::multiversion;
use crate::tensor::HostBuffer;
use crate::{Element, Error, Result, Tensor};

/// (expert, probability of that expert) per row of `logits` (`n × k`).
pub(super) fn top1_logits(logits: &[f32], n: usize, k: usize) -> Result<(Vec<u32>, Vec<f32>)> {
    let mut expert = crate::cpu::output_vec::<u32>(n)?;
    let mut prob = crate::cpu::output_vec::<f32>(n)?;
    logits.par_chunks(k).zip(expert.par_iter_mut()).zip(prob.par_iter_mut()).for_each(|((row, e), p)| {
        let (mut best, mut arg) = (row[0], 0usize);
        for (j, &v) in row.iter().enumerate().skip(1) {
            if v > best {
                best = v;
                arg = j;
            }
        }
        *e = arg as u32;
        *p = 1.0 / softmax_denominator(row, best);
    });
    Ok((expert, prob))
}

multiversion! {
    /// Σ_j e^(row_j − max), summed in 16 lanes so that the loop vectorises.
    fn softmax_denominator(row: &[f32], max: f32) -> f32 {
        let mut lanes = [0f32; 16];
        let mut chunks = row.chunks_exact(16);
        for chunk in &mut chunks {
            lanes.iter_mut().zip(chunk).for_each(|(lane, &v)| *lane += exp(v - max));
        }
        let tail: f32 = chunks.remainder().iter().map(|&v| exp(v - max)).sum();
        lanes.iter().sum::<f32>() + tail
    }
}

/// `out[j] = x[order[j]]` for a CPU tensor of any float dtype.
pub(super) fn gather_rows(x: &Tensor, order: &[u32], n: usize, d: usize) -> Result<Tensor> {
    fn go<T: Element>(src: &[T], order: &[u32], n: usize, d: usize) -> Result<Tensor> {
        let mut out = crate::cpu::output_vec::<T>(n * d)?;
        out.par_chunks_mut(d.max(1)).zip(order.par_iter()).for_each(|(dst, &i)| {
            dst.copy_from_slice(&src[i as usize * d..(i as usize + 1) * d]);
        });
        Ok(Tensor::from_host_vec(out, &[n, d]))
    }
    match storage(x)? {
        HostBuffer::F32(v) => go(v, order, n, d),
        HostBuffer::F16(v) => go(v, order, n, d),
        HostBuffer::BF16(v) => go(v, order, n, d),
        HostBuffer::F64(v) => go(v, order, n, d),
        HostBuffer::U32(v) => go(v, order, n, d),
    }
}

/// `out[order[j]] = w[order[j]] · grouped[j]`, as a gather through the inverse permutation.
pub(super) fn combine(
    grouped: &Tensor,
    order: &[u32],
    w: Option<&[f32]>,
    op: &'static str,
) -> Result<Tensor> {
    let (n, d) = (grouped.shape()[0], grouped.shape()[1]);
    let mut position = vec![0u32; n];
    for (j, &t) in order.iter().enumerate() {
        position[t as usize] = j as u32;
    }
    let Some(w) = w else {
        return gather_rows(grouped, &position, n, d);
    };
    fn go<T: Element>(src: &[T], pos: &[u32], w: &[f32], n: usize, d: usize) -> Result<Tensor> {
        let mut out = crate::cpu::output_vec::<T>(n * d)?;
        out.par_chunks_mut(d.max(1)).zip(pos.par_iter().zip(w.par_iter())).for_each(|(dst, (&j, &wt))| {
            let row = &src[j as usize * d..(j as usize + 1) * d];
            dst.iter_mut().zip(row).for_each(|(o, &v)| *o = T::from_f32(wt * v.to_f32()));
        });
        Ok(Tensor::from_host_vec(out, &[n, d]))
    }
    match storage(grouped)? {
        HostBuffer::F32(v) => go::<f32>(v, &position, w, n, d),
        HostBuffer::F16(v) => go::<f16>(v, &position, w, n, d),
        HostBuffer::BF16(v) => {
            let mut out = crate::cpu::output_vec::<bf16>(n * d)?;
            out.par_chunks_mut(d.max(1)).zip(position.par_iter().zip(w.par_iter())).for_each(
                |(dst, (&j, &wt))| scale_bf16_row(&v[j as usize * d..(j as usize + 1) * d], wt, dst),
            );
            Ok(Tensor::from_host_vec(out, &[n, d]))
        }
        _ => Err(Error::invalid(op, "grouped", "expected f32, f16 or bf16")),
    }
}

crate::cpu::multiversion! {
    /// `dst = w · src` for bf16 rows, rounding as `bf16::from_f32` does (to nearest even; NaN
    /// stays a quiet NaN) but in bit operations the compiler vectorises: `half`'s conversion,
    /// one element at a time, ran the weighted combine at half the unweighted one's speed.
    fn scale_bf16_row(src: &[bf16], w: f32, dst: &mut [bf16]) {
        for (o, s) in dst.iter_mut().zip(src) {
            let x = (f32::from_bits((s.to_bits() as u32) << 16) * w).to_bits();
            let rounded = x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16;
            let nan = (x & 0x7fff_ffff) > 0x7f80_0000;
            *o = bf16::from_bits(if nan { ((x >> 16) | 0x40) as u16 } else { rounded as u16 });
        }
    }
}

fn storage(t: &Tensor) -> Result<&HostBuffer> {
    match t.storage() {
        crate::tensor::Storage::Cpu(b) => Ok(b),
        #[cfg(feature = "cuda")]
        crate::tensor::Storage::Cuda(_) => Err(Error::DeviceMismatch {
            op: "moe (cpu)",
            expected: "cpu".into(),
            got: t.device().to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every bf16 value times weights of every kind rounds exactly as `half` does.
    #[test]
    fn bf16_row_scaling_rounds_as_half_does() {
        let all: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
        let mut out = vec![bf16::ZERO; all.len()];
        for w in [1.0f32, 0.5, 0.7, -3.3, 1e-30, 1e30, 0.0, f32::INFINITY, f32::NAN] {
            scale_bf16_row(&all, w, &mut out);
            for (s, o) in all.iter().zip(&out) {
                let want = bf16::from_f32(w * s.to_f32());
                // NaN payloads differ with the order the multiply takes its operands in: NaN is NaN.
                let same = want.to_bits() == o.to_bits() || (want.is_nan() && o.is_nan());
                assert!(
                    same,
                    "{s:?} × {w}: got {o:?} ({:#06x}), half gives {want:?} ({:#06x})",
                    o.to_bits(),
                    want.to_bits()
                );
            }
        }
    }
}
