//! Benchmarks of the moe family: routing from logits, dispatch + combine, batched lstsq.
//!
//! CPU: dispatch + combine at N = 65536 tokens × D = 1024 f32, and at the N = 1M in bf16
//! (2 GiB per tensor: only where the host has 12 GiB available, else a line says it was
//! skipped), lstsq for 1024 systems of 64×16 (r = 8). CUDA (when a GPU is there): dispatch +
//! combine at N = 1M, D = 1024 in f32 and bf16, and the same lstsq.
//! GB/s counts bytes read + written (2 × N × D × dtype per move) against the measured copy
//! bandwidth; the baseline for dispatch is an unvectorised row-by-row copy on the host.

use std::time::Duration;

use criterion::{criterion_group, Criterion};
use metakernels::bench_support::{best_ms, device_copy_gbps, Measurement};
use metakernels::moe;
use metakernels::{DType, Device, Tensor};

use metakernels::testing::uniform_f32_parallel as uniform;

fn tensor(shape: &[usize], dtype: DType, dev: &Device, seed: u64) -> Tensor {
    let host = uniform(shape.iter().product(), seed);
    Tensor::from_vec(host, shape, dev).and_then(|t| t.to_dtype(dtype)).expect("inputs")
}

fn routing(n: usize, k: usize, dev: &Device) -> moe::Routing {
    moe::route_top1_logits(&tensor(&[n, k], DType::F32, dev, 1)).expect("routing")
}

fn report_dispatch(dev: &Device, n: usize, d: usize, dtype: DType) {
    let r = routing(n, 64, dev);
    let x = tensor(&[n, d], dtype, dev, 2);
    let grouped = moe::dispatch(&x, &r).expect("dispatch");
    let bytes = 2.0 * (n * d * dtype.size_in_bytes()) as f64;
    let copy = device_copy_gbps(dev).unwrap_or(f64::NAN);
    let device = if dev.is_cpu() { "cpu".to_string() } else { format!("{dev} ({})", dev.name()) };
    let shape = format!("N{n} D{d} K64 {}", dtype.as_str());
    let dispatch_ms = best_ms(dev, 5, || moe::dispatch(&x, &r).map(|_| ())).expect("dispatch");
    let combine_ms = best_ms(dev, 5, || moe::combine(&grouped, &r, None).map(|_| ())).expect("combine");
    let probs = r.gate_probs().expect("probs").clone();
    let weighted_ms =
        best_ms(dev, 5, || moe::combine(&grouped, &r, Some(&probs)).map(|_| ())).expect("combine");
    let mut baselines = Vec::new();
    if dev.is_cpu() && dtype == DType::F32 {
        let (xs, order) = (x.to_vec::<f32>().expect("x"), r.order().to_vec::<u32>().expect("order"));
        let ms = best_ms(dev, 3, || {
            let mut out = vec![0f32; n * d];
            for (j, &t) in order.iter().enumerate() {
                for e in 0..d {
                    out[j * d + e] = xs[t as usize * d + e];
                }
            }
            std::hint::black_box(out);
            Ok(())
        })
        .expect("baseline");
        baselines.push(("serial element-wise gather".to_string(), ms));
    }
    let ceiling = Some(("copy GB/s (measured)".to_string(), copy));
    for (kernel, ms, base) in [
        ("moe/dispatch", dispatch_ms, baselines.clone()),
        ("moe/combine", combine_ms, vec![]),
        ("moe/combine_weighted", weighted_ms, vec![]),
    ] {
        Measurement {
            kernel: kernel.into(),
            shape: shape.clone(),
            device: device.clone(),
            ms,
            flops: 0.0,
            bytes,
            ceiling: ceiling.clone(),
            baselines: base,
        }
        .report();
    }
}

fn lstsq_inputs(dev: &Device) -> (Tensor, Tensor) {
    (tensor(&[1024, 64, 16], DType::F32, dev, 3), tensor(&[1024, 64, 8], DType::F32, dev, 4))
}

