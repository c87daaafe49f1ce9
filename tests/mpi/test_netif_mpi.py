"""pytest-mpi (1 and 2 ranks): the network checks a job over several hosts runs at start-up, forced on
one host (multi_host=True): a loopback rendezvous or a loopback-only gloo interface is refused on every
rank; a reachable address passes the TCP probes and gloo is told the interface that routes to rank 0."""
from __future__ import annotations

import os

import pytest
from mpi4py import MPI

from spmd.runtime import netif
from spmd.config import UsageError
from spmd.parallel.errors import agree
from spmd.runtime.world import check_network

pytestmark = pytest.mark.mpi(min_size=1)


@pytest.fixture
def gloo_env():
    saved = os.environ.get("GLOO_SOCKET_IFNAME")
    os.environ.pop("GLOO_SOCKET_IFNAME", None)
    yield
    os.environ.pop("GLOO_SOCKET_IFNAME", None)
    if saved is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = saved


def _routable() -> str | None:
    addr = netif.rendezvous_address("gloo", {})
    return None if netif.is_loopback(addr) else addr


def test_loopback_rendezvous_is_refused_everywhere(gloo_env):
    comm = MPI.COMM_WORLD
    with pytest.raises(UsageError, match=r"rendezvous address is 127\.0\.0\.1 \(loopback\) but the job spans hosts"):
        agree(comm, lambda: check_network(comm, "gloo", "127.0.0.1", multi_host=True))


def test_reachable_address_passes_and_sets_gloo_interface(gloo_env):
    comm = MPI.COMM_WORLD
    addr = comm.bcast(_routable(), root=0)
    if addr is None:
        pytest.skip("this host has no non-loopback IPv4 address")
    agree(comm, lambda: check_network(comm, "gloo", addr, multi_host=True))
    name = os.environ["GLOO_SOCKET_IFNAME"]
    assert netif.interfaces()[name] == netif.route_to(addr)[1]


def test_loopback_gloo_interface_is_refused(gloo_env):
    comm = MPI.COMM_WORLD
    addr = comm.bcast(_routable(), root=0)
    if addr is None:
        pytest.skip("this host has no non-loopback IPv4 address")
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    with pytest.raises(UsageError, match="GLOO_SOCKET_IFNAME=lo on host .* is loopback only"):
        agree(comm, lambda: check_network(comm, "gloo", addr, multi_host=True))


def test_single_host_checks_only_the_setting(gloo_env):
    comm = MPI.COMM_WORLD
    agree(comm, lambda: check_network(comm, "gloo", "127.0.0.1", multi_host=False))  # one host: loopback is fine
    os.environ["GLOO_SOCKET_IFNAME"] = "nosuch0"
    with pytest.raises(UsageError, match="GLOO_SOCKET_IFNAME=nosuch0 selects no interface"):
        agree(comm, lambda: check_network(comm, "gloo", "127.0.0.1", multi_host=False))
