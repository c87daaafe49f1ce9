"""Fused small ops in Triton on CUDA: RMSNorm and the MoE router for the decode step, one kernel each; the prefill glue.

At decode the step is a chain of small kernels between the weight-bound GEMMs, and each costs a launch
(~2-3 µs inside a CUDA graph) whatever its size. Torch's RMSNorm (``spmd.model.transformer.RMSNorm``) is five of them
(cast, square, mean, rsqrt-multiply, cast, weight multiply); the slice's step has 13 norms. ``rms_norm``
is one program per row that reads the row once, with the same arithmetic: fp32 mean of squares,
``x * rsqrt(mean + eps)`` in fp32, rounded to x's dtype, then multiplied by the weight (in fp32, rounded
once more to x's dtype, as torch's bf16 multiply does). It differs from torch only by the summation order
of the mean (fp32). ``norm`` is the same kernel with the residual add before it (the post-attention norm:
x + attention output, rounded to x's dtype as torch's add, written out as the residual stream).

``route`` is the noaux_tc router after its matmul (``spmd.model.moe.Gate``), about 18 torch kernels: sigmoid
scores, biased choice scores, each group's score as the sum of its two best, the best groups kept, the
top-k experts of the kept groups, their unbiased scores normalized and scaled. One program per token
holds its E scores in registers; top-k is k rounds of argmax (ties to the lower index). It returns the
experts in descending order of choice score, as torch.topk does.

Prefill glue, where torch makes several memory passes of large tensors: ``rope`` rotates q's rope part in
place (so q needs no concatenation) with torch's roundings op by op; ``mla_keys`` builds the per-head keys
(k_nope | shared rotated key) in one pass, where torch.cat of an expanded view is a slow strided copy;
``silu_mul`` makes silu(gate) * up * routing weight from the experts' gate+up output in one read, and for
the FP8 x FP8 down projection writes it quantized as spmd.kernels.fp8.quantize_act would; ``gather_sum``
returns the experts' rows to their tokens and sums each token's k of them, without the (tokens x k, dim)
copy of index_select. MLA, MLP and MoE take them for steps of FUSED_ROWS tokens or more (``fused_for``),
and in decode graphs.

The model takes them on CUDA where Triton imports (``spmd.model.transformer.use_fused`` decides once per module);
elsewhere the torch path runs. Tested against torch
under Triton's CPU interpreter (tests/unit/test_fused.py) and on GPUs.
"""
from __future__ import annotations

import functools

import torch

from spmd.kernels import fp8
from spmd.kernels.fp8 import interpret

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = tl = None


# Steps of at least this many tokens take the fused glue kernels of MLA and MoE (rope, the per-head keys,
# silu * up) even in eager mode, where use_fused leaves the small ops to torch: at this size a kernel's
# host cost is small beside the memory passes it saves (a 16,384-token prefill of the slice: torch's cat
# of the keys and its rope ops took ~15 ms of ~110 on an H100, traces/results/bench/fp8-modes-2026-12-06-r3).
FUSED_ROWS = 256


def fused_for(mod, rows: int) -> bool:
    """Whether mod (an MLA, MLP or MoE, switched by spmd.model.transformer.use_fused: `fused` in decode graphs,
    `fused_ok` where the kernels run) takes its fused kernels for a step of `rows` tokens."""
    return mod.fused or (mod.fused_ok and rows >= FUSED_ROWS)


