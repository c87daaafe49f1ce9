"""The program order of the grouped FP8 launches' row tiles, shared by spmd.kernels.fp8 (Triton, jitted
there) and spmd.kernels.fp8_ws (Gluon, jitted there): a plain function until a jit wraps it."""
from __future__ import annotations

try:
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    tl = None


def tile(p, NT, tend_ptr, offs_ptr, R, E, BLOCK_M: tl.constexpr, SEARCH: tl.constexpr,
         GROUP_M: tl.constexpr):
    """Program p < tend[E-1] * NT of a row-tile launch (NT column tiles; tend: cumulative row tiles per
    expert): (expert e, first row, end row of e, column tile). The programs of one expert are contiguous;
    inside, groups of GROUP_M row tiles, and in a group the row tiles vary fastest: the programs running
    together share the weight's column tiles (read from HBM once, not once per row tile) and a few row
    tiles of activations (from L2). The expert: binary search for the first e with tend[e] > p // NT
    (SEARCH = ceil(log2 E) steps), which is the first with tend[e] * NT > p."""
    tq = p // NT
    lo = tq * 0
    hi = lo + E - 1
    for _ in range(SEARCH):
        mid = (lo + hi) // 2
        right = tl.load(tend_ptr + mid) <= tq
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(right, hi, mid)
    first = tl.load(tend_ptr + lo - 1, mask=lo > 0, other=0)
    start = tl.load(offs_ptr + lo - 1, mask=lo > 0, other=0)
    count = tl.load(tend_ptr + lo) - first
    local = p - first * NT
    g0 = (local // (GROUP_M * NT)) * GROUP_M
    in_group = tl.minimum(count - g0, GROUP_M)
    inner = local - g0 * NT
    t = g0 + inner % in_group
    return lo, start + t * BLOCK_M, tl.minimum(tl.load(offs_ptr + lo), R), inner // in_group
