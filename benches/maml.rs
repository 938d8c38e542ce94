//! Benchmarks of the maml family.
//!
//! (a) the sinusoid meta-gradient of MAML (Finn et al. 2017): 25 tasks, MLP 1-40-40-1 ReLU,
//!     K = 10 support and query points, k = 1 and k = 5 inner steps, second order (and first
//!     order for comparison);
//! (b) HVP throughput of a 64-256-256-10 Tanh MLP on 128 samples per task, against the gradient
//!     of the same tasks (the physical expectation for HVP / gradient is 2–4×), 64 tasks.
//!
//! Besides criterion's output, one `[metakernels]` report line per kernel: time, GFLOP/s,
//! fraction of the same-run f32 GEMM ceiling, and speed-ups over baselines measured in the same
//! process (first order; on a GPU also the per-layer naive reference and the forced tiled path).

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use metakernels::bench_support::{best_ms, cpu_ceilings, Measurement};
use metakernels::maml::{force_tiled, Activation, Loss, Maml, Mlp, Order, TaskBatch};
use metakernels::testing::{from_f64, Rng};
use metakernels::{DType, Device, Tensor};

fn sinusoid_net() -> Mlp {
    Mlp { sizes: vec![1, 40, 40, 1], activation: Activation::Relu, loss: Loss::Mse }
}

fn hvp_net() -> Mlp {
    Mlp { sizes: vec![64, 256, 256, 10], activation: Activation::Tanh, loss: Loss::SoftmaxCrossEntropy }
}

fn sinusoid_batch(tasks: usize, k: usize, dev: &Device) -> TaskBatch {
    let mut rng = Rng::new(1);
    let mut xy = || {
        let mut x = Vec::new();
        let mut y = Vec::new();
        for _ in 0..tasks {
            let (a, phase) = (rng.uniform_in(0.1, 5.0), rng.uniform_in(0.0, std::f64::consts::PI));
            for _ in 0..k {
                let xv = rng.uniform_in(-5.0, 5.0);
                x.push(xv);
                y.push(a * (xv - phase).sin());
            }
        }
        let t = |v: &[f64]| from_f64(v, &[tasks, k, 1], DType::F32, dev).unwrap().0;
        (t(&x), t(&y))
    };
    let (support_x, support_y) = xy();
    let (query_x, query_y) = xy();
    TaskBatch { support_x, support_y, query_x, query_y }
}

/// Multiply-add flops of one pass over `n` samples.
#[derive(Clone, Copy)]
enum Pass {
    Gradient,
    Hvp,
    /// An HVP of the meta-gradient's reverse loop, which reads the plain forward pass and δ
    /// chain from the tape of the inner step at the same parameters.
    HvpOnTape,
}

fn pass_flops(sizes: &[usize], n: usize, pass: Pass) -> f64 {
    sizes
        .windows(2)
        .enumerate()
        .map(|(l, w)| {
            let m = 2.0 * (n * w[0] * w[1]) as f64; // one [n × fan_in] · [fan_in × fan_out] product
            let below = if l > 0 { 1.0 } else { 0.0 };
            match pass {
                // forward, weight gradient, dL/dh below
                Pass::Gradient => m * (2.0 + below),
                // forward (1), R-forward (1 or 2), dL/dh below (1), R weight gradient (1 or 2),
                // R dL/dh below (2); the HVP skips the plain weight gradient
                Pass::Hvp => m * (3.0 + 5.0 * below),
                // R-forward (1 or 2), R weight gradient (1 or 2), R dL/dh below (2)
                Pass::HvpOnTape => m * (2.0 + 4.0 * below),
            }
        })
        .sum()
}

fn meta_flops(sizes: &[usize], tasks: usize, k: usize, n: usize, order: Order) -> f64 {
    let grad = pass_flops(sizes, n, Pass::Gradient);
    let hvp = if order == Order::Second { pass_flops(sizes, n, Pass::HvpOnTape) } else { 0.0 };
    tasks as f64 * ((k + 1) as f64 * grad + k as f64 * hvp)
}

fn device_label(dev: &Device) -> String {
    if dev.is_cpu() {
        "cpu".into()
    } else {
        format!("{dev} ({})", dev.name())
    }
}

fn ceiling(dev: &Device) -> Option<(String, f64)> {
    dev.is_cpu().then(|| ("cpu f32 GEMM GFLOP/s".to_string(), cpu_ceilings().f32_gemm_gflops))
}

