// scripts/emulate/run.sh kmeans [quick]: runs the K-means kernels of kernels/kmeans.cu under the
// CPU emulation of prelude.h, with the launch sequences, grids, block sizes, dynamic shared
// memory, argument values, workspace sizes and zero-fills of src/ops/kmeans/cuda.rs, and compares
// them with the reference kernels and a float64 reference written here (the loops of
// tests/all/kmeans.rs) at the tolerances of the Rust GPU tests:
//
//   assign        row_sq_norms_* then assign_l2_mma_xres_{f16,bf16} (D ≤ 128),
//                 assign_l2_mma_{f16,bf16} (D > 128), assign_simt_l2_f32 (f32; _f16/_bf16 by
//                 direct launch, see below),
//                 assign_simt_l1_* (mean L1), each vs float64 brute force the way check_assign
//                 does it (the chosen centroid within slack·scale of the best, the distance too;
//                 slack 1e-5 f32, 1e-3 f16/bf16), and assign_reference_* likewise, plus their
//                 label agreement (≥ 99%, as the GPU test asks of GPU vs CPU); over the shapes of
//                 cuda_assign_fast_vs_reference_vs_cpu (D = 1, 3, 7, 12, 24, 40, 64, 128, 130, 136;
//                 K = 1, K = N, N and K off the 128 tiles, several centroid tiles) × metric × dtype
//   ties          cuda_assign_ties_go_to_the_lowest_index: exact labels (lowest index), duplicated
//                 centroids across warps and centroid tiles, all-equal centroids, D = 20 and 144
//   sort          tile_histogram_u32, scan_tiles_u32, scan_offsets_u32, stable_scatter_u32 (the
//                 host's tile_rows rule; also tile_rows = 96 to get many tiles and scan segments
//                 at small N) and counting_sort_reference_u32 vs a host stable sort: exact
//   update        scan_chunks_u32, segment_partials_*, segment_finish_f32 and update_reference_*
//                 vs float64 means (1e-5; skewed clusters with ~90% in one and empty ones: 1e-4),
//                 counts exact; the same bits again under another schedule seed (determinism)
//   fit           the device Lloyd loop (assign, sort, update, reseed_empty_*, shift_inertia_f32,
//                 the final assign) vs a float64 Lloyd mirror from the same start (labels exact,
//                 iterations equal, inertia 1e-3, centroids 1e-4), the exact reseeding cases of
//                 cuda_fit_reseeds_and_matches_cpu, K = N with a reseeded cluster, max_iter = 0;
//                 the same bits again under another schedule seed (fit_is_deterministic)
//   seeding       gather_rows_* vs the rows converted on the host: exact
//   status        non-finite x: every assign kernel, the update and the Lloyd loop set bit 1;
//                 labels ≥ k: the sort sets bit 2 and scatters nothing out of range
//
// `quick` runs a subset that launches every kernel at least once (~2 s after an ~8 s compile);
// the full mode (~15 s) adds the whole matrix and repeats the tensor-core cases with cp.async
// landing at issue. Outputs are poisoned (NaN / 0xffffffff) before every launch and every element
// is checked. Beyond cuda.rs's own launches, three direct ones: assign_simt_l2_{f16,bf16} (the
// (SquaredL2, f16/bf16) rule always picks the tensor cores), the sort with tile_rows = 96 (the
// host's rule gives ≥ 2048; > 2048 needs N·K > 2³⁵), segment_partials with its grid capped at 3
// blocks (cuda.rs caps it at 2²⁰: the grid-stride loop runs only for N > 2³⁰); full mode also
// gathers 600000 rows (gather_rows' grid capped at 65535 blocks, warps grid-striding). The routing of
// kernels/moe.cu (Routing::from_experts) is this file's counting sort.
//
// What it proves: index math, tails and masks, the barrier structure (between two __syncthreads
// the warps run one after another in a random order; EMU_SEED=<n> picks another), the cp.async /
// ldmatrix / mma fragment layouts, shared addresses inside the launched dynamic shared memory,
// reads of unwritten shared memory (poisoned with NaN), the counting sort's ranks, numerics.
// Deliberately broken copies of kernels/kmeans.cu, each caught (quick mode already): in the
// tensor-core kernel a dropped __syncthreads before the cross-warp fold, the ldmatrix B column
// off by 8, the A fragment row off by one, the resident x tile read at k-slice 0, a dropped
// cp.async wait, the resident tile loading 7 of its 8 row groups, padded centroids competing
// (only the 2 × 2 ties case sees it); in the SIMT kernel a dropped end-of-step barrier and the
// tail loads' bound off by one; in the update segment_partials' tail loop off by one, a dropped
// barrier after the partial write, a dropped trailing barrier (seen by the grid-strided case
// only), segment_finish's chunk range off by one; in the sort scan_tiles' prefix including its
// own segment, the scatter's rank mask including the lane, block_exclusive_scan's second barrier
// dropped; reseed_empty searching the same cluster again; shift_inertia summing n − 1 rows; the
// tie rule reversed; assign_reference reading the next row (a fault past the end of x). Not
// caught, and equivalent: the scatter's cursor advanced by the first peer
// instead of the last (exactly one lane adds the same count either way).
// Every buffer a kernel reads or writes is an emu::DeviceVec (prelude.h, "global memory"): an
// access past its end faults and is named with its block, thread and buffer (the SIMT tail mutant
// and three of the sort mutants above die that way; EMU_GUARD=before: accesses before its start).
// What it cannot: timing; interleavings finer than "one warp's whole barrier interval, then
// another's" (EMU_TSAN=1 checks every ordering instead: see run.sh); reads within the 16-byte
// rounding of a buffer's end (writes there are found after the block); bank conflicts,
// registers, spills; the hardware's mma accumulation order. It is not a GPU run.
#include "prelude.h"
#define MK_HOST_EMULATION 1

namespace {
namespace tc {
EMU_DYNAMIC_SHARED(unsigned char, smem);  // tc::assign_l2's `extern __shared__ ... smem[]`
}
}  // namespace
#include "kmeans.cu"
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

enum class Metric { L2, L1 };
static const char* metric_name(Metric m) { return m == Metric::L2 ? "l2" : "l1"; }

