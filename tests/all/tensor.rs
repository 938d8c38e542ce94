//! Tensor, dtype casts and device handling: round trips, every cast pair against a float64
//! reference, and every kind of bad input returning its error.

use metakernels::testing::{self, cuda_or_skip, Rng};
use metakernels::{bf16, f16, DType, Device, Error, Tensor};

const FLOATS: [DType; 4] = [DType::F32, DType::F64, DType::F16, DType::BF16];

/// Rounds `x` to `dtype` and back, in f64: the reference for a cast.
fn round_to(x: f64, dtype: DType) -> f64 {
    match dtype {
        DType::F32 => x as f32 as f64,
        DType::F64 => x,
        DType::F16 => nearest_f16(x),
        DType::BF16 => nearest_bf16(x),
        DType::U32 => x,
    }
}

/// The 16-bit float nearest to `x` (ties to even), found by comparing the neighbours of a
/// first guess: an independent check of the crate's single-rounding conversions.
macro_rules! nearest {
    ($name:ident, $t:ty) => {
        fn $name(x: f64) -> f64 {
            if !x.is_finite() {
                return x;
            }
            let guess = <$t>::from_f32(x as f32).to_bits();
            let candidates = [guess.wrapping_sub(1), guess, guess.wrapping_add(1)].map(<$t>::from_bits);
            let mut best = candidates[1];
            for c in candidates {
                let (dc, db) = ((c.to_f64() - x).abs(), (best.to_f64() - x).abs());
                if c.is_finite() && (dc < db || (dc == db && c.to_bits() & 1 == 0)) {
                    best = c;
                }
            }
            let max = <$t>::MAX.to_f64();
            let half_ulp = (max - <$t>::from_bits(<$t>::MAX.to_bits() - 1).to_f64()) / 2.0;
            if x.abs() >= max + half_ulp {
                // At or past the midpoint above the largest finite value (odd): rounds to infinity.
                return if x > 0.0 { f64::INFINITY } else { f64::NEG_INFINITY };
            }
            best.to_f64()
        }
    };
}
nearest!(nearest_f16, f16);
nearest!(nearest_bf16, bf16);

/// Values that exercise rounding: normal data at several scales, plus ties and specials. The
/// `just_above` values sit a hair above a 16-bit tie, below f32's resolution: rounding f64 to f32
/// first lands on the tie, which then rounds to even, the wrong way (double rounding); a
/// correctly rounded cast goes up.
fn cast_inputs(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = Rng::new(seed);
    let mut v: Vec<f64> = (0..n).map(|i| rng.normal() * 10f64.powi((i % 7) as i32 - 3)).collect();
    v.extend([0.0, -0.0, 1.0 + 2f64.powi(-11), 65504.0, 1e-8, -3.0e38]);
    v.extend([f64::INFINITY, f64::NEG_INFINITY, f64::NAN, 65520.0, 3.3961776e38]);
    let just_above = |tie: f64| tie + 2f64.powi(-40);
    for x in [just_above(1.0 + 2f64.powi(-8)), just_above(1.0 + 2f64.powi(-11))] {
        v.extend([x, -x]);
    }
    v
}

fn check_all_casts(device: &Device, n: usize) {
    testing::set_poisoning(true);
    let values = cast_inputs(n, 7);
    let shape = [values.len()];
    for src in FLOATS {
        let (x, x64) = testing::from_f64(&values, &shape, src, device).unwrap();
        for dst in FLOATS {
            let y = x.to_dtype(dst).unwrap();
            assert_eq!(y.dtype(), dst);
            assert_eq!(y.shape(), &shape);
            assert!(y.device().same_as(device));
            let got = testing::to_f64(&y).unwrap();
            let want: Vec<f64> = x64.iter().map(|&v| round_to(v, dst)).collect();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let same = g == w || (g.is_nan() && w.is_nan());
                assert!(same, "{device} cast {src}->{dst} element {i}: got {g}, want {w} (from {})", x64[i]);
            }
        }
    }
}

