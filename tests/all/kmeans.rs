//! Tests of the kmeans family: assign/update against float64 brute force, ties, determinism,
//! Lloyd fits (monotone inertia, agreement with a float64 Lloyd run from the same start,
//! reseeding), errors, and CUDA fast vs reference vs CPU when a GPU is present.

use metakernels::kmeans::{self, Init, KMeans, Metric};
use metakernels::testing::{self, Rng};
use metakernels::{DType, Device, Error, Tensor};

fn cpu() -> Device {
    Device::cpu()
}

/// `n` points around `k` centres spread by `spread` (or uniform in [-1,1) when `clustered` is off).
fn data(n: usize, d: usize, k: usize, clustered: bool, seed: u64) -> Vec<f64> {
    let mut rng = Rng::new(seed);
    if !clustered {
        return rng.uniform_vec(n * d, -1.0, 1.0);
    }
    let centres: Vec<f64> = rng.normal_vec(k * d).into_iter().map(|v| 5.0 * v).collect();
    (0..n)
        .flat_map(|i| (0..d).map(move |j| (i, j)))
        .map(|(i, j)| centres[(i % k) * d + j] + 0.3 * rng.normal())
        .collect()
}

fn dist64(metric: Metric, a: &[f64], b: &[f64]) -> f64 {
    match metric {
        Metric::SquaredL2 => a.iter().zip(b).map(|(p, q)| (p - q) * (p - q)).sum(),
        Metric::MeanL1 => a.iter().zip(b).map(|(p, q)| (p - q).abs()).sum::<f64>() / a.len() as f64,
    }
}

