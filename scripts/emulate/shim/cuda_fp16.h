// Host shim of the CUDA half type for the CPU emulation: IEEE binary16 via _Float16.
#pragma once
#include <cstdint>
#include <cstring>
struct __half { uint16_t x; };
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.x, 2); return (float)f; }
inline __half __float2half_rn(float x) { _Float16 f = (_Float16)x; __half h; std::memcpy(&h.x, &f, 2); return h; }
inline __half __double2half(double x) { _Float16 f = (_Float16)x; __half h; std::memcpy(&h.x, &f, 2); return h; }
struct alignas(4) __half2 { __half x, y; };
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
