// Warp-level tensor-core and async-copy primitives shared by the families that use them
// (linear attention, momentum attention, K-means): mma.sync m16n8k16 with f32 accumulation,
// ldmatrix (plain and transposed) and cp.async. Header-only, sm_80 and newer.
//
// Under scripts/emulate (MK_HOST_EMULATION) each primitive is the prelude's emulation, with the
// PTX ISA semantics and fragment layouts, so the kernels that use them run on CPU threads.
#pragma once

#include "common.cuh"

namespace mk {

#ifdef MK_HOST_EMULATION
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) { mk_emulated_ldmatrix_x4(r, p, false); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
    mk_emulated_ldmatrix_x4(r, p, true);
}
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    const uint32_t b[2] = {b0, b1};
    mk_emulated_mma(d, a, b, std::is_same_v<T, __nv_bfloat16>);
}
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
    mk_emulated_cp_async_16(dst, src, src_bytes);
}
__device__ __forceinline__ void cp_async_commit() { mk_emulated_cp_async_commit(); }
__device__ __forceinline__ void cp_async_wait_all() { mk_emulated_cp_async_wait_all(); }
#else
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8×8 b16 matrices from shared memory: lane l gives the address of row l % 8 of matrix
// l / 8 (16 contiguous bytes, 16-byte aligned) and receives, of each matrix i, the pair
// (row l / 4, columns 2(l % 4), 2(l % 4) + 1) in r[i].
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p))
                 : "memory");
}
// The same with each matrix transposed: lane l receives (rows 2(l % 4), 2(l % 4) + 1, column l / 4).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p))
                 : "memory");
}

// D(16×8, f32) += A(16×16) · B(16×8), A row-major, B column-major, T = __half or __nv_bfloat16.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                  uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16 bytes global → shared without passing through registers; src_bytes = 0 writes zeros (tails).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
#endif

// ---------------------------------------------------------------- m16n8k16 fragments --------
// Fragment loads for mma_16816 from 16-bit matrices in shared memory whose rows are 16-byte
// aligned (ld a multiple of 8 halves; a pad of 8 halves makes the 8 rows of every ldmatrix
// phase fall on distinct banks). r0, k0, n0 are multiples of 8.

// The A tile (16×16 at rows r0, columns k0) of a matrix stored row-major, M[r][k].
__device__ __forceinline__ void frag_a(uint32_t (&a)[4], const void* m, int ld, int r0, int k0) {
    const int l = threadIdx.x % 32;
    ldmatrix_x4(a, static_cast<const uint16_t*>(m) + (r0 + l % 16) * ld + k0 + (l / 16) * 8);
}
// ... of a matrix stored transposed, M[k][r] (A = Mᵀ).
__device__ __forceinline__ void frag_a_trans(uint32_t (&a)[4], const void* m, int ld, int r0, int k0) {
    const int l = threadIdx.x % 32;
    ldmatrix_x4_trans(a, static_cast<const uint16_t*>(m) + (k0 + (l / 16) * 8 + l % 8) * ld + r0 + ((l / 8) % 2) * 8);
}
// Two B tiles (16×8 at rows k0, columns n0 and n0 + 8) of B stored column by column, M[n][k]
// (B = Mᵀ, such as Kᵀ in QKᵀ): b[0], b[1] are the first tile's registers, b[2], b[3] the second's.
__device__ __forceinline__ void frag_b_pair(uint32_t (&b)[4], const void* m, int ld, int k0, int n0) {
    const int l = threadIdx.x % 32;
    ldmatrix_x4(b, static_cast<const uint16_t*>(m) + (n0 + (l / 16) * 8 + l % 8) * ld + k0 + ((l / 8) % 2) * 8);
}
// ... of B stored row by row, M[k][n] (such as V in PV).
__device__ __forceinline__ void frag_b_pair_trans(uint32_t (&b)[4], const void* m, int ld, int k0, int n0) {
    const int l = threadIdx.x % 32;
    ldmatrix_x4_trans(b, static_cast<const uint16_t*>(m) + (k0 + ((l / 8) % 2) * 8 + l % 8) * ld + n0 + (l / 16) * 8);
}

// Two floats as one register of two 16-bit values (the first in the low half), rounded to
// nearest: a fragment register, or a 32-bit store of two adjacent elements.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}

// The two 16-bit values of a fragment register as floats, the lower-addressed one first.
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t r) {
    T h[2];
    memcpy(h, &r, sizeof(r));
    return make_float2(to_float(h[0]), to_float(h[1]));
}

}  // namespace mk
