#!/usr/bin/env bash
# Issue 26's GPU measurements in one device call (one GPU). Stages (STAGES, comma-separated; default all but
# validate and serve):
#   tests     the FP8 and fused kernels' GPU tests (tests/unit/test_fp8.py, test_fp8_mode.py, test_fused.py;
#             TEST_OPTS: more pytest options, e.g. -k ws)
#   fp8       the per-GEMM benchmark (traces/fp8_bench.py; FP8_BENCH_OPTS) with its tile sweep
#   bench     the slice's prefill/decode per FP8 mode (traces/gpu_bench.py: CONFIGS, BATCHES; PROFILE_BATCHES
#             are profiled per GPU kernel), 128-token prompts (PROMPT) up to 128 x 128 = 16,384 tokens (the
#             serving loop's largest prefill chunk); REPEATS=N: N runs of the configurations in turn
#             (bench, bench-r2, ...: the call's spread)
#   launches  the slice's FP8 default at BATCHES once per grouped-expert launch in LAUNCHES (SPMD_FP8_GROUPED;
#             default tiles,experts; ws:256 is ws with SPMD_FP8_WS_COLUMNS=256; the default run of `bench` is tma)
#   groupm    the slice's FP8 default at BATCHES once per SPMD_FP8_GROUP_M in GROUP_MS (default 1,16; the
#             default 8 is `bench`'s run)
#   loops     the slice's FP8 default at BATCHES once per SPMD_FP8_TMA_LOOP in TMA_LOOPS (default defer; the
#             default inline is `bench`'s run)
#   fusedq    the slice's FP8 default at BATCHES with SPMD_FP8_FUSED_QUANT=0 (a quantization before each
#             FP8 x FP8 GEMM; `bench`'s run quantizes the MoE input once and silu * up in its own kernel)
#   validate  the validation matrix's slice rows on this GPU (G1; VALIDATE_WEIGHTS, default bf16,fp8: both
#             checkpoints need ~80 GB of disk, fp8 alone ~30 GB); VALIDATE_OPTS: more
#             program options; VALIDATE_ACT_QUANT=1: against the FP8-activation baseline (validation/act_quant.py;
#             fp32 arithmetic; on an 80 GB card over bf16-held weights: validation.baseline --lean);
#             VALIDATE_RECIPE=1: FP8 rows against the plain baseline by recipe-relative thresholds
#             (validation.matrix --recipe-relative)
#   ncu       Nsight Compute counters (HBM and L2 bytes, L2 hit rate, HBM and L2 utilization)
#             of the 4th launch of the grouped FP8 kernel (gate+up, 16,384 tokens), one run per fp8_bench
#             variant in NCU_VARIANTS (e.g. w8a8-tma,w8a8-ws); NCU_METRICS to change them
#   serve     the serving benchmark (traces/serve_bench.py; SERVE_BENCH_OPTS)
#   load      the loader's read rate of the FP8 slice, cold and warm (traces/load_bench.py; issue 28's I/O input)
#   bash launch/gpu_fp8.sh OUT_DIR
set -uo pipefail
out=${1:?usage: launch/gpu_fp8.sh OUT_DIR}
mkdir -p "$out"
# shellcheck source=launch/env.sh
. launch/env.sh
stages=",${STAGES:-tests,fp8,bench},"
GROUP_MS=${GROUP_MS:-1,16}
TMA_LOOPS=${TMA_LOOPS:-defer}
LAUNCHES=${LAUNCHES:-tiles,experts}
has() { [[ $stages == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
if has tests; then
  # shellcheck disable=SC2086  # TEST_OPTS is a list of options
  timeout "${TEST_S:-150}" python3 -m pytest -q --tb=short tests/unit/test_fp8.py tests/unit/test_fp8_mode.py \
    tests/unit/test_fused.py ${TEST_OPTS:-} > "$out/tests.log" 2>&1
  tail -8 "$out/tests.log"   # the whole log is kept in tests.log
fi
if has fp8; then
  # shellcheck disable=SC2086  # FP8_BENCH_OPTS is a list of options
  timeout "${FP8_BENCH_S:-240}" python3 -m traces.fp8_bench --out "$out/fp8" ${FP8_BENCH_OPTS:-} 2>&1 \
    | tee "$out/fp8.log" | tail -70
fi
bench() {  # bench OUT_SUBDIR WORK_SUBDIR [env...]: gpu_bench all over CONFIGS
  local sub=$1 work=$2
  shift 2
  rm -f "build/$work"/*.json   # gpu_bench keeps a configuration's finished result in its work dir: run afresh
  env "$@" timeout "${GPU_BENCH_S:-240}" python3 -m traces.gpu_bench all --out "$out/$sub" --work "build/$work" \
    --trace-batches "" --profile-batches "${PROFILE_BATCHES:-}" \
    --configs "${CONFIGS:-native-1gpu-fp8,native-1gpu-fp8-dequant,native-1gpu-fp8-bytes,native-1gpu-fp8-w8a16}" \
    --batches "${BATCHES:-1,32,128}" --prompt "${PROMPT:-128}" 2>&1 | tail -30
  mkdir -p "$out/$sub"
  cp "build/$work"/*.json "$out/$sub/" 2>/dev/null || true   # the configurations that finished
}
if has ncu; then   # hardware counters of the grouped kernels, one fp8_bench variant per run (16,384 tokens)
  for v in ${NCU_VARIANTS//,/ }; do
    timeout "${NCU_S:-150}" ncu --clock-control none --kernel-name regex:"_w8a8_(tma|ws)_kernel" --launch-skip 3 \
      --launch-count 1 --metrics "${NCU_METRICS:-gpu__time_duration.sum,dram__bytes_read.sum,lts__t_bytes.sum,lts__t_sector_hit_rate.pct,dram__throughput.avg.pct_of_peak_sustained_elapsed,lts__throughput.avg.pct_of_peak_sustained_elapsed}" \
      python3 -m traces.fp8_bench --only grouped --tokens 16384 --no-sweep --variants "$v" --out "$out/ncu-fp8" \
      > "$out/ncu-$v.txt" 2>&1
    grep -E "_kernel|gpu__time|dram__|lts__" "$out/ncu-$v.txt" | head -12
  done
fi
if has bench; then
  bench bench bench
  for ((i = 2; i <= ${REPEATS:-1}; i++)); do bench "bench-r$i" "bench-r$i"; done
fi
if has launches; then
  for g in ${LAUNCHES//,/ }; do   # LAUNCHES entry: a launch, or ws:COLUMNS (SPMD_FP8_WS_COLUMNS)
    cols=128
    [[ $g == *:* ]] && cols=${g#*:}
    CONFIGS=native-1gpu-fp8 bench "bench-${g/:/}" "bench-${g/:/}" SPMD_FP8_GROUPED="${g%%:*}" SPMD_FP8_WS_COLUMNS="$cols"
  done
fi
if has groupm; then
  for g in ${GROUP_MS//,/ }; do
    CONFIGS=native-1gpu-fp8 bench "bench-gm$g" "bench-gm$g" SPMD_FP8_GROUP_M="$g"
  done
fi
if has loops; then
  for l in ${TMA_LOOPS//,/ }; do
    CONFIGS=native-1gpu-fp8 bench "bench-loop-$l" "bench-loop-$l" SPMD_FP8_TMA_LOOP="$l"
  done
fi
if has fusedq; then
  CONFIGS=native-1gpu-fp8 bench bench-fq0 bench-fq0 SPMD_FP8_FUSED_QUANT=0
fi
if has validate; then
  timeout "${VALIDATE_S:-300}" python3 -m validation.matrix --device cuda --configs slice --max-gpus 1 \
    --engines native --layouts G1 --weights "${VALIDATE_WEIGHTS:-bf16,fp8}" --out "$out/validation" \
    --program-opts "${VALIDATE_OPTS:-}" ${VALIDATE_ACT_QUANT:+--act-quant} ${VALIDATE_RECIPE:+--recipe-relative} \
    2>&1 | tail -25
fi
if has serve; then
  # shellcheck disable=SC2086
  variant=()
  [[ -n ${SERVE_VARIANT:-} ]] && variant=(--variant "$SERVE_VARIANT")   # NAME=OPTIONS, one more continuous run
  # shellcheck disable=SC2086  # SERVE_BENCH_OPTS is a list of options
  timeout "${SERVE_S:-300}" python3 -m traces.serve_bench --device cuda --out "$out/serve" ${SERVE_BENCH_OPTS:-} \
    "${variant[@]}" 2>&1 | tail -30
fi
if has load; then
  timeout "${LOAD_S:-200}" python3 -m traces.load_bench --device cuda --repeats "${LOAD_REPEATS:-2}" --out "$out/load" 2>&1 | tail -12
fi
