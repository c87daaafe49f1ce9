"""Report of a run's traces: ``python -m traces.report RUN_DIR [--plots]`` or ``--scaling RUN_DIR...``.

RUN_DIR is a run's trace directory (merged first if merged.h5 is missing or older than a rank file)
or a merged .h5 file. After the header, the run summary rank 0 stored (spmd.runtime.summary), when the
run has one. Sections (functions of the loaded ``Trace``, in ``SECTIONS``): per rank the
compute / comm / io / wait split and wall time; per phase, and per rank and phase; the collectives by
total time with count, bytes and achieved bandwidth (bytes of this rank's buffer / time in the call);
per layer; arrival skew per collective and decode step time per rank (traces/skew.py); then what the
imported sources add (traces/report_sources.py: NCCL transport, device kernels, perf, sacct).
comm % is comm time over all timed (leaf) time, compute + comm + io + wait.
``--plots`` writes PNGs to RUN_DIR/plots (traces/plots.py); ``--scaling`` compares runs
(traces/scaling.py).
"""
from __future__ import annotations

import json

import argparse
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from traces import report_sources, skew
from spmd.obs.merge import MERGED, rank_files
from spmd.runtime.summary import format_summary
from traces.merge import merge
from traces.table import format_table, si

KINDS = ("compute", "comm", "io", "wait")
PHASES = ("load", "prefill", "decode", "other")


@dataclass(frozen=True)
class Trace:
    """A merged run: events (structured array with a rank column), each rank's attributes, the file."""

    run_dir: Path
    events: np.ndarray
    ranks: dict[int, dict]
    attrs: dict
    path: Path


def load(run_dir) -> Trace:
    """Read run_dir/merged.h5 (merging first if absent or older than a rank file), or a merged .h5 file."""
    run_dir = Path(run_dir)
    if run_dir.suffix in (".h5", ".hdf5") and run_dir.is_file():
        path, run_dir = run_dir, run_dir.parent
    else:
        path = run_dir / MERGED
        stale = not path.exists() or any(
            p.stat().st_mtime > path.stat().st_mtime for p in rank_files(run_dir).values())
        if stale:
            merge(run_dir)
    with h5py.File(path, "r") as f:
        ranks = {int(r): dict(g.attrs) for r, g in f["ranks"].items()}
        return Trace(run_dir, f["events"][()], dict(sorted(ranks.items())), dict(f.attrs), path)


