"""Report sections on what the importers added to merged.h5: NCCL transport, device kernels, perf, sacct.

Each section reads its group of the merged file (``t.path``) and says "(none)" when the run has none.
Device kernels come from nsys (``nsys/<r>/kernels``) or torch.profiler (``torch/<r>/events`` with cat
"kernel"); NCCL's kernels (names starting "nccl") are the collectives as the GPU ran them. perf samples
are attributed to the phase of the rank's latest event that started before the sample.
"""
from __future__ import annotations

import json
from collections import Counter

import h5py
import numpy as np

from traces.table import format_table, si

TOP = 8


def nccl_section(t) -> str:
    """NCCL version, network and transports per rank, from logs/rank*.log."""
    with h5py.File(t.path, "r") as f:
        if "nccl" not in f:
            return "NCCL transport\n  (none: no NCCL log under logs/; launch/rank.sh writes it; gloo runs have none)"
        rows = [[r, ", ".join(f"{k} x{v}" for k, v in json.loads(g.attrs["transports"]).items()) or "-",
                 str(g.attrs.get("network", ""))] for r, g in sorted(f["nccl"].items(), key=lambda x: int(x[0]))]
        head = (f"NCCL transport: {f.attrs.get('nccl_transport', '') or '?'} (NCCL "
                f"{f.attrs.get('nccl_version', '') or '?'}, network {f.attrs.get('nccl_network', '') or '-'})")
    return head + "\n" + format_table(["rank", "channels by transport", "network"], rows)


def _kernels(f: h5py.File) -> dict[int, tuple[str, np.ndarray]]:
    """Rank → (source, kernel table with name, dur_ns, nccl) from nsys or torch.profiler."""
    out = {}
    for r, g in f.get("torch", {}).items():
        ev = g["events"][()]
        out[int(r)] = ("torch", ev[ev["cat"] == b"kernel"])
    for r, g in f.get("nsys", {}).items():
        if "kernels" in g:
            out[int(r)] = ("nsys", g["kernels"][()])
    return dict(sorted(out.items()))


def kernel_section(t) -> str:
    """Per rank: GPU kernel time, NCCL kernel time and share; the top kernels over all ranks."""
    with h5py.File(t.path, "r") as f:
        kernels = _kernels(f)
        cpu = {int(r): g["events"][()] for r, g in f.get("torch", {}).items()}
    if not kernels or not any(len(k) for _, k in kernels.values()):
        return _cpu_ops(cpu) if cpu else "device kernels (nsys / torch.profiler)\n  (none)"
    rows, total = [], Counter()
    for r, (src, k) in kernels.items():
        ms, nccl_ms = k["dur_ns"].sum() / 1e6, k["dur_ns"][k["nccl"]].sum() / 1e6
        rows.append([str(r), src, str(len(k)), f"{ms:.3f}", f"{nccl_ms:.3f}",
                     f"{100 * nccl_ms / ms:.1f}" if ms else "0.0"])
        for name, d in zip(k["name"], k["dur_ns"]):
            total[name.decode(errors="replace")] += int(d)
    heads = ["rank", "source", "kernels", "kernel ms", "nccl ms", "nccl %"]
    top = [[n[:80], f"{d / 1e6:.3f}"] for n, d in total.most_common(TOP)]
    return ("device kernels in the profiler window (nsys / torch.profiler)\n" + format_table(heads, rows)
            + "\n  top kernels (all ranks)\n" + format_table(["kernel", "ms"], top))


def _cpu_ops(cpu: dict) -> str:
    """torch.profiler on CPU: the window and the top ops by inclusive time (nested ops overlap)."""
    rows, total = [], Counter()
    for r, ev in sorted(cpu.items()):
        ops = ev[ev["cat"] == b"cpu_op"]
        window = (ev["start_ns"] + ev["dur_ns"]).max() - ev["start_ns"].min() if len(ev) else 0
        rows.append([str(r), str(len(ops)), f"{window / 1e6:.3f}"])
        for name, d in zip(ops["name"], ops["dur_ns"]):
            total[name.decode(errors="replace")] += int(d)
    top = [[n[:80], f"{d / 1e6:.3f}"] for n, d in total.most_common(TOP)]
    return ("torch.profiler CPU ops in the window\n" + format_table(["rank", "cpu ops", "window ms"], rows)
            + "\n  top ops by inclusive time (all ranks)\n" + format_table(["op", "ms"], top))


