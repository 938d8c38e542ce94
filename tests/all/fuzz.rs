//! The public API never panics (DESIGN.md's error rules). Every entry point of every family is
//! called with seeded random arguments around the edges of what it accepts: ranks off by one,
//! dimensions of 0 and 1 and just past a limit, a zero dimension beside a huge one, mixed dtypes,
//! NaN and ∞ in inputs and settings, out-of-range labels and cluster ids, huge counts with no data
//! behind them. Each call must return `Ok` or a typed error whose message is not empty, and an
//! `Ok` output must have the documented shape, ids in range, and finite values when the case drew
//! no NaN, ∞ or edge setting and the math is bounded (not linear attention's normaliser, which
//! random signs can bring to ~0). No call, `Ok` or not, may change an input's values. Each case
//! runs under `catch_unwind`; the test fails listing every failing case with its arguments. Every
//! test has a CUDA twin (`*_on_cuda`), skipped without a GPU, where each clean case's outputs must
//! also agree with the same call on host copies of the inputs: random shapes for the kernels,
//! checked against the CPU fallbacks. `METAKERNELS_FUZZ_CASES` sets the number of cases per entry
//! point (default 200 on the CPU, 50 on a GPU), `METAKERNELS_FUZZ_SEED` draws other cases, and `METAKERNELS_FUZZ_VERBOSE=1`
//! prints each case before it runs (with `--nocapture`: to name one that aborts the process).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::panic::{catch_unwind, AssertUnwindSafe};

use metakernels::kmeans::{self, Init, KMeans, Metric};
use metakernels::linear_attention::{FeatureMap, KernelPath, LinearAttention, RecurrentState};
use metakernels::maml::{Activation, Loss, Maml, Mlp, Order, TaskBatch};
use metakernels::moe::{self, MixerGate, Routing};
use metakernels::momentum_attention::{Base, MomentumAttention};
use metakernels::testing::{self, Rng};
use metakernels::{DType, Device, Result, Tensor};

/// A dimension with no data behind it: only ever beside a zero dimension.
const HUGE: usize = 1 << 40;

struct Fuzz {
    device: Device,
    rng: Rng,
    /// No NaN, ∞ or 1e30 planted and no edge setting drawn since [`Fuzz::begin`]: an `Ok`
    /// output must then be finite (where the math says so).
    clean: bool,
    cases: usize,
    verbose: bool,
    failures: Vec<String>,
    /// (Ok, Err) counts per entry point: the cases must reach past validation too.
    outcomes: BTreeMap<String, (usize, usize)>,
    /// The case's input tensors and their values when drawn: no call may change an input (a
    /// kernel that used one as scratch, or wrote past its own output into it, would).
    inputs: Vec<(Tensor, Vec<f64>)>,
}

