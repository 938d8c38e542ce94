// MoE kernels: top-1 routing from logits, dispatch/combine as vectorised row moves, and batched
// least squares (normal equations + on-chip Cholesky). Routing's histogram / prefix sum / stable
// scatter is the counting sort of kernels/kmeans.cu (kmeans::sort_by_cluster).
//
//   top1_logits_*          one warp per token: argmax (lowest index on ties) and the softmax
//                          probability of it, 1 / Σ exp(l − max).
//   move_rows_v{16,4,2}    one warp per row, 16/4/2-byte vectors (the widest that divides the
//                          row's bytes): gather dst[j] = src[idx[j]] or scatter dst[idx[j]] = src[j];
//                          dtype-agnostic.
//   scatter_scaled_*       combine with per-token weights: out[idx[j]] = w[idx[j]] · src[j].
//   normal_equations_f32   one block per system: G = [XᵀX | XᵀY] over the system's row segment,
//                          rows staged through shared memory 32 at a time.
//   cholesky_solve_f32     one block per system (n ≤ 64): (A + ridge I) = LLᵀ in shared memory,
//                          then one thread per right-hand side for the two triangular solves;
//                          a pivot ≤ n·1e-6·max diag flags the system for the host's min-norm path.
//   *_reference            obviously-correct versions for the GPU tests (one thread per row,
//                          element, entry or system).
#include "common.cuh"

namespace {

constexpr uint32_t STATUS_NON_FINITE = 1u;
constexpr uint32_t FLAG_RANK_DEFICIENT = 1u;
constexpr uint32_t FLAG_NON_FINITE = 2u;

template <typename T>
__device__ void top1_logits(const T* __restrict__ logits, int n, int k, uint32_t* __restrict__ expert,
                            float* __restrict__ probs, uint32_t* __restrict__ status) {
    const int lane = threadIdx.x & 31;
    const int warps = blockDim.x >> 5;
    for (int row = blockIdx.x * warps + (threadIdx.x >> 5); row < n; row += gridDim.x * warps) {
        const T* l = logits + (size_t)row * k;
        float best = -INFINITY;
        uint32_t arg = 0xffffffffu;
        bool bad = false;
        for (int j = lane; j < k; j += 32) {
            const float v = mk::to_float(l[j]);
            bad |= !isfinite(v);
            if (v > best || (v == best && (uint32_t)j < arg)) { best = v; arg = j; }
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            const float ov = __shfl_xor_sync(mk::FULL_MASK, best, off);
            const uint32_t oa = __shfl_xor_sync(mk::FULL_MASK, arg, off);
            if (ov > best || (ov == best && oa < arg)) { best = ov; arg = oa; }
        }
        float denom = 0.f;
        for (int j = lane; j < k; j += 32) denom += __expf(mk::to_float(l[j]) - best);
        denom = mk::warp_sum(denom);
        bad = __any_sync(mk::FULL_MASK, bad);
        if (lane == 0) {
            expert[row] = arg;
            probs[row] = 1.f / denom;
            if (bad) atomicOr(status, STATUS_NON_FINITE);
        }
    }
}

template <typename V>
__device__ void move_rows(const V* __restrict__ src, const uint32_t* __restrict__ idx, int rows, int vecs,
                          int scatter, V* __restrict__ dst) {
    const int lane = threadIdx.x & 31;
    const int warps = blockDim.x >> 5;
    for (int j = blockIdx.x * warps + (threadIdx.x >> 5); j < rows; j += gridDim.x * warps) {
        const size_t other = idx[j];
        const V* s = src + (scatter ? (size_t)j : other) * vecs;
        V* d = dst + (scatter ? other : (size_t)j) * vecs;
        for (int v = lane; v < vecs; v += 32) d[v] = s[v];
    }
}

template <typename T>
__device__ void scatter_scaled(const T* __restrict__ src, const uint32_t* __restrict__ idx,
                               const float* __restrict__ w, int rows, int d, T* __restrict__ dst) {
    const int lane = threadIdx.x & 31;
    const int warps = blockDim.x >> 5;
    const bool vec_ok = (d & 3) == 0;
    for (int j = blockIdx.x * warps + (threadIdx.x >> 5); j < rows; j += gridDim.x * warps) {
        const uint32_t t = idx[j];
        const float s = w[t];
        const T* in = src + (size_t)j * d;
        T* out = dst + (size_t)t * d;
        if (vec_ok) {
            for (int e = lane * 4; e < d; e += 128) {
                const mk::Vec<T, 4> v = mk::load_vec<T, 4>(in + e);
                mk::Vec<T, 4> o;
#pragma unroll
                for (int q = 0; q < 4; ++q) o.v[q] = mk::from_float<T>(s * mk::to_float(v.v[q]));
                mk::store_vec<T, 4>(out + e, o);
            }
        } else {
            for (int e = lane; e < d; e += 32) out[e] = mk::from_float<T>(s * mk::to_float(in[e]));
        }
    }
}

// One thread per row, serial argmax and sum: the reference for top1_logits.
template <typename T>
__device__ void top1_logits_reference(const T* __restrict__ logits, int n, int k, uint32_t* __restrict__ expert,
                                      float* __restrict__ probs) {
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= n) return;
    const T* l = logits + (size_t)row * k;
    float best = mk::to_float(l[0]);
    uint32_t arg = 0;
    for (int j = 1; j < k; ++j)
        if (mk::to_float(l[j]) > best) { best = mk::to_float(l[j]); arg = j; }
    float denom = 0.f;
    for (int j = 0; j < k; ++j) denom += expf(mk::to_float(l[j]) - best);
    expert[row] = arg;
    probs[row] = 1.f / denom;
}

