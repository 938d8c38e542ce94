//! GPU tests of the maml family: the fused kernel, the tiled per-layer path (forced, and taken on
//! its own for sizes that do not fit in shared memory) and the naive per-layer reference against
//! each other and the CPU in f64; forward/gradient/HVP on both paths against the CPU; device
//! mismatch errors. They skip without a GPU (and fail with METAKERNELS_REQUIRE_CUDA=1).

use metakernels::maml::{force_tiled, Activation, Loss, Maml, Mlp, Order, TaskBatch};
use metakernels::testing::{assert_close, cuda_or_skip, from_f64, set_poisoning, to_f64, Rng};
use metakernels::{DType, Device, Error, Tensor};
use std::sync::{Mutex, MutexGuard};

/// `force_tiled` is process-wide: every test that runs an automatic or a forced path holds this
/// lock, so that a test running in parallel cannot switch the path under another one.
static PATH_LOCK: Mutex<()> = Mutex::new(());

fn path_lock() -> MutexGuard<'static, ()> {
    PATH_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn batch_on(
    net: &Mlp,
    tasks: usize,
    ns: usize,
    nq: usize,
    dtype: DType,
    dev: &Device,
    seed: u64,
) -> TaskBatch {
    let mut rng = Rng::new(seed);
    let (d_in, d_out) = (net.sizes[0], *net.sizes.last().unwrap());
    let mut x =
        |n: usize| from_f64(&rng.normal_vec(tasks * n * d_in), &[tasks, n, d_in], dtype, dev).unwrap().0;
    let (sx, qx) = (x(ns), x(nq));
    let mut y = |n: usize| match net.loss {
        Loss::Mse => from_f64(&rng.normal_vec(tasks * n * d_out), &[tasks, n, d_out], dtype, dev).unwrap().0,
        Loss::SoftmaxCrossEntropy => {
            let labels: Vec<u32> = (0..tasks * n).map(|_| rng.below(d_out as u64) as u32).collect();
            Tensor::from_slice(&labels, &[tasks, n], dev).unwrap()
        }
    };
    let (sy, qy) = (y(ns), y(nq));
    TaskBatch { support_x: sx, support_y: sy, query_x: qx, query_y: qy }
}

/// The same values on the CPU in f64 (labels stay u32): the reference every GPU result is
/// held against, so that an f32 kernel is measured against exact arithmetic on its own inputs.
fn cpu64(t: &Tensor) -> Tensor {
    let t = t.to_device(&Device::cpu()).unwrap();
    if t.dtype() == DType::U32 {
        t
    } else {
        t.to_dtype(DType::F64).unwrap()
    }
}

fn to_cpu(b: &TaskBatch) -> TaskBatch {
    TaskBatch {
        support_x: cpu64(&b.support_x),
        support_y: cpu64(&b.support_y),
        query_x: cpu64(&b.query_x),
        query_y: cpu64(&b.query_y),
    }
}

/// The automatic path (fused, or tiled when too large), the forced tiled path and the naive
/// per-layer reference all agree with the CPU in f64 on one meta-batch, and with each other.
fn check_meta(dev: &Device, net: &Mlp, dtype: DType, k: usize, order: Order, tasks: usize, n: usize) {
    let b = batch_on(net, tasks, n, n + 3, dtype, dev, 7);
    let theta = net.init(3, dtype, dev).unwrap();
    let m = Maml { inner_steps: k, inner_lr: 0.05, order, return_adapted: true };
    let cpu = m.meta_gradient(net, &cpu64(&theta), &to_cpu(&b)).unwrap();
    let tol = if dtype == DType::F64 { 1e-10 } else { 1e-4 };
    let what = format!("{:?} {:?} {dtype} k={k} {order:?}", net.sizes, net.activation);
    let check =
        |path: &str, gpu: &metakernels::maml::MetaGradient, reference: &metakernels::maml::MetaGradient| {
            let close = |field: &str, a: &Tensor, b: &Tensor| {
                assert_close(&format!("{path} {field} {what}"), &to_f64(a).unwrap(), &to_f64(b).unwrap(), tol)
            };
            close("grad", &gpu.grad, &reference.grad);
            close("per-task losses", &gpu.per_task_loss, &reference.per_task_loss);
            close("adapted", gpu.adapted.as_ref().unwrap(), reference.adapted.as_ref().unwrap());
            let loss_err = (gpu.loss - reference.loss).abs() / reference.loss.abs().max(1e-30);
            assert!(loss_err <= tol, "{path} meta-loss {what}: {} vs {}", gpu.loss, reference.loss);
        };
    let _path = path_lock();
    let naive = m.meta_gradient_reference(net, &theta, &b).unwrap();
    check("naive reference vs cpu", &naive, &cpu);
    let auto = m.meta_gradient(net, &theta, &b).unwrap();
    check("auto (fused or tiled) vs cpu", &auto, &cpu);
    check("auto vs naive reference", &auto, &naive);
    force_tiled(true);
    let tiled = m.meta_gradient(net, &theta, &b);
    force_tiled(false);
    let tiled = tiled.unwrap();
    check("tiled vs cpu", &tiled, &cpu);
    check("tiled vs naive reference", &tiled, &naive);
}

