// K-means kernels: nearest-centroid assignment, a stable counting sort by cluster, the
// deterministic centroid update, and the two small kernels that keep Lloyd's loop on the device.
//
// Assignment (the hot part, 2·N·K·D flops) is a tiled GEMM with the argmin fused into the
// epilogue, so the N×K distance matrix never reaches memory. A block owns BM = 128 rows of x and
// sweeps every centroid tile; for each tile it accumulates x·c (or Σ|x−c|), turns it into
// ‖c‖² − 2x·c (‖x‖² is added once at the end: it does not change the argmin), and folds the tile
// into a running (value, index) minimum per row. Ties go to the lowest index: every comparison
// is lexicographic on (value, index).
//   - assign_l2_mma_{xres_,}{f16,bf16}: tensor cores (mma.sync m16n8k16, f32 accumulate),
//     8 warps, 128×128×32 tiles, two shared-memory stages filled by cp.async (the next stage's
//     copy overlaps this stage's mma), fragments loaded with ldmatrix; two blocks per SM. For
//     D ≤ 128 (xres) x's tile stays in shared memory across all centroid tiles and only the
//     centroids stream; beyond, both stream.
//   - assign_simt_{l2,l1}_{f32,f16,bf16}: exact f32 FFMA (no TF32), 256 threads, 128×128×8 tiles,
//     8×8 outputs per thread, two shared buffers with a register prefetch; the only path for
//     mean-L1, which has no GEMM form.
//   - assign_reference_*: one thread per row, the distance written out directly.
// Update: counting sort (tile histogram → per-tile prefix → cluster offsets → stable scatter with
// __match_any_sync ranks), then segmented sums over fixed chunks of each cluster's sorted rows
// (a large cluster spreads over many blocks) and a second pass adding each cluster's chunk sums
// in order: bitwise reproducible, no float atomics.
// update_reference_* is the O(N·K·D) direct version for tests.
// The Lloyd loop's helpers, one block each: reseed_empty_* (empty clusters take the farthest
// rows) and shift_inertia_f32 (the convergence statistics); their one-thread references
// reseed_empty_reference_* and shift_inertia_reference_f32 run in kmeans::reference::fit.
#include "tensor_core.cuh"

#include <type_traits>

namespace {

constexpr uint32_t STATUS_NON_FINITE = 1u;
constexpr uint32_t STATUS_OUT_OF_RANGE = 2u;

__device__ __forceinline__ bool better_min(float v, uint32_t i, float bv, uint32_t bi) {
    return v < bv || (v == bv && i < bi);
}

__device__ __forceinline__ bool finite(float v) { return isfinite(v); }

// Folds the (value, index) minimum across the `width` lanes that differ in the low bits.
__device__ __forceinline__ void shfl_argmin(float& v, uint32_t& i, int lanes) {
#pragma unroll
    for (int off = 1; off < lanes; off <<= 1) {
        const float ov = __shfl_xor_sync(mk::FULL_MASK, v, off);
        const uint32_t oi = __shfl_xor_sync(mk::FULL_MASK, i, off);
        if (better_min(ov, oi, v, i)) { v = ov; i = oi; }
    }
}

// ------------------------------------------------------------------ row norms -------------
template <typename T>
__device__ void row_sq_norms(const T* __restrict__ x, int rows, int d, float* __restrict__ out) {
    const int lane = threadIdx.x & 31;
    const int warps_per_block = blockDim.x >> 5;
    for (int r = blockIdx.x * warps_per_block + (threadIdx.x >> 5); r < rows; r += gridDim.x * warps_per_block) {
        const T* p = x + (size_t)r * d;
        float s = 0.f;
        for (int j = lane; j < d; j += 32) {
            const float v = mk::to_float(p[j]);
            s = fmaf(v, v, s);
        }
        s = mk::warp_sum(s);
        if (lane == 0) out[r] = s;
    }
}

// ------------------------------------------------------------------ SIMT assign -----------
namespace simt {
constexpr int BM = 128, BN = 128, BK = 8, THREADS = 256, PAD = 4;

// Loads 4 consecutive elements (row r, dims k..k+3) as floats, zero outside the matrix.
template <typename T>
__device__ __forceinline__ void load4(const T* __restrict__ m, int rows, int d, int r, int k, bool vec_ok,
                                      float out[4]) {
    if (r < rows && vec_ok && k + 4 <= d) {
        const mk::Vec<T, 4> v = mk::load_vec<T, 4>(m + (size_t)r * d + k);
#pragma unroll
        for (int e = 0; e < 4; ++e) out[e] = mk::to_float(v.v[e]);
    } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) out[e] = (r < rows && k + e < d) ? mk::to_float(m[(size_t)r * d + k + e]) : 0.f;
    }
}

