// scripts/emulate/run.sh momentum_attention [quick]: runs the momentum-attention kernels of
// kernels/momentum_attention.cu under the CPU emulation of prelude.h, with the launch sequences,
// grids, block sizes, dynamic shared memory and argument values of
// src/ops/momentum_attention/cuda.rs, and compares them with a float64 reference written here
// (the obvious loops of tests/all/momentum_attention/reference.rs) at the tolerances of the
// Rust GPU tests (tests/all/momentum_attention/gpu.rs):
//
//   forward            mattn_fwd_{f16,bf16,f32}_d{64,128,256}: o vs f64 (the plain forward);
//                      with attn_out and lse2 (forward_with_state): o, the attention without
//                      momentum and the base-2 log-sum-exp vs f64
//   reference kernel   mattn_fwd_reference_* vs f64, and mattn_bwd_reference_{rows,cols}_*: dq,
//                      dk, dv vs f64 (T ≤ 77: one block per row is slow to emulate)
//   unfused baseline   the forward at η = 0, then mattn_momentum_scan_* vs f64; the backward at
//                      η = 0, then mattn_momentum_scan_reverse_* into dv vs f64
//   backward           recomputing forward (η = 0), mattn_bwd_delta_*, mattn_bwd_mma_{f16,bf16}_d*
//                      or mattn_bwd_f32_d*, mattn_dq_finish_*: dq, dk, dv vs f64; and the same
//                      from the saved state of forward_with_state (η > 0)
//
// over every dtype, D ∈ {64, 128, 256}, η ∈ {0, 0.5, 0.9, 0.99}, T ∈ {1, 77, 300} (300 is past
// η = 0.5's momentum horizon of 24 lags and η = 0.9's of 158, so value tiles are skipped) with
// B·H = 2 heads, plus T = 700 as in the GPU tests' long-sequence cases, then the quick subset
// with cp.async landing at issue (~3 min). `quick` runs a subset that launches every kernel at
// least once (~15 s).
//
// What it proves: index math, tails and masks, the barrier structure (between two
// __syncthreads the warps run one after another in a random order; EMU_SEED=<n> picks another),
// the cp.async / ldmatrix / mma fragment layouts, shared addresses inside the launched dynamic
// shared memory, reads of unwritten shared memory or outputs (poisoned with NaN), numerics.
// Deliberately broken copies of the kernel file (an ldmatrix address or .trans, a dropped
// __syncthreads, __syncwarp or cp.async wait, a write-after-read race on a cp.async tile, a
// tile overrun) all fail it. What it cannot: timing; interleavings finer than "one warp's whole
// barrier interval, then another's" (lanes of a warp meet at every warp-wide operation, not at
// every instruction; EMU_TSAN=1 checks every ordering instead: see run.sh); cp.async lands at
// the issuing thread's wait by default and at issue with EMU_CP_ASYNC=eager; bank conflicts,
// registers, spills; the hardware's exp2f and mma accumulation order. It is not a GPU run.
#include "prelude.h"
#define MK_HOST_EMULATION 1
namespace {
EMU_DYNAMIC_SHARED(unsigned char, smem_raw);  // the kernels' `extern __shared__ ... smem_raw[]`
}
#include "momentum_attention.cu"
#include <numbers>
#include <random>
#include <string>

#include "report.h"

// ------------------------------------------------------------------ dtypes and kernels --------

template <typename T> float back(T x) { return mk::to_float(x); }
template <typename T> T cvt(float x) { return mk::from_float<T>(x); }
// Every buffer a kernel reads or writes is an emu::DeviceVec (prelude.h): an access past its end
// (or, with EMU_GUARD=before, before its start) faults and names the thread and the buffer.
template <typename T> using Dev = emu::DeviceVec<T>;

template <typename V>
static std::vector<float> floats(const V& v) {
    std::vector<float> r(v.size());
    for (size_t i = 0; i < v.size(); ++i) r[i] = back(v[i]);
    return r;
}

