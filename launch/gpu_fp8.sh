#!/usr/bin/env bash
# Issue 26's GPU measurements in one device call (one GPU): the FP8 kernels' GPU tests, the per-GEMM
# benchmark (traces/fp8_bench.py) and the slice's prefill/decode per FP8 mode (traces/gpu_bench.py:
# w8a8 default, weight-only w8a16, the Ampere byte path forced, dequantized bf16), batches of 128-token
# prompts up to 128 x 128 = 16,384 tokens (the serving loop's largest prefill chunk).
#   bash launch/gpu_fp8.sh OUT_DIR
set -uo pipefail
out=${1:?usage: launch/gpu_fp8.sh OUT_DIR}
mkdir -p "$out"
# shellcheck source=launch/env.sh
. launch/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
timeout "${TEST_S:-100}" python3 -m pytest -q tests/unit/test_fp8.py tests/unit/test_fp8_mode.py 2>&1 | tail -5 | tee "$out/tests.txt"
# shellcheck disable=SC2086  # FP8_BENCH_OPTS is a list of options
timeout "${FP8_BENCH_S:-240}" python3 -m traces.fp8_bench --out "$out/fp8" ${FP8_BENCH_OPTS:-} 2>&1 | tail -60
timeout "${GPU_BENCH_S:-240}" python3 -m traces.gpu_bench all --out "$out/bench" --trace-batches "" \
  --configs "${CONFIGS:-native-1gpu-fp8,native-1gpu-fp8-dequant,native-1gpu-fp8-bytes,native-1gpu-fp8-w8a16}" \
  --batches "${BATCHES:-1,32,128}" 2>&1 | tail -30
cp build/bench/*.json "$out/bench/" 2>/dev/null || true   # the configurations that finished, if the driver did not