#[test]
fn cuda_meta_gradient_matches_reference_kernel_and_cpu() {
    let Some(dev) = cuda_or_skip("cuda_meta_gradient_matches_reference_kernel_and_cpu") else { return };
    set_poisoning(true);
    let sinusoid = Mlp { sizes: vec![1, 40, 40, 1], activation: Activation::Relu, loss: Loss::Mse };
    for dtype in [DType::F32, DType::F64] {
        for (k, order) in [(1, Order::Second), (5, Order::Second), (3, Order::First)] {
            check_meta(&dev, &sinusoid, dtype, k, order, 25, 10);
        }
    }
    for act in [Activation::Tanh, Activation::Gelu, Activation::Softplus] {
        let net = Mlp { sizes: vec![5, 33, 17, 7], activation: act, loss: Loss::SoftmaxCrossEntropy };
        check_meta(&dev, &net, DType::F64, 2, Order::Second, 9, 13);
    }
    // Too large for shared memory (about 2 MiB of workspace per task): the automatic path is
    // the tiled one; widths of 300 span several partial 64-wide tiles, 64 samples a full one.
    let wide = Mlp { sizes: vec![16, 300, 300, 4], activation: Activation::Tanh, loss: Loss::Mse };
    check_meta(&dev, &wide, DType::F32, 2, Order::Second, 3, 64);
    let wide_ce =
        Mlp { sizes: vec![70, 130, 65, 11], activation: Activation::Gelu, loss: Loss::SoftmaxCrossEntropy };
    check_meta(&dev, &wide_ce, DType::F64, 3, Order::Second, 5, 150);
}

#[test]
fn cuda_meta_gradient_on_edge_shapes() {
    let Some(dev) = cuda_or_skip("cuda_meta_gradient_on_edge_shapes") else { return };
    set_poisoning(true);
    // One support sample (query 4), several outputs under MSE, a smooth activation: the fused
    // kernel's per-sample loops and loss head at their smallest, every path.
    let multi = Mlp { sizes: vec![3, 20, 11, 4], activation: Activation::Tanh, loss: Loss::Mse };
    for dtype in [DType::F32, DType::F64] {
        check_meta(&dev, &multi, dtype, 3, Order::Second, 4, 1);
    }
    // An input wider than every layer: the fused workspace's δ buffers are sized by the layer
    // outputs only.
    let narrow =
        Mlp { sizes: vec![100, 8, 3], activation: Activation::Gelu, loss: Loss::SoftmaxCrossEntropy };
    check_meta(&dev, &narrow, DType::F64, 2, Order::Second, 3, 4);
    // One task of one layer (no hidden layer: no activation, no δ chain).
    let linear = Mlp { sizes: vec![5, 3], activation: Activation::Softplus, loss: Loss::SoftmaxCrossEntropy };
    check_meta(&dev, &linear, DType::F64, 2, Order::Second, 1, 2);
    // More tasks than the 65 535 blocks of gridDim.z and of the 1-D grids: the tiled product
    // and the element-wise kernels must stride over the rest (the fused kernel puts tasks on
    // gridDim.x).
    let tiny = Mlp { sizes: vec![1, 3, 1], activation: Activation::Relu, loss: Loss::Mse };
    check_meta(&dev, &tiny, DType::F32, 2, Order::Second, 70_000, 2);
}

#[test]
fn cuda_broadcast_rows_and_single_samples_match_cpu() {
    let Some(dev) = cuda_or_skip("cuda_broadcast_rows_and_single_samples_match_cpu") else { return };
    set_poisoning(true);
    // Parameters and direction as one [P] row each (task stride 0 in every kernel), one sample
    // or two per task, on the fused and the forced tiled path.
    for (sizes, act, loss, tasks, n) in [
        (vec![2, 3, 1], Activation::Relu, Loss::Mse, 1, 1),
        (vec![4, 9, 7, 3], Activation::Gelu, Loss::SoftmaxCrossEntropy, 3, 2),
    ] {
        let net = Mlp { sizes, activation: act, loss };
        let p = net.num_params();
        for dtype in [DType::F32, DType::F64] {
            let b = batch_on(&net, tasks, n, 1, dtype, &dev, 13);
            let mut rng = Rng::new(17);
            let params = from_f64(&rng.normal_vec(p), &[p], dtype, &dev).unwrap().0;
            let v = from_f64(&rng.normal_vec(p), &[p], dtype, &dev).unwrap().0;
            let (x, y) = (&b.support_x, &b.support_y);
            let c = cpu64;
            let tol = if dtype == DType::F64 { 1e-10 } else { 1e-4 };
            for tiled in [false, true] {
                let _path = path_lock();
                force_tiled(tiled);
                let out = net.forward(&params, x).unwrap();
                let (l, g) = net.loss_and_grad(&params, x, y).unwrap();
                let hv = net.hvp(&params, x, y, &v).unwrap();
                force_tiled(false);
                let what = format!("{:?} {dtype} broadcast rows, n = {n}, forced tiled={tiled}", net.sizes);
                let close = |field: &str, gpu: &Tensor, cpu: &Tensor| {
                    assert_close(
                        &format!("{field} {what}"),
                        &to_f64(gpu).unwrap(),
                        &to_f64(cpu).unwrap(),
                        tol,
                    )
                };
                close("forward", &out, &net.forward(&c(&params), &c(x)).unwrap());
                let (cl, cg) = net.loss_and_grad(&c(&params), &c(x), &c(y)).unwrap();
                close("loss", &l, &cl);
                close("grad", &g, &cg);
                close("hvp", &hv, &net.hvp(&c(&params), &c(x), &c(y), &c(&v)).unwrap());
            }
        }
    }
}