template <typename T>
using FwdKernel = void (*)(const T*, const T*, const T*, T*, T*, float*, int, float, float, int);
template <typename T>
using BwdKernel = void (*)(const T*, const T*, const T*, const T*, const float*, const float*, float*, T*, T*, int,
                           float, float, int);

// The kernels of one storage dtype (the names cuda.rs builds with format!).
template <typename T> struct Kernels;
#define MK_KERNELS(T, DN, BWD)                                                                            \
    template <> struct Kernels<T> {                                                                       \
        static constexpr const char* name = #DN;                                                          \
        static constexpr double tol = std::is_same_v<T, float> ? 1e-5 : 1e-2;      /* testing::tolerance */ \
        static constexpr double grad_tol = std::is_same_v<T, float> ? 1e-4 : 1e-2; /* grad_tolerance */    \
        static FwdKernel<T> fwd(int d) {                                                                  \
            return d == 64 ? mattn_fwd_##DN##_d64 : d == 128 ? mattn_fwd_##DN##_d128 : mattn_fwd_##DN##_d256; \
        }                                                                                                 \
        static BwdKernel<T> bwd(int d) { return d == 64 ? BWD##_d64 : d == 128 ? BWD##_d128 : BWD##_d256; } \
        static void delta(const T* g, const T* o, float* delta, uint64_t rows, int d) {                   \
            mattn_bwd_delta_##DN(g, o, delta, rows, d);                                                   \
        }                                                                                                 \
        static void dq_finish(const float* acc, T* dq, uint64_t n) { mattn_dq_finish_##DN(acc, dq, n); }   \
        static void reference(const T* q, const T* k, const T* v, T* out, int t, int d, float s, float e) { \
            mattn_fwd_reference_##DN(q, k, v, out, t, d, s, e);                                           \
        }                                                                                                 \
        static void scan(const T* v, T* out, uint64_t cols, uint64_t t, uint64_t d, float eta) {           \
            mattn_momentum_scan_##DN(v, out, cols, t, d, eta);                                            \
        }                                                                                                 \
        static void bwd_ref_rows(const T* q, const T* k, const T* v, const T* g, float* st, T* dq, int t, \
                                 int d, float s) {                                                        \
            mattn_bwd_reference_rows_##DN(q, k, v, g, st, dq, t, d, s);                                   \
        }                                                                                                 \
        static void bwd_ref_cols(const T* q, const T* k, const T* v, const T* g, const float* st, T* dk,  \
                                 T* dv, int t, int d, float s, float e) {                                 \
            mattn_bwd_reference_cols_##DN(q, k, v, g, st, dk, dv, t, d, s, e);                            \
        }                                                                                                 \
        static void scan_reverse(const T* g, T* dv, uint64_t cols, uint64_t t, uint64_t d, float eta) {    \
            mattn_momentum_scan_reverse_##DN(g, dv, cols, t, d, eta);                                     \
        }                                                                                                 \
    };
MK_KERNELS(float, f32, mattn_bwd_f32)
MK_KERNELS(__half, f16, mattn_bwd_mma_f16)
MK_KERNELS(__nv_bfloat16, bf16, mattn_bwd_mma_bf16)
#undef MK_KERNELS

// ------------------------------------------------------------------ cuda.rs, mirrored ---------

constexpr unsigned THREADS_RS = 128;  // cuda.rs THREADS
struct Geometry { int rows_per_block; size_t smem_bytes; };

// forward_geometry in cuda.rs.
template <typename T>
static Geometry forward_geometry(int d) {
    if (std::is_same_v<T, float>) {
        const size_t ld = d + 1;
        return {32, (3 * 32 * ld + 32 * 33) * 4};
    }
    const size_t bc = d == 256 ? 32 : 64;
    return {64, (64 + 2 * bc) * (d + 8) * 2};
}

// backward_kernel in cuda.rs (the kernel itself is Kernels<T>::bwd).
template <typename T>
static Geometry backward_geometry(int d) {
    const size_t pad = 8, ld = d + pad;
    if (std::is_same_v<T, float>) {
        const size_t ld1 = d + 1;
        return {32, (4 * 32 * ld1 + 2 * 32 * 33 + 2 * 32) * 4};
    }
    if (d == 256) return {32, 4 * 32 * ld * 2 + 2 * 32 * (32 + pad) * 2 + 2 * 32 * 4};
    return {64, (2 * 64 + 2 * 32) * ld * 2 + 64 * (32 + pad) * 2 + 2 * 32 * 4};
}

// momentum_horizon in mod.rs: the smallest H with η^H ≤ 2⁻²⁴ (0 for η = 0).
static size_t momentum_horizon(float eta) {
    if (eta <= 0.f || !std::isfinite(eta)) return 0;
    const double lags = std::ceil(24.0 / -std::log2((double)eta));
    return std::isfinite(lags) && lags < 4294967295.0 ? std::max<size_t>((size_t)lags, 1) : 4294967295u;
}

// grid_1d in src/cuda/mod.rs.
static dim3 grid_1d(size_t work_items, unsigned threads) {
    const size_t blocks = std::clamp<size_t>((work_items + threads - 1) / threads, 1, 65535);
    return {(unsigned)blocks, 1, 1};
}

struct Params {
    float scale, eta;
    size_t horizon;
    Params with_eta0() const { return {scale, 0.f, 0}; }
};
// SoftmaxParams::new with the default scale 1/√D (computed in f32, as in Rust).
static Params params(int d, float eta) { return {1.0f / std::sqrt((float)d), eta, momentum_horizon(eta)}; }

template <typename T>
struct Inputs {
    int bh, t, d;
    Dev<T> q, k, v, g;                     // g = dL/do
    std::vector<double> q64, k64, v64, g64;  // the same values, exactly
    size_t numel() const { return (size_t)bh * t * d; }
};

static std::mt19937_64 g_rng(2024);
template <typename T>
static Inputs<T> make_inputs(int bh, int t, int d) {
    Inputs<T> x{bh, t, d};
    auto gen = [&](Dev<T>& v, std::vector<double>& v64) {
        std::normal_distribution<float> normal(0.f, 1.f);
        v = Dev<T>(x.numel());
        v64.resize(x.numel());
        for (size_t i = 0; i < v.size(); ++i) v[i] = cvt<T>(normal(g_rng)), v64[i] = back(v[i]);
    };
    gen(x.q, x.q64), gen(x.k, x.k64), gen(x.v, x.v64), gen(x.g, x.g64);
    return x;
}

template <typename T>
struct Forward {
    Dev<T> out, attn;  // attn: empty unless saved
    Dev<float> lse2;
};

// forward_typed: one launch of mattn_fwd_<dtype>_d<D>, outputs poisoned.
template <typename T>
static Forward<T> forward(const Inputs<T>& x, const Params& p, bool save_attention) {
    Forward<T> f;
    f.out.assign(x.numel(), cvt<T>(NAN));
    if (save_attention) f.attn.assign(x.numel(), cvt<T>(NAN));
    f.lse2.assign((size_t)x.bh * x.t, NAN);
    const Geometry geo = forward_geometry<T>(x.d);
    const unsigned tiles = (x.t + geo.rows_per_block - 1) / geo.rows_per_block;
    const FwdKernel<T> kernel = Kernels<T>::fwd(x.d);
    const T *q = x.q.data(), *k = x.k.data(), *v = x.v.data();
    T* out = f.out.data();
    T* attn = save_attention ? f.attn.data() : nullptr;
    float* lse2 = f.lse2.data();
    const int t_len = x.t;
    const float scale_log2 = p.scale * std::numbers::log2e_v<float>;
    const float eta = p.eta;
    const int horizon = (int)std::min(p.horizon, (size_t)x.t);
    emu_launch({(unsigned)x.bh, tiles, 1}, {THREADS_RS, 1, 1}, geo.smem_bytes,
               [=] { kernel(q, k, v, out, attn, lse2, t_len, scale_log2, eta, horizon); });
    return f;
}

// forward_reference: one block of D threads per (row, head).
template <typename T>
static Dev<T> forward_reference_kernel(const Inputs<T>& x, const Params& p) {
    Dev<T> out(x.numel(), cvt<T>(NAN));
    const T *q = x.q.data(), *k = x.k.data(), *v = x.v.data();
    T* o = out.data();
    const int t_len = x.t, d = x.d;
    const float scale = p.scale, eta = p.eta;
    emu_launch({(unsigned)x.t, (unsigned)x.bh, 1}, {(unsigned)x.d, 1, 1}, 0,
               [=] { Kernels<T>::reference(q, k, v, o, t_len, d, scale, eta); });
    return out;
}

template <typename T>
struct Grads { Dev<T> dq, dk, dv; };

// backward_reference: one block of D threads per (query row, head) for dq and the row
// statistics, then one per (key row, head) for dk and dv.
template <typename T>
static Grads<T> backward_reference_kernel(const Inputs<T>& x, const Params& p) {
    const size_t n = x.numel();
    Grads<T> r{Dev<T>(n, cvt<T>(NAN)), Dev<T>(n, cvt<T>(NAN)), Dev<T>(n, cvt<T>(NAN))};
    Dev<float> stats((size_t)x.bh * x.t * 3, NAN);
    const T *q = x.q.data(), *k = x.k.data(), *v = x.v.data(), *g = x.g.data();
    T *dq = r.dq.data(), *dk = r.dk.data(), *dv = r.dv.data();
    float* st = stats.data();
    const int t_len = x.t, d = x.d;
    const float scale = p.scale, eta = p.eta;
    const dim3 grid{(unsigned)x.t, (unsigned)x.bh, 1}, block{(unsigned)x.d, 1, 1};
    emu_launch(grid, block, 0, [=] { Kernels<T>::bwd_ref_rows(q, k, v, g, st, dq, t_len, d, scale); });
    emu_launch(grid, block, 0, [=] { Kernels<T>::bwd_ref_cols(q, k, v, g, st, dk, dv, t_len, d, scale, eta); });
    return r;
}

// forward_unfused: the forward at η = 0, then the momentum scan in place.
template <typename T>
static Dev<T> forward_unfused(const Inputs<T>& x, const Params& p) {
    Dev<T> out = std::move(forward(x, p.with_eta0(), false).out);
    const T* v = x.v.data();
    T* o = out.data();
    const uint64_t t_len = x.t, d = x.d, cols = (uint64_t)x.bh * x.d;
    const float eta = p.eta;
    emu_launch(grid_1d(cols, 128), {128, 1, 1}, 0, [=] { Kernels<T>::scan(v, o, cols, t_len, d, eta); });
    return out;
}

// backward_typed: (attn, lse2) saved by forward_with_state, or recomputed by the forward at
// η = 0; delta; the backward kernel into a zeroed f32 dq accumulator; dq_finish.
template <typename T>
static Grads<T> backward(const Inputs<T>& x, const Params& p, const Forward<T>* saved) {
    Forward<T> recomputed;
    if (saved == nullptr) recomputed = forward(x, p.with_eta0(), false);
    const Dev<T>& attn = saved ? saved->attn : recomputed.out;
    const Dev<float>& lse2v = saved ? saved->lse2 : recomputed.lse2;
    const size_t n = x.numel(), rows = (size_t)x.bh * x.t;
    const T *q = x.q.data(), *k = x.k.data(), *v = x.v.data(), *g = x.g.data(), *o = attn.data();
    const float* lse2 = lse2v.data();

    Dev<float> delta(rows, NAN);
    {
        float* dl = delta.data();
        const uint64_t rows_arg = rows;
        const int d = x.d;
        emu_launch({(unsigned)((rows + 7) / 8), 1, 1}, {256, 1, 1}, 0,
                   [=] { Kernels<T>::delta(g, o, dl, rows_arg, d); });
    }
    Dev<float> dq_acc(n, 0.f);  // alloc_zeros
    Grads<T> r{Dev<T>(n, cvt<T>(NAN)), Dev<T>(n, cvt<T>(NAN)), Dev<T>(n, cvt<T>(NAN))};
    {
        const Geometry geo = backward_geometry<T>(x.d);
        const unsigned tiles = (x.t + geo.rows_per_block - 1) / geo.rows_per_block;
        const BwdKernel<T> kernel = Kernels<T>::bwd(x.d);
        const float* dl = delta.data();
        float* acc = dq_acc.data();
        T *dk = r.dk.data(), *dv = r.dv.data();
        const int t_len = x.t;
        const float scale = p.scale, eta = p.eta;
        const int horizon = (int)std::min(p.horizon, (size_t)x.t);
        emu_launch({(unsigned)x.bh, tiles, 1}, {THREADS_RS, 1, 1}, geo.smem_bytes,
                   [=] { kernel(q, k, v, g, lse2, dl, acc, dk, dv, t_len, scale, eta, horizon); });
    }
    {
        const float* acc = dq_acc.data();
        T* dq = r.dq.data();
        const uint64_t n_arg = n;
        emu_launch(grid_1d(n, 256), {256, 1, 1}, 0, [=] { Kernels<T>::dq_finish(acc, dq, n_arg); });
    }
    return r;
}

// backward_unfused: the backward at η = 0, then the reverse momentum scan of dL/do into dv.
template <typename T>
static Grads<T> backward_unfused(const Inputs<T>& x, const Params& p) {
    Grads<T> r = backward<T>(x, p.with_eta0(), nullptr);
    const T* g = x.g.data();
    T* dv = r.dv.data();
    const uint64_t t_len = x.t, d = x.d, cols = (uint64_t)x.bh * x.d;
    const float eta = p.eta;
    emu_launch(grid_1d(cols, 128), {128, 1, 1}, 0, [=] { Kernels<T>::scan_reverse(g, dv, cols, t_len, d, eta); });
    return r;
}

// ------------------------------------------------------------------ float64 reference ---------
// tests/all/momentum_attention/reference.rs, in the same plain loops.

struct Ref64 {
    std::vector<double> attn, out, lse2, dq, dk, dv;
};

template <typename T>
static Ref64 reference64(const Inputs<T>& x, double eta) {
    const int bh = x.bh, t = x.t, d = x.d;
    const double scale = 1.0 / std::sqrt((double)d);
    const size_t n = x.numel();
    Ref64 r;
    r.attn.assign(n, 0), r.out.assign(n, 0), r.lse2.assign((size_t)bh * t, 0);
    r.dq.assign(n, 0), r.dk.assign(n, 0), r.dv.assign(n, 0);
    auto row = [&](int h, int i) { return ((size_t)h * t + i) * d; };
    std::vector<double> p, dp;
    for (int h = 0; h < bh; ++h) {
        for (int i = 0; i < t; ++i) {
            const double *qi = &x.q64[row(h, i)], *gi = &x.g64[row(h, i)];
            // softmax_s(scale · q_i·k_s) over s ≤ i, stably; dp_s = g_i·v_s.
            p.assign(i + 1, 0), dp.assign(i + 1, 0);
            double mx = -INFINITY;
            for (int s = 0; s <= i; ++s) {
                double dot = 0, gv = 0;
                for (int c = 0; c < d; ++c) dot += qi[c] * x.k64[row(h, s) + c], gv += gi[c] * x.v64[row(h, s) + c];
                p[s] = scale * dot, dp[s] = gv;
                mx = std::max(mx, p[s]);
            }
            double sum = 0;
            for (int s = 0; s <= i; ++s) sum += (p[s] = std::exp(p[s] - mx));
            for (int s = 0; s <= i; ++s) p[s] /= sum;
            r.lse2[(size_t)h * t + i] = (mx + std::log(sum)) / std::numbers::ln2;
            double mean = 0;
            for (int s = 0; s <= i; ++s) mean += p[s] * dp[s];
            for (int s = 0; s <= i; ++s) {
                const double ds = p[s] * (dp[s] - mean);
                for (int c = 0; c < d; ++c) {
                    r.attn[row(h, i) + c] += p[s] * x.v64[row(h, s) + c];
                    r.dv[row(h, s) + c] += p[s] * gi[c];
                    r.dq[row(h, i) + c] += scale * ds * x.k64[row(h, s) + c];
                    r.dk[row(h, s) + c] += scale * ds * qi[c];
                }
            }
            // Momentum: o_i = attn_i + Σ_{s<i} η^{i−s} v_s, so dv_s += η^{i−s} g_i.
            for (int c = 0; c < d; ++c) r.out[row(h, i) + c] = r.attn[row(h, i) + c];
            for (int s = 0; s < i; ++s) {
                const double w = std::pow(eta, i - s);
                for (int c = 0; c < d; ++c) {
                    r.out[row(h, i) + c] += w * x.v64[row(h, s) + c];
                    r.dv[row(h, s) + c] += w * gi[c];
                }
            }
        }
    }
    return r;
}

// ------------------------------------------------------------------ cases ---------------------

// reference_backward: the backward reference kernels, one block per row recomputing every logit
// by a block reduction (seconds per case under the emulation: only where asked).
struct What { bool reference_kernel, unfused, with_state, backward, reference_backward; };

template <typename T>
static void run_case(int bh, int t, int d, const std::vector<float>& etas, What what) {
    using K = Kernels<T>;
    const Inputs<T> x = make_inputs<T>(bh, t, d);
    for (float eta : etas) {
        const Params p = params(d, eta);
        const Ref64 want = reference64(x, eta);
        char tag[120];
        std::snprintf(tag, sizeof tag, "%s d=%d t=%d bh=%d eta=%g", K::name, d, t, bh, eta);
        const std::string s = tag;
        compare(s + " fwd o", floats(forward(x, p, false).out), want.out, K::tol);
        Forward<T> state;
        if (what.with_state) {
            state = forward(x, p, true);
            compare(s + " fwd+state o", floats(state.out), want.out, K::tol);
            compare(s + " fwd+state attn", floats(state.attn), want.attn, K::tol);
            compare(s + " fwd+state lse2", state.lse2, want.lse2, K::tol);
        }
        if (what.reference_kernel) compare(s + " reference kernel o", floats(forward_reference_kernel(x, p)), want.out, K::tol);
        if (what.unfused) compare(s + " unfused o", floats(forward_unfused(x, p)), want.out, 2 * K::tol);
        if (what.backward) {
            const Grads<T> g = backward<T>(x, p, nullptr);
            compare(s + " bwd dq", floats(g.dq), want.dq, K::grad_tol);
            compare(s + " bwd dk", floats(g.dk), want.dk, K::grad_tol);
            compare(s + " bwd dv", floats(g.dv), want.dv, K::grad_tol);
            if (what.reference_backward) {
                const Grads<T> rk = backward_reference_kernel<T>(x, p);
                compare(s + " reference kernel dq", floats(rk.dq), want.dq, K::grad_tol);
                compare(s + " reference kernel dk", floats(rk.dk), want.dk, K::grad_tol);
                compare(s + " reference kernel dv", floats(rk.dv), want.dv, K::grad_tol);
            }
            if (what.unfused) {
                // The attention's dv rounds to the dtype before the momentum is added.
                const Grads<T> u = backward_unfused<T>(x, p);
                compare(s + " unfused bwd dq", floats(u.dq), want.dq, K::grad_tol);
                compare(s + " unfused bwd dk", floats(u.dk), want.dk, K::grad_tol);
                compare(s + " unfused bwd dv", floats(u.dv), want.dv, 2 * K::grad_tol);
            }
            if (what.with_state && eta > 0.f) {
                const Grads<T> gs = backward(x, p, &state);
                compare(s + " bwd(saved) dq", floats(gs.dq), want.dq, K::grad_tol);
                compare(s + " bwd(saved) dk", floats(gs.dk), want.dk, K::grad_tol);
                compare(s + " bwd(saved) dv", floats(gs.dv), want.dv, K::grad_tol);
            }
        }
    }
}

// The full matrix of one dtype: D ∈ {64, 128, 256} × T ∈ {1, 77, 300} × η ∈ {0, 0.5, 0.9, 0.99}
// (the GPU tests' ETAS), then the GPU tests' long sequences: T = 700 (far past the horizons of
// η = 0.5 and 0.9: 24 and 158 lags), forward at D = 128, backward at D = 64 and 256.
template <typename T>
static void run_dtype_full() {
    const std::vector<float> etas = {0.f, 0.5f, 0.9f, 0.99f};
    for (int d : {64, 128, 256}) {
        run_case<T>(2, 1, d, etas, {true, true, true, true, true});
        run_case<T>(2, 77, d, etas, {true, true, true, true, true});
        run_case<T>(2, 300, d, etas, {false, true, true, true});
    }
    run_case<T>(2, 700, 128, {0.5f, 0.9f, 0.99f}, {false, false, false, false});
    for (int d : {64, 256}) run_case<T>(2, 700, d, {0.5f, 0.9f}, {false, false, false, true});
}

// Every entry point once: each (dtype, D) at the ragged T = 77 and η = 0.5 with every check;
// T = 1 at η = 0.9; T = 300 at η = 0.5 (past its horizon) for one D per dtype.
template <typename T>
static void run_dtype_quick(int long_d) {
    for (int d : {64, 128, 256})
        run_case<T>(2, 77, d, {0.5f}, {true, true, true, true, d == 64 && !std::is_same_v<T, __half>});
    run_case<T>(2, 1, long_d, {0.9f}, {false, false, true, true});
    run_case<T>(2, 300, long_d, {0.5f}, {false, false, false, true});
}

// `random N [seed]`: N cases drawn at random (dtype, head dim, B·H, T biased to the tile edges,
// η anywhere in [0, 1)), every check on; beyond the fixed matrix above.
static void run_random(RandomRun run) {
    std::mt19937_64 r(run.seed);
    const int edges[] = {1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129};
    for (int i = 0; i < run.cases; ++i) {
        const int d = 64 << (r() % 3);
        const int t = r() % 2 ? edges[r() % std::size(edges)] : 1 + (int)(r() % 320);
        const int bh = 1 + r() % 3;
        const float etas[] = {0.f, 0.5f, 0.9f, 0.99f, (r() % 1000) / 1000.f};
        const float eta = etas[r() % std::size(etas)];
        std::printf("-- random case %d of %d (seed %llu)\n", i + 1, run.cases, run.seed);
        const What all{true, true, true, true, t <= 80};
        switch (r() % 3) {
            case 0: run_case<float>(bh, t, d, {eta}, all); break;
            case 1: run_case<__half>(bh, t, d, {eta}, all); break;
            default: run_case<__nv_bfloat16>(bh, t, d, {eta}, all); break;
        }
    }
}

int main(int argc, char** argv) {
    const bool quick = argc > 1 && std::string(argv[1]) == "quick";
    const auto start = std::chrono::steady_clock::now();
    if (const auto run = random_run(argc, argv)) {
        run_random(*run);
        return finish(start);
    }
    if (quick) {
        run_dtype_quick<float>(128);
        run_dtype_quick<__half>(256);
        run_dtype_quick<__nv_bfloat16>(64);
    } else {
        run_dtype_full<float>();
        run_dtype_full<__half>();
        run_dtype_full<__nv_bfloat16>();
        // The quick subset again with cp.async landing at issue instead of at the wait.
        g_cp_async_eager = true;
        std::printf("-- again with cp.async copies landing at issue (EMU_CP_ASYNC=eager)\n");
        run_dtype_quick<float>(128);
        run_dtype_quick<__half>(256);
        run_dtype_quick<__nv_bfloat16>(64);
    }
    return finish(start);
}
