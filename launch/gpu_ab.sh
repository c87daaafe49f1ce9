#!/usr/bin/env bash
# A/B of the GPU benchmark in one call, on one card: `traces.gpu_bench all` for an older tree, then for
# this one, on the same checkpoints; then the rows side by side (decode ms/step, prefill tokens/s).
#   launch/gpu_ab.sh OLD_TREE OUT_DIR [gpu_bench all options...]
# OLD_TREE: a directory with `git archive REV` of the older commit (the device machine has no history);
# CONFIGS (default native-1gpu-fp8,native-1gpu-bf16) and CKPT_ROOT as in the environment.
set -euo pipefail
old=$(cd "$1" && pwd) out=$2
shift 2
configs=${CONFIGS:-native-1gpu-fp8,native-1gpu-bf16}
ckpt=${CKPT_ROOT:-/tmp/spmd-ab-checkpoints}
. launch/env.sh
mkdir -p "$out"
(cd "$old" && python3 -m traces.gpu_bench all --configs "$configs" --ckpt-root "$ckpt" --work /tmp/spmd-ab-old \
  --out "$out/old" "$@")
python3 -m traces.gpu_bench all --configs "$configs" --ckpt-root "$ckpt" --work /tmp/spmd-ab-new --out "$out/new" "$@"
python3 - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
docs = {k: json.loads(next((out / k).glob("*.json")).read_text()) for k in ("old", "new")}
key = lambda r: (r["tag"], r["batch"])  # noqa: E731
rows = {k: {key(r): r for r in d["rows"] if "decode_ms_step" in r} for k, d in docs.items()}
print(f"{'config':22} {'batch':>5} {'decode ms old':>13} {'new':>7} {'new/old':>7} {'prefill tok/s old':>17} {'new':>9}")
for k in rows["old"]:
    a, b = rows["old"][k], rows["new"].get(k)
    if b:
        print(f"{k[0]:22} {k[1]:>5} {a['decode_ms_step']:13.3f} {b['decode_ms_step']:7.3f} "
              f"{b['decode_ms_step'] / a['decode_ms_step']:7.3f} {a['prefill_tok_s']:17.0f} {b['prefill_tok_s']:9.0f}")
PY