/// Checks an assignment against float64 brute force: the chosen centroid is the nearest up to
/// rounding (`slack` relative to the row's scale) and the distance matches it.
fn check_assign(x: &[f64], c: &[f64], d: usize, metric: Metric, labels: &[u32], dist: &[f32], slack: f64) {
    let k = c.len() / d;
    for (i, row) in x.chunks_exact(d).enumerate() {
        let all: Vec<f64> = (0..k).map(|j| dist64(metric, row, &c[j * d..(j + 1) * d])).collect();
        let best = all.iter().cloned().fold(f64::INFINITY, f64::min);
        let scale = match metric {
            Metric::SquaredL2 => {
                row.iter().map(|v| v * v).sum::<f64>() + c.iter().map(|v| v * v).sum::<f64>() / k as f64 + 1.0
            }
            Metric::MeanL1 => row.iter().map(|v| v.abs()).sum::<f64>() / d as f64 + 1.0,
        };
        let got = labels[i] as usize;
        assert!(got < k, "row {i}: label {got} out of range");
        assert!(all[got] <= best + slack * scale, "row {i}: label {got} at {} but best {best}", all[got]);
        assert!(
            ((dist[i] as f64) - all[got]).abs() <= slack * scale,
            "row {i}: distance {} vs {}",
            dist[i],
            all[got]
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn assign_case(
    n: usize,
    d: usize,
    k: usize,
    metric: Metric,
    dtype: DType,
    clustered: bool,
    seed: u64,
    dev: &Device,
) {
    let xv = data(n, d, k.min(n), clustered, seed);
    let (x, x64) = testing::from_f64(&xv, &[n, d], dtype, dev).unwrap();
    let cv: Vec<f64> = Rng::new(seed + 1).normal_vec(k * d);
    // Centroids rounded to x's dtype, as assign documents.
    let (c, c64) = testing::from_f64(&cv, &[k, d], dtype, dev).unwrap();
    let (labels, dist) = kmeans::assign(&x, &c, metric).unwrap();
    assert_eq!(labels.shape(), &[n]);
    let slack = if dtype == DType::F32 { 1e-5 } else { 1e-3 };
    check_assign(&x64, &c64, d, metric, &labels.to_vec().unwrap(), &dist.to_vec().unwrap(), slack);
}

#[test]
fn assign_matches_f64_brute_force() {
    testing::set_poisoning(true);
    for metric in [Metric::SquaredL2, Metric::MeanL1] {
        for &(n, d, k) in &[(1, 1, 1), (37, 1, 3), (300, 7, 5), (257, 16, 130), (129, 33, 1), (20, 5, 20)] {
            for clustered in [true, false] {
                assign_case(n, d, k, metric, DType::F32, clustered, (n * 31 + d * 7 + k) as u64, &cpu());
            }
        }
        for dtype in [DType::F16, DType::BF16] {
            assign_case(200, 24, 9, metric, dtype, true, 11, &cpu());
        }
    }
}

#[test]
fn assign_medium_shape_spans_several_gemm_blocks() {
    testing::set_poisoning(true);
    // N not a multiple of the 256-row block, K over the 512-centroid block.
    assign_case(3001, 48, 600, Metric::SquaredL2, DType::F32, true, 99, &cpu());
    assign_case(1500, 20, 70, Metric::MeanL1, DType::BF16, false, 98, &cpu());
}

#[test]
fn assign_ties_go_to_the_lowest_index() {
    testing::set_poisoning(true);
    // x = 0 is equidistant from (1,0), (0,1), (-1,0); a duplicated centroid too.
    let x = Tensor::from_slice(&[0.0f32, 0.0, 2.0, 2.0], &[2, 2], &cpu()).unwrap();
    let c =
        Tensor::from_slice(&[3.0f32, 3.0, 1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 2.0, 2.0], &[5, 2], &cpu()).unwrap();
    for metric in [Metric::SquaredL2, Metric::MeanL1] {
        let (l, d) = kmeans::assign(&x, &c, metric).unwrap();
        let l = l.to_vec::<u32>().unwrap();
        assert_eq!(l[1], 4, "{metric:?}: exact match");
        assert_eq!(d.to_vec::<f32>().unwrap()[1], 0.0);
        assert_eq!(l[0], 1, "{metric:?}: tie between 1, 2 and 3 goes to 1");
    }
    let dup = Tensor::from_slice(&[1.0f32, 1.0, 1.0, 1.0], &[2, 2], &cpu()).unwrap();
    let (l, _) = kmeans::assign(&x, &dup, Metric::SquaredL2).unwrap();
    assert_eq!(l.to_vec::<u32>().unwrap(), vec![0, 0]);
}

fn update_reference(x: &[f64], labels: &[u32], d: usize, k: usize) -> (Vec<f64>, Vec<u32>) {
    let mut sums = vec![0f64; k * d];
    let mut counts = vec![0u32; k];
    for (row, &l) in x.chunks_exact(d).zip(labels) {
        counts[l as usize] += 1;
        for j in 0..d {
            sums[l as usize * d + j] += row[j];
        }
    }
    for c in 0..k {
        for j in 0..d {
            if counts[c] > 0 {
                sums[c * d + j] /= counts[c] as f64;
            }
        }
    }
    (sums, counts)
}

#[test]
fn update_matches_f64_and_is_bitwise_deterministic() {
    testing::set_poisoning(true);
    for &(n, d, k) in &[(1, 1, 1), (1000, 13, 7), (513, 64, 40), (50, 3, 60)] {
        for dtype in [DType::F32, DType::BF16] {
            let mut rng = Rng::new(n as u64);
            let (x, x64) = testing::randn(&[n, d], dtype, &cpu(), n as u64 + 3).unwrap();
            let labels: Vec<u32> = (0..n).map(|_| rng.below(k as u64) as u32).collect();
            let lt = Tensor::from_slice(&labels, &[n], &cpu()).unwrap();
            let (c, counts) = kmeans::update(&x, &lt, k).unwrap();
            let (c_ref, counts_ref) = update_reference(&x64, &labels, d, k);
            assert_eq!(counts.to_vec::<u32>().unwrap(), counts_ref);
            testing::assert_close("update", &testing::to_f64(&c).unwrap(), &c_ref, 1e-5);
            let (c2, _) = kmeans::update(&x, &lt, k).unwrap();
            let bits =
                |t: &Tensor| t.to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&c), bits(&c2), "same bits twice");
        }
    }
}

#[test]
fn sort_by_cluster_is_stable() {
    testing::set_poisoning(true);
    let labels = [2u32, 0, 2, 1, 0, 2];
    let t = Tensor::from_slice(&labels, &[6], &cpu()).unwrap();
    let (order, offsets) = kmeans::sort_by_cluster(&t, 4).unwrap();
    assert_eq!(order.to_vec::<u32>().unwrap(), vec![1, 4, 3, 0, 2, 5]);
    assert_eq!(offsets.to_vec::<u32>().unwrap(), vec![0, 2, 3, 6, 6]);
}

/// Float64 Lloyd from given centroids, with the crate's documented reseeding and stopping rule.
fn lloyd64(x: &[f64], d: usize, mut c: Vec<f64>, iters: usize, metric: Metric) -> (Vec<f64>, Vec<u32>) {
    let k = c.len() / d;
    let assign = |c: &[f64]| -> Vec<u32> {
        x.chunks_exact(d)
            .map(|row| {
                let all: Vec<f64> = (0..k).map(|j| dist64(metric, row, &c[j * d..(j + 1) * d])).collect();
                (0..k).min_by(|&a, &b| all[a].total_cmp(&all[b]).then(a.cmp(&b))).unwrap() as u32
            })
            .collect()
    };
    for _ in 0..iters {
        let labels = assign(&c);
        let (next, counts) = update_reference(x, &labels, d, k);
        assert!(counts.iter().all(|&c| c > 0), "test data must not empty a cluster");
        c = next;
    }
    let labels = assign(&c);
    (c, labels)
}

#[test]
fn fit_matches_f64_lloyd_from_the_same_start() {
    testing::set_poisoning(true);
    for metric in [Metric::SquaredL2, Metric::MeanL1] {
        let (n, d, k) = (400, 6, 5);
        let xv = data(n, d, k, true, 21);
        let (x, x64) = testing::from_f64(&xv, &[n, d], DType::F32, &cpu()).unwrap();
        // Start from rows 0..k (one per generated cluster).
        let c0: Vec<f64> = x64[..k * d].to_vec();
        let init =
            Tensor::from_slice(&c0.iter().map(|&v| v as f32).collect::<Vec<_>>(), &[k, d], &cpu()).unwrap();
        let fit = KMeans::new(k).metric(metric).max_iter(4).tol(0.0).init(Init::Given(init)).fit(&x).unwrap();
        let (c_ref, labels_ref) = lloyd64(&x64, d, c0, fit.iterations, metric);
        testing::assert_close("centroids", &testing::to_f64(&fit.centroids).unwrap(), &c_ref, 1e-5);
        assert_eq!(fit.assignment.to_vec::<u32>().unwrap(), labels_ref);
    }
}

#[test]
fn fit_inertia_never_increases_and_recovers_clusters() {
    testing::set_poisoning(true);
    for (seed, init) in [(1u64, Init::KMeansPlusPlus { seed: 3 }), (2, Init::Random { seed: 4 })] {
        let (n, d, k) = (1003, 8, 6);
        let xv = data(n, d, k, seed == 1, seed);
        let (x, _) = testing::from_f64(&xv, &[n, d], DType::F32, &cpu()).unwrap();
        let fit = KMeans::new(k).init(init).max_iter(50).fit(&x).unwrap();
        let mut h = fit.inertia_history.clone();
        h.push(fit.inertia);
        for w in h.windows(2) {
            assert!(w[1] <= w[0] * (1.0 + 1e-6), "inertia rose: {h:?}");
        }
        assert!(fit.iterations >= 1 && fit.iterations <= 50);
        if seed == 1 {
            // Well separated: rows i and i + k share a cluster, rows 0..k are all different.
            let l = fit.assignment.to_vec::<u32>().unwrap();
            assert!(fit.converged);
            for i in 0..n - k {
                assert_eq!(l[i], l[i + k], "row {i}");
            }
            let mut first: Vec<u32> = l[..k].to_vec();
            first.sort();
            first.dedup();
            assert_eq!(first.len(), k);
        }
    }
}

#[test]
fn fit_edge_shapes_and_dtypes() {
    testing::set_poisoning(true);
    // K = 1: the centroid is the mean.
    let (x, x64) = testing::randn(&[77, 3], DType::F32, &cpu(), 5).unwrap();
    let fit = KMeans::new(1).fit(&x).unwrap();
    let mean: Vec<f64> = (0..3).map(|j| x64.iter().skip(j).step_by(3).sum::<f64>() / 77.0).collect();
    testing::assert_close("K=1 mean", &testing::to_f64(&fit.centroids).unwrap(), &mean, 1e-5);
    assert!(fit.converged);
    // K = N: every point its own cluster, zero inertia.
    let (x, _) = testing::randn(&[12, 2], DType::F32, &cpu(), 6).unwrap();
    let fit = KMeans::new(12).fit(&x).unwrap();
    assert!(fit.inertia <= 1e-5, "K = N: inertia {} (the GEMM form rounds)", fit.inertia);
    let mut l = fit.assignment.to_vec::<u32>().unwrap();
    l.sort();
    assert_eq!(l, (0..12).collect::<Vec<u32>>());
    // D = 1, f16 and bf16, large N for the parallel k-means‖ path (N·K > 2^24).
    for dtype in [DType::F16, DType::BF16] {
        let xv = data(500, 1, 2, true, 9);
        let (x, _) = testing::from_f64(&xv, &[500, 1], dtype, &cpu()).unwrap();
        let fit = KMeans::new(2).metric(Metric::MeanL1).fit(&x).unwrap();
        let l = fit.assignment.to_vec::<u32>().unwrap();
        assert!((0..498).all(|i| l[i] == l[i + 2]));
    }
    let xv = data(70_000, 2, 300, true, 10);
    let (x, _) = testing::from_f64(&xv, &[70_000, 2], DType::F32, &cpu()).unwrap();
    let fit = KMeans::new(300).max_iter(2).fit(&x).unwrap();
    assert_eq!(fit.centroids.shape(), &[300, 2]);
    assert!(fit.inertia.is_finite());
}

#[test]
fn empty_clusters_are_reseeded_from_the_farthest_points() {
    testing::set_poisoning(true);
    // Points at 0, 1, 2 and 10; centroids 0.5 and a far-away 100 that attracts nothing.
    let x = Tensor::from_slice(&[0.0f32, 1.0, 2.0, 10.0], &[4, 1], &cpu()).unwrap();
    let c = Tensor::from_slice(&[0.5f32, 100.0], &[2, 1], &cpu()).unwrap();
    let fit = KMeans::new(2).max_iter(1).tol(0.0).init(Init::Given(c)).fit(&x).unwrap();
    // Iteration 1: everything joins centroid 0 (mean 3.25); cluster 1 is empty and takes the
    // point farthest from its centroid: 10.
    assert_eq!(fit.centroids.to_vec::<f32>().unwrap(), vec![3.25, 10.0]);
    assert_eq!(fit.assignment.to_vec::<u32>().unwrap(), vec![0, 0, 0, 1]);
    // Two empty clusters take the two farthest points, farthest first.
    let c = Tensor::from_slice(&[0.5f32, 100.0, 200.0], &[3, 1], &cpu()).unwrap();
    let km = KMeans::new(3).max_iter(1).tol(0.0).init(Init::Given(c));
    let fit = km.fit(&x).unwrap();
    assert_eq!(fit.centroids.to_vec::<f32>().unwrap(), vec![3.25, 10.0, 2.0]);
    // The loop's one-thread reference helpers reseed the same way.
    let by_reference = kmeans::reference::fit(&km, &x).unwrap();
    assert_eq!(by_reference.centroids.to_vec::<f32>().unwrap(), vec![3.25, 10.0, 2.0]);
}

#[test]
fn fit_is_deterministic() {
    testing::set_poisoning(true);
    let (x, _) = testing::randn(&[600, 5], DType::F32, &cpu(), 12).unwrap();
    let a = KMeans::new(7).init(Init::KMeansPlusPlus { seed: 9 }).fit(&x).unwrap();
    let b = KMeans::new(7).init(Init::KMeansPlusPlus { seed: 9 }).fit(&x).unwrap();
    assert_eq!(a.centroids.to_vec::<f32>().unwrap(), b.centroids.to_vec::<f32>().unwrap());
    assert_eq!(a.inertia, b.inertia);
}

#[test]
fn errors_are_typed() {
    testing::set_poisoning(true);
    let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[2, 2], &cpu()).unwrap();
    let c = Tensor::from_slice(&[1.0f32, 2.0], &[1, 2], &cpu()).unwrap();
    assert!(matches!(KMeans::new(0).fit(&x), Err(Error::InvalidArgument { .. })));
    assert!(matches!(KMeans::new(3).fit(&x), Err(Error::InvalidArgument { .. })));
    assert!(matches!(KMeans::new(1).tol(-1.0).fit(&x), Err(Error::InvalidArgument { .. })));
    let bad = Tensor::from_slice(&[1.0f32, f32::NAN, 3.0, 4.0], &[2, 2], &cpu()).unwrap();
    assert!(matches!(KMeans::new(1).fit(&bad), Err(Error::NonFinite { .. })));
    assert!(matches!(kmeans::assign(&bad, &c, Metric::SquaredL2), Err(Error::NonFinite { .. })));
    let inf_c = Tensor::from_slice(&[f32::INFINITY, 2.0], &[1, 2], &cpu()).unwrap();
    assert!(matches!(kmeans::assign(&x, &inf_c, Metric::MeanL1), Err(Error::NonFinite { .. })));
    let wrong_d = Tensor::from_slice(&[1.0f32, 2.0, 3.0], &[1, 3], &cpu()).unwrap();
    assert!(matches!(kmeans::assign(&x, &wrong_d, Metric::SquaredL2), Err(Error::ShapeMismatch { .. })));
    let c64 = Tensor::from_slice(&[1.0f64, 2.0], &[1, 2], &cpu()).unwrap();
    assert!(matches!(kmeans::assign(&x, &c64, Metric::SquaredL2), Err(Error::DTypeMismatch { .. })));
    let x64 = Tensor::from_slice(&[1.0f64, 2.0], &[1, 2], &cpu()).unwrap();
    assert!(matches!(kmeans::assign(&x64, &c, Metric::SquaredL2), Err(Error::UnsupportedDType { .. })));
    let flat = Tensor::from_slice(&[1.0f32, 2.0], &[2], &cpu()).unwrap();
    assert!(matches!(KMeans::new(1).fit(&flat), Err(Error::ShapeMismatch { .. })));
    let labels = Tensor::from_slice(&[0u32, 5], &[2], &cpu()).unwrap();
    assert!(matches!(kmeans::update(&x, &labels, 2), Err(Error::InvalidArgument { .. })));
    assert!(matches!(kmeans::update(&x, &labels, 0), Err(Error::InvalidArgument { .. })));
    let short = Tensor::from_slice(&[0u32], &[1], &cpu()).unwrap();
    assert!(matches!(kmeans::update(&x, &short, 2), Err(Error::ShapeMismatch { .. })));
    let given = Tensor::from_slice(&[1.0f32, 2.0, 3.0], &[1, 3], &cpu()).unwrap();
    assert!(matches!(KMeans::new(1).init(Init::Given(given)).fit(&x), Err(Error::ShapeMismatch { .. })));
    if let Ok(gpu) = Device::cuda(0) {
        let cg = c.to_device(&gpu).unwrap();
        assert!(matches!(kmeans::assign(&x, &cg, Metric::SquaredL2), Err(Error::DeviceMismatch { .. })));
    }
}