#[test]
fn round_trip_every_dtype_on_cpu() {
    let dev = Device::cpu();
    let t = Tensor::from_slice(&[1.5f32, -2.0, 3.25], &[3], &dev).unwrap();
    assert_eq!(t.to_vec::<f32>().unwrap(), vec![1.5, -2.0, 3.25]);
    let u = Tensor::from_vec(vec![1u32, 2, 3, 4], &[2, 2], &dev).unwrap();
    assert_eq!(u.to_vec::<u32>().unwrap(), vec![1, 2, 3, 4]);
    assert_eq!((u.rank(), u.numel(), u.dtype()), (2, 4, DType::U32));
    let z = Tensor::zeros(&[2, 0, 3], DType::BF16, &dev).unwrap();
    assert_eq!(z.numel(), 0);
    assert!(z.to_vec::<bf16>().unwrap().is_empty());
}

#[test]
fn every_cast_pair_matches_f64_rounding_on_cpu() {
    check_all_casts(&Device::cpu(), 100_003);
}

#[test]
fn every_cast_pair_matches_f64_rounding_on_cuda() {
    let Some(dev) = cuda_or_skip("every_cast_pair_matches_f64_rounding_on_cuda") else { return };
    // Sizes around the vector width exercise the scalar tail.
    for n in [1, 3, 4, 5, 1023, 1 << 20] {
        check_all_casts(&dev, n);
    }
    // Past 65535 blocks × 256 threads × 4 elements each thread loops (grid-stride): one pair.
    let n = 65_535 * 256 * 4 + 5;
    let values = cast_inputs(n, 11);
    let (x, x64) = testing::from_f64(&values, &[values.len()], DType::F32, &dev).unwrap();
    let got = testing::to_f64(&x.to_dtype(DType::BF16).unwrap()).unwrap();
    let mismatches = got.iter().zip(&x64).filter(|&(&g, &v)| g != round_to(v, DType::BF16)).count();
    assert_eq!(mismatches, 0, "f32->bf16 over {n} elements (grid-stride loop)");
}

#[test]
fn cuda_round_trips_and_zero_copy() {
    let Some(dev) = cuda_or_skip("cuda_round_trips_and_zero_copy") else { return };
    let (x, x64) = testing::randn(&[3, 5, 7], DType::F32, &dev, 1).unwrap();
    assert_eq!(testing::to_f64(&x).unwrap(), x64);
    let back = x.to_device(&Device::cpu()).unwrap().to_device(&dev).unwrap();
    assert_eq!(back.to_vec::<f32>().unwrap(), x.to_vec::<f32>().unwrap());
    let zeros = Tensor::zeros(&[17], DType::F16, &dev).unwrap();
    assert!(zeros.to_vec::<f16>().unwrap().iter().all(|v| v.to_f32() == 0.0));
    let empty = Tensor::zeros(&[0, 4], DType::F32, &dev).unwrap();
    assert!(empty.to_vec::<f32>().unwrap().is_empty());
    #[cfg(feature = "cuda")]
    {
        let slice = x.as_cuda_slice::<f32>().unwrap().clone();
        let wrapped = Tensor::from_cuda_slice(slice, &[105], &dev).unwrap();
        assert_eq!(wrapped.to_vec::<f32>().unwrap(), x.to_vec::<f32>().unwrap());
        assert!(x.as_cuda_slice::<f16>().is_err());
    }
    assert!(Device::cuda(0).unwrap().same_as(&dev), "clones share one device");
}

