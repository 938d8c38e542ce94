//! Tests of the moe family: routing (centroids and logits), dispatch∘combine = identity,
//! weighted combine, lstsq against float64 normal equations and residual orthogonality,
//! rank-deficient minimum-norm solutions, grouped lstsq, MixerGate recovering families, errors,
//! and CUDA vs CPU when a GPU is present.

use metakernels::kmeans::Metric;
use metakernels::moe::{self, MixerGate, Routing, SkipReason};
use metakernels::testing::{self, Rng};
use metakernels::{DType, Device, Error, Tensor};

fn cpu() -> Device {
    Device::cpu()
}

fn check_routing(r: &Routing, expert_ref: &[u32], k: usize) {
    let expert = r.expert().to_vec::<u32>().unwrap();
    assert_eq!(expert, expert_ref);
    let order = r.order().to_vec::<u32>().unwrap();
    let offsets = r.offsets().to_vec::<u32>().unwrap();
    assert_eq!(offsets.len(), k + 1);
    assert_eq!(offsets[0], 0);
    assert_eq!(offsets[k] as usize, expert.len());
    for e in 0..k {
        let group = &order[offsets[e] as usize..offsets[e + 1] as usize];
        assert!(group.windows(2).all(|w| w[0] < w[1]), "stable");
        assert!(group.iter().all(|&t| expert[t as usize] == e as u32));
    }
}

#[test]
fn route_top1_logits_matches_f64() {
    testing::set_poisoning(true);
    for &(n, k) in &[(1, 1), (100, 7), (333, 64)] {
        let (l, l64) = testing::randn(&[n, k], DType::F32, &cpu(), n as u64).unwrap();
        let r = moe::route_top1_logits(&l).unwrap();
        let mut expert = Vec::new();
        let mut probs = Vec::new();
        for row in l64.chunks_exact(k) {
            let (arg, max) =
                row.iter()
                    .enumerate()
                    .fold((0, f64::NEG_INFINITY), |b, (j, &v)| if v > b.1 { (j, v) } else { b });
            expert.push(arg as u32);
            probs.push(1.0 / row.iter().map(|v| (v - max).exp()).sum::<f64>());
        }
        check_routing(&r, &expert, k);
        testing::assert_close("probs", &testing::to_f64(r.gate_probs().unwrap()).unwrap(), &probs, 1e-6);
    }
    // Ties to the lowest expert.
    let l = Tensor::from_slice(&[1.0f32, 3.0, 3.0, 0.0], &[1, 4], &cpu()).unwrap();
    assert_eq!(moe::route_top1_logits(&l).unwrap().expert().to_vec::<u32>().unwrap(), vec![1]);
}

#[test]
fn route_top1_by_centroids_and_dispatch_combine_identity() {
    testing::set_poisoning(true);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let (n, d, k) = (257, 12, 6);
        let (x, _) = testing::randn(&[n, d], dtype, &cpu(), 4).unwrap();
        let (c, _) = testing::randn(&[k, d], DType::F32, &cpu(), 5).unwrap();
        let r = moe::route_top1(&x, &c, Metric::SquaredL2).unwrap();
        let (labels, _) = metakernels::kmeans::assign(&x, &c, Metric::SquaredL2).unwrap();
        check_routing(&r, &labels.to_vec::<u32>().unwrap(), k);
        let grouped = moe::dispatch(&x, &r).unwrap();
        let order = r.order().to_vec::<u32>().unwrap();
        let xs = testing::to_f64(&x).unwrap();
        let gs = testing::to_f64(&grouped).unwrap();
        for (j, &t) in order.iter().enumerate() {
            assert_eq!(&gs[j * d..(j + 1) * d], &xs[t as usize * d..(t as usize + 1) * d]);
        }
        let back = moe::combine(&grouped, &r, None).unwrap();
        assert_eq!(testing::to_f64(&back).unwrap(), xs, "dispatch then combine is the identity");
        // Weighted combine: out[t] = w[t] · x[t].
        let w: Vec<f32> = Rng::new(2).uniform_vec(n, 0.1, 2.0).iter().map(|&v| v as f32).collect();
        let wt = Tensor::from_slice(&w, &[n], &cpu()).unwrap();
        let scaled = testing::to_f64(&moe::combine(&grouped, &r, Some(&wt)).unwrap()).unwrap();
        let want: Vec<f64> = (0..n * d).map(|e| w[e / d] as f64 * xs[e]).collect();
        testing::assert_close("weighted combine", &scaled, &want, testing::tolerance(dtype));
    }
}

