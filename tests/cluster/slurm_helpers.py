"""The Slurm test cluster (tests/cluster/cluster.sh) and what the cluster tier's tests share.

One cluster serves the whole tier: two namespace hosts (SPMD_SLURM_HOSTS=2) with partitions ci (default),
cpu and gpu over both, started once per pytest session by the `slurm` fixture of tests/conftest.py.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PROMPTS20, ROOT, hf_reference, spmd_env

CLUSTER = ROOT / "tests" / "cluster" / "cluster.sh"
needs_slurm = pytest.mark.skipif(
    os.environ.get("SPMD_SLURM_TEST") != "1",
    reason="starts a Slurm cluster on this host (root; installs Debian packages): set SPMD_SLURM_TEST=1")
N_NEW = 32


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _port_base() -> int:
    """A base whose ports (+6..+9: MariaDB, slurmctld, slurmd, slurmdbd) are all free."""
    for base in range(16810, 18000, 100):
        if all(_port_free(base + k) for k in range(6, 10)):
            return base
    pytest.fail("no free port range for the test cluster")


def _logs(state: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
                     for p in sorted((state / "log").glob("*")) if p.is_file())


@contextlib.contextmanager
def slurm_cluster(state: Path, **extra: str):
    """tests/cluster/cluster.sh under `state` (extra: its SPMD_SLURM_* settings): the client environment
    (SLURM_CONF, PATH); the daemons are stopped afterwards."""
    env = spmd_env()
    env.update(SPMD_SLURM_DIR=str(state), SPMD_SLURM_PORT_BASE=str(_port_base()),
               PATH=env["PATH"] + ":/usr/sbin", **extra)
    try:
        r = subprocess.run(["bash", str(CLUSTER), "start"], env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"cluster.sh start failed:\n{r.stderr[-4000:]}\n{_logs(state)}"
        yield dict(env, SLURM_CONF=str(state / "etc" / "slurm.conf"))
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(state / "db", ignore_errors=True)  # MariaDB's ~100 MB


ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE"}


def sbatch(env: dict, *opts: str, timeout: float = 600):
    """Submit from the repository root and wait for the job: (returncode, job id, sbatch's stderr). The
    returncode is what `sbatch --wait` would give (the job's exit code; 1 for a job that failed without
    one), but the job is polled every second: `sbatch --wait` sleeps 2, 8, then 32 s between its looks,
    so a 45 s job was seen ended after 74 s."""
    r = subprocess.run(["sbatch", "--parsable", *opts], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    job = r.stdout.strip().split(";")[0]
    if r.returncode != 0 or not job:
        return r.returncode or 1, job, r.stderr
    deadline = time.monotonic() + timeout
    while True:
        states = _job_states(env, job)  # one (state, exit code) per component of a heterogeneous job
        if states and all(state in ENDED for state, _ in states):
            codes = [code for _, code in states]
            failed = any(state != "COMPLETED" for state, _ in states)
            return max(codes) or int(failed), job, r.stderr
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job], env=env, capture_output=True)
            pytest.fail(f"job {job} did not end in {timeout:g} s: {states}")
        time.sleep(1.0)


def _job_states(env: dict, job: str) -> list[tuple[str, int]]:
    """(JobState, exit code) of each component of `job` from `scontrol -o show job` ([] while unknown)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if "JobState" in fields:
            found.append((fields["JobState"], int(fields.get("ExitCode", "0:0").split(":")[0])))
    return found


def rows(path: Path) -> list[tuple]:
    """(id, completion token ids) of each row of an output file."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["id"], r["completion_token_ids"]) for r in rows]


def reference(ckpt: Path) -> list[tuple]:
    """transformers' greedy tokens for the 20 prompts (fp32, N_NEW new tokens) as `rows` gives a run's: what
    every layout of the native engine gives in fp32 (make validate), so a job's output is compared with it
    instead of with another run of the program."""
    ids = [json.loads(line)["id"] for line in PROMPTS20.read_text().splitlines()]
    return list(zip(ids, map(list, hf_reference(ckpt, N_NEW))))
