#!/usr/bin/env bash
# Compile, on a machine with nvcc but no GPU, the FlashInfer kernels the engine uses, so that
# scripts/gpu_check.sh loads them instead of spending ~2 minutes of device time on JIT (FlashInfer
# 0.6 compiled them in 90 + 24 s on a 16-core H200 machine). The modules are FlashInfer's own
# JIT specs, built by FlashInfer's own build (its generated sources and ninja file); the archive
# holds <module>/<module>.so, the layout of FlashInfer's ahead-of-time folder (flashinfer/data/aot),
# where gpu_check.sh unpacks it. FlashInfer loads a module from there when present and falls back
# to JIT when loading fails, so a stale archive costs nothing but the time it was meant to save.
#
#   scripts/build_flashinfer_aot.sh [--wheels .whl] [--arch 9.0a] [--jobs N] [--work DIR]
#
# Needs: the flashinfer-python and apache-tvm-ffi wheels in --wheels (scripts/fetch_gpu_wheels.sh),
# nvcc (CUDA_HOME, else the newest /usr/local/cuda-*), and network access for a build environment
# (torch==2.13.0, tvm-ffi for this Python, curand headers for FA3's CUTLASS includes).
# Output: --wheels/flashinfer-aot-<version>-sm<arch>.tar.xz (a few MB). About 15 min on 2 cores.
set -euo pipefail

cd "$(dirname "$0")/.."
WHEELS=.whl
ARCH=9.0a            # H100 / H200
JOBS=$(nproc)
WORK=/tmp/npr_flashinfer_aot
while [[ $# -gt 0 ]]; do
    case "$1" in
        --wheels) WHEELS="$2"; shift 2 ;;
        --arch) ARCH="$2"; shift 2 ;;
        --jobs) JOBS="$2"; shift 2 ;;
        --work) WORK="$2"; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
WHEELS=$(realpath "$WHEELS")

only() {  # the one wheel of a package in the wheels folder
    local found=("$WHEELS"/$1-*.whl)
    if [[ ${#found[@]} -ne 1 || ! -f ${found[0]} ]]; then
        echo "need exactly one $1 wheel in $WHEELS (scripts/fetch_gpu_wheels.sh)" >&2
        exit 1
    fi
    echo "${found[0]}"
}
FLASHINFER_WHEEL=$(only flashinfer_python)
VERSION=$(basename "$FLASHINFER_WHEEL" | cut -d- -f2)
TVM_FFI_VERSION=$(basename "$(only apache_tvm_ffi)" | cut -d- -f2)

CUDA_HOME=${CUDA_HOME:-$(ls -d /usr/local/cuda-* 2>/dev/null | sort -V | tail -1)}
if [[ ! -x "$CUDA_HOME/bin/nvcc" ]]; then
    echo "no nvcc under CUDA_HOME=$CUDA_HOME" >&2
    exit 1
fi
CUDA_MAJOR=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
export CUDA_HOME

# The build environment: FlashInfer's Python side drives its own build.
mkdir -p "$WORK"
VENV="$WORK/venv"
# Made again for other versions: FlashInfer finds a prebuilt module by its name alone, so a module
# built by another version would load and then fail when called, instead of being compiled.
STAMP="flashinfer-python $VERSION, apache-tvm-ffi $TVM_FFI_VERSION"
if [[ "$(cat "$VENV/.complete" 2>/dev/null)" != "$STAMP" ]]; then
    rm -rf "$VENV" && python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.13.0
    # What `import flashinfer` needs, and curand's headers for this CUDA (the cu12 line has
    # its own package name)
    CURAND=nvidia-curand
    (( CUDA_MAJOR == 12 )) && CURAND=nvidia-curand-cu12
    "$VENV/bin/pip" install -q numpy einops tabulate click nvidia-ml-py packaging ninja filelock \
        requests tqdm "$CURAND"
    # Last and without its declared dependencies (CUDA Python packages of several GB)
    "$VENV/bin/pip" install -q --no-deps "$FLASHINFER_WHEEL" "apache-tvm-ffi==$TVM_FFI_VERSION"
    echo "$STAMP" >"$VENV/.complete"
fi
CURAND_INCLUDE=$(dirname "$(find "$VENV" -name curand_kernel.h | head -1)")
export CPATH="$CURAND_INCLUDE${CPATH:+:$CPATH}"
export PATH="$VENV/bin:$PATH"  # ninja

# Linking names -lcuda; the driver library is on GPU machines only. A stub with its soname
# satisfies the linker (the modules need only the runtime, libcudart, at load time).
mkdir -p "$WORK/stubs"
echo "" >"$WORK/stubs/stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$WORK/stubs/libcuda.so" "$WORK/stubs/stub.c"
export LIBRARY_PATH="$WORK/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"

export FLASHINFER_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$JOBS"
export FLASHINFER_WORKSPACE_BASE="$WORK"  # its JIT cache goes under here, not ~/.cache
STAGE="$WORK/aot"
rm -rf "$STAGE" && mkdir -p "$STAGE"
"$VENV/bin/python" - "$STAGE" <<'EOF'
import shutil, sys, time
from pathlib import Path

import torch
from flashinfer.jit.attention.modules import gen_batch_prefill_module
from flashinfer.jit.cascade import gen_cascade_module

# What the engine's FlashInfer backend asks for with bf16 models of head dim 128 (Qwen3-4B, the
# gpu tests' models): flat decode with tensor cores runs FA2's batch prefill; cascade levels run
# BatchPrefillWithPagedKVCacheWrapper, FA3 on sm90; the levels merge with the cascade module.
# Arguments: q, kv, out, index dtypes; qk and vo head dims; no positional encoding in the kernel,
# no sliding window, no logit soft-cap, no fp16 QK reduction.
prefill = (torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.int32, 128, 128, 0, False, False, False)
specs = [gen_batch_prefill_module("fa2", *prefill), gen_batch_prefill_module("fa3", *prefill),
         gen_cascade_module()]
stage = Path(sys.argv[1])
for spec in specs:
    start = time.time()
    spec.build()
    target = stage / spec.name / f"{spec.name}.so"
    target.parent.mkdir(parents=True)
    shutil.copy2(spec.jit_library_path, target)
    print(f"{spec.name}: {time.time() - start:.0f} s, {target.stat().st_size / 2**20:.1f} MiB", flush=True)
EOF
{
    echo "flashinfer-python $VERSION"
    echo "apache-tvm-ffi $TVM_FFI_VERSION"
    echo "arch $ARCH"
    "$CUDA_HOME/bin/nvcc" --version | tail -1
    echo "built $(date -u +%Y-%m-%dT%H:%MZ) on $(uname -m)"
} >"$STAGE/MANIFEST"
ARCHIVE="$WHEELS/flashinfer-aot-$VERSION-sm${ARCH//./}.tar.xz"
rm -f "$WHEELS"/flashinfer-aot-*.tar.xz
tar -C "$STAGE" -cJf "$ARCHIVE" .
ls -la "$ARCHIVE"
cat "$STAGE/MANIFEST"