/// f64 normal-equation solution of one system.
fn normal64(x: &[f64], y: &[f64], m: usize, n: usize, r: usize, ridge: f64) -> Vec<f64> {
    let mut a = vec![0f64; n * n];
    let mut b = vec![0f64; n * r];
    for row in 0..m {
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] += x[row * n + i] * x[row * n + j];
            }
            for j in 0..r {
                b[i * r + j] += x[row * n + i] * y[row * r + j];
            }
        }
    }
    for i in 0..n {
        a[i * n + i] += ridge;
    }
    // Gaussian elimination with partial pivoting.
    for col in 0..n {
        let p = (col..n).max_by(|&i, &j| a[i * n + col].abs().total_cmp(&a[j * n + col].abs())).unwrap();
        for j in 0..n {
            a.swap(col * n + j, p * n + j);
        }
        for j in 0..r {
            b.swap(col * r + j, p * r + j);
        }
        for i in col + 1..n {
            let f = a[i * n + col] / a[col * n + col];
            for j in 0..n {
                a[i * n + j] -= f * a[col * n + j];
            }
            for j in 0..r {
                b[i * r + j] -= f * b[col * r + j];
            }
        }
    }
    let mut w = vec![0f64; n * r];
    for j in 0..r {
        for i in (0..n).rev() {
            let s: f64 = (i + 1..n).map(|p| a[i * n + p] * w[p * r + j]).sum();
            w[i * r + j] = (b[i * r + j] - s) / a[i * n + i];
        }
    }
    w
}

/// Max |Xᵀ(XW − Y)| relative to ‖X‖·‖Y‖.
fn residual_orthogonality(x: &[f64], y: &[f64], w: &[f64], m: usize, n: usize, r: usize) -> f64 {
    let mut worst: f64 = 0.0;
    for i in 0..n {
        for j in 0..r {
            let s: f64 = (0..m)
                .map(|row| {
                    let pred: f64 = (0..n).map(|p| x[row * n + p] * w[p * r + j]).sum();
                    x[row * n + i] * (pred - y[row * r + j])
                })
                .sum();
            worst = worst.max(s.abs());
        }
    }
    let nx = x.iter().map(|v| v * v).sum::<f64>().sqrt();
    let ny = y.iter().map(|v| v * v).sum::<f64>().sqrt();
    worst / (nx * ny)
}

fn lstsq_case(dev: &Device, batch: usize, m: usize, n: usize, r: usize, ridge: f64, tol: f64) {
    let (x, x64) = testing::randn(&[batch, m, n], DType::F32, dev, (m * n) as u64).unwrap();
    let (y, y64) = testing::randn(&[batch, m, r], DType::F32, dev, (m * r + 1) as u64).unwrap();
    let w = moe::lstsq(&x, &y, ridge).unwrap();
    assert_eq!(w.shape(), &[batch, n, r]);
    let w64 = testing::to_f64(&w).unwrap();
    for b in 0..batch {
        let (xs, ys) = (&x64[b * m * n..(b + 1) * m * n], &y64[b * m * r..(b + 1) * m * r]);
        let want = normal64(xs, ys, m, n, r, ridge);
        let got = &w64[b * n * r..(b + 1) * n * r];
        testing::assert_close("lstsq vs f64 normal equations", got, &want, tol);
        if ridge == 0.0 {
            assert!(residual_orthogonality(xs, ys, got, m, n, r) < tol, "residual not orthogonal to X");
        }
    }
}