// L1 = false: accumulates x·c and scores ‖c‖² − 2x·c. L1 = true: accumulates Σ|x − c|, scores /d.
// Steps run over (centroid tile, k-slice) like the tensor-core kernel's. Two shared buffers and a
// register prefetch: the global loads of step + 1 are issued before step's FMAs and stored to the
// other buffer after them; the barrier that closes step − 1 makes that store safe.
template <typename T, bool L1>
__device__ void assign(const T* __restrict__ x, const T* __restrict__ c, const float* __restrict__ c_norms, int n,
                       int k, int d, uint32_t* __restrict__ labels, float* __restrict__ dist,
                       uint32_t* __restrict__ status) {
    __shared__ __align__(16) float As[2][BK][BM + PAD];
    __shared__ __align__(16) float Bs[2][BK][BN + PAD];
    __shared__ float x_norm[BM];
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int row0 = blockIdx.x * BM;
    const bool vec_ok = (d & 3) == 0;
    const int k_steps = (d + BK - 1) / BK, c_tiles = (k + BN - 1) / BN, steps = k_steps * c_tiles;
    // Loader role: row tid/2 of the tile, dims (tid&1)*4 .. +3 of the k-slice.
    const int load_row = tid >> 1, load_k = (tid & 1) * 4;

    float best_v[8];
    uint32_t best_i[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) { best_v[i] = INFINITY; best_i[i] = 0xffffffffu; }
    float xn_part = 0.f;
    bool bad = false;
    float acc[8][8];
    float pa[4], pb[4];

    auto fetch = [&](int step) {
        const int ct = step / k_steps, k0 = (step % k_steps) * BK;
        load4(x, n, d, row0 + load_row, k0 + load_k, vec_ok, pa);
        load4(c, k, d, ct * BN + load_row, k0 + load_k, vec_ok, pb);
        if (!L1 && ct == 0) {
#pragma unroll
            for (int e = 0; e < 4; ++e) xn_part = fmaf(pa[e], pa[e], xn_part);
        }
    };
    auto stash = [&](int buf) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            As[buf][load_k + e][load_row] = pa[e];
            Bs[buf][load_k + e][load_row] = pb[e];
        }
    };
    auto zero_acc = [&]() {
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
    };

    zero_acc();
    fetch(0);
    stash(0);
    __syncthreads();
    for (int step = 0; step < steps; ++step) {
        const int buf = step & 1;
        const bool more = step + 1 < steps;
        if (more) fetch(step + 1);
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            const float4 a0 = *reinterpret_cast<const float4*>(&As[buf][kk][ty * 4]);
            const float4 a1 = *reinterpret_cast<const float4*>(&As[buf][kk][64 + ty * 4]);
            const float4 b0 = *reinterpret_cast<const float4*>(&Bs[buf][kk][tx * 4]);
            const float4 b1 = *reinterpret_cast<const float4*>(&Bs[buf][kk][64 + tx * 4]);
            const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    if (L1) acc[i][j] += fabsf(av[i] - bv[j]);
                    else acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
                }
        }
        if (more) stash(buf ^ 1);
        if (step % k_steps == k_steps - 1) {
            // Epilogue of this centroid tile (rows ty·4 + i and 64 + ty·4 + i − 4, columns alike).
            const int c0 = (step / k_steps) * BN;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const int col = c0 + (j < 4 ? tx * 4 + j : 64 + tx * 4 + (j - 4));
                if (col >= k) continue;  // padded centroids never compete
                const float cn = L1 ? 0.f : c_norms[col];
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    const float v = L1 ? acc[i][j] / (float)d : fmaf(-2.f, acc[i][j], cn);
                    bad |= !finite(v);
                    if (better_min(v, (uint32_t)col, best_v[i], best_i[i])) { best_v[i] = v; best_i[i] = col; }
                }
            }
            zero_acc();
        }
        __syncthreads();
    }
    if (!L1) {
        const float xn = xn_part + __shfl_xor_sync(mk::FULL_MASK, xn_part, 1);
        if ((tid & 1) == 0) x_norm[load_row] = xn;
    }
    __syncthreads();
    // The 16 threads of a row group are 16 consecutive lanes: fold them, lowest index on ties.
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        shfl_argmin(best_v[i], best_i[i], 16);
        const int r = i < 4 ? ty * 4 + i : 64 + ty * 4 + (i - 4);
        if (tx == 0 && row0 + r < n) {
            float out = L1 ? best_v[i] : fmaxf(x_norm[r] + best_v[i], 0.f);
            if (!finite(out)) bad = true;
            labels[row0 + r] = best_i[i];
            dist[row0 + r] = out;
        }
    }
    if (bad) atomicOr(status, STATUS_NON_FINITE);
}
}  // namespace simt

// ------------------------------------------------------------------ tensor-core assign ----
namespace tc {
// 8 warps as 2 (rows) × 4 (centroids), each owning a 64 × 32 tile of scores: 4 × 4 mma tiles.
// Shared rows are padded to LDS = 40 halfs (80 bytes): the 8 row addresses of every ldmatrix
// phase and every 16-byte cp.async store then fall on distinct bank quads.
constexpr int BM = 128, BN = 128, BK = 32, THREADS = 256, LDS = BK + 8;

using mk::cp_async_16;
using mk::cp_async_commit;
using mk::cp_async_wait_all;
using mk::ldmatrix_x4;
using mk::mma_16816;

// 8 consecutive halfs of row r from dim k, zero outside the matrix (the path for D % 8 ≠ 0,
// where rows are not 16-byte aligned).
template <typename T>
__device__ __forceinline__ uint4 load8(const T* __restrict__ m, int rows, int d, int r, int k) {
    uint4 out = make_uint4(0, 0, 0, 0);
    if (r >= rows) return out;
    const T* p = m + (size_t)r * d + k;
    T tmp[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) tmp[e] = (k + e < d) ? p[e] : mk::from_float<T>(0.f);
    memcpy(&out, tmp, 16);
    return out;
}

// One 16-byte chunk (row r, dims k..k+7) of a tile into shared memory: cp.async when rows are
// 16-byte aligned (D % 8 == 0; a chunk is then wholly inside or wholly outside the matrix),
// else through registers.
template <typename T>
__device__ __forceinline__ void load_chunk(T* dst, const T* __restrict__ m, int rows, int d, int r, int k,
                                           bool async_ok) {
    if (async_ok) {
        const bool inside = r < rows && k < d;
        cp_async_16(dst, inside ? m + (size_t)r * d + k : m, inside ? 16 : 0);
    } else {
        *reinterpret_cast<uint4*>(dst) = load8(m, rows, d, r, k);
    }
}

__device__ __forceinline__ float sq_sum8(uint4 v, __half) {
    const __half2* h = reinterpret_cast<const __half2*>(&v);
    float s = 0.f;
#pragma unroll
    for (int e = 0; e < 4; ++e) { const float2 f = __half22float2(h[e]); s = fmaf(f.x, f.x, fmaf(f.y, f.y, s)); }
    return s;
}
__device__ __forceinline__ float sq_sum8(uint4 v, __nv_bfloat16) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
    float s = 0.f;
#pragma unroll
    for (int e = 0; e < 4; ++e) { const float2 f = __bfloat1622float2(h[e]); s = fmaf(f.x, f.x, fmaf(f.y, f.y, s)); }
    return s;
}

