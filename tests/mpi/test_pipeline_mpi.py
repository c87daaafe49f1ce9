"""pytest-mpi (1 and 2 ranks): pipeline stages (--pp = the world size, G = 1) equal the unsharded model.

fp32 on CPU with gloo: prefill logits of the 20 prompts match transformers within 1e-4 for 1, 2 and 3
micro-batches; greedy tokens and teacher-forced logits equal a one-rank engine's; each stage holds only
its layers (embedding on the first, head on the last); the stage boundary's sends and receives are
timed with their bytes. On 1 rank the same tests run the one-stage path.
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist
from mpi4py import MPI

from conftest import PROMPTS20, assert_fp32_close, checkpoint_dir
from spmd.config import ModelArgs
from spmd.engines.native import NativeEngine
from spmd.runtime.generate import GenConfig, generate, left_pad
from spmd.runtime.score import work_items
from spmd.parallel.pipeline import stage_layers
from spmd.runtime.prompts import encode, load_tokenizer, read_prompts
from spmd.obs.timers import Timers
from spmd.runtime.world import make_world, shutdown
from validation.reference import hf_last_logits, load_hf

pytestmark = pytest.mark.mpi(min_size=1)


@pytest.fixture(scope="module")
def worlds():
    """(a world of one model group of P = size stages, a world where every rank is its own model)."""
    owned = not dist.is_initialized()
    pipe = make_world(1, "cpu", pp=MPI.COMM_WORLD.size)
    single = make_world(1, "cpu")
    yield pipe, single
    if owned:
        shutdown(pipe)


def _engine(world, ckpt, max_new=1, micro=0, timers=None):
    args = types.SimpleNamespace(checkpoint=ckpt, dtype="fp32", max_new_tokens=max_new, cuda_graph="auto",
                                 fp8_weights="auto", micro_batches=micro)
    return NativeEngine(world, args, ModelArgs.from_checkpoint(ckpt), timers or Timers(world.rank, enabled=False))


@pytest.mark.parametrize("weights", ["bf16", "fp8"])
def test_pipeline_prefill_matches_transformers(worlds, weights):
    pipe, _ = worlds
    ckpt = checkpoint_dir("tiny", weights)
    ids = encode(load_tokenizer(ckpt), read_prompts(PROMPTS20), chat=True)
    ref = torch.stack(hf_last_logits(load_hf(ckpt, log=False), ids))
    tokens, mask = left_pad(ids, 1, "cpu")
    for micro in (1, 2, 3):
        engine = _engine(pipe, ckpt, micro=micro)
        ours = engine.prefill(tokens, mask)
        engine.release()
        assert (ours - ref).abs().max().item() < 1e-4, micro
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))
        same = pipe.comm.allgather(ours.sum().item())
        assert all(s == same[0] for s in same)  # every rank of the group got the last stage's logits


def test_pipeline_generate_and_score_equal_one_rank(worlds):
    pipe, single = worlds
    ckpt = checkpoint_dir("tiny", "bf16")
    ids = encode(load_tokenizer(ckpt), read_prompts(PROMPTS20), chat=True)[:7]
    cfg = GenConfig(8, eos_id=1, pad_id=1)
    staged, whole = _engine(pipe, ckpt, 8, micro=3), _engine(single, ckpt, 8)
    rows = [generate(e, work_items(ids, None), cfg) for e in (staged, whole)]
    assert [r.tokens for r in rows[0]] == [r.tokens for r in rows[1]]
    tokens, mask = left_pad([i + r.tokens for i, r in zip(ids, rows[1])], 1, "cpu")
    assert_fp32_close(staged.score(tokens, mask), whole.score(tokens, mask))  # another micro-batch split: rounding


def test_each_stage_holds_only_its_layers(worlds):
    pipe, _ = worlds
    ckpt = checkpoint_dir("tiny", "bf16")
    m = ModelArgs.from_checkpoint(ckpt)
    engine = _engine(pipe, ckpt)
    mine = stage_layers(m, pipe.pp, 1)[pipe.stage]
    names = list(engine.model.state_dict())
    layers = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
    assert layers == set(mine) and engine.info["stage_layers"] == [mine.start, mine.stop]
    assert any(n.startswith("model.embed_tokens.") for n in names) == (pipe.stage == 0)
    assert any(n.startswith("lm_head.") for n in names) == (pipe.stage == pipe.pp - 1)
    whole = sum(pipe.comm.allgather(engine.info["param_bytes"]))
    assert pipe.pp == 1 or engine.info["param_bytes"] < whole


def test_stage_boundary_is_timed_with_bytes(worlds):
    pipe, _ = worlds
    ckpt = checkpoint_dir("tiny", "bf16")
    m = ModelArgs.from_checkpoint(ckpt)
    timers = Timers(pipe.rank)
    engine = _engine(pipe, ckpt, micro=2, timers=timers)
    tokens, mask = left_pad(encode(load_tokenizer(ckpt), read_prompts(PROMPTS20), chat=True)[:5], 1, "cpu")
    timers.set_phase("prefill", 0)
    engine.prefill(tokens, mask)
    ev = timers.table()
    sends, recvs = ev[ev["name"] == b"pp.send"], ev[ev["name"] == b"pp.recv"]
    rows = [3, 2]  # 5 rows in 2 micro-batches: 2 + 3 (floor split), in order
    act = [r * tokens.shape[1] * m.dim * 4 for r in sorted(rows)]  # fp32 hidden states
    assert sends["bytes"].tolist() == (act if pipe.stage < pipe.pp - 1 else [])
    assert recvs["bytes"].tolist() == (act if pipe.stage > 0 else [])
    assert (ev["name"] == b"pp.logits").sum() == (1 if pipe.pp > 1 else 0)
    assert set(sends["group"].tolist() + recvs["group"].tolist()) <= {b"pp"}
