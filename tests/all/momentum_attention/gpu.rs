//! CUDA tests: the fast kernels against the reference kernel, the CPU path and the float64
//! reference. Each skips (one printed line) without a GPU, and fails instead under
//! `METAKERNELS_REQUIRE_CUDA=1`.

use metakernels::momentum_attention::MomentumAttention;
use metakernels::testing::{assert_close, cuda_or_skip, randn, to_f64, tolerance};
use metakernels::{DType, Device, Error};

use super::reference::{self, Dims};
use super::{grad_tolerance, Inputs, DTYPES, ETAS, HEAD_DIMS};

#[test]
fn cuda_forward_matches_reference_kernel_cpu_and_f64() {
    let Some(gpu) = cuda_or_skip("cuda_forward_matches_reference_kernel_cpu_and_f64") else { return };
    let mut seed = 5000;
    for dtype in DTYPES {
        for d in HEAD_DIMS {
            // T = 1; T not a multiple of any tile (32 or 64 rows); several tiles.
            for t in [1, 67, 200] {
                let x = Inputs::new(Dims { bh: 3, t, d }, dtype, &gpu, seed);
                let cpu = Inputs::new(Dims { bh: 3, t, d }, dtype, &Device::cpu(), seed);
                seed += 3;
                for eta in ETAS {
                    let attn = MomentumAttention::new(eta);
                    let what = format!("{dtype} d={d} t={t} eta={eta}");
                    let fast = attn.forward(&x.q, &x.k, &x.v).unwrap();
                    assert!(fast.device().is_cuda());
                    let fast = to_f64(&fast).unwrap();
                    let slow = to_f64(&attn.forward_reference_kernel(&x.q, &x.k, &x.v).unwrap()).unwrap();
                    let on_cpu = to_f64(&attn.forward(&cpu.q, &cpu.k, &cpu.v).unwrap()).unwrap();
                    let want = x.reference_forward(eta);
                    let tol = tolerance(dtype);
                    assert_close(&format!("fast vs f64, {what}"), &fast, &want, tol);
                    assert_close(&format!("reference kernel vs f64, {what}"), &slow, &want, tol);
                    assert_close(&format!("fast vs cpu, {what}"), &fast, &on_cpu, 2.0 * tol);
                }
            }
        }
    }
}

#[test]
fn cuda_forward_long_sequence_skips_old_momentum_tiles() {
    let Some(gpu) = cuda_or_skip("cuda_forward_long_sequence_skips_old_momentum_tiles") else { return };
    // T = 1000 is far past η = 0.5 and 0.9's horizons, so value tiles are skipped.
    for dtype in DTYPES {
        let x = Inputs::new(Dims { bh: 2, t: 1000, d: 128 }, dtype, &gpu, 6000);
        let cpu = Inputs::new(Dims { bh: 2, t: 1000, d: 128 }, dtype, &Device::cpu(), 6000);
        for eta in [0.5f32, 0.9, 0.99] {
            let attn = MomentumAttention::new(eta);
            let fast = to_f64(&attn.forward(&x.q, &x.k, &x.v).unwrap()).unwrap();
            let on_cpu = to_f64(&attn.forward(&cpu.q, &cpu.k, &cpu.v).unwrap()).unwrap();
            let slow = to_f64(&attn.forward_reference_kernel(&x.q, &x.k, &x.v).unwrap()).unwrap();
            let tol = tolerance(dtype).max(1e-4);
            assert_close(&format!("fast vs cpu {dtype} eta={eta}"), &fast, &on_cpu, 2.0 * tol);
            assert_close(&format!("fast vs reference kernel {dtype} eta={eta}"), &fast, &slow, 2.0 * tol);
        }
    }
}