/// Every public type crosses threads (a data-parallel caller holds them in worker threads), and
/// the error type works with `?` into `Box<dyn Error + Send + Sync>` / anyhow.
#[test]
fn public_types_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    use metakernels::{kmeans, linear_attention as la, maml, moe, momentum_attention as ma};
    assert_send_sync::<Error>();
    assert_send_sync::<Box<dyn std::error::Error + Send + Sync>>();
    let _: fn(Error) -> Box<dyn std::error::Error + Send + Sync> = |e| e.into();
    assert_send_sync::<la::LinearAttention>();
    assert_send_sync::<la::LinearAttentionOutput>();
    assert_send_sync::<la::LinearAttentionGrads>();
    assert_send_sync::<ma::MomentumAttention>();
    assert_send_sync::<ma::MomentumAttentionState>();
    assert_send_sync::<ma::MomentumAttentionGrads>();
    assert_send_sync::<maml::Mlp>();
    assert_send_sync::<maml::Maml>();
    assert_send_sync::<maml::TaskBatch>();
    assert_send_sync::<maml::MetaGradient>();
    assert_send_sync::<kmeans::KMeans>();
    assert_send_sync::<kmeans::KMeansFit>();
    assert_send_sync::<moe::Routing>();
    assert_send_sync::<moe::MixerGate>();
    assert_send_sync::<moe::GateUpdate>();
}

#[test]
fn devices_are_send_sync_and_usable_from_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Device>();
    assert_send_sync::<Tensor>();
    let dev = Device::best();
    std::thread::scope(|s| {
        for i in 0..4 {
            let dev = dev.clone();
            s.spawn(move || {
                let (x, x64) = testing::randn(&[1000], DType::F32, &dev, i).unwrap();
                let y = x.to_dtype(DType::F64).unwrap();
                assert_eq!(testing::to_f64(&y).unwrap(), x64);
            });
        }
    });
}

#[test]
fn best_device_never_panics_and_cpu_is_cpu() {
    let best = Device::best();
    assert!(best.is_cpu() || best.is_cuda());
    assert!(Device::cpu().is_cpu());
    assert_eq!(Device::cpu().to_string(), "cpu");
    assert!(Device::cpu().same_as(&Device::default()));
}

// ----- bad input: each returns its error, never panics ---------------------------------------

#[test]
fn wrong_slice_length_is_an_error() {
    let err = Tensor::from_slice(&[1.0f32; 5], &[2, 3], &Device::cpu()).unwrap_err();
    assert!(matches!(err, Error::LengthMismatch { expected: 6, got: 5, .. }), "{err}");
    assert!(err.to_string().contains("[2, 3]"), "{err}");
}

#[test]
fn overflowing_shape_is_an_error() {
    let err = Tensor::from_slice(&[1.0f32], &[usize::MAX, 2], &Device::cpu()).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
}

#[test]
fn wrong_element_type_in_to_vec_is_an_error() {
    let t = Tensor::from_slice(&[1.0f32, 2.0], &[2], &Device::cpu()).unwrap();
    let err = t.to_vec::<f16>().unwrap_err();
    assert!(matches!(err, Error::DTypeMismatch { expected: DType::F16, got: DType::F32, .. }), "{err}");
}

#[test]
fn u32_casts_are_unsupported() {
    let t = Tensor::from_slice(&[1u32, 2], &[2], &Device::cpu()).unwrap();
    assert!(matches!(t.to_dtype(DType::F32), Err(Error::UnsupportedDType { .. })));
    let f = Tensor::from_slice(&[1.0f32], &[1], &Device::cpu()).unwrap();
    assert!(matches!(f.to_dtype(DType::U32), Err(Error::UnsupportedDType { .. })));
    assert_eq!(t.to_dtype(DType::U32).unwrap().to_vec::<u32>().unwrap(), vec![1, 2]);
}

#[test]
fn bad_reshape_is_an_error() {
    let t = Tensor::zeros(&[2, 3], DType::F32, &Device::cpu()).unwrap();
    assert!(matches!(t.reshape(&[4, 2]), Err(Error::ShapeMismatch { .. })));
    assert_eq!(t.reshape(&[3, 2]).unwrap().shape(), &[3, 2]);
}

#[test]
fn missing_cuda_device_is_an_error() {
    let err = Device::cuda(7).unwrap_err();
    assert!(matches!(err, Error::CudaUnavailable { .. }), "{err}");
    assert!(!err.to_string().is_empty());
}

