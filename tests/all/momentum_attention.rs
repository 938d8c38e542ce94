//! Tests of the momentum_attention family: CPU forward and backward against float64
//! references (every dtype, head dim and η, T not a multiple of the tile, T = 1), finite
//! differences, extreme logits, errors; and, when a GPU is there, the CUDA kernels against the
//! reference kernel and the CPU (see `momentum_attention/gpu.rs`).

mod gpu;
mod reference;

use metakernels::momentum_attention::{momentum_horizon, MomentumAttention};
use metakernels::testing::{self, assert_close, randn, to_f64, tolerance};
use metakernels::{DType, Device, Error, Tensor};
use reference::Dims;

const ETAS: [f32; 4] = [0.0, 0.5, 0.9, 0.99];
const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
const HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// Random q, k, v of `dims` (as `[1, bh, t, d]`), and their values in f64.
pub struct Inputs {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub q64: Vec<f64>,
    pub k64: Vec<f64>,
    pub v64: Vec<f64>,
    pub dims: Dims,
}

impl Inputs {
    pub fn new(dims: Dims, dtype: DType, device: &Device, seed: u64) -> Inputs {
        let shape = [1, dims.bh, dims.t, dims.d];
        let (q, q64) = randn(&shape, dtype, device, seed).unwrap();
        let (k, k64) = randn(&shape, dtype, device, seed + 1).unwrap();
        let (v, v64) = randn(&shape, dtype, device, seed + 2).unwrap();
        Inputs { q, k, v, q64, k64, v64, dims }
    }

    pub fn scale(&self) -> f64 {
        1.0 / (self.dims.d as f64).sqrt()
    }

    pub fn reference_forward(&self, eta: f32) -> Vec<f64> {
        reference::forward(&self.q64, &self.k64, &self.v64, self.dims, eta as f64, self.scale())
    }
}

/// Gradients are long reductions through a softmax: DESIGN.md's looser f32 bound.
pub fn grad_tolerance(dtype: DType) -> f64 {
    if dtype == DType::F32 {
        1e-4
    } else {
        tolerance(dtype)
    }
}

#[test]
fn forward_matches_f64_reference_for_every_dtype_head_dim_and_eta() {
    testing::set_poisoning(true);
    let cpu = Device::cpu();
    let mut seed = 1;
    for dtype in DTYPES {
        for d in HEAD_DIMS {
            // T = 1, and a T that is not a multiple of the 128-row tile and spans two tiles.
            for t in [1, 131] {
                let x = Inputs::new(Dims { bh: 2, t, d }, dtype, &cpu, seed);
                seed += 3;
                for eta in ETAS {
                    let out = MomentumAttention::new(eta).forward(&x.q, &x.k, &x.v).unwrap();
                    assert_eq!(out.dtype(), dtype);
                    assert_eq!(out.shape(), &[1, 2, t, d]);
                    let what = format!("forward {dtype} d={d} t={t} eta={eta}");
                    assert_close(&what, &to_f64(&out).unwrap(), &x.reference_forward(eta), tolerance(dtype));
                }
            }
        }
    }
}

#[test]
fn forward_f32_over_several_tiles() {
    testing::set_poisoning(true);
    let x = Inputs::new(Dims { bh: 3, t: 200, d: 64 }, DType::F32, &Device::cpu(), 100);
    for eta in ETAS {
        let out = MomentumAttention::new(eta).forward(&x.q, &x.k, &x.v).unwrap();
        assert_close(&format!("eta={eta}"), &to_f64(&out).unwrap(), &x.reference_forward(eta), 1e-5);
    }
}

#[test]
fn eta_zero_is_plain_causal_attention() {
    testing::set_poisoning(true);
    let x = Inputs::new(Dims { bh: 2, t: 90, d: 128 }, DType::F32, &Device::cpu(), 7);
    let plain = reference::attention(&x.q64, &x.k64, &x.v64, x.dims, x.scale());
    let out = MomentumAttention::new(0.0).forward(&x.q, &x.k, &x.v).unwrap();
    assert_close("eta = 0", &to_f64(&out).unwrap(), &plain, 1e-5);
    let default = MomentumAttention::default().forward(&x.q, &x.k, &x.v).unwrap();
    assert_eq!(default.to_vec::<f32>().unwrap(), out.to_vec::<f32>().unwrap());
}

