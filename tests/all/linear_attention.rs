//! Tests of the linear_attention family: every option combination against a float64
//! recurrence, pieces and packed sequences against one call, gradients against central finite
//! differences in float64, the momentum term, Dai's dual form, the errors, and (with a GPU) the
//! CUDA kernels against the reference kernel and the CPU.

#[path = "linear_attention/reference.rs"]
mod reference;

#[path = "linear_attention/cuda.rs"]
mod cuda;

use metakernels::linear_attention::{FeatureMap, KernelPath, LinearAttention, RecurrentState};
use metakernels::testing::{assert_close, from_f64, set_poisoning, to_f64, tolerance, Rng};
use metakernels::{DType, Device, Error, Tensor};

use reference::{dense_segments, varlen_segments, Inputs, LossWeights, Seg};

const FEATURE_MAPS: [FeatureMap; 3] = [FeatureMap::Identity, FeatureMap::EluPlusOne, FeatureMap::Relu];
const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Random inputs: standard normal, or (for normalised layers, whose denominator must stay away
/// from zero) shifted to be mostly positive.
pub fn random_values(rng: &mut Rng, n: usize, normalize: bool) -> Vec<f64> {
    (0..n).map(|_| if normalize { 1.0 + 0.5 * rng.normal() } else { rng.normal() }).collect()
}

/// q, k, v (and optionally S_0, z_0) as tensors of `dtype` on `dev`, plus their float64 values.
pub struct Case {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub s0: Option<Tensor>,
    pub z0: Option<Tensor>,
    pub x: Inputs,
}

impl Case {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        lead: [usize; 3],
        dk: usize,
        dv: usize,
        states: usize,
        with_state: bool,
        normalize: bool,
        dtype: DType,
        dev: &Device,
        seed: u64,
    ) -> Case {
        let mut rng = Rng::new(seed);
        let [b, h, t] = lead;
        let (q, qx) = tensor(&random_values(&mut rng, b * h * t * dk, normalize), &[b, h, t, dk], dtype, dev);
        let (k, kx) = tensor(&random_values(&mut rng, b * h * t * dk, normalize), &[b, h, t, dk], dtype, dev);
        let (v, vx) = tensor(&rng.normal_vec(b * h * t * dv), &[b, h, t, dv], dtype, dev);
        let (mut s0, mut z0, mut sx, mut zx) = (None, None, None, None);
        if with_state {
            let (s, x) = tensor(&rng.normal_vec(states * dk * dv), &[states / h, h, dk, dv], DType::F32, dev);
            let (z, y) =
                tensor(&rng.uniform_vec(states * dk, 0.5, 1.5), &[states / h, h, dk], DType::F32, dev);
            (s0, z0, sx, zx) = (Some(s), Some(z), Some(x), Some(y));
        }
        Case { q, k, v, s0, z0, x: Inputs { q: qx, k: kx, v: vx, s0: sx, z0: zx } }
    }

    pub fn initial(&self) -> Option<RecurrentState<'_>> {
        self.s0.as_ref().map(|s| RecurrentState { state: s, normalizer: self.z0.as_ref() })
    }
}

pub fn tensor(values: &[f64], shape: &[usize], dtype: DType, dev: &Device) -> (Tensor, Vec<f64>) {
    from_f64(values, shape, dtype, dev).expect("test tensor")
}

pub fn f64s(t: &Tensor) -> Vec<f64> {
    to_f64(t).expect("readable tensor")
}

fn layer(fm: FeatureMap, causal: bool, normalize: bool) -> LinearAttention {
    LinearAttention { causal, feature_map: fm, normalize, scale: 0.7, eps: 1e-3 }
}

