//! Benchmarks of momentum attention.
//!
//! First the report lines (`[metakernels] ...`, best of a few calls): time, GFLOP/s counted as
//! causal attention (2·B·H·T²·D forward, 2.5× that for the backward), the fraction of the
//! same-run ceiling, the measured memory high-water mark of one call beyond its inputs
//! (`peak`: outputs and workspace; the heap under a counting allocator on the CPU, the
//! stream-ordered memory pool on a GPU), and the ratios to η = 0 and to the unfused baseline
//! (attention, then a separate momentum scan; for the backward, the attention backward, then a
//! separate reverse scan into dv) on the same device:
//! - CPU, f32: forward at the bar shape (1,16,4096,64), η = 0 and 0.9, against the
//!   same-run f32 GEMM rate; forward+backward at (1,16,1024,64).
//! - CUDA (only when a GPU is usable), bf16: the shapes (4,16,4096,128),
//!   (8,16,2048,64), (1,16,16384,128), forward and forward+backward, η = 0 and 0.9.
//!
//! Then criterion groups on small CPU shapes (their "elements" throughput is FLOPs, counted
//! as above) (the whole file finishes in about 90 s on two
//! cores) and on the shapes for CUDA. `METAKERNELS_BENCH_REPORT_ONLY=1` stops after the
//! report lines.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use metakernels::bench_support::{
    cpu_ceilings, cpu_sgemm_gflops, peak_bytes, CountingAllocator, Measurement,
};
use metakernels::momentum_attention::MomentumAttention;
use metakernels::testing::randn;
use metakernels::{DType, Device, Tensor};

/// Counts heap bytes, for the CPU's memory high-water marks.
#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

#[derive(Clone, Copy)]
struct Shape {
    b: usize,
    h: usize,
    t: usize,
    d: usize,
}

impl Shape {
    fn dims(&self) -> [usize; 4] {
        [self.b, self.h, self.t, self.d]
    }
    fn label(&self, dtype: DType) -> String {
        format!("B{} H{} T{} D{} {dtype}", self.b, self.h, self.t, self.d)
    }
    /// Causal attention forward FLOPs, 2·B·H·T²·D (QKᵀ and PV over the lower triangle).
    fn forward_flops(&self) -> f64 {
        2.0 * (self.b * self.h) as f64 * (self.t as f64).powi(2) * self.d as f64
    }
    fn elements(&self) -> usize {
        self.b * self.h * self.t * self.d
    }
}

struct Qkv {
    q: Tensor,
    k: Tensor,
    v: Tensor,
}

fn qkv(shape: Shape, dtype: DType, dev: &Device) -> Qkv {
    let make = |seed| randn(&shape.dims(), dtype, dev, seed).expect("random input").0;
    Qkv { q: make(1), k: make(2), v: make(3) }
}

/// The measured memory high-water mark of one call of `f` beyond its inputs (outputs and
/// workspace; the heap under the counting allocator on the CPU, the stream-ordered pool on a
/// GPU), as a report label.
fn peak_label(dev: &Device, f: impl FnOnce() -> metakernels::Result<()>) -> String {
    match peak_bytes(dev, f) {
        Ok(Some(bytes)) => format!("peak {:.1}MiB", bytes as f64 / (1 << 20) as f64),
        Ok(None) => "peak n/a".to_string(),
        Err(e) => format!("peak failed ({e})"),
    }
}

/// Best time in ms of each of `variants`, measured in interleaved rounds (one call of each per
/// round, after a warm-up round) so that load drifting on a shared machine hits all alike.
fn best_interleaved(
    dev: &Device,
    reps: usize,
    variants: &mut [&mut dyn FnMut() -> metakernels::Result<()>],
) -> Vec<f64> {
    let mut best = vec![f64::INFINITY; variants.len()];
    for round in 0..=reps.max(1) {
        for (f, b) in variants.iter_mut().zip(best.iter_mut()) {
            let ms = dev.time_ms(&mut **f).expect("benchmark run");
            if round > 0 {
                *b = b.min(ms);
            }
        }
    }
    best
}

