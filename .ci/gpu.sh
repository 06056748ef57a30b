#!/usr/bin/env bash
# `make gpu`: on a GPU machine with CUDA torch, nvcc and no package registry. Uses the system
# python (keeps its CUDA torch), builds moe._C with the CUDA kernels in place, runs the CUDA
# tests, then the GPU benchmarks. Everything lands in $GPU_OUT (default bench_out/gpu): one log,
# gpu.log, and the benchmark CSVs, i.e. at most 8 files (with two offload_decode
# CSVs and their routing traces) (a lent device machine returns 8 files of
# its $OUT: run `GPU_OUT=$OUT make gpu` there).
#
# Device time is scarce, so the steps run most-wanted first (build, tests, offload decode, grouped
# GEMM, layer, index ops), each under `timeout`, and a step that cannot finish before
# GPU_DEADLINE_S (default 540 s, inside a 600 s call) is skipped, so the results of the steps
# before it always come back.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${GPU_OUT:-bench_out/gpu}
DEADLINE=${GPU_DEADLINE_S:-540}
mkdir -p "$OUT_DIR" bench_out
LOG="$OUT_DIR/gpu.log"
: >"$LOG"
export PYTHONUNBUFFERED=1
# ninja compiles the extension's sources in parallel; one arch (Hopper unless told) keeps nvcc short.
export MAX_JOBS=${MAX_JOBS:-$(nproc)} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
START=$SECONDS
status=0
STEPS=${GPU_STEPS:-all}  # e.g. GPU_STEPS="build tests moe_layer cuda_ops": only these steps run
step() {  # step NAME MIN_S MAX_S CMD...: run under timeout if MIN_S still fit; log; remember failures
  local name=$1 need=$2 cap=$3
  shift 3
  if [ "$STEPS" != all ] && [[ " $STEPS " != *" $name "* ]]; then
    echo "=== $name not in GPU_STEPS" | tee -a "$LOG"
    return 1
  fi
  local left=$((DEADLINE - (SECONDS - START)))
  if [ "$left" -lt "$need" ]; then
    echo "=== $name SKIPPED: ${left}s left of ${DEADLINE}s, needs ~${need}s" | tee -a "$LOG"
    status=1
    return 1
  fi
  [ "$cap" -lt "$left" ] || cap=$left
  echo "=== $name (t=$((SECONDS - START))s, limit ${cap}s): $*" | tee -a "$LOG"
  timeout "$cap" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "=== $name FAILED (rc $rc; 124 = timed out)" | tee -a "$LOG"; status=1; }
  return "$rc"  # a skipped, failed or cut-off step copies no table (`step ... && csv ...`)
}
csv() {  # csv NAME: the step's table, if it wrote one, into OUT_DIR
  [ -f "bench_out/$1" ] && cp "bench_out/$1" "$OUT_DIR"/
  return 0
}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'make gpu needs a CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
"$PY" -c "import importlib.metadata as m; print(*(f'{p} {m.version(p)}' for p in ('torch', 'triton', 'transformers')))" 2>&1 | tee -a "$LOG"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$LOG"
# pytest-xdist (if there) runs the test files in parallel on the one GPU (Triton compiles dominate);
# a crashing test must not respawn workers for minutes, and -v keeps every test's name and outcome
# in the log even when the step is cut off. pytest-timeout (if there) stops a hung test.
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 6 --dist loadfile --max-worker-restart 2")
PT_TIMEOUT=$("$PY" -c "import pytest_timeout" 2>/dev/null && echo "--timeout 90")
rm -f bench_out/{offload_decode,grouped_gemm,moe_layer_gpu,cuda_ops}.csv  # no stale tables
step build 60 240 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
# Which libstdc++ the extension uses: the 2026-12-04 H200 build crashed formatting an int64 inside
# its own copy of std::ostream::_M_insert<long> (csrc/common.h); this shows whether it still has one.
step so_check 1 20 bash -c 'so=$(ls moe/_C*.so) && ldd "$so" | grep -E "stdc|gcc_s"; \
  echo "ostream inserters defined in $so: $(nm -C --defined-only "$so" | grep -c "std::ostream::_M_insert")"'
step tests 30 180 "$PY" -m pytest -v -rfE --maxfail=20 -p no:cacheprovider $XDIST $PT_TIMEOUT -m gpu tests
MODEL_DIR=$(mktemp -d)/random-mixtral  # built once, reused by the second decode run
step offload_decode 60 200 "$PY" benchmarks/offload_decode.py --device cuda --csv --model-dir "$MODEL_DIR" \
  --trace-out "$OUT_DIR/offload_decode_trace.safetensors" && csv offload_decode.csv
step grouped_gemm 30 120 "$PY" benchmarks/grouped_gemm.py --csv && csv grouped_gemm.csv
step moe_layer 30 120 "$PY" benchmarks/moe_layer.py --device cuda --dtype bfloat16 --config both \
  --csv bench_out/moe_layer_gpu.csv --png "" && csv moe_layer_gpu.csv
step cuda_ops 20 60 "$PY" benchmarks/cuda_ops.py --csv && csv cuda_ops.csv
# A second operating point (half the experts cached) for checking the offload timeline model offline.
step offload_decode_half 40 90 "$PY" benchmarks/offload_decode.py --device cuda --csv --model-dir "$MODEL_DIR" \
  --cache-frac 0.5 --tokens 32 --repeats 2 --policies lru predictive \
  --trace-out "$OUT_DIR/offload_decode_half_trace.safetensors" && cp bench_out/offload_decode.csv "$OUT_DIR/offload_decode_half.csv"
echo "=== done in $((SECONDS - START))s; gpu.log and CSVs in $OUT_DIR (status $status)" | tee -a "$LOG"
exit $status
