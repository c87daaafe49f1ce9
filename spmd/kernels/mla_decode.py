"""MLA decode attention over each row's own length (absorbed form), in Triton: continuous batching's default on CUDA.

Why: continuous batching (spmd/engines/slots.py) runs a decode step over a static (rows, columns) view of
the slots' cache, columns = the longest live row rounded up, and torch's absorbed attention
(``spmd.model.transformer.MLA._absorb``) then reads every column of every row and writes the (B, H, S)
scores in float32 several times. This kernel reads only columns < lens[b] of row b and keeps the scores on
chip (online softmax), split over the columns when there are few rows (flash-decoding), with the splits
combined in torch. One H100, one layer, 400 rows of chat lengths in an 8,192-column bucket: 1.30 ms against
torch's 10.98 (traces/mla_bench.py; docs/performance.md, "MLA decode kernel"); the serving benchmark's
400-row step fell from 37.2 to 24.4 ms.

Inputs, for one query token per row: q_latent (B, H, C) = q_nope absorbed through kv_b_proj's key part,
q_pe (B, H, R) (rotated), the cache views kv (B, S, C) and pe (B, S, R) (rows may be strided), lens (B,)
int64 (keys visible: the columns 0..lens-1), the softmax scale. Output: o_latent (B, H, C) in kv's dtype,
which _absorb multiplies by kv_b_proj's value part. Scores and the softmax are float32; the probabilities
are cast to kv's dtype for the product with the values, as in the torch path.

Checked against the float32 formula compiled on an H100 and under Triton's CPU interpreter
(tests/unit/test_mla_decode.py). ``Transformer.varlen_decode`` switches a model's continuous decode steps
to it (``--mla-decode``, spmd.engines.native.varlen_decode); ``warm`` compiles it at load.
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

# the default tile: 32 heads x 32 columns, 4 warps (traces/results/mla/: fastest or within 4 % of it in 6 of 10
# cases on an H100, 2026-12-06; 16-head tiles read each row's columns 8 times, 64x64 does not compile)
BLOCK_H, BLOCK_N, WARPS = 32, 32, 4
MAX_SPLITS = 16


def _kernel(q_ptr, kv_ptr, pe_ptr, lens_ptr, acc_ptr, m_ptr, l_ptr, H, chunk,
            stride_qb, stride_qh, stride_kb, stride_ks, stride_pb, stride_ps, scale,
            SPLITS, C: tl.constexpr, R: tl.constexpr, BLOCK_H: tl.constexpr,
            BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    hb, b, sp = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)  # heads fastest: a row's
    # head blocks run side by side and read its columns from L2 once
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
    # SPLITS (1 to 16 by the step's rows) is not specialized on: one compiled kernel serves every step shape
    return triton.jit(_kernel, do_not_specialize=["SPLITS"])


def fits(n_heads: int, rank: int, rope: int) -> bool:
    """Whether the kernel takes these shapes: kv_lora_rank and rope dims powers of two, >= 16 (tl.dot)."""
    def pow2(v: int) -> bool:
        return v >= 16 and v & (v - 1) == 0
    return n_heads > 0 and pow2(rank) and pow2(rope)


def splits_for(rows: int, n_heads: int, cols: int, sms: int, block_h: int = BLOCK_H, block_n: int = BLOCK_N) -> int:
    """Column splits: enough programs for about two per SM, no split shorter than one block of columns."""
    programs = rows * triton.cdiv(n_heads, block_h)
    return max(1, min(MAX_SPLITS, triton.cdiv(2 * sms, programs), triton.cdiv(cols, block_n)))


def mla_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor,
               lens: torch.Tensor, scale: float, block_h: int = BLOCK_H, block_n: int = BLOCK_N,
               warps: int = WARPS, stages: int | None = None) -> torch.Tensor:
    """(B, H, C), (B, H, R) queries over cache columns 0..lens[b]-1 of kv (B, S, C), pe (B, S, R) ->
    o_latent (B, H, C) in kv's dtype (see the module doc). block_h heads x block_n columns per tile, warps
    and pipeline stages per program: the tile (defaults: the module's)."""
    bsz, heads, c = q_latent.shape
    r, s = q_pe.shape[-1], kv.shape[1]
    if not fits(heads, c, r) or kv.stride(-1) != 1 or pe.stride(-1) != 1:
        raise ValueError(f"mla_decode: q {tuple(q_latent.shape)}, q_pe {tuple(q_pe.shape)}, kv {tuple(kv.shape)}")
    q = torch.cat([q_latent, q_pe], dim=-1).to(kv.dtype).contiguous()  # (B, H, C + R)
    sms = torch.cuda.get_device_properties(kv.device).multi_processor_count if kv.is_cuda else 4
    splits = splits_for(bsz, heads, s, sms, block_h, block_n)
    chunk = triton.cdiv(triton.cdiv(s, splits), block_n) * block_n
    acc = torch.empty(bsz, heads, splits, c, dtype=torch.float32, device=kv.device)
    m = torch.empty(bsz, heads, splits, dtype=torch.float32, device=kv.device)
    den = torch.empty_like(m)
    grid = (triton.cdiv(heads, block_h), bsz, splits)
    extra = {} if stages is None else {"num_stages": stages}
    _compiled(interpret())[grid](q, kv, pe, lens, acc, m, den, heads, chunk, q.stride(0), q.stride(1),
                                 kv.stride(0), kv.stride(1), pe.stride(0), pe.stride(1), float(scale),
                                 splits, C=c, R=r, BLOCK_H=block_h, BLOCK_N=block_n,
                                 DOT_F32=interpret(), IEEE=kv.dtype == torch.float32, num_warps=warps, **extra)
    if splits == 1:  # nothing to combine
        return (acc[:, :, 0] / den[..., 0, None]).to(kv.dtype)
    top = m.amax(dim=-1, keepdim=True)  # (B, H, 1): every row has >= 1 key, so one split is finite
    w = torch.exp(m - top)  # empty splits: exp(-inf) = 0
    out = (acc * w[..., None]).sum(2) / (den * w).sum(-1)[..., None]
    return out.to(kv.dtype)


def warm(device, dtype: torch.dtype, heads: int, rank: int, rope: int) -> None:
    """Compile the kernel for these shapes before serving (Triton compiles on first call, about a second:
    inside a measured decode step otherwise). Every step shape then reuses it: the row count, columns and
    splits are runtime values; the strides keep the slots' cache's divisibility by 16."""
    kv = torch.zeros(2, 64, rank, dtype=dtype, device=device)
    pe = torch.zeros(2, 64, rope, dtype=dtype, device=device)
    q_lat = torch.zeros(2, heads, rank, dtype=dtype, device=device)
    q_pe = torch.zeros(2, heads, rope, dtype=dtype, device=device)
    mla_decode(q_lat, q_pe, kv, pe, torch.tensor([1, 64], device=device), 1.0)
