"""Text report of a run's traces: ``python -m traces.report RUN_DIR``.

Sections (each a function of the loaded ``Trace``, listed in ``SECTIONS``):
per rank the compute / comm / io / wait split and wall time; per phase the same split summed over
ranks; the collectives ranked by total time with count, bytes and achieved bandwidth.
comm % is comm time over all timed (leaf) time, compute + comm + io + wait.
Plots belong in a sibling module that reads the same ``load(run_dir)`` and writes PNGs next to merged.h5.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from traces.merge import MERGED, merge, rank_files

KINDS = ("compute", "comm", "io", "wait")
PHASES = ("load", "prefill", "decode", "other")


@dataclass(frozen=True)
class Trace:
    """A merged run: events (structured array with a rank column) and each rank's attributes."""

    run_dir: Path
    events: np.ndarray
    ranks: dict[int, dict]
    attrs: dict


def load(run_dir) -> Trace:
    """Read run_dir/merged.h5, merging first if it is absent or older than a rank file."""
    run_dir = Path(run_dir)
    path = run_dir / MERGED
    stale = not path.exists() or any(
        p.stat().st_mtime > path.stat().st_mtime for p in rank_files(run_dir).values())
    if stale:
        merge(run_dir)
    with h5py.File(path, "r") as f:
        ranks = {int(r): dict(g.attrs) for r, g in f["ranks"].items()}
        return Trace(run_dir, f["events"][()], dict(sorted(ranks.items())), dict(f.attrs))


def _kind_sums(ev: np.ndarray, index: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Per kind, the summed dur_ns of events grouped by index (0..n-1)."""
    dur = ev["dur_ns"].astype(np.float64)
    return {k: np.bincount(index, weights=dur * (ev["kind"] == k.encode()), minlength=n)
            for k in KINDS}


def _span(ev: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
    """Per group, last end minus first start in ns (0 for empty groups)."""
    first = np.full(n, np.iinfo(np.int64).max)
    last = np.full(n, np.iinfo(np.int64).min)
    np.minimum.at(first, index, ev["start_ns"])
    np.maximum.at(last, index, ev["start_ns"] + ev["dur_ns"])
    return np.where(last >= first, last - first, 0)


def _split_row(sums: dict, i: int, wall_ns: float) -> list[str]:
    ms = [sums[k][i] / 1e6 for k in KINDS]
    total = sum(ms)
    share = 100 * ms[1] / total if total else 0.0
    return [f"{v:.3f}" for v in ms] + [f"{wall_ns / 1e6:.3f}", f"{share:.1f}"]


def rank_section(t: Trace) -> str:
    """Per-rank compute/comm/io/wait split and wall time."""
    n = max(t.ranks) + 1 if t.ranks else 0
    index = t.events["rank"].astype(np.intp)
    sums, wall = _kind_sums(t.events, index, n), _span(t.events, index, n)
    rows = [[str(r), str(t.ranks.get(r, {}).get("hostname", "?"))] + _split_row(sums, r, wall[r])
            for r in range(n)]
    heads = ["rank", "hostname"] + [f"{k} ms" for k in KINDS] + ["wall ms", "comm %"]
    return "per rank\n" + format_table(heads, rows, n_left=2)


def phase_section(t: Trace) -> str:
    """Per-phase split summed over ranks; wall = span of the phase over all ranks."""
    n = len(PHASES)
    index = np.full(len(t.events), n - 1, dtype=np.intp)  # unknown phases count as "other"
    for i, p in enumerate(PHASES[:-1]):
        index[t.events["phase"] == p.encode()] = i
    sums, wall = _kind_sums(t.events, index, n), _span(t.events, index, n)
    counts = np.bincount(index, minlength=n)
    rows = [[p, str(counts[i])] + _split_row(sums, i, wall[i])
            for i, p in enumerate(PHASES) if counts[i]]
    heads = ["phase", "events"] + [f"{k} ms" for k in KINDS] + ["wall ms", "comm %"]
    return "per phase (summed over ranks)\n" + format_table(heads, rows)


def collective_section(t: Trace) -> str:
    """Collectives by total time (all ranks): count, bytes, achieved bandwidth = bytes / time."""
    ev = t.events[t.events["kind"] == b"comm"]
    keys = np.char.add(np.char.add(ev["name"], b"\x1f"), ev["group"])  # \x1f: ASCII unit separator
    uniq, index = np.unique(keys, return_inverse=True)
    dur = np.bincount(index, weights=ev["dur_ns"].astype(np.float64), minlength=len(uniq))
    nbytes = np.bincount(index, weights=ev["bytes"].astype(np.float64), minlength=len(uniq))
    count = np.bincount(index, minlength=len(uniq))
    rows = []
    for i in np.argsort(-dur, kind="stable"):
        name, _, group = uniq[i].decode().partition("\x1f")
        bw = nbytes[i] / (dur[i] / 1e9) if dur[i] else 0.0
        rows.append([name, group, str(count[i]), f"{dur[i] / 1e6:.3f}",
                     f"{dur[i] / count[i] / 1e3:.1f}", _si(nbytes[i], "B"), _si(bw, "B/s")])
    heads = ["collective", "group", "count", "total ms", "mean us", "bytes", "bandwidth"]
    return "collectives (all ranks, by total time)\n" + format_table(heads, rows, n_left=2)


SECTIONS = (rank_section, phase_section, collective_section)


def _si(x: float, unit: str) -> str:
    for prefix in ("", "k", "M", "G", "T"):
        if abs(x) < 1000 or prefix == "T":
            return f"{x:.3g} {prefix}{unit}" if prefix else f"{x:.0f} {unit}"
        x /= 1000
    return ""


def format_table(heads: list[str], rows: list[list[str]], n_left: int = 1) -> str:
    """Aligned plain-text columns: the first n_left columns left-aligned, the rest right."""
    if not rows:
        return "  (none)"
    widths = [max(len(r[i]) for r in [heads] + rows) for i in range(len(heads))]

    def line(cells):
        return "  " + "  ".join(c.ljust(w) if i < n_left else c.rjust(w)
                                for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(heads)] + [line(r) for r in rows])


def _header(t: Trace) -> str:
    epoch = int(t.attrs.get("epoch_ns", 0))
    when = datetime.fromtimestamp(epoch / 1e9, tz=timezone.utc).isoformat(timespec="seconds")
    return (f"run {t.run_dir}: {int(t.attrs.get('n_ranks', len(t.ranks)))} ranks, "
            f"{len(t.events)} events, aligned t0 at {when}")


def report(run_dir) -> str:
    """The full text report of run_dir."""
    t = load(run_dir)
    return "\n\n".join([_header(t)] + [section(t) for section in SECTIONS]) + "\n"


def main(argv=None) -> int:
    """CLI: print the report of RUN_DIR."""
    parser = argparse.ArgumentParser(prog="python -m traces.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(report(args.run_dir))
    except (FileNotFoundError, ValueError) as exc:
        print(f"traces.report: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
