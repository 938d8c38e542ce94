//! Test support, shared by the crate's tests, benchmarks and examples: seeded random data,
//! float64 references, relative error, output poisoning, and [`cuda_or_skip`].
//!
//! Public so that integration tests and benches can use it; hidden from the docs because it is
//! not part of the stable API.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::{DType, Device, Result, Tensor};

static POISON: AtomicBool = AtomicBool::new(false);

/// Turns output poisoning on or off for the whole process.
///
/// While on, every output buffer an operation allocates is first filled with all-ones bytes
/// (NaN for floats, `u32::MAX` for integers), so an element a kernel forgets to write fails
/// the test instead of passing as a lucky zero.
pub fn set_poisoning(on: bool) {
    POISON.store(on, Ordering::Relaxed);
}

/// Whether output poisoning is on.
pub fn poisoning() -> bool {
    POISON.load(Ordering::Relaxed)
}

pub use crate::cpu::output_vec;

/// A small, fast, seeded generator (SplitMix64): reproducible test data without a dependency.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix_finish(self.0)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi).
    pub fn uniform_in(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Uniform integer in [0, n) (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// `n` standard-normal values.
    pub fn normal_vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.normal()).collect()
    }

    /// `n` values uniform in [lo, hi).
    pub fn uniform_vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| self.uniform_in(lo, hi)).collect()
    }
}

/// SplitMix64's output function: a bijective mix of a counter into 64 random-looking bits.
fn splitmix_finish(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `len` values uniform in [-1, 1), generated in parallel from a counter hash: for benchmark
/// inputs of hundreds of millions of elements, where the sequential f64 generators above would
/// dominate the run. Element `i` depends only on `(i, seed)`.
pub fn uniform_f32_parallel(len: usize, seed: u64) -> Vec<f32> {
    use rayon::prelude::*;
    (0..len)
        .into_par_iter()
        .map(|i| {
            let bits = splitmix_finish((i as u64 ^ seed).wrapping_add(0x9E37_79B9_7F4A_7C15));
            ((bits >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A tensor of standard-normal values of `dtype` on `device`, plus the float64 values it holds
/// (after rounding to `dtype`), for references.
pub fn randn(shape: &[usize], dtype: DType, device: &Device, seed: u64) -> Result<(Tensor, Vec<f64>)> {
    let n = shape.iter().product();
    let values = Rng::new(seed).normal_vec(n);
    from_f64(&values, shape, dtype, device)
}

/// A tensor of `dtype` on `device` holding `values` rounded to `dtype`, plus the rounded values
/// as float64.
pub fn from_f64(
    values: &[f64],
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Vec<f64>)> {
    let t = Tensor::from_slice(values, shape, &Device::cpu())?.to_dtype(dtype)?;
    let rounded = to_f64(&t)?;
    Ok((t.to_device(device)?, rounded))
}

/// The elements of any tensor as float64 on the host.
pub fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    match t.dtype() {
        DType::U32 => Ok(t.to_vec::<u32>()?.into_iter().map(f64::from).collect()),
        DType::F64 => t.to_vec::<f64>(),
        _ => t.to_dtype(DType::F64)?.to_vec::<f64>(),
    }
}

/// ‖out − reference‖₂ / ‖reference‖₂, or +∞ when `out` holds a NaN or the lengths differ.
/// When the reference is all zeros, the absolute norm of the difference.
pub fn rel_error(out: &[f64], reference: &[f64]) -> f64 {
    if out.len() != reference.len() || out.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let diff: f64 = out.iter().zip(reference).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt();
    let norm: f64 = reference.iter().map(|b| b * b).sum::<f64>().sqrt();
    if norm == 0.0 {
        diff
    } else {
        diff / norm
    }
}

/// Asserts `rel_error(out, reference) <= tol`, naming `what` in the failure.
#[track_caller]
pub fn assert_close(what: &str, out: &[f64], reference: &[f64], tol: f64) {
    let err = rel_error(out, reference);
    assert!(
        err <= tol,
        "{what}: relative error {err:e} exceeds {tol:e} (len {} vs {})",
        out.len(),
        reference.len()
    );
}

/// The tolerance DESIGN.md sets for outputs stored in `dtype`.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-10,
        DType::F32 => 1e-5,
        DType::F16 | DType::BF16 => 1e-2,
        DType::U32 => 0.0,
    }
}

/// A CUDA device for a GPU test, or `None` (after printing one line) when there is none.
///
/// With `METAKERNELS_REQUIRE_CUDA=1` a missing device fails the test instead of skipping it:
/// the GPU bundle sets it so that no GPU test can silently pass by skipping.
pub fn cuda_or_skip(test: &str) -> Option<Device> {
    set_poisoning(true);
    let require = std::env::var("METAKERNELS_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    match cuda_device() {
        Ok(dev) => Some(dev),
        Err(reason) if require => panic!("{test}: METAKERNELS_REQUIRE_CUDA=1 but {reason}"),
        Err(reason) => {
            println!("skipped {test}: {reason}");
            None
        }
    }
}

fn cuda_device() -> std::result::Result<Device, String> {
    #[cfg(feature = "cuda")]
    if !crate::cuda::kernels_built() {
        return Err("the CUDA kernels were not built into this binary".into());
    }
    Device::cuda(0).map_err(|e| e.to_string())
}

/// The names of the kernel modules compiled into this binary (empty without nvcc).
pub fn built_kernel_modules() -> Vec<&'static str> {
    #[cfg(feature = "cuda")]
    {
        crate::cuda::built_modules().collect()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Vec::new()
    }
}