#[test]
fn cuda_backward_matches_f64_reference_and_cpu() {
    let Some(gpu) = cuda_or_skip("cuda_backward_matches_f64_reference_and_cpu") else { return };
    let mut seed = 7000;
    for dtype in DTYPES {
        for d in HEAD_DIMS {
            // T = 1; T past one key tile (64 rows at D ≤ 128, 32 at D = 256 and for f32) with a
            // ragged last tile; several tiles with 2 rows in the last.
            for t in [1, 67, 130] {
                let x = Inputs::new(Dims { bh: 2, t, d }, dtype, &gpu, seed);
                let cpu = Inputs::new(Dims { bh: 2, t, d }, dtype, &Device::cpu(), seed);
                let (grad, g64) = randn(&[1, 2, t, d], dtype, &gpu, seed + 3).unwrap();
                let (cpu_grad, _) = randn(&[1, 2, t, d], dtype, &Device::cpu(), seed + 3).unwrap();
                seed += 4;
                for eta in ETAS {
                    let attn = MomentumAttention::new(eta);
                    let grads = attn.backward(&x.q, &x.k, &x.v, &grad).unwrap();
                    let by_reference = attn.backward_reference_kernel(&x.q, &x.k, &x.v, &grad).unwrap();
                    let on_cpu = attn.backward(&cpu.q, &cpu.k, &cpu.v, &cpu_grad).unwrap();
                    let (dq, dk, dv) =
                        reference::backward(&x.q64, &x.k64, &x.v64, &g64, x.dims, eta as f64, x.scale());
                    for (name, got, reference_kernel, cpu_got, want) in [
                        ("dq", &grads.dq, &by_reference.dq, &on_cpu.dq, dq),
                        ("dk", &grads.dk, &by_reference.dk, &on_cpu.dk, dk),
                        ("dv", &grads.dv, &by_reference.dv, &on_cpu.dv, dv),
                    ] {
                        assert!(got.device().is_cuda());
                        let what = format!("cuda {name} {dtype} d={d} t={t} eta={eta}");
                        let got = to_f64(got).unwrap();
                        assert_close(&format!("{what} vs f64"), &got, &want, grad_tolerance(dtype));
                        let reference_kernel = to_f64(reference_kernel).unwrap();
                        assert_close(
                            &format!("{what}: reference kernel vs f64"),
                            &reference_kernel,
                            &want,
                            grad_tolerance(dtype),
                        );
                        let tol = 2.0 * grad_tolerance(dtype);
                        assert_close(
                            &format!("{what} vs the reference kernel"),
                            &got,
                            &reference_kernel,
                            tol,
                        );
                        let cpu_got = to_f64(cpu_got).unwrap();
                        assert_close(&format!("{what} vs cpu"), &got, &cpu_got, tol);
                    }
                }
            }
        }
    }
}

#[test]
fn cuda_backward_long_sequence_skips_old_momentum_tiles() {
    let Some(gpu) = cuda_or_skip("cuda_backward_long_sequence_skips_old_momentum_tiles") else { return };
    // T = 700 is past η = 0.5's horizon (24 lags) and η = 0.9's (158): each key tile carries
    // the momentum gradient of only the query tiles inside the horizon. D = 64 and 256 run the
    // two tensor-core backward kernels (f16/bf16) and the SIMT one (f32).
    let mut seed = 7700;
    for dtype in DTYPES {
        for d in [64, 256] {
            let dims = Dims { bh: 1, t: 700, d };
            let x = Inputs::new(dims, dtype, &gpu, seed);
            let (grad, g64) = randn(&[1, 1, 700, d], dtype, &gpu, seed + 3).unwrap();
            seed += 4;
            for eta in [0.5f32, 0.9] {
                let grads = MomentumAttention::new(eta).backward(&x.q, &x.k, &x.v, &grad).unwrap();
                let (dq, dk, dv) =
                    reference::backward(&x.q64, &x.k64, &x.v64, &g64, dims, eta as f64, x.scale());
                for (name, got, want) in [("dq", &grads.dq, dq), ("dk", &grads.dk, dk), ("dv", &grads.dv, dv)]
                {
                    let what = format!("cuda long {name} {dtype} d={d} eta={eta}");
                    assert_close(&what, &to_f64(got).unwrap(), &want, grad_tolerance(dtype));
                }
            }
        }
    }
}

#[test]
fn cuda_backward_with_state_matches_recomputing_backward() {
    let Some(gpu) = cuda_or_skip("cuda_backward_with_state_matches_recomputing_backward") else { return };
    for dtype in DTYPES {
        for d in HEAD_DIMS {
            let x = Inputs::new(Dims { bh: 2, t: 150, d }, dtype, &gpu, 7500);
            let (grad, g64) = randn(&[1, 2, 150, d], dtype, &gpu, 7503).unwrap();
            let attn = MomentumAttention::new(0.9);
            let state = attn.forward_with_state(&x.q, &x.k, &x.v).unwrap();
            let out = to_f64(state.output()).unwrap();
            assert_close(
                &format!("state output {dtype} d={d}"),
                &out,
                &x.reference_forward(0.9),
                tolerance(dtype),
            );
            let grads = attn.backward_with_state(&x.q, &x.k, &x.v, &state, &grad).unwrap();
            let (dq, dk, dv) = reference::backward(&x.q64, &x.k64, &x.v64, &g64, x.dims, 0.9, x.scale());
            for (name, got, want) in [("dq", &grads.dq, dq), ("dk", &grads.dk, dk), ("dv", &grads.dv, dv)] {
                let what = format!("cuda with state {name} {dtype} d={d}");
                assert_close(&what, &to_f64(got).unwrap(), &want, grad_tolerance(dtype));
            }
        }
    }
}

