// Momentum attention (Dai et al. 2022, §5 eq. 16): causal softmax attention plus the decayed sum
// m_t = Σ_{i<t} η^{t−i} v_i, on [BH, T, D] tensors (tiled kernels: one head per blockIdx.x, one tile per blockIdx.y).
//
// Kernels (DN = f16 | bf16 | f32, D = 64 | 128 | 256):
//   mattn_fwd_<DN>_d<D>         FlashAttention-2 forward. f16/bf16: mma.sync m16n8k16 tensor cores
//                               (fp32 accumulation), 4 warps × 16 query rows, K/V tiles through
//                               shared memory by cp.async (V_j loads while S_j = Q K_jᵀ computes,
//                               K_{j+1} while O += P V_j). f32: the same tiling with SIMT FMA.
//                               The momentum term is fused: while a value tile inside the momentum
//                               horizon is in shared memory, each thread adds its columns' share
//                               Σ η^{t0−i} v_i of m_{t0} (weights computed on the fly); tiles older
//                               than the horizon (weights below f32 resolution) are skipped; the
//                               epilogue runs m_{t+1} = η(m_t + v_t) through the tile's own rows
//                               and adds it to the output.
//                               Writes the base-2 row log-sum-exp when `lse2` is not null, and
//                               the attention without momentum when `attn_out` is not null (both
//                               saved for the backward pass).
//   mattn_bwd_delta_<DN>        delta_t = Σ_d dO·O_attn (the softmax backward's row term).
//   mattn_bwd_mma_<f16|bf16>_d<D>  FlashAttention-2 backward on tensor cores (see below; D = 256
//                               has its own tiling, `backward_mma_wide`).
//   mattn_bwd_f32_d<D>          FlashAttention-2 backward, one block per key/value tile: recompute
//                               P from lse2, dV += Pᵀ dO, dS = P ∘ (dO Vᵀ − delta), dK += dSᵀ Q,
//                               dQ += dS K by f32 atomics; the momentum gradient
//                               dv_s += Σ_{t>s} η^{t−s} do_t fused the same way (SIMT fp32 FMA).
//   mattn_dq_finish_<DN>        dq (storage dtype) from the f32 accumulator.
//   mattn_momentum_scan_<DN>    the unfused baseline's separate momentum pass (in place);
//   mattn_momentum_scan_reverse_<DN>  and its backward's, into dv.
//   mattn_fwd_reference_<DN>    one block per query row, the obvious algorithm and an explicit
//                               momentum sum with powf: the GPU tests' reference.
//   mattn_bwd_reference_{rows,cols}_<DN>  the backward likewise: one block per query row (dq
//                               and the row statistics), then one per key row (dk, dv).
//
// Logits are kept in base 2: scale_log2 = scale · log2 e, p = exp2(s2 − m2).
#include "tensor_core.cuh"

namespace {

constexpr int THREADS = 128;  // 4 warps in every tiled kernel
constexpr int PAD = 8;        // halves of padding per shared row: ldmatrix rows hit distinct banks

// ------------------------------------------------------------------ small helpers -------------

using mk::cp_async_16;
using mk::cp_async_commit;
using mk::cp_async_wait_all;
using mk::ldmatrix_x4;
using mk::ldmatrix_x4_trans;
using mk::mma_16816;
using mk::pack2;


// exp2 of a base-2 logit difference; the max is replaced by 0 for rows that have seen only
// masked keys so far (−∞ − −∞ would be NaN).
__device__ __forceinline__ float safe_max(float m) { return m == -INFINITY ? 0.f : m; }

// ------------------------------------------------------------------ fused momentum ------------
// Column-parallel pieces shared by the forward kernels. Thread `tid` owns columns tid,
// tid + THREADS, ... (at most 2 for D = 256).
constexpr int MAX_COLS_PER_THREAD = 2;

// carry += Σ_r η^{t0 − (k0 + r)} v_{k0+r} over the ROWS rows of a value tile in shared memory
// (row stride ld, any element type) that lies entirely before the query tile starting at t0:
// the tile's share of m_{t0} = Σ_{i<t0} η^{t0−i} v_i. Four interleaved partial sums, each with
// its own weight η^{lag} stepped by η⁴, keep the dependency chains short (the recurrence
// c ← η(c + v) would serialise all ROWS rows).
template <int D, int ROWS, typename S>
__device__ __forceinline__ void momentum_advance(float (&carry)[MAX_COLS_PER_THREAD], const S* v_s, int ld,
                                                 int k0, int t0, float eta) {
    static_assert(ROWS % 4 == 0, "rows come in groups of four");
    const float eta4 = (eta * eta) * (eta * eta);
    // Weight of the last row of the tile, whose lag to t0 is the smallest.
    const float w_last = exp2f((float)(t0 - (k0 + ROWS - 1)) * log2f(eta));
#pragma unroll
    for (int j = 0; j < MAX_COLS_PER_THREAD; ++j) {
        const int col = threadIdx.x + j * THREADS;
        if (col < D) {
            float acc[4] = {0.f, 0.f, 0.f, 0.f};
            float w[4] = {w_last, w_last * eta, w_last * eta * eta, w_last * eta * eta * eta};
#pragma unroll
            for (int i = 0; i < ROWS / 4; ++i) {
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    const int r = ROWS - 1 - 4 * i - u;
                    acc[u] = fmaf(w[u], mk::to_float(v_s[r * ld + col]), acc[u]);
                    w[u] *= eta4;
                }
            }
            carry[j] += (acc[0] + acc[1]) + (acc[2] + acc[3]);
        }
    }
}

// Runs the momentum recurrence down one column of a staged tile: for each of `rows` rows (in
// ascending order, or descending for the backward's reverse scan), stage[r] += c, then
// c ← η (c + src_r), with src a [rows, D] global array (rows the block just streamed, so L2
// hits). Loads go out BATCH at a time, ahead of the dependency chain through c.
template <bool ASCENDING, int D, typename T>
__device__ __forceinline__ void momentum_column(float c, float eta, float* stage, int ld, const T* __restrict__ src,
                                                int rows, int col) {
    constexpr int BATCH = 16;
    for (int r0 = 0; r0 < rows; r0 += BATCH) {
        float vals[BATCH];
#pragma unroll
        for (int b = 0; b < BATCH; ++b) {
            const int r = ASCENDING ? r0 + b : rows - 1 - (r0 + b);
            vals[b] = r0 + b < rows ? mk::to_float(src[(size_t)r * D + col]) : 0.f;
        }
#pragma unroll
        for (int b = 0; b < BATCH; ++b) {
            const int r = ASCENDING ? r0 + b : rows - 1 - (r0 + b);
            if (r0 + b < rows) {
                stage[r * ld + col] += c;
                c = eta * (c + vals[b]);
            }
        }
    }
}

// Stores `rows` rows of a staged f32 tile (row stride ldo) to dst in T, 4 elements per thread
// per step, coalesced.
template <typename T, int D>
__device__ __forceinline__ void store_staged_rows(const float* o_s, int ldo, T* __restrict__ dst, int rows) {
    constexpr int VEC = 4;
    for (int i = threadIdx.x; i < rows * (D / VEC); i += THREADS) {
        const int r = i / (D / VEC), c = (i % (D / VEC)) * VEC;
        mk::Vec<T, VEC> packed;
#pragma unroll
        for (int e = 0; e < VEC; ++e) packed.v[e] = mk::from_float<T>(o_s[r * ldo + c + e]);
        mk::store_vec<T, VEC>(dst + (size_t)r * D + c, packed);
    }
}

// Epilogue: o_s (f32, [BR][ldo], the normalised attention rows of the tile) is stored to
// attn_out when that is not null (the base attention, saved for the backward pass), gets the
// momentum of each row added, and is stored to `out` in T. The recurrence runs through the
// tile's own value rows, read from global memory (the last value tiles, still in L2).
template <typename T, int D, int BR>
__device__ __forceinline__ void momentum_epilogue_store(float* o_s, int ldo, float (&carry)[MAX_COLS_PER_THREAD],
                                                        const T* __restrict__ v, T* __restrict__ out,
                                                        T* __restrict__ attn_out, int t0, int t_len, float eta) {
    const int rows = min(BR, t_len - t0);
    if (attn_out != nullptr) {
        store_staged_rows<T, D>(o_s, ldo, attn_out + (size_t)t0 * D, rows);
        __syncthreads();  // every read of o_s precedes the momentum writes
    }
    if (eta > 0.f) {
#pragma unroll
        for (int j = 0; j < MAX_COLS_PER_THREAD; ++j) {
            const int col = threadIdx.x + j * THREADS;
            if (col < D) {
                momentum_column<true, D>(carry[j], eta, o_s, ldo, v + (size_t)t0 * D, rows, col);
            }
        }
        __syncthreads();
    }
    store_staged_rows<T, D>(o_s, ldo, out + (size_t)t0 * D, rows);
}

