//! Benchmarks of the linear_attention family.
//!
//! Criterion groups: CPU forward and forward+backward on a small shape (the whole file stays
//! around a minute on two cores), and, when a GPU is usable, the shapes in bf16.
//!
//! Report lines (`[metakernels] ...`) for the shapes (B,H,T,D) = (1,8,4096,64),
//! (4,16,2048,128), (8,8,1024,64): time, GFLOP/s counted as 2·T·64·(Dk+Dv) + 4·T·Dk·Dv per head
//! and pass (whatever chunk the kernel uses), GB/s of the minimum traffic (q, k, v read once, o
//! written once), the fraction of the same-run ceiling (CPU: f32 GEMM rate; GPU: device copy
//! bandwidth), and the speed-up over the unfused quadratic baseline (masked QKᵀ then ·V, on the
//! same device: matrixmultiply on the CPU, `forward_quadratic` on the GPU), over the other GPU
//! paths (fused, split, and the f32 SIMT core with tensor cores off, forward and
//! forward+backward) and, at a small shape, over the reference kernel. On the GPU also one
//! wide-head shape, (2,8,2048,256), the 32-row chunks of the tensor-core kernels. At one shape
//! per device also the linear transformer's configuration (causal, elu + 1, normalised) against
//! the plain one in the same run.

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use metakernels::bench_support::{best_ms, cpu_ceilings, device_copy_gbps, Measurement};
use metakernels::linear_attention::{FeatureMap, KernelPath, LinearAttention};
use metakernels::testing::randn;
use metakernels::{DType, Device, Tensor};
use rayon::prelude::*;

const SHAPES: [(usize, usize, usize, usize); 3] = [(1, 8, 4096, 64), (4, 16, 2048, 128), (8, 8, 1024, 64)];
/// Dk = Dv = 256: the tensor-core kernels' 32-row chunk (GPU report only).
const WIDE_SHAPE: (usize, usize, usize, usize) = (2, 8, 2048, 256);

/// The FLOP count of one pass over all heads.
fn flops(b: usize, h: usize, t: usize, dk: usize, dv: usize) -> f64 {
    (b * h) as f64 * (2.0 * (t * 64 * (dk + dv)) as f64 + 4.0 * (t * dk * dv) as f64)
}

/// q, k, v read once and o written once.
fn min_bytes(b: usize, h: usize, t: usize, dk: usize, dv: usize, dtype: DType) -> f64 {
    ((b * h * t) * (2 * dk + 2 * dv) * dtype.size_in_bytes()) as f64
}

fn inputs(shape: (usize, usize, usize, usize), dtype: DType, dev: &Device) -> (Tensor, Tensor, Tensor) {
    let (b, h, t, d) = shape;
    let x = |seed| randn(&[b, h, t, d], dtype, dev, seed).expect("random input").0;
    (x(1), x(2), x(3))
}

/// The unfused baseline on the CPU: per head, A = QKᵀ (T×T, masked when causal), then O = A·V,
/// both through matrixmultiply, rayon over heads.
fn quadratic_baseline(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    heads: usize,
    t: usize,
    d: usize,
    causal: bool,
) -> Vec<f32> {
    let mut out = vec![0f32; heads * t * d];
    out.par_chunks_mut(t * d).enumerate().for_each(|(hd, o)| {
        let (q, k, v) = (&q[hd * t * d..], &k[hd * t * d..], &v[hd * t * d..]);
        let mut a = vec![0f32; t * t];
        // SAFETY: all pointers address buffers of the sizes the strides describe.
        unsafe {
            matrixmultiply::sgemm(
                t,
                d,
                t,
                1.0,
                q.as_ptr(),
                d as isize,
                1,
                k.as_ptr(),
                1,
                d as isize,
                0.0,
                a.as_mut_ptr(),
                t as isize,
                1,
            );
        }
        if causal {
            for i in 0..t {
                a[i * t + i + 1..(i + 1) * t].fill(0.0);
            }
        }
        // SAFETY: as above.
        unsafe {
            matrixmultiply::sgemm(
                t,
                t,
                d,
                1.0,
                a.as_ptr(),
                t as isize,
                1,
                v.as_ptr(),
                d as isize,
                1,
                0.0,
                o.as_mut_ptr(),
                d as isize,
                1,
            );
        }
    });
    out
}