// One thread per element (grid-stride): the reference for scatter_scaled.
template <typename T>
__device__ void scatter_scaled_reference(const T* __restrict__ src, const uint32_t* __restrict__ idx,
                                         const float* __restrict__ w, int rows, int d, T* __restrict__ dst) {
    for (uint64_t e = mk::global_thread(); e < (uint64_t)rows * d; e += mk::grid_threads()) {
        const uint64_t j = e / d, c = e % d, t = idx[j];
        dst[t * d + c] = mk::from_float<T>(w[t] * mk::to_float(src[e]));
    }
}

// One thread per byte: the reference for move_rows.
__device__ void move_bytes_one_thread_per_byte(const uint8_t* __restrict__ src, const uint32_t* __restrict__ idx, int rows,
                                     int row_bytes, int scatter, uint8_t* __restrict__ dst) {
    const size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (size_t)rows * row_bytes) return;
    const size_t j = t / row_bytes, b = t % row_bytes, other = idx[j];
    if (scatter) dst[other * row_bytes + b] = src[j * row_bytes + b];
    else dst[j * row_bytes + b] = src[other * row_bytes + b];
}

// ------------------------------------------------------------------ least squares ---------
constexpr int NE_THREADS = 256, NE_ROWS = 32, NE_PER_THREAD = 16, NE_MAX_COLS = 256;

__device__ void normal_equations(const float* __restrict__ x, const float* __restrict__ y,
                                 const uint32_t* __restrict__ seg, int n, int r, float* __restrict__ g) {
    __shared__ float z[NE_ROWS][NE_MAX_COLS];
    const int s = blockIdx.x, tid = threadIdx.x, w = n + r, total = n * w;
    const uint32_t begin = seg[s], end = seg[s + 1];
    for (int chunk = 0; chunk < total; chunk += NE_THREADS * NE_PER_THREAD) {
        float acc[NE_PER_THREAD];
        int ei[NE_PER_THREAD], ej[NE_PER_THREAD];
#pragma unroll
        for (int q = 0; q < NE_PER_THREAD; ++q) {
            const int e = chunk + tid + q * NE_THREADS;
            acc[q] = 0.f;
            ei[q] = e < total ? e / w : 0;
            ej[q] = e < total ? e % w : 0;
        }
        for (uint32_t r0 = begin; r0 < end; r0 += NE_ROWS) {
            __syncthreads();
            for (int e = tid; e < NE_ROWS * w; e += NE_THREADS) {
                const int rr = e / w, c = e % w;
                const uint32_t row = r0 + rr;
                float v = 0.f;
                if (row < end) v = c < n ? x[(size_t)row * n + c] : y[(size_t)row * r + (c - n)];
                z[rr][c] = v;
            }
            __syncthreads();
#pragma unroll 4
            for (int rr = 0; rr < NE_ROWS; ++rr)
#pragma unroll
                for (int q = 0; q < NE_PER_THREAD; ++q) acc[q] = fmaf(z[rr][ei[q]], z[rr][ej[q]], acc[q]);
        }
#pragma unroll
        for (int q = 0; q < NE_PER_THREAD; ++q) {
            const int e = chunk + tid + q * NE_THREADS;
            if (e < total) g[(size_t)s * total + e] = acc[q];
        }
    }
}

