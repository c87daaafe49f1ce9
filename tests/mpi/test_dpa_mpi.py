"""pytest-mpi (1 and 2 ranks): the dpa group layout's serving loop. Every rank serves its own requests
(a different number per rank) with its own slots, the ranks' forwards meet in the MoE all-to-alls
(Scheduler lockstep: idle ranks run pad-token forwards and empty decode steps), and each request gets the
tokens of the static loop on one unsharded rank. fp32, tiny checkpoint."""
from __future__ import annotations

import types

import pytest
import torch.distributed as dist
from mpi4py import MPI

from conftest import PROMPTS20, checkpoint_dir
from spmd.config import ModelArgs
from spmd.engines.native import NativeEngine
from spmd.obs.timers import Timers
from spmd.runtime.generate import GenConfig, generate
from spmd.runtime.prompts import encode, load_tokenizer, read_prompts
from spmd.runtime.records import Sampling, WorkItem
from spmd.runtime.scheduler import Scheduler
from spmd.runtime.serve import reduce_int
from spmd.runtime.world import make_world, shutdown

pytestmark = pytest.mark.mpi(min_size=1)
EOS = 1


@pytest.fixture(scope="module")
def worlds():
    """(dpa world: every rank its own requests, experts over all ranks; G1 world: a whole model per rank)."""
    owned = not dist.is_initialized()
    size = MPI.COMM_WORLD.size
    dpa, g1 = make_world(1, "cpu", ep=size), make_world(1, "cpu")
    yield dpa, g1
    if owned:
        shutdown(dpa)


def engine(world, ckpt):
    args = types.SimpleNamespace(checkpoint=ckpt, dtype="fp32", max_new_tokens=16, cuda_graph="auto",
                                 fp8_weights="auto")
    return NativeEngine(world, args, ModelArgs.from_checkpoint(ckpt), Timers(world.rank, enabled=False))


def test_each_rank_serves_its_own_requests_in_lockstep(worlds):
    dpa_world, g1_world = worlds
    ckpt = checkpoint_dir("tiny", "bf16")
    ids = encode(load_tokenizer(ckpt), read_prompts(PROMPTS20), chat=True)
    rank, size = dpa_world.rank, dpa_world.size
    assert dpa_world.ep_size == size and dpa_world.tp_group is None and dpa_world.is_leader
    # rank 0 takes most of the requests, so the others idle while it prefills and decodes
    mine = [WorkItem(i, q, sampling=Sampling(1 + (i * 5) % 16, 0.0, 1.0, i, (), i % 2 == 0))
            for i, q in enumerate(ids) if (i % 5 == 0) == (rank != 0) or size == 1]
    dpa_engine = engine(dpa_world, ckpt)
    assert dpa_engine.decode_mode == "eager" and (dpa_engine.ep is not None) == (size > 1)
    lock = (lambda flags: reduce_int(dpa_world.ep_comm, flags, "bor")) if size > 1 else None
    sched = Scheduler(dpa_engine, 3, 24, 256, GenConfig(16, EOS, EOS), Timers(0, enabled=False), lockstep=lock)
    out = []
    stats = sched.run(iter([mine[:4], mine[4:]]), out.extend)
    reference = generate(engine(g1_world, ckpt), mine, GenConfig(16, EOS, EOS))
    got = {r.index: r.tokens for r in out}
    assert sorted(got) == sorted(it.index for it in mine)
    assert all(got[r.index] == r.tokens for r in reference)
    idle = MPI.COMM_WORLD.allgather(stats.idle_forwards)
    assert (max(idle) > 0) == (size > 1)  # a rank with fewer prompts met the others' prefill forwards
    steps = MPI.COMM_WORLD.allgather(stats.decode_steps)
    assert len(set(steps)) == 1  # one decode step on every rank, each time any rank decodes
    traffic = dpa_engine.traffic()
    if size > 1:
        assert traffic["group_rank"] == rank and traffic["cross_host_bytes"] == 0
        assert traffic["in_host_bytes"] == sum(sum(v) for v in traffic["bytes_to"].values()) > 0
    else:
        assert traffic is None