#[test]
fn mixing_cuda_and_cpu_tensors_is_an_error() {
    let Some(dev) = cuda_or_skip("mixing_cuda_and_cpu_tensors_is_an_error") else { return };
    let gpu = Tensor::zeros(&[4], DType::F32, &dev).unwrap();
    #[cfg(feature = "cuda")]
    {
        let cpu_dev = Device::cpu();
        let cpu = Tensor::zeros(&[4], DType::F32, &cpu_dev).unwrap();
        assert!(matches!(cpu.as_cuda_slice::<f32>(), Err(Error::DeviceMismatch { .. })));
        let slice = gpu.as_cuda_slice::<f32>().unwrap().clone();
        assert!(matches!(Tensor::from_cuda_slice(slice, &[4], &cpu_dev), Err(Error::DeviceMismatch { .. })));
    }
    assert!(gpu.to_device(&Device::cpu()).unwrap().device().is_cpu());
}

#[test]
fn outputs_are_poisoned_while_testing() {
    testing::set_poisoning(true);
    let v = testing::output_vec::<f32>(3).unwrap();
    assert!(v.iter().all(|x| x.is_nan()));
    assert!(testing::output_vec::<u32>(2).unwrap().iter().all(|&x| x == u32::MAX));
}

#[test]
fn outputs_too_large_for_the_host_are_an_error_not_an_abort() {
    // Poisoned outputs (the tests' setting; the flag is process-wide, so it stays on) and zeros
    // (Tensor::zeros takes the calloc path whatever the flag).
    testing::set_poisoning(true);
    let err = testing::output_vec::<f32>(1 << 60).unwrap_err();
    assert!(matches!(err, Error::OutOfMemory { requested_bytes, .. } if requested_bytes == 1 << 62), "{err}");
    assert!(matches!(testing::output_vec::<f64>(usize::MAX), Err(Error::OutOfMemory { .. })));
    let zeros = Tensor::zeros(&[1 << 30, 1 << 30], DType::F32, &Device::cpu());
    assert!(matches!(zeros, Err(Error::OutOfMemory { .. })));
    assert!(matches!(
        Tensor::zeros(&[usize::MAX, 2], DType::F32, &Device::cpu()),
        Err(Error::InvalidArgument { .. })
    ));
    let t = Tensor::zeros(&[0, 3], DType::F32, &Device::cpu()).unwrap();
    assert_eq!(t.reshape(&[usize::MAX, 2, 0]).unwrap().numel(), 0, "0 elements either way");
    assert!(t.reshape(&[usize::MAX, 2]).is_err());
}

#[test]
fn rel_error_rejects_nan_and_length_mismatch() {
    assert_eq!(testing::rel_error(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
    assert!(testing::rel_error(&[f64::NAN, 2.0], &[1.0, 2.0]).is_infinite());
    assert!(testing::rel_error(&[1.0], &[1.0, 2.0]).is_infinite());
}

#[test]
fn kernels_report_is_consistent() {
    let built = testing::built_kernel_modules();
    assert_eq!(metakernels::kernels_built(), !built.is_empty());
    if std::env::var("METAKERNELS_REQUIRE_KERNELS").is_ok_and(|v| v == "1") {
        for module in ["cast", "linear_attention", "momentum_attention", "maml", "kmeans", "moe"] {
            assert!(built.contains(&module), "kernel module {module} missing from {built:?}");
        }
    }
}

#[test]
fn ceilings_are_measurable_on_cuda() {
    let Some(dev) = cuda_or_skip("ceilings_are_measurable_on_cuda") else { return };
    use metakernels::bench_support;
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        let tflops = bench_support::device_matrix_tflops(&dev, dtype).unwrap();
        assert!(tflops.is_finite() && tflops > 1.0, "{dtype} peak {tflops} TFLOP/s");
    }
    let gbps = bench_support::device_copy_gbps(&dev).unwrap();
    assert!(gbps.is_finite() && gbps > 10.0, "copy {gbps} GB/s");
    assert!(bench_support::device_matrix_tflops(&Device::cpu(), DType::BF16).is_err());
}
