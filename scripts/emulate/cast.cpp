// scripts/emulate/run.sh cast [quick]: runs kernels/cast.cu under the CPU emulation of prelude.h,
// with the grids of src/ops/cast/cuda.rs (grid_1d over ⌈n/4⌉ threads of 256, at most 65535
// blocks), and checks every element of the fast kernel (cast_<src>_to_<dst>: four elements a
// thread, a scalar tail, grid-stride) and of the reference kernel (cast_reference_*: one a
// thread, grid-stride; launched here like the fast one with one thread an element) bit for bit
// against the host's correctly rounded conversion (NaN matches any NaN). All 16 (source,
// target) pairs; n around the vector width (1, 3, 4, 5), a ragged 1023, 4099 (quick: up to
// 1023), and in full mode a grid that strides (65535 blocks × 256 threads × 4 elements + 5 =
// 67 M elements, f32 → bf16; it caught the reference kernel covering only its first 16.7 M
// elements, one per thread of the capped grid, before it became grid-stride). Inputs: normal data at scales 1e-8 .. 1e6, ±0, ±inf, NaN, f16/bf16 overflow
// boundaries and subnormals, and values a hair above a 16-bit tie (rounding f64 to f32 first
// would round them twice, the wrong way). The host reference finds the nearest 16-bit value by
// comparing the neighbours of a first guess (as tests/all/tensor.rs), independently of the shims.
//
// What it proves: the kernels' index math (vector body, tail, grid-stride), no access past either
// buffer (each an emu::DeviceVec), and the conversions of common.cuh under the emulation's shims.
// What it cannot: the device's own conversion instructions (the shims stand in for them). It is
// not a GPU run.
#include "prelude.h"
#define MK_HOST_EMULATION 1

#include "cast.cu"
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "report.h"

template <typename T> using Dev = emu::DeviceVec<T>;

// ------------------------------------------------------------------ host conversions ---------

template <typename T> double to_f64(T x) { return mk::to_double(x); }
template <> double to_f64<double>(double x) { return x; }

template <typename T> uint16_t bits16(T h) { uint16_t b; std::memcpy(&b, &h, 2); return b; }
template <typename T> T from_bits16(uint16_t b) { T h; std::memcpy(&h, &b, 2); return h; }

// The 16-bit value nearest to x (ties to even), by comparing the neighbours of a guess; past the
// midpoint above the largest finite value (odd mantissa), infinity.
template <typename T>
T nearest16(double x, double max_finite, double max_prev) {
    if (!std::isfinite(x)) return mk::from_float<T>((float)x);
    if (std::fabs(x) >= max_finite + (max_finite - max_prev) / 2)
        return mk::from_float<T>(x > 0 ? INFINITY : -INFINITY);
    const uint16_t guess = bits16(mk::from_float<T>((float)x));
    T best = from_bits16<T>(guess);
    for (int d = -1; d <= 1; ++d) {
        const T c = from_bits16<T>((uint16_t)(guess + d));
        const double cd = to_f64(c);
        if (!std::isfinite(cd)) continue;
        const double dc = std::fabs(cd - x), db = std::fabs(to_f64(best) - x);
        if (dc < db || (dc == db && (bits16(c) & 1) == 0)) best = c;
    }
    return best;
}

template <typename D> D host_round(double x);
template <> float host_round<float>(double x) { return (float)x; }
template <> double host_round<double>(double x) { return x; }
template <> __half host_round<__half>(double x) { return nearest16<__half>(x, 65504.0, 65472.0); }
template <> __nv_bfloat16 host_round<__nv_bfloat16>(double x) {
    return nearest16<__nv_bfloat16>(x, 0x1.fep127, 0x1.fcp127);
}

template <typename T> T from_f64_input(double x);
template <> float from_f64_input<float>(double x) { return (float)x; }
template <> double from_f64_input<double>(double x) { return x; }
template <> __half from_f64_input<__half>(double x) { return host_round<__half>(x); }
template <> __nv_bfloat16 from_f64_input<__nv_bfloat16>(double x) { return host_round<__nv_bfloat16>(x); }

// ------------------------------------------------------------------ kernels by type -----------