#[test]
fn momentum_term_equals_the_explicit_sum() {
    testing::set_poisoning(true);
    // T = 300 is past η = 0.9's horizon (158 lags), so the skipped lags are exercised too.
    let x = Inputs::new(Dims { bh: 2, t: 300, d: 64 }, DType::F32, &Device::cpu(), 11);
    let plain = to_f64(&MomentumAttention::new(0.0).forward(&x.q, &x.k, &x.v).unwrap()).unwrap();
    for eta in [0.5f32, 0.9, 0.99] {
        assert!(momentum_horizon(eta) > 0);
        let with = to_f64(&MomentumAttention::new(eta).forward(&x.q, &x.k, &x.v).unwrap()).unwrap();
        let term: Vec<f64> = with.iter().zip(&plain).map(|(a, b)| a - b).collect();
        let explicit = reference::momentum(&x.v64, x.dims, eta as f64);
        assert_close(&format!("momentum eta={eta}"), &term, &explicit, 1e-5);
    }
}

/// The unfused baselines (attention, then a separate momentum pass; its backward, then a
/// separate reverse pass into dv) agree with the fused kernels.
#[test]
fn unfused_baseline_matches_fused() {
    testing::set_poisoning(true);
    let x = Inputs::new(Dims { bh: 2, t: 300, d: 64 }, DType::F32, &Device::cpu(), 12);
    for eta in ETAS {
        let attn = MomentumAttention::new(eta);
        let fused = to_f64(&attn.forward(&x.q, &x.k, &x.v).unwrap()).unwrap();
        let unfused = attn.forward_unfused(&x.q, &x.k, &x.v).unwrap();
        assert_eq!(unfused.shape(), x.q.shape());
        assert_close(&format!("unfused eta={eta}"), &to_f64(&unfused).unwrap(), &fused, 1e-5);
        let g = randn(x.q.shape(), DType::F32, &Device::cpu(), 13).unwrap().0;
        let fused = attn.backward(&x.q, &x.k, &x.v, &g).unwrap();
        let unfused = attn.backward_unfused(&x.q, &x.k, &x.v, &g).unwrap();
        for (name, a, b) in
            [("dq", &unfused.dq, &fused.dq), ("dk", &unfused.dk, &fused.dk), ("dv", &unfused.dv, &fused.dv)]
        {
            assert_close(
                &format!("unfused {name} eta={eta}"),
                &to_f64(a).unwrap(),
                &to_f64(b).unwrap(),
                1e-5,
            );
        }
    }
}

#[test]
fn momentum_horizon_drops_only_weights_below_f32_resolution() {
    assert_eq!(momentum_horizon(0.0), 0);
    assert_eq!(momentum_horizon(0.5), 24);
    for eta in [0.1f32, 0.5, 0.9, 0.99, 0.999] {
        let h = momentum_horizon(eta) as i32;
        let e = eta as f64;
        assert!(e.powi(h) <= 2f64.powi(-24), "eta {eta}: tail weight {} at horizon {h}", e.powi(h));
        assert!(e.powi(h - 1) > 2f64.powi(-24), "eta {eta}: horizon {h} is not the smallest");
    }
}

#[test]
fn explicit_scale_is_used() {
    testing::set_poisoning(true);
    let x = Inputs::new(Dims { bh: 1, t: 70, d: 64 }, DType::F32, &Device::cpu(), 13);
    let out = MomentumAttention::new(0.5).with_scale(0.4).forward(&x.q, &x.k, &x.v).unwrap();
    let want = reference::forward(&x.q64, &x.k64, &x.v64, x.dims, 0.5, 0.4);
    assert_close("scale 0.4", &to_f64(&out).unwrap(), &want, 1e-5);
}

