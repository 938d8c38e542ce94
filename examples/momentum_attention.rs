//! What the momentum term changes, on a small in-context task: a one-layer attention model
//! trained with this crate's forward and backward, with η = 0 (plain causal attention) and
//! η > 0 side by side, at equal steps and equal data.
//!
//! The task is in-context denoising: each sequence is a slowly drifting latent vector `z_t`
//! (a random walk) observed with heavy noise, `x_t = z_t + noise`; at every position the model
//! must output `z_t` from `x_{≤t}`. The best causal estimate is a recency-weighted average of
//! the observations, which softmax attention has to learn through its logits while momentum
//! attention's `Σ_{i<t} η^{t−i} v_i` supplies one directly.
//!
//! Model: q = X W_q, k = X W_k, v = X W_v, o = MoAttn_η(q, k, v); loss = mean ‖o_t − z_t‖².
//! The gradients of W_q, W_k, W_v come from `MomentumAttention::backward_with_state` (dq, dk,
//! dv, reusing the forward pass's saved log-sum-exps) and
//! `dW = Xᵀ d(·)`. Adam, 300 steps, the same initial weights and batches for every η.
//!
//! Run: `cargo run --release --example momentum_attention`

use metakernels::momentum_attention::{MomentumAttention, MomentumAttentionState};
use metakernels::testing::Rng;
use metakernels::{Device, Result, Tensor};

const D: usize = 64;
const T: usize = 64;
const BATCH: usize = 16;
const STEPS: usize = 300;
const NOISE: f64 = 1.0;
const DRIFT: f64 = 0.15;

fn main() -> Result<()> {
    let dev = Device::best();
    println!("in-context denoising, one attention layer, B={BATCH} T={T} D={D}, device {dev}");
    println!(
        "loss = mean squared error of o_t against the latent z_t (predicting 0 scores ≈ {:.3})",
        latent_power()
    );
    let etas = [0.0f32, 0.5, 0.8, 0.9];
    let mut curves = Vec::new();
    for &eta in &etas {
        curves.push(train(eta, &dev)?);
    }
    print!("\n{:>6}", "step");
    for eta in etas {
        print!("  {:>12}", format!("eta={eta}"));
    }
    println!();
    for (row, step) in (0..=STEPS).step_by(25).enumerate() {
        print!("{step:>6}");
        for curve in &curves {
            print!("  {:>12.4}", curve[row]);
        }
        println!();
    }
    let eval: Vec<String> =
        etas.iter().zip(&curves).map(|(e, c)| format!("eta={e}: {:.4}", c[c.len() - 1])).collect();
    println!("\nheld-out loss after {STEPS} steps: {}", eval.join(", "));
    let (lambda, ema) = best_ema_baseline();
    println!("for scale: the best hand-tuned causal moving average of x (λ = {lambda}) scores {ema:.4}");
    Ok(())
}

/// The held-out loss of `ẑ_t = λ ẑ_{t−1} + (1 − λ) x_t` (ẑ_0 = x_0) for the best λ on a grid:
/// what a model that learned the ideal recency weighting, and nothing else, would score.
fn best_ema_baseline() -> (f64, f64) {
    let (x, z) = batch(&mut Rng::new(4321));
    let loss = |lambda: f64| {
        let mut total = 0.0;
        for (xs, zs) in x.chunks_exact(T * D).zip(z.chunks_exact(T * D)) {
            let mut est = xs[..D].to_vec();
            for (t, (x_row, z_row)) in xs.chunks_exact(D).zip(zs.chunks_exact(D)).enumerate() {
                if t > 0 {
                    est.iter_mut().zip(x_row).for_each(|(e, x)| *e = lambda * *e + (1.0 - lambda) * x);
                }
                total += est.iter().zip(z_row).map(|(e, z)| (e - z).powi(2)).sum::<f64>();
            }
        }
        total / x.len() as f64
    };
    (1..20).map(|i| i as f64 * 0.05).map(|l| (l, loss(l))).fold((0.0, f64::INFINITY), |best, c| {
        if c.1 < best.1 {
            c
        } else {
            best
        }
    })
}

/// The mean of z_t² over a batch: the loss of always predicting zero.
fn latent_power() -> f64 {
    let (_, z) = batch(&mut Rng::new(99));
    z.iter().map(|v| v * v).sum::<f64>() / z.len() as f64
}

/// Trains one model; returns the held-out loss every 25 steps (and at step 0).
fn train(eta: f32, dev: &Device) -> Result<Vec<f64>> {
    let attn = MomentumAttention::new(eta);
    let mut init = Rng::new(7);
    let mut weights: Vec<Vec<f64>> = (0..3)
        .map(|_| init.normal_vec(D * D).iter().map(|w| w * 0.5 / (D as f64).sqrt()).collect())
        .collect();
    let mut adam = Adam::new(3 * D * D);
    let mut data = Rng::new(1234);
    let held_out = batch(&mut Rng::new(4321));
    let mut curve = vec![loss_only(&attn, &weights, &held_out, dev)?];
    for step in 1..=STEPS {
        let (x, z) = batch(&mut data);
        let grads = loss_and_grads(&attn, &weights, &x, &z, dev)?;
        adam.step(&mut weights, &grads);
        if step % 25 == 0 {
            curve.push(loss_only(&attn, &weights, &held_out, dev)?);
        }
    }
    Ok(curve)
}

