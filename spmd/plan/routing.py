"""Where a token goes under expert parallelism: the distinct ranks (and nodes) owning its routed experts.

Routing (noaux_tc, group-limited): E experts in n_group groups; a group's score is the sum of its top-2
expert scores; a token keeps the top topk_group groups and takes its top-k experts inside them. Ranks hold
contiguous expert ranges (E/G each), ranks r*n .. r*n+n-1 of a group on node r (n = GPUs per node).

Method: a seeded Monte-Carlo over scores drawn uniform and independent per token and expert (a balanced
router: the correction bias's aim; real routing is skewed, which this does not model). From the sample,
per token: the distinct destination ranks |S| and nodes N_S. A token's own rank is uniform over the
group, independent of its experts, so (r = ranks of the group per node):
  expected destinations that are its own rank: |S| / G (no transfer),
  on its node, other ranks:                  |S| (r - 1) / G,
  on other nodes:                            |S| (G - r) / G,
  distinct other nodes:                      N_S (1 - r / G).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from spmd.config import ModelArgs

ROUTE_SAMPLES, ROUTE_SEED = 2000, 0  # standard error of the mean destinations below 0.05 at 2000 tokens


@dataclass(frozen=True)
class Destinations:
    """Per token, expected over the sample and over its source rank."""

    group: int
    gpus_per_node: int
    ranks: float          # distinct ranks owning its experts
    nodes: float          # distinct nodes holding those ranks
    max_nodes: int        # the most distinct nodes any sampled token reached
    local: float          # of `ranks`: its own rank
    intra: float          # other ranks on its own node
    cross: float          # ranks on other nodes
    cross_nodes: float    # distinct other nodes


def sample_routes(m: ModelArgs, tokens: int = ROUTE_SAMPLES, seed: int = ROUTE_SEED) -> list[tuple[int, ...]]:
    """Each sampled token's routed experts (sorted ids) under group-limited top-k routing of uniform scores."""
    rng = random.Random(seed)
    e, n_group, k = m.n_routed_experts, m.n_expert_groups, m.n_activated_experts
    per = e // n_group
    top = min(2, per)
    spans = [range(g * per, (g + 1) * per) for g in range(n_group)]
    out = []
    for _ in range(tokens):
        s = [rng.random() for _ in range(e)]
        score = [sum(sorted(s[g * per:(g + 1) * per])[-top:]) for g in range(n_group)]
        groups = sorted(range(n_group), key=score.__getitem__)[-m.n_limited_groups:]
        cand = [x for g in groups for x in spans[g]]
        out.append(tuple(sorted(sorted(cand, key=s.__getitem__)[-k:])))
    return out


def destinations(m: ModelArgs, group: int, gpus_per_node: int, routes: list[tuple[int, ...]]) -> Destinations:
    """The destination statistics of `routes` for experts in contiguous ranges over `group` ranks."""
    per_rank = m.n_routed_experts // group
    r = min(group, gpus_per_node)  # ranks of the group on one node
    ranks = nodes = 0
    most = 0
    for experts in routes:
        dest = {x // per_rank for x in experts}
        hosts = len({d // r for d in dest})
        ranks += len(dest)
        nodes += hosts
        most = max(most, hosts)
    d, n = ranks / len(routes), nodes / len(routes)
    return Destinations(group, gpus_per_node, d, n, most, d / group, d * (r - 1) / group,
                        d * (group - r) / group, n * (1 - r / group))