// Whether value tile [k0, k0 + rows) lies before the query tile and inside the horizon.
__device__ __forceinline__ bool in_momentum_window(int k0, int rows, int t0, float eta, int horizon) {
    return eta > 0.f && k0 + rows <= t0 && k0 + rows + horizon > t0;
}

// Backward: carry += Σ η^{t − k_end} dO_t over the rows t of the staged dO tile [q0, q0 + BR)
// (any element type, row stride ld) that lie at or after k_end (the end of the block's key
// tile) and inside the horizon: the momentum gradient that enters the key tile from below,
// G = Σ_{t ≥ k_end} η^{t − k_end} dO_t. Called by every thread; columns as momentum_advance.
template <int D, int BR, typename S>
__device__ __forceinline__ void momentum_grad_carry(float (&carry)[MAX_COLS_PER_THREAD], const S* g_s, int ld,
                                                    int q0, int k_end, int t_len, float eta, int horizon) {
    if (!(eta > 0.f && q0 + BR > k_end && q0 < k_end + horizon)) return;
    const int first = max(q0, k_end);
    const int last = min(q0 + BR, t_len);
    float w = exp2f((float)(first - k_end) * log2f(eta));
    for (int tt = first; tt < last; ++tt, w *= eta) {
#pragma unroll
        for (int j = 0; j < MAX_COLS_PER_THREAD; ++j) {
            const int col = threadIdx.x + j * THREADS;
            if (col < D) carry[j] = fmaf(w, mk::to_float(g_s[(tt - q0) * ld + col]), carry[j]);
        }
    }
}

// ------------------------------------------------------------------ tensor-core forward -------

template <int D>
struct FwdTile {
    static constexpr int BR = 64;                 // query rows per block (16 per warp)
    static constexpr int BC = D == 256 ? 32 : 64;  // keys per tile (fewer at D = 256: registers)
    static constexpr int LD = D + PAD;            // shared row stride, elements
    static constexpr int SMEM_ELEMS = (BR + 2 * BC) * LD;
};

// Issues cp.async loads of `rows` rows (row `base`..) of a [T, D] head into a [rows][LD] tile,
// zero-filling rows at or beyond t_len.
template <typename T, int D, int LD>
__device__ __forceinline__ void load_tile_async(T* dst, const T* __restrict__ src, int base, int rows, int t_len) {
    constexpr int CHUNK = 16 / sizeof(T);  // elements per 16-byte copy
    for (int i = threadIdx.x; i < rows * (D / CHUNK); i += THREADS) {
        const int r = i / (D / CHUNK), c = (i % (D / CHUNK)) * CHUNK;
        const bool valid = base + r < t_len;
        const T* from = src + (size_t)(valid ? base + r : 0) * D + c;
        cp_async_16(dst + r * LD + c, from, valid ? 16 : 0);
    }
}

template <typename T, int D>
__device__ void forward_mma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                            T* __restrict__ out, T* __restrict__ attn_out, float* __restrict__ lse2, int t_len, float scale_log2,
                            float eta, int horizon) {
    using Tile = FwdTile<D>;
    constexpr int BR = Tile::BR, BC = Tile::BC, LD = Tile::LD;
    static_assert(BR * (D + 4) * sizeof(float) <= Tile::SMEM_ELEMS * sizeof(T), "the f32 epilogue tile fits");
    constexpr int NT_S = BC / 8;  // n8 tiles of S per warp
    constexpr int NT_O = D / 8;   // n8 tiles of O per warp
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* q_s = reinterpret_cast<T*>(smem_raw);
    T* k_s = q_s + BR * LD;
    T* v_s = k_s + BC * LD;

    const int n_q_tiles = (t_len + BR - 1) / BR;
    const int tile = n_q_tiles - 1 - blockIdx.y;  // longest (most keys) tiles first
    const int t0 = tile * BR;
    const size_t head = (size_t)blockIdx.x * t_len * D;
    q += head, k += head, v += head, out += head;
    if (attn_out != nullptr) attn_out += head;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, c4 = lane % 4;
    const int warp_row0 = t0 + warp * 16;  // first query row of this warp

    load_tile_async<T, D, LD>(q_s, q, t0, BR, t_len);
    load_tile_async<T, D, LD>(k_s, k, 0, BC, t_len);
    cp_async_commit();

    float o_acc[NT_O][4];
#pragma unroll
    for (int n = 0; n < NT_O; ++n) o_acc[n][0] = o_acc[n][1] = o_acc[n][2] = o_acc[n][3] = 0.f;
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
    float carry[MAX_COLS_PER_THREAD] = {0.f, 0.f};

    const int kv_end = min(t_len, t0 + BR);
    const int n_kv_tiles = (kv_end + BC - 1) / BC;  // causal: tiles past the diagonal never run
    for (int j = 0; j < n_kv_tiles; ++j) {
        const int k0 = j * BC;
        cp_async_wait_all();
        __syncthreads();  // K_j (and Q) visible; every warp is done with V_{j−1}
        load_tile_async<T, D, LD>(v_s, v, k0, BC, t_len);
        cp_async_commit();
        // Warps whose rows all precede this key tile have nothing to add (diagonal at D = 256).
        const bool warp_active = k0 <= warp_row0 + 15;

        float s[NT_S][4];
#pragma unroll
        for (int n = 0; n < NT_S; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
        if (warp_active) {
#pragma unroll
            for (int kk = 0; kk < D; kk += 16) {
                uint32_t a[4];
                ldmatrix_x4(a, q_s + (warp * 16 + lane % 16) * LD + kk + (lane / 16) * 8);
#pragma unroll
                for (int n = 0; n < NT_S; n += 2) {
                    uint32_t b[4];
                    ldmatrix_x4(b, k_s + (n * 8 + (lane / 16) * 8 + lane % 8) * LD + kk + ((lane / 8) % 2) * 8);
                    mma_16816<T>(s[n], a, b[0], b[1]);
                    mma_16816<T>(s[n + 1], a, b[2], b[3]);
                }
            }
        }

        // Online softmax on the thread's two rows (g and g + 8 of the warp's 16).
        const bool need_mask = k0 + BC > warp_row0 || k0 + BC > t_len;
        float rescale[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = warp_row0 + g + 8 * h;
            float mx = -INFINITY;
#pragma unroll
            for (int n = 0; n < NT_S; ++n) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int key = k0 + n * 8 + 2 * c4 + e;
                    float x = s[n][2 * h + e] * scale_log2;
                    if (need_mask && (key > row || key >= t_len)) x = -INFINITY;
                    s[n][2 * h + e] = x;
                    mx = fmaxf(mx, x);
                }
            }
            mx = fmaxf(mx, __shfl_xor_sync(mk::FULL_MASK, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(mk::FULL_MASK, mx, 2));
            const float new_max = fmaxf(row_max[h], mx);
            const float base = safe_max(new_max);
            rescale[h] = exp2f(safe_max(row_max[h]) - base);
            if (row_max[h] == -INFINITY) rescale[h] = 0.f;
            row_max[h] = new_max;
            float sum = 0.f;
#pragma unroll
            for (int n = 0; n < NT_S; ++n) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float p = exp2f(s[n][2 * h + e] - base);
                    s[n][2 * h + e] = p;
                    sum += p;
                }
            }
            row_sum[h] = row_sum[h] * rescale[h] + sum;  // quad-partial; reduced in the epilogue
        }
#pragma unroll
        for (int n = 0; n < NT_O; ++n) {
            o_acc[n][0] *= rescale[0], o_acc[n][1] *= rescale[0];
            o_acc[n][2] *= rescale[1], o_acc[n][3] *= rescale[1];
        }

        cp_async_wait_all();
        __syncthreads();  // V_j visible; every warp is done with K_j
        if (j + 1 < n_kv_tiles) {
            load_tile_async<T, D, LD>(k_s, k, k0 + BC, BC, t_len);
            cp_async_commit();
        }
        if (warp_active) {
            // O += P V_j: the S accumulators of key tiles 2m, 2m+1 are the A fragment of k-step m.
#pragma unroll
            for (int m = 0; m < BC / 16; ++m) {
                uint32_t a[4];
                a[0] = pack2<T>(s[2 * m][0], s[2 * m][1]);
                a[1] = pack2<T>(s[2 * m][2], s[2 * m][3]);
                a[2] = pack2<T>(s[2 * m + 1][0], s[2 * m + 1][1]);
                a[3] = pack2<T>(s[2 * m + 1][2], s[2 * m + 1][3]);
#pragma unroll
                for (int n = 0; n < NT_O; n += 2) {
                    uint32_t b[4];
                    ldmatrix_x4_trans(b, v_s + (m * 16 + ((lane / 8) % 2) * 8 + lane % 8) * LD + n * 8 + (lane / 16) * 8);
                    mma_16816<T>(o_acc[n], a, b[0], b[1]);
                    mma_16816<T>(o_acc[n + 1], a, b[2], b[3]);
                }
            }
        }
        if (in_momentum_window(k0, BC, t0, eta, horizon)) momentum_advance<D, BC>(carry, v_s, LD, k0, t0, eta);
    }

    // Epilogue: normalise, stage O in shared memory as f32 (reusing the tiles), add momentum, store.
    __syncthreads();
    float* o_s = reinterpret_cast<float*>(smem_raw);
    constexpr int LDO = D + 4;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float l = row_sum[h];
        l += __shfl_xor_sync(mk::FULL_MASK, l, 1);
        l += __shfl_xor_sync(mk::FULL_MASK, l, 2);
        const float inv = 1.f / l;
        const int r = warp * 16 + g + 8 * h;
