"""pytest-mpi (1 and 2 ranks): the stop agreement never blocks, whoever gets the signal, static or dynamic."""
from __future__ import annotations

import time

import pytest
import torch.distributed as dist
from mpi4py import MPI

from spmd.runtime import dispatch
from spmd.runtime.records import WorkItem

from spmd.runtime import stop
from spmd.runtime.world import make_world, shutdown

pytestmark = pytest.mark.mpi(min_size=1)


@pytest.fixture(scope="module")
def worlds():
    owned = not dist.is_initialized()
    size = MPI.COMM_WORLD.size
    ws = {g: make_world(g, "cpu") for g in range(1, size + 1) if size % g == 0}
    yield ws
    if owned:
        shutdown(ws[1])


@pytest.fixture(autouse=True)
def no_signal():
    stop._received = None
    yield
    stop._received = None


def _serve(w, batches, signal_at: dict[int, int], halt: stop.Agreement, delay: float = 0.0) -> tuple[int, bool]:
    """The loop of spmd.__main__.serve with fake batches: rank r "gets SIGTERM" before its batch signal_at[r].

    Returns (prompts done by all groups, stopped)."""
    done = 0
    progress = dispatch.Progress(w, total=100, enabled=False)
    for b, batch in enumerate(batches):
        if signal_at.get(w.rank) == b:
            stop._received = "SIGTERM"
        if halt.check():
            continue
        time.sleep(delay)  # a batch's work
        done += len(batch)
        progress.update(len(batch))
    progress.close()  # must not wait for reports that never come
    try:
        halt.finish(done, 0, 100)
    except stop.Stopped as exc:
        return exc.done, True
    return w.comm.allreduce(done if w.is_leader else 0), False


@pytest.mark.parametrize("who", ["rank0", "last", "all", "nobody"])
def test_static_stop_with_unequal_batch_counts(worlds, who):
    """Replicas have 3 and 7 batches; the signal reaches some ranks only: all agree, nobody hangs."""
    for w in worlds.values():
        n_batches = 3 if w.replica == 0 else 7
        batches = [[0, 1]] * n_batches
        at = {"rank0": {0: 1}, "last": {w.size - 1: 1}, "all": {r: 1 for r in range(w.size)}, "nobody": {}}[who]
        done, stopped = _serve(w, batches, at, stop.Agreement(w))
        assert w.comm.allgather(stopped) == [who != "nobody"] * w.size
        stop._received = None
        total = sum(2 * (3 if r == 0 else 7) for r in range(w.n_replicas))
        assert done < total if who != "nobody" else done == total


@pytest.mark.parametrize("who", ["rank0", "last", "nobody"])
def test_dynamic_stop_halts_the_dispatcher(worlds, who):
    n = 40
    for w in worlds.values():
        items = [WorkItem(i, [1, 2]) for i in range(n)] if w.rank == 0 else None
        halt = stop.Agreement(w)
        batches = (chunk for chunk in dispatch.iter_dynamic(w, items, 2, None, halt))
        at = {"rank0": {0: 1}, "last": {w.size - 1: 1}, "nobody": {}}[who]
        done, stopped = _serve(w, batches, at, halt, delay=0.02)  # every replica gets a second chunk
        assert w.comm.allgather(stopped) == [who != "nobody"] * w.size
        stop._received = None
        assert done < n if who != "nobody" else done == n


def test_progress_close_after_fewer_reports_than_total(worlds):
    w = worlds[1]
    p = dispatch.Progress(w, total=1000, enabled=False, initial=10)
    p.update(1)
    p.close()
    if w.rank == 0:
        assert p.done == 10 + w.n_replicas
