//! GPU tests: the chunked kernels (fused and split) and the reference kernels against the
//! float64 recurrence and against the CPU (itself checked by finite differences). Each test
//! skips without a GPU (and fails under METAKERNELS_REQUIRE_CUDA=1).

use metakernels::linear_attention::{
    FeatureMap, KernelPath, LinearAttention, LinearAttentionGrads, RecurrentState,
};
use metakernels::testing::{assert_close, cuda_or_skip, tolerance, Rng};
use metakernels::{DType, Device, Error, Tensor};

use super::reference::{self, dense_segments, varlen_segments};
use super::{f64s, tensor, Case, DTYPES, FEATURE_MAPS};

/// The reference kernel first; `Simt` is the SIMT core for f16/bf16 too (the benchmarks'
/// baseline), which must be as right as the tensor-core `Fused`.
const PATHS: [KernelPath; 4] =
    [KernelPath::Reference, KernelPath::Fused, KernelPath::Split, KernelPath::Simt];

/// Final states are f32; on the tensor-core path (f16/bf16) they are sums of products of
/// 16-bit-rounded φ(k) and v.
fn state_tolerance(dtype: DType) -> f64 {
    if dtype == DType::F32 {
        1e-5
    } else {
        1e-2
    }
}

fn layer(fm: FeatureMap, causal: bool, normalize: bool) -> LinearAttention {
    LinearAttention { causal, feature_map: fm, normalize, scale: 0.7, eps: 1e-3 }
}