/// (a): criterion group plus report lines for the sinusoid meta-gradient.
fn sinusoid(c: &mut Criterion, dev: &Device) {
    let net = sinusoid_net();
    let (tasks, k_shots) = (25, 10);
    let batch = sinusoid_batch(tasks, k_shots, dev);
    let theta = net.init(0, DType::F32, dev).unwrap();
    let mut group = c.benchmark_group(format!(
        "maml/sinusoid_meta_gradient/{}",
        if dev.is_cpu() { "cpu" } else { "cuda" }
    ));
    group.throughput(Throughput::Elements(tasks as u64));
    for steps in [1, 5] {
        for order in [Order::Second, Order::First] {
            let m = Maml { inner_steps: steps, inner_lr: 0.01, order, return_adapted: false };
            group.bench_with_input(
                BenchmarkId::new(format!("{order:?}"), format!("k{steps}")),
                &m,
                |b, m| {
                    b.iter(|| {
                        let out = m.meta_gradient(&net, &theta, &batch).unwrap();
                        dev.synchronize().unwrap();
                        out
                    })
                },
            );
        }
    }
    group.finish();

    for steps in [1, 5] {
        let run = |order: Order| {
            let m = Maml { inner_steps: steps, inner_lr: 0.01, order, return_adapted: false };
            best_ms(dev, 200, || m.meta_gradient(&net, &theta, &batch).map(|_| ())).unwrap()
        };
        let (second, first) = (run(Order::Second), run(Order::First));
        let mut baselines = vec![("first order (no HVPs)".to_string(), first)];
        if dev.is_cuda() {
            let m = Maml { inner_steps: steps, inner_lr: 0.01, order: Order::Second, return_adapted: false };
            let reference =
                best_ms(dev, 5, || m.meta_gradient_reference(&net, &theta, &batch).map(|_| ())).unwrap();
            baselines.push(("per-layer naive reference".to_string(), reference));
            force_tiled(true);
            let tiled = best_ms(dev, 20, || m.meta_gradient(&net, &theta, &batch).map(|_| ()));
            force_tiled(false);
            baselines.push(("per-layer tiled path (forced)".to_string(), tiled.unwrap()));
        }
        Measurement {
            kernel: "maml/sinusoid_meta_gradient_second_order".into(),
            shape: format!("T{tasks} 1-40-40-1 K{k_shots} k{steps} f32"),
            device: device_label(dev),
            ms: second,
            flops: meta_flops(&net.sizes, tasks, steps, k_shots, Order::Second),
            bytes: 0.0,
            ceiling: ceiling(dev),
            baselines,
        }
        .report();
    }
}

/// (b): HVP against gradient throughput.
fn hvp_throughput(c: &mut Criterion, dev: &Device) {
    let net = hvp_net();
    let (tasks, n) = (64, 128);
    let p = net.num_params();
    let mut rng = Rng::new(2);
    let params = from_f64(
        &rng.normal_vec(tasks * p).iter().map(|v| 0.05 * v).collect::<Vec<_>>(),
        &[tasks, p],
        DType::F32,
        dev,
    )
    .unwrap()
    .0;
    let v = from_f64(&rng.normal_vec(tasks * p), &[tasks, p], DType::F32, dev).unwrap().0;
    let x = from_f64(&rng.normal_vec(tasks * n * 64), &[tasks, n, 64], DType::F32, dev).unwrap().0;
    let labels: Vec<u32> = (0..tasks * n).map(|_| rng.below(10) as u32).collect();
    let y = Tensor::from_slice(&labels, &[tasks, n], dev).unwrap();

    let mut group =
        c.benchmark_group(format!("maml/hvp_64-256-256-10/{}", if dev.is_cpu() { "cpu" } else { "cuda" }));
    group.throughput(Throughput::Elements(tasks as u64));
    group.bench_function(BenchmarkId::new("hvp", format!("T{tasks}")), |b| {
        b.iter(|| {
            let out = net.hvp(&params, &x, &y, &v).unwrap();
            dev.synchronize().unwrap();
            out
        })
    });
    group.bench_function(BenchmarkId::new("gradient", format!("T{tasks}")), |b| {
        b.iter(|| {
            let out = net.loss_and_grad(&params, &x, &y).unwrap();
            dev.synchronize().unwrap();
            out
        })
    });
    group.finish();

    let hvp_ms = best_ms(dev, 5, || net.hvp(&params, &x, &y, &v).map(|_| ())).unwrap();
    let grad_ms = best_ms(dev, 5, || net.loss_and_grad(&params, &x, &y).map(|_| ())).unwrap();
    let shape = format!("T{tasks} 64-256-256-10 N{n} f32");
    for (kernel, ms, pass) in [("maml/hvp", hvp_ms, Pass::Hvp), ("maml/gradient", grad_ms, Pass::Gradient)] {
        Measurement {
            kernel: kernel.into(),
            shape: shape.clone(),
            device: device_label(dev),
            ms,
            flops: tasks as f64 * pass_flops(&net.sizes, n, pass),
            bytes: (tasks * (2 * p + n * 65) * 4) as f64,
            ceiling: ceiling(dev),
            baselines: Vec::new(),
        }
        .report();
    }
    println!(
        "[metakernels] maml/hvp cost over gradient cost ({shape}, {}): {:.2}x",
        device_label(dev),
        hvp_ms / grad_ms
    );
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    let cpu = Device::cpu();
    sinusoid(&mut c, &cpu);
    hvp_throughput(&mut c, &cpu);
    if let Ok(gpu) = Device::cuda(0) {
        if metakernels::kernels_built() {
            sinusoid(&mut c, &gpu);
            hvp_throughput(&mut c, &gpu);
        }
    }
    c.final_summary();
}
