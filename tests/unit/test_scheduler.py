"""The continuous-batching loop (spmd.runtime.scheduler) over a mock engine that keeps each slot's sequence.

The mock checks the engine contract on every call (a decode row writes at its own next column, a prefill
forward holds at most the budget's tokens, a later piece lands at the slot's offset) and its next token
is a function of the slot's whole sequence, so a request's tokens equal the one-request-at-a-time run
exactly when its slot holds exactly its own prompt and tokens.
"""
from __future__ import annotations

import pytest
import torch

from spmd.engines.memory import plan_slots
from spmd.config import ModelArgs
from spmd.obs.timers import Timers
from spmd.runtime.generate import GenConfig
from spmd.runtime.records import Sampling, WorkItem
from spmd.runtime.scheduler import Scheduler

VOCAB, EOS = 40, 3


def next_token(seq: list[int]) -> int:
    return (sum(t * (i + 1) for i, t in enumerate(seq)) * 7 + len(seq)) % VOCAB


def one_hot(toks: list[int], rows: int | None = None) -> torch.Tensor:
    out = torch.zeros(rows or len(toks), VOCAB)
    out[torch.arange(len(toks)), torch.tensor(toks)] = 1.0
    return out


class MockEngine:
    def __init__(self, budget: int):
        self.budget, self.seqs, self.forwards, self.max_rows = budget, {}, [], 0
        self.exact_rows, self.moves = False, 0

    def open_slots(self, n, max_len):
        self.n, self.max_len = n, max_len

    def close_slots(self):
        self.closed = True

    def prefill_slots(self, slots, seqs):
        assert len(slots) * max(map(len, seqs)) <= self.budget or len(slots) == 1
        self.forwards.append(("prefill", sum(map(len, seqs))))
        for s, q in zip(slots, seqs):
            self.seqs[s] = list(q)
        return one_hot([next_token(q) for q in seqs])

    def extend_slot(self, slot, ids, start):
        assert start == len(self.seqs[slot]) and len(ids) <= self.budget
        self.forwards.append(("extend", len(ids)))
        self.seqs[slot] += ids
        return one_hot([next_token(self.seqs[slot])])

    def slot_rows(self, used):
        return used if self.exact_rows else max(8, 1 << (used - 1).bit_length())

    def move_slot(self, src, dst, cols):
        assert cols >= len(self.seqs[src]) - 1 and dst not in self.live_slots()
        self.seqs[dst] = self.seqs.pop(src)
        self.moves += 1

    def live_slots(self):
        return {s for s, r in enumerate(self.sched.rows) if r is not None}

    def decode_slots(self, tokens, lens):
        self.max_rows = max(self.max_rows, len(tokens))
        out = []
        for s, (tok, n) in enumerate(zip(tokens, lens)):
            seq = self.seqs.setdefault(s, [])
            assert n == len(seq) or n == 0, (s, n, len(seq))  # its own next column (a free row: 0)
            if n == len(seq) and s in self.live:
                seq.append(tok)
            out.append(next_token(seq))
        return one_hot(out, rows=len(tokens) + 3)  # engines may return padded rows


def alone(item: WorkItem, s: Sampling) -> list[int]:
    seq, out = list(item.ids), []
    while True:
        tok = next_token(seq)
        out.append(tok)
        seq.append(tok)
        if (tok == EOS and not s.ignore_eos) or len(out) == s.max_new_tokens:
            return out


def run(items, slots: int, budget: int, halt=lambda: False, chunk: int = 3):
    engine = MockEngine(budget)
    sched = Scheduler(engine, slots, budget, 200, GenConfig(9, EOS, EOS), Timers(0, enabled=False))
    engine.sched = sched
    real_decode = engine.decode_slots

    def decode(tokens, lens):  # which slots decode this step (the mock appends only theirs)
        engine.live = {s for s, r in enumerate(sched.rows) if r is not None and r.decoding}
        return real_decode(tokens, lens)
    engine.decode_slots = decode
    out = []
    source = iter([items[i:i + chunk] for i in range(0, len(items), chunk)])
    stats = sched.run(source, out.extend, halt)
    return out, stats, engine


def items_varied(n: int = 23) -> list[WorkItem]:
    out = []
    for i in range(n):
        ids = [(i * 5 + j) % VOCAB for j in range(1 + (i * 13) % 37)]
        out.append(WorkItem(i, ids, sampling=Sampling(1 + (i * 7) % 12, ignore_eos=i % 4 == 0)))
    return out


