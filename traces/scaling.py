"""Scaling across runs: ``python -m traces.report --scaling RUN_DIR... [--out DIR]``.

Per run (a trace directory or a merged .h5): ranks, group size, replicas, device, engine; tokens
generated (rank 0's ``tokens_generated`` attribute); generation wall = first prefill start to last
decode end over all ranks; throughput = tokens / generation wall (steps/s when the run predates the
token count); decode latency = mean decode step time of the lowest rank (traces/skew.py step spans);
comm share of decode. Efficiency = (throughput / ranks) relative to the run with the fewest ranks
(1.0 = perfect scaling). Writes ``scaling.png`` (throughput, latency, efficiency against ranks).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from traces.plots import _save, plt
from traces.skew import step_spans
from traces.table import format_table


def summarize(t) -> dict:
    """One run's scaling figures (see the module docstring)."""
    ev = t.events
    gen = ev[(ev["phase"] == b"prefill") | (ev["phase"] == b"decode")]
    wall = ((gen["start_ns"] + gen["dur_ns"]).max() - gen["start_ns"].min()) / 1e9 if len(gen) else math.nan
    spans = step_spans(t)
    r0 = min(spans) if spans else None
    steps = (spans[r0][1] - spans[r0][0]) / 1e6 if r0 is not None else np.array([])
    dec = ev[ev["phase"] == b"decode"]
    timed = dec["dur_ns"].sum()
    a0 = t.ranks.get(0, {})
    tokens = float(a0["tokens_generated"]) if "tokens_generated" in a0 else math.nan
    return {"run": t.run_dir.name if t.path.name == "merged.h5" else t.path.stem,
            "ranks": len(t.ranks), "group_size": int(_world(a0).get("group_size", len(t.ranks))),
            "device": str(a0.get("cuda_device", "")) or str(a0.get("device", "")), "engine": str(a0.get("engine", "")),
            "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall else math.nan,
            "steps_per_s": len(steps) / wall if wall else math.nan,
            "decode_ms": float(np.mean(steps)) if len(steps) else math.nan,
            "decode_comm_pct": 100 * dec["dur_ns"][dec["kind"] == b"comm"].sum() / timed if timed else 0.0}


def _world(attrs: dict) -> dict:
    try:
        return json.loads(attrs.get("world", "{}"))
    except (TypeError, ValueError):
        return {}


def with_efficiency(rows: list[dict]) -> list[dict]:
    """Rows sorted by ranks, each with ``throughput`` (tokens/s, else steps/s) and ``efficiency``."""
    rows = sorted(rows, key=lambda r: (r["ranks"], r["run"]))
    key = "tokens_per_s" if all(not math.isnan(r["tokens_per_s"]) for r in rows) else "steps_per_s"
    base = rows[0]
    out = []
    for r in rows:
        thr = r[key]
        eff = (thr / r["ranks"]) / (base[key] / base["ranks"]) if base[key] else math.nan
        out.append(dict(r, throughput=thr, throughput_unit=key.replace("_per_s", "/s"), efficiency=eff))
    return out


def plot_scaling(rows: list[dict], path: Path) -> Path:
    """Throughput, decode latency and efficiency against the number of ranks."""
    n = [r["ranks"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    panels = (("throughput", f"throughput ({rows[0]['throughput_unit']})"), ("decode_ms", "decode ms/step"),
              ("efficiency", "efficiency (vs fewest ranks)"))
    for ax, (key, label) in zip(axes, panels):
        ax.plot(n, [r[key] for r in rows], marker="o")
        ax.set_xlabel("ranks")
        ax.set_ylabel(label)
        ax.set_xticks(sorted(set(n)))
        ax.grid(alpha=0.3)
    axes[2].axhline(1.0, color="gray", linestyle="--", linewidth=1)
    fig.suptitle(f"scaling: {rows[0]['engine']} on {rows[0]['device'] or '?'}")
    return _save(fig, path)


def scaling_main(run_dirs: list[Path], out: Path | None = None) -> str:
    """Table of the runs' figures; writes scaling.png to out (default: the first run's parent)."""
    from traces.report import load

    rows = with_efficiency([summarize(load(d)) for d in run_dirs])
    table = [[r["run"], str(r["ranks"]), str(r["group_size"]), r["device"], f"{r['tokens']:.0f}",
              f"{r['wall_s']:.3f}", f"{r['throughput']:.2f}", f"{r['decode_ms']:.3f}", f"{r['decode_comm_pct']:.1f}",
              f"{r['efficiency']:.2f}"] for r in rows]
    heads = ["run", "ranks", "G", "device", "tokens", "gen wall s", rows[0]["throughput_unit"], "decode ms",
             "decode comm %", "efficiency"]
    path = plot_scaling(rows, (Path(out) if out else Path(run_dirs[0]).resolve().parent) / "scaling.png")
    return "scaling\n" + format_table(heads, table, n_left=1) + f"\nwrote {path}\n"
