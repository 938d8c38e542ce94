#!/usr/bin/env bash
# Checks the kernels build.rs compiled for the last release build: every fatbin holds SASS for
# sm_80 and sm_90 (cuobjdump --list-elf), and no kernel spills registers (ptxas report).
# Prints a per-kernel resource table (registers, shared memory, spills).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(bash scripts/install-cuda-toolchain.sh | tail -n 1)}
export NVCC METAKERNELS_REQUIRE_KERNELS=1
report_dir=target/kernel-report
rm -rf "$report_dir"
METAKERNELS_KERNEL_REPORT_DIR="$PWD/$report_dir" cargo build --release --quiet
# build.rs copies reports only when it runs; force it when the build was already fresh.
if ! ls "$report_dir"/*.fatbin >/dev/null 2>&1; then
  touch build.rs
  METAKERNELS_KERNEL_REPORT_DIR="$PWD/$report_dir" cargo build --release --quiet
fi
cuobjdump=$(find "$(dirname "$(dirname "$NVCC")")" "${HOME}/.cache/metakernels" -name cuobjdump -type f 2>/dev/null | head -n 1 || true)
status=0
for fatbin in "$report_dir"/*.fatbin; do
  name=$(basename "$fatbin" .fatbin)
  if [ -n "$cuobjdump" ]; then
    elfs=$("$cuobjdump" --list-elf "$fatbin" 2>&1 || true)
    for arch in sm_80 sm_90; do
      if ! grep -q "$arch" <<<"$elfs"; then
        echo "error: $name.fatbin has no $arch SASS"; status=1
      fi
    done
  fi
  report="$report_dir/$name.ptxas.txt"
  if grep -E 'bytes spill (stores|loads)' "$report" | grep -vq ' 0 bytes spill stores, 0 bytes spill loads'; then
    echo "error: a kernel in kernels/$name.cu spills registers:"; grep -B3 -E '[1-9][0-9]* bytes spill' "$report" | head -n 20
    status=1
  fi
  kernels=$(grep -c "Compiling entry function" "$report" || true)
  max_regs=$(grep -Eo 'Used [0-9]+ registers' "$report" | grep -Eo '[0-9]+' | sort -n | tail -n1 || true)
  echo "$name: $kernels kernel entries (sm_80 + sm_90), max ${max_regs:-0} registers, no spills"
done
[ -n "$cuobjdump" ] || echo "warning: cuobjdump not found; SASS architectures not checked"
exit $status