def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, o_ptr, xo_ptr, D, stride_x, stride_r, stride_o, stride_xo, eps,
                    BLOCK: tl.constexpr, RESIDUAL: tl.constexpr):
    """Program per row: x (+ r, rounded to x's dtype and written to xo: the residual stream) normalized
    and scaled by w as RMSNorm, to o."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if RESIDUAL:  # torch's 16-bit add: in fp32, rounded once
        x = (x.to(tl.float32) + tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
             ).to(x.dtype)
        tl.store(xo_ptr + row * stride_xo + cols, x, mask=mask)
    xf = x.to(tl.float32)
    # tl.reduce with this module's combine function, not tl.sum: a triton.language @jit helper, fixed to one
    # mode at triton's import (a process that imported triton before TRITON_INTERPRET could not interpret it)
    ms = tl.reduce(xf * xf, 0, _add_combine) / D
    h = (xf * tl.rsqrt(ms + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(o_ptr + row * stride_o + cols, (w.to(tl.float32) * h.to(tl.float32)).to(x.dtype), mask=mask)


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


def _rope_kernel(x_ptr, cos_ptr, sin_ptr, o_ptr, T, H, stride_xb, stride_xt, stride_xh, stride_cb, stride_ct,
                 stride_ob, stride_ot, stride_oh, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BF16: tl.constexpr):
    """Program (b * T + t, head block): x's interleaved pairs rotated, written de-interleaved to o (which
    may be x: a barrier puts every load of the program before its first store, and programs own disjoint
    rows). Each product and each sum is rounded to x's dtype, as torch's ops in apply_rope are. In bf16
    they are rounded by integer arithmetic on the float32 bits (nearest, ties to even; finite values):
    written as casts to bf16 and back, the kernel compiled for an H100 came out one bf16 ulp off torch's
    (2026-12-07; a compiler may fold such round trips or contract into FMAs), and Triton's interpreter
    truncates casts."""
    row = tl.program_id(0)
    b, t = row // T, row % T
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    j = tl.arange(0, HALF)
    mask = (h < H)[:, None]
    base = x_ptr + b.to(tl.int64) * stride_xb + t.to(tl.int64) * stride_xt + h.to(tl.int64)[:, None] * stride_xh
    even = tl.load(base + 2 * j[None, :], mask=mask, other=0.0)
    odd = tl.load(base + 2 * j[None, :] + 1, mask=mask, other=0.0)
    c = tl.load(cos_ptr + b.to(tl.int64) * stride_cb + t.to(tl.int64) * stride_ct + j)[None, :].to(tl.float32)
    s = tl.load(sin_ptr + b.to(tl.int64) * stride_cb + t.to(tl.int64) * stride_ct + j)[None, :].to(tl.float32)
    tl.debug_barrier()  # in place (o = x): every thread's loads of this program's rows before any store
    dt = even.dtype
    ef, of = even.to(tl.float32), odd.to(tl.float32)
    if BF16:
        r0 = _bf16_fn(_bf16_fn(ef * c) - _bf16_fn(of * s)).to(dt)  # exact casts: Triton's interpreter too
        r1 = _bf16_fn(_bf16_fn(of * c) + _bf16_fn(ef * s)).to(dt)
    else:
        r0 = ((ef * c).to(dt).to(tl.float32) - (of * s).to(dt).to(tl.float32)).to(dt)
        r1 = ((of * c).to(dt).to(tl.float32) + (ef * s).to(dt).to(tl.float32)).to(dt)
    out = o_ptr + b.to(tl.int64) * stride_ob + t.to(tl.int64) * stride_ot + h.to(tl.int64)[:, None] * stride_oh
    tl.store(out + j[None, :], r0, mask=mask)
    tl.store(out + HALF + j[None, :], r1, mask=mask)


def _bf16_round(v):
    """float32 v rounded to bf16's precision (nearest, ties to even; finite v), still float32."""
    u = v.to(tl.uint32, bitcast=True)
    return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)


