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


def sbatch(env: dict, *opts: str, timeout: float = 600):
    """`sbatch --wait` from the repository root: (returncode, job id, job output text)."""
    r = subprocess.run(["sbatch", "--wait", "--parsable", *opts], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    job = r.stdout.strip().split(";")[0]
    return r.returncode, job, r.stderr


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