fn report_lstsq(dev: &Device) {
    let (x, y) = lstsq_inputs(dev);
    let ms = best_ms(dev, 5, || moe::lstsq(&x, &y, 0.0).map(|_| ())).expect("lstsq");
    // Gram: 2·M·n·(n + r); Cholesky n³/3; two triangular solves 2·n²·r.
    let flops = 1024.0 * (2.0 * 64.0 * 16.0 * 24.0 + 16f64.powi(3) / 3.0 + 2.0 * 256.0 * 8.0);
    Measurement {
        kernel: "moe/lstsq".into(),
        shape: "B1024 M64 n16 r8 f32".into(),
        device: if dev.is_cpu() { "cpu".into() } else { format!("{dev} ({})", dev.name()) },
        ms,
        flops,
        bytes: 1024.0 * 64.0 * 24.0 * 4.0,
        ceiling: None,
        baselines: vec![],
    }
    .report();
}

fn cpu_group(c: &mut Criterion) {
    let dev = Device::cpu();
    let mut g = c.benchmark_group("moe_cpu");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    let (n, d) = (65_536, 1024);
    let r = routing(n, 64, &dev);
    let x = tensor(&[n, d], DType::F32, &dev, 2);
    g.throughput(criterion::Throughput::Bytes((2 * 2 * n * d * 4) as u64));
    g.bench_function("dispatch_combine_65536x1024_f32", |b| {
        b.iter(|| moe::combine(&moe::dispatch(&x, &r).expect("d"), &r, None).expect("c"))
    });
    let (lx, ly) = lstsq_inputs(&dev);
    g.throughput(criterion::Throughput::Elements(1024));
    g.bench_function("lstsq_1024x64x16_r8", |b| b.iter(|| moe::lstsq(&lx, &ly, 0.0).expect("lstsq")));
    g.finish();
}

fn cuda_group(c: &mut Criterion) {
    let (Ok(dev), true) = (Device::cuda(0), metakernels::kernels_built()) else { return };
    let mut g = c.benchmark_group("moe_cuda");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    let (n, d) = (1 << 20, 1024);
    let r = routing(n, 64, &dev);
    let x = tensor(&[n, d], DType::BF16, &dev, 2);
    g.bench_function("dispatch_combine_1Mx1024_bf16", |b| {
        b.iter(|| {
            moe::combine(&moe::dispatch(&x, &r).expect("d"), &r, None).expect("c");
            dev.synchronize().expect("sync")
        })
    });
    g.finish();
}

criterion_group!(benches, cpu_group, cuda_group);

fn main() {
    if metakernels::bench_support::cpu_reports_enabled() {
        report_dispatch(&Device::cpu(), 65_536, 1024, DType::F32);
        // The 1M tokens: x, the grouped rows and the output (2 GiB each in bf16), and
        // the f32 staging of x's random values (4 GiB) while it is made.
        const NEEDS_GIB: u64 = 12;
        match metakernels::bench_support::available_host_bytes().map(|bytes| (bytes >> 30) as u64) {
            Some(gib) if gib >= NEEDS_GIB => report_dispatch(&Device::cpu(), 1 << 20, 1024, DType::BF16),
            other => println!(
                "[metakernels] moe/dispatch N1048576 D1024 bf16 on the cpu skipped: needs {NEEDS_GIB} GiB of \
                 available host memory, {}",
                other.map_or("unknown here".to_string(), |gib| format!("{gib} GiB available"))
            ),
        }
        report_lstsq(&Device::cpu());
    }
    if let (Ok(dev), true) = (Device::cuda(0), metakernels::kernels_built()) {
        for dtype in [DType::F32, DType::BF16] {
            report_dispatch(&dev, 1 << 20, 1024, dtype);
        }
        report_lstsq(&dev);
    }
    benches();
    criterion::Criterion::default().configure_from_args().final_summary();
}
