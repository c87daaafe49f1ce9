"""pytest-mpi (1 and 2 ranks): world and groups, scatter/gather order, static vs dynamic dispatch."""
from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from mpi4py import MPI

from spmd.runtime import dispatch
from spmd.runtime.records import Result, WorkItem
from spmd.config import UsageError
from spmd.runtime.world import make_world, shutdown
from spmd.parallel.errors import on_root

pytestmark = pytest.mark.mpi(min_size=1)


def _group_sizes(size: int) -> list[int]:
    return [g for g in range(1, size + 1) if size % g == 0]


@pytest.fixture(scope="module")
def worlds():
    owned = not dist.is_initialized()
    ws = {g: make_world(g, "cpu") for g in _group_sizes(MPI.COMM_WORLD.size)}
    yield ws
    if owned:
        shutdown(ws[1])


def test_world_layout_and_group_collective(worlds):
    for g, w in worlds.items():
        assert (w.size, w.group_size, w.n_replicas) == (MPI.COMM_WORLD.size, g, w.size // g)
        assert w.replica == w.rank // g and w.group_rank == w.rank % g
        assert w.group_comm.size == g and w.is_leader == (w.group_rank == 0)
        assert 0 <= w.local_rank < w.local_size
        t = torch.tensor([float(w.rank)])
        if w.tp_group is not None:
            dist.all_reduce(t, group=w.tp_group)
        assert t.item() == sum(range(w.replica * g, (w.replica + 1) * g))
        leaders = w.comm.allgather(w.is_leader)
        assert sum(leaders) == w.n_replicas


def test_on_root_shares_result_and_error():
    comm = MPI.COMM_WORLD
    assert on_root(comm, lambda: comm.rank + 41) == 41
    assert on_root(comm, lambda: "mine", share=False) == ("mine" if comm.rank == 0 else None)
    with pytest.raises(UsageError, match="bad on root"):
        on_root(comm, lambda: (_ for _ in ()).throw(UsageError("bad on root")))


def _free_comms(w) -> None:
    """The communicators of a dedicated-orchestrator world made by a test (the fixture's are kept)."""
    for c in (w.group_comm, w.leaders_comm, w.model_comm):
        if c != MPI.COMM_NULL:
            c.Free()


def _items(n: int):
    return [WorkItem(i, list(range(1 + (i * 7) % 13))) for i in range(n)]


@pytest.mark.parametrize("n", [0, 1, 5, 23])
def test_static_scatter_gather_keeps_order_and_count(worlds, n):
    for w in worlds.values():
        items = _items(n) if w.rank == 0 else None
        mine = dispatch.scatter_static(w, items)
        same = w.group_comm.allgather([it.index for it in mine])
        assert all(s == same[0] for s in same)  # every rank of a group holds the same share
        res = [Result(it.index, it.ids[-1:], replica=w.replica) for it in mine]
        out = dispatch.gather_results(w, res, n)
        if w.rank == 0:
            assert [r.index for r in out] == list(range(n))
            assert all(r.tokens == _items(n)[r.index].ids[-1:] for r in out)


@pytest.mark.parametrize("chunk", [1, 3, 50])
def test_dynamic_dispatch_hands_out_everything_once(worlds, chunk):
    n = 17
    for w in worlds.values():
        items = _items(n) if w.rank == 0 else None
        got = [it.index for work in dispatch.iter_dynamic(w, items, chunk) for it in work]
        per_group = w.group_comm.allgather(got)
        assert all(p == per_group[0] for p in per_group)
        lengths = [len(_items(n)[i].ids) for i in got]
        assert lengths == sorted(lengths, reverse=True)  # chunks go out longest prompt first
        if w.n_replicas == 1:  # one group takes every chunk: the whole order, ties by index
            assert got == [it.index for it in dispatch.longest_first(_items(n))]
        res = [Result(i, []) for i in got]
        out = dispatch.gather_results(w, res, n)  # raises on a lost or duplicated prompt
        if w.rank == 0:
            assert [r.index for r in out] == list(range(n))


def test_progress_counts_every_leader(worlds):
    w = worlds[1]
    p = dispatch.Progress(w, total=3 * w.n_replicas, enabled=False)
    for _ in range(3):
        p.update(1, tokens=5)  # (prompts, output tokens) travel together to rank 0
    p.close()
    if w.rank == 0:
        assert (p.done, p.tokens) == (3 * w.n_replicas, 15 * w.n_replicas)


def test_gather_detects_a_lost_prompt(worlds):
    w = worlds[1]
    res = [Result(w.rank, [])] if w.rank != 0 else []
    if w.rank == 0:
        with pytest.raises(RuntimeError, match="lost or duplicated"):
            dispatch.gather_results(w, res, w.size)
    else:
        dispatch.gather_results(w, res, w.size)


def test_dedicated_orchestrator_world_and_dispatch(worlds):
    """World rank 0 without a model: the others form the groups; requests bring each chunk's rows back."""
    comm = MPI.COMM_WORLD
    if comm.size == 1:
        with pytest.raises(UsageError, match="needs model ranks besides rank 0"):
            make_world(1, "cpu", first=1)
        return
    w = make_world(1, "cpu", first=1)  # groups of one: no torch.distributed group to create
    assert w.is_orchestrator == (w.rank == 0) and w.n_replicas == w.size - 1
    assert (w.replica, w.model_rank) == ((-1, -1) if w.rank == 0 else (w.rank - 1, w.rank - 1))
    assert w.leader(0) == 1
    assert (w.model_comm == MPI.COMM_NULL) if w.rank == 0 else (w.model_comm.size == w.size - 1)
    n, got = 11, []
    if w.is_orchestrator:
        dispatch.serve_chunks(w, _items(n), 2, got.extend)
    else:
        outbox = []
        for work in dispatch.iter_dynamic(w, None, 2, outbox=outbox):
            outbox += [Result(it.index, [], replica=w.replica) for it in work]
            got += outbox[-len(work):]
    out = dispatch.gather_results(w, got, n)  # leaders' rows already went to rank 0 with their requests
    if w.rank == 0:
        assert [r.index for r in out] == list(range(n))
    _free_comms(w)


def test_dispatcher_sleeps_while_it_waits():
    """The dedicated orchestrator polls for requests with sleeps instead of MPI's busy wait: while the
    leaders hold back their first request for a second, it uses a small part of a core."""
    comm = MPI.COMM_WORLD
    if comm.size == 1:  # no dedicated orchestrator without model ranks (checked above)
        return
    w = make_world(1, "cpu", first=1)
    n, got = 2 * w.n_replicas, []
    if w.is_orchestrator:
        wall, cpu = time.perf_counter(), time.process_time()
        dispatch.serve_chunks(w, _items(n), 1, got.extend)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        assert wall > 0.9 and cpu < 0.3 * wall, (wall, cpu)  # a busy wait would spend about the whole wall
    else:
        time.sleep(1.0)
        outbox = []
        for work in dispatch.iter_dynamic(w, None, 1, outbox=outbox):
            outbox += [Result(it.index, []) for it in work]
    dispatch.gather_results(w, got if w.is_orchestrator else [], n)
    _free_comms(w)
