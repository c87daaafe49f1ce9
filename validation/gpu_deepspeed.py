"""GPU check of the DeepSpeed engine: AutoTP + our expert-parallel MoE vs our native engine, same GPUs.

    python3 -m validation.gpu_deepspeed --configs tiny,slice --gpus 2 --out traces/results/gpu

For each config: write the synthetic bf16 checkpoint if missing, run `--engine deepspeed` and `--engine native`
with `--group-size GPUS` (bf16, the 20 prompts in one batch, 32 new tokens, traces), then report decode ms per
step, the all-reduces per decode step (count and ms, by name, from merged.h5), GPU memory per rank, load time
and token agreement of deepspeed with native. Writes deepspeed-<gpu>-<date>.json and each run's merged trace
(<config>-bf16-<engine>-<gpus>.h5) under --out. Finished runs in --work are reused. `--device cpu` for testing.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np

from spmd.runtime import commands
from validation.gpu_native import ROOT, agreement, run_engine


def comm_per_step(merged: Path, rank: int = 0) -> dict:
    """Decode collectives of one rank: per name, count and ms per decode step; totals."""
    with h5py.File(merged) as f:
        ev = f["events"][:]
    dec = ev[(ev["rank"] == rank) & (ev["phase"] == b"decode")]
    steps = max(len(set(dec["step"].tolist())), 1)
    comm = dec[dec["kind"] == b"comm"]
    by_name = {}
    for name in sorted(set(comm["name"].tolist())):
        mine = comm[comm["name"] == name]
        by_name[name.decode()] = {"per_step": len(mine) / steps, "bytes": int(np.median(mine["bytes"])),
                                  "ms_per_step": float(mine["dur_ns"].sum()) / 1e6 / steps}
    return {"all_reduces_per_step": len(comm) / steps, "comm_ms_per_step": float(comm["dur_ns"].sum()) / 1e6 / steps,
            "by_name": by_name}


def check_config(config: str, args) -> dict:
    """deepspeed and native on args.gpus ranks for one config; tokens compared, traces copied to args.out."""
    ckpt = commands.checkpoint(config, "bf16", args.ckpt_root, args.device)
    runs = {}
    for engine in ("deepspeed", "native"):
        r = run_engine(ckpt, engine, args.gpus, args.device, args.work, args.max_new_tokens)
        tag = f"{ckpt.name}-{engine}-{args.gpus}"
        merged = args.work / f"{tag}-trace" / "merged.h5"
        if "error" not in r:
            r.update(comm_per_step(merged))
            shutil.copyfile(merged, args.out / f"{tag}.h5")
        runs[engine] = r
    if all("tokens" in r for r in runs.values()):
        runs["deepspeed"]["vs_native"] = agreement(runs["deepspeed"]["tokens"], runs["native"]["tokens"])
    for r in runs.values():
        r.pop("tokens", None)  # the outputs keep them; the result file stays small
    return {"config": config, "gpus": args.gpus, "runs": runs}


def table(results: list[dict]) -> str:
    lines = [f"{'config':7} {'engine':9} {'wall s':>7} {'load s':>7} {'GiB/rank':>9} {'dec ms/step':>11} "
             f"{'ARs/step':>8} {'AR ms/step':>10} {'vs native: exact/prefix/agree':>30}"]
    for res in results:
        for engine, r in res["runs"].items():
            if "error" in r:
                lines.append(f"{res['config']:7} {engine:9} ERROR {r['error'][-300:]!r}")
                continue
            pr, v = r["per_rank"], r.get("vs_native")
            vs = f"{v['exact_prompts']}/{v['n_prompts']} {v['mean_common_prefix']:.1f} {v['token_agreement']:.3f}" \
                if v else "(reference)"
            lines.append(f"{res['config']:7} {engine:9} {r['wall_s']:7.1f} {max(p.get('load_s', 0) for p in pr):7.1f} "
                         f"{max(p['gpu_peak_gib'] for p in pr):9.2f} {r['decode_ms_per_step']:11.2f} "
                         f"{r['all_reduces_per_step']:8.1f} {r['comm_ms_per_step']:10.2f} {vs:>30}")
            lines += [f"{'':17}{name}: {c['per_step']:.1f}/step, {c['ms_per_step']:.3f} ms/step, {c['bytes']} B"
                      for name, c in r["by_name"].items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="tiny,slice")
    p.add_argument("--gpus", type=int, default=2, help="ranks = group size of both engines")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--ckpt-root", type=Path, default=ROOT / "build" / "checkpoints")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "gpu_native")
    p.add_argument("--out", type=Path, default=ROOT / "traces" / "results" / "gpu")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results = [check_config(c, args) for c in args.configs.split(",")]
    gpu = next((r["gpu"] for res in results for r in res["runs"].values() if r.get("gpu")), args.device)
    stamp = dt.date.today().isoformat()
    path = args.out / f"deepspeed-{gpu.replace(' ', '_')}-{stamp}.json"
    path.write_text(json.dumps({"gpu": gpu, "date": stamp, "max_new_tokens": args.max_new_tokens,
                                "results": results}, indent=1))
    print(table(results), flush=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
