"""Scaling sweeps of the SPMD program, per layout, from its traces: `make scaling` (CPU), `make gpu-scaling`.

    python -m traces.sweep [--device cpu|cuda] [--checkpoint DIR] [--layouts G1,G2,...] [--prompts N]

Each layout is one `mpirun -n R python -m mpi4py -m spmd` run with traces. Three series against the
one-rank run G1: model-group scaling (one model over G ranks: G1, G2, G4; pipelines P2 and P2G2),
replica scaling (independent groups of G ranks, prompts dispatched dynamically: 2xG1, 4xG1, 2xG2), and
orchestration (`+O`: the same layout with a dedicated orchestrator, world rank 0 without a model; one
more process, no more GPUs). Per run (traces/scaling.py): tokens/s over the generation wall, mean
decode step, the communication share of decode, efficiency = (tokens/s per model rank) / (G1's); and,
for orchestration, the job's end-to-end tokens/s (first event to the output written) and the model
ranks' idle share (1 - their compute and comm time over the generation wall). Decode steps replayed
from CUDA graphs show their comm share only with graph marks (SPMD_GRAPH_MARKS=stamp, best with
SPMD_GRAPH_MARK_LEVEL=layer; recorded per run), else it is n/a. Each run also keeps the seconds of
compute, comm, io and wait per rank and phase (`per_rank`). --prompts N > 20 writes
N prompts made of 1 to 3 of the 20 validation prompts (seeded); --warmup K first runs each model shape
once on K of them, unrecorded (on GPU the first run of a shape compiles Triton kernels inside its
measured time). Writes OUT/cpu-<host>-<date>.json or
OUT/gpu-<gpu>-<date>.json, .md and .png, with the core count (CPU: beyond it ranks share cores) or the
GPU name; on GPU, layouts needing more GPUs than there are are skipped; --merge adds to a file;
--resummarize FILE recomputes a stored file's series (and .md, .png) from its runs.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from spmd.runtime import commands

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "inputs" / "prompts" / "validation20.jsonl"
# name: (series, model ranks, ranks per stage, stages, inline twin): the twin is set for the layouts with a
# dedicated orchestrator, and names the same layout run inline (what the orchestration series compares)
LAYOUTS = {"G1": ("both", 1, 1, 1, None), "G2": ("group", 2, 2, 1, None), "G4": ("group", 4, 4, 1, None),
           "P2": ("group", 2, 1, 2, None), "P2G2": ("group", 4, 2, 2, None),
           "2xG1": ("replica", 2, 1, 1, None), "4xG1": ("replica", 4, 1, 1, None),
           "2xG2": ("replica", 4, 2, 1, None),
           "G1+O": ("orchestration", 1, 1, 1, "G1"), "G2+O": ("orchestration", 2, 2, 1, "G2"),
           "2xG1+O": ("orchestration", 2, 1, 1, "2xG1"), "4xG1+O": ("orchestration", 4, 1, 1, "4xG1")}
CPU_LAYOUTS = "G1,G2,G4,P2,P2G2,2xG1,4xG1,G1+O,2xG1+O"
GPU_LAYOUTS = "G1,G2,G4,P2,P2G2,2xG1,4xG1,2xG2,G2+O,2xG1+O,4xG1+O"


def prompt_file(n: int, work: Path, seed: int = 0) -> Path:
    """The 20 validation prompts (n=20), or n prompts each joining 1 to 3 of them (seeded)."""
    if n == 20:
        return PROMPTS
    base = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()]
    rng = random.Random(seed)
    out = work / f"prompts{n}.jsonl"
    out.write_text("".join(json.dumps({"id": f"p{i:05d}", "prompt": " ".join(rng.sample(base, rng.randint(1, 3)))})
                           + "\n" for i in range(n)))
    return out


def warm_up(layouts: list[str], a, prompts: Path) -> None:
    """One unrecorded run of the first `a.warmup` prompts per model shape (ranks per stage, stages) of the
    layouts: Triton compiles each kernel variant once per machine (its disk cache), and a measured run
    should not pay for the ones that the layouts before it did not need."""
    part = a.work / f"warmup{a.warmup}.jsonl"
    part.write_text("".join(prompts.read_text().splitlines(keepends=True)[:a.warmup]))
    for shape in dict.fromkeys((LAYOUTS[n][2], LAYOUTS[n][3]) for n in layouts):
        name = next(n for n, v in LAYOUTS.items() if (v[2], v[3]) == shape and v[1] == shape[0] * shape[1])
        run_layout(name, a, part, tag="warmup-")
        print(f"warm-up {name} ({a.warmup} prompts) done", flush=True)


def run_layout(name: str, a, prompts: Path, tag: str = "") -> Path:
    _, ranks, group, pp, twin = LAYOUTS[name]
    dedicated = twin is not None
    trace = a.work / f"{tag}{name}"
    cmd = commands.mpirun(ranks + dedicated, "spmd", "--checkpoint", str(a.checkpoint), "--prompts", str(prompts),
                          "--output", str(a.work / f"{tag}{name}.jsonl"), "--trace-dir", str(trace), "--engine",
                          "native", "--group-size", str(group), "--pp", str(pp), "--dtype", a.dtype, "--device",
                          a.device, "--max-new-tokens", str(a.new_tokens), "--batch-size", str(a.batch_size),
                          "--no-progress", mpi4py=True)
    if dedicated:
        cmd += ["--orchestrator", "dedicated"]
    if dedicated or ranks > group * pp:
        cmd += ["--dispatch", "dynamic", "--dispatch-size", str(a.dispatch_size)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{name} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return trace


def job_figures(t) -> dict:
    """End-to-end figures of one run: job wall (first event to rank 0's output written), tokens/s over it,
    and the model ranks' mean idle share over the generation wall."""
    ev = t.events
    end = ev["start_ns"] + ev["dur_ns"]
    out = ev[(ev["rank"] == 0) & (ev["name"] == b"outputs.write")]
    job = ((out["start_ns"] + out["dur_ns"]).max() if len(out) else end.max()) - ev["start_ns"].min()
    gen = (ev["phase"] == b"prefill") | (ev["phase"] == b"decode")
    lo, hi = ev["start_ns"][gen].min(), end[gen].max()
    busy = gen & ((ev["kind"] == b"compute") | (ev["kind"] == b"comm"))
    model = sorted(set(ev["rank"][gen].tolist()))
    idle = [1 - ev["dur_ns"][busy & (ev["rank"] == r)].sum() / (hi - lo) for r in model]
    tokens = float(t.ranks.get(0, {}).get("tokens_generated", np.nan))
    out = {"job_s": job / 1e9, "job_tokens_per_s": tokens / (job / 1e9), "model_idle_pct": 100 * float(np.mean(idle)),
           "per_rank": per_rank(ev)}
    if (ev["name"] == b"decode.graph").any():  # unmarked graph replays: one event per step, no comm inside
        out["decode_comm_pct"] = None
    out["graph_marks"] = f"{os.environ.get('SPMD_GRAPH_MARKS') or 'off'}/{os.environ.get('SPMD_GRAPH_MARK_LEVEL') or 'span'}"
    gpu = next((str(r["cuda_device"]) for r in t.ranks.values() if r.get("cuda_device")), "")
    return {**out, "device": gpu} if gpu else out  # a dedicated rank 0 has no GPU: a model rank's


def per_rank(ev) -> dict[str, dict]:
    """Seconds of compute / comm / io / wait per rank and phase (load, prefill, decode, other)."""
    out: dict[str, dict] = {}
    for r in sorted(set(ev["rank"].tolist())):
        e = ev[ev["rank"] == r]
        out[str(r)] = {ph.decode(): {k.decode(): round(float(e["dur_ns"][(e["phase"] == ph) & (e["kind"] == k)].sum())
                                                       / 1e9, 4) for k in (b"compute", b"comm", b"io", b"wait")}
                       for ph in (b"load", b"prefill", b"decode", b"other")}
    return out


def series(rows: dict[str, dict]) -> dict[str, list[dict]]:
    """The series, each with efficiency against G1 (per model rank) and, for +O, against its inline layout."""
    from traces.scaling import with_efficiency

    out = {}
    twins = {LAYOUTS[n][4] for n in rows if LAYOUTS[n][4]}  # inline layouts run beside their +O layout
    for s in ("group", "replica", "orchestration"):
        names = [n for n, (ser, *_) in LAYOUTS.items() if n in rows and (ser in (s, "both") or
                                                                        (s == "orchestration" and n in twins))]
        runs = [dict(rows[n], run=n, ranks=LAYOUTS[n][1]) for n in names]
        out[s] = [dict(r, layout=r["run"]) for r in (with_efficiency(runs) if runs else [])]
    for r in out["orchestration"]:
        inline = rows.get(LAYOUTS[r["layout"]][4])
        if inline:
            r["vs_inline"] = r["job_tokens_per_s"] / inline["job_tokens_per_s"]
    return out


def markdown(doc: dict) -> str:
    where = doc["gpu"] if doc["device"] == "cuda" else f"{doc['cpus']} CPU cores"
    lines = [f"# Scaling sweep: {doc['checkpoint']}, {doc['host']} ({where}), {doc['date']}", "",
             f"{doc['prompts']} prompts, {doc['new_tokens']} new tokens each, batch {doc['batch_size']}, "
             f"{doc['dtype']}, {'NCCL' if doc['device'] == 'cuda' else 'gloo'}.", ""]
    titles = {"group": "Model-group scaling (one model over the ranks)",
              "replica": "Replica scaling (independent groups, dynamic dispatch)",
              "orchestration": "Inline vs dedicated orchestrator (+O: world rank 0 holds no model)"}
    cold = [n for n, r in doc["runs"].items() if not r.get("warmup")]
    if cold and doc["device"] == "cuda":
        lines += [f"Measured without a warm-up run (kernel compiles of shapes not run before count in their "
                  f"generation wall): {', '.join(cold)}.", ""]
    for s, title in titles.items():
        if not doc["series"].get(s):
            continue
        lines += [f"## {title}", "", "| layout | model ranks | tokens/s | decode ms | decode comm % | efficiency | "
                  "job s | job tokens/s | model idle % |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['layout']} | {r['ranks']} | {r['throughput']:.1f} | {r['decode_ms']:.2f} | "
                  f"{_pct(r['decode_comm_pct'])} | {r['efficiency']:.2f} | {r['job_s']:.1f} | "
                  f"{r['job_tokens_per_s']:.1f} | {r['model_idle_pct']:.1f} |" for r in doc["series"][s]]
        lines.append("")
    split = [(n, r["per_rank"]) for n, r in doc["runs"].items() if "per_rank" in r]
    if split:
        lines += ["## Per rank (seconds from the traces)", "", "| layout | rank | prefill compute | prefill comm | "
                  "decode compute | decode comm | wait | io |", "|---|---|---|---|---|---|---|---|"]
        for n, ranks in split:
            for rank, ph in ranks.items():
                total = {k: sum(x[k] for x in ph.values()) for k in ("wait", "io")}
                lines.append(f"| {n} | {rank} | {ph['prefill']['compute']:.2f} | {ph['prefill']['comm']:.2f} | "
                             f"{ph['decode']['compute']:.2f} | {ph['decode']['comm']:.2f} | {total['wait']:.2f} | "
                             f"{total['io']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def _pct(x) -> str:
    return "n/a (graph)" if x is None else f"{x:.1f}"


def plot(doc: dict, path: Path) -> Path:
    from traces.plots import _save, plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for s, marker in (("group", "o"), ("replica", "s"), ("orchestration", "^")):
        rows = doc["series"].get(s, [])
        for ax, key in zip(axes, ("throughput", "decode_ms", "efficiency")):
            ax.plot([r["ranks"] for r in rows], [r[key] for r in rows], marker=marker, label=s, linestyle="none")
            for r in rows:
                ax.annotate(r["layout"], (r["ranks"], r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for ax, label in zip(axes, ("tokens/s", "decode ms/step", "efficiency vs G1")):
        ax.set_xlabel("model ranks" + (" (GPUs)" if doc["device"] == "cuda" else ""))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"Scaling, {doc['checkpoint']}, {doc['gpu'] if doc['device'] == 'cuda' else str(doc['cpus']) + ' cores'}")
    return _save(fig, path)


def main(argv=None) -> int:
    from traces.report import load
    from traces.scaling import summarize

    p = argparse.ArgumentParser(prog="python -m traces.sweep", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--checkpoint", type=Path, default=ROOT / "build" / "checkpoints" / "tiny-bf16")
    p.add_argument("--layouts", default=None, help=f"default: {CPU_LAYOUTS} (cpu), {GPU_LAYOUTS} (cuda)")
    p.add_argument("--prompts", type=int, default=20, help="20: the validation prompts; more: synthesized")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=5)
    p.add_argument("--dispatch-size", type=int, default=5, help="prompts per chunk of dynamic dispatch")
    p.add_argument("--dtype", default=None, help="default: fp32 (cpu), bf16 (cuda)")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "scaling")
    p.add_argument("--out", type=Path, default=ROOT / "traces" / "results" / "scaling")
    p.add_argument("--warmup", type=int, default=0, help="first run each model shape on this many prompts, "
                   "unrecorded (Triton's compiles out of the measured runs)")
    p.add_argument("--merge", action="store_true", help="keep the other runs of an existing result file with the "
                   "same settings (one sweep over several calls)")
    p.add_argument("--resummarize", type=Path, metavar="FILE", help="run nothing: rewrite a result file's series "
                   "and its .md and .png from the runs it stores (after a change to how series are made)")
    a = p.parse_args(argv)
    if a.resummarize:
        doc = resummarize(a.resummarize)
        print(markdown(doc))
        return 0
    a.dtype = a.dtype or ("bf16" if a.device == "cuda" else "fp32")
    layouts = (a.layouts or (GPU_LAYOUTS if a.device == "cuda" else CPU_LAYOUTS)).split(",")
    if a.device == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        skip = [n for n in layouts if LAYOUTS[n][1] > gpus]
        layouts = [n for n in layouts if n not in skip]
        if skip:
            print(f"skipped (more than the {gpus} GPUs here): {','.join(skip)}", flush=True)
    a.work.mkdir(parents=True, exist_ok=True)
    prompts = prompt_file(a.prompts, a.work)
    if a.warmup:
        warm_up(layouts, a, prompts)
    rows = {}
    for name in layouts:
        try:
            t = load(run_layout(name, a, prompts))
        except RuntimeError as exc:  # one layout failing (out of memory, ...) does not lose the others
            print(exc, file=sys.stderr, flush=True)
            continue
        rows[name] = {**summarize(t), **job_figures(t), "warmup": a.warmup}
        print(f"{name}: {rows[name]['tokens_per_s']:.1f} tokens/s, decode {rows[name]['decode_ms']:.2f} ms, "
              f"job {rows[name]['job_s']:.1f} s", flush=True)
        base, doc = write(a, rows)  # after every run: a sweep cut short keeps what it measured
    print(markdown(doc))
    print(f"wrote {base}.json, .md and {plot(doc, base.with_suffix('.png'))}")
    return 0


def resummarize(path: Path) -> dict:
    """FILE's series recomputed from its runs; FILE, its .md and its .png rewritten (each atomically)."""
    path = Path(path)
    doc = json.loads(path.read_text())
    doc["series"] = series(doc["runs"])
    for target, text in ((path, json.dumps(doc, indent=1) + "\n"), (path.with_suffix(".md"), markdown(doc))):
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
    plot(doc, path.with_suffix(".png"))
    return doc


def write(a, rows: dict[str, dict]) -> tuple[Path, dict]:
    """OUT/<cpu-host|gpu-name>-<date>.json and .md of the runs so far (with --merge: and the file's)."""
    gpu = next((r["device"] for r in rows.values() if a.device == "cuda" and r["device"] not in ("", "cpu")), "")
    doc = {"host": socket.gethostname(), "date": dt.date.today().isoformat(), "device": a.device, "gpu": gpu,
           "cpus": os.cpu_count(), "checkpoint": a.checkpoint.name, "prompts": a.prompts, "new_tokens": a.new_tokens,
           "batch_size": a.batch_size, "dispatch_size": a.dispatch_size, "dtype": a.dtype}
    a.out.mkdir(parents=True, exist_ok=True)  # GPU machines change host names from call to call: not in the name
    base = a.out / (f"gpu-{gpu.replace(' ', '_')}-{doc['date']}" if gpu else f"cpu-{doc['host']}-{doc['date']}")
    if a.merge and base.with_suffix(".json").is_file():  # runs of earlier calls with the same settings
        old = json.loads(base.with_suffix(".json").read_text())
        differ = [k for k in ("checkpoint", "prompts", "new_tokens", "batch_size", "dispatch_size", "dtype", "gpu")
                  if old.get(k) != doc[k]]
        if differ:
            raise SystemExit(f"--merge: {base}.json has other settings ({', '.join(differ)})")
        rows = {**{k: v for k, v in old["runs"].items() if k not in rows}, **rows}
    doc.update(runs=rows, series=series(rows))
    base.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    base.with_suffix(".md").write_text(markdown(doc))
    return base, doc


if __name__ == "__main__":
    raise SystemExit(main())
