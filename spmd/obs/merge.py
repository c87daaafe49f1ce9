"""Merge a run's per-rank trace files into RUN_DIR/merged.h5 (the events of every rank, each rank's attributes).

What rank 0 does at the end of a traced run. ``python -m traces.merge`` runs the same merge with more
importers (NCCL logs, nsys, torch.profiler, perf, sacct: traces/merge.py, which describes the layout).
An importer is one function ``fn(run_dir: Path, out: h5py.File) -> None``; the output is written to a
hidden tmp file and renamed, so merging is atomic and idempotent.
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

SCHEMA = "spmd-trace-merged/1"
MERGED = "merged.h5"
_RANK_FILE = re.compile(r"rank(\d+)\.h5")


def rank_files(run_dir: Path) -> dict[int, Path]:
    """Rank number -> rank file in run_dir, from names ``rank{r:05d}.h5``."""
    found = {}
    for path in Path(run_dir).iterdir():
        m = _RANK_FILE.fullmatch(path.name)
        if m:
            found[int(m.group(1))] = path
    return dict(sorted(found.items()))


def _declared_world_size(run_dir: Path, attrs: dict[int, dict]) -> int | None:
    sizes = {int(a["world_size"]) for a in attrs.values() if "world_size" in a}
    if len(sizes) > 1:
        raise ValueError(f"{run_dir}: rank files disagree on world_size: {sorted(sizes)}")
    return sizes.pop() if sizes else None


def _check_complete(run_dir: Path, attrs: dict[int, dict]) -> int:
    """World size, after checking that ranks 0..n-1 are all there and nothing else is."""
    if not attrs:
        raise FileNotFoundError(f"{run_dir}: no rank*.h5 files to merge")
    for r, a in attrs.items():
        if "rank" in a and int(a["rank"]) != r:
            raise ValueError(f"{run_dir}: file of rank {r} says rank={int(a['rank'])}")
    declared = _declared_world_size(run_dir, attrs)
    n = declared if declared is not None else max(attrs) + 1
    missing = sorted(set(range(n)) - set(attrs))
    extra = sorted(set(attrs) - set(range(n)))
    if missing or extra:
        raise ValueError(f"{run_dir}: world_size={n} ({'declared' if declared is not None else 'inferred'}), "
                         f"{len(attrs)} rank files; missing ranks {_abbrev(missing)}, "
                         f"unexpected ranks {_abbrev(extra)}")
    return n


def _abbrev(ranks: list[int]) -> str:
    return str(ranks) if len(ranks) <= 10 else f"{ranks[:10]}... ({len(ranks)} in all)"


def _merged_dtype(run_dir: Path, dtypes: dict[int, np.dtype]) -> np.dtype:
    """Rank column + the common event fields; byte-string fields widened to the widest rank."""
    first = next(iter(dtypes.values()))
    if any(set(dt.names) != set(first.names) for dt in dtypes.values()):
        raise ValueError(f"{run_dir}: rank files have different event fields")
    fields = []
    for name in first.names:
        kinds = {dt[name] for dt in dtypes.values()}
        if all(k.kind == "S" for k in kinds):
            fields.append((name, f"S{max(k.itemsize for k in kinds)}"))
        elif len(kinds) == 1:
            fields.append((name, first[name]))
        else:
            raise ValueError(f"{run_dir}: field {name!r} has types {sorted(map(str, kinds))}")
    return np.dtype([("rank", "<i4")] + fields)


def import_ranks(run_dir: Path, out: h5py.File) -> None:
    """Events of every rank file (rank column, sorted by rank, start_ns) and their attributes."""
    files = rank_files(run_dir)
    attrs, dtypes, sizes = {}, {}, {}
    for r, path in files.items():  # pass 1: attributes and shapes only
        with h5py.File(path, "r") as f:
            attrs[r] = dict(f.attrs)
            dtypes[r], sizes[r] = f["events"].dtype, len(f["events"])
    n = _check_complete(run_dir, attrs)
    dtype = _merged_dtype(run_dir, dtypes)
    total = sum(sizes.values())
    opts = dict(compression="gzip", compression_opts=4, shuffle=True) if total else {}
    ds = out.create_dataset("events", shape=(total,), dtype=dtype, **opts)
    pos = 0
    for r, path in files.items():  # pass 2: one rank in memory at a time
        with h5py.File(path, "r") as f:
            ev = f["events"][()]
        ev = ev[np.argsort(ev["start_ns"], kind="stable")]
        block = np.empty(len(ev), dtype=dtype)
        block["rank"] = r
        for name in ev.dtype.names:
            block[name] = ev[name]
        ds[pos:pos + len(ev)] = block
        pos += len(ev)
        grp = out.create_group(f"ranks/{r}")
        for key, value in attrs[r].items():
            grp.attrs[key] = value
    out.attrs["n_ranks"] = n
    out.attrs["world_size"] = n
    out.attrs["epoch_ns"] = attrs[0].get("epoch_ns", 0)


@contextmanager
def _atomic_h5(path: Path):
    """Open a hidden tmp HDF5 file for writing; on success rename it to path."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def merge(run_dir, importers=(import_ranks,)) -> Path:
    """Run the importers over run_dir into run_dir/merged.h5 (atomic); returns its path. The program merges
    its rank files alone; ``python -m traces.merge`` (traces/merge.py) adds the profiler and log importers."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: not a directory")
    path = run_dir / MERGED
    with _atomic_h5(path) as out:
        out.attrs["schema"] = SCHEMA
        for importer in importers:
            importer(run_dir, out)
    return path