#[test]
fn cuda_forward_grad_hvp_match_cpu() {
    let Some(dev) = cuda_or_skip("cuda_forward_grad_hvp_match_cpu") else { return };
    set_poisoning(true);
    for (sizes, act, loss) in [
        (vec![3, 20, 11, 4], Activation::Gelu, Loss::Mse),
        (vec![6, 9, 5], Activation::Softplus, Loss::SoftmaxCrossEntropy),
        (vec![64, 256, 256, 10], Activation::Tanh, Loss::SoftmaxCrossEntropy),
    ] {
        let net = Mlp { sizes, activation: act, loss };
        let (tasks, p) = (4, net.num_params());
        for dtype in [DType::F32, DType::F64] {
            let b = batch_on(&net, tasks, 17, 1, dtype, &dev, 11);
            let mut rng = Rng::new(5);
            let params = from_f64(
                &rng.normal_vec(tasks * p).iter().map(|v| 0.3 * v).collect::<Vec<_>>(),
                &[tasks, p],
                dtype,
                &dev,
            )
            .unwrap()
            .0;
            let v = from_f64(&rng.normal_vec(tasks * p), &[tasks, p], dtype, &dev).unwrap().0;
            let c = cpu64;
            let (x, y) = (&b.support_x, &b.support_y);
            let tol = if dtype == DType::F64 { 1e-10 } else { 1e-4 };
            for tiled in [false, true] {
                let _path = path_lock();
                force_tiled(tiled);
                let out = net.forward(&params, x).unwrap();
                let (l, g) = net.loss_and_grad(&params, x, y).unwrap();
                let hv = net.hvp(&params, x, y, &v).unwrap();
                let hv_b =
                    net.hvp(&params, x, y, &c(&v).reshape(&[tasks * p]).unwrap().to_device(&dev).unwrap());
                force_tiled(false);
                let what = format!("{:?} {dtype} forced tiled={tiled}", net.sizes);
                assert_close(
                    &format!("forward {what}"),
                    &to_f64(&out).unwrap(),
                    &to_f64(&net.forward(&c(&params), &c(x)).unwrap()).unwrap(),
                    tol,
                );
                let (cl, cg) = net.loss_and_grad(&c(&params), &c(x), &c(y)).unwrap();
                assert_close(&format!("loss {what}"), &to_f64(&l).unwrap(), &to_f64(&cl).unwrap(), tol);
                assert_close(&format!("grad {what}"), &to_f64(&g).unwrap(), &to_f64(&cg).unwrap(), tol);
                let ch = net.hvp(&c(&params), &c(x), &c(y), &c(&v)).unwrap();
                assert_close(&format!("hvp {what}"), &to_f64(&hv).unwrap(), &to_f64(&ch).unwrap(), tol);
                assert!(matches!(hv_b, Err(Error::ShapeMismatch { .. })), "a [T·P] direction is refused");
            }
        }
    }
}

#[test]
fn cuda_mixed_devices_are_refused() {
    let Some(dev) = cuda_or_skip("cuda_mixed_devices_are_refused") else { return };
    set_poisoning(true);
    let net = Mlp { sizes: vec![2, 4, 1], activation: Activation::Relu, loss: Loss::Mse };
    let b = batch_on(&net, 2, 3, 3, DType::F32, &dev, 1);
    let theta_cpu = net.init(0, DType::F32, &Device::cpu()).unwrap();
    let m = Maml { inner_steps: 1, inner_lr: 0.1, order: Order::Second, return_adapted: false };
    assert!(matches!(m.meta_gradient(&net, &theta_cpu, &b), Err(Error::DeviceMismatch { .. })));
    let mixed = TaskBatch { query_y: b.query_y.to_device(&Device::cpu()).unwrap(), ..b.clone() };
    let theta = theta_cpu.to_device(&dev).unwrap();
    assert!(matches!(m.meta_gradient(&net, &theta, &mixed), Err(Error::DeviceMismatch { .. })));
}
