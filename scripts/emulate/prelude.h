// CPU emulation of the CUDA execution model, used by scripts/emulate/run.sh: one block at a
// time, the blocks in a random order (1 to 1024 threads; a partial last warp's barrier expects
// only its live lanes), each CUDA thread a fiber (its own stack, switched in user space on one
// OS thread: no kernel round trip per barrier), __syncthreads as a block barrier, warp-wide
// operations (shuffles, the votes __any_sync and __match_any_sync, ldmatrix, mma.sync) through
// per-warp scratch and warp barriers, cp.async as a copy deferred to the thread's wait,
// dynamic shared memory as one poisoned buffer with a canary past the launched size. Between two
// __syncthreads the warps run one after another in a fresh random order (the lanes of a warp in
// a random order too), so that a missing barrier between warps shows as poison or stale data.
// The other built-ins the kernels use are here too (float2/float4/uint4, the half-pair
// conversions, atomicAdd/atomicOr, __threadfence, __ldcg, __popc, __clz, isfinite), so a driver includes this file and
// its kernel file and nothing else; CUDA code type-puns through vector types, which nvcc allows:
// run.sh compiles with -fno-strict-aliasing. With EMU_TSAN=1, run.sh builds with
// ThreadSanitizer and the emulation tells it what orders memory between CUDA threads ("race
// detection" below): then a missing barrier is reported at its two accesses even when no order
// of the warps exposes it in a value.
//
// A kernel file that wraps its inline asm in `#ifdef MK_HOST_EMULATION` calls the mk_emulated_*
// functions below instead. Things that are checked on every call and abort with a message:
// ldmatrix and cp.async addresses inside the launched dynamic shared memory and 16-byte
// aligned, warp-wide masks full and the warp whole (a full-mask shuffle, vote, ldmatrix, mma or
// __syncwarp in a partial warp is undefined on the GPU), a barrier that not every live thread
// reaches (deadlock), writes past the launched dynamic shared memory.
//
// Global memory: the drivers allocate every device buffer as an emu::DeviceVec<T> (see "global
// memory" below), its end against an inaccessible guard region (EMU_GUARD=before: its start),
// so an out-of-bounds read or write faults at the instruction; the SIGSEGV handler prints
//   EMULATION ERROR (block x,y,z thread t): out-of-bounds global access at <addr>: N bytes past
//   the end of a K-byte device buffer (byte M from its start)
// (or "N bytes before the start", "stack overflow: thread t's fiber stack ...", "use after
// free", "(host code, outside any kernel)") and exits with status 3. Writes into the < 16
// slack bytes that 16-byte alignment leaves before the guard (and, in `before` mode, the rest
// of the last page) are found after the block, without the thread. Deliberately broken copies
// of the kernels (scripts/ and kernels/ copied to /tmp, run.sh <family> quick), all exit 3:
//   linear_attention.cu, tensor-core core's prefetch of the next chunk reading a full chunk
//     (`n_next = ahead ? C : 0` in stage): with std::vector buffers only indirectly (what the
//     heap held past the inputs reached two outputs as NaN, exit 1); now "(block 1,0,0 thread
//     162): out-of-bounds global access at ...: 2208 bytes past the end of a 6848-byte device
//     buffer" (EMU_GUARD=before: the same read, named as past the end of the buffer mapped right
//     below)
//   linear_attention.cu, row_of off by one in reverse (`it.len - 2 - t`: the reverse backward
//     passes touch row row0 - 1, a negative index on the first segment): EMU_GUARD=before
//     "(block 0,0,1 thread 50): ... 40 bytes before the start of a 8040-byte device buffer (a
//     negative index)"; after: the write at row -1 found in the poisoned bytes before dk's
//     start ("2 bytes before the start of a 4824-byte device buffer", block 0,0,1)
//   momentum_attention.cu, dq_finish storing dq[i + 1]: "(block 38,0,0 thread 127): ... 0 bytes
//     past the end of a 39424-byte device buffer"
//   momentum_attention.cu, load_tile_async copying 16 bytes of row base + r even past t_len
//     (instead of zero-filling): "(block 1,0,0 thread 60): ... 1344 bytes past the end of a
//     19712-byte device buffer (byte 21056 from its start) [in a cp.async copy, performed at the
//     issuing thread's wait]"
//   momentum_attention.cu, the mma forward's lse2 store guard `t0 + r <= t_len`: the write of
//     lse2[t_len] lands in the 8 slack bytes of the 616-byte lse2, found after block 1,0,0
//   maml.cu, the tiled product's store guard `gn <= s.n`: found after block 0,0,2 (slack of a
//     420-byte buffer); its k-tail guard `gk <= s.k` (a read): "(block 0,0,2 thread 68): ... 16
//     bytes past the end of a 300-byte device buffer"
//   kmeans.cu, assign_reference reading the next row (`x[(r + 1) * d + e]`): "(block 2,0,0
//     thread 43): ... 0 bytes past the end of a 8400-byte device buffer (byte 8400 from its
//     start)"; stable_scatter's rank mask including the lane (`(2u << lane) - 1`): "(block 0,0,0
//     thread 90): ... 0 bytes past the end of a 20000-byte device buffer"
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <csignal>
#include <cstring>
#include <deque>
#include <functional>
#include <initializer_list>
#include <random>
#include <link.h>
#include <sys/mman.h>
#include <type_traits>
#include <unistd.h>
#include <vector>
using std::max;
using std::min;
struct dim3 { unsigned x = 1, y = 1, z = 1; };
dim3 threadIdx, blockIdx;  // of the running fiber
dim3 blockDim, gridDim;
#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
// `__shared__` storage is thread_local: a block-scope `__shared__ T x[N];` then has static
// storage on the one OS thread that runs every fiber, so all threads of the (one running) block
// share it, and emu_launch poisons it before every block (see emu_poison_shared). A block-scope
// `extern __shared__ T name[];` names the buffer EMU_DYNAMIC_SHARED defines.
#define __shared__ thread_local
#define __align__(n) __attribute__((aligned(n)))
inline float __expf(float x) { return std::exp(x); }
// CUDA's math headers overload these for float in the global namespace (fabs(float) is a float
// there); without the using-declarations a kernel's fabs(x) on a float would be glibc's double.
using std::abs, std::ceil, std::exp, std::fabs, std::floor, std::fmax, std::fmin, std::isfinite, std::log,
    std::log1p, std::pow, std::sqrt, std::tanh;

// Vector types (the alignment of CUDA's vector_types.h: a 16-byte load is one instruction there).
// CUDA code reads them through other types (a uint4 as four __half2, say), which nvcc allows:
// run.sh compiles with -fno-strict-aliasing for that.
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { uint32_t x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }

// cuda_fp16.h / cuda_bf16.h: the host shims in shim/, plus their pair conversions (low half .x).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {__bfloat162float(h.x), __bfloat162float(h.y)}; }

// Integer intrinsics: __popc counts set bits, __clz leading zeros (32 for 0; CUDA's takes an int).
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }

[[noreturn]] inline void emu_fail(const char* what) {
    std::fprintf(stderr, "EMULATION ERROR (block %u,%u,%u thread %u): %s\n", blockIdx.x, blockIdx.y, blockIdx.z,
                 threadIdx.x, what);
    std::fflush(stderr);
    std::_Exit(3);
}
[[noreturn]] inline void emu_fail_at(const char* where, const char* what) {
    std::fflush(stdout);
    std::fprintf(stderr, "EMULATION ERROR (%s): %s\n", where, what);
    std::fflush(stderr);
    std::_Exit(3);
}

// ------------------------------------------------------------------ fibers and barriers -------
constexpr int EMU_MAX_THREADS = 1024;
constexpr int EMU_MAX_WARPS = EMU_MAX_THREADS / 32;
constexpr int EMU_THREADS = 256;  // the block size of emu_launch(grid, kernel)

// Context switch (x86-64 SysV): saves the callee-saved registers, MXCSR and the x87 control word
// on the current stack, stores the stack pointer in *from, continues on stack `to`.
extern "C" void emu_switch(void** from, void* to);
asm(R"(
    .text
    .globl emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");

// ------------------------------------------------------------------ race detection ------------
// With EMU_TSAN=1, run.sh builds the driver with ThreadSanitizer, and every CUDA thread is a
// TSan fiber switched to without implied ordering: TSan then reports any two accesses to the
// same shared or global memory by different CUDA threads, one a write, that no __syncthreads or
// __syncwarp orders (the CUDA memory model: shuffles, votes, ldmatrix and mma meet the warp but
// order no memory, and neither does program order between lanes). Blocks run one at a time,
// each block's start ordered after the previous block's end (its shared memory is the same bytes
// here), so races between blocks through global memory are not looked for. The emulation's own
// bookkeeping (barrier counters, the per-warp exchange scratch, threadIdx written by the
// scheduler) lives in EMU_UNTRACKED functions, which TSan does not instrument. Without EMU_TSAN
// all of this compiles to nothing.
//
// Races it reports that no order of the warps turned into a wrong value (barrier-sweep.sh
// removed each barrier in turn; the plain quick runs passed): moe.cu's Cholesky without the
// barrier after the ridge is added (thread 0's maximum of the diagonal read a row that warp 0
// had not written yet: NaN poison, which fmaxf drops); kmeans.cu's reseed without the barrier
// between the per-warp maxima and thread 0 reading them; kmeans.cu's stable_scatter without
// its second __syncwarp; linear_attention.cu's tensor-core core reloading its tiles for the next
// chunk of a non-causal state pass while a warp still read them.
#ifdef EMU_TSAN
#include <sanitizer/tsan_interface.h>
extern "C" {
void __tsan_read_range(void* addr, unsigned long size);
void __tsan_write_range(void* addr, unsigned long size);
}
// The emulation's bookkeeping: a function whose own loads and stores TSan does not see (not
// inlined: GCC would not inline it into an instrumented caller anyway). What it calls is tracked
// as usual, and so are the explicit emu_access_* below. (TSan's run-time ignore annotations
// record a stack per call: 30x slower.)
#define EMU_UNTRACKED __attribute__((no_sanitize("thread"), noinline))
inline void emu_hb_release(void* sync) { __tsan_release(sync); }
inline void emu_hb_acquire(void* sync) { __tsan_acquire(sync); }
inline void emu_access_read(const void* p, size_t n) { __tsan_read_range(const_cast<void*>(p), n); }
inline void emu_access_write(void* p, size_t n) { __tsan_write_range(p, n); }
// TSan's hook, called for every report (after it is printed): the block, which TSan cannot name.
extern "C" void __tsan_on_report(const void*) {
    std::fprintf(stderr, "EMULATION ERROR: a data race in block %u,%u,%u (TSan's report above)\n", blockIdx.x,
                 blockIdx.y, blockIdx.z);
}
#else
#define EMU_UNTRACKED
inline void emu_hb_release(void*) {}
inline void emu_hb_acquire(void*) {}
inline void emu_access_read(const void*, size_t) {}
inline void emu_access_write(void*, size_t) {}
#endif

struct EmuBarrier {
    int expected = 0, arrived = 0;
    uint64_t generation = 0;
    // TSan sync objects: generation g releases into and acquires from ordering[g % 2]. Two, so
    // that a thread released from generation g that has not yet resumed cannot acquire a faster
    // thread's release into generation g + 1 (which needs this thread's arrival anyway).
    char ordering[2] = {};
    EMU_UNTRACKED void release() { arrived = 0, ++generation; }
};
struct EmuFiber {
    void* sp = nullptr;  // saved stack pointer while switched out
    unsigned char* stack = nullptr;
    bool done = false;
    const EmuBarrier* waiting = nullptr;  // blocked until its generation moves past wait_gen
    uint64_t wait_gen = 0;
};
constexpr size_t EMU_STACK_BYTES = 256 * 1024, EMU_GUARD_BYTES = 4096;
EmuFiber g_fibers[EMU_MAX_THREADS];
int g_current = -1;  // the running fiber
void* g_scheduler_sp = nullptr;
EmuBarrier g_block_barrier, g_warp_barrier[EMU_MAX_WARPS];

#ifdef EMU_TSAN
void* g_tsan_fiber[EMU_MAX_THREADS];  // of each thread index, created with its stack
void* g_tsan_scheduler = nullptr;
#endif
// Before every switch between the scheduler and a CUDA thread: no ordering implied.
inline void emu_tsan_to_thread([[maybe_unused]] int t) {
#ifdef EMU_TSAN
    __tsan_switch_to_fiber(g_tsan_fiber[t], __tsan_switch_to_fiber_no_sync);
#endif
}
inline void emu_tsan_to_scheduler() {
#ifdef EMU_TSAN
    __tsan_switch_to_fiber(g_tsan_scheduler, __tsan_switch_to_fiber_no_sync);
#endif
}

// Blocks the running fiber at `b` until every live thread it counts has arrived. A barrier that
// `orders_memory` (__syncthreads, __syncwarp) orders every participant's accesses before it
// before every participant's accesses after it; the warp meetings inside shuffles, ldmatrix and
// mma do not.
EMU_UNTRACKED inline void emu_arrive_and_wait(EmuBarrier& b, bool orders_memory) {
    void* const ordering = &b.ordering[b.generation % 2];
    if (orders_memory) emu_hb_release(ordering);
    if (++b.arrived == b.expected) {
        b.release();
    } else {
        EmuFiber& f = g_fibers[g_current];
        f.waiting = &b, f.wait_gen = b.generation;
        emu_tsan_to_scheduler();
        emu_switch(&f.sp, g_scheduler_sp);  // resumed by the scheduler once `b` has released
    }
    if (orders_memory) emu_hb_acquire(ordering);
}
// An exited thread no longer takes part in barriers (as on the GPU).
EMU_UNTRACKED inline void emu_arrive_and_drop(EmuBarrier& b) {
    if (--b.expected == b.arrived && b.arrived > 0) b.release();
}
inline void __syncthreads() { emu_arrive_and_wait(g_block_barrier, true); }
// The warp meets (inside a warp-wide operation); orders no memory.
inline void warp_sync() { emu_arrive_and_wait(g_warp_barrier[threadIdx.x / 32], false); }
constexpr unsigned EMU_FULL_MASK = 0xffffffffu;
// A full-mask warp-wide operation (shuffle, vote, match, ldmatrix, mma, __syncwarp) names all 32
// lanes: in a partial warp (a block of fewer than 32 threads, or a last warp that blockDim.x cuts
// short) it is undefined on the GPU, and an emulation error here.
inline void emu_check_full_warp(const char* op) {
    const unsigned first = threadIdx.x / 32 * 32;
    if (first + 32 <= blockDim.x) return;
    char msg[200];
    std::snprintf(msg, sizeof msg, "%s with a full mask in a partial warp (%u of its 32 lanes launched): undefined on the GPU",
                  op, blockDim.x - first);
    emu_fail(msg);
}
inline void __syncwarp(unsigned mask = EMU_FULL_MASK) {
    if (mask != EMU_FULL_MASK) emu_fail("__syncwarp with a partial mask is not emulated");
    emu_check_full_warp("__syncwarp");
    emu_arrive_and_wait(g_warp_barrier[threadIdx.x / 32], true);
}

// ------------------------------------------------------------------ global memory -------------
// Device buffers (emu::DeviceVec<T>): each its own mapping, placed against an inaccessible guard
// region (like Electric Fence), so that a kernel's read or write past the end faults at the
// offending instruction and the fault handler below names the thread, the buffer and the
// distance. EMU_GUARD selects the side:
//   after (default)  the END touches the guard. The base stays 16-byte aligned (the kernels'
//                    16-byte vector loads check it), so when the byte size is not a multiple of
//                    16 the 1..15 slack bytes between the end and the guard are poisoned (a NaN
//                    pattern) and checked after every block: a write there fails (exit 3) after
//                    the fact, without the thread; a READ of those < 16 bytes goes unnoticed (it
//                    reads NaN, which may or may not reach a result).
//   before           the START is page-aligned, right after the guard: negative indices (the
//                    reverse-time passes) fault. The rest of the last page after the end is
//                    poisoned and checked after every block like the slack above (reads there
//                    go unnoticed except through the NaN they bring); an access past that page
//                    faults only if the next mapping up happens to be another buffer's guard.
// Run a family with both to cover both sides. The bytes of a buffer's pages that precede its
// start in `after` mode are poisoned and checked the same way. Host code indexes a DeviceVec
// with a bounds check (operator[]); kernels get data().
enum class EmuGuardSide { After, Before };
inline EmuGuardSide emu_guard_side() {
    const char* s = std::getenv("EMU_GUARD");
    if (s == nullptr || *s == 0 || std::strcmp(s, "after") == 0) return EmuGuardSide::After;
    if (std::strcmp(s, "before") == 0) return EmuGuardSide::Before;
    std::fprintf(stderr, "EMU_GUARD=%s: expected after or before\n", s);
    std::_Exit(2);
}
const EmuGuardSide g_guard_side = emu_guard_side();
constexpr size_t EMU_PAGE = 4096;
// The guard: 256 KiB of inaccessible address space (reserved, never backed), so that an index
// far past the end faults too instead of landing in a neighbouring mapping.
constexpr size_t EMU_GLOBAL_GUARD_BYTES = 64 * EMU_PAGE;
constexpr unsigned char EMU_GLOBAL_POISON = 0xff;  // DeviceVec::poison: NaN in every float type

// The registry of live device buffers (the fault handler and the after-block check read it).
struct EmuAllocation {
    unsigned char* map;    // the whole mapping: guard region and data pages
    size_t map_bytes;
    unsigned char* data;   // the accessible pages
    size_t data_bytes;
    unsigned char* base;   // the buffer
    size_t bytes;
};
std::vector<EmuAllocation> g_allocations;
constexpr int EMU_FREED_KEPT = 64;
EmuAllocation g_freed[EMU_FREED_KEPT];  // the latest freed buffers, to name a use after free
int g_freed_next = 0;
bool g_in_cp_async_copy = false;  // a deferred cp.async copy is running (emu_copy)

// The bytes around a buffer (inside its pages) hold a pattern that depends on the address (its
// offset in the page): every aligned 2, 4 or 8 bytes of it are a NaN in f16, bf16, f32 and f64
// (low byte 0xf0..0xff, high byte 0x7f or 0xff), but not the 0xff.. of poisoned data nor a NaN
// that arithmetic makes, so a stray write of a NaN read from poison (or from another gap) is
// still seen as a write.
inline const unsigned char* emu_gap_pattern() {  // two pages: pattern + (address % page) onwards
    static const std::vector<unsigned char> table = [] {
        std::vector<unsigned char> t(2 * EMU_PAGE);
        for (size_t i = 0; i < t.size(); ++i) {
            const uint32_t h = ((uint32_t)(i % EMU_PAGE / 2) * 2654435761u) >> 27;  // 5 bits
            unsigned char lo = 0xf0 | (h & 15), hi = (h & 16) ? 0xff : 0x7f;
            if (lo == 0xff && hi == 0xff) lo = 0xf5;
            t[i] = i % 2 == 0 ? lo : hi;
        }
        return t;
    }();
    return table.data();
}
inline void emu_fill_gap(unsigned char* p, size_t n) {  // n <= one page
    std::memcpy(p, emu_gap_pattern() + (uintptr_t)p % EMU_PAGE, n);
}
inline size_t emu_gap_mismatch(const unsigned char* p, size_t n) {  // the first written byte, or n
    const unsigned char* want = emu_gap_pattern() + (uintptr_t)p % EMU_PAGE;
    if (std::memcmp(p, want, n) == 0) return n;
    size_t i = 0;
    while (p[i] == want[i]) ++i;
    return i;
}
inline EmuAllocation emu_global_alloc(size_t bytes) {
    const size_t rounded = (bytes + 15) / 16 * 16;
    const size_t data_bytes = std::max<size_t>((rounded + EMU_PAGE - 1) / EMU_PAGE * EMU_PAGE, EMU_PAGE);
    const size_t map_bytes = data_bytes + EMU_GLOBAL_GUARD_BYTES;
    void* m = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) emu_fail_at("host code", "mmap of a device buffer");
    EmuAllocation a{static_cast<unsigned char*>(m), map_bytes, nullptr, data_bytes, nullptr, bytes};
    unsigned char* guard;
    if (g_guard_side == EmuGuardSide::After) {
        a.data = a.map, a.base = a.data + data_bytes - rounded, guard = a.map + data_bytes;
    } else {
        a.data = a.map + EMU_GLOBAL_GUARD_BYTES, a.base = a.data, guard = a.map;
    }
    if (mprotect(guard, EMU_GLOBAL_GUARD_BYTES, PROT_NONE) != 0) emu_fail_at("host code", "mprotect of a guard region");
    emu_fill_gap(a.data, a.base - a.data);
    emu_fill_gap(a.base + bytes, a.data + a.data_bytes - (a.base + bytes));
    g_allocations.push_back(a);
    return a;
}
inline void emu_global_free(unsigned char* base) {
    for (size_t i = 0; i < g_allocations.size(); ++i)
        if (g_allocations[i].base == base) {
            const EmuAllocation a = g_allocations[i];
            g_allocations[i] = g_allocations.back();
            g_allocations.pop_back();
            munmap(a.map, a.map_bytes);
            g_freed[g_freed_next] = a, g_freed_next = (g_freed_next + 1) % EMU_FREED_KEPT;
            return;
        }
    emu_fail_at("host code", "emulation: freeing a device buffer that is not registered");
}
// After every block: the poisoned bytes around every live buffer (inside its accessible pages)
// are intact, else a write went past the end (or before the start) without reaching the guard.
inline void emu_check_global_gaps() {
    for (const EmuAllocation& a : g_allocations) {
        const unsigned char* end = a.base + a.bytes;
        const size_t tail = a.data + a.data_bytes - end, head = a.base - a.data;
        const size_t tail_at = emu_gap_mismatch(end, tail);
        // The head: the written byte nearest the start.
        size_t head_at = head;
        if (emu_gap_mismatch(a.data, head) != head) {
            const unsigned char* want = emu_gap_pattern() + (uintptr_t)a.data % EMU_PAGE;
            for (head_at = 0; a.base[-1 - (ptrdiff_t)head_at] == want[head - 1 - head_at]; ++head_at) {}
        }
        const bool tail_ok = tail_at == tail, head_ok = head_at == head;
        if (tail_ok && head_ok) continue;
        const size_t off = tail_ok ? head_at + 1 : tail_at;
        char msg[300];
        std::snprintf(msg, sizeof msg,
                      "out-of-bounds global write (which thread is not known): %zu bytes %s of a "
                      "%zu-byte device buffer at %p, in the poisoned bytes short of its guard",
                      off, tail_ok ? "before the start" : "past the end", a.bytes, (void*)a.base);
        char where[80];
        std::snprintf(where, sizeof where, "block %u,%u,%u, found after it ran", blockIdx.x, blockIdx.y, blockIdx.z);
        emu_fail_at(where, msg);
    }
}