impl Fuzz {
    fn new(seed: u64, device: Device) -> Fuzz {
        // Fewer by default on a GPU, whose first runs have minutes, not hours.
        let default_cases = if device.is_cpu() { 200 } else { 50 };
        let cases = std::env::var("METAKERNELS_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default_cases);
        let verbose = std::env::var("METAKERNELS_FUZZ_VERBOSE").is_ok_and(|v| v == "1");
        let base =
            std::env::var("METAKERNELS_FUZZ_SEED").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let rng = Rng::new(seed ^ base.wrapping_mul(0x9E37_79B9));
        Fuzz {
            device,
            rng,
            clean: true,
            cases,
            verbose,
            failures: Vec::new(),
            outcomes: BTreeMap::new(),
            inputs: Vec::new(),
        }
    }

    /// Starts drawing one case's arguments.
    fn begin(&mut self) {
        self.clean = true;
        self.inputs.clear();
    }

    /// Records `t`'s values as drawn, to be checked after every call of the case.
    fn watch(&mut self, t: Tensor) -> Tensor {
        let values = testing::to_f64(&host(&t)).expect("an input's values");
        self.inputs.push((t.clone(), values));
        t
    }

    /// Each watched input still holds the values it was drawn with (NaN where it held NaN).
    fn inputs_unchanged(&self) -> bool {
        let same = |a: &f64, b: &f64| a == b || (a.is_nan() && b.is_nan());
        self.inputs.iter().all(|(t, drawn)| {
            testing::to_f64(&host(t))
                .is_ok_and(|now| now.len() == drawn.len() && now.iter().zip(drawn).all(|(a, b)| same(a, b)))
        })
    }

    fn chance(&mut self, p: f64) -> bool {
        self.rng.uniform() < p
    }

    fn pick<T: Clone>(&mut self, options: &[T]) -> T {
        options[self.rng.below(options.len() as u64) as usize].clone()
    }

    /// `usual` most of the time; otherwise 0, 1, one off, or double.
    fn dim(&mut self, usual: usize) -> usize {
        if self.chance(0.8) {
            return usual;
        }
        self.pick(&[0, 1, usual.saturating_sub(1), usual + 1, 2 * usual])
    }

    /// A count argument with no data behind it (k, steps, ...): `usual` most of the time.
    fn count(&mut self, usual: usize) -> usize {
        if self.chance(0.8) {
            return usual;
        }
        self.pick(&[0, 1, usual + 1, i32::MAX as usize, u32::MAX as usize + 1, HUGE, usize::MAX])
    }

    /// A float setting: `usual` most of the time; otherwise a value at or past an edge.
    fn float(&mut self, usual: f64) -> f64 {
        if self.chance(0.8) {
            return usual;
        }
        self.clean = false;
        self.pick(&[0.0, -usual, 1.0, -1e-30, 1e30, f64::NAN, f64::INFINITY, f64::NEG_INFINITY])
    }

    fn dtype(&mut self, usual: DType) -> DType {
        if self.chance(0.9) {
            return usual;
        }
        self.pick(&[DType::F32, DType::F64, DType::F16, DType::BF16, DType::U32])
    }

    /// `shape`, or now and then a neighbour of it: a dimension dropped, one added, one changed,
    /// or a zero dimension beside a huge one (or two: their product overflows usize).
    fn shape(&mut self, shape: &[usize]) -> Vec<usize> {
        let mut s = shape.to_vec();
        // A shape with a huge dimension already holds no data; mutating it again might.
        if self.chance(0.9) || s.is_empty() || s.iter().any(|&d| d >= HUGE) {
            return s;
        }
        let i = self.rng.below(s.len() as u64) as usize;
        match self.rng.below(5) {
            0 => {
                s.remove(i);
            }
            1 => s.insert(i, 1),
            2 => s[i] = self.pick(&[0, 1, s[i] + 1, s[i].saturating_sub(1)]),
            3 => {
                s[i] = 0;
                let j = (i + 1) % s.len();
                if j != i {
                    s[j] = self.pick(&[HUGE, usize::MAX]);
                }
            }
            _ => {
                // Huge leading (batch) dimensions in front of a shape with no elements.
                s[i] = 0;
                let lead = self.pick(&[vec![HUGE], vec![usize::MAX], vec![HUGE, HUGE]]);
                s.splice(0..0, lead);
            }
        }
        s
    }

    /// A tensor of `shape` (mutated now and then) and dtype (changed now and then), random
    /// normal values with the odd NaN or ∞, or random ids below `ids_below` for u32.
    fn tensor(&mut self, shape: &[usize], dtype: DType, ids_below: u32) -> Tensor {
        let shape = self.shape(shape);
        let dtype = self.dtype(dtype);
        let n: usize = if shape.contains(&0) { 0 } else { shape.iter().product() };
        if dtype == DType::U32 {
            let bound = if self.chance(0.9) { ids_below.max(1) } else { ids_below.saturating_add(2) };
            let ids: Vec<u32> = (0..n).map(|_| self.rng.below(bound as u64) as u32).collect();
            let ids = Tensor::from_vec(ids, &shape, &self.device).expect("u32 tensor");
            return self.watch(ids);
        }
        let mut values = self.rng.normal_vec(n);
        if n > 0 && self.chance(0.1) {
            let at = self.rng.below(n as u64) as usize;
            values[at] = self.pick(&[f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e30]);
            self.clean = false;
        }
        let t = testing::from_f64(&values, &shape, dtype, &self.device).expect("float tensor").0;
        self.watch(t)
    }

    /// Runs one case; records a panic, an empty error message, an `Ok` that `check` rejects, or
    /// an input that the call changed (whether it returned `Ok` or not).
    fn run<T>(&mut self, case: String, call: impl FnOnce() -> Result<T>, check: impl FnOnce(&T) -> bool) {
        if self.verbose {
            eprintln!("fuzz: {case}");
        }
        let result = catch_unwind(AssertUnwindSafe(call));
        let entry = self.outcomes.entry(case.split(' ').next().unwrap_or_default().to_string()).or_default();
        match &result {
            Ok(Ok(_)) => entry.0 += 1,
            _ => entry.1 += 1,
        }
        match result {
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)");
                self.failures.push(format!("panicked ({message}): {case}"));
            }
            Ok(Err(e)) if e.to_string().is_empty() => self.failures.push(format!("empty error: {case}")),
            Ok(Ok(out)) if !check(&out) => self.failures.push(format!(
                "Ok, but the output's shape, ids, finiteness or agreement with the host is off: {case}"
            )),
            Ok(_) => {}
        }
        if !self.inputs_unchanged() {
            self.failures.push(format!("an input changed: {case}"));
        }
    }

    /// Fails on any failing case, and when an entry point never returned `Ok` (its cases never
    /// got past validation, so they tested only that).
    fn finish(self, test: &str) {
        let family = format!("{test} on {}", self.device);
        eprintln!("{family}: (Ok, Err) per entry point: {:?}", self.outcomes);
        let never_ok: Vec<&String> =
            self.outcomes.iter().filter(|(_, &(ok, _))| ok == 0).map(|(op, _)| op).collect();
        assert!(never_ok.is_empty(), "{family}: no case of {never_ok:?} returned Ok");
        assert!(
            self.failures.is_empty(),
            "{family}: {} failing cases:\n{}",
            self.failures.len(),
            self.failures.join("\n")
        );
    }
}

/// Runs a fuzz `body` with its own seed on `device`.
fn fuzz_on(device: Device, test: &str, seed: u64, body: fn(&mut Fuzz)) {
    let mut f = Fuzz::new(seed, device);
    body(&mut f);
    f.finish(test);
}

/// A CPU test and its CUDA twin (named `*_on_cuda`, so that scripts/gpu-run.sh gives it a
/// process of its own, where a sticky CUDA error cannot reach other tests; skipped without a GPU).
macro_rules! fuzz_tests {
    ($cpu:ident, $cuda:ident, $seed:expr, $body:ident) => {
        #[test]
        fn $cpu() {
            fuzz_on(Device::cpu(), stringify!($cpu), $seed, $body);
        }

        #[test]
        fn $cuda() {
            if let Some(gpu) = testing::cuda_or_skip(stringify!($cuda)) {
                fuzz_on(gpu, stringify!($cuda), $seed, $body);
            }
        }
    };
}

