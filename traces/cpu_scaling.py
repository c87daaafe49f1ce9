"""`make scaling`: the SPMD program at 1, 2 and 4 CPU ranks on the tiny model, per layout, from its traces.

    python -m traces.cpu_scaling [--checkpoint build/checkpoints/tiny-bf16] [--out traces/scaling]

Two series against 1 rank: model-group scaling (one model over G ranks: G = 1, 2, 4, and pipelines
P = 2 and P = 2 x G = 2) and replica scaling (independent groups of one rank, the prompts dispatched
dynamically: 1, 2, 4 replicas). Each run is the 20 validation prompts, fp32, gloo, under mpirun, with
traces; per run (traces/scaling.py): tokens/s over the generation wall, mean decode step of rank 0, the
communication share of decode, and efficiency = (tokens/s per rank) / (1 rank's). Writes
OUT/cpu-<host>-<date>.json, .md and .png. On a machine with fewer cores than ranks the ranks share
cores (the CI machine has 2): beyond the core count efficiency measures oversubscription, not the code;
the file records the core count.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "inputs" / "prompts" / "validation20.jsonl"
# name: (series, ranks, ranks per stage, stages)
LAYOUTS = {"G1": ("both", 1, 1, 1), "G2": ("group", 2, 2, 1), "G4": ("group", 4, 4, 1), "P2": ("group", 2, 1, 2),
           "P2G2": ("group", 4, 2, 2), "2xG1": ("replica", 2, 1, 1), "4xG1": ("replica", 4, 1, 1)}


def run_layout(name: str, ckpt: Path, work: Path, new_tokens: int) -> Path:
    _, ranks, group, pp = LAYOUTS[name]
    trace = work / name
    cmd = [*os.environ.get("MPIRUN", "mpirun").split(), "-n", str(ranks), sys.executable, "-m", "mpi4py", "-m", "spmd",
           "--checkpoint", str(ckpt), "--prompts", str(PROMPTS), "--output", str(work / f"{name}.jsonl"),
           "--trace-dir", str(trace), "--engine", "native", "--group-size", str(group), "--pp", str(pp),
           "--dtype", "fp32", "--device", "cpu", "--max-new-tokens", str(new_tokens), "--batch-size", "5",
           "--no-progress"]
    if ranks > group * pp:
        cmd += ["--dispatch", "dynamic", "--dispatch-size", "5"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{name} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return trace


def series(rows: dict[str, dict]) -> dict[str, list[dict]]:
    """The two series, each with efficiency against the 1-rank run."""
    from traces.scaling import with_efficiency

    out = {}
    for s in ("group", "replica"):
        names = [n for n, (ser, *_) in LAYOUTS.items() if ser in (s, "both") and n in rows]
        out[s] = [dict(r, layout=r["run"]) for r in with_efficiency([dict(rows[n], run=n) for n in names])]
    return out


def markdown(doc: dict) -> str:
    lines = [f"# CPU scaling: tiny model, {doc['host']}, {doc['date']}", "",
             f"{doc['cpus']} CPU cores, {doc['new_tokens']} new tokens per prompt, 20 prompts, fp32, gloo.", ""]
    for s, title in (("group", "Model-group scaling (one model over the ranks)"),
                     ("replica", "Replica scaling (independent groups, dynamic dispatch)")):
        lines += [f"## {title}", "", "| layout | ranks | tokens/s | decode ms | decode comm % | efficiency |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['layout']} | {r['ranks']} | {r['throughput']:.1f} | {r['decode_ms']:.2f} | "
                  f"{r['decode_comm_pct']:.1f} | {r['efficiency']:.2f} |" for r in doc["series"][s]]
        lines.append("")
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> Path:
    from traces.plots import _save, plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for s, marker in (("group", "o"), ("replica", "s")):
        rows = doc["series"][s]
        for ax, key in zip(axes, ("throughput", "decode_ms", "efficiency")):
            ax.plot([r["ranks"] for r in rows], [r[key] for r in rows], marker=marker, label=s, linestyle="none")
            for r in rows:
                ax.annotate(r["layout"], (r["ranks"], r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for ax, label in zip(axes, ("tokens/s", "decode ms/step", "efficiency vs 1 rank")):
        ax.set_xlabel("ranks")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"CPU scaling, tiny model, {doc['cpus']} cores ({doc['host']})")
    return _save(fig, path)


def main(argv=None) -> int:
    from traces.report import load
    from traces.scaling import summarize

    p = argparse.ArgumentParser(prog="python -m traces.cpu_scaling", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=ROOT / "build" / "checkpoints" / "tiny-bf16")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--work", type=Path, default=ROOT / "build" / "scaling")
    p.add_argument("--out", type=Path, default=ROOT / "traces" / "scaling")
    a = p.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name in a.layouts.split(","):
        rows[name] = summarize(load(run_layout(name, a.checkpoint, a.work, a.new_tokens)))
        print(f"{name}: {rows[name]['tokens_per_s']:.1f} tokens/s, decode {rows[name]['decode_ms']:.2f} ms", flush=True)
    doc = {"host": socket.gethostname(), "date": dt.date.today().isoformat(), "cpus": os.cpu_count(),
           "checkpoint": a.checkpoint.name, "new_tokens": a.new_tokens, "runs": rows, "series": series(rows)}
    a.out.mkdir(parents=True, exist_ok=True)
    base = a.out / f"cpu-{doc['host']}-{doc['date']}"
    base.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    base.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))
    print(f"wrote {base}.json, .md and {plot(doc, base.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