// ----- CUDA: fast vs reference vs CPU --------------------------------------------------------

#[test]
fn cuda_assign_fast_vs_reference_vs_cpu() {
    let Some(gpu) = testing::cuda_or_skip("cuda_assign_fast_vs_reference_vs_cpu") else { return };
    testing::set_poisoning(true);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let peak = metakernels::bench_support::device_matrix_tflops(&gpu, dtype).unwrap() * 1e3;
        assert!(peak.is_finite() && peak > 0.0, "{dtype:?} peak {peak}");
    }
    for metric in [Metric::SquaredL2, Metric::MeanL1] {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            // D = 1, 3, 7, 12 (scalar / 4-wide / no 8-wide loads), K = 1, K = N, K and N off the
            // 128 tiles, several centroid tiles; D ≤ 128 keeps x resident in the tensor-core
            // kernel, D = 130 and 136 stream it (without and with 16-byte copies).
            for &(n, d, k) in &[
                (1, 1, 1),
                (300, 7, 5),
                (1000, 64, 257),
                (129, 40, 130),
                (64, 8, 64),
                (77, 3, 77),
                (260, 12, 1),
                (131, 24, 300),
                (257, 128, 129),
                (200, 136, 150),
                (150, 130, 40),
            ] {
                let xv = data(n, d, k.min(n), true, (n + d + k) as u64);
                let (x, x64) = testing::from_f64(&xv, &[n, d], dtype, &gpu).unwrap();
                let cv = Rng::new(7).normal_vec(k * d);
                let (c, c64) = testing::from_f64(&cv, &[k, d], dtype, &gpu).unwrap();
                let (l, dist) = kmeans::assign(&x, &c, metric).unwrap();
                let (lr, dr) = kmeans::reference::assign(&x, &c, metric).unwrap();
                let slack = if dtype == DType::F32 { 1e-5 } else { 1e-3 };
                check_assign(&x64, &c64, d, metric, &l.to_vec().unwrap(), &dist.to_vec().unwrap(), slack);
                check_assign(&x64, &c64, d, metric, &lr.to_vec().unwrap(), &dr.to_vec().unwrap(), slack);
                let (lc, _) = kmeans::assign(
                    &x.to_device(&Device::cpu()).unwrap(),
                    &c.to_device(&Device::cpu()).unwrap(),
                    metric,
                )
                .unwrap();
                let agree = l
                    .to_vec::<u32>()
                    .unwrap()
                    .iter()
                    .zip(lc.to_vec::<u32>().unwrap())
                    .filter(|(a, b)| **a == *b)
                    .count();
                assert!(
                    agree as f64 >= 0.99 * n as f64,
                    "{metric:?} {dtype:?} ({n},{d},{k}): GPU/CPU agree on {agree}/{n}"
                );
            }
        }
    }
}