// SIGSEGV / SIGBUS: which thread, which buffer, how far; exit status 3 like every emulation
// error. The handler runs on an alternate signal stack (the faulting code usually runs on a
// fiber's stack, which may be the very thing that overflowed).
inline void emu_describe_fault(const unsigned char* addr, char* out, size_t n) {
    for (const EmuAllocation& a : g_allocations)
        if (addr >= a.map && addr < a.map + a.map_bytes) {
            const unsigned char* end = a.base + a.bytes;
            int len = 0;
            if (addr >= end)
                len = std::snprintf(out, n,
                                    "out-of-bounds global access at %p: %zu bytes past the end of a %zu-byte device "
                                    "buffer (byte %zu from its start)",
                                    (void*)addr, (size_t)(addr - end), a.bytes, (size_t)(addr - a.base));
            else if (addr < a.base)
                len = std::snprintf(out, n,
                                    "out-of-bounds global access at %p: %zu bytes before the start of a %zu-byte "
                                    "device buffer (a negative index)",
                                    (void*)addr, (size_t)(a.base - addr), a.bytes);
            else
                len = std::snprintf(out, n, "fault at %p inside a %zu-byte device buffer (%zu bytes from its start)",
                                    (void*)addr, a.bytes, (size_t)(addr - a.base));
            // A buffer mapped right next to this guard region, nearer to the address or within 64
            // KiB of it: the access may have overshot that one instead.
            for (const EmuAllocation& o : g_allocations) {
                if (len < 0 || (size_t)len >= n) break;
                const size_t past_a = addr - end, before_a = a.base - addr;
                if (addr >= end && o.map == a.map + a.map_bytes && std::min<size_t>(past_a, 65536) > (size_t)(o.base - addr))
                    std::snprintf(out + len, n - len, "; or %zu bytes before the start of the %zu-byte device buffer "
                                  "mapped right above it", (size_t)(o.base - addr), o.bytes);
                else if (addr < a.base && o.map + o.map_bytes == a.map &&
                         std::min<size_t>(before_a, 65536) > (size_t)(addr - (o.base + o.bytes)))
                    std::snprintf(out + len, n - len, "; or %zu bytes past the end of the %zu-byte device buffer "
                                  "mapped right below it", (size_t)(addr - (o.base + o.bytes)), o.bytes);
            }
            return;
        }
    for (int t = 0; t < EMU_MAX_THREADS; ++t) {
        const unsigned char* s = g_fibers[t].stack;
        if (s != nullptr && addr >= s - EMU_GUARD_BYTES && addr < s) {
            std::snprintf(out, n, "stack overflow: thread %d's fiber stack (%zu KiB) is exhausted (fault at %p)", t,
                          EMU_STACK_BYTES / 1024, (void*)addr);
            return;
        }
    }
    // The newest freed buffer first.
    for (int i = 1; i <= EMU_FREED_KEPT; ++i) {
        const EmuAllocation& a = g_freed[(g_freed_next - i + EMU_FREED_KEPT) % EMU_FREED_KEPT];
        if (a.map != nullptr && addr >= a.map && addr < a.map + a.map_bytes) {
            std::snprintf(out, n,
                          "fault at %p: %lld bytes from the start of a freed %zu-byte device buffer (use after free)",
                          (void*)addr, (long long)(addr - a.base), a.bytes);
            return;
        }
    }
    std::snprintf(out, n, "fault at %p, outside every device buffer and fiber stack (a wild or null pointer, or a host "
                  "bug)", (void*)addr);
}
inline void emu_fault_handler(int sig, siginfo_t* info, void*) {
    char what[600], msg[800];
    emu_describe_fault(static_cast<const unsigned char*>(info->si_addr), what, sizeof what);
    const char* copy = g_in_cp_async_copy ? " [in a cp.async copy, performed at the issuing thread's wait]" : "";
    const char* name = sig == SIGBUS ? "SIGBUS" : "SIGSEGV";
    if (g_current >= 0)
        std::snprintf(msg, sizeof msg, "EMULATION ERROR (block %u,%u,%u thread %u): %s%s (%s)\n", blockIdx.x,
                      blockIdx.y, blockIdx.z, threadIdx.x, what, copy, name);
    else
        std::snprintf(msg, sizeof msg, "EMULATION ERROR (host code, outside any kernel): %s (%s)\n", what, name);
    std::fflush(stdout);
    (void)!write(2, msg, std::strlen(msg));
    _exit(3);
}
inline bool emu_install_fault_handler() {
    static std::vector<unsigned char> alt(1 << 16);
    stack_t ss{};
    ss.ss_sp = alt.data(), ss.ss_size = alt.size();
    struct sigaction sa{};
    sa.sa_sigaction = emu_fault_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESETHAND;  // a fault in the handler: the default action
    sigemptyset(&sa.sa_mask);
    return sigaltstack(&ss, nullptr) == 0 && sigaction(SIGSEGV, &sa, nullptr) == 0 &&
           sigaction(SIGBUS, &sa, nullptr) == 0;
}
const bool g_fault_handler_installed = emu_install_fault_handler();