/// Every feature map × causal × normalize × dtype × initial state, with T = 70 (not a
/// multiple of the chunk) and Dk ≠ Dv.
#[test]
fn forward_matches_f64_reference_for_every_option() {
    set_poisoning(true);
    let dev = Device::cpu();
    let (b, h, t, dk, dv) = (2, 2, 70, 6, 9);
    let mut seed = 1;
    for fm in FEATURE_MAPS {
        for causal in [true, false] {
            for normalize in [false, true] {
                for dtype in DTYPES {
                    for with_state in [false, true] {
                        seed += 1;
                        let cfg = layer(fm, causal, normalize);
                        let c = Case::new([b, h, t], dk, dv, b * h, with_state, normalize, dtype, &dev, seed);
                        let out = cfg.forward(&c.q, &c.k, &c.v, c.initial()).expect("forward");
                        let r = reference::forward(&cfg, None, &c.x, &dense_segments(b * h, t), dk, dv);
                        let what = format!("{cfg:?} {dtype} state={with_state}");
                        assert_eq!(out.output.dtype(), dtype);
                        assert_eq!(out.output.shape(), &[b, h, t, dv]);
                        assert_eq!(out.final_state.shape(), &[b, h, dk, dv]);
                        let tol = tolerance(dtype);
                        assert_close(&format!("{what} output"), &f64s(&out.output), &r.o, tol);
                        assert_close(&format!("{what} state"), &f64s(&out.final_state), &r.s, 1e-5);
                        assert_close(&format!("{what} normalizer"), &f64s(&out.final_normalizer), &r.z, 1e-5);
                    }
                }
            }
        }
    }
}

/// Head dimensions at the limit (256) and odd small ones, T of one step and of a few chunks.
#[test]
fn forward_handles_extreme_shapes() {
    set_poisoning(true);
    let dev = Device::cpu();
    for (t, dk, dv) in [(1, 1, 1), (3, 256, 256), (130, 1, 3), (65, 256, 17)] {
        for causal in [true, false] {
            let cfg = layer(FeatureMap::EluPlusOne, causal, true);
            let c = Case::new([1, 1, t], dk, dv, 1, true, true, DType::F32, &dev, 7 + t as u64);
            let out = cfg.forward(&c.q, &c.k, &c.v, c.initial()).expect("forward");
            let r = reference::forward(&cfg, None, &c.x, &dense_segments(1, t), dk, dv);
            assert_close(&format!("T{t} Dk{dk} Dv{dv} causal={causal}"), &f64s(&out.output), &r.o, 1e-5);
        }
    }
}

/// The CPU split form (chunk-group states in parallel, a prefix sum, then all groups' outputs
/// in parallel) against the reference and the fused form, causal and not, with a ragged tail.
#[test]
fn split_form_matches_reference() {
    set_poisoning(true);
    let dev = Device::cpu();
    let (b, h, t, dk, dv) = (1, 1, 333, 7, 5);
    for causal in [true, false] {
        for normalize in [false, true] {
            let cfg = layer(FeatureMap::EluPlusOne, causal, normalize);
            let c = Case::new([b, h, t], dk, dv, 1, true, normalize, DType::F32, &dev, 555);
            let r = reference::forward(&cfg, None, &c.x, &dense_segments(1, t), dk, dv);
            for path in [KernelPath::Split, KernelPath::Fused, KernelPath::Auto] {
                let out = cfg.forward_on_path(&c.q, &c.k, &c.v, c.initial(), path).expect("forward");
                let what = format!("{cfg:?} {path:?}");
                assert_close(&format!("{what} output"), &f64s(&out.output), &r.o, 1e-5);
                assert_close(&format!("{what} state"), &f64s(&out.final_state), &r.s, 1e-5);
                assert_close(&format!("{what} normalizer"), &f64s(&out.final_normalizer), &r.z, 1e-5);
            }
        }
    }
}

/// Running a sequence in pieces, carrying the returned state, equals one call.
#[test]
fn pieces_equal_one_call() {
    set_poisoning(true);
    let dev = Device::cpu();
    let (b, h, t, dk, dv) = (2, 3, 150, 5, 4);
    for normalize in [false, true] {
        let cfg = layer(FeatureMap::EluPlusOne, true, normalize);
        let c = Case::new([b, h, t], dk, dv, b * h, true, normalize, DType::F32, &dev, 99);
        let whole = cfg.forward(&c.q, &c.k, &c.v, c.initial()).expect("whole");
        let cuts = [0, 37, 64, 150];
        let mut state = None::<metakernels::linear_attention::LinearAttentionOutput>;
        let mut pieces = vec![Vec::new(); b * h];
        for w in cuts.windows(2) {
            let (q, k, v) = (rows_of(&c.q, w[0], w[1]), rows_of(&c.k, w[0], w[1]), rows_of(&c.v, w[0], w[1]));
            let init = match &state {
                Some(s) => Some(s.carry()),
                None => c.initial(),
            };
            let out = cfg.forward(&q, &k, &v, init).expect("piece forward");
            let o = out.output.to_vec::<f32>().expect("host");
            for (bh, piece) in pieces.iter_mut().enumerate() {
                piece.extend_from_slice(&o[bh * (w[1] - w[0]) * dv..(bh + 1) * (w[1] - w[0]) * dv]);
            }
            state = Some(out);
        }
        let joined: Vec<f64> = pieces.concat().into_iter().map(f64::from).collect();
        assert_close("pieces output", &joined, &f64s(&whole.output), 1e-6);
        let last = state.expect("pieces ran");
        assert_close("pieces state", &f64s(&last.final_state), &f64s(&whole.final_state), 1e-6);
        assert_close(
            "pieces normalizer",
            &f64s(&last.final_normalizer),
            &f64s(&whole.final_normalizer),
            1e-6,
        );
    }
}

/// Packed sequences equal the reference run sequence by sequence, forward and backward, each
/// from its own initial state.
#[test]
fn varlen_matches_reference_forward_and_backward() {
    set_poisoning(true);
    let dev = Device::cpu();
    let cu = [0usize, 5, 70, 71, 140];
    let (h, total, dk, dv) = (2, 140, 3, 4);
    let n = cu.len() - 1;
    for causal in [true, false] {
        let cfg = layer(FeatureMap::EluPlusOne, causal, true);
        let c = Case::new([1, h, total], dk, dv, n * h, true, true, DType::F32, &dev, 5);
        let segs = varlen_segments(h, &cu);
        let out = cfg.forward_varlen(&c.q, &c.k, &c.v, &cu, c.initial()).expect("varlen forward");
        assert_eq!(out.final_state.shape(), &[n, h, dk, dv]);
        let r = reference::forward(&cfg, None, &c.x, &segs, dk, dv);
        assert_close("varlen output", &f64s(&out.output), &r.o, 1e-5);
        assert_close("varlen state", &f64s(&out.final_state), &r.s, 1e-5);
        assert_close("varlen normalizer", &f64s(&out.final_normalizer), &r.z, 1e-5);
        check_backward(&cfg, None, &c, &segs, dk, dv, 17, |go, gf| {
            cfg.backward_varlen(&c.q, &c.k, &c.v, &cu, c.initial(), go, gf).expect("varlen backward")
        });
    }
}

/// Rows `start..end` of every (batch, head) of a `[B, H, T, D]` tensor, as
/// `[B, H, end − start, D]`: a piece of a sequence, or one sequence of a packed `[1, H, ΣT, D]`.
fn rows_of(x: &Tensor, start: usize, end: usize) -> Tensor {
    let (b, h, t, d) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let all = x.to_vec::<f32>().expect("host");
    let rows: Vec<f32> =
        (0..b * h).flat_map(|bh| all[(bh * t + start) * d..(bh * t + end) * d].to_vec()).collect();
    Tensor::from_vec(rows, &[b, h, end - start, d], x.device()).expect("rows")
}

/// Entry `i` of a tensor's leading (sequence) dimension, keeping the dimension.
fn leading(x: &Tensor, i: usize) -> Tensor {
    let all = x.to_vec::<f32>().expect("host");
    let each = all.len() / x.shape()[0];
    let mut shape = x.shape().to_vec();
    shape[0] = 1;
    Tensor::from_vec(all[i * each..(i + 1) * each].to_vec(), &shape, x.device()).expect("entry")
}

/// Packed sequences give, bit for bit up to rounding, what separate calls on each sequence
/// give: outputs, final states and normalisers forward; dq, dk, dv and the initial-state
/// gradients backward (with and without a gradient on the final state), for every feature map,
/// causal or not, normalised or not.
#[test]
fn varlen_equals_separate_calls() {
    varlen_equals_separate_calls_on(&Device::cpu(), 1e-6);
}

