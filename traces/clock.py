"""What the profiler importers share: each rank's clock, the sync marker, and table writing.

Every imported timestamp is put on the aligned clock of the rank's own events (``start_ns`` in
spmd/obs/timers.py: ns since the start barrier) as ``aligned = profiler_ns + offset``. The offset comes,
in order of preference, from
  sync-marker  a range named ``spmd.sync:<ns>`` that spmd.obs.profile records when its window opens, <ns>
               being the rank's CLOCK_MONOTONIC (perf_counter_ns) just before it: offset =
               (<ns> - clock_t0_ns) - profiler start of that range (µs-exact);
  monotonic    the profiler's clock is CLOCK_MONOTONIC itself (perf record -k CLOCK_MONOTONIC):
               offset = -clock_t0_ns;
  wallclock    the profiler's timestamps are UTC ns (nsys session start + ts, Kineto base + ts):
               offset = -local_epoch_ns (the rank's wall clock at t0; as good as NTP);
  none         nothing to align with: offset 0, the data keep the profiler's own clock.
"""
from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np

from spmd.obs import SYNC_PREFIX  # the profiler window names its marker range with it
from spmd.obs.merge import rank_files

MAX_NAME = 256  # longer names (templated kernels) are cut: the report needs a readable name only
_RANK_TAG = re.compile(r"rank(\d+)")


def rank_clocks(run_dir: Path) -> dict[int, dict]:
    """Rank → {clock_t0_ns, local_epoch_ns} from the rank files' attributes (absent keys left out)."""
    out = {}
    for r, path in rank_files(run_dir).items():
        with h5py.File(path, "r") as f:
            out[r] = {k: int(f.attrs[k]) for k in ("clock_t0_ns", "local_epoch_ns") if k in f.attrs}
    return out


def tagged_files(folder: Path, suffix: str) -> dict[int, Path]:
    """Rank → file ``folder/rank{r:05d}{suffix}``, for the files that exist."""
    found = {}
    if folder.is_dir():
        for path in folder.iterdir():
            m = _RANK_TAG.fullmatch(path.name[:-len(suffix)]) if path.name.endswith(suffix) else None
            if m:
                found[int(m.group(1))] = path
    return dict(sorted(found.items()))


def sync_offset(names, starts_ns, clock: dict) -> int | None:
    """Offset from the first ``spmd.sync:<ns>`` range among names (start times on the profiler clock)."""
    if "clock_t0_ns" not in clock:
        return None
    for name, start in zip(names, starts_ns):
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        if name.startswith(SYNC_PREFIX):
            try:
                raw = int(name[len(SYNC_PREFIX):])
            except ValueError:
                continue
            return (raw - clock["clock_t0_ns"]) - int(start)
    return None


def choose_offset(names, starts_ns, clock: dict, wall_base_ns: int | None) -> tuple[int, str]:
    """(offset, method): the sync marker, else the wall clock when the profiler gives UTC, else none."""
    off = sync_offset(names, starts_ns, clock)
    if off is not None:
        return off, "sync-marker"
    if wall_base_ns is not None and "local_epoch_ns" in clock:
        return wall_base_ns - clock["local_epoch_ns"], "wallclock"
    return 0, "none"


def encode(values, width: int = MAX_NAME) -> np.ndarray:
    """UTF-8 fixed-width bytes, cut at `width` bytes."""
    raw = [str(v).encode()[:width] for v in values]
    return np.array(raw or [b""], dtype=bytes)[:len(raw)]


def write_table(group: h5py.Group, name: str, columns: dict) -> h5py.Dataset:
    """A structured dataset from ``{field: (values, dtype)}``; dtype "S" encodes strings (cut at MAX_NAME)."""
    arrays = {k: encode(v) if t == "S" else np.asarray(v, dtype=t) for k, (v, t) in columns.items()}
    n = len(next(iter(arrays.values())))
    table = np.empty(n, dtype=[(k, a.dtype) for k, a in arrays.items()])
    for k, a in arrays.items():
        table[k] = a
    opts = dict(compression="gzip", compression_opts=4, shuffle=True) if n else {}
    return group.create_dataset(name, data=table, **opts)


def set_clock_attrs(group: h5py.Group, source: Path, run_dir: Path, offset: int, method: str) -> None:
    """Where a rank's data came from and how its clock was aligned."""
    group.attrs["source"] = str(Path(source).relative_to(run_dir))
    group.attrs["clock_offset_ns"] = int(offset)
    group.attrs["clock"] = method
