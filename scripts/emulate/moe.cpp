// scripts/emulate/run.sh moe [quick]: runs the MoE kernels of kernels/moe.cu under the CPU
// emulation of prelude.h, with the launch sequences, grids, block sizes, argument values and
// choice rules of src/ops/moe/cuda.rs, and compares them with the reference kernels and a float64
// reference written here (the loops of tests/all/moe.rs) at the tolerances of the Rust GPU tests:
//
//   routing     top1_logits_{f32,f16,bf16} (route_top1_logits) and top1_logits_reference_*: the
//               expert exact vs a host argmax of the same rounded logits (ties to the lowest
//               index), the gate probability 1 / Σ exp(l − max) vs float64 (1e-5); exact ties;
//               non-finite logits set the status word. N, K as cuda_moe_matches_cpu: (1, 1),
//               (1000, 7), (4099, 16), (513, 3), plus K = 33 and 100 (lanes striding over K),
//               and (full mode) N = 600000 (row_grid's 65535-block cap: warps grid-stride).
//               The routing's counting sort is kernels/kmeans.cu's (scripts/emulate/kmeans.cpp).
//   dispatch    move_rows_v{16,4,2} (the widest vector dividing a row's bytes, as cuda.rs picks
//   /combine    it) as gather and as scatter, move_bytes_reference, scatter_scaled_* (weighted
//               combine, 4-wide and scalar) and scatter_scaled_reference_*: exact vs the host's
//               gather / scatter / f32 product,
//               combine(dispatch(x)) = x exactly, and the weighted combine vs float64 at
//               testing::tolerance (1e-5 f32, 1e-2 f16/bf16)
//   lstsq       normal_equations_f32 and normal_equations_reference_f32 (G = [XᵀX | XᵀY]) vs
//               float64 (1e-5), then cholesky_solve_f32 where cuda.rs's rule puts the system on
//               chip (n ≤ 64, n·(n + r) ≤ 8192): W vs a float64 solve of the float64 normal
//               equations (1e-3, lstsq_case on the GPU), fast vs reference-kernel Gram (1e-4),
//               cholesky_solve_reference_f32 (one thread per system) likewise, flags exact: 0 for full rank, 1 (rank deficient → the host's min-norm path) for a
//               duplicated column and for an empty segment with ridge 0, 2 for non-finite x.
//               Shapes: 1024 (quick: 64) systems of 64 × 16 with 8 right-hand sides (ridge 0 and
//               0.01), the CPU test's (64, 16, 4), (20, 5, 3, ridge 0.5), (9, 9, 1), grouped
//               segments of routed tokens with an empty expert, n + r = 256 (the staging tile's
//               width) and n·(n + r) > 8192 (several chunks of the Gram kernel; host Cholesky).
//
// `quick` runs a subset that launches every kernel at least once (~1 s after an ~4 s compile;
// full ~50 s). Outputs are poisoned (NaN / 0xff bytes) before every launch and every element is
// checked.
//
// What it proves: index math, tails, the barrier structure (between two __syncthreads the warps
// run one after another in a random order; EMU_SEED=<n> picks another), warp shuffles and votes,
// reads of unwritten shared memory (poisoned with NaN), numerics. Deliberately broken copies of
// kernels/moe.cu, each caught (quick mode already): in normal_equations a dropped barrier before
// or after the staging, the staging's row bound off by one, y's column offset; in cholesky_solve
// a dropped barrier after the pivot or after the column scaling, the trailing update's column
// range, the ridge skipped, an absolute instead of relative pivot threshold (seen by the nearly
// rank-deficient case only), the non-finite flag dropped; in top1_logits the fold's tie rule, a
// fold missing lane distance 16, the __any_sync of `bad` dropped; move_rows' vector loop bound;
// scatter_scaled weighting by the grouped row instead of the token; move_rows moving one vector
// past the row and top1_logits_reference reading one logit past it (faults at the end of the
// buffers, like the staging row bound above). Not caught, and equivalent:
// normal_equations' chunk stride shortened, scatter_scaled's 4-wide stride halved (overlapping
// work that writes the same values). Every buffer a kernel reads or writes is an emu::DeviceVec
// (prelude.h, "global memory"): an access past its end faults and is named with its block,
// thread and buffer (EMU_GUARD=before: accesses before its start).
// What it cannot: timing; interleavings finer than "one warp's whole barrier interval, then
// another's" (EMU_TSAN=1 checks every ordering instead: see run.sh); reads within the 16-byte
// rounding of a buffer's end (writes there are found after the block); the host's f64 min-norm
// fallback for flagged systems and the n + r > 256 host path (no kernel runs there); the
// hardware's __expf. It is not a GPU run.
#include "prelude.h"
#define MK_HOST_EMULATION 1

