#!/usr/bin/env bash
# The GPU check: one short run on a lent H100/H200 (torch, triton, pybind11, cmake, ninja; no internet), sized for
# GPU_CHECK_BUDGET seconds (default 420, the whole run including the extension build). Stages, in order, each
# under its own time cap (never more than the time left), each writing to $OUT (default ./gpu_out) as it ends:
#   preflight  torch, triton, nvcc, Python headers, GPU name                    -> preflight.log
#   build      the extension (setup.py build_ext --inplace), in the background  -> build.log, build.rc
#   triton     smoke: ConMIM shapes on the Triton kernels vs float64, timings   -> smoke_triton.json (per case)
#   cuda       the same smoke on the CUDA kernels (waits for the build)         -> smoke_cuda.json (per case)
#   sanitize   compute-sanitizer memcheck and racecheck, one small case per CUDA kernel -> sanitize_*.log
#   tests      pytest -m cuda, per-test timeout, tracebacks and JUnit as it goes -> cuda_tests.{jsonl,xml}
#   step       the ViT-B training step: images/s and fraction of the matmul peak vs the official formulation
# stages.jsonl gets one line per stage (name, cap, seconds, rc) as each ends; summary.txt at the end.
# Expected run time of each stage: docs/gpu-check.md.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run   # on a CPU: every stage's plumbing with CPU stand-ins (CI runs it)
#   STAGES="preflight triton" bash benchmarks/gpu_check.sh
# Caps are overridable one by one: CAP_TRITON=200 ... (seconds).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
: > "$OUT/stages.jsonl"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-420}"
STAGES="${STAGES:-preflight build triton cuda sanitize tests step}"
START=$SECONDS
status=0

CAP_PREFLIGHT="${CAP_PREFLIGHT:-30}"
CAP_BUILD="${CAP_BUILD:-240}"
CAP_TRITON="${CAP_TRITON:-150}"
CAP_CUDA="${CAP_CUDA:-60}"
CAP_SANITIZE="${CAP_SANITIZE:-75}"
CAP_TESTS="${CAP_TESTS:-150}"
CAP_STEP="${CAP_STEP:-75}"
TEST_TIMEOUT="${TEST_TIMEOUT:-45}"

left() { echo $((BUDGET - (SECONDS - START))); }
# cap DEFAULT [RESERVE]: a stage's cap, never past the budget less RESERVE seconds kept for later stages
cap() {
  local c=$1 l=$(($(left) - ${2:-0}))
  ((l < c)) && c=$l
  ((c < 1)) && c=1
  echo "$c"
}
want() { [[ " $STAGES " == *" $1 "* ]]; }
# reserve NAME...: the caps of those stages that will run, kept back while an earlier stage runs
reserve() {
  local sum=0 n v
  for n in "$@"; do
    v="CAP_${n^^}"
    want "$n" && sum=$((sum + ${!v}))
  done
  echo "$sum"
}
record() {  # name cap seconds rc
  printf '{"stage": "%s", "cap_s": %s, "seconds": %s, "rc": %s, "left_s": %s, "dry_run": %s}\n' \
    "$1" "$2" "$3" "$4" "$(left)" "$([[ $DRY == 1 ]] && echo true || echo false)" >> "$OUT/stages.jsonl"
  printf '== %-9s rc %-3s %4ss of a %4ss cap; %4ss of the budget left\n' "$1" "$4" "$3" "$2" "$(left)" \
    | tee -a "$OUT/summary.txt"
  [[ "$4" == 0 ]] || status=1
}
# stage NAME CAP COMMAND...: runs COMMAND under `timeout CAP` with its output in $OUT/NAME.log
stage() {
  local name=$1 c=$2 t0=$SECONDS rc
  shift 2
  # the dry run's proof that a cap stops a stage and the run goes on: DRY_HANG=NAME makes that stage hang
  [[ $DRY == 1 && "${DRY_HANG:-}" == "$name" ]] && set -- sleep 600
  echo "-- $name (cap ${c}s): $*" >> "$OUT/summary.txt"
  timeout --kill-after=5 "$c" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  record "$name" "$c" $((SECONDS - t0)) "$rc"
  tail -n 5 "$OUT/$name.log"
}
: > "$OUT/summary.txt"

# conmim.kernels is kernels/ (setup.py's package_dir); without an install a link makes it importable
LINKED=0
if [[ ! -e conmim/kernels ]]; then
  ln -s ../kernels conmim/kernels && LINKED=1
fi
cleanup() { [[ $LINKED == 1 ]] && rm -f conmim/kernels; }
trap cleanup EXIT

