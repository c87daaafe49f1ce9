"""The pipeline partition: contiguous layer ranges per stage, balanced by the parameters a decode step reads.

Pure Python (no torch, no numpy), so the planner (``spmd.plan``) and the performance model (traces/model.py)
compute the same stages as the program (``spmd.parallel.pipeline`` re-exports these names).
"""
from __future__ import annotations

from itertools import accumulate

from spmd.config.errors import UsageError
from spmd.config.model_args import ModelArgs
from spmd.config.sizes import distinct_experts, layer_params

REFERENCE_BATCH = 32  # decode rows the layer costs are estimated at (distinct experts grow with rows)


def layer_costs(m: ModelArgs, group: int = 1, batch: int = REFERENCE_BATCH) -> list[float]:
    """Parameters one rank reads per decode step, per layer (routed experts: the distinct ones `batch`
    rows hit under uniform routing)."""
    costs = []
    for layer in range(m.n_layers):
        p = layer_params(m, layer)
        costs.append(p.replicated + p.sharded / group + distinct_experts(m, batch) * p.expert / group)
    return costs


def head_cost(m: ModelArgs, group: int = 1) -> float:
    return m.vocab_size * m.dim / group


def partition(costs: list[float], stages: int, last_extra: float = 0.0) -> list[range]:
    """Contiguous layer ranges, one per stage, minimizing the most expensive stage (``last_extra`` is
    added to the last stage); every stage gets at least one layer."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise UsageError(f"{stages} pipeline stages for {n} layers: each stage needs at least one layer")
    prefix = [0.0] + list(accumulate(float(c) for c in costs))  # sequential float64 sums, as numpy's cumsum
    inf = float("inf")
    # best[s][i]: the least max-stage cost of layers [0, i) over s stages; cut[s][i]: where the last one starts
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        extra = last_extra if s == stages else 0.0
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                cost = max(best[s - 1][j], prefix[i] - prefix[j] + (extra if i == n else 0.0))
                if cost < best[s][i]:
                    best[s][i], cut[s][i] = cost, j
    bounds, i = [], n
    for s in range(stages, 0, -1):
        bounds.append(range(cut[s][i], i))
        i = cut[s][i]
    return bounds[::-1]


def stage_layers(m: ModelArgs, pp: int, group: int = 1) -> list[range]:
    """The layer range of each of `pp` stages for this model."""
    return partition(layer_costs(m, group), pp, head_cost(m, group))