/// [`varlen_equals_separate_calls`] on `dev`, within relative error `tol`.
pub fn varlen_equals_separate_calls_on(dev: &Device, tol: f64) {
    set_poisoning(true);
    let dev = dev.clone();
    let cu = [0usize, 1, 65, 130, 200];
    let (h, total, dk, dv) = (2, 200, 5, 3);
    let n = cu.len() - 1;
    let mut seed = 700;
    for fm in FEATURE_MAPS {
        for causal in [true, false] {
            for normalize in [false, true] {
                seed += 1;
                let cfg = layer(fm, causal, normalize);
                let c = Case::new([1, h, total], dk, dv, n * h, true, normalize, DType::F32, &dev, seed);
                let mut rng = Rng::new(seed);
                let (go, _) = tensor(&rng.normal_vec(h * total * dv), &[1, h, total, dv], DType::F32, &dev);
                let (gs, _) = tensor(&rng.normal_vec(n * h * dk * dv), &[n, h, dk, dv], DType::F32, &dev);
                let (gz, _) = tensor(&rng.normal_vec(n * h * dk), &[n, h, dk], DType::F32, &dev);
                let with_final = seed % 2 == 0;
                let grad_final = with_final.then_some(RecurrentState { state: &gs, normalizer: Some(&gz) });
                let packed = cfg.forward_varlen(&c.q, &c.k, &c.v, &cu, c.initial()).expect("varlen forward");
                let packed_grads = cfg
                    .backward_varlen(&c.q, &c.k, &c.v, &cu, c.initial(), &go, grad_final)
                    .expect("varlen backward");
                let (s0, z0) = (c.s0.as_ref().expect("state"), c.z0.as_ref().expect("normaliser"));
                for i in 0..n {
                    let (start, end) = (cu[i], cu[i + 1]);
                    let rows = |x: &Tensor| rows_of(x, start, end);
                    let (q, k, v) = (rows(&c.q), rows(&c.k), rows(&c.v));
                    let (s0, z0) = (leading(s0, i), leading(z0, i));
                    let initial = Some(RecurrentState { state: &s0, normalizer: Some(&z0) });
                    let (gs, gz) = (leading(&gs, i), leading(&gz, i));
                    let grad_final =
                        with_final.then_some(RecurrentState { state: &gs, normalizer: Some(&gz) });
                    let one = cfg.forward(&q, &k, &v, initial).expect("forward");
                    let grads = cfg.backward(&q, &k, &v, initial, &rows(&go), grad_final).expect("backward");
                    let what = |name: &str| format!("{cfg:?} sequence {i} (rows {start}..{end}) {name}");
                    let pairs = [
                        ("output", rows(&packed.output), one.output),
                        ("final state", leading(&packed.final_state, i), one.final_state),
                        ("final normaliser", leading(&packed.final_normalizer, i), one.final_normalizer),
                        ("dq", rows(&packed_grads.dq), grads.dq),
                        ("dk", rows(&packed_grads.dk), grads.dk),
                        ("dv", rows(&packed_grads.dv), grads.dv),
                        ("dS0", leading(&packed_grads.d_initial_state, i), grads.d_initial_state),
                        ("dz0", leading(&packed_grads.d_initial_normalizer, i), grads.d_initial_normalizer),
                    ];
                    for (name, from_packed, alone) in pairs {
                        assert_close(&what(name), &f64s(&from_packed), &f64s(&alone), tol);
                    }
                }
            }
        }
    }
}

