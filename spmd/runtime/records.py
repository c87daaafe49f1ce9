"""What travels between the runtime's modules and its ranks: a work item (one prompt to run) and its result.

Both cross MPI (mpi4py sends them between ranks in memory) and the result also the progress files
(spmd.runtime.resume writes and reads it as one JSON line). Token ids only: the text stays in
spmd.runtime.prompts, except a completion a dedicated orchestrator decoded as the rows came in.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class WorkItem:
    """One prompt to generate (and, with --score, to score)."""

    index: int                                  # position in the prompt file; outputs keep this order
    ids: list[int]                              # the prompt's token ids
    target: list[int] | None = None             # --score: the baseline's completion ids
    support: list[list[int]] | None = None      # --score: the baseline's top-k ids, per target position


@dataclass(frozen=True)
class Result:
    """What a model group made of one work item."""

    index: int                                  # the work item's index
    tokens: list[int]                           # generated ids, EOS included when it came
    ttft_s: float = 0.0                         # batch start → first token
    latency_s: float = 0.0                      # batch start → the row's last token
    replica: int = -1                           # the model group that ran it
    score: dict | None = None                   # --score: the run's numbers per target position
    completion: str | None = None               # decoded text, when a dedicated orchestrator did it

    def but(self, **changes) -> "Result":
        """A copy with some fields changed (dataclasses.replace)."""
        return replace(self, **changes)
