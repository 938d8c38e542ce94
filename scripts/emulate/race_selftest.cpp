// scripts/emulate/run.sh race_selftest: the race detector's own test. Small kernels, each in a
// racy form and a correct one: threads exchanging values through shared memory with and
// without __syncthreads, lanes of a warp with and without __syncwarp (a shuffle meets the warp
// but orders no memory), the same through global memory, a cp.async load into a tile that
// another warp still reads, and atomics. Each case runs in a child process; under EMU_TSAN=1 a
// racy case must end with TSan's exit status 66 and a correct one must exit 0 with the right
// values, so a detector that stopped seeing (everything untracked, a barrier that orders too
// much) fails here. Without EMU_TSAN only the correct forms run (their values are checked): the
// plain emulation makes no promise to notice a race.
#include "prelude.h"
#include <sys/wait.h>

#include "report.h"

EMU_DYNAMIC_SHARED(float, dyn_tile);  // reload_tile's `extern __shared__ float dyn_tile[]`

constexpr int N = 64;  // two warps

// Every thread publishes its index, then reads the other warp's.
template <bool BARRIER>
void exchange_shared(float* out) {
    __shared__ float s[N];
    const int t = threadIdx.x;
    s[t] = (float)t;
    if (BARRIER) __syncthreads();
    out[t] = s[(t + 32) % N];
}

// Lane l reads lane l ^ 1's value after a shuffle (one warp).
template <bool SYNCWARP>
void exchange_in_warp(float* out) {
    __shared__ float s[32];
    const int l = threadIdx.x;
    s[l] = (float)l;
    const int partner = __shfl_xor_sync(0xffffffffu, l, 1);
    if (SYNCWARP) __syncwarp();
    out[l] = s[partner];
}

// The first exchange, through global memory.
template <bool BARRIER>
void exchange_global(float* buf, float* out) {
    const int t = threadIdx.x;
    buf[t] = (float)t;
    if (BARRIER) __syncthreads();
    out[t] = buf[(t + 32) % N];
}

// Every thread reads the other warp's half of a tile, then warp 0 loads the next tile into it
// with cp.async: without the barrier between, the copy may land under warp 1's reads.
template <bool BARRIER>
void reload_tile(const float* next, float* out) {
    extern __shared__ __align__(16) float dyn_tile[];
    const int t = threadIdx.x;
    dyn_tile[t] = (float)t;
    __syncthreads();
    out[t] = dyn_tile[(t + 32) % N];
    if (BARRIER) __syncthreads();
    if (t < N / 4) mk_emulated_cp_async_16(dyn_tile + 4 * t, next + 4 * t, 16);
    mk_emulated_cp_async_wait_all();
    __syncthreads();
    out[N + t] = dyn_tile[t];
}

// Atomics never race with each other.
void count(unsigned* counter) { atomicAdd(counter, 1u); }

// Runs `body` in a child process (stderr silenced when a race is expected: TSan's report is the
// expected outcome there) and returns its exit status, or 128 + the signal.
static int in_child(const std::function<bool()>& body, bool quiet) {
    std::fflush(stdout);
    std::fflush(stderr);
    const pid_t pid = fork();
    if (pid == 0) {
        if (quiet) std::freopen("/dev/null", "w", stderr);
        _exit(body() ? 0 : 1);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static bool all_equal(const emu::DeviceVec<float>& got, const std::vector<float>& want) {
    for (size_t i = 0; i < want.size(); ++i)
        if (got[i] != want[i]) return false;
    return true;
}

// A case: the launch of its correct (racy = false) or racy form, returning whether the values
// are right (only looked at in the correct form).
struct Case {
    const char* name;
    std::function<bool(bool racy)> run;
};

int main() {
    const auto start = std::chrono::steady_clock::now();
#ifdef EMU_TSAN
    const bool detector = true;
#else
    const bool detector = false;
#endif
    std::vector<float> swapped(N), in_warp(32), tiles(2 * N);
    for (int t = 0; t < N; ++t) swapped[t] = (float)((t + 32) % N);
    for (int l = 0; l < 32; ++l) in_warp[l] = (float)(l ^ 1);
    for (int t = 0; t < N; ++t) tiles[t] = swapped[t], tiles[N + t] = 100.f + t;
    const std::vector<Case> cases = {
        {"shared memory between warps, __syncthreads",
         [&](bool racy) {
             emu::DeviceVec<float> out(N, NAN);
             emu_launch({1, 1, 1}, {N, 1, 1}, 0, [&] { racy ? exchange_shared<false>(out.data()) : exchange_shared<true>(out.data()); });
             return all_equal(out, swapped);
         }},
        {"shared memory within a warp, __syncwarp (not the shuffle)",
         [&](bool racy) {
             emu::DeviceVec<float> out(32, NAN);
             emu_launch({1, 1, 1}, {32, 1, 1}, 0, [&] { racy ? exchange_in_warp<false>(out.data()) : exchange_in_warp<true>(out.data()); });
             return all_equal(out, in_warp);
         }},
        {"global memory between warps, __syncthreads",
         [&](bool racy) {
             emu::DeviceVec<float> buf(N, NAN), out(N, NAN);
             emu_launch({1, 1, 1}, {N, 1, 1}, 0, [&] {
                 racy ? exchange_global<false>(buf.data(), out.data()) : exchange_global<true>(buf.data(), out.data());
             });
             return all_equal(out, swapped);
         }},
        {"cp.async into a tile another warp reads, __syncthreads",
         [&](bool racy) {
             std::vector<float> next_host(N);
             for (int t = 0; t < N; ++t) next_host[t] = 100.f + t;
             const emu::DeviceVec<float> next = next_host;
             emu::DeviceVec<float> out(2 * N, NAN);
             emu_launch({1, 1, 1}, {N, 1, 1}, N * sizeof(float), [&] {
                 racy ? reload_tile<false>(next.data(), out.data()) : reload_tile<true>(next.data(), out.data());
             });
             return all_equal(out, tiles);
         }},
    };
    for (const Case& c : cases) {
        const int clean = in_child([&] { return c.run(false); }, false);
        check(tag("%s: correct form exits 0 with the right values", c.name), clean == 0, tag("exit %d", clean).c_str());
        if (!detector) continue;
        const int racy = in_child([&] { return c.run(true); }, true);
        check(tag("%s: racy form reported (exit 66)", c.name), racy == 66, tag("exit %d", racy).c_str());
    }
    const int atomics = in_child(
        [] {
            emu::DeviceVec<unsigned> counter(1, 0u);
            emu_launch({1, 1, 1}, {N, 1, 1}, 0, [&] { count(counter.data()); });
            return counter[0] == N;
        },
        false);
    check("atomicAdd by every thread: no race, the right count", atomics == 0, tag("exit %d", atomics).c_str());
    if (!detector) std::printf("(the racy forms run only under the race detector: EMU_TSAN=1)\n");
    return finish(start);
}
