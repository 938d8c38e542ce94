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
//! The example forms the tokens and the three matrices, applies them, runs the layer as this
//! crate's non-causal attention over the N context keys and values (the test query at every
//! query position; one row is read), and takes the GD step from the gradient of L at W0.
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

/// A d×d matrix, row-major.
type Matrix = [[f64; D]; D];

/// W_K = W_Q = [[I_x, 0], [0, 0]]: keys and queries see the x part of a token.
fn w_kq() -> Matrix {
    let mut m = [[0.0; D]; D];
    (0..DX).for_each(|i| m[i][i] = 1.0);
    m
}

/// W_V = [[0, 0], [W0, −I_y]]: a value is (0, W0 x − y), the residual of W0 on the token.
fn w_v(w0: &[f64; DX]) -> Matrix {
    let mut m = [[0.0; D]; D];
    m[DX][..DX].copy_from_slice(w0);
    m[DX][DX] = -1.0;
    m
}

fn apply(m: &Matrix, e: &[f64; D]) -> [f64; D] {
    m.map(|row| row.iter().zip(e).map(|(a, b)| a * b).sum())
}

/// The token e = (x, y).
fn token(x: &[f64; DX], y: f64) -> [f64; D] {
    let mut e = [0.0; D];
    e[..DX].copy_from_slice(x);
    e[DX] = y;
    e
}

/// One explicit gradient-descent step from W0 on L(W) = 1/(2N) Σ ‖W x_i − y_i‖²:
/// W1 = W0 − η ∇L(W0), ∇L(W) = (1/N) Σ (W x_i − y_i) x_iᵀ; returns the prediction W1 x_test.
fn gd_prediction(t: &Task, w0: &[f64; DX], eta: f64) -> f64 {
    let dot = |a: &[f64; DX], b: &[f64; DX]| a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>();
    let mut grad = [0.0; DX];
    for (x, y) in t.xs.iter().zip(&t.ys) {
        let residual = dot(w0, x) - y;
        grad.iter_mut().zip(x).for_each(|(g, xc)| *g += residual * xc / N as f64);
    }
    let w1: [f64; DX] = std::array::from_fn(|c| w0[c] - eta * grad[c]);
    dot(&w1, &t.x_test)
}

/// q = W_Q e_test, k_i = W_K e_i, v_i = W_V e_i of every task, as [TASKS, 1, N, D] tensors: the
/// context tokens give the keys and values, the test token (x_test, 0) the query, placed at
/// every query position (non-causal, so each sees the whole context).
fn layer_inputs(
    tasks: &[Task],
    w0: &[f64; DX],
    dev: &Device,
) -> metakernels::Result<(Tensor, Tensor, Tensor)> {
    let (wkq, wv) = (w_kq(), w_v(w0));
    let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
    let f32s = |e: [f64; D]| e.map(|x| x as f32);
    for t in tasks {
        let query = apply(&wkq, &token(&t.x_test, 0.0));
        for (x, &y) in t.xs.iter().zip(&t.ys) {
            let e = token(x, y);
            q.extend(f32s(query));
            k.extend(f32s(apply(&wkq, &e)));
            v.extend(f32s(apply(&wv, &e)));
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
    // The paper's setting: GD starts from W0 = 0, which W_V carries.
    let w0 = [0.0; DX];
    let (q, k, v) = layer_inputs(&tasks, &w0, &dev)?;

    // Half-MSE of the one-step GD predictor over a grid of learning rates.
    let half_mse = |eta: f64| {
        tasks.iter().map(|t| 0.5 * (gd_prediction(t, &w0, eta) - t.y_test).powi(2)).sum::<f64>()
            / TASKS as f64
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
        max_diff = max_diff.max((prediction - gd_prediction(t, &w0, best_eta)).abs());
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
