"""SLURM accounting of a run: collect with sacct, import into merged.h5 ``sacct/steps``.

    python -m traces.sacct RUN_DIR [--job ID]     # after the job step ends: RUN_DIR/sacct.txt (+ .json)

``collect`` runs ``sacct -j ID --parsable2 --format=...`` into RUN_DIR/sacct.txt and, where sacct has
--json (Slurm >= 21.08), ``sacct -j ID --json`` into RUN_DIR/sacct.json (the job id from the rank
files' SLURM_JOB_ID attribute unless given; slurm/common.sh writes the same two files). The importer
reads sacct.txt when present (its columns do not change between Slurm versions), else sacct.json
(sacct(1)):

  sacct.json   ``jobs[]``: ``job_id``, ``name``, ``steps[]``; a step has ``step.id`` ("123.0"; "0" with
               ``step.job_id`` in Slurm 22.05; {job_id, step_id} in others) and ``step.name``, ``time.elapsed`` (s),
               ``time.total`` {seconds, microseconds} (CPU time), ``tres.requested.max`` [{type, count}]
               (type "mem": the step's max RSS in bytes), ``tasks.count``, ``nodes.range``, ``state``.
  sacct.txt    ``--parsable2``: a header line then '|'-separated rows of JobID, JobName, Elapsed
               ([D-]HH:MM:SS), TotalCPU ([D-][HH:]MM:SS[.mmm]), MaxRSS (number + K/M/G/T, 1024-based),
               NTasks, NodeList, State.

Written: ``sacct/steps`` (job_id, step, name, state, elapsed_s, cpu_s, max_rss_bytes, ntasks, nodes).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py

from spmd.obs.merge import rank_files
from traces.clock import write_table

FIELDS = ("JobID", "JobName", "Elapsed", "TotalCPU", "MaxRSS", "NTasks", "NodeList", "State")
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_duration(text: str) -> float:
    """Seconds of a sacct duration ``[D-][HH:]MM:SS[.fff]``; NaN when empty or malformed."""
    text = text.strip()
    days, _, rest = text.rpartition("-") if "-" in text else ("0", "", text)
    try:
        parts = [float(p) for p in rest.split(":")]
        seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
        return int(days or 0) * 86400 + seconds if parts and len(parts) <= 3 else float("nan")
    except ValueError:
        return float("nan")


def parse_bytes(text: str) -> int:
    """Bytes of a sacct size like ``1234K`` (1024-based); -1 when empty."""
    text = text.strip()
    if not text:
        return -1
    unit = text[-1].upper() if text[-1].isalpha() else ""
    return int(float(text[:-1] if unit else text) * _UNITS.get(unit, 1))


def _state(v) -> str:
    if isinstance(v, dict):
        v = v.get("current", "")
    return ",".join(map(str, v)) if isinstance(v, list) else str(v or "")


def _step_id(step: dict, job_id) -> str:
    """``JOB.STEP`` as in --parsable2, from any of the data parsers' forms of ``step``."""
    info = step.get("step") or {}
    sid = info.get("id", "")
    if isinstance(sid, dict):  # {"id": {"job_id": 123, "step_id": "0"}}
        return f"{sid.get('job_id', job_id)}.{sid.get('step_id', '')}"
    sid = str(sid)
    return sid if "." in sid else f"{info.get('job_id', job_id)}.{sid}"  # Slurm 22.05: {"job_id": 1, "id": "0"}


def rows_from_json(doc: dict) -> list[tuple]:
    """One row per job step of ``sacct --json`` output."""
    rows = []
    for job in doc.get("jobs", []):
        for st in job.get("steps", []):
            t = st.get("time") or {}
            total = t.get("total") or {}
            mem = [x.get("count", -1) for x in ((st.get("tres") or {}).get("requested") or {}).get("max", [])
                   if x.get("type") == "mem"]
            rows.append((str(job.get("job_id", "")), _step_id(st, job.get("job_id")),
                         str((st.get("step") or {}).get("name", "")), _state(st.get("state")),
                         float(t.get("elapsed", "nan")),
                         float(total.get("seconds", 0)) + float(total.get("microseconds", 0)) / 1e6,
                         int(mem[0]) if mem else -1, int((st.get("tasks") or {}).get("count", -1)),
                         str((st.get("nodes") or {}).get("range", ""))))
    return rows


def rows_from_parsable(text: str) -> list[tuple]:
    """One row per line of ``sacct --parsable2`` output with a header line."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    head = lines[0].split("|")
    rows = []
    for line in lines[1:]:
        d = dict(zip(head, line.split("|")))
        job, _, step = d.get("JobID", "").partition(".")
        rows.append((job, d.get("JobID", ""), d.get("JobName", ""), d.get("State", ""),
                     parse_duration(d.get("Elapsed", "")), parse_duration(d.get("TotalCPU", "")),
                     parse_bytes(d.get("MaxRSS", "")), int(d.get("NTasks") or -1), d.get("NodeList", "")))
    return rows


def import_sacct(run_dir: Path, out: h5py.File) -> None:
    """RUN_DIR/sacct.txt (else sacct.json) → sacct/steps."""
    run_dir = Path(run_dir)
    if (run_dir / "sacct.txt").is_file():
        rows = rows_from_parsable((run_dir / "sacct.txt").read_text())
    elif (run_dir / "sacct.json").is_file():
        try:
            rows = rows_from_json(json.loads((run_dir / "sacct.json").read_text()))
        except ValueError as exc:
            raise ValueError(f"{run_dir / 'sacct.json'}: not sacct --json output ({exc})") from None
    else:
        return
    keys = (("job_id", "S"), ("step", "S"), ("name", "S"), ("state", "S"), ("elapsed_s", "<f8"),
            ("cpu_s", "<f8"), ("max_rss_bytes", "<i8"), ("ntasks", "<i4"), ("nodes", "S"))
    write_table(out.require_group("sacct"), "steps", {k: ([r[i] for r in rows], t) for i, (k, t) in enumerate(keys)})


def collect(run_dir: Path, job: str | None = None) -> list[Path]:
    """Run sacct for the run's job: RUN_DIR/sacct.txt, and sacct.json where --json works (atomic writes)."""
    run_dir = Path(run_dir)
    job = job or _job_id(run_dir)
    out = subprocess.run(["sacct", "-j", job, "--parsable2", f"--format={','.join(FIELDS)}"],
                         capture_output=True, text=True, check=True)
    paths = [_write(run_dir / "sacct.txt", out.stdout)]
    out = subprocess.run(["sacct", "-j", job, "--json"], capture_output=True, text=True)
    if out.returncode == 0:
        paths.append(_write(run_dir / "sacct.json", out.stdout))
    return paths


def _write(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _job_id(run_dir: Path) -> str:
    for path in rank_files(run_dir).values():
        with h5py.File(path, "r") as f:
            if "SLURM_JOB_ID" in f.attrs:
                return str(f.attrs["SLURM_JOB_ID"])
    raise ValueError(f"{run_dir}: no SLURM_JOB_ID in the rank files; pass --job")


def main(argv=None) -> int:
    """CLI: collect the run's sacct accounting into RUN_DIR."""
    p = argparse.ArgumentParser(prog="python -m traces.sacct", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--job", help="SLURM job id (default: the rank files' SLURM_JOB_ID)")
    a = p.parse_args(argv)
    try:
        print("\n".join(map(str, collect(a.run_dir, a.job))))
    except (OSError, ValueError, subprocess.CalledProcessError) as exc:
        print(f"traces.sacct: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
