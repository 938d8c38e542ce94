// Ceiling micro-kernels: the peak rates the benchmarks hold kernels against, measured on the
// machine in the same run instead of taken from a datasheet.
//
// ceiling_mma_{bf16,f16}: warps issue chains of mma.sync m16n8k16 (f32 accumulate) on register
//   operands, with CHAINS independent accumulators to cover the instruction latency. This is
//   the rate reachable with mma.sync (sm_80 style); on Hopper, wgmma can go higher, and the
//   benchmarks say which ceiling they use.
// ceiling_fma_f32: CHAINS independent fp32 FMA chains per thread (the SIMT f32 peak).
//
// Each kernel writes its accumulators only when `sink` is nonzero (it never is), so the
// compiler cannot drop the work but no memory traffic is timed.
#include "common.cuh"

namespace {

constexpr int CHAINS = 4;

template <bool F16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    if constexpr (F16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
}

template <bool F16>
__device__ void mma_peak(float* sink_out, int iters, int sink) {
    // Small finite operands (about 1/64 in both formats) so no accumulator overflows.
    const uint32_t one_64 = F16 ? 0x24002400u : 0x3C803C80u;
    uint32_t a[4] = {one_64, one_64 ^ (threadIdx.x & 1u), one_64, one_64};
    uint32_t b[2] = {one_64, one_64};
    float acc[CHAINS][4] = {};
    for (int i = 0; i < iters; ++i) {
#pragma unroll
        for (int c = 0; c < CHAINS; ++c) mma_16816<F16>(acc[c], a, b);
    }
    if (sink) {
        float s = 0.f;
#pragma unroll
        for (int c = 0; c < CHAINS; ++c) s += acc[c][0] + acc[c][1] + acc[c][2] + acc[c][3];
        sink_out[mk::global_thread()] = s;
    }
}

}  // namespace

extern "C" __global__ void ceiling_mma_bf16(float* sink_out, int iters, int sink) {
    mma_peak<false>(sink_out, iters, sink);
}

extern "C" __global__ void ceiling_mma_f16(float* sink_out, int iters, int sink) {
    mma_peak<true>(sink_out, iters, sink);
}

extern "C" __global__ void ceiling_fma_f32(float* sink_out, int iters, int sink) {
    float x[CHAINS * 2];
#pragma unroll
    for (int c = 0; c < CHAINS * 2; ++c) x[c] = 1e-3f * (threadIdx.x + c);
    const float m = 0.999f, k = 1e-4f;
    for (int i = 0; i < iters; ++i) {
#pragma unroll
        for (int c = 0; c < CHAINS * 2; ++c) x[c] = fmaf(x[c], m, k);
    }
    if (sink) {
        float s = 0.f;
#pragma unroll
        for (int c = 0; c < CHAINS * 2; ++c) s += x[c];
        sink_out[mk::global_thread()] = s;
    }
}
