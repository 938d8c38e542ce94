//! Benchmarks of the kmeans family: one Lloyd iteration (assign + update).
//!
//! CPU: (N, D, K) = (200000, 64, 256) f32, the shape of the bar against scikit-learn
//! (scripts/compare/kmeans_sklearn.py times scikit-learn's Lloyd iteration on the same shape).
//! CUDA (when a GPU is there): (4194304, 128, 1024) in f32, f16 and bf16.
//!
//! Report lines: assign in GFLOP/s (2·N·K·D) against the measured matrix rate of its path (CPU:
//! f32 GEMM; CUDA: register-only mma.sync loops for f16/bf16, FFMA chains for f32, both
//! measured in this run by `bench_support::device_matrix_tflops`), update in GB/s against the measured
//! copy bandwidth, and the speed-up over the naive baseline.

use std::time::Duration;

use criterion::{criterion_group, Criterion};
use metakernels::bench_support::{best_ms, cpu_ceilings, device_copy_gbps, Measurement};
use metakernels::kmeans::{self, Metric};
use metakernels::{DType, Device, Tensor};

const CPU_SHAPE: (usize, usize, usize) = (200_000, 64, 256);
const GPU_SHAPE: (usize, usize, usize) = (4_194_304, 128, 1024);

use metakernels::testing::uniform_f32_parallel as uniform_f32;

/// x uniform in [-1, 1) and its first K rows as centroids.
fn inputs(n: usize, d: usize, k: usize, dtype: DType, dev: &Device) -> (Tensor, Tensor) {
    let host = uniform_f32(n * d, 42);
    let c = Tensor::from_slice(&host[..k * d], &[k, d], dev).expect("centroids");
    let x = Tensor::from_vec(host, &[n, d], dev).and_then(|x| x.to_dtype(dtype)).expect("inputs");
    (x, c)
}

/// The unfused baseline on the CPU: for every row, every centroid's distance taken directly.
fn naive_assign_cpu(x: &[f32], c: &[f32], d: usize) -> Vec<u32> {
    use rayon::prelude::*;
    x.par_chunks(d)
        .map(|row| {
            let mut best = (f32::INFINITY, 0u32);
            for (j, cr) in c.chunks(d).enumerate() {
                let s: f32 = row.iter().zip(cr).map(|(a, b)| (a - b) * (a - b)).sum();
                if s < best.0 {
                    best = (s, j as u32);
                }
            }
            best.1
        })
        .collect()
}

fn lloyd_iteration(x: &Tensor, c: &Tensor, k: usize) -> metakernels::Result<()> {
    let (labels, _) = kmeans::assign(x, c, Metric::SquaredL2)?;
    let _ = kmeans::update(x, &labels, k)?;
    Ok(())
}