if [[ $DRY == 1 ]]; then
  export TRITON_INTERPRET=1
  SMOKE_FLAGS=(--dry-run)
  BUILD_CMD=("$PY" -c "print('dry run: python setup.py build_ext --inplace would run here')")
  TEST_SELECTION=(tests/test_cuda.py)  # no GPU: every case skips, which exercises the plugin and the JUnit file
  STEP_CMD=("$PY" -m benchmarks --help)
else
  SMOKE_FLAGS=()
  BUILD_CMD=(env CONMIM_BUILD_DIR="$PWD/build/cmake" "$PY" setup.py build_ext --inplace)
  TEST_SELECTION=(tests/test_cuda.py)
  STEP_CMD=("$PY" -m benchmarks --suite quick --device cuda --ops step --no-compile)
fi

if want preflight; then
  stage preflight "$(cap "$CAP_PREFLIGHT")" bash -c "
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || echo 'no nvidia-smi'
    command -v nvcc && nvcc --version | tail -n 2 || echo 'no nvcc: the CUDA kernels will not build'
    command -v compute-sanitizer || echo 'no compute-sanitizer'
    $PY -c 'import sysconfig, os; h = sysconfig.get_paths()[\"include\"]; print(\"Python headers\", h, os.path.isfile(h + \"/Python.h\"))'
    $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__); print(\"gpu\", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
  "
fi

BUILD_PID=""
BUILD_T0=$SECONDS
BUILD_CAP=0
if want build; then
  BUILD_CAP=$(cap "$CAP_BUILD")
  echo "-- build (cap ${BUILD_CAP}s, in the background): ${BUILD_CMD[*]}" >> "$OUT/summary.txt"
  (timeout --kill-after=5 "$BUILD_CAP" "${BUILD_CMD[@]}" > "$OUT/build.log" 2>&1; echo $? > "$OUT/build.rc") &
  BUILD_PID=$!
fi
wait_build() {
  [[ -n "$BUILD_PID" ]] || return 0
  wait "$BUILD_PID"
  BUILD_PID=""
  record build "$BUILD_CAP" $((SECONDS - BUILD_T0)) "$(cat "$OUT/build.rc" 2>/dev/null || echo 1)"
  awk "/for 'sm_90'/{p=1} p{print} /Compile time/{p=0}" "$OUT/build.log" > "$OUT/ptxas_sm90.txt" || true
  tail -n 5 "$OUT/build.log"
  "$PY" -m conmim.info > "$OUT/info.log" 2>&1 || true
}

# the cuda, sanitize and step stages keep their caps in reserve while earlier stages run
if want triton; then
  stage triton "$(cap "$CAP_TRITON" "$(reserve cuda sanitize step)")" \
    "$PY" -m benchmarks.gpu_smoke loss --backend triton --out "$OUT/smoke_triton.json" "${SMOKE_FLAGS[@]}"
fi
wait_build

if want cuda; then
  stage cuda "$(cap "$CAP_CUDA" "$(reserve sanitize step)")" \
    "$PY" -m benchmarks.gpu_smoke loss --backend cuda --out "$OUT/smoke_cuda.json" "${SMOKE_FLAGS[@]}"
fi

if want sanitize; then
  c=$(cap "$CAP_SANITIZE" "$(reserve step)")
  if [[ $DRY == 1 ]] || ! command -v compute-sanitizer > /dev/null; then
    # no sanitizer here: the cases still run, unsanitized, so the stage's own code is exercised
    stage sanitize "$c" "$PY" -m benchmarks.gpu_smoke sanitize --backend cuda "${SMOKE_FLAGS[@]}"
  else
    stage sanitize "$c" bash -c "
      compute-sanitizer --tool memcheck --error-exitcode 3 $PY -m benchmarks.gpu_smoke sanitize --backend cuda \
        > '$OUT/sanitize_memcheck.log' 2>&1; m=\$?
      compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 4 \
        $PY -m benchmarks.gpu_smoke sanitize --backend cuda > '$OUT/sanitize_racecheck.log' 2>&1; r=\$?
      echo memcheck rc \$m racecheck rc \$r; tail -n 3 '$OUT/sanitize_memcheck.log' '$OUT/sanitize_racecheck.log'
      exit \$((m > r ? m : r))"
  fi
fi

if want tests; then
  stage tests "$(cap "$CAP_TESTS" "$(reserve step)")" "$PY" -m pytest -m cuda -v -rs -p no:cacheprovider \
    -p benchmarks.live_report --live-out "$OUT/cuda_tests" --test-timeout "$TEST_TIMEOUT" "${TEST_SELECTION[@]}"
fi

if want step; then
  stage step "$(cap "$CAP_STEP")" "${STEP_CMD[@]}"
  cp benchmarks/results/gpu-*.json "$OUT/" 2>/dev/null || true
fi

echo "status $status after $((SECONDS - START))s of a ${BUDGET}s budget" | tee -a "$OUT/summary.txt"
exit "$status"
