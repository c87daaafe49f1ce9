"""launch/env.sh: NVLink multicast stays off whatever the caller set; one knob names the network interface.
launch/hybrid.sh refuses a host file without the orchestrator's one-slot host first."""
from __future__ import annotations

import os
import subprocess

import pytest

from conftest import ROOT


def _env(**extra: str) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("NCCL_", "GLOO_", "SPMD_IFNAME"))}
    out = subprocess.run(["bash", "-c", f". {ROOT}/launch/env.sh && env -0"], capture_output=True, check=True,
                         env={**base, **extra})
    return dict(kv.split("=", 1) for kv in out.stdout.decode().split("\0") if "=" in kv)


def test_nvlink_multicast_is_always_off():
    env = _env(NCCL_NVLS_ENABLE="1", TORCH_SYMM_MEM_DISABLE_MULTICAST="0", NVSHMEM_DISABLE_NVLS="0")
    assert (env["NCCL_NVLS_ENABLE"], env["TORCH_SYMM_MEM_DISABLE_MULTICAST"], env["NVSHMEM_DISABLE_NVLS"]) == \
        ("0", "1", "1")


def test_interface_knob_and_site_settings():
    env = _env()
    assert "NCCL_SOCKET_IFNAME" not in env and "GLOO_SOCKET_IFNAME" not in env  # NCCL/gloo choose
    assert "NCCL_IB_HCA" not in env and env["NCCL_DEBUG"] == "WARN"
    env = _env(SPMD_IFNAME="ib0", NCCL_IB_HCA="mlx5_0")
    assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "ib0"
    assert env["NCCL_IB_HCA"] == "mlx5_0"  # the site's value passes through
    assert _env(SPMD_IFNAME="ib0", GLOO_SOCKET_IFNAME="eth0")["GLOO_SOCKET_IFNAME"] == "eth0"


@pytest.mark.parametrize("content,message", [
    ("a slots=2\nb slots=2\n", "the first host is the orchestrator's and needs slots=1 (it has 2)"),
    ("# cpu\na slots=1\n\n", "at least one GPU host (1 host line(s))")])
def test_launch_hybrid_sh_checks_the_host_file(tmp_path, content, message):
    (tmp_path / "hosts").write_text(content)
    r = subprocess.run(["bash", str(ROOT / "launch" / "hybrid.sh"), str(tmp_path / "hosts"), "--", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr
