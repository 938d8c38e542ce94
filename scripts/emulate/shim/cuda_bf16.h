// Host shim of the CUDA bfloat16 type for the CPU emulation (round to nearest even).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
struct __nv_bfloat16 { uint16_t x; };
inline float __bfloat162float(__nv_bfloat16 h) { uint32_t u = (uint32_t)h.x << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
    uint32_t u; std::memcpy(&u, &x, 4);
    __nv_bfloat16 h;
    if ((u & 0x7fffffffu) > 0x7f800000u) { h.x = (uint16_t)((u >> 16) | 0x40); return h; }
    u += 0x7fffu + ((u >> 16) & 1u);
    h.x = (uint16_t)(u >> 16);
    return h;
}
// A single rounding, as the device's cvt.rn.bf16.f64: f64 → f32 rounded to odd (truncate, then
// set the last bit if inexact), then to bf16 to nearest even, is exact since f32 keeps more than
// bf16's 8 bits + 2 (rounding f64 → f32 to nearest first would round ties twice).
inline __nv_bfloat16 __double2bfloat16(double x) {
    float f = (float)x;
    if (std::isfinite(x) && (double)f != x) {
        if (std::fabs((double)f) > std::fabs(x)) f = std::nextafterf(f, 0.f);
        uint32_t u; std::memcpy(&u, &f, 4); u |= 1u; std::memcpy(&f, &u, 4);
    }
    return __float2bfloat16_rn(f);
}
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) { return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)}; }