fn shapes(tensors: &[&Tensor]) -> String {
    tensors.iter().map(|t| format!("{:?}{:?}", t.dtype(), t.shape())).collect::<Vec<_>>().join(", ")
}

fn has_shape(t: &Tensor, shape: &[usize]) -> bool {
    t.shape() == shape
}

/// All of `tensors` finite, when `expected` (a clean case whose math is bounded).
fn finite_if(expected: bool, tensors: &[&Tensor]) -> bool {
    !expected || tensors.iter().all(|t| testing::to_f64(t).is_ok_and(|v| v.iter().all(|x| x.is_finite())))
}

/// A host copy of a (device) tensor.
fn host(t: &Tensor) -> Tensor {
    t.to_device(&Device::cpu()).expect("a copy to the host")
}

/// A host copy of a routing.
fn host_routing(r: &Routing) -> Routing {
    Routing::from_parts(&host(r.expert()), &host(r.order()), &host(r.offsets())).expect("a valid routing")
}

/// The relative L2 error a device result may have against the same call on the host.
fn host_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-9,
        DType::F32 => 1e-4,
        _ => 2e-2,
    }
}

/// On a GPU, for a clean case: each of `got` (a device call's outputs) agrees with the same call
/// on host copies of the inputs (`on_host`) within `tol`. Always true on the CPU: the CUDA twins
/// turn the fuzz into random-shape checks of the kernels against the CPU fallbacks.
fn agrees_with_host(
    clean: bool,
    got: &[&Tensor],
    on_host: impl FnOnce() -> Result<Vec<Tensor>>,
    tol: f64,
) -> bool {
    if !clean || got.first().is_none_or(|t| t.device().is_cpu()) {
        return true;
    }
    let Ok(want) = on_host() else { return false };
    want.len() == got.len()
        && got.iter().zip(&want).all(|(g, w)| match (testing::to_f64(g), testing::to_f64(w)) {
            (Ok(g), Ok(w)) => testing::rel_error(&g, &w) <= tol,
            _ => false,
        })
}

/// Every id of a u32 tensor below `bound`.
fn ids_below(t: &Tensor, bound: usize) -> bool {
    t.to_vec::<u32>().is_ok_and(|ids| ids.iter().all(|&i| (i as usize) < bound))
}

/// Dimension `i` of an input as it was drawn (mutated or not): what an `Ok` output's shape
/// follows.
fn dim(t: &Tensor, i: usize) -> usize {
    t.shape().get(i).copied().unwrap_or(usize::MAX)
}

fn describe(what: impl Debug) -> String {
    format!("{what:?}")
}

fuzz_tests!(linear_attention_never_panics, linear_attention_never_panics_on_cuda, 1, fuzz_linear_attention);