/// Every option on every path against float64, and the fast paths against the reference kernel.
#[test]
fn cuda_forward_every_option_and_path() {
    let Some(gpu) = cuda_or_skip("cuda_forward_every_option_and_path") else { return };
    let (b, h, t, dk, dv) = (2, 2, 70, 6, 9);
    let mut seed = 1000;
    for fm in FEATURE_MAPS {
        for causal in [true, false] {
            for normalize in [false, true] {
                for dtype in DTYPES {
                    for with_state in [false, true] {
                        seed += 1;
                        let cfg = layer(fm, causal, normalize);
                        let c = Case::new([b, h, t], dk, dv, b * h, with_state, normalize, dtype, &gpu, seed);
                        let r = reference::forward(&cfg, None, &c.x, &dense_segments(b * h, t), dk, dv);
                        let mut outs = Vec::new();
                        for path in PATHS {
                            let out =
                                cfg.forward_on_path(&c.q, &c.k, &c.v, c.initial(), path).expect("forward");
                            let what = format!("{cfg:?} {dtype} state={with_state} {path:?}");
                            assert_close(
                                &format!("{what} output"),
                                &f64s(&out.output),
                                &r.o,
                                tolerance(dtype),
                            );
                            // The tensor-core path stages φ(k) in the input's 16-bit type (as fla
                            // does), so its state is as exact as that rounding, not as f32.
                            let state_tol = state_tolerance(dtype);
                            assert_close(&format!("{what} state"), &f64s(&out.final_state), &r.s, state_tol);
                            let z = f64s(&out.final_normalizer);
                            assert_close(&format!("{what} normalizer"), &z, &r.z, state_tol);
                            outs.push(f64s(&out.output));
                        }
                        for (path, o) in PATHS.iter().zip(&outs).skip(1) {
                            assert_close(
                                &format!("{cfg:?} {dtype} {path:?} vs reference kernel"),
                                o,
                                &outs[0],
                                tolerance(dtype),
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Wide heads (Dk up to 256, the 32-row chunk of both cores, the tensor-core one with a padded
/// key width at Dk = 130; Dv over several 64-column tiles with a partial one), the tensor-core
/// core's 64-row chunk with several 16-wide k steps and a padded key width (Dk = 100)
/// and a partial last v tile (Dv = 130), long sequences through the split form, and one step.
#[test]
fn cuda_forward_wide_heads_and_long_sequences() {
    let Some(gpu) = cuda_or_skip("cuda_forward_wide_heads_and_long_sequences") else { return };
    for (b, h, t, dk, dv, normalize) in [
        (1, 2, 100, 256, 200, true),
        (1, 2, 100, 256, 200, false),
        (1, 1, 77, 130, 256, true),
        (1, 2, 200, 100, 130, true),
        (1, 2, 1000, 64, 64, true),
        (2, 3, 1, 5, 7, true),
    ] {
        for causal in [true, false] {
            for dtype in DTYPES {
                let cfg = layer(FeatureMap::EluPlusOne, causal, normalize);
                let c = Case::new([b, h, t], dk, dv, b * h, true, normalize, dtype, &gpu, (t + dk) as u64);
                let r = reference::forward(&cfg, None, &c.x, &dense_segments(b * h, t), dk, dv);
                for path in [KernelPath::Fused, KernelPath::Split, KernelPath::Auto] {
                    let out = cfg.forward_on_path(&c.q, &c.k, &c.v, c.initial(), path).expect("forward");
                    let what = format!(
                        "B{b} H{h} T{t} Dk{dk} Dv{dv} causal={causal} normalize={normalize} {dtype} {path:?}"
                    );
                    let tol = if dtype == DType::F32 { 1e-4 } else { 1e-2 };
                    assert_close(&format!("{what} output"), &f64s(&out.output), &r.o, tol);
                    let state_tol = state_tolerance(dtype).max(1e-4);
                    assert_close(&format!("{what} state"), &f64s(&out.final_state), &r.s, state_tol);
                }
            }
        }
    }
}

/// f16 holds at most 65504: values with a large mean over a long sequence drive the state past
/// that, and the tensor-core kernel (which rounds S to f16 for its products) must still match
/// the CPU, which keeps S in f32. Normalised, so the output itself is small.
#[test]
fn cuda_f16_state_past_the_f16_range() {
    let Some(gpu) = cuda_or_skip("cuda_f16_state_past_the_f16_range") else { return };
    let (b, h, t, dk, dv) = (1, 2, 1500, 16, 64);
    let mut rng = Rng::new(77);
    let qk: Vec<f64> = (0..b * h * t * dk).map(|_| rng.normal()).collect();
    let v: Vec<f64> = (0..b * h * t * dv).map(|_| 40.0 + rng.normal()).collect();
    let (q, _) = tensor(&qk, &[b, h, t, dk], DType::F16, &gpu);
    let (k, _) = tensor(&qk.iter().rev().copied().collect::<Vec<_>>(), &[b, h, t, dk], DType::F16, &gpu);
    let (v, _) = tensor(&v, &[b, h, t, dv], DType::F16, &gpu);
    for causal in [true, false] {
        let cfg = layer(FeatureMap::EluPlusOne, causal, true);
        let want = cfg.forward(&on_cpu(&q), &on_cpu(&k), &on_cpu(&v), None).expect("cpu forward");
        let largest = f64s(&want.final_state).iter().fold(0f64, |m, x| m.max(x.abs()));
        assert!(largest > 65504.0, "the case must leave f16's range (largest |S| {largest})");
        for path in [KernelPath::Fused, KernelPath::Split] {
            let out = cfg.forward_on_path(&q, &k, &v, None, path).expect("forward");
            let what = format!("f16 causal={causal} {path:?} (largest |S| {largest:.0})");
            assert_close(&what, &f64s(&out.output), &f64s(&want.output), 1e-2);
        }
    }
}

fn same_grads(what: &str, a: &LinearAttentionGrads, b: &LinearAttentionGrads, tol: f64) {
    assert_close(&format!("{what} dq"), &f64s(&a.dq), &f64s(&b.dq), tol);
    assert_close(&format!("{what} dk"), &f64s(&a.dk), &f64s(&b.dk), tol);
    assert_close(&format!("{what} dv"), &f64s(&a.dv), &f64s(&b.dv), tol);
    assert_close(&format!("{what} dS0"), &f64s(&a.d_initial_state), &f64s(&b.d_initial_state), tol);
    assert_close(&format!("{what} dz0"), &f64s(&a.d_initial_normalizer), &f64s(&b.d_initial_normalizer), tol);
}

/// The tensors of a case moved to the CPU.
fn on_cpu(t: &Tensor) -> Tensor {
    t.to_device(&Device::cpu()).expect("to cpu")
}

/// Backward on both CUDA paths against the CPU backward (checked against finite differences),
/// for every feature map × causal × normalize × dtype (f16/bf16: the tensor-core backward, its
/// normalised dφ(q) pass on the SIMT core), with initial and final-state grads; then wide heads
/// (Dk = 200: the 32-row chunk in every pass; Dv = 256: five tiles of [dv, 1], a key width of
/// 257 in two of the passes), for every dtype, normalised and not.
#[test]
fn cuda_backward_matches_cpu() {
    let Some(gpu) = cuda_or_skip("cuda_backward_matches_cpu") else { return };
    let mut seed = 2000;
    let mut cases = Vec::new();
    for fm in FEATURE_MAPS {
        for causal in [true, false] {
            for normalize in [false, true] {
                for dtype in DTYPES {
                    cases.push(((1, 3, 150, 20, 70), layer(fm, causal, normalize), dtype));
                }
            }
        }
    }
    // Wide: f32 on the SIMT core; f16 and bf16 on tensor cores, normalised (the mixed launch:
    // dφ(q) on the SIMT core at key width 257) and not (every pass on tensor cores).
    for causal in [true, false] {
        for (dtype, normalize) in [
            (DType::F32, true),
            (DType::BF16, true),
            (DType::BF16, false),
            (DType::F16, true),
            (DType::F16, false),
        ] {
            cases.push(((1, 1, 70, 200, 256), layer(FeatureMap::EluPlusOne, causal, normalize), dtype));
        }
    }
    for ((b, h, t, dk, dv), cfg, dtype) in cases {
        seed += 1;
        let c = Case::new([b, h, t], dk, dv, b * h, true, cfg.normalize, dtype, &gpu, seed);
        let mut rng = Rng::new(seed);
        let (go, _) = tensor(&rng.normal_vec(b * h * t * dv), &[b, h, t, dv], dtype, &gpu);
        let (gs, _) = tensor(&rng.normal_vec(b * h * dk * dv), &[b, h, dk, dv], DType::F32, &gpu);
        let (gz, _) = tensor(&rng.normal_vec(b * h * dk), &[b, h, dk], DType::F32, &gpu);
        let gf = RecurrentState { state: &gs, normalizer: Some(&gz) };
        let (s0, z0) = (c.s0.as_ref().map(on_cpu), c.z0.as_ref().map(on_cpu));
        let init_cpu = s0.as_ref().map(|s| RecurrentState { state: s, normalizer: z0.as_ref() });
        let (gs_c, gz_c) = (on_cpu(&gs), on_cpu(&gz));
        let gf_cpu = RecurrentState { state: &gs_c, normalizer: Some(&gz_c) };
        let cpu = cfg
            .backward(&on_cpu(&c.q), &on_cpu(&c.k), &on_cpu(&c.v), init_cpu, &on_cpu(&go), Some(gf_cpu))
            .expect("cpu backward");
        let tol = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
        for path in [KernelPath::Reference, KernelPath::Fused, KernelPath::Simt] {
            let g = cfg
                .backward_on_path(&c.q, &c.k, &c.v, c.initial(), &go, Some(gf), path)
                .expect("cuda backward");
            same_grads(&format!("{cfg:?} Dk{dk} Dv{dv} {dtype} {path:?}"), &g, &cpu, tol);
        }
    }
}

/// Momentum forward and backward on both paths against the CPU and float64.
#[test]
fn cuda_momentum_matches_cpu() {
    let Some(gpu) = cuda_or_skip("cuda_momentum_matches_cpu") else { return };
    let (b, h, t, dk, dv) = (2, 2, 130, 16, 80);
    for (i, eta) in [0.0f32, 0.6, 0.95].into_iter().enumerate() {
        for dtype in [DType::F32, DType::BF16] {
            let cfg = layer(FeatureMap::EluPlusOne, true, true);
            let c = Case::new([b, h, t], dk, dv, b * h, false, true, dtype, &gpu, 3000 + i as u64);
            let r = reference::forward(&cfg, Some(eta as f64), &c.x, &dense_segments(b * h, t), dk, dv);
            let (go, _) = tensor(&Rng::new(i as u64).normal_vec(b * h * t * dv), &[b, h, t, dv], dtype, &gpu);
            let cpu = cfg
                .backward_with_momentum(&on_cpu(&c.q), &on_cpu(&c.k), &on_cpu(&c.v), &on_cpu(&go), eta)
                .expect("cpu momentum backward");
            let tol = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
            for path in [KernelPath::Reference, KernelPath::Fused, KernelPath::Auto] {
                let what = format!("momentum η={eta} {dtype} {path:?}");
                let o = cfg.forward_with_momentum_on_path(&c.q, &c.k, &c.v, eta, path).expect("forward");
                assert_close(&what, &f64s(&o), &r.o, tolerance(dtype).max(1e-5));
                let g =
                    cfg.backward_with_momentum_on_path(&c.q, &c.k, &c.v, &go, eta, path).expect("backward");
                same_grads(&what, &g, &cpu, tol);
            }
        }
    }
}

/// Packed sequences on the GPU, forward and backward, against float64 and the CPU.
#[test]
fn cuda_varlen_matches_reference() {
    let Some(gpu) = cuda_or_skip("cuda_varlen_matches_reference") else { return };
    let cu = [0usize, 1, 66, 200, 203];
    let (h, total, dk, dv) = (3, 203, 12, 10);
    let n = cu.len() - 1;
    for causal in [true, false] {
        let cfg = layer(FeatureMap::Relu, causal, true);
        let c = Case::new([1, h, total], dk, dv, n * h, true, true, DType::F32, &gpu, 77);
        let out = cfg.forward_varlen(&c.q, &c.k, &c.v, &cu, c.initial()).expect("forward");
        let r = reference::forward(&cfg, None, &c.x, &varlen_segments(h, &cu), dk, dv);
        assert_close("cuda varlen output", &f64s(&out.output), &r.o, 1e-5);
        assert_close("cuda varlen state", &f64s(&out.final_state), &r.s, 1e-5);
        let (go, _) = tensor(&Rng::new(5).normal_vec(h * total * dv), &[1, h, total, dv], DType::F32, &gpu);
        let g = cfg.backward_varlen(&c.q, &c.k, &c.v, &cu, c.initial(), &go, None).expect("backward");
        let (s0, z0) = (c.s0.as_ref().map(on_cpu), c.z0.as_ref().map(on_cpu));
        let init_cpu = s0.as_ref().map(|s| RecurrentState { state: s, normalizer: z0.as_ref() });
        let cpu = cfg
            .backward_varlen(&on_cpu(&c.q), &on_cpu(&c.k), &on_cpu(&c.v), &cu, init_cpu, &on_cpu(&go), None)
            .expect("cpu backward");
        same_grads("cuda varlen", &g, &cpu, 1e-4);
    }
}

/// Packed sequences on the GPU equal separate GPU calls, forward and backward.
#[test]
fn cuda_varlen_equals_separate_calls() {
    let Some(gpu) = cuda_or_skip("cuda_varlen_equals_separate_calls") else { return };
    super::varlen_equals_separate_calls_on(&gpu, 1e-5);
}

/// The unfused quadratic baseline of the benchmarks (scores, then output) against float64, so
/// that a benchmark ratio is never taken against a wrong result.
#[test]
fn cuda_quadratic_baseline_matches_reference() {
    let Some(gpu) = cuda_or_skip("cuda_quadratic_baseline_matches_reference") else { return };
    let (b, h, t, dk, dv) = (2, 2, 70, 20, 33);
    for causal in [true, false] {
        for normalize in [false, true] {
            for dtype in DTYPES {
                let cfg = layer(FeatureMap::EluPlusOne, causal, normalize);
                let c = Case::new([b, h, t], dk, dv, b * h, false, normalize, dtype, &gpu, 4000);
                let r = reference::forward(&cfg, None, &c.x, &dense_segments(b * h, t), dk, dv);
                let o = cfg.forward_quadratic(&c.q, &c.k, &c.v).expect("quadratic baseline");
                let what = format!("quadratic {cfg:?} {dtype}");
                assert_close(&what, &f64s(&o), &r.o, tolerance(dtype).max(1e-5));
            }
        }
        // Forward and backward (identity map, unnormalised) against the chunked kernels, whose
        // backward the CPU tests hold to finite differences.
        for dtype in DTYPES {
            let cfg = layer(FeatureMap::Identity, causal, false);
            let c = Case::new([b, h, t], dk, dv, b * h, false, false, dtype, &gpu, 4100);
            let go = Case::new([b, h, t], dk, dv, b * h, false, false, dtype, &gpu, 4101).v;
            let [o, dq, dk_, dv_] =
                cfg.forward_backward_quadratic(&c.q, &c.k, &c.v, &go).expect("quadratic step");
            let want_o = cfg.forward(&c.q, &c.k, &c.v, None).expect("forward").output;
            let want = cfg.backward(&c.q, &c.k, &c.v, None, &go, None).expect("backward");
            let tol = 2.0 * tolerance(dtype).max(1e-5);
            for (name, got, want) in
                [("o", o, want_o), ("dq", dq, want.dq), ("dk", dk_, want.dk), ("dv", dv_, want.dv)]
            {
                assert_close(
                    &format!("quadratic step {name} causal={causal} {dtype}"),
                    &f64s(&got),
                    &f64s(&want),
                    tol,
                );
            }
        }
    }
}

/// A tensor on the CPU beside tensors on the GPU is a `DeviceMismatch`, wherever it is: an
/// input, the initial state, the output gradient, the final-state gradient.
#[test]
fn cuda_mixed_devices_are_errors() {
    let Some(gpu) = cuda_or_skip("cuda_mixed_devices_are_errors") else { return };
    let cfg = layer(FeatureMap::EluPlusOne, true, true);
    let (dk, dv) = (4, 3);
    let c = Case::new([1, 2, 10], dk, dv, 2, true, true, DType::F32, &gpu, 61);
    let host = Case::new([1, 2, 10], dk, dv, 2, true, true, DType::F32, &Device::cpu(), 61);
    let mismatch = |what: &str, e: Option<Error>| {
        assert!(matches!(e, Some(Error::DeviceMismatch { .. })), "{what}: {e:?}");
    };
    mismatch("cpu k", cfg.forward(&c.q, &host.k, &c.v, c.initial()).err());
    mismatch("cpu v", cfg.forward(&c.q, &c.k, &host.v, c.initial()).err());
    mismatch("cpu initial state", cfg.forward(&c.q, &c.k, &c.v, host.initial()).err());
    mismatch("cpu varlen v", cfg.forward_varlen(&c.q, &c.k, &host.v, &[0, 4, 10], None).err());
    let go = c.v.clone();
    mismatch("cpu grad_output", cfg.backward(&c.q, &c.k, &c.v, None, &host.v, None).err());
    let (s, z) = (host.s0.as_ref().expect("state"), host.z0.as_ref().expect("normaliser"));
    let final_grad = Some(RecurrentState { state: s, normalizer: Some(z) });
    mismatch("cpu final-state gradient", cfg.backward(&c.q, &c.k, &c.v, None, &go, final_grad).err());
}