#[test]
fn large_magnitude_logits_stay_finite() {
    testing::set_poisoning(true);
    let cpu = Device::cpu();
    let dims = Dims { bh: 2, t: 150, d: 64 };
    let shape = [1, dims.bh, dims.t, dims.d];
    // Keys grow along t, so the running max jumps by thousands between tiles (the old
    // accumulator's rescale factor underflows to 0); logits reach about ±1e5.
    let mut rng = testing::Rng::new(5);
    let q64: Vec<f64> = rng.normal_vec(dims.bh * dims.t * dims.d).iter().map(|x| 30.0 * x).collect();
    let k64: Vec<f64> = (0..dims.bh * dims.t * dims.d)
        .map(|i| rng.normal() * (1.0 + ((i / dims.d) % dims.t) as f64 / 3.0))
        .collect();
    let v64 = rng.normal_vec(dims.bh * dims.t * dims.d);
    for dtype in DTYPES {
        let (q, q64) = testing::from_f64(&q64, &shape, dtype, &cpu).unwrap();
        let (k, k64) = testing::from_f64(&k64, &shape, dtype, &cpu).unwrap();
        let (v, v64) = testing::from_f64(&v64, &shape, dtype, &cpu).unwrap();
        for eta in [0.0, 0.9] {
            let attn = MomentumAttention::new(eta);
            let out = to_f64(&attn.forward(&q, &k, &v).unwrap()).unwrap();
            let want = reference::forward(&q64, &k64, &v64, dims, eta as f64, 0.125);
            // One-hot-like softmax rows amplify input rounding; bf16/f16 get their usual bound.
            assert_close(&format!("large logits {dtype} eta={eta}"), &out, &want, tolerance(dtype).max(1e-4));
            let grads = attn.backward(&q, &k, &v, &v).unwrap();
            for g in [&grads.dq, &grads.dk, &grads.dv] {
                assert!(to_f64(g).unwrap().iter().all(|x| x.is_finite()), "non-finite gradient {dtype}");
            }
        }
    }
}

/// Logits that overflow f32 to −∞ (finite inputs of 1e20 whose products pass f32's range) weigh
/// nothing, as in float64 where they are finite and hugely negative: here every key of the
/// last row's first key tile (the online softmax's first step: a running max of −∞ and the new
/// max −∞ must not make −∞ − −∞ = NaN), with finite keys after it.
#[test]
fn logits_overflowing_to_minus_infinity_weigh_nothing() {
    logits_overflowing_to_minus_infinity_on(&Device::cpu());
}

/// [`logits_overflowing_to_minus_infinity_weigh_nothing`] on `device`.
pub fn logits_overflowing_to_minus_infinity_on(device: &Device) {
    testing::set_poisoning(true);
    let device = device.clone();
    let dims = Dims { bh: 1, t: 200, d: 64 };
    let shape = [1, dims.bh, dims.t, dims.d];
    let (last, first_tile) = (dims.t - 1, 128);
    let mut rng = testing::Rng::new(21);
    let mut q64 = rng.normal_vec(dims.t * dims.d);
    q64[last * dims.d..].fill(1e20);
    let mut k64 = rng.normal_vec(dims.t * dims.d);
    k64[..first_tile * dims.d].fill(-1e20);
    let v64 = rng.normal_vec(dims.t * dims.d);
    for dtype in [DType::F32, DType::BF16] {
        let (q, q64) = testing::from_f64(&q64, &shape, dtype, &device).unwrap();
        let (k, k64) = testing::from_f64(&k64, &shape, dtype, &device).unwrap();
        let (v, v64) = testing::from_f64(&v64, &shape, dtype, &device).unwrap();
        for eta in [0.0, 0.9] {
            let attn = MomentumAttention::new(eta);
            let out = to_f64(&attn.forward(&q, &k, &v).unwrap()).unwrap();
            let want = reference::forward(&q64, &k64, &v64, dims, eta as f64, 0.125);
            assert_close(&format!("overflowing logits {dtype} eta={eta}"), &out, &want, tolerance(dtype));
            let grads = attn.backward(&q, &k, &v, &v).unwrap();
            for g in [&grads.dq, &grads.dk, &grads.dv] {
                assert!(to_f64(g).unwrap().iter().all(|x| x.is_finite()), "non-finite gradient {dtype}");
            }
            if device.is_cuda() {
                // The reference kernels too.
                let out = to_f64(&attn.forward_reference_kernel(&q, &k, &v).unwrap()).unwrap();
                assert_close(
                    &format!("overflowing logits, reference kernel, {dtype} eta={eta}"),
                    &out,
                    &want,
                    tolerance(dtype),
                );
                let grads = attn.backward_reference_kernel(&q, &k, &v, &v).unwrap();
                for g in [&grads.dq, &grads.dk, &grads.dv] {
                    assert!(
                        to_f64(g).unwrap().iter().all(|x| x.is_finite()),
                        "reference kernel: non-finite gradient {dtype}"
                    );
                }
            }
        }
    }
}