#pragma unroll
        for (int n = 0; n < NT_O; ++n) {
            float2 pair = make_float2(o_acc[n][2 * h] * inv, o_acc[n][2 * h + 1] * inv);
            *reinterpret_cast<float2*>(o_s + r * LDO + n * 8 + 2 * c4) = pair;
        }
        if (lse2 != nullptr && c4 == 0 && t0 + r < t_len)
            lse2[(size_t)blockIdx.x * t_len + t0 + r] = row_max[h] + log2f(l);
    }
    __syncthreads();
    momentum_epilogue_store<T, D, BR>(o_s, LDO, carry, v, out, attn_out, t0, t_len, eta);
}

// ------------------------------------------------------------------ SIMT (f32) forward --------
// Thread (r = tid / 4, quarter = tid % 4) owns query row r of a 32-row tile, keys quarter + 4i of
// each 32-key tile and output columns quarter + 4i. Shared rows are padded by one float so
// that the 8 rows a warp reads at once fall in distinct banks.

template <int D>
struct SimtTile {
    static constexpr int BR = 32, BC = 32;
    static constexpr int LD = D + 1;
    static constexpr int SMEM_FLOATS = BR * LD + 2 * BC * LD + BR * (BC + 1);
};

template <typename T, int D>
__device__ __forceinline__ void load_tile_f32(float* dst, int ld, const T* __restrict__ src, int base, int rows,
                                              int t_len, float scale) {
    for (int i = threadIdx.x; i < rows * D; i += THREADS) {
        const int r = i / D, c = i % D;
        dst[r * ld + c] = base + r < t_len ? scale * mk::to_float(src[(size_t)(base + r) * D + c]) : 0.f;
    }
}

template <typename T, int D>
__device__ void forward_simt(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                             T* __restrict__ out, T* __restrict__ attn_out, float* __restrict__ lse2, int t_len, float scale_log2,
                             float eta, int horizon) {
    using Tile = SimtTile<D>;
    constexpr int BR = Tile::BR, BC = Tile::BC, LD = Tile::LD, COLS = D / 4;
    static_assert(THREADS == 4 * BR && BC % 4 == 0 && Tile::SMEM_FLOATS > 0, "four threads per query row");
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float* q_s = reinterpret_cast<float*>(smem_raw);
    float* k_s = q_s + BR * LD;
    float* v_s = k_s + BC * LD;
    float* p_s = v_s + BC * LD;

    const int n_q_tiles = (t_len + BR - 1) / BR;
    const int t0 = (n_q_tiles - 1 - blockIdx.y) * BR;
    const size_t head = (size_t)blockIdx.x * t_len * D;
    q += head, k += head, v += head, out += head;
    if (attn_out != nullptr) attn_out += head;
    const int r = threadIdx.x / 4, quarter = threadIdx.x % 4;
    const int row = t0 + r;

    load_tile_f32<T, D>(q_s, LD, q, t0, BR, t_len, scale_log2);
    float o[COLS];
#pragma unroll
    for (int i = 0; i < COLS; ++i) o[i] = 0.f;
    float row_max = -INFINITY, row_sum = 0.f;
    float carry[MAX_COLS_PER_THREAD] = {0.f, 0.f};

    const int kv_end = min(t_len, t0 + BR);
    for (int k0 = 0; k0 < kv_end; k0 += BC) {
        __syncthreads();  // the previous tiles are consumed
        load_tile_f32<T, D>(k_s, LD, k, k0, BC, t_len, 1.f);
        load_tile_f32<T, D>(v_s, LD, v, k0, BC, t_len, 1.f);
        __syncthreads();
        float s[BC / 4];
#pragma unroll
        for (int i = 0; i < BC / 4; ++i) s[i] = 0.f;
        for (int d = 0; d < D; ++d) {
            const float qd = q_s[r * LD + d];
#pragma unroll
            for (int i = 0; i < BC / 4; ++i) s[i] = fmaf(qd, k_s[(quarter + 4 * i) * LD + d], s[i]);
        }
        float mx = -INFINITY;
#pragma unroll
        for (int i = 0; i < BC / 4; ++i) {
            const int key = k0 + quarter + 4 * i;
            if (key > row || key >= t_len) s[i] = -INFINITY;
            mx = fmaxf(mx, s[i]);
        }
        mx = fmaxf(mx, __shfl_xor_sync(mk::FULL_MASK, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(mk::FULL_MASK, mx, 2));
        const float new_max = fmaxf(row_max, mx);
        const float base = safe_max(new_max);
        const float rescale = row_max == -INFINITY ? 0.f : exp2f(row_max - base);
        row_max = new_max;
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < BC / 4; ++i) {
            const float p = exp2f(s[i] - base);
            p_s[r * (BC + 1) + quarter + 4 * i] = p;
            sum += p;
        }
        row_sum = row_sum * rescale + sum;  // quad-partial
        __syncwarp();  // a row's probabilities come from the four threads of its quad
#pragma unroll
        for (int i = 0; i < COLS; ++i) o[i] *= rescale;
        for (int c = 0; c < BC; ++c) {
            const float p = p_s[r * (BC + 1) + c];
#pragma unroll
            for (int i = 0; i < COLS; ++i) o[i] = fmaf(p, v_s[c * LD + quarter + 4 * i], o[i]);
        }
        if (in_momentum_window(k0, BC, t0, eta, horizon)) momentum_advance<D, BC>(carry, v_s, LD, k0, t0, eta);
    }

    float l = row_sum;
    l += __shfl_xor_sync(mk::FULL_MASK, l, 1);
    l += __shfl_xor_sync(mk::FULL_MASK, l, 2);
    // Row r of q_s becomes row r of o_s: only its own quad read it, before the last __syncwarp.
    float* o_s = q_s;  // [BR][LD] f32
    const float inv = 1.f / l;
#pragma unroll
    for (int i = 0; i < COLS; ++i) o_s[r * LD + quarter + 4 * i] = o[i] * inv;
    if (lse2 != nullptr && quarter == 0 && row < t_len) lse2[(size_t)blockIdx.x * t_len + row] = row_max + log2f(l);
    __syncthreads();
    momentum_epilogue_store<T, D, BR>(o_s, LD, carry, v, out, attn_out, t0, t_len, eta);
}

// ------------------------------------------------------------------ backward ------------------
// Block = one key/value tile of 32 rows. Thread (c = tid / 4, quarter = tid % 4) owns key row c
// and columns quarter + 4i of dK and dV. For each query tile i at or after the diagonal:
//   1. thread (c, quarter) computes P and dS for its key and query rows quarter + 4m;
//   2. dV_c += Σ_r P[r][c] dO_r, dK_c += Σ_r dS[r][c] Q_r  (scale applied at the end);
//   3. thread (r = tid / 4, quarter) adds scale · Σ_c dS[r][c] K_c to dQ_r by f32 atomics.

template <int D>
struct BwdTile {
    static constexpr int BR = 32, BC = 32;
    static constexpr int LD = D + 1;
    // K, V, Q, dO tiles, then P and dS, then lse2 and delta of the query tile.
    static constexpr int SMEM_FLOATS = 4 * 32 * LD + 2 * 32 * 33 + 2 * 32;
};