fn report_forward(dev: &Device, shape: Shape, dtype: DType, ceiling: Option<(String, f64)>, reps: usize) {
    let x = qkv(shape, dtype, dev);
    let (plain_attn, momentum_attn) = (MomentumAttention::new(0.0), MomentumAttention::new(0.9));
    let mut plain_fn = || {
        black_box(plain_attn.forward(&x.q, &x.k, &x.v)?);
        Ok(())
    };
    let mut momentum_fn = || {
        black_box(momentum_attn.forward(&x.q, &x.k, &x.v)?);
        Ok(())
    };
    let mut unfused_fn = || {
        black_box(momentum_attn.forward_unfused(&x.q, &x.k, &x.v)?);
        Ok(())
    };
    let times = best_interleaved(dev, reps, &mut [&mut plain_fn, &mut momentum_fn, &mut unfused_fn]);
    let (plain, momentum, unfused) = (times[0], times[1], times[2]);
    let peak = [peak_label(dev, plain_fn), peak_label(dev, momentum_fn)];
    for ((eta, ms, baselines), peak) in [
        (0.0, plain, vec![]),
        (
            0.9,
            momentum,
            vec![("eta=0 (plain attention)".to_string(), plain), ("unfused".to_string(), unfused)],
        ),
    ]
    .into_iter()
    .zip(peak)
    {
        Measurement {
            kernel: format!("momentum_attention/forward eta={eta}"),
            shape: format!("{} {peak}", shape.label(dtype)),
            device: dev.to_string(),
            ms,
            flops: shape.forward_flops(),
            bytes: 4.0 * (shape.elements() * dtype.size_in_bytes()) as f64,
            ceiling: ceiling.clone(),
            baselines,
        }
        .report();
    }
}

fn report_forward_backward(
    dev: &Device,
    shape: Shape,
    dtype: DType,
    ceiling: Option<(String, f64)>,
    reps: usize,
) {
    let x = qkv(shape, dtype, dev);
    let train = |attn: &MomentumAttention| -> metakernels::Result<()> {
        let state = attn.forward_with_state(&x.q, &x.k, &x.v)?;
        black_box(attn.backward_with_state(&x.q, &x.k, &x.v, &state, state.output())?);
        Ok(())
    };
    let (plain_attn, momentum_attn) = (MomentumAttention::new(0.0), MomentumAttention::new(0.9));
    let mut plain_fn = || train(&plain_attn);
    let mut momentum_fn = || train(&momentum_attn);
    // The unfused baseline recomputes the attention in its backward (attention, then the
    // momentum scan; the attention backward, then the reverse scan into dv), so it is set beside
    // the fused step that recomputes too (forward, then backward).
    let mut recomputing_fn = || {
        let out = momentum_attn.forward(&x.q, &x.k, &x.v)?;
        black_box(momentum_attn.backward(&x.q, &x.k, &x.v, &out)?);
        Ok(())
    };
    let mut unfused_fn = || {
        let out = momentum_attn.forward_unfused(&x.q, &x.k, &x.v)?;
        black_box(momentum_attn.backward_unfused(&x.q, &x.k, &x.v, &out)?);
        Ok(())
    };
    let times = best_interleaved(
        dev,
        reps,
        &mut [&mut plain_fn, &mut momentum_fn, &mut recomputing_fn, &mut unfused_fn],
    );
    let (plain, momentum, recomputing, unfused) = (times[0], times[1], times[2], times[3]);
    let peak = [peak_label(dev, plain_fn), peak_label(dev, momentum_fn), peak_label(dev, recomputing_fn)];
    let lines = [
        ("forward+backward eta=0", plain, vec![]),
        ("forward+backward eta=0.9", momentum, vec![("eta=0 (plain attention)".to_string(), plain)]),
        ("forward+backward (recomputing) eta=0.9", recomputing, vec![("unfused".to_string(), unfused)]),
    ];
    for ((what, ms, baselines), peak) in lines.into_iter().zip(peak) {
        Measurement {
            kernel: format!("momentum_attention/{what}"),
            shape: format!("{} {peak}", shape.label(dtype)),
            device: dev.to_string(),
            ms,
            flops: 3.5 * shape.forward_flops(),
            bytes: 8.0 * (shape.elements() * dtype.size_in_bytes()) as f64,
            ceiling: ceiling.clone(),
            baselines,
        }
        .report();
    }
}

