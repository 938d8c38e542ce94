//! von Oswald et al. (2022), "Transformers learn in-context by gradient descent": one linear
//! self-attention layer with hand-set weights performs exactly one gradient-descent step on
//! the in-context regression loss. This example builds their construction with this crate's
//! non-causal linear attention and checks it against an explicit GD step.
//!
//! Tokens e_i = (x_i, y_i), x ~ U(−0.5, 0.5)^10, y_i = w·x_i with w ~ N(0, I); N = 10 context
//! tokens and a test token (x_test, 0). With W_K = W_Q = [[I_x, 0], [0, 0]],
//! W_V = [[0, 0], [W0, −I_y]] and P = (η/N)·I, the test token's update is
//! Δe_test = (η/N) Σ_i (0, W0 x_i − y_i) (x_i·x_test), so with W0 = 0 its y-entry is
//! −(η/N) Σ_i y_i x_i·x_test: minus the prediction of W1 = W0 − η∇L(W0),
//! L(W) = 1/(2N) Σ ‖W x_i − y_i‖².
//!
//! The layer runs as attention over the N context keys and values; the test query is placed
//! at every query position (non-causal, so each sees the whole context) and one row is read.
//!
//! Run: `cargo run --release --example icl_as_gd`

use metakernels::linear_attention::LinearAttention;
use metakernels::testing::Rng;
use metakernels::{Device, Tensor};

const DX: usize = 10; // input dimension
const D: usize = DX + 1; // token dimension (x, y)
const N: usize = 10; // context tokens
const TASKS: usize = 10_000;

/// One regression task: context (x_i, y_i), a test input and its target.
struct Task {
    xs: Vec<[f64; DX]>,
    ys: Vec<f64>,
    x_test: [f64; DX],
    y_test: f64,
}

fn sample_task(rng: &mut Rng) -> Task {
    let w: Vec<f64> = rng.normal_vec(DX);
    let mut x = || {
        let mut v = [0.0; DX];
        v.iter_mut().for_each(|e| *e = rng.uniform_in(-0.5, 0.5));
        v
    };
    let xs: Vec<[f64; DX]> = (0..N).map(|_| x()).collect();
    let x_test = x();
    let dot = |a: &[f64; DX]| a.iter().zip(&w).map(|(p, q)| p * q).sum::<f64>();
    Task { ys: xs.iter().map(dot).collect(), y_test: dot(&x_test), xs, x_test }
}

/// The one-step GD prediction W1 x_test with W1 = (η/N) Σ y_i x_iᵀ (from W0 = 0), in f64.
fn gd_prediction(t: &Task, eta: f64) -> f64 {
    let w1: Vec<f64> = (0..DX)
        .map(|c| eta / N as f64 * t.xs.iter().zip(&t.ys).map(|(x, y)| y * x[c]).sum::<f64>())
        .collect();
    w1.iter().zip(&t.x_test).map(|(a, b)| a * b).sum()
}

/// q, k, v of von Oswald's construction for all tasks, as [TASKS, 1, N, D] tensors.
fn layer_inputs(tasks: &[Task], dev: &Device) -> metakernels::Result<(Tensor, Tensor, Tensor)> {
    let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for t in tasks {
        for (x, &y) in t.xs.iter().zip(&t.ys) {
            // W_Q e_test = (x_test, 0) at every query position; W_K e_i = (x_i, 0);
            // W_V e_i = (0, W0 x_i − y_i) = (0, −y_i) with W0 = 0.
            q.extend(t.x_test.iter().map(|&e| e as f32).chain([0.0]));
            k.extend(x.iter().map(|&e| e as f32).chain([0.0]));
            v.extend(std::iter::repeat_n(0.0f32, DX).chain([-y as f32]));
        }
    }
    let shape = [tasks.len(), 1, N, D];
    Ok((
        Tensor::from_vec(q, &shape, dev)?,
        Tensor::from_vec(k, &shape, dev)?,
        Tensor::from_vec(v, &shape, dev)?,
    ))
}

fn main() -> metakernels::Result<()> {
    let dev = Device::best();
    let mut rng = Rng::new(2022);
    let tasks: Vec<Task> = (0..TASKS).map(|_| sample_task(&mut rng)).collect();
    let (q, k, v) = layer_inputs(&tasks, &dev)?;

    // Half-MSE of the one-step GD predictor over a grid of learning rates.
    let half_mse = |eta: f64| {
        tasks.iter().map(|t| 0.5 * (gd_prediction(t, eta) - t.y_test).powi(2)).sum::<f64>() / TASKS as f64
    };
    let grid: Vec<f64> = (1..=120).map(|i| i as f64 * 0.25).collect();
    let (best_eta, best_loss) = grid
        .iter()
        .map(|&eta| (eta, half_mse(eta)))
        .fold((0.0, f64::INFINITY), |a, b| if b.1 < a.1 { b } else { a });

    // The linear self-attention layer with P = (η/N)·I, i.e. scale η/N, on the device.
    let attn = LinearAttention { causal: false, scale: (best_eta / N as f64) as f32, ..Default::default() };
    let out = attn.forward(&q, &k, &v, None)?.output.to_vec::<f32>()?;
    let mut max_diff = 0f64;
    let mut layer_loss = 0f64;
    for (i, t) in tasks.iter().enumerate() {
        // Updated test token e_test + Δe_test; its y-entry starts at 0. Query row 0 of task i.
        let y_entry = out[i * N * D + DX] as f64;
        let prediction = -y_entry;
        max_diff = max_diff.max((prediction - gd_prediction(t, best_eta)).abs());
        layer_loss += 0.5 * (prediction - t.y_test).powi(2) / TASKS as f64;
    }
    println!("von Oswald et al. (2022): one linear self-attention layer = one GD step");
    println!("  device {dev}, {TASKS} tasks, N = {N} context tokens, x ∈ U(-0.5, 0.5)^{DX}, w ~ N(0, I)");
    println!("  best learning rate on the grid 0.25..30: η = {best_eta}");
    println!("  half-MSE of one GD step at η:          {best_loss:.4}   (paper: about 0.2)");
    println!("  half-MSE of the attention layer:       {layer_loss:.4}");
    println!(
        "  zero predictor half-MSE:               {:.4}",
        tasks.iter().map(|t| 0.5 * t.y_test * t.y_test).sum::<f64>() / TASKS as f64
    );
    println!("  max |ŷ_attention − ŷ_GD| over tasks:   {max_diff:.3e}   (f32 rounding only)");
    Ok(())
}