template <typename T, int D>
__device__ void backward_simt(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                              const T* __restrict__ dout, const float* __restrict__ lse2,
                              const float* __restrict__ delta, float* __restrict__ dq_acc, T* __restrict__ dk,
                              T* __restrict__ dv, int t_len, float scale, float eta, int horizon) {
    using Tile = BwdTile<D>;
    constexpr int BR = Tile::BR, BC = Tile::BC, LD = Tile::LD, COLS = D / 4;
    static_assert(THREADS == 4 * BC && Tile::SMEM_FLOATS > 0, "four threads per key row");
    constexpr float LOG2E = 1.4426950408889634f;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float* k_s = reinterpret_cast<float*>(smem_raw);
    float* v_s = k_s + BC * LD;
    float* q_s = v_s + BC * LD;
    float* g_s = q_s + BR * LD;
    float* p_s = g_s + BR * LD;   // [BR][BC + 1]
    float* ds_s = p_s + BR * 33;  // [BR][BC + 1]
    float* lse_s = ds_s + BR * 33;
    float* delta_s = lse_s + BR;

    const int n_k_tiles = (t_len + BC - 1) / BC;
    const int k0 = (n_k_tiles - 1 - blockIdx.y) * BC;
    const size_t head = (size_t)blockIdx.x * t_len * D;
    q += head, k += head, v += head, dout += head, dq_acc += head, dk += head, dv += head;
    lse2 += (size_t)blockIdx.x * t_len, delta += (size_t)blockIdx.x * t_len;
    const int c = threadIdx.x / 4, quarter = threadIdx.x % 4;
    const int key = k0 + c;
    const float scale_log2 = scale * LOG2E;

    load_tile_f32<T, D>(k_s, LD, k, k0, BC, t_len, 1.f);
    load_tile_f32<T, D>(v_s, LD, v, k0, BC, t_len, 1.f);
    float dk_acc[COLS], dv_acc[COLS];
#pragma unroll
    for (int i = 0; i < COLS; ++i) dk_acc[i] = dv_acc[i] = 0.f;
    // G = Σ_{t ≥ k0 + BC} η^{t − (k0 + BC)} do_t over the horizon: the momentum gradient carried
    // into the tile from below.
    float carry[MAX_COLS_PER_THREAD] = {0.f, 0.f};
    const int k_end = k0 + BC;

    for (int q0 = k0; q0 < t_len; q0 += BR) {
        __syncthreads();
        load_tile_f32<T, D>(q_s, LD, q, q0, BR, t_len, 1.f);
        load_tile_f32<T, D>(g_s, LD, dout, q0, BR, t_len, 1.f);
        if (threadIdx.x < BR) {
            const int t = q0 + threadIdx.x;
            lse_s[threadIdx.x] = t < t_len ? lse2[t] : 0.f;
            delta_s[threadIdx.x] = t < t_len ? delta[t] : 0.f;
        }
        __syncthreads();
        // 1. P and dS for (query quarter + 4m, key c).
#pragma unroll
        for (int m = 0; m < BR / 4; ++m) {
            const int r = quarter + 4 * m, t = q0 + r;
            float s = 0.f, dp = 0.f;
            for (int d = 0; d < D; ++d) {
                s = fmaf(q_s[r * LD + d], k_s[c * LD + d], s);
                dp = fmaf(g_s[r * LD + d], v_s[c * LD + d], dp);
            }
            const bool live = key <= t && t < t_len && key < t_len;
            const float p = live ? exp2f(s * scale_log2 - lse_s[r]) : 0.f;
            p_s[r * 33 + c] = p;
            ds_s[r * 33 + c] = p * (dp - delta_s[r]);
        }
        __syncthreads();
        // 2. dV and dK of key c.
        for (int r = 0; r < BR; ++r) {
            const float p = p_s[r * 33 + c], ds = ds_s[r * 33 + c];
#pragma unroll
            for (int i = 0; i < COLS; ++i) {
                dv_acc[i] = fmaf(p, g_s[r * LD + quarter + 4 * i], dv_acc[i]);
                dk_acc[i] = fmaf(ds, q_s[r * LD + quarter + 4 * i], dk_acc[i]);
            }
        }
        // 3. dQ of query row c (the same thread index, read as a query row now).
        const int t = q0 + c;
        if (t < t_len) {
#pragma unroll 4
            for (int i = 0; i < COLS; ++i) {
                const int col = quarter + 4 * i;
                float acc = 0.f;
                for (int kc = 0; kc < BC; ++kc) acc = fmaf(ds_s[c * 33 + kc], k_s[kc * LD + col], acc);
                atomicAdd(dq_acc + (size_t)t * D + col, scale * acc);
            }
        }
        momentum_grad_carry<D, BR>(carry, g_s, LD, q0, k_end, t_len, eta, horizon);
    }

    // Epilogue: stage dK (scaled) and dV as f32, run the momentum recurrence down the tile's
    // rows (c_{s−1} = η (c_s + do_s), entering with η·G), store.
    __syncthreads();
    float* dk_s = q_s;
    float* dv_s = g_s;
#pragma unroll
    for (int i = 0; i < COLS; ++i) {
        dk_s[c * LD + quarter + 4 * i] = scale * dk_acc[i];
        dv_s[c * LD + quarter + 4 * i] = dv_acc[i];
    }
    __syncthreads();
    const int rows = min(BC, t_len - k0);
    if (eta > 0.f) {
#pragma unroll
        for (int j = 0; j < MAX_COLS_PER_THREAD; ++j) {
            const int col = threadIdx.x + j * THREADS;
            if (col < D) {
                // Enters as c at row k0 + rows − 1: η·G (zero past the sequence end).
                momentum_column<false, D>(eta * carry[j], eta, dv_s, LD, dout + (size_t)k0 * D, rows, col);
            }
        }
        __syncthreads();
    }
    for (int i = threadIdx.x; i < rows * D; i += THREADS) {
        const int r = i / D, col = i % D;
        dk[(size_t)(k0 + r) * D + col] = mk::from_float<T>(dk_s[r * LD + col]);
        dv[(size_t)(k0 + r) * D + col] = mk::from_float<T>(dv_s[r * LD + col]);
    }
}

// ------------------------------------------------------------------ tensor-core backward ------
// f16/bf16 at D = 64 and 128 (at D = 256 a warp's dK and dV accumulators for 16 keys would be
// 256 registers per thread; backward_mma_wide below splits the columns instead). Block = one
// key tile of 64 rows, warp w owns keys 16w..16w+15 and holds their dK and dV accumulators;
// query tiles of 32 rows stream through shared memory.
// Per query tile, in the transposed orientation of FlashAttention-2's backward:
//   Sᵀ = K Qᵀ,  Pᵀ = exp2(Sᵀ·scale_log2 − lse2),  dV += Pᵀ dO,
//   dPᵀ = V dOᵀ,  dSᵀ = Pᵀ ∘ (dPᵀ − delta),  dK += dSᵀ Q,
// then dSᵀ goes to shared memory and the block computes dQ = dS K for the query tile (each warp
// 16 queries × D/2 columns) and adds it to the f32 accumulator with atomics. Pᵀ and dSᵀ reach
// the next mma as A fragments straight from the accumulators.

// Writes a warp's m16n8 accumulator tiles acc[n] (rows row0 + g and row0 + g + 8, columns
// col0 + 8n + 2·c4 and + 1), times `mul`, into an f32 staging tile of row stride ldo.
template <int NT>
__device__ __forceinline__ void stage_fragments(float* stage, int ldo, const float (&acc)[NT][4], int row0, int col0,
                                                float mul) {
    const int lane = threadIdx.x % 32, g = lane / 4, c4 = lane % 4;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = row0 + g + 8 * h;
#pragma unroll
        for (int n = 0; n < NT; ++n)
            *reinterpret_cast<float2*>(stage + r * ldo + col0 + n * 8 + 2 * c4) =
                make_float2(mul * acc[n][2 * h], mul * acc[n][2 * h + 1]);
    }
}

// Epilogue of the tensor-core backward kernels, every thread of the block: stages the block's
// dV accumulators (each warp its rows from row0, columns from col0) as f32 [BC][D + 4] in
// `stage` (the kernel's shared memory, free now), runs the momentum recurrence down the key
// tile's rows (c_{s−1} = η (c_s + do_s), entering with η·G), stores dV; then dK, scaled.
template <typename T, int D, int BC, int NT>
__device__ __forceinline__ void backward_mma_epilogue(float* stage, const float (&dk_acc)[NT][4],
                                                      const float (&dv_acc)[NT][4], int row0, int col0,
                                                      const float (&carry)[MAX_COLS_PER_THREAD],
                                                      const T* __restrict__ dout, T* __restrict__ dk,
                                                      T* __restrict__ dv, int k0, int t_len, float scale, float eta) {
    constexpr int LDO = D + 4;
    const int rows = min(BC, t_len - k0);
    __syncthreads();  // every warp is done with the tiles that `stage` overlays
    stage_fragments(stage, LDO, dv_acc, row0, col0, 1.f);
    __syncthreads();
    if (eta > 0.f) {
#pragma unroll
        for (int j = 0; j < MAX_COLS_PER_THREAD; ++j) {
            const int col = threadIdx.x + j * THREADS;
            // Enters as c at row k0 + rows − 1: η·G (zero past the sequence end).
            if (col < D) momentum_column<false, D>(eta * carry[j], eta, stage, LDO, dout + (size_t)k0 * D, rows, col);
        }
        __syncthreads();
    }
    store_staged_rows<T, D>(stage, LDO, dv + (size_t)k0 * D, rows);
    __syncthreads();
    stage_fragments(stage, LDO, dk_acc, row0, col0, scale);
    __syncthreads();
    store_staged_rows<T, D>(stage, LDO, dk + (size_t)k0 * D, rows);
}