// Dynamic shared memory of assign_l2 (bytes, each piece a multiple of 16): x's tile (all of it
// when RESIDENT, else two k-slices), two k-slices of centroids, ‖x‖², and the cross-warp fold.
constexpr int DMAX_RESIDENT = 128, LDS_RESIDENT = DMAX_RESIDENT + 8;  // 272-byte rows: no bank conflicts
template <bool RESIDENT>
constexpr int a_tile_bytes() {
    return RESIDENT ? BM * LDS_RESIDENT * 2 : 2 * BM * LDS * 2;
}
constexpr int B_TILE_BYTES = 2 * BN * LDS * 2, EPILOGUE_BYTES = BM * 4 + 2 * 4 * BM * 4;
template <bool RESIDENT>
constexpr int smem_bytes() {
    return a_tile_bytes<RESIDENT>() + B_TILE_BYTES + EPILOGUE_BYTES;
}

// Steps run over (centroid tile ct, k-slice): step = ct · k_steps + slice. Two shared buffers
// for the centroids (and for x unless RESIDENT): the copy of step + 1 is issued right after the
// barrier that opens step, so it overlaps the mma of step; that barrier is also what makes
// refilling buf ^ 1 safe (every warp has finished reading it in step − 1). One barrier per step.
// RESIDENT (D ≤ 128): x's 128 × D tile is loaded once, with step 0, and stays in shared memory
// for every centroid tile, halving the L2 traffic (only centroids stream).
// The index math of the loader, the ldmatrix addresses, the mma fragments and the epilogue is
// checked against a plain matmul + argmin by scripts/compare/kmeans_fragment_check.py.
template <typename T, bool RESIDENT>
__device__ void assign_l2(const T* __restrict__ x, const T* __restrict__ c, const float* __restrict__ c_norms, int n,
                          int k, int d, uint32_t* __restrict__ labels, float* __restrict__ dist,
                          uint32_t* __restrict__ status) {
    extern __shared__ __align__(16) unsigned char smem[];
    T* const As = reinterpret_cast<T*>(smem);  // RESIDENT: [BM][LDS_RESIDENT], else [2][BM][LDS]
    T* const Bs = reinterpret_cast<T*>(smem + a_tile_bytes<RESIDENT>());  // [2][BN][LDS]
    float* const x_norm = reinterpret_cast<float*>(smem + a_tile_bytes<RESIDENT>() + B_TILE_BYTES);  // [BM]
    float* const red_v = x_norm + BM;                                       // [4][BM]
    uint32_t* const red_i = reinterpret_cast<uint32_t*>(red_v + 4 * BM);    // [4][BM]

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int warp_m = warp >> 2, warp_n = warp & 3;
    const int g = lane >> 2, tig = lane & 3;
    const int row0 = blockIdx.x * BM;
    const bool async_ok = (d & 7) == 0;
    const int k_steps = (d + BK - 1) / BK, c_tiles = (k + BN - 1) / BN, steps = k_steps * c_tiles;
    // Loader role per k-slice: 16-byte chunks q = tid and tid + 256 → row q/4, dims (q%4)*8.
    const int ld_row[2] = {tid >> 2, (tid + THREADS) >> 2};
    const int ld_col = (tid & 3) * 8;
    // ldmatrix roles. A (x rows, m16 × k16): lanes 0-15 give rows 0-15 at k 0, lanes 16-31 the
    // same rows at k 8 → a[0..3] in mma order. B (centroid rows, two n8 tiles × k16): lane l
    // gives row (l / 16)·8 + l % 8 at k ((l / 8) % 2)·8 → {b0, b1} of tile 2p, then of 2p + 1.
    const int a_row = warp_m * 64 + (lane & 15), a_col = (lane >> 4) * 8;
    const int b_row = warp_n * 32 + (lane >> 4) * 8 + (lane & 7), b_col = ((lane >> 3) & 1) * 8;

    float acc[4][4][4];
    float best_v[8];
    uint32_t best_i[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) { best_v[i] = INFINITY; best_i[i] = 0xffffffffu; }
    float xn_part[2] = {0.f, 0.f};
    bool bad = false;

    // Copies of step's slices into buffer buf (x's only when it is not resident), as one group.
    auto issue = [&](int step, int buf) {
        const int ct = step / k_steps, k0 = (step % k_steps) * BK;
        if (!RESIDENT) {
#pragma unroll
            for (int s = 0; s < 2; ++s)
                load_chunk(As + (buf * BM + ld_row[s]) * LDS + ld_col, x, n, d, row0 + ld_row[s], k0 + ld_col,
                           async_ok);
        }
#pragma unroll
        for (int s = 0; s < 2; ++s)
            load_chunk(Bs + (buf * BN + ld_row[s]) * LDS + ld_col, c, k, d, ct * BN + ld_row[s], k0 + ld_col,
                       async_ok);
        cp_async_commit();
    };
    auto zero_acc = [&]() {
#pragma unroll
        for (int mt = 0; mt < 4; ++mt)
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
    };

    zero_acc();
    if (RESIDENT) {
        // x's whole 128 × 128 tile (zeros past D and past N), in step 0's group: chunk
        // q = tid + 256·s → row q / 16, dims (q % 16)·8.
#pragma unroll
        for (int s = 0; s < 8; ++s) {
            const int q = tid + s * THREADS, r = q >> 4, col = (q & 15) * 8;
            load_chunk(As + r * LDS_RESIDENT + col, x, n, d, row0 + r, col, async_ok);
        }
    }
    issue(0, 0);
    for (int step = 0; step < steps; ++step) {
        const int buf = step & 1;
        // x's tile for this step: element (row, kk of the k-slice) is A[row · a_ld + kk].
        const T* const A = RESIDENT ? As + (step % k_steps) * BK : As + buf * BM * LDS;
        constexpr int a_ld = RESIDENT ? LDS_RESIDENT : LDS;
        cp_async_wait_all();
        __syncthreads();  // step's tiles are in shared memory; nobody still reads buf ^ 1
        if (step + 1 < steps) issue(step + 1, buf ^ 1);
        if (!RESIDENT && step < k_steps) {
            // First centroid tile: ‖x‖² from the chunks this thread loaded (zeros outside x).
#pragma unroll
            for (int s = 0; s < 2; ++s)
                xn_part[s] += sq_sum8(*reinterpret_cast<const uint4*>(A + ld_row[s] * a_ld + ld_col), T());
        }
#pragma unroll
        for (int ks = 0; ks < BK; ks += 16) {
            uint32_t a[4][4], b[4][2];
#pragma unroll
            for (int mt = 0; mt < 4; ++mt) ldmatrix_x4(a[mt], A + (a_row + mt * 16) * a_ld + ks + a_col);
#pragma unroll
            for (int p = 0; p < 2; ++p) {
                uint32_t r[4];
                ldmatrix_x4(r, Bs + (buf * BN + b_row + p * 16) * LDS + ks + b_col);
                b[2 * p][0] = r[0];
                b[2 * p][1] = r[1];
                b[2 * p + 1][0] = r[2];
                b[2 * p + 1][1] = r[3];
            }
#pragma unroll
            for (int mt = 0; mt < 4; ++mt)
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) mma_16816<T>(acc[mt][nt], a[mt], b[nt][0], b[nt][1]);
        }
        if (step % k_steps == k_steps - 1) {
            // Epilogue of centroid tile ct: fold its scores into the running minimum.
            // acc[mt][nt][h·2 + e] is row warp_m·64 + mt·16 + h·8 + g, column nt·8 + tig·2 + e.
            const int c0 = (step / k_steps) * BN;
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int col = c0 + warp_n * 32 + nt * 8 + tig * 2 + e;
                    if (col >= k) continue;  // padded centroids never compete
                    const float cn = c_norms[col];
#pragma unroll
                    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            const float v = fmaf(-2.f, acc[mt][nt][h * 2 + e], cn);
                            bad |= !finite(v);
                            const int slot = mt * 2 + h;
                            if (better_min(v, (uint32_t)col, best_v[slot], best_i[slot])) {
                                best_v[slot] = v;
                                best_i[slot] = col;
                            }
                        }
                }
            zero_acc();
        }
    }
    if (RESIDENT) {
        // ‖x‖² from the resident tile (zeros past D; it landed before step 0's barrier and is
        // never overwritten): two threads per row, alternate 16-byte pieces each.
        static_assert(THREADS == 2 * BM, "two threads per row");
        const int r = tid / 2, half = tid % 2;
        float v = 0.f;
        for (int e = 8 * half; e < k_steps * BK; e += 16)
            v += sq_sum8(*reinterpret_cast<const uint4*>(As + r * LDS_RESIDENT + e), T());
        v += __shfl_xor_sync(mk::FULL_MASK, v, 1);
        if (half == 0) x_norm[r] = v;
    } else {
        // ‖x‖²: the four loader threads of a row are four consecutive lanes.
#pragma unroll
        for (int s = 0; s < 2; ++s) {
            float v = xn_part[s];
            v += __shfl_xor_sync(mk::FULL_MASK, v, 1);
            v += __shfl_xor_sync(mk::FULL_MASK, v, 2);
            if ((tid & 3) == 0) x_norm[ld_row[s]] = v;
        }
    }
    // Across the quad (same rows, different columns), then across the 4 column warps.
