#!/usr/bin/env bash
# Installs nvcc (CUDA 13.0) without root and without a GPU, from the Python package registry.
#
# Why wheels: CI and developer machines have no GPU and no CUDA install, but they must compile
# every kernel (METAKERNELS_REQUIRE_KERNELS=1). NVIDIA publishes nvcc, NVVM, the CRT headers, the
# runtime headers and CCCL as pip wheels; together they form a working nvcc that only needs the
# host gcc. All packages are pinned to one release: mixing versions breaks nvcc.
#
# Idempotent: a second run with everything in place only prints the path.
# Prints the nvcc path as the last line of stdout.
#
# Environment:
#   METAKERNELS_CUDA_CACHE  where to install (default: ~/.cache/metakernels/cuda-13.0)
set -euo pipefail

CUDA_RELEASE="13.0"
cache="${METAKERNELS_CUDA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/metakernels/cuda-${CUDA_RELEASE}}"
venv="$cache/venv"
stamp="$cache/.installed-${CUDA_RELEASE}-v1"

find_nvcc() {
  # The wheels lay nvcc under site-packages/nvidia/cu13/bin (or nvidia/cuda_nvcc/bin in older
  # layouts); search rather than hard-code the layout.
  find "$venv" -type f -name nvcc -path '*/bin/nvcc' 2>/dev/null | head -n 1
}

if [ -f "$stamp" ] && nvcc_path=$(find_nvcc) && [ -n "$nvcc_path" ] && "$nvcc_path" --version >/dev/null 2>&1; then
  echo "$nvcc_path"
  exit 0
fi

echo "installing the CUDA ${CUDA_RELEASE} toolchain into $cache" >&2
mkdir -p "$cache"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  "nvidia-cuda-nvcc==${CUDA_RELEASE}.*" \
  "nvidia-nvvm==${CUDA_RELEASE}.*" \
  "nvidia-cuda-crt==${CUDA_RELEASE}.*" \
  "nvidia-cuda-runtime==${CUDA_RELEASE}.*" \
  "nvidia-cuda-cccl==${CUDA_RELEASE}.*" >&2
# cuobjdump has no 13.0 wheel; a newer one reads 13.0 fatbins. --no-deps keeps it from pulling
# a second, mismatched toolchain.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
  "nvidia-cuda-cuobjdump" >&2 || echo "warning: cuobjdump not installed (SASS inspection only)" >&2

nvcc_path=$(find_nvcc)
if [ -z "$nvcc_path" ]; then
  echo "error: nvcc not found under $venv after install" >&2
  exit 1
fi
"$nvcc_path" --version >&2
touch "$stamp"
echo "$nvcc_path"
