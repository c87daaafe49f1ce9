"""Importer of perf output: RUN_DIR/perf/rank{r:05d}.stat.csv and .script.txt → merged.h5 ``perf/<r>/``.

``launch/rank.sh`` with PROFILE=perf runs each rank under ``perf stat -x, -o perf/rankNNNNN.stat.csv``
and, with PERF_RECORD=1, ``perf record -g -k CLOCK_MONOTONIC`` followed by ``perf script -F
comm,tid,time,event,period,ip,sym --ns -G`` (one line per sample, the leaf frame only).

perf stat CSV (perf-stat(1), "CSV FORMAT"): lines starting with ``#`` and blank lines are comments;
fields in order: counter value, unit, event name, run time of the counter (ns), percentage of the
measurement time it ran, optional metric value, optional metric unit. A value of ``<not supported>``
or ``<not counted>`` means the counter could not be read (hardware counters in a VM): kept as NaN with
``supported`` false. perf script line: ``comm tid seconds.nanoseconds: period event: ip symbol``.

Written per rank: ``stat`` (event, value, unit, run_ns, pct, metric, metric_unit, supported) and
``samples`` (start_ns on the aligned clock: CLOCK_MONOTONIC minus the rank's clock_t0_ns; comm, tid,
event, period, symbol).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import h5py

from traces.clock import rank_clocks, set_clock_attrs, tagged_files, write_table

_SAMPLE = re.compile(r"^\s*(?P<comm>.+?)\s+(?P<tid>\d+)\s+(?P<sec>\d+)\.(?P<frac>\d+):\s+(?P<period>\d+)\s+"
                     r"(?P<event>\S+?):?\s+(?P<ip>[0-9a-f]+)\s+(?P<sym>.*?)\s*$")


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def read_perf_stat(path: Path) -> dict:
    """The counters of one ``perf stat -x,`` file as columns; empty lists if perf wrote none yet."""
    rows = []
    for line in Path(path).read_text(errors="replace").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        f = line.split(",")
        if len(f) < 3 or not f[2]:
            continue  # a metric-only continuation line
        f += [""] * (7 - len(f))
        supported = not f[0].startswith("<")
        rows.append((f[2], _float(f[0]) if supported else math.nan, f[1], _float(f[3]), _float(f[4]),
                     _float(f[5]), f[6], supported))
    keys = (("event", "S"), ("value", "<f8"), ("unit", "S"), ("run_ns", "<f8"), ("pct", "<f8"),
            ("metric", "<f8"), ("metric_unit", "S"), ("supported", "?"))
    return {k: ([r[i] for r in rows], t) for i, (k, t) in enumerate(keys)}


def read_perf_script(path: Path, clock_t0_ns: int) -> dict:
    """Samples of one ``perf script`` text (format above) as columns, times on the aligned clock."""
    rows = []
    for line in Path(path).read_text(errors="replace").splitlines():
        m = _SAMPLE.match(line)
        if m:
            ns = int(m["sec"]) * 1_000_000_000 + int(m["frac"].ljust(9, "0")[:9])
            rows.append((ns - clock_t0_ns, m["comm"], int(m["tid"]), m["event"], int(m["period"]), m["sym"]))
    keys = (("start_ns", "<i8"), ("comm", "S"), ("tid", "<i4"), ("event", "S"), ("period", "<i8"), ("symbol", "S"))
    return {k: ([r[i] for r in rows], t) for i, (k, t) in enumerate(keys)}


def import_perf(run_dir: Path, out: h5py.File) -> None:
    """perf/rank*.stat.csv and perf/rank*.script.txt → perf/<r>/{stat,samples}."""
    run_dir = Path(run_dir)
    stats = tagged_files(run_dir / "perf", ".stat.csv")
    scripts = tagged_files(run_dir / "perf", ".script.txt")
    clocks = rank_clocks(run_dir) if scripts else {}
    for r, path in stats.items():
        cols = read_perf_stat(path)
        if cols["event"][0]:  # perf writes the counters when the rank exits: none yet during the run
            grp = out.require_group(f"perf/{r}")
            write_table(grp, "stat", cols)
            grp.attrs["stat_source"] = str(path.relative_to(run_dir))
    for r, path in scripts.items():
        t0 = clocks.get(r, {}).get("clock_t0_ns")
        cols = read_perf_script(path, t0 if t0 is not None else 0)
        grp = out.require_group(f"perf/{r}")
        write_table(grp, "samples", cols)
        set_clock_attrs(grp, path, run_dir, -(t0 or 0), "monotonic" if t0 is not None else "none")
