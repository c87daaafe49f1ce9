"""Tensor-parallel layers over a ``spmd.parallel.comm.Group``.

A layer built with a one-device ``Group()`` is the single-device layer. Every sharded layer has a class
attribute ``shard_dim``: the weight dimension split over the group (None = replicated); rank r of G holds
``local_slice(full, r, G)`` of that dimension, which is exactly what the checkpoint loader reads.

Timing rule (leaf intervals): a layer whose forward ends in a collective times its own local compute
under its ``name`` and calls the collective by name (``self.tp.all_reduce(f"{name}.all_reduce", y,
layer)``, ``self.tp.all_gather_last(f"{name}.all_gather", ...)``); a layer without a collective times
nothing, so the caller's compute span covers it. The timers come from ``attach_timers`` (spmd.parallel.comm),
never from the constructor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spmd.parallel.comm import NULL_SPAN, UNTIMED, Group


def local_slice(full_len: int, rank: int, size: int) -> slice:
    """This rank's contiguous part of a dimension of length full_len split over size ranks."""
    if full_len % size:
        raise ValueError(f"dimension of length {full_len} not divisible by group size {size}")
    n = full_len // size
    return slice(rank * n, (rank + 1) * n)


def own_span(module: nn.Module, on: bool):
    """module's compute span (its ``name`` and ``layer``) when `on`, i.e. when its forward ends in a
    collective; else a null context (the caller's span covers the work)."""
    return module.timers.compute(module.name, module.layer) if on else NULL_SPAN


def linear(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """x W^T for a module's weight: bf16/fp32 by F.linear, a kept FP8 weight (see checkpoint.keep_fp8)
    by the block-scaled Triton kernel with its `weight_scale_inv`."""
    return matmul(x, module.weight, getattr(module, "weight_scale_inv", None))


def pack_weights(mods: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Linears that read one input, as one: (their weights stacked by rows, their FP8 block scales stacked
    alike or None); each module's weight (and scale) becomes a view of the stack, so the parameter names
    and the memory stay as they were. None (nothing changed) where it cannot be: mixed dtypes or input
    widths, or FP8 with a module other than the last whose rows are not a multiple of 128 (its last scale
    row would cover the next one's rows)."""
    ws = [m.weight for m in mods]
    fp8 = ws[0].dtype == torch.float8_e4m3fn
    if len({(w.dtype, w.shape[1], w.device) for w in ws}) != 1 or (fp8 and any(w.shape[0] % 128 for w in ws[:-1])):
        return None
    stack = torch.cat([w.data for w in ws])
    scales = torch.cat([m.weight_scale_inv for m in mods]) if fp8 else None
    row = srow = 0
    for m, w in zip(mods, ws):
        n = w.shape[0]
        w.data = stack[row:row + n]
        if fp8:
            ns = m.weight_scale_inv.shape[0]
            m.weight_scale_inv = scales[srow:srow + ns]
            srow += ns
        row += n
    return stack, scales


def fp8_copy(w: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """An FP8 copy (weight, block scales) of a 16-bit weight that the loader dequantized from power-of-two
    (UE8M0) block scales, as V3.1's, for FP8 x FP8 GEMMs beside it, when the model keeps its other FP8
    weights as FP8 (`like` is one of them): `quantize_weight`, taken only where it dequantizes back to w
    exactly (other checkpoints' scales: (None, None), the 16-bit GEMM stays)."""
    if like.dtype != torch.float8_e4m3fn or w.dtype not in (torch.bfloat16, torch.float16):
        return None, None
    from spmd.kernels.fp8 import dequantize, quantize_weight
    q, s = quantize_weight(w)
    if not torch.equal(dequantize(q, s, w.dtype), w):
        return None, None
    return q, s


def matmul(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor | None) -> torch.Tensor:
    """x W^T for a weight given directly (pack_weights' stacks): as `linear`. x may be a
    spmd.kernels.fp8.Quantized activation (fp8_linear takes it as it is; other weights its 16-bit values)."""
    if w.dtype == torch.float8_e4m3fn:
        from spmd.kernels.fp8 import fp8_linear
        return fp8_linear(x, w, scale_inv)
    return F.linear(x if isinstance(x, torch.Tensor) else x.tensor(), w)


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
    timers = UNTIMED  # its span when it gathers (attach_timers)

    def __init__(self, in_f: int, out_f: int, tp: Group, dtype=None, gather_output: bool = False,
                 name: str = "", layer: int = -1, device=None):
        super().__init__()
        rows = local_slice(out_f, tp.rank, tp.size)
        self.tp, self.gather_output, self.name, self.layer = tp, gather_output, name, layer
        self.weight = _weight(rows.stop - rows.start, in_f, dtype, device)  # (out/G, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with own_span(self, self.gather_output):
            y = linear(x, self)  # (..., out/G)
        if self.gather_output:
            y = self.tp.all_gather_last(f"{self.name}.all_gather", y, self.layer)  # (..., out)
        return y


class RowParallelLinear(nn.Module):
    """Input features split over the group; partial outputs summed by all-reduce unless reduce_output=False."""

    shard_dim, fp8_ok = 1, True
    timers = UNTIMED  # its span when it reduces (attach_timers)

    def __init__(self, in_f: int, out_f: int, tp: Group, dtype=None, reduce_output: bool = True,
                 name: str = "", layer: int = -1, device=None):
        super().__init__()
        cols = local_slice(in_f, tp.rank, tp.size)
        self.tp, self.reduce_output, self.name, self.layer = tp, reduce_output, name, layer
        self.weight = _weight(out_f, cols.stop - cols.start, dtype, device)  # (out, in/G)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with own_span(self, self.reduce_output):
            y = linear(x, self)  # (..., out): this rank's partial sum
        if self.reduce_output:
            y = self.tp.all_reduce(f"{self.name}.all_reduce", y, self.layer)
        return y


class ParallelEmbedding(nn.Module):
    """Vocabulary rows split over the group; ids outside the local range give zeros before the all-reduce."""

    shard_dim = 0
    timers = UNTIMED  # attach_timers

    def __init__(self, vocab: int, dim: int, tp: Group, dtype=None, name: str = "embed", device=None):
        super().__init__()
        rows = local_slice(vocab, tp.rank, tp.size)
        self.lo, self.hi = rows.start, rows.stop
        self.tp, self.name = tp, name
        self.weight = _weight(self.hi - self.lo, dim, dtype, device)  # (vocab/G, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        with self.timers.compute(self.name):
            if self.tp.size == 1:
                y = F.embedding(ids, self.weight)  # (..., dim)
            else:
                outside = (ids < self.lo) | (ids >= self.hi)
                local = (ids - self.lo).masked_fill(outside, 0)
                y = F.embedding(local, self.weight).masked_fill(outside[..., None], 0.0)  # (..., dim)
        return self.tp.all_reduce(f"{self.name}.all_reduce", y)