#[test]
fn lstsq_matches_f64_normal_equations() {
    testing::set_poisoning(true);
    lstsq_case(&cpu(), 3, 64, 16, 4, 0.0, 1e-5);
    lstsq_case(&cpu(), 2, 20, 5, 3, 0.5, 1e-5);
    lstsq_case(&cpu(), 1, 9, 9, 1, 0.0, 1e-4);
}

#[test]
fn lstsq_rank_deficient_gives_the_minimum_norm_solution() {
    testing::set_poisoning(true);
    // Column 2 duplicates column 0: the minimum-norm solution splits their weight equally.
    let m = 30;
    let mut rng = Rng::new(8);
    let mut x = Vec::new();
    for _ in 0..m {
        let (a, b) = (rng.normal(), rng.normal());
        x.extend([a, b, a]);
    }
    let y: Vec<f64> = (0..m).map(|i| 2.0 * x[i * 3] - x[i * 3 + 1] + 0.01 * rng.normal()).collect();
    let (xt, x64) = testing::from_f64(&x, &[m, 3], DType::F32, &cpu()).unwrap();
    let (yt, y64) = testing::from_f64(&y, &[m, 1], DType::F32, &cpu()).unwrap();
    let w = testing::to_f64(&moe::lstsq(&xt, &yt, 0.0).unwrap()).unwrap();
    assert!((w[0] - w[2]).abs() < 1e-6, "min-norm splits duplicated columns: {w:?}");
    assert!((w[0] + w[2] - 2.0).abs() < 0.05 && (w[1] + 1.0).abs() < 0.05, "{w:?}");
    assert!(residual_orthogonality(&x64, &y64, &w, m, 3, 1) < 1e-6);
    // No rows at all with ridge 0: W = 0.
    let e = Tensor::from_slice(&[0f32; 0], &[0, 3], &cpu()).unwrap();
    let ye = Tensor::from_slice(&[0f32; 0], &[0, 2], &cpu()).unwrap();
    assert_eq!(moe::lstsq(&e, &ye, 0.0).unwrap().to_vec::<f32>().unwrap(), vec![0.0; 6]);
}

#[test]
fn grouped_lstsq_fits_each_expert_on_its_rows() {
    testing::set_poisoning(true);
    let (n_tok, n, r, k) = (300, 4, 2, 3);
    let (x, x64) = testing::randn(&[n_tok, n], DType::F32, &cpu(), 31).unwrap();
    let (y, y64) = testing::randn(&[n_tok, r], DType::F32, &cpu(), 32).unwrap();
    let expert: Vec<u32> = (0..n_tok).map(|i| ((i * 7) % 5 % k) as u32).collect();
    let logits: Vec<f32> =
        expert.iter().flat_map(|&e| (0..k).map(move |j| if j as u32 == e { 1.0 } else { 0.0 })).collect();
    let routing = moe::route_top1_logits(&Tensor::from_slice(&logits, &[n_tok, k], &cpu()).unwrap()).unwrap();
    let gx = moe::dispatch(&x, &routing).unwrap();
    let gy = moe::dispatch(&y, &routing).unwrap();
    let w = testing::to_f64(&moe::grouped_lstsq(&gx, &gy, &routing, 0.1).unwrap()).unwrap();
    for e in 0..k {
        let rows: Vec<usize> = (0..n_tok).filter(|&i| expert[i] == e as u32).collect();
        let xs: Vec<f64> = rows.iter().flat_map(|&i| x64[i * n..(i + 1) * n].to_vec()).collect();
        let ys: Vec<f64> = rows.iter().flat_map(|&i| y64[i * r..(i + 1) * r].to_vec()).collect();
        let want = normal64(&xs, &ys, rows.len(), n, r, 0.1);
        testing::assert_close("grouped lstsq", &w[e * n * r..(e + 1) * n * r], &want, 1e-5);
    }
}

