#!/usr/bin/env bash
# The GPU checks in one go, on a fresh GPU machine, in under 8 minutes (see docs/GPU.md):
#
#   1. wheels  install from .whl/ (scripts/fetch_gpu_wheels.sh) what this machine lacks
#   2. env     nvidia-smi, Python, torch / triton / flashinfer / transformers versions; unpacks
#              prebuilt FlashInfer kernels (scripts/build_flashinfer_aot.sh) when .whl/ has them
#   3. jit     load or compile the FlashInfer kernels the engine uses (bf16, head dim 128), timed
#   4. tests   pytest -m gpu, then the kernel, backend, sampling and training tests on the GPU
#   5. bench   benchmarks/gpu_decode.py with a time budget
#
# Results go to --out (default: $OUT, else ./gpu_results): at most 8 files, flat. No step runs
# past --budget seconds (the device call's limit should leave a few more): steps that do not fit
# are cut at it or skipped, and say so in summary.txt.
#
#   scripts/gpu_check.sh [--dry-run] [--out DIR] [--wheels DIR] [--budget SECONDS] [--skip STEP]
#                        [--bench-args "ARGS"]   (passed on to benchmarks/gpu_decode.py)
#
# --skip (repeatable, or comma-separated) jit, tests, bench; or one of the two test runs:
# gpu-tests (pytest -m gpu), cuda-tests (the other tests of those files on CUDA tensors).
#
# --dry-run runs nowhere near a GPU: it lists the steps and their commands, validates the wheels
# folder (one version per package, size), and collects the gpu tests without running them.
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
OUT_DIR="${OUT:-$ROOT/gpu_results}"
WHEELS="$ROOT/.whl"
BUDGET=460          # seconds for the whole script; the benchmark gets what is left
SKIP=""
BENCH_ARGS=""
PYTHON="${PYTHON:-python3}"
SITE=/tmp/npr_site
# The kernel, backend, sampling and training tests: their gpu tests, then the rest on CUDA tensors.
TEST_FILES=(tests/test_kernels.py tests/test_sampling.py tests/test_gpu_training.py tests/test_backends.py)
# The gpu tests, with those of files whose other tests stay on the CPU (nested blocks), and
# test_backends.py last: its gpu tests of CUDA graphs and overlapped steps (at its end) have never
# run on a GPU, and a sticky CUDA error (an illegal address) fails every test after it.
GPU_TEST_FILES=(tests/test_kernels.py tests/test_sampling.py tests/test_gpu_training.py
                tests/test_multiverse_engine.py tests/test_backends.py)

while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY=1; shift ;;
        --out) OUT_DIR="$2"; shift 2 ;;
        --wheels) WHEELS="$2"; shift 2 ;;
        --budget) BUDGET="$2"; shift 2 ;;
        --skip) SKIP="$SKIP,$2"; shift 2 ;;
        --bench-args) BENCH_ARGS="$2"; shift 2 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT_DIR"
START=$SECONDS
START_TIME=$(date +%s)
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"
STATUS=0

say() { echo "[gpu_check $(( SECONDS - START ))s] $*" | tee -a "$SUMMARY"; }
left() { echo $(( BUDGET - (SECONDS - START) )); }
skipped() { [[ ",$SKIP," == *",$1,"* ]]; }
# A step's time limit never reaches past the budget: at most what is left, less timeout's 10 s
# grace to kill and 5 s to write the summary; a step with under 10 s of it is skipped.
room() { echo $(( $(left) - 15 )); }
# run STEP LOG TIMEOUT CMD...: run (or, dry, print) a command with a time limit (cut to room, or
# skipped with status 1), log its output.
run() {
    local step=$1 log=$2 limit=$3; shift 3
    local most
    most=$(room)
    (( limit > most )) && limit=$most
    if (( limit < 10 )); then
        say "$step: skipped, the budget is spent ($(left)s left; $(basename "$log"))"
        return 1
    fi
    if (( DRY )); then
        say "$step: would run (timeout ${limit}s, log $(basename "$log")): $*"
        return 0
    fi
    local t0=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    say "$step: exit $rc after $(( SECONDS - t0 ))s ($(basename "$log"))"
    tail -n 15 "$log"
    return $rc
}