namespace emu {
// A device buffer of n elements of T (see above): data() for kernels, operator[] (bounds
// checked), begin()/end(), size() for host code; copies from and to std::vector. Like
// cudaMalloc, a zero-element buffer has no storage (data() is null).
template <typename T>
class DeviceVec {
    static_assert(std::is_trivially_copyable_v<T>, "device buffers hold trivially copyable elements");
    T* p_ = nullptr;
    size_t n_ = 0;
    void allocate(size_t n) {
        n_ = n;
        p_ = n ? reinterpret_cast<T*>(emu_global_alloc(n * sizeof(T)).base) : nullptr;
    }
    void release() {
        if (p_) emu_global_free(reinterpret_cast<unsigned char*>(p_));
        p_ = nullptr, n_ = 0;
    }

public:
    using value_type = T;
    using iterator = T*;
    using const_iterator = const T*;
    DeviceVec() = default;
    explicit DeviceVec(size_t n) : DeviceVec(n, T{}) {}  // value-initialised, as std::vector
    DeviceVec(size_t n, const T& value) { allocate(n), fill(value); }
    DeviceVec(const std::vector<T>& v) { allocate(v.size()), std::copy(v.begin(), v.end(), p_); }  // host to device
    template <typename It, typename = decltype(*std::declval<It>())>
    DeviceVec(It first, It last) : DeviceVec(std::vector<T>(first, last)) {}
    DeviceVec(std::initializer_list<T> l) : DeviceVec(std::vector<T>(l)) {}
    DeviceVec(const DeviceVec& o) { allocate(o.n_), std::copy(o.begin(), o.end(), p_); }
    DeviceVec(DeviceVec&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr, o.n_ = 0; }
    DeviceVec& operator=(const DeviceVec& o) { return *this = DeviceVec(o); }
    DeviceVec& operator=(DeviceVec&& o) noexcept {
        if (this != &o) release(), p_ = o.p_, n_ = o.n_, o.p_ = nullptr, o.n_ = 0;
        return *this;
    }
    ~DeviceVec() { release(); }
    T* data() { return p_; }
    const T* data() const { return p_; }
    size_t size() const { return n_; }
    bool empty() const { return n_ == 0; }
    T* begin() { return p_; }
    T* end() { return p_ + n_; }
    const T* begin() const { return p_; }
    const T* end() const { return p_ + n_; }
    T& operator[](size_t i) { return p_[checked(i)]; }
    const T& operator[](size_t i) const { return p_[checked(i)]; }
    size_t checked(size_t i) const {
        if (i >= n_) {
            char msg[160];
            std::snprintf(msg, sizeof msg, "host code indexes element %zu of a %zu-element device buffer", i, n_);
            emu_fail_at("host code", msg);
        }
        return i;
    }
    void fill(const T& value) { std::fill(begin(), end(), value); }
    void poison() { std::memset((void*)p_, EMU_GLOBAL_POISON, n_ * sizeof(T)); }  // NaN in every float type
    void assign(size_t n, const T& value) { *this = DeviceVec(n, value); }
    void copy_from(const std::vector<T>& v) {
        if (v.size() != n_) emu_fail_at("host code", "DeviceVec::copy_from: size mismatch");
        std::copy(v.begin(), v.end(), p_);
    }
    std::vector<T> to_vector() const { return std::vector<T>(begin(), end()); }
    operator std::vector<T>() const { return to_vector(); }  // device to host
};
}  // namespace emu

