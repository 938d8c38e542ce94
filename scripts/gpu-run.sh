#!/usr/bin/env bash
# Runs the metakernels bundle on a machine with a GPU and no cargo (copied into the bundle as
# run.sh by scripts/gpu-bundle.sh).
#
#   run.sh [OUTDIR]   (default: $OUT, else ./gpu-results)
#
# 1. nvidia-smi;
# 2. the CPU tests in one process;
# 3. every test whose name contains `cuda` or `gpu`, EACH IN ITS OWN PROCESS with
#    METAKERNELS_REQUIRE_CUDA=1 (a test that would skip fails) and a time limit: a kernel that
#    faults leaves a sticky error in its CUDA context, and one that hangs would stall the rest, so
#    one bad kernel must not hide the results of the others;
# 4. the side-by-side baselines the issues' GPU bars name, where python3 has PyTorch: SDPA's
#    flash backend on the momentum-attention shapes, torch.func's MAML meta-gradient (the
#    scripts travel in the bundle's compare/ folder);
# 5. a short pass of every benchmark's CUDA groups;
# 6. compute-sanitizer memcheck over the CUDA tests, where it is installed, with what time is left.
# Device time is scarce, so the whole run keeps to a budget (METAKERNELS_RUN_SECONDS, default
# 480) and OUTDIR/summary.json is rewritten after every stage: a run cut short still reports.
# Exit status: nonzero if any test failed.
#
# Environment: METAKERNELS_RUN_SECONDS (total budget, default 480), METAKERNELS_TEST_SECONDS
# (per CUDA test, default 90), METAKERNELS_BENCH_SECONDS (per bench binary, default 45),
# METAKERNELS_COMPARE_SECONDS (per comparison script, default 75), METAKERNELS_SKIP_COMPARE=1,
# METAKERNELS_SKIP_BENCH=1, METAKERNELS_SKIP_SANITIZER=1.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# The binaries travel as one bin.tar.xz (gpu-bundle.sh): unpack them into a fresh temporary
# folder (the bundle's own may be read-only).
unpacked="$(mktemp -d "${TMPDIR:-/tmp}/metakernels-bin-XXXXXX")"
trap 'rm -rf "$unpacked"' EXIT
if [ -f "$here/bin.tar.xz" ]; then
  tar -C "$unpacked" -xJf "$here/bin.tar.xz" 2>/dev/null ||
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$here/bin.tar.xz" "$unpacked" ||
    { echo "error: could not unpack $here/bin.tar.xz (neither tar -J nor python3 worked)" >&2; exit 2; }
  bin="$unpacked/bin"
else
  bin="$here/bin"  # an unpacked bundle
fi
out="${1:-${OUT:-$PWD/gpu-results}}"
mkdir -p "$out/tests"
start=$(date +%s)
budget="${METAKERNELS_RUN_SECONDS:-480}"
test_seconds="${METAKERNELS_TEST_SECONDS:-90}"
bench_seconds="${METAKERNELS_BENCH_SECONDS:-45}"
compare_seconds="${METAKERNELS_COMPARE_SECONDS:-75}"
export METAKERNELS_REQUIRE_CUDA=1
export METAKERNELS_BENCH_JSON="$out/bench.jsonl"
export METAKERNELS_BENCH_SKIP_CPU=1  # the benches' CPU report lines would spend device time
: > "$METAKERNELS_BENCH_JSON"
: > "$out/gpu-tests.jsonl"
: > "$out/compare.jsonl"
cpu_tests="not run"
compare_status="not run"
sanitizer_status="not run"

left() { echo $((budget - ($(date +%s) - start))); }

write_summary() {
  local passed failed timed_out
  passed=$(grep -c '"status": "pass"' "$out/gpu-tests.jsonl")
  failed=$(grep -c '"status": "fail"' "$out/gpu-tests.jsonl")
  timed_out=$(grep -c '"status": "timeout"' "$out/gpu-tests.jsonl")
  {
    echo "{"
    echo "  \"build\": \"$(tr '\n' ' ' < "$here/BUILD_INFO" 2>/dev/null)\","
    echo "  \"gpu\": \"$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n1)\","
    echo "  \"stage\": \"$1\", \"seconds\": $(($(date +%s) - start)),"
    echo "  \"cpu_tests\": \"$cpu_tests\","
    echo "  \"gpu_tests\": {\"passed\": $passed, \"failed\": $failed, \"timed_out\": $timed_out},"
    echo "  \"gpu_test_results\": ["
    sed '$!s/$/,/' "$out/gpu-tests.jsonl" | sed 's/^/    /'
    echo "  ],"
    echo "  \"compare\": \"$compare_status\","
    echo "  \"compare_results\": ["
    sed '$!s/$/,/' "$out/compare.jsonl" | sed 's/^/    /'
    echo "  ],"
    echo "  \"sanitizer\": \"$sanitizer_status\","
    echo "  \"bench\": ["
    sed '$!s/$/,/' "$METAKERNELS_BENCH_JSON" | sed 's/^/    /'
    echo "  ]"
    echo "}"
  } > "$out/summary.json"
}

echo "== nvidia-smi"
nvidia-smi 2>&1 | tee "$out/nvidia-smi.txt" || true
cat "$here/BUILD_INFO" 2>/dev/null
write_summary started

