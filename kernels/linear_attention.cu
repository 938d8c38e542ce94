// Linear attention: a chunked "core" (in f32 SIMT and tensor-core versions) that every forward
// and backward pass is built from, and obviously correct reference kernels.
//
// The core computes, for each work item (a run of rows of one (sequence, head), with an
// optional initial state), o_t = scale · φ(q_t)ᵀ S_t (÷ (φ(q_t)·z_t + eps) when normalising)
// plus an optional momentum term Σ_{i<t} η^{t−i} m_i, where S_t = S_0 + Σ_{s≤t} φ(k_s) v_sᵀ
// (over all s when non-causal), and the final state. `reverse` runs time backwards (row
// len−1 first), which is what the backward needs: with g' the gradient of the augmented output
// [num, den], the backward is three more core passes (run as one launch, see "backward"):
//   dφ(Q) = core(q = g', k = [v,1], v = φ(K), S_0 = [S_0,z_0]ᵀ)
//   dφ(K) = core(q = [v,1], k = g', v = φ(Q), S_0 = dS'_Tᵀ, reverse)
//   dV'   = core(q = φ(K), k = φ(Q), v = g', S_0 = dS'_T, reverse)  → final state = dS'_0
// Either core only computes; where it reads operands and writes results is an I/O policy
// (ForwardIo for the forward, PrepIo and PassIo for the backward), so the backward reads q, k,
// v, ∂L/∂o and the states in place and writes dq, dk, dv, ∂S_0, ∂z_0 directly.
//
// Core layout: one block of 256 threads per (work item, 64-column tile of v). Per chunk of C
// rows it stages φ(Q), φ(K), the V tile, the intra-chunk scores A and the output in shared
// memory, keeps the state tile S[:, tile] and z in shared memory for the whole sequence, and
// computes, with each thread owning a (C/16)×4 register micro-tile:
//   A = mask(φ(Q)φ(K)ᵀ);  O = φ(Q)·S + A·V;  S += φ(K)ᵀV;  z += Σ φ(K)
// Accumulation is f32 throughout. This SIMT core serves f32 and momentum; f16/bf16 run
// core_mma (tensor cores), below, forward and backward.
// C = 64 for Dk ≤ 128 and 32 above (shared memory), so every state stays on chip.
//
// A split form for few (sequence, head)s uses the same core on groups of chunks: pass 1 with
// outputs off gives each group's local state, la_state_scan turns them into each group's
// initial state (and the final state), pass 2 computes every group's outputs in parallel.
#include "tensor_core.cuh"

namespace {

constexpr int THREADS = 256;
constexpr int TILE = 64;          // v columns per block
constexpr int TILE_LD = TILE + 1;  // padded shared-memory row stride

enum FeatureMap { IDENTITY = 0, ELU_PLUS_ONE = 1, RELU = 2 };

__device__ __forceinline__ float phi(int fm, float x) {
    if (fm == ELU_PLUS_ONE) return x > 0.f ? x + 1.f : __expf(x);
    if (fm == RELU) return fmaxf(x, 0.f);
    return x;
}

__device__ __forceinline__ float dphi(int fm, float x) {
    if (fm == ELU_PLUS_ONE) return x > 0.f ? 1.f : __expf(x);
    if (fm == RELU) return x > 0.f ? 1.f : 0.f;
    return 1.f;
}

// A work item: rows row0 .. row0+len of the [rows, D] views; state_in / state_out index the
// [*, dk, dv] state buffers (−1: zeros / not written).
struct Item {
    long long row0, len, state_in, state_out;
};

struct CoreArgs {
    const void* q;   // [rows, dk]   (TIn)
    const void* k;   // [rows, dk]   (TIn)
    const void* v;   // [rows, dv]   (TIn)
    void* out;       // [rows, dv]   (TOut) or null: no outputs (split pass 1)
    const Item* items;
    int n_items;
    int dk, dv;
    const float* s_in;  // [*, dk, dv] or null
    const float* z_in;  // [*, dk] or null
    float* s_out;       // [*, dk, dv] or null
    float* z_out;       // [*, dk] or null
    int fm, causal, reverse, normalize;
    int accumulate;  // non-causal: add the item's own φ(K)ᵀV to the initial state (0 when the
                     // initial state already is the total, split pass 2)
    float scale, eps;
    float eta;            // momentum decay; < 0: none
    const void* mom;      // [rows, mom_ld] (TIn): the momentum's source (v, or ∂L/∂o)
    int mom_width, mom_ld;
};
// The launchers in ops/linear_attention/cuda.rs mirror these structs; they assert the same sizes.
static_assert(sizeof(Item) == 32, "Item layout");
static_assert(sizeof(CoreArgs) == 136, "CoreArgs layout");

// Shared-memory plan of the core for a given (C, dk); all in floats.
struct Smem {
    int ld_qk, q, k, v, a, s, z, den, m, o, total;
    __host__ __device__ Smem(int c, int dk) {
        ld_qk = dk + 1;
        q = 0;
        k = q + c * ld_qk;
        v = k + c * ld_qk;
        a = v + c * TILE_LD;
        s = a + c * (c + 1);
        z = s + dk * TILE_LD;
        den = z + dk;
        m = den + c;
        o = m + TILE;
        total = o + c * TILE;  // the output tile, os_index
    }
};

// Where element (i, j) of a core's f32 output tile Os (C rows of TILE floats) lives: columns
// XOR-swizzled in groups of 8 by the row, so that the tensor-core core's fragment-layout float2
// stores (rows g, g + 8; columns 8·nt + 2·tq) hit 32 distinct banks per half-warp, while a row's
// consecutive columns stay a permutation of themselves (the readers' row-wise loops stay
// conflict-free) and its aligned groups of 4 and 8 stay together. The f32 state tile of the
// tensor-core core is laid out the same way (sf_index).
__device__ __forceinline__ int os_index(int i, int j) { return i * TILE + (j ^ ((i & 3) << 3)); }

// Physical row of logical step `t` of an item (time runs backwards when reversing).
__device__ __forceinline__ long long row_of(const Item& it, long long t, int reverse) {
    return it.row0 + (reverse ? it.len - 1 - t : t);
}

// ---------------------------------------------------------------- 16-byte global traffic ----
// Rows of q, k, v and o move between global and shared memory as 16-byte pieces (8 halves or
// 4 floats): consecutive threads take consecutive pieces of a row, so a warp reads 512
// contiguous bytes per instruction where it read 64 or 128 before.
//
// Alignment rule, decided per launch and per tensor (the same answer in every block and thread,
// so the branch never diverges): a [rows, width] tensor moves as pieces iff `width` is a
// multiple of the piece (8 for f16/bf16, 4 for f32) and its base address is 16-byte aligned.
// Then every row starts on a 16-byte boundary whatever its index (row·width·size is a multiple
// of 16), so varlen segment starts, split groups and reversed items at any row are aligned too;
// pieces start at columns that are multiples of the piece, and a 64-column v tile (j0 = 64·y)
// and the padded key width are whole pieces, so a piece is either wholly inside the row's
// valid columns or wholly outside (zero-filled). Any other width or base takes the scalar path
// (one element per thread), with the same values and the same order of arithmetic.
template <typename T>
__device__ __forceinline__ bool rows_vectorize(const void* base, int width) {
    return width % (16 / (int)sizeof(T)) == 0 && (reinterpret_cast<uintptr_t>(base) & 15) == 0;
}

// One 16-byte piece at p. A misaligned piece faults on a GPU; the CPU emulation
// (scripts/emulate) checks every address so that a wrong alignment decision fails there too.
template <typename T, int N = 16 / sizeof(T)>
__device__ __forceinline__ mk::Vec<T, N> ld16(const T* p) {
#ifdef MK_HOST_EMULATION
    mk_emulated_check_aligned(p, 16);
#endif
    return mk::load_vec<T, N>(p);
}
template <typename T, int N = 16 / sizeof(T)>
__device__ __forceinline__ void st16(T* p, const mk::Vec<T, N>& x) {
#ifdef MK_HOST_EMULATION
    mk_emulated_check_aligned(p, 16);
#endif
    mk::store_vec<T, N>(p, x);
}

// Stages rows 0..n of a chunk into dst (row stride ld, floats): `cols` columns per row, those
// past `valid` and rows past n zero; piece(i, c, x) fetches V columns c.. of row i as floats.
// Only for vectorised operands (cols and valid multiples of V).
template <int V, typename Piece>
__device__ __forceinline__ void stage_pieces(float* dst, int ld, int rows, int cols, int valid, int n, Piece&& piece) {
    const int per = cols / V;
#pragma unroll 1
    for (int e = threadIdx.x; e < rows * per; e += THREADS) {
        const int i = e / per, c = (e % per) * V;
        float x[V];
        if (i < n && c < valid) piece(i, c, x);
        else
#pragma unroll
            for (int u = 0; u < V; ++u) x[u] = 0.f;
#pragma unroll
        for (int u = 0; u < V; ++u) dst[i * ld + c + u] = x[u];
    }
}

// One 16-byte piece of global memory as floats, φ applied (IDENTITY: as is).
template <typename T>
__device__ __forceinline__ void load_piece(const T* src, int fm, float* x) {
    constexpr int V = 16 / sizeof(T);
    const mk::Vec<T, V> r = ld16(src);
#pragma unroll
    for (int u = 0; u < V; ++u) x[u] = phi(fm, mk::to_float(r.v[u]));
}

// Where the forward's core reads its operands and writes its results: the tensors of CoreArgs,
// φ applied to q and k on load. The backward passes plug other I/O into the same core (below):
// the core itself only computes, on (dk, dv, options) from CoreArgs.
template <typename TIn, typename TOut>
struct ForwardIo {
    const CoreArgs& p;
    const Item& it;
    __device__ float q(long long row, int c) const {
        return phi(p.fm, mk::to_float(static_cast<const TIn*>(p.q)[row * p.dk + c]));
    }
    __device__ float k(long long row, int c) const {
        return phi(p.fm, mk::to_float(static_cast<const TIn*>(p.k)[row * p.dk + c]));
    }
    __device__ float v(long long row, int j) const { return mk::to_float(static_cast<const TIn*>(p.v)[row * p.dv + j]); }
    // 16-byte pieces (see "16-byte global traffic"): VEC elements from column c on.
    static constexpr int VEC = 16 / sizeof(TIn);
    __device__ bool vec_q() const { return rows_vectorize<TIn>(p.q, p.dk); }
    __device__ bool vec_k() const { return rows_vectorize<TIn>(p.k, p.dk); }
    __device__ bool vec_v() const { return rows_vectorize<TIn>(p.v, p.dv); }
    __device__ void q_vec(long long row, int c, float* x) const {
        load_piece(static_cast<const TIn*>(p.q) + row * p.dk + c, p.fm, x);
    }
    __device__ void k_vec(long long row, int c, float* x) const {
        load_piece(static_cast<const TIn*>(p.k) + row * p.dk + c, p.fm, x);
    }
    __device__ void v_vec(long long row, int j, float* x) const {
        load_piece(static_cast<const TIn*>(p.v) + row * p.dv + j, IDENTITY, x);
    }
    __device__ float mom(long long row, int j) const {
        return mk::to_float(static_cast<const TIn*>(p.mom)[row * p.mom_ld + j]);
    }
    __device__ float s0(int c, int j) const {
        return (it.state_in >= 0 && p.s_in != nullptr) ? p.s_in[(it.state_in * p.dk + c) * p.dv + j] : 0.f;
    }
    __device__ float z0(int c) const {
        return (it.state_in >= 0 && p.z_in != nullptr) ? p.z_in[it.state_in * p.dk + c] : 0.f;
    }
    __device__ bool has_out() const { return p.out != nullptr; }
    // Rows step0 .. step0+n of the output tile Os (columns j0 .. j0+w); dens: φ(q)·z + eps.
    __device__ void store_chunk(const float* Os, const float*, long long step0, int n, int j0, int w) const {
        TOut* out = static_cast<TOut*>(p.out);
        if (rows_vectorize<TOut>(out, p.dv)) {
            constexpr int V = 16 / sizeof(TOut), per = TILE / V;
            for (int e = threadIdx.x; e < n * per; e += THREADS) {
                const int i = e / per, j = (e % per) * V;
                if (j >= w) continue;
                mk::Vec<TOut, V> x;
#pragma unroll
                for (int u = 0; u < V; ++u) x.v[u] = mk::from_float<TOut>(Os[os_index(i, j + u)]);
                st16(out + row_of(it, step0 + i, p.reverse) * p.dv + j0 + j, x);
            }
            return;
        }
        for (int e = threadIdx.x; e < n * TILE; e += THREADS) {
            const int i = e / TILE, j = e % TILE;
            if (j < w) out[row_of(it, step0 + i, p.reverse) * p.dv + j0 + j] = mk::from_float<TOut>(Os[os_index(i, j)]);
        }
    }
    __device__ bool has_state_out() const { return it.state_out >= 0 && p.s_out != nullptr; }
    __device__ void store_state(int c, int j, float x) const { p.s_out[(it.state_out * p.dk + c) * p.dv + j] = x; }
    __device__ void store_z(int c, float x) const {
        if (p.z_out != nullptr) p.z_out[it.state_out * p.dk + c] = x;
    }
};

template <int C, typename Io>
__device__ void core(const CoreArgs& p, const Item& it, const Io& io, float* sm) {
    constexpr int RA = C / 16;  // micro-tile rows per thread
    const Smem L(C, p.dk);
    float* Qs = sm + L.q;
    float* Ks = sm + L.k;
    float* Vs = sm + L.v;
    float* As = sm + L.a;
    float* Ss = sm + L.s;
    float* zs = sm + L.z;
    float* dens = sm + L.den;
    float* ms = sm + L.m;
    float* Os = sm + L.o;
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int dk = p.dk, dv = p.dv;
    const int j0 = blockIdx.y * TILE;
    const int w = min(TILE, dv - j0);

    // Initial state tile and normaliser.
    for (int e = tid; e < dk * TILE; e += THREADS) {
        const int c = e / TILE, j = e % TILE;
        Ss[c * TILE_LD + j] = j < w ? io.s0(c, j0 + j) : 0.f;
    }
    for (int c = tid; c < dk; c += THREADS) zs[c] = io.z0(c);
    if (tid < TILE) ms[tid] = 0.f;

    const long long chunks = (it.len + C - 1) / C;

    // Loads φ(K) and the V tile of chunk `ch` (rows past the end are zero); 16-byte pieces
    // where the I/O offers them and the alignment rule allows (see stage_pieces).
    auto load_kv = [&](long long ch, int n) {
        bool k_done = false, v_done = false;
        if constexpr (Io::VEC > 0) {
            if (io.vec_k()) {
                stage_pieces<Io::VEC>(Ks, L.ld_qk, C, dk, dk, n, [&](int i, int c, float* x) {
                    io.k_vec(row_of(it, ch * C + i, p.reverse), c, x);
                });
                k_done = true;
            }
            if (io.vec_v()) {
                stage_pieces<Io::VEC>(Vs, TILE_LD, C, TILE, w, n, [&](int i, int j, float* x) {
                    io.v_vec(row_of(it, ch * C + i, p.reverse), j0 + j, x);
                });
                v_done = true;
            }
        }
        if (!k_done)
            for (int e = tid; e < C * dk; e += THREADS) {
                const int i = e / dk, c = e % dk;
                Ks[i * L.ld_qk + c] = i < n ? io.k(row_of(it, ch * C + i, p.reverse), c) : 0.f;
            }
        if (!v_done)
            for (int e = tid; e < C * TILE; e += THREADS) {
                const int i = e / TILE, j = e % TILE;
                Vs[i * TILE_LD + j] = (i < n && j < w) ? io.v(row_of(it, ch * C + i, p.reverse), j0 + j) : 0.f;
            }
    };
    auto load_q = [&](long long ch, int n) {
        if constexpr (Io::VEC > 0) {
            if (io.vec_q()) {
                stage_pieces<Io::VEC>(Qs, L.ld_qk, C, dk, dk, n, [&](int i, int c, float* x) {
                    io.q_vec(row_of(it, ch * C + i, p.reverse), c, x);
                });
                return;
            }
        }
        for (int e = tid; e < C * dk; e += THREADS) {
            const int i = e / dk, c = e % dk;
            Qs[i * L.ld_qk + c] = i < n ? io.q(row_of(it, ch * C + i, p.reverse), c) : 0.f;
        }
    };
    // S += φ(K)ᵀ V and z += Σ φ(K) over the n staged rows.
    auto update_state = [&](int n) {
        for (int c = ty; c < dk; c += 16) {
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                const int j = tx + 16 * b;
                float acc = 0.f;
                for (int i = 0; i < n; ++i) acc = fmaf(Ks[i * L.ld_qk + c], Vs[i * TILE_LD + j], acc);
                Ss[c * TILE_LD + j] += acc;
            }
        }
        for (int c = tid; c < dk; c += THREADS) {
            float acc = 0.f;
            for (int i = 0; i < n; ++i) acc += Ks[i * L.ld_qk + c];
            zs[c] += acc;
        }
    };

    if (!p.causal && p.accumulate) {
        for (long long ch = 0; ch < chunks; ++ch) {
            const int n = (int)min((long long)C, it.len - ch * C);
            __syncthreads();
            load_kv(ch, n);
            __syncthreads();
            update_state(n);
        }
    }

    for (long long ch = 0; ch < chunks && io.has_out(); ++ch) {
        const int n = (int)min((long long)C, it.len - ch * C);
        __syncthreads();  // the previous chunk is done with every buffer
        load_q(ch, n);
        if (p.causal) load_kv(ch, n);
        __syncthreads();

        // O = φ(Q)·S (inter-chunk) and, causal, A = mask(φ(Q)φ(K)ᵀ).
        float acc[RA][4];
#pragma unroll
        for (int a = 0; a < RA; ++a)
#pragma unroll
            for (int b = 0; b < 4; ++b) acc[a][b] = 0.f;
        for (int c = 0; c < dk; ++c) {
            float qa[RA], sb[4];
#pragma unroll
            for (int a = 0; a < RA; ++a) qa[a] = Qs[(ty + 16 * a) * L.ld_qk + c];
#pragma unroll
            for (int b = 0; b < 4; ++b) sb[b] = Ss[c * TILE_LD + tx + 16 * b];
#pragma unroll
            for (int a = 0; a < RA; ++a)
#pragma unroll
                for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(qa[a], sb[b], acc[a][b]);
        }
        if (p.causal) {
            // A tile: rows ty+16a, columns tx+16b (b < C/16).
            float sc[RA][C / 16];
#pragma unroll
            for (int a = 0; a < RA; ++a)
#pragma unroll
                for (int b = 0; b < C / 16; ++b) sc[a][b] = 0.f;
            for (int c = 0; c < dk; ++c) {
                float qa[RA], kb[C / 16];
#pragma unroll
                for (int a = 0; a < RA; ++a) qa[a] = Qs[(ty + 16 * a) * L.ld_qk + c];
#pragma unroll
                for (int b = 0; b < C / 16; ++b) kb[b] = Ks[(tx + 16 * b) * L.ld_qk + c];
#pragma unroll
                for (int a = 0; a < RA; ++a)
#pragma unroll
                    for (int b = 0; b < C / 16; ++b) sc[a][b] = fmaf(qa[a], kb[b], sc[a][b]);
            }
#pragma unroll
            for (int a = 0; a < RA; ++a)
#pragma unroll
                for (int b = 0; b < C / 16; ++b) {
                    const int i = ty + 16 * a, s = tx + 16 * b;
                    As[i * (C + 1) + s] = s <= i ? sc[a][b] : 0.f;
                }
            __syncthreads();
#pragma unroll 4
            for (int s = 0; s < C; ++s) {
                float aa[RA], vb[4];
#pragma unroll
                for (int a = 0; a < RA; ++a) aa[a] = As[(ty + 16 * a) * (C + 1) + s];
#pragma unroll
                for (int b = 0; b < 4; ++b) vb[b] = Vs[s * TILE_LD + tx + 16 * b];
#pragma unroll
                for (int a = 0; a < RA; ++a)
#pragma unroll
                    for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(aa[a], vb[b], acc[a][b]);
            }
        }
        // Denominators φ(q_i)·z (+ the intra-chunk row sum of A), only when normalising: the
        // block's THREADS / C consecutive threads per row split the sums.
        if (p.normalize) {
            constexpr int PER = THREADS / C;
            const int i = tid / PER, part = tid % PER;
            float d = 0.f;
            for (int c = part; c < dk; c += PER) d = fmaf(Qs[i * L.ld_qk + c], zs[c], d);
            if (p.causal)
                for (int s = part; s < C; s += PER) d += As[i * (C + 1) + s];
#pragma unroll
            for (int o = PER / 2; o > 0; o /= 2) d += __shfl_xor_sync(0xffffffffu, d, o);
            if (part == 0) dens[i] = d + p.eps;
            __syncthreads();  // (uniform: p.normalize is the block's)
        }
#pragma unroll
        for (int a = 0; a < RA; ++a) {
            const int i = ty + 16 * a;
            const float f = p.normalize ? p.scale / dens[i] : p.scale;
#pragma unroll
            for (int b = 0; b < 4; ++b) Os[os_index(i, tx + 16 * b)] = f * acc[a][b];
        }
        __syncthreads();
        if (p.eta >= 0.f) {
            // Momentum: row t gets m_t, then m_{t+1} = η (m_t + src_t); sequential in t per column.
            if (tid < w && j0 + tid < p.mom_width) {
                float m = ms[tid];
                for (int i = 0; i < n; ++i) {
                    Os[os_index(i, tid)] += m;
                    m = p.eta * (m + io.mom(row_of(it, ch * C + i, p.reverse), j0 + tid));
                }
                ms[tid] = m;
            }
            __syncthreads();
        }
        io.store_chunk(Os, dens, ch * C, n, j0, w);
        if (p.causal) update_state(n);
    }
    if (!io.has_out() && p.causal) {
        // State-only pass (split form, pass 1).
        for (long long ch = 0; ch < chunks; ++ch) {
            const int n = (int)min((long long)C, it.len - ch * C);
            __syncthreads();
            load_kv(ch, n);
            __syncthreads();
            update_state(n);
        }
    }
    __syncthreads();
    if (io.has_state_out()) {
        for (int e = tid; e < dk * w; e += THREADS) {
            const int c = e / w, j = e % w;
            io.store_state(c, j0 + j, Ss[c * TILE_LD + j]);
        }
        if (blockIdx.y == 0)
            for (int c = tid; c < dk; c += THREADS) io.store_z(c, zs[c]);
    }
}