/// Compares a backward against float64 central finite differences of
/// L = Σ w_o·o + Σ w_S·S_T + Σ w_z·z_T (with the final-state terms unless momentum is on).
#[allow(clippy::too_many_arguments)]
fn check_backward(
    cfg: &LinearAttention,
    eta: Option<f64>,
    c: &Case,
    segs: &[Seg],
    dk: usize,
    dv: usize,
    seed: u64,
    run: impl FnOnce(&Tensor, Option<RecurrentState<'_>>) -> metakernels::linear_attention::LinearAttentionGrads,
) {
    let dev = c.q.device().clone();
    let dtype = c.q.dtype();
    let mut rng = Rng::new(seed);
    let mut go_shape = c.q.shape().to_vec();
    go_shape[3] = dv;
    let (go, wo) = tensor(&rng.normal_vec(c.x.v.len()), &go_shape, dtype, &dev);
    let states = segs.len();
    let lead = [states / c.q.shape()[1], c.q.shape()[1]];
    let with_final = eta.is_none();
    let (gs, ws) = tensor(&rng.normal_vec(states * dk * dv), &[lead[0], lead[1], dk, dv], DType::F32, &dev);
    let (gz, wz) = tensor(&rng.normal_vec(states * dk), &[lead[0], lead[1], dk], DType::F32, &dev);
    let w = LossWeights { wo, ws: with_final.then_some(ws), wz: with_final.then_some(wz) };
    let grads = run(&go, with_final.then_some(RecurrentState { state: &gs, normalizer: Some(&gz) }));
    let fd = reference::finite_differences(cfg, eta, &c.x, segs, dk, dv, &w);
    let tol = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
    let what = format!("{cfg:?} eta={eta:?} {dtype}");
    assert_close(&format!("{what} dq"), &f64s(&grads.dq), &fd.dq, tol);
    assert_close(&format!("{what} dk"), &f64s(&grads.dk), &fd.dk, tol);
    assert_close(&format!("{what} dv"), &f64s(&grads.dv), &fd.dv, tol);
    assert_close(&format!("{what} dS0"), &f64s(&grads.d_initial_state), &fd.ds0, tol);
    assert_close(&format!("{what} dz0"), &f64s(&grads.d_initial_normalizer), &fd.dz0, tol);
}

/// Backward of every feature map × causal × normalize against finite differences, with an
/// initial state and a gradient on the final state; T = 70 spans two chunks.
#[test]
fn backward_matches_finite_differences() {
    set_poisoning(true);
    let dev = Device::cpu();
    let (b, h, t, dk, dv) = (1, 2, 70, 3, 4);
    let mut seed = 300;
    for fm in FEATURE_MAPS {
        for causal in [true, false] {
            for normalize in [false, true] {
                seed += 1;
                let cfg = layer(fm, causal, normalize);
                let c = Case::new([b, h, t], dk, dv, b * h, true, normalize, DType::F32, &dev, seed);
                check_backward(&cfg, None, &c, &dense_segments(b * h, t), dk, dv, seed, |go, gf| {
                    cfg.backward(&c.q, &c.k, &c.v, c.initial(), go, gf).expect("backward")
                });
            }
        }
    }
}

/// Wide heads, where the backward's chunk products leave the GEMM's scalar paths: Dv + 1 = 65
/// (normalised) leaves one column past the 32-wide register blocks, Dk = 33 and 40 ragged ones,
/// and T = 129 / 97 / 64 end on a one-row chunk, a 33-row one (a full row block and one row) and
/// an exact chunk; Dk = 200, Dv = 256 is the widest head the API takes, there without a
/// gradient on the final state (the `None` path). Whole finite differences would take minutes at
/// these sizes: the gradient is checked at every row on either side of each chunk and row-block
/// boundary, at the edge columns of each 32-, 64- and 128-wide block, and at a sample of S_0 and
/// z_0.
#[test]
fn backward_wide_heads_at_chunk_and_row_block_boundaries() {
    set_poisoning(true);
    let dev = Device::cpu();
    let cases = [
        (129, 33, 64, FeatureMap::EluPlusOne, true),
        (97, 40, 31, FeatureMap::Relu, true),
        (64, 32, 32, FeatureMap::Identity, true),
        (40, 200, 256, FeatureMap::EluPlusOne, false),
    ];
    let mut seed = 900;
    for (t, dk, dv, fm, with_final) in cases {
        for causal in [true, false] {
            for normalize in [false, true] {
                seed += 1;
                let cfg = layer(fm, causal, normalize);
                let c = Case::new([1, 1, t], dk, dv, 1, true, normalize, DType::F32, &dev, seed);
                let mut rng = Rng::new(seed + 50);
                let (go, wo) = tensor(&rng.normal_vec(t * dv), &[1, 1, t, dv], DType::F32, &dev);
                let (gs, ws) = tensor(&rng.normal_vec(dk * dv), &[1, 1, dk, dv], DType::F32, &dev);
                let (gz, wz) = tensor(&rng.normal_vec(dk), &[1, 1, dk], DType::F32, &dev);
                let final_grad = with_final.then_some(RecurrentState { state: &gs, normalizer: Some(&gz) });
                let grads = cfg.backward(&c.q, &c.k, &c.v, c.initial(), &go, final_grad).expect("backward");
                let w = LossWeights { wo, ws: with_final.then_some(ws), wz: with_final.then_some(wz) };
                let segs = dense_segments(1, t);
                let near = |bound: usize, marks: &[usize]| -> Vec<usize> {
                    let mut v: Vec<usize> = marks
                        .iter()
                        .flat_map(|&m| [m.saturating_sub(1), m, m + 1])
                        .chain([0, bound - 1])
                        .filter(|&i| i < bound)
                        .collect();
                    v.sort_unstable();
                    v.dedup();
                    v
                };
                let rows = near(t, &[32, 64, 96, 128]);
                type Pick = fn(&mut Inputs) -> &mut Vec<f64>;
                let picks: [(&str, Pick, &metakernels::Tensor, usize, usize); 5] = [
                    ("dq", |x| &mut x.q, &grads.dq, t, dk),
                    ("dk", |x| &mut x.k, &grads.dk, t, dk),
                    ("dv", |x| &mut x.v, &grads.dv, t, dv),
                    // invariant: the case has an initial state.
                    ("dS0", |x| x.s0.as_mut().unwrap(), &grads.d_initial_state, dk, dv),
                    ("dz0", |x| x.z0.as_mut().unwrap(), &grads.d_initial_normalizer, dk, 1),
                ];
                for (name, pick, got, nrows, width) in picks {
                    let got = f64s(got);
                    let rows = if nrows == t { rows.clone() } else { near(nrows, &[32]) };
                    let cols = near(width, &[32, 64, 128]);
                    let (mut out, mut fd) = (Vec::new(), Vec::new());
                    for &r in &rows {
                        for &col in &cols {
                            let i = r * width + col;
                            out.push(got[i]);
                            fd.push(reference::finite_difference_at(
                                &cfg, None, &c.x, &segs, dk, dv, &w, &pick, i,
                            ));
                        }
                    }
                    let what = format!("{cfg:?} T={t} Dk={dk} Dv={dv} final gradient {with_final} {name}");
                    assert_close(&what, &out, &fd, 1e-4);
                }
            }
        }
    }
}

/// Half-precision backward (f32 accumulation) stays within the half-precision tolerance, and
/// the backward without an initial state gives the gradient at S_0 = 0.
#[test]
fn backward_half_precision_and_without_initial_state() {
    set_poisoning(true);
    let dev = Device::cpu();
    let (b, h, t, dk, dv) = (1, 1, 66, 4, 3);
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        let cfg = layer(FeatureMap::EluPlusOne, true, true);
        let c = Case::new([b, h, t], dk, dv, 1, false, true, dtype, &dev, 41);
        check_backward(&cfg, None, &c, &dense_segments(1, t), dk, dv, 42, |go, gf| {
            cfg.backward(&c.q, &c.k, &c.v, None, go, gf).expect("backward")
        });
    }
}

