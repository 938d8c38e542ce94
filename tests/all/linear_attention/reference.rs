//! Float64 references for the linear-attention tests: the step-by-step recurrence (obviously
//! correct, O(T·Dk·Dv)), a scalar loss over all outputs, and central finite differences.

#![allow(clippy::needless_range_loop)] // index loops mirror the formulas

use metakernels::linear_attention::{FeatureMap, LinearAttention};

/// One (sequence, head): rows `row0..row0+len` of the `[rows, D]` views; state number `state`.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    pub row0: usize,
    pub len: usize,
    pub state: usize,
}

/// Segments of the dense `[B,H,T,D]` layout.
pub fn dense_segments(bh: usize, t: usize) -> Vec<Seg> {
    (0..bh).map(|i| Seg { row0: i * t, len: t, state: i }).collect()
}

/// Segments of the packed `[1,H,ΣT,D]` layout.
pub fn varlen_segments(h: usize, cu: &[usize]) -> Vec<Seg> {
    let total = cu[cu.len() - 1];
    let mut out = Vec::new();
    for head in 0..h {
        for (n, w) in cu.windows(2).enumerate() {
            out.push(Seg { row0: head * total + w[0], len: w[1] - w[0], state: n * h + head });
        }
    }
    out
}

/// Inputs of the reference, all float64, row-major.
#[derive(Clone, Debug)]
pub struct Inputs {
    pub q: Vec<f64>,
    pub k: Vec<f64>,
    pub v: Vec<f64>,
    pub s0: Option<Vec<f64>>,
    pub z0: Option<Vec<f64>>,
}

/// Outputs of the reference.
#[derive(Clone, Debug)]
pub struct Outputs {
    pub o: Vec<f64>,
    pub s: Vec<f64>,
    pub z: Vec<f64>,
}

pub fn phi(fm: FeatureMap, x: f64) -> f64 {
    match fm {
        FeatureMap::Identity => x,
        FeatureMap::EluPlusOne => {
            if x > 0.0 {
                x + 1.0
            } else {
                x.exp()
            }
        }
        FeatureMap::Relu => x.max(0.0),
    }
}

/// The layer in float64, step by step; `eta` adds the momentum term.
pub fn forward(
    cfg: &LinearAttention,
    eta: Option<f64>,
    x: &Inputs,
    segs: &[Seg],
    dk: usize,
    dv: usize,
) -> Outputs {
    let rows = x.q.len() / dk;
    let mut o = vec![0.0; rows * dv];
    let mut s_all = vec![0.0; segs.len() * dk * dv];
    let mut z_all = vec![0.0; segs.len() * dk];
    let fm = cfg.feature_map;
    for seg in segs {
        let mut s: Vec<f64> = match &x.s0 {
            Some(s0) => s0[seg.state * dk * dv..(seg.state + 1) * dk * dv].to_vec(),
            None => vec![0.0; dk * dv],
        };
        let mut z: Vec<f64> = match &x.z0 {
            Some(z0) => z0[seg.state * dk..(seg.state + 1) * dk].to_vec(),
            None => vec![0.0; dk],
        };
        let add = |s: &mut Vec<f64>, z: &mut Vec<f64>, r: usize| {
            for i in 0..dk {
                let kf = phi(fm, x.k[r * dk + i]);
                z[i] += kf;
                for j in 0..dv {
                    s[i * dv + j] += kf * x.v[r * dv + j];
                }
            }
        };
        if !cfg.causal {
            for r in seg.row0..seg.row0 + seg.len {
                add(&mut s, &mut z, r);
            }
        }
        let mut m = vec![0.0; dv];
        for r in seg.row0..seg.row0 + seg.len {
            if cfg.causal {
                add(&mut s, &mut z, r);
            }
            let qf: Vec<f64> = (0..dk).map(|i| phi(fm, x.q[r * dk + i])).collect();
            let den: f64 = qf.iter().zip(&z).map(|(a, b)| a * b).sum::<f64>() + cfg.eps as f64;
            for j in 0..dv {
                let num: f64 = (0..dk).map(|i| qf[i] * s[i * dv + j]).sum();
                let mut y = cfg.scale as f64 * num;
                if cfg.normalize {
                    y /= den;
                }
                o[r * dv + j] = y + m[j];
            }
            if let Some(eta) = eta {
                for j in 0..dv {
                    m[j] = eta * (m[j] + x.v[r * dv + j]);
                }
            }
        }
        s_all[seg.state * dk * dv..(seg.state + 1) * dk * dv].copy_from_slice(&s);
        z_all[seg.state * dk..(seg.state + 1) * dk].copy_from_slice(&z);
    }
    Outputs { o, s: s_all, z: z_all }
}