// ------------------------------------------------------------------ shuffles and votes --------
// Every lane publishes its value, the warp meets, each lane computes its result from the 32
// published values, the warp meets again (so that the next warp-wide call cannot overwrite a
// value still being read). Masks must be full (and the warp whole, see emu_check_full_warp).
uint64_t g_shfl[EMU_MAX_WARPS][32];
EMU_UNTRACKED inline void emu_exchange_bits(uint64_t bits, uint64_t (&lanes)[32]) {
    const int w = threadIdx.x / 32;
    g_shfl[w][threadIdx.x % 32] = bits;
    warp_sync();
    for (int j = 0; j < 32; ++j) lanes[j] = g_shfl[w][j];
    warp_sync();
}
template <typename F>
auto emu_warp_exchange(unsigned mask, const char* op, uint64_t bits, F result) {
    if (mask != EMU_FULL_MASK) {
        char msg[120];
        std::snprintf(msg, sizeof msg, "%s with a partial mask is not emulated", op);
        emu_fail(msg);
    }
    emu_check_full_warp(op);
    uint64_t lanes[32];
    emu_exchange_bits(bits, lanes);
    return result(static_cast<const uint64_t*>(lanes));
}
template <typename T, typename Src>
T emu_shuffle(unsigned mask, T x, Src source_lane) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &x, sizeof(T));
    bits = emu_warp_exchange(mask, "shuffle", bits,
                             [&](const uint64_t* lanes) { return lanes[source_lane((int)threadIdx.x % 32)]; });
    T r;
    std::memcpy(&r, &bits, sizeof(T));
    return r;
}
// Lanes whose source falls outside their segment of `width` lanes keep their own value.
template <typename T>
T __shfl_sync(unsigned mask, T x, int src, int width = 32) {
    return emu_shuffle(mask, x, [=](int l) { return (l & ~(width - 1)) | (src & (width - 1)); });
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T x, int lane_mask, int width = 32) {
    return emu_shuffle(mask, x, [=](int l) {
        const int j = l ^ lane_mask;
        return (j & ~(width - 1)) == (l & ~(width - 1)) ? j : l;
    });
}
template <typename T>
T __shfl_down_sync(unsigned mask, T x, unsigned delta, int width = 32) {
    return emu_shuffle(mask, x, [=](int l) { return (l % width) + (int)delta < width ? l + (int)delta : l; });
}
template <typename T>
T __shfl_up_sync(unsigned mask, T x, unsigned delta, int width = 32) {
    return emu_shuffle(mask, x, [=](int l) { return (l % width) >= (int)delta ? l - (int)delta : l; });
}
// __any_sync: nonzero iff `pred` is nonzero on some lane.
inline int __any_sync(unsigned mask, int pred) {
    return emu_warp_exchange(mask, "__any_sync", pred != 0, [](const uint64_t* lanes) {
        int any = 0;
        for (int j = 0; j < 32; ++j) any |= lanes[j] != 0;
        return any;
    });
}
// __match_any_sync: the mask of the lanes whose `v` has the same bits as this lane's (itself too).
template <typename T>
unsigned __match_any_sync(unsigned mask, T v) {
    static_assert(std::is_arithmetic_v<T> && (sizeof(T) == 4 || sizeof(T) == 8),
                  "__match_any_sync takes a 32- or 64-bit value");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    return emu_warp_exchange(mask, "__match_any_sync", bits, [bits](const uint64_t* lanes) {
        unsigned peers = 0;
        for (int j = 0; j < 32; ++j) peers |= (unsigned)(lanes[j] == bits) << j;
        return peers;
    });
}