/// Prints the report lines of one device and shape.
fn report(dev: &Device, dtype: DType, (n, d, k): (usize, usize, usize), reps: usize, naive: bool) {
    let (x, c) = inputs(n, d, k, dtype, dev);
    let shape = format!("N{n} D{d} K{k} {}", dtype.as_str());
    let flops = 2.0 * (n * k * d) as f64;
    let x_bytes = (n * d * dtype.size_in_bytes()) as f64;
    let (ceiling, copy) = if dev.is_cpu() {
        let cpu = cpu_ceilings();
        (("f32 GEMM GFLOP/s (measured)".to_string(), cpu.f32_gemm_gflops), cpu.copy_gbps)
    } else {
        let peak =
            metakernels::bench_support::device_matrix_tflops(dev, dtype).map(|t| t * 1e3).unwrap_or(f64::NAN);
        let path = if dtype == DType::F32 { "f32 FFMA" } else { "mma.sync m16n8k16" };
        ((format!("{path} GFLOP/s (measured)"), peak), device_copy_gbps(dev).unwrap_or(f64::NAN))
    };
    let assign_ms =
        best_ms(dev, reps, || kmeans::assign(&x, &c, Metric::SquaredL2).map(|_| ())).expect("assign");
    let (labels, _) = kmeans::assign(&x, &c, Metric::SquaredL2).expect("assign");
    let update_ms = best_ms(dev, reps, || kmeans::update(&x, &labels, k).map(|_| ())).expect("update");
    let lloyd_ms = best_ms(dev, reps, || lloyd_iteration(&x, &c, k)).expect("lloyd");
    // The load-balance case of the chunked update: every row in one cluster.
    let skewed_ms = if dev.is_cpu() {
        None
    } else {
        let zeros = Tensor::zeros(&[n], DType::U32, dev).expect("labels");
        Some(best_ms(dev, reps, || kmeans::update(&x, &zeros, k).map(|_| ())).expect("update"))
    };
    let mut baselines = Vec::new();
    if naive && dev.is_cpu() {
        let (xs, cs) = (x.to_vec::<f32>().expect("x"), c.to_vec::<f32>().expect("c"));
        let ms = best_ms(dev, 1, || {
            std::hint::black_box(naive_assign_cpu(&xs, &cs, d));
            Ok(())
        })
        .expect("naive");
        baselines.push(("direct-distance rayon assign".to_string(), ms));
    } else if naive {
        let ms = best_ms(dev, 1, || kmeans::reference::assign(&x, &c, Metric::SquaredL2).map(|_| ()))
            .expect("ref");
        baselines.push(("naive reference kernel".to_string(), ms));
    }
    let device = if dev.is_cpu() { "cpu".to_string() } else { format!("{dev} ({})", dev.name()) };
    Measurement {
        kernel: "kmeans/assign_l2".into(),
        shape: shape.clone(),
        device: device.clone(),
        ms: assign_ms,
        flops,
        bytes: x_bytes + (n * 8) as f64,
        ceiling: Some(ceiling.clone()),
        baselines,
    }
    .report();
    Measurement {
        kernel: "kmeans/update".into(),
        shape: shape.clone(),
        device: device.clone(),
        ms: update_ms,
        flops: (n * d) as f64,
        bytes: x_bytes + (n * 4 + k * d * 4) as f64,
        ceiling: Some(("copy GB/s (measured)".into(), copy)),
        baselines: vec![],
    }
    .report();
    if let Some(ms) = skewed_ms {
        Measurement {
            kernel: "kmeans/update (all rows in one cluster)".into(),
            shape: shape.clone(),
            device: device.clone(),
            ms,
            flops: (n * d) as f64,
            bytes: x_bytes + (n * 4 + k * d * 4) as f64,
            ceiling: Some(("copy GB/s (measured)".into(), copy)),
            baselines: vec![],
        }
        .report();
    }
    Measurement {
        kernel: "kmeans/lloyd_iteration".into(),
        shape,
        device,
        ms: lloyd_ms,
        flops,
        bytes: 2.0 * x_bytes,
        ceiling: Some(ceiling),
        baselines: vec![],
    }
    .report();
}

fn cpu_group(cr: &mut Criterion) {
    let (n, d, k) = CPU_SHAPE;
    let dev = Device::cpu();
    let (x, c) = inputs(n, d, k, DType::F32, &dev);
    let mut g = cr.benchmark_group("kmeans_cpu");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    g.throughput(criterion::Throughput::Elements((n * k) as u64));
    g.bench_function("lloyd_iteration_200000x64_k256_f32", |b| {
        b.iter(|| lloyd_iteration(&x, &c, k).expect("lloyd"))
    });
    g.bench_function("assign_200000x64_k256_f32", |b| {
        b.iter(|| kmeans::assign(&x, &c, Metric::SquaredL2).expect("assign"))
    });
    g.finish();
}

fn cuda_group(cr: &mut Criterion) {
    let Ok(dev) = Device::cuda(0) else { return };
    if !metakernels::kernels_built() {
        return;
    }
    let (n, d, k) = GPU_SHAPE;
    let mut g = cr.benchmark_group("kmeans_cuda");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    for dtype in [DType::F32, DType::BF16] {
        let (x, c) = inputs(n, d, k, dtype, &dev);
        g.bench_function(format!("lloyd_iteration_{n}x{d}_k{k}_{}", dtype.as_str()), |b| {
            b.iter(|| {
                lloyd_iteration(&x, &c, k).expect("lloyd");
                dev.synchronize().expect("sync")
            })
        });
    }
    g.finish();
}

criterion_group!(benches, cpu_group, cuda_group);

fn main() {
    // Report lines first (the numbers the bars are about), then criterion's groups.
    if metakernels::bench_support::cpu_reports_enabled() {
        report(&Device::cpu(), DType::F32, CPU_SHAPE, 15, true);
    }
    if let (Ok(dev), true) = (Device::cuda(0), metakernels::kernels_built()) {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            report(&dev, dtype, GPU_SHAPE, 10, false);
        }
        // The naive kernel at a shape it finishes in reasonable time.
        report(&dev, DType::F32, (262_144, 128, 1024), 3, true);
    }
    benches();
    criterion::Criterion::default().configure_from_args().final_summary();
}
