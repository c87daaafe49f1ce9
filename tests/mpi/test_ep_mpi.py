"""pytest-mpi (1 and 2 ranks): the dpa layout's expert parallelism (spmd.parallel.ep) against the unsharded
MoE, and the whole model with data-parallel attention against the unsharded model, each rank on its own
rows: uneven routing (every token to one rank's experts), a rank with no tokens, fewer tokens than ranks,
the per-expert loop and the grouped GEMMs."""
from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

from conftest import assert_fp32_close
from spmd.model.transformer import MoE, Transformer
from spmd.parallel.comm import Group, attach_timers
from spmd.obs.timers import Timers
from test_parallel_mpi import margs, seeded_, world  # noqa: F401  (fixtures)

pytestmark = pytest.mark.mpi(min_size=1)
F32 = 4


def _tokens(n: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def _moes(world, margs):
    ep = Group(world.tp_group, "ep")
    full = seeded_(MoE(1, margs, Group()))
    sharded = MoE(1, margs, Group(), ep=ep)
    sharded.load_state_dict({k: v for k, v in full.state_dict().items()
                             if not k.startswith("experts.") or k.split(".")[1] in sharded.experts})
    return ep, full, sharded


@torch.inference_mode()
@pytest.mark.parametrize("grouped", [False, True])
def test_dispatch_and_combine_equal_the_unsharded_moe(world, margs, grouped):  # noqa: F811
    ep, full, sharded = _moes(world, margs)
    per_rank = margs.n_routed_experts // ep.size
    assert sorted(map(int, sharded.experts)) == list(range(ep.rank * per_rank, (ep.rank + 1) * per_rank))
    if grouped:
        full.pack()
        sharded.pack()
    timers = Timers(world.rank)
    attach_timers(sharded, timers)
    # rank r: its own tokens; the last rank has none when there are several, and in the last case
    # there are fewer tokens than ranks
    for case, counts in enumerate(([5, 0, 3, 2], [1, 0, 0, 0])):
        n = counts[ep.rank] if ep.size > 1 else 4
        x = _tokens(n, margs.dim, seed=10 * case + ep.rank)
        assert_fp32_close(sharded(x), full(x), 16)
    # uneven: every token's experts on rank 0 (a large routing bias there): the other ranks receive nothing
    bias = torch.zeros(margs.n_routed_experts)
    bias[:per_rank] = 100.0
    for m in (full, sharded):
        m.gate.e_score_correction_bias.copy_(bias)
    timers.clear()
    x = _tokens(3, margs.dim, seed=7 + ep.rank)
    assert_fp32_close(sharded(x), full(x), 16)
    t = timers.table()
    sent = {n.decode(): int(b) for n, b, k in zip(t["name"], t["bytes"], t["kind"]) if k == b"comm"}
    if ep.size > 1:
        assert sent["moe.dispatch"] == 3 * margs.dim * F32  # each token once, to rank 0 only
        assert sent["moe.dispatch.counts"] == ep.size * 8
        assert sent["moe.dispatch.meta"] == 3 * 2 * margs.n_activated_experts * 4
        got = MPI.COMM_WORLD.allgather(sent["moe.combine"])
        assert got[0] == ep.size * 3 * margs.dim * F32 and not any(got[1:])  # rank 0 returns every sum
    assert set(t["group"][t["kind"] == b"comm"].tolist()) <= {b"ep"}


@torch.inference_mode()
def test_data_parallel_attention_model_equals_the_unsharded_model(world, margs):  # noqa: F811
    """Each rank runs its own rows (a different batch size per rank) through prefill and two decode steps."""
    ep = Group(world.tp_group, "ep")
    full = seeded_(Transformer(margs, Group()))
    dpa = Transformer(margs, Group(), ep=ep)
    dpa.load_state_dict({k: v for k, v in full.state_dict().items() if ".experts." not in k
                         or k.split(".experts.")[1].split(".")[0] in dpa.model.layers[2].mlp.experts}, strict=False)
    missing = {k for k, _ in dpa.named_parameters()} - {k for k in full.state_dict()}
    assert not missing
    lengths = [(4, 7), (5,), (3, 6, 2)][ep.rank % 3]
    t, steps = max(lengths), 2
    mask = torch.tensor([[i >= t - n for i in range(t)] for n in lengths])
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    tokens = torch.randint(2, margs.vocab_size, mask.shape, generator=torch.Generator().manual_seed(ep.rank))
    caches = [m.new_cache(len(lengths), t + steps) for m in (full, dpa)]
    args = (tokens, pos, mask, 0)
    for step in range(steps + 1):
        out = [m(args[0], args[1], args[2], c, args[3]) for m, c in zip((full, dpa), caches)]
        assert_fp32_close(out[1], out[0], 64)
        mask = torch.cat([mask, torch.ones(len(lengths), 1, dtype=torch.bool)], dim=1)
        args = (out[0].argmax(-1, keepdim=True), args[1][:, -1:] + 1, mask, t + step)
