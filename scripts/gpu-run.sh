#!/usr/bin/env bash
# Runs the metakernels bundle on a machine with a GPU and no cargo (copied into the bundle as
# run.sh by scripts/gpu-bundle.sh).
#
#   run.sh [OUTDIR]   (default: $OUT, else ./gpu-results)
#
# 1. nvidia-smi; 2. every test with METAKERNELS_REQUIRE_CUDA=1, so a GPU test that would skip
# fails; 3. compute-sanitizer memcheck over the CUDA tests, where it is installed; 4. a short pass
# of every benchmark. Logs and summary.json go to OUTDIR. Exit status: nonzero if tests failed.
#
# Environment: METAKERNELS_BENCH_SECONDS (per bench binary, default 120), METAKERNELS_SKIP_BENCH=1.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-${OUT:-$PWD/gpu-results}}"
mkdir -p "$out"
bench_seconds="${METAKERNELS_BENCH_SECONDS:-120}"
export METAKERNELS_REQUIRE_CUDA=1
export METAKERNELS_BENCH_JSON="$out/bench.jsonl"
: > "$METAKERNELS_BENCH_JSON"

echo "== nvidia-smi"
nvidia-smi 2>&1 | tee "$out/nvidia-smi.txt" || true
cat "$here/BUILD_INFO" 2>/dev/null

echo "== tests"
"$here/bin/test-all" --test-threads=1 2>&1 | tee "$out/tests.log"
tests_rc=${PIPESTATUS[0]}
passed=$(grep -Eo '[0-9]+ passed' "$out/tests.log" | tail -n1 | grep -Eo '[0-9]+' || echo 0)
failed=$(grep -Eo '[0-9]+ failed' "$out/tests.log" | tail -n1 | grep -Eo '[0-9]+' || echo 0)

sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n1 || true)
sanitizer_status="not installed"
if [ -n "$sanitizer" ]; then
  echo "== compute-sanitizer memcheck (tests whose names contain 'cuda' or 'gpu')"
  "$sanitizer" --tool memcheck --error-exitcode 99 "$here/bin/test-all" cuda gpu --test-threads=1 \
    > "$out/sanitizer.log" 2>&1
  sanitizer_rc=$?
  sanitizer_status=$([ $sanitizer_rc -eq 0 ] && echo "clean" || echo "errors (exit $sanitizer_rc)")
  tail -n 20 "$out/sanitizer.log"
fi

if [ "${METAKERNELS_SKIP_BENCH:-0}" != 1 ]; then
  echo "== benchmarks (short pass)"
  for bench in "$here"/bin/bench-*; do
    name=$(basename "$bench")
    echo "-- $name"
    timeout "$bench_seconds" "$bench" --bench cuda --warm-up-time 0.5 --measurement-time 1 \
      > "$out/$name.log" 2>&1
    grep -E '^\[metakernels\]|skipped|time:' "$out/$name.log" | head -n 60
  done
fi

bench_lines=$(wc -l < "$METAKERNELS_BENCH_JSON")
{
  echo "{"
  echo "  \"build\": \"$(tr '\n' ' ' < "$here/BUILD_INFO" 2>/dev/null)\","
  echo "  \"gpu\": \"$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n1)\","
  echo "  \"tests\": {\"exit\": $tests_rc, \"passed\": ${passed:-0}, \"failed\": ${failed:-0}},"
  echo "  \"sanitizer\": \"$sanitizer_status\","
  echo "  \"bench_measurements\": $bench_lines,"
  echo "  \"bench\": ["
  sed '$!s/$/,/' "$METAKERNELS_BENCH_JSON" | sed 's/^/    /'
  echo "  ]"
  echo "}"
} > "$out/summary.json"
echo "== summary: tests exit $tests_rc ($passed passed, $failed failed), sanitizer: $sanitizer_status, $bench_lines bench lines"
exit "$tests_rc"