#include "moe.cu"
#include <cstdarg>
#include <map>
#include <random>
#include <string>

#include "report.h"

// Host data is std::vector; every buffer a kernel reads or writes is an emu::DeviceVec (prelude.h:
// its end against a guard region), filled from and copied back to host vectors around the
// launches of one call, as cudaMemcpy would.
template <typename T> using vec = std::vector<T>;
template <typename T> using Dev = emu::DeviceVec<T>;

// ------------------------------------------------------------------ dtypes and kernels --------

template <typename T> float back(T x) { return mk::to_float(x); }
template <typename T> T cvt(float x) { return mk::from_float<T>(x); }

template <typename T> struct Kernels;
#define MK_KERNELS(T, SN)                                                                                  \
    template <> struct Kernels<T> {                                                                       \
        static constexpr const char* name = #SN;                                                          \
        static constexpr double tol = std::is_same_v<T, float> ? 1e-5 : 1e-2; /* testing::tolerance */    \
        static void top1(const T* l, int n, int k, uint32_t* e, float* p, uint32_t* s) {                  \
            top1_logits_##SN(l, n, k, e, p, s);                                                           \
        }                                                                                                 \
        static void top1_ref(const T* l, int n, int k, uint32_t* e, float* p) {                           \
            top1_logits_reference_##SN(l, n, k, e, p);                                                    \
        }                                                                                                 \
        static void scaled(const T* src, const uint32_t* idx, const float* w, int rows, int d, T* dst) {  \
            scatter_scaled_##SN(src, idx, w, rows, d, dst);                                               \
        }                                                                                                 \
        static void scaled_ref(const T* src, const uint32_t* idx, const float* w, int rows, int d, T* dst) { \
            scatter_scaled_reference_##SN(src, idx, w, rows, d, dst);                                     \
        }                                                                                                 \
    };
MK_KERNELS(float, f32)
MK_KERNELS(__half, f16)
MK_KERNELS(__nv_bfloat16, bf16)
#undef MK_KERNELS

// ------------------------------------------------------------------ cuda.rs, mirrored ---------

constexpr unsigned ROW_THREADS = 256;
constexpr size_t MAX_BLOCKS = 65535, CHOLESKY_MAX_N = 64, CHOLESKY_MAX_FLOATS = 8192, GRAM_MAX_COLS = 256;

static unsigned div_ceil(size_t a, size_t b) { return (unsigned)((a + b - 1) / b); }
static dim3 row_grid(size_t rows) { return {(unsigned)std::clamp<size_t>(div_ceil(rows, ROW_THREADS / 32), 1, MAX_BLOCKS), 1, 1}; }
// grid_1d in src/cuda/mod.rs.
static dim3 grid_1d(size_t work_items, unsigned threads) {
    return {(unsigned)std::clamp<size_t>(div_ceil(work_items, threads), 1, MAX_BLOCKS), 1, 1};
}

static std::map<std::string, int> g_launched;  // kernel name → launches (coverage)
static void launch(const std::string& name, dim3 grid, unsigned block, const std::function<void()>& k) {
    ++g_launched[name];
    emu_launch(grid, {block, 1, 1}, 0, k);
}

struct Top1 { vec<uint32_t> expert; vec<float> probs; uint32_t status = 0; };

template <typename T>
static Top1 top1_logits(const vec<T>& logits, int n, int k) {
    Dev<uint32_t> expert(n, 0xffffffffu), status(1, 0);
    Dev<float> probs(n, NAN);
    const Dev<T> logits_d(logits);
    const T* l = logits_d.data();
    uint32_t *e = expert.data(), *s = status.data();
    float* p = probs.data();
    launch(std::string("top1_logits_") + Kernels<T>::name, row_grid(n), ROW_THREADS,
           [=] { Kernels<T>::top1(l, n, k, e, p, s); });
    return {expert, probs, status[0]};
}

template <typename T>
static Top1 top1_logits_reference(const vec<T>& logits, int n, int k) {
    Dev<uint32_t> expert(n, 0xffffffffu);
    Dev<float> probs(n, NAN);
    const Dev<T> logits_d(logits);
    const T* l = logits_d.data();
    uint32_t* e = expert.data();
    float* p = probs.data();
    launch(std::string("top1_logits_reference_") + Kernels<T>::name, {std::max(div_ceil(n, 128), 1u), 1, 1}, 128,
           [=] { Kernels<T>::top1_ref(l, n, k, e, p); });
    return {expert, probs, 0};
}