// ------------------------------------------------------------------ atomics -------------------
// Each returns the old value. One OS thread runs every fiber, so atomicity is never in question;
// atomic_ref only keeps the compiler from caching the word.
template <typename T>
T atomicAdd(T* p, T v) {
    return std::atomic_ref<T>(*p).fetch_add(v, std::memory_order_relaxed);
}
template <typename T>
T atomicOr(T* p, T v) {
    static_assert(std::is_integral_v<T>, "atomicOr takes an integer word");
    return std::atomic_ref<T>(*p).fetch_or(v, std::memory_order_relaxed);
}

// __threadfence orders a thread's global writes before its later ones, device-wide; here the
// blocks of a launch run one after another (with happens-before edges between them), so it only
// has to be a compiler and CPU fence. __ldcg (a load that skips L1) is a plain load.
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <typename T>
T __ldcg(const T* p) {
    return *p;
}

// ------------------------------------------------------------------ shared memory -------------
// Dynamic shared memory: one buffer, poisoned (0xff: NaN in f32, f16 and bf16) before every
// block; a kernel file's `extern __shared__ T name[];` resolves to it through
// EMU_DYNAMIC_SHARED(T, name), declared by the driver in the namespace of those declarations.
constexpr size_t EMU_SMEM_MAX = 227 * 1024;  // sm_90's opt-in limit
extern "C" {
alignas(128) thread_local unsigned char emu_dyn_smem[EMU_SMEM_MAX];
}
#define EMU_DYNAMIC_SHARED(T, name) extern thread_local T name[] __attribute__((alias("emu_dyn_smem")))
size_t g_dyn_smem_bytes = 0;  // of the current launch
inline size_t __cvta_generic_to_shared(const void* p) { return (size_t)p; }
inline void emu_check_shared(const void* p, size_t bytes, const char* what) {
    const auto* c = static_cast<const unsigned char*>(p);
    if (c < emu_dyn_smem || c + bytes > emu_dyn_smem + g_dyn_smem_bytes) {
        char msg[200];
        std::snprintf(msg, sizeof msg, "%s: address at byte %lld of dynamic shared memory, outside the %zu launched",
                      what, (long long)(c - emu_dyn_smem), g_dyn_smem_bytes);
        emu_fail(msg);
    }
    if ((uintptr_t)p % 16 != 0) emu_fail("shared address not 16-byte aligned");
}

// Every `__shared__` variable, static or dynamic, is a thread_local of the executable, and the
// emulation keeps nothing else there: so poisoning the executable's whole static TLS block
// (x86-64 TLS variant II: the block of size round_up(memsz, align) ends at the thread pointer)
// poisons all shared memory. The range is checked once against emu_dyn_smem's address.
struct EmuTlsBlock { unsigned char* begin = nullptr; size_t bytes = 0; };
inline EmuTlsBlock emu_tls_block() {
    struct { size_t memsz = 0, align = 1; } tls;
    dl_iterate_phdr(
        [](dl_phdr_info* info, size_t, void* found) {
            for (int i = 0; i < info->dlpi_phnum; ++i)
                if (info->dlpi_phdr[i].p_type == PT_TLS && info->dlpi_tls_modid == 1) {
                    auto* out = static_cast<decltype(tls)*>(found);
                    out->memsz = info->dlpi_phdr[i].p_memsz, out->align = info->dlpi_phdr[i].p_align;
                    return 1;
                }
            return 0;
        },
        &tls);
    const size_t bytes = (tls.memsz + tls.align - 1) / tls.align * tls.align;
    auto* tp = static_cast<unsigned char*>(__builtin_thread_pointer());
    EmuTlsBlock block{tp - bytes, bytes};
    if (emu_dyn_smem < block.begin || emu_dyn_smem + EMU_SMEM_MAX > tp)
        emu_fail("emulation: the executable's TLS block is not where x86-64 variant II puts it");
    return block;
}
inline void emu_poison_shared() {
    static const EmuTlsBlock block = emu_tls_block();
    std::memset(block.begin, 0xff, block.bytes);
}

