# make run   : install if needed, write the tiny synthetic checkpoint, 2 MPI ranks on CPU (one model group
#              of 2: tensor + expert parallel), the 20 prompts
# make test  : install if needed; serial tests, then pytest-mpi on 1 and 2 ranks
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CKPT ?= build/checkpoints
NP ?= 2
ENV := . launch/env.sh &&
MPIRUN := $(ENV) mpirun

.PHONY: install run test test-serial test-mpi checkpoints gpu-native gpu-bench clean

install: $(STAMP)

# Pins live in requirements.txt. torch goes first and alone so pip takes the CPU build.
$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $$(grep -E '^torch==' requirements.txt)
	$(PY) -m pip install -q -r requirements.txt
	$(ENV) python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load(verbose=False)" >/dev/null
	touch $@

$(CKPT)/%-bf16/config.json: inputs/models/%.json spmd/synth.py | $(STAMP)
	$(ENV) python -m spmd.synth --config $< --out $(@D) --weights bf16 --seed 0 --overwrite

$(CKPT)/%-fp8/config.json: inputs/models/%.json spmd/synth.py | $(STAMP)
	$(ENV) python -m spmd.synth --config $< --out $(@D) --weights fp8 --seed 0 --overwrite

checkpoints: $(CKPT)/tiny-bf16/config.json $(CKPT)/tiny-fp8/config.json $(CKPT)/tiny-noqlora-bf16/config.json

run: $(STAMP) $(CKPT)/tiny-bf16/config.json
	$(MPIRUN) -n $(NP) python -m mpi4py -m spmd --checkpoint $(CKPT)/tiny-bf16 \
	  --prompts inputs/prompts/validation20.jsonl --output outputs/local.jsonl \
	  --trace-dir traces/runs/local --engine native --group-size 2 --dtype fp32 --max-new-tokens 32
	$(ENV) python -m traces.report traces/runs/local

test: $(STAMP) checkpoints test-serial test-mpi

test-serial: $(STAMP) checkpoints
	$(ENV) SPMD_CKPT=$(abspath $(CKPT)) python -m pytest -q tests

test-mpi: $(STAMP) checkpoints
	$(MPIRUN) -n 1 env SPMD_CKPT=$(abspath $(CKPT)) python -m pytest -q -p no:cacheprovider --with-mpi -m mpi tests
	$(MPIRUN) -n 2 env SPMD_CKPT=$(abspath $(CKPT)) python -m pytest -q -p no:cacheprovider --with-mpi -m mpi tests

# On a GPU machine with the project's stack in its python3 (no .venv there): native vs transformers,
# 1 and 2 GPUs, tiny and full-width slice checkpoints; writes traces/gpu/native-<gpu>-<date>.json
gpu-native:
	. launch/env.sh && python3 -m validation.gpu_native --configs tiny,slice --max-gpus 2 --out traces/gpu

# Same machine kind: ceilings, then the slice per engine and batch size vs the floor (traces/bench/<gpu>-<date>.json)
gpu-bench:
	. launch/env.sh && python3 -m traces.gpu_bench all --out traces/bench

clean:
	rm -rf build outputs traces/runs .pytest_cache
