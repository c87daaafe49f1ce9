"""GPU check of the native engine: 1 and 2 GPUs vs transformers on the same GPU, tiny and full-width slice.

    python -m validation.gpu_native --configs tiny,slice --max-gpus 2 --out traces/results/gpu

For each config: write the synthetic bf16 checkpoint (random numbers drawn on the GPU for the slice),
run `--engine hf` on 1 GPU and `--engine native` on 1 and 2 GPUs (bf16, the 20 prompts, greedy), and
record token agreement with transformers, GPU memory per rank, load time and bytes read, decode time
per step, in one JSON file named after the GPU. Runs on CPU too (`--device cpu`), for testing.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from spmd.runtime import commands

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "inputs" / "prompts" / "validation20.jsonl"


def run_engine(ckpt: Path, engine: str, n: int, device: str, work: Path, new_tokens: int) -> dict:
    """One SPMD run under mpirun; returns its outputs, wall time and trace summary."""
    tag = f"{ckpt.name}-{engine}-{n}"
    out, trace = work / f"{tag}.jsonl", work / f"{tag}-trace"
    cmd = commands.mpirun(n, "spmd", "--checkpoint", str(ckpt), "--prompts", str(PROMPTS), "--output", str(out),
                          "--trace-dir", str(trace), "--engine", engine, "--group-size", str(n), "--dtype", "bf16",
                          "--device", device, "--max-new-tokens", str(new_tokens), "--batch-size", "20",
                          "--no-progress", mpi4py=True)
    done = work / f"{tag}.wall"
    if not (done.is_file() and out.is_file()):  # a finished run is reused (a second call on a warm machine)
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{tag} failed:\n{r.stderr[-3000:]}", file=sys.stderr, flush=True)
            return {"engine": engine, "ranks": n, "error": r.stderr[-2000:]}
        done.write_text(str(time.perf_counter() - t0))
    wall = float(done.read_text())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {"engine": engine, "ranks": n, "wall_s": wall, "tokens": [r["completion_token_ids"] for r in rows],
            **trace_summary(trace / "merged.h5")}


def trace_summary(merged: Path) -> dict:
    """Per-rank GPU peak, load figures; decode ms per step and comm share from the events."""
    with h5py.File(merged) as f:
        ev = f["events"][:]
        ranks = [f["ranks"][k].attrs for k in sorted(f["ranks"], key=int)]
        per_rank = [{"gpu_peak_gib": float(a.get("gpu_peak_bytes", 0)) / 2**30,
                     **{k: v for k, v in json.loads(a.get("engine_info", "{}")).items()
                        if k in ("load_s", "load_bytes_read", "param_bytes")}} for a in ranks]
        gpu = str(ranks[0].get("cuda_device", ""))
    r0 = ev[ev["rank"] == 0]
    dec = r0[r0["phase"] == b"decode"]
    steps = len(set(dec["step"].tolist()))
    span = (dec["start_ns"] + dec["dur_ns"]).max() - dec["start_ns"].min() if len(dec) else 0
    comm = dec[dec["kind"] == b"comm"]["dur_ns"].sum()
    return {"gpu": gpu, "per_rank": per_rank, "decode_steps": steps,
            "decode_ms_per_step": float(span) / 1e6 / max(steps, 1),
            "decode_comm_ms_per_step": float(comm) / 1e6 / max(steps, 1)}


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Exact prompts, mean common-prefix length and token agreement up to the shorter completion."""
    prefix = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), min(len(p), len(q))) for p, q in zip(a, b)]
    same = sum(int(x == y) for p, q in zip(a, b) for x, y in zip(p, q))
    total = sum(min(len(p), len(q)) for p, q in zip(a, b))
    return {"exact_prompts": sum(p == q for p, q in zip(a, b)), "n_prompts": len(a),
            "mean_common_prefix": float(np.mean(prefix)), "token_agreement": same / max(total, 1)}


def check_config(config: str, args) -> dict:
    ckpt = commands.checkpoint(config, "bf16", args.ckpt_root, args.device)
    plan = [("hf", 1)] + [("native", n) for n in (1, 2) if n <= args.max_gpus]
    runs = [run_engine(ckpt, e, n, args.device, args.work, args.max_new_tokens) for e, n in plan
            if e in args.engines.split(",")]
    if len(runs) < len(plan):
        return {"config": config, "runs": runs}
    ref = runs[0].get("tokens")
    for r in runs[1:]:
        if ref is not None and "tokens" in r:
            r["vs_hf"] = agreement(r["tokens"], ref)
    if len(runs) == 3 and "tokens" in runs[1] and "tokens" in runs[2]:
        runs[2]["vs_native_1"] = agreement(runs[2]["tokens"], runs[1]["tokens"])
    return {"config": config, "runs": runs}


def table(results: list[dict]) -> str:
    lines = [f"{'config':7} {'engine':7} {'ranks':>5} {'wall s':>7} {'load s':>7} {'GiB/rank':>9} "
             f"{'dec ms/step':>11} {'comm ms':>8} {'vs hf: exact/prefix/agree':>28}"]
    for res in results:
        for r in res["runs"]:
            if "error" in r:
                lines.append(f"{res['config']:7} {r['engine']:7} {r['ranks']:>5} ERROR {r['error'][-200:]!r}")
                continue
            pr = r["per_rank"]
            v = r.get("vs_hf")
            vs = f"{v['exact_prompts']}/{v['n_prompts']} {v['mean_common_prefix']:.1f} {v['token_agreement']:.3f}" \
                if v else "(reference)"
            load = max(p.get("load_s", 0) for p in pr)
            lines.append(f"{res['config']:7} {r['engine']:7} {r['ranks']:>5} {r['wall_s']:7.1f} {load:7.1f} "
                         f"{max(p['gpu_peak_gib'] for p in pr):9.2f} {r['decode_ms_per_step']:11.2f} "
                         f"{r['decode_comm_ms_per_step']:8.2f} {vs:>28}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="tiny,slice")
    p.add_argument("--max-gpus", type=int, default=2)
    p.add_argument("--engines", default="hf,native", help="which runs to make now (finished runs are reused)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--ckpt-root", type=Path, default=ROOT / "build" / "checkpoints")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "gpu_native")
    p.add_argument("--out", type=Path, default=ROOT / "traces" / "results" / "gpu")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    results = [check_config(c, args) for c in args.configs.split(",")]
    gpu = next((r["gpu"] for res in results for r in res["runs"] if r.get("gpu")), args.device)
    stamp = dt.date.today().isoformat()
    for res in results:  # keep the file small: tokens live in the run outputs, not here
        for r in res["runs"]:
            r.pop("tokens", None)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"native-{gpu.replace(' ', '_')}-{stamp}.json"
    path.write_text(json.dumps({"gpu": gpu, "date": stamp, "max_new_tokens": args.max_new_tokens,
                                "results": results}, indent=1))
    print(table(results), flush=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
