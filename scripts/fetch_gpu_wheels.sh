#!/usr/bin/env bash
# Download, on a machine with network access, the wheels that scripts/gpu_check.sh installs on a
# GPU machine that has none (its image already holds torch, triton, transformers' dependencies,
# ninja and nvcc; see docs/GPU.md). Wheels go to .whl/ (git-ignored), for Python 3.12 on x86-64
# Linux; the total stays under the 64 MiB a device call may carry.
#
#   scripts/fetch_gpu_wheels.sh [--python 3.12] [--dest .whl]
set -euo pipefail

PYVER=3.12
DEST=.whl
while [[ $# -gt 0 ]]; do
    case "$1" in
        --python) PYVER="$2"; shift 2 ;;
        --dest) DEST="$2"; shift 2 ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."
PIP="${PIP:-python3 -m pip}"

# One version of each. flashinfer-python 0.6.x is ~14 MB (0.7.x: 62 MB, with far larger declared
# dependencies); it is installed with --no-deps, plus only what `import flashinfer` needs:
# apache-tvm-ffi (its JIT modules load through TVM-FFI). lark: this project's parser. transformers:
# the version the engine is tested with here (pure Python; its dependencies are on the image).
WHEELS=(
    "flashinfer-python==0.6.18.post1"
    "apache-tvm-ffi==0.1.15.post2"
    "lark==1.3.1"
    "transformers==5.24.0"
)
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
        manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 linux_x86_64; do
    PLATFORMS+=(--platform "$tag")
done

mkdir -p "$DEST"
for spec in "${WHEELS[@]}"; do
    $PIP download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        "${PLATFORMS[@]}" -d "$DEST" "$spec"
done
ls -la "$DEST"
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "total: $((total / 1024 / 1024)) MiB in $(ls "$DEST"/*.whl | wc -l) wheels"
if (( total > 60 * 1024 * 1024 )); then
    echo "warning: over 60 MiB; a device call carries at most 64 MiB with the tree" >&2
fi