/// Environments from `k` well-separated families; expert j is good (low loss) on family j.
fn families(e: usize, dx: usize, k: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<usize>) {
    let mut rng = Rng::new(seed);
    let centres: Vec<f64> = rng.normal_vec(k * dx).into_iter().map(|v| 4.0 * v).collect();
    let mut ctx = Vec::new();
    let mut losses = Vec::new();
    let mut family = Vec::new();
    for env in 0..e {
        let f = (env * 5 + 3) % k;
        family.push(f);
        ctx.extend((0..dx).map(|j| (centres[f * dx + j] + 0.1 * rng.normal()) as f32));
        // Expert (f + 1) % k is best on family f, so experts are not simply cluster ids.
        losses.extend(
            (0..k).map(
                |j| if j == (f + 1) % k { 0.1 + 0.05 * rng.uniform() } else { 1.0 + rng.uniform() } as f32,
            ),
        );
    }
    (ctx, losses, family)
}

#[test]
fn mixer_gate_recovers_well_separated_families() {
    testing::set_poisoning(true);
    let (e, dx, k) = (60, 3, 4);
    let (ctx, losses, family) = families(e, dx, k, 5);
    let contexts = Tensor::from_slice(&ctx, &[e, dx], &cpu()).unwrap();
    let l = Tensor::from_slice(&losses, &[e, k], &cpu()).unwrap();
    let gate = MixerGate { seed: 3, ..MixerGate::default() };
    let up = gate.update(&contexts, &l, None).unwrap();
    assert_eq!(up.skipped, None);
    let w = up.weights.clone().unwrap();
    assert_eq!(w.shape(), &[dx + 1, k]);
    let routed = MixerGate::route(&w, &contexts).unwrap().expert().to_vec::<u32>().unwrap();
    for env in 0..e {
        assert_eq!(
            routed[env] as usize,
            (family[env] + 1) % k,
            "environment {env} of family {}",
            family[env]
        );
    }
    // Warm start from the previous centroids converges at once to the same gate routing.
    let again = gate.update(&contexts, &l, Some(&up.centroids)).unwrap();
    assert_eq!(again.skipped, None);
    let routed2 =
        MixerGate::route(&again.weights.unwrap(), &contexts).unwrap().expert().to_vec::<u32>().unwrap();
    assert_eq!(routed, routed2);
    // One iteration from a bad start cannot converge: the update is skipped and says so.
    let bad = Tensor::from_slice(&vec![0.0f32; k * dx], &[k, dx], &cpu()).unwrap();
    let skipped = MixerGate { max_iter: 1, ..gate.clone() }.update(&contexts, &l, Some(&bad)).unwrap();
    assert!(matches!(
        skipped.skipped,
        Some(SkipReason::NotConverged { .. }) | Some(SkipReason::EmptyCluster { .. })
    ));
    assert!(skipped.weights.is_none());
}

