// CPU emulation of the CUDA execution model, used by scripts/emulate/run.sh (written for kernels/linear_attention.cu): one block
// at a time, one std::thread per CUDA thread, __syncthreads as a block barrier, warp shuffles
// and mma.sync through per-warp scratch and warp barriers.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>
using std::max;
using std::min;
struct dim3 { unsigned x = 0, y = 0, z = 0; };
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__
#define __align__(n) __attribute__((aligned(n)))
inline float __expf(float x) { return std::exp(x); }

constexpr int EMU_THREADS = 256;
std::barrier<>* g_block_barrier;
std::barrier<>* g_warp_barrier[EMU_THREADS / 32];
inline void __syncthreads() { g_block_barrier->arrive_and_wait(); }
inline void warp_sync() { g_warp_barrier[threadIdx.x / 32]->arrive_and_wait(); }

double g_shfl[EMU_THREADS / 32][32];
template <typename T>
T __shfl_xor_sync(unsigned, T x, int offset) {
    const int w = threadIdx.x / 32, l = threadIdx.x % 32;
    g_shfl[w][l] = (double)x;
    warp_sync();
    T r = (T)g_shfl[w][l ^ offset];
    warp_sync();
    return r;
}

// mma.sync.m16n8k16.row.col f32 += {f16|bf16}: gather every lane's fragments, rebuild A and B
// with the PTX ISA layouts, each lane computes its four accumulators.
uint32_t g_mma_a[EMU_THREADS / 32][32][4], g_mma_b[EMU_THREADS / 32][32][2];
inline float emu_half_bits(uint16_t bits, bool bf16) {
    if (bf16) { uint32_t u = (uint32_t)bits << 16; float f; std::memcpy(&f, &u, 4); return f; }
    _Float16 h; std::memcpy(&h, &bits, 2); return (float)h;
}
inline void mk_emulated_mma(float* d, const uint32_t* a, const uint32_t* b, bool bf16) {
    const int w = threadIdx.x / 32, l = threadIdx.x % 32;
    for (int i = 0; i < 4; ++i) g_mma_a[w][l][i] = a[i];
    for (int i = 0; i < 2; ++i) g_mma_b[w][l][i] = b[i];
    warp_sync();
    auto A = [&](int r, int k) {
        const uint32_t reg = g_mma_a[w][(r % 8) * 4 + (k % 8) / 2][(r >= 8) + 2 * (k >= 8)];
        return emu_half_bits((uint16_t)(k % 2 ? reg >> 16 : reg & 0xffff), bf16);
    };
    auto B = [&](int k, int n) {
        const uint32_t reg = g_mma_b[w][n * 4 + (k % 8) / 2][k >= 8];
        return emu_half_bits((uint16_t)(k % 2 ? reg >> 16 : reg & 0xffff), bf16);
    };
    const int g = l / 4, t = l % 4;
    float out[4];
    for (int e = 0; e < 4; ++e) {
        const int r = g + (e >= 2 ? 8 : 0), n = 2 * t + (e & 1);
        float s = d[e];
        for (int k = 0; k < 16; ++k) s += A(r, k) * B(k, n);
        out[e] = s;
    }
    warp_sync();
    for (int e = 0; e < 4; ++e) d[e] = out[e];
}

extern "C" {
alignas(16) float sm[65536];
alignas(16) unsigned char smem_h[262144];
alignas(16) unsigned char smem_b[262144];
}

// Runs `kernel` over `grid` blocks of 256 threads, one block after another.
inline void emu_launch(dim3 grid, const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = {EMU_THREADS, 1, 1};
    for (unsigned z = 0; z < std::max(grid.z, 1u); ++z)
        for (unsigned y = 0; y < std::max(grid.y, 1u); ++y)
            for (unsigned x = 0; x < std::max(grid.x, 1u); ++x) {
                std::barrier<> block(EMU_THREADS);
                std::vector<std::barrier<>*> warps;
                g_block_barrier = &block;
                for (int w = 0; w < EMU_THREADS / 32; ++w) g_warp_barrier[w] = new std::barrier<>(32);
                // Poison shared memory: a read of something no thread wrote shows up as NaN.
                std::memset(sm, 0xff, sizeof sm);
                std::memset(smem_h, 0xff, sizeof smem_h);
                std::memset(smem_b, 0xff, sizeof smem_b);
                std::vector<std::thread> threads;
                threads.reserve(EMU_THREADS);
                for (int t = 0; t < EMU_THREADS; ++t)
                    threads.emplace_back([&, t] {
                        threadIdx = {(unsigned)t, 0, 0};
                        blockIdx = {x, y, z};
                        kernel();
                    });
                for (auto& th : threads) th.join();
                for (int w = 0; w < EMU_THREADS / 32; ++w) delete g_warp_barrier[w];
            }
}
