"""The paper's figures, each drawn only from result files stored in the repository.

    python -m docs.figures [--out build/docs/figures]

``make(out_dir)`` writes one PNG per figure (matplotlib, Agg, 200 dpi, single-column 3.4 x 2.4 in or
two-panel 7 x 2.6 in, no titles: the paper gives the captions) and returns, per figure, its file name, the
repository-relative result files it was drawn from and a one-sentence caption. Nothing measured is written
here: every value plotted and every number in a caption is read from the files named in ``sources``; the
module holds only choices (which configurations to show, colours, sizes). ``arch`` is a diagram of the
program's structure (docs/architecture.md) and reads no result file.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import h5py
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch  # noqa: E402

from traces.plots import COLORS  # noqa: E402  (the report's colours per event kind)

ROOT = Path(__file__).resolve().parents[1]
RES = ROOT / "traces/results"
TRACE_TP = RES / "gpu/slice-bf16-native-2.h5"  # eager decode of one group of two: per-layer compute and comm
TRACE_ORCH = RES / "scaling/dispatch-order-NVIDIA_H200-2026-11-29-r2-G1O-sorted.h5"  # G1+O: orchestrator + model
# the result files: the ones the paper's text reads (docs/build.py), so figures and text cannot drift apart.
# The 400-prompt serving call: call 4 is the result, calls 1-3 the steps to it (docs/performance.md); the
# 128-prompt one compares FP8 w8a8 prefill (default) with w8a16.
from docs.build import BENCH, MODEL, SWEEP_GPU as SWEEP, SWEEP_MARKS as MARKS  # noqa: E402
from docs.build import FP8_GEMMS as FP8, SERVE as SERVE_400, SERVE_FP8 as SERVE_128  # noqa: E402

# choices, not results
BENCH_TAGS = ("native-1gpu-bf16", "native-1gpu-fp8", "native-2gpu-bf16", "native-2gpu-fp8", "hf-1gpu-bf16",
              "deepspeed-2gpu-bf16")  # the paper's bench table
PROJ_BATCH = 32  # the batch the paper's projection prose uses
TIMELINE_STEPS = 3
DPI = 200
SINGLE, WIDE = (3.4, 2.4), (7.0, 2.6)
STYLE = {"font.size": 7.5, "axes.labelsize": 7.5, "axes.titlesize": 7.5, "xtick.labelsize": 7, "ytick.labelsize": 7,
         "legend.fontsize": 6.5, "legend.frameon": False, "axes.linewidth": 0.6, "lines.linewidth": 1.0,
         "lines.markersize": 3.5, "xtick.major.width": 0.6, "ytick.major.width": 0.6, "xtick.major.size": 2.5,
         "ytick.major.size": 2.5, "xtick.minor.size": 1.5, "ytick.minor.size": 1.5, "axes.spines.top": False,
         "axes.spines.right": False, "font.family": "DejaVu Sans", "hatch.linewidth": 0.5, "svg.hashsalt": "spmd"}
PALETTE = ("#4878d0", "#ee854a", "#6acc64", "#d65f5f", "#956cb4", "#8c613c", "#dc7ec0", "#797979", "#d5bb67",
           "#82c6e2")


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _save(fig, out_dir: Path, name: str) -> str:
    fname = f"{name}.png"
    fig.savefig(out_dir / fname, dpi=DPI, bbox_inches="tight", pad_inches=0.03, metadata={"Software": None})
    plt.close(fig)
    return fname


def _tag(ax, text: str) -> None:
    """Panel letter above the upper left corner (not a title)."""
    ax.text(0.0, 1.02, text, transform=ax.transAxes, ha="left", va="bottom", fontweight="bold")


# 1. architecture ------------------------------------------------------------------------------------------

def _box(ax, x, y, w, h, text="", fc="#ffffff", ec="#404040", lw=0.7, size=7, weight="normal", va="center",
         ls="-", z=2):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0,rounding_size=0.8", fc=fc, ec=ec, lw=lw,
                                ls=ls, zorder=z))
    if text:
        ty = y + h / 2 if va == "center" else y + h - 0.6
        ax.text(x + w / 2, ty, text, ha="center", va=va, fontsize=size, fontweight=weight, zorder=z + 1,
                linespacing=1.15)


def _arrow(ax, p, q, text="", color="#303030", style="-|>", ls="-", rad=0.0, size=7, off=(0, 0.9), lw=0.7):
    ax.add_patch(FancyArrowPatch(p, q, arrowstyle=style, mutation_scale=6, color=color, lw=lw, ls=ls,
                                 connectionstyle=f"arc3,rad={rad}", shrinkA=0, shrinkB=0, zorder=5))
    if text:
        ax.text((p[0] + q[0]) / 2 + off[0], (p[1] + q[1]) / 2 + off[1], text, ha="center", va="bottom",
                fontsize=size, color=color, zorder=6)


def fig_arch(out_dir: Path) -> dict:
    fig = plt.figure(figsize=(7.0, 3.3))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 47)
    ax.set_aspect("equal")
    ax.axis("off")
    grey, blue, green, orange = "#f2f2f2", "#e3ecfa", "#e6f4e4", "#fdebdc"
    dblue, dgreen, dorange = "#5070a0", "#3f8f3f", "#b0601a"

    # launcher: one SPMD program per rank
    _box(ax, 0.5, 33, 14.5, 10, "srun / mpirun\none rank per GPU\n(gloo: per CPU\nslot)", fc=grey, size=7.5)
    _arrow(ax, (7.75, 33), (7.75, 28))
    _box(ax, 0.5, 14, 14.5, 14, "one SPMD\nprogram on\nevery rank:\npython -m\nmpi4py -m spmd\n(config → world\n"
         "→ engine → serve)", fc=grey, size=7)
    _arrow(ax, (15, 21), (17, 21))

    # the MPI world
    _box(ax, 17, 1, 58.5, 45, "", fc="#fafafa", ec="#808080", lw=0.8)
    ax.text(18.2, 45.3, "MPI world (mpi4py): ranks, model groups, dispatch, gather", ha="left", va="top",
            fontsize=8, fontweight="bold")
    _box(ax, 18.5, 28.5, 16, 13.5, "rank 0: orchestrator\n(optional: +O;\nelse inline on the\nfirst model rank)\n"
         "read + tokenize,\ndispatch, gather,\nwrite outputs", fc=orange, ec=dorange, size=7)
    ax.text(26.5, 21.5, "prompts → groups\n(dynamic / static)\nresults → rank 0\n(input order)", ha="center",
            va="center", fontsize=7, color=dorange, linespacing=1.15)
    _box(ax, 18.5, 3, 16, 10, "torch.distributed:\nNCCL (GPU) /\ngloo (CPU):\nthe model's\ncollectives", fc=green,
         ec=dgreen, size=7)

    # replicas: model groups of G ranks, optionally P pipeline stages
    for y0, label in ((24.5, "replica 1"), (3, "replica R")):
        _box(ax, 38, y0, 36.5, 18, "", fc=blue, ec=dblue)
        ax.text(39, y0 + 17.4, f"{label} (model group): P stages × G ranks", ha="left", va="top", fontsize=7,
                fontweight="bold")
        for s in range(2):
            sx = 39.3 + s * 18.3
            _box(ax, sx, y0 + 6.3, 15.6, 8, "", fc="#ffffff", ec=dblue, lw=0.6)
            ax.text(sx + 7.8, y0 + 13.7, f"stage {'1' if s == 0 else 'P'}", ha="center", va="top", fontsize=7)
            for k, r in enumerate(("0", "1", "…", "G-1")):
                _box(ax, sx + 0.7 + k * 3.6, y0 + 7.0, 3.2, 3.6, r, fc="#c9d8f2", ec=dblue, lw=0.5, size=6.5)
        _arrow(ax, (54.9, y0 + 10.3), (57.6, y0 + 10.3), color=dblue)
        ax.text(56.25, y0 + 3.6, "tp: heads, experts split; attention, MoE all-reduce\n"
                "dpa: data-parallel attention, experts all-to-all\n"
                "P > 1: p2p send / recv between stages", ha="center", va="center", fontsize=6.5,
                linespacing=1.2)
    ax.text(56.25, 22.9, "⋮", ha="center", va="center", fontsize=9)
    _arrow(ax, (34.5, 36), (38, 35), color=dorange, style="<|-|>")
    _arrow(ax, (34.5, 31), (38, 14), color=dorange, style="<|-|>")
    _arrow(ax, (34.5, 8), (38, 8), color=dgreen, style="<|-|>")

    # observability
    _arrow(ax, (75.5, 40), (78, 40))
    ys = (35.5, 25, 14.5, 4)
    texts = ("every rank: timers\n(compute, comm, io, wait)\n→ rank{r:05d}.h5",
             "rank 0 merges the rank\nfiles → merged.h5",
             "python -m traces.merge:\n+ torch.profiler, nsys,\nperf, sacct, NCCL log",
             "python -m traces.report:\ntables, plots;\nmake paper")
    for y, t in zip(ys, texts):
        _box(ax, 78, y, 21.5, 8.5, t, fc=grey, size=7)
    for a, b in zip(ys[:-1], ys[1:]):
        _arrow(ax, (88.75, a), (88.75, b + 8.5))
    return {"file": _save(fig, out_dir, "arch"), "sources": [],
            "caption": "Structure of a run (docs/architecture.md): one SPMD program per rank started by srun or "
                       "mpirun; mpi4py's world holds an optional dedicated orchestrator rank and replicas of model "
                       "groups (tp: tensor parallel with all-reduces, dpa: data-parallel attention with expert "
                       "all-to-all; optional pipeline stages), torch.distributed carries the collectives, and every "
                       "rank's HDF5 timer events are merged with the profilers' data into reports, plots and this "
                       "paper."}


# 2. decode step time against the floor --------------------------------------------------------------------

def fig_decode_floor(out_dir: Path) -> dict:
    d = _load(BENCH)
    rows = [r for r in d["rows"] if r.get("tag") in BENCH_TAGS]
    fig, (a, b) = plt.subplots(1, 2, figsize=WIDE)
    floors: dict[tuple, str] = {}
    for i, tag in enumerate(BENCH_TAGS):
        rs = sorted((r for r in rows if r["tag"] == tag), key=lambda r: r["batch"])
        x = [r["batch"] for r in rs]
        c, m = PALETTE[i], ("o" if "1gpu" in tag else "s")
        a.plot(x, [r["decode_ms_step"] for r in rs], marker=m, color=c, label=tag)
        b.plot(x, [r["decode_vs_floor"] for r in rs], marker=m, color=c, label=tag)
        fl = tuple(round(r["decode_floor_ms"], 9) for r in rs)
        if fl not in floors:  # hf and deepspeed read what native bf16 on as many GPUs reads
            floors[fl] = tag
            a.plot(x, [r["decode_floor_ms"] for r in rs], ls="--", lw=0.8, color=c, alpha=0.8)
    batches = sorted({r["batch"] for r in rows})
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(batches, [str(x) for x in batches])
        ax.set_xlabel("batch (sequences per decode step)")
        ax.grid(True, which="major", lw=0.3, alpha=0.5)
    a.set_ylabel("decode step (ms)")
    b.set_ylabel("decode step / HBM floor (×)")
    b.axhline(1.0, color="black", lw=0.6)
    handles = [Line2D([], [], color=PALETTE[i], marker="o" if "1gpu" in t else "s", label=t)
               for i, t in enumerate(BENCH_TAGS)]
    handles.append(Line2D([], [], color="#404040", ls="--", lw=0.8,
                          label="HBM floor, dashed (hf, deepspeed: that of native bf16 on as many GPUs)"))
    _tag(a, "(a)")
    _tag(b, "(b)")
    fig.tight_layout(w_pad=1.5, rect=(0, 0, 1, 0.87))
    fig.legend(handles=handles, loc="upper center", ncol=4, handlelength=2.2, bbox_to_anchor=(0.5, 1.0),
               columnspacing=1.2)
    return {"file": _save(fig, out_dir, "decode_floor"), "sources": [_rel(BENCH)],
            "caption": f"Decode step time of the full-width slice against batch on {d['gpu']} for our native engine "
                       f"(bf16 and FP8 weights, one and two GPUs), transformers and DeepSpeed, (a) in ms with each "
                       f"configuration's HBM floor (bytes a step must read over the measured copy rate of "
                       f"{d['ceilings']['copy_gbps']:.0f} GB/s, dashed) and (b) as a multiple of that floor, from "
                       f"{_rel(BENCH)}."}


# 3. scaling efficiency ------------------------------------------------------------------------------------

def _family(layout: str) -> str:
    if layout.endswith("+O"):
        return "dedicated orchestrator (+O)"
    if re.match(r"^\d+x", layout):
        return "replicas"
    if "P" in layout:
        return "pipeline stages"
    return "model group"


FAMILIES = ("model group", "pipeline stages", "replicas", "dedicated orchestrator (+O)")
FAMILY_SHORT = {"model group": "group", "pipeline stages": "pipeline", "replicas": "replicas",
                "dedicated orchestrator (+O)": "orchestrator"}


def fig_scaling(out_dir: Path) -> dict:
    d = _load(SWEEP)
    eff: dict[str, dict] = {}
    for series in d["series"].values():
        for r in series:
            eff.setdefault(r["layout"], r)
    base = [n for n, r in eff.items() if r["efficiency"] == 1.0 and r["ranks"] == 1]
    layouts = [n for n in eff if n not in base]
    fig, ax = plt.subplots(figsize=SINGLE)
    x, ticks, labels = 0.0, [], []
    for fi, fam in enumerate(FAMILIES):
        names = sorted((n for n in layouts if _family(n) == fam), key=lambda n: (eff[n]["ranks"], n))
        if not names:
            continue
        start = x
        for n in names:
            r, run = eff[n], d["runs"].get(n, {})
            warm = bool(run.get("warmup"))
            ax.bar(x, r["efficiency"], width=0.75, zorder=2, color=PALETTE[fi],
                   ec=PALETTE[fi] if warm else "black", lw=0.4, hatch=None if warm else "////")
            ax.text(x, r["efficiency"] + 0.02, f"{r['efficiency']:.2f}", ha="center", va="bottom", fontsize=6,
                    bbox={"fc": "white", "ec": "none", "pad": 0.2}, zorder=4)
            ticks.append(x)
            labels.append(n)
            x += 1
        ax.text((start + x - 1) / 2, -0.2, FAMILY_SHORT[fam], transform=ax.get_xaxis_transform(), ha="center",
                va="top", fontsize=6.5, color=PALETTE[fi], fontweight="bold")
        x += 0.6
    ax.axhline(1.0, color="black", lw=0.7, ls="--")
    ax.set_xticks(ticks, labels, fontsize=6.5, rotation=35, ha="right", rotation_mode="anchor")
    ax.set_xlim(-0.6, x - 0.9)
    top = max(r["efficiency"] for r in eff.values())
    ax.set_ylim(0, max(1.25, top + 0.12))
    ax.set_ylabel(f"efficiency vs {base[0]} (per GPU)")
    ax.legend(handles=[Patch(fc="white", ec="black", hatch="////", lw=0.4, label="no warm-up run"),
                       Line2D([], [], color="black", ls="--", lw=0.7, label=f"{base[0]} = 1")],
              loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, handlelength=1.8, columnspacing=1.5)
    ax.grid(True, axis="y", lw=0.3, alpha=0.5)
    return {"file": _save(fig, out_dir, "scaling"), "sources": [_rel(SWEEP)],
            "caption": f"Generation throughput per model GPU relative to one GPU ({base[0]}) for model groups, "
                       f"pipeline stages, replicas and a dedicated orchestrator rank, on one host of {d['gpu']} GPUs "
                       f"(checkpoint {d['checkpoint']}, {d['prompts']} prompts, {d['new_tokens']} new tokens, batch "
                       f"{d['batch_size']}), from {_rel(SWEEP)}; hatched bars"
                       f"{'' if d['runs'][base[0]].get('warmup') else ' and the baseline'} were measured without a "
                       f"warm-up run."}


# 4. compute / communication split of decode, per rank ------------------------------------------------------

def fig_comm_split(out_dir: Path) -> dict:
    d = _load(MARKS)
    runs = d["runs"]
    fig, ax = plt.subplots(figsize=WIDE)
    x, ticks, labels, groups = 0.0, [], [], []
    for name, run in runs.items():
        per = run.get("per_rank")
        if not per:
            continue
        dec = {int(r): v["decode"] for r, v in per.items() if v["decode"]["compute"] + v["decode"]["comm"] > 0}
        if not dec or not any(v["comm"] > 0 for v in dec.values()):
            continue  # no collectives in this layout's decode (replicas of one GPU)
        start = x
        for r in sorted(dec):
            c, m = dec[r]["compute"], dec[r]["comm"]
            ax.bar(x, c, width=0.75, color=COLORS["compute"], lw=0)
            ax.bar(x, m, width=0.75, bottom=c, color=COLORS["comm"], lw=0)
            ax.text(x, c + m, f"{100 * m / (c + m):.0f}%", ha="center", va="bottom", fontsize=5.5)
            ticks.append(x)
            labels.append(f"r{r}")
            x += 1
        groups.append(((start + x - 1) / 2, name, run.get("decode_comm_pct")))
        x += 0.8
    ax.set_xticks(ticks, labels, fontsize=6)
    for gx, name, pct in groups:
        lab = name if pct is None else f"{name}: {pct:.0f}%"
        ax.text(gx, -0.13, lab, transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=6.5)
    ax.set_xlim(-0.7, x - 0.6)
    ax.set_ylabel("decode time of the run (s)")
    ax.legend(handles=[Patch(color=COLORS["compute"], label="compute"),
                       Patch(color=COLORS["comm"], label="communication (above a bar: its share of the rank's "
                                                          "decode; below a layout: of the layout's decode)")],
              loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2)
    ax.grid(True, axis="y", lw=0.3, alpha=0.5)
    fig.subplots_adjust(bottom=0.25)
    return {"file": _save(fig, out_dir, "comm_split"), "sources": [_rel(MARKS)],
            "caption": f"Decode time of each rank over the sweep split into compute and communication, timed with "
                       f"layer-level marks, for the layouts whose decode step has collectives (model groups, pipeline "
                       f"stages, replicas of groups; the orchestrator rank of +O runs no model and is left out), on "
                       f"{d['gpu']} GPUs, from {_rel(MARKS)}."}


# 5. per-rank timeline -------------------------------------------------------------------------------------

def _events(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        ev = f["events"][:]
    return np.sort(ev, order="start_ns", kind="stable")


def _step_runs(ev: np.ndarray) -> list[tuple[int, int, int]]:
    """(step, first start, last end) of each run of consecutive decode events with the same step, in time order."""
    dec = ev[ev["phase"] == b"decode"]
    runs: list[list[int]] = []
    for e in dec:
        s, t0, t1 = int(e["step"]), int(e["start_ns"]), int(e["start_ns"] + e["dur_ns"])
        if runs and runs[-1][0] == s:
            runs[-1][1], runs[-1][2] = min(runs[-1][1], t0), max(runs[-1][2], t1)
        else:
            runs.append([s, t0, t1])
    return [tuple(r) for r in runs]


def _gantt(ax, ev: np.ndarray, t0: int, t1: int, ranks: list[int], labels: dict[int, str]) -> set[str]:
    kinds = set()
    sel = ev[(ev["start_ns"] + ev["dur_ns"] > t0) & (ev["start_ns"] < t1) & np.isin(ev["rank"], ranks)]
    for k in ("compute", "comm", "io", "wait"):
        e = sel[sel["kind"] == k.encode()]
        if not len(e):
            continue
        kinds.add(k)
        for r in ranks:
            er = e[e["rank"] == r]
            if not len(er):
                continue
            y = ranks.index(r)
            xs = [((max(s, t0) - t0) / 1e6, (min(s + du, t1) - max(s, t0)) / 1e6)
                  for s, du in zip(er["start_ns"].astype(np.int64), er["dur_ns"].astype(np.int64))]
            ax.broken_barh(xs, (y - 0.35, 0.7), facecolors=COLORS[k], edgecolors="none")
    ax.set_yticks(range(len(ranks)), [labels[r] for r in ranks])
    ax.set_ylim(len(ranks) - 0.5, -0.75)  # rank 0 on top, room above it for the step labels
    ax.set_xlim(0, (t1 - t0) / 1e6)
    ax.set_xlabel("time from window start (ms)")
    return kinds


def fig_timeline(out_dir: Path) -> dict:
    fig, (a, b) = plt.subplots(1, 2, figsize=WIDE, gridspec_kw={"width_ratios": (1.15, 1)})
    kinds = set()

    # (a) one model group of two GPUs: decode steps 2..1+N of the first batch (step 1 compiles)
    ev = _events(TRACE_TP)
    with h5py.File(TRACE_TP, "r") as f:
        gpu_a = str(f["ranks/0"].attrs.get("cuda_device", ""))
        world = json.loads(f["ranks/0"].attrs["world"])
    steps = _step_runs(ev)[1:1 + TIMELINE_STEPS]
    t0, t1 = steps[0][1], steps[-1][2]
    ranks = sorted(int(r) for r in np.unique(ev["rank"]))
    kinds |= _gantt(a, ev, t0, t1, ranks, {r: f"rank {r}" for r in ranks})
    for s, s0, s1 in steps:
        a.axvline((s0 - t0) / 1e6, color="#909090", lw=0.4, ls=":")
        a.text(((s0 + s1) / 2 - t0) / 1e6, -0.42, f"decode step {s}", ha="center", va="bottom", fontsize=6)

    # (b) a dedicated orchestrator (rank 0, CPU) and one model rank: the first dispatch between batches
    ev2 = _events(TRACE_ORCH)
    with h5py.File(TRACE_ORCH, "r") as f:
        gpu_b = str(f["ranks/1"].attrs.get("cuda_device", ""))
    req = ev2[(ev2["rank"] == 1) & (ev2["name"] == b"dispatch.request") & (ev2["phase"] == b"other")][0]
    runs = _step_runs(ev2)
    before = [r for r in runs if r[2] <= req["start_ns"]][-TIMELINE_STEPS:]
    after = [r for r in runs if r[1] >= req["start_ns"]][:TIMELINE_STEPS]
    u0, u1 = before[0][1], after[-1][2]
    kinds |= _gantt(b, ev2, u0, u1, [0, 1], {0: "rank 0\norchestrator", 1: "rank 1\nmodel"})
    pre = ev2[(ev2["rank"] == 1) & (ev2["phase"] == b"prefill") & (ev2["start_ns"] > req["start_ns"])
              & (ev2["start_ns"] < after[0][1])]
    marks = [("decode", before[0][1], before[-1][2]), ("prefill", int(pre["start_ns"].min()),
                                                       int((pre["start_ns"] + pre["dur_ns"]).max())),
             ("decode", after[0][1], after[-1][2])]
    for (text, s0, s1), ha in zip(marks, ("left", "center", "right")):
        xt = {"left": s0, "center": (s0 + s1) / 2, "right": s1}[ha]
        b.text((xt - u0) / 1e6, -0.42, text, ha=ha, va="bottom", fontsize=6)
    b.annotate("dispatch", xy=((int(req["start_ns"]) - u0) / 1e6, 0.65), xytext=(12, 0.1), fontsize=5.5,
               textcoords=("offset points", "data"), arrowprops={"arrowstyle": "-", "lw": 0.5})
    handles = [Patch(color=COLORS[k], label=k) for k in ("compute", "comm", "io", "wait") if k in kinds]

    _tag(a, f"(a) G{world['group_size']}, {world['backend'].upper()}, eager decode")
    _tag(b, "(b) G1+O, CUDA-graph decode")
    for ax in (a, b):
        ax.spines["left"].set_visible(False)
        ax.tick_params(axis="y", length=0)
    fig.tight_layout(w_pad=1.5, rect=(0, 0, 1, 0.93))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), bbox_to_anchor=(0.5, 1.0),
               handlelength=1.2, columnspacing=1.0)
    return {"file": _save(fig, out_dir, "timeline"), "sources": [_rel(TRACE_TP), _rel(TRACE_ORCH)],
            "caption": f"Per-rank timer events on the aligned clock: (a) {len(steps)} eager decode steps of one "
                       f"tensor-parallel group of {world['group_size']} {gpu_a} GPUs with per-layer compute and "
                       f"collectives ({_rel(TRACE_TP)}); (b) a dedicated orchestrator (rank 0, CPU) and one model "
                       f"rank on {gpu_b} around the first request for prompts between batches: the last and first "
                       f"{len(after)} CUDA-graph decode steps of two batches and the prefill between them "
                       f"({_rel(TRACE_ORCH)})."}


# 6. serving: static against continuous batching ----------------------------------------------------------

def _serve_rows(path: Path) -> tuple[dict, list[tuple[str, float | None, str]]]:
    d = _load(path)
    rows = []
    # a run without --fp8-prefill beside one with it ran the default: w8a8 on a GPU with FP8 tensor cores
    fp8_ab = any("--fp8-prefill" in r.get("command", "") for r in d["runs"])
    for r in d["runs"]:
        s, name = r.get("summary"), r["name"]
        if fp8_ab and r["batching"] == "continuous" and "--fp8-prefill" not in r.get("command", ""):
            name += " (w8a8)"
        if s:
            rows.append((name, s["output_tokens_per_s"], r["batching"]))
        else:
            err = r.get("error", "")
            rows.append((name, None, "out of memory" if "OutOfMemory" in err else "failed"))
    return d, rows


def fig_serve(out_dir: Path) -> dict:
    (d1, r1), (d2, r2) = _serve_rows(SERVE_400), _serve_rows(SERVE_128)
    fig, ax = plt.subplots(figsize=SINGLE)
    y, yt, yl, heads = 0, [], [], []
    colors = {"static": PALETTE[7], "continuous": PALETTE[0]}
    top = max(v for _, v, _ in r1 + r2 if v is not None)
    for d, rows in ((d1, r1), (d2, r2)):
        call = re.search(r"-(r\d+)\.json$", (SERVE_400 if d is d1 else SERVE_128).name)
        heads.append((y - 0.75, f"{d['workload']['n']} prompts" + (f" (call {call.group(1)})" if call else "")))
        for name, v, what in rows:
            if v is None:
                ax.text(top * 0.01, y, what, va="center", ha="left", fontsize=5.5, color="#b03030", style="italic")
            else:
                ax.barh(y, v, height=0.7, color=colors.get(what, PALETTE[2]))
                ax.text(v + top * 0.01, y, f"{v:,.0f}", va="center", ha="left", fontsize=5.5)
            yt.append(y)
            yl.append(name)
            y += 1
        y += 1.2
    ax.set_yticks(yt, yl, fontsize=6)
    for hy, text in heads:
        ax.text(0, hy, text, ha="left", va="center", fontsize=6, fontweight="bold")
    ax.set_ylim(y - 1.5, -1.4)
    ax.set_xlim(0, top * 1.18)
    ax.set_xlabel("output tokens/s (one GPU)")
    ax.legend(handles=[Patch(color=colors["static"], label="static batches"),
                       Patch(color=colors["continuous"], label="continuous batching")], loc="lower center",
              bbox_to_anchor=(0.5, 1.0), ncol=2)
    ax.grid(True, axis="x", lw=0.3, alpha=0.5)
    ax.tick_params(axis="y", length=0)
    return {"file": _save(fig, out_dir, "serve"), "sources": [_rel(SERVE_400), _rel(SERVE_128)],
            "caption": f"Output tokens/s of the FP8 slice serving chat-like workloads on one {d1['machine']}: static "
                       f"batches against continuous batching for {d1['workload']['n']} prompts ({_rel(SERVE_400)}; "
                       f"continuous-torch: torch decode attention), and for {d2['workload']['n']} prompts continuous "
                       f"batching with the default FP8 prefill against --fp8-prefill w8a16 ({_rel(SERVE_128)}); "
                       f"runs that did not finish are named with their error."}


# 7. performance-model projection --------------------------------------------------------------------------

def _proj_family(layout: str) -> str:
    if re.match(r"^\d+x", layout):
        return "replicas"
    return "pipeline stages" if "xP" in layout else "one model group"


def fig_projection(out_dir: Path) -> dict:
    m = _load(MODEL)
    per_node = {r["gpus"] // r["nodes"] for r in m["projection"]}
    assert len(per_node) == 1, per_node
    node_gpus = per_node.pop()
    fig, (a, b, c) = plt.subplots(1, 3, figsize=WIDE, gridspec_kw={"width_ratios": (1.15, 1.15, 0.95)})
    fams = ("one model group", "pipeline stages", "replicas")
    gpus = sorted({r["gpu"] for r in m["projection"]}, key=lambda g: (g != "H200", g))
    styles = {g: ls for g, ls in zip(gpus, ("-", "--", ":"))}
    nofit = {g: mk for g, mk in zip(gpus, ("x", "+", "1"))}
    for fi, fam in enumerate(fams):
        for g in gpus:
            rs = sorted((r for r in m["projection"] if r["gpu"] == g and r["batch"] == PROJ_BATCH
                         and _proj_family(r["layout"]) == fam), key=lambda r: r["nodes"])
            a.plot([r["nodes"] for r in rs if r["fits"]], [r["tokens_per_s"] for r in rs if r["fits"]],
                   ls=styles[g], marker="o", color=PALETTE[fi], label=fam if g == gpus[0] else None)
            nf = [r["nodes"] for r in rs if not r["fits"]]
            if nf:  # (an empty unclipped line would stretch the tight bounding box to the origin)
                a.plot(nf, [0] * len(nf), ls="none", marker=nofit[g], color=PALETTE[fi], clip_on=False, ms=4)
    nodes_a = sorted({r["nodes"] for r in m["projection"]})
    a.set_xticks(nodes_a)
    a.set_xlabel(f"nodes ({node_gpus} GPUs each)")
    a.set_ylabel("projected decode tokens/s")
    a.set_ylim(bottom=0)

    lay = [r for r in m["layouts"] if r["gpus_per_node"] == node_gpus]
    lb = sorted({r["batch"] for r in lay})
    for fi, fam in enumerate(("tp", "dpa")):
        for g in gpus:
            rs = sorted((r for r in lay if r["gpu"] == g and r["family"] == fam), key=lambda r: r["nodes"])
            b.plot([r["nodes"] for r in rs if r["fits"]], [r["tokens_per_s"] for r in rs if r["fits"]],
                   ls=styles[g], marker="o", color=PALETTE[4 + fi],
                   label=("tp (+ pipeline stages)" if fam == "tp" else "dpa (expert parallel)")
                   if g == gpus[0] else None)
            nf = [r["nodes"] for r in rs if not r["fits"]]
            if nf:  # (an empty unclipped line would stretch the tight bounding box to the origin)
                b.plot(nf, [0] * len(nf), ls="none", marker=nofit[g], color=PALETTE[4 + fi], clip_on=False, ms=4)
    b.set_xticks(sorted({r["nodes"] for r in lay}))
    b.set_xlabel(f"nodes ({node_gpus} GPUs each)")
    b.set_ylabel("projected decode tokens/s")
    b.set_ylim(bottom=0)

    tags = list(dict.fromkeys(v["tag"] for v in m["validation"]))
    prefix = os.path.commonprefix(tags)  # the legend names what differs; the caption says which runs
    lo = min(min(v["measured_ms"], v["predicted_ms"]) for v in m["validation"])
    hi = max(max(v["measured_ms"], v["predicted_ms"]) for v in m["validation"])
    c.plot([lo * 0.8, hi * 1.25], [lo * 0.8, hi * 1.25], color="black", lw=0.6, ls="--", label="y = x")
    for i, t in enumerate(tags):
        vs = [v for v in m["validation"] if v["tag"] == t]
        c.plot([v["predicted_ms"] for v in vs], [v["measured_ms"] for v in vs], ls="none", marker="os^D"[i % 4],
               color=PALETTE[i], label=t.removeprefix(prefix).replace("-", " ") or t, ms=3)
    c.set_xscale("log")
    c.set_yscale("log")
    c.set_xlabel("predicted step (ms)")
    c.set_ylabel("measured step (ms)")
    c.legend(loc="lower right", handletextpad=0.3, borderaxespad=0.2, fontsize=6, labelspacing=0.3)

    ga = [Line2D([], [], color="#404040", ls=styles[g], marker="o", label=f"{g} (projected)") for g in gpus]
    gx = [Line2D([], [], color="#404040", ls="none", marker=nofit[g], label=f"{g}: does not fit") for g in gpus]
    a.legend(loc="upper left")
    b.legend(loc="upper left")
    for ax, t in ((a, f"(a) batch {PROJ_BATCH}"), (b, f"(b) batch {'/'.join(map(str, lb))}, one instance"),
                  (c, "(c) measured vs model")):
        _tag(ax, t)
        ax.grid(True, lw=0.3, alpha=0.5)
    fig.tight_layout(w_pad=0.8, rect=(0, 0, 1, 0.92))
    fig.legend(handles=ga + gx, loc="upper center", ncol=4, bbox_to_anchor=(0.5, 1.0), handlelength=2.6)
    return {"file": _save(fig, out_dir, "projection"), "sources": [_rel(MODEL)],
            "caption": f"The decode performance model fitted on one {m['gpu']} GPU: projected tokens/s of the full "
                       f"model against nodes of {node_gpus} GPUs (H200 solid, H100 dashed; × and + where it does not "
                       f"fit), "
                       f"(a) at batch {PROJ_BATCH} for one model group, pipeline stages and replicas, (b) at batch "
                       f"{'/'.join(map(str, lb))} for the best tp and dpa layout of one model instance, and (c) the "
                       f"measured two-GPU slice steps against the model's prediction, from {_rel(MODEL)}."}


# 8. FP8 x FP8 GEMMs against bf16 --------------------------------------------------------------------------

def _size(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def fig_fp8(out_dir: Path) -> dict:
    d = _load(FP8)
    cases = d["cases"]
    dense = [c for c in cases if "tokens" not in c]
    grouped = [c for c in cases if "tokens" in c]
    variants = ("w8a8", "w8a8-tma", "scaled_mm")
    vcol = {"w8a8": PALETTE[0], "w8a8-tma": PALETTE[2], "scaled_mm": PALETTE[1]}
    fig, axes = plt.subplots(1, 2, figsize=WIDE, gridspec_kw={"width_ratios": (2.3, 1)}, sharey=True)
    for ax, cs, key, unit in ((axes[0], dense, "rows", "rows"), (axes[1], grouped, "tokens", "tokens")):
        gemms = list(dict.fromkeys(c["gemm"] for c in cs))
        vs = [v for v in variants if any(c["variant"] == v for c in cs)]
        ms = {(c["gemm"], c[key], c["variant"]): c["ms"] for c in cs}
        x, ticks, labels = 0.0, [], []
        w = 0.8 / len(vs)
        for g in gemms:
            sizes = sorted({c[key] for c in cs if c["gemm"] == g})
            start = x
            for s in sizes:
                for i, v in enumerate(vs):
                    if (g, s, v) in ms and (g, s, "bf16") in ms:
                        ax.bar(x + (i - (len(vs) - 1) / 2) * w, ms[(g, s, "bf16")] / ms[(g, s, v)], width=w,
                               color=vcol[v], lw=0)
                ticks.append(x)
                labels.append(_size(s))
                x += 1
            ax.text((start + x - 1) / 2, -0.125, g, transform=ax.get_xaxis_transform(), ha="center", va="top",
                    fontsize=6.5)
            x += 0.5
        ax.set_xticks(ticks, labels, fontsize=5.5)
        ax.set_xlim(-0.7, x - 0.8)
        ax.axhline(1.0, color="black", lw=0.7, ls="--")
        ax.text(-0.01, -0.045, unit, transform=ax.transAxes, ha="right", va="top", fontsize=5.5)
        ax.grid(True, axis="y", lw=0.3, alpha=0.5)
    axes[0].set_ylabel("speed-up over bf16 GEMM (×)")
    _tag(axes[0], "(a) dense GEMMs")
    _tag(axes[1], "(b) grouped expert GEMMs")
    shown = [v for v in variants if any(c["variant"] == v for c in cases)]
    fig.tight_layout(w_pad=1.0, rect=(0, 0.04, 1, 0.92))
    fig.legend(handles=[Patch(color=vcol[v], label=v) for v in shown], loc="upper center", ncol=len(shown),
               bbox_to_anchor=(0.5, 1.0))
    return {"file": _save(fig, out_dir, "fp8"), "sources": [_rel(FP8)],
            "caption": f"Speed of FP8 x FP8 GEMMs (activations quantized to e4m3 in blocks: our Triton w8a8 "
                       f"kernel, its TMA launch, and torch._scaled_mm) over the dequantized bf16 GEMM of the same "
                       f"shape on one {d['gpu']}, (a) for the dense GEMMs of a DeepSeek-V3 layer by rows and (b) "
                       f"for the grouped expert GEMMs by tokens, from {_rel(FP8)}."}


FIGURES = {"arch": fig_arch, "decode_floor": fig_decode_floor, "scaling": fig_scaling, "comm_split": fig_comm_split,
           "timeline": fig_timeline, "serve": fig_serve, "projection": fig_projection, "fp8": fig_fp8}


def make(out_dir: Path) -> dict[str, dict]:
    """Write every figure's PNG into ``out_dir``; return {name: {"file", "sources", "caption"}}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = {}
    with plt.rc_context(STYLE):
        for name, fn in FIGURES.items():
            made[name] = fn(out_dir)
    return made


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m docs.figures", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "build" / "docs" / "figures")
    a = p.parse_args(argv)
    for name, fig in make(a.out).items():
        path = a.out / fig["file"]
        print(f"wrote {path} ({path.stat().st_size} bytes) from {', '.join(fig['sources']) or 'no result file'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
