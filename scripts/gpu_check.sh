#!/usr/bin/env bash
# One-call GPU check for the CUDA target (run on a machine with an NVIDIA GPU and no network).
#
#   scripts/gpu_check.sh            # install (no downloads), tests/cuda, then the benchmark
#
# Needs python3 with torch (>= 2.11, CUDA build), cuda-bindings, the NVRTC wheel, jinja2,
# networkx, onnx and pytest already installed.  Everything it prints also lands in
# benchmarks/results/gpu_check_<stamp>.log, the benchmark tables in benchmarks/results/gpu_<stamp>.*
# (and all of it in $OUT when that variable is set).  Fits in 8 minutes: the tests get at most
# 240 s, the benchmark stops starting new measurements when its budget is spent.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%d_%H%M%S)
RES=benchmarks/results
mkdir -p "$RES"
LOG="$RES/gpu_check_${STAMP}.log"
# One kernel cache for the tests and the benchmark (kernels compiled once, in parallel).
export BWTA_CACHE_DIR=${BWTA_CACHE_DIR:-$(mktemp -d /tmp/bwta-gpu-check-cache.XXXXXX)}

main() {
  local t0 test_rc bench_rc budget
  t0=$(date +%s)
  echo "== bwta gpu_check $STAMP on $(hostname)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null \
    || echo "(nvidia-smi not available)"
  $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
  $PY -c "import cuda.bindings, importlib.metadata as m; print('cuda-bindings', cuda.bindings.__version__); print('nvrtc wheels', [d.metadata['Name'] + ' ' + d.version for d in m.distributions() if 'nvrtc' in (d.metadata['Name'] or '')])" 2>&1 | tail -2

  echo "== install (no downloads)"
  $PY -m pip install -q --no-deps --no-build-isolation -e . || echo "pip install -e failed; running from the source tree"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

  echo "== tests/cuda"
  timeout 240 $PY -m pytest -q -ra -p no:cacheprovider tests/cuda
  test_rc=$?
  echo "tests/cuda exit code: $test_rc (after $(( $(date +%s) - t0 ))s)"

  budget=$(( 430 - ($(date +%s) - t0) ))
  if [ "$budget" -lt 60 ]; then budget=60; fi
  echo "== benchmark (budget ${budget}s)"
  timeout $(( budget + 50 )) $PY benchmarks/bench_cuda.py --budget-s "$budget" --tune
  bench_rc=$?
  echo "bench exit code: $bench_rc; total $(( $(date +%s) - t0 ))s"
  if [ "$test_rc" -ne 0 ]; then return "$test_rc"; fi
  return "$bench_rc"
}

main 2>&1 | tee "$LOG"
RC=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then
  cp "$LOG" "$OUT/" 2>/dev/null || true
  cp "$RES"/gpu_*.json "$RES"/gpu_*.md "$RES"/cuda_select.json "$OUT/" 2>/dev/null || true
fi
exit "$RC"
