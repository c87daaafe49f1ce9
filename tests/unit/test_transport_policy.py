"""slurm/check_transport.py on merged traces with NCCL logs: IB passes, a Socket fallback warns and,
with --require-ib, fails the job; runs without NCCL (gloo on CPU, as in CI) pass.

The NCCL lines are the ones NCCL prints at NCCL_DEBUG=INFO; traces.merge imports them from
RUN_DIR/logs (traces/nccl_log.py) exactly as after a real job.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import ROOT

CHECK = ROOT / "slurm" / "check_transport.py"

IB_LOG = """host-a:1:1 [0] NCCL INFO NCCL version 2.27.3+cuda12.9
host-a:1:1 [0] NCCL INFO NET/IB : Using [0]mlx5_0:1/IB [1]mlx5_1:1/IB ; OOB ib0:10.0.0.1<0>
host-a:1:1 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[1] via P2P/CUMEM/read
host-a:1:1 [0] NCCL INFO Channel 00/0 : 1[1] -> 2[0] [send] via NET/IB/0/GDRDMA
"""
SOCKET_LOG = """host-a:1:1 [0] NCCL INFO NCCL version 2.27.3+cuda12.9
host-a:1:1 [0] NCCL INFO NET/Socket : Using [0]eth0:10.0.0.1<0>
host-a:1:1 [0] NCCL INFO Using network Socket
host-a:1:1 [0] NCCL INFO Channel 00/0 : 1[1] -> 2[0] [send] via NET/Socket/0
"""
LOCAL_LOG = """host-a:1:1 [0] NCCL INFO NCCL version 2.27.3+cuda12.9
host-a:1:1 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[1] via P2P/CUMEM/read
"""


def _run_dir(tmp: Path, hosts: list[str], backend: str, log: str | None, orchestrator: bool = False) -> Path:
    """A run directory with minimal rank files (and NCCL logs), merged by traces.merge; orchestrator: rank 0
    is a dedicated orchestrator (no torch.distributed, no NCCL log), as with --orchestrator dedicated."""
    from traces.merge import merge

    ev = np.zeros(1, dtype=[("name", "S8"), ("kind", "S8"), ("phase", "S8"), ("start_ns", "<i8"),
                            ("dur_ns", "<i8")])
    (tmp / "logs").mkdir(parents=True)
    for r, host in enumerate(hosts):
        orch = orchestrator and r == 0
        world = {"backend": "none" if orch else backend, "rank": r, "world_size": len(hosts),
                 "role": "orchestrator" if orch else "model"}
        with h5py.File(tmp / f"rank{r:05d}.h5", "w") as f:
            f.create_dataset("events", data=ev)
            f.attrs.update(rank=r, world_size=len(hosts), hostname=host, world=json.dumps(world))
        if log is not None and not orch:
            (tmp / "logs" / f"rank{r:05d}.nccl.log").write_text(log)
    merge(tmp)
    return tmp


def _check(run_dir: Path, *flags: str):
    return subprocess.run([sys.executable, str(CHECK), str(run_dir), *flags], capture_output=True, text=True,
                          cwd=ROOT)


@pytest.mark.parametrize("hosts,backend,log,kind", [
    (["a", "b"], "nccl", IB_LOG, "ib"),
    (["a", "a"], "nccl", LOCAL_LOG, "local"),
    (["a", "a"], "gloo", None, "none"),
])
def test_passing_transports(tmp_path, hosts, backend, log, kind):
    run = _run_dir(tmp_path, hosts, backend, log)
    for flags in ((), ("--require-ib",)):
        r = _check(run, *flags)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"transport: {kind}:")
    if kind == "ib":
        assert "GPUDirect RDMA" in r.stdout


def test_socket_fallback_warns_and_fails_with_require_ib(tmp_path):
    run = _run_dir(tmp_path, ["a", "b"], "nccl", SOCKET_LOG)
    r = _check(run)
    assert r.returncode == 0 and r.stdout.startswith("transport: socket:")
    assert "NCCL FELL BACK TO SOCKETS" in r.stderr
    r = _check(run, "--require-ib")
    assert r.returncode == 3 and "NCCL FELL BACK TO SOCKETS" in r.stderr


def test_multi_host_nccl_without_log_cannot_show_ib(tmp_path):
    run = _run_dir(tmp_path, ["a", "b"], "nccl", None)
    assert _check(run).returncode == 0
    r = _check(run, "--require-ib")
    assert r.returncode == 3 and "cannot show IB" in r.stderr


def test_dedicated_orchestrator_host_is_not_a_model_host(tmp_path):
    """Rank 0 of --orchestrator dedicated on a CPU node: the model ranks' one GPU host with P2P channels
    (NCCL loaded only its Socket network, no IB there) is `local`, not a Socket fallback between hosts."""
    run = _run_dir(tmp_path, ["cpu01", "a", "a"], "nccl", LOCAL_LOG + "host-a:1:1 [0] NCCL INFO Using network Socket\n",
                   orchestrator=True)
    r = _check(run, "--require-ib")
    assert r.returncode == 0 and r.stdout.startswith("transport: local:"), r.stdout + r.stderr


def test_missing_merged_trace_is_an_error(tmp_path):
    r = _check(tmp_path)
    assert r.returncode == 1 and "merged.h5 not found" in r.stderr