#pragma unroll
    for (int slot = 0; slot < 8; ++slot) {
        shfl_argmin(best_v[slot], best_i[slot], 4);
        if (tig == 0) {
            const int r = warp_m * 64 + (slot >> 1) * 16 + (slot & 1) * 8 + g;
            red_v[warp_n * BM + r] = best_v[slot];
            red_i[warp_n * BM + r] = best_i[slot];
        }
    }
    __syncthreads();
    if (tid < BM && row0 + tid < n) {
        float v = red_v[tid];
        uint32_t i = red_i[tid];
#pragma unroll
        for (int w = 1; w < 4; ++w)
            if (better_min(red_v[w * BM + tid], red_i[w * BM + tid], v, i)) {
                v = red_v[w * BM + tid];
                i = red_i[w * BM + tid];
            }
        const float out = fmaxf(x_norm[tid] + v, 0.f);
        bad |= !finite(out);
        labels[row0 + tid] = i;
        dist[row0 + tid] = out;
    }
    if (bad) atomicOr(status, STATUS_NON_FINITE);
}
}  // namespace tc

// ------------------------------------------------------------------ reference assign ------
template <typename T>
__device__ void assign_reference(const T* __restrict__ x, const T* __restrict__ c, int n, int k, int d, int l1,
                                 uint32_t* __restrict__ labels, float* __restrict__ dist) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= n) return;
    float best = INFINITY;
    uint32_t bi = 0;
    for (int j = 0; j < k; ++j) {
        float s = 0.f;
        for (int e = 0; e < d; ++e) {
            const float t = mk::to_float(x[(size_t)r * d + e]) - mk::to_float(c[(size_t)j * d + e]);
            s += l1 ? fabsf(t) : t * t;
        }
        if (l1) s /= (float)d;
        if (s < best) { best = s; bi = j; }
    }
    labels[r] = bi;
    dist[r] = best;
}

// ------------------------------------------------------------------ counting sort ---------
// Rows per sort tile (`tile`, a multiple of 32) is chosen by the host so that tiles × K cursors
// stay small; 2048 unless K is huge.

// tile_counts[tile][c] += 1 for every row of the tile with label c (integer atomics: exact).
__device__ void tile_histogram(const uint32_t* __restrict__ labels, int n, int k, int tile_rows,
                               uint32_t* __restrict__ tile_counts, uint32_t* __restrict__ status) {
    const int tile = blockIdx.x;
    const int begin = tile * tile_rows;  // < n: the host launches ⌈n / tile_rows⌉ tiles
    const int end = (int)min((long long)n, (long long)begin + tile_rows);
    bool bad = false;
    for (int i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const uint32_t c = labels[i];
        if (c >= (uint32_t)k) bad = true;
        else atomicAdd(&tile_counts[(size_t)tile * k + c], 1u);
    }
    if (bad) atomicOr(status, STATUS_OUT_OF_RANGE);
}

