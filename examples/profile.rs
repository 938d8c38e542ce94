//! Profiling driver: runs one kernel family's main operation in a loop on the best device (or
//! the one asked for), so that Nsight Systems / Nsight Compute, perf or callgrind see a clean,
//! steady workload.
//!
//! ```sh
//! cargo run --release --example profile -- linear_attention            # best device, 20 iterations
//! cargo run --release --example profile -- momentum_attention --cpu --iters 5
//! nsys profile --trace=cuda target/release/examples/profile kmeans
//! ncu --set full -k regex:assign target/release/examples/profile kmeans --iters 1
//! ```
//!
//! Workloads: cast, linear_attention, linear_attention_backward, momentum_attention,
//! momentum_attention_backward, maml, kmeans, moe. Shapes are the issues' benchmark shapes on a
//! GPU and smaller ones on the CPU.

use std::time::Instant;

use metakernels::kmeans::{self, Metric};
use metakernels::linear_attention::LinearAttention;
use metakernels::maml::{Activation, Loss, Maml, Mlp, Order, TaskBatch};
use metakernels::momentum_attention::MomentumAttention;
use metakernels::testing::randn;
use metakernels::{moe, DType, Device, Result, Tensor};

const WORKLOADS: &str =
    "cast | linear_attention | linear_attention_backward | momentum_attention | momentum_attention_backward | maml | kmeans | moe";

/// One prepared workload: a closure that queues one call of the kernel.
type Step = Box<dyn FnMut() -> Result<()>>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(name) = args.iter().find(|a| !a.starts_with("--") && a.parse::<usize>().is_err()).cloned()
    else {
        eprintln!("usage: profile <{WORKLOADS}> [--cpu] [--iters N]");
        std::process::exit(2);
    };
    let iters = flag_value(&args, "--iters").unwrap_or(20);
    let device = if args.iter().any(|a| a == "--cpu") { Device::cpu() } else { Device::best() };
    if let Err(e) = run(&name, &device, iters) {
        eprintln!("profile {name} on {device}: {e}");
        std::process::exit(1);
    }
}

fn flag_value(args: &[String], flag: &str) -> Option<usize> {
    args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok())
}

fn run(name: &str, device: &Device, iters: usize) -> Result<()> {
    let gpu = device.is_cuda();
    let mut step = prepare(name, device, gpu)?;
    step()?; // warm-up: module load, allocator, clocks
    device.synchronize()?;
    let start = Instant::now();
    for _ in 0..iters {
        step()?;
    }
    device.synchronize()?;
    let ms = start.elapsed().as_secs_f64() * 1e3 / iters.max(1) as f64;
    println!("{name} on {device} ({}): {ms:.3} ms per call over {iters} calls", device.name());
    Ok(())
}

fn prepare(name: &str, dev: &Device, gpu: bool) -> Result<Step> {
    let half = if gpu { DType::BF16 } else { DType::F32 };
    Ok(match name {
        "cast" => {
            let (x, _) = randn(&[if gpu { 1 << 26 } else { 1 << 22 }], DType::F32, dev, 1)?;
            Box::new(move || x.to_dtype(DType::BF16).map(drop))
        }
        "linear_attention" | "linear_attention_backward" => {
            let shape = if gpu { [4, 16, 2048, 128] } else { [1, 8, 4096, 64] };
            let [q, k, v, g] = inputs(&shape, half, dev)?;
            let layer = LinearAttention::default();
            if name.ends_with("backward") {
                Box::new(move || layer.backward(&q, &k, &v, None, &g, None).map(drop))
            } else {
                Box::new(move || layer.forward(&q, &k, &v, None).map(drop))
            }
        }
        "momentum_attention" | "momentum_attention_backward" => {
            let shape = if gpu { [4, 16, 4096, 128] } else { [1, 16, 1024, 64] };
            let [q, k, v, g] = inputs(&shape, half, dev)?;
            let attn = MomentumAttention::new(0.9);
            if name.ends_with("backward") {
                Box::new(move || attn.backward(&q, &k, &v, &g).map(drop))
            } else {
                Box::new(move || attn.forward(&q, &k, &v).map(drop))
            }
        }
        "maml" => {
            let mlp = Mlp { sizes: vec![1, 40, 40, 1], activation: Activation::Relu, loss: Loss::Mse };
            let tasks = 25;
            let params = mlp.init(0, DType::F32, dev)?;
            let batch = TaskBatch {
                support_x: randn(&[tasks, 10, 1], DType::F32, dev, 2)?.0,
                support_y: randn(&[tasks, 10, 1], DType::F32, dev, 3)?.0,
                query_x: randn(&[tasks, 10, 1], DType::F32, dev, 4)?.0,
                query_y: randn(&[tasks, 10, 1], DType::F32, dev, 5)?.0,
            };
            let maml = Maml { inner_steps: 5, inner_lr: 0.01, order: Order::Second, return_adapted: false };
            Box::new(move || maml.meta_gradient(&mlp, &params, &batch).map(drop))
        }
        "kmeans" => {
            let (n, d, k) = if gpu { (1 << 22, 128, 1024) } else { (200_000, 64, 256) };
            let (x, _) = randn(&[n, d], half, dev, 6)?;
            let (c, _) = randn(&[k, d], half, dev, 7)?;
            Box::new(move || {
                let (assignment, _) = kmeans::assign(&x, &c, Metric::SquaredL2)?;
                kmeans::update(&x, &assignment, k).map(drop)
            })
        }
        "moe" => {
            let (n, d, k) = if gpu { (1 << 20, 1024, 64) } else { (1 << 16, 1024, 64) };
            let (x, _) = randn(&[n, d], half, dev, 8)?;
            let (c, _) = randn(&[k, d], half, dev, 9)?;
            let routing = moe::route_top1(&x, &c, Metric::SquaredL2)?;
            Box::new(move || {
                let grouped = moe::dispatch(&x, &routing)?;
                moe::combine(&grouped, &routing, None).map(drop)
            })
        }
        other => {
            return Err(metakernels::Error::InvalidArgument {
                op: "profile",
                what: "workload".into(),
                reason: format!("unknown workload `{other}`; one of {WORKLOADS}"),
            })
        }
    })
}

/// q, k, v and an upstream gradient of one shape.
fn inputs(shape: &[usize; 4], dtype: DType, dev: &Device) -> Result<[Tensor; 4]> {
    let make = |seed| randn(shape, dtype, dev, seed).map(|(t, _)| t);
    Ok([make(11)?, make(12)?, make(13)?, make(14)?])
}
