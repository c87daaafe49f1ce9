# make run   : install if needed, write the tiny synthetic checkpoint, 2 MPI ranks on CPU (one model group
#              of 2: tensor + expert parallel), the 20 prompts
# make test  : install if needed; every test tier: unit, mpi (pytest-mpi on 1 and 2 ranks), e2e, cluster, gpu
# make test-quick: the unit and mpi tiers (in-process, a few minutes)
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CKPT ?= build/checkpoints
NP ?= 2
ENV := . launch/env.sh &&
MPIRUN := $(ENV) mpirun

.PHONY: install install-perf run test test-quick test-unit test-mpi test-launch checkpoints gpu-native gpu-bench gpu-serve-bench gpu-mla-bench gpu-fp8-bench fp8-sass gpu-comm-bench load-bench serve-bench-cpu bench baseline validate gpu-validate model plan scaling gpu-scaling paper container clean

install: $(STAMP)

# Pins live in requirements.txt. torch goes first and alone so pip takes the CPU build.
$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $$(grep -E '^torch==' requirements.txt)
	$(PY) -m pip install -q -r requirements.txt
	$(ENV) python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load(verbose=False)" >/dev/null
	touch $@

$(CKPT)/%-bf16/config.json: inputs/models/%.json spmd/weights/synth.py | $(STAMP)
	$(ENV) python -m spmd.weights.synth --config $< --out $(@D) --weights bf16 --seed 0 --overwrite

$(CKPT)/%-fp8/config.json: inputs/models/%.json spmd/weights/synth.py | $(STAMP)
	$(ENV) python -m spmd.weights.synth --config $< --out $(@D) --weights fp8 --seed 0 --overwrite

checkpoints: $(CKPT)/tiny-bf16/config.json $(CKPT)/tiny-fp8/config.json $(CKPT)/tiny-noqlora-bf16/config.json

run: $(STAMP) $(CKPT)/tiny-bf16/config.json
	$(MPIRUN) -n $(NP) python -m mpi4py -m spmd --checkpoint $(CKPT)/tiny-bf16 \
	  --prompts inputs/prompts/validation20.jsonl --output outputs/local.jsonl \
	  --trace-dir traces/runs/local --engine native --group-size 2 --dtype fp32 --max-new-tokens 32
	$(ENV) python -m traces.report traces/runs/local

test: test-quick test-launch

test-quick: test-unit test-mpi

# perf for launch/rank.sh PROFILE=perf (Debian's linux-perf; CI runs as root); quiet when perf is already there
install-perf:
	@command -v perf >/dev/null 2>&1 || { $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq linux-perf >/dev/null; }
	@perf stat -e task-clock true >/dev/null 2>&1 || echo "install-perf: perf cannot count here (perf_event_paranoid?)"

# Timer overhead vs a decode step of the tiny native engine (CPU here); writes traces/results/bench/timers-*.json
bench: $(STAMP) $(CKPT)/tiny-bf16/config.json
	$(ENV) python -m traces.bench_timers --checkpoint $(CKPT)/tiny-bf16 --out traces/results/bench

PYTEST := $(ENV) SPMD_CKPT=$(abspath $(CKPT)) python -m pytest -q --durations=15

# tests/unit: in-process, one process
test-unit: $(STAMP) checkpoints install-perf
	$(PYTEST) tests/unit

# tests/e2e (the real program under mpirun), tests/cluster (Slurm: skipped unless SPMD_SLURM_TEST=1),
# tests/gpu (skipped without CUDA)
test-launch: $(STAMP) checkpoints install-perf
	$(PYTEST) tests/e2e tests/cluster tests/gpu

test-mpi: $(STAMP) checkpoints
	$(MPIRUN) -n 1 env SPMD_CKPT=$(abspath $(CKPT)) python -m pytest -q -p no:cacheprovider --with-mpi -m mpi tests/mpi
	$(MPIRUN) -n 2 env SPMD_CKPT=$(abspath $(CKPT)) python -m pytest -q -p no:cacheprovider --with-mpi -m mpi tests/mpi

# One fp32 transformers baseline per tiny checkpoint (validation/results/baselines/NAME.jsonl), remade when it changes
BASELINES := validation/results/baselines
$(BASELINES)/%.jsonl: $(CKPT)/%/config.json validation/baseline.py | $(STAMP)
	$(ENV) python -m validation.baseline --checkpoint $(CKPT)/$* --prompts inputs/prompts/validation20.jsonl \
	  --out $@ --max-new-tokens 32 --top-k 8 --dtype fp32 --device cpu