#[test]
fn backward_matches_f64_reference_for_every_dtype_head_dim_and_eta() {
    testing::set_poisoning(true);
    let cpu = Device::cpu();
    let mut seed = 1000;
    for dtype in DTYPES {
        for d in HEAD_DIMS {
            for t in [1, 131] {
                let x = Inputs::new(Dims { bh: 2, t, d }, dtype, &cpu, seed);
                let (grad, g64) = randn(&[1, 2, t, d], dtype, &cpu, seed + 3).unwrap();
                seed += 4;
                for eta in ETAS {
                    let grads = MomentumAttention::new(eta).backward(&x.q, &x.k, &x.v, &grad).unwrap();
                    let (dq, dk, dv) =
                        reference::backward(&x.q64, &x.k64, &x.v64, &g64, x.dims, eta as f64, x.scale());
                    let tol = grad_tolerance(dtype);
                    for (name, got, want) in
                        [("dq", &grads.dq, dq), ("dk", &grads.dk, dk), ("dv", &grads.dv, dv)]
                    {
                        assert_eq!(got.dtype(), dtype);
                        let what = format!("{name} {dtype} d={d} t={t} eta={eta}");
                        assert_close(&what, &to_f64(got).unwrap(), &want, tol);
                    }
                }
            }
        }
    }
}

#[test]
fn backward_f32_over_several_tiles() {
    testing::set_poisoning(true);
    let cpu = Device::cpu();
    let x = Inputs::new(Dims { bh: 2, t: 160, d: 64 }, DType::F32, &cpu, 77);
    let (grad, g64) = randn(&[1, 2, 160, 64], DType::F32, &cpu, 80).unwrap();
    for eta in ETAS {
        let grads = MomentumAttention::new(eta).backward(&x.q, &x.k, &x.v, &grad).unwrap();
        let (dq, dk, dv) = reference::backward(&x.q64, &x.k64, &x.v64, &g64, x.dims, eta as f64, x.scale());
        assert_close(&format!("dq eta={eta}"), &to_f64(&grads.dq).unwrap(), &dq, 1e-4);
        assert_close(&format!("dk eta={eta}"), &to_f64(&grads.dk).unwrap(), &dk, 1e-4);
        assert_close(&format!("dv eta={eta}"), &to_f64(&grads.dv).unwrap(), &dv, 1e-4);
    }
}

/// The CPU backward runs one pass per head when there are at least two heads per thread, and
/// splits heads into key tiles and query tiles otherwise: both paths against the reference.
#[test]
fn backward_per_head_and_per_tile_paths_match_reference() {
    testing::set_poisoning(true);
    let cpu = Device::cpu();
    let x = Inputs::new(Dims { bh: 3, t: 300, d: 64 }, DType::F32, &cpu, 90);
    let (grad, g64) = randn(&[1, 3, 300, 64], DType::F32, &cpu, 93).unwrap();
    let eta = 0.9;
    let (dq, dk, dv) = reference::backward(&x.q64, &x.k64, &x.v64, &g64, x.dims, eta, x.scale());
    for threads in [1, 8] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let grads =
            pool.install(|| MomentumAttention::new(eta as f32).backward(&x.q, &x.k, &x.v, &grad)).unwrap();
        assert_close(&format!("dq, {threads} threads"), &to_f64(&grads.dq).unwrap(), &dq, 1e-4);
        assert_close(&format!("dk, {threads} threads"), &to_f64(&grads.dk).unwrap(), &dk, 1e-4);
        assert_close(&format!("dv, {threads} threads"), &to_f64(&grads.dv).unwrap(), &dv, 1e-4);
    }
}

