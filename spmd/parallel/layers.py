"""Tensor-parallel layers and the collectives they use, each named and timed.

A layer built with ``group=None`` is the single-device layer. Every sharded layer has a class attribute
``shard_dim``: the weight dimension split over the group (None = replicated); rank r of G holds
``local_slice(full, r, G)`` of that dimension, which is exactly what the checkpoint loader reads.

Timing rule (leaf intervals): a layer whose forward ends in a collective times its own local compute
under its ``name`` and the collective as ``{name}.all_reduce`` / ``{name}.all_gather``; a layer without a
collective times nothing, so the caller's compute block covers it.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

GROUP_NAME = "tp"  # trace name of the model-group communicator (TP and EP share its ranks)


def group_info(group) -> tuple[int, int]:
    """(rank, size) inside the group; (0, 1) for None."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def local_slice(full_len: int, rank: int, size: int) -> slice:
    """This rank's contiguous part of a dimension of length full_len split over size ranks."""
    if full_len % size:
        raise ValueError(f"dimension of length {full_len} not divisible by group size {size}")
    n = full_len // size
    return slice(rank * n, (rank + 1) * n)


def all_reduce(x: torch.Tensor, group, timers, name: str, layer: int = -1) -> torch.Tensor:
    """Sum x in place over the group (no-op for None); timed as comm event `name`."""
    if group is None:
        return x
    with timers.comm(name, x.numel() * x.element_size(), group=GROUP_NAME, layer=layer):
        dist.all_reduce(x, group=group)
    return x


def all_gather_last(x: torch.Tensor, group, timers, name: str, layer: int = -1) -> torch.Tensor:
    """Concatenate the ranks' x along the last dim, in rank order; timed with this rank's bytes."""
    if group is None:
        return x
    _, size = group_info(group)
    x = x.contiguous()
    with timers.comm(name, x.numel() * x.element_size(), group=GROUP_NAME, layer=layer):
        if x.is_cuda:  # one output buffer (no list of tensors): what a CUDA graph captures best
            out = x.new_empty((size, *x.shape))
            dist.all_gather_into_tensor(out, x, group=group)
        else:
            out = [torch.empty_like(x) for _ in range(size)]
            dist.all_gather(out, x, group=group)
    return torch.cat(list(out), dim=-1)


def compute_span(timers, name: str, layer: int, on: bool):
    """timers.compute(name) when `on`, else a no-op context (the caller's block covers the work)."""
    return timers.compute(name, layer=layer) if on else nullcontext()


def linear(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """x W^T for a module's weight: bf16/fp32 by F.linear, a kept FP8 weight (see checkpoint.keep_fp8)
    by the block-scaled Triton kernel with its `weight_scale_inv`."""
    w = module.weight
    if w.dtype == torch.float8_e4m3fn:
        from spmd.kernels.fp8 import fp8_linear
        return fp8_linear(x, w, module.weight_scale_inv)
    return F.linear(x, w)


def _weight(rows: int, cols: int, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(rows, cols, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """Replicated y = x W^T (no bias)."""

    shard_dim, fp8_ok = None, True  # fp8_ok: the loader may keep an FP8 checkpoint weight as FP8

    def __init__(self, in_f: int, out_f: int, dtype=None, device=None):
        super().__init__()
        self.weight = _weight(out_f, in_f, dtype, device)  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self)


class ColumnParallelLinear(nn.Module):
    """Output features split over the group; the output stays local unless gather_output."""

    shard_dim, fp8_ok = 0, True

    def __init__(self, in_f: int, out_f: int, group, dtype=None, gather_output: bool = False,
                 timers=None, name: str = "", layer: int = -1, device=None):
        super().__init__()
        rank, size = group_info(group)
        rows = local_slice(out_f, rank, size)
        self.group, self.gather_output, self.timers, self.name, self.layer = group, gather_output, timers, name, layer
        self.weight = _weight(rows.stop - rows.start, in_f, dtype, device)  # (out/G, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with compute_span(self.timers, self.name, self.layer, self.gather_output):
            y = linear(x, self)  # (..., out/G)
        if self.gather_output:
            y = all_gather_last(y, self.group, self.timers, f"{self.name}.all_gather", self.layer)
        return y


class RowParallelLinear(nn.Module):
    """Input features split over the group; partial outputs summed by all-reduce unless reduce_output=False."""

    shard_dim, fp8_ok = 1, True

    def __init__(self, in_f: int, out_f: int, group, dtype=None, reduce_output: bool = True,
                 name: str = "", timers=None, layer: int = -1, device=None):
        super().__init__()
        rank, size = group_info(group)
        cols = local_slice(in_f, rank, size)
        self.group, self.reduce_output, self.timers, self.name, self.layer = group, reduce_output, timers, name, layer
        self.weight = _weight(out_f, cols.stop - cols.start, dtype, device)  # (out, in/G)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with compute_span(self.timers, self.name, self.layer, self.reduce_output):
            y = linear(x, self)  # (..., out): this rank's partial sum
        if self.reduce_output:
            y = all_reduce(y, self.group, self.timers, f"{self.name}.all_reduce", self.layer)
        return y


class ParallelEmbedding(nn.Module):
    """Vocabulary rows split over the group; ids outside the local range give zeros before the all-reduce."""

    shard_dim = 0

    def __init__(self, vocab: int, dim: int, group, dtype=None, timers=None, name: str = "embed",
                 device=None):
        super().__init__()
        rank, size = group_info(group)
        rows = local_slice(vocab, rank, size)
        self.lo, self.hi = rows.start, rows.stop
        self.group, self.timers, self.name = group, timers, name
        self.weight = _weight(self.hi - self.lo, dim, dtype, device)  # (vocab/G, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        with self.timers.compute(self.name):
            if self.group is None:
                y = F.embedding(ids, self.weight)  # (..., dim)
            else:
                outside = (ids < self.lo) | (ids >= self.hi)
                local = (ids - self.lo).masked_fill(outside, 0)
                y = F.embedding(local, self.weight).masked_fill(outside[..., None], 0.0)  # (..., dim)
        return all_reduce(y, self.group, self.timers, f"{self.name}.all_reduce")