#[test]
fn cuda_update_and_fit_match_cpu() {
    let Some(gpu) = testing::cuda_or_skip("cuda_update_and_fit_match_cpu") else { return };
    testing::set_poisoning(true);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let (n, d, k) = (5000, 100, 37);
        let (x, x64) = testing::randn(&[n, d], dtype, &gpu, 77).unwrap();
        let mut rng = Rng::new(1);
        let labels: Vec<u32> = (0..n).map(|_| rng.below(k as u64) as u32).collect();
        let lt = Tensor::from_slice(&labels, &[n], &gpu).unwrap();
        let (c, counts) = kmeans::update(&x, &lt, k).unwrap();
        let (cr, countsr) = kmeans::reference::update(&x, &lt, k).unwrap();
        let (c_ref, counts_ref) = update_reference(&x64, &labels, d, k);
        assert_eq!(counts.to_vec::<u32>().unwrap(), counts_ref);
        assert_eq!(countsr.to_vec::<u32>().unwrap(), counts_ref);
        testing::assert_close("update", &testing::to_f64(&c).unwrap(), &c_ref, 1e-5);
        testing::assert_close("update ref", &testing::to_f64(&cr).unwrap(), &c_ref, 1e-5);
        let (c2, _) = kmeans::update(&x, &lt, k).unwrap();
        assert_eq!(c.to_vec::<f32>().unwrap(), c2.to_vec::<f32>().unwrap(), "bitwise reproducible");
        let (order, offsets) = kmeans::sort_by_cluster(&lt, k).unwrap();
        let (oc, offc) = kmeans::sort_by_cluster(&lt.to_device(&Device::cpu()).unwrap(), k).unwrap();
        let (or, offr) = kmeans::reference::sort_by_cluster(&lt, k).unwrap();
        assert_eq!(order.to_vec::<u32>().unwrap(), oc.to_vec::<u32>().unwrap());
        assert_eq!(offsets.to_vec::<u32>().unwrap(), offc.to_vec::<u32>().unwrap());
        assert_eq!(or.to_vec::<u32>().unwrap(), oc.to_vec::<u32>().unwrap());
        assert_eq!(offr.to_vec::<u32>().unwrap(), offc.to_vec::<u32>().unwrap());
    }
    let xv = data(3000, 16, 8, true, 3);
    let (x, _) = testing::from_f64(&xv, &[3000, 16], DType::F32, &gpu).unwrap();
    let init = Init::Given(
        x.to_device(&Device::cpu())
            .unwrap()
            .to_vec::<f32>()
            .map(|v| Tensor::from_slice(&v[..8 * 16], &[8, 16], &Device::cpu()).unwrap())
            .unwrap(),
    );
    let fg = KMeans::new(8).init(init.clone()).fit(&x).unwrap();
    let fc = KMeans::new(8).init(init).fit(&x.to_device(&Device::cpu()).unwrap()).unwrap();
    assert_eq!(fg.assignment.to_vec::<u32>().unwrap(), fc.assignment.to_vec::<u32>().unwrap());
    assert!((fg.inertia - fc.inertia).abs() <= 1e-4 * fc.inertia);
    // Seeding on the device: random rows, and k-means‖ (N·K > 2^24) with device distances.
    let xv = data(70_000, 4, 300, true, 12);
    let (xg, _) = testing::from_f64(&xv, &[70_000, 4], DType::F32, &gpu).unwrap();
    for (init, metric) in
        [(Init::Random { seed: 1 }, Metric::SquaredL2), (Init::KMeansPlusPlus { seed: 2 }, Metric::MeanL1)]
    {
        let fit = KMeans::new(300).metric(metric).max_iter(3).init(init).fit(&xg).unwrap();
        assert_eq!(fit.centroids.shape(), &[300, 4]);
        assert!(fit.inertia.is_finite() && fit.inertia > 0.0);
        let mut h = fit.inertia_history.clone();
        h.push(fit.inertia);
        assert!(h.iter().all(|v| v.is_finite()));
    }
    let labels = Tensor::from_slice(&vec![9u32; 3000], &[3000], &gpu).unwrap();
    assert!(matches!(kmeans::update(&x, &labels, 8), Err(Error::InvalidArgument { .. })));
}