// ---------------------------------------------------------------- tensor-core core ---------
// The same algorithm for f16/bf16 inputs with Dk ≤ 256, its three chunk products on mma.sync
// m16n8k16 (16-bit operands, f32 accumulation). φ(Q), φ(K), V, the masked scores A and a
// 16-bit copy of the state tile are staged in shared memory; the state S itself and z stay
// f32 in shared memory for the whole sequence (as in fla, S is rounded to the input type only
// as an mma operand). Chunks of C = 64 rows for Dk ≤ 128 and C = 32 above, so that the plan
// fits an sm_80 block (152 KiB at Dk = 256). 8 warps tile each C×64 product: warp w owns rows
// 16·(w % (C/16)).. and the next C/2 columns of its column group (C/16 tiles of 16×8); the
// C×C scores use the warps whose columns fall inside the chunk. Fragments come from ldmatrix
// (one instruction per 16×16 A tile or pair of 16×8 B tiles; the 8-half row pad keeps its rows
// on distinct banks), and one φ(Q) fragment feeds both φ(Q)φ(K)ᵀ and φ(Q)·S: with 16-row warp
// tiles these products are bound by shared-memory traffic, not by the tensor cores.

using mk::mma_16816;

constexpr int HALF_LD_PAD = 8;

// The widest key of the tensor-core core's chunk of C rows (see above).
__host__ __device__ constexpr int mma_max_dk(int C) { return C == 64 ? 128 : 256; }

// Shared-memory plan of the tensor-core core, in bytes, for chunks of C rows and a padded key
// width dkp (a multiple of 16, ≤ mma_max_dk(C)). Halves first, then floats (16-byte aligned).
struct SmemMma {
    int ldq, q, k, v, a, sh, sf, z, den, part, wmax, o, total;
    __host__ __device__ SmemMma(int C, int dkp) {
        ldq = dkp + HALF_LD_PAD;
        const int ldt = TILE + HALF_LD_PAD;
        q = 0;                                  // halves: C × ldq
        k = q + C * ldq * 2;                    // halves: C × ldq
        v = k + C * ldq * 2;                    // halves: C × ldt
        a = v + C * ldt * 2;                    // halves: C × ldt
        sh = a + C * ldt * 2;                   // halves: dkp × ldt
        sf = (sh + dkp * ldt * 2 + 15) / 16 * 16;  // floats: dkp × TILE, swizzled (sf_index)
        z = sf + dkp * TILE * 4;                // floats: dkp
        den = z + dkp * 4;                      // floats: C
        part = den + C * 4;                     // floats: 2 × C
        wmax = part + 2 * C * 4;                // floats: THREADS / 32 (f16: each warp's max |S|)
        o = wmax + THREADS / 32 * 4;            // floats: C × TILE, os_index
        total = o + C * TILE * 4;
    }
};

// Where S[c][j] (j < TILE) lives in the tensor-core core's f32 state tile: swizzled as the output
// tile (os_index), for the state update's fragment-layout float2 accesses.
__device__ __forceinline__ int sf_index(int c, int j) { return os_index(c, j); }

// f16 holds at most 65504, and the state S is a sum over every row so far: on long sequences
// (or values with a large mean) its entries pass that, and S rounded to f16 would be inf. So the
// f16 kernel rounds S·2^-e instead, with the power of two chosen from S's largest entry, and
// scales φ(Q)·S back by 2^e in f32: exact scaling, no precision lost, and e = 0 (bit-identical
// results) while every entry is below 2^14. bf16 has f32's range and never scales. The scores of
// one chunk, φ(q)·φ(k), are stored in T too: each must stay within T's range.
template <typename T> constexpr bool NARROW_RANGE = false;
template <> constexpr bool NARROW_RANGE<__half> = true;

// 2^e for a state whose largest |entry| is m: 1 while m < 2^14, else the power of two that brings
// m below 2^14 (not for inf or NaN: those propagate as they are).
__device__ __forceinline__ float scale_for_max(float m) {
    int e = 0;
    if (m >= 16384.f && m <= 3.0e38f) {
        frexpf(m, &e);  // m < 2^e
        e -= 14;        // so that m·2^-e < 2^14
    }
    return ldexpf(1.f, e);
}

// Returns 2^e for the state tile Sf (`rows` × TILE in any order; 1 for bf16) by scanning it.
// Block-wide: every thread calls it. Uses `scratch` (at least THREADS / 32 floats, free at this
// point) for the reduction.
template <typename T>
__device__ float state_scale_up(const float* Sf, int rows, float* scratch, int tid, int lane, int warp) {
    if constexpr (!NARROW_RANGE<T>) {
        return 1.f;
    } else {
        float m = 0.f;
        for (int e = tid; e < rows * TILE; e += THREADS) m = fmaxf(m, fabsf(Sf[e]));
        m = mk::warp_max(m);
        if (lane == 0) scratch[warp] = m;
        __syncthreads();
        m = 0.f;
        for (int i = 0; i < THREADS / 32; ++i) m = fmaxf(m, scratch[i]);
        __syncthreads();  // scratch is written again by the caller
        return scale_for_max(m);
    }
}

