//! The sinusoid regression benchmark of MAML (Finn et al. 2017, §5.1), end to end.
//!
//! Tasks: y = A·sin(x − φ), A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5]; K = 10 support and 10
//! query points per task. Model: MLP 1-40-40-1 with ReLU. Meta-training: one inner SGD step of
//! α = 0.01, meta-batch 25, Adam with learning rate 1e-3 (written out below). Three models are
//! trained with the same seeds and budget: second-order MAML, first-order MAML, and a baseline
//! pre-trained on all tasks jointly (plain regression on the pooled data, no adaptation).
//!
//! Evaluation: 600 new tasks; each model is adapted on the task's K = 10 points by SGD with
//! α = 0.01 and scored by the MSE on 100 fresh points of the task, after 0, 1 and 10 steps,
//! with 95% confidence intervals (1.96 standard errors). A PNG plot of adapted curves for three
//! tasks is written to `maml_sinusoid.png` (or `--out PATH`).
//!
//! ```text
//! cargo run --release --example maml_sinusoid              # 20 000 meta-iterations (~15 s on 2 cores)
//! cargo run --release --example maml_sinusoid -- --paper   # the paper's 70 000 (~1-2 min)
//! cargo run --release --example maml_sinusoid -- --iterations 20000 --out plot.png
//! ```

use std::io::Write as _;
use std::time::Instant;

use metakernels::maml::{Activation, Loss, Maml, Mlp, Order, TaskBatch};
use metakernels::testing::Rng;
use metakernels::{DType, Device, Result, Tensor};

const K: usize = 10;
const META_BATCH: usize = 25;
const INNER_LR: f64 = 0.01;
const META_LR: f64 = 1e-3;
const EVAL_TASKS: usize = 600;
const EVAL_POINTS: usize = 100;
const DEFAULT_ITERATIONS: usize = 20_000;
const PAPER_ITERATIONS: usize = 70_000;

/// One sinusoid task.
#[derive(Clone, Copy)]
struct Sinusoid {
    amplitude: f64,
    phase: f64,
}

impl Sinusoid {
    fn sample(rng: &mut Rng) -> Self {
        Sinusoid { amplitude: rng.uniform_in(0.1, 5.0), phase: rng.uniform_in(0.0, std::f64::consts::PI) }
    }

    fn at(&self, x: f64) -> f64 {
        self.amplitude * (x - self.phase).sin()
    }

    /// `n` points x ~ U[−5, 5] and their values.
    fn points(&self, n: usize, rng: &mut Rng) -> (Vec<f32>, Vec<f32>) {
        let xs: Vec<f64> = (0..n).map(|_| rng.uniform_in(-5.0, 5.0)).collect();
        (xs.iter().map(|&x| x as f32).collect(), xs.iter().map(|&x| self.at(x) as f32).collect())
    }
}

/// [T, n, 1] inputs and targets for `tasks`, `n` points each.
fn tensors(tasks: &[Sinusoid], n: usize, rng: &mut Rng, dev: &Device) -> Result<(Tensor, Tensor)> {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for t in tasks {
        let (xs, ys) = t.points(n, rng);
        x.extend(xs);
        y.extend(ys);
    }
    Ok((Tensor::from_vec(x, &[tasks.len(), n, 1], dev)?, Tensor::from_vec(y, &[tasks.len(), n, 1], dev)?))
}

/// Adam (Kingma & Ba 2015) on a flat parameter vector.
struct Adam {
    lr: f64,
    m: Vec<f64>,
    v: Vec<f64>,
    step: i32,
}

impl Adam {
    const BETA1: f64 = 0.9;
    const BETA2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    fn new(lr: f64, len: usize) -> Self {
        Adam { lr, m: vec![0.0; len], v: vec![0.0; len], step: 0 }
    }

    fn update(&mut self, params: &mut [f32], grad: &[f32]) {
        self.step += 1;
        let c1 = 1.0 - Self::BETA1.powi(self.step);
        let c2 = 1.0 - Self::BETA2.powi(self.step);
        for (((p, &g), m), v) in params.iter_mut().zip(grad).zip(&mut self.m).zip(&mut self.v) {
            let g = g as f64;
            *m = Self::BETA1 * *m + (1.0 - Self::BETA1) * g;
            *v = Self::BETA2 * *v + (1.0 - Self::BETA2) * g * g;
            *p -= (self.lr * (*m / c1) / ((*v / c2).sqrt() + Self::EPS)) as f32;
        }
    }
}

