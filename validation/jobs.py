"""Run subprocess jobs side by side on a fixed number of slots (CPU cores or GPUs), largest first."""
from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Job:
    tag: str
    cmd: list[str]
    slots: int                     # how many slots it occupies (capped at the slots there are)
    log: Path                      # stdout and stderr


@dataclass(frozen=True)
class Done:
    returncode: int
    wall_s: float


def run_jobs(jobs: list[Job], slots: int, cwd: Path, gpus: list[str] | None = None, echo=print) -> dict[str, Done]:
    """Run every job (largest first, as slots free up). With gpus, a job's slots are GPUs: it gets
    CUDA_VISIBLE_DEVICES of its own."""
    pending = sorted(jobs, key=lambda j: -j.slots)
    free, running, done = list(range(slots)), {}, {}
    while pending or running:
        for job in list(pending):
            if min(job.slots, slots) <= len(free):
                n = min(job.slots, slots)
                mine, free = free[:n], free[n:]
                running[_start(job, mine, cwd, gpus)] = (job, mine, time.perf_counter())
                pending.remove(job)
        time.sleep(0.2)
        for proc in [p for p in running if p.poll() is not None]:
            job, mine, t0 = running.pop(proc)
            free = sorted(free + mine)
            done[job.tag] = Done(proc.returncode, time.perf_counter() - t0)
            echo(f"{'done' if proc.returncode == 0 else 'FAILED'} {job.tag} ({done[job.tag].wall_s:.0f} s)"
                 + ("" if proc.returncode == 0 else f": see {job.log}"))
    return done


def _start(job: Job, mine: list[int], cwd: Path, gpus: list[str] | None) -> subprocess.Popen:
    env = dict(os.environ)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i] for i in mine)
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "w") as log:
        return subprocess.Popen(job.cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
