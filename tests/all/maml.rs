//! Tests of the maml family: forward against a naive f64 reference, gradients and exact HVPs
//! against central finite differences (every activation and loss), HVP symmetry, the
//! meta-gradient against finite differences of the whole adapted query loss (k = 1, 2, 5), the
//! closed form on a linear model, first vs second order, broadcasting, f32 vs f64, errors, and
//! (on a GPU) the fused and global-memory kernels against the reference kernel and the CPU.

#[path = "maml/cuda.rs"]
mod cuda;

use metakernels::maml::{Activation, Loss, Maml, MetaGradient, Mlp, Order, TaskBatch};
use metakernels::testing::{assert_close, from_f64, set_poisoning, to_f64, Rng};
use metakernels::{DType, Device, Error, Tensor};

const ACTIVATIONS: [Activation; 4] =
    [Activation::Relu, Activation::Tanh, Activation::Gelu, Activation::Softplus];
const LOSSES: [Loss; 2] = [Loss::Mse, Loss::SoftmaxCrossEntropy];

fn mlp(sizes: &[usize], activation: Activation, loss: Loss) -> Mlp {
    Mlp { sizes: sizes.to_vec(), activation, loss }
}

/// Random data of one problem: params [T,P], x [T,N,in], y (targets or labels), as tensors on
/// `dev` of `dtype` plus their f64 values.
struct Problem {
    params: Tensor,
    x: Tensor,
    y: Tensor,
    params64: Vec<f64>,
}

fn targets(net: &Mlp, tasks: usize, n: usize, dtype: DType, dev: &Device, rng: &mut Rng) -> Tensor {
    let out = *net.sizes.last().unwrap();
    match net.loss {
        Loss::Mse => from_f64(&rng.normal_vec(tasks * n * out), &[tasks, n, out], dtype, dev).unwrap().0,
        Loss::SoftmaxCrossEntropy => {
            let labels: Vec<u32> = (0..tasks * n).map(|_| rng.below(out as u64) as u32).collect();
            Tensor::from_slice(&labels, &[tasks, n], dev).unwrap()
        }
    }
}

fn inputs(net: &Mlp, tasks: usize, n: usize, dtype: DType, dev: &Device, rng: &mut Rng) -> Tensor {
    from_f64(&rng.normal_vec(tasks * n * net.sizes[0]), &[tasks, n, net.sizes[0]], dtype, dev).unwrap().0
}

fn problem(net: &Mlp, tasks: usize, n: usize, dtype: DType, dev: &Device, seed: u64) -> Problem {
    let mut rng = Rng::new(seed);
    let p = net.num_params();
    let values: Vec<f64> = rng.normal_vec(tasks * p).iter().map(|v| 0.7 * v).collect();
    let (params, params64) = from_f64(&values, &[tasks, p], dtype, dev).unwrap();
    let x = inputs(net, tasks, n, dtype, dev, &mut rng);
    let y = targets(net, tasks, n, dtype, dev, &mut rng);
    Problem { params, x, y, params64 }
}

fn f64_tensor(values: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_slice(values, shape, &Device::cpu()).unwrap()
}

fn losses_at(net: &Mlp, params: &[f64], shape: &[usize], x: &Tensor, y: &Tensor) -> Vec<f64> {
    to_f64(&net.loss_and_grad(&f64_tensor(params, shape), x, y).unwrap().0).unwrap()
}

fn grads_at(net: &Mlp, params: &[f64], shape: &[usize], x: &Tensor, y: &Tensor) -> Vec<f64> {
    to_f64(&net.loss_and_grad(&f64_tensor(params, shape), x, y).unwrap().1).unwrap()
}

fn shifted(base: &[f64], dir: &[f64], eps: f64) -> Vec<f64> {
    base.iter().zip(dir).map(|(b, d)| b + eps * d).collect()
}

// ------------------------------------------------------------------------------------------
// A naive f64 reference forward pass and loss, written independently of the library.

fn act_value(a: Activation, z: f64) -> f64 {
    match a {
        Activation::Relu => z.max(0.0),
        Activation::Tanh => z.tanh(),
        Activation::Gelu => {
            0.5 * z * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (z + 0.044715 * z.powi(3))).tanh())
        }
        Activation::Softplus => (1.0 + z.exp()).ln(),
    }
}

