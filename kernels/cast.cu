// dtype casts between f32, f64, f16 and bf16: cast_<src>_to_<dst>(src, dst, n).
//
// Bandwidth-bound: each thread moves 4 elements with one vector load and one vector store per
// grid-stride step, so f16 → f32 reads 8 bytes and writes 16 per thread. Tensors are whole
// allocations (256-byte aligned), so the vector accesses are aligned; the last n % 4 elements
// are handled one by one.
//
// cast_reference_<src>_to_<dst> is the obviously correct version (one element per thread and
// grid-stride step). The GPU test checks the fast kernel against correctly rounded f64 values
// computed on the host; the CPU emulation (scripts/emulate/run.sh cast) checks both kernels the
// same way.
#include "common.cuh"

namespace {

constexpr int VEC = 4;

template <typename S, typename D>
__device__ __forceinline__ D convert(S x) {
    // Through f64 when either side is f64 (single rounding), else through f32 (exact for
    // f16/bf16 sources).
    if constexpr (sizeof(S) == 8 || sizeof(D) == 8) return mk::from_double<D>(mk::to_double(x));
    else return mk::from_float<D>(mk::to_float(x));
}

template <typename S, typename D>
__device__ void cast_vectorised(const S* __restrict__ src, D* __restrict__ dst, uint64_t n) {
    const uint64_t vectors = n / VEC;
    for (uint64_t i = mk::global_thread(); i < vectors; i += mk::grid_threads()) {
        const mk::Vec<S, VEC> in = mk::load_vec<S, VEC>(src + i * VEC);
        mk::Vec<D, VEC> out;
#pragma unroll
        for (int j = 0; j < VEC; ++j) out.v[j] = convert<S, D>(in.v[j]);
        mk::store_vec<D, VEC>(dst + i * VEC, out);
    }
    const uint64_t tail = vectors * VEC + mk::global_thread();
    if (tail < n) dst[tail] = convert<S, D>(src[tail]);
}

// Grid-stride too: a launch's grid is capped at 65535 blocks (grid_1d), fewer threads than
// elements past 16.7 M.
template <typename S, typename D>
__device__ void cast_reference(const S* __restrict__ src, D* __restrict__ dst, uint64_t n) {
    for (uint64_t i = mk::global_thread(); i < n; i += mk::grid_threads()) dst[i] = convert<S, D>(src[i]);
}

}  // namespace

#define MK_CAST(SN, S, DN, D)                                                                    \
    extern "C" __global__ void cast_##SN##_to_##DN(const S* __restrict__ src, D* __restrict__ dst, \
                                                   uint64_t n) {                                 \
        cast_vectorised<S, D>(src, dst, n);                                                      \
    }                                                                                            \
    extern "C" __global__ void cast_reference_##SN##_to_##DN(const S* __restrict__ src,          \
                                                             D* __restrict__ dst, uint64_t n) {  \
        cast_reference<S, D>(src, dst, n);                                                       \
    }

#define MK_CAST_FROM(SN, S)                    \
    MK_CAST(SN, S, f32, float)                 \
    MK_CAST(SN, S, f64, double)                \
    MK_CAST(SN, S, f16, __half)                \
    MK_CAST(SN, S, bf16, __nv_bfloat16)

MK_CAST_FROM(f32, float)
MK_CAST_FROM(f64, double)
MK_CAST_FROM(f16, __half)
MK_CAST_FROM(bf16, __nv_bfloat16)