// T is the type of the mma operands; Io (as for the SIMT core) says where operands come from
// and results go. A forward Io (Io::VEC > 0: ForwardIo, PrepIo) reads T tensors, which then
// travel in 16-byte pieces prefetched into registers; an Io without pieces (PassIo: operands
// built on load, such as [v, 1] and the f32 gradient g') is read element by element as floats
// and rounded to T. Only the element path takes key widths past mma_max_dk(C) (the backward's
// Dv + 1 = 257 at Dv = 256): the register prefetch holds mma_max_dk(C) columns.
template <typename T, int C, typename Io>
__device__ void core_mma(const CoreArgs& p, const Item& it, const Io& io, unsigned char* smem) {
    static_assert(C == 64 || C == 32, "chunks of 64 or 32 rows");
    static_assert(Io::VEC == 0 || Io::VEC == 16 / sizeof(T), "pieces of the operand type");
    constexpr bool PIECES = Io::VEC > 0;
    constexpr int ROW_GROUPS = C / 16;                  // 16-row strips of a C×64 product
    constexpr int WARP_COLS = TILE * ROW_GROUPS / 8;    // columns per warp: 32 or 16
    constexpr int NT = WARP_COLS / 8;                   // 16×8 tiles per warp
    const int dk = p.dk, dv = p.dv;
    const int dkp = (dk + 15) / 16 * 16;
    const SmemMma L(C, dkp);
    const int ldq = L.ldq, ldt = TILE + HALF_LD_PAD;
    T* Qh = reinterpret_cast<T*>(smem + L.q);
    T* Kh = reinterpret_cast<T*>(smem + L.k);
    T* Vh = reinterpret_cast<T*>(smem + L.v);
    T* Ah = reinterpret_cast<T*>(smem + L.a);
    T* Sh = reinterpret_cast<T*>(smem + L.sh);
    float* Sf = reinterpret_cast<float*>(smem + L.sf);
    float* zs = reinterpret_cast<float*>(smem + L.z);
    float* dens = reinterpret_cast<float*>(smem + L.den);
    float* part = reinterpret_cast<float*>(smem + L.part);
    float* wmax = reinterpret_cast<float*>(smem + L.wmax);
    float* Os = reinterpret_cast<float*>(smem + L.o);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
    const int wr = (warp % ROW_GROUPS) * 16, wc = (warp / ROW_GROUPS) * WARP_COLS;  // this warp's block
    const int j0 = blockIdx.y * TILE;
    const int w = min(TILE, dv - j0);
    const T* q = static_cast<const T*>(p.q);
    const T* k = static_cast<const T*>(p.k);
    const T* v = static_cast<const T*>(p.v);

    // Global traffic in 16-byte pieces where the alignment rule allows (see "16-byte global
    // traffic"): NV halves of q, k, v, o per piece, 4 floats of the states. The shared rows are
    // 16-byte aligned (ldq, ldt multiples of 8 halves), so a piece is one shared store too.
    constexpr int NV = 16 / sizeof(T);
    const bool vec_s = PIECES && dv % 4 == 0 && (reinterpret_cast<uintptr_t>(p.s_in) & 15) == 0;
    const bool has_s_in = it.state_in >= 0 && p.s_in != nullptr;
    if (vec_s) {
        for (int e = tid; e < dkp * (TILE / 4); e += THREADS) {
            const int c = e / (TILE / 4), j = (e % (TILE / 4)) * 4;
            mk::Vec<float, 4> x = {{0.f, 0.f, 0.f, 0.f}};
            if (c < dk && j < w && has_s_in) x = ld16(p.s_in + (it.state_in * dk + c) * dv + j0 + j);
#pragma unroll
            for (int u = 0; u < 4; ++u) Sf[sf_index(c, j + u)] = x.v[u];
        }
    } else {
        for (int e = tid; e < dkp * TILE; e += THREADS) {
            const int c = e / TILE, j = e % TILE;
            Sf[sf_index(c, j)] = (c < dk && j < w) ? io.s0(c, j0 + j) : 0.f;
        }
    }
    for (int c = tid; c < dkp; c += THREADS) zs[c] = c < dk ? io.z0(c) : 0.f;
    const long long chunks = (it.len + C - 1) / C;

    // Staging of q, k (φ applied) and v chunks into shared memory. Where a tensor's rows are
    // whole 16-byte pieces (rows_vectorize), a chunk travels as pieces held in registers: its
    // loads are issued one chunk AHEAD (`fetch`), so they are in flight while the block
    // computes the current chunk, and `store` later writes them to shared memory. A thread
    // holds at most ROW_PIECES pieces of a q or k chunk and V_PIECES of a v tile.
    // Otherwise a chunk is loaded element by element when it is needed (`load_now`).
    constexpr int ROW_PIECES = C * (mma_max_dk(C) / NV) / THREADS, V_PIECES = C * (TILE / NV) / THREADS;
    static_assert(C * (TILE / NV) % THREADS == 0, "whole rounds of v pieces");
    struct Rows { mk::Vec<T, NV> r[ROW_PIECES]; };
    struct VTile { mk::Vec<T, NV> r[V_PIECES]; };
    auto fetch_rows = [&](Rows& pf, const T* src, long long ch, int n) {
        const int per = dkp / NV, step = p.reverse ? -dk : dk;  // row i: base + i·step
        const T* base = src + row_of(it, ch * C, p.reverse) * dk;
#pragma unroll
        for (int u = 0; u < ROW_PIECES; ++u) {
            const int e = tid + u * THREADS, i = e / per, c = (e % per) * NV;
            if (e < C * per && i < n && c < dk) pf.r[u] = ld16(base + i * step + c);
        }
    };
    auto store_rows = [&](T* dst, const Rows& pf, int n) {
        const int per = dkp / NV;
#pragma unroll
        for (int u = 0; u < ROW_PIECES; ++u) {
            const int e = tid + u * THREADS, i = e / per, c = (e % per) * NV;
            if (e >= C * per) continue;
            const bool live = i < n && c < dk;  // the rest is the zero padding
            mk::Vec<T, NV> h;
#pragma unroll
            for (int x = 0; x < NV; ++x) h.v[x] = mk::from_float<T>(live ? phi(p.fm, mk::to_float(pf.r[u].v[x])) : 0.f);
            st16(dst + i * ldq + c, h);
        }
    };
    // The element path, a thread NV consecutive columns at a time (one index split and one
    // 16-byte shared store per NV elements; the rows are whole pieces of the padded widths).
    // get(row, c) is io.q or io.k (φ applied); zeros past the row count and the width.
    auto load_piece_now = [&](T* dst, long long ch, int n, int i, int c0, int width, auto&& get) {
        mk::Vec<T, NV> h;
        const long long row = row_of(it, ch * C + i, p.reverse);
#pragma unroll
        for (int u = 0; u < NV; ++u) h.v[u] = mk::from_float<T>(i < n && c0 + u < width ? get(row, c0 + u) : 0.f);
        st16(dst, h);
    };
    auto load_rows_now = [&](T* dst, long long ch, int n, auto&& get) {
        const int per = dkp / NV;
        for (int e = tid; e < C * per; e += THREADS) {
            const int i = e / per, c0 = (e % per) * NV;
            load_piece_now(dst + i * ldq + c0, ch, n, i, c0, dk, get);
        }
    };
    auto fetch_v = [&](VTile& pf, long long ch, int n) {
        constexpr int per = TILE / NV;
        const int step = p.reverse ? -dv : dv;
        const T* base = v + row_of(it, ch * C, p.reverse) * dv + j0;
#pragma unroll
        for (int u = 0; u < V_PIECES; ++u) {
            const int e = tid + u * THREADS, i = e / per, j = (e % per) * NV;
            if (i < n && j < w) pf.r[u] = ld16(base + i * step + j);
            else
#pragma unroll
                for (int x = 0; x < NV; ++x) pf.r[u].v[x] = mk::from_float<T>(0.f);
        }
    };
    auto store_v = [&](const VTile& pf) {
        constexpr int per = TILE / NV;
#pragma unroll
        for (int u = 0; u < V_PIECES; ++u) {
            const int e = tid + u * THREADS, i = e / per, j = (e % per) * NV;
            st16(Vh + i * ldt + j, pf.r[u]);
        }
    };
    auto load_v_now = [&](long long ch, int n) {
        constexpr int per = TILE / NV;
        auto get = [&](long long row, int j) { return io.v(row, j0 + j); };
        for (int e = tid; e < C * per; e += THREADS) {
            const int i = e / per, j = (e % per) * NV;
            load_piece_now(Vh + i * ldt + j, ch, n, i, j, w, get);
        }
    };
    const bool vec_q = PIECES && rows_vectorize<T>(q, dk), vec_k = PIECES && rows_vectorize<T>(k, dk);
    const bool vec_v = PIECES && rows_vectorize<T>(v, dv);
    auto io_q = [&](long long row, int c) { return io.q(row, c); };
    auto io_k = [&](long long row, int c) { return io.k(row, c); };
    auto rows_in = [&](long long ch) { return (int)min((long long)C, it.len - ch * C); };
    Rows pf_q, pf_k;
    VTile pf_v;
    // A pass over the chunks reads q (`with_q`) and/or k and v (`with_kv`): `first` fetches
    // chunk 0 ahead, `stage(ch)` writes chunk ch to shared memory and fetches chunk ch + 1.
    // The caller puts a barrier before stage (the previous chunk's readers are done) and after.
    auto first = [&](bool with_q, bool with_kv) {
        if (chunks == 0) return;
        if (with_q && vec_q) fetch_rows(pf_q, q, 0, rows_in(0));
        if (with_kv && vec_k) fetch_rows(pf_k, k, 0, rows_in(0));
        if (with_kv && vec_v) fetch_v(pf_v, 0, rows_in(0));
    };
    auto stage = [&](bool with_q, bool with_kv, long long ch) {
        const int n = rows_in(ch);
        const bool ahead = ch + 1 < chunks;
        const int n_next = ahead ? rows_in(ch + 1) : 0;
        if (with_q) {
            if (!vec_q) load_rows_now(Qh, ch, n, io_q);
            else {
                store_rows(Qh, pf_q, n);
                if (ahead) fetch_rows(pf_q, q, ch + 1, n_next);
            }
        }
        if (with_kv) {
            if (!vec_k) load_rows_now(Kh, ch, n, io_k);
            else {
                store_rows(Kh, pf_k, n);
                if (ahead) fetch_rows(pf_k, k, ch + 1, n_next);
            }
            if (!vec_v) load_v_now(ch, n);
            else {
                store_v(pf_v);
                if (ahead) fetch_v(pf_v, ch + 1, n_next);
            }
        }
    };
    // S += φ(K)ᵀV on tensor cores (S: dkp × 64, summed over the C chunk rows); z += Σ φ(K).
    // A warp takes 16 rows × 32 columns of S at a time: each φ(K)ᵀ fragment feeds four mma,
    // and the warps of column 0 also sum the fragments into z (a[0], a[2]: key g; a[1], a[3]:
    // key g + 8).
    auto update_state = [&]() {
        const int units = (dkp / 16) * (TILE / 32);
        float abs_max = 0.f;  // f16: this warp's largest |S| entry (fmaxf: NaN left out, as the scan)
        for (int u = warp; u < units; u += THREADS / 32) {
            const int r0 = (u / (TILE / 32)) * 16, n0 = (u % (TILE / 32)) * 32;
            float d[4][4], z_lo = 0.f, z_hi = 0.f;
            auto pair = [&](int nt, int half) {  // S[r0 + g + 8·half][n0 + 8·nt + 2·tq, + 1]
                return reinterpret_cast<float2*>(Sf + sf_index(r0 + g + 8 * half, n0 + 8 * nt + 2 * tq));
            };
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                const float2 lo = *pair(nt, 0), hi = *pair(nt, 1);
                d[nt][0] = lo.x, d[nt][1] = lo.y, d[nt][2] = hi.x, d[nt][3] = hi.y;
            }
#pragma unroll
            for (int k0 = 0; k0 < C; k0 += 16) {
                uint32_t a[4];
                mk::frag_a_trans(a, Kh, ldq, r0, k0);
                if (n0 == 0) {
                    const float2 k0g = mk::unpack2<T>(a[0]), k8g = mk::unpack2<T>(a[2]);
                    const float2 k0h = mk::unpack2<T>(a[1]), k8h = mk::unpack2<T>(a[3]);
                    z_lo += (k0g.x + k0g.y) + (k8g.x + k8g.y);
                    z_hi += (k0h.x + k0h.y) + (k8h.x + k8h.y);
                }
#pragma unroll
                for (int np = 0; np < 2; ++np) {
                    uint32_t b[4];
                    mk::frag_b_pair_trans(b, Vh, ldt, k0, n0 + 16 * np);
                    mma_16816<T>(d[2 * np], a, b[0], b[1]);
                    mma_16816<T>(d[2 * np + 1], a, b[2], b[3]);
                }
            }
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                *pair(nt, 0) = make_float2(d[nt][0], d[nt][1]);
                *pair(nt, 1) = make_float2(d[nt][2], d[nt][3]);
            }
            if constexpr (NARROW_RANGE<T>) {
#pragma unroll
                for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) abs_max = fmaxf(abs_max, fabsf(d[nt][e]));
            } else {
                // The next chunk's 16-bit copy of S, from the registers (f16 waits for the
                // chunk's scale, from wmax). 32-bit stores, conflict-free.
                auto sh_pair = [&](int nt, int half) {  // Sh[r0 + g + 8·half][n0 + 8·nt + 2·tq, + 1]
                    return reinterpret_cast<uint32_t*>(Sh + (r0 + g + 8 * half) * ldt + n0 + 8 * nt + 2 * tq);
                };
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) {
                    *sh_pair(nt, 0) = mk::pack2<T>(d[nt][0], d[nt][1]);
                    *sh_pair(nt, 1) = mk::pack2<T>(d[nt][2], d[nt][3]);
                }
            }
            if (n0 == 0) {
                z_lo += __shfl_xor_sync(0xffffffffu, z_lo, 1);
                z_lo += __shfl_xor_sync(0xffffffffu, z_lo, 2);
                z_hi += __shfl_xor_sync(0xffffffffu, z_hi, 1);
                z_hi += __shfl_xor_sync(0xffffffffu, z_hi, 2);
                if (tq == 0) {
                    zs[r0 + g] += z_lo;
                    zs[r0 + g + 8] += z_hi;
                }
            }
        }
        if constexpr (NARROW_RANGE<T>) {
            abs_max = mk::warp_max(abs_max);  // every warp writes its slot, 0 without units
            if (lane == 0) wmax[warp] = abs_max;
        }
    };

    // Denominators φ(q_i)·z + Σ_s A_is (normalised only), from the fragments in registers: the
    // warps of column group 0 add φ(Q)·z as they load φ(Q) (a[0], a[2]: row g; a[1], a[3]:
    // row g + 8); each score warp adds its rows' masked scores; the two groups' shares of a
    // row meet in `part` (C floats per group).
    auto den_qz = [&](const uint32_t (&a)[4], int k0, float& lo, float& hi) {
        const float2 z0 = *reinterpret_cast<const float2*>(zs + k0 + 2 * tq);
        const float2 z8 = *reinterpret_cast<const float2*>(zs + k0 + 2 * tq + 8);
        const float2 r0 = mk::unpack2<T>(a[0]), r8 = mk::unpack2<T>(a[1]);
        const float2 r0h = mk::unpack2<T>(a[2]), r8h = mk::unpack2<T>(a[3]);
        lo = fmaf(r0.x, z0.x, fmaf(r0.y, z0.y, fmaf(r0h.x, z8.x, fmaf(r0h.y, z8.y, lo))));
        hi = fmaf(r8.x, z0.x, fmaf(r8.y, z0.y, fmaf(r8h.x, z8.x, fmaf(r8h.y, z8.y, hi))));
    };
    auto store_den_parts = [&](float lo, float hi) {
        lo += __shfl_xor_sync(0xffffffffu, lo, 1);
        lo += __shfl_xor_sync(0xffffffffu, lo, 2);
        hi += __shfl_xor_sync(0xffffffffu, hi, 1);
        hi += __shfl_xor_sync(0xffffffffu, hi, 2);
        float* mine = part + (wc / WARP_COLS) * C;
        if (tq == 0) {
            mine[wr + g] = lo;
            mine[wr + g + 8] = hi;
        }
    };

    if (!p.causal && p.accumulate) {
        first(false, true);
        for (long long ch = 0; ch < chunks; ++ch) {
            __syncthreads();
            stage(false, true, ch);
            __syncthreads();
            update_state();
        }
    }
    const bool has_out = io.has_out();
    if (has_out) first(true, p.causal);
    float s_up = 1.f;  // 2^e of the current 16-bit copy of S (f16; 1 for bf16)
    for (long long ch = 0; ch < chunks && has_out; ++ch) {
        const int n = rows_in(ch);
        __syncthreads();
        stage(true, p.causal, ch);
        // The 16-bit copy of S (and, for f16, its scale): converted from the f32 tile at the first
        // chunk, and again at each later causal f16 chunk, scaled by the powers of two the
        // warps' maxima give; bf16's later causal copies come from update_state, and without
        // causality S does not change.
        if (ch == 0 || (NARROW_RANGE<T> && p.causal)) {
            if (ch == 0) {
                s_up = state_scale_up<T>(Sf, dkp, dens, tid, lane, warp);
            } else {
                float m = 0.f;
                for (int i = 0; i < THREADS / 32; ++i) m = fmaxf(m, wmax[i]);
                s_up = scale_for_max(m);
            }
            const float s_down = 1.f / s_up;  // exact: a power of two
            for (int e = tid; e < dkp * TILE; e += THREADS) {
                const int c = e / TILE, j = e % TILE;
                Sh[c * ldt + j] = mk::from_float<T>(Sf[sf_index(c, j)] * s_down);
            }
        }
        __syncthreads();
        // One pass over the key dimension: O = φ(Q)·S and (causal) the scores φ(Q)φ(K)ᵀ, then
        // A = mask(scores) rounded to T for O += A·V (C×C: with C = 32 the warps of the upper
        // column groups have no scores).
        const bool scores = p.causal && wc < C;
        float o[NT][4] = {}, sc[NT][4] = {};
        float den_lo = 0.f, den_hi = 0.f;  // this lane's share of rows wr + g and wr + g + 8
        for (int k0 = 0; k0 < dkp; k0 += 16) {
            uint32_t a[4];
            mk::frag_a(a, Qh, ldq, wr, k0);
            if (p.normalize && wc == 0) den_qz(a, k0, den_lo, den_hi);
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                uint32_t b[4];
                if (scores) {
                    mk::frag_b_pair(b, Kh, ldq, k0, wc + 16 * np);
                    mma_16816<T>(sc[2 * np], a, b[0], b[1]);
                    mma_16816<T>(sc[2 * np + 1], a, b[2], b[3]);
                }
                mk::frag_b_pair_trans(b, Sh, ldt, k0, wc + 16 * np);
                mma_16816<T>(o[2 * np], a, b[0], b[1]);
                mma_16816<T>(o[2 * np + 1], a, b[2], b[3]);
            }
        }
        if (scores) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int i = wr + g + (e >= 2 ? 8 : 0), s = wc + 8 * nt + 2 * tq + (e & 1);
                    const T a_is = mk::from_float<T>(s <= i ? sc[nt][e] : 0.f);
                    Ah[i * ldt + s] = a_is;
                    (e >= 2 ? den_hi : den_lo) += mk::to_float(a_is);  // the A that A·V sees
                }
        }
        if (p.normalize && wc < C) store_den_parts(den_lo, den_hi);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[nt][e] *= s_up;
        if (p.causal) {
            __syncthreads();
#pragma unroll
            for (int k0 = 0; k0 < C; k0 += 16) {
                uint32_t a[4];
                mk::frag_a(a, Ah, ldt, wr, k0);
#pragma unroll
                for (int np = 0; np < NT / 2; ++np) {
                    uint32_t b[4];
                    mk::frag_b_pair_trans(b, Vh, ldt, k0, wc + 16 * np);
                    mma_16816<T>(o[2 * np], a, b[0], b[1]);
                    mma_16816<T>(o[2 * np + 1], a, b[2], b[3]);
                }
            }
        }
        __syncthreads();
        auto den = [&](int i) { return part[i] + part[C + i] + p.eps; };
        if (p.normalize && tid < C) dens[tid] = den(tid);  // for io.store_chunk
        const float f_lo = p.normalize ? p.scale / den(wr + g) : p.scale;
        const float f_hi = p.normalize ? p.scale / den(wr + g + 8) : p.scale;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const int j = wc + 8 * nt + 2 * tq;
            *reinterpret_cast<float2*>(Os + os_index(wr + g, j)) = make_float2(f_lo * o[nt][0], f_lo * o[nt][1]);
            *reinterpret_cast<float2*>(Os + os_index(wr + g + 8, j)) = make_float2(f_hi * o[nt][2], f_hi * o[nt][3]);
        }
        __syncthreads();
        io.store_chunk(Os, dens, ch * C, n, j0, w);
        if (p.causal) update_state();
    }
    if (!has_out && p.causal) {
        first(false, true);
        for (long long ch = 0; ch < chunks; ++ch) {
            __syncthreads();
            stage(false, true, ch);
            __syncthreads();
            update_state();
        }
    }
    __syncthreads();
    if (io.has_state_out()) {
        if (PIECES && dv % 4 == 0 && (reinterpret_cast<uintptr_t>(p.s_out) & 15) == 0) {
            const int per = w / 4;
            for (int e = tid; e < dk * per; e += THREADS) {
                const int c = e / per, j = (e % per) * 4;
                mk::Vec<float, 4> x;
#pragma unroll
                for (int u = 0; u < 4; ++u) x.v[u] = Sf[sf_index(c, j + u)];
                st16(p.s_out + (it.state_out * dk + c) * dv + j0 + j, x);
            }
        } else {
            for (int e = tid; e < dk * w; e += THREADS) {
                const int c = e / w, j = e % w;
                io.store_state(c, j0 + j, Sf[sf_index(c, j)]);
            }
        }
        if (blockIdx.y == 0)
            for (int c = tid; c < dk; c += THREADS) io.store_z(c, zs[c]);
    }
}