/// Momentum attention: o_t + Σ_{i<t} η^{t−i} v_i, forward against float64 and backward
/// against finite differences, for a few η and both normalisations.
#[test]
fn momentum_forward_and_backward() {
    set_poisoning(true);
    let dev = Device::cpu();
    let (b, h, t, dk, dv) = (2, 1, 70, 3, 5);
    for (i, eta) in [0.0f32, 0.5, 0.9].into_iter().enumerate() {
        for normalize in [false, true] {
            let cfg = layer(FeatureMap::EluPlusOne, true, normalize);
            let c = Case::new([b, h, t], dk, dv, b * h, false, normalize, DType::F32, &dev, 60 + i as u64);
            let segs = dense_segments(b * h, t);
            let out = cfg.forward_with_momentum(&c.q, &c.k, &c.v, eta).expect("momentum forward");
            let r = reference::forward(&cfg, Some(eta as f64), &c.x, &segs, dk, dv);
            assert_close(&format!("momentum η={eta} output"), &f64s(&out), &r.o, 1e-5);
            check_backward(&cfg, Some(eta as f64), &c, &segs, dk, dv, 70 + i as u64, |go, _| {
                cfg.backward_with_momentum(&c.q, &c.k, &c.v, go, eta).expect("momentum backward")
            });
        }
    }
    // bf16 forward, long enough for the decayed sum to matter.
    let cfg = layer(FeatureMap::Identity, true, false);
    let c = Case::new([1, 2, 100], 8, 8, 2, false, false, DType::BF16, &dev, 90);
    let out = cfg.forward_with_momentum(&c.q, &c.k, &c.v, 0.8).expect("bf16 momentum");
    let r = reference::forward(&cfg, Some(0.8), &c.x, &dense_segments(2, 100), 8, 8);
    assert_close("bf16 momentum", &f64s(&out), &r.o, 1e-2);
}

