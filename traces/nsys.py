"""Importer of Nsight Systems SQLite exports: RUN_DIR/nsys/rank{r:05d}.sqlite → merged.h5 ``nsys/<r>/``.

``launch/rank.sh`` with PROFILE=nsys writes ``nsys/rankNNNNN.nsys-rep`` and runs ``nsys export --type
sqlite`` on it (where nsys can build reports; elsewhere export the .nsys-rep on a machine that can and
copy the .sqlite next to it). Tables read (names and columns per the Nsight Systems "SQLite Export
Schema Reference"; tables are created lazily, so any may be missing):

  StringIds(id, value)                          names referenced by id
  CUPTI_ACTIVITY_KIND_KERNEL(start, end, deviceId, streamId, shortName, demangledName)
                                                shortName/demangledName are StringIds ids
  CUPTI_ACTIVITY_KIND_MEMCPY(start, end, deviceId, streamId, bytes, copyKind)
  ENUM_CUDA_MEMCPY_OPER(id, name, label)        copyKind labels (CUpti_ActivityMemcpyKind values otherwise)
  NVTX_EVENTS(start, end, eventType, text, textId)
                                                eventType 59 = push/pop range, 60 = start/end range; the
                                                message is in text, or in StringIds via textId when registered
  TARGET_INFO_SESSION_START_TIME(utcEpochNs)    UTC ns of the session start; event times are ns since it

Written per rank: ``kernels`` (name, start_ns, dur_ns, device, stream, nccl), ``memcpy`` (start_ns,
dur_ns, bytes, kind, device, stream), ``nvtx`` (name, start_ns, dur_ns), all on the aligned clock
(traces/clock.py: the ``spmd.sync:<ns>`` NVTX range, else the session's UTC start), with the group
attributes source, clock, clock_offset_ns.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

import h5py
import numpy as np

from traces.clock import choose_offset, rank_clocks, set_clock_attrs, tagged_files, write_table

NVTX_RANGES = (59, 60)  # NvtxPushPopRange, NvtxStartEndRange
# CUpti_ActivityMemcpyKind, used when the export has no ENUM_CUDA_MEMCPY_OPER table
MEMCPY_KINDS = {0: "Unknown", 1: "HtoD", 2: "DtoH", 3: "HtoA", 4: "AtoH", 5: "AtoA", 6: "AtoD", 7: "DtoA",
                8: "DtoD", 9: "HtoH", 10: "PtoP"}


def _columns(con: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in con.execute(f"PRAGMA table_info({table})")}


def _strings(con) -> dict[int, str]:
    return dict(con.execute("SELECT id, value FROM StringIds")) if _columns(con, "StringIds") else {}


def _kernels(con, strings: dict) -> dict:
    cols = _columns(con, "CUPTI_ACTIVITY_KIND_KERNEL")
    if not cols:
        return {}
    name = [c for c in ("shortName", "demangledName") if c in cols]
    name_sql = f"COALESCE({', '.join(name)})" if name else "NULL"
    rows = con.execute(f'SELECT start, "end", deviceId, streamId, {name_sql} FROM CUPTI_ACTIVITY_KIND_KERNEL '
                       'ORDER BY start').fetchall()
    names = [strings.get(r[4], str(r[4])) if r[4] is not None else "?" for r in rows]
    return {"name": (names, "S"), "start_ns": ([r[0] for r in rows], "<i8"),
            "dur_ns": ([r[1] - r[0] for r in rows], "<i8"), "device": ([r[2] for r in rows], "<i4"),
            "stream": ([r[3] for r in rows], "<i4"), "nccl": ([n.startswith("nccl") for n in names], "?")}


def _memcpy(con) -> dict:
    if not _columns(con, "CUPTI_ACTIVITY_KIND_MEMCPY"):
        return {}
    labels = dict(MEMCPY_KINDS)
    if {"id", "label"} <= _columns(con, "ENUM_CUDA_MEMCPY_OPER"):
        labels.update(con.execute("SELECT id, label FROM ENUM_CUDA_MEMCPY_OPER"))
    rows = con.execute('SELECT start, "end", bytes, copyKind, deviceId, streamId FROM CUPTI_ACTIVITY_KIND_MEMCPY '
                       'ORDER BY start').fetchall()
    return {"start_ns": ([r[0] for r in rows], "<i8"), "dur_ns": ([r[1] - r[0] for r in rows], "<i8"),
            "bytes": ([r[2] for r in rows], "<i8"), "kind": ([labels.get(r[3], str(r[3])) for r in rows], "S"),
            "device": ([r[4] for r in rows], "<i4"), "stream": ([r[5] for r in rows], "<i4")}


def _nvtx(con, strings: dict) -> dict:
    cols = _columns(con, "NVTX_EVENTS")
    if not cols:
        return {}
    text_id = "textId" if "textId" in cols else "NULL"
    rows = con.execute(f'SELECT start, "end", text, {text_id} FROM NVTX_EVENTS WHERE eventType IN '
                       f'({", ".join(map(str, NVTX_RANGES))}) AND "end" IS NOT NULL ORDER BY start').fetchall()
    names = [r[2] if r[2] is not None else strings.get(r[3], "?") for r in rows]
    return {"name": (names, "S"), "start_ns": ([r[0] for r in rows], "<i8"),
            "dur_ns": ([r[1] - r[0] for r in rows], "<i8")}


def read_nsys(path: Path) -> dict:
    """Kernels, memcpy and NVTX ranges of one export (on the profiler's clock) and its UTC start."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        strings = _strings(con)
        session = None
        if "utcEpochNs" in _columns(con, "TARGET_INFO_SESSION_START_TIME"):
            row = con.execute("SELECT utcEpochNs FROM TARGET_INFO_SESSION_START_TIME").fetchone()
            session = int(row[0]) if row else None
        return {"kernels": _kernels(con, strings), "memcpy": _memcpy(con), "nvtx": _nvtx(con, strings),
                "utc_start_ns": session}
    except sqlite3.DatabaseError as exc:
        raise ValueError(f"{path}: not an nsys SQLite export ({exc})") from None
    finally:
        con.close()


def import_nsys(run_dir: Path, out: h5py.File) -> None:
    """nsys/rank*.sqlite → nsys/<r>/{kernels,memcpy,nvtx} on the aligned clock."""
    files = tagged_files(Path(run_dir) / "nsys", ".sqlite")
    clocks = rank_clocks(run_dir) if files else {}
    for r, path in files.items():
        data = read_nsys(path)
        nvtx = data["nvtx"] or {"name": ([], "S"), "start_ns": ([], "<i8")}
        offset, method = choose_offset(nvtx["name"][0], nvtx["start_ns"][0], clocks.get(r, {}),
                                       data["utc_start_ns"])
        grp = out.require_group(f"nsys/{r}")
        for key in ("kernels", "memcpy", "nvtx"):
            cols = data[key]
            if cols:
                cols["start_ns"] = (np.asarray(cols["start_ns"][0], dtype=np.int64) + offset, "<i8")
                write_table(grp, key, cols)
        set_clock_attrs(grp, path, run_dir, offset, method)