// ---------------------------------------------------------------- reference kernels --------
// One block per item, one thread per output element, every sum written out in full: O(T²).

template <typename T>
__device__ void reference_forward(const CoreArgs& p) {
    const Item it = p.items[blockIdx.x];
    const int dk = p.dk, dv = p.dv;
    const T* q = static_cast<const T*>(p.q);
    const T* k = static_cast<const T*>(p.k);
    const T* v = static_cast<const T*>(p.v);
    auto S0 = [&](int c, int j) { return it.state_in >= 0 ? p.s_in[(it.state_in * dk + c) * dv + j] : 0.f; };
    auto z0 = [&](int c) { return (it.state_in >= 0 && p.z_in) ? p.z_in[it.state_in * dk + c] : 0.f; };
    auto Q = [&](long long t, int c) { return phi(p.fm, mk::to_float(q[(it.row0 + t) * dk + c])); };
    auto K = [&](long long t, int c) { return phi(p.fm, mk::to_float(k[(it.row0 + t) * dk + c])); };
    auto V = [&](long long t, int j) { return mk::to_float(v[(it.row0 + t) * dv + j]); };
    for (long long e = threadIdx.x; e < it.len * dv; e += blockDim.x) {
        const long long t = e / dv;
        const int j = (int)(e % dv);
        float num = 0.f, den = 0.f;
        for (int c = 0; c < dk; ++c) {
            num += Q(t, c) * S0(c, j);
            den += Q(t, c) * z0(c);
        }
        const long long last = p.causal ? t : it.len - 1;
        for (long long s = 0; s <= last; ++s) {
            float qk = 0.f;
            for (int c = 0; c < dk; ++c) qk += Q(t, c) * K(s, c);
            num += qk * V(s, j);
            den += qk;
        }
        float o = p.normalize ? p.scale * num / (den + p.eps) : p.scale * num;
        if (p.eta >= 0.f)
            for (long long i = 0; i < t; ++i) o += powf(p.eta, (float)(t - i)) * V(i, j);
        static_cast<T*>(p.out)[(it.row0 + t) * dv + j] = mk::from_float<T>(o);
    }
    for (int e = threadIdx.x; e < dk * dv; e += blockDim.x) {
        const int c = e / dv, j = e % dv;
        float s = S0(c, j);
        for (long long t = 0; t < it.len; ++t) s += K(t, c) * V(t, j);
        p.s_out[(it.state_out * dk + c) * dv + j] = s;
    }
    for (int c = threadIdx.x; c < dk; c += blockDim.x) {
        float z = z0(c);
        for (long long t = 0; t < it.len; ++t) z += K(t, c);
        p.z_out[it.state_out * dk + c] = z;
    }
}