# -- 1. wheels -------------------------------------------------------------------------------------
# Lists each wheel with what this interpreter has: "install" when missing or another version,
# "present" otherwise; fails on two versions of one package or more than 64 MiB in all.
wheel_plan() {
    "$PYTHON" - "$WHEELS" <<'EOF'
import importlib.metadata as md, pathlib, re, sys
folder = pathlib.Path(sys.argv[1])
wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
if not wheels:
    print(f"no wheels in {folder}: nothing to install (flashinfer parts will skip if absent)")
    sys.exit(0)
seen, total, bad = {}, 0, False
for wheel in wheels:
    name, version = wheel.name.split("-")[:2]
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        print(f"ERROR: two versions of {key}: {seen[key]} and {wheel.name}")
        bad = True
    seen[key] = wheel.name
    total += wheel.stat().st_size
    try:
        have = md.version(key)
    except md.PackageNotFoundError:
        have = None
    action = "present" if have == version else "install"
    print(f"{action:8s} {key}=={version} (have: {have})\t{wheel.name}")
for archive in sorted(folder.glob("flashinfer-aot-*.tar.xz")):  # prebuilt kernels, step 2
    total += archive.stat().st_size
    print(f"archive  {archive.name} ({archive.stat().st_size / 2**20:.1f} MiB)")
print(f"total {total / 2**20:.1f} MiB in {len(wheels)} wheels and archives")
if total > 64 * 2**20:
    print("ERROR: over 64 MiB, more than a device call carries")
    bad = True
sys.exit(1 if bad else 0)
EOF
}

say "step 1/5 wheels: $WHEELS"
PLAN=$(wheel_plan)
PLAN_RC=$?
echo "$PLAN" | tee -a "$SUMMARY"
if (( PLAN_RC )); then
    say "wheels: invalid folder, stopping"
    exit 1
fi
TO_INSTALL=$(echo "$PLAN" | awk '$1 == "install" {print $NF}')
if [[ -n "$TO_INSTALL" ]]; then
    cmd=("$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
         --target "$SITE")
    for wheel in $TO_INSTALL; do cmd+=("$WHEELS/$wheel"); done
    run wheels "$OUT_DIR/env.txt" 120 "${cmd[@]}" || { say "wheels: install failed"; exit 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# -- 2. env ----------------------------------------------------------------------------------------
say "step 2/5 env"
if (( ! DRY )); then
    {
        nvidia-smi || echo "nvidia-smi failed"
        "$PYTHON" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for name in ("triton", "flashinfer", "tvm_ffi", "transformers", "lark"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), module.__file__)
    except Exception as error:  # noqa: BLE001
        print(name, "MISSING", repr(error))
EOF
    } >>"$OUT_DIR/env.txt" 2>&1
    cat "$OUT_DIR/env.txt"
fi
# Compile FlashInfer only for this GPU (sm_90a on an H100/H200), with every core.
if (( ! DRY )); then
    ARCH=$("$PYTHON" -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"{a}.{b}" + ("a" if a >= 9 else ""))' 2>/dev/null)
    export FLASHINFER_CUDA_ARCH_LIST="${FLASHINFER_CUDA_ARCH_LIST:-$ARCH}"
    export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
    say "env: FLASHINFER_CUDA_ARCH_LIST=$FLASHINFER_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
fi
# Prebuilt FlashInfer kernels (scripts/build_flashinfer_aot.sh) for this flashinfer and this GPU go
# to FlashInfer's ahead-of-time folder; it loads them from there, and JIT-compiles what is missing.
FLASHINFER_VERSION=$("$PYTHON" -c 'import importlib.metadata as md; print(md.version("flashinfer-python"))' 2>/dev/null)
if (( DRY )); then  # no GPU to ask: the wheel's version and the H100/H200 architecture
    FLASHINFER_VERSION=$(ls "$WHEELS"/flashinfer_python-*.whl 2>/dev/null | head -1 | xargs -r basename | cut -d- -f2)
    ARCH=9.0a
fi
AOT_ARCHIVE="$WHEELS/flashinfer-aot-$FLASHINFER_VERSION-sm${ARCH//./}.tar.xz"
if [[ -z "$FLASHINFER_VERSION" ]]; then
    say "env: no flashinfer, no prebuilt kernels"
elif [[ ! -f "$AOT_ARCHIVE" ]]; then
    say "env: no prebuilt kernels ($(basename "$AOT_ARCHIVE")): FlashInfer compiles them (jit)"
elif (( DRY )); then
    say "env: would unpack $(basename "$AOT_ARCHIVE") into flashinfer/data/aot: $(tar -tJf "$AOT_ARCHIVE" | grep -c '\.so$') modules"
