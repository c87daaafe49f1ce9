"""pytest-mpi (1 and 2 ranks): each parallel layer, the MoE and attention blocks and the whole model,
sharded over the world == unsharded (a one-device Group), with the named collectives in the trace of the
timers attached after construction."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.distributed as dist
from mpi4py import MPI

from conftest import ROOT, assert_fp32_close
from spmd.config import ModelArgs
from spmd.model.transformer import MLA, MoE, Transformer, attention_bias, rope_attention_factor, rope_cos_sin, yarn_inv_freq
from spmd.parallel.comm import UNTIMED, Group, attach_timers
from spmd.parallel.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear, local_slice
from spmd.obs.timers import Timers
from spmd.runtime.world import make_world, shutdown

pytestmark = pytest.mark.mpi(min_size=1)
F32 = 4  # bytes per float32


@pytest.fixture(scope="module")
def world():
    """The whole world as one model group; torch.distributed is torn down again if this module set it up."""
    owned = not dist.is_initialized()
    w = make_world(MPI.COMM_WORLD.size, "cpu")
    yield w
    if owned:  # other modules (test_traces_mpi) init their own default group
        shutdown(w)


@pytest.fixture(scope="module")
def margs():
    """The tiny config cut to 3 layers: one dense, two MoE."""
    cfg = json.loads((ROOT / "inputs" / "models" / "tiny.json").read_text())
    return dataclasses.replace(ModelArgs.from_config(cfg), n_layers=3)


def seeded_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Same random weights on every rank: norms near 1, the rest N(0, 0.05)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.05 * noise)
    return module


def load_shards(full: torch.nn.Module, sharded: torch.nn.Module, tp: Group) -> None:
    """Copy this rank's slices of full's weights into sharded, as the checkpoint loader does."""
    rank, size = tp.rank, tp.size
    src = full.state_dict()
    with torch.no_grad():
        for name, p in sharded.named_parameters():
            w = src[name]
            dim = getattr(sharded.get_submodule(name.rpartition(".")[0]), "shard_dim", None)
            if dim is not None:
                index = [slice(None)] * w.ndim
                index[dim] = local_slice(w.shape[dim], rank, size)
                w = w[tuple(index)]
            p.copy_(w)


def timed(world, *parts) -> Timers:
    """Fresh timers of this rank, attached to parts (modules or Groups)."""
    timers = Timers(world.rank)
    for part in parts:
        attach_timers(part, timers)
    return timers


def comm_events(timers: Timers) -> list[tuple[str, int]]:
    t = timers.table()
    t = t[t["kind"] == b"comm"]
    assert (t["group"] == b"tp").all()
    return [(n.decode(), int(b)) for n, b in zip(t["name"], t["bytes"])]


def compute_names(timers: Timers) -> set[str]:
    t = timers.table()
    return {n.decode() for n in t["name"][t["kind"] == b"compute"]}


def _randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _close(a, b, ulps: float = 16):
    """Sharded vs whole: equal to `ulps` fp32 ulps of the largest |b| (0: bit-identical); see assert_fp32_close."""
    if ulps == 0:
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    else:
        assert_fp32_close(a, b, ulps)


def test_group_and_local_slice(world):
    one, tp = Group(), Group(world.tp_group)
    assert (one.rank, one.size) == (0, 1)
    assert (tp.rank, tp.size) == (world.group_rank, world.group_size)
    x = torch.ones(3)
    timers = timed(world, one)
    assert one.all_reduce("sum", x) is x and one.all_gather_last("gather", x) is x  # one device: no-ops
    assert timers.table().size == 0
    assert local_slice(12, 1, 3) == slice(4, 8)
    with pytest.raises(ValueError, match="10 not divisible by group size 3"):
        local_slice(10, 0, 3)


@torch.inference_mode()
def test_column_parallel(world):
    tp, timers = Group(world.tp_group), Timers(world.rank)
    rank, size = tp.rank, tp.size
    full = seeded_(ColumnParallelLinear(64, 32, Group()))
    x = _randn(3, 5, 64)
    ref = full(x)
    for gather in (False, True):
        sharded = ColumnParallelLinear(64, 32, tp, gather_output=gather, name="col")
        attach_timers(sharded, timers)
        load_shards(full, sharded, tp)
        assert sharded.weight.shape == (32 // size, 64)
        _close(sharded(x), ref if gather else ref[..., local_slice(32, rank, size)])
    assert comm_events(timers) == ([("col.all_gather", 3 * 5 * (32 // size) * F32)] if size > 1 else [])


@torch.inference_mode()
def test_row_parallel(world):
    tp = Group(world.tp_group)
    rank, size = tp.rank, tp.size
    full = seeded_(RowParallelLinear(64, 32, Group()))
    x = _randn(3, 5, 64)
    ref = full(x)
    cols = local_slice(64, rank, size)
    reduced = RowParallelLinear(64, 32, tp, name="row")
    partial = RowParallelLinear(64, 32, tp, reduce_output=False, name="row.partial")
    timers = timed(world, reduced, partial)
    for m in (reduced, partial):
        load_shards(full, m, tp)
        assert m.weight.shape == (32, 64 // size)
    _close(reduced(x[..., cols]), ref)
    part = partial(x[..., cols])
    _close(part, x[..., cols] @ full.weight[:, cols].T)
    if tp.group is not None:
        dist.all_reduce(part, group=tp.group)
    _close(part, ref)
    assert comm_events(timers) == ([("row.all_reduce", 3 * 5 * 32 * F32)] if size > 1 else [])
    assert compute_names(timers) == {"row"}  # the partial layer times nothing: its caller's span covers it


@torch.inference_mode()
def test_parallel_embedding(world):
    tp = Group(world.tp_group)
    size = tp.size
    full = seeded_(ParallelEmbedding(96, 16, Group()))
    sharded = ParallelEmbedding(96, 16, tp)
    timers = timed(world, sharded)
    load_shards(full, sharded, tp)
    ids = torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(3))
    ids[0, :2] = torch.tensor([0, 95])  # both ends of the vocabulary
    _close(sharded(ids), full(ids), ulps=0)
    assert comm_events(timers) == ([("embed.all_reduce", 3 * 7 * 16 * F32)] if size > 1 else [])
    assert "embed" in compute_names(timers)


@torch.inference_mode()
def test_all_gather_last(world):
    tp = Group(world.tp_group)
    timers = timed(world, tp)
    rank, size = tp.rank, tp.size
    x = torch.full((2, 3), float(rank))
    out = tp.all_gather_last("gather", x, layer=4)
    assert torch.equal(out, torch.arange(size).float().repeat_interleave(3).expand(2, -1))
    assert comm_events(timers) == ([("gather", 2 * 3 * F32)] if size > 1 else [])
    assert (timers.table()["layer"] == 4).all()


@torch.inference_mode()
def test_moe_block(world, margs):
    tp = Group(world.tp_group)
    rank, size = tp.rank, tp.size
    full = seeded_(MoE(1, margs, Group()))
    sharded = MoE(1, margs, tp)
    timers = timed(world, sharded)
    load_shards(full, sharded, tp)
    per_rank = margs.n_routed_experts // size
    assert sorted(map(int, sharded.experts)) == list(range(rank * per_rank, (rank + 1) * per_rank))
    x = _randn(2, 5, margs.dim)
    _close(sharded(x), full(x))
    assert comm_events(timers) == ([("moe.combine", 2 * 5 * margs.dim * F32)] if size > 1 else [])
    assert {"moe.gate", "moe.experts", "moe.shared"} <= compute_names(timers)
    sharded.pack()  # the grouped-GEMM path over this rank's expert range
    full.pack()
    _close(sharded(x), full(x))


@torch.inference_mode()
def test_attention_block(world, margs):
    tp = Group(world.tp_group)
    size = tp.size
    full = seeded_(MLA(0, margs, Group()))
    sharded = MLA(0, margs, tp)
    timers = timed(world, sharded)
    load_shards(full, sharded, tp)
    bsz, t = 2, 6
    x = _randn(bsz, t, margs.dim)
    mask = torch.ones(bsz, t, dtype=torch.bool)
    mask[1, :2] = False  # row 1 left-padded by two
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    rope = rope_cos_sin(yarn_inv_freq(margs), pos, rope_attention_factor(margs), torch.float32)
    bias = attention_bias(mask, 0, t, torch.float32)
    for naive in (True, False):
        caches = [(torch.zeros(bsz, t, margs.kv_lora_rank), torch.zeros(bsz, t, margs.qk_rope_head_dim))
                  for _ in range(2)]
        out = [m(x, rope, bias, kv, pe, 0, naive) for m, (kv, pe) in zip((full, sharded), caches)]
        _close(out[1], out[0])
        _close(caches[1][0], caches[0][0], ulps=0)  # the latent cache is replicated, not sharded
    assert comm_events(timers) == [("attn.o_proj.all_reduce", bsz * t * margs.dim * F32)] * 2 * (size > 1)


@torch.inference_mode()
def test_transformer(world, margs):
    tp = Group(world.tp_group)
    rank, size = tp.rank, tp.size
    full = seeded_(Transformer(margs, Group()))
    sharded = Transformer(margs, tp)
    timers = timed(world, sharded)
    load_shards(full, sharded, tp)
    owned = local_slice(margs.n_routed_experts, rank, size)
    assert {int(e) for e in sharded.model.layers[2].mlp.experts} == set(range(owned.start, owned.stop))

    lengths, steps = (4, 7), 2
    t = max(lengths)
    mask = torch.tensor([[i >= t - n for i in range(t)] for n in lengths])
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    tokens = torch.randint(2, margs.vocab_size, mask.shape, generator=torch.Generator().manual_seed(4))
    caches = [m.new_cache(len(lengths), t + steps) for m in (full, sharded)]
    args = (tokens, pos, mask, 0)
    for step in range(steps + 1):
        out = [m(args[0], args[1], args[2], c, args[3]) for m, c in zip((full, sharded), caches)]
        _close(out[1], out[0], ulps=64)  # whole model: a few layers of reordered sums
        gathered = MPI.COMM_WORLD.allgather(out[1])
        assert all(torch.equal(g, out[1]) for g in gathered), "logits differ between ranks"
        mask = torch.cat([mask, torch.ones(len(lengths), 1, dtype=torch.bool)], dim=1)
        args = (out[0].argmax(-1, keepdim=True), args[1][:, -1:] + 1, mask, t + step)
    _check_model_trace(timers, margs, size, n_forward=steps + 1, bsz=len(lengths))


def _check_model_trace(timers, margs, size, n_forward, bsz):
    events = comm_events(timers)
    if size == 1:
        assert events == []
        return
    names = [n for n, _ in events]
    n_moe = margs.n_layers - margs.n_dense_layers
    expected = {"embed.all_reduce": 1, "attn.o_proj.all_reduce": margs.n_layers,
                "mlp.down.all_reduce": margs.n_dense_layers, "moe.combine": n_moe, "head.all_gather": 1}
    assert {n: names.count(n) for n in set(names)} == {n: c * n_forward for n, c in expected.items()}
    assert events[-1] == ("head.all_gather", bsz * (margs.vocab_size // size) * F32)
    assert {"embed", "rope", "attn", "attn.o_proj", "norm", "mlp", "mlp.down", "moe.gate", "moe.experts",
            "moe.shared", "head"} <= compute_names(timers)


@torch.inference_mode()
def test_timers_attach_and_detach(world, margs):
    """Built untimed (nothing recorded), timed once attached: every span-opening module and the Group get
    the timers; attaching None detaches them again."""
    tp = Group(world.tp_group)
    model = Transformer(margs, tp)
    assert tp.timers is UNTIMED and all(getattr(m, "timers", UNTIMED) is UNTIMED for m in model.modules())
    tokens = torch.randint(2, margs.vocab_size, (1, 3), generator=torch.Generator().manual_seed(5))
    mask, pos = torch.ones(1, 3, dtype=torch.bool), torch.arange(3)[None]
    seeded_(model)(tokens, pos, mask, model.new_cache(1, 3), 0)  # untimed: no timers to record into
    timers = timed(world, model)
    assert tp.timers is timers and model.model.layers[1].mlp.shared_experts.down_proj.timers is timers
    model(tokens, pos, mask, model.new_cache(1, 3), 0)
    assert {"embed", "rope", "attn", "head"} <= compute_names(timers)
    attach_timers(model)
    assert tp.timers is UNTIMED and model.timers is UNTIMED
    n = len(timers.table())
    model(tokens, pos, mask, model.new_cache(1, 3), 0)
    assert len(timers.table()) == n