fn naive_forward(net: &Mlp, p: &[f64], x: &[f64]) -> Vec<f64> {
    let mut h = x.to_vec();
    let mut offset = 0;
    let layers = net.sizes.len() - 1;
    for l in 0..layers {
        let (fi, fo) = (net.sizes[l], net.sizes[l + 1]);
        let w = &p[offset..offset + fo * fi];
        let b = &p[offset + fo * fi..offset + fo * fi + fo];
        offset += fo * fi + fo;
        let z: Vec<f64> =
            (0..fo).map(|o| b[o] + (0..fi).map(|i| w[o * fi + i] * h[i]).sum::<f64>()).collect();
        h = if l + 1 < layers { z.iter().map(|&v| act_value(net.activation, v)).collect() } else { z };
    }
    h
}

#[test]
fn forward_and_loss_match_naive_reference() {
    set_poisoning(true);
    let dev = Device::cpu();
    for act in ACTIVATIONS {
        for loss in LOSSES {
            let net = mlp(&[3, 7, 5, 4], act, loss);
            let (tasks, n) = (3, 6);
            let pr = problem(&net, tasks, n, DType::F64, &dev, 11);
            let x = to_f64(&pr.x).unwrap();
            let y = to_f64(&pr.y).unwrap();
            let out = to_f64(&net.forward(&pr.params, &pr.x).unwrap()).unwrap();
            let losses = to_f64(&net.loss_and_grad(&pr.params, &pr.x, &pr.y).unwrap().0).unwrap();
            let p = net.num_params();
            let mut want_out = Vec::new();
            let mut want_loss = Vec::new();
            for t in 0..tasks {
                let mut total = 0.0;
                for s in 0..n {
                    let o = naive_forward(&net, &pr.params64[t * p..(t + 1) * p], &x[(t * n + s) * 3..][..3]);
                    total += match loss {
                        Loss::Mse => {
                            o.iter()
                                .zip(&y[(t * n + s) * 4..][..4])
                                .map(|(a, b)| (a - b).powi(2))
                                .sum::<f64>()
                                / 4.0
                        }
                        _ => {
                            let lse = o.iter().map(|v| v.exp()).sum::<f64>().ln();
                            lse - o[y[t * n + s] as usize]
                        }
                    };
                    want_out.extend(o);
                }
                want_loss.push(total / n as f64);
            }
            assert_close(&format!("forward {act:?} {loss:?}"), &out, &want_out, 1e-13);
            assert_close(&format!("loss {act:?} {loss:?}"), &losses, &want_loss, 1e-13);
        }
    }
}

#[test]
fn gradient_matches_central_differences_of_the_loss() {
    set_poisoning(true);
    let dev = Device::cpu();
    for act in ACTIVATIONS {
        for loss in LOSSES {
            let net = mlp(&[3, 6, 5, 4], act, loss);
            let (tasks, p) = (2, net.num_params());
            let pr = problem(&net, tasks, 5, DType::F64, &dev, 21);
            let grad = grads_at(&net, &pr.params64, &[tasks, p], &pr.x, &pr.y);
            let mut rng = Rng::new(5);
            for _ in 0..3 {
                let v = rng.normal_vec(tasks * p);
                let eps = 1e-6;
                let plus = losses_at(&net, &shifted(&pr.params64, &v, eps), &[tasks, p], &pr.x, &pr.y);
                let minus = losses_at(&net, &shifted(&pr.params64, &v, -eps), &[tasks, p], &pr.x, &pr.y);
                let fd: Vec<f64> = plus.iter().zip(&minus).map(|(a, b)| (a - b) / (2.0 * eps)).collect();
                let exact: Vec<f64> =
                    (0..tasks).map(|t| (0..p).map(|i| grad[t * p + i] * v[t * p + i]).sum()).collect();
                assert_close(&format!("grad·v {act:?} {loss:?}"), &exact, &fd, 1e-7);
            }
        }
    }
}

#[test]
fn hvp_matches_central_differences_of_the_gradient() {
    set_poisoning(true);
    let dev = Device::cpu();
    for act in ACTIVATIONS {
        for loss in LOSSES {
            let net = mlp(&[3, 6, 5, 4], act, loss);
            let (tasks, p) = (3, net.num_params());
            let pr = problem(&net, tasks, 5, DType::F64, &dev, 31);
            let v = Rng::new(7).normal_vec(tasks * p);
            let hv =
                to_f64(&net.hvp(&pr.params, &pr.x, &pr.y, &f64_tensor(&v, &[tasks, p])).unwrap()).unwrap();
            let eps = 1e-5;
            let plus = grads_at(&net, &shifted(&pr.params64, &v, eps), &[tasks, p], &pr.x, &pr.y);
            let minus = grads_at(&net, &shifted(&pr.params64, &v, -eps), &[tasks, p], &pr.x, &pr.y);
            let fd: Vec<f64> = plus.iter().zip(&minus).map(|(a, b)| (a - b) / (2.0 * eps)).collect();
            assert_close(&format!("hvp {act:?} {loss:?}"), &hv, &fd, 1e-6);
        }
    }
}

