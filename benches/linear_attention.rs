//! Benchmarks of the linear_attention family.
//!
//! Criterion groups: CPU forward and forward+backward on a small shape (the whole file stays
//! around a minute on two cores), and, when a GPU is usable, the shapes in bf16.
//!
//! Report lines (`[metakernels] ...`) for the shapes (B,H,T,D) = (1,8,4096,64),
//! (4,16,2048,128), (8,8,1024,64): time, GFLOP/s counted as 2·T·64·(Dk+Dv) + 4·T·Dk·Dv per head
//! and pass (whatever chunk the kernel uses), GB/s of the minimum traffic (q, k, v read once, o
//! written once), the fraction of the same-run ceiling (CPU: f32 GEMM rate; GPU: device copy
//! bandwidth), and the speed-up over the unfused quadratic baseline (masked QKᵀ then ·V, on the
//! same device: matrixmultiply on the CPU, checked against the crate at a small shape first;
//! `forward_quadratic` and `forward_backward_quadratic` on the GPU; forward and
//! forward+backward), over the other GPU
//! paths (fused, split, and the f32 SIMT core with tensor cores off, forward and
//! forward+backward) and, at a small shape, over the reference kernel. On the GPU also one
//! wide-head shape, (2,8,2048,256), the 32-row chunks of the tensor-core kernels. At one shape
//! per device also the linear transformer's configuration (causal, elu + 1, normalised) against
//! the plain one in the same run.

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use metakernels::bench_support::{best_ms, cpu_ceilings, device_copy_gbps, Measurement};
use metakernels::linear_attention::{FeatureMap, KernelPath, LinearAttention};
use metakernels::testing::randn;
use metakernels::{DType, Device, Tensor};
use rayon::prelude::*;

const SHAPES: [(usize, usize, usize, usize); 3] = [(1, 8, 4096, 64), (4, 16, 2048, 128), (8, 8, 1024, 64)];
/// Dk = Dv = 256: the tensor-core kernels' 32-row chunk (GPU report only).
const WIDE_SHAPE: (usize, usize, usize, usize) = (2, 8, 2048, 256);

/// The FLOP count of one pass over all heads.
fn flops(b: usize, h: usize, t: usize, dk: usize, dv: usize) -> f64 {
    (b * h) as f64 * (2.0 * (t * 64 * (dk + dv)) as f64 + 4.0 * (t * dk * dv) as f64)
}

/// q, k, v read once and o written once.
fn min_bytes(b: usize, h: usize, t: usize, dk: usize, dv: usize, dtype: DType) -> f64 {
    ((b * h * t) * (2 * dk + 2 * dv) * dtype.size_in_bytes()) as f64
}

fn inputs(shape: (usize, usize, usize, usize), dtype: DType, dev: &Device) -> (Tensor, Tensor, Tensor) {
    let (b, h, t, d) = shape;
    let x = |seed| randn(&[b, h, t, d], dtype, dev, seed).expect("random input").0;
    (x(1), x(2), x(3))
}