baseline: $(BASELINES)/tiny-bf16.jsonl $(BASELINES)/tiny-fp8.jsonl

# Engines x layouts x dtypes x weights on CPU, scored against the baselines: validation/results/<machine>-<date>.md
validate: $(STAMP) baseline
	$(ENV) python -m validation.matrix --device cpu --configs tiny,tiny-noqlora --ckpt-root $(CKPT) --baselines $(BASELINES)

# On a GPU machine (python3 with the stack, no .venv): the matrix for native, bf16 compute, tiny + slice,
# bf16 + fp8 weights, 1-2 GPUs; adds to validation/results/<gpu>-<date>.md
gpu-validate:
	. launch/env.sh && python3 -m validation.matrix --device cuda --configs tiny,slice --max-gpus 2 --engines native --merge

# On a GPU machine with the project's stack in its python3 (no .venv there): native vs transformers,
# 1 and 2 GPUs, tiny and full-width slice checkpoints; writes traces/results/gpu/native-<gpu>-<date>.json
gpu-native:
	. launch/env.sh && python3 -m validation.gpu_native --configs tiny,slice --max-gpus 2 --out traces/results/gpu

# Same machine kind: ceilings, then the slice per engine and batch size vs the floor (traces/results/bench/<gpu>-<date>.json)
gpu-bench:
	bash launch/deepspeed_site.sh build/site || echo "gpu-bench: DeepSpeed not installed (.whl/ missing?): its row will hold the error"
	. launch/env.sh && PYTHONPATH=$$PWD/build/site:$$PYTHONPATH python3 -m traces.gpu_bench all --out traces/results/bench

# Same machine kind, 1 GPU, the FP8 slice (written if missing): a chat-like workload (traces/workload.py) through
# the program as static batches of 8, static at 64/128/256, continuous batching, + the long-prompt check;
# traces/results/serve/<gpu>-<date>.{json,md}. Options: SERVE_BENCH_OPTS (e.g. --prompts 128)
gpu-serve-bench:
	. launch/env.sh && python3 -m traces.serve_bench --device cuda --long $(SERVE_BENCH_OPTS)

# MLA decode attention of one layer: torch's padded form vs the varlen kernel's tiles, chat and long row
# lengths, against the bytes floor (traces/results/mla/<gpu>-<date>.{json,md}; about 1 minute)
gpu-mla-bench:
	. launch/env.sh && python3 -m traces.mla_bench $(MLA_BENCH_OPTS)

# DeepSeek-V3's FP8 GEMMs one by one: bf16 (dequantized) vs weight-only FP8 (hw and Ampere byte decoding) vs
# FP8 x FP8 (Triton, torch._scaled_mm), rows 1-16384, against the bf16/FP8 matmul ceilings and the weight-bytes
# floor, with each one's error; w8a8 tile sweep (traces/results/fp8/<gpu>-<date>.{json,md}; about 3 minutes)
gpu-fp8-bench:
	. launch/env.sh && python3 -m traces.fp8_bench $(FP8_BENCH_OPTS)

# What the grouped FP8 x FP8 kernel's k loop compiles to on sm_90 (Triton's ptxas and nvdisasm; no GPU needed):
# its wgmmas, the waits before the promotion, CTA-wide barriers, spills (SASS and a summary in FP8_SASS_OUT);
# FP8_SASS_KERNEL=ws: the warp-specialized Gluon kernel (tiles 128x128x4xSLOTS or 128x256x4xSLOTS)
FP8_SASS_OUT ?= build/fp8-sass
FP8_SASS_KERNEL ?= tma
FP8_SASS_LOOPS ?= inline,defer
FP8_SASS_TILES ?= 128x128x8x4
fp8-sass:
	. launch/env.sh && python3 -m traces.fp8_sass --kernel $(FP8_SASS_KERNEL) --loop $(FP8_SASS_LOOPS) \
	  --tile $(FP8_SASS_TILES) --out $(FP8_SASS_OUT)

