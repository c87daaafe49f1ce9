"""pytest-mpi (1 and 2 ranks): continuous batching (spmd.runtime.scheduler) on the native engine gives each
prompt the tokens of the static loop, whatever the slot count, the prefill budget (prompts cut into
pieces) or the decode mode (eager; "static": the CUDA graph's bucketed shapes run eagerly), greedy and
seeded sampling, with per-request max tokens and stop strings honoured. fp32, the whole world one group.
"""
from __future__ import annotations

import types

import pytest

from conftest import PROMPTS20, checkpoint_dir
from spmd.config import ModelArgs
from spmd.engines.native import NativeEngine
from spmd.obs.timers import Timers
from spmd.runtime.generate import GenConfig, generate
from spmd.runtime.prompts import StopStrings, encode, load_tokenizer, read_prompts
from spmd.runtime.records import Sampling, WorkItem
from spmd.runtime.scheduler import Scheduler

pytestmark = pytest.mark.mpi(min_size=1)
EOS = 1


@pytest.fixture(scope="module")
def setup(whole_world):
    world = whole_world
    ckpt = checkpoint_dir("tiny", "bf16")
    tok = load_tokenizer(ckpt)
    ids = encode(tok, read_prompts(PROMPTS20), chat=True)
    engines = {mode: NativeEngine(world, types.SimpleNamespace(checkpoint=ckpt, dtype="fp32", max_new_tokens=16,
                                                               cuda_graph=mode, fp8_weights="auto"),
                                  ModelArgs.from_checkpoint(ckpt), Timers(world.rank, enabled=False))
               for mode in ("off", "static")}
    return engines, ids, tok


def items_of(ids, temperature=0.0, stop=()):
    """Per-request max tokens from 1 to 16 and ignore_eos on some: rows end at different steps."""
    return [WorkItem(i, q, sampling=Sampling(1 + (i * 5) % 16, temperature, 0.9, 100 + i, stop, i % 3 == 0))
            for i, q in enumerate(ids)]


def continuous(engine, items, slots, budget):
    cfg = GenConfig(16, EOS, EOS)
    sched = Scheduler(engine, slots, budget, 256, cfg, Timers(0, enabled=False))
    out = []
    sched.run(iter([items[:7], items[7:]]), out.extend)
    return {r.index: r for r in out}


@pytest.mark.parametrize("mode,slots,budget", [("off", 1, 4096), ("off", 3, 9), ("off", 16, 64),
                                               ("static", 5, 40), ("static", 16, 48)])
def test_continuous_equals_static(setup, mode, slots, budget):
    engines, ids, _ = setup
    items = items_of(ids)
    static = generate(engines["off"], items, GenConfig(16, EOS, EOS))
    cont = continuous(engines[mode], items, slots, budget)
    assert sorted(cont) == list(range(len(items)))
    for r in static:
        assert cont[r.index].tokens == r.tokens, r.index
        assert cont[r.index].finish_reason == r.finish_reason
        s = items[r.index].sampling
        assert len(r.tokens) == s.max_new_tokens or (r.tokens[-1] == EOS and not s.ignore_eos)
    if budget < max(map(len, ids)):
        assert any(len(q) > budget for q in ids)  # some prompts went in pieces


def test_seeded_sampling_continuous_equals_static(setup, whole_world):
    world = whole_world
    engines, ids, _ = setup
    items = items_of(ids, temperature=0.8)
    static = generate(engines["off"], items, GenConfig(16, EOS, EOS))
    cont = continuous(engines["off"], items, 4, 32)
    assert all(cont[r.index].tokens == r.tokens for r in static)
    greedy = generate(engines["off"], items_of(ids), GenConfig(16, EOS, EOS))
    assert [r.tokens for r in greedy] != [r.tokens for r in static]  # it did sample
    every = world.comm.allgather([r.tokens for r in static])
    assert all(t == every[0] for t in every)


def test_stop_strings_end_rows(setup):
    engines, ids, tok = setup
    plain = {r.index: r for r in generate(engines["off"], items_of(ids), GenConfig(16, EOS, EOS))}
    # a stop string taken from the middle of a longer greedy completion must end that row right there
    long_row = max(plain.values(), key=lambda r: len(r.tokens))
    text = tok.decode(long_row.tokens[:3], skip_special_tokens=True)
    assert text.strip()
    stop = (text[-2:],)
    items = items_of(ids, stop=stop)
    hit = StopStrings(tok).hit
    cont = continuous(engines["off"], items, 4, 64)
    static = {r.index: r for r in generate(engines["off"], items, GenConfig(16, EOS, EOS), stop_hit=hit)}
    assert {i: r.tokens for i, r in static.items()} == {i: r.tokens for i, r in continuous_with(
        engines["off"], items, hit).items()}
    row = static[long_row.index]
    assert row.finish_reason == "stop" and len(row.tokens) <= 3 < len(long_row.tokens)
    assert row.tokens == long_row.tokens[:len(row.tokens)]
    assert sorted(cont) == list(range(len(items)))


def continuous_with(engine, items, hit):
    sched = Scheduler(engine, 4, 64, 256, GenConfig(16, EOS, EOS), Timers(0, enabled=False), stop_hit=hit)
    out = []
    sched.run(iter([items]), out.extend)
    return {r.index: r for r in out}