fn fuzz_linear_attention(f: &mut Fuzz) {
    for _ in 0..f.cases {
        f.begin();
        let (b, h, t) = (f.dim(2), f.dim(2), f.dim(9));
        let (dk, dv) = (f.pick(&[1, 4, 16, 64, 256, 257]), f.pick(&[1, 3, 16, 64, 256, 257]));
        let dtype = f.pick(&[DType::F32, DType::F16, DType::BF16]);
        let la = LinearAttention {
            causal: f.chance(0.5),
            feature_map: f.pick(&[FeatureMap::Identity, FeatureMap::EluPlusOne, FeatureMap::Relu]),
            normalize: f.chance(0.5),
            scale: f.float(0.5) as f32,
            eps: f.float(1e-6) as f32,
        };
        let q = f.tensor(&[b, h, t, dk], dtype, 0);
        let k = f.tensor(&[b, h, t, dk], dtype, 0);
        let v = f.tensor(&[b, h, t, dv], dtype, 0);
        let g = f.tensor(&[b, h, t, dv], dtype, 0);
        let s0 = f.tensor(&[b, h, dk, dv], DType::F32, 0);
        let z0 = f.tensor(&[b, h, dk], DType::F32, 0);
        let initial = f.chance(0.5).then_some(RecurrentState { state: &s0, normalizer: Some(&z0) });
        let grad_final = f.chance(0.5).then_some(RecurrentState { state: &s0, normalizer: None });
        let eta = f.float(0.5) as f32;
        let args = format!("{la:?} q, k, v, g, s0, z0 = {}", shapes(&[&q, &k, &v, &g, &s0, &z0]));
        let out_shape = [dim(&q, 0), dim(&q, 1), dim(&q, 2), dim(&v, 3)];
        // Normalising divides by φ(q)·z + eps, which random signs (or z₀) can bring to ~0.
        let bounded = f.clean && !la.normalize;
        let state_shape = [dim(&q, 0), dim(&q, 1), dim(&q, 3), dim(&v, 3)];
        f.run(
            format!("forward {args} initial {}", initial.is_some()),
            || la.forward(&q, &k, &v, initial),
            |o| {
                let on_host = || {
                    let (s0, z0) = (host(&s0), host(&z0));
                    let initial = initial.map(|_| RecurrentState { state: &s0, normalizer: Some(&z0) });
                    let o = la.forward(&host(&q), &host(&k), &host(&v), initial)?;
                    Ok(vec![o.output, o.final_state])
                };
                has_shape(&o.output, &out_shape)
                    && has_shape(&o.final_state, &state_shape)
                    && finite_if(bounded, &[&o.output, &o.final_state])
                    && agrees_with_host(bounded, &[&o.output, &o.final_state], on_host, host_tolerance(dtype))
            },
        );
        f.run(
            format!("backward {args} initial {} grad_final {}", initial.is_some(), grad_final.is_some()),
            || la.backward(&q, &k, &v, initial, &g, grad_final),
            |d| {
                let on_host = || {
                    let (s0, z0) = (host(&s0), host(&z0));
                    let initial = initial.map(|_| RecurrentState { state: &s0, normalizer: Some(&z0) });
                    let grad_final = grad_final.map(|_| RecurrentState { state: &s0, normalizer: None });
                    let d = la.backward(&host(&q), &host(&k), &host(&v), initial, &host(&g), grad_final)?;
                    Ok(vec![d.dq, d.dk, d.dv])
                };
                has_shape(&d.dq, q.shape())
                    && has_shape(&d.dv, &out_shape)
                    && finite_if(bounded, &[&d.dq, &d.dk, &d.dv, &d.d_initial_state])
                    && agrees_with_host(bounded, &[&d.dq, &d.dk, &d.dv], on_host, host_tolerance(dtype))
            },
        );
        f.run(
            format!("forward_with_momentum {args} eta {eta}"),
            || la.forward_with_momentum(&q, &k, &v, eta),
            |o| has_shape(o, &out_shape) && finite_if(bounded, &[o]),
        );
        f.run(
            format!("backward_with_momentum {args} eta {eta}"),
            || la.backward_with_momentum(&q, &k, &v, &g, eta),
            |d| has_shape(&d.dk, k.shape()) && finite_if(bounded, &[&d.dq, &d.dk, &d.dv]),
        );
        // The hidden entry points the tests and benchmarks use: a chosen kernel path, and on a GPU
        // the quadratic baseline (CUDA only).
        let path = f.pick(&[
            KernelPath::Auto,
            KernelPath::Reference,
            KernelPath::Fused,
            KernelPath::Split,
            KernelPath::Simt,
        ]);
        f.run(
            format!("forward_on_path {args} {path:?}"),
            || la.forward_on_path(&q, &k, &v, initial, path),
            |o| has_shape(&o.output, &out_shape) && finite_if(bounded, &[&o.output]),
        );
        f.run(
            format!("backward_on_path {args} {path:?}"),
            || la.backward_on_path(&q, &k, &v, initial, &g, grad_final, path),
            |d| has_shape(&d.dq, q.shape()) && finite_if(bounded, &[&d.dq, &d.dk, &d.dv]),
        );
        if !f.device.is_cpu() {
            f.run(
                format!("forward_quadratic {args}"),
                || la.forward_quadratic(&q, &k, &v),
                |o| has_shape(o, &out_shape),
            );
            f.run(
                format!("forward_backward_quadratic {args}"),
                || la.forward_backward_quadratic(&q, &k, &v, &g),
                |[o, dq, ..]| has_shape(o, &out_shape) && has_shape(dq, q.shape()),
            );
        }

        // Packed sequences: [1, H, ΣT, D] and their offsets.
        let (qp, kp) = (f.tensor(&[1, h, t, dk], dtype, 0), f.tensor(&[1, h, t, dk], dtype, 0));
        let (vp, gp) = (f.tensor(&[1, h, t, dv], dtype, 0), f.tensor(&[1, h, t, dv], dtype, 0));
        let cu = cu_seqlens(f, t);
        let sequences = cu.len().saturating_sub(1);
        let sn = f.tensor(&[sequences, h, dk, dv], DType::F32, 0);
        let varlen_initial = f.chance(0.5).then_some(RecurrentState { state: &sn, normalizer: None });
        let args =
            format!("{la:?} q, k, v, g, sn = {} cu_seqlens {cu:?}", shapes(&[&qp, &kp, &vp, &gp, &sn]));
        let packed_out = [1, dim(&qp, 1), dim(&qp, 2), dim(&vp, 3)];
        f.run(
            format!("forward_varlen {args}"),
            || la.forward_varlen(&qp, &kp, &vp, &cu, varlen_initial),
            |o| {
                has_shape(&o.output, &packed_out)
                    && has_shape(&o.final_state, &[sequences, dim(&qp, 1), dim(&qp, 3), dim(&vp, 3)])
            },
        );
        f.run(
            format!("backward_varlen {args}"),
            || la.backward_varlen(&qp, &kp, &vp, &cu, varlen_initial, &gp, None),
            |d| has_shape(&d.dq, qp.shape()),
        );
    }
}

/// Packed-sequence offsets over `total` steps: valid most of the time, otherwise broken in one
/// of the ways `check_cu_seqlens` names.
fn cu_seqlens(f: &mut Fuzz, total: usize) -> Vec<usize> {
    let mut cu = vec![0];
    while *cu.last().unwrap() < total {
        let next = cu.last().unwrap() + 1 + f.rng.below(4) as usize;
        cu.push(next.min(total));
    }
    if cu.len() == 1 {
        cu.push(total);
    }
    if f.chance(0.25) {
        match f.rng.below(5) {
            0 => cu.clear(),
            1 => cu.truncate(1),
            2 => cu[0] = 1,
            3 => cu.push(usize::MAX),
            _ => cu.insert(1, 0),
        }
    }
    cu
}

fuzz_tests!(
    momentum_attention_never_panics,
    momentum_attention_never_panics_on_cuda,
    2,
    fuzz_momentum_attention
);