else
    AOT_DIR="$("$PYTHON" -c 'import importlib.util as u; print(u.find_spec("flashinfer").submodule_search_locations[0])')/data/aot"
    mkdir -p "$AOT_DIR" && tar -C "$AOT_DIR" -xJf "$AOT_ARCHIVE" \
        && say "env: prebuilt kernels unpacked into $AOT_DIR: $(cd "$AOT_DIR" && ls -d */ | tr -d / | tr '\n' ' ')" \
        || say "env: could not unpack $(basename "$AOT_ARCHIVE"); FlashInfer compiles the kernels"
fi
# What FlashInfer compiled itself during this run (absent from the prebuilt kernels): modules
# written to its JIT cache since the start.
jit_built() {
    local found
    found=$(find "${FLASHINFER_WORKSPACE_BASE:-$HOME}/.cache/flashinfer" -name '*.so' \
        -newermt "@$START_TIME" -printf '%f ' 2>/dev/null)
    say "$1: FlashInfer modules compiled at run time: ${found:-none}"
}

# -- 3. jit ----------------------------------------------------------------------------------------
say "step 3/5 jit"
if skipped jit; then say "jit: skipped"; else
    # The small models of the gpu tests compile the same kernels as the benchmark's model.
    run jit "$OUT_DIR/jit.log" 240 "$PYTHON" benchmarks/gpu_decode.py --parts jit || STATUS=1
    (( DRY )) || jit_built jit
fi

# -- 4. tests --------------------------------------------------------------------------------------
say "step 4/5 tests"
if (( DRY )) && ! skipped tests && ! skipped gpu-tests; then
    # Collection needs no GPU: the gpu tests are there and would run.
    "$PYTHON" -m pytest -q -p no:cacheprovider --collect-only -m gpu "${GPU_TEST_FILES[@]}" \
        | tee -a "$SUMMARY" | tail -n 3
    (( PIPESTATUS[0] == 0 )) || { say "tests: collection failed"; STATUS=1; }
fi
if skipped tests || skipped gpu-tests; then say "gpu tests: skipped"; else
    run tests "$OUT_DIR/tests_gpu.log" 240 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu \
        -o addopts="-ra" "${GPU_TEST_FILES[@]}" || STATUS=1
fi
# The slow ones are a compile check that needs no GPU and an interpreter-sized graph test.
if skipped tests || skipped cuda-tests; then say "tests on CUDA tensors: skipped"; else
    run tests "$OUT_DIR/tests_cuda.log" 150 "$PYTHON" -m pytest -q -p no:cacheprovider \
        -m "not gpu and not slow" -o addopts="-ra" "${TEST_FILES[@]}" || STATUS=1
fi

# -- 5. bench --------------------------------------------------------------------------------------
say "step 5/5 bench"
if ! skipped bench; then
    # Token selection on the GPU against the row-by-row CPU loop it replaced (seconds); its
    # lines go to the summary (the device tool brings back at most 8 files).
    run bench "/tmp/npr_sampling.log" 90 "$PYTHON" benchmarks/sampling.py --device cuda \
        --rows 8,64 --repeats 3 || STATUS=1
    if (( ! DRY )); then cat /tmp/npr_sampling.log >>"$SUMMARY"; fi
fi
# The benchmark starts no run past BENCH_TIME; its hard stop (run's limit) comes up to 30 s later.
BENCH_TIME=$(( $(left) - 45 ))
(( BENCH_TIME < 20 )) && BENCH_TIME=20
# Dry, the benchmarks show they start (their --help), unless the budget leaves them no room.
if (( DRY )) && ! skipped bench && (( $(room) >= 10 )); then
    "$PYTHON" benchmarks/gpu_decode.py --help >/dev/null || { say "bench: --help failed"; STATUS=1; }
    "$PYTHON" benchmarks/sampling.py --help >/dev/null || { say "bench: --help failed"; STATUS=1; }
fi
if skipped bench; then say "bench: skipped"; else
    # The script stops starting new runs at its budget; the timeout is the hard stop.
    run bench "$OUT_DIR/bench.log" $(( BENCH_TIME + 30 )) "$PYTHON" benchmarks/gpu_decode.py \
        --time-budget "$BENCH_TIME" --out "$OUT_DIR" $BENCH_ARGS || STATUS=1
fi
if (( ! DRY )) && [[ -f "$OUT_DIR/gpu_decode.md" ]]; then cat "$OUT_DIR/gpu_decode.md"; fi

(( DRY )) || jit_built done
# A benchmark stopped while it rewrote a result leaves the new text beside it: not a result,
# and a ninth file (the device tool brings back at most 8).
rm -f "$OUT_DIR"/.*.partial
say "done: status $STATUS, $(( SECONDS - START ))s, results in $OUT_DIR"
exit $STATUS