fn cpu_report() {
    let dev = Device::cpu();
    let ceilings = cpu_ceilings();
    let mut gemm = ("CPU f32 GEMM GFLOP/s".to_string(), ceilings.f32_gemm_gflops);
    println!(
        "[metakernels] CPU: {} rayon threads, f32 GEMM {:.1} GFLOP/s, copy {:.1} GB/s",
        rayon::current_num_threads(),
        ceilings.f32_gemm_gflops,
        ceilings.copy_gbps
    );
    for shape in SHAPES {
        let (b, h, t, d) = shape;
        let (q, k, v) = inputs(shape, DType::F32, &dev);
        let (qh, kh, vh) =
            (q.to_vec::<f32>().unwrap(), k.to_vec::<f32>().unwrap(), v.to_vec::<f32>().unwrap());
        let go = v.clone();
        let name = format!("B{b} H{h} T{t} D{d} f32");
        for causal in [true, false] {
            let attn = LinearAttention { causal, ..Default::default() };
            let kind = if causal { "causal" } else { "noncausal" };
            // On a shared machine the load changes from second to second: interleave rounds of
            // the GEMM ceiling and of the kernel, keeping the best of each.
            let mut fwd = f64::INFINITY;
            for _ in 0..4 {
                gemm.1 = gemm.1.max(metakernels::bench_support::cpu_sgemm_gflops());
                fwd = fwd.min(best_ms(&dev, 5, || attn.forward(&q, &k, &v, None).map(|_| ())).unwrap());
            }
            // The quadratic baseline is costly on two cores: one timed call after a warm-up.
            let quad = best_ms(&dev, 1, || {
                std::hint::black_box(quadratic_baseline(&qh, &kh, &vh, b * h, t, d, causal));
                Ok(())
            })
            .unwrap();
            Measurement {
                kernel: format!("linear_attention/forward_{kind}"),
                shape: name.clone(),
                device: "cpu".into(),
                ms: fwd,
                flops: flops(b, h, t, d, d),
                bytes: min_bytes(b, h, t, d, d, DType::F32),
                ceiling: Some(gemm.clone()),
                baselines: vec![("quadratic masked QKᵀ·V".into(), quad)],
            }
            .report();
            let both = best_ms(&dev, 2, || {
                attn.forward(&q, &k, &v, None)?;
                attn.backward(&q, &k, &v, None, &go, None).map(|_| ())
            })
            .unwrap();
            Measurement {
                kernel: format!("linear_attention/forward+backward_{kind}"),
                shape: name.clone(),
                device: "cpu".into(),
                ms: both,
                // forward + backward: the forward, its recompute, and the three backward passes.
                flops: 5.0 * flops(b, h, t, d, d),
                bytes: 2.0 * min_bytes(b, h, t, d, d, DType::F32),
                ceiling: Some(gemm.clone()),
                baselines: vec![],
            }
            .report();
        }
    }
    feature_map_report(&dev, SHAPES[0], DType::F32, gemm);
}