fn report() {
    if metakernels::bench_support::cpu_reports_enabled() {
        let cpu = Device::cpu();
        // The GEMM rate is measured right before each group (not once per process), so that the
        // ratio holds on a machine shared with other work.
        let _ = cpu_ceilings();
        let ceiling = || Some(("f32 GEMM GFLOP/s".to_string(), cpu_sgemm_gflops()));
        report_forward(&cpu, Shape { b: 1, h: 16, t: 4096, d: 64 }, DType::F32, ceiling(), 5);
        report_forward_backward(&cpu, Shape { b: 1, h: 16, t: 1024, d: 64 }, DType::F32, ceiling(), 5);
    }

    if let Some(gpu) = cuda() {
        // The bf16 tensor-core rate measured now (mma.sync chains, kernels/ceiling.cu); the
        // H200's nominal dense bf16 rate (989 TFLOP/s, reached only with wgmma) if that fails.
        let nominal = match metakernels::bench_support::device_matrix_tflops(&gpu, DType::BF16) {
            Ok(tflops) => Some(("measured mma.sync bf16 GFLOP/s".to_string(), tflops * 1e3)),
            Err(_) => Some(("H200 nominal dense bf16 GFLOP/s".to_string(), 989_000.0)),
        };
        for shape in gpu_shapes() {
            report_forward(&gpu, shape, DType::BF16, nominal.clone(), 5);
            report_forward_backward(&gpu, shape, DType::BF16, nominal.clone(), 3);
        }
    }
}

fn gpu_shapes() -> [Shape; 3] {
    [
        Shape { b: 4, h: 16, t: 4096, d: 128 },
        Shape { b: 8, h: 16, t: 2048, d: 64 },
        Shape { b: 1, h: 16, t: 16384, d: 128 },
    ]
}

fn cuda() -> Option<Device> {
    if !metakernels::kernels_built() {
        return None;
    }
    Device::cuda(0).ok()
}

fn cpu_groups(c: &mut Criterion) {
    let cpu = Device::cpu();
    let mut group = c.benchmark_group("momentum_attention/cpu");
    group.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    let shape = Shape { b: 1, h: 4, t: 1024, d: 64 };
    let x = qkv(shape, DType::F32, &cpu);
    group.throughput(Throughput::Elements(shape.forward_flops() as u64));
    for eta in [0.0f32, 0.9] {
        let attn = MomentumAttention::new(eta);
        group.bench_function(BenchmarkId::new(format!("forward eta={eta}"), shape.label(DType::F32)), |b| {
            b.iter(|| black_box(attn.forward(&x.q, &x.k, &x.v).expect("forward")))
        });
    }
    let small = Shape { b: 1, h: 4, t: 512, d: 64 };
    let y = qkv(small, DType::F32, &cpu);
    group.throughput(Throughput::Elements((2.5 * small.forward_flops()) as u64));
    for eta in [0.0f32, 0.9] {
        let attn = MomentumAttention::new(eta);
        group.bench_function(BenchmarkId::new(format!("backward eta={eta}"), small.label(DType::F32)), |b| {
            b.iter(|| black_box(attn.backward(&y.q, &y.k, &y.v, &y.v).expect("backward")))
        });
    }
    group.finish();
}

fn cuda_groups(c: &mut Criterion) {
    let Some(gpu) = cuda() else { return };
    let mut group = c.benchmark_group("momentum_attention/cuda");
    group.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    for shape in gpu_shapes() {
        let x = qkv(shape, DType::BF16, &gpu);
        group.throughput(Throughput::Elements(shape.forward_flops() as u64));
        for eta in [0.0f32, 0.9] {
            let attn = MomentumAttention::new(eta);
            group.bench_function(
                BenchmarkId::new(format!("forward eta={eta}"), shape.label(DType::BF16)),
                |b| {
                    b.iter(|| {
                        let out = attn.forward(&x.q, &x.k, &x.v).expect("forward");
                        gpu.synchronize().expect("sync");
                        black_box(out)
                    })
                },
            );
        }
    }
    group.finish();
}

fn main() {
    report();
    if std::env::var("METAKERNELS_BENCH_REPORT_ONLY").is_ok_and(|v| v == "1") {
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    cpu_groups(&mut c);
    cuda_groups(&mut c);
    c.final_summary();
}