// ------------------------------------------------------------------ cp.async ------------------
// cp.async.cg.shared.global [dst], [src], 16, src_bytes: src_bytes bytes are copied, the rest of
// the 16 zero-filled. The emulation performs the copy as late as the PTX allows, at the
// issuing thread's wait: a read of the tile before cp.async.wait + __syncthreads sees poison
// (or the previous tile) instead of the data. With EMU_CP_ASYNC=eager in the environment it
// copies at issue instead (the earliest point): a copy into a buffer that other threads still
// read then overwrites it under them.
struct EmuCopy { unsigned char* dst; const unsigned char* src; int bytes; };
std::vector<EmuCopy> g_uncommitted[EMU_MAX_THREADS];            // per thread
std::deque<std::vector<EmuCopy>> g_groups[EMU_MAX_THREADS];      // per thread, oldest first
inline bool emu_env_is(const char* name, const char* value) {
    const char* v = std::getenv(name);
    return v != nullptr && std::strcmp(v, value) == 0;
}
bool g_cp_async_eager = emu_env_is("EMU_CP_ASYNC", "eager");  // a driver may also set it
EMU_UNTRACKED inline void emu_in_cp_async_copy(bool in) {
    g_in_cp_async_copy = in;
}
inline void emu_copy(const EmuCopy& c) {
    emu_in_cp_async_copy(true);  // a fault in the read names the deferred copy
    std::memcpy(c.dst, c.src, c.bytes);
    emu_in_cp_async_copy(false);
    std::memset(c.dst + c.bytes, 0, 16 - c.bytes);
}
inline void mk_emulated_cp_async_16(void* dst, const void* src, int src_bytes) {
    emu_check_shared(dst, 16, "cp.async destination");
    if ((uintptr_t)src % 16 != 0) emu_fail("cp.async source not 16-byte aligned");
    if (src_bytes < 0 || src_bytes > 16) emu_fail("cp.async src-size outside [0, 16]");
    // The copy may happen at any time from here to the wait: TSan sees its accesses at both ends.
    emu_access_write(dst, 16);
    emu_access_read(src, src_bytes);
    const EmuCopy c{static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), src_bytes};
    if (g_cp_async_eager) emu_copy(c);
    else g_uncommitted[threadIdx.x].push_back(c);
}
inline void mk_emulated_cp_async_commit() {
    g_groups[threadIdx.x].push_back(std::move(g_uncommitted[threadIdx.x]));
    g_uncommitted[threadIdx.x].clear();
}
// cp.async.wait_group n: every group but the newest n is complete.
inline void mk_emulated_cp_async_wait_group(size_t n) {
    auto& groups = g_groups[threadIdx.x];
    while (groups.size() > n) {
        for (const EmuCopy& c : groups.front()) emu_copy(c);
        groups.pop_front();
    }
}
// cp.async.wait_all = commit_group + wait_group 0.
inline void mk_emulated_cp_async_wait_all() {
    mk_emulated_cp_async_commit();
    mk_emulated_cp_async_wait_group(0);
}

// ------------------------------------------------------------------ ldmatrix ------------------
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane i gives the address of row i % 8 of
// matrix i / 8 (16 contiguous bytes). Register j of lane l holds, from matrix j, row l / 4,
// columns 2(l % 4) and 2(l % 4) + 1 (the low half first); with .trans, column l / 4 of rows
// 2(l % 4) and 2(l % 4) + 1.
const unsigned char* g_ldm[EMU_MAX_WARPS][32];
// TSan sees each lane read the row it names (the warp reads all 32 at once), not the rows of
// other lanes that make up its registers.
EMU_UNTRACKED inline void mk_emulated_ldmatrix_x4(uint32_t (&r)[4], const void* p, bool trans) {
    emu_check_full_warp("ldmatrix");
    emu_check_shared(p, 16, "ldmatrix row");
    emu_access_read(p, 16);
    const int w = threadIdx.x / 32, l = threadIdx.x % 32;
    g_ldm[w][l] = static_cast<const unsigned char*>(p);
    warp_sync();
    for (int j = 0; j < 4; ++j) {
        const unsigned char* const* rows = g_ldm[w] + 8 * j;
        uint16_t lo, hi;
        if (!trans) {
            std::memcpy(&lo, rows[l / 4] + 4 * (l % 4), 2);
            std::memcpy(&hi, rows[l / 4] + 4 * (l % 4) + 2, 2);
        } else {
            std::memcpy(&lo, rows[2 * (l % 4)] + 2 * (l / 4), 2);
            std::memcpy(&hi, rows[2 * (l % 4) + 1] + 2 * (l / 4), 2);
        }
        r[j] = (uint32_t)lo | ((uint32_t)hi << 16);
    }
    warp_sync();
}