fn fuzz_momentum_attention(f: &mut Fuzz) {
    for _ in 0..f.cases {
        f.begin();
        let (b, h, t) = (f.dim(1), f.dim(2), f.dim(9));
        let d = f.pick(&[64, 128, 256, 32, 65]);
        let dtype = f.pick(&[DType::F32, DType::F16, DType::BF16]);
        let normalize = f.chance(0.5);
        let base = if f.chance(0.7) {
            Base::Softmax { scale: f.chance(0.5).then(|| f.float(0.125) as f32) }
        } else {
            Base::Linear(LinearAttention { normalize, ..LinearAttention::default() })
        };
        let attn = MomentumAttention { eta: f.float(0.9) as f32, base };
        let q = f.tensor(&[b, h, t, d], dtype, 0);
        let k = f.tensor(&[b, h, t, d], dtype, 0);
        let v = f.tensor(&[b, h, t, d], dtype, 0);
        let g = f.tensor(&[b, h, t, d], dtype, 0);
        let args = format!("{attn:?} q, k, v, g = {}", shapes(&[&q, &k, &v, &g]));
        // D of v may differ from q's with the linear base (the linear family's rule).
        let shape = &[dim(&q, 0), dim(&q, 1), dim(&q, 2), dim(&v, 3)];
        let bounded = f.clean && !(normalize && matches!(attn.base, Base::Linear(_)));
        f.run(
            format!("forward {args}"),
            || attn.forward(&q, &k, &v),
            |o| {
                let on_host = || Ok(vec![attn.forward(&host(&q), &host(&k), &host(&v))?]);
                has_shape(o, shape)
                    && finite_if(bounded, &[o])
                    && agrees_with_host(bounded, &[o], on_host, host_tolerance(dtype))
            },
        );
        f.run(
            format!("backward {args}"),
            || attn.backward(&q, &k, &v, &g),
            |d| {
                let on_host = || {
                    let d = attn.backward(&host(&q), &host(&k), &host(&v), &host(&g))?;
                    Ok(vec![d.dq, d.dk, d.dv])
                };
                has_shape(&d.dq, q.shape())
                    && finite_if(bounded, &[&d.dq, &d.dk, &d.dv])
                    && agrees_with_host(bounded, &[&d.dq, &d.dk, &d.dv], on_host, host_tolerance(dtype))
            },
        );
        // The benchmarks' unfused baselines, and on a GPU the tests' reference kernel.
        f.run(
            format!("forward_unfused {args}"),
            || attn.forward_unfused(&q, &k, &v),
            |o| has_shape(o, shape) && finite_if(bounded, &[o]),
        );
        f.run(
            format!("backward_unfused {args}"),
            || attn.backward_unfused(&q, &k, &v, &g),
            |d| has_shape(&d.dv, q.shape()) && finite_if(bounded, &[&d.dq, &d.dk, &d.dv]),
        );
        if !f.device.is_cpu() {
            f.run(
                format!("forward_reference_kernel {args}"),
                || attn.forward_reference_kernel(&q, &k, &v),
                |o| has_shape(o, shape) && finite_if(bounded, &[o]),
            );
            f.run(
                format!("backward_reference_kernel {args}"),
                || attn.backward_reference_kernel(&q, &k, &v, &g),
                |d| has_shape(&d.dv, q.shape()) && finite_if(bounded, &[&d.dq, &d.dk, &d.dv]),
            );
        }
        let state = catch_unwind(AssertUnwindSafe(|| attn.forward_with_state(&q, &k, &v)));
        match state {
            Err(_) => f.failures.push(format!("panicked: forward_with_state {args}")),
            Ok(Err(_)) => {}
            Ok(Ok(state)) => {
                // The state handed to a module with η drawn again (refused when it differs),
                // with other q values (accepted: only shapes can be checked).
                let other = MomentumAttention { eta: f.float(0.9) as f32, ..attn.clone() };
                let q2 = f.tensor(&[b, h, t, d], dtype, 0);
                f.run(
                    format!("backward_with_state {args} other {other:?} q2 {}", shapes(&[&q2])),
                    || other.backward_with_state(&q2, &k, &v, &state, &g),
                    |d| has_shape(&d.dv, shape),
                );
                f.run(format!("logsumexp {args}"), || state.logsumexp(), |l| has_shape(l, &shape[..3]));
            }
        }
    }
}

fuzz_tests!(maml_never_panics, maml_never_panics_on_cuda, 3, fuzz_maml);

