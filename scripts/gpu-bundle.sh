#!/usr/bin/env bash
# Builds everything a GPU machine without cargo needs to test and benchmark metakernels:
# the release test binary and every bench binary, CUDA kernels embedded, stripped, packed into
# one bin.tar.xz, plus run.sh (which unpacks it), in one folder (default target/gpu-bundle) that
# must stay under 64 MiB (the device tool's limit on what travels).
#
#   scripts/gpu-bundle.sh [DIR]
#   then, on the GPU machine:  DIR/run.sh OUTDIR
set -euo pipefail
cd "$(dirname "$0")/.."
bundle="${1:-target/gpu-bundle}"
limit_mib=64

command -v xz > /dev/null || { echo "error: xz is needed to pack the bundle (Debian: apt-get install xz-utils)" >&2; exit 1; }
nvcc=$(bash scripts/install-cuda-toolchain.sh | tail -n 1)
export NVCC="$nvcc"
export METAKERNELS_REQUIRE_KERNELS=1
# SASS for sm_80 and sm_90 (and PTX) is the default of build.rs.

# Executables as cargo reports them (one JSON line per artifact).
executables() {
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    exe = msg.get("executable")
    if msg.get("reason") == "compiler-artifact" and exe:
        print(msg["target"]["kind"][0], msg["target"]["name"], exe)
'
}

rm -rf "$bundle"
bin="$bundle/bin"
mkdir -p "$bin"
{
  cargo test --release --no-run --test all --message-format=json
  cargo bench --no-run --message-format=json
} 2>/dev/null | executables | sort -u | while read -r kind name exe; do
  case "$kind" in
    test) cp "$exe" "$bin/test-$name" ;;
    bench) cp "$exe" "$bin/bench-$name" ;;
  esac
done
# Symbols are not needed to run; line tables would be nice for Nsight but cost the size limit.
strip "$bin"/* 2>/dev/null || true
[ -x "$bin/test-all" ] || { echo "error: test binary missing from the bundle" >&2; exit 1; }
ls -la "$bin"
# Every binary embeds the same kernel fatbins and much the same Rust code: 7 binaries of ~7 MiB
# pack into one xz stream of ~7 MiB when its dictionary spans them all (64 MiB). run.sh unpacks.
tar -C "$bundle" -cf - bin | xz -T1 -9 --lzma2=dict=64MiB > "$bundle/bin.tar.xz"
rm -rf "$bin"

cp scripts/gpu-run.sh "$bundle/run.sh"
# The PyTorch baselines of the issues' GPU bars, run by run.sh where PyTorch is installed.
mkdir -p "$bundle/compare"
cp scripts/compare/momentum_attention_sdpa.py scripts/compare/maml_torch.py "$bundle/compare/"
chmod +x "$bundle/run.sh"
{
  echo "commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "dirty=$([ -n "$(git status --porcelain 2>/dev/null)" ] && echo yes || echo no)"
  echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "nvcc=$("$nvcc" --version | tail -n 1)"
} > "$bundle/BUILD_INFO"

size_kib=$(du -sk "$bundle" | cut -f1)
echo "bundle: $bundle, $((size_kib / 1024)) MiB"
if [ "$size_kib" -ge $((limit_mib * 1024)) ]; then
  echo "error: the bundle is ${size_kib} KiB, over the ${limit_mib} MiB limit" >&2
  exit 1
fi