/// Dai et al. (2022): non-causal linear attention is F(q) = (W_ZSL + ΔW_ICL) q, with W_ZSL the
/// initial state's transpose and ΔW_ICL = Σ v_s k_sᵀ = (S_T − S_0)ᵀ read from the returned
/// final state.
#[test]
fn dai_dual_form_from_returned_state() {
    set_poisoning(true);
    let dev = Device::cpu();
    let (h, t, dk, dv) = (2, 40, 6, 5);
    let cfg = LinearAttention { causal: false, ..Default::default() };
    let c = Case::new([1, h, t], dk, dv, h, true, false, DType::F32, &dev, 123);
    let out = cfg.forward(&c.q, &c.k, &c.v, c.initial()).expect("forward");
    let (s_t, s_0) = (f64s(&out.final_state), c.x.s0.clone().expect("initial state"));
    let o = f64s(&out.output);
    let mut dual = vec![0.0; o.len()];
    for head in 0..h {
        let w_zsl = |i: usize, j: usize| s_0[(head * dk + i) * dv + j];
        let dw_icl = |i: usize, j: usize| s_t[(head * dk + i) * dv + j] - s_0[(head * dk + i) * dv + j];
        for r in 0..t {
            let q = &c.x.q[(head * t + r) * dk..(head * t + r + 1) * dk];
            for j in 0..dv {
                dual[(head * t + r) * dv + j] = (0..dk).map(|i| (w_zsl(i, j) + dw_icl(i, j)) * q[i]).sum();
            }
        }
    }
    assert_close("dual form", &o, &dual, 1e-5);
    // ΔW_ICL really is Σ v_s k_sᵀ.
    let mut icl = vec![0.0; h * dk * dv];
    for head in 0..h {
        for r in 0..t {
            for i in 0..dk {
                for j in 0..dv {
                    icl[(head * dk + i) * dv + j] +=
                        c.x.k[(head * t + r) * dk + i] * c.x.v[(head * t + r) * dv + j];
                }
            }
        }
    }
    let delta: Vec<f64> = s_t.iter().zip(&s_0).map(|(a, b)| a - b).collect();
    assert_close("ΔW_ICL", &delta, &icl, 1e-5);
}