// Per cluster: exclusive prefix of its count over the tiles, in place; the total goes to
// counts[c]. A block takes 32 clusters (one per lane: each tile row is one coalesced 128-byte
// read) and splits the tiles into SCAN_SEGMENTS contiguous segments, one per warp: pass 1 sums
// each segment, the segment offsets come from shared memory, pass 2 rewrites the counts as
// running prefixes. Eight loads in flight per batch (the loops are latency-bound).
constexpr int SCAN_SEGMENTS = 8, SCAN_BATCH = 8;
__device__ void scan_tiles(uint32_t* __restrict__ tile_counts, int tiles, int k, uint32_t* __restrict__ counts) {
    __shared__ uint32_t seg_sum[SCAN_SEGMENTS][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int c = blockIdx.x * 32 + lane;
    const int per = (tiles + SCAN_SEGMENTS - 1) / SCAN_SEGMENTS;
    const int t_begin = min(tiles, warp * per), t_end = min(tiles, t_begin + per);
    auto at = [&](int t) -> uint32_t* { return tile_counts + (size_t)t * k + c; };
    uint32_t local = 0;
    if (c < k) {
        for (int t0 = t_begin; t0 < t_end; t0 += SCAN_BATCH) {
            uint32_t v[SCAN_BATCH];
#pragma unroll
            for (int q = 0; q < SCAN_BATCH; ++q) v[q] = t0 + q < t_end ? *at(t0 + q) : 0u;
#pragma unroll
            for (int q = 0; q < SCAN_BATCH; ++q) local += v[q];
        }
    }
    seg_sum[warp][lane] = local;
    __syncthreads();
    uint32_t running = 0, total = 0;
#pragma unroll
    for (int w = 0; w < SCAN_SEGMENTS; ++w) {
        if (w < warp) running += seg_sum[w][lane];
        total += seg_sum[w][lane];
    }
    if (c >= k) return;  // after the only barrier
    for (int t0 = t_begin; t0 < t_end; t0 += SCAN_BATCH) {
        uint32_t v[SCAN_BATCH];
#pragma unroll
        for (int q = 0; q < SCAN_BATCH; ++q) v[q] = t0 + q < t_end ? *at(t0 + q) : 0u;
#pragma unroll
        for (int q = 0; q < SCAN_BATCH; ++q) {
            if (t0 + q < t_end) *at(t0 + q) = running;
            running += v[q];
        }
    }
    if (warp == 0) counts[c] = total;
}

// out[0..k] = exclusive prefix sum of value(0..k-1), out[k] the total. One block of 1024
// threads, each owning a contiguous run of clusters; `value` is read twice per cluster.
template <typename F>
__device__ void block_exclusive_scan(F value, int k, uint32_t* __restrict__ out) {
    __shared__ uint32_t warp_totals[32];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int per = (k + blockDim.x - 1) / blockDim.x;
    const int begin = min(k, tid * per), end = min(k, begin + per);
    uint32_t local = 0;
    for (int c = begin; c < end; ++c) local += value(c);
    // Inclusive scan of `local` across the block.
    uint32_t incl = local;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const uint32_t o = __shfl_up_sync(mk::FULL_MASK, incl, off);
        if (lane >= off) incl += o;
    }
    if (lane == 31) warp_totals[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        const int warps = blockDim.x >> 5;
        uint32_t w = lane < warps ? warp_totals[lane] : 0;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const uint32_t o = __shfl_up_sync(mk::FULL_MASK, w, off);
            if (lane >= off) w += o;
        }
        warp_totals[lane] = w;  // inclusive totals per warp
    }
    __syncthreads();
    uint32_t running = incl - local + (warp > 0 ? warp_totals[warp - 1] : 0);
    for (int c = begin; c < end; ++c) {
        out[c] = running;
        running += value(c);
    }
    if (tid == blockDim.x - 1) out[k] = running;
}

// One warp per tile, 32 rows at a time in row order: rows of equal label in the same step get
// ranks from __match_any_sync; the per-(tile, cluster) cursor is advanced by the last of them.
__device__ void stable_scatter(const uint32_t* __restrict__ labels, int n, int k, int tile_rows,
                               const uint32_t* __restrict__ offsets, uint32_t* __restrict__ tile_cursor,
                               uint32_t* __restrict__ order) {
    const int lane = threadIdx.x & 31;
    const int tile = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const long long begin_ll = (long long)tile * tile_rows;
    if (begin_ll >= n) return;
    const int begin = (int)begin_ll;
    const int end = (int)min((long long)n, begin_ll + tile_rows);
    const uint32_t lt_mask = (1u << lane) - 1u;
    for (int base = begin; base < end; base += 32) {
        const int i = base + lane;
        const uint32_t c = i < end ? labels[i] : 0xffffffffu;
        const bool valid = c < (uint32_t)k;
        const uint32_t peers = __match_any_sync(mk::FULL_MASK, c);
        uint32_t pos = 0;
        if (valid) pos = offsets[c] + tile_cursor[(size_t)tile * k + c] + __popc(peers & lt_mask);
        __syncwarp();
        if (valid) {
            order[pos] = (uint32_t)i;
            if (lane == 31 - __clz(peers)) tile_cursor[(size_t)tile * k + c] += __popc(peers);
        }
        __syncwarp();
    }
}

// A single thread, the textbook stable counting sort: the reference for the four kernels above.
__device__ void counting_sort_reference(const uint32_t* __restrict__ labels, int n, int k,
                                        uint32_t* __restrict__ offsets, uint32_t* __restrict__ order) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    for (int c = 0; c <= k; ++c) offsets[c] = 0;
    for (int i = 0; i < n; ++i) offsets[labels[i] + 1] += 1;
    for (int c = 0; c < k; ++c) offsets[c + 1] += offsets[c];
    for (int i = 0; i < n; ++i) {
        // Position = offsets[c] + number of earlier rows with the same label.
        uint32_t pos = offsets[labels[i]];
        for (int j = 0; j < i; ++j) pos += labels[j] == labels[i];
        order[pos] = i;
    }
}

// ------------------------------------------------------------------ segmented means -------
constexpr int SEG_THREADS = 256, SEG_WARPS = SEG_THREADS / 32, SEG_DIMS = 128;