#[test]
fn errors_are_typed() {
    testing::set_poisoning(true);
    let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[2, 2], &cpu()).unwrap();
    let logits = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0], &[2, 2], &cpu()).unwrap();
    let r = moe::route_top1_logits(&logits).unwrap();
    let x3 = Tensor::from_slice(&[1.0f32, 2.0, 3.0], &[3, 1], &cpu()).unwrap();
    assert!(matches!(moe::dispatch(&x3, &r), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(moe::combine(&x3, &r, None), Err(Error::ShapeMismatch { .. })));
    let w_bad = Tensor::from_slice(&[1.0f32], &[1], &cpu()).unwrap();
    assert!(matches!(moe::combine(&x, &r, Some(&w_bad)), Err(Error::ShapeMismatch { .. })));
    let nan = Tensor::from_slice(&[f32::NAN, 0.0], &[1, 2], &cpu()).unwrap();
    assert!(matches!(moe::route_top1_logits(&nan), Err(Error::NonFinite { .. })));
    let e = Tensor::from_slice(&[0u32, 1], &[2], &cpu()).unwrap();
    let o = Tensor::from_slice(&[0u32, 1], &[2], &cpu()).unwrap();
    let off_bad = Tensor::from_slice(&[0u32, 1, 3], &[3], &cpu()).unwrap();
    assert!(matches!(Routing::from_parts(&e, &o, &off_bad), Err(Error::InvalidArgument { .. })));
    let off = Tensor::from_slice(&[0u32, 1, 2], &[3], &cpu()).unwrap();
    assert!(Routing::from_parts(&e, &o, &off).is_ok());
    let o_bad = Tensor::from_slice(&[1u32, 0], &[2], &cpu()).unwrap();
    assert!(matches!(Routing::from_parts(&e, &o_bad, &off), Err(Error::InvalidArgument { .. })));
    assert!(matches!(moe::lstsq(&x, &x, -1.0), Err(Error::InvalidArgument { .. })));
    assert!(matches!(moe::lstsq(&x, &x3, 0.0), Err(Error::ShapeMismatch { .. })));
    let xn = Tensor::from_slice(&[1.0f32, f32::INFINITY, 3.0, 4.0], &[2, 2], &cpu()).unwrap();
    assert!(matches!(moe::lstsq(&xn, &x, 0.0), Err(Error::NonFinite { .. })));
    let losses = Tensor::from_slice(&[1.0f32, 2.0, 3.0], &[1, 3], &cpu()).unwrap();
    assert!(matches!(MixerGate::default().update(&x, &losses, None), Err(Error::ShapeMismatch { .. })));
    let too_many = Tensor::from_slice(&[1.0f32; 6], &[2, 3], &cpu()).unwrap();
    assert!(matches!(MixerGate::default().update(&x, &too_many, None), Err(Error::InvalidArgument { .. })));
    // Wrong dtypes: f64 logits and least-squares inputs, u32 rows, 16-bit gate weights.
    let x64 = x.to_dtype(DType::F64).unwrap();
    assert!(matches!(moe::route_top1_logits(&x64), Err(Error::DTypeMismatch { .. })));
    assert!(matches!(moe::lstsq(&x64, &x64, 0.0), Err(Error::DTypeMismatch { .. })));
    let ids = Tensor::from_slice(&[1u32, 2, 3, 4], &[2, 2], &cpu()).unwrap();
    assert!(matches!(moe::dispatch(&ids, &r), Err(Error::DTypeMismatch { .. })));
    let w16 = Tensor::from_slice(&[1.0f32, 2.0], &[2], &cpu()).unwrap().to_dtype(DType::F16).unwrap();
    assert!(matches!(moe::combine(&x, &r, Some(&w16)), Err(Error::DTypeMismatch { .. })));
}