/// A batch of observations x and latents z, each [BATCH, T, D] row-major.
fn batch(rng: &mut Rng) -> (Vec<f64>, Vec<f64>) {
    let mut x = Vec::with_capacity(BATCH * T * D);
    let mut z = Vec::with_capacity(BATCH * T * D);
    for _ in 0..BATCH {
        let mut latent = rng.normal_vec(D);
        for _ in 0..T {
            for l in latent.iter_mut() {
                *l += DRIFT * rng.normal();
            }
            z.extend_from_slice(&latent);
            x.extend(latent.iter().map(|l| l + NOISE * rng.normal()));
        }
    }
    (x, z)
}

/// [BATCH·T, D] · [D, D].
fn matmul(x: &[f64], w: &[f64]) -> Vec<f64> {
    let mut out = vec![0.0; x.len()];
    for (row, out_row) in x.chunks_exact(D).zip(out.chunks_exact_mut(D)) {
        for (a, w_row) in row.iter().zip(w.chunks_exact(D)) {
            out_row.iter_mut().zip(w_row).for_each(|(o, w)| *o += a * w);
        }
    }
    out
}

/// Xᵀ · G for X, G of [BATCH·T, D]: the weight gradient of a projection.
fn weight_grad(x: &[f64], g: &[f64]) -> Vec<f64> {
    let mut out = vec![0.0; D * D];
    for (x_row, g_row) in x.chunks_exact(D).zip(g.chunks_exact(D)) {
        for (a, out_row) in x_row.iter().zip(out.chunks_exact_mut(D)) {
            out_row.iter_mut().zip(g_row).for_each(|(o, g)| *o += a * g);
        }
    }
    out
}

fn tensor(values: &[f64], dev: &Device) -> Result<Tensor> {
    let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
    Tensor::from_vec(v, &[BATCH, 1, T, D], dev)
}

/// q, k, v of the layer and the forward state (output plus what the backward pass needs).
fn forward(
    attn: &MomentumAttention,
    w: &[Vec<f64>],
    x: &[f64],
    dev: &Device,
) -> Result<([Tensor; 3], MomentumAttentionState)> {
    let q = tensor(&matmul(x, &w[0]), dev)?;
    let k = tensor(&matmul(x, &w[1]), dev)?;
    let v = tensor(&matmul(x, &w[2]), dev)?;
    let state = attn.forward_with_state(&q, &k, &v)?;
    Ok(([q, k, v], state))
}

fn loss_only(
    attn: &MomentumAttention,
    w: &[Vec<f64>],
    data: &(Vec<f64>, Vec<f64>),
    dev: &Device,
) -> Result<f64> {
    let (_, state) = forward(attn, w, &data.0, dev)?;
    let o = state.output().to_vec::<f32>()?;
    Ok(o.iter().zip(&data.1).map(|(o, z)| (*o as f64 - z).powi(2)).sum::<f64>() / o.len() as f64)
}

fn loss_and_grads(
    attn: &MomentumAttention,
    w: &[Vec<f64>],
    x: &[f64],
    z: &[f64],
    dev: &Device,
) -> Result<Vec<Vec<f64>>> {
    let ([q, k, v], state) = forward(attn, w, x, dev)?;
    let o = state.output().to_vec::<f32>()?;
    let scale = 2.0 / o.len() as f64;
    let grad_out: Vec<f64> = o.iter().zip(z).map(|(o, z)| scale * (*o as f64 - z)).collect();
    let grads = attn.backward_with_state(&q, &k, &v, &state, &tensor(&grad_out, dev)?)?;
    [grads.dq, grads.dk, grads.dv]
        .iter()
        .map(|g| {
            let g: Vec<f64> = g.to_vec::<f32>()?.into_iter().map(f64::from).collect();
            Ok(weight_grad(x, &g))
        })
        .collect()
}

/// Adam (β₁ 0.9, β₂ 0.999, lr 1e-2) over the three weight matrices as one vector.
struct Adam {
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
}

impl Adam {
    fn new(n: usize) -> Self {
        Adam { m: vec![0.0; n], v: vec![0.0; n], t: 0 }
    }

    fn step(&mut self, weights: &mut [Vec<f64>], grads: &[Vec<f64>]) {
        let (lr, b1, b2, eps) = (1e-2, 0.9, 0.999, 1e-8);
        self.t += 1;
        let (c1, c2) = (1.0 - f64::powi(b1, self.t), 1.0 - f64::powi(b2, self.t));
        let params = weights.iter_mut().flat_map(|w| w.iter_mut());
        let gs = grads.iter().flat_map(|g| g.iter());
        for (((w, g), m), v) in params.zip(gs).zip(&mut self.m).zip(&mut self.v) {
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            *w -= lr * (*m / c1) / ((*v / c2).sqrt() + eps);
        }
    }
}