#[test]
fn forward_with_state_saves_what_backward_recomputes() {
    testing::set_poisoning(true);
    let cpu = Device::cpu();
    for dtype in DTYPES {
        let x = Inputs::new(Dims { bh: 2, t: 150, d: 64 }, dtype, &cpu, 400);
        let (grad, _) = randn(&[1, 2, 150, 64], dtype, &cpu, 403).unwrap();
        let attn = MomentumAttention::new(0.9);
        let state = attn.forward_with_state(&x.q, &x.k, &x.v).unwrap();
        let plain_out = attn.forward(&x.q, &x.k, &x.v).unwrap();
        assert_eq!(to_f64(state.output()).unwrap(), to_f64(&plain_out).unwrap(), "{dtype}");
        // The log-sum-exps against float64: log Σ_{s≤t} exp(scale q_t·k_s).
        let lse = to_f64(&state.logsumexp().unwrap()).unwrap();
        let want: Vec<f64> = (0..2 * 150)
            .map(|row| {
                let (h, t) = (row / 150, row % 150);
                let q = &x.q64[row * 64..(row + 1) * 64];
                let logits: Vec<f64> = (0..=t)
                    .map(|s| {
                        let k = &x.k64[(h * 150 + s) * 64..(h * 150 + s + 1) * 64];
                        x.scale() * q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>()
                    })
                    .collect();
                let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln()
            })
            .collect();
        assert_close(&format!("logsumexp {dtype}"), &lse, &want, 1e-5);
        let saved = attn.backward_with_state(&x.q, &x.k, &x.v, &state, &grad).unwrap();
        let recomputed = attn.backward(&x.q, &x.k, &x.v, &grad).unwrap();
        for (a, b) in [(&saved.dq, &recomputed.dq), (&saved.dk, &recomputed.dk), (&saved.dv, &recomputed.dv)]
        {
            // f16/bf16 states hold the attention rounded to the dtype; the recomputation keeps f32.
            assert_close(
                &format!("saved vs recomputed {dtype}"),
                &to_f64(a).unwrap(),
                &to_f64(b).unwrap(),
                grad_tolerance(dtype),
            );
        }
    }
}

#[test]
fn backward_with_state_rejects_a_state_of_other_settings() {
    let cpu = Device::cpu();
    let x = Inputs::new(Dims { bh: 1, t: 10, d: 64 }, DType::F32, &cpu, 410);
    let state = MomentumAttention::new(0.5).forward_with_state(&x.q, &x.k, &x.v).unwrap();
    let err = MomentumAttention::new(0.9).backward_with_state(&x.q, &x.k, &x.v, &state, &x.v).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { ref what, .. } if what == "state"), "{err}");
    let scaled = MomentumAttention::new(0.5).with_scale(0.3);
    assert!(scaled.backward_with_state(&x.q, &x.k, &x.v, &state, &x.v).is_err());
    let other = Inputs::new(Dims { bh: 1, t: 11, d: 64 }, DType::F32, &cpu, 411);
    let err = MomentumAttention::new(0.5).backward_with_state(&other.q, &other.k, &other.v, &state, &other.v);
    assert!(matches!(err, Err(Error::ShapeMismatch { .. })));
}