def _mla_keys_kernel(kn_ptr, pe_ptr, k_ptr, S, H, stride_nb, stride_ns, stride_nh, stride_pb, stride_ps,
                     stride_kb, stride_ks, stride_kh, NOPE: tl.constexpr, ROPE: tl.constexpr,
                     BLOCK_H: tl.constexpr):
    """Program (b * S + s, head block): k[b, s, h] = (k_nope[b, s, h] | pe[b, s]), every head the same pe."""
    row = tl.program_id(0)
    b, s = (row // S).to(tl.int64), (row % S).to(tl.int64)
    h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    mask = (h < H)[:, None]
    c = tl.arange(0, NOPE)
    r = tl.arange(0, ROPE)
    nope = tl.load(kn_ptr + b * stride_nb + s * stride_ns + h[:, None] * stride_nh + c[None, :], mask=mask)
    pe = tl.load(pe_ptr + b * stride_pb + s * stride_ps + r)
    out = k_ptr + b * stride_kb + s * stride_ks + h[:, None] * stride_kh
    tl.store(out + c[None, :], nope, mask=mask)
    tl.store(out + NOPE + r[None, :], tl.broadcast_to(pe[None, :], (BLOCK_H, ROPE)), mask=mask)


def _silu_mul_kernel(gu_ptr, w_ptr, o_ptr, q_ptr, s_ptr, M, I, stride_gm, stride_om, stride_qm, stride_sm, stride_sk,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HAS_W: tl.constexpr, QUANT: tl.constexpr,
                     UE8M0: tl.constexpr, EXACT_DIV: tl.constexpr):
    """Program (row block, 128-column block kb): a = silu(gate) * up (* w[row], the routing weight) from
    gate_up (M, 2I) = (gate | up), each op rounded to the dtype as torch's are; then either a to o, or
    a quantized per row and 128 columns as spmd.kernels.fp8.quantize_act does (q e4m3, s float32)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rm < M)[:, None] & (rk < I)[None, :]
    g_ptrs = gu_ptr + rm.to(tl.int64)[:, None] * stride_gm + rk[None, :]
    g = tl.load(g_ptrs, mask=mask, other=0.0)
    u = tl.load(g_ptrs + I, mask=mask, other=0.0)
    dt = g.dtype
    gf = g.to(tl.float32)
    a = (gf / (1.0 + tl.exp(-gf))).to(dt)
    a = (a.to(tl.float32) * u.to(tl.float32)).to(dt)
    if HAS_W:
        w = tl.load(w_ptr + rm, mask=rm < M, other=0.0).to(dt)
        a = (a.to(tl.float32) * w.to(tl.float32)[:, None]).to(dt)
    if QUANT:
        q, scale = _quant_block_fn(a.to(tl.float32), UE8M0, EXACT_DIV)
        tl.store(q_ptr + rm.to(tl.int64)[:, None] * stride_qm + rk[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + rm.to(tl.int64) * stride_sm + tl.program_id(1) * stride_sk, scale, mask=rm < M)
    else:
        tl.store(o_ptr + rm.to(tl.int64)[:, None] * stride_om + rk[None, :], a, mask=mask)


def _gather_sum_kernel(h_ptr, idx_ptr, o_ptr, D, stride_h, stride_o, K: tl.constexpr, BLOCK: tl.constexpr):
    """Program (token i, column block): o[i] = sum over j < K of h[idx[i * K + j]], in float32 in j order,
    rounded once to o's dtype."""
    i = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    acc = tl.full((BLOCK,), 0.0, dtype=tl.float32)  # not tl.zeros: a @jit helper (see _rms_norm_kernel)
    for j in tl.static_range(K):
        r = tl.load(idx_ptr + i * K + j).to(tl.int64)
        acc += tl.load(h_ptr + r * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptr + i * stride_o + cols, acc.to(o_ptr.dtype.element_ty), mask=mask)


def _add(a, b):
    return a + b


_quant_block_fn = None  # spmd.kernels.fp8's, jitted for the mode in use: set by _kernels
_bf16_fn = None  # _bf16_round, jitted: set by _kernels
_add_combine = None  # _add, jitted: set by _kernels


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool):
    # interpret: the cache key (triton.jit reads TRITON_INTERPRET itself)
    global _quant_block_fn, _bf16_fn, _add_combine
    fp8._kernels(interpret)
    _quant_block_fn = fp8._quant_block_fn
    _bf16_fn, _add_combine = triton.jit(_bf16_round), triton.jit(_add)
    return (triton.jit(_rms_norm_kernel), triton.jit(_route_kernel), triton.jit(_rope_kernel),
            triton.jit(_mla_keys_kernel), triton.jit(_silu_mul_kernel), triton.jit(_gather_sum_kernel))


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
    return norm(x, weight, eps)[1]


def norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """rms_norm of x, or of x + residual (rounded to x's dtype, as torch's add), in one kernel (one read of
    each input) -> (x + residual or None, the normalized activation)."""
    d = x.shape[-1]
    if weight.shape != (d,) or weight.dtype != x.dtype or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} {weight.dtype} for x (..., {d}) {x.dtype}, "
                         f"residual {None if residual is None else tuple(residual.shape)}")
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    r2 = x2 if residual is None else residual.reshape(-1, d).contiguous()
    summed = None if residual is None else torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = triton.next_power_of_2(d)
        _kernels(interpret())[0][(x2.shape[0],)](
            x2, r2, weight, out, x2 if summed is None else summed, d, x2.stride(0), r2.stride(0), out.stride(0),
            0 if summed is None else summed.stride(0), eps, BLOCK=block, RESIDUAL=residual is not None,
            num_warps=8 if block >= 4096 else 4)
    return (None if summed is None else summed.view(x.shape)), out.view(x.shape)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """spmd.model.transformer.apply_rope in one kernel, for x (B, T, H, rope) or (B, T, rope) with unit
    stride in the last dim, cos/sin (B or 1, T, rope/2) in x's dtype; out (x's shape; x itself: in
    place) or a new tensor."""
    b, t = x.shape[:2]
    heads = x.shape[2] if x.dim() == 4 else 1
    half = x.shape[-1] // 2
    if x.shape[-1] % 2 or cos.shape not in ((b, t, half), (1, t, half)) or sin.shape != cos.shape \
            or x.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride() != cos.stride() \
            or cos.dtype != x.dtype or sin.dtype != x.dtype:
        raise ValueError(f"rope: x {tuple(x.shape)} {x.dtype}, cos {tuple(cos.shape)} {cos.dtype}, "
                         f"sin {tuple(sin.shape)}")
    out = torch.empty_like(x) if out is None else out
    if out.shape != x.shape or out.stride(-1) != 1:
        raise ValueError(f"rope: out {tuple(out.shape)} for x {tuple(x.shape)}")
    sx = x.stride()[:3] if x.dim() == 4 else (*x.stride()[:2], 0)
    so = out.stride()[:3] if out.dim() == 4 else (*out.stride()[:2], 0)
    block_h = min(16, triton.next_power_of_2(heads))
    if b * t:
        _kernels(interpret())[2][(b * t, triton.cdiv(heads, block_h))](
            x, cos, sin, out, t, heads, *sx, cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1), *so,
            HALF=half, BLOCK_H=block_h, BF16=x.dtype == torch.bfloat16,
            num_warps=4)
    return out