// The query side of one step of the tensor-core backwards: Q and dO rows q0.. (cp.async, zero
// past T) and their log-sum-exp and delta, visible to the whole block on return.
template <typename T, int D, int LD, int BR>
__device__ __forceinline__ void stage_query_tile(T* q_s, T* g_s, float* lse_s, float* delta_s,
                                                 const T* __restrict__ q, const T* __restrict__ dout,
                                                 const float* __restrict__ lse2, const float* __restrict__ delta,
                                                 int q0, int t_len) {
    load_tile_async<T, D, LD>(q_s, q, q0, BR, t_len);
    load_tile_async<T, D, LD>(g_s, dout, q0, BR, t_len);
    cp_async_commit();
    if (threadIdx.x < BR) {
        const int t = q0 + threadIdx.x;
        lse_s[threadIdx.x] = t < t_len ? lse2[t] : 0.f;
        delta_s[threadIdx.x] = t < t_len ? delta[t] : 0.f;
    }
    cp_async_wait_all();
    __syncthreads();
}

template <int D>
struct BwdMmaTile {
    static constexpr int BC = 64, BR = 32;
    static constexpr int LD = D + PAD;
    static constexpr int LDS = BR + PAD;  // dSᵀ rows (keys) of BR queries
    static constexpr int SMEM_BYTES = (2 * BC + 2 * BR) * LD * 2 + BC * LDS * 2 + 2 * BR * 4;
};

template <typename T, int D>
__device__ void backward_mma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                             const T* __restrict__ dout, const float* __restrict__ lse2,
                             const float* __restrict__ delta, float* __restrict__ dq_acc, T* __restrict__ dk,
                             T* __restrict__ dv, int t_len, float scale, float eta, int horizon) {
    using Tile = BwdMmaTile<D>;
    constexpr int BC = Tile::BC, BR = Tile::BR, LD = Tile::LD, LDS = Tile::LDS;
    static_assert(BC * (D + 4) * sizeof(float) <= Tile::SMEM_BYTES, "the f32 epilogue tile fits");
    constexpr int NT_S = BR / 8;  // n8 tiles of Sᵀ (queries) per warp
    constexpr int NT_D = D / 8;   // n8 tiles of dK, dV per warp
    constexpr float LOG2E = 1.4426950408889634f;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* k_s = reinterpret_cast<T*>(smem_raw);
    T* v_s = k_s + BC * LD;
    T* q_s = v_s + BC * LD;
    T* g_s = q_s + BR * LD;
    T* ds_s = g_s + BR * LD;  // dSᵀ: [BC keys][LDS]
    float* lse_s = reinterpret_cast<float*>(ds_s + BC * LDS);
    float* delta_s = lse_s + BR;

    const int n_k_tiles = (t_len + BC - 1) / BC;
    const int k0 = (n_k_tiles - 1 - blockIdx.y) * BC;
    const size_t head = (size_t)blockIdx.x * t_len * D;
    q += head, k += head, v += head, dout += head, dq_acc += head, dk += head, dv += head;
    lse2 += (size_t)blockIdx.x * t_len, delta += (size_t)blockIdx.x * t_len;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, c4 = lane % 4;
    const float scale_log2 = scale * LOG2E;

    load_tile_async<T, D, LD>(k_s, k, k0, BC, t_len);
    load_tile_async<T, D, LD>(v_s, v, k0, BC, t_len);
    cp_async_commit();

    float dk_acc[NT_D][4], dv_acc[NT_D][4];
#pragma unroll
    for (int n = 0; n < NT_D; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk_acc[n][e] = dv_acc[n][e] = 0.f;
    float carry[MAX_COLS_PER_THREAD] = {0.f, 0.f};
    const int k_end = k0 + BC;
    const int warp_key0 = k0 + warp * 16;

    for (int q0 = k0; q0 < t_len; q0 += BR) {
        // No barrier first: the previous tile last read Q, dO, lse and delta before the barrier
        // that completes its dSᵀ, and dQ reads only dSᵀ and K, which staging does not touch
        // (dSᵀ is rewritten after staging's own barrier).
        stage_query_tile<T, D, LD, BR>(q_s, g_s, lse_s, delta_s, q, dout, lse2, delta, q0, t_len);
        // Warps whose keys all come after this query tile see only masked entries.
        const bool warp_active = warp_key0 <= q0 + BR - 1;

        float s[NT_S][4], dp[NT_S][4];
#pragma unroll
        for (int n = 0; n < NT_S; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
        if (warp_active) {
            // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ share the k-loop over the head dimension.
#pragma unroll
            for (int kk = 0; kk < D; kk += 16) {
                uint32_t a_k[4], a_v[4];
                ldmatrix_x4(a_k, k_s + (warp * 16 + lane % 16) * LD + kk + (lane / 16) * 8);
                ldmatrix_x4(a_v, v_s + (warp * 16 + lane % 16) * LD + kk + (lane / 16) * 8);
#pragma unroll
                for (int n = 0; n < NT_S; n += 2) {
                    const int row = (n * 8 + (lane / 16) * 8 + lane % 8) * LD + kk + ((lane / 8) % 2) * 8;
                    uint32_t b[4];
                    ldmatrix_x4(b, q_s + row);
                    mma_16816<T>(s[n], a_k, b[0], b[1]);
                    mma_16816<T>(s[n + 1], a_k, b[2], b[3]);
                    ldmatrix_x4(b, g_s + row);
                    mma_16816<T>(dp[n], a_v, b[0], b[1]);
                    mma_16816<T>(dp[n + 1], a_v, b[2], b[3]);
                }
            }
        }
        // Pᵀ and dSᵀ (both kept as f32 in s and dp).
#pragma unroll
        for (int n = 0; n < NT_S; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = warp_key0 + g + 8 * (e / 2);
                const int col = n * 8 + 2 * c4 + (e % 2);
                const int t = q0 + col;
                const bool live = key <= t && t < t_len && key < t_len;
                const float p = live ? exp2f(s[n][e] * scale_log2 - lse_s[col]) : 0.f;
                s[n][e] = p;
                dp[n][e] = p * (dp[n][e] - delta_s[col]);
            }
        }
        if (warp_active) {
#pragma unroll
            for (int m = 0; m < BR / 16; ++m) {
                uint32_t a_p[4], a_ds[4];
                a_p[0] = pack2<T>(s[2 * m][0], s[2 * m][1]);
                a_p[1] = pack2<T>(s[2 * m][2], s[2 * m][3]);
                a_p[2] = pack2<T>(s[2 * m + 1][0], s[2 * m + 1][1]);
                a_p[3] = pack2<T>(s[2 * m + 1][2], s[2 * m + 1][3]);
                a_ds[0] = pack2<T>(dp[2 * m][0], dp[2 * m][1]);
                a_ds[1] = pack2<T>(dp[2 * m][2], dp[2 * m][3]);
                a_ds[2] = pack2<T>(dp[2 * m + 1][0], dp[2 * m + 1][1]);
                a_ds[3] = pack2<T>(dp[2 * m + 1][2], dp[2 * m + 1][3]);
#pragma unroll
                for (int n = 0; n < NT_D; n += 2) {
                    const int row = (m * 16 + ((lane / 8) % 2) * 8 + lane % 8) * LD + n * 8 + (lane / 16) * 8;
                    uint32_t b[4];
                    ldmatrix_x4_trans(b, g_s + row);  // dV += Pᵀ dO
                    mma_16816<T>(dv_acc[n], a_p, b[0], b[1]);
                    mma_16816<T>(dv_acc[n + 1], a_p, b[2], b[3]);
                    ldmatrix_x4_trans(b, q_s + row);  // dK += dSᵀ Q
                    mma_16816<T>(dk_acc[n], a_ds, b[0], b[1]);
                    mma_16816<T>(dk_acc[n + 1], a_ds, b[2], b[3]);
                }
            }
        }
        // dSᵀ to shared memory for dQ.
#pragma unroll
        for (int n = 0; n < NT_S; ++n) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int key_row = warp * 16 + g + 8 * h;
                *reinterpret_cast<uint32_t*>(ds_s + key_row * LDS + n * 8 + 2 * c4) =
                    pack2<T>(dp[n][2 * h], dp[n][2 * h + 1]);
            }
        }
        momentum_grad_carry<D, BR>(carry, g_s, LD, q0, k_end, t_len, eta, horizon);
        __syncthreads();  // dSᵀ complete
        // dQ = dS K: warp w takes queries 16·(w % 2) .. +15 and columns (w / 2)·D/2 .. +D/2.
        {
            constexpr int NT_Q = D / 16;  // n8 tiles in half the head dimension
            const int qb = (warp % 2) * 16, cb = (warp / 2) * (D / 2);
            float dq[NT_Q][4];
#pragma unroll
            for (int n = 0; n < NT_Q; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < BC; kk += 16) {
                uint32_t a[4];
                ldmatrix_x4_trans(a, ds_s + (kk + (lane / 16) * 8 + lane % 8) * LDS + qb + ((lane / 8) % 2) * 8);
#pragma unroll
                for (int n = 0; n < NT_Q; n += 2) {
                    uint32_t b[4];
                    ldmatrix_x4_trans(b, k_s + (kk + ((lane / 8) % 2) * 8 + lane % 8) * LD + cb + n * 8 + (lane / 16) * 8);
                    mma_16816<T>(dq[n], a, b[0], b[1]);
                    mma_16816<T>(dq[n + 1], a, b[2], b[3]);
                }
            }
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int t = q0 + qb + g + 8 * h;
                if (t < t_len) {
#pragma unroll
                    for (int n = 0; n < NT_Q; ++n) {
                        float* dst = dq_acc + (size_t)t * D + cb + n * 8 + 2 * c4;
                        atomicAdd(dst, scale * dq[n][2 * h]);
                        atomicAdd(dst + 1, scale * dq[n][2 * h + 1]);
                    }
                }
            }
        }
    }

    // Epilogue, reusing the tiles as f32 staging: dV (plus momentum), then dK.
    backward_mma_epilogue<T, D, BC>(reinterpret_cast<float*>(smem_raw), dk_acc, dv_acc, warp * 16, 0, carry, dout,
                                    dk, dv, k0, t_len, scale, eta);
}