// move_rows: gather (dst[j] = src[order[j]]) or scatter (dst[order[j]] = src[j]).
template <typename T>
static vec<T> move_rows(const vec<T>& src, const vec<uint32_t>& order, int n, int d,
                                bool scatter, std::string* kernel_name = nullptr) {
    Dev<T> out((size_t)n * d);
    out.poison();  // dev.alloc
    if (n > 0 && d > 0) {
        const size_t row_bytes = (size_t)d * sizeof(T);
        const Dev<T> src_d(src);
        const Dev<uint32_t> order_d(order);
        const uint32_t* idx = order_d.data();
        const int sc = scatter, vecs16 = (int)(row_bytes / 16), vecs4 = (int)(row_bytes / 4), vecs2 = (int)(row_bytes / 2);
        const void* s = src_d.data();
        void* o = out.data();
        std::string name;
        if (row_bytes % 16 == 0)
            launch(name = "move_rows_v16", row_grid(n), ROW_THREADS,
                   [=] { move_rows_v16((const uint4*)s, idx, n, vecs16, sc, (uint4*)o); });
        else if (row_bytes % 4 == 0)
            launch(name = "move_rows_v4", row_grid(n), ROW_THREADS,
                   [=] { move_rows_v4((const uint32_t*)s, idx, n, vecs4, sc, (uint32_t*)o); });
        else
            launch(name = "move_rows_v2", row_grid(n), ROW_THREADS,
                   [=] { move_rows_v2((const uint16_t*)s, idx, n, vecs2, sc, (uint16_t*)o); });
        if (kernel_name) *kernel_name = name;
    }
    return out;
}

template <typename T>
static vec<T> move_rows_reference(const vec<T>& src, const vec<uint32_t>& order, int n,
                                          int d, bool scatter) {
    Dev<T> out((size_t)n * d);
    out.poison();
    const int row_bytes = d * (int)sizeof(T), sc = scatter;
    const size_t total = (size_t)n * row_bytes;
    const Dev<T> src_d(src);
    const Dev<uint32_t> order_d(order);
    const uint8_t* s = (const uint8_t*)src_d.data();
    uint8_t* o = (uint8_t*)out.data();
    const uint32_t* idx = order_d.data();
    launch("move_bytes_reference", {std::max(div_ceil(total, 256), 1u), 1, 1}, 256,
           [=] { move_bytes_reference(s, idx, n, row_bytes, sc, o); });
    return out;
}

template <typename T>
static vec<T> combine_weighted(const vec<T>& grouped, const vec<uint32_t>& order,
                                       const vec<float>& w, int n, int d, bool reference = false) {
    Dev<T> out((size_t)n * d);
    out.poison();
    const Dev<T> grouped_d(grouped);
    const Dev<uint32_t> order_d(order);
    const Dev<float> w_d(w);
    const T* s = grouped_d.data();
    const uint32_t* idx = order_d.data();
    const float* ws = w_d.data();
    T* o = out.data();
    if (reference)  // cuda.rs: grid_1d(n·d, 256), a grid-stride loop
        launch(std::string("scatter_scaled_reference_") + Kernels<T>::name, grid_1d((size_t)n * d, 256), 256,
               [=] { Kernels<T>::scaled_ref(s, idx, ws, n, d, o); });
    else
        launch(std::string("scatter_scaled_") + Kernels<T>::name, row_grid(n), ROW_THREADS,
               [=] { Kernels<T>::scaled(s, idx, ws, n, d, o); });
    return out;
}

// gram: G = [XᵀX | XᵀY] per segment, [S, n, n + r] f32 (fast kernel or the reference).
static vec<float> gram(const vec<float>& x, const vec<float>& y, const vec<uint32_t>& seg,
                               int n, int r, bool reference) {
    const int systems = (int)seg.size() - 1;
    const size_t total = (size_t)systems * n * (n + r);
    Dev<float> g(total, NAN);
    const Dev<float> x_d(x), y_d(y);
    const Dev<uint32_t> seg_d(seg);
    const float *xs = x_d.data(), *ys = y_d.data();
    const uint32_t* sg = seg_d.data();
    float* gp = g.data();
    if (reference)
        launch("normal_equations_reference_f32", {div_ceil(total, 256), 1, 1}, 256,
               [=] { normal_equations_reference_f32(xs, ys, sg, systems, n, r, gp); });
    else
        launch("normal_equations_f32", {(unsigned)systems, 1, 1}, 256, [=] { normal_equations_f32(xs, ys, sg, n, r, gp); });
    return g;
}