def kind_sums(ev: np.ndarray, index: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Per kind, the summed dur_ns of events grouped by index (0..n-1)."""
    dur = ev["dur_ns"].astype(np.float64)
    return {k: np.bincount(index, weights=dur * (ev["kind"] == k.encode()), minlength=n) for k in KINDS}


def span(ev: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
    """Per group, last end minus first start in ns (0 for empty groups)."""
    first = np.full(n, np.iinfo(np.int64).max)
    last = np.full(n, np.iinfo(np.int64).min)
    np.minimum.at(first, index, ev["start_ns"])
    np.maximum.at(last, index, ev["start_ns"] + ev["dur_ns"])
    return np.where(last >= first, last - first, 0)


def phase_index(ev: np.ndarray) -> np.ndarray:
    """Index into PHASES of each event (unknown phases count as "other")."""
    index = np.full(len(ev), len(PHASES) - 1, dtype=np.intp)
    for i, p in enumerate(PHASES[:-1]):
        index[ev["phase"] == p.encode()] = i
    return index


def _split_row(sums: dict, i: int, wall_ns: float) -> list[str]:
    ms = [sums[k][i] / 1e6 for k in KINDS]
    total = sum(ms)
    share = 100 * ms[1] / total if total else 0.0
    return [f"{v:.3f}" for v in ms] + [f"{wall_ns / 1e6:.3f}", f"{share:.1f}"]


def rank_section(t: Trace) -> str:
    """Per-rank compute/comm/io/wait split and wall time."""
    n = max(t.ranks) + 1 if t.ranks else 0
    index = t.events["rank"].astype(np.intp)
    sums, wall = kind_sums(t.events, index, n), span(t.events, index, n)
    rows = [[str(r), str(t.ranks.get(r, {}).get("hostname", "?"))] + _split_row(sums, r, wall[r])
            for r in range(n)]
    heads = ["rank", "hostname"] + [f"{k} ms" for k in KINDS] + ["wall ms", "comm %"]
    return "per rank\n" + format_table(heads, rows, n_left=2)


def phase_section(t: Trace) -> str:
    """Per-phase split summed over ranks; wall = span of the phase over all ranks."""
    n = len(PHASES)
    index = phase_index(t.events)
    sums, wall = kind_sums(t.events, index, n), span(t.events, index, n)
    counts = np.bincount(index, minlength=n)
    rows = [[p, str(counts[i])] + _split_row(sums, i, wall[i]) for i, p in enumerate(PHASES) if counts[i]]
    heads = ["phase", "events"] + [f"{k} ms" for k in KINDS] + ["wall ms", "comm %"]
    return "per phase (summed over ranks)\n" + format_table(heads, rows)


def rank_phase_section(t: Trace) -> str:
    """The split per (rank, phase) for prefill and decode; wall = the phase's span on that rank."""
    n_ranks = max(t.ranks) + 1 if t.ranks else 0
    index = t.events["rank"].astype(np.intp) * len(PHASES) + phase_index(t.events)
    n = n_ranks * len(PHASES)
    sums, wall = kind_sums(t.events, index, n), span(t.events, index, n)
    counts = np.bincount(index, minlength=n)
    rows = []
    for p in ("prefill", "decode"):
        for r in range(n_ranks):
            i = r * len(PHASES) + PHASES.index(p)
            if counts[i]:
                rows.append([p, str(r)] + _split_row(sums, i, wall[i]))
    heads = ["phase", "rank"] + [f"{k} ms" for k in KINDS] + ["wall ms", "comm %"]
    return "per rank and phase\n" + format_table(heads, rows, n_left=1)


def collective_section(t: Trace) -> str:
    """Collectives by total time (all ranks): count, bytes, achieved bandwidth = bytes / time."""
    ev = t.events[t.events["kind"] == b"comm"]
    keys = np.char.add(np.char.add(ev["name"], b"\x1f"), ev["group"])  # \x1f: ASCII unit separator
    uniq, index = np.unique(keys, return_inverse=True)
    dur = np.bincount(index, weights=ev["dur_ns"].astype(np.float64), minlength=len(uniq))
    nbytes = np.bincount(index, weights=ev["bytes"].astype(np.float64), minlength=len(uniq))
    count = np.bincount(index, minlength=len(uniq))
    by_bytes = np.empty(len(uniq), dtype=int)
    by_bytes[np.argsort(-nbytes, kind="stable")] = np.arange(1, len(uniq) + 1)
    rows = []
    for i in np.argsort(-dur, kind="stable"):
        name, _, group = uniq[i].decode().partition("\x1f")
        bw = nbytes[i] / (dur[i] / 1e9) if dur[i] else 0.0
        rows.append([name, group, str(count[i]), f"{dur[i] / 1e6:.3f}", f"{dur[i] / count[i] / 1e3:.1f}",
                     si(nbytes[i] / count[i], "B"), si(nbytes[i], "B"), str(by_bytes[i]), si(bw, "B/s")])
    heads = ["collective", "group", "count", "total ms", "mean us", "bytes/call", "bytes", "bytes rank",
             "bandwidth"]
    return "collectives (all ranks, by total time)\n" + format_table(heads, rows, n_left=2)


def layer_section(t: Trace) -> str:
    """Per layer, compute and comm ms summed over ranks, for prefill and decode."""
    ev = t.events[t.events["layer"] >= 0]
    if not len(ev):
        return "per layer\n  (none)"
    n = int(ev["layer"].max()) + 1
    cells = {}
    for p in ("prefill", "decode"):
        sel = ev[ev["phase"] == p.encode()]
        cells[p] = kind_sums(sel, sel["layer"].astype(np.intp), n)
    cols = [(p, k) for p in ("prefill", "decode") for k in ("compute", "comm")]
    rows = [[str(layer)] + [f"{cells[p][k][layer] / 1e6:.3f}" for p, k in cols] for layer in range(n)]
    heads = ["layer", "prefill compute ms", "prefill comm ms", "decode compute ms", "decode comm ms"]
    return "per layer (summed over ranks)\n" + format_table(heads, rows)


PIPELINE_WAITS = (b"pp.recv", b"pp.logits")  # a stage waits for the one before it, and for the last one's logits


def bubble_fraction(events: np.ndarray) -> float | None:
    """Share of the decode steps' timed time that a rank spent in ``pp.recv`` and ``pp.logits``: waiting for
    the stage before it and for the last stage's logits (None: no pipeline events)."""
    dec = events[events["phase"] == b"decode"]
    wait = np.isin(dec["name"], PIPELINE_WAITS)
    if not wait.any():
        return None
    return float(dec["dur_ns"][wait].sum() / max(dec["dur_ns"].sum(), 1))


def pipeline_section(t: Trace) -> str:
    """Pipeline runs: per rank, the decode time spent waiting for the previous stage (the bubble)."""
    rows = []
    for r in sorted(t.ranks):
        frac = bubble_fraction(t.events[t.events["rank"] == r])
        if frac is not None:
            rows.append([str(r), f"{frac * 100:.1f}"])
    if not rows:
        return "pipeline bubble\n  (no pipeline stages)"
    return ("pipeline bubble (decode: time waiting in pp.recv and pp.logits / timed time)\n"
            + format_table(["rank", "bubble %"], rows))


def group_hosts(t: Trace) -> dict[tuple[int, str], set[str]]:
    """(rank, event group) -> the hosts of the ranks that collective spans: "tp" the rank's stage of its
    model group, "pp" and others its whole model group (the world attributes of every rank)."""
    world = {r: json.loads(a["world"]) for r, a in t.ranks.items() if "world" in a}
    out = {}
    for r, w in world.items():
        same_replica = [q for q, v in world.items() if v.get("replica") == w.get("replica")]
        stage = [q for q in same_replica if world[q].get("stage", 0) == w.get("stage", 0)]
        same_ep = [q for q in world if _ep_index(world[q]) == _ep_index(w)]
        for group in {g.decode() for g in np.unique(t.events["group"])}:
            members = stage if group == "tp" else same_ep if group == "ep" else same_replica
            out[r, group] = {world[q].get("hostname", "") for q in members}
    return out


def _ep_index(w: dict) -> int:
    """Which expert-parallel group (--group-layout dpa: consecutive model ranks) a rank's world belongs to."""
    first = 1 if w.get("orchestrator") == "dedicated" else 0
    return (w.get("rank", 0) - first) // max(1, w.get("ep_size", 1))


def traffic_section(t: Trace) -> str:
    """--group-layout dpa: each rank's all-to-all bytes over the run (dispatch, its ids and weights, combine),
    to ranks on its own host and on others, and per destination (the routing's spread)."""
    rows = []
    for r in sorted(t.ranks):
        text = t.ranks[r].get("ep_traffic")
        if not text:
            continue
        tr = json.loads(text)
        total = [sum(col) for col in zip(*tr["bytes_to"].values())] if tr["bytes_to"] else []
        rows.append([str(r), str(tr["group_rank"]), si(tr["in_host_bytes"], "B"), si(tr["cross_host_bytes"], "B"),
                     " ".join(si(b, "B") for b in total)])
    if not rows:
        return "expert all-to-all traffic\n  (no dpa all-to-alls: --group-layout tp)"
    return ("expert all-to-all traffic (--group-layout dpa; bytes each rank sent in moe.dispatch, "
            "moe.dispatch.meta, moe.combine)\n"
            + format_table(["rank", "ep rank", "in-host (itself too)", "cross-host", "to ep rank 0, 1, ..."], rows, n_left=1))


def placement_section(t: Trace) -> str:
    """Collectives of groups within one host vs across hosts: count, time, bytes, achieved bandwidth."""
    ev = t.events[t.events["kind"] == b"comm"]
    hosts = group_hosts(t)
    if not len(ev) or not hosts:
        return "collectives by placement\n  (no collectives)"
    n_hosts = len({h for hs in hosts.values() for h in hs})
    cross = np.array([len(hosts.get((int(r), g.decode()), ())) > 1 for r, g in zip(ev["rank"], ev["group"])])
    rows = []
    for where, sel in (("in-host", ~cross), ("cross-host", cross)):
        for name in sorted({n.decode() for n in ev["name"][sel]}):
            x = ev[sel & (ev["name"] == name.encode())]
            dur, nbytes = x["dur_ns"].astype(np.float64).sum(), x["bytes"].astype(np.float64).sum()
            rows.append([where, name, str(len(x)), f"{dur / 1e6:.3f}", f"{dur / len(x) / 1e3:.1f}",
                         si(nbytes / len(x), "B"), si(nbytes / (dur / 1e9) if dur else 0.0, "B/s")])
    return (f"collectives by placement ({n_hosts} host{'s' if n_hosts > 1 else ''}: a group within one host "
            f"or across hosts; all ranks)\n"
            + format_table(["placement", "collective", "count", "total ms", "mean us", "bytes/call", "bandwidth"],
                           rows, n_left=2))


SECTIONS = (rank_section, phase_section, rank_phase_section, collective_section, placement_section, traffic_section,
            layer_section, pipeline_section, *skew.SECTIONS, *report_sources.SECTIONS)


def _header(t: Trace) -> str:
    epoch = int(t.attrs.get("epoch_ns", 0))
    when = datetime.fromtimestamp(epoch / 1e9, tz=timezone.utc).isoformat(timespec="seconds")
    r0 = t.ranks.get(0, {})
    extra = [f"{k}={r0[k]}" for k in ("SLURM_JOB_ID", "SLURM_STEP_ID") if k in r0]
    gpu = str(r0.get("cuda_device", "")) or str(r0.get("device", "cpu"))
    where = t.run_dir if t.path.name == MERGED else t.path
    return (f"run {where}: {int(t.attrs.get('n_ranks', len(t.ranks)))} ranks, {len(t.events)} events, "
            f"aligned t0 at {when}, device {gpu}, engine {r0.get('engine', '?')}"
            + (", " + " ".join(extra) if extra else ""))


def _summary(t: Trace) -> list[str]:
    """The run summary rank 0 stored in its metadata (spmd.runtime.summary), when the run has one."""
    text = t.ranks.get(0, {}).get("summary")
    return ["\n".join(format_summary(json.loads(text)))] if text else []


def report(run_dir) -> str:
    """The full text report of run_dir: the header, the run summary, the sections."""
    t = load(run_dir)
    return "\n\n".join([_header(t), *_summary(t)] + [section(t) for section in SECTIONS]) + "\n"


def main(argv=None) -> int:
    """CLI: print the report of RUN_DIR (and write its plots), or compare runs with --scaling."""
    parser = argparse.ArgumentParser(prog="python -m traces.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    parser.add_argument("--plots", action="store_true", help="also write PNGs to RUN_DIR/plots")
    parser.add_argument("--scaling", action="store_true", help="compare runs: table + scaling.png")
    parser.add_argument("--out", type=Path, help="--scaling: where scaling.png goes (default: first run's parent)")
    args = parser.parse_args(argv)
    try:
        if args.scaling:
            from traces.scaling import scaling_main
            sys.stdout.write(scaling_main(args.run_dirs, args.out))
            return 0
        for run_dir in args.run_dirs:
            sys.stdout.write(report(run_dir))
            if args.plots:
                from traces.plots import write_plots
                for path in write_plots(load(run_dir)):
                    print(f"wrote {path}", file=sys.stderr)
    except (FileNotFoundError, ValueError) as exc:
        print(f"traces.report: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