// ------------------------------------------------------------------ tensor-core backward, D = 256
// One warp cannot hold 16 keys × 256 columns of both dK and dV (256 f32 accumulators per
// thread), so at D = 256 the block takes 32 keys and splits the work four ways per phase:
//   1. Sᵀ = K Qᵀ and dPᵀ = V dOᵀ: warp w computes keys 16·(w % 2) × queries 16·(w / 2) of the
//      32 × 32 tile; Pᵀ and dSᵀ go to shared memory (FlashAttention-2's layout for large heads);
//   2. dV += Pᵀ dO, dK += dSᵀ Q: warp w owns keys 16·(w % 2) and columns 128·(w / 2) .. +127
//      (64 + 64 f32 accumulators per thread), A fragments from the staged Pᵀ and dSᵀ;
//   3. dQ = dS K: warp w takes queries 16·(w % 2) and columns 128·(w / 2), in two passes of 64.
// Shared memory: K, V, Q, dO tiles (4 · 32 · 264 halves = 67,584 B) + Pᵀ, dSᵀ (2 · 32 · 40 halves
// = 5,120 B) + lse2, delta (256 B) = 72,960 B, opted in above 48 KiB: room for 2 blocks per SM
// on sm_80 (164 KiB) and 3 on sm_90 (227 KiB); ~224 registers per thread cap both at 2 (8 warps).

template <int D>
struct BwdMmaWideTile {
    static constexpr int BC = 32, BR = 32;
    static constexpr int LD = D + PAD;
    static constexpr int LDP = BR + PAD;  // Pᵀ and dSᵀ rows (keys) of BR queries
    static constexpr int SMEM_BYTES = (2 * BC + 2 * BR) * LD * 2 + 2 * BC * LDP * 2 + 2 * BR * 4;
};

template <typename T, int D>
__device__ void backward_mma_wide(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                  const T* __restrict__ dout, const float* __restrict__ lse2,
                                  const float* __restrict__ delta, float* __restrict__ dq_acc, T* __restrict__ dk,
                                  T* __restrict__ dv, int t_len, float scale, float eta, int horizon) {
    using Tile = BwdMmaWideTile<D>;
    constexpr int BC = Tile::BC, BR = Tile::BR, LD = Tile::LD, LDP = Tile::LDP;
    constexpr int HALF = D / 2;      // columns of dK, dV and dQ per warp
    constexpr int NT_H = HALF / 8;   // their n8 tiles
    constexpr int NT_DQ = NT_H / 2;  // n8 tiles of one dQ pass
    constexpr float LOG2E = 1.4426950408889634f;
    static_assert(BC == 32 && BR == 32, "the warp split below assumes a 32 × 32 tile");
    static_assert(BC * (D + 4) * sizeof(float) <= Tile::SMEM_BYTES, "the f32 epilogue tile fits");
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* k_s = reinterpret_cast<T*>(smem_raw);
    T* v_s = k_s + BC * LD;
    T* q_s = v_s + BC * LD;
    T* g_s = q_s + BR * LD;
    T* p_s = g_s + BR * LD;    // Pᵀ: [BC keys][LDP]
    T* ds_s = p_s + BC * LDP;  // dSᵀ: [BC keys][LDP]
    float* lse_s = reinterpret_cast<float*>(ds_s + BC * LDP);
    float* delta_s = lse_s + BR;

    const int n_k_tiles = (t_len + BC - 1) / BC;
    const int k0 = (n_k_tiles - 1 - blockIdx.y) * BC;
    const size_t head = (size_t)blockIdx.x * t_len * D;
    q += head, k += head, v += head, dout += head, dq_acc += head, dk += head, dv += head;
    lse2 += (size_t)blockIdx.x * t_len, delta += (size_t)blockIdx.x * t_len;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, c4 = lane % 4;
    const float scale_log2 = scale * LOG2E;
    const int kr = (warp % 2) * 16;    // the warp's keys in the tile (phases 1 and 2)
    const int qc = (warp / 2) * 16;    // its queries in the query tile (phase 1)
    const int qr = (warp % 2) * 16;    // its queries in the query tile (phase 3)
    const int cb = (warp / 2) * HALF;  // its columns of dK, dV, dQ (phases 2 and 3)

    load_tile_async<T, D, LD>(k_s, k, k0, BC, t_len);
    load_tile_async<T, D, LD>(v_s, v, k0, BC, t_len);
    cp_async_commit();

    float dk_acc[NT_H][4], dv_acc[NT_H][4];
#pragma unroll
    for (int n = 0; n < NT_H; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk_acc[n][e] = dv_acc[n][e] = 0.f;
    float carry[MAX_COLS_PER_THREAD] = {0.f, 0.f};
    const int k_end = k0 + BC;

    for (int q0 = k0; q0 < t_len; q0 += BR) {
        __syncthreads();  // the previous query tile's Q, dO, Pᵀ and dSᵀ are consumed
        stage_query_tile<T, D, LD, BR>(q_s, g_s, lse_s, delta_s, q, dout, lse2, delta, q0, t_len);

        // 1. Sᵀ and dPᵀ for keys kr..kr+15 × queries qc..qc+15 (skipped when every key of the
        //    warp comes after every query: all masked).
        float s[2][4], dp[2][4];
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
        if (k0 + kr <= q0 + qc + 15) {
#pragma unroll 4
            for (int kk = 0; kk < D; kk += 16) {
                uint32_t a_k[4], a_v[4], b[4];
                ldmatrix_x4(a_k, k_s + (kr + lane % 16) * LD + kk + (lane / 16) * 8);
                ldmatrix_x4(a_v, v_s + (kr + lane % 16) * LD + kk + (lane / 16) * 8);
                const int row = (qc + (lane / 16) * 8 + lane % 8) * LD + kk + ((lane / 8) % 2) * 8;
                ldmatrix_x4(b, q_s + row);
                mma_16816<T>(s[0], a_k, b[0], b[1]);
                mma_16816<T>(s[1], a_k, b[2], b[3]);
                ldmatrix_x4(b, g_s + row);
                mma_16816<T>(dp[0], a_v, b[0], b[1]);
                mma_16816<T>(dp[1], a_v, b[2], b[3]);
            }
        }
        // Pᵀ and dSᵀ, to shared memory in the storage dtype.
#pragma unroll
        for (int n = 0; n < 2; ++n) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int key_row = kr + g + 8 * h, key = k0 + key_row;
                float p[2], ds[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int col = qc + n * 8 + 2 * c4 + e;
                    const int t = q0 + col;
                    const bool live = key <= t && t < t_len && key < t_len;
                    p[e] = live ? exp2f(s[n][2 * h + e] * scale_log2 - lse_s[col]) : 0.f;
                    ds[e] = p[e] * (dp[n][2 * h + e] - delta_s[col]);
                }
                const int at = key_row * LDP + qc + n * 8 + 2 * c4;
                *reinterpret_cast<uint32_t*>(p_s + at) = pack2<T>(p[0], p[1]);
                *reinterpret_cast<uint32_t*>(ds_s + at) = pack2<T>(ds[0], ds[1]);
            }
        }
        momentum_grad_carry<D, BR>(carry, g_s, LD, q0, k_end, t_len, eta, horizon);
        __syncthreads();  // Pᵀ and dSᵀ complete

        // 2. dV += Pᵀ dO and dK += dSᵀ Q for keys kr..kr+15, columns cb..cb+HALF−1.
#pragma unroll
        for (int m = 0; m < BR / 16; ++m) {
            uint32_t a_p[4], a_ds[4];
            ldmatrix_x4(a_p, p_s + (kr + lane % 16) * LDP + m * 16 + (lane / 16) * 8);
            ldmatrix_x4(a_ds, ds_s + (kr + lane % 16) * LDP + m * 16 + (lane / 16) * 8);
#pragma unroll
            for (int n = 0; n < NT_H; n += 2) {
                const int row = (m * 16 + ((lane / 8) % 2) * 8 + lane % 8) * LD + cb + n * 8 + (lane / 16) * 8;
                uint32_t b[4];
                ldmatrix_x4_trans(b, g_s + row);
                mma_16816<T>(dv_acc[n], a_p, b[0], b[1]);
                mma_16816<T>(dv_acc[n + 1], a_p, b[2], b[3]);
                ldmatrix_x4_trans(b, q_s + row);
                mma_16816<T>(dk_acc[n], a_ds, b[0], b[1]);
                mma_16816<T>(dk_acc[n + 1], a_ds, b[2], b[3]);
            }
        }

        // 3. dQ = dS K for queries qr..qr+15, columns cb..cb+HALF−1, NT_DQ n8 tiles per pass.
        uint32_t a_dq[BC / 16][4];
#pragma unroll
        for (int m = 0; m < BC / 16; ++m)
            ldmatrix_x4_trans(a_dq[m], ds_s + (m * 16 + (lane / 16) * 8 + lane % 8) * LDP + qr + ((lane / 8) % 2) * 8);
#pragma unroll
        for (int pass = 0; pass < 2; ++pass) {
            const int c0 = cb + pass * (NT_DQ * 8);
            float dq[NT_DQ][4];
#pragma unroll
            for (int n = 0; n < NT_DQ; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;
#pragma unroll
            for (int m = 0; m < BC / 16; ++m) {
#pragma unroll
                for (int n = 0; n < NT_DQ; n += 2) {
                    uint32_t b[4];
                    ldmatrix_x4_trans(b, k_s + (m * 16 + ((lane / 8) % 2) * 8 + lane % 8) * LD + c0 + n * 8 + (lane / 16) * 8);
                    mma_16816<T>(dq[n], a_dq[m], b[0], b[1]);
                    mma_16816<T>(dq[n + 1], a_dq[m], b[2], b[3]);
                }
            }
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int t = q0 + qr + g + 8 * h;
                if (t < t_len) {
#pragma unroll
                    for (int n = 0; n < NT_DQ; ++n) {
                        float* dst = dq_acc + (size_t)t * D + c0 + n * 8 + 2 * c4;
                        atomicAdd(dst, scale * dq[n][2 * h]);
                        atomicAdd(dst + 1, scale * dq[n][2 * h + 1]);
                    }
                }
            }
        }
    }

    // Epilogue, reusing the tiles as f32 staging [BC][D + 4] (33,280 B): dV (plus momentum), then dK.
    backward_mma_epilogue<T, D, BC>(reinterpret_cast<float*>(smem_raw), dk_acc, dv_acc, kr, cb, carry, dout, dk, dv,
                                    k0, t_len, scale, eta);
}