/// Weights of a scalar loss L = Σ w_o·o + Σ w_s·S_T + Σ w_z·z_T.
#[derive(Clone, Debug)]
pub struct LossWeights {
    pub wo: Vec<f64>,
    pub ws: Option<Vec<f64>>,
    pub wz: Option<Vec<f64>>,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

pub fn loss(out: &Outputs, w: &LossWeights) -> f64 {
    dot(&out.o, &w.wo)
        + w.ws.as_ref().map_or(0.0, |ws| dot(&out.s, ws))
        + w.wz.as_ref().map_or(0.0, |wz| dot(&out.z, wz))
}

/// Central finite-difference gradients of the loss with respect to q, k, v, s0, z0.
pub struct FdGrads {
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
    pub ds0: Vec<f64>,
    pub dz0: Vec<f64>,
}

pub fn finite_differences(
    cfg: &LinearAttention,
    eta: Option<f64>,
    x: &Inputs,
    segs: &[Seg],
    dk: usize,
    dv: usize,
    w: &LossWeights,
) -> FdGrads {
    let along = |x: &Inputs, pick: &dyn Fn(&mut Inputs) -> &mut Vec<f64>, len: usize| -> Vec<f64> {
        (0..len).map(|i| finite_difference_at(cfg, eta, x, segs, dk, dv, w, pick, i)).collect()
    };
    let grad = |pick: &dyn Fn(&mut Inputs) -> &mut Vec<f64>, len: usize| along(x, pick, len);
    let states = segs.len();
    let mut with_state = x.clone();
    with_state.s0.get_or_insert_with(|| vec![0.0; states * dk * dv]);
    with_state.z0.get_or_insert_with(|| vec![0.0; states * dk]);
    let grad_state = |pick: &dyn Fn(&mut Inputs) -> &mut Vec<f64>, len: usize| along(&with_state, pick, len);
    FdGrads {
        dq: grad(&|x| &mut x.q, x.q.len()),
        dk: grad(&|x| &mut x.k, x.k.len()),
        dv: grad(&|x| &mut x.v, x.v.len()),
        // invariant: `with_state` holds both states.
        ds0: grad_state(&|x| x.s0.as_mut().unwrap(), states * dk * dv),
        dz0: grad_state(&|x| x.z0.as_mut().unwrap(), states * dk),
    }
}

/// The central finite difference of the loss along one input element: `pick` chooses the tensor
/// (q, k, v, or a present s0 / z0), `i` the element. For shapes too wide to difference whole.
#[allow(clippy::too_many_arguments)]
pub fn finite_difference_at(
    cfg: &LinearAttention,
    eta: Option<f64>,
    x: &Inputs,
    segs: &[Seg],
    dk: usize,
    dv: usize,
    w: &LossWeights,
    pick: &dyn Fn(&mut Inputs) -> &mut Vec<f64>,
    i: usize,
) -> f64 {
    const H: f64 = 1e-5;
    let mut x = x.clone();
    let orig = pick(&mut x)[i];
    pick(&mut x)[i] = orig + H;
    let up = loss(&forward(cfg, eta, &x, segs, dk, dv), w);
    pick(&mut x)[i] = orig - H;
    let down = loss(&forward(cfg, eta, &x, segs, dk, dv), w);
    (up - down) / (2.0 * H)
}