fn expect_err<T: std::fmt::Debug>(what: &str, r: metakernels::Result<T>, pred: impl Fn(&Error) -> bool) {
    match r {
        Err(e) if pred(&e) => {
            assert!(!e.to_string().is_empty());
        }
        other => panic!("{what}: expected a specific error, got {other:?}"),
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    let dev = Device::cpu();
    let t = |shape: &[usize], dtype: DType| {
        let n: usize = shape.iter().product();
        tensor(&vec![0.5; n], shape, dtype, &dev).0
    };
    let a = LinearAttention::default();
    let q = t(&[1, 2, 8, 4], DType::F32);
    let v = t(&[1, 2, 8, 3], DType::F32);
    let shape = |e: &Error| matches!(e, Error::ShapeMismatch { .. });
    let invalid = |e: &Error| matches!(e, Error::InvalidArgument { .. });
    expect_err("rank", a.forward(&t(&[2, 8, 4], DType::F32), &q, &v, None), shape);
    expect_err("k shape", a.forward(&q, &t(&[1, 2, 8, 5], DType::F32), &v, None), shape);
    expect_err("v shape", a.forward(&q, &q, &t(&[1, 2, 7, 3], DType::F32), None), shape);
    expect_err("dtype mix", a.forward(&q, &t(&[1, 2, 8, 4], DType::BF16), &v, None), |e| {
        matches!(e, Error::DTypeMismatch { .. })
    });
    expect_err(
        "f64",
        a.forward(
            &t(&[1, 1, 2, 2], DType::F64),
            &t(&[1, 1, 2, 2], DType::F64),
            &t(&[1, 1, 2, 2], DType::F64),
            None,
        ),
        |e| matches!(e, Error::UnsupportedDType { .. }),
    );
    let big = t(&[1, 1, 2, 257], DType::F32);
    expect_err("Dk > 256", a.forward(&big, &big, &t(&[1, 1, 2, 2], DType::F32), None), shape);
    expect_err("Dv > 256", a.forward(&q, &q, &t(&[1, 2, 8, 257], DType::F32), None), shape);
    let empty = t(&[1, 2, 0, 4], DType::F32);
    expect_err("empty", a.forward(&empty, &empty, &t(&[1, 2, 0, 3], DType::F32), None), |e| {
        matches!(e, Error::EmptyInput { .. })
    });
    for scale in [f32::NAN, f32::INFINITY] {
        expect_err("scale", LinearAttention { scale, ..a }.forward(&q, &q, &v, None), invalid);
    }
    expect_err("eps", LinearAttention { eps: -1.0, ..a }.forward(&q, &q, &v, None), invalid);
    // states
    let s_bad = t(&[1, 2, 4, 4], DType::F32);
    let init = RecurrentState { state: &s_bad, normalizer: None };
    expect_err("state shape", a.forward(&q, &q, &v, Some(init)), shape);
    let s_half = t(&[1, 2, 4, 3], DType::BF16);
    let init = RecurrentState { state: &s_half, normalizer: None };
    expect_err("state dtype", a.forward(&q, &q, &v, Some(init)), |e| {
        matches!(e, Error::DTypeMismatch { .. })
    });
    let s_ok = t(&[1, 2, 4, 3], DType::F32);
    let z_bad = t(&[1, 2, 3], DType::F32);
    let init = RecurrentState { state: &s_ok, normalizer: Some(&z_bad) };
    expect_err("normalizer shape", a.forward(&q, &q, &v, Some(init)), shape);
    // backward
    expect_err("grad_output shape", a.backward(&q, &q, &v, None, &q, None), shape);
    let gf = RecurrentState { state: &s_bad, normalizer: None };
    expect_err("grad final shape", a.backward(&q, &q, &v, None, &v, Some(gf)), shape);
    // varlen
    let p = t(&[1, 2, 8, 4], DType::F32);
    for cu in [&[0usize, 5, 5, 8][..], &[0, 5, 3, 8], &[0, 5, 7], &[1, 8], &[0], &[0, 9]] {
        expect_err(&format!("cu_seqlens {cu:?}"), a.forward_varlen(&p, &p, &v, cu, None), invalid);
    }
    expect_err(
        "varlen B > 1",
        a.forward_varlen(
            &t(&[2, 2, 4, 4], DType::F32),
            &t(&[2, 2, 4, 4], DType::F32),
            &t(&[2, 2, 4, 3], DType::F32),
            &[0, 4],
            None,
        ),
        shape,
    );
    let s_one = t(&[1, 2, 4, 3], DType::F32);
    let init = RecurrentState { state: &s_one, normalizer: None };
    expect_err("varlen state count", a.forward_varlen(&p, &p, &v, &[0, 3, 8], Some(init)), shape);
    // momentum
    for eta in [-0.1, 1.0, f32::NAN] {
        expect_err("eta", a.forward_with_momentum(&q, &q, &v, eta), invalid);
    }
    // the GPU benchmark baseline is CUDA-only
    expect_err("quadratic baseline on the CPU", a.forward_quadratic(&q, &q, &v), |e| {
        matches!(e, Error::DeviceMismatch { .. })
    });
    let non_causal = LinearAttention { causal: false, ..a };
    expect_err("momentum non-causal", non_causal.forward_with_momentum(&q, &q, &v, 0.5), invalid);
    expect_err(
        "momentum backward non-causal",
        non_causal.backward_with_momentum(&q, &q, &v, &v, 0.5),
        invalid,
    );
}
