// Tallies and checks shared by the emulation drivers: every comparison prints one line and is
// counted, and finish() prints the summary line that CI shows (comparisons, failures, the worst
// error as a fraction of its tolerance) and gives the exit status.
#pragma once
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <random>
#include <string>
#include <vector>

static int g_failures = 0, g_comparisons = 0;
static double g_worst = 0;  // the largest error / tolerance seen
static std::string g_worst_what;
// Set while a driver checks its own float64 reference: those errors are not a kernel's worst.
static bool g_self_check = false;

static void record(const std::string& what, double ratio, bool ok, const char* detail) {
    ++g_comparisons;
    if (!ok) ++g_failures;
    if (!g_self_check && std::isfinite(ratio) && ratio > g_worst) g_worst = ratio, g_worst_what = what;
    std::printf("%-78s %s %s\n", what.c_str(), detail, ok ? "ok" : "FAIL");
    std::fflush(stdout);
}

// Relative error vs the reference's norm (testing::rel_error / assert_close), absolute when that
// is zero. A size mismatch or a non-finite element (poison: unwritten) fails.
template <typename Got = std::vector<float>, typename Want = std::vector<double>>
static void compare(const std::string& what, const Got& got, const Want& want, double tol) {
    double num = 0, den = 0;
    bool nan = got.size() != want.size();
    for (size_t i = 0; i < want.size() && !nan; ++i) {
        const double g = (double)got[i], w = (double)want[i];
        if (!std::isfinite(g)) nan = true;
        num += (g - w) * (g - w);
        den += w * w;
    }
    const double rel = den == 0 ? std::sqrt(num) : std::sqrt(num / den);
    char detail[80];
    std::snprintf(detail, sizeof detail, "rel %.2e (tol %.0e)%s", rel, tol, nan ? " NaN/unwritten" : "");
    record(what, nan ? INFINITY : rel / tol, !nan && rel <= tol, detail);
}

// Bitwise equality (integer outputs, determinism).
template <typename U>
static void exact(const std::string& what, const std::vector<U>& got, const std::vector<U>& want) {
    size_t bad = got.size() == want.size() ? 0 : 1, first = 0;
    for (size_t i = 0; i < std::min(got.size(), want.size()); ++i)
        if (std::memcmp(&got[i], &want[i], sizeof(U)) != 0 && bad++ == 0) first = i;
    char detail[80];
    if (bad) std::snprintf(detail, sizeof detail, "%zu of %zu differ (first at %zu)", bad, want.size(), first);
    else std::snprintf(detail, sizeof detail, "exact (%zu)", want.size());
    record(what, bad ? INFINITY : 0, bad == 0, detail);
}

static void check(const std::string& what, bool ok, const char* detail = "") {
    record(what, ok ? 0 : INFINITY, ok, detail);
}

static std::string tag(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
static std::string tag(const char* fmt, ...) {
    char b[160];
    va_list a;
    va_start(a, fmt);
    std::vsnprintf(b, sizeof b, fmt, a);
    va_end(a);
    return b;
}

// The summary line; the driver's exit status (1 on any failure).
static int finish(std::chrono::steady_clock::time_point start) {
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("%d comparison(s), %d failure(s); worst error / tolerance %.3f (%s); %.0f s\n", g_comparisons,
                g_failures, g_worst, g_worst_what.c_str(), secs);
    return g_failures ? 1 : 0;
}

// `random N [seed]` on a driver's command line: N cases drawn at random from the seed (default
// 40 cases, seed 1), beyond the driver's fixed matrix. Any seed replays exactly.
struct RandomRun {
    int cases;
    unsigned long long seed;
};
static std::optional<RandomRun> random_run(int argc, char** argv) {
    if (argc < 2 || std::string(argv[1]) != "random") return std::nullopt;
    return RandomRun{argc > 2 ? std::atoi(argv[2]) : 40, argc > 3 ? std::strtoull(argv[3], nullptr, 10) : 1};
}

// A size in [lo, hi], half the time one of `edges` (where a kernel splits its work).
static int pick_edge(std::mt19937_64& r, std::initializer_list<int> edges, int lo, int hi) {
    if (r() % 2) return std::uniform_int_distribution<int>(lo, hi)(r);
    return *(edges.begin() + r() % edges.size());
}