/// The configuration of Katharopoulos et al.'s linear transformer (causal, elu + 1, normalised)
/// against the plain one (identity map, no normaliser) in the same run: what the feature map and
/// the denominators cost, forward and forward+backward.
fn feature_map_report(
    dev: &Device,
    shape: (usize, usize, usize, usize),
    dtype: DType,
    ceiling: (String, f64),
) {
    let (b, h, t, d) = shape;
    let (q, k, v) = inputs(shape, dtype, dev);
    let go = v.clone();
    let plain = LinearAttention::default();
    let elu = LinearAttention { feature_map: FeatureMap::EluPlusOne, normalize: true, ..plain };
    let reps = if dev.is_cpu() { 3 } else { 10 };
    let forward = |attn: &LinearAttention| best_ms(dev, reps, || attn.forward(&q, &k, &v, None).map(|_| ()));
    let both = |attn: &LinearAttention| {
        best_ms(dev, reps, || {
            attn.forward(&q, &k, &v, None)?;
            attn.backward(&q, &k, &v, None, &go, None).map(|_| ())
        })
    };
    let device = if dev.is_cpu() { "cpu".to_string() } else { format!("{dev} ({})", dev.name()) };
    // (pass, time, plain time, passes counted, minimum traffic counted)
    let runs = [
        ("forward", forward(&elu), forward(&plain), 1.0, 1.0),
        ("forward+backward", both(&elu), both(&plain), 5.0, 2.0),
    ];
    for (pass, ms, plain_ms, passes, traffic) in runs {
        Measurement {
            kernel: format!("linear_attention/{pass}_causal_elu+1_normalised"),
            shape: format!("B{b} H{h} T{t} D{d} {dtype}"),
            device: device.clone(),
            ms: ms.unwrap(),
            flops: passes * flops(b, h, t, d, d),
            bytes: traffic * min_bytes(b, h, t, d, d, dtype),
            ceiling: Some(ceiling.clone()),
            baselines: vec![("identity map, unnormalised".into(), plain_ms.unwrap())],
        }
        .report();
    }
}

fn cuda_report(gpu: &Device) {
    let copy = device_copy_gbps(gpu).unwrap_or(f64::NAN);
    println!("[metakernels] {}: device copy {copy:.1} GB/s", gpu.name());
    for shape in SHAPES.into_iter().chain([WIDE_SHAPE]) {
        let (b, h, t, d) = shape;
        let dtype = DType::BF16;
        let (q, k, v) = inputs(shape, dtype, gpu);
        let name = format!("B{b} H{h} T{t} D{d} bf16");
        for causal in [true, false] {
            let attn = LinearAttention { causal, ..Default::default() };
            let kind = if causal { "causal" } else { "noncausal" };
            let mut times = Vec::new();
            for path in [KernelPath::Auto, KernelPath::Fused, KernelPath::Split, KernelPath::Simt] {
                let ms =
                    best_ms(gpu, 10, || attn.forward_on_path(&q, &k, &v, None, path).map(|_| ())).unwrap();
                times.push((format!("{path:?}"), ms));
            }
            let quadratic = best_ms(gpu, 3, || attn.forward_quadratic(&q, &k, &v).map(|_| ()));
            match quadratic {
                Ok(ms) => times.push(("quadratic masked QKᵀ·V".into(), ms)),
                Err(e) => println!("[metakernels] quadratic baseline skipped at {name}: {e}"),
            }
            let ms = times[0].1;
            Measurement {
                kernel: format!("linear_attention/forward_{kind}"),
                shape: name.clone(),
                device: format!("{gpu} ({})", gpu.name()),
                ms,
                flops: flops(b, h, t, d, d),
                bytes: min_bytes(b, h, t, d, d, dtype),
                ceiling: Some(("device copy GB/s".into(), copy)),
                baselines: times[1..].to_vec(),
            }
            .report();
            let go = v.clone();
            let forward_backward = |path: KernelPath| {
                best_ms(gpu, 5, || {
                    attn.forward_on_path(&q, &k, &v, None, path)?;
                    attn.backward_on_path(&q, &k, &v, None, &go, None, path).map(|_| ())
                })
            };
            let both = forward_backward(KernelPath::Auto).unwrap();
            let simt = forward_backward(KernelPath::Simt).unwrap();
            Measurement {
                kernel: format!("linear_attention/forward+backward_{kind}"),
                shape: name.clone(),
                device: format!("{gpu} ({})", gpu.name()),
                ms: both,
                flops: 5.0 * flops(b, h, t, d, d),
                bytes: 2.0 * min_bytes(b, h, t, d, d, dtype),
                ceiling: Some(("device copy GB/s".into(), copy)),
                baselines: vec![("SIMT core (tensor cores off)".into(), simt)],
            }
            .report();
        }
    }
    feature_map_report(gpu, SHAPES[1], DType::BF16, ("device copy GB/s".into(), copy));
    // The O(T²)-per-element reference kernel only at a shape where it finishes quickly.
    let shape = (1, 8, 512, 64);
    let (q, k, v) = inputs(shape, DType::BF16, gpu);
    let attn = LinearAttention::default();
    let fast =
        best_ms(gpu, 10, || attn.forward_on_path(&q, &k, &v, None, KernelPath::Auto).map(|_| ())).unwrap();
    let slow = best_ms(gpu, 2, || attn.forward_on_path(&q, &k, &v, None, KernelPath::Reference).map(|_| ()))
        .unwrap();
    Measurement {
        kernel: "linear_attention/forward_causal".into(),
        shape: "B1 H8 T512 D64 bf16".into(),
        device: format!("{gpu} ({})", gpu.name()),
        ms: fast,
        flops: flops(1, 8, 512, 64, 64),
        bytes: min_bytes(1, 8, 512, 64, 64, DType::BF16),
        ceiling: None,
        baselines: vec![("reference kernel".into(), slow)],
    }
    .report();
}