echo "== CPU tests"
"$bin/test-all" --skip cuda --skip gpu --test-threads=4 > "$out/cpu-tests.log" 2>&1
cpu_rc=$?
cpu_tests="$(grep -Eo 'test result: .*' "$out/cpu-tests.log" | tail -n1) (exit $cpu_rc)"
echo "$cpu_tests"
write_summary cpu-tests

echo "== CUDA tests, one process each (limit ${test_seconds}s)"
any_failed=$cpu_rc
gpu_tests=$("$bin/test-all" --list 2>/dev/null | sed -n 's/: test$//p' | grep -Ei 'cuda|gpu')
# The kernels' own tests first; the API fuzz's CUDA twins (robustness, not correctness) last, so
# that a short budget spends itself on the kernels.
gpu_tests="$(grep -v '^fuzz::' <<< "$gpu_tests") $(grep '^fuzz::' <<< "$gpu_tests")"
for name in $gpu_tests; do
  t0=$(date +%s)
  log="$out/tests/${name//::/__}.log"  # no colons in file names that travel back
  timeout "$test_seconds" "$bin/test-all" --exact "$name" --test-threads=1 > "$log" 2>&1
  rc=$?
  case $rc in
    0) status=pass ;;
    124) status=timeout ;;
    *) status=fail ;;
  esac
  [ $rc -ne 0 ] && any_failed=1
  printf '%-70s %s (%ss)\n' "$name" "$status" "$(($(date +%s) - t0))"
  echo "{\"test\": \"$name\", \"status\": \"$status\", \"exit\": $rc, \"seconds\": $(($(date +%s) - t0))}" \
    >> "$out/gpu-tests.jsonl"
  write_summary gpu-tests
done
for log in "$out"/tests/*.log; do
  # The panic message says what differed; the whole log travels back in OUTDIR/tests.
  grep -q 'test result: ok' "$log" || { echo "-- $(basename "$log")"; grep -m2 -A2 panicked "$log"; }
done

# One comparison script: its output goes to OUTDIR/compare-NAME.log, and its lines that are JSON
# objects into OUTDIR/compare.jsonl.
run_compare() {
  local name=$1 limit
  shift
  limit=$(left)
  [ "$limit" -gt "$compare_seconds" ] && limit=$compare_seconds
  [ "$limit" -lt 15 ] && { echo "-- $name skipped: the run's time budget is spent"; return; }
  echo "-- $name $* (limit ${limit}s)"
  PYTHONUNBUFFERED=1 timeout "$limit" python3 "$here/compare/$name.py" "$@" > "$out/compare-$name.log" 2>&1
  echo "   exit $?"
  grep '^{' "$out/compare-$name.log" >> "$out/compare.jsonl"
  grep -v '^{' "$out/compare-$name.log" | tail -n 5
}
if [ "${METAKERNELS_SKIP_COMPARE:-0}" = 1 ]; then
  compare_status="skipped"
elif ! python3 -c 'import torch; assert torch.cuda.is_available()' > /dev/null 2>&1; then
  compare_status="no python3 with PyTorch and CUDA here"
else
  echo "== side-by-side baselines (PyTorch)"
  run_compare momentum_attention_sdpa --device cuda --dtype bf16 --reps 5
  run_compare maml_torch --device cuda --reps 30
  compare_status="ran: compare.jsonl and compare-*.log"
  write_summary compare
fi

if [ "${METAKERNELS_SKIP_BENCH:-0}" != 1 ]; then
  echo "== benchmarks (short pass of the CUDA groups)"
  for bench in "$bin"/bench-*; do
    name=$(basename "$bench")
    limit=$(left)
    [ "$limit" -gt "$bench_seconds" ] && limit=$bench_seconds
    [ "$limit" -lt 10 ] && { echo "-- $name skipped: the run's time budget is spent"; continue; }
    echo "-- $name (limit ${limit}s)"
    timeout "$limit" "$bench" --bench cuda --warm-up-time 0.5 --measurement-time 1 \
      > "$out/$name.log" 2>&1
    grep -E '^\[metakernels\]|skipped|time:' "$out/$name.log" | head -n 60
    write_summary "bench $name"
  done
fi

sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n1 || true)
if [ "${METAKERNELS_SKIP_SANITIZER:-0}" = 1 ]; then
  sanitizer_status="skipped"
elif [ -z "$sanitizer" ]; then
  sanitizer_status="not installed"
elif [ "$(left)" -lt 30 ]; then
  sanitizer_status="skipped: the run's time budget is spent"
else
  echo "== compute-sanitizer memcheck over the CUDA tests (limit $(left)s)"
  timeout "$(left)" "$sanitizer" --tool memcheck --error-exitcode 99 "$bin/test-all" cuda gpu \
    --test-threads=1 > "$out/sanitizer.log" 2>&1
  rc=$?
  case $rc in
    0) sanitizer_status="clean" ;;
    124) sanitizer_status="cut short by the time budget; see sanitizer.log" ;;
    *) sanitizer_status="errors (exit $rc)" ;;
  esac
  tail -n 20 "$out/sanitizer.log"
fi
write_summary done

echo "== summary: CPU tests: $cpu_tests; CUDA tests: $(grep -c '"status": "pass"' "$out/gpu-tests.jsonl") passed of" \
  "$(wc -l < "$out/gpu-tests.jsonl"); sanitizer: $sanitizer_status; $(wc -l < "$METAKERNELS_BENCH_JSON") bench lines"
exit "$any_failed"