/// L(q, k, v) = Σ grad ∘ forward_f64(q, k, v): its central differences in f64 check the
/// reference gradient, and through it the kernel's.
#[test]
fn backward_matches_finite_differences() {
    testing::set_poisoning(true);
    let cpu = Device::cpu();
    let dims = Dims { bh: 1, t: 5, d: 64 };
    let x = Inputs::new(dims, DType::F32, &cpu, 300);
    let (grad, g64) = randn(&[1, 1, 5, 64], DType::F32, &cpu, 303).unwrap();
    let scale = x.scale();
    for eta in [0.0f32, 0.9] {
        let eta64 = eta as f64;
        let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
            let o = reference::forward(q, k, v, dims, eta64, scale);
            o.iter().zip(&g64).map(|(o, g)| o * g).sum()
        };
        let grads = MomentumAttention::new(eta).backward(&x.q, &x.k, &x.v, &grad).unwrap();
        let kernel = [&grads.dq, &grads.dk, &grads.dv].map(|g| to_f64(g).unwrap());
        let h = 1e-5;
        for (which, got) in kernel.iter().enumerate() {
            let fd: Vec<f64> = (0..got.len())
                .map(|i| {
                    let mut args = [x.q64.clone(), x.k64.clone(), x.v64.clone()];
                    args[which][i] += h;
                    let up = loss(&args[0], &args[1], &args[2]);
                    args[which][i] -= 2.0 * h;
                    let down = loss(&args[0], &args[1], &args[2]);
                    (up - down) / (2.0 * h)
                })
                .collect();
            assert_close(
                &format!("d{} eta={eta} vs finite differences", ["q", "k", "v"][which]),
                got,
                &fd,
                1e-4,
            );
        }
    }
}