struct Solved { vec<float> w; vec<uint32_t> flags; bool on_chip; };

// solve_on_device: the on-chip Cholesky when the rule allows; flagged systems (and all systems
// off chip) go to the host's f64 solver in cuda.rs, which this driver does not replay.
static Solved solve_on_device(const vec<float>& g, int systems, int n, int r, double ridge, bool reference = false) {
    Solved s{vec<float>((size_t)systems * n * r, NAN), vec<uint32_t>(systems, 4u), false};
    s.on_chip = (size_t)n <= CHOLESKY_MAX_N && (size_t)n * (n + r) <= CHOLESKY_MAX_FLOATS;
    if (s.on_chip) {
        const Dev<float> g_d(g);
        Dev<float> w_d(s.w);
        Dev<uint32_t> flags_d(systems, 0xffffffffu);
        const float* gp = g_d.data();
        float* w = w_d.data();
        uint32_t* f = flags_d.data();
        const float ridge32 = (float)ridge;
        if (reference) {  // one thread per system, blocks of 64, its factor in a global copy
            Dev<float> work((size_t)systems * n * (n + r), NAN);
            float* wk = work.data();
            launch("cholesky_solve_reference_f32", {(unsigned)div_ceil(systems, 64), 1, 1}, 64,
                   [=] { cholesky_solve_reference_f32(gp, systems, n, r, ridge32, wk, w, f); });
        } else {
            launch("cholesky_solve_f32", {(unsigned)systems, 1, 1}, 128, [=] { cholesky_solve_f32(gp, n, r, ridge32, w, f); });
        }
        s.w = w_d, s.flags = flags_d;
    }
    return s;
}

// ------------------------------------------------------------------ float64 references --------

static std::mt19937_64 g_rng(2027);
static double normal() { return std::normal_distribution<double>(0, 1)(g_rng); }

template <typename T>
static vec<T> randn_t(size_t len, vec<double>& v64, double scale = 1) {
    vec<T> r(len);
    v64.resize(len);
    for (size_t i = 0; i < len; ++i) r[i] = cvt<T>((float)(scale * normal())), v64[i] = back(r[i]);
    return r;
}

static std::pair<vec<uint32_t>, vec<uint32_t>> host_sort(const vec<uint32_t>& e, int k) {
    vec<uint32_t> off(k + 1, 0), order(e.size());
    for (uint32_t c : e) off[c + 1]++;
    for (int c = 0; c < k; ++c) off[c + 1] += off[c];
    vec<uint32_t> next(off.begin(), off.end() - 1);
    for (size_t i = 0; i < e.size(); ++i) order[next[e[i]]++] = (uint32_t)i;
    return {order, off};
}

// G in f64 for the rows [seg[s], seg[s+1]) of x (· × n) and y (· × r).
static vec<double> gram64(const vec<double>& x, const vec<double>& y,
                                  const vec<uint32_t>& seg, int n, int r) {
    const int w = n + r, systems = (int)seg.size() - 1;
    vec<double> g((size_t)systems * n * w, 0);
    for (int s = 0; s < systems; ++s)
        for (uint32_t row = seg[s]; row < seg[s + 1]; ++row)
            for (int i = 0; i < n; ++i)
                for (int j = 0; j < w; ++j)
                    g[((size_t)s * n + i) * w + j] +=
                        x[(size_t)row * n + i] * (j < n ? x[(size_t)row * n + j] : y[(size_t)row * r + j - n]);
    return g;
}

// (A + ridge I) W = B by Cholesky in f64, from a [n, n + r] block of G.
static vec<double> solve64(const double* g, int n, int r, double ridge) {
    const int w = n + r;
    vec<double> l((size_t)n * n, 0), out((size_t)n * r);
    for (int j = 0; j < n; ++j) {
        double p = g[(size_t)j * w + j] + ridge;
        for (int c = 0; c < j; ++c) p -= l[(size_t)j * n + c] * l[(size_t)j * n + c];
        l[(size_t)j * n + j] = std::sqrt(p);
        for (int i = j + 1; i < n; ++i) {
            double v = g[(size_t)i * w + j];
            for (int c = 0; c < j; ++c) v -= l[(size_t)i * n + c] * l[(size_t)j * n + c];
            l[(size_t)i * n + j] = v / l[(size_t)j * n + j];
        }
    }
    for (int col = 0; col < r; ++col) {
        vec<double> z(n);
        for (int i = 0; i < n; ++i) {
            double v = g[(size_t)i * w + n + col];
            for (int p = 0; p < i; ++p) v -= l[(size_t)i * n + p] * z[p];
            z[i] = v / l[(size_t)i * n + i];
        }
        for (int i = n - 1; i >= 0; --i) {
            double v = z[i];
            for (int p = i + 1; p < n; ++p) v -= l[(size_t)p * n + i] * out[(size_t)p * r + col];
            out[(size_t)i * r + col] = v / l[(size_t)i * n + i];
        }
    }
    return out;
}

