"""PNG plots of one run (matplotlib, Agg): written by ``python -m traces.report RUN_DIR --plots``.

  plots/ranks.png      stacked bars per rank: compute / comm / io / wait ms, all phases and decode only
  plots/timeline.png   one decode step on every rank: the rank's events (and, when the run has profiler
                       data covering that step, its GPU kernels with NCCL's marked) on the aligned clock

The step shown is the first decode step inside the profiler window when there is one, else the middle
decode step of the first batch.
"""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

from traces.skew import step_spans  # noqa: E402

KINDS = ("compute", "comm", "io", "wait")
COLORS = {"compute": "#4878d0", "comm": "#ee854a", "io": "#6acc64", "wait": "#d65f5f", "kernel": "#82c6e2",
          "nccl": "#d5bb67"}


def _save(fig, path: Path) -> Path:
    """Save via a hidden tmp file and rename (atomic), then close the figure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def _name(t) -> str:
    return t.run_dir.name if t.path.name == "merged.h5" else t.path.stem


def plot_ranks(t, path: Path) -> Path:
    """Stacked bars of ms per kind for each rank: all phases (left), decode only (right)."""
    ranks = sorted(t.ranks)
    fig, axes = plt.subplots(1, 2, figsize=(max(7, 1.2 * len(ranks) + 5), 3.8), layout="constrained")
    for ax, phase in zip(axes, (None, b"decode")):
        ev = t.events if phase is None else t.events[t.events["phase"] == phase]
        bottom = np.zeros(len(ranks))
        for k in KINDS:
            ms = np.array([ev["dur_ns"][(ev["rank"] == r) & (ev["kind"] == k.encode())].sum() / 1e6 for r in ranks])
            ax.bar([str(r) for r in ranks], ms, bottom=bottom, label=k, color=COLORS[k])
            bottom += ms
        ax.set_xlabel("rank")
        ax.set_ylabel("ms")
        ax.set_title("all phases" if phase is None else "decode")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"time per rank by kind: {_name(t)}")
    return _save(fig, path)


def _device_kernels(t) -> dict[int, np.ndarray]:
    """Rank → kernel table (name, start_ns, dur_ns, nccl) from nsys or torch.profiler, if any."""
    out = {}
    with h5py.File(t.path, "r") as f:
        for r, g in f.get("torch", {}).items():
            ev = g["events"][()]
            ev = ev[ev["cat"] == b"kernel"]
            if len(ev):
                out[int(r)] = ev
        for r, g in f.get("nsys", {}).items():
            if "kernels" in g and len(g["kernels"]):
                out[int(r)] = g["kernels"][()]
    return out


def pick_step(t, kernels: dict) -> tuple[int, int] | None:
    """(start_ns, end_ns) of the decode step to show, as the lowest rank ran it; None without decode."""
    spans = step_spans(t)
    if not spans:
        return None
    r0 = min(spans)
    starts, ends, _ = spans[r0]
    if r0 in kernels:
        k = kernels[r0]
        inside = np.nonzero((starts >= k["start_ns"].min()) & (ends <= (k["start_ns"] + k["dur_ns"]).max()))[0]
        if len(inside):
            return int(starts[inside[0]]), int(ends[inside[0]])
    first_batch = np.nonzero(np.diff(spans[r0][2]) < 0)[0]  # the step counter restarts with each batch
    n = first_batch[0] + 1 if len(first_batch) else len(starts)
    i = n // 2
    return int(starts[i]), int(ends[i])


def plot_timeline(t, path: Path) -> Path | None:
    """Events of one decode step, one lane per rank (plus a kernel lane per rank with profiler data)."""
    kernels = _device_kernels(t)
    window = pick_step(t, kernels)
    if window is None:
        return None
    lo, hi = window
    pad = (hi - lo) * 0.05
    lanes, y = [], 0
    fig, ax = plt.subplots(figsize=(11, 0.5 * (len(t.ranks) * (2 if kernels else 1)) + 1.8))
    for r in sorted(t.ranks):
        ev = t.events[(t.events["rank"] == r) & (t.events["start_ns"] + t.events["dur_ns"] >= lo - pad)
                      & (t.events["start_ns"] <= hi + pad)]
        for k in KINDS:
            sel = ev[ev["kind"] == k.encode()]
            ax.broken_barh([((s - lo) / 1e3, max(d / 1e3, 0.5)) for s, d in zip(sel["start_ns"], sel["dur_ns"])],
                           (y - 0.4, 0.8), color=COLORS[k], label=k if r == min(t.ranks) else None)
        lanes.append(f"rank {r}")
        y += 1
        if r in kernels:
            kk = kernels[r]
            kk = kk[(kk["start_ns"] + kk["dur_ns"] >= lo - pad) & (kk["start_ns"] <= hi + pad)]
            for is_nccl, color in ((False, COLORS["kernel"]), (True, COLORS["nccl"])):
                sel = kk[kk["nccl"] == is_nccl]
                ax.broken_barh([((s - lo) / 1e3, max(d / 1e3, 0.5)) for s, d in zip(sel["start_ns"], sel["dur_ns"])],
                               (y - 0.4, 0.8), color=color,
                               label=("NCCL kernel" if is_nccl else "kernel") if r == min(kernels) else None)
            lanes.append(f"rank {r} GPU")
            y += 1
    for x in (0, (hi - lo) / 1e3):
        ax.axvline(x, color="gray", linestyle=":", linewidth=1)
    ax.set_yticks(range(len(lanes)), lanes)
    ax.invert_yaxis()
    ax.set_xlabel("µs from the step's start on the aligned clock")
    ax.set_title(f"one decode step on every rank: {_name(t)}")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=6, frameon=False)
    return _save(fig, path)


def write_plots(t, out_dir: Path | None = None) -> list[Path]:
    """All plots of a run into out_dir (default RUN_DIR/plots, or NAME-plots beside a NAME.h5 file)."""
    if out_dir is None:  # a merged.h5 of a run directory, or a stored merged file: plots beside it
        out_dir = t.run_dir / "plots" if t.path.name == "merged.h5" else t.path.with_name(f"{t.path.stem}-plots")
    out_dir = Path(out_dir)
    paths = [plot_ranks(t, out_dir / "ranks.png"), plot_timeline(t, out_dir / "timeline.png")]
    return [p for p in paths if p is not None]