#[test]
fn cuda_moe_matches_cpu() {
    let Some(gpu) = testing::cuda_or_skip("cuda_moe_matches_cpu") else { return };
    testing::set_poisoning(true);
    let host = Device::cpu();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for &(n, d, k) in &[(1, 1, 1), (1000, 33, 7), (4099, 64, 16), (513, 6, 3)] {
            let (logits, _) = testing::randn(&[n, k], dtype, &gpu, n as u64).unwrap();
            let r = moe::route_top1_logits(&logits).unwrap();
            let rc = moe::route_top1_logits(&logits.to_device(&host).unwrap()).unwrap();
            assert_eq!(r.expert().to_vec::<u32>().unwrap(), rc.expert().to_vec::<u32>().unwrap());
            assert_eq!(r.order().to_vec::<u32>().unwrap(), rc.order().to_vec::<u32>().unwrap());
            assert_eq!(r.offsets().to_vec::<u32>().unwrap(), rc.offsets().to_vec::<u32>().unwrap());
            testing::assert_close(
                "gate probs",
                &testing::to_f64(r.gate_probs().unwrap()).unwrap(),
                &testing::to_f64(rc.gate_probs().unwrap()).unwrap(),
                1e-5,
            );
            let rr = moe::reference::route_top1_logits(&logits).unwrap();
            assert_eq!(rr.expert().to_vec::<u32>().unwrap(), rc.expert().to_vec::<u32>().unwrap());
            testing::assert_close(
                "gate probs (reference kernel)",
                &testing::to_f64(rr.gate_probs().unwrap()).unwrap(),
                &testing::to_f64(rc.gate_probs().unwrap()).unwrap(),
                1e-5,
            );
            let (x, xs) = testing::randn(&[n, d], dtype, &gpu, 3).unwrap();
            let grouped = moe::dispatch(&x, &r).unwrap();
            let grouped_ref = moe::reference::dispatch(&x, &r).unwrap();
            assert_eq!(testing::to_f64(&grouped).unwrap(), testing::to_f64(&grouped_ref).unwrap());
            assert_eq!(testing::to_f64(&moe::reference::combine(&grouped, &r, None).unwrap()).unwrap(), xs);
            let gc = moe::dispatch(&x.to_device(&host).unwrap(), &rc).unwrap();
            assert_eq!(testing::to_f64(&grouped).unwrap(), testing::to_f64(&gc).unwrap());
            assert_eq!(testing::to_f64(&moe::combine(&grouped, &r, None).unwrap()).unwrap(), xs);
            let w = r.gate_probs().unwrap();
            let wc = rc.gate_probs().unwrap();
            let a = testing::to_f64(&moe::combine(&grouped, &r, Some(w)).unwrap()).unwrap();
            let b = testing::to_f64(&moe::combine(&gc, &rc, Some(wc)).unwrap()).unwrap();
            testing::assert_close("weighted combine", &a, &b, testing::tolerance(dtype));
            let a_ref = testing::to_f64(&moe::reference::combine(&grouped, &r, Some(w)).unwrap()).unwrap();
            assert_eq!(a, a_ref, "weighted combine vs its reference kernel ({dtype})");
        }
    }
    lstsq_case(&gpu, 5, 64, 16, 4, 0.0, 1e-3);
    lstsq_case(&gpu, 2, 300, 70, 3, 0.1, 1e-3); // n > 64: the host path
    let (x, _) = testing::randn(&[4, 64, 16], DType::F32, &gpu, 1).unwrap();
    let (y, _) = testing::randn(&[4, 64, 16], DType::F32, &gpu, 2).unwrap();
    let fast = testing::to_f64(&moe::lstsq(&x, &y, 0.0).unwrap()).unwrap();
    let reference = testing::to_f64(&moe::reference::lstsq(&x, &y, 0.0).unwrap()).unwrap();
    testing::assert_close("lstsq fast vs reference kernel", &fast, &reference, 1e-4);
}

/// A CPU tensor beside GPU ones is a `DeviceMismatch` in every moe operation.
#[test]
fn cuda_mixed_devices_are_errors() {
    let Some(gpu) = testing::cuda_or_skip("cuda_mixed_devices_are_errors") else { return };
    let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.5], &[2, 2], &cpu()).unwrap();
    let xg = x.to_device(&gpu).unwrap();
    let logits = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0], &[2, 2], &cpu()).unwrap();
    let on_cpu = moe::route_top1_logits(&logits).unwrap();
    let on_gpu = moe::route_top1_logits(&logits.to_device(&gpu).unwrap()).unwrap();
    let mismatch = |what: &str, e: Option<Error>| {
        assert!(matches!(e, Some(Error::DeviceMismatch { .. })), "{what}: {e:?}");
    };
    mismatch("route_top1", moe::route_top1(&xg, &x, Metric::SquaredL2).err());
    mismatch("dispatch", moe::dispatch(&xg, &on_cpu).err());
    mismatch("combine", moe::combine(&x, &on_gpu, None).err());
    let w = Tensor::from_slice(&[0.5f32, 2.0], &[2], &cpu()).unwrap();
    mismatch("combine weights", moe::combine(&xg, &on_gpu, Some(&w)).err());
    mismatch("lstsq", moe::lstsq(&xg, &x, 0.0).err());
    let e = Tensor::from_slice(&[0u32, 1], &[2], &cpu()).unwrap();
    let off = Tensor::from_slice(&[0u32, 1, 2], &[3], &gpu).unwrap();
    mismatch("from_parts", Routing::from_parts(&e, &e.to_device(&gpu).unwrap(), &off).err());
}