@pytest.mark.parametrize("slots,budget", [(1, 1000), (4, 16), (7, 5), (32, 64)])
def test_each_request_gets_its_own_tokens(slots, budget):
    items = items_varied()
    out, stats, engine = run(items, slots, budget)
    assert sorted(r.index for r in out) == list(range(len(items)))
    for r in out:
        it = items[r.index]
        assert r.tokens == alone(it, it.sampling), r.index
        assert r.finish_reason == ("length" if len(r.tokens) == it.sampling.max_new_tokens and
                                   (r.tokens[-1] != EOS or it.sampling.ignore_eos) else "stop")
        assert 0 <= r.ttft_s <= r.latency_s and r.queue_s >= 0
    assert all(n <= budget for _, n in engine.forwards)
    assert engine.max_rows <= slots and engine.closed
    assert stats.slots == slots and stats.slot_steps == stats.decode_steps * slots
    long_prompts = any(len(it.ids) > budget for it in items)
    assert any(kind == "extend" for kind, _ in engine.forwards) == long_prompts


def test_finished_slots_are_refilled_at_once():
    """2 slots, one long and many short requests: the short ones pass through the other slot while the
    long one decodes, so the steps are about the long one's, not the sum."""
    items = [WorkItem(0, [1, 2], sampling=Sampling(60, ignore_eos=True))] + \
        [WorkItem(i, [i, 2], sampling=Sampling(3, ignore_eos=True)) for i in range(1, 15)]
    out, stats, _ = run(items, 2, 100)
    assert len(out) == 15
    assert stats.decode_steps <= 60 + 2
    assert stats.admitted == 15


def test_halt_stops_admission_and_drains_the_slots():
    items = items_varied(20)
    calls = []

    def halt():
        calls.append(1)
        return len(calls) > 2  # the third time the loop asks: stop
    out, stats, _ = run(items, 4, 50, halt=halt)
    assert 0 < len(out) < 20
    assert len(out) == stats.admitted  # every admitted row finished (drained), none after the halt
    for r in out:
        assert r.tokens == alone(items[r.index], items[r.index].sampling)


def test_slot_plan_from_a_fake_memory_budget():
    m = ModelArgs.from_checkpoint(_tiny())
    gib = 2 ** 30
    kw = dict(n_layers=m.n_layers, n_local_heads=m.n_heads, elem_bytes=2, max_len=4096, n_requests=10_000)
    big = plan_slots(m, free_bytes=60 * gib, total_bytes=80 * gib, fraction=0.9, **kw)
    small = plan_slots(m, free_bytes=20 * gib, total_bytes=80 * gib, fraction=0.9, **kw)
    assert 0 < small.slots <= big.slots <= 512 and big.source == "memory"
    used = big.slots * (big.slot_bytes) + big.prefill_tokens * big.token_bytes
    assert used <= big.available_bytes and abs(big.available_bytes - 52 * gib) < 16  # 0.9 of 80 - (80 - 60)
    assert plan_slots(m, free_bytes=60 * gib, total_bytes=80 * gib, want_slots=5, **kw).slots == 5
    assert plan_slots(m, **{**kw, "n_requests": 3}).slots == 3  # CPU default, capped by the requests
    with pytest.raises(MemoryError, match="no decode slot fits"):
        plan_slots(m, free_bytes=8 * gib + 1000, total_bytes=80 * gib, fraction=0.9, **kw)


def _tiny():
    from conftest import checkpoint_dir
    return checkpoint_dir("tiny", "bf16")


def test_the_last_rows_move_down_so_the_step_shrinks():
    """16 slots; the longest request sits in the last slot: once the others end it moves into the lowest
    slots, and the decode steps run the 8-row shape instead of 16 (its tokens unchanged)."""
    items = [WorkItem(i, [i + 1, 2, 3], sampling=Sampling(40 if i == 15 else 3, ignore_eos=True)) for i in range(16)]
    out, stats, engine = run(items, 16, 100, chunk=16)
    assert engine.moves == 1 and stats.moves == 1
    assert {r.index: r.tokens for r in out}[15] == alone(items[15], items[15].sampling)
    assert all(r.tokens == alone(items[r.index], items[r.index].sampling) for r in out)