// ------------------------------------------------------------------ cases ---------------------

// route_top1_logits, the reference kernel, dispatch and combine (cuda_moe_matches_cpu).
template <typename T>
static void routing_case(int n, int d, int k) {
    using K = Kernels<T>;
    const std::string s = tag("%s n=%d d=%d k=%d", K::name, n, d, k);
    vec<double> l64, x64;
    const vec<T> logits = randn_t<T>((size_t)n * k, l64, 2.0);
    vec<uint32_t> want_e(n);
    vec<double> want_p(n);
    for (int i = 0; i < n; ++i) {
        const double* row = &l64[(size_t)i * k];
        int arg = 0;
        for (int j = 1; j < k; ++j) if (row[j] > row[arg]) arg = j;
        double den = 0;
        for (int j = 0; j < k; ++j) den += std::exp(row[j] - row[arg]);
        want_e[i] = arg, want_p[i] = 1 / den;
    }
    const Top1 t = top1_logits(logits, n, k);
    exact(s + " top1_logits expert", t.expert, want_e);
    compare(s + " top1_logits probability", t.probs, want_p, 1e-5);
    check(s + " top1_logits status 0", t.status == 0);
    const Top1 tr = top1_logits_reference(logits, n, k);
    exact(s + " top1_logits_reference expert", tr.expert, want_e);
    compare(s + " top1_logits_reference probability", tr.probs, want_p, 1e-5);

    const auto [order, offsets] = host_sort(want_e, k);  // Routing::from_experts (kmeans' sort)
    const vec<T> x = randn_t<T>((size_t)n * d, x64);
    vec<T> want((size_t)n * d);
    for (int j = 0; j < n; ++j) std::copy_n(&x[(size_t)order[j] * d], d, &want[(size_t)j * d]);
    std::string kernel;
    const vec<T> grouped = move_rows(x, order, n, d, false, &kernel);
    exact(s + " dispatch " + kernel, grouped, want);
    exact(s + " dispatch move_bytes_reference", move_rows_reference(x, order, n, d, false), want);
    exact(s + " combine " + kernel + " = x", move_rows(grouped, order, n, d, true), x);
    exact(s + " combine move_bytes_reference = x", move_rows_reference(grouped, order, n, d, true), x);
    // Weighted combine with the gate probabilities: out[order[j]] = w[order[j]] · grouped[j].
    vec<T> want_w((size_t)n * d);
    vec<double> want_w64((size_t)n * d);
    for (int j = 0; j < n; ++j)
        for (int e = 0; e < d; ++e) {
            const size_t o = (size_t)order[j] * d + e;
            want_w[o] = cvt<T>(t.probs[order[j]] * back(grouped[(size_t)j * d + e]));
            want_w64[o] = want_p[order[j]] * x64[o];
        }
    const vec<T> weighted = combine_weighted(grouped, order, t.probs, n, d);
    exact(s + tag(" combine scatter_scaled (%s) vs host f32", d % 4 == 0 ? "4-wide" : "scalar"), weighted, want_w);
    exact(s + " combine scatter_scaled_reference vs host f32", combine_weighted(grouped, order, t.probs, n, d, true), want_w);
    vec<float> wf(weighted.size());
    for (size_t i = 0; i < wf.size(); ++i) wf[i] = back(weighted[i]);
    compare(s + " combine scatter_scaled vs f64", wf, want_w64, K::tol);
}