/// Least squares on the device beyond the well-conditioned case: the 1024 systems of
/// 64×16 (fast vs reference kernel vs float64), a rank-deficient system (flagged on chip, solved
/// by the host's minimum-norm path), and grouped_lstsq with an expert that gets no rows.
#[test]
fn cuda_lstsq_rank_deficient_and_grouped() {
    let Some(gpu) = testing::cuda_or_skip("cuda_lstsq_rank_deficient_and_grouped") else { return };
    testing::set_poisoning(true);
    lstsq_case(&gpu, 1024, 64, 16, 8, 0.0, 1e-3);
    let (x, _) = testing::randn(&[1024, 64, 16], DType::F32, &gpu, 5).unwrap();
    let (y, _) = testing::randn(&[1024, 64, 8], DType::F32, &gpu, 6).unwrap();
    let fast = testing::to_f64(&moe::lstsq(&x, &y, 0.01).unwrap()).unwrap();
    let reference = testing::to_f64(&moe::reference::lstsq(&x, &y, 0.01).unwrap()).unwrap();
    testing::assert_close("1024 systems: fast vs reference kernel", &fast, &reference, 1e-4);

    // Column 2 duplicates column 0 (as in the CPU test).
    let m = 30;
    let mut rng = Rng::new(8);
    let mut xv = Vec::new();
    for _ in 0..m {
        let (a, b) = (rng.normal(), rng.normal());
        xv.extend([a, b, a]);
    }
    let yv: Vec<f64> = (0..m).map(|i| 2.0 * xv[i * 3] - xv[i * 3 + 1] + 0.01 * rng.normal()).collect();
    let (xt, x64) = testing::from_f64(&xv, &[m, 3], DType::F32, &gpu).unwrap();
    let (yt, y64) = testing::from_f64(&yv, &[m, 1], DType::F32, &gpu).unwrap();
    let w = testing::to_f64(&moe::lstsq(&xt, &yt, 0.0).unwrap()).unwrap();
    let wc = testing::to_f64(
        &moe::lstsq(&xt.to_device(&cpu()).unwrap(), &yt.to_device(&cpu()).unwrap(), 0.0).unwrap(),
    )
    .unwrap();
    assert!((w[0] - w[2]).abs() < 1e-5, "min-norm splits duplicated columns: {w:?}");
    testing::assert_close("rank-deficient: device vs CPU", &w, &wc, 1e-4);
    assert!(residual_orthogonality(&x64, &y64, &w, m, 3, 1) < 1e-4);

    // Expert 2 of 4 gets no rows: W = 0 with ridge 0, and the others match the CPU.
    let (n_tok, n, r, k) = (500, 5, 3, 4);
    let expert: Vec<u32> = (0..n_tok).map(|i| [0u32, 1, 3][i % 3]).collect();
    let logits: Vec<f32> =
        expert.iter().flat_map(|&e| (0..k).map(move |j| if j as u32 == e { 1.0 } else { 0.0 })).collect();
    let logits = Tensor::from_slice(&logits, &[n_tok, k], &cpu()).unwrap();
    let (x, _) = testing::randn(&[n_tok, n], DType::F32, &cpu(), 41).unwrap();
    let (y, _) = testing::randn(&[n_tok, r], DType::F32, &cpu(), 42).unwrap();
    let rc = moe::route_top1_logits(&logits).unwrap();
    let want = testing::to_f64(
        &moe::grouped_lstsq(&moe::dispatch(&x, &rc).unwrap(), &moe::dispatch(&y, &rc).unwrap(), &rc, 0.0)
            .unwrap(),
    )
    .unwrap();
    let rg = moe::route_top1_logits(&logits.to_device(&gpu).unwrap()).unwrap();
    let gx = moe::dispatch(&x.to_device(&gpu).unwrap(), &rg).unwrap();
    let gy = moe::dispatch(&y.to_device(&gpu).unwrap(), &rg).unwrap();
    let got = testing::to_f64(&moe::grouped_lstsq(&gx, &gy, &rg, 0.0).unwrap()).unwrap();
    assert!(got[2 * n * r..3 * n * r].iter().all(|&v| v == 0.0), "empty expert: W = 0");
    testing::assert_close("grouped lstsq: device vs CPU", &got, &want, 1e-4);
}