/// A one-line progress bar on stderr.
struct Progress {
    label: &'static str,
    total: usize,
    start: Instant,
}

impl Progress {
    fn new(label: &'static str, total: usize) -> Self {
        Progress { label, total, start: Instant::now() }
    }

    fn show(&self, done: usize, loss: f64) {
        if !done.is_multiple_of(50) && done != self.total {
            return;
        }
        const WIDTH: usize = 30;
        let filled = WIDTH * done / self.total.max(1);
        let secs = self.start.elapsed().as_secs_f64();
        let eta = if done > 0 { secs / done as f64 * (self.total - done) as f64 } else { 0.0 };
        eprint!(
            "\r{:<22} [{}{}] {done:>6}/{} loss {loss:>7.4}  {secs:>5.0}s elapsed, {eta:>4.0}s left ",
            self.label,
            "#".repeat(filled),
            "-".repeat(WIDTH - filled),
            self.total
        );
        if done == self.total {
            eprintln!();
        }
        let _ = std::io::stderr().flush();
    }
}

/// Meta-trains θ with MAML of the given order.
fn train_maml(
    net: &Mlp,
    order: Order,
    iterations: usize,
    dev: &Device,
    label: &'static str,
) -> Result<Vec<f32>> {
    let mut theta = net.init(1, DType::F32, dev)?.to_vec::<f32>()?;
    let mut adam = Adam::new(META_LR, theta.len());
    let maml = Maml { inner_steps: 1, inner_lr: INNER_LR, order, return_adapted: false };
    let mut rng = Rng::new(2017);
    let progress = Progress::new(label, iterations);
    let mut smoothed = f64::NAN;
    for it in 1..=iterations {
        let tasks: Vec<Sinusoid> = (0..META_BATCH).map(|_| Sinusoid::sample(&mut rng)).collect();
        let (support_x, support_y) = tensors(&tasks, K, &mut rng, dev)?;
        let (query_x, query_y) = tensors(&tasks, K, &mut rng, dev)?;
        let batch = TaskBatch { support_x, support_y, query_x, query_y };
        let params = Tensor::from_slice(&theta, &[theta.len()], dev)?;
        let out = maml.meta_gradient(net, &params, &batch)?;
        adam.update(&mut theta, &out.grad.to_vec::<f32>()?);
        smoothed = if smoothed.is_nan() { out.loss } else { 0.99 * smoothed + 0.01 * out.loss };
        progress.show(it, smoothed);
    }
    Ok(theta)
}

/// Trains θ on all tasks jointly: plain regression on each meta-batch's pooled points.
fn train_pretrained(net: &Mlp, iterations: usize, dev: &Device) -> Result<Vec<f32>> {
    let mut theta = net.init(1, DType::F32, dev)?.to_vec::<f32>()?;
    let mut adam = Adam::new(META_LR, theta.len());
    let mut rng = Rng::new(2017);
    let progress = Progress::new("pre-trained baseline", iterations);
    let mut smoothed = f64::NAN;
    for it in 1..=iterations {
        let tasks: Vec<Sinusoid> = (0..META_BATCH).map(|_| Sinusoid::sample(&mut rng)).collect();
        let (x, y) = tensors(&tasks, 2 * K, &mut rng, dev)?;
        let params = Tensor::from_slice(&theta, &[theta.len()], dev)?;
        let (losses, grads) = net.loss_and_grad(&params, &x, &y)?;
        let (losses, grads) = (losses.to_vec::<f32>()?, grads.to_vec::<f32>()?);
        let mut mean = vec![0f32; theta.len()];
        for g in grads.chunks_exact(theta.len()) {
            mean.iter_mut().zip(g).for_each(|(m, g)| *m += g / META_BATCH as f32);
        }
        adam.update(&mut theta, &mean);
        let loss = losses.iter().map(|&l| l as f64).sum::<f64>() / META_BATCH as f64;
        smoothed = if smoothed.is_nan() { loss } else { 0.99 * smoothed + 0.01 * loss };
        progress.show(it, smoothed);
    }
    Ok(theta)
}

/// The evaluation tasks: support points, test points, and a dense grid for plotting.
struct EvalSet {
    tasks: Vec<Sinusoid>,
    support: (Tensor, Tensor),
    test: (Tensor, Tensor),
}

fn eval_set(dev: &Device) -> Result<EvalSet> {
    let mut rng = Rng::new(600);
    let tasks: Vec<Sinusoid> = (0..EVAL_TASKS).map(|_| Sinusoid::sample(&mut rng)).collect();
    let support = tensors(&tasks, K, &mut rng, dev)?;
    let test = tensors(&tasks, EVAL_POINTS, &mut rng, dev)?;
    Ok(EvalSet { tasks, support, test })
}