template <typename T>
__device__ __forceinline__ void load4_or_zero(const T* __restrict__ p, int dim, int d, bool vec_ok, float out[4]) {
    if (vec_ok && dim + 4 <= d) {
        const mk::Vec<T, 4> v = mk::load_vec<T, 4>(p + dim);
#pragma unroll
        for (int e = 0; e < 4; ++e) out[e] = mk::to_float(v.v[e]);
    } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) out[e] = dim + e < d ? mk::to_float(p[dim + e]) : 0.f;
    }
}

// The update in two deterministic stages, so that a cluster holding most of the rows is spread
// over many blocks instead of serialising on one:
//   1. chunk_start = exclusive prefix over clusters of ⌈count / chunk_rows⌉ (scan_chunks);
//   2. segment_partials: block (chunk b, 128-dim slice) finds its cluster c (chunk_start[c] ≤ b <
//      chunk_start[c + 1]) and sums that cluster's sorted rows chunk_rows·(b − chunk_start[c]) ..
//      + chunk_rows into partial[b]: warp w takes rows w, w + 8, … (4 loads in flight), then the
//      8 warp sums are added in warp order;
//   3. segment_finish: one thread per (cluster, dim) adds the cluster's partials in chunk order
//      and divides by the count (empty clusters: 0).
// The partition into chunks depends only on the counts, and every sum runs in a fixed order:
// the result is bitwise reproducible, with no float atomics.
__device__ __forceinline__ int cluster_of_chunk(const uint32_t* __restrict__ chunk_start, int k, uint32_t b) {
    // The largest c with chunk_start[c] ≤ b (empty clusters before it share its start).
    int lo = 0, hi = k - 1;
    while (lo < hi) {
        const int mid = lo + ((hi - lo + 1) >> 1);  // no overflow for k near 2³¹
        if (chunk_start[mid] <= b) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

template <typename T>
__device__ void segment_partials(const T* __restrict__ x, const uint32_t* __restrict__ order,
                                 const uint32_t* __restrict__ offsets, const uint32_t* __restrict__ chunk_start,
                                 int k, int d, int chunk_rows, float* __restrict__ partial) {
    __shared__ float part[SEG_WARPS][SEG_DIMS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int dim = blockIdx.y * SEG_DIMS + lane * 4;
    const bool vec_ok = (d & 3) == 0;
    const uint32_t chunks = chunk_start[k];
    // Block-uniform loop: the barriers inside are reached by every thread.
    for (uint32_t b = blockIdx.x; b < chunks; b += gridDim.x) {
        const int c = cluster_of_chunk(chunk_start, k, b);
        const uint32_t begin = offsets[c] + (b - chunk_start[c]) * (uint32_t)chunk_rows;
        const uint32_t end = min(offsets[c + 1], begin + (uint32_t)chunk_rows);
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        if (dim < d) {
            uint32_t j = begin + warp;
            for (; j + 3 * SEG_WARPS < end; j += 4 * SEG_WARPS) {
                float v[4][4];
#pragma unroll
                for (int u = 0; u < 4; ++u)
                    load4_or_zero(x + (size_t)order[j + u * SEG_WARPS] * d, dim, d, vec_ok, v[u]);
#pragma unroll
                for (int u = 0; u < 4; ++u)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[e] += v[u][e];
            }
            for (; j < end; j += SEG_WARPS) {
                float v[4];
                load4_or_zero(x + (size_t)order[j] * d, dim, d, vec_ok, v);
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[e] += v[e];
            }
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) part[warp][lane * 4 + e] = acc[e];
        __syncthreads();
        const int t = threadIdx.x;
        if (t < SEG_DIMS && blockIdx.y * SEG_DIMS + t < d) {
            float s = 0.f;
#pragma unroll
            for (int w = 0; w < SEG_WARPS; ++w) s += part[w][t];
            partial[(size_t)b * d + blockIdx.y * SEG_DIMS + t] = s;
        }
        __syncthreads();  // `part` is rewritten by the next chunk
    }
}

__device__ void segment_finish(const float* __restrict__ partial, const uint32_t* __restrict__ offsets,
                               const uint32_t* __restrict__ chunk_start, int k, int d,
                               float* __restrict__ centroids, uint32_t* __restrict__ status) {
    bool bad = false;
    for (uint64_t t = mk::global_thread(); t < (uint64_t)k * d; t += mk::grid_threads()) {
        const int c = (int)(t / d), e = (int)(t % d);
        float s = 0.f;
        for (uint32_t b = chunk_start[c]; b < chunk_start[c + 1]; ++b) s += partial[(size_t)b * d + e];
        const uint32_t count = offsets[c + 1] - offsets[c];
        const float mean = count > 0 ? s / (float)count : 0.f;
        bad |= !finite(mean);
        centroids[t] = mean;
    }
    if (bad) atomicOr(status, STATUS_NON_FINITE);
}

// One thread per (cluster, dim): scans every row. O(N·K·D); for tests only.
template <typename T>
__device__ void update_reference(const T* __restrict__ x, const uint32_t* __restrict__ labels, int n, int k, int d,
                                 float* __restrict__ centroids, uint32_t* __restrict__ counts) {
    const size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (size_t)k * d) return;
    const int c = (int)(t / d), e = (int)(t % d);
    float s = 0.f;
    uint32_t cnt = 0;
    for (int i = 0; i < n; ++i)
        if (labels[i] == (uint32_t)c) { s += mk::to_float(x[(size_t)i * d + e]); ++cnt; }
    centroids[t] = cnt ? s / (float)cnt : 0.f;
    if (e == 0) counts[c] = cnt;
}

// Rows ids[0..m) of x as f32 (the seeding's sampled rows), one warp per row.
template <typename T>
__device__ void gather_rows(const T* __restrict__ x, const uint32_t* __restrict__ ids, int m, int d,
                            float* __restrict__ out) {
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < m; r += gridDim.x * warps) {
        const T* src = x + (size_t)ids[r] * d;
        for (int e = lane; e < d; e += 32) out[(size_t)r * d + e] = mk::to_float(src[e]);
    }
}

// ------------------------------------------------------------------ Lloyd loop helpers ----
// One block: every empty cluster, in index order, takes the next row in (distance descending,
// row ascending) order. Round r finds the best row strictly after round r−1's pick in that order.
template <typename T>
__device__ void reseed_empty(const T* __restrict__ x, int n, int d, int k, const uint32_t* __restrict__ counts,
                             const float* __restrict__ dist, float* __restrict__ centroids) {
    __shared__ float sv[32];
    __shared__ int si[32];
    __shared__ int s_cluster;
    __shared__ float s_pick_v;
    __shared__ int s_pick_i;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
    float prev_v = INFINITY;
    int prev_i = -1, search_from = 0;
    for (;;) {
        if (tid == 0) {
            int found = -1;
            for (int c = search_from; c < k; ++c)
                if (counts[c] == 0) { found = c; break; }
            s_cluster = found;
        }
        __syncthreads();
        const int cluster = s_cluster;
        if (cluster < 0) return;
        float bv = -1.f;
        int bi = n;
        for (int i = tid; i < n; i += blockDim.x) {
            const float v = dist[i];
            const bool after = v < prev_v || (v == prev_v && i > prev_i);
            if (after && (v > bv || (v == bv && i < bi))) { bv = v; bi = i; }
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            const float ov = __shfl_xor_sync(mk::FULL_MASK, bv, off);
            const int oi = __shfl_xor_sync(mk::FULL_MASK, bi, off);
            if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
        }
        if (lane == 0) { sv[warp] = bv; si[warp] = bi; }
        __syncthreads();
        if (tid == 0) {
            for (int w = 1; w < warps; ++w)
                if (sv[w] > bv || (sv[w] == bv && si[w] < bi)) { bv = sv[w]; bi = si[w]; }
            s_pick_v = bv;
            s_pick_i = bi;
        }
        __syncthreads();
        prev_v = s_pick_v;
        prev_i = s_pick_i;
        if (prev_i >= n) return;  // every row already used
        for (int e = tid; e < d; e += blockDim.x)
            centroids[(size_t)cluster * d + e] = mk::to_float(x[(size_t)prev_i * d + e]);
        search_from = cluster + 1;
        // No barrier here: what the next round writes (s_cluster, sv/si, s_pick) every thread
        // has read before a barrier the next round's writer passes first.
    }
}

// How far centroid c moved, under the metric (mean |·| for L1, squared L2).
__device__ float centroid_shift(const float* __restrict__ old_c, const float* __restrict__ new_c, int c, int d,
                                int l1) {
    float s = 0.f;
    for (int e = 0; e < d; ++e) {
        const float t = new_c[(size_t)c * d + e] - old_c[(size_t)c * d + e];
        s += l1 ? fabsf(t) : t * t;
    }
    return l1 ? s / (float)d : s;
}

// One block: out = {max centroid shift under the metric, Σ dist (f64, fixed order), status}.
__device__ void shift_inertia(const float* __restrict__ old_c, const float* __restrict__ new_c, int k, int d, int l1,
                              const float* __restrict__ dist, int n, const uint32_t* __restrict__ status,
                              double* __restrict__ out) {
    __shared__ double scratch[32];
    __shared__ float scratch_max[32];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
    float shift = 0.f;
    for (int c = tid; c < k; c += blockDim.x) {
        shift = fmaxf(shift, centroid_shift(old_c, new_c, c, d, l1));
    }
    double total = 0.0;
    for (int i = tid; i < n; i += blockDim.x) total += (double)dist[i];
    shift = mk::warp_max(shift);
    total = mk::warp_sum(total);
    if (lane == 0) { scratch[warp] = total; scratch_max[warp] = shift; }
    __syncthreads();
    if (tid == 0) {
        double t = 0.0;
        float m = 0.f;
        for (int w = 0; w < warps; ++w) { t += scratch[w]; m = fmaxf(m, scratch_max[w]); }
        out[0] = (double)m;
        out[1] = t;
        out[2] = (double)status[0];
    }
}

// One thread, the loops written out: the reference for reseed_empty (same order: each empty
// cluster, in index order, takes the row after the previous pick in (distance descending, row
// ascending) order) and for shift_inertia (the inertia summed in row order).
template <typename T>
__device__ void reseed_empty_reference(const T* __restrict__ x, int n, int d, int k, const uint32_t* __restrict__ counts,
                                       const float* __restrict__ dist, float* __restrict__ centroids) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    float prev_v = INFINITY;
    int prev_i = -1;
    for (int c = 0; c < k; ++c) {
        if (counts[c] != 0) continue;
        float best_v = -1.f;
        int best_i = n;
        for (int i = 0; i < n; ++i) {
            const bool after = dist[i] < prev_v || (dist[i] == prev_v && i > prev_i);
            if (after && dist[i] > best_v) best_v = dist[i], best_i = i;  // ties: the first row
        }
        if (best_i >= n) return;  // every row already used
        for (int e = 0; e < d; ++e) centroids[(size_t)c * d + e] = mk::to_float(x[(size_t)best_i * d + e]);
        prev_v = best_v, prev_i = best_i;
    }
}