// delta_t = Σ_d dO_t · O_t, one warp per row.
template <typename T>
__device__ void backward_delta(const T* __restrict__ dout, const T* __restrict__ o, float* __restrict__ delta,
                               uint64_t rows, int d) {
    const uint64_t warp = mk::global_thread() / 32;
    const int lane = threadIdx.x % 32;
    if (warp >= rows) return;
    float acc = 0.f;
    for (int c = lane; c < d; c += 32) acc += mk::to_float(dout[warp * d + c]) * mk::to_float(o[warp * d + c]);
    acc = mk::warp_sum(acc);
    if (lane == 0) delta[warp] = acc;
}

template <typename T>
__device__ void dq_finish(const float* __restrict__ acc, T* __restrict__ dq, uint64_t n) {
    for (uint64_t i = mk::global_thread(); i < n; i += mk::grid_threads()) dq[i] = mk::from_float<T>(acc[i]);
}

// ------------------------------------------------------------------ reference -----------------
// One block of D threads per (query row, head); thread d owns output column d. Logits by a block
// reduction, online softmax in natural-log units, momentum by the explicit sum with powf.
template <typename T>
__device__ void forward_reference(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                  T* __restrict__ out, int t_len, int d, float scale, float eta) {
    __shared__ float scratch[32];
    const int t = blockIdx.x, col = threadIdx.x;
    const size_t head = (size_t)blockIdx.y * t_len * d;
    q += head, k += head, v += head, out += head;
    const float q_c = mk::to_float(q[(size_t)t * d + col]);
    float m = -INFINITY, l = 0.f, acc = 0.f;
    for (int s = 0; s <= t; ++s) {
        const float logit = scale * mk::block_sum(q_c * mk::to_float(k[(size_t)s * d + col]), scratch);
        const float new_m = fmaxf(m, logit);
        const float old_w = m == -INFINITY ? 0.f : expf(m - new_m);
        const float w = expf(logit - safe_max(new_m));  // a −∞ logit weighs 0, as in the fast kernels
        l = l * old_w + w;
        acc = acc * old_w + w * mk::to_float(v[(size_t)s * d + col]);
        m = new_m;
    }
    float mom = 0.f;
    for (int i = 0; i < t; ++i) mom += powf(eta, (float)(t - i)) * mk::to_float(v[(size_t)i * d + col]);
    out[(size_t)t * d + col] = mk::from_float<T>(acc / l + mom);
}

// The backward by the obvious algorithm, in two kernels of one block of D threads per row (thread
// c owns column c), natural-log units, every logit and dO·v recomputed by a block reduction:
//   rows: for query row t, the softmax statistics m_t, l_t, then Δ_t = Σ_s P_ts dP_ts with
//         dP_ts = dO_t·v_s, then dq_t = scale Σ_s P_ts (dP_ts − Δ_t) k_s; (m_t, l_t, Δ_t) to
//         `stats` for the second kernel;
//   cols: for key row s, dk_s = scale Σ_{t≥s} P_ts (dP_ts − Δ_t) q_t and
//         dv_s = Σ_{t≥s} P_ts dO_t + Σ_{t>s} η^{t−s} dO_t (the momentum term by powf).
// The reference the GPU tests hold the fused backward kernels against.
template <typename T>
__device__ float reference_logit(const T* q_row, const T* k_row, int col, float scale, float* scratch) {
    return scale * mk::block_sum(mk::to_float(q_row[col]) * mk::to_float(k_row[col]), scratch);
}

template <typename T>
__device__ void backward_reference_rows(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                        const T* __restrict__ g, float* __restrict__ stats, T* __restrict__ dq,
                                        int t_len, int d, float scale) {
    __shared__ float scratch[32];
    const int t = blockIdx.x, col = threadIdx.x;
    const size_t head = (size_t)blockIdx.y * t_len * d;
    q += head, k += head, v += head, g += head, dq += head;
    const T* q_t = q + (size_t)t * d;
    const T* g_t = g + (size_t)t * d;
    float m = -INFINITY, l = 0.f;
    for (int s = 0; s <= t; ++s) {
        const float logit = reference_logit(q_t, k + (size_t)s * d, col, scale, scratch);
        const float new_m = fmaxf(m, logit);
        l = (m == -INFINITY ? 0.f : l * expf(m - new_m)) + expf(logit - safe_max(new_m));
        m = new_m;
    }
    float delta = 0.f;
    for (int s = 0; s <= t; ++s) {
        const float p = expf(reference_logit(q_t, k + (size_t)s * d, col, scale, scratch) - m) / l;
        delta += p * reference_logit(g_t, v + (size_t)s * d, col, 1.f, scratch);
    }
    float acc = 0.f;
    for (int s = 0; s <= t; ++s) {
        const float p = expf(reference_logit(q_t, k + (size_t)s * d, col, scale, scratch) - m) / l;
        const float dp = reference_logit(g_t, v + (size_t)s * d, col, 1.f, scratch);
        acc += p * (dp - delta) * mk::to_float(k[(size_t)s * d + col]);
    }
    dq[(size_t)t * d + col] = mk::from_float<T>(scale * acc);
    if (col == 0) {
        float* row = stats + ((size_t)blockIdx.y * t_len + t) * 3;
        row[0] = m, row[1] = l, row[2] = delta;
    }
}

