#!/usr/bin/env bash
# Is every barrier needed, and would the emulation notice it missing? For each __syncthreads()
# and __syncwarp() in a kernel file, in turn: a copy of the tree without that one barrier, its
# family's quick emulation under the race detector (EMU_TSAN=1, see run.sh). A barrier whose
# removal nothing flags is either redundant (remove it) or guards a path the quick mode does not
# reach (add a case): both worth knowing before a GPU ever runs the kernel.
#
#   scripts/emulate/barrier-sweep.sh linear_attention            kernels/linear_attention.cu
#   scripts/emulate/barrier-sweep.sh momentum_attention common.cuh   a shared header, as that family
#   JOBS=4 scripts/emulate/barrier-sweep.sh ...                   parallel runs (default: nproc)
#
# Prints one line per barrier (file:line, flagged or NOT FLAGGED) and the unflagged ones at the
# end. Takes one quick TSan run per barrier (seconds to two minutes each).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
family="${1:?usage: scripts/emulate/barrier-sweep.sh <family> [kernel file, default <family>.cu]}"
file="${2:-$family.cu}"
[ -f "$root/kernels/$file" ] || { echo "no kernels/$file" >&2; exit 2; }
work="$(mktemp -d "${TMPDIR:-/tmp}/mk_barrier_sweep_XXXXXX")"
trap 'rm -rf "$work"' EXIT

# The barriers: "<byte offset> <line> <pattern>" of each call, in file order.
python3 - "$root/kernels/$file" > "$work/barriers" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
for m in re.finditer(r"__syncthreads\(\);|__syncwarp\(\);", text):
    print(m.start(), text.count("\n", 0, m.start()) + 1, m.group(0))
PY

# One mutant: the tree without the barrier at byte `offset`, its verdict on one line.
sweep_one() {
  local offset=$1 line=$2 pattern=$3 dir="$work/$1"
  mkdir -p "$dir"
  cp -r "$root/scripts" "$root/kernels" "$dir/"
  python3 - "$dir/kernels/$file" "$offset" "$pattern" <<'PY'
import sys
path, offset, pattern = sys.argv[1], int(sys.argv[2]), sys.argv[3]
text = open(path).read()
assert text[offset:offset + len(pattern)] == pattern
open(path, "w").write(text[:offset] + ";" + text[offset + len(pattern):])
PY
  local rc=0 verdict
  EMU_TSAN=1 bash "$dir/scripts/emulate/run.sh" "$family" quick > "$dir/log" 2>&1 || rc=$?
  case $rc in
    0) verdict="NOT FLAGGED" ;;
    66) verdict="flagged: $(grep -m1 -o 'data race in block [0-9,]*' "$dir/log")" ;;
    1) verdict="flagged: $(grep -m1 -o '[0-9]* failure(s)' "$dir/log") against the references" ;;
    3) verdict="flagged: emulation error" ;;
    *) verdict="flagged (exit $rc)" ;;
  esac
  echo "kernels/$file:$line ${pattern%();} $verdict"
  rm -rf "$dir"
}
export -f sweep_one
export work root family file
xargs -P "${JOBS:-$(nproc)}" -L 1 bash -c 'sweep_one "$@"' _ < "$work/barriers" | sort -t: -k2 -n | tee "$work/verdicts"
total=$(wc -l < "$work/verdicts")
unflagged=$(grep -c "NOT FLAGGED" "$work/verdicts" || true)
echo "$total barrier(s) in kernels/$file; $unflagged not flagged when removed"