// The backward written straight from the definitions. `gp` is scratch [rows, dv+1] for
// g' = [∂L/∂num, ∂L/∂den]; `gs`/`gz` the gradient of the final state (or null).
struct RefBackwardArgs {
    CoreArgs f;
    const void* grad_out;
    const float* gs;
    const float* gz;
    float* gp;
    void* dq;
    void* dk;
    void* dv;
    float* ds0;
    float* dz0;
};
static_assert(sizeof(RefBackwardArgs) == 208, "RefBackwardArgs layout");

template <typename T>
__device__ void reference_backward(const RefBackwardArgs& r) {
    const CoreArgs& p = r.f;
    const Item it = p.items[blockIdx.x];
    const int dk = p.dk, dv = p.dv, dva = dv + 1;
    const T* q = static_cast<const T*>(p.q);
    const T* k = static_cast<const T*>(p.k);
    const T* v = static_cast<const T*>(p.v);
    const T* g = static_cast<const T*>(r.grad_out);
    const long long si = it.state_in, so = it.state_out;
    auto S0a = [&](int c, int j) {  // [S_0, z_0]
        if (si < 0) return 0.f;
        if (j < dv) return p.s_in[(si * dk + c) * dv + j];
        return p.z_in ? p.z_in[si * dk + c] : 0.f;
    };
    auto dSTa = [&](int c, int j) {  // [∂L/∂S_T, ∂L/∂z_T]
        if (j < dv) return r.gs ? r.gs[(so * dk + c) * dv + j] : 0.f;
        return r.gz ? r.gz[so * dk + c] : 0.f;
    };
    auto Qx = [&](long long t, int c) { return mk::to_float(q[(it.row0 + t) * dk + c]); };
    auto Kx = [&](long long t, int c) { return mk::to_float(k[(it.row0 + t) * dk + c]); };
    auto Q = [&](long long t, int c) { return phi(p.fm, Qx(t, c)); };
    auto K = [&](long long t, int c) { return phi(p.fm, Kx(t, c)); };
    auto Va = [&](long long t, int j) { return j < dv ? mk::to_float(v[(it.row0 + t) * dv + j]) : 1.f; };
    auto G = [&](long long t, int j) { return mk::to_float(g[(it.row0 + t) * dv + j]); };
    auto visible = [&](long long t, long long s) { return !p.causal || s <= t; };
    float* gp = r.gp + it.row0 * dva;

    // g' per row: recompute the row's numerators and denominator.
    for (long long t = threadIdx.x; t < it.len; t += blockDim.x) {
        float den = p.eps, dot = 0.f;
        for (int c = 0; c < dk; ++c) den += Q(t, c) * S0a(c, dv);
        for (long long s = 0; s < it.len; ++s)
            if (visible(t, s)) {
                float qk = 0.f;
                for (int c = 0; c < dk; ++c) qk += Q(t, c) * K(s, c);
                den += qk;
            }
        const float f = p.normalize ? p.scale / den : p.scale;
        for (int j = 0; j < dv; ++j) {
            float num = 0.f;
            for (int c = 0; c < dk; ++c) num += Q(t, c) * S0a(c, j);
            for (long long s = 0; s < it.len; ++s)
                if (visible(t, s)) {
                    float qk = 0.f;
                    for (int c = 0; c < dk; ++c) qk += Q(t, c) * K(s, c);
                    num += qk * Va(s, j);
                }
            gp[t * dva + j] = f * G(t, j);
            dot += G(t, j) * f * num;
        }
        gp[t * dva + dv] = p.normalize ? -dot / den : 0.f;
    }
    __syncthreads();
    auto GP = [&](long long t, int j) { return gp[t * dva + j]; };
    auto gv = [&](long long t, long long s) {  // g'_t · v'_s
        float x = 0.f;
        for (int j = 0; j < dva; ++j) x += GP(t, j) * Va(s, j);
        return x;
    };
    for (long long e = threadIdx.x; e < it.len * dk; e += blockDim.x) {
        const long long t = e / dk;
        const int c = (int)(e % dk);
        float dqf = 0.f, dkf = 0.f;
        for (int j = 0; j < dva; ++j) {
            dqf += GP(t, j) * S0a(c, j);
            dkf += dSTa(c, j) * Va(t, j);
        }
        for (long long s = 0; s < it.len; ++s) {
            if (visible(t, s)) dqf += gv(t, s) * K(s, c);
            if (visible(s, t)) dkf += gv(s, t) * Q(s, c);
        }
        static_cast<T*>(r.dq)[(it.row0 + t) * dk + c] = mk::from_float<T>(dqf * dphi(p.fm, Qx(t, c)));
        static_cast<T*>(r.dk)[(it.row0 + t) * dk + c] = mk::from_float<T>(dkf * dphi(p.fm, Kx(t, c)));
    }
    for (long long e = threadIdx.x; e < it.len * dv; e += blockDim.x) {
        const long long s = e / dv;
        const int j = (int)(e % dv);
        float x = 0.f;
        for (int c = 0; c < dk; ++c) x += K(s, c) * dSTa(c, j);
        for (long long t = 0; t < it.len; ++t)
            if (visible(t, s)) {
                float qk = 0.f;
                for (int c = 0; c < dk; ++c) qk += Q(t, c) * K(s, c);
                x += qk * GP(t, j);
            }
        if (p.eta >= 0.f)
            for (long long t = s + 1; t < it.len; ++t) x += powf(p.eta, (float)(t - s)) * G(t, j);
        static_cast<T*>(r.dv)[(it.row0 + s) * dv + j] = mk::from_float<T>(x);
    }
    for (int e = threadIdx.x; e < dk * dva; e += blockDim.x) {
        const int c = e / dva, j = e % dva;
        float x = dSTa(c, j);
        for (long long t = 0; t < it.len; ++t) x += Q(t, c) * GP(t, j);
        if (j < dv) r.ds0[(so * dk + c) * dv + j] = x;
        else r.dz0[so * dk + c] = x;
    }
}

}  // namespace

// ---------------------------------------------------------------- entry points ------------

#define MK_CORE(NAME, TIN, TOUT, C)                                                      \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) NAME(CoreArgs p) {            \
        extern __shared__ float sm[];                                                    \
        const Item it = p.items[blockIdx.x];                                             \
        core<C>(p, it, ForwardIo<TIN, TOUT>{p, it}, sm);                                 \
    }