// Exact ties (lowest index) and non-finite logits.
template <typename T>
static void routing_edges() {
    const std::string s = Kernels<T>::name;
    const int n = 5, k = 40;
    vec<T> l((size_t)n * k, cvt<T>(0.5f));
    // Row 0 all equal → 0; row 1 max at 3 and 35 → 3; row 2 max at 33 (another lane) and 39 → 33;
    // row 3 max only at 39; row 4 -1 everywhere but 31 and 32 → 31.
    l[1 * k + 3] = l[1 * k + 35] = cvt<T>(2.f);
    l[2 * k + 33] = l[2 * k + 39] = cvt<T>(2.f);
    l[3 * k + 39] = cvt<T>(1.f);
    for (int j = 0; j < k; ++j) l[4 * k + j] = cvt<T>(j == 31 || j == 32 ? 3.f : -1.f);
    const vec<uint32_t> want = {0, 3, 33, 39, 31};
    exact(s + " top1_logits ties to the lowest index", top1_logits(l, n, k).expert, want);
    exact(s + " top1_logits_reference ties to the lowest index", top1_logits_reference(l, n, k).expert, want);
    for (float bad : {NAN, INFINITY, -INFINITY}) {
        vec<T> lb = l;
        lb[3 * k + 17] = cvt<T>(bad);
        check(s + tag(" top1_logits status on a %g logit", bad), top1_logits(lb, n, k).status == STATUS_NON_FINITE);
    }
}

// lstsq over segments: G fast vs reference vs f64, on-chip solve vs f64, flags.
static void lstsq_case(const std::string& what, const vec<double>& x64, const vec<double>& y64,
                       const vec<uint32_t>& seg, int n, int r, double ridge, double tol,
                       const vec<uint32_t>& want_flags, bool reference = true) {
    const vec<float> x(x64.begin(), x64.end()), y(y64.begin(), y64.end());
    const int systems = (int)seg.size() - 1;
    const std::string s = tag("lstsq %s S=%d n=%d r=%d ridge=%g", what.c_str(), systems, n, r, ridge);
    const vec<double> g64 = gram64(x64, y64, seg, n, r);
    const vec<float> g = gram(x, y, seg, n, r, false);
    compare(s + " normal_equations_f32", g, g64, 1e-5);
    if (reference) compare(s + " normal_equations_reference_f32", gram(x, y, seg, n, r, true), g64, 1e-5);
    const Solved sol = solve_on_device(g, systems, n, r, ridge);
    if (!sol.on_chip) {
        check(s + " off chip (host Cholesky in cuda.rs)", (size_t)n > CHOLESKY_MAX_N || (size_t)n * (n + r) > CHOLESKY_MAX_FLOATS);
        return;
    }
    exact(s + " cholesky_solve_f32 flags", sol.flags, want_flags);
    const Solved ref = reference ? solve_on_device(g, systems, n, r, ridge, true) : Solved{};
    if (reference) exact(s + " cholesky_solve_reference_f32 flags", ref.flags, want_flags);
    vec<float> got, got_ref;
    vec<double> want;
    for (int b = 0; b < systems; ++b) {
        if (sol.flags[b] != 0) continue;  // the host's f64 path in cuda.rs
        const vec<double> w = solve64(&g64[(size_t)b * n * (n + r)], n, r, ridge);
        want.insert(want.end(), w.begin(), w.end());
        got.insert(got.end(), sol.w.begin() + (size_t)b * n * r, sol.w.begin() + (size_t)(b + 1) * n * r);
        if (reference)
            got_ref.insert(got_ref.end(), ref.w.begin() + (size_t)b * n * r, ref.w.begin() + (size_t)(b + 1) * n * r);
    }
    if (!want.empty()) compare(s + " cholesky_solve_f32 W vs f64", got, want, tol);
    if (!want.empty() && reference) compare(s + " cholesky_solve_reference_f32 W vs f64", got_ref, want, tol);
}

static vec<double> randn64(size_t len) {
    vec<double> v(len);
    for (double& e : v) e = (double)(float)normal();
    return v;
}
static vec<uint32_t> batches(int batch, int m) {
    vec<uint32_t> seg(batch + 1);
    for (int b = 0; b <= batch; ++b) seg[b] = (uint32_t)(b * m);
    return seg;
}

