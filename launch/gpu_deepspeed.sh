#!/usr/bin/env bash
# DeepSpeed engine vs native engine on 2 GPUs, on a machine with the project's stack in its python3 but no
# DeepSpeed and no network: installs what .whl/ carries (the DeepSpeed sdist, built with this machine's torch,
# and the wheels it needs that python3 lacks) into $SPMD_SITE (default build/site, kept on a warm machine),
# writes the checkpoints if missing and runs python3 -m validation.gpu_deepspeed. Results and merged traces
# go to $OUT (else traces/results/gpu); finished runs in build/gpu_native are reused.
#   bash launch/gpu_deepspeed.sh [CONFIGS]      CONFIGS: tiny,slice (default), tiny or slice
# .whl/ (git-ignored, 7 MB; python 3.12, manylinux x86_64) is made on a machine with network by:
#   p="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $p -d .whl \
#     pydantic-core==2.50.5 msgpack==1.2.4 psutil==7.2.2 ninja==1.13.2
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl pydantic==2.14.4 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 hjson==3.1.0 py-cpuinfo==9.0.0 \
#     einops==0.8.2 setuptools==84.2.1
#   pip download --no-deps --no-binary=:all: -d .whl deepspeed==0.19.8
set -eo pipefail
cd "$(dirname "$0")/.."
site="${SPMD_SITE:-$PWD/build/site}"
bash launch/deepspeed_site.sh "$site"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
. launch/env.sh
python3 -c "import deepspeed, sys; print('gpu_deepspeed: deepspeed', deepspeed.__version__, file=sys.stderr)"
python3 -m validation.gpu_deepspeed --configs "${1:-tiny,slice}" --gpus 2 --device cuda --out "${OUT:-traces/results/gpu}"
