"""Timers over real MPI ranks with a torch.distributed all-reduce, merged by rank 0."""

import shutil
import tempfile
import time

import h5py
import numpy as np
import pytest
import torch
import torch.distributed as dist

from spmd.obs.metadata import run_metadata
from spmd.obs.timers import Timers
from spmd.runtime.world import make_world
from traces.merge import merge


@pytest.mark.mpi(min_size=1)
def test_timers_allreduce_merge():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    run_dir = comm.bcast(tempfile.mkdtemp(prefix="traces_mpi_") if rank == 0 else None, root=0)
    try:
        make_world(1, "cpu", comm)  # gloo default group (reused if an earlier module made one)
        t = Timers(rank)
        t.align(comm)
        t.set_phase("decode", step=0)
        with t.compute("test.compute", layer=0):
            x = torch.ones(256, 256) @ torch.ones(256, 256)
        buf = torch.full((1000,), float(rank))
        with t.comm("test.allreduce", nbytes=buf.numel() * buf.element_size(), group="world"):
            dist.all_reduce(buf)
        with t.wait("test.barrier"):
            comm.Barrier()
        t.write(run_dir, run_metadata({"rank": rank, "world_size": size}))
        comm.Barrier()
        if rank == 0:
            _check_merged(run_dir, size, run_end=t.now_ns())
        assert x[0, 0] == 256 and buf[0] == sum(range(size))
    finally:
        comm.Barrier()
        if rank == 0:
            shutil.rmtree(run_dir, ignore_errors=True)


def _check_merged(run_dir: str, size: int, run_end: int) -> None:
    """Every rank's events present, comm bytes right, all events inside [0, run_end]."""
    with h5py.File(merge(run_dir), "r") as f:
        ev = f["events"][()]
        assert f.attrs["n_ranks"] == size
        assert time.time_ns() > int(f.attrs["epoch_ns"]) > 0
        assert sorted(f["ranks"]) == sorted(str(r) for r in range(size))
    for r in range(size):
        mine = ev[ev["rank"] == r]
        assert sorted(mine["name"].tolist()) == [b"test.allreduce", b"test.barrier", b"test.compute"]
        comm_ev = mine[mine["kind"] == b"comm"]
        assert comm_ev["bytes"].tolist() == [4000] and comm_ev["group"].tolist() == [b"world"]
    end = ev["start_ns"] + ev["dur_ns"]
    assert np.all(ev["start_ns"] >= 0) and np.all(end <= run_end), (ev, run_end)
    # the barrier's exit is one instant on the aligned clock: every rank sees it within 0.5 s
    barrier_end = end[ev["name"] == b"test.barrier"]
    assert barrier_end.max() - barrier_end.min() < 500_000_000
