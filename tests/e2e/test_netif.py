"""spmd.runtime.netif: which interfaces a setting selects (gloo's list, NCCL's syntax), the rendezvous address,
the route lookup; and a run told a wrong interface ends at start-up with the host and the interfaces it has."""
from __future__ import annotations

import time

import pytest

from conftest import PROMPTS20, mpirun
from spmd.runtime import netif

IFACES = {"lo": "127.0.0.1", "eth0": "10.0.0.5", "eth1": "10.1.0.5", "ib0": "10.2.0.5", "docker0": None}


@pytest.mark.parametrize("setting,nccl,want", [
    ("eth0", False, ["eth0"]), ("eth1,ib0", False, ["eth1", "ib0"]), ("eth", False, []),  # gloo: exact names
    ("docker0", False, []),                                                                 # no IPv4
    ("eth", True, ["eth0", "eth1"]), ("=eth0", True, ["eth0"]), ("^lo,eth", True, ["ib0"]),  # NCCL syntax
    ("^=eth0", True, ["lo", "eth1", "ib0"]), ("nosuch", True, [])])
def test_matching(setting, nccl, want):
    assert netif.matching(setting, nccl, IFACES) == want


def test_check_setting_names_the_host_and_what_it_has():
    assert netif.check_setting("gloo", {}, IFACES) == []  # unset: the library chooses
    assert netif.check_setting("nccl", {"NCCL_SOCKET_IFNAME": "ib"}, IFACES) == ["ib0"]
    with pytest.raises(ValueError, match=r"GLOO_SOCKET_IFNAME=ib1 selects no interface .* on host .*"
                                         r"lo 127\.0\.0\.1, eth0 10\.0\.0\.5.*docker0 \(no IPv4\)"):
        netif.check_setting("gloo", {"GLOO_SOCKET_IFNAME": "ib1"}, IFACES)


def test_this_host():
    here = netif.interfaces()
    assert here.get("lo") == "127.0.0.1"
    assert netif.route_to("127.0.0.1") == ("lo", "127.0.0.1")
    assert netif.rendezvous_address("gloo", {"GLOO_SOCKET_IFNAME": "lo"}) == "127.0.0.1"
    assert netif.rendezvous_address("gloo", {}) in {a for a in here.values() if a}
    with pytest.raises(ValueError, match="NCCL_SOCKET_IFNAME=nosuch0"):
        netif.rendezvous_address("nccl", {"NCCL_SOCKET_IFNAME": "nosuch0"})


def test_wrong_interface_fails_fast_with_a_clear_message(tmp_path, tiny_bf16):
    """GLOO_SOCKET_IFNAME (or SPMD_IFNAME through launch/env.sh) naming no interface of the host ends
    every rank with exit 2 and one message, before anything waits on the network."""
    t0 = time.monotonic()
    r = mpirun(2, ["--checkpoint", str(tiny_bf16), "--prompts", str(PROMPTS20), "--output", str(tmp_path / "o.jsonl"),
                   "--engine", "native", "--group-size", "2", "--max-new-tokens", "2", "--no-progress"],
               timeout=120, env_extra={"GLOO_SOCKET_IFNAME": "nosuch0"})
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("GLOO_SOCKET_IFNAME=nosuch0 selects no interface") == 1, r.stderr[-2000:]
    assert "lo 127.0.0.1" in r.stderr
    assert time.monotonic() - t0 < 100
    assert not (tmp_path / "o.jsonl").exists()