/// Exact ties on the device: the same cases as on the CPU, plus duplicated centroids spread over
/// warps and centroid tiles (indices 10, 40, 77, 200, 250 of 300) and all-equal centroids.
#[test]
fn cuda_assign_ties_go_to_the_lowest_index() {
    let Some(gpu) = testing::cuda_or_skip("cuda_assign_ties_go_to_the_lowest_index") else { return };
    testing::set_poisoning(true);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for metric in [Metric::SquaredL2, Metric::MeanL1] {
            let x = testing::from_f64(&[0.0, 0.0, 2.0, 2.0], &[2, 2], dtype, &gpu).unwrap().0;
            let c = [3.0, 3.0, 1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 2.0, 2.0];
            let c = testing::from_f64(&c, &[5, 2], dtype, &gpu).unwrap().0;
            let (l, dist) = kmeans::assign(&x, &c, metric).unwrap();
            assert_eq!(l.to_vec::<u32>().unwrap(), vec![1, 4], "{dtype:?} {metric:?}");
            assert_eq!(dist.to_vec::<f32>().unwrap()[1], 0.0);

            // Rows equal to a centroid that appears five times; every other centroid is farther.
            for d in [20, 144] {
                let (n, k) = (300, 300);
                let mut cv = Rng::new(5).normal_vec(k * d);
                let dup: Vec<f64> = cv[10 * d..11 * d].to_vec();
                for j in [40, 77, 200, 250] {
                    cv[j * d..(j + 1) * d].copy_from_slice(&dup);
                }
                let xv: Vec<f64> = (0..n).flat_map(|_| dup.clone()).collect();
                let c = testing::from_f64(&cv, &[k, d], dtype, &gpu).unwrap().0;
                let x = testing::from_f64(&xv, &[n, d], dtype, &gpu).unwrap().0;
                let (l, _) = kmeans::assign(&x, &c, metric).unwrap();
                assert_eq!(l.to_vec::<u32>().unwrap(), vec![10; n], "{dtype:?} {metric:?}: duplicates");

                // All centroids equal: every row ties everywhere and takes centroid 0.
                let c = testing::from_f64(&vec![0.25; k * d], &[k, d], dtype, &gpu).unwrap().0;
                let (x, _) = testing::randn(&[n, d], dtype, &gpu, 3).unwrap();
                let (l, _) = kmeans::assign(&x, &c, metric).unwrap();
                assert_eq!(l.to_vec::<u32>().unwrap(), vec![0; n], "{dtype:?} {metric:?}: all equal");
                let (lr, _) = kmeans::reference::assign(&x, &c, metric).unwrap();
                assert_eq!(lr.to_vec::<u32>().unwrap(), vec![0; n], "{dtype:?} {metric:?}: reference");
            }
        }
    }
}