__device__ void shift_inertia_reference(const float* __restrict__ old_c, const float* __restrict__ new_c, int k,
                                        int d, int l1, const float* __restrict__ dist, int n,
                                        const uint32_t* __restrict__ status, double* __restrict__ out) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    float shift = 0.f;
    for (int c = 0; c < k; ++c) {
        shift = fmaxf(shift, centroid_shift(old_c, new_c, c, d, l1));
    }
    double total = 0.0;
    for (int i = 0; i < n; ++i) total += (double)dist[i];
    out[0] = (double)shift;
    out[1] = total;
    out[2] = (double)status[0];
}

}  // namespace

// ------------------------------------------------------------------ entry points ----------
#define MK_TYPED(SN, T)                                                                                         \
    extern "C" __global__ void row_sq_norms_##SN(const T* x, int rows, int d, float* out) {                    \
        row_sq_norms<T>(x, rows, d, out);                                                                       \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(simt::THREADS, 2)                                              \
        assign_simt_l2_##SN(const T* x, const T* c, const float* cn, int n, int k, int d, uint32_t* labels,     \
                            float* dist, uint32_t* status) {                                                    \
        simt::assign<T, false>(x, c, cn, n, k, d, labels, dist, status);                                        \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(simt::THREADS)                                                 \
        assign_simt_l1_##SN(const T* x, const T* c, const float* cn, int n, int k, int d, uint32_t* labels,     \
                            float* dist, uint32_t* status) {                                                    \
        simt::assign<T, true>(x, c, cn, n, k, d, labels, dist, status);                                         \
    }                                                                                                           \
    extern "C" __global__ void assign_reference_##SN(const T* x, const T* c, int n, int k, int d, int l1,       \
                                                     uint32_t* labels, float* dist) {                           \
        assign_reference<T>(x, c, n, k, d, l1, labels, dist);                                                   \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(SEG_THREADS)                                                   \
        segment_partials_##SN(const T* x, const uint32_t* order, const uint32_t* offsets,                       \
                              const uint32_t* chunk_start, int k, int d, int chunk_rows, float* partial) {      \
        segment_partials<T>(x, order, offsets, chunk_start, k, d, chunk_rows, partial);                         \
    }                                                                                                           \
    extern "C" __global__ void update_reference_##SN(const T* x, const uint32_t* labels, int n, int k, int d,   \
                                                     float* centroids, uint32_t* counts) {                      \
        update_reference<T>(x, labels, n, k, d, centroids, counts);                                             \
    }                                                                                                           \
    extern "C" __global__ void gather_rows_##SN(const T* x, const uint32_t* ids, int m, int d, float* out) {    \
        gather_rows<T>(x, ids, m, d, out);                                                                      \
    }                                                                                                           \
    extern "C" __global__ void reseed_empty_##SN(const T* x, int n, int d, int k, const uint32_t* counts,       \
                                                 const float* dist, float* centroids) {                         \
        reseed_empty<T>(x, n, d, k, counts, dist, centroids);                                                   \
    }                                                                                                           \
    extern "C" __global__ void reseed_empty_reference_##SN(const T* x, int n, int d, int k,                     \
                                                           const uint32_t* counts, const float* dist,           \
                                                           float* centroids) {                                  \
        reseed_empty_reference<T>(x, n, d, k, counts, dist, centroids);                                         \
    }