template <typename T>
__device__ void backward_reference_cols(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                        const T* __restrict__ g, const float* __restrict__ stats,
                                        T* __restrict__ dk, T* __restrict__ dv, int t_len, int d, float scale,
                                        float eta) {
    __shared__ float scratch[32];
    const int s = blockIdx.x, col = threadIdx.x;
    const size_t head = (size_t)blockIdx.y * t_len * d;
    q += head, k += head, v += head, g += head, dk += head, dv += head;
    stats += (size_t)blockIdx.y * t_len * 3;
    const T* k_s = k + (size_t)s * d;
    const T* v_s = v + (size_t)s * d;
    float dk_c = 0.f, dv_c = 0.f;
    for (int t = s; t < t_len; ++t) {
        const float* row = stats + (size_t)t * 3;
        const float p = expf(reference_logit(q + (size_t)t * d, k_s, col, scale, scratch) - row[0]) / row[1];
        const float dp = reference_logit(g + (size_t)t * d, v_s, col, 1.f, scratch);
        dk_c += p * (dp - row[2]) * mk::to_float(q[(size_t)t * d + col]);
        dv_c += p * mk::to_float(g[(size_t)t * d + col]);
    }
    for (int t = s + 1; t < t_len; ++t) dv_c += powf(eta, (float)(t - s)) * mk::to_float(g[(size_t)t * d + col]);
    dk[(size_t)s * d + col] = mk::from_float<T>(scale * dk_c);
    dv[(size_t)s * d + col] = mk::from_float<T>(dv_c);
}

// Unfused baseline: out += momentum, one thread per (head, column), sequential over all rows.
// Forward: out_t += Σ_{s<t} η^{t−s} x_s (x = v, out = the attention output). REVERSE, the
// backward's share of dv: out_s += Σ_{t>s} η^{t−s} x_t (x = dL/do, out = the attention's dv).
template <typename T, bool REVERSE>
__device__ void momentum_scan(const T* __restrict__ x, T* __restrict__ out, uint64_t columns, uint64_t t_len,
                              uint64_t d, float eta) {
    for (uint64_t i = mk::global_thread(); i < columns; i += mk::grid_threads()) {
        const uint64_t base = (i / d) * t_len * d + i % d;
        float c = 0.f;
        for (uint64_t step = 0; step < t_len; ++step) {
            const uint64_t at = base + (REVERSE ? t_len - 1 - step : step) * d;
            out[at] = mk::from_float<T>(mk::to_float(out[at]) + c);
            c = eta * (c + mk::to_float(x[at]));
        }
    }
}

}  // namespace

// ------------------------------------------------------------------ entry points --------------

#define MK_FWD(NAME, T, D, IMPL)                                                                        \
    extern "C" __global__ void __launch_bounds__(THREADS)                                              \
        NAME(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out, \
             T* __restrict__ attn_out, float* __restrict__ lse2, int t_len, float scale_log2, float eta,    \
             int horizon) {                                                                            \
        IMPL<T, D>(q, k, v, out, attn_out, lse2, t_len, scale_log2, eta, horizon);                     \
    }

#define MK_BWD(NAME, T, D)                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS)                                              \
        NAME(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,                 \
             const T* __restrict__ dout, const float* __restrict__ lse2, const float* __restrict__ delta, \
             float* __restrict__ dq_acc, T* __restrict__ dk, T* __restrict__ dv, int t_len, float scale, \
             float eta, int horizon) {                                                                 \
        backward_simt<T, D>(q, k, v, dout, lse2, delta, dq_acc, dk, dv, t_len, scale, eta, horizon);    \
    }

#define MK_BWD_MMA(NAME, T, D)                                                                          \
    extern "C" __global__ void __launch_bounds__(THREADS)                                              \
        NAME(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,                 \
             const T* __restrict__ dout, const float* __restrict__ lse2, const float* __restrict__ delta, \
             float* __restrict__ dq_acc, T* __restrict__ dk, T* __restrict__ dv, int t_len, float scale, \
             float eta, int horizon) {                                                                 \
        backward_mma<T, D>(q, k, v, dout, lse2, delta, dq_acc, dk, dv, t_len, scale, eta, horizon);     \
    }

#define MK_BWD_MMA_WIDE(NAME, T, D)                                                                     \
    extern "C" __global__ void __launch_bounds__(THREADS)                                              \
        NAME(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,                 \
             const T* __restrict__ dout, const float* __restrict__ lse2, const float* __restrict__ delta, \
             float* __restrict__ dq_acc, T* __restrict__ dk, T* __restrict__ dv, int t_len, float scale, \
             float eta, int horizon) {                                                                 \
        backward_mma_wide<T, D>(q, k, v, dout, lse2, delta, dq_acc, dk, dv, t_len, scale, eta, horizon); \
    }

#define MK_DTYPE(DN, T, FWD_IMPL)                                                                        \
    MK_FWD(mattn_fwd_##DN##_d64, T, 64, FWD_IMPL)                                                       \
    MK_FWD(mattn_fwd_##DN##_d128, T, 128, FWD_IMPL)                                                     \
    MK_FWD(mattn_fwd_##DN##_d256, T, 256, FWD_IMPL)                                                     \
    extern "C" __global__ void mattn_bwd_delta_##DN(const T* __restrict__ dout, const T* __restrict__ o, \
                                                    float* __restrict__ delta, uint64_t rows, int d) {  \
        backward_delta<T>(dout, o, delta, rows, d);                                                     \
    }                                                                                                  \
    extern "C" __global__ void mattn_dq_finish_##DN(const float* __restrict__ acc, T* __restrict__ dq,   \
                                                    uint64_t n) {                                      \
        dq_finish<T>(acc, dq, n);                                                                       \
    }                                                                                                  \
    extern "C" __global__ void mattn_fwd_reference_##DN(const T* __restrict__ q, const T* __restrict__ k, \
                                                        const T* __restrict__ v, T* __restrict__ out,   \
                                                        int t_len, int d, float scale, float eta) {     \
        forward_reference<T>(q, k, v, out, t_len, d, scale, eta);                                       \
    }                                                                                                  \
    extern "C" __global__ void mattn_bwd_reference_rows_##DN(const T* q, const T* k, const T* v,          \
                                                             const T* g, float* stats, T* dq, int t_len, \
                                                             int d, float scale) {                       \
        backward_reference_rows<T>(q, k, v, g, stats, dq, t_len, d, scale);                              \
    }                                                                                                  \
    extern "C" __global__ void mattn_bwd_reference_cols_##DN(const T* q, const T* k, const T* v,          \
                                                             const T* g, const float* stats, T* dk,     \
                                                             T* dv, int t_len, int d, float scale,      \
                                                             float eta) {                               \
        backward_reference_cols<T>(q, k, v, g, stats, dk, dv, t_len, d, scale, eta);                     \
    }                                                                                                  \
    extern "C" __global__ void mattn_momentum_scan_##DN(const T* __restrict__ v, T* __restrict__ out,    \
                                                        uint64_t columns, uint64_t t_len, uint64_t d,  \
                                                        float eta) {                                   \
        momentum_scan<T, false>(v, out, columns, t_len, d, eta);                                        \
    }                                                                                                  \
    extern "C" __global__ void mattn_momentum_scan_reverse_##DN(const T* __restrict__ g,                 \
                                                                T* __restrict__ dv, uint64_t columns,   \
                                                                uint64_t t_len, uint64_t d, float eta) { \
        momentum_scan<T, true>(g, dv, columns, t_len, d, eta);                                          \
    }

MK_DTYPE(f16, __half, forward_mma)
MK_DTYPE(bf16, __nv_bfloat16, forward_mma)
MK_BWD_MMA(mattn_bwd_mma_f16_d64, __half, 64)
MK_BWD_MMA(mattn_bwd_mma_f16_d128, __half, 128)
MK_BWD_MMA(mattn_bwd_mma_bf16_d64, __nv_bfloat16, 64)
MK_BWD_MMA(mattn_bwd_mma_bf16_d128, __nv_bfloat16, 128)
MK_BWD_MMA_WIDE(mattn_bwd_mma_f16_d256, __half, 256)
MK_BWD_MMA_WIDE(mattn_bwd_mma_bf16_d256, __nv_bfloat16, 256)
MK_DTYPE(f32, float, forward_simt)
MK_BWD(mattn_bwd_f32_d64, float, 64)
MK_BWD(mattn_bwd_f32_d128, float, 128)
MK_BWD(mattn_bwd_f32_d256, float, 256)