fn fuzz_maml(f: &mut Fuzz) {
    for _ in 0..f.cases {
        f.begin();
        let sizes: Vec<usize> = match f.rng.below(6) {
            0 => vec![f.dim(3)],
            1 => vec![f.dim(3), f.dim(2)],
            _ => vec![f.dim(3), f.dim(5), f.dim(2)],
        };
        let mlp = Mlp {
            sizes: sizes.clone(),
            activation: f.pick(&[Activation::Relu, Activation::Tanh, Activation::Gelu, Activation::Softplus]),
            loss: f.pick(&[Loss::Mse, Loss::SoftmaxCrossEntropy]),
        };
        let (input, output) = (sizes[0], *sizes.last().unwrap());
        let p = mlp.num_params();
        let p = if p > 1 << 20 { 8 } else { p };
        let (tasks, n) = (f.dim(3), f.dim(4));
        let dtype = f.pick(&[DType::F32, DType::F64]);
        let params = if f.chance(0.5) { f.tensor(&[p], dtype, 0) } else { f.tensor(&[tasks, p], dtype, 0) };
        let x = f.tensor(&[tasks, n, input], dtype, 0);
        let y = match mlp.loss {
            Loss::Mse => f.tensor(&[tasks, n, output], dtype, 0),
            Loss::SoftmaxCrossEntropy => f.tensor(&[tasks, n], DType::U32, output as u32),
        };
        let v = f.tensor(&[tasks, p], dtype, 0);
        let args = format!("{mlp:?} params, x, y, v = {}", shapes(&[&params, &x, &y, &v]));
        let bounded = f.clean;
        let seed = f.rng.next_u64();
        let device = f.device.clone();
        f.run(format!("init {args}"), || mlp.init(seed, dtype, &device), |t| has_shape(t, &[p]));
        f.run(
            format!("forward {args}"),
            || mlp.forward(&params, &x),
            |o| {
                let on_host = || Ok(vec![mlp.forward(&host(&params), &host(&x))?]);
                has_shape(o, &[dim(&x, 0), dim(&x, 1), output])
                    && finite_if(bounded, &[o])
                    && agrees_with_host(bounded, &[o], on_host, host_tolerance(dtype))
            },
        );
        f.run(
            format!("loss_and_grad {args}"),
            || mlp.loss_and_grad(&params, &x, &y),
            |(l, g)| {
                let on_host = || {
                    let (l, g) = mlp.loss_and_grad(&host(&params), &host(&x), &host(&y))?;
                    Ok(vec![l, g])
                };
                has_shape(l, &[dim(&x, 0)])
                    && has_shape(g, &[dim(&x, 0), p])
                    && finite_if(bounded, &[l, g])
                    && agrees_with_host(bounded, &[l, g], on_host, host_tolerance(dtype))
            },
        );
        f.run(
            format!("hvp {args}"),
            || mlp.hvp(&params, &x, &y, &v),
            |h| {
                let on_host = || Ok(vec![mlp.hvp(&host(&params), &host(&x), &host(&y), &host(&v))?]);
                has_shape(h, &[dim(&x, 0), p])
                    && finite_if(bounded, &[h])
                    && agrees_with_host(bounded, &[h], on_host, host_tolerance(dtype))
            },
        );

        f.begin();
        let (ns, nq) = (f.dim(3), f.dim(4));
        let labels = |f: &mut Fuzz, rows: usize| match mlp.loss {
            Loss::Mse => f.tensor(&[tasks, rows, output], dtype, 0),
            Loss::SoftmaxCrossEntropy => f.tensor(&[tasks, rows], DType::U32, output as u32),
        };
        let batch = TaskBatch {
            support_x: f.tensor(&[tasks, ns, input], dtype, 0),
            support_y: labels(f, ns),
            query_x: f.tensor(&[tasks, nq, input], dtype, 0),
            query_y: labels(f, nq),
        };
        let theta = f.tensor(&[p], dtype, 0);
        let maml = Maml {
            inner_steps: f.count(2),
            inner_lr: f.float(0.01),
            order: f.pick(&[Order::First, Order::Second]),
            return_adapted: f.chance(0.5),
        };
        let margs = format!(
            "{maml:?} {mlp:?} theta {} batch {}",
            shapes(&[&theta]),
            shapes(&[&batch.support_x, &batch.support_y, &batch.query_x, &batch.query_y])
        );
        let bounded = f.clean;
        f.run(
            format!("meta_gradient {margs}"),
            || maml.meta_gradient(&mlp, &theta, &batch),
            |m| {
                let on_host = || {
                    let batch = TaskBatch {
                        support_x: host(&batch.support_x),
                        support_y: host(&batch.support_y),
                        query_x: host(&batch.query_x),
                        query_y: host(&batch.query_y),
                    };
                    let m = maml.meta_gradient(&mlp, &host(&theta), &batch)?;
                    Ok(vec![m.grad, m.per_task_loss])
                };
                has_shape(&m.grad, &[p])
                    && has_shape(&m.per_task_loss, &[dim(&batch.support_x, 0)])
                    && agrees_with_host(bounded, &[&m.grad, &m.per_task_loss], on_host, host_tolerance(dtype))
                    && (!bounded || m.loss.is_finite())
                    && finite_if(bounded, &[&m.grad, &m.per_task_loss])
            },
        );
        if !f.device.is_cpu() {
            f.run(
                format!("meta_gradient_reference {margs}"),
                || maml.meta_gradient_reference(&mlp, &theta, &batch),
                |m| has_shape(&m.grad, &[p]) && finite_if(bounded, &[&m.grad]),
            );
        }
    }
}

fuzz_tests!(kmeans_never_panics, kmeans_never_panics_on_cuda, 4, fuzz_kmeans);