def perf_stat_section(t) -> str:
    """perf stat counters per rank (software events where hardware counters are not readable)."""
    with h5py.File(t.path, "r") as f:
        stats = {int(r): g["stat"][()] for r, g in f.get("perf", {}).items() if "stat" in g}
    if not stats:
        return "perf stat\n  (none)"
    events = list(dict.fromkeys(e.decode() for s in stats.values() for e in s["event"]))
    rows = []
    for r, s in sorted(stats.items()):
        val = {e.decode(): (v, ok) for e, v, ok in zip(s["event"], s["value"], s["supported"])}
        rows.append([str(r)] + [(f"{val[e][0]:.6g}" if val[e][1] else "n/a") if e in val else "" for e in events])
    units = {e.decode(): u.decode() for s in stats.values() for e, u in zip(s["event"], s["unit"])}
    heads = ["rank"] + [f"{e} ({units[e]})" if units.get(e) else e for e in events]
    return "perf stat (whole process)\n" + format_table(heads, rows)


def sample_phases(t, rank: int, samples: np.ndarray) -> np.ndarray:
    """Phase name (bytes) of each sample: the phase of the latest event started before it, or b"outside"."""
    ev = t.events[t.events["rank"] == rank]
    ev = ev[np.argsort(ev["start_ns"], kind="stable")]
    out = np.full(len(samples), b"outside", dtype="S8")
    if not len(ev):
        return out
    i = np.searchsorted(ev["start_ns"], samples["start_ns"], side="right") - 1
    inside = (i >= 0) & (samples["start_ns"] <= (ev["start_ns"] + ev["dur_ns"]).max())
    out[inside] = ev["phase"][i[inside]]
    return out


def perf_samples_section(t) -> str:
    """perf record samples per rank and phase, and the top symbols while decoding."""
    with h5py.File(t.path, "r") as f:
        samples = {int(r): g["samples"][()] for r, g in f.get("perf", {}).items() if "samples" in g}
    if not samples:
        return "perf samples\n  (none)"
    phases = ("load", "prefill", "decode", "other", "outside")
    rows, top = [], Counter()
    for r, s in sorted(samples.items()):
        ph = sample_phases(t, r, s)
        counts = Counter(p.decode() for p in ph)
        rows.append([str(r), str(len(s))] + [f"{100 * counts[p] / max(len(s), 1):.1f}" for p in phases])
        for sym in s["symbol"][ph == b"decode"]:
            top[sym.decode(errors="replace")] += 1
    n_dec = max(sum(top.values()), 1)
    sym_rows = [[n[:80], f"{100 * c / n_dec:.1f}"] for n, c in top.most_common(TOP)]
    return ("perf samples by phase (% of each rank's samples)\n"
            + format_table(["rank", "samples"] + [f"{p} %" for p in phases], rows)
            + "\n  top symbols while decoding (all ranks)\n" + format_table(["symbol", "%"], sym_rows))


def sacct_section(t) -> str:
    """SLURM accounting per job step: elapsed, CPU time, max RSS."""
    with h5py.File(t.path, "r") as f:
        if "sacct" not in f:
            return "sacct\n  (none)"
        steps = f["sacct/steps"][()]
    rows = [[s["step"].decode(), s["name"].decode(), s["state"].decode(), f"{s['elapsed_s']:.1f}",
             f"{s['cpu_s']:.1f}", si(s["max_rss_bytes"], "B") if s["max_rss_bytes"] >= 0 else "",
             str(s["ntasks"]) if s["ntasks"] >= 0 else ""] for s in steps]
    heads = ["step", "name", "state", "elapsed s", "cpu s", "max RSS", "tasks"]
    return "sacct (SLURM accounting)\n" + format_table(heads, rows, n_left=3)


SECTIONS = (nccl_section, kernel_section, perf_stat_section, perf_samples_section, sacct_section)