// moe::lstsq: batch systems of m × n with r right-hand sides, plus fast vs reference kernel.
static void batched(int batch, int m, int n, int r, double ridge, double tol, bool reference_solve) {
    const vec<double> x = randn64((size_t)batch * m * n), y = randn64((size_t)batch * m * r);
    const vec<uint32_t> seg = batches(batch, m);
    lstsq_case("batched", x, y, seg, n, r, ridge, tol, vec<uint32_t>(batch, 0));
    if (!reference_solve) return;
    // lstsq_reference: the reference Gram, then the same solve; fast vs reference (1e-4).
    const vec<float> xf(x.begin(), x.end()), yf(y.begin(), y.end());
    const Solved a = solve_on_device(gram(xf, yf, seg, n, r, false), batch, n, r, ridge);
    const Solved b = solve_on_device(gram(xf, yf, seg, n, r, true), batch, n, r, ridge);
    if (!a.on_chip) return;  // the host solves both (its f64 Cholesky is not replayed here)
    compare(tag("lstsq batched S=%d n=%d r=%d ridge=%g fast vs reference kernel", batch, n, r, ridge), a.w,
            vec<double>(b.w.begin(), b.w.end()), 1e-4);
}

static void lstsq_edges() {
    // Column 2 duplicates column 0: rank deficient (flag 1 → the host's min-norm path).
    const int m = 30;
    vec<double> x, y;
    for (int i = 0; i < m; ++i) {
        const double a = (float)normal(), b = (float)normal();
        x.insert(x.end(), {a, b, a});
        y.push_back((float)(2 * a - b + 0.01 * normal()));
    }
    lstsq_case("duplicated column", x, y, batches(1, m), 3, 1, 0.0, 1e-3, {FLAG_RANK_DEFICIENT});
    // Column 2 = column 0 + 1e-5 noise, 16 systems: the last pivot is rounding noise of either
    // sign, far below the relative threshold n·1e-6·max diag, so every system is flagged.
    vec<double> xn, yn;
    for (int i = 0; i < 16 * m; ++i) {
        const double a = (float)normal(), b = (float)normal();
        xn.insert(xn.end(), {a, b, (double)(float)(a + 1e-5 * normal())});
        yn.push_back((float)normal());
    }
    lstsq_case("nearly duplicated column", xn, yn, batches(16, m), 3, 1, 0.0, 1e-3,
               vec<uint32_t>(16, FLAG_RANK_DEFICIENT));
    // Non-finite x: flag 2 (NonFinite in cuda.rs).
    vec<double> xb = x;
    xb[7] = NAN;
    const vec<float> xf(xb.begin(), xb.end()), yf(y.begin(), y.end());
    const Solved nf = solve_on_device(gram(xf, yf, batches(1, m), 3, 1, false), 1, 3, 1, 0.0);
    check("lstsq non-finite x: cholesky_solve_f32 flag 2", (nf.flags[0] & FLAG_NON_FINITE) != 0,
          tag("flags %u", nf.flags[0]).c_str());
    const Solved nf_ref = solve_on_device(gram(xf, yf, batches(1, m), 3, 1, false), 1, 3, 1, 0.0, true);
    check("lstsq non-finite x: cholesky_solve_reference_f32 flag 2", (nf_ref.flags[0] & FLAG_NON_FINITE) != 0,
          tag("flags %u", nf_ref.flags[0]).c_str());
    // grouped_lstsq: tokens routed to experts {0, 1, 3} of 4, segments from the routing's offsets
    // (expert 2 empty: flag 1 with ridge 0, W = 0 with a ridge).
    const int n_tok = 500, n = 5, r = 3, k = 4;
    vec<uint32_t> expert(n_tok);
    for (int i = 0; i < n_tok; ++i) expert[i] = std::array<uint32_t, 3>{0, 1, 3}[i % 3];
    const auto [order, offsets] = host_sort(expert, k);
    const vec<double> xt = randn64((size_t)n_tok * n), yt = randn64((size_t)n_tok * r);
    vec<double> gx((size_t)n_tok * n), gy((size_t)n_tok * r);  // dispatch
    for (int j = 0; j < n_tok; ++j) {
        std::copy_n(&xt[(size_t)order[j] * n], n, &gx[(size_t)j * n]);
        std::copy_n(&yt[(size_t)order[j] * r], r, &gy[(size_t)j * r]);
    }
    lstsq_case("grouped, expert 2 empty", gx, gy, offsets, n, r, 0.0, 1e-3, {0, 0, FLAG_RANK_DEFICIENT, 0});
    lstsq_case("grouped, expert 2 empty", gx, gy, offsets, n, r, 0.1, 1e-3, {0, 0, 0, 0});
}

// ------------------------------------------------------------------ main ----------------------