#[test]
fn cuda_large_logits_stay_finite() {
    let Some(gpu) = cuda_or_skip("cuda_large_logits_stay_finite") else { return };
    let dims = Dims { bh: 2, t: 150, d: 64 };
    let shape = [1, 2, 150, 64];
    let mut rng = metakernels::testing::Rng::new(5);
    let n = 2 * 150 * 64;
    let q: Vec<f64> = rng.normal_vec(n).iter().map(|x| 30.0 * x).collect();
    let k: Vec<f64> = (0..n).map(|i| rng.normal() * (1.0 + ((i / 64) % 150) as f64 / 3.0)).collect();
    let v = rng.normal_vec(n);
    for dtype in DTYPES {
        let (qt, q64) = metakernels::testing::from_f64(&q, &shape, dtype, &gpu).unwrap();
        let (kt, k64) = metakernels::testing::from_f64(&k, &shape, dtype, &gpu).unwrap();
        let (vt, v64) = metakernels::testing::from_f64(&v, &shape, dtype, &gpu).unwrap();
        let attn = MomentumAttention::new(0.9);
        let out = to_f64(&attn.forward(&qt, &kt, &vt).unwrap()).unwrap();
        let want = reference::forward(&q64, &k64, &v64, dims, 0.9, 0.125);
        assert_close(&format!("cuda large logits {dtype}"), &out, &want, tolerance(dtype).max(1e-4));
        let grads = attn.backward(&qt, &kt, &vt, &vt).unwrap();
        for g in [&grads.dq, &grads.dk, &grads.dv] {
            assert!(to_f64(g).unwrap().iter().all(|x| x.is_finite()), "non-finite cuda gradient {dtype}");
        }
    }
}

/// Logits past f32's range (−∞) weigh nothing on the GPU either (its `safe_max`).
#[test]
fn cuda_logits_overflowing_to_minus_infinity_weigh_nothing() {
    let Some(gpu) = cuda_or_skip("cuda_logits_overflowing_to_minus_infinity_weigh_nothing") else { return };
    super::logits_overflowing_to_minus_infinity_on(&gpu);
}

#[test]
fn cuda_unfused_baseline_matches_fused() {
    let Some(gpu) = cuda_or_skip("cuda_unfused_baseline_matches_fused") else { return };
    for dtype in DTYPES {
        let x = Inputs::new(Dims { bh: 2, t: 300, d: 64 }, dtype, &gpu, 8000);
        for eta in ETAS {
            let attn = MomentumAttention::new(eta);
            let fused = to_f64(&attn.forward(&x.q, &x.k, &x.v).unwrap()).unwrap();
            let unfused = to_f64(&attn.forward_unfused(&x.q, &x.k, &x.v).unwrap()).unwrap();
            // The unfused pass rounds the attention to the dtype before adding the momentum.
            assert_close(&format!("unfused {dtype} eta={eta}"), &unfused, &fused, 2.0 * tolerance(dtype));
            let g = randn(x.q.shape(), dtype, &gpu, 8001).unwrap().0;
            let fused = attn.backward(&x.q, &x.k, &x.v, &g).unwrap();
            let unfused = attn.backward_unfused(&x.q, &x.k, &x.v, &g).unwrap();
            for (name, a, b) in [
                ("dq", &unfused.dq, &fused.dq),
                ("dk", &unfused.dk, &fused.dk),
                ("dv", &unfused.dv, &fused.dv),
            ] {
                let (a, b) = (to_f64(a).unwrap(), to_f64(b).unwrap());
                assert_close(
                    &format!("unfused {name} {dtype} eta={eta}"),
                    &a,
                    &b,
                    2.0 * grad_tolerance(dtype),
                );
            }
        }
    }
}

#[test]
fn cuda_rejects_mixed_devices() {
    let Some(gpu) = cuda_or_skip("cuda_rejects_mixed_devices") else { return };
    let (q, _) = randn(&[1, 1, 8, 64], DType::F32, &gpu, 1).unwrap();
    let (k, _) = randn(&[1, 1, 8, 64], DType::F32, &Device::cpu(), 2).unwrap();
    let attn = MomentumAttention::new(0.5);
    assert!(matches!(attn.forward(&q, &k, &q), Err(Error::DeviceMismatch { .. })));
    assert!(matches!(attn.backward(&q, &q, &q, &k), Err(Error::DeviceMismatch { .. })));
    assert!(attn.forward_reference_kernel(&k, &k, &k).is_err(), "the reference kernel needs CUDA tensors");
}
