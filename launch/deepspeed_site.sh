#!/usr/bin/env bash
# Installs DeepSpeed and the wheels it needs from .whl/ (see launch/gpu_deepspeed.sh for how .whl/ is made)
# into SITE (default build/site) for a GPU machine's python3 that has torch but no DeepSpeed and no
# network; does nothing when SITE already imports deepspeed. Then: export PYTHONPATH=SITE:$PYTHONPATH
#   bash launch/deepspeed_site.sh [SITE]
set -eo pipefail
cd "$(dirname "$0")/.."
site="${1:-$PWD/build/site}"
if ! PYTHONPATH="$site" python3 -c "import deepspeed" >/dev/null 2>&1; then
  # pydantic 2.14 needs typing_extensions >= 4.16: always ours; the others only where python3 has none
  pkgs=(.whl/pydantic-* .whl/pydantic_core-* .whl/annotated_types-* .whl/typing_inspection-* .whl/typing_extensions-*)
  for mod_whl in hjson:hjson cpuinfo:py_cpuinfo msgpack:msgpack einops:einops ninja:ninja psutil:psutil \
                 setuptools:setuptools; do
    python3 -c "import ${mod_whl%%:*}" 2>/dev/null || pkgs+=(.whl/"${mod_whl#*:}"-*)
  done
  t0=$SECONDS
  pip=(python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$site")
  "${pip[@]}" "${pkgs[@]}"
  PYTHONPATH="$site" "${pip[@]}" .whl/deepspeed-*.tar.gz  # setup.py sees the wheels just installed
  echo "gpu_deepspeed: installed deepspeed ${pkgs[*]} into $site in $((SECONDS - t0)) s" >&2
fi