fn bench_cpu(c: &mut Criterion) {
    let dev = Device::cpu();
    let shape = (1, 4, 512, 64);
    let (b, h, t, d) = shape;
    let (q, k, v) = inputs(shape, DType::F32, &dev);
    let mut g = c.benchmark_group("linear_attention_cpu");
    g.sample_size(10)
        .measurement_time(std::time::Duration::from_secs(2))
        .warm_up_time(std::time::Duration::from_millis(500));
    g.throughput(Throughput::Elements((b * h * t) as u64));
    for causal in [true, false] {
        let attn = LinearAttention { causal, ..Default::default() };
        let id = format!("B{b}H{h}T{t}D{d}_{}", if causal { "causal" } else { "noncausal" });
        g.bench_function(BenchmarkId::new("forward", &id), |bench| {
            bench.iter(|| attn.forward(&q, &k, &v, None).unwrap())
        });
        g.bench_function(BenchmarkId::new("backward", &id), |bench| {
            bench.iter(|| attn.backward(&q, &k, &v, None, &v, None).unwrap())
        });
    }
    g.finish();
}

fn bench_cuda(c: &mut Criterion) {
    let Some(gpu) = Device::cuda(0).ok().filter(|_| metakernels::kernels_built()) else {
        println!("linear_attention: no CUDA device, skipping the GPU groups");
        return;
    };
    let mut g = c.benchmark_group("linear_attention_cuda");
    g.sample_size(10).measurement_time(std::time::Duration::from_secs(2));
    for shape in SHAPES {
        let (b, h, t, d) = shape;
        let (q, k, v) = inputs(shape, DType::BF16, &gpu);
        g.throughput(Throughput::Bytes(min_bytes(b, h, t, d, d, DType::BF16) as u64));
        let attn = LinearAttention::default();
        g.bench_function(BenchmarkId::new("forward_causal_bf16", format!("B{b}H{h}T{t}D{d}")), |bench| {
            bench.iter(|| {
                attn.forward(&q, &k, &v, None).unwrap();
                gpu.synchronize().unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_cpu, bench_cuda);

fn main() {
    if metakernels::bench_support::cpu_reports_enabled() {
        cpu_report();
    }
    match Device::cuda(0) {
        Ok(gpu) if metakernels::kernels_built() => cuda_report(&gpu),
        _ => println!("[metakernels] no usable CUDA device: GPU report skipped"),
    }
    benches();
    criterion::Criterion::default().configure_from_args().final_summary();
}