#[test]
fn hvp_is_symmetric() {
    set_poisoning(true);
    let dev = Device::cpu();
    for act in ACTIVATIONS {
        for loss in LOSSES {
            let net = mlp(&[4, 8, 3], act, loss);
            let (tasks, p) = (2, net.num_params());
            let pr = problem(&net, tasks, 7, DType::F64, &dev, 41);
            let mut rng = Rng::new(3);
            let (u, v) = (rng.normal_vec(tasks * p), rng.normal_vec(tasks * p));
            let hu =
                to_f64(&net.hvp(&pr.params, &pr.x, &pr.y, &f64_tensor(&u, &[tasks, p])).unwrap()).unwrap();
            let hv =
                to_f64(&net.hvp(&pr.params, &pr.x, &pr.y, &f64_tensor(&v, &[tasks, p])).unwrap()).unwrap();
            for t in 0..tasks {
                let r = t * p..(t + 1) * p;
                let u_hv: f64 = u[r.clone()].iter().zip(&hv[r.clone()]).map(|(a, b)| a * b).sum();
                let v_hu: f64 = v[r.clone()].iter().zip(&hu[r]).map(|(a, b)| a * b).sum();
                assert_close(&format!("uᵀHv = vᵀHu {act:?} {loss:?}"), &[u_hv], &[v_hu], 1e-12);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// MAML.

fn batch(net: &Mlp, tasks: usize, ns: usize, nq: usize, dtype: DType, dev: &Device, seed: u64) -> TaskBatch {
    let mut rng = Rng::new(seed);
    TaskBatch {
        support_x: inputs(net, tasks, ns, dtype, dev, &mut rng),
        support_y: targets(net, tasks, ns, dtype, dev, &mut rng),
        query_x: inputs(net, tasks, nq, dtype, dev, &mut rng),
        query_y: targets(net, tasks, nq, dtype, dev, &mut rng),
    }
}

fn maml(k: usize, lr: f64, order: Order) -> Maml {
    Maml { inner_steps: k, inner_lr: lr, order, return_adapted: true }
}

/// The mean adapted query loss, computed from the public `loss_and_grad` alone.
fn adapted_query_loss(net: &Mlp, theta: &[f64], b: &TaskBatch, k: usize, lr: f64) -> f64 {
    let tasks = b.support_x.shape()[0];
    let p = theta.len();
    let mut params: Vec<f64> = (0..tasks).flat_map(|_| theta.iter().copied()).collect();
    for _ in 0..k {
        let g = grads_at(net, &params, &[tasks, p], &b.support_x, &b.support_y);
        params.iter_mut().zip(&g).for_each(|(q, g)| *q -= lr * g);
    }
    losses_at(net, &params, &[tasks, p], &b.query_x, &b.query_y).iter().sum::<f64>() / tasks as f64
}

fn meta(m: &Maml, net: &Mlp, theta: &Tensor, b: &TaskBatch) -> (MetaGradient, Vec<f64>) {
    let out = m.meta_gradient(net, theta, b).unwrap();
    let g = to_f64(&out.grad).unwrap();
    (out, g)
}

#[test]
fn meta_gradient_matches_finite_differences_of_the_adapted_query_loss() {
    set_poisoning(true);
    let dev = Device::cpu();
    let cases = [
        (Activation::Tanh, Loss::Mse),
        (Activation::Softplus, Loss::SoftmaxCrossEntropy),
        (Activation::Gelu, Loss::Mse),
    ];
    for (act, loss) in cases {
        let net = mlp(&[2, 5, 3], act, loss);
        let p = net.num_params();
        let b = batch(&net, 3, 6, 4, DType::F64, &dev, 51);
        let theta64: Vec<f64> = Rng::new(9).normal_vec(p).iter().map(|v| 0.8 * v).collect();
        let theta = f64_tensor(&theta64, &[p]);
        for k in [1, 2, 5] {
            let lr = 0.15;
            let (out, g) = meta(&maml(k, lr, Order::Second), &net, &theta, &b);
            let f0 = adapted_query_loss(&net, &theta64, &b, k, lr);
            assert_close(&format!("meta-loss k={k} {act:?} {loss:?}"), &[out.loss], &[f0], 1e-13);
            let eps = 1e-5;
            let fd: Vec<f64> = (0..p)
                .map(|i| {
                    let mut e = vec![0.0; p];
                    e[i] = 1.0;
                    let plus = adapted_query_loss(&net, &shifted(&theta64, &e, eps), &b, k, lr);
                    let minus = adapted_query_loss(&net, &shifted(&theta64, &e, -eps), &b, k, lr);
                    (plus - minus) / (2.0 * eps)
                })
                .collect();
            assert_close(&format!("meta-gradient k={k} {act:?} {loss:?}"), &g, &fd, 1e-7);
        }
    }
}

#[test]
fn meta_gradient_matches_closed_form_on_a_linear_model() {
    // One dense layer with MSE: H = 2/(N·out) · blockdiag_o(Σ x̃ x̃ᵀ), x̃ = [x, 1], constant in θ,
    // so the meta-gradient is (I − αH_s)^k ∇L_q(θ_k), all computed here from scratch.
    set_poisoning(true);
    let (d_in, d_out, tasks, ns, nq) = (4, 3, 3, 7, 5);
    let net = mlp(&[d_in, d_out], Activation::Tanh, Loss::Mse);
    let p = net.num_params();
    let b = batch(&net, tasks, ns, nq, DType::F64, &Device::cpu(), 61);
    let (xs, ys) = (to_f64(&b.support_x).unwrap(), to_f64(&b.support_y).unwrap());
    let (xq, yq) = (to_f64(&b.query_x).unwrap(), to_f64(&b.query_y).unwrap());
    let theta64 = Rng::new(4).normal_vec(p);
    let theta = f64_tensor(&theta64, &[p]);
    // θ index of W[o][i] and b[o].
    let wi = |o: usize, i: usize| o * d_in + i;
    let bi = |o: usize| d_out * d_in + o;
    let xt = |x: &[f64], s: usize, i: usize| if i < d_in { x[s * d_in + i] } else { 1.0 };
    let idx = |o: usize, i: usize| if i < d_in { wi(o, i) } else { bi(o) };
    let hessian = |x: &[f64], n: usize| {
        let mut h = vec![0.0; p * p];
        let scale = 2.0 / (n * d_out) as f64;
        for o in 0..d_out {
            for i in 0..=d_in {
                for j in 0..=d_in {
                    let s: f64 = (0..n).map(|s| xt(x, s, i) * xt(x, s, j)).sum();
                    h[idx(o, i) * p + idx(o, j)] = scale * s;
                }
            }
        }
        h
    };
    let gradient = |th: &[f64], x: &[f64], y: &[f64], n: usize| {
        let mut g = vec![0.0; p];
        let scale = 2.0 / (n * d_out) as f64;
        for s in 0..n {
            for o in 0..d_out {
                let pred: f64 = th[bi(o)] + (0..d_in).map(|i| th[wi(o, i)] * x[s * d_in + i]).sum::<f64>();
                let e = pred - y[s * d_out + o];
                for i in 0..=d_in {
                    g[idx(o, i)] += scale * e * xt(x, s, i);
                }
            }
        }
        g
    };
    for k in [1, 3] {
        let lr = 0.2;
        let (_, got) = meta(&maml(k, lr, Order::Second), &net, &theta, &b);
        let mut want = vec![0.0; p];
        for t in 0..tasks {
            let (xs_t, ys_t) = (&xs[t * ns * d_in..][..ns * d_in], &ys[t * ns * d_out..][..ns * d_out]);
            let mut th = theta64.clone();
            for _ in 0..k {
                let g = gradient(&th, xs_t, ys_t, ns);
                th.iter_mut().zip(&g).for_each(|(a, g)| *a -= lr * g);
            }
            let mut g =
                gradient(&th, &xq[t * nq * d_in..][..nq * d_in], &yq[t * nq * d_out..][..nq * d_out], nq);
            let h = hessian(xs_t, ns);
            for _ in 0..k {
                let hg: Vec<f64> = (0..p).map(|r| (0..p).map(|c| h[r * p + c] * g[c]).sum()).collect();
                g.iter_mut().zip(&hg).for_each(|(a, b)| *a -= lr * b);
            }
            want.iter_mut().zip(&g).for_each(|(w, g)| *w += g / tasks as f64);
        }
        assert_close(&format!("closed form k={k}"), &got, &want, 1e-12);
    }
}

#[test]
fn first_and_second_order_differ_exactly_by_the_hvp_terms() {
    set_poisoning(true);
    let net = mlp(&[3, 6, 2], Activation::Gelu, Loss::SoftmaxCrossEntropy);
    let (p, tasks, k, lr) = (net.num_params(), 4, 3, 0.3);
    let b = batch(&net, tasks, 5, 5, DType::F64, &Device::cpu(), 71);
    let theta64: Vec<f64> = Rng::new(8).normal_vec(p);
    let theta = f64_tensor(&theta64, &[p]);
    let (first, g1) = meta(&maml(k, lr, Order::First), &net, &theta, &b);
    let (second, g2) = meta(&maml(k, lr, Order::Second), &net, &theta, &b);
    // Rebuild both from the public gradient and HVP: iterates θ_j, g = ∇L_q(θ_k), then the HVP terms.
    let mut iterates = vec![(0..tasks).flat_map(|_| theta64.iter().copied()).collect::<Vec<f64>>()];
    for _ in 0..k {
        let cur = iterates.last().unwrap().clone();
        let g = grads_at(&net, &cur, &[tasks, p], &b.support_x, &b.support_y);
        iterates.push(cur.iter().zip(&g).map(|(a, g)| a - lr * g).collect());
    }
    let query_grad = grads_at(&net, &iterates[k], &[tasks, p], &b.query_x, &b.query_y);
    let mean = |v: &[f64]| {
        (0..p).map(|i| (0..tasks).map(|t| v[t * p + i]).sum::<f64>() / tasks as f64).collect::<Vec<_>>()
    };
    assert_close("first order = mean query gradient", &g1, &mean(&query_grad), 1e-13);
    let mut g = query_grad.clone();
    for j in (0..k).rev() {
        let it = f64_tensor(&iterates[j], &[tasks, p]);
        let hg =
            to_f64(&net.hvp(&it, &b.support_x, &b.support_y, &f64_tensor(&g, &[tasks, p])).unwrap()).unwrap();
        g.iter_mut().zip(&hg).for_each(|(a, h)| *a -= lr * h);
    }
    let hvp_terms: Vec<f64> = mean(&g).iter().zip(&mean(&query_grad)).map(|(a, b)| a - b).collect();
    let diff: Vec<f64> = g2.iter().zip(&g1).map(|(a, b)| a - b).collect();
    assert_close("second − first = HVP terms", &diff, &hvp_terms, 1e-12);
    assert_eq!(first.loss, second.loss, "the meta-loss does not depend on the order");
    let adapted = to_f64(second.adapted.as_ref().unwrap()).unwrap();
    assert_close("adapted parameters", &adapted, &iterates[k], 1e-14);
}

#[test]
fn broadcast_row_equals_repeated_rows() {
    set_poisoning(true);
    let dev = Device::cpu();
    for loss in LOSSES {
        let net = mlp(&[3, 5, 4], Activation::Tanh, loss);
        let (tasks, p) = (3, net.num_params());
        let pr = problem(&net, tasks, 4, DType::F64, &dev, 81);
        let row = &pr.params64[..p];
        let repeated: Vec<f64> = (0..tasks).flat_map(|_| row.iter().copied()).collect();
        let (one, many) = (f64_tensor(row, &[p]), f64_tensor(&repeated, &[tasks, p]));
        let v = Rng::new(2).normal_vec(p);
        let v_many: Vec<f64> = (0..tasks).flat_map(|_| v.iter().copied()).collect();
        let (v1, vn) = (f64_tensor(&v, &[p]), f64_tensor(&v_many, &[tasks, p]));
        let f = |t: &Tensor| to_f64(t).unwrap();
        assert_eq!(f(&net.forward(&one, &pr.x).unwrap()), f(&net.forward(&many, &pr.x).unwrap()));
        let (l1, g1) = net.loss_and_grad(&one, &pr.x, &pr.y).unwrap();
        let (ln, gn) = net.loss_and_grad(&many, &pr.x, &pr.y).unwrap();
        assert_eq!((f(&l1), f(&g1)), (f(&ln), f(&gn)));
        let h1 = f(&net.hvp(&one, &pr.x, &pr.y, &v1).unwrap());
        assert_eq!(h1, f(&net.hvp(&many, &pr.x, &pr.y, &vn).unwrap()));
        assert_eq!(h1, f(&net.hvp(&many, &pr.x, &pr.y, &v1).unwrap()));
    }
}

#[test]
fn f32_matches_f64() {
    set_poisoning(true);
    let dev = Device::cpu();
    for act in ACTIVATIONS {
        let net = mlp(&[3, 16, 16, 2], act, Loss::Mse);
        let (tasks, p) = (3, net.num_params());
        // f32 inputs, and the same (already rounded) values computed in f64.
        let pr32 = problem(&net, tasks, 9, DType::F32, &dev, 91);
        let pr64r = Problem {
            params: pr32.params.to_dtype(DType::F64).unwrap(),
            x: pr32.x.to_dtype(DType::F64).unwrap(),
            y: pr32.y.to_dtype(DType::F64).unwrap(),
            params64: Vec::new(),
        };
        let v32 = from_f64(&Rng::new(6).normal_vec(tasks * p), &[tasks, p], DType::F32, &dev).unwrap().0;
        let v64r = v32.to_dtype(DType::F64).unwrap();
        let hv = |pr: &Problem, v: &Tensor| to_f64(&net.hvp(&pr.params, &pr.x, &pr.y, v).unwrap()).unwrap();
        assert_close(&format!("f32 hvp {act:?}"), &hv(&pr32, &v32), &hv(&pr64r, &v64r), 1e-4);
        let g = |pr: &Problem| to_f64(&net.loss_and_grad(&pr.params, &pr.x, &pr.y).unwrap().1).unwrap();
        assert_close(&format!("f32 grad {act:?}"), &g(&pr32), &g(&pr64r), 1e-5);
        let theta32 = pr32.params.to_vec::<f32>().unwrap()[..p].to_vec();
        let t32 = Tensor::from_slice(&theta32, &[p], &dev).unwrap();
        let b32 = batch(&net, tasks, 10, 10, DType::F32, &dev, 92);
        let b64 = TaskBatch {
            support_x: b32.support_x.to_dtype(DType::F64).unwrap(),
            support_y: b32.support_y.to_dtype(DType::F64).unwrap(),
            query_x: b32.query_x.to_dtype(DType::F64).unwrap(),
            query_y: b32.query_y.to_dtype(DType::F64).unwrap(),
        };
        let m = maml(5, 0.05, Order::Second);
        let (_, g32) = meta(&m, &net, &t32, &b32);
        let (_, g64) = meta(&m, &net, &t32.to_dtype(DType::F64).unwrap(), &b64);
        assert_close(&format!("f32 meta-gradient {act:?}"), &g32, &g64, 1e-4);
    }
}

#[test]
fn init_follows_the_documented_scheme() {
    let net = mlp(&[1, 40, 40, 1], Activation::Relu, Loss::Mse);
    assert_eq!(net.num_params(), 40 + 40 + 40 * 40 + 40 + 40 + 1);
    let a = to_f64(&net.init(7, DType::F64, &Device::cpu()).unwrap()).unwrap();
    let b = to_f64(&net.init(7, DType::F32, &Device::cpu()).unwrap()).unwrap();
    assert_eq!(a.len(), net.num_params());
    assert_close("same seed, both dtypes", &b, &a, 1e-7);
    // Layer 2 (fan_in 40) lies in ±1/√40; layer 1 (fan_in 1) in ±1 and uses the range.
    let second = &a[80..80 + 1640];
    assert!(second.iter().all(|v| v.abs() < 1.0 / 40f64.sqrt()));
    assert!(a[..80].iter().any(|v| v.abs() > 0.5));
    assert_ne!(a, to_f64(&net.init(8, DType::F64, &Device::cpu()).unwrap()).unwrap());
}

#[test]
fn errors_are_typed_and_say_what_was_wrong() {
    let dev = Device::cpu();
    let net = mlp(&[2, 4, 3], Activation::Relu, Loss::SoftmaxCrossEntropy);
    let p = net.num_params();
    let b = batch(&net, 2, 3, 3, DType::F64, &dev, 1);
    let theta = f64_tensor(&vec![0.1; p], &[p]);
    let ok = maml(1, 0.1, Order::Second);
    assert!(ok.meta_gradient(&net, &theta, &b).is_ok());
    let invalid = |r: Result<MetaGradient, Error>| matches!(r, Err(Error::InvalidArgument { .. }));
    assert!(invalid(maml(0, 0.1, Order::Second).meta_gradient(&net, &theta, &b)), "k = 0");
    assert!(invalid(maml(usize::MAX / 3, 0.1, Order::Second).meta_gradient(&net, &theta, &b)), "huge k");
    assert!(invalid(maml(1, f64::NAN, Order::Second).meta_gradient(&net, &theta, &b)), "NaN α");
    assert!(invalid(maml(1, f64::INFINITY, Order::First).meta_gradient(&net, &theta, &b)), "∞ α");
    let wrong_len = f64_tensor(&vec![0.1; p + 1], &[p + 1]);
    assert!(matches!(ok.meta_gradient(&net, &wrong_len, &b), Err(Error::ShapeMismatch { .. })));
    let per_task = f64_tensor(&vec![0.1; 2 * p], &[2, p]);
    assert!(matches!(ok.meta_gradient(&net, &per_task, &b), Err(Error::ShapeMismatch { .. })));
    let bad_labels = TaskBatch {
        support_y: Tensor::from_slice(&[0u32, 1, 3, 0, 0, 0], &[2, 3], &dev).unwrap(),
        ..b.clone()
    };
    let err = ok.meta_gradient(&net, &theta, &bad_labels).unwrap_err();
    assert!(err.to_string().contains("label 3"), "{err}");
    let float_labels = TaskBatch { query_y: f64_tensor(&[0.0; 6], &[2, 3]), ..b.clone() };
    assert!(matches!(ok.meta_gradient(&net, &theta, &float_labels), Err(Error::DTypeMismatch { .. })));
    let f32_theta = theta.to_dtype(DType::F32).unwrap();
    assert!(matches!(ok.meta_gradient(&net, &f32_theta, &b), Err(Error::DTypeMismatch { .. })));
    let bf16_theta = theta.to_dtype(DType::BF16).unwrap();
    assert!(matches!(ok.meta_gradient(&net, &bf16_theta, &b), Err(Error::UnsupportedDType { .. })));
    let wrong_in = TaskBatch { support_x: f64_tensor(&[0.0; 18], &[2, 3, 3]), ..b.clone() };
    assert!(matches!(ok.meta_gradient(&net, &theta, &wrong_in), Err(Error::ShapeMismatch { .. })));
    let wrong_tasks = TaskBatch {
        query_x: f64_tensor(&[0.0; 18], &[3, 3, 2]),
        query_y: Tensor::from_slice(&[0u32; 9], &[3, 3], &dev).unwrap(),
        ..b.clone()
    };
    assert!(matches!(ok.meta_gradient(&net, &theta, &wrong_tasks), Err(Error::ShapeMismatch { .. })));
    let empty = TaskBatch {
        support_x: f64_tensor(&[], &[2, 0, 2]),
        support_y: Tensor::from_slice::<u32>(&[], &[2, 0], &dev).unwrap(),
        ..b.clone()
    };
    assert!(matches!(ok.meta_gradient(&net, &theta, &empty), Err(Error::EmptyInput { .. })));
    for sizes in [vec![3], vec![2, 0, 3], vec![]] {
        let bad = mlp(&sizes, Activation::Relu, Loss::Mse);
        assert!(invalid(bad.init(0, DType::F32, &dev).map(|_| unreachable!())), "sizes {sizes:?}");
        assert!(invalid(bad.forward(&theta, &b.support_x).map(|_| unreachable!())), "sizes {sizes:?}");
    }
    let mse = mlp(&[2, 4, 3], Activation::Relu, Loss::Mse);
    let pr = problem(&mse, 2, 3, DType::F64, &dev, 2);
    let short_v = f64_tensor(&vec![0.0; p - 1], &[p - 1]);
    assert!(matches!(mse.hvp(&pr.params, &pr.x, &pr.y, &short_v), Err(Error::ShapeMismatch { .. })));
    let wrong_y = f64_tensor(&[0.0; 12], &[2, 3, 2]);
    assert!(matches!(mse.loss_and_grad(&pr.params, &pr.x, &wrong_y), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(mse.init(0, DType::U32, &dev), Err(Error::UnsupportedDType { .. })));
    // Inputs are never modified.
    let before = to_f64(&pr.params).unwrap();
    mse.hvp(&pr.params, &pr.x, &pr.y, &pr.params).unwrap();
    assert_eq!(before, to_f64(&pr.params).unwrap());
}

#[test]
fn blocked_gemm_path_matches_finite_differences() {
    // Layer 2 here is large enough (40·96·96 multiply-adds) for the cache-blocked GEMM path;
    // the other layers take the small-product kernel.
    set_poisoning(true);
    let net = mlp(&[32, 96, 96, 5], Activation::Tanh, Loss::SoftmaxCrossEntropy);
    let (tasks, p) = (2, net.num_params());
    let mut rng = Rng::new(101);
    let params64: Vec<f64> = rng.normal_vec(tasks * p).iter().map(|v| 0.1 * v).collect();
    let x = inputs(&net, tasks, 40, DType::F64, &Device::cpu(), &mut rng);
    let y = targets(&net, tasks, 40, DType::F64, &Device::cpu(), &mut rng);
    let v = rng.normal_vec(tasks * p);
    let hv =
        to_f64(&net.hvp(&f64_tensor(&params64, &[tasks, p]), &x, &y, &f64_tensor(&v, &[tasks, p])).unwrap())
            .unwrap();
    let eps = 1e-5;
    let plus = grads_at(&net, &shifted(&params64, &v, eps), &[tasks, p], &x, &y);
    let minus = grads_at(&net, &shifted(&params64, &v, -eps), &[tasks, p], &x, &y);
    let fd: Vec<f64> = plus.iter().zip(&minus).map(|(a, b)| (a - b) / (2.0 * eps)).collect();
    assert_close("hvp on the GEMM path", &hv, &fd, 1e-6);
    let grad = grads_at(&net, &params64, &[tasks, p], &x, &y);
    let lp = losses_at(&net, &shifted(&params64, &v, eps), &[tasks, p], &x, &y);
    let lm = losses_at(&net, &shifted(&params64, &v, -eps), &[tasks, p], &x, &y);
    for t in 0..tasks {
        let exact: f64 = (0..p).map(|i| grad[t * p + i] * v[t * p + i]).sum();
        assert_close("grad·v on the GEMM path", &[exact], &[(lp[t] - lm[t]) / (2.0 * eps)], 1e-7);
    }
}

#[test]
fn meta_gradient_on_the_gemm_path_matches_explicit_hvp_steps() {
    // The meta-gradient's reverse HVPs read the tapes its inner steps left behind; here every
    // layer product of the middle layer takes the blocked GEMM (40·96·96 multiply-adds), and the
    // result must equal the reverse loop written with the public gradient and HVP.
    set_poisoning(true);
    let net = mlp(&[32, 96, 96, 5], Activation::Tanh, Loss::SoftmaxCrossEntropy);
    let (tasks, p, k, lr) = (2, net.num_params(), 2, 0.1);
    let mut rng = Rng::new(111);
    let theta: Vec<f64> = rng.normal_vec(p).iter().map(|v| 0.1 * v).collect();
    let b = batch(&net, tasks, 40, 40, DType::F64, &Device::cpu(), 112);
    let (_, got) = meta(&maml(k, lr, Order::Second), &net, &f64_tensor(&theta, &[p]), &b);
    // θ_0 … θ_k per task, then g ← g − α H(θ_j) g for j = k−1 … 0.
    let mut iterates = vec![(0..tasks).flat_map(|_| theta.iter().copied()).collect::<Vec<f64>>()];
    for j in 0..k {
        let g = grads_at(&net, &iterates[j], &[tasks, p], &b.support_x, &b.support_y);
        iterates.push(iterates[j].iter().zip(&g).map(|(q, g)| q - lr * g).collect());
    }
    let mut g = grads_at(&net, &iterates[k], &[tasks, p], &b.query_x, &b.query_y);
    for theta_j in iterates[..k].iter().rev() {
        let hv = net
            .hvp(&f64_tensor(theta_j, &[tasks, p]), &b.support_x, &b.support_y, &f64_tensor(&g, &[tasks, p]))
            .unwrap();
        g.iter_mut().zip(to_f64(&hv).unwrap()).for_each(|(g, h)| *g -= lr * h);
    }
    let want: Vec<f64> =
        (0..p).map(|i| (0..tasks).map(|t| g[t * p + i]).sum::<f64>() / tasks as f64).collect();
    assert_close("meta-gradient on the GEMM path", &got, &want, 1e-12);
}