template <typename S, typename D> struct Cast;
#define MK_PAIR(S, SN, D, DN)                                                                          \
    template <> struct Cast<S, D> {                                                                   \
        static constexpr const char* name = #SN "_to_" #DN;                                           \
        static void fast(const S* s, D* d, uint64_t n) { cast_##SN##_to_##DN(s, d, n); }             \
        static void reference(const S* s, D* d, uint64_t n) { cast_reference_##SN##_to_##DN(s, d, n); } \
    };
#define MK_FROM(S, SN)                          \
    MK_PAIR(S, SN, float, f32)                  \
    MK_PAIR(S, SN, double, f64)                 \
    MK_PAIR(S, SN, __half, f16)                 \
    MK_PAIR(S, SN, __nv_bfloat16, bf16)
MK_FROM(float, f32)
MK_FROM(double, f64)
MK_FROM(__half, f16)
MK_FROM(__nv_bfloat16, bf16)
#undef MK_FROM
#undef MK_PAIR

// ------------------------------------------------------------------ inputs and checks ---------

static std::vector<double> inputs(size_t n, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> normal;
    const double specials[] = {0.0, -0.0, INFINITY, -INFINITY, NAN, 65504.0, 65520.0, -65519.9, 6e-8, 1e-8,
                               -3.0e38, 3.3961776e38, 1.0 + 0x1p-11, 1.0 + 0x1p-8, 1e-40};
    std::vector<double> v(n);
    for (size_t i = 0; i < n; ++i) v[i] = normal(rng) * std::pow(10.0, (double)(i % 15) - 8.0);
    // Specials and double-rounding traps at fixed places (the tail too when n is small).
    size_t at = 0;
    for (double s : specials) if (at < n) v[(at++ * 7919) % n] = s;
    for (double tie : {1.0 + 0x1p-8, 1.0 + 0x1p-11, 3.0 + 0x1p-7})
        for (double sign : {1.0, -1.0})
            if (at < n) v[(at++ * 7919) % n] = sign * (tie + 0x1p-40);
    if (n > 0) v[n - 1] = 1.0 + 0x1p-8 + 0x1p-40;  // the last element: the scalar tail
    return v;
}

template <typename D> bool same(D a, D b) {
    const double x = to_f64(a), y = to_f64(b);
    if (std::isnan(x) || std::isnan(y)) return std::isnan(x) && std::isnan(y);
    return std::memcmp(&a, &b, sizeof(D)) == 0;  // ±0 distinguished
}

// One pair at one size: fast and reference kernels, outputs poisoned, every element checked.
template <typename S, typename D>
static void check_pair(const std::vector<double>& values) {
    const size_t n = values.size();
    std::vector<S> src_host(n);
    for (size_t i = 0; i < n; ++i) src_host[i] = from_f64_input<S>(values[i]);
    std::vector<D> want(n);
    for (size_t i = 0; i < n; ++i) want[i] = host_round<D>(to_f64(src_host[i]));
    const Dev<S> src(src_host);
    for (int which = 0; which < 2; ++which) {
        Dev<D> dst(n, from_f64_input<D>(NAN));
        const S* s = src.data();
        D* d = dst.data();
        // cuda.rs: grid_1d(⌈n/4⌉, 256); the reference one thread an element.
        const size_t threads = which == 0 ? (n + 3) / 4 : n;
        const unsigned blocks = (unsigned)std::clamp<size_t>((threads + 255) / 256, 1, 65535);
        if (which == 0) emu_launch({blocks, 1, 1}, {256, 1, 1}, 0, [=] { Cast<S, D>::fast(s, d, n); });
        else emu_launch({blocks, 1, 1}, {256, 1, 1}, 0, [=] { Cast<S, D>::reference(s, d, n); });
        size_t bad = 0, first = 0;
        for (size_t i = 0; i < n; ++i)
            if (!same(dst[i], want[i]) && bad++ == 0) first = i;
        char detail[160];
        if (bad)
            std::snprintf(detail, sizeof detail, "%zu of %zu differ; first %zu: %.17g -> %.17g, want %.17g", bad, n,
                          first, to_f64(src_host[first]), to_f64(dst[first]), to_f64(want[first]));
        else std::snprintf(detail, sizeof detail, "exact (%zu)", n);
        check(tag("cast_%s%s n=%zu", which == 0 ? "" : "reference_", Cast<S, D>::name, n), bad == 0, detail);
    }
}

template <typename S>
static void check_from(const std::vector<double>& values) {
    check_pair<S, float>(values);
    check_pair<S, double>(values);
    check_pair<S, __half>(values);
    check_pair<S, __nv_bfloat16>(values);
}

int main(int argc, char** argv) {
    const auto start = std::chrono::steady_clock::now();
    const bool quick = argc > 1 && std::string(argv[1]) == "quick";
    std::vector<size_t> sizes = {1, 3, 4, 5, 1023};
    if (!quick) sizes.push_back(4099);
    for (size_t n : sizes) {
        const auto values = inputs(n, 7 + n);
        check_from<float>(values);
        check_from<double>(values);
        check_from<__half>(values);
        check_from<__nv_bfloat16>(values);
    }
    if (!quick) {
        // Past 65535 blocks of 256 threads × 4 elements, threads loop (grid-stride).
        check_pair<float, __nv_bfloat16>(inputs(65535ull * 256 * 4 + 5, 11));
    }
    return finish(start);
}