/// The update on the device with skewed clusters (one holding ~90% of the rows, some empty),
/// dims off the 128-dim slices and off the 4-wide loads: fast vs reference kernel vs float64, and
/// the same bits twice.
#[test]
fn cuda_update_skewed_clusters_and_tails() {
    let Some(gpu) = testing::cuda_or_skip("cuda_update_skewed_clusters_and_tails") else { return };
    testing::set_poisoning(true);
    for &(n, d, k) in &[(60_000, 260, 9), (20_001, 3, 40), (5, 129, 8), (70_000, 1, 2), (40_000, 8, 100)] {
        for dtype in [DType::F32, DType::BF16] {
            let (x, x64) = testing::randn(&[n, d], dtype, &gpu, (n + d) as u64).unwrap();
            let mut rng = Rng::new(k as u64);
            // ~90% to cluster 1; clusters ≥ k - 2 stay empty (when k > 3).
            let labels: Vec<u32> = (0..n)
                .map(|_| {
                    if rng.below(10) < 9 {
                        1
                    } else {
                        rng.below((k as u64).saturating_sub(2).max(2)) as u32
                    }
                })
                .collect();
            let lt = Tensor::from_slice(&labels, &[n], &gpu).unwrap();
            let (c, counts) = kmeans::update(&x, &lt, k).unwrap();
            let (cr, countsr) = kmeans::reference::update(&x, &lt, k).unwrap();
            let (c_ref, counts_ref) = update_reference(&x64, &labels, d, k);
            assert_eq!(counts.to_vec::<u32>().unwrap(), counts_ref, "({n},{d},{k}) {dtype:?}");
            assert_eq!(countsr.to_vec::<u32>().unwrap(), counts_ref);
            testing::assert_close("skewed update", &testing::to_f64(&c).unwrap(), &c_ref, 1e-4);
            testing::assert_close("skewed update ref", &testing::to_f64(&cr).unwrap(), &c_ref, 1e-4);
            let bits =
                |t: &Tensor| t.to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let (c2, _) = kmeans::update(&x, &lt, k).unwrap();
            assert_eq!(bits(&c), bits(&c2), "({n},{d},{k}) {dtype:?}: same bits twice");
            // The counting sort with many sort tiles (N / 2048) and clusters over several scan
            // blocks of 32, against the CPU's.
            let (order, offsets) = kmeans::sort_by_cluster(&lt, k).unwrap();
            let (oc, offc) = kmeans::sort_by_cluster(&lt.to_device(&cpu()).unwrap(), k).unwrap();
            assert_eq!(order.to_vec::<u32>().unwrap(), oc.to_vec::<u32>().unwrap());
            assert_eq!(offsets.to_vec::<u32>().unwrap(), offc.to_vec::<u32>().unwrap());
        }
    }
}