__device__ void normal_equations_reference(const float* __restrict__ x, const float* __restrict__ y,
                                           const uint32_t* __restrict__ seg, int systems, int n, int r,
                                           float* __restrict__ g) {
    const int w = n + r, total = n * w;
    const size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (size_t)systems * total) return;
    const int s = (int)(t / total), e = (int)(t % total), i = e / w, j = e % w;
    float acc = 0.f;
    for (uint32_t row = seg[s]; row < seg[s + 1]; ++row) {
        const float a = x[(size_t)row * n + i];
        const float b = j < n ? x[(size_t)row * n + j] : y[(size_t)row * r + (j - n)];
        acc += a * b;
    }
    g[t] = acc;
}

constexpr int CH_MAX = 8192;  // n·(n + r) floats of shared memory

__device__ void cholesky_solve(const float* __restrict__ g, int n, int r, float ridge, float* __restrict__ out,
                               uint32_t* __restrict__ flags) {
    __shared__ float a[CH_MAX];
    __shared__ float s_max_diag;
    __shared__ uint32_t s_flag;
    const int s = blockIdx.x, tid = threadIdx.x, w = n + r;
    const float* gs = g + (size_t)s * n * w;
    bool bad = false;
    for (int e = tid; e < n * w; e += blockDim.x) {
        float v = gs[e];
        bad |= !isfinite(v);
        if (e / w == e % w) v += ridge;
        a[e] = v;
    }
    if (tid == 0) s_flag = 0;
    __syncthreads();
    if (bad) atomicOr(&s_flag, FLAG_NON_FINITE);
    if (tid == 0) {
        float m = 0.f;
        for (int i = 0; i < n; ++i) m = fmaxf(m, a[i * w + i]);
        s_max_diag = m;
    }
    __syncthreads();
    const float threshold = 1e-6f * (float)n * s_max_diag;
    for (int j = 0; j < n; ++j) {
        if (tid == 0) {
            const float p = a[j * w + j];
            if (!(p > threshold)) s_flag |= FLAG_RANK_DEFICIENT;
            else a[j * w + j] = sqrtf(p);
        }
        __syncthreads();
        if (s_flag != 0) break;
        const float l = a[j * w + j];
        for (int i = j + 1 + tid; i < n; i += blockDim.x) a[i * w + j] /= l;
        __syncthreads();
        // Trailing update of the lower triangle: row i, columns j+1..i. No barrier after it: the
        // next pivot, row j+1, is thread 0's own, and the barrier after the pivot orders the rest.
        for (int i = j + 1 + tid; i < n; i += blockDim.x) {
            const float lij = a[i * w + j];
            for (int c = j + 1; c <= i; ++c) a[i * w + c] -= lij * a[c * w + j];
        }
    }
    const uint32_t flag = s_flag;
    if (tid == 0) flags[s] = flag;
    if (flag != 0) return;
    // One thread per right-hand side: L z = b, then Lᵀ x = z, in place in column n + col.
    for (int col = tid; col < r; col += blockDim.x) {
        for (int i = 0; i < n; ++i) {
            float v = a[i * w + n + col];
            for (int p = 0; p < i; ++p) v -= a[i * w + p] * a[p * w + n + col];
            a[i * w + n + col] = v / a[i * w + i];
        }
        for (int i = n - 1; i >= 0; --i) {
            float v = a[i * w + n + col];
            for (int p = i + 1; p < n; ++p) v -= a[p * w + i] * a[p * w + n + col];
            a[i * w + n + col] = v / a[i * w + i];
        }
        for (int i = 0; i < n; ++i) out[((size_t)s * n + i) * r + col] = a[i * w + n + col];
    }
}

