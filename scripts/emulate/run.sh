#!/usr/bin/env bash
# Runs one family's CUDA kernels on the CPU, without a GPU: compiles kernels/<family>.cu as C++
# (g++ >= 12, C++20, x86-64) against the emulation of the CUDA execution model in prelude.h (one
# block at a time, each CUDA thread a user-space fiber resumed in a random order at every barrier,
# __syncthreads as a real barrier, warp shuffles and votes, ldmatrix and mma.sync m16n8k16 with
# the PTX ISA fragment layouts, cp.async as a copy that lands at the issuing thread's wait,
# dynamic shared memory and outputs poisoned with NaN, every global buffer against an
# inaccessible guard region so that an out-of-bounds access faults and is named), then runs
# scripts/emulate/<family>.cpp, which replays the launch sequences of src/ops/<family>/cuda.rs
# and compares every fast kernel with the family's reference kernel or a float64 reference.
#
#   scripts/emulate/run.sh linear_attention [quick]     exit status 1 on a mismatch
#   scripts/emulate/run.sh momentum_attention [quick]   (3 on an emulation error: deadlock,
#                                                        out-of-range shared address,
#                                                        out-of-bounds global access, ...)
#   scripts/emulate/run.sh linear_attention random N S  N cases of random shapes and options from
#                                                        seed S (every family but cast)
#   EMU_SEED=7 scripts/emulate/run.sh ...               another order of blocks, and of warps
#                                                        between barriers
#   EMU_BLOCK_ORDER=sequential scripts/emulate/run.sh   blocks in x, y, z order (the default
#                                                        shuffles them: the GPU promises no order)
#   EMU_CP_ASYNC=eager scripts/emulate/run.sh ...       cp.async lands at issue, not at the wait
#   EMU_GUARD=before scripts/emulate/run.sh ...         the guard before each global buffer's start
#                                                        (negative indices), not after its end
#   EMU_TSAN=1 scripts/emulate/run.sh ...               the race detector: built with ThreadSanitizer,
#                                                        each CUDA thread a TSan fiber, only
#                                                        __syncthreads and __syncwarp ordering memory
#                                                        (prelude.h, "race detection"); exit 66 and
#                                                        TSan's report (both accesses, their threads
#                                                        and lines) at the first race
#
# What it proves: index math, tails, the barrier structure, fragment layouts, numerics; with
# EMU_TSAN=1, that in the launches replayed no two threads of a block touch the same shared or
# global bytes (one of them writing) without a barrier ordering them, whatever order the warps
# and lanes run in. What it cannot: timing, races between blocks, the hardware's arithmetic. It
# is not a GPU run, and docs/gpu-validation.md never counts it as one.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
family="${1:?usage: scripts/emulate/run.sh <family> [args]}"
shift
driver="$here/$family.cpp"
[ -f "$driver" ] || { echo "no emulation driver $driver" >&2; exit 2; }
# -fno-extern-tls-init: shared memory is thread_local in the emulation (prelude.h), and the
# kernels' `extern __shared__` arrays are aliases of one buffer with no dynamic initialiser.
# -fno-strict-aliasing: CUDA code type-puns through vector types and registers (kmeans reads a
# uint4 as four __half2, the float4 tile loads), which nvcc allows; g++ -O2's strict aliasing
# miscompiled it (the streaming tensor-core kernel's ‖x‖² came out as garbage).
build="$(mktemp -d "${TMPDIR:-/tmp}/mk_emulate_${family}_XXXXXX")"
trap 'rm -rf "$build"' EXIT
flags=(-O2)
if [ "${EMU_TSAN:-0}" = 1 ]; then
  # The race detector (prelude.h, "race detection"): -O1 -g keeps TSan's stacks readable, and
  # halt_on_error stops at the first race with TSan's exit status 66.
  flags=(-O1 -g -fsanitize=thread -DEMU_TSAN)
  export TSAN_OPTIONS="halt_on_error=1 ${TSAN_OPTIONS:-}"
fi
"${CXX:-g++}" -std=c++20 "${flags[@]}" -fno-strict-aliasing -pthread -fno-extern-tls-init -I "$here/shim" -I "$here" -I "$root/kernels" "$driver" -o "$build/driver"
"$build/driver" "$@"
