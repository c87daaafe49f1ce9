"""Pipeline stages: a model group of P stages × G tensor/expert-parallel ranks (``--pp P --group-size G``).

Layout: the model group's ranks g*P*G .. (g+1)*P*G-1 are stage 0's G ranks, then stage 1's, ... (stage
= group rank // G, tensor rank = group rank % G), so a stage is G consecutive ranks: on one host when G
divides the ranks per host. Each stage owns a contiguous range of layers (``partition``: balanced by
the bytes a decode step reads per layer at a reference batch, the head's bytes counted on the last
stage; the embedding goes to the first), builds and loads only those. The partition is pure arithmetic
in ``spmd.config.partition`` (the planner, ``spmd.plan``, uses it too); its names are re-exported here.

A forward (``Pipeline.forward``) splits the batch into micro-batches of rows. Stage s receives a
micro-batch's hidden states from the same tensor rank of stage s-1 (``pp.recv``), runs its layers and
sends them on to stage s+1 (``pp.send``, asynchronous), then takes the next micro-batch: stage s works
on micro-batch k while stage s-1 runs k+1. The last stage's logits go to every rank of the model group
in one broadcast (``pp.logits``), so every rank samples the same tokens (the Stepper contract of
``spmd.runtime.generate``). A pipeline step leaves (P-1)/(M+P-1) of each stage idle for M micro-batches: the
time in ``pp.recv`` and ``pp.logits`` is that bubble (``traces.report.bubble_fraction``). The three are
calls of the Group ``pp`` (the model group, trace group "pp"), timed once an engine attaches its timers
(``spmd.parallel.comm.attach_timers(pipeline, timers)``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from spmd.config import UsageError
from spmd.config.partition import REFERENCE_BATCH, head_cost, layer_costs, partition, stage_layers
from spmd.parallel.comm import Group

__all__ = ["REFERENCE_BATCH", "Pipeline", "Placement", "check_placement", "head_cost", "layer_costs",
           "micro_batches", "partition", "placement", "stage_layers"]


def check_placement(hosts: list[str], pp: int, tp: int) -> None:
    """Every stage's G ranks on one host (its all-reduces stay off the network), with the hosts named."""
    if pp == 1:
        return
    for first in range(0, len(hosts), tp):
        stage_hosts = sorted(set(hosts[first:first + tp]))
        if len(stage_hosts) > 1:
            raise UsageError(f"pipeline stage of ranks {first}..{first + tp - 1} spans hosts {stage_hosts}: "
                             f"with --pp {pp} --group-size {tp} a stage's {tp} ranks must share a host (its "
                             f"tensor-parallel all-reduces run every layer); start a multiple of {tp} ranks "
                             f"per host")


@dataclass(frozen=True)
class Placement:
    """Where this rank sits in its model group's pipeline."""

    stage: int
    stages: int
    prev: int | None   # torch.distributed rank of the same tensor rank one stage up (None on the first stage)
    next: int | None   # ... one stage down (None on the last stage)
    last_root: int     # torch.distributed rank whose logits every rank of the group receives


def placement(world) -> Placement:
    base = world.replica * world.group_size
    g, s = world.tp_size, world.stage
    prev = world.model_rank - g if s > 0 else None
    nxt = world.model_rank + g if s < world.pp - 1 else None
    return Placement(s, world.pp, prev, nxt, base + (world.pp - 1) * g)


def micro_batches(rows: int, n: int) -> list[tuple[int, int]]:
    """(start, stop) of up to n near-equal contiguous chunks of `rows` rows (none empty)."""
    n = max(1, min(n, rows))
    edges = [rows * i // n for i in range(n + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:])]


class Pipeline:
    """Runs a stage's share of each forward: receive, compute, send, per micro-batch; then the logits."""

    def __init__(self, world, n_micro: int):
        self.place = placement(world)
        self.pp = Group(world.model_group, "pp")
        self.n_micro = int(n_micro)

    def forward(self, model, tokens, positions, key_mask, cache, start, naive=None, all_positions=False):
        """Like ``Transformer.forward`` on the whole model: (B, V) (or (B, T, V)) float32 logits on every
        rank of the model group."""
        bsz, t = tokens.shape
        outs, sends = [], []
        for k, (a, b) in enumerate(micro_batches(bsz, self.n_micro)):
            part = replace(cache, kv=[kv.narrow(0, a, b - a) for kv in cache.kv],  # this micro-batch's rows
                           pe=[pe.narrow(0, a, b - a) for pe in cache.pe])
            hidden = None
            if self.place.prev is not None:
                hidden = torch.empty(b - a, t, model.margs.dim, dtype=model.dtype, device=tokens.device)
                self.pp.recv("pp.recv", hidden, self.place.prev, tag=k)
            rows_start = start[a:b] if isinstance(start, torch.Tensor) and start.numel() > 1 else start  # per row
            mask = key_mask[a:b] if key_mask is not None else None
            out = model(tokens[a:b], positions[a:b], mask, part, rows_start, naive, all_positions, hidden=hidden)
            if self.place.next is not None:
                sends.append((self.pp.isend("pp.send", out, self.place.next, tag=k), out))
            else:
                outs.append(out)
        for work, _ in sends:
            work.wait()
        shape = (bsz, t, model.margs.vocab_size) if all_positions else (bsz, model.margs.vocab_size)
        logits = torch.cat(outs) if outs else torch.empty(shape, dtype=torch.float32, device=tokens.device)
        return self.pp.broadcast("pp.logits", logits, self.place.last_root)