fn fuzz_kmeans(f: &mut Fuzz) {
    for _ in 0..f.cases {
        f.begin();
        let (n, d, k) = (f.dim(40), f.dim(3), f.dim(4));
        let dtype = f.pick(&[DType::F32, DType::F16, DType::BF16]);
        let metric = f.pick(&[Metric::SquaredL2, Metric::MeanL1]);
        let x = f.tensor(&[n, d], dtype, 0);
        let c = f.tensor(&[k, d], DType::F32, 0);
        let a = f.tensor(&[n], DType::U32, k as u32);
        let kc = f.count(k);
        let args = format!("x, c, a = {} k {kc} {metric:?}", shapes(&[&x, &c, &a]));
        let bounded = f.clean;
        // On a GPU the distances must match the host's (labels may differ at near-ties).
        let tol = host_tolerance(dtype);
        let assigned = |(a, dist): &(Tensor, Tensor)| {
            let on_host = || Ok(vec![kmeans::assign(&host(&x), &host(&c), metric)?.1]);
            has_shape(a, &[dim(&x, 0)])
                && ids_below(a, dim(&c, 0))
                && finite_if(bounded, &[dist])
                && agrees_with_host(bounded, &[dist], on_host, tol)
        };
        f.run(format!("assign {args}"), || kmeans::assign(&x, &c, metric), assigned);
        f.run(format!("reference::assign {args}"), || kmeans::reference::assign(&x, &c, metric), assigned);
        let means = |(c, counts): &(Tensor, Tensor)| {
            let on_host = || {
                let (c, counts) = kmeans::update(&host(&x), &host(&a), kc)?;
                Ok(vec![c, counts])
            };
            has_shape(c, &[kc, dim(&x, 1)])
                && finite_if(bounded, &[c])
                && agrees_with_host(bounded, &[c, counts], on_host, tol)
        };
        f.run(format!("update {args}"), || kmeans::update(&x, &a, kc), means);
        f.run(format!("reference::update {args}"), || kmeans::reference::update(&x, &a, kc), means);
        f.run(
            format!("sort_by_cluster {args}"),
            || kmeans::sort_by_cluster(&a, kc),
            |(o, off)| has_shape(o, a.shape()) && has_shape(off, &[kc.saturating_add(1)]),
        );
        f.run(
            format!("reference::sort_by_cluster {args}"),
            || kmeans::reference::sort_by_cluster(&a, kc),
            |(o, _)| has_shape(o, a.shape()),
        );
        let seed = f.rng.next_u64();
        let init = match f.rng.below(3) {
            0 => Init::KMeansPlusPlus { seed },
            1 => Init::Random { seed },
            _ => Init::Given(c.clone()),
        };
        let fit = KMeans::new(kc).max_iter(f.count(5)).tol(f.float(1e-4)).metric(metric).init(init);
        let fit_args = format!("{} x {}", describe(&fit), shapes(&[&x]));
        let bounded = f.clean;
        f.run(
            format!("fit {fit_args}"),
            || fit.fit(&x),
            |r| {
                has_shape(&r.centroids, &[kc, dim(&x, 1)])
                    && has_shape(&r.assignment, &[dim(&x, 0)])
                    && ids_below(&r.assignment, kc)
                    && finite_if(bounded, &[&r.centroids])
                    && (!bounded || r.inertia.is_finite())
            },
        );
        f.run(
            format!("reference::fit {fit_args}"),
            || kmeans::reference::fit(&fit, &x),
            |r| has_shape(&r.centroids, &[kc, dim(&x, 1)]) && ids_below(&r.assignment, kc),
        );
    }
}

fuzz_tests!(moe_never_panics, moe_never_panics_on_cuda, 5, fuzz_moe);