/// Lloyd on the device: the reseeding case of the CPU test (exact values), mean-L1 and bf16 fits
/// against the CPU from the same start, max_iter = 0, and non-finite input.
#[test]
fn cuda_fit_reseeds_and_matches_cpu() {
    let Some(gpu) = testing::cuda_or_skip("cuda_fit_reseeds_and_matches_cpu") else { return };
    testing::set_poisoning(true);
    let x = Tensor::from_slice(&[0.0f32, 1.0, 2.0, 10.0], &[4, 1], &gpu).unwrap();
    let c = Tensor::from_slice(&[0.5f32, 100.0], &[2, 1], &cpu()).unwrap();
    let fit = KMeans::new(2).max_iter(1).tol(0.0).init(Init::Given(c)).fit(&x).unwrap();
    assert_eq!(fit.centroids.to_vec::<f32>().unwrap(), vec![3.25, 10.0]);
    assert_eq!(fit.assignment.to_vec::<u32>().unwrap(), vec![0, 0, 0, 1]);
    let c = Tensor::from_slice(&[0.5f32, 100.0, 200.0], &[3, 1], &cpu()).unwrap();
    let km = KMeans::new(3).max_iter(1).tol(0.0).init(Init::Given(c));
    let fit = km.fit(&x).unwrap();
    assert_eq!(fit.centroids.to_vec::<f32>().unwrap(), vec![3.25, 10.0, 2.0]);
    // The loop's one-thread reference helpers reseed the same way.
    let by_reference = kmeans::reference::fit(&km, &x).unwrap();
    assert_eq!(by_reference.centroids.to_vec::<f32>().unwrap(), vec![3.25, 10.0, 2.0]);

    for (metric, dtype) in
        [(Metric::MeanL1, DType::F32), (Metric::SquaredL2, DType::BF16), (Metric::MeanL1, DType::F16)]
    {
        let (n, d, k) = (2000, 10, 6);
        let xv = data(n, d, k, true, 8);
        let (xg, _) = testing::from_f64(&xv, &[n, d], dtype, &gpu).unwrap();
        let xc = xg.to_device(&cpu()).unwrap();
        let start = xc.to_dtype(DType::F32).unwrap().to_vec::<f32>().unwrap()[..k * d].to_vec();
        let init = Init::Given(Tensor::from_slice(&start, &[k, d], &cpu()).unwrap());
        let fg = KMeans::new(k).metric(metric).init(init.clone()).fit(&xg).unwrap();
        let km = KMeans::new(k).metric(metric).init(init.clone());
        let by_reference = kmeans::reference::fit(&km, &xg).unwrap();
        let fc = KMeans::new(k).metric(metric).init(init).fit(&xc).unwrap();
        // The reference helpers pick the same rows and stop at the same iteration; the inertia
        // differs only by the order of its f64 sum.
        assert_eq!(fg.assignment.to_vec::<u32>().unwrap(), by_reference.assignment.to_vec::<u32>().unwrap());
        assert_eq!(fg.centroids.to_vec::<f32>().unwrap(), by_reference.centroids.to_vec::<f32>().unwrap());
        assert_eq!(fg.iterations, by_reference.iterations, "{metric:?} {dtype:?} reference helpers");
        assert!((fg.inertia - by_reference.inertia).abs() <= 1e-12 * fg.inertia, "{metric:?} {dtype:?}");
        assert_eq!(fg.assignment.to_vec::<u32>().unwrap(), fc.assignment.to_vec::<u32>().unwrap());
        assert_eq!(fg.iterations, fc.iterations, "{metric:?} {dtype:?}");
        assert!((fg.inertia - fc.inertia).abs() <= 1e-3 * fc.inertia, "{metric:?} {dtype:?}");
        testing::assert_close(
            "device fit centroids",
            &testing::to_f64(&fg.centroids).unwrap(),
            &testing::to_f64(&fc.centroids).unwrap(),
            1e-4,
        );
        let f0 = KMeans::new(k).metric(metric).max_iter(0).fit(&xg).unwrap();
        assert_eq!(f0.iterations, 0);
        assert!(!f0.converged && f0.inertia.is_finite());
    }
    let bad = Tensor::from_slice(&[1.0f32, f32::NAN, 3.0, 4.0], &[2, 2], &gpu).unwrap();
    let c = Tensor::from_slice(&[1.0f32, 2.0], &[1, 2], &gpu).unwrap();
    for metric in [Metric::SquaredL2, Metric::MeanL1] {
        assert!(matches!(kmeans::assign(&bad, &c, metric), Err(Error::NonFinite { .. })));
        assert!(matches!(KMeans::new(1).metric(metric).fit(&bad), Err(Error::NonFinite { .. })));
    }
}