#define MK_CORE_ALL(SN, T)                                          \
    MK_CORE(la_core_##SN##_to_##SN##_c64, T, T, 64)                 \
    MK_CORE(la_core_##SN##_to_##SN##_c32, T, T, 32)                 \
    extern "C" __global__ void la_reference_forward_##SN(CoreArgs p) { reference_forward<T>(p); } \
    extern "C" __global__ void la_reference_backward_##SN(RefBackwardArgs r) { reference_backward<T>(r); }

#define MK_CORE_MMA(SN, T, C)                                                           \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) la_core_mma_##SN##_c##C(CoreArgs p) { \
        extern __shared__ __align__(16) unsigned char smem_mma[];                        \
        const Item it = p.items[blockIdx.x];                                             \
        core_mma<T, C>(p, it, ForwardIo<T, T>{p, it}, smem_mma);                         \
    }
MK_CORE_MMA(f16, __half, 64)
MK_CORE_MMA(f16, __half, 32)
MK_CORE_MMA(bf16, __nv_bfloat16, 64)
MK_CORE_MMA(bf16, __nv_bfloat16, 32)

MK_CORE_ALL(f16, __half)
MK_CORE_ALL(bf16, __nv_bfloat16)
MK_CORE(la_core_f32_to_f32_c64, float, float, 64)
MK_CORE(la_core_f32_to_f32_c32, float, float, 32)
extern "C" __global__ void la_reference_forward_f32(CoreArgs p) { reference_forward<float>(p); }
extern "C" __global__ void la_reference_backward_f32(RefBackwardArgs r) { reference_backward<float>(r); }

// ---------------------------------------------------------------- quadratic baseline -------
// The unfused O(T²) composition the benchmarks measure the chunked kernels against, as a user
// without this crate would write it: per head, A = mask(φ(Q)φ(K)ᵀ) materialised as f32 [T, T]
// (one launch), then O = scale · A·V, divided by rowsum(A) + eps when normalising (a second
// launch). Plain 16×16 shared-memory tiles, one output element per thread; no initial state.
// Its backward (identity map, unnormalised), as autograd would run it from the saved A:
// dA = mask(dO·Vᵀ) (scores), dV = scale·Aᵀ·dO, dQ = scale·dA·K, dK = scale·dAᵀ·Q (output, A
// read transposed where the product needs Aᵀ).

namespace {

constexpr int QT = 16;       // tile edge
constexpr int QT_LD = QT + 1;  // padded row stride

// Block (x, y, z) = (column tile of s, row tile of i, head); 256 threads = a 16×16 tile.
template <typename T>
__device__ void quadratic_scores(const T* q, const T* k, float* a, int t, int dk, int causal, int fm, float* sm) {
    float* qs = sm;
    float* ks = sm + QT * QT_LD;
    const int tx = threadIdx.x % QT, ty = threadIdx.x / QT;
    const long long h = blockIdx.z;
    const int i = blockIdx.y * QT + ty, s = blockIdx.x * QT + tx;
    const int k_row = blockIdx.x * QT + ty;  // the key row this thread stages
    float acc = 0.f;
    for (int c0 = 0; c0 < dk; c0 += QT) {
        const int c = c0 + tx;
        qs[ty * QT_LD + tx] = (i < t && c < dk) ? phi(fm, mk::to_float(q[(h * t + i) * dk + c])) : 0.f;
        ks[ty * QT_LD + tx] = (k_row < t && c < dk) ? phi(fm, mk::to_float(k[(h * t + k_row) * dk + c])) : 0.f;
        __syncthreads();
#pragma unroll
        for (int cc = 0; cc < QT; ++cc) acc = fmaf(qs[ty * QT_LD + cc], ks[tx * QT_LD + cc], acc);
        __syncthreads();
    }
    if (i < t && s < t) a[(h * t + i) * t + s] = (causal && s > i) ? 0.f : acc;
}

// Block (x, y, z) = (column tile of v, row tile of i, head). With `transpose_a`, the product
// takes Aᵀ: the tile is staged with the block's threads along A's rows (coalesced) and stored
// transposed.
template <typename T>
__device__ void quadratic_output(const float* a, const T* v, T* o, int t, int dv, int normalize, float scale,
                                 float eps, int transpose_a, float* sm) {
    float* as = sm;
    float* vs = sm + QT * QT_LD;
    const int tx = threadIdx.x % QT, ty = threadIdx.x / QT;
    const long long h = blockIdx.z;
    const int i0 = blockIdx.y * QT, i = i0 + ty, j = blockIdx.x * QT + tx;
    float acc = 0.f, den = 0.f;
    for (int s0 = 0; s0 < t; s0 += QT) {
        if (transpose_a)  // as[r][c] = Aᵀ[i0 + r][s0 + c] = A[s0 + c][i0 + r]
            as[tx * QT_LD + ty] = (i0 + tx < t && s0 + ty < t) ? a[(h * t + s0 + ty) * t + i0 + tx] : 0.f;
        else
            as[ty * QT_LD + tx] = (i < t && s0 + tx < t) ? a[(h * t + i) * t + s0 + tx] : 0.f;
        vs[ty * QT_LD + tx] = (s0 + ty < t && j < dv) ? mk::to_float(v[(h * t + s0 + ty) * dv + j]) : 0.f;
        __syncthreads();
#pragma unroll
        for (int s = 0; s < QT; ++s) {
            acc = fmaf(as[ty * QT_LD + s], vs[s * QT_LD + tx], acc);
            den += as[ty * QT_LD + s];
        }
        __syncthreads();
    }
    if (i < t && j < dv) o[(h * t + i) * dv + j] = mk::from_float<T>(normalize ? scale * acc / (den + eps) : scale * acc);
}

}  // namespace

#define MK_QUADRATIC(SN, T)                                                                                \
    extern "C" __global__ void la_quadratic_scores_##SN(const T* q, const T* k, float* a, int t, int dk,    \
                                                        int causal, int fm) {                              \
        extern __shared__ float sm[];                                                                      \
        quadratic_scores<T>(q, k, a, t, dk, causal, fm, sm);                                               \
    }                                                                                                      \
    extern "C" __global__ void la_quadratic_output_##SN(const float* a, const T* v, T* o, int t, int dv,    \
                                                        int normalize, float scale, float eps,             \
                                                        int transpose_a) {                                 \
        extern __shared__ float sm[];                                                                      \
        quadratic_output<T>(a, v, o, t, dv, normalize, scale, eps, transpose_a, sm);                       \
    }

MK_QUADRATIC(f32, float)
MK_QUADRATIC(f16, __half)
MK_QUADRATIC(bf16, __nv_bfloat16)

// Split form, between the passes: per segment, the state at the start of each of its `groups`
// item groups (S_0 + the local states of the groups before it), written to `prefix`, and the
// final state. One thread per state element; element
// e < dk·dv is S, the rest z.
extern "C" __global__ void la_state_scan(const float* __restrict__ local_s, const float* __restrict__ local_z,
                                         const float* __restrict__ s0, const float* __restrict__ z0,
                                         const long long* __restrict__ seg_state, float* __restrict__ prefix_s,
                                         float* __restrict__ prefix_z, float* __restrict__ final_s,
                                         float* __restrict__ final_z, int segments, int groups, int dk, int dv) {
    const long long per = (long long)dk * dv + dk;
    for (long long e = mk::global_thread(); e < per * segments; e += mk::grid_threads()) {
        const long long seg = e / per, x = e % per;
        const bool is_s = x < (long long)dk * dv;
        const long long st = seg_state[seg];
        const float* init = is_s ? s0 : z0;
        float acc = init ? init[st * (is_s ? (long long)dk * dv : dk) + (is_s ? x : x - (long long)dk * dv)] : 0.f;
        for (int g = 0; g < groups; ++g) {
            const long long item = seg * groups + g;
            if (is_s) {
                prefix_s[item * dk * dv + x] = acc;
                acc += local_s[item * dk * dv + x];
            } else {
                prefix_z[item * dk + (x - (long long)dk * dv)] = acc;
                acc += local_z[item * dk + (x - (long long)dk * dv)];
            }
        }
        if (is_s) final_s[st * dk * dv + x] = acc;
        else final_z[st * dk + (x - (long long)dk * dv)] = acc;
    }
}

// ---------------------------------------------------------------- backward -----------------
// Two launches, both a core with other I/O (see ForwardIo); the SIMT core for f32 and
// momentum, the tensor-core core for f16/bf16 otherwise (backward_*_mma below):
//   1. la_backward_prep: the forward recomputed chunk by chunk (one block per item × 64-column
//      v tile); instead of o it writes g' = [∂L/∂num, ∂L/∂den] to gp, a [rows, dv + tiles]
//      scratch: gp[r, j] = f_r·g[r, j] (f = scale/den or scale) and, per v tile y,
//      gp[r, dv + y] = −Σ_{j in tile y} g[r, j]·o[r, j] / den_r (0 without normalisation).
//      The consumers read ∂L/∂den_r as the sum of those `tiles` partials, in a fixed order.
//   2. la_backward_passes: the three passes, blockIdx.z = pass, all reading q, k, v, g and the
//      states in place (φ, φ', [v, 1], [S, z] and its transpose applied on load and store):
//        z = 0: dq = φ'(q) ⊙ core(q = g', k = [v,1], v = φ(k), S_0 = [S_0,z_0]ᵀ)
//        z = 1: dk = φ'(k) ⊙ core(q = [v,1], k = g', v = φ(q), S_0 = [∂S_T,∂z_T]ᵀ, reverse)
//        z = 2: [dv, ·] = core(q = φ(k), k = φ(q), v = g', S_0 = [∂S_T,∂z_T], reverse)
//               + the momentum's Σ_{t>s} η^{t−s} g_t; its final state is [∂S_0, ∂z_0].
//      The passes have different widths (dk × (dv+1) or (dv+1) × dk); the grid covers the
//      widest and blocks past a pass's last v tile return at once.

