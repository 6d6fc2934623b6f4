#!/usr/bin/env bash
# One-call GPU check for the CUDA target (run on a machine with an NVIDIA GPU and no network).
#
#   scripts/gpu_check.sh            # install (no downloads), tests/cuda, then the benchmark
#
# Needs python3 with torch (>= 2.11, CUDA build), cuda-bindings, the NVRTC wheel, jinja2,
# networkx, onnx and pytest already installed.  Everything it prints also lands in
# benchmarks/results/ (and in $OUT when that variable is set).  Fits in 8 minutes: the tests get
# at most 240 s, the benchmark stops starting new measurements after --budget-s.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
PY=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%d_%H%M%S)
RES=benchmarks/results
mkdir -p "$RES"
LOG="$RES/gpu_check_${STAMP}.log"
exec > >(tee "$LOG") 2>&1

echo "== bwta gpu_check $STAMP on $(hostname)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "(nvidia-smi not available)"
$PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"

echo "== install (no downloads)"
$PY -m pip install -q --no-deps --no-build-isolation -e . || echo "pip install -e failed; running from the source tree"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== tests/cuda"
timeout 240 $PY -m pytest -q -ra -p no:cacheprovider tests/cuda
TEST_RC=$?
echo "tests/cuda exit code: $TEST_RC"

ELAPSED=$(( $(date +%s) - T0 ))
BUDGET=$(( 440 - ELAPSED ))
if [ "$BUDGET" -lt 60 ]; then BUDGET=60; fi
echo "== benchmark (budget ${BUDGET}s)"
timeout $(( BUDGET + 60 )) $PY benchmarks/bench_cuda.py --budget-s "$BUDGET" --tune
BENCH_RC=$?
echo "bench exit code: $BENCH_RC; total $(( $(date +%s) - T0 ))s"

if [ -n "${OUT:-}" ]; then
  cp "$LOG" "$OUT/" 2>/dev/null || true
  cp "$RES"/gpu_*.json "$RES"/gpu_*.md "$RES"/cuda_select.json "$OUT/" 2>/dev/null || true
fi
exit $(( TEST_RC != 0 ? TEST_RC : BENCH_RC ))
