"""Expert parallelism by all-to-all (the "dpa" group layout): each token goes to the ranks that own its
experts, and each of them sends back one weighted sum.

Rank r of an expert-parallel group of G owns the routed experts [r E/G, (r+1) E/G) (spmd.model.moe.MoE).
Every rank routes its own tokens (data-parallel attention: its own rows). ``dispatch`` sends a token once
to each rank owning at least one of its top-k experts, with its k expert ids and the routing weights of
the experts that rank owns (the others zeroed, so the receiver's grouped GEMMs skip them as they skip
other ranks' experts today); ``combine`` returns each (token, rank) sum to the token's rank, where the
token's parts are added in rank order (deterministic: no atomics). Only routed tokens move, in uneven
splits: DeepSeek's group-limited routing (top 4 of 8 expert groups) bounds the ranks, and so the nodes, a
token reaches.

Four collectives per MoE layer, all on the "ep" Group and named at their call here: the send counts
(``moe.dispatch.counts``, G int64 each way), the hidden states (``moe.dispatch``, bf16 rows), their ids
and weights (``moe.dispatch.meta``, 2k int32 per row) and the sums back (``moe.combine``). The host reads
the counts to size the buffers (one device sync per layer): this path runs eagerly, not in CUDA graphs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from spmd.parallel.comm import Group


@dataclass
class Routed:
    """What a rank received in a dispatch, and how to put the combined sums back."""

    x: torch.Tensor        # (M, dim) received tokens, grouped by source rank
    ids: torch.Tensor      # (M, k) int64 expert ids
    weights: torch.Tensor  # (M, k) float32; zero for experts this rank does not own
    sent: list[int]        # rows sent to each rank
    received: list[int]    # rows received from each rank
    token: torch.Tensor    # (P,) the local token of each sent row, in send order
    slot: torch.Tensor     # (P,) that row's place among its token's destinations (rank order)
    tokens: int            # N, local tokens
    width: int             # most destinations one token can have: min(k, G)


def dispatch(ep: Group, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, per_rank: int,
             layer: int = -1) -> Routed:
    """x (N, dim), weights (N, k) float32, ids (N, k) → the tokens this rank's experts must serve."""
    n, k = ids.shape
    g = ep.size
    dest = torch.div(ids, per_rank, rounding_mode="floor")  # (N, k) owning rank of each choice
    hit = torch.zeros(n, g, dtype=torch.bool, device=x.device).scatter_(1, dest, True)  # (N, G)
    rank_of, token = hit.t().nonzero(as_tuple=True)  # (P,) pairs by destination rank, tokens ascending
    slot = (hit.long().cumsum(1) - 1)[token, rank_of]  # (P,)
    sent = hit.sum(0)  # (G,) int64
    counts = torch.empty_like(sent)
    ep.all_to_all("moe.dispatch.counts", counts, sent, [1] * g, [1] * g, layer)
    sent_rows, received = sent.tolist(), counts.tolist()  # the host sizes the buffers: one sync
    own = dest[token] == rank_of[:, None]  # (P, k) the choices the destination owns
    w = torch.where(own, weights[token], 0.0).float()
    meta = torch.cat([ids[token].to(torch.int32), w.view(torch.int32)], dim=1)  # (P, 2k)
    m = sum(received)
    rx = x.new_empty(m, x.shape[1])
    ep.all_to_all("moe.dispatch", rx, x[token], received, sent_rows, layer)
    rmeta = meta.new_empty(m, 2 * k)
    ep.all_to_all("moe.dispatch.meta", rmeta, meta, received, sent_rows, layer)
    return Routed(rx, rmeta[:, :k].long(), rmeta[:, k:].contiguous().view(torch.float32), sent_rows, received,
                  token, slot, n, min(k, g))


def combine(ep: Group, y: torch.Tensor, routed: Routed, layer: int = -1) -> torch.Tensor:
    """y (M, dim): this rank's sums for the tokens it received → (N, dim): each local token's sums over
    the ranks it went to, added in rank order."""
    back = y.new_empty(len(routed.token), y.shape[1])
    ep.all_to_all("moe.combine", back, y, routed.sent, routed.received, layer)
    parts = y.new_zeros(routed.tokens * routed.width, y.shape[1])
    parts.index_copy_(0, routed.token * routed.width + routed.slot, back)
    return parts.view(routed.tokens, routed.width, y.shape[1]).sum(1)