/// Adapts θ on every evaluation task by SGD; returns the per-task parameters after each number
/// of steps in `checkpoints` (ascending).
fn adapt(
    net: &Mlp,
    theta: &[f32],
    set: &EvalSet,
    checkpoints: &[usize],
    dev: &Device,
) -> Result<Vec<Tensor>> {
    let p = theta.len();
    let rows: Vec<f32> = (0..EVAL_TASKS).flat_map(|_| theta.iter().copied()).collect();
    let mut params = Tensor::from_vec(rows, &[EVAL_TASKS, p], dev)?;
    let mut out = Vec::new();
    let last = checkpoints.last().copied().unwrap_or(0);
    for step in 0..=last {
        if checkpoints.contains(&step) {
            out.push(params.clone());
        }
        if step == last {
            break;
        }
        let (_, grads) = net.loss_and_grad(&params, &set.support.0, &set.support.1)?;
        let (mut host, g) = (params.to_vec::<f32>()?, grads.to_vec::<f32>()?);
        host.iter_mut().zip(&g).for_each(|(q, g)| *q -= INNER_LR as f32 * g);
        params = Tensor::from_vec(host, &[EVAL_TASKS, p], dev)?;
    }
    Ok(out)
}

/// Mean and 95% confidence half-width of the per-task test MSE.
fn score(net: &Mlp, params: &Tensor, set: &EvalSet) -> Result<(f64, f64)> {
    let (losses, _) = net.loss_and_grad(params, &set.test.0, &set.test.1)?;
    let l: Vec<f64> = losses.to_vec::<f32>()?.iter().map(|&v| v as f64).collect();
    let n = l.len() as f64;
    let mean = l.iter().sum::<f64>() / n;
    let var = l.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1.0);
    Ok((mean, 1.96 * (var / n).sqrt()))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut iterations = DEFAULT_ITERATIONS;
    let mut out_path = "maml_sinusoid.png".to_string();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--paper" => iterations = PAPER_ITERATIONS,
            "--iterations" => {
                i += 1;
                iterations = args.get(i).and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_ITERATIONS);
            }
            "--out" => {
                i += 1;
                out_path = args.get(i).cloned().unwrap_or(out_path);
            }
            other => {
                eprintln!("unknown argument {other}; use --paper, --iterations N, --out PATH");
                std::process::exit(2);
            }
        }
        i += 1;
    }
    let dev = Device::best();
    let net = Mlp { sizes: vec![1, 40, 40, 1], activation: Activation::Relu, loss: Loss::Mse };
    println!(
        "MAML sinusoid: MLP {:?} ReLU, K = {K}, α = {INNER_LR}, meta-batch {META_BATCH}, Adam {META_LR}, \
         {iterations} iterations, on {}",
        net.sizes,
        dev.name()
    );
    let start = Instant::now();
    let second = train_maml(&net, Order::Second, iterations, &dev, "MAML (second order)")?;
    let first = train_maml(&net, Order::First, iterations, &dev, "MAML (first order)")?;
    let pretrained = train_pretrained(&net, iterations, &dev)?;
    println!("trained in {:.1} s", start.elapsed().as_secs_f64());

    let set = eval_set(&dev)?;
    let checkpoints = [0, 1, 10];
    let models =
        [("MAML, second order", &second), ("MAML, first order", &first), ("pre-trained, joint", &pretrained)];
    println!("\nMSE on {EVAL_TASKS} new tasks ({EVAL_POINTS} test points each), mean ± 95% CI, after SGD steps (α = {INNER_LR}) on K = {K} points:");
    println!("{:<22} {:>18} {:>18} {:>18}", "model", "0 steps", "1 step", "10 steps");
    let mut adapted = Vec::new();
    for (name, theta) in models {
        let params = adapt(&net, theta, &set, &checkpoints, &dev)?;
        let cells: Vec<String> = params
            .iter()
            .map(|p| score(&net, p, &set).map(|(m, ci)| format!("{m:.3} ± {ci:.3}")))
            .collect::<Result<_>>()?;
        println!("{name:<22} {:>18} {:>18} {:>18}", cells[0], cells[1], cells[2]);
        adapted.push(params);
    }
    plot::write(&out_path, &net, &set, &adapted, &dev)?;
    println!(
        "\nwrote {out_path}: three tasks; black = true function, red = the K support points, \
         blue = second-order MAML after 0 (light) / 1 / 10 (dark) steps, green = first-order MAML \
         after 10 steps, orange = pre-trained after 10 steps"
    );
    Ok(())
}

