//! Float64 references for momentum attention, written the obvious way (explicit sums, one
//! query at a time) so that they share no code or tiling with the kernels under test.

/// Shape of one call: `bh` heads of `t × d`.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub bh: usize,
    pub t: usize,
    pub d: usize,
}

/// Causal softmax attention (no momentum), `[bh, t, d]`.
pub fn attention(q: &[f64], k: &[f64], v: &[f64], dims: Dims, scale: f64) -> Vec<f64> {
    let Dims { bh, t, d } = dims;
    let mut out = vec![0.0; bh * t * d];
    for h in 0..bh {
        let at = |x: &[f64], i: usize| -> Vec<f64> { x[(h * t + i) * d..(h * t + i + 1) * d].to_vec() };
        for i in 0..t {
            let p = probabilities(&at(q, i), (0..=i).map(|s| at(k, s)), scale);
            for (s, p_s) in p.iter().enumerate() {
                let v_s = at(v, s);
                for c in 0..d {
                    out[(h * t + i) * d + c] += p_s * v_s[c];
                }
            }
        }
    }
    out
}

/// The momentum term Σ_{i<t} η^{t−i} v_i, as an explicit double sum.
pub fn momentum(v: &[f64], dims: Dims, eta: f64) -> Vec<f64> {
    let Dims { bh, t, d } = dims;
    let mut out = vec![0.0; bh * t * d];
    for h in 0..bh {
        for i in 0..t {
            for s in 0..i {
                let w = eta.powi((i - s) as i32);
                for c in 0..d {
                    out[(h * t + i) * d + c] += w * v[(h * t + s) * d + c];
                }
            }
        }
    }
    out
}

/// Momentum attention: attention plus momentum.
pub fn forward(q: &[f64], k: &[f64], v: &[f64], dims: Dims, eta: f64, scale: f64) -> Vec<f64> {
    let a = attention(q, k, v, dims, scale);
    let m = momentum(v, dims, eta);
    a.iter().zip(&m).map(|(a, m)| a + m).collect()
}

/// (dq, dk, dv) of momentum attention for `grad` = ∂L/∂o, by the analytic softmax gradient.
pub fn backward(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    grad: &[f64],
    dims: Dims,
    eta: f64,
    scale: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let Dims { bh, t, d } = dims;
    let n = bh * t * d;
    let (mut dq, mut dk, mut dv) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    let row = |h: usize, i: usize| (h * t + i) * d..(h * t + i + 1) * d;
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    for h in 0..bh {
        for i in 0..t {
            let g = &grad[row(h, i)];
            let p = probabilities(&q[row(h, i)], (0..=i).map(|s| k[row(h, s)].to_vec()), scale);
            let dp: Vec<f64> = (0..=i).map(|s| dot(g, &v[row(h, s)])).collect();
            let mean: f64 = p.iter().zip(&dp).map(|(p, dp)| p * dp).sum();
            for s in 0..=i {
                let ds = p[s] * (dp[s] - mean);
                for c in 0..d {
                    dv[row(h, s).start + c] += p[s] * g[c];
                    dq[row(h, i).start + c] += scale * ds * k[row(h, s).start + c];
                    dk[row(h, s).start + c] += scale * ds * q[row(h, i).start + c];
                }
            }
            // Momentum: o_i depends on v_s (s < i) with weight η^{i−s}.
            for s in 0..i {
                let w = eta.powi((i - s) as i32);
                for c in 0..d {
                    dv[row(h, s).start + c] += w * g[c];
                }
            }
        }
    }
    (dq, dk, dv)
}

/// softmax_s(scale · q·k_s), computed stably.
fn probabilities(q: &[f64], keys: impl Iterator<Item = Vec<f64>>, scale: f64) -> Vec<f64> {
    let logits: Vec<f64> = keys.map(|k| scale * q.iter().zip(&k).map(|(a, b)| a * b).sum::<f64>()).collect();
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|x| x / sum).collect()
}
