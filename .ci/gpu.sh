#!/usr/bin/env bash
# `make gpu`: on a GPU machine with CUDA torch, nvcc and no package registry. Uses the system
# python (keeps its CUDA torch), builds moe._C with the CUDA kernels in place, runs the CUDA
# tests, then the GPU benchmarks; every table lands in $GPU_OUT (default bench_out/gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${GPU_OUT:-bench_out/gpu}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME CMD...: run, tee the log, remember failures, go on
  local name=$1
  shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "=== $name FAILED (rc $rc)"; status=1; }
}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'make gpu needs a CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
step build "$PY" -m pip install -q --no-build-isolation --no-deps -e .
step tests "$PY" -m pytest -q -x -p no:cacheprovider -m "gpu" tests
step grouped_gemm "$PY" benchmarks/grouped_gemm.py --csv
step moe_layer "$PY" benchmarks/moe_layer.py --device cuda --dtype bfloat16 --config both --csv
[ -f benchmarks/cuda_ops.py ] && step cuda_ops "$PY" benchmarks/cuda_ops.py
[ -f benchmarks/offload_decode.py ] && step offload_decode "$PY" benchmarks/offload_decode.py --device cuda --csv
cp bench_out/*.csv "$OUT_DIR"/ 2>/dev/null
echo "=== logs and tables in $OUT_DIR (status $status)"
exit $status
