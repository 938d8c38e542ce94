//! Host↔device copies and dtype casts, with throughput in bytes.
//!
//! CPU group: casts of 16 Mi elements. CUDA group (when a device is usable): host→device and
//! device→host copies of 256 MiB, and casts of 64 Mi elements timed with CUDA events. After the
//! criterion groups, one report line per kernel gives GB/s and the fraction of the copy
//! bandwidth measured in the same run.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use metakernels::bench_support::{self, Measurement};
use metakernels::{testing, DType, Device, Tensor};

const CAST_PAIRS: [(DType, DType); 4] = [
    (DType::F32, DType::BF16),
    (DType::BF16, DType::F32),
    (DType::F32, DType::F16),
    (DType::F64, DType::F32),
];

fn bytes_moved(numel: usize, from: DType, to: DType) -> u64 {
    (numel * (from.size_in_bytes() + to.size_in_bytes())) as u64
}

fn input(numel: usize, dtype: DType, device: &Device) -> Tensor {
    testing::randn(&[numel], dtype, device, 1).expect("bench input").0
}

fn cpu_casts(c: &mut Criterion) {
    let numel = 16 << 20;
    let dev = Device::cpu();
    let mut group = c.benchmark_group("cpu/cast");
    group.sample_size(10).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    for (from, to) in CAST_PAIRS {
        let x = input(numel, from, &dev);
        group.throughput(Throughput::Bytes(bytes_moved(numel, from, to)));
        group.bench_function(BenchmarkId::new(format!("{from}_to_{to}"), numel), |b| {
            b.iter(|| x.to_dtype(to).expect("cast"))
        });
    }
    group.finish();
    if bench_support::cpu_reports_enabled() {
        report_casts(&dev, numel, 3);
    }
}

fn cuda_copies_and_casts(c: &mut Criterion) {
    let Ok(dev) = Device::cuda(0) else {
        println!("cuda/*: skipped, no usable CUDA device");
        return;
    };
    let copy_numel = 64 << 20; // f32s: 256 MiB
    let host = vec![1.0f32; copy_numel];
    let on_device = Tensor::from_slice(&host, &[copy_numel], &dev).expect("h2d");
    let mut group = c.benchmark_group("cuda/copy");
    group.sample_size(10).measurement_time(Duration::from_secs(2));
    group.throughput(Throughput::Bytes((copy_numel * 4) as u64));
    group.bench_function("host_to_device_256MiB", |b| {
        b.iter(|| Tensor::from_slice(&host, &[copy_numel], &dev).expect("h2d"))
    });
    group.bench_function("device_to_host_256MiB", |b| b.iter(|| on_device.to_vec::<f32>().expect("d2h")));
    group.finish();

    let numel = 64 << 20;
    let mut group = c.benchmark_group("cuda/cast");
    group.sample_size(10).measurement_time(Duration::from_secs(2));
    for (from, to) in CAST_PAIRS {
        let x = input(numel, from, &dev);
        group.throughput(Throughput::Bytes(bytes_moved(numel, from, to)));
        group.bench_function(BenchmarkId::new(format!("{from}_to_{to}"), numel), |b| {
            b.iter_custom(|iters| {
                let ms = dev
                    .time_ms(|| {
                        for _ in 0..iters {
                            x.to_dtype(to)?;
                        }
                        Ok(())
                    })
                    .expect("timed casts");
                Duration::from_secs_f64(ms / 1e3)
            })
        });
    }
    group.finish();
    report_casts(&dev, numel, 20);
    report_ceilings(&dev);
}

/// The device's measured peaks, which the family benchmarks hold their kernels against.
fn report_ceilings(dev: &Device) {
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        match bench_support::device_matrix_tflops(dev, dtype) {
            Ok(tflops) => println!(
                "[metakernels] ceiling {dtype} matrix rate (mma.sync / fp32 FMA): {tflops:.1} TFLOP/s"
            ),
            Err(e) => println!("[metakernels] ceiling {dtype}: not measured: {e}"),
        }
    }
    if let Ok(gbps) = bench_support::device_copy_gbps(dev) {
        println!("[metakernels] ceiling device copy: {gbps:.1} GB/s (read + write)");
    }
}

/// One report line per cast: GB/s against the copy bandwidth measured now.
fn report_casts(dev: &Device, numel: usize, reps: usize) {
    let copy = bench_support::device_copy_gbps(dev).expect("copy bandwidth");
    for (from, to) in CAST_PAIRS {
        let x = input(numel, from, dev);
        let ms = bench_support::best_ms(dev, reps, || x.to_dtype(to).map(drop)).expect("timed cast");
        Measurement {
            kernel: format!("tensor/cast_{from}_to_{to}"),
            shape: format!("n={numel}"),
            device: dev.to_string(),
            ms,
            flops: 0.0,
            bytes: bytes_moved(numel, from, to) as f64,
            ceiling: Some(("copy GB/s".into(), copy)),
            baselines: Vec::new(),
        }
        .report();
    }
}

criterion_group!(benches, cpu_casts, cuda_copies_and_casts);
criterion_main!(benches);
