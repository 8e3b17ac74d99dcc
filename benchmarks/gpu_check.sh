#!/usr/bin/env bash
# One short, prepared run on a GPU machine (an H200 with torch, triton, timm, pybind11, cmake, ninja and
# pytest-benchmark, no internet): build, report the environment, run the cuda-marked tests, run the GPU quick
# benchmark suite, and leave logs and results under $OUT (or ./gpu_out). The whole run stays within
# GPU_CHECK_BUDGET seconds (default 540, under the device tool's 600 s per command): each stage gets a share, the
# benchmarks get what is left, and their results file is written after every op, so a cut-short run keeps
# what it measured.
#
#   bash benchmarks/gpu_check.sh            # everything
#   STAGES="build tests" bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STAGES="${STAGES:-build tests bench}"
BUDGET="${GPU_CHECK_BUDGET:-540}"
PY="${PYTHON:-python3}"
status=0
log() { printf '\n== %s (%ss)\n' "$*" "$SECONDS"; }
left() { local l=$((BUDGET - SECONDS)); echo $((l > 30 ? l : 30)); }
save_results() { cp benchmarks/results/gpu-*.json "$OUT/" 2>/dev/null || true; }

{
  log "environment"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -n 2 || true

  if [[ " $STAGES " == *" build "* ]]; then
    log "build (pip install --no-build-isolation --no-deps -e .)"
    if ! timeout 200 "$PY" -m pip install --no-build-isolation --no-deps -v -e . > "$OUT/build.log" 2>&1; then
      echo "BUILD FAILED (see build.log); building without CUDA so the Triton paths are still checked"
      tail -n 40 "$OUT/build.log"
      status=1
      CONMIM_SKIP_CUDA=1 timeout 120 "$PY" -m pip install --no-build-isolation --no-deps -e . \
        > "$OUT/build_nocuda.log" 2>&1 || echo "the CPU-only build failed too (see build_nocuda.log)"
    fi
    awk "/for 'sm_90'/{p=1} p{print} /Compile time/{p=0}" "$OUT/build.log" > "$OUT/ptxas_sm90.txt" || true
    "$PY" -m conmim.info
  fi

  if [[ " $STAGES " == *" tests "* ]]; then
    log "pytest -m cuda tests/test_cuda.py"
    timeout 200 "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml" \
      tests/test_cuda.py || status=1
  fi

  if [[ " $STAGES " == *" bench "* ]]; then
    log "benchmarks: GPU quick suite (loss, EMA, training step, data), $(left) s left"
    timeout "$(left)" "$PY" -m benchmarks --suite quick --device cuda --ops loss,ema,step,data || status=1
    save_results
  fi
  log "done, status $status"
  exit "$status"
} 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