MK_TYPED(f32, float)
MK_TYPED(f16, __half)
MK_TYPED(bf16, __nv_bfloat16)

// Dynamic shared memory: tc::smem_bytes<false>() = 45568 and tc::smem_bytes<true>() = 59904 bytes
// (the launcher passes these and opts the resident kernel in above 48 KiB).
static_assert(tc::smem_bytes<false>() == 45568 && tc::smem_bytes<true>() == 59904, "kmeans/cuda.rs sizes");
#define MK_TC(SN, T)                                                                                            \
    extern "C" __global__ void __launch_bounds__(tc::THREADS, 2)                                                \
        assign_l2_mma_##SN(const T* x, const T* c, const float* cn, int n, int k, int d, uint32_t* labels,      \
                           float* dist, uint32_t* status) {                                                     \
        tc::assign_l2<T, false>(x, c, cn, n, k, d, labels, dist, status);                                       \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(tc::THREADS, 2)                                                \
        assign_l2_mma_xres_##SN(const T* x, const T* c, const float* cn, int n, int k, int d, uint32_t* labels, \
                                float* dist, uint32_t* status) {                                                \
        tc::assign_l2<T, true>(x, c, cn, n, k, d, labels, dist, status);                                        \
    }
MK_TC(f16, __half)
MK_TC(bf16, __nv_bfloat16)

extern "C" __global__ void tile_histogram_u32(const uint32_t* labels, int n, int k, int tile_rows,
                                              uint32_t* tile_counts, uint32_t* status) {
    tile_histogram(labels, n, k, tile_rows, tile_counts, status);
}
extern "C" __global__ void counting_sort_reference_u32(const uint32_t* labels, int n, int k, uint32_t* offsets,
                                                       uint32_t* order) {
    counting_sort_reference(labels, n, k, offsets, order);
}
extern "C" __global__ void __launch_bounds__(SCAN_SEGMENTS * 32)
    scan_tiles_u32(uint32_t* tile_counts, int tiles, int k, uint32_t* counts) {
    scan_tiles(tile_counts, tiles, k, counts);
}
extern "C" __global__ void __launch_bounds__(1024) scan_offsets_u32(const uint32_t* counts, int k, uint32_t* offsets) {
    block_exclusive_scan([=](int c) { return counts[c]; }, k, offsets);
}
extern "C" __global__ void __launch_bounds__(1024)
    scan_chunks_u32(const uint32_t* offsets, int k, int chunk_rows, uint32_t* chunk_start) {
    block_exclusive_scan(
        [=](int c) { return (offsets[c + 1] - offsets[c] + (uint32_t)chunk_rows - 1) / (uint32_t)chunk_rows; },
        k, chunk_start);
}
extern "C" __global__ void segment_finish_f32(const float* partial, const uint32_t* offsets,
                                              const uint32_t* chunk_start, int k, int d, float* centroids,
                                              uint32_t* status) {
    segment_finish(partial, offsets, chunk_start, k, d, centroids, status);
}
extern "C" __global__ void stable_scatter_u32(const uint32_t* labels, int n, int k, int tile_rows,
                                              const uint32_t* offsets, uint32_t* tile_cursor, uint32_t* order) {
    stable_scatter(labels, n, k, tile_rows, offsets, tile_cursor, order);
}
extern "C" __global__ void __launch_bounds__(1024)
    shift_inertia_f32(const float* old_c, const float* new_c, int k, int d, int l1, const float* dist, int n,
                      const uint32_t* status, double* out) {
    shift_inertia(old_c, new_c, k, d, l1, dist, n, status, out);
}
extern "C" __global__ void shift_inertia_reference_f32(const float* old_c, const float* new_c, int k, int d, int l1,
                                                       const float* dist, int n, const uint32_t* status, double* out) {
    shift_inertia_reference(old_c, new_c, k, d, l1, dist, n, status, out);
}
