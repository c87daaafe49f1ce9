"""Importer of torch.profiler chrome traces: RUN_DIR/torch/rank{r:05d}.json → merged.h5 ``torch/<r>/events``.

The program writes them with ``--profile torch`` (spmd/obs/profile.py; ``export_chrome_trace``). The JSON
(Kineto's chrome-trace export) is an object with ``traceEvents``, a list of trace events, and, in
recent versions, ``baseTimeNanoseconds``: UTC ns that ``ts`` counts from. Complete events have
``ph == "X"``, ``name``, ``cat``, ``ts`` and ``dur`` in µs (float, ns resolution), ``pid``, ``tid`` and
``args``; categories include cpu_op, user_annotation, python_function, cuda_runtime (CPU side) and
kernel, gpu_memcpy, gpu_memset, gpu_user_annotation (GPU side, ``args.device`` and ``args.stream``).
NCCL's collectives are kernels named ``nccl...`` (e.g. ``ncclDevKernel_AllReduce_Sum_bf16_RING_LL``).

Written per rank: ``events`` (name, cat, start_ns, dur_ns, device, stream, nccl) of the complete
events, on the aligned clock (the ``spmd.sync:<ns>`` user annotation, else the UTC base), with the
group attributes source, clock, clock_offset_ns.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from traces.clock import choose_offset, rank_clocks, set_clock_attrs, tagged_files, write_table


def read_torch_trace(path: Path) -> tuple[dict, int | None]:
    """The complete events of one trace as columns (ns on the profiler clock) and its UTC base, if any."""
    try:
        doc = json.loads(Path(path).read_text())
        events = doc["traceEvents"] if isinstance(doc, dict) else doc
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: not a torch.profiler chrome trace ({exc})") from None
    base = doc.get("baseTimeNanoseconds") if isinstance(doc, dict) else None
    xs = [e for e in events if e.get("ph") == "X" and "ts" in e]
    ts = np.array([float(e["ts"]) for e in xs], dtype=np.float64)
    start = np.rint(ts * 1000).astype(np.int64) + (int(base) if base is not None else 0)
    dur = np.rint(np.array([float(e.get("dur", 0)) for e in xs]) * 1000).astype(np.int64)
    args = [e.get("args") or {} for e in xs]
    names = [str(e.get("name", "")) for e in xs]
    cols = {"name": (names, "S"), "cat": ([str(e.get("cat", "")) for e in xs], "S"),
            "start_ns": (start, "<i8"), "dur_ns": (dur, "<i8"),
            "device": ([_int(a.get("device")) for a in args], "<i4"),
            "stream": ([_int(a.get("stream")) for a in args], "<i4"),
            "nccl": ([n.startswith("nccl") for n in names], "?")}
    return cols, (int(base) if base is not None else None)


def _int(v) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return -1


def import_torch(run_dir: Path, out: h5py.File) -> None:
    """torch/rank*.json → torch/<r>/events on the aligned clock."""
    files = tagged_files(Path(run_dir) / "torch", ".json")
    clocks = rank_clocks(run_dir) if files else {}
    for r, path in files.items():
        cols, base = read_torch_trace(path)
        starts = cols["start_ns"][0]
        cpu = [i for i, c in enumerate(cols["cat"][0]) if c == "user_annotation"]  # not its GPU-side copy
        offset, method = choose_offset([cols["name"][0][i] for i in cpu], starts[cpu], clocks.get(r, {}),
                                       0 if base is not None else None)
        cols["start_ns"] = (starts + offset, "<i8")
        grp = out.require_group(f"torch/{r}")
        write_table(grp, "events", cols)
        set_clock_attrs(grp, path, run_dir, offset, method)