using AssignKernel = void (*)(const void*, const void*, const float*, int, int, int, uint32_t*, float*, uint32_t*);
template <typename T> struct Kernels;
#define MK_KERNELS(T, SN, MMA, XRES)                                                                          \
    template <> struct Kernels<T> {                                                                          \
        static constexpr const char* name = #SN;                                                             \
        static constexpr double slack = std::is_same_v<T, float> ? 1e-5 : 1e-3;                              \
        static void norms(const T* x, int rows, int d, float* out) { row_sq_norms_##SN(x, rows, d, out); }   \
        static void simt_l2(const T* x, const T* c, const float* cn, int n, int k, int d, uint32_t* l,      \
                            float* dist, uint32_t* s) { assign_simt_l2_##SN(x, c, cn, n, k, d, l, dist, s); }   \
        static void simt_l1(const T* x, const T* c, const float* cn, int n, int k, int d, uint32_t* l,      \
                            float* dist, uint32_t* s) { assign_simt_l1_##SN(x, c, cn, n, k, d, l, dist, s); }   \
        static void mma(const T* x, const T* c, const float* cn, int n, int k, int d, uint32_t* l, float* dist, \
                        uint32_t* s) { MMA; }                                                                 \
        static void mma_xres(const T* x, const T* c, const float* cn, int n, int k, int d, uint32_t* l,     \
                             float* dist, uint32_t* s) { XRES; }                                              \
        static void reference(const T* x, const T* c, int n, int k, int d, int l1, uint32_t* l, float* dist) { \
            assign_reference_##SN(x, c, n, k, d, l1, l, dist);                                               \
        }                                                                                                    \
        static void partials(const T* x, const uint32_t* o, const uint32_t* off, const uint32_t* cs, int k,  \
                             int d, int chunk, float* p) { segment_partials_##SN(x, o, off, cs, k, d, chunk, p); } \
        static void update_ref(const T* x, const uint32_t* l, int n, int k, int d, float* c, uint32_t* cnt) { \
            update_reference_##SN(x, l, n, k, d, c, cnt);                                                    \
        }                                                                                                    \
        static void gather(const T* x, const uint32_t* ids, int m, int d, float* out) {                      \
            gather_rows_##SN(x, ids, m, d, out);                                                             \
        }                                                                                                    \
        static void reseed(const T* x, int n, int d, int k, const uint32_t* cnt, const float* dist, float* c) { \
            reseed_empty_##SN(x, n, d, k, cnt, dist, c);                                                     \
        }                                                                                                    \
        static void reseed_ref(const T* x, int n, int d, int k, const uint32_t* cnt, const float* dist,      \
                               float* c) {                                                                   \
            reseed_empty_reference_##SN(x, n, d, k, cnt, dist, c);                                           \
        }                                                                                                    \
    };
MK_KERNELS(float, f32, emu_fail("no f32 tensor-core kernel"), emu_fail("no f32 tensor-core kernel"))
MK_KERNELS(__half, f16, assign_l2_mma_f16(x, c, cn, n, k, d, l, dist, s),
           assign_l2_mma_xres_f16(x, c, cn, n, k, d, l, dist, s))
MK_KERNELS(__nv_bfloat16, bf16, assign_l2_mma_bf16(x, c, cn, n, k, d, l, dist, s),
           assign_l2_mma_xres_bf16(x, c, cn, n, k, d, l, dist, s))
#undef MK_KERNELS

// ------------------------------------------------------------------ cuda.rs, mirrored ---------

constexpr int ASSIGN_ROWS = 128;
constexpr unsigned ASSIGN_THREADS = 256;
constexpr int MMA_RESIDENT_MAX_D = 128;
constexpr size_t MMA_SMEM_RESIDENT = 59904, MMA_SMEM_STREAMING = 45568;
constexpr size_t SORT_TILE_ROWS = 2048, MAX_CURSORS = 1 << 24, MAX_TILE_ROWS = 1 << 30;
constexpr size_t SEG_DIMS_RS = 128, SEG_CHUNK_ROWS = 1024, MAX_SEG_BLOCKS = 1 << 20;
constexpr uint32_t POISON_U32 = 0xffffffffu;

static unsigned div_ceil(size_t a, size_t b) { return (unsigned)((a + b - 1) / b); }
static dim3 grid_1d(size_t work, unsigned threads) {  // src/cuda/mod.rs
    return {(unsigned)std::clamp<size_t>((work + threads - 1) / threads, 1, 65535), 1, 1};
}

static std::map<std::string, int> g_launched;  // kernel name → launches (coverage)
static void launch(const std::string& name, dim3 grid, unsigned block, size_t smem, const std::function<void()>& k) {
    ++g_launched[name];
    emu_launch(grid, {block, 1, 1}, smem, k);
}

struct AssignOut { vec<uint32_t> labels; vec<float> dist; };

// assign_raw: ‖c‖² (when needed), then the kernel the (metric, dtype, D) rule picks.
template <typename T>
static AssignOut assign_raw(const vec<T>& x, const vec<T>& c, int n, int k, int d, Metric m,
                            uint32_t* status, std::string* kernel_name = nullptr, bool force_simt = false) {
    using K = Kernels<T>;
    Dev<uint32_t> labels(n, POISON_U32), st(1, *status);
    Dev<float> dists(n, NAN), c_norms(k, NAN);  // dev.alloc: uninitialised
    const Dev<T> xd(x), cd(c);
    const bool half = !std::is_same_v<T, float>;
    std::string kernel;
    size_t smem = 0;
    decltype(&K::simt_l2) fn;
    if (m == Metric::L2 && force_simt) kernel = "assign_simt_l2_", fn = K::simt_l2;  // not cuda.rs's rule
    else if (m == Metric::L2 && half && d <= MMA_RESIDENT_MAX_D) kernel = "assign_l2_mma_xres_", fn = K::mma_xres, smem = MMA_SMEM_RESIDENT;
    else if (m == Metric::L2 && half) kernel = "assign_l2_mma_", fn = K::mma, smem = MMA_SMEM_STREAMING;
    else if (m == Metric::L2) kernel = "assign_simt_l2_", fn = K::simt_l2;
    else kernel = "assign_simt_l1_", fn = K::simt_l1;
    kernel += K::name;
    if (kernel_name) *kernel_name = kernel;
    const T *xs = xd.data(), *cs = cd.data();
    float* cn = c_norms.data();
    uint32_t* sp = st.data();
    if (m == Metric::L2)
        launch(std::string("row_sq_norms_") + K::name, {(unsigned)std::clamp(div_ceil(k, 8), 1u, 65535u), 1, 1}, 256, 0,
               [=] { K::norms(cs, k, d, cn); });
    uint32_t* l = labels.data();
    float* dist = dists.data();
    launch(kernel, {div_ceil(n, ASSIGN_ROWS), 1, 1}, ASSIGN_THREADS, smem,
           [=] { fn(xs, cs, cn, n, k, d, l, dist, sp); });
    *status = st[0];
    return {labels, dists};
}

template <typename T>
static AssignOut assign_reference(const vec<T>& x, const vec<T>& c, int n, int k, int d, Metric m) {
    Dev<uint32_t> labels(n, POISON_U32);
    Dev<float> dists(n, NAN);
    const Dev<T> xd(x), cd(c);
    const T *xs = xd.data(), *cs = cd.data();
    uint32_t* l = labels.data();
    float* dist = dists.data();
    const int l1 = m == Metric::L1;
    launch(std::string("assign_reference_") + Kernels<T>::name, {div_ceil(n, 128), 1, 1}, 128, 0,
           [=] { Kernels<T>::reference(xs, cs, n, k, d, l1, l, dist); });
    return {labels, dists};
}

struct Sorted { vec<uint32_t> order, offsets, counts; };

// counting_sort_raw (tile_rows = 0: the host's rule; else that many rows per sort tile).
static Sorted counting_sort_raw(const vec<uint32_t>& labels, int n, int k, uint32_t* status,
                                size_t tile_rows = 0) {
    if (tile_rows == 0) {
        const size_t per = std::max<size_t>(MAX_CURSORS / k, 1);
        const size_t t = ((n + per - 1) / per + 31) / 32 * 32;
        tile_rows = std::min(std::max(SORT_TILE_ROWS, t), MAX_TILE_ROWS);
    }
    const size_t tiles = std::max<size_t>((n + tile_rows - 1) / tile_rows, 1);
    Dev<uint32_t> cursors(tiles * k, 0);  // alloc_zeros
    Dev<uint32_t> order_d(n, POISON_U32), offsets_d(k + 1, POISON_U32), counts_d(k, POISON_U32), st(1, *status);
    const Dev<uint32_t> labels_d(labels);
    const uint32_t* l = labels_d.data();
    uint32_t *cur = cursors.data(), *counts = counts_d.data(), *off = offsets_d.data(), *order = order_d.data();
    uint32_t* sp = st.data();
    const int ti = (int)tiles, tri = (int)tile_rows;
    launch("tile_histogram_u32", {(unsigned)tiles, 1, 1}, 256, 0, [=] { tile_histogram_u32(l, n, k, tri, cur, sp); });
    launch("scan_tiles_u32", {div_ceil(k, 32), 1, 1}, 256, 0, [=] { scan_tiles_u32(cur, ti, k, counts); });
    launch("scan_offsets_u32", {1, 1, 1}, 1024, 0, [=] { scan_offsets_u32(counts, k, off); });
    launch("stable_scatter_u32", {div_ceil(tiles, 4), 1, 1}, 128, 0,
           [=] { stable_scatter_u32(l, n, k, tri, off, cur, order); });
    *status = st[0];
    return {order_d, offsets_d, counts_d};
}

// counting_sort_reference: one block of one thread, as cuda.rs launches it.
static Sorted counting_sort_reference(const vec<uint32_t>& labels, int n, int k) {
    Dev<uint32_t> order_d(n, POISON_U32), offsets_d(k + 1, POISON_U32);
    const Dev<uint32_t> labels_d(labels);
    const uint32_t* l = labels_d.data();
    uint32_t *off = offsets_d.data(), *order = order_d.data();
    launch("counting_sort_reference_u32", {1, 1, 1}, 1, 0, [=] { counting_sort_reference_u32(l, n, k, off, order); });
    return {order_d, offsets_d, {}};
}

// segment_means_raw.
template <typename T>
static vec<float> segment_means_raw(const vec<T>& x, const vec<uint32_t>& order,
                                            const vec<uint32_t>& offsets, int n, int d, int k,
                                            uint32_t* status, size_t max_blocks = MAX_SEG_BLOCKS) {
    const size_t max_chunks = (n + SEG_CHUNK_ROWS - 1) / SEG_CHUNK_ROWS + std::min(n, k);
    Dev<uint32_t> chunk_start(k + 1, POISON_U32), st(1, *status);
    Dev<float> partial(max_chunks * d, NAN), centroids((size_t)k * d, NAN);
    const Dev<uint32_t> order_d(order), offsets_d(offsets);
    const Dev<T> xd(x);
    const uint32_t *o = order_d.data(), *off = offsets_d.data();
    uint32_t *cs = chunk_start.data(), *sp = st.data();
    float *p = partial.data(), *c = centroids.data();
    const T* xs = xd.data();
    const int chunk = (int)SEG_CHUNK_ROWS;
    launch("scan_chunks_u32", {1, 1, 1}, 1024, 0, [=] { scan_chunks_u32(off, k, chunk, cs); });
    launch(std::string("segment_partials_") + Kernels<T>::name,
           {(unsigned)std::min(max_chunks, max_blocks), div_ceil(d, SEG_DIMS_RS), 1}, 256, 0,
           [=] { Kernels<T>::partials(xs, o, off, cs, k, d, chunk, p); });
    launch("segment_finish_f32", grid_1d((size_t)k * d, 256), 256, 0,
           [=] { segment_finish_f32(p, off, cs, k, d, c, sp); });
    *status = st[0];
    return centroids;
}

struct UpdateOut { vec<float> centroids; vec<uint32_t> counts, order, offsets; uint32_t status; };

// update: the sort with its own status word, the means with another; the public status.
// max_blocks < MAX_SEG_BLOCKS: segment_partials' grid capped lower than cuda.rs does, so that its
// grid-stride loop (chunks > 2²⁰ on the GPU, N > 2³⁰) runs at emulation sizes.
template <typename T>
static UpdateOut update(const vec<T>& x, const vec<uint32_t>& labels, int n, int d, int k,
                        size_t max_blocks = MAX_SEG_BLOCKS) {
    uint32_t sort_status = 0, status = 0;
    Sorted s = counting_sort_raw(labels, n, k, &sort_status);
    vec<float> c = segment_means_raw(x, s.order, s.offsets, n, d, k, &status, max_blocks);
    const uint32_t st = status | sort_status;
    return {std::move(c), std::move(s.counts), std::move(s.order), std::move(s.offsets),
            (st & STATUS_OUT_OF_RANGE) ? STATUS_OUT_OF_RANGE : st};
}

template <typename T>
static std::pair<vec<float>, vec<uint32_t>> update_reference(const vec<T>& x,
                                                                            const vec<uint32_t>& labels,
                                                                            int n, int d, int k) {
    Dev<float> c((size_t)k * d, NAN);
    Dev<uint32_t> counts(k, POISON_U32);
    const Dev<T> xd(x);
    const Dev<uint32_t> labels_d(labels);
    const T* xs = xd.data();
    const uint32_t* l = labels_d.data();
    float* cp = c.data();
    uint32_t* cnt = counts.data();
    launch(std::string("update_reference_") + Kernels<T>::name, {div_ceil((size_t)k * d, 256), 1, 1}, 256, 0,
           [=] { Kernels<T>::update_ref(xs, l, n, k, d, cp, cnt); });
    return {c, counts};
}

struct Fit {
    vec<float> centroids;
    vec<uint32_t> labels;
    vec<double> history;
    double inertia = 0;
    int iterations = 0;
    bool converged = false, non_finite = false;
};

// lloyd: one status word for the whole loop; the only host read per iteration is `stats`.
template <typename T>
static Fit lloyd(const vec<T>& x, int n, int d, int k, Metric m, const vec<float>& c0, int max_iter,
                 double tol, bool reference_helpers = false) {
    Fit f;
    const int l1 = m == Metric::L1;
    vec<float> c = c0;
    uint32_t status = 0;
    Dev<double> stats(3, NAN);
    auto shift_inertia = [&](const vec<float>& old_c, const vec<float>& new_c,
                             const vec<float>& dist) {
        const Dev<float> old_d(old_c), new_d(new_c), dist_d(dist);
        const Dev<uint32_t> status_d(1, status);
        const float *o = old_d.data(), *nc = new_d.data(), *ds = dist_d.data();
        const uint32_t* st = status_d.data();
        double* out = stats.data();
        if (reference_helpers)  // kmeans::reference::fit: one thread
            launch("shift_inertia_reference_f32", {1, 1, 1}, 1, 0,
                   [=] { shift_inertia_reference_f32(o, nc, k, d, l1, ds, n, st, out); });
        else
            launch("shift_inertia_f32", {1, 1, 1}, 1024, 0, [=] { shift_inertia_f32(o, nc, k, d, l1, ds, n, st, out); });
    };
    // assign_raw rounds the f32 centroids to x's dtype first (Tensor::to_dtype).
    auto rounded = [&](const vec<float>& v) {
        vec<T> r(v.size());
        for (size_t i = 0; i < v.size(); ++i) r[i] = cvt<T>(v[i]);
        return r;
    };
    for (int it = 1; it <= max_iter; ++it) {
        AssignOut a = assign_raw(x, rounded(c), n, k, d, m, &status);
        Sorted s = counting_sort_raw(a.labels, n, k, &status);
        vec<float> next = segment_means_raw(x, s.order, s.offsets, n, d, k, &status);
        {
            const Dev<T> xd(x);
            const Dev<uint32_t> counts_d(s.counts);
            const Dev<float> dist_d(a.dist);
            Dev<float> next_d(next);
            const T* xs = xd.data();
            const uint32_t* cnt = counts_d.data();
            const float* ds = dist_d.data();
            float* nx = next_d.data();
            if (reference_helpers)
                launch(std::string("reseed_empty_reference_") + Kernels<T>::name, {1, 1, 1}, 1, 0,
                       [=] { Kernels<T>::reseed_ref(xs, n, d, k, cnt, ds, nx); });
            else
                launch(std::string("reseed_empty_") + Kernels<T>::name, {1, 1, 1}, 1024, 0,
                       [=] { Kernels<T>::reseed(xs, n, d, k, cnt, ds, nx); });
            next = next_d;
        }
        stats.assign(3, NAN);
        shift_inertia(c, next, a.dist);
        if (stats[2] != 0.0) { f.non_finite = true; return f; }
        f.history.push_back(stats[1]);
        c = next;
        f.iterations = it;
        if (stats[0] <= tol) { f.converged = true; break; }
    }
    AssignOut a = assign_raw(x, rounded(c), n, k, d, m, &status);
    stats.assign(3, NAN);
    shift_inertia(c, c, a.dist);
    if (stats[2] != 0.0 || !std::isfinite(stats[1])) { f.non_finite = true; return f; }
    f.centroids = c, f.labels = a.labels, f.inertia = stats[1];
    return f;
}

// ------------------------------------------------------------------ float64 references --------

static std::mt19937_64 g_rng(2026);
static double normal() { return std::normal_distribution<double>(0, 1)(g_rng); }
static double uniform() { return std::uniform_real_distribution<double>(-1, 1)(g_rng); }

// tests/all/kmeans.rs data(): points around k centres (5·N(0,1)) spread by 0.3, or uniform.
static vec<double> data(int n, int d, int k, bool clustered) {
    vec<double> v((size_t)n * d);
    if (!clustered) { for (double& e : v) e = uniform(); return v; }
    vec<double> centres((size_t)k * d);
    for (double& e : centres) e = 5 * normal();
    for (int i = 0; i < n; ++i)
        for (int j = 0; j < d; ++j) v[(size_t)i * d + j] = centres[(size_t)(i % k) * d + j] + 0.3 * normal();
    return v;
}
static vec<double> randn(size_t len) {
    vec<double> v(len);
    for (double& e : v) e = normal();
    return v;
}

// Rounds to T; the f64 copy holds the rounded values exactly.
template <typename T>
static vec<T> to_t(vec<double>& v) {
    vec<T> r(v.size());
    for (size_t i = 0; i < v.size(); ++i) r[i] = cvt<T>((float)v[i]), v[i] = back(r[i]);
    return r;
}

static double dist64(Metric m, const double* a, const double* b, int d) {
    double s = 0;
    for (int e = 0; e < d; ++e) s += m == Metric::L2 ? (a[e] - b[e]) * (a[e] - b[e]) : std::fabs(a[e] - b[e]);
    return m == Metric::L2 ? s : s / d;
}

// check_assign of tests/all/kmeans.rs: the label is within slack·scale of the best centroid and
// the distance matches it (every label in range and every distance written).
static void check_assign(const std::string& what, const vec<double>& x, const vec<double>& c, int n,
                         int d, int k, Metric m, const AssignOut& o, double slack) {
    double c_sq = 0;
    for (double v : c) c_sq += v * v;
    double worst = 0;
    int bad = 0, first = -1;
    for (int i = 0; i < n; ++i) {
        const double* row = &x[(size_t)i * d];
        double best = INFINITY, scale = 1;
        for (int j = 0; j < k; ++j) best = std::min(best, dist64(m, row, &c[(size_t)j * d], d));
        for (int e = 0; e < d; ++e) scale += m == Metric::L2 ? row[e] * row[e] : std::fabs(row[e]) / d;
        if (m == Metric::L2) scale += c_sq / k;
        const uint32_t got = o.labels[i];
        double err = INFINITY;
        if (got < (uint32_t)k && std::isfinite(o.dist[i])) {
            const double at = dist64(m, row, &c[(size_t)got * d], d);
            err = std::max(at - best, std::fabs(o.dist[i] - at)) / (slack * scale);
        }
        worst = std::max(worst, err);
        if (!(err <= 1)) { ++bad; if (first < 0) first = i; }
    }
    char detail[96];
    std::snprintf(detail, sizeof detail, "worst %.2e of slack%s", worst, bad ? " (label out of range or far)" : "");
    if (bad) std::snprintf(detail + std::strlen(detail), sizeof detail - std::strlen(detail), " %d bad, row %d", bad, first);
    record(what, worst, bad == 0, detail);
}

static std::pair<vec<uint32_t>, vec<uint32_t>> host_sort(const vec<uint32_t>& l, int k) {
    vec<uint32_t> off(k + 1, 0), order(l.size());
    for (uint32_t c : l) off[c + 1]++;
    for (int c = 0; c < k; ++c) off[c + 1] += off[c];
    vec<uint32_t> next(off.begin(), off.end() - 1);
    for (size_t i = 0; i < l.size(); ++i) order[next[l[i]]++] = (uint32_t)i;
    return {order, off};
}

static std::pair<vec<double>, vec<uint32_t>> update64(const vec<double>& x,
                                                                     const vec<uint32_t>& l, int d, int k) {
    vec<double> c((size_t)k * d, 0);
    vec<uint32_t> counts(k, 0);
    for (size_t i = 0; i < l.size(); ++i) {
        counts[l[i]]++;
        for (int e = 0; e < d; ++e) c[(size_t)l[i] * d + e] += x[i * d + e];
    }
    for (int j = 0; j < k; ++j)
        for (int e = 0; e < d; ++e) c[(size_t)j * d + e] = counts[j] ? c[(size_t)j * d + e] / counts[j] : 0;
    return {c, counts};
}

// Lloyd in float64 with the device loop's rules: ties to the lowest index, empty clusters take
// the rows in (distance descending, row ascending) order, convergence on the max centroid shift.
struct Fit64 { vec<double> centroids, history; vec<uint32_t> labels; double inertia; int iterations; bool converged; };
template <typename T>
static Fit64 lloyd64(const vec<double>& x, int n, int d, int k, Metric m, const vec<float>& c0,
                     int max_iter, double tol) {
    Fit64 f{vec<double>(c0.begin(), c0.end()), {}, vec<uint32_t>(n), 0, 0, false};
    vec<double> dist(n), cr;
    auto assign = [&] {  // against the centroids rounded to T (and back), as the device does
        cr.resize(f.centroids.size());
        for (size_t i = 0; i < cr.size(); ++i) cr[i] = back(cvt<T>((float)f.centroids[i]));
        double total = 0;
        for (int i = 0; i < n; ++i) {
            double best = INFINITY;
            uint32_t bi = 0;
            for (int j = 0; j < k; ++j) {
                const double v = dist64(m, &x[(size_t)i * d], &cr[(size_t)j * d], d);
                if (v < best) best = v, bi = j;
            }
            f.labels[i] = bi, dist[i] = best, total += best;
        }
        return total;
    };
    for (int it = 1; it <= max_iter; ++it) {
        const double total = assign();
        auto [next, counts] = update64(x, f.labels, d, k);
        vec<int> rows(n);
        for (int i = 0; i < n; ++i) rows[i] = i;
        std::stable_sort(rows.begin(), rows.end(), [&](int a, int b) { return dist[a] > dist[b]; });
        size_t pick = 0;
        for (int j = 0; j < k && pick < rows.size(); ++j)
            if (counts[j] == 0) {
                for (int e = 0; e < d; ++e) next[(size_t)j * d + e] = x[(size_t)rows[pick] * d + e];
                ++pick;
            }
        double shift = 0;
        for (int j = 0; j < k; ++j) shift = std::max(shift, dist64(m, &next[(size_t)j * d], &f.centroids[(size_t)j * d], d));
        f.history.push_back(total);
        f.centroids = next;
        f.iterations = it;
        if (shift <= tol) { f.converged = true; break; }
    }
    f.inertia = assign();
    return f;
}

// ------------------------------------------------------------------ cases ---------------------

// One assign case: fast kernel (and reference kernel) vs float64, as cuda_assign_fast_vs_reference_vs_cpu.
template <typename T>
static void assign_case(int n, int d, int k, Metric m, bool reference = true, bool force_simt = false) {
    using K = Kernels<T>;
    vec<double> x64 = data(n, d, std::min(k, n), true), c64 = randn((size_t)k * d);
    const vec<T> x = to_t<T>(x64), c = to_t<T>(c64);
    uint32_t status = 0;
    std::string kernel;
    const AssignOut fast = assign_raw(x, c, n, k, d, m, &status, &kernel, force_simt);
    const std::string s = tag("assign %s n=%d d=%d k=%d%s", metric_name(m), n, d, k,
                              force_simt ? " (direct launch: cuda.rs never picks it)" : "");
    check_assign(s + " " + kernel, x64, c64, n, d, k, m, fast, K::slack);
    check(s + " status 0", status == 0);
    if (!reference) return;
    const AssignOut ref = assign_reference(x, c, n, k, d, m);
    check_assign(s + " assign_reference_" + K::name, x64, c64, n, d, k, m, ref, K::slack);
    int agree = 0;
    for (int i = 0; i < n; ++i) agree += fast.labels[i] == ref.labels[i];
    check(s + " fast/reference labels agree ≥ 99%", agree >= 0.99 * n, tag("%d/%d", agree, n).c_str());
}

// cuda_assign_ties_go_to_the_lowest_index.
template <typename T>
static void ties_case(Metric m, const vec<int>& dims) {
    const std::string s = tag("ties %s %s", Kernels<T>::name, metric_name(m));
    {
        vec<double> x64 = {0, 0, 2, 2}, c64 = {3, 3, 1, 0, 0, 1, -1, 0, 2, 2};
        uint32_t status = 0;
        const AssignOut o = assign_raw(to_t<T>(x64), to_t<T>(c64), 2, 5, 2, m, &status);
        exact(s + " 2x2 labels", o.labels, {1, 4});
        check(s + " 2x2 dist[1] = 0", o.dist[1] == 0.f);
    }
    for (int d : dims) {
        const int n = 300, k = 300;
        vec<double> cv = randn((size_t)k * d);
        for (int j : {40, 77, 200, 250}) std::copy_n(&cv[10 * d], d, &cv[(size_t)j * d]);
        vec<double> xv((size_t)n * d);
        for (int i = 0; i < n; ++i) std::copy_n(&cv[10 * d], d, &xv[(size_t)i * d]);
        uint32_t status = 0;
        exact(s + tag(" d=%d duplicates", d), assign_raw(to_t<T>(xv), to_t<T>(cv), n, k, d, m, &status).labels,
              vec<uint32_t>(n, 10));
        vec<double> ce((size_t)k * d, 0.25), xr = randn((size_t)n * d);
        const vec<T> cet = to_t<T>(ce), xrt = to_t<T>(xr);
        exact(s + tag(" d=%d all equal", d), assign_raw(xrt, cet, n, k, d, m, &status).labels, vec<uint32_t>(n, 0));
        exact(s + tag(" d=%d all equal (reference kernel)", d), assign_reference(xrt, cet, n, k, d, m).labels,
              vec<uint32_t>(n, 0));
    }
}

// The sort alone (host rule and small tiles) and its reference kernel, vs a host stable sort.
static void sort_case(int n, int k, bool skewed, bool reference) {
    vec<uint32_t> l(n);
    std::uniform_int_distribution<uint32_t> any(0, k - 1), ten(0, 9);
    for (auto& v : l) v = skewed && ten(g_rng) < 9 ? std::min(1, k - 1) : any(g_rng);
    const auto [order, off] = host_sort(l, k);
    const std::string s = tag("sort n=%d k=%d%s", n, k, skewed ? " skewed" : "");
    for (size_t tile_rows : {(size_t)0, (size_t)96}) {
        uint32_t status = 0;
        const Sorted got = counting_sort_raw(l, n, k, &status, tile_rows);
        const std::string t = s + (tile_rows ? " tile_rows=96" : "");
        exact(t + " order", got.order, order);
        exact(t + " offsets", got.offsets, off);
        vec<uint32_t> counts(k);
        for (int c = 0; c < k; ++c) counts[c] = off[c + 1] - off[c];
        exact(t + " counts", got.counts, counts);
        check(t + " status 0", status == 0);
    }
    if (reference) {
        const Sorted r = counting_sort_reference(l, n, k);
        exact(s + " counting_sort_reference order", r.order, order);
        exact(s + " counting_sort_reference offsets", r.offsets, off);
    }
}

// cuda_update_and_fit_match_cpu / cuda_update_skewed_clusters_and_tails: update and the reference
// kernel vs float64, counts exact, the same bits under another schedule.
template <typename T>
static void update_case(int n, int d, int k, bool skewed, double tol, bool reference) {
    vec<double> x64 = randn((size_t)n * d);
    const vec<T> x = to_t<T>(x64);
    vec<uint32_t> l(n);
    std::uniform_int_distribution<uint32_t> any(0, k - 1), ten(0, 9),
        some(0, (uint32_t)std::max(k - 2, 2) - 1);
    for (auto& v : l) v = skewed ? (ten(g_rng) < 9 ? 1 : some(g_rng)) : any(g_rng);
    const auto [c_ref, counts_ref] = update64(x64, l, d, k);
    const std::string s = tag("update %s n=%d d=%d k=%d%s", Kernels<T>::name, n, d, k, skewed ? " skewed" : "");
    const UpdateOut u = update(x, l, n, d, k);
    exact(s + " counts", u.counts, counts_ref);
    compare(s + " centroids", u.centroids, c_ref, tol);
    check(s + " status 0", u.status == 0);
    g_schedule_rng.seed(emu_seed() + 1000 + n);
    const UpdateOut u2 = update(x, l, n, d, k);
    exact(s + " same bits under another schedule", u2.centroids, u.centroids);
    const UpdateOut u3 = update(x, l, n, d, k, 3);
    exact(s + " same bits with segment_partials grid-strided over 3 blocks", u3.centroids, u.centroids);
    if (reference) {
        const auto [cr, cnt] = update_reference(x, l, n, d, k);
        exact(s + " update_reference counts", cnt, counts_ref);
        compare(s + " update_reference centroids", cr, c_ref, tol);
    }
}

// A Lloyd fit from the first k rows (Init::Given) vs the float64 mirror.
template <typename T>
static void fit_case(int n, int d, int k, Metric m, int max_iter, double tol) {
    vec<double> x64 = data(n, d, k, true);
    const vec<T> x = to_t<T>(x64);
    vec<float> c0(x64.begin(), x64.begin() + (size_t)k * d);
    const std::string s = tag("fit %s %s n=%d d=%d k=%d max_iter=%d", Kernels<T>::name, metric_name(m), n, d, k, max_iter);
    const Fit f = lloyd(x, n, d, k, m, c0, max_iter, tol);
    const Fit64 w = lloyd64<T>(x64, n, d, k, m, c0, max_iter, tol);
    check(s + " finite", !f.non_finite);
    if (f.non_finite) return;
    exact(s + " labels", f.labels, w.labels);
    check(s + " iterations", f.iterations == w.iterations && f.converged == w.converged,
          tag("%d/%d vs %d/%d", f.iterations, f.converged, w.iterations, w.converged).c_str());
    compare(s + " inertia", {(float)f.inertia}, {w.inertia}, 1e-3);
    if (f.history.size() == w.history.size())
        compare(s + " inertia history", vec<float>(f.history.begin(), f.history.end()), w.history, 1e-3);
    compare(s + " centroids", f.centroids, w.centroids, 1e-4);
    // fit_is_deterministic: the same bits under another schedule of the warps.
    g_schedule_rng.seed(emu_seed() + 77 + n);
    const Fit f2 = lloyd(x, n, d, k, m, c0, max_iter, tol);
    exact(s + " same centroid bits under another schedule", f2.centroids, f.centroids);
    exact(s + " same labels under another schedule", f2.labels, f.labels);
    exact(s + " same inertia bits under another schedule", vec<double>{f2.inertia}, vec<double>{f.inertia});
    // kmeans::reference::fit: the loop's one-thread reference helpers pick the same rows and stop
    // at the same iteration; the inertia differs only by its f64 sum's order.
    const Fit r = lloyd(x, n, d, k, m, c0, max_iter, tol, true);
    exact(s + " reference helpers: centroids", r.centroids, f.centroids);
    exact(s + " reference helpers: labels", r.labels, f.labels);
    check(s + " reference helpers: iterations", r.iterations == f.iterations && r.converged == f.converged);
    compare(s + " reference helpers: inertia", vec<double>{r.inertia}, vec<double>{f.inertia}, 1e-12);
}

// The exact reseeding cases of cuda_fit_reseeds_and_matches_cpu.
static void reseed_cases() {
    // Each case with the loop's fast helpers and with their one-thread references.
    for (const bool reference : {false, true}) {
        const std::string h = reference ? " (reference helpers)" : "";
        // K = N: every row its own cluster. With rows 0 and 1 equal, they tie on centroid 0,
        // cluster 1 empties and takes the first row in (distance descending, row ascending)
        // order, all distances being 0: row 0.
        {
            const vec<float> x = {0, 0, 1, 1, 5, 5, 7, 7};  // [4, 2]
            Fit f = lloyd(x, 4, 2, 4, Metric::L2, x, 1, 0.0, reference);
            exact("fit K = N centroids" + h, f.centroids, x);
            exact("fit K = N labels" + h, f.labels, {0, 1, 2, 3});
            const vec<float> y = {0, 0, 0, 0, 5, 5, 7, 7};  // rows 0 and 1 equal
            f = lloyd(y, 4, 2, 4, Metric::L1, y, 3, 0.0, reference);
            const Fit64 w = lloyd64<float>(vec<double>(y.begin(), y.end()), 4, 2, 4, Metric::L1, y, 3, 0.0);
            exact("fit K = N equal rows labels vs f64 mirror" + h, f.labels, w.labels);
            exact("fit K = N equal rows centroids vs f64 mirror" + h, f.centroids,
                  vec<float>(w.centroids.begin(), w.centroids.end()));
        }
        const vec<float> x = {0, 1, 2, 10};
        Fit f = lloyd(x, 4, 1, 2, Metric::L2, {0.5f, 100.f}, 1, 0.0, reference);
        exact("fit reseed k=2 centroids" + h, f.centroids, {3.25f, 10.f});
        exact("fit reseed k=2 labels" + h, f.labels, {0, 0, 0, 1});
        f = lloyd(x, 4, 1, 3, Metric::L2, {0.5f, 100.f, 200.f}, 1, 0.0, reference);
        exact("fit reseed k=3 centroids" + h, f.centroids, {3.25f, 10.f, 2.f});
        // Three empty clusters take the three farthest rows, in cluster order; rows 0 and 1 tie
        // (0.25 from 0.5): the lower row, 0.
        f = lloyd(x, 4, 1, 4, Metric::L2, {0.5f, 100.f, 200.f, 300.f}, 1, 0.0, reference);
        exact("fit reseed k=4 centroids" + h, f.centroids, {3.25f, 10.f, 2.f, 0.f});
    }
}

template <typename T>
static void gather_case(int n, int d, int m) {
    vec<double> x64 = randn((size_t)n * d);
    const vec<T> x = to_t<T>(x64);
    vec<uint32_t> ids(m);
    std::uniform_int_distribution<uint32_t> any(0, n - 1);
    for (auto& v : ids) v = any(g_rng);
    Dev<float> out((size_t)m * d, NAN);
    vec<float> want((size_t)m * d);
    for (int r = 0; r < m; ++r)
        for (int e = 0; e < d; ++e) want[(size_t)r * d + e] = (float)x64[(size_t)ids[r] * d + e];
    const Dev<T> xd(x);
    const Dev<uint32_t> ids_d(ids);
    const T* xs = xd.data();
    const uint32_t* id = ids_d.data();
    float* o = out.data();
    launch(std::string("gather_rows_") + Kernels<T>::name, {(unsigned)std::clamp(div_ceil(m, 8), 1u, 65535u), 1, 1}, 256, 0,
           [=] { Kernels<T>::gather(xs, id, m, d, o); });
    exact(tag("gather_rows %s n=%d d=%d m=%d", Kernels<T>::name, n, d, m), out.to_vector(), want);
}

// Non-finite x (every assign kernel, the update, the Lloyd loop) and labels ≥ k.
template <typename T>
static void status_cases() {
    const char* sn = Kernels<T>::name;
    for (int d : {2, 136}) {
        vec<double> x64 = randn((size_t)130 * d), c64 = randn((size_t)3 * d);
        x64[(size_t)129 * d + 1] = NAN;  // in the second row block
        const vec<T> x = to_t<T>(x64), c = to_t<T>(c64);
        for (Metric m : {Metric::L2, Metric::L1}) {
            uint32_t status = 0;
            std::string kernel;
            assign_raw(x, c, 130, 3, d, m, &status, &kernel);
            check(tag("non-finite x d=%d: %s status", d, kernel.c_str()), status == STATUS_NON_FINITE);
        }
        vec<uint32_t> l(130);
        for (int i = 0; i < 130; ++i) l[i] = i % 3;
        check(tag("non-finite x d=%d: update %s status", d, sn), update(x, l, 130, d, 3).status == STATUS_NON_FINITE);
        vec<float> c0(c64.begin(), c64.end());
        check(tag("non-finite x d=%d: lloyd %s flags it", d, sn),
              lloyd(x, 130, d, 3, Metric::L2, c0, 5, 1e-4).non_finite);
    }
    vec<double> x64 = randn(3000 * 4);
    vec<uint32_t> l(3000, 9);
    for (int i = 0; i < 3000; i += 7) l[i] = i % 8;
    const UpdateOut u = update(to_t<T>(x64), l, 3000, 4, 8);
    check(tag("labels >= k: update %s status", sn), u.status == STATUS_OUT_OF_RANGE);
}

// ------------------------------------------------------------------ main ----------------------

static const std::vector<std::array<int, 3>> ASSIGN_SHAPES = {
    {1, 1, 1}, {300, 7, 5}, {1000, 64, 257}, {129, 40, 130}, {64, 8, 64}, {77, 3, 77},
    {260, 12, 1}, {131, 24, 300}, {257, 128, 129}, {200, 136, 150}, {150, 130, 40}};

template <typename T>
static void tensor_core_quick() {
    assign_case<T>(257, 128, 129, Metric::L2, false);  // resident, cp.async, 2 centroid tiles
    assign_case<T>(129, 20, 130, Metric::L2, false);   // resident, register loads
    assign_case<T>(200, 136, 150, Metric::L2, false);  // streaming, cp.async
    assign_case<T>(150, 130, 40, Metric::L2, false);   // streaming, register loads
}

// `random N [seed]`: N cases drawn at random, each an assignment (every dtype, both metrics, N,
// D and K biased to the tile edges: 16-wide mma steps, 64-row and 128-centroid tiles, the
// resident-x limit past D = 128) and an update, beyond the fixed shapes above.
static void run_random(RandomRun run) {
    std::mt19937_64 r(run.seed);
    for (int i = 0; i < run.cases; ++i) {
        const int n = pick_edge(r, {1, 2, 63, 64, 65, 127, 128, 129, 257}, 1, 400);
        const int d = pick_edge(r, {1, 7, 8, 15, 16, 17, 64, 127, 128, 129, 136, 256}, 1, 256);
        const int k = pick_edge(r, {1, 2, 63, 64, 65, 127, 128, 129, 255, 256, 257}, 1, 300);
        const Metric m = r() % 2 ? Metric::L2 : Metric::L1;
        const bool skewed = k > 2 && r() % 2;  // (update_case's skew puts 90% in cluster 1)
        std::printf("-- random case %d of %d (seed %llu)\n", i + 1, run.cases, run.seed);
        switch (r() % 3) {
            case 0: assign_case<float>(n, d, k, m); update_case<float>(n, d, k, skewed, 1e-5, true); break;
            case 1: assign_case<__half>(n, d, k, m); update_case<__half>(n, d, k, skewed, 1e-4, true); break;
            default:
                assign_case<__nv_bfloat16>(n, d, k, m);
                update_case<__nv_bfloat16>(n, d, k, skewed, 1e-4, true);
                break;
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
        assign_case<float>(300, 7, 5, Metric::L2);
        assign_case<float>(131, 24, 300, Metric::L1);
        assign_case<__half>(300, 7, 5, Metric::L1);
        assign_case<__nv_bfloat16>(77, 3, 77, Metric::L2);
        assign_case<__half>(1, 1, 1, Metric::L2);
        tensor_core_quick<__half>();
        tensor_core_quick<__nv_bfloat16>();
        ties_case<__half>(Metric::L2, {20});
        ties_case<float>(Metric::L1, {});
        sort_case(5000, 37, false, false);
        sort_case(300, 40, true, true);
        assign_case<__half>(131, 24, 300, Metric::L2, false, true);
        assign_case<__nv_bfloat16>(300, 7, 5, Metric::L2, false, true);
        update_case<float>(5000, 100, 37, false, 1e-5, true);
        update_case<__nv_bfloat16>(2500, 129, 8, true, 1e-4, true);
        update_case<__half>(3000, 3, 40, true, 1e-4, true);
        reseed_cases();
        fit_case<float>(2000, 10, 6, Metric::L1, 300, 1e-4);
        fit_case<__nv_bfloat16>(2000, 10, 6, Metric::L2, 300, 1e-4);
        fit_case<__half>(500, 136, 5, Metric::L2, 300, 1e-4);
        gather_case<float>(100, 7, 9);
        gather_case<__half>(100, 7, 9);
        gather_case<__nv_bfloat16>(10, 1, 10);
        status_cases<__nv_bfloat16>();
    } else {
        for (const auto& [n, d, k] : ASSIGN_SHAPES)
            for (Metric m : {Metric::L2, Metric::L1}) {
                assign_case<float>(n, d, k, m);
                assign_case<__half>(n, d, k, m);
                assign_case<__nv_bfloat16>(n, d, k, m);
            }
        for (const auto& [n, d, k] : ASSIGN_SHAPES) {  // never picked by cuda.rs: direct launches
            assign_case<__half>(n, d, k, Metric::L2, false, true);
            assign_case<__nv_bfloat16>(n, d, k, Metric::L2, false, true);
        }
        for (Metric m : {Metric::L2, Metric::L1}) {
            ties_case<float>(m, {20, 144});
            ties_case<__half>(m, {20, 144});
            ties_case<__nv_bfloat16>(m, {20, 144});
        }
        for (int k : {1, 2, 40, 100, 300}) sort_case(20001, k, true, k <= 40);
        sort_case(1, 1, false, true);
        sort_case(20001, 3000, false, false);
        sort_case(20001, 5000, true, false);
        update_case<__half>(3000, 5, 2500, false, 1e-5, true);
        update_case<float>(20001, 3, 3000, true, 1e-4, false);
        sort_case(5000, 37, false, true);
        for (auto [n, d, k] : std::vector<std::array<int, 3>>{{5000, 100, 37}, {1, 1, 1}, {77, 3, 77}}) {
            update_case<float>(n, d, k, false, 1e-5, true);
            update_case<__half>(n, d, k, false, 1e-5, true);
            update_case<__nv_bfloat16>(n, d, k, false, 1e-5, true);
        }
        for (auto [n, d, k] : std::vector<std::array<int, 3>>{{60000, 260, 9}, {20001, 3, 40}, {5, 129, 8}, {70000, 1, 2}, {40000, 8, 100}}) {
            update_case<float>(n, d, k, true, 1e-4, n * d <= 400000);
            update_case<__nv_bfloat16>(n, d, k, true, 1e-4, false);
        }
        reseed_cases();
        fit_case<float>(3000, 16, 8, Metric::L2, 300, 1e-4);
        fit_case<float>(2000, 10, 6, Metric::L1, 300, 1e-4);
        fit_case<__nv_bfloat16>(2000, 10, 6, Metric::L2, 300, 1e-4);
        fit_case<__half>(2000, 10, 6, Metric::L1, 300, 1e-4);
        fit_case<__half>(500, 136, 5, Metric::L2, 300, 1e-4);
        fit_case<float>(2000, 10, 6, Metric::L2, 0, 1e-4);
        gather_case<float>(100, 7, 9);
        gather_case<__half>(1000, 40, 300);
        gather_case<__nv_bfloat16>(10, 1, 10);
        gather_case<float>(1000, 1, 600000);  // > 65535 · 8 rows: the grid cap, warps grid-stride
        status_cases<float>();
        status_cases<__half>();
        status_cases<__nv_bfloat16>();
        g_cp_async_eager = true;
        std::printf("-- the tensor-core cases again with cp.async copies landing at issue (EMU_CP_ASYNC=eager)\n");
        tensor_core_quick<__half>();
        tensor_core_quick<__nv_bfloat16>();
        ties_case<__nv_bfloat16>(Metric::L2, {20, 144});
    }
    // Coverage: every __global__ of kernels/kmeans.cu launched at least once.
    static const char* all[] = {"row_sq_norms_", "assign_simt_l2_", "assign_simt_l1_", "assign_reference_",
                                "segment_partials_", "update_reference_", "gather_rows_", "reseed_empty_",
                                "reseed_empty_reference_"};
    std::vector<std::string> missing;
    for (const char* base : all)
        for (const char* sn : {"f32", "f16", "bf16"})
            if (!g_launched.count(std::string(base) + sn)) missing.push_back(std::string(base) + sn);
    for (const char* name : {"assign_l2_mma_f16", "assign_l2_mma_bf16", "assign_l2_mma_xres_f16",
                             "assign_l2_mma_xres_bf16", "tile_histogram_u32", "counting_sort_reference_u32",
                             "scan_tiles_u32", "scan_offsets_u32", "scan_chunks_u32", "segment_finish_f32",
                             "stable_scatter_u32", "shift_inertia_f32", "shift_inertia_reference_f32"})
        if (!g_launched.count(name)) missing.push_back(name);
    std::string m;
    for (auto& s : missing) m += " " + s;
    std::printf("kernels launched: %zu distinct%s%s\n", g_launched.size(), missing.empty() ? "" : "; NOT launched:",
                m.c_str());
    return finish(start);
}
