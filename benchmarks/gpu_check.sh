#!/usr/bin/env bash
# One short, prepared run on a GPU machine (an H200 with torch, triton, timm, pybind11, cmake, ninja and
# pytest-benchmark, no internet): build, report the environment, run the cuda-marked tests, run the GPU quick
# benchmark suite, and leave logs and results under $OUT (or ./gpu_out). Budget: well under 8 minutes.
#
#   bash benchmarks/gpu_check.sh            # everything
#   STAGES="build tests" bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STAGES="${STAGES:-build tests bench}"
PY="${PYTHON:-python3}"
status=0
log() { printf '\n== %s (%ss)\n' "$*" "$SECONDS"; }

{
  log "environment"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -n 2 || true

  if [[ " $STAGES " == *" build "* ]]; then
    log "build (pip install --no-build-isolation --no-deps -e .)"
    if ! "$PY" -m pip install --no-build-isolation --no-deps -v -e . > "$OUT/build.log" 2>&1; then
      echo "BUILD FAILED (see build.log)"; tail -n 40 "$OUT/build.log"; status=1
    fi
    awk "/for 'sm_90'/{p=1} p{print} /Compile time/{p=0}" "$OUT/build.log" > "$OUT/ptxas_sm90.txt" || true
    "$PY" -m conmim.info
  fi

  if [[ " $STAGES " == *" tests "* ]]; then
    log "pytest -m cuda"
    timeout 300 "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml" tests/ || status=1
  fi

  if [[ " $STAGES " == *" bench "* ]]; then
    log "benchmarks: GPU quick suite (loss, EMA)"
    if timeout 240 "$PY" -m benchmarks --suite quick --device cuda; then
      cp benchmarks/results/gpu-*.json "$OUT/" 2>/dev/null || true
    else
      status=1
    fi
  fi
  log "done, status $status"
  exit "$status"
} 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