// ------------------------------------------------------------------ mma -----------------------
// mma.sync.m16n8k16.row.col f32 += {f16|bf16}: gather every lane's fragments, rebuild A and B
// with the PTX ISA layouts, each lane computes its four accumulators.
uint32_t g_mma_a[EMU_MAX_WARPS][32][4], g_mma_b[EMU_MAX_WARPS][32][2];
inline float emu_half_bits(uint16_t bits, bool bf16) {
    if (bf16) { uint32_t u = (uint32_t)bits << 16; float f; std::memcpy(&f, &u, 4); return f; }
    _Float16 h; std::memcpy(&h, &bits, 2); return (float)h;
}
EMU_UNTRACKED inline void mk_emulated_mma(float* d, const uint32_t* a, const uint32_t* b, bool bf16) {
    emu_check_full_warp("mma.sync");
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

// ------------------------------------------------------------------ launch --------------------
const std::function<void()>* g_kernel;
// TSan sync objects: the host's work (and the previous block's) before a block's threads start,
// their work before the host's next step.
char g_block_start, g_block_end;

// Untracked too: it never returns (each block restarts it), so an instrumented entry would grow
// TSan's shadow call stack of the fiber by a frame per block until TSan aborts (64 Ki frames).
[[noreturn]] EMU_UNTRACKED inline void emu_fiber_entry() {
    emu_hb_acquire(&g_block_start);
    (*g_kernel)();
    mk_emulated_cp_async_wait_all();  // copies never waited for still land
    emu_arrive_and_drop(g_warp_barrier[threadIdx.x / 32]);
    emu_arrive_and_drop(g_block_barrier);
    emu_hb_release(&g_block_end);
    g_fibers[g_current].done = true;
    emu_tsan_to_scheduler();
    emu_switch(&g_fibers[g_current].sp, g_scheduler_sp);
    __builtin_unreachable();
}

// A fresh stack whose first switch enters emu_fiber_entry (mapped once per thread index, with
// an inaccessible guard page below it).
inline void emu_fiber_start(EmuFiber& f) {
    if (f.stack == nullptr) {
        void* m = mmap(nullptr, EMU_STACK_BYTES + EMU_GUARD_BYTES, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) emu_fail("mmap of a fiber stack");
        mprotect(m, EMU_GUARD_BYTES, PROT_NONE);
        f.stack = static_cast<unsigned char*>(m) + EMU_GUARD_BYTES;
#ifdef EMU_TSAN
        const int t = (int)(&f - g_fibers);
        char name[64];
        std::snprintf(name, sizeof name, "CUDA thread %d (warp %d, lane %d)", t, t / 32, t % 32);
        g_tsan_fiber[t] = __tsan_create_fiber(0);
        __tsan_set_fiber_name(g_tsan_fiber[t], name);
#endif
    }
    auto* top = reinterpret_cast<uint64_t*>(f.stack + EMU_STACK_BYTES);  // 16-byte aligned
    *--top = 0;                                                          // the entry's return address
    *--top = reinterpret_cast<uint64_t>(&emu_fiber_entry);               // emu_switch returns here
    for (int i = 0; i < 6; ++i) *--top = 0;                              // rbp rbx r12 r13 r14 r15
    *--top = 0x1f80ull | (0x037full << 32);                              // default MXCSR, x87 control word
    f.sp = top;
    f.done = false, f.waiting = nullptr;
}

// The order in which fibers are resumed; EMU_SEED=<n> in the environment explores other orders.
inline unsigned emu_seed() {
    const char* s = std::getenv("EMU_SEED");
    return s != nullptr ? (unsigned)std::strtoul(s, nullptr, 10) : 12345u;
}
std::mt19937 g_schedule_rng(emu_seed());

// Runs one block of the current launch to completion (emu_launch's state: gridDim, blockDim,
// g_kernel, the dynamic shared memory size).
EMU_UNTRACKED inline void emu_run_block(dim3 block_idx, std::vector<int>& warp_order, std::vector<int>& lane_order) {
    const int threads = (int)blockDim.x, warps = (threads + 31) / 32;
    const size_t smem_bytes = g_dyn_smem_bytes;
    g_block_barrier = {threads};
    for (int w = 0; w < warps; ++w) g_warp_barrier[w] = {std::min(32, threads - 32 * w)};
    // Poison shared memory: a read of something no thread wrote shows up as NaN.
    emu_poison_shared();
    for (int t = 0; t < threads; ++t) emu_fiber_start(g_fibers[t]);
    emu_hb_release(&g_block_start);
    // Rounds: the warps in a random order, each run alone (its lanes resumed in a random order,
    // each until it blocks at a barrier or exits) until every one of its threads waits at
    // __syncthreads or has exited. So between two __syncthreads one warp runs entirely before
    // another: a warp that reads what another writes without a barrier between them sees poison
    // or stale data, and a warp that overwrites (or cp.async-loads into) what another still
    // reads corrupts it.
    for (int live = threads; live > 0;) {
        std::shuffle(warp_order.begin(), warp_order.end(), g_schedule_rng);
        bool progress = false;
        for (int w : warp_order) {
            for (bool ran = true; ran;) {
                ran = false;
                std::shuffle(lane_order.begin(), lane_order.end(), g_schedule_rng);
                for (int l : lane_order) {
                    const int t = 32 * w + l;
                    if (t >= threads) continue;  // past a partial last warp
                    EmuFiber& f = g_fibers[t];
                    if (f.done || (f.waiting != nullptr && f.waiting->generation == f.wait_gen)) continue;
                    f.waiting = nullptr;
                    threadIdx = {(unsigned)t, 0, 0};
                    blockIdx = block_idx;
                    g_current = t;
                    emu_tsan_to_thread(t);
                    emu_switch(&g_scheduler_sp, f.sp);
                    ran = progress = true;
                    if (f.done) --live;
                }
            }
        }
        if (!progress) {
            blockIdx = block_idx;
            threadIdx = {0, 0, 0};
            emu_fail("deadlock: a __syncthreads or warp-wide operation that not every live thread reaches");
        }
    }
    g_current = -1;
    emu_hb_acquire(&g_block_end);
    emu_check_global_gaps();
    // Canary: nothing past the launched dynamic shared memory may have been written.
    for (size_t i = smem_bytes; i < EMU_SMEM_MAX; ++i)
        if (emu_dyn_smem[i] != 0xff) {
            blockIdx = block_idx;
            emu_fail("a write past the launched dynamic shared memory");
        }
}

// The order in which a launch runs its blocks: a fresh random permutation (from EMU_SEED) unless
// EMU_BLOCK_ORDER=sequential. The GPU promises no order, so a kernel whose block reads what
// another block of the same launch writes (without atomics meant for it) gets a different
// answer here from run to run instead of the one that x-then-y-then-z order happens to give.
const bool g_blocks_sequential = emu_env_is("EMU_BLOCK_ORDER", "sequential");
inline std::vector<dim3> emu_block_order(dim3 grid) {
    std::vector<dim3> order;
    order.reserve((size_t)grid.x * grid.y * grid.z);
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) order.push_back({x, y, z});
    if (!g_blocks_sequential) std::shuffle(order.begin(), order.end(), g_schedule_rng);
    return order;
}

// Runs `kernel` over `grid` blocks of `block.x` threads (1..1024; the last warp may be partial:
// its warp barrier expects only its live lanes), one block after another (in emu_block_order),
// with `smem_bytes` of dynamic shared memory.
// (Untracked: the scheduler writes threadIdx and the barriers' state that the threads read.)
EMU_UNTRACKED inline void emu_launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& kernel) {
    const int threads = (int)block.x;
    if (block.y != 1 || block.z != 1 || threads < 1 || threads > EMU_MAX_THREADS)
        emu_fail("emu_launch: blocks must be 1-D with 1 to 1024 threads");
    if (smem_bytes > EMU_SMEM_MAX) emu_fail("emu_launch: more dynamic shared memory than sm_90 allows");
#ifdef EMU_TSAN
    g_tsan_scheduler = __tsan_get_current_fiber();
#endif
    gridDim = grid;
    blockDim = block;
    g_dyn_smem_bytes = smem_bytes;
    g_kernel = &kernel;
    const int warps = (threads + 31) / 32;
    std::vector<int> warp_order(warps), lane_order(32);
    for (int w = 0; w < warps; ++w) warp_order[w] = w;
    for (int l = 0; l < 32; ++l) lane_order[l] = l;
    for (const dim3& block_idx : emu_block_order(grid)) emu_run_block(block_idx, warp_order, lane_order);
}

// The linear-attention drivers' launch: 256 threads, the kernels' fixed shared arrays.
inline void emu_launch(dim3 grid, const std::function<void()>& kernel) {
    emu_launch(grid, {EMU_THREADS, 1, 1}, 0, kernel);
}