/// A small raster plotter: three panels, lines by sampling, written as an RGB PNG.
mod plot {
    use super::*;

    const PANEL_W: usize = 420;
    const PANEL_H: usize = 300;
    const PANELS: usize = 3;
    const GRID: usize = 200;
    const Y_RANGE: f64 = 6.0;

    struct Canvas {
        w: usize,
        h: usize,
        rgb: Vec<u8>,
    }

    impl Canvas {
        fn put(&mut self, x: i64, y: i64, c: [u8; 3]) {
            if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
                let i = 3 * (y as usize * self.w + x as usize);
                self.rgb[i..i + 3].copy_from_slice(&c);
            }
        }

        fn dot(&mut self, x: i64, y: i64, r: i64, c: [u8; 3]) {
            for dy in -r..=r {
                for dx in -r..=r {
                    self.put(x + dx, y + dy, c);
                }
            }
        }

        /// A polyline through the given pixel points, drawn by dense interpolation.
        fn line(&mut self, pts: &[(f64, f64)], c: [u8; 3]) {
            for w in pts.windows(2) {
                let ((x0, y0), (x1, y1)) = (w[0], w[1]);
                let steps = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
                for s in 0..=steps {
                    let t = s as f64 / steps as f64;
                    let (x, y) = (x0 + t * (x1 - x0), y0 + t * (y1 - y0));
                    self.dot(x.round() as i64, y.round() as i64, 1, c);
                }
            }
        }
    }

    pub fn write(
        path: &str,
        net: &Mlp,
        set: &EvalSet,
        adapted: &[Vec<Tensor>],
        dev: &Device,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let mut canvas =
            Canvas { w: PANEL_W * PANELS, h: PANEL_H, rgb: vec![255; PANEL_W * PANELS * PANEL_H * 3] };
        let grid: Vec<f64> = (0..GRID).map(|i| -5.0 + 10.0 * i as f64 / (GRID - 1) as f64).collect();
        let grid_x: Vec<f32> = grid.iter().map(|&x| x as f32).collect();
        let support_x = set.support.0.to_vec::<f32>()?;
        let support_y = set.support.1.to_vec::<f32>()?;
        for panel in 0..PANELS {
            let task = panel * 7;
            let x0 = (panel * PANEL_W) as f64;
            let to_px = |x: f64, y: f64| {
                (
                    x0 + 10.0 + (x + 5.0) / 10.0 * (PANEL_W - 20) as f64,
                    PANEL_H as f64 / 2.0 - y / Y_RANGE * (PANEL_H as f64 / 2.0 - 10.0),
                )
            };
            let axis: Vec<(f64, f64)> = [-5.0, 5.0].iter().map(|&x| to_px(x, 0.0)).collect();
            canvas.line(&axis, [220, 220, 220]);
            let curve = |params: &Tensor| -> Result<Vec<(f64, f64)>> {
                let p = net.num_params();
                let row = params.to_vec::<f32>()?[task * p..(task + 1) * p].to_vec();
                let theta = Tensor::from_vec(row, &[p], dev)?;
                let x = Tensor::from_slice(&grid_x, &[1, GRID, 1], dev)?;
                let y = net.forward(&theta, &x)?.to_vec::<f32>()?;
                Ok(grid.iter().zip(&y).map(|(&x, &y)| to_px(x, y as f64)).collect())
            };
            let truth: Vec<(f64, f64)> = grid.iter().map(|&x| to_px(x, set.tasks[task].at(x))).collect();
            canvas.line(&curve(&adapted[2][2])?, [255, 150, 0]);
            canvas.line(&curve(&adapted[1][2])?, [0, 160, 0]);
            canvas.line(&curve(&adapted[0][0])?, [160, 200, 255]);
            canvas.line(&curve(&adapted[0][1])?, [60, 120, 255]);
            canvas.line(&curve(&adapted[0][2])?, [0, 0, 170]);
            canvas.line(&truth, [0, 0, 0]);
            for s in 0..K {
                let (x, y) = to_px(support_x[task * K + s] as f64, support_y[task * K + s] as f64);
                canvas.dot(x.round() as i64, y.round() as i64, 3, [220, 0, 0]);
            }
        }
        let file = std::fs::File::create(path)?;
        let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), canvas.w as u32, canvas.h as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&canvas.rgb)?;
        Ok(())
    }
}
