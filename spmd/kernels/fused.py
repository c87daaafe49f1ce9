"""Fused small ops in Triton, for the decode step on CUDA: RMSNorm and the MoE router, one kernel each.

At decode the step is a chain of small kernels between the weight-bound GEMMs, and each costs a launch
(~2-3 µs inside a CUDA graph) whatever its size. Torch's RMSNorm (``spmd.model.transformer.RMSNorm``) is five of them
(cast, square, mean, rsqrt-multiply, cast, weight multiply); the slice's step has 13 norms. ``rms_norm``
is one program per row that reads the row once, with the same arithmetic: fp32 mean of squares,
``x * rsqrt(mean + eps)`` in fp32, rounded to x's dtype, then multiplied by the weight (in fp32, rounded
once more to x's dtype, as torch's bf16 multiply does). It differs from torch only by the summation order
of the mean (fp32).

``route`` is the noaux_tc router after its matmul (``spmd.model.moe.Gate``), about 18 torch kernels: sigmoid
scores, biased choice scores, each group's score as the sum of its two best, the best groups kept, the
top-k experts of the kept groups, their unbiased scores normalized and scaled. One program per token
holds its E scores in registers; top-k is k rounds of argmax (ties to the lower index). It returns the
experts in descending order of choice score, as torch.topk does.

The model takes them on CUDA where Triton imports (``spmd.model.transformer.use_fused`` decides once per module);
elsewhere the torch path runs. Tested against torch
under Triton's CPU interpreter (tests/unit/test_fused.py) and on GPUs.
"""
from __future__ import annotations

import functools

import torch

from spmd.kernels.fp8 import interpret

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = tl = None


def _rms_norm_kernel(x_ptr, w_ptr, o_ptr, D, stride_x, stride_o, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    ms = tl.sum(xf * xf, axis=0) / D
    h = (xf * tl.rsqrt(ms + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(o_ptr + row * stride_o + cols, (w.to(tl.float32) * h.to(tl.float32)).to(o_ptr.dtype.element_ty),
             mask=mask)


def _route_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, stride_l, route_scale,
                  E: tl.constexpr, G: tl.constexpr, TOPK_G: tl.constexpr, K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, E)
    scores = tl.sigmoid(tl.load(logits_ptr + row * stride_l + cols))
    choice = tl.reshape(scores + tl.load(bias_ptr + cols), (G, E // G))
    inner = tl.arange(0, E // G)
    best = tl.argmax(choice, axis=1)
    second = tl.max(tl.where(inner[None, :] == best[:, None], float("-inf"), choice), axis=1)
    group_score = tl.max(choice, axis=1) + second  # (G,)
    groups = tl.arange(0, G)
    kept = groups < 0
    for _ in tl.static_range(TOPK_G):
        g = tl.argmax(tl.where(kept, float("-inf"), group_score), axis=0)
        kept = kept | (groups == g)
    left = tl.reshape(tl.where(kept[:, None], choice, float("-inf")), (E,))
    slots = tl.arange(0, K)
    weights = tl.zeros((K,), dtype=tl.float32)
    ids = tl.zeros((K,), dtype=tl.int64)
    for j in tl.static_range(K):
        e = tl.argmax(left, axis=0)
        weights = tl.where(slots == j, tl.sum(tl.where(cols == e, scores, 0.0), axis=0), weights)
        ids = tl.where(slots == j, e.to(tl.int64), ids)
        left = tl.where(cols == e, float("-inf"), left)
    weights = weights / (tl.sum(weights, axis=0) + 1e-20) * route_scale
    tl.store(w_ptr + row * K + slots, weights)
    tl.store(ids_ptr + row * K + slots, ids)


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool):
    del interpret  # the cache key: triton.jit reads TRITON_INTERPRET itself
    return triton.jit(_rms_norm_kernel), triton.jit(_route_kernel)


def route_fits(n_experts: int, n_groups: int, top_k: int) -> bool:
    """Whether ``route`` takes this router: E and top-k powers of two (Triton's block shapes), E / groups too."""
    def pow2(v: int) -> bool:
        return v > 0 and v & (v - 1) == 0
    return pow2(n_experts) and pow2(top_k) and pow2(n_groups) and n_experts % n_groups == 0 \
        and pow2(n_experts // n_groups) and n_experts // n_groups >= 2


def route(logits: torch.Tensor, bias: torch.Tensor, n_groups: int, topk_groups: int, top_k: int,
          route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, E) float32 (x @ gate.T) -> weights (N, top_k) float32, expert ids (N, top_k) int64."""
    n, e = logits.shape
    if not route_fits(e, n_groups, top_k) or logits.dtype != torch.float32 or bias.shape != (e,):
        raise ValueError(f"route: logits {tuple(logits.shape)} {logits.dtype}, bias {tuple(bias.shape)}, "
                         f"{n_groups} groups, top-{top_k}")
    logits = logits.contiguous()
    weights = torch.empty((n, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((n, top_k), dtype=torch.int64, device=logits.device)
    if n:
        _kernels(interpret())[1][(n,)](logits, bias.float(), weights, ids, logits.stride(0), float(route_scale),
                                        E=e, G=n_groups, TOPK_G=topk_groups, K=top_k, num_warps=4)
    return weights, ids


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)) over the last dim, as spmd.model.transformer.RMSNorm, in one kernel.

    x (..., D) with unit stride in the last dim; out in x.dtype (weight must have x's dtype)."""
    d = x.shape[-1]
    if weight.shape != (d,) or weight.dtype != x.dtype:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} {weight.dtype} for x (..., {d}) {x.dtype}")
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = triton.next_power_of_2(d)
        _kernels(interpret())[0][(x2.shape[0],)](
            x2, weight, out, d, x2.stride(0), out.stride(0), eps, BLOCK=block,
            num_warps=8 if block >= 4096 else 4)
    return out.view(x.shape)