#[test]
fn rejects_bad_arguments_with_typed_errors() {
    let cpu = Device::cpu();
    let x = Inputs::new(Dims { bh: 1, t: 4, d: 64 }, DType::F32, &cpu, 9);
    let ok = MomentumAttention::new(0.5);
    for eta in [1.0f32, 1.5, -0.1, f32::NAN, f32::INFINITY] {
        let err = MomentumAttention::new(eta).forward(&x.q, &x.k, &x.v).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { ref what, .. } if what == "eta"), "{err}");
        assert!(MomentumAttention::new(eta).backward(&x.q, &x.k, &x.v, &x.v).is_err());
    }
    for scale in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let err = ok.clone().with_scale(scale).forward(&x.q, &x.k, &x.v).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { ref what, .. } if what == "scale"), "{err}");
    }
    // Unsupported head dim, wrong rank, mismatched shapes.
    let (d32, _) = randn(&[1, 1, 4, 32], DType::F32, &cpu, 1).unwrap();
    assert!(matches!(ok.forward(&d32, &d32, &d32), Err(Error::ShapeMismatch { .. })));
    let flat = x.q.reshape(&[4, 64]).unwrap();
    assert!(matches!(ok.forward(&flat, &flat, &flat), Err(Error::ShapeMismatch { .. })));
    let (longer, _) = randn(&[1, 1, 5, 64], DType::F32, &cpu, 2).unwrap();
    assert!(matches!(ok.forward(&x.q, &longer, &x.v), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(ok.forward(&x.q, &x.k, &longer), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(ok.backward(&x.q, &x.k, &x.v, &longer), Err(Error::ShapeMismatch { .. })));
    // Dtypes: mixed, and unsupported.
    let k16 = x.k.to_dtype(DType::F16).unwrap();
    assert!(matches!(ok.forward(&x.q, &k16, &x.v), Err(Error::DTypeMismatch { .. })));
    assert!(matches!(ok.backward(&x.q, &x.k, &x.v, &k16), Err(Error::DTypeMismatch { .. })));
    let q64 = x.q.to_dtype(DType::F64).unwrap();
    assert!(matches!(ok.forward(&q64, &q64, &q64), Err(Error::UnsupportedDType { .. })));
    // Empty.
    let empty = Tensor::zeros(&[1, 1, 0, 64], DType::F32, &cpu).unwrap();
    assert!(matches!(ok.forward(&empty, &empty, &empty), Err(Error::EmptyInput { .. })));
    let no_heads = Tensor::zeros(&[0, 2, 3, 64], DType::F32, &cpu).unwrap();
    assert!(matches!(ok.backward(&no_heads, &no_heads, &no_heads, &no_heads), Err(Error::EmptyInput { .. })));
}

/// Σ_{i<t} η^{t−i} x_i for every row t of every head (`forward`), or Σ_{t>s} η^{t−s} x_t for
/// every row s (`reverse`): the momentum term and its gradient, explicitly, in f64.
fn decayed_sums(x: &[f64], heads: usize, t: usize, d: usize, eta: f64, reverse: bool) -> Vec<f64> {
    let mut out = vec![0.0; x.len()];
    for h in 0..heads {
        for row in 0..t {
            for other in 0..t {
                let lag = if reverse { other as i64 - row as i64 } else { row as i64 - other as i64 };
                if lag <= 0 {
                    continue;
                }
                let w = eta.powi(lag as i32);
                for j in 0..d {
                    out[(h * t + row) * d + j] += w * x[(h * t + other) * d + j];
                }
            }
        }
    }
    out
}

#[test]
fn linear_base_is_linear_attention_plus_the_momentum_term() {
    use metakernels::linear_attention::{FeatureMap, LinearAttention};
    use metakernels::momentum_attention::Base;
    testing::set_poisoning(true);
    let dev = Device::cpu();
    let (b, h, t, dk, dv) = (2, 2, 37, 16, 24);
    let linear = LinearAttention {
        causal: true,
        feature_map: FeatureMap::EluPlusOne,
        normalize: true,
        scale: 0.5,
        eps: 1e-6,
    };
    let (q, _) = randn(&[b, h, t, dk], DType::F32, &dev, 11).unwrap();
    let (k, _) = randn(&[b, h, t, dk], DType::F32, &dev, 12).unwrap();
    let (v, v64) = randn(&[b, h, t, dv], DType::F32, &dev, 13).unwrap();
    let (g, g64) = randn(&[b, h, t, dv], DType::F32, &dev, 14).unwrap();
    let plain = to_f64(&linear.forward(&q, &k, &v, None).unwrap().output).unwrap();
    let plain_grads = linear.backward(&q, &k, &v, None, &g, None).unwrap();
    for eta in [0.0f32, 0.5, 0.9] {
        let attn = MomentumAttention { eta, base: Base::Linear(linear) };
        let momentum = decayed_sums(&v64, b * h, t, dv, eta as f64, false);
        let expected: Vec<f64> = plain.iter().zip(&momentum).map(|(a, m)| a + m).collect();
        let out = to_f64(&attn.forward(&q, &k, &v).unwrap()).unwrap();
        assert_close(&format!("linear base forward, eta {eta}"), &out, &expected, 1e-5);

        let grads = attn.backward(&q, &k, &v, &g).unwrap();
        let dv_momentum = decayed_sums(&g64, b * h, t, dv, eta as f64, true);
        let plain_dv = to_f64(&plain_grads.dv).unwrap();
        let expected_dv: Vec<f64> = plain_dv.iter().zip(&dv_momentum).map(|(a, m)| a + m).collect();
        assert_close("linear base dv", &to_f64(&grads.dv).unwrap(), &expected_dv, 1e-5);
        assert_close("linear base dq", &to_f64(&grads.dq).unwrap(), &to_f64(&plain_grads.dq).unwrap(), 1e-5);
        assert_close("linear base dk", &to_f64(&grads.dk).unwrap(), &to_f64(&plain_grads.dk).unwrap(), 1e-5);
    }
    // The softmax-only methods say so instead of silently doing something else.
    let attn = MomentumAttention { eta: 0.5, base: Base::Linear(linear) };
    assert!(matches!(attn.forward_with_state(&q, &k, &v), Err(Error::InvalidArgument { .. })));
    let non_causal =
        MomentumAttention { eta: 0.5, base: Base::Linear(LinearAttention { causal: false, ..linear }) };
    assert!(non_causal.forward(&q, &k, &v).is_err());
}