# The loader's read rate, cold and warm page cache, against the raw file read (one process; the proposal's I/O
# estimate): on a GPU machine the FP8 slice to the GPU, here DEVICE=cpu with CKPT_DIR (traces/results/load/)
load-bench:
	. launch/env.sh && python3 -m traces.load_bench --device $(or $(DEVICE),cuda) $(if $(CKPT_DIR),--checkpoint $(CKPT_DIR)) $(LOAD_BENCH_OPTS)

# The two group layouts' MoE collectives on GPUS GPUs of one host (default 2): dpa's all-to-all with routed
# uneven splits vs tp's all-reduce, decode and prefill sizes, in and out of CUDA graphs (traces/results/comm/)
GPUS ?= 2
gpu-comm-bench:
	. launch/env.sh && mpirun -n $(GPUS) python3 -m mpi4py -m traces.comm_bench $(COMM_BENCH_OPTS)

# Its CPU smoke run: the tiny checkpoint, 24 short requests, static 8 and 24, continuous, long prompts (< 1 min)
serve-bench-cpu: $(STAMP) $(CKPT)/tiny-bf16/config.json
	$(ENV) python -m traces.serve_bench --device cpu --long --checkpoint $(CKPT)/tiny-bf16 $(SERVE_BENCH_OPTS)

# The decode performance model: fits to the stored slice measurements, the 2-GPU validation, the
# projection of DeepSeek-V3.1 FP8 to 1-3 nodes of 8 GPUs, both group layouts (tp, dpa) on 1-8 nodes of 4 and
# of 8 GPUs (traces/results/model/model-<gpu>.md and .json)
model: $(STAMP)
	$(ENV) python -m traces.model

# The layout planner: which tp/dpa layouts of DeepSeek-V3.1 fit these GPUs and their predicted decode speed
# (pure Python, no install needed). PLAN_OPTS, e.g. PLAN_OPTS="--gpu-mem 64 --gpus-per-node 4 --hbm 1.6"
PLAN_OPTS ?= --gpu-mem 80 --gpus-per-node 8
plan:
	. launch/env.sh && python3 -m spmd.plan --config inputs/models/v3.1-671b.json $(PLAN_OPTS)

# CPU scaling of the tiny model at 1, 2, 4 ranks: model-group, replica and orchestration series
# (traces/results/scaling/cpu-<host>-<date>.*)
scaling: $(STAMP) checkpoints
	$(ENV) python -m traces.sweep --checkpoint $(CKPT)/tiny-bf16

# On a machine with 1-4 GPUs (python3 with the stack): the FP8 slice at 1, 2, 4 GPUs in every layout that
# fits, inline vs dedicated orchestrator, 2,000 prompts (traces/results/scaling/gpu-<gpu>-<date>.*). A subset:
# LAYOUTS=G1,G2; added to an earlier call's file: MERGE=--merge; elsewhere: SCALING_OUT=dir
GPU_SLICE := build/checkpoints/slice-fp8
SCALING_OUT ?= traces/results/scaling
gpu-scaling:
	test -f $(GPU_SLICE)/config.json || python3 -m spmd.weights.synth --config inputs/models/slice.json --out $(GPU_SLICE) \
	  --weights fp8 --seed 0 --device cuda
	. launch/env.sh && python3 -m traces.sweep --device cuda --checkpoint $(GPU_SLICE) --prompts 2000 \
	  --batch-size 32 --dispatch-size 64 --new-tokens 16 --warmup 256 --out $(SCALING_OUT) $(if $(LAYOUTS),--layouts $(LAYOUTS)) $(MERGE)

# The short paper and the EuroHPC proposal, every number from the stored result files: build/docs/{paper,proposal}.pdf
paper: $(STAMP)
	$(ENV) python -m docs.build --out build/docs

# Apptainer image (apptainer/deepseek.def: CUDA + PyTorch base, InfiniBand user space, these pins); only
# where apptainer is installed (a cluster's login node). Not built on the development machines.
SIF ?= build/deepseek.sif
container:
	@command -v apptainer >/dev/null || { echo "make container: apptainer is not installed here; on a machine" \
	  "that has it (a cluster login node) run: apptainer build $(SIF) apptainer/deepseek.def" >&2; exit 1; }
	mkdir -p $(dir $(SIF))
	apptainer build $(APPTAINER_BUILD_OPTS) $(SIF) apptainer/deepseek.def

clean:
	rm -rf build outputs traces/runs .pytest_cache