namespace {

struct BwdArgs {
    const void* q;  // [rows, dk] (T)
    const void* k;  // [rows, dk] (T)
    const void* v;  // [rows, dv] (T)
    const void* g;  // [rows, dv] (T): ∂L/∂o
    const float* s0;  // [*, dk, dv] or null (zeros)
    const float* z0;  // [*, dk] or null
    const float* gs;  // [*, dk, dv] or null: ∂L/∂S_T
    const float* gz;  // [*, dk] or null: ∂L/∂z_T
    float* gp;        // [rows, dv + tiles]: g' (written by the prep, read by the passes)
    void* grad_q;     // [rows, dk] (T)
    void* grad_k;     // [rows, dk] (T)
    void* grad_v;     // [rows, dv] (T)
    float* ds0;       // [*, dk, dv]
    float* dz0;       // [*, dk]
    const Item* items;  // one per (sequence, head); state_in = state_out = its state
    int n_items;
    int dk, dv;
    int tiles;  // v tiles of the prep: the number of ∂L/∂den partials per row of gp
    int fm, causal, normalize;
    float scale, eps;
    float eta;  // momentum decay; < 0: none
};
static_assert(sizeof(BwdArgs) == 160, "BwdArgs layout");

// The prep: the forward's loads; the output chunk becomes g'.
template <typename T>
struct PrepIo : ForwardIo<T, float> {
    const BwdArgs& b;
    __device__ PrepIo(const CoreArgs& p, const Item& it, const BwdArgs& b) : ForwardIo<T, float>{p, it}, b(b) {}
    __device__ bool has_out() const { return true; }
    __device__ bool has_state_out() const { return false; }
    __device__ void store_chunk(const float* Os, const float* dens, long long step0, int n, int j0, int w) const {
        const T* g = static_cast<const T*>(b.g);
        const int ld = b.dv + b.tiles;
        auto f = [&](int i) { return b.normalize ? b.scale / dens[i] : b.scale; };
        for (int e = threadIdx.x; e < n * TILE; e += THREADS) {
            const int i = e / TILE, j = e % TILE;
            const long long row = this->it.row0 + step0 + i;
            if (j < w) b.gp[row * ld + j0 + j] = f(i) * mk::to_float(g[row * b.dv + j0 + j]);
        }
        // One warp per row: this tile's share of −(g·o)/den (Os holds o = f·num).
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
        for (int i = warp; i < n; i += THREADS / 32) {
            const long long row = this->it.row0 + step0 + i;
            float dot = 0.f;
            for (int j = lane; j < w; j += 32) dot += mk::to_float(g[row * b.dv + j0 + j]) * Os[os_index(i, j)];
            dot = mk::warp_sum(dot);
            if (lane == 0) b.gp[row * ld + b.dv + blockIdx.y] = b.normalize ? -dot / dens[i] : 0.f;
        }
    }
};

// The passes' operands, read in place.
template <typename T>
struct PassIo {
    const BwdArgs& b;
    const Item& it;
    int pass;
    __device__ float raw(const void* x, long long row, int c) const {
        return mk::to_float(static_cast<const T*>(x)[row * b.dk + c]);
    }
    __device__ float phi_q(long long row, int c) const { return phi(b.fm, raw(b.q, row, c)); }
    __device__ float phi_k(long long row, int c) const { return phi(b.fm, raw(b.k, row, c)); }
    // [v, 1]
    __device__ float v1(long long row, int j) const {
        return j < b.dv ? mk::to_float(static_cast<const T*>(b.v)[row * b.dv + j]) : 1.f;
    }
    // g' = [∂L/∂num, ∂L/∂den]
    __device__ float gp(long long row, int j) const {
        const float* r = b.gp + row * (b.dv + b.tiles);
        if (j < b.dv) return r[j];
        float d = 0.f;
        for (int y = 0; y < b.tiles; ++y) d += r[b.dv + y];
        return d;
    }
    // Element (c, j) of [S, z] (dk × (dv+1)) of this item's state; zeros for null pointers.
    __device__ float aug(const float* s, const float* z, int c, int j) const {
        if (j < b.dv) return s != nullptr ? s[(it.state_in * b.dk + c) * b.dv + j] : 0.f;
        return z != nullptr ? z[it.state_in * b.dk + c] : 0.f;
    }
    __device__ float q(long long row, int c) const { return pass == 0 ? gp(row, c) : pass == 1 ? v1(row, c) : phi_k(row, c); }
    __device__ float k(long long row, int c) const { return pass == 0 ? v1(row, c) : pass == 1 ? gp(row, c) : phi_q(row, c); }
    __device__ float v(long long row, int j) const { return pass == 0 ? phi_k(row, j) : pass == 1 ? phi_q(row, j) : gp(row, j); }
    __device__ float mom(long long row, int j) const { return mk::to_float(static_cast<const T*>(b.g)[row * b.dv + j]); }
    __device__ float s0(int c, int j) const {
        if (pass == 0) return aug(b.s0, b.z0, j, c);
        return pass == 1 ? aug(b.gs, b.gz, j, c) : aug(b.gs, b.gz, c, j);
    }
    __device__ float z0(int) const { return 0.f; }
    static constexpr int VEC = 0;  // operands built on load ([v,1], g'): element by element
    __device__ bool has_out() const { return true; }
    __device__ void store_chunk(const float* Os, const float*, long long step0, int n, int j0, int w) const {
        for (int e = threadIdx.x; e < n * TILE; e += THREADS) {
            const int i = e / TILE, j = e % TILE, col = j0 + j;
            const long long row = row_of(it, step0 + i, pass != 0);
            if (j >= w) continue;
            const float x = Os[os_index(i, j)];
            if (pass == 0)
                static_cast<T*>(b.grad_q)[row * b.dk + col] = mk::from_float<T>(x * dphi(b.fm, raw(b.q, row, col)));
            else if (pass == 1)
                static_cast<T*>(b.grad_k)[row * b.dk + col] = mk::from_float<T>(x * dphi(b.fm, raw(b.k, row, col)));
            else if (col < b.dv)
                static_cast<T*>(b.grad_v)[row * b.dv + col] = mk::from_float<T>(x);
        }
    }
    __device__ bool has_state_out() const { return pass == 2; }
    __device__ void store_state(int c, int j, float x) const {
        if (j < b.dv) b.ds0[(it.state_out * b.dk + c) * b.dv + j] = x;
        else b.dz0[it.state_out * b.dk + c] = x;
    }
    __device__ void store_z(int, float) const {}
};

// The forward's shape and options for the prep.
__device__ CoreArgs prep_shape(const BwdArgs& b) {
    CoreArgs p = {};
    p.q = b.q;
    p.k = b.k;
    p.v = b.v;
    p.items = b.items;
    p.n_items = b.n_items;
    p.dk = b.dk;
    p.dv = b.dv;
    p.s_in = b.s0;
    p.z_in = b.z0;
    p.fm = b.fm;
    p.causal = b.causal;
    p.normalize = b.normalize;
    p.accumulate = 1;
    p.scale = b.scale;
    p.eps = b.eps;
    p.eta = -1.f;
    return p;
}

// The widths and options of backward pass `pass` (see the list above).
__device__ CoreArgs pass_shape(const BwdArgs& b, int pass) {
    CoreArgs p = {};
    p.items = b.items;
    p.n_items = b.n_items;
    p.dk = pass == 2 ? b.dk : b.dv + 1;
    p.dv = pass == 2 ? b.dv + 1 : b.dk;
    p.causal = b.causal;
    p.reverse = pass != 0;
    p.accumulate = 1;
    p.scale = 1.f;
    p.eta = pass == 2 ? b.eta : -1.f;
    p.mom_width = b.dv;
    return p;
}

template <typename T, int C>
__device__ void backward_prep(const BwdArgs& b, float* sm) {
    const CoreArgs p = prep_shape(b);
    const Item it = b.items[blockIdx.x];
    core<C>(p, it, PrepIo<T>(p, it, b), sm);
}

template <typename T, int C>
__device__ void backward_passes(const BwdArgs& b, float* sm) {
    const int pass = blockIdx.z;
    const CoreArgs p = pass_shape(b, pass);
    if ((int)blockIdx.y * TILE >= p.dv) return;  // the whole block: this pass is narrower
    const Item it = b.items[blockIdx.x];
    core<C>(p, it, PassIo<T>{b, it, pass}, sm);
}

// The same two launches on tensor cores, for f16/bf16 without momentum: the prep is the
// tensor-core forward (its operands q, k, v in their own type), the passes round their
// operands to bf16 whatever the input type. The passes' operands include the f32 gradient g'
// = f·∂L/∂o with f = scale/den ~ 1/(T·Dk) on long normalised sequences, which f16 would take
// into its subnormals (about 3% precision at T = 4096, Dk = 128), and the states ∂S: bf16 has
// f32's range, one step less precision than f16 on q, k, v. Accumulation stays f32.
// Except one pass: when normalising, dφ(q) = f·(S g − z (g·o/scale)) = f·(S − z ôᵀ) g is a
// difference of nearly equal terms (z ôᵀ is S's mean part when φ ≥ 0), and rounding S and z
// to 16 bits makes its error grow with the cancellation (1.7% against 0.4% for the other
// gradients, CPU emulation); so that pass stays on the f32 SIMT core, in the same launch
// (shared memory: the larger of the two plans).
template <typename T, int C>
__device__ void backward_prep_mma(const BwdArgs& b, unsigned char* smem) {
    const CoreArgs p = prep_shape(b);
    const Item it = b.items[blockIdx.x];
    core_mma<T, C>(p, it, PrepIo<T>(p, it, b), smem);
}

template <typename T, int C>
__device__ void backward_passes_mma(const BwdArgs& b, unsigned char* smem) {
    const int pass = blockIdx.z;
    const CoreArgs p = pass_shape(b, pass);
    if ((int)blockIdx.y * TILE >= p.dv) return;  // the whole block: this pass is narrower
    const Item it = b.items[blockIdx.x];
    if (pass == 0 && b.normalize) core<C>(p, it, PassIo<T>{b, it, pass}, reinterpret_cast<float*>(smem));
    else core_mma<__nv_bfloat16, C>(p, it, PassIo<T>{b, it, pass}, smem);
}

}  // namespace

#define MK_BACKWARD(SN, T, C)                                                                             \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) la_backward_prep_##SN##_c##C(BwdArgs b) {   \
        extern __shared__ float sm[];                                                                     \
        backward_prep<T, C>(b, sm);                                                                       \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) la_backward_passes_##SN##_c##C(BwdArgs b) { \
        extern __shared__ float sm[];                                                                     \
        backward_passes<T, C>(b, sm);                                                                     \
    }

#define MK_BACKWARD_MMA(SN, T, C)                                                                                 \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) la_backward_prep_mma_##SN##_c##C(BwdArgs b) {   \
        extern __shared__ __align__(16) unsigned char smem_mma[];                                             \
        backward_prep_mma<T, C>(b, smem_mma);                                                                 \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) la_backward_passes_mma_##SN##_c##C(BwdArgs b) { \
        extern __shared__ __align__(16) unsigned char smem_mma[];                                             \
        backward_passes_mma<T, C>(b, smem_mma);                                                               \
    }

MK_BACKWARD(f32, float, 64)
MK_BACKWARD(f32, float, 32)
MK_BACKWARD(f16, __half, 64)
MK_BACKWARD(f16, __half, 32)
MK_BACKWARD(bf16, __nv_bfloat16, 64)
MK_BACKWARD(bf16, __nv_bfloat16, 32)
MK_BACKWARD_MMA(f16, __half, 64)
MK_BACKWARD_MMA(f16, __half, 32)
MK_BACKWARD_MMA(bf16, __nv_bfloat16, 64)
MK_BACKWARD_MMA(bf16, __nv_bfloat16, 32)
