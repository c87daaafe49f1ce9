"""Serial: the generate loop on a mock stepper, sampling, and the length-balanced assignment."""
from __future__ import annotations

import time

import torch

from spmd.runtime.dispatch import balance
from spmd.runtime.records import Sampling, WorkItem
from spmd.runtime.generate import GenConfig, generate, generators, left_pad, sample

V = 11


class CountingStepper:
    """Next token = (last token + 1) % V: a model whose output is known in advance."""

    device = torch.device("cpu")

    def __init__(self):
        self.calls = []

    def _logits(self, last: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot((last + 1) % V, V).float()

    def prefill(self, tokens, mask):
        self.calls.append(("prefill", tokens.clone(), mask.clone()))
        return self._logits(tokens[:, -1])

    def decode(self, tokens):
        self.calls.append(("decode", tokens.clone()))
        return self._logits(tokens)

    def release(self):
        self.calls.append(("release",))


def test_left_pad():
    t, m = left_pad([[5, 6, 7], [8]], 0, "cpu")
    assert t.tolist() == [[5, 6, 7], [0, 0, 8]] and m.tolist() == [[True] * 3, [False, False, True]]


def test_generate_stops_per_row_on_eos_and_max_tokens():
    s = CountingStepper()
    cfg = GenConfig(max_new_tokens=5, eos_id=3, pad_id=0)
    out = generate(s, [WorkItem(7, [1]), WorkItem(9, [8, 9])], cfg)
    assert [r.index for r in out] == [7, 9]
    assert out[0].tokens == [2, 3]                     # EOS included, then the row stops
    assert out[1].tokens == [10, 0, 1, 2, 3]           # wraps; EOS on the last allowed step
    decoded = [c[1].tolist() for c in s.calls if c[0] == "decode"]
    assert decoded[1][0] == 0                          # a finished row is fed the pad id
    assert s.calls[-1] == ("release",)
    assert all(0 < r.ttft_s <= r.latency_s for r in out)


def test_sampling_is_seeded_per_prompt_not_per_batch():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    rows = [Sampling(4, 1.0, 0.9, seed=5 + i) for i in range(3)]
    full = sample(logits, rows, generators(rows))
    alone = sample(logits[1:2], rows[1:2], generators(rows[1:2]))
    assert full[1] == alone[0]
    mixed = [Sampling(4), rows[1], Sampling(4)]  # greedy rows beside a sampled one: argmax, same draw
    got = sample(logits, mixed, generators(mixed))
    assert got[0] == logits[0].argmax().item() and got[2] == logits[2].argmax().item() and got[1] == alone[0]
    greedy = [Sampling(4)] * 3
    assert sample(logits, greedy, generators(greedy)) == logits.argmax(-1).tolist()


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    draws = {sample(logits, [Sampling(1, 1.0, 0.5, seed=s)], generators([Sampling(1, 1.0, 0.5, seed=s)]))[0]
             for s in range(50)}
    assert draws == {0}
    wide = {sample(logits, [Sampling(1, 1.0, 1.0, seed=s)], generators([Sampling(1, 1.0, 1.0, seed=s)]))[0]
            for s in range(200)}
    assert wide == {0, 1, 2, 3}  # every token can come without top-p


def test_balance_is_complete_and_balanced():
    lengths = [50, 10, 40, 30, 20, 5, 5, 60]
    for n in (1, 2, 3, 5, 8, 11):
        bins = balance(lengths, n)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        loads = [sum(lengths[i] for i in b) for b in bins]
        if n <= len(lengths):
            assert max(loads) - min(loads) <= max(lengths)


def test_a_wait_for_the_dispatcher_is_bounded():
    """A replica leader's wait for rank 0's next chunk (dynamic dispatch) ends with an error after
    SPMD_WATCHDOG_S instead of hanging; a message that is there is received whatever its size."""
    import pytest
    from mpi4py import MPI

    from spmd.runtime.dispatch import recv_within

    comm = MPI.COMM_SELF
    big = list(range(100_000))  # larger than mpi4py's default receive buffer
    req = comm.isend(big, dest=0, tag=77)  # to itself: a blocking send of this size would wait for the recv
    assert recv_within(comm, 0, 77, 5.0, "a test") == big
    req.wait()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="no message from rank 0 for 0.3 s while waiting for a test"):
        recv_within(comm, 0, 78, 0.3, "a test")
    assert time.monotonic() - t0 < 3
