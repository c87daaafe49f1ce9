"""What travels between the runtime's modules and its ranks: a work item (one prompt to run) and its result.

Both cross MPI (mpi4py sends them between ranks in memory) and the result also the progress files
(spmd.runtime.resume writes and reads it as one JSON line). Token ids only: the text stays in
spmd.runtime.prompts, except a completion a dedicated orchestrator decoded as the rows came in.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Sampling:
    """One request's generation settings, resolved on rank 0 (its own, else the run's options)."""

    max_new_tokens: int
    temperature: float = 0.0                    # 0: greedy
    top_p: float = 1.0
    seed: int = 0                               # its generator's seed: its own, else --seed + its index
    stop: tuple[str, ...] = ()                  # stop strings (matched on the decoded text)
    ignore_eos: bool = False                    # decode to max_new_tokens (benchmarks, as vLLM's)


@dataclass(frozen=True)
class WorkItem:
    """One prompt to generate (and, with --score, to score)."""

    index: int                                  # position in the prompt file; outputs keep this order
    ids: list[int]                              # the prompt's token ids
    target: list[int] | None = None             # --score: the baseline's completion ids
    support: list[list[int]] | None = None      # --score: the baseline's top-k ids, per target position
    sampling: Sampling | None = None            # None: the run's settings (--max-new-tokens, ...)


@dataclass(frozen=True)
class Result:
    """What a model group made of one work item."""

    index: int                                  # the work item's index
    tokens: list[int]                           # generated ids, EOS included when it came
    ttft_s: float = 0.0                         # admission (a slot, or the batch's start) → first token
    latency_s: float = 0.0                      # admission → the row's last token
    replica: int = -1                           # the model group that ran it
    score: dict | None = None                   # --score: the run's numbers per target position
    completion: str | None = None               # decoded text, when a dedicated orchestrator did it
    finish_reason: str = ""                     # "stop" (EOS or a stop string) | "length" (its max tokens)
    queue_s: float = 0.0                        # the group got it → admission

    def but(self, **changes) -> "Result":
        """A copy with some fields changed (dataclasses.replace)."""
        return replace(self, **changes)