// One thread per system, the textbook loops in the storage the fast kernel uses (work, a copy of
// the system's [G | XᵀY] with the ridge added): the reference for cholesky_solve, with its pivot
// rule and flags.
__device__ void cholesky_solve_reference(const float* __restrict__ g, int systems, int n, int r, float ridge,
                                         float* __restrict__ work, float* __restrict__ out,
                                         uint32_t* __restrict__ flags) {
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= systems) return;
    const int w = n + r;
    float* a = work + (size_t)s * n * w;
    const float* gs = g + (size_t)s * n * w;
    float max_diag = 0.f;
    for (int e = 0; e < n * w; ++e) {
        if (!isfinite(gs[e])) {
            flags[s] = FLAG_NON_FINITE;
            return;
        }
        a[e] = gs[e] + (e / w == e % w ? ridge : 0.f);
    }
    for (int i = 0; i < n; ++i) max_diag = fmaxf(max_diag, a[i * w + i]);
    const float threshold = 1e-6f * (float)n * max_diag;
    for (int j = 0; j < n; ++j) {  // A = LLᵀ, L in the lower triangle
        float p = a[j * w + j];
        for (int c = 0; c < j; ++c) p -= a[j * w + c] * a[j * w + c];
        if (!(p > threshold)) {
            flags[s] = FLAG_RANK_DEFICIENT;
            return;
        }
        a[j * w + j] = sqrtf(p);
        for (int i = j + 1; i < n; ++i) {
            float v = a[i * w + j];
            for (int c = 0; c < j; ++c) v -= a[i * w + c] * a[j * w + c];
            a[i * w + j] = v / a[j * w + j];
        }
    }
    float* x = out + (size_t)s * n * r;
    for (int col = 0; col < r; ++col) {  // L z = b, then Lᵀ x = z, both in x's column
        for (int i = 0; i < n; ++i) {
            float v = a[i * w + n + col];
            for (int p = 0; p < i; ++p) v -= a[i * w + p] * x[p * r + col];
            x[i * r + col] = v / a[i * w + i];
        }
        for (int i = n - 1; i >= 0; --i) {
            float v = x[i * r + col];
            for (int p = i + 1; p < n; ++p) v -= a[p * w + i] * x[p * r + col];
            x[i * r + col] = v / a[i * w + i];
        }
    }
    flags[s] = 0;
}

}  // namespace

#define MK_TYPED(SN, T)                                                                                    \
    extern "C" __global__ void top1_logits_##SN(const T* logits, int n, int k, uint32_t* expert,          \
                                                float* probs, uint32_t* status) {                         \
        top1_logits<T>(logits, n, k, expert, probs, status);                                               \
    }                                                                                                      \
    extern "C" __global__ void scatter_scaled_##SN(const T* src, const uint32_t* idx, const float* w,     \
                                                   int rows, int d, T* dst) {                              \
        scatter_scaled<T>(src, idx, w, rows, d, dst);                                                      \
    }                                                                                                      \
    extern "C" __global__ void top1_logits_reference_##SN(const T* logits, int n, int k, uint32_t* expert, \
                                                          float* probs) {                                  \
        top1_logits_reference<T>(logits, n, k, expert, probs);                                             \
    }                                                                                                      \
    extern "C" __global__ void scatter_scaled_reference_##SN(const T* src, const uint32_t* idx,            \
                                                             const float* w, int rows, int d, T* dst) {    \
        scatter_scaled_reference<T>(src, idx, w, rows, d, dst);                                            \
    }
MK_TYPED(f32, float)
MK_TYPED(f16, __half)
MK_TYPED(bf16, __nv_bfloat16)

#define MK_MOVE(SN, V)                                                                                     \
    extern "C" __global__ void move_rows_##SN(const V* src, const uint32_t* idx, int rows, int vecs,      \
                                              int scatter, V* dst) {                                       \
        move_rows<V>(src, idx, rows, vecs, scatter, dst);                                                  \
    }
MK_MOVE(v16, uint4)
MK_MOVE(v4, uint32_t)
MK_MOVE(v2, uint16_t)

extern "C" __global__ void move_bytes_reference(const uint8_t* src, const uint32_t* idx, int rows, int row_bytes,
                                                int scatter, uint8_t* dst) {
    move_bytes_one_thread_per_byte(src, idx, rows, row_bytes, scatter, dst);
}
extern "C" __global__ void __launch_bounds__(NE_THREADS)
    normal_equations_f32(const float* x, const float* y, const uint32_t* seg, int n, int r, float* g) {
    normal_equations(x, y, seg, n, r, g);
}
extern "C" __global__ void normal_equations_reference_f32(const float* x, const float* y, const uint32_t* seg,
                                                          int systems, int n, int r, float* g) {
    normal_equations_reference(x, y, seg, systems, n, r, g);
}
extern "C" __global__ void cholesky_solve_f32(const float* g, int n, int r, float ridge, float* out,
                                              uint32_t* flags) {
    cholesky_solve(g, n, r, ridge, out, flags);
}
extern "C" __global__ void cholesky_solve_reference_f32(const float* g, int systems, int n, int r, float ridge,
                                                        float* work, float* out, uint32_t* flags) {
    cholesky_solve_reference(g, systems, n, r, ridge, work, out, flags);
}