fn fuzz_moe(f: &mut Fuzz) {
    for _ in 0..f.cases {
        f.begin();
        let (n, d, e, r) = (f.dim(30), f.dim(4), f.dim(3), f.dim(2));
        let dtype = f.pick(&[DType::F32, DType::F16, DType::BF16, DType::F64]);
        let x = f.tensor(&[n, d], dtype, 0);
        let c = f.tensor(&[e, d], DType::F32, 0);
        let logits = f.tensor(&[n, e], DType::F32, 0);
        let args = format!("x, c, logits = {}", shapes(&[&x, &c, &logits]));
        f.run(
            format!("route_top1 {args}"),
            || moe::route_top1(&x, &c, Metric::SquaredL2),
            |r| r.num_tokens() == dim(&x, 0) && ids_below(r.expert(), dim(&c, 0)),
        );
        let bounded = f.clean;
        f.run(
            format!("route_top1_logits {args}"),
            || moe::route_top1_logits(&logits),
            |r| {
                r.num_tokens() == dim(&logits, 0)
                    && ids_below(r.expert(), dim(&logits, 1))
                    && r.gate_probs().is_some_and(|p| finite_if(bounded, &[p]))
            },
        );

        // Parts of a real routing, or random ones (mostly inconsistent).
        let (expert, order, offsets) = match moe::route_top1_logits(&logits) {
            Ok(r) if f.chance(0.5) => (r.expert().clone(), r.order().clone(), r.offsets().clone()),
            _ => (
                f.tensor(&[n], DType::U32, e as u32),
                f.tensor(&[n], DType::U32, n as u32),
                f.tensor(&[e + 1], DType::U32, n as u32 + 1),
            ),
        };
        let parts = format!("expert, order, offsets = {}", shapes(&[&expert, &order, &offsets]));
        f.run(
            format!("Routing::from_parts {parts}"),
            || Routing::from_parts(&expert, &order, &offsets),
            |_| true,
        );

        let Ok(routing) = moe::route_top1_logits(&f.tensor(&[n, e], DType::F32, 0)) else { continue };
        let tokens = routing.num_tokens();
        let weights = f.tensor(&[tokens], DType::F32, 0);
        let y = f.tensor(&[n, r], dtype, 0);
        let ridge = f.float(1e-3);
        let args = format!(
            "{args} routing of {tokens} tokens, weights, y = {} ridge {ridge}",
            shapes(&[&weights, &y])
        );
        let use_weights = f.chance(0.5);
        let bounded = f.clean;
        f.run(
            format!("dispatch {args}"),
            || moe::dispatch(&x, &routing),
            |g| {
                let on_host = || Ok(vec![moe::dispatch(&host(&x), &host_routing(&routing))?]);
                has_shape(g, x.shape())
                    && finite_if(bounded, &[g])
                    && agrees_with_host(bounded, &[g], on_host, 0.0)
            },
        );
        f.run(
            format!("combine {args} weighted {use_weights}"),
            || moe::combine(&x, &routing, use_weights.then_some(&weights)),
            |g| {
                let on_host = || {
                    let weights = host(&weights);
                    Ok(vec![moe::combine(
                        &host(&x),
                        &host_routing(&routing),
                        use_weights.then_some(&weights),
                    )?])
                };
                has_shape(g, x.shape())
                    && finite_if(bounded, &[g])
                    && agrees_with_host(bounded, &[g], on_host, 1e-6)
            },
        );
        f.run(
            format!("lstsq {args}"),
            || moe::lstsq(&x, &y, ridge),
            |w| has_shape(w, &solution_shape(&x, &y)) && finite_if(bounded, &[w]),
        );
        f.run(
            format!("grouped_lstsq {args}"),
            || moe::grouped_lstsq(&x, &y, &routing, ridge),
            |w| has_shape(w, &[routing.num_experts(), dim(&x, 1), dim(&y, 1)]) && finite_if(bounded, &[w]),
        );
        // The reference kernels the GPU tests hold these against (the same code on the CPU).
        f.run(
            format!("reference::route_top1_logits {args}"),
            || moe::reference::route_top1_logits(&logits),
            |r| r.num_tokens() == dim(&logits, 0) && ids_below(r.expert(), dim(&logits, 1)),
        );
        f.run(
            format!("reference::dispatch {args}"),
            || moe::reference::dispatch(&x, &routing),
            |g| has_shape(g, x.shape()) && finite_if(bounded, &[g]),
        );
        f.run(
            format!("reference::combine {args} weighted {use_weights}"),
            || moe::reference::combine(&x, &routing, use_weights.then_some(&weights)),
            |g| has_shape(g, x.shape()) && finite_if(bounded, &[g]),
        );
        f.run(
            format!("reference::lstsq {args}"),
            || moe::reference::lstsq(&x, &y, ridge),
            |w| has_shape(w, &solution_shape(&x, &y)) && finite_if(bounded, &[w]),
        );

        f.begin();
        let contexts = f.tensor(&[e * 4, d], DType::F32, 0);
        let losses = f.tensor(&[e * 4, r], DType::F32, 0);
        let warm = f.tensor(&[r, d], DType::F32, 0);
        let gate = MixerGate {
            max_iter: f.count(5),
            tol: f.float(1e-4),
            noise_std: f.float(1e-4),
            seed: f.rng.next_u64(),
            ridge: f.float(0.0),
        };
        let use_warm = f.chance(0.5);
        let gargs = format!(
            "{gate:?} contexts, losses, warm = {} warm {use_warm}",
            shapes(&[&contexts, &losses, &warm])
        );
        let bounded = f.clean;
        f.run(
            format!("MixerGate::update {gargs}"),
            || gate.update(&contexts, &losses, use_warm.then_some(&warm)),
            |u| u.weights.as_ref().is_none_or(|w| finite_if(bounded, &[w])),
        );
        let w = f.tensor(&[d + 1, r], DType::F32, 0);
        let wargs = format!("weights, contexts = {}", shapes(&[&w, &contexts]));
        let bounded = f.clean;
        f.run(
            format!("MixerGate::logits {wargs}"),
            || MixerGate::logits(&w, &contexts),
            |l| {
                let on_host = || Ok(vec![MixerGate::logits(&host(&w), &host(&contexts))?]);
                has_shape(l, &[dim(&contexts, 0), dim(&w, 1)])
                    && finite_if(bounded, &[l])
                    && agrees_with_host(bounded, &[l], on_host, 1e-6)
            },
        );
        f.run(format!("MixerGate::route {wargs}"), || MixerGate::route(&w, &contexts), |_| true);
    }
}

/// `[..., n, r]` for `x: [..., M, n]` and `y: [..., M, r]`.
fn solution_shape(x: &Tensor, y: &Tensor) -> Vec<usize> {
    let (Some((&n, lead)), Some(&r)) = (x.shape().split_last(), y.shape().last()) else { return vec![] };
    let mut shape = lead[..lead.len().saturating_sub(1)].to_vec();
    shape.extend([n, r]);
    shape
}

fuzz_tests!(tensor_never_panics, tensor_never_panics_on_cuda, 6, fuzz_tensor);

fn fuzz_tensor(f: &mut Fuzz) {
    for _ in 0..f.cases {
        f.begin();
        let cols = f.dim(4);
        let shape = f.shape(&[3, cols]);
        let dtype = f.dtype(DType::F32);
        let t = f.tensor(&shape, dtype, 7);
        let to = f.dtype(DType::F16);
        let new_shape = f.shape(&[t.numel()]);
        let args = format!("{} to {to:?} reshape {new_shape:?}", shapes(&[&t]));
        f.run(format!("to_dtype {args}"), || t.to_dtype(to), |o| o.shape() == t.shape());
        f.run(format!("reshape {args}"), || t.reshape(&new_shape), |o| has_shape(o, &new_shape));
        f.run(format!("to_vec::<f32> {args}"), || t.to_vec::<f32>(), |v| v.len() == t.numel());
        let rows = f.dim(3);
        let zeros_shape = f.shape(&[rows, 2]);
        let device = f.device.clone();
        f.run(
            format!("zeros {zeros_shape:?} {dtype:?}"),
            || Tensor::zeros(&zeros_shape, dtype, &device),
            |z| has_shape(z, &zeros_shape),
        );
    }
}
