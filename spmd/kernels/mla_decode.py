"""MLA decode attention over each row's own length (absorbed form), in Triton: not yet on by default.

Why: continuous batching (spmd/engines/slots.py) runs a decode step over a static (rows, columns) view of
the slots' cache, columns = the longest live row rounded up, and torch's absorbed attention
(``spmd.model.transformer.MLA._absorb``) then reads every column of every row and writes the (B, H, S)
scores in float32 several times. On one H100 with the FP8 slice, 400 rows over 4,096-4,578 columns took
~37 ms per step against gpu_bench's 21.6 ms at 400 rows over ~100 columns (docs/performance.md,
"Serving benchmark"). This kernel reads only columns < lens[b] of row b and keeps the scores on chip
(online softmax), split over the columns when there are few rows (flash-decoding), with the splits
combined in torch.

Inputs, for one query token per row: q_latent (B, H, C) = q_nope absorbed through kv_b_proj's key part,
q_pe (B, H, R) (rotated), the cache views kv (B, S, C) and pe (B, S, R) (rows may be strided), lens (B,)
int64 (keys visible: the columns 0..lens-1), the softmax scale. Output: o_latent (B, H, C) in kv's dtype,
which _absorb multiplies by kv_b_proj's value part. Scores and the softmax are float32; the probabilities
are cast to kv's dtype for the product with the values, as in the torch path.

Status: correct against the torch formula on CPU under Triton's interpreter (tests/unit/test_mla_decode.py),
compiled and timed on no GPU yet. ``Transformer.varlen_decode`` (default False) switches a model's
continuous decode steps to it.
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

BLOCK_H, BLOCK_N = 16, 32
MAX_SPLITS = 16


def _kernel(q_ptr, kv_ptr, pe_ptr, lens_ptr, acc_ptr, m_ptr, l_ptr, H, chunk,
            stride_qb, stride_qh, stride_kb, stride_ks, stride_pb, stride_ps, scale,
            C: tl.constexpr, R: tl.constexpr, SPLITS: tl.constexpr, BLOCK_H: tl.constexpr,
            BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    b, hb, sp = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    cc, rr = tl.arange(0, C), tl.arange(0, R)
    q_row = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    q_lat = tl.load(q_row + cc[None, :], mask=hmask[:, None], other=0.0)   # (BLOCK_H, C)
    q_pe = tl.load(q_row + C + rr[None, :], mask=hmask[:, None], other=0.0)  # (BLOCK_H, R)
    if DOT_F32:  # the interpreter's dot runs np.matmul, which has no bf16
        q_lat, q_pe = q_lat.to(tl.float32), q_pe.to(tl.float32)
    n_keys = tl.load(lens_ptr + b)
    lo = sp * chunk
    hi = tl.minimum(lo + chunk, n_keys)
    m = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    den = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, C), tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < hi
        k = tl.load(kv_ptr + b * stride_kb + cols[:, None] * stride_ks + cc[None, :], mask=cmask[:, None], other=0.0)
        kp = tl.load(pe_ptr + b * stride_pb + cols[:, None] * stride_ps + rr[None, :], mask=cmask[:, None],
                     other=0.0)
        if DOT_F32:
            k, kp = k.to(tl.float32), kp.to(tl.float32)
        if IEEE:  # float32 caches: full-precision products, not TF32
            s = tl.dot(q_lat, tl.trans(k), input_precision="ieee") + \
                tl.dot(q_pe, tl.trans(kp), input_precision="ieee")
        else:
            s = tl.dot(q_lat, tl.trans(k)) + tl.dot(q_pe, tl.trans(kp))
        s = s * scale  # (BLOCK_H, BLOCK_N) fp32
        s = tl.where(cmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        den = den * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(k.dtype), k, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(k.dtype), k)
        m = m_new
    part = (b * H + heads) * SPLITS + sp  # (B, H, SPLITS) partials
    tl.store(m_ptr + part, m, mask=hmask)
    tl.store(l_ptr + part, den, mask=hmask)
    tl.store(acc_ptr + part[:, None] * C + cc[None, :], acc, mask=hmask[:, None])


@functools.lru_cache(maxsize=None)
def _compiled(interpret: bool):
    del interpret  # the cache key: triton.jit reads TRITON_INTERPRET itself
    return triton.jit(_kernel)


def fits(n_heads: int, rank: int, rope: int) -> bool:
    """Whether the kernel takes these shapes: kv_lora_rank and rope dims powers of two, >= 16 (tl.dot)."""
    def pow2(v: int) -> bool:
        return v >= 16 and v & (v - 1) == 0
    return n_heads > 0 and pow2(rank) and pow2(rope)


def splits_for(rows: int, n_heads: int, cols: int, sms: int) -> int:
    """Column splits: enough programs for about two per SM, no split shorter than one block of columns."""
    programs = rows * triton.cdiv(n_heads, BLOCK_H)
    return max(1, min(MAX_SPLITS, triton.cdiv(2 * sms, programs), triton.cdiv(cols, BLOCK_N)))


def mla_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor,
               lens: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, H, C), (B, H, R) queries over cache columns 0..lens[b]-1 of kv (B, S, C), pe (B, S, R) ->
    o_latent (B, H, C) in kv's dtype (see the module doc)."""
    bsz, heads, c = q_latent.shape
    r, s = q_pe.shape[-1], kv.shape[1]
    if not fits(heads, c, r) or kv.stride(-1) != 1 or pe.stride(-1) != 1:
        raise ValueError(f"mla_decode: q {tuple(q_latent.shape)}, q_pe {tuple(q_pe.shape)}, kv {tuple(kv.shape)}")
    q = torch.cat([q_latent, q_pe], dim=-1).to(kv.dtype).contiguous()  # (B, H, C + R)
    sms = torch.cuda.get_device_properties(kv.device).multi_processor_count if kv.is_cuda else 4
    splits = splits_for(bsz, heads, s, sms)
    chunk = triton.cdiv(triton.cdiv(s, splits), BLOCK_N) * BLOCK_N
    acc = torch.empty(bsz, heads, splits, c, dtype=torch.float32, device=kv.device)
    m = torch.empty(bsz, heads, splits, dtype=torch.float32, device=kv.device)
    den = torch.empty_like(m)
    grid = (bsz, triton.cdiv(heads, BLOCK_H), splits)
    _compiled(interpret())[grid](q, kv, pe, lens, acc, m, den, heads, chunk, q.stride(0), q.stride(1),
                                 kv.stride(0), kv.stride(1), pe.stride(0), pe.stride(1), float(scale),
                                 C=c, R=r, SPLITS=splits, BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N,
                                 DOT_F32=interpret(), IEEE=kv.dtype == torch.float32, num_warps=4)
    top = m.amax(dim=-1, keepdim=True)  # (B, H, 1): every row has >= 1 key, so one split is finite
    w = torch.exp(m - top)  # empty splits: exp(-inf) = 0
    out = (acc * w[..., None]).sum(2) / (den * w).sum(-1)[..., None]
    return out.to(kv.dtype)