def mla_keys(k_nope: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """(B, S, H, nope) and the shared rotated key (B, S, rope) -> keys (B, S, H, nope + rope), one kernel
    (torch.cat of k_nope with pe expanded over the heads is a slow strided copy)."""
    b, s, h, nope = k_nope.shape
    rope_dim = pe.shape[-1]
    if pe.shape != (b, s, rope_dim) or k_nope.stride(-1) != 1 or pe.stride(-1) != 1:
        raise ValueError(f"mla_keys: k_nope {tuple(k_nope.shape)}, pe {tuple(pe.shape)}")
    k = torch.empty((b, s, h, nope + rope_dim), dtype=k_nope.dtype, device=k_nope.device)
    block_h = min(16, triton.next_power_of_2(h))
    if b * s:
        _kernels(interpret())[3][(b * s, triton.cdiv(h, block_h))](
            k_nope, pe, k, s, h, *k_nope.stride()[:3], pe.stride(0), pe.stride(1), *k.stride()[:3],
            NOPE=nope, ROPE=rope_dim, BLOCK_H=block_h, num_warps=4)
    return k


def silu_mul(gate_up: torch.Tensor, weight: torch.Tensor | None = None, quant: bool = False,
             ue8m0: bool = False, pad4: bool = False):
    """gate_up (M, 2I) = (gate | up) -> silu(gate) * up (* weight[:, None]) (M, I) in gate_up's dtype, as
    torch computes it op by op; quant: instead (q, s) of that product quantized as
    spmd.kernels.fp8.quantize_act(product, ue8m0, pad4) does (I a multiple of 128). One kernel, one read."""
    m, i2 = gate_up.shape
    i = i2 // 2
    if i2 % 2 or gate_up.stride(-1) != 1 or (weight is not None and weight.shape != (m,)) \
            or (quant and i % 128):
        raise ValueError(f"silu_mul: gate_up {tuple(gate_up.shape)}, weight "
                         f"{None if weight is None else tuple(weight.shape)}, quant {quant}")
    bm, bk = 32, 128
    interp = interpret()
    dummy = gate_up
    if quant:
        q, s = fp8.act_buffers(m, i, gate_up.device, pad4)
        o, strides = dummy, (0, q.stride(0), s.stride(0), s.stride(1))
    else:
        o = torch.empty((m, i), dtype=gate_up.dtype, device=gate_up.device)
        q, s, strides = dummy, dummy, (o.stride(0), 0, 0, 0)
    if m:
        _kernels(interp)[4][(triton.cdiv(m, bm), triton.cdiv(i, bk))](
            gate_up, dummy if weight is None else weight, o, q, s, m, i, gate_up.stride(0), *strides,
            BLOCK_M=bm, BLOCK_K=bk, HAS_W=weight is not None, QUANT=quant, UE8M0=ue8m0, EXACT_DIV=not interp,
            num_warps=4)
    if quant:
        return fp8.finish_act(q), s
    return o


def gather_sum(h: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
    """h (R, D), idx (N * k,) rows of h -> (N, D): out[i] = sum_j h[idx[i * k + j]] (float32 sum, one
    rounding), what h.index_select(0, idx).view(N, k, D).sum(1) gives without its (N * k, D) copy."""
    r, d = h.shape
    if idx.dim() != 1 or idx.numel() % k or h.stride(-1) != 1:
        raise ValueError(f"gather_sum: h {tuple(h.shape)}, idx {tuple(idx.shape)}, k {k}")
    n = idx.numel() // k
    out = torch.empty((n, d), dtype=h.dtype, device=h.device)
    block = min(1024, triton.next_power_of_2(max(d, 1)))
    if n and d:
        _kernels(interpret())[5][(n, triton.cdiv(d, block))](h, idx, out, d, h.stride(0), out.stride(0), K=k,
                                                               BLOCK=block, num_warps=4)
    return out