/// C[m×n] = A[m×k]·B[k×n] through matrixmultiply; each operand is given with its (row, column)
/// strides, so a transposed operand is the same buffer with the strides swapped.
#[allow(clippy::too_many_arguments)]
fn gemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    sa: (usize, usize),
    b: &[f32],
    sb: (usize, usize),
    c: &mut [f32],
) {
    let last = |rows: usize, cols: usize, (r, c): (usize, usize)| (rows - 1) * r + (cols - 1) * c;
    assert!(last(m, k, sa) < a.len() && last(k, n, sb) < b.len() && m * n <= c.len(), "gemm operand sizes");
    // SAFETY: the assertion above keeps every element the strides address inside its slice.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            sa.0 as isize,
            sa.1 as isize,
            b.as_ptr(),
            sb.0 as isize,
            sb.1 as isize,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// Zeroes the strict upper triangle of a T×T matrix (the causal mask).
fn mask_above_diagonal(a: &mut [f32], t: usize) {
    for i in 0..t {
        a[i * t + i + 1..(i + 1) * t].fill(0.0);
    }
}

/// The unfused baseline on the CPU, as an autograd framework runs it: per head, A = QKᵀ (T×T,
/// masked when causal) and O = A·V; with `grad_output`, also the backward from the saved A:
/// dV = AᵀdO, dA = mask(dO·Vᵀ), dQ = dA·K, dK = dAᵀ·Q. Every product through matrixmultiply,
/// rayon over heads. Returns O (and dQ, dK, dV).
#[allow(clippy::type_complexity)]
fn quadratic_baseline(
    (q, k, v): (&[f32], &[f32], &[f32]),
    grad_output: Option<&[f32]>,
    heads: usize,
    t: usize,
    d: usize,
    causal: bool,
) -> (Vec<f32>, Option<[Vec<f32>; 3]>) {
    let n = t * d;
    let per_head: Vec<(Vec<f32>, Option<[Vec<f32>; 3]>)> = (0..heads)
        .into_par_iter()
        .map(|hd| {
            let (q, k, v) = (&q[hd * n..(hd + 1) * n], &k[hd * n..(hd + 1) * n], &v[hd * n..(hd + 1) * n]);
            let (rows, cols) = ((d, 1), (1, d)); // a [T, D] head as itself and as its transpose
            let mut a = vec![0f32; t * t];
            gemm(t, d, t, q, rows, k, cols, &mut a);
            if causal {
                mask_above_diagonal(&mut a, t);
            }
            let mut o = vec![0f32; n];
            gemm(t, t, d, &a, (t, 1), v, rows, &mut o);
            let grads = grad_output.map(|go| {
                let go = &go[hd * n..(hd + 1) * n];
                let (mut dq, mut dk, mut dv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
                gemm(t, t, d, &a, (1, t), go, rows, &mut dv);
                let mut da = vec![0f32; t * t];
                gemm(t, d, t, go, rows, v, cols, &mut da);
                if causal {
                    mask_above_diagonal(&mut da, t);
                }
                gemm(t, t, d, &da, (t, 1), k, rows, &mut dq);
                gemm(t, t, d, &da, (1, t), q, rows, &mut dk);
                [dq, dk, dv]
            });
            (o, grads)
        })
        .collect();
    let out = per_head.iter().flat_map(|(o, _)| o.iter().copied()).collect();
    let grads = grad_output.map(|_| {
        std::array::from_fn(|i| {
            per_head
                .iter()
                .flat_map(|(_, g)| g.as_ref().map_or(&[][..], |g| &g[i][..]).iter().copied())
                .collect()
        })
    });
    (out, grads)
}

/// The quadratic baseline computes what the crate computes (identity map, unnormalised, scale 1):
/// a ratio is never taken against a wrong result. Checked at a small shape, causal and not.
fn check_quadratic_baseline() {
    let dev = Device::cpu();
    let (b, h, t, d) = (1, 2, 70, 8);
    let (q, k, v) = inputs((b, h, t, d), DType::F32, &dev);
    let go = randn(&[b, h, t, d], DType::F32, &dev, 4).expect("random input").0;
    let host = |x: &Tensor| x.to_vec::<f32>().expect("host copy");
    let (qh, kh, vh, gh) = (host(&q), host(&k), host(&v), host(&go));
    for causal in [true, false] {
        let attn = LinearAttention { causal, ..Default::default() };
        let (o, grads) = quadratic_baseline((&qh, &kh, &vh), Some(&gh), b * h, t, d, causal);
        let want = attn.backward(&q, &k, &v, None, &go, None).expect("backward");
        let forward = attn.forward(&q, &k, &v, None).expect("forward").output;
        let [dq, dk, dv] = grads.expect("the baseline's gradients");
        for (name, got, want) in
            [("o", o, forward), ("dq", dq, want.dq), ("dk", dk, want.dk), ("dv", dv, want.dv)]
        {
            let want = host(&want);
            let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let scale = want.iter().map(|x| x.abs()).fold(0f32, f32::max);
            assert!(
                err <= 1e-4 * scale,
                "quadratic baseline {name} (causal {causal}): off by {err} of {scale}"
            );
        }
    }
}

fn cpu_report() {
    check_quadratic_baseline();
    let dev = Device::cpu();
    let ceilings = cpu_ceilings();
    let mut gemm_rate = ("CPU f32 GEMM GFLOP/s".to_string(), ceilings.f32_gemm_gflops);
    println!(
        "[metakernels] CPU: {} rayon threads, f32 GEMM {:.1} GFLOP/s, copy {:.1} GB/s",
        rayon::current_num_threads(),
        ceilings.f32_gemm_gflops,
        ceilings.copy_gbps
    );
    for shape in SHAPES {
        let (b, h, t, d) = shape;
        let (q, k, v) = inputs(shape, DType::F32, &dev);
        let (qh, kh, vh) =
            (q.to_vec::<f32>().unwrap(), k.to_vec::<f32>().unwrap(), v.to_vec::<f32>().unwrap());
        let go = v.clone();
        let name = format!("B{b} H{h} T{t} D{d} f32");
        for causal in [true, false] {
            let attn = LinearAttention { causal, ..Default::default() };
            let kind = if causal { "causal" } else { "noncausal" };
            // On a shared machine the load changes from second to second: interleave rounds of
            // the GEMM ceiling and of the kernel, keeping the best of each.
            let mut fwd = f64::INFINITY;
            for _ in 0..4 {
                gemm_rate.1 = gemm_rate.1.max(metakernels::bench_support::cpu_sgemm_gflops());
                fwd = fwd.min(best_ms(&dev, 5, || attn.forward(&q, &k, &v, None).map(|_| ())).unwrap());
            }
            // The quadratic baseline is costly on two cores: one timed call after a warm-up.
            let quad = best_ms(&dev, 1, || {
                std::hint::black_box(quadratic_baseline((&qh, &kh, &vh), None, b * h, t, d, causal));
                Ok(())
            })
            .unwrap();
            Measurement {
                kernel: format!("linear_attention/forward_{kind}"),
                shape: name.clone(),
                device: "cpu".into(),
                ms: fwd,
                flops: flops(b, h, t, d, d),
                bytes: min_bytes(b, h, t, d, d, DType::F32),
                ceiling: Some(gemm_rate.clone()),
                baselines: vec![("quadratic masked QKᵀ·V".into(), quad)],
            }
            .report();
            let both = best_ms(&dev, 2, || {
                attn.forward(&q, &k, &v, None)?;
                attn.backward(&q, &k, &v, None, &go, None).map(|_| ())
            })
            .unwrap();
            let goh = go.to_vec::<f32>().unwrap();
            let quad_both = best_ms(&dev, 1, || {
                std::hint::black_box(quadratic_baseline((&qh, &kh, &vh), Some(&goh), b * h, t, d, causal));
                Ok(())
            })
            .unwrap();
            Measurement {
                kernel: format!("linear_attention/forward+backward_{kind}"),
                shape: name.clone(),
                device: "cpu".into(),
                ms: both,
                // forward + backward: the forward, its recompute, and the three backward passes.
                flops: 5.0 * flops(b, h, t, d, d),
                bytes: 2.0 * min_bytes(b, h, t, d, d, DType::F32),
                ceiling: Some(gemm_rate.clone()),
                baselines: vec![("quadratic masked QKᵀ·V, forward and backward".into(), quad_both)],
            }
            .report();
        }
    }
    feature_map_report(&dev, SHAPES[0], DType::F32, gemm_rate);
    split_rule_report(&dev);
    // The chunk products run on the crate's own unpacked GEMM rather than matrixmultiply: both
    // timed here on one thread at the shapes a 64-row chunk makes (Dk, Dv = 64 and 128; 65 is
    // the backward's augmented width).
    for (m, k, n) in [(64, 64, 64), (64, 64, 65), (64, 128, 128), (64, 64, 128)] {
        let (ours, packed) = metakernels::bench_support::linear_attention_chunk_gemm_rates(m, k, n);
        println!(
            "[metakernels] linear_attention/chunk GEMM {m}x{k}·{k}x{n} f32, one thread: unpacked {ours:.1} \
             GFLOP/s, matrixmultiply {packed:.1} GFLOP/s ({:.2}x)",
            ours / packed
        );
    }
}

/// The CPU's rule between the fused form (one task per (sequence, head)) and the split form
/// (chunk states first, then outputs in parallel): `Auto` splits when there are three rayon
/// threads or more per head (cpu.rs, `SPLIT_THREADS_PER_SEQUENCE`). Both forms timed at B·H of
/// one, a third of the threads, the threads and four times them, with the form `Auto` takes,
/// so that the rule is measured on every machine that runs the bench, not assumed.
fn split_rule_report(dev: &Device) {
    let threads = rayon::current_num_threads();
    let attn = LinearAttention::default();
    let mut heads: Vec<usize> = vec![1, (threads / 3).max(1), threads, 4 * threads];
    heads.dedup();
    for h in heads {
        let (q, k, v) = inputs((1, h, 4096, 64), DType::F32, dev);
        let time =
            |path| best_ms(dev, 5, || attn.forward_on_path(&q, &k, &v, None, path).map(|_| ())).unwrap();
        let (fused, split, auto) = (time(KernelPath::Fused), time(KernelPath::Split), time(KernelPath::Auto));
        let splits = metakernels::bench_support::linear_attention_cpu_auto_splits(h);
        let picks = if splits { "split" } else { "fused" };
        println!(
            "[metakernels] linear_attention/cpu split rule B1 H{h} T4096 D64 f32, {threads} threads: fused \
             {fused:.2} ms, split {split:.2} ms, auto {auto:.2} ms (takes {picks}; the faster is {})",
            if fused <= split { "fused" } else { "split" }
        );
    }
}

/// The configuration of Katharopoulos et al.'s linear transformer (causal, elu + 1, normalised)
/// against the plain one (identity map, no normaliser) in the same run: what the feature map and
/// the denominators cost, forward and forward+backward.
fn feature_map_report(
    dev: &Device,
    shape: (usize, usize, usize, usize),
    dtype: DType,
    ceiling: (String, f64),
) {
    let (b, h, t, d) = shape;
    let (q, k, v) = inputs(shape, dtype, dev);
    let go = v.clone();
    let plain = LinearAttention::default();
    let elu = LinearAttention { feature_map: FeatureMap::EluPlusOne, normalize: true, ..plain };
    let reps = if dev.is_cpu() { 3 } else { 10 };
    let forward = |attn: &LinearAttention| best_ms(dev, reps, || attn.forward(&q, &k, &v, None).map(|_| ()));
    let both = |attn: &LinearAttention| {
        best_ms(dev, reps, || {
            attn.forward(&q, &k, &v, None)?;
            attn.backward(&q, &k, &v, None, &go, None).map(|_| ())
        })
    };
    let device = if dev.is_cpu() { "cpu".to_string() } else { format!("{dev} ({})", dev.name()) };
    // (pass, time, plain time, passes counted, minimum traffic counted)
    let runs = [
        ("forward", forward(&elu), forward(&plain), 1.0, 1.0),
        ("forward+backward", both(&elu), both(&plain), 5.0, 2.0),
    ];
    for (pass, ms, plain_ms, passes, traffic) in runs {
        Measurement {
            kernel: format!("linear_attention/{pass}_causal_elu+1_normalised"),
            shape: format!("B{b} H{h} T{t} D{d} {dtype}"),
            device: device.clone(),
            ms: ms.unwrap(),
            flops: passes * flops(b, h, t, d, d),
            bytes: traffic * min_bytes(b, h, t, d, d, dtype),
            ceiling: Some(ceiling.clone()),
            baselines: vec![("identity map, unnormalised".into(), plain_ms.unwrap())],
        }
        .report();
    }
}

fn cuda_report(gpu: &Device) {
    let copy = device_copy_gbps(gpu).unwrap_or(f64::NAN);
    println!("[metakernels] {}: device copy {copy:.1} GB/s", gpu.name());
    for shape in SHAPES.into_iter().chain([WIDE_SHAPE]) {
        let (b, h, t, d) = shape;
        let dtype = DType::BF16;
        let (q, k, v) = inputs(shape, dtype, gpu);
        let name = format!("B{b} H{h} T{t} D{d} bf16");
        for causal in [true, false] {
            let attn = LinearAttention { causal, ..Default::default() };
            let kind = if causal { "causal" } else { "noncausal" };
            let mut times = Vec::new();
            for path in [KernelPath::Auto, KernelPath::Fused, KernelPath::Split, KernelPath::Simt] {
                let ms =
                    best_ms(gpu, 10, || attn.forward_on_path(&q, &k, &v, None, path).map(|_| ())).unwrap();
                times.push((format!("{path:?}"), ms));
            }
            let quadratic = best_ms(gpu, 3, || attn.forward_quadratic(&q, &k, &v).map(|_| ()));
            match quadratic {
                Ok(ms) => times.push(("quadratic masked QKᵀ·V".into(), ms)),
                Err(e) => println!("[metakernels] quadratic baseline skipped at {name}: {e}"),
            }
            let ms = times[0].1;
            Measurement {
                kernel: format!("linear_attention/forward_{kind}"),
                shape: name.clone(),
                device: format!("{gpu} ({})", gpu.name()),
                ms,
                flops: flops(b, h, t, d, d),
                bytes: min_bytes(b, h, t, d, d, dtype),
                ceiling: Some(("device copy GB/s".into(), copy)),
                baselines: times[1..].to_vec(),
            }
            .report();
            let go = v.clone();
            let forward_backward = |path: KernelPath| {
                best_ms(gpu, 5, || {
                    attn.forward_on_path(&q, &k, &v, None, path)?;
                    attn.backward_on_path(&q, &k, &v, None, &go, None, path).map(|_| ())
                })
            };
            let both = forward_backward(KernelPath::Auto).unwrap();
            let simt = forward_backward(KernelPath::Simt).unwrap();
            let mut baselines = vec![("SIMT core (tensor cores off)".into(), simt)];
            match best_ms(gpu, 3, || attn.forward_backward_quadratic(&q, &k, &v, &go).map(|_| ())) {
                Ok(ms) => baselines.push(("quadratic masked QKᵀ·V, forward and backward".into(), ms)),
                Err(e) => println!("[metakernels] quadratic forward+backward skipped at {name}: {e}"),
            }
            Measurement {
                kernel: format!("linear_attention/forward+backward_{kind}"),
                shape: name.clone(),
                device: format!("{gpu} ({})", gpu.name()),
                ms: both,
                flops: 5.0 * flops(b, h, t, d, d),
                bytes: 2.0 * min_bytes(b, h, t, d, d, dtype),
                ceiling: Some(("device copy GB/s".into(), copy)),
                baselines,
            }
            .report();
        }
    }
    feature_map_report(gpu, SHAPES[1], DType::BF16, ("device copy GB/s".into(), copy));
    // The O(T²)-per-element reference kernel only at a shape where it finishes quickly.
    let shape = (1, 8, 512, 64);
    let (q, k, v) = inputs(shape, DType::BF16, gpu);
    let attn = LinearAttention::default();
    let fast =
        best_ms(gpu, 10, || attn.forward_on_path(&q, &k, &v, None, KernelPath::Auto).map(|_| ())).unwrap();
    let slow = best_ms(gpu, 2, || attn.forward_on_path(&q, &k, &v, None, KernelPath::Reference).map(|_| ()))
        .unwrap();
    Measurement {
        kernel: "linear_attention/forward_causal".into(),
        shape: "B1 H8 T512 D64 bf16".into(),
        device: format!("{gpu} ({})", gpu.name()),
        ms: fast,
        flops: flops(1, 8, 512, 64, 64),
        bytes: min_bytes(1, 8, 512, 64, 64, DType::BF16),
        ceiling: None,
        baselines: vec![("reference kernel".into(), slow)],
    }
    .report();
}

fn bench_cpu(c: &mut Criterion) {
    let dev = Device::cpu();
    let shape = (1, 4, 512, 64);
    let (b, h, t, d) = shape;
    let (q, k, v) = inputs(shape, DType::F32, &dev);
    let mut g = c.benchmark_group("linear_attention_cpu");
    g.sample_size(10)
        .measurement_time(std::time::Duration::from_secs(2))
        .warm_up_time(std::time::Duration::from_millis(500));
    g.throughput(Throughput::Elements((b * h * t) as u64));
    for causal in [true, false] {
        let attn = LinearAttention { causal, ..Default::default() };
        let id = format!("B{b}H{h}T{t}D{d}_{}", if causal { "causal" } else { "noncausal" });
        g.bench_function(BenchmarkId::new("forward", &id), |bench| {
            bench.iter(|| attn.forward(&q, &k, &v, None).unwrap())
        });
        g.bench_function(BenchmarkId::new("backward", &id), |bench| {
            bench.iter(|| attn.backward(&q, &k, &v, None, &v, None).unwrap())
        });
    }
    g.finish();
}

fn bench_cuda(c: &mut Criterion) {
    let Some(gpu) = Device::cuda(0).ok().filter(|_| metakernels::kernels_built()) else {
        println!("linear_attention: no CUDA device, skipping the GPU groups");
        return;
    };
    let mut g = c.benchmark_group("linear_attention_cuda");
    g.sample_size(10).measurement_time(std::time::Duration::from_secs(2));
    for shape in SHAPES {
        let (b, h, t, d) = shape;
        let (q, k, v) = inputs(shape, DType::BF16, &gpu);
        g.throughput(Throughput::Bytes(min_bytes(b, h, t, d, d, DType::BF16) as u64));
        let attn = LinearAttention::default();
        g.bench_function(BenchmarkId::new("forward_causal_bf16", format!("B{b}H{h}T{t}D{d}")), |bench| {
            bench.iter(|| {
                attn.forward(&q, &k, &v, None).unwrap();
                gpu.synchronize().unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_cpu, bench_cuda);

fn main() {
    if metakernels::bench_support::cpu_reports_enabled() {
        cpu_report();
    }
    match Device::cuda(0) {
        Ok(gpu) if metakernels::kernels_built() => cuda_report(&gpu),
        _ => println!("[metakernels] no usable CUDA device: GPU report skipped"),
    }
    benches();
    criterion::Criterion::default().configure_from_args().final_summary();
}