template <typename T>
static void routing_all(bool quick) {
    if (quick) {
        routing_case<T>(513, 6, 3);
        routing_case<T>(300, 33, 100);
    } else {
        for (auto [n, d, k] : std::vector<std::array<int, 3>>{{1, 1, 1}, {1000, 33, 7}, {4099, 64, 16}, {513, 6, 3},
                                                             {300, 1, 33}, {77, 8, 100}, {200, 12, 2}})
            routing_case<T>(n, d, k);
        // N > 65535 · 8: row_grid caps the grid at 65535 blocks and the warps grid-stride (~40 s).
        if (std::is_same_v<T, __half>) routing_case<T>(600000, 1, 2);
    }
    routing_edges<T>();
}

// `random N [seed]`: N cases drawn at random, each a routing (dtype, tokens, row width, experts)
// and a batched least-squares problem (systems, rows, n, r, ridge; on chip and off), beyond the
// fixed shapes above.
static void run_random(RandomRun run) {
    std::mt19937_64 r(run.seed);
    auto upto = [&](int hi) { return 1 + (int)(r() % hi); };
    for (int i = 0; i < run.cases; ++i) {
        std::printf("-- random case %d of %d (seed %llu)\n", i + 1, run.cases, run.seed);
        const int n = upto(300), d = r() % 2 ? upto(8) : upto(200), k = upto(70);
        switch (r() % 3) {
            case 0: routing_case<float>(n, d, k); break;
            case 1: routing_case<__half>(n, d, k); break;
            default: routing_case<__nv_bfloat16>(n, d, k); break;
        }
        // Well-conditioned systems, so that f32 against f64 measures the kernels and not the
        // conditioning: m ≥ 2n rows without a ridge (a Gaussian X then has κ(XᵀX) below ~40), any
        // m with a ridge of 1. n + r ≤ 256, the staging tile's width (cuda.rs solves wider systems
        // on the host, which is not replayed here).
        const int cols = r() % 3 ? upto(24) : upto(80), rhs = std::min(upto(r() % 4 ? 8 : 200), 256 - cols);
        const double ridge = r() % 2 ? 1.0 : 0.0;
        const int rows = ridge > 0 ? upto(120) : 2 * cols + upto(100);
        batched(upto(4), rows, cols, rhs, ridge, 1e-3, r() % 2);
    }
}

int main(int argc, char** argv) {
    const bool quick = argc > 1 && std::string(argv[1]) == "quick";
    const auto start = std::chrono::steady_clock::now();
    if (const auto run = random_run(argc, argv)) {
        run_random(*run);
        return finish(start);
    }
    routing_all<float>(quick);
    routing_all<__half>(quick);
    routing_all<__nv_bfloat16>(quick);
    if (quick) routing_case<float>(40, 64, 5), routing_case<__half>(9, 1, 2);  // v16 and v2 moves
    batched(quick ? 64 : 1024, 64, 16, 8, 0.0, 1e-3, false);
    batched(quick ? 64 : 1024, 64, 16, 8, 0.01, 1e-3, true);
    batched(3, 64, 16, 4, 0.0, 1e-3, true);
    batched(2, 20, 5, 3, 0.5, 1e-3, true);
    batched(1, 9, 9, 1, 0.0, 1e-3, true);
    lstsq_edges();
    batched(2, 70, 64, 192, 0.1, 1e-3, !quick);  // n + r = 256: the staging tile's full width; off chip
    batched(2, 100, 64, 64, 0.1, 1e-3, !quick);  // n·(n + r) = 8192: on chip at the limit, 2 Gram chunks
    if (!quick) {
        batched(3, 200, 40, 8, 0.0, 1e-3, true);  // 7 staging rounds, tail of 8 rows
        batched(2, 33, 65, 1, 0.1, 1e-3, false);  // n = 65: off chip
        batched(4, 1, 1, 1, 0.0, 1e-3, true);     // one row, one column
    }
    std::vector<std::string> missing;
    for (const char* base : {"top1_logits_", "top1_logits_reference_", "scatter_scaled_", "scatter_scaled_reference_"})
        for (const char* sn : {"f32", "f16", "bf16"})
            if (!g_launched.count(std::string(base) + sn)) missing.push_back(std::string(base) + sn);
    for (const char* name : {"move_rows_v16", "move_rows_v4", "move_rows_v2", "move_bytes_reference",
                             "normal_equations_f32", "normal_equations_reference_f32", "cholesky_solve_f32",
                             "cholesky_solve_reference_f32"})
        if (!g_launched.count(name)) missing.push_back(name);
    std::string m;
    for (auto& s : missing) m += " " + s;
    std::printf("kernels launched: %zu distinct%s%s\n", g_launched.size(), missing.empty() ? "" : "; NOT launched:",
                m.c_str());
    return finish(start);
}
