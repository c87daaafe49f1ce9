"""Weight-only FP8 GEMMs (w8a16) for DeepSeek-V3's block-scaled FP8 weights, in Triton.

Format (the Hugging Face DeepSeek-V3 checkpoint): a linear weight ``w`` is (N, K) ``torch.float8_e4m3fn``
with ``scale_inv`` (ceil(N/128), ceil(K/128)) float32, one scale per 128x128 block; the real weight is
``W[n, k] = float(w[n, k]) * scale_inv[n // 128, k // 128]``. Stacked routed experts are (E, N, K) with
(E, ceil(N/128), ceil(K/128)) scales.

What the kernels compute
- ``fp8_linear(x, w, scale_inv)``: ``x @ W.T`` for x (..., K) in bf16 (fp16, fp32 too), out (..., N) in
  x.dtype, i.e. ``F.linear(x, dequantize(w, scale_inv, x.dtype))`` without materialising W.
- ``fp8_grouped_mm(x, w, scale_inv, offs)``: the FP8 counterpart of
  ``torch._grouped_mm(x, W.transpose(1, 2), offs=offs)`` as MoE._routed_grouped uses it: x (R, K) rows
  sorted by expert, offs (E,) int32 cumulative END rows (expert e owns rows offs[e-1] .. offs[e]-1, offs
  non-decreasing, offs[-1] <= R). Rows >= offs[-1] belong to no expert: their output is written as ZEROS
  (torch._grouped_mm leaves them undefined). Every output element is written, so the output is
  allocated with torch.empty.

Numerics: the weight tile is loaded as FP8 and converted to x's dtype in registers (FP8 e4m3 values are
exact in bf16/fp16/fp32); each 128-wide K tile gives an fp32 partial product ``x_tile @ w_tile.T`` that
is multiplied by its block's scale (one scalar per (128-row n-block, 128-col k-block): BLOCK_K = 128 and
BLOCK_N divides 128) and added to an fp32 accumulator; the result is rounded once to x.dtype. So the
output equals the dequantized path (x @ dequantize(w).T with fp32 accumulation) up to summation order
and the single rounding of the scale product. fp32 x uses "tf32x3" dots (three TF32 passes, ~fp32
accurate on tensor cores; the FP8 operand is exact in TF32); fp32 x is a check path, not a tuned one.

Why weight-only: decode is memory-bound (M = 1..64 rows against 100s of MB of weights per step), so
the win is reading half the bytes of bf16 weights and keeping twice as many in GPU memory; the
activations stay bf16 (no activation quantization, no per-token scales), so results match the bf16
dequantized model up to summation order.

Tiling (``_linear_plan``, ``_grouped_plan``, ``_config``; pure functions of the shapes, no autotuning):
- BLOCK_K = 128 always (one k-block of scale per K step), BLOCK_N in {32, 64, 128} (one n-block).
- fp8_linear: BLOCK_M = 16 for M <= 16 (decode: a GEMV padded to the smallest tl.dot tile), 32 for
  M <= 32, 64 for M <= 64, else 128; BLOCK_N the widest that still gives ~2 programs per SM (at most
  64 while M <= 64). Split-K when M <= 64 and the tiles are fewer than the SMs (e.g. kv_a_proj at
  decode, N = 576): fp32 partials (splits, M, N) summed afterwards in a fixed order (deterministic,
  no atomics), each split >= 2 k-blocks.
- fp8_grouped_mm: BLOCK_M from the average rows per expert R / E (16, 32, then 64 at most: experts'
  row counts are uneven) and BLOCK_N = 32 / 64 / 128 with it; grid (cdiv(N, BLOCK_N), E), or
  (cdiv(N, BLOCK_N), R) when there are far fewer rows than experts and the caller passes each row's expert
  (a program per expert's first row: at decode most experts are empty, and their programs cost time).
- Options: 4 warps (8 for tiles of >= 64 x 128), 4 pipeline stages (3 for BLOCK_M = 128). Checked by
  compiling for sm_90 with Triton 3.6/3.7 (no GPU needed): the K loops are software-pipelined (cp.async),
  no register spills for 16-bit x, shared memory <= 160 KB.

Graph capture: no host synchronisation anywhere on the Triton path (no .item(), no .tolist(), no
tensors made from host data per call, no triton.autotune: the tile configuration is a pure function of
the shapes and the device's SM count, both host-side). The grouped kernel reads its expert's row range
from ``offs`` on the device and loops over it with dynamic bounds, so an expert with no rows reads no
weight bytes (decode at batch 1 touches 8 of 256 experts). After one warm-up call per shape (Triton
compiles on first launch), both functions can be captured in a CUDA graph.

Triton is imported lazily: ``import spmd.kernels.fp8`` works without it, and the torch fallbacks (dequantize
then matmul; the grouped one loops on the host and syncs) run where ``triton_available`` is False.
The kernels are wrapped with triton.jit at first use, per mode, so TRITON_INTERPRET=1 (Triton's CPU
interpreter, used by tests/unit/test_fp8.py) works whenever it is set before the first call, even after
triton was imported without it: the kernels call no triton.language @jit helpers (tl.zeros, tl.cdiv),
which are compiled-or-interpreted once at triton's import. Interpreter workarounds (Triton 3.6-3.8):
row loops with loaded bounds are `while` loops (its range() cannot take tensors with numpy 2.4), and
bf16 dots run in fp32 there (``UPCAST``: its tl.dot multiplies bf16's raw uint16 storage); its
fp32 -> bf16 conversion truncates where GPUs round to nearest (<= 1 bf16 ulp apart).
"""
from __future__ import annotations

import dataclasses
import functools
import os

import torch
import torch.nn.functional as F

from spmd.config import FP8_BLOCK  # DeepSeek-V3's weight quantization block (both dims)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_SUFFIX = ".weight_scale_inv"  # an FP8 weight's float32 (V3.1: power-of-two, UE8M0) block scales
# fp8_grouped_mm runs a program per row (not per expert) when given each row's expert and the experts
# number at least this many times the rows. Measured on H200 (256 experts, decode shapes): 8 rows
# 0.091 vs 0.111 ms (gate/up) and 0.047 vs 0.063 ms (down); 64 rows 4 % slower than per expert.
ROW_PROGRAMS = 8
# fp8_grouped_mm with 16-bit x launches a program per expert row tile (_grouped_tiles_kernel) from this
# many rows per expert on average (prefill), a program per expert below (decode: few rows per expert)
TILES16_ROWS = 64
# and FP8 x FP8 from this many (below, a program per expert: at 400 tokens, 12.5 rows per expert, gate+up
# 3.13 ms per expert vs 3.24 / 3.49 per row tile with cp.async / TMA on an H100)
TILES8_ROWS = 64
# and 128-row tiles on two warpgroups from this many (_w8a8_grouped_plan: measured better at 512 rows per
# expert, worse at 128; 256 is between the two, not measured)
W8A8_WIDE_ROWS = 256
# MODE.grouped "ws" (spmd.kernels.fp8_ws, 128-row tiles) from this many rows per expert, the TMA launch below:
# at 4,096 tokens (128 per expert) its 128 x 256 tiles took 3.61 / 2.25 ms for gate+up / down against the
# TMA launch's 3.79 / 2.55 with 64-row tiles (H100, 2026-12-07, docs/performance.md)
WS_ROWS = 128



@dataclasses.dataclass
class Mode:
    """How the kernels run: one setting per process, made by ``configure`` (the engine, from
    ``--fp8-weights`` / ``--fp8-prefill`` and the GPU's compute capability; tests and benchmarks directly).

    weights: "e4m3" loads the weight as float8_e4m3fn and converts it in hardware (sm_89+: Triton's
    fp8e4nv); "bytes" loads its raw bytes as uint8 and decodes them to fp16 by bit moves (sm_80: Ampere
    has no FP8 type; exact, e4m3 values are fp16 values times 2^8).
    w8a8_rows / w8a8_expert_rows: GEMMs with at least this many rows (grouped: rows per local expert on
    average) quantize their activations per row and 128-column group and run FP8 x FP8 on tensor cores
    (sm_89+, weights "e4m3" only); 0 = never (weight-only w8a16 everywhere). ue8m0: activation scales
    rounded up to powers of two, as the checkpoint's ``scale_fmt: ue8m0`` (V3.1) does for its weights.
    dense: the dense w8a8 GEMM, "triton" (this module's kernel) or "scaled_mm" (torch._scaled_mm with
    1x128 x 128x128 block scales, where the torch build has it)."""

    weights: str = "e4m3"
    w8a8_rows: int = 0
    w8a8_expert_rows: int = 0
    ue8m0: bool = False
    dense: str = "triton"
    tiles: tuple | None = None  # (BLOCK_M, BLOCK_N, warps, stages) for every w8a8 launch: benchmark sweeps
    # FP8 x FP8 grouped launch: a program per (column tile, expert row tile), its operands loaded by the
    # TMA unit ("tma", sm_90+) or by cp.async ("tiles"), or a program per (column tile, expert) ("experts");
    # "ws": spmd.kernels.fp8_ws, the same tiles in a warp-specialized persistent Gluon kernel (sm_90 GPUs:
    # Hopper's wgmma, from WS_ROWS rows per expert or with MODE.tiles set; "tma" elsewhere: fewer
    # rows, other GPUs, Triton's CPU interpreter, a Triton without Gluon's Hopper API)
    grouped: str = "tiles"
    # the "ws" launch's tile columns: 128 or 256 (two weight-scale blocks per tile; spmd.kernels.fp8_ws)
    ws_columns: int = 256
    # row tiles per group in the row-tile launches' program order (_tile): 1 = column tiles vary fastest
    group_m: int = 8
    # the TMA launch's k loop (_w8a8_tma_kernel): "inline" (each block's scales applied right after its
    # wgmma), "defer" (one block later, overlapping the next wgmma), "ws" / "defer-ws" (the same with
    # Triton's warp specialization)
    tma_loop: str = "inline"
    # activations quantized once for several FP8 x FP8 GEMMs, or by the kernel that makes them (Quantized):
    # the MoE input for the shared and the routed experts, silu * up for the dense and shared down
    # projections (spmd.model.moe); False: quantize_act before each GEMM
    fused_quant: bool = True


MODE = Mode()
TMA_LOOPS = ("inline", "defer", "ws", "defer-ws")
GROUPED_LAUNCHES = ("tma", "tiles", "experts", "ws")


def configure(**changes) -> Mode:
    """Set fields of MODE (checked); returns the previous settings (``configure(**vars(old))`` restores)."""
    old = dataclasses.replace(MODE)
    new = dataclasses.replace(MODE, **changes)
    if new.weights not in ("e4m3", "bytes") or new.dense not in ("triton", "scaled_mm") \
            or new.grouped not in GROUPED_LAUNCHES:
        raise ValueError(f"fp8 mode: weights {new.weights!r} (e4m3|bytes), dense {new.dense!r} (triton|scaled_mm), "
                         f"grouped {new.grouped!r} ({'|'.join(GROUPED_LAUNCHES)})")
    if min(new.w8a8_rows, new.w8a8_expert_rows) < 0:
        raise ValueError("fp8 mode: w8a8 row thresholds must be >= 0")
    if new.ws_columns not in (128, 256):
        raise ValueError(f"fp8 mode: ws_columns {new.ws_columns!r} (128|256)")
    if new.group_m < 1:
        raise ValueError("fp8 mode: group_m must be >= 1")
    if new.tma_loop not in TMA_LOOPS:
        raise ValueError(f"fp8 mode: tma_loop {new.tma_loop!r} ({'|'.join(TMA_LOOPS)})")
    for f in dataclasses.fields(Mode):
        setattr(MODE, f.name, getattr(new, f.name))
    return old


try:  # kernels below are plain functions until _kernels() wraps them with triton.jit
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = tl = None

from spmd.kernels.tile_order import tile as _tile  # noqa: E402  (the row-tile launches' program order)


def triton_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run for tensors on `device` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if triton is None:
        return False
    device = torch.device(device)
    return device.type == "cuda" or interpret()


def interpret() -> bool:
    """Whether Triton runs under its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def scale_name(weight_name: str) -> str:
    """The checkpoint name of an FP8 weight's block scales."""
    return weight_name.removesuffix(".weight") + SCALE_SUFFIX


def dequantize(w: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
               offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """FP8 (..., N, K) and block scales (..., ceil(N/128), ceil(K/128)) -> W in `dtype` (2-D or stacked 3-D).

    The one dequantization of the project (loader, cast tool, generator, fallbacks). offset: a slice of a
    weight, (row, col) of its first element inside the 128-blocks that `scale_inv` covers."""
    n, k = w.shape[-2:]
    r, c = offset
    s = scale_inv.to(device=w.device, dtype=torch.float32)
    s = s.repeat_interleave(FP8_BLOCK, -2).repeat_interleave(FP8_BLOCK, -1)[..., r:r + n, c:c + k]
    return (w.to(torch.float32) * s).to(dtype)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> float8_e4m3fn (out, in) and float32 scales (ceil(out/128), ceil(in/128)), powers of
    two (UE8M0: each block's amax / 448 rounded up, so no block saturates). `dequantize` inverts it exactly
    where w came from such a checkpoint (synthetic checkpoints; MLA.pack's FP8 copy of kv_b_proj)."""
    out, inp = w.shape
    bo, bi = _cdiv128(out), _cdiv128(inp)
    blocks = F.pad(w.float(), (0, bi * FP8_BLOCK - inp, 0, bo * FP8_BLOCK - out)).view(bo, FP8_BLOCK, bi, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))  # (bo, bi)
    scale = torch.exp2(torch.ceil(torch.log2((amax / FP8_MAX).clamp(min=2.0**-126))))
    q = (blocks / scale[:, None, :, None]).reshape(bo * FP8_BLOCK, bi * FP8_BLOCK)[:out, :inp]
    return q.to(torch.float8_e4m3fn).contiguous(), scale


# ---------------------------------------------------------------- kernels (wrapped by triton.jit lazily)

def _k_step(acc, a, b, s, xs_ptrs, m_mask, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
            A_FP8: tl.constexpr, W_BYTES: tl.constexpr):
    """acc + (a @ b) * scale for one 128-wide k-block of the kernels: s the weight block's scale (a scalar,
    or (1, BLOCK_N) per column); W_BYTES: b holds e4m3 bytes, decoded to fp16 by bit moves (exact, times
    2^-8; the 256 goes into the scale); A_FP8: a is FP8 with its rows' scales at xs_ptrs (FP8 x FP8 on
    tensor cores), else 16-bit and b is converted to its type."""
    if W_BYTES:
        u = b.to(tl.uint16)
        b = (((u & 0x80) << 8) | ((u & 0x7F) << 7)).to(tl.uint16).to(tl.float16, bitcast=True)
        s = s * 256.0
    if A_FP8:
        s = tl.load(xs_ptrs, mask=m_mask, other=0.0)[:, None] * s
    if UPCAST:  # Triton's CPU interpreter: its tl.dot multiplies bf16's raw uint16 bits, has no fp8
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee") * s
    elif A_FP8:
        acc += tl.dot(a, b) * s
    else:
        acc += tl.dot(a, b.to(a.dtype), input_precision=PRECISION) * s
    return acc


_k_step_fn = None  # _k_step, jitted by _kernels (as _max_combine)


def _fp8_linear_kernel(x_ptr, xs_ptr, w_ptr, s_ptr, o_ptr, M, N, K,
                       stride_xm, stride_xk, stride_xsm, stride_xsk, stride_wn, stride_wk, stride_sn, stride_sk,
                       stride_os, stride_om, stride_on,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SPLIT_TILES: tl.constexpr, SCALE_BLOCK: tl.constexpr, PRECISION: tl.constexpr,
                       UPCAST: tl.constexpr, A_FP8: tl.constexpr, W_BYTES: tl.constexpr):
    """o[s, m, n] = sum over this split's k-blocks kb of scale[n // 128, kb] * sum_{k in kb} x[m, k] * w[n, k].

    Program (i, j, s): the (BLOCK_M, BLOCK_N) tile (i, j), k-blocks s*SPLIT_TILES .. (s+1)*SPLIT_TILES-1
    (the last split's blocks past K are masked off). One split: o is the output in x.dtype; several: o is
    an fp32 (split, M, N) workspace that the host side sums. A_FP8: x is FP8 with a float32 scale per row
    and k-block (xs), the dot runs FP8 x FP8. W_BYTES: w holds the e4m3 bytes as uint8 (sm_80: no fp8 type)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    k0 = pid_k * SPLIT_TILES  # first k-block of this program
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + (k0 * BLOCK_K + rk)[None, :] * stride_xk  # (BM, BK)
    w_ptrs = w_ptr + rn.to(tl.int64)[None, :] * stride_wn + (k0 * BLOCK_K + rk)[:, None] * stride_wk  # (BK, BN)
    s_ptrs = s_ptr + ((pid_n * BLOCK_N) // SCALE_BLOCK) * stride_sn  # BLOCK_N | 128: one n-block per tile
    xs_ptrs = xs_ptr + rm.to(tl.int64) * stride_xsm
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for i in range(0, SPLIT_TILES):  # constexpr trip count: a software-pipelined loop on GPUs
        kb = k0 + i
        k_mask = rk < K - kb * BLOCK_K
        a = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        s = tl.load(s_ptrs + kb * stride_sk, mask=kb * BLOCK_K < K, other=0.0)  # BLOCK_K == 128: one k-block
        acc = _k_step_fn(acc, a, b, s, xs_ptrs + kb * stride_xsk, m_mask, PRECISION, UPCAST, A_FP8, W_BYTES)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    o_ptrs = o_ptr + pid_k * stride_os + rm.to(tl.int64)[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _fp8_grouped_kernel(x_ptr, xs_ptr, w_ptr, s_ptr, offs_ptr, rexp_ptr, o_ptr, R, N, K, E,
                        stride_xm, stride_xk, stride_xsm, stride_xsk, stride_we, stride_wn, stride_wk,
                        stride_se, stride_sn, stride_sk, stride_om, stride_on,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        K_TILES: tl.constexpr, SCALE_BLOCK: tl.constexpr, PRECISION: tl.constexpr,
                        UPCAST: tl.constexpr, ROWS: tl.constexpr, A_FP8: tl.constexpr, W_BYTES: tl.constexpr):
    """Program (j, e): rows offs[e-1]..offs[e]-1 of x against expert e's columns j*BLOCK_N..; then its share
    of zeroing the rows past offs[E-1]. Column tiles are the fastest grid axis, so the programs of one
    expert run at the same time and read its rows from L2, not once per column tile from HBM.

    ROWS (fewer rows than experts, e.g. decode): program (j, i) is row i's. It runs the expert of row i,
    rexp[i], iff row i is that expert's first row, and zeroes row i if it belongs to no expert (rexp[i]
    >= E). So R programs per column block, not E, of which most would find their expert empty."""
    pid_n = tl.program_id(0)  # column tiles vary fastest: one expert's tiles run together, its rows stay in L2
    total = tl.minimum(tl.maximum(tl.load(offs_ptr + E - 1), 0), R)
    if ROWS:
        row = tl.program_id(1)
        e = tl.load(rexp_ptr + row).to(tl.int32)
        prev = tl.load(rexp_ptr + row - 1, mask=row > 0, other=-1).to(tl.int32)
        owner = tl.minimum(e, E - 1)  # rows of no expert (e >= E) run nothing: end = start below
        end = tl.minimum(tl.load(offs_ptr + owner), R)
        start = tl.load(offs_ptr + owner - 1, mask=owner > 0, other=0)
        end = tl.where((e < E) & (e != prev), end, start)
        z0 = tl.where(e >= E, row, R)  # this row's zeros, if it has no expert
        z1 = tl.minimum(z0 + 1, R)
        z_step = R
    else:
        e = tl.program_id(1)
        end = tl.minimum(tl.load(offs_ptr + e), R)
        start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
        z0 = total + e * BLOCK_M  # the chunks dealt round-robin over the E programs
        z1 = R
        z_step = E * BLOCK_M
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    w_base = w_ptr + e.to(tl.int64) * stride_we + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None] * stride_wk
    s_base = s_ptr + e.to(tl.int64) * stride_se + ((pid_n * BLOCK_N) // SCALE_BLOCK) * stride_sn
    # an empty expert (start >= end) runs no iteration and reads no weight byte. `while`, not range():
    # the bounds are loaded values, and Triton's interpreter (3.6) cannot take tensors as range() bounds
    m0 = start
    while m0 < end:
        rm = m0 + tl.arange(0, BLOCK_M)
        m_mask = rm < end
        x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :] * stride_xk
        xs_ptrs = xs_ptr + rm.to(tl.int64) * stride_xsm
        w_ptrs = w_base
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
        for kb in range(0, K_TILES):  # constexpr trip count: a pipelined loop
            k_mask = rk < K - kb * BLOCK_K
            a = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            s = tl.load(s_base + kb * stride_sk)
            acc = _k_step_fn(acc, a, b, s, xs_ptrs + kb * stride_xsk, m_mask, PRECISION, UPCAST, A_FP8, W_BYTES)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        o_ptrs = o_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :] * stride_on
        tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
        m0 += BLOCK_M
    # rows past offs[E-1] belong to no expert: zeros
    zero = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=o_ptr.dtype.element_ty)
    m0 = z0
    while m0 < z1:
        rm = m0 + tl.arange(0, BLOCK_M)
        o_ptrs = o_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :] * stride_on
        tl.store(o_ptrs, zero, mask=(rm < z1)[:, None] & n_mask[None, :])
        m0 += z_step


def _zero_tail(o_ptr, offs_ptr, z, chunks, R, E, rn, n_mask, stride_om, stride_on,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row chunk z of `chunks` (the launch's programs past its tiles, per column tile): its share of the
    rows past offs[E-1] (no expert), zeros, in BLOCK_M chunks dealt round-robin."""
    zero = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=o_ptr.dtype.element_ty)
    m0 = tl.minimum(tl.maximum(tl.load(offs_ptr + E - 1), 0), R) + z * BLOCK_M
    step = chunks * BLOCK_M
    while m0 < R:
        rm = m0 + tl.arange(0, BLOCK_M)
        o_ptrs = o_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :] * stride_on
        tl.store(o_ptrs, zero, mask=(rm < R)[:, None] & n_mask[None, :])
        m0 += step


_tile_fn = _zero_tail_fn = None  # _tile, _zero_tail jitted by _kernels (as _max_combine)


def _ab_scale(xs_ptrs, s_e, pid_n, rn, n_mask, m_mask, kb, stride_xsk, stride_sn, stride_sk,
              BLOCK_N: tl.constexpr, SCALE_BLOCK: tl.constexpr):
    """The scale of k-block kb's product in a TMA tile: the rows' activation scales times the weight's
    block scale, (BLOCK_M, 1) where BLOCK_N is one 128-column block (a scalar weight scale: one multiply
    per product element), else (BLOCK_M, BLOCK_N) from per-column weight scales."""
    xs = tl.load(xs_ptrs + kb * stride_xsk, mask=m_mask, other=0.0)
    if BLOCK_N == SCALE_BLOCK:
        return (xs * tl.load(s_e + pid_n * stride_sn + kb * stride_sk))[:, None]
    else:
        ws = tl.load(s_e + (rn // SCALE_BLOCK) * stride_sn + kb * stride_sk, mask=n_mask, other=0.0)
        return xs[:, None] * ws[None, :]


_ab_scale_fn = None  # _ab_scale, jitted by _kernels (as _max_combine)


def _w8a8_tma_kernel(x_desc, xs_ptr, w_desc, s_ptr, offs_ptr, tend_ptr, o_ptr, R, N, K, E,
                     stride_xsm, stride_xsk, stride_se, stride_sn, stride_sk, stride_om, stride_on,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     K_TILES: tl.constexpr, SCALE_BLOCK: tl.constexpr, SEARCH: tl.constexpr,
                     GROUP_M: tl.constexpr, DEFER: tl.constexpr, WS: tl.constexpr):
    """_grouped_tiles_kernel's FP8 x FP8 with the operand tiles loaded by the Hopper TMA unit (host tensor descriptors:
    x (R, K) in (BLOCK_M, 128) blocks, the experts' weights as one (E * N, K) matrix in (BLOCK_N, 128)
    blocks). A tile's rows past its expert's end (another expert's rows, or zeros past R) and columns
    past N (the next expert's) are loaded and computed but never stored; K past the end reads zeros.
    The k loop (MODE.tma_loop): each 128-deep block's product is scaled by its activation and weight
    scales and added to the float32 accumulator right after its wgmma (DEFER 0), or one block later,
    after the next block's wgmma is issued (DEFER 1: the promotion on CUDA cores can overlap the tensor
    cores' next product, DeepGEMM's idea, at the cost of a second accumulator tile in registers); WS:
    Triton's warp specialization of the loop (a producer warp loading by TMA for the math warps)."""
    p = tl.program_id(0)
    nt = (N + BLOCK_N - 1) // BLOCK_N
    ntiles = tl.load(tend_ptr + E - 1)
    if p < ntiles * nt:
        e, m0, end, pid_n = _tile_fn(p, nt, tend_ptr, offs_ptr, R, E, BLOCK_M, SEARCH, GROUP_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        rm = m0 + tl.arange(0, BLOCK_M)
        m_mask = rm < end
        xs_ptrs = xs_ptr + rm.to(tl.int64) * stride_xsm
        wrow = e * N + pid_n * BLOCK_N
        s_e = s_ptr + e.to(tl.int64) * stride_se
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
        if DEFER:
            prev = tl.dot(x_desc.load([m0, 0]), w_desc.load([wrow, 0]).T)
            sc = _ab_scale_fn(xs_ptrs, s_e, pid_n, rn, n_mask, m_mask, 0, stride_xsk, stride_sn, stride_sk,
                              BLOCK_N, SCALE_BLOCK)
            for kb in tl.range(1, K_TILES, warp_specialize=WS):
                cur = tl.dot(x_desc.load([m0, kb * BLOCK_K]), w_desc.load([wrow, kb * BLOCK_K]).T)
                acc += prev * sc
                sc = _ab_scale_fn(xs_ptrs, s_e, pid_n, rn, n_mask, m_mask, kb, stride_xsk, stride_sn, stride_sk,
                                  BLOCK_N, SCALE_BLOCK)
                prev = cur
            acc += prev * sc
        else:
            for kb in tl.range(0, K_TILES, warp_specialize=WS):
                a = x_desc.load([m0, kb * BLOCK_K])
                b = w_desc.load([wrow, kb * BLOCK_K])
                acc += tl.dot(a, b.T) * _ab_scale_fn(xs_ptrs, s_e, pid_n, rn, n_mask, m_mask, kb, stride_xsk,
                                                     stride_sn, stride_sk, BLOCK_N, SCALE_BLOCK)
        o_ptrs = o_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :] * stride_on
        tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
    else:
        z = p - ntiles * nt
        rn = (z % nt) * BLOCK_N + tl.arange(0, BLOCK_N)
        _zero_tail_fn(o_ptr, offs_ptr, z // nt, tl.num_programs(0) // nt - ntiles, R, E, rn, rn < N,
                      stride_om, stride_on, BLOCK_M, BLOCK_N)


def _grouped_tiles_kernel(x_ptr, xs_ptr, w_ptr, s_ptr, offs_ptr, tend_ptr, o_ptr, R, N, K, E,
                          stride_xm, stride_xk, stride_xsm, stride_xsk, stride_we, stride_wn, stride_wk,
                          stride_se, stride_sn, stride_sk, stride_om, stride_on,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          K_TILES: tl.constexpr, SCALE_BLOCK: tl.constexpr, SEARCH: tl.constexpr,
                          GROUP_M: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                          A_FP8: tl.constexpr, W_BYTES: tl.constexpr):
    """Grouped GEMM with one program per (column tile j, row tile t) of the experts' row tiles.

    tend (E,) int32: the cumulative count of BLOCK_M-row tiles per expert (tend[e] - tend[e-1] =
    ceil(rows of e / BLOCK_M)). Program (j, t < tend[E-1]) finds its expert e by binary search (SEARCH
    = ceil(log2 E) steps) and computes rows offs[e-1] + (t - tend[e-1]) * BLOCK_M .. of it; programs t >=
    tend[E-1] zero the rows past offs[E-1]. So every program has one tile: the GPU's block scheduler
    balances experts of uneven size, where _fp8_grouped_kernel's program per expert walks all of its
    expert's row tiles in turn. The launch is one-dimensional, in _tile's order: an expert's programs
    together, row tiles fastest inside groups of GROUP_M, so the weight's column tiles are read once
    from HBM for a group of row tiles. A weight scale is a scalar where BLOCK_N is one 128-column block,
    else loaded per column.
    A_FP8: FP8 x FP8 with x's scales per row and k-block; else x is 16-bit and the weight tile is
    converted (W_BYTES: decoded from its bytes, as in _fp8_linear_kernel)."""
    p = tl.program_id(0)
    nt = (N + BLOCK_N - 1) // BLOCK_N
    ntiles = tl.load(tend_ptr + E - 1)
    rk = tl.arange(0, BLOCK_K)
    if p < ntiles * nt:
        e, m0, end, pid_n = _tile_fn(p, nt, tend_ptr, offs_ptr, R, E, BLOCK_M, SEARCH, GROUP_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        rm = m0 + tl.arange(0, BLOCK_M)
        m_mask = rm < end
        x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :] * stride_xk
        xs_ptrs = xs_ptr + rm.to(tl.int64) * stride_xsm
        w_ptrs = w_ptr + e.to(tl.int64) * stride_we + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None] * stride_wk
        s_ptrs = s_ptr + e.to(tl.int64) * stride_se + (rn // SCALE_BLOCK) * stride_sn
        s_one = s_ptr + e.to(tl.int64) * stride_se + pid_n * stride_sn
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
        for kb in range(0, K_TILES):  # constexpr trip count: a pipelined loop
            k_mask = rk < K - kb * BLOCK_K
            a = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if BLOCK_N == SCALE_BLOCK:  # one weight block: its scale is a scalar
                s = tl.load(s_one + kb * stride_sk)
            else:
                s = tl.load(s_ptrs + kb * stride_sk, mask=n_mask, other=0.0)[None, :]
            acc = _k_step_fn(acc, a, b, s, xs_ptrs + kb * stride_xsk, m_mask, PRECISION, UPCAST, A_FP8, W_BYTES)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        o_ptrs = o_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :] * stride_on
        tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
    else:
        z = p - ntiles * nt
        rn = (z % nt) * BLOCK_N + tl.arange(0, BLOCK_N)
        _zero_tail_fn(o_ptr, offs_ptr, z // nt, tl.num_programs(0) // nt - ntiles, R, E, rn, rn < N,
                      stride_om, stride_on, BLOCK_M, BLOCK_N)


def _quant_block(x, UE8M0: tl.constexpr, EXACT_DIV: tl.constexpr):
    """fp32 x (rows, 128) -> (q, s): s = max|x| per row / 448 (1e-10 / 448 at least; rounded up to a power
    of two if UE8M0), q = x / s saturated at +-448 (fp32, for the caller's e4m3 store)."""
    # tl.reduce with this module's combine function: tl.max is a triton.language @jit helper, fixed to one
    # mode at triton's import (see the module's docstring), _max_combine is wrapped by _kernels per mode
    amax = tl.maximum(tl.reduce(tl.abs(x), 1, _max_combine), 1e-10)
    if EXACT_DIV:  # IEEE division, as torch's (Triton's `/` is the approximate one on GPUs)
        scale = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
    else:  # the interpreter's `/` is numpy's, exact
        scale = amax / 448.0
    if UE8M0:  # the next power of two up: exponent + 1 unless the mantissa is 0 (scales are normal, > 0)
        scale = ((scale.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    if EXACT_DIV:
        q = tl.math.div_rn(x, scale[:, None])
    else:
        q = x / scale[:, None]
    return tl.minimum(tl.maximum(q, -448.0), 448.0), scale


_quant_block_fn = None  # _quant_block, jitted by _kernels (as _max_combine); spmd.kernels.fused uses it too


def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_xk, stride_qm, stride_sm, stride_sk,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, UE8M0: tl.constexpr,
                     EXACT_DIV: tl.constexpr):
    """Program (i, kb): rows i*BLOCK_M.. of x, columns kb*128..: q = x / s in e4m3 (saturated at 448) and
    s[m, kb] = max|x[m, kb-block]| / 448 (float32; 1e-10 at least), rounded up to a power of two if UE8M0.
    Under TRITON_INTERPRET q_ptr is float32 and the host converts (its fp32 -> e4m3 conversion misrounds:
    Triton 3.7.1 turned 124.33 into 64)."""
    pid_m = tl.program_id(0)
    kb = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rm < M)[:, None] & (rk < K)[None, :]
    x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :] * stride_xk, mask=mask,
                other=0.0).to(tl.float32)
    q, scale = _quant_block_fn(x, UE8M0, EXACT_DIV)
    tl.store(q_ptr + rm.to(tl.int64)[:, None] * stride_qm + rk[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rm.to(tl.int64) * stride_sm + kb * stride_sk, scale, mask=rm < M)


def _max(a, b):
    return tl.maximum(a, b)


_max_combine = None  # _max, jitted by _kernels for the mode in use (the kernels look it up at compile time)


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool):
    """(linear, grouped, act_quant) jitted for the mode at first use (the interpreter is chosen when
    triton.jit runs)."""
    del interpret  # the cache key: triton.jit reads TRITON_INTERPRET itself
    global _max_combine, _tile_fn, _zero_tail_fn, _k_step_fn, _quant_block_fn, _ab_scale_fn
    _max_combine, _tile_fn, _zero_tail_fn = triton.jit(_max), triton.jit(_tile), triton.jit(_zero_tail)
    _ab_scale_fn = triton.jit(_ab_scale)
    _k_step_fn, _quant_block_fn = triton.jit(_k_step), triton.jit(_quant_block)
    return (triton.jit(_fp8_linear_kernel), triton.jit(_fp8_grouped_kernel), triton.jit(_act_quant_kernel),
            (triton.jit(_grouped_tiles_kernel), triton.jit(_w8a8_tma_kernel)))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # only shapes the tiles under the interpreter
    return torch.cuda.get_device_properties(device).multi_processor_count


def _block_m(rows: int) -> int:
    """16 for decode (<= 16 rows: a GEMV padded to the smallest tl.dot tile), then 32, 64, 128."""
    return 16 if rows <= 16 else 32 if rows <= 32 else 64 if rows <= 64 else 128


def _block_n(tiles_m: int, n: int, block_m: int, sms: int) -> int:
    """Widest of 128/64/32 (each divides 128: one scale per tile) that still gives ~2 programs per SM;
    small M caps at 64 (memory-bound: parallel weight streams beat wide tiles)."""
    cap = 64 if block_m <= 64 else 128
    for bn in (128, 64):
        if bn <= cap and tiles_m * triton.cdiv(n, bn) >= 2 * sms:
            return bn
    return 32


def _linear_plan(m: int, n: int, k: int, sms: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, splits, k-blocks per split) for fp8_linear: a pure function of shapes and SMs.

    Split-K only for small M whose tiles cannot fill the GPU (e.g. decode through kv_a_proj, N = 576:
    18 tiles of 32 columns for 132 SMs): up to ~2 programs per SM, each with >= 2 k-blocks."""
    if dtype == torch.float32:  # fp32 activations (a check path on GPUs): small tiles, or registers spill
        bm, bn = 16, 32
    else:
        bm = _block_m(m)
        bn = _block_n(triton.cdiv(m, bm), n, bm, sms)
    k_tiles = triton.cdiv(k, FP8_BLOCK)
    programs = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = 1
    if bm <= 64 and programs < sms and k_tiles >= 4:
        split = min(triton.cdiv(2 * sms, programs), k_tiles // 2)
    per = triton.cdiv(k_tiles, split)
    return bm, bn, triton.cdiv(k_tiles, per), per


def _grouped_plan(r: int, e: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for fp8_grouped_mm from the average rows per expert (static: R / E).

    Decode (a few rows per hit expert): 16 x 32, many narrow weight streams per expert. BLOCK_M stops at
    64: experts' row counts are uneven, which bounds the padding of each expert's last chunk."""
    if dtype == torch.float32:
        return 16, 32
    bm = min(_block_m(triton.cdiv(r, e)), 64)
    return bm, {16: 32, 32: 64, 64: 128}[bm]


def _config(bm: int, bn: int, dtype: torch.dtype) -> dict:
    """Launch options, checked against sm_90 register and shared-memory use (no spills for 16-bit x)."""
    if dtype == torch.float32:
        return dict(num_warps=4, num_stages=3)
    return dict(num_warps=8 if bm * bn >= 64 * 128 else 4, num_stages=3 if bm >= 128 else 4)


def _precision(dtype: torch.dtype) -> str:
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"fp8 GEMM: activations must be bf16, fp16 or fp32, not {dtype}")
    # fp32 x: three TF32 passes (split operands), ~fp32 accurate on tensor cores, where "ieee" spills
    # registers; the FP8 operand is exact in TF32 anyway. The precision is ignored for 16-bit inputs.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    """Dot in fp32 instead of bf16: only under TRITON_INTERPRET, whose tl.dot runs np.matmul on bf16's
    uint16 storage (Triton 3.6-3.8). bf16 x fp8 products are exact in fp32 and the sum is fp32 either way,
    so this changes nothing but summation order; on GPUs the dot stays bf16 (tensor cores)."""
    return dtype == torch.bfloat16 and interpret()


def _check_scales(w: torch.Tensor, scale_inv: torch.Tensor) -> None:
    n, k = w.shape[-2:]
    want = (*w.shape[:-2], _cdiv128(n), _cdiv128(k))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"scale_inv {tuple(scale_inv.shape)} != {want} for weight {tuple(w.shape)}")
    if w.dtype != torch.float8_e4m3fn:
        raise TypeError(f"fp8 GEMM: weight must be float8_e4m3fn, not {w.dtype}")


def _cdiv128(n: int) -> int:
    return -(-n // FP8_BLOCK)


def act_buffers(m: int, k: int, device, pad4: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs for an activation quantization of (m, k): q (m, or m rounded up to 4 rows if pad4; e4m3,
    float32 under the interpreter: see finish_act) and s (the same rows, ceil(k/128)) float32 column-major
    (stride (1, m rounded up to 4)), the layout torch._scaled_mm takes. Pad rows are written here (q 0,
    s 1); the kernel writes the first m."""
    kb, mp = _cdiv128(k), -(-m // 4) * 4
    rows = mp if pad4 else m
    full = torch.empty((kb, mp), dtype=torch.float32, device=device)
    scales = full[:, :rows].T
    q = torch.empty((rows, k), dtype=torch.float32 if interpret() else torch.float8_e4m3fn, device=device)
    if rows > m:
        full[:, m:] = 1.0
        q[m:] = 0
    return q, scales


def finish_act(q: torch.Tensor) -> torch.Tensor:
    """act_buffers' q after the kernel: e4m3 (under the interpreter the kernels write float32 and this
    converts: its fp32 -> e4m3 conversion misrounds, see _act_quant_kernel)."""
    return q.to(torch.float8_e4m3fn)


def quantize_act(x: torch.Tensor, ue8m0: bool | None = None,
                 pad4: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) 16-bit -> (q (M, K) float8_e4m3fn, s (M, ceil(K/128)) float32), x ~= q * s per 128-column group.

    s = max|x| of the row's group / 448 (at least 1e-10 / 448), rounded up to a power of two if ue8m0
    (default MODE.ue8m0); q = x / s saturated to +-448. s is column-major (act_buffers); the kernels read
    any strides. One Triton kernel (reads x once), or the same arithmetic in torch where the kernels
    cannot run. pad4: both padded to M rounded up to 4 rows (zeros, scale 1): cuBLAS's block-scaled GEMM
    takes no other row count (traces/fp8_bench.py)."""
    ue8m0 = MODE.ue8m0 if ue8m0 is None else ue8m0
    m, k = x.shape
    q, scales = act_buffers(m, k, x.device, pad4)
    if not triton_available(x.device) or m == 0 or k == 0:
        q[:m], scales[:m] = _quantize_torch(x, ue8m0)
        return finish_act(q), scales
    _, _, quant, _ = _kernels(interpret())
    bm = 32
    quant[(triton.cdiv(m, bm), _cdiv128(k))](x, q, scales, m, k, x.stride(0), x.stride(1), q.stride(0),
                                             scales.stride(0), scales.stride(1), BLOCK_M=bm, BLOCK_K=FP8_BLOCK,
                                             UE8M0=ue8m0, EXACT_DIV=not interpret(), num_warps=4)
    return finish_act(q), scales


@dataclasses.dataclass(frozen=True)
class Quantized:
    """A 16-bit activation quantized once for the FP8 x FP8 GEMMs that read it (fp8_linear takes it for x):
    quantize_act's q and s with rows padded to 4 (pad4), the activation's shape and dtype (the outputs'),
    and the activation itself where a 16-bit consumer reads it too (the MoE router), else None. Made
    where several w8a8 GEMMs read one activation (the MoE input: the shared and the routed experts), and
    by spmd.kernels.fused.silu_mul for the down projection: one quantization pass, or none of its own."""
    q: torch.Tensor
    s: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    x: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.q.device

    def rows(self) -> int:
        return self.shape.numel() // self.shape[-1] if len(self.shape) else 0

    def tensor(self) -> torch.Tensor:
        """The 16-bit activation: kept, or q * s rounded to the dtype (a consumer off the w8a8 path)."""
        if self.x is not None:
            return self.x
        m = self.rows()
        return dequantize_act(self.q[:m], self.s[:m]).to(self.dtype).view(self.shape)


def gather_rows(q: torch.Tensor, scales: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_act's (q, s) at `rows` (MoE: each slot's token), s kept column-major: the kernels read one
    k-block's scales of BLOCK_M rows per step, contiguous this way (row-major, each is its own sector)."""
    return q[rows], scales.T[:, rows].T


def _quantize_torch(x: torch.Tensor, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_act's arithmetic in torch (also the tests' reference)."""
    m, k = x.shape
    kb = _cdiv128(k)
    xp = torch.nn.functional.pad(x.float(), (0, kb * FP8_BLOCK - k)).view(m, kb, FP8_BLOCK)
    s = xp.abs().amax(-1).clamp_min(1e-10) / 448.0
    if ue8m0:
        s = ((s.view(torch.int32) + 0x7FFFFF) & 0x7F800000).view(torch.float32)
    q = (xp / s[..., None]).clamp(-448.0, 448.0).view(m, kb * FP8_BLOCK)[:, :k].to(torch.float8_e4m3fn)
    return q, s


def dequantize_act(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """quantize_act's inverse in float32: q * s per 128-column group (the tests' reference)."""
    k = q.shape[-1]
    return q.float() * s.float().repeat_interleave(FP8_BLOCK, -1)[..., :k]


def w8a8_dense(rows: int, dtype: torch.dtype) -> bool:
    """Whether a dense FP8 GEMM of `rows` rows quantizes its activations (MODE.w8a8_rows)."""
    return (0 < MODE.w8a8_rows <= rows and MODE.weights == "e4m3"
            and dtype in (torch.bfloat16, torch.float16))


def w8a8_grouped(rows: int, experts: int, dtype: torch.dtype) -> bool:
    """Whether a grouped FP8 GEMM of `rows` rows over `experts` experts quantizes its activations."""
    return (0 < MODE.w8a8_expert_rows and rows >= MODE.w8a8_expert_rows * max(experts, 1)
            and MODE.weights == "e4m3" and dtype in (torch.bfloat16, torch.float16))


def _w8a8_plan(m: int, n: int, sms: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages) for the FP8 x FP8 kernels: 128 x 128 tiles (two warpgroups),
    64-row tiles for fewer rows or when 128-row tiles leave SMs idle; FP8 tiles are half bf16's bytes,
    so 4 stages fit (128 KB of shared memory at 128 x 128)."""
    if MODE.tiles is not None:
        return MODE.tiles
    bm = 64 if m <= 64 or triton.cdiv(m, 128) * triton.cdiv(n, 128) < sms else 128
    return bm, 128, 8 if bm == 128 else 4, 4


def _w8a8_grouped_plan(r: int, e: int, tma: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages) of the FP8 x FP8 grouped launches: with TMA loads 128 x 128 tiles
    on two warpgroups from W8A8_WIDE_ROWS rows per expert, else 64 x 128 on one. Measured on an H100 with
    the program order's row-tile groups (traces/results/fp8/NVIDIA_H100_80GB_HBM3-2026-12-07-*, 256
    experts, gate+up): TMA 9.57 vs 12.13 ms at 16,384 tokens (512 rows per expert), but 4.00 vs 3.79 at
    4,096 (128 per expert); down 5.87 vs 6.47 and 2.60 vs 2.29. cp.async loads (sm_89, or operands TMA
    cannot take) keep 64 x 128: 11.13 vs 11.40 ms at 16,384 tokens in the same call."""
    if MODE.tiles is not None:
        return MODE.tiles
    if not tma or r < W8A8_WIDE_ROWS * e:
        return 64, 128, 4, 4
    return 128, 128, 8, 4


def _weight_operand(w: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The weight as the kernels read it: float8_e4m3fn, or its bytes (uint8) in MODE "bytes"."""
    return (w.view(torch.uint8), True) if MODE.weights == "bytes" else (w, False)


_SCALED_MM_REFUSED: set = set()  # (M, N, K, dtype) torch._scaled_mm refused: not tried (and raised) again


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ W.T -> (..., N) in x.dtype, W = w (N, K) fp8 * scale_inv per 128x128 block; fp32 accumulate.

    Weight-only (x stays 16-bit) unless MODE says to quantize x for this many rows (w8a8_dense)."""
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"fp8_linear: x (..., {x.shape[-1]}) against weight {tuple(w.shape)}")
    _check_scales(w, scale_inv)
    lead = x.shape[:-1]
    m = lead.numel()
    pre = isinstance(x, Quantized)
    if pre and not (triton_available(x.device) and w8a8_dense(m, x.dtype) and m and n and k):
        x, pre = x.tensor(), False  # not an FP8 x FP8 GEMM here: the 16-bit activation
    prec = _precision(x.dtype)
    if not triton_available(x.device):
        return torch.nn.functional.linear(x.float(), dequantize(w, scale_inv, torch.float32)).to(x.dtype)
    x2 = None if pre else x.reshape(-1, k)
    if m == 0 or n == 0 or k == 0:
        return torch.zeros((*lead, n), dtype=x.dtype, device=x.device)
    linear, _, _, _ = _kernels(interpret())
    if w8a8_dense(m, x.dtype):
        key = (-(-m // 4) * 4, n, k, x.dtype)
        cublas = MODE.dense == "scaled_mm" and x.device.type == "cuda" and key not in _SCALED_MM_REFUSED
        # cuBLAS refuses a row count not a multiple of 4: padded (a Quantized x always is)
        xq, xs = (x.q, x.s) if pre else quantize_act(x2, pad4=cublas)
        if cublas:
            try:  # cuBLAS's block-scaled FP8 GEMM (sm_90): 1.5-2.5x the Triton kernel (traces/results/fp8/)
                out = torch._scaled_mm(xq, w.T, scale_a=xs, scale_b=scale_inv.T, out_dtype=x.dtype)
                return out[:m].view(*lead, n)
            except RuntimeError:  # a shape this torch build refuses: the Triton kernel, now and from now on
                _SCALED_MM_REFUSED.add(key)
            xq, xs = xq[:m], xs[:m]
        bm, bn, warps, stages = _w8a8_plan(m, n, _sm_count(x.device))
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        linear[(triton.cdiv(m, bm), triton.cdiv(n, bn), 1)](
            xq, xs, w, scale_inv, out, m, n, k,
            xq.stride(0), xq.stride(1), xs.stride(0), xs.stride(1), w.stride(0), w.stride(1),
            scale_inv.stride(0), scale_inv.stride(1), 0, out.stride(0), out.stride(1),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=FP8_BLOCK, SPLIT_TILES=_cdiv128(k), SCALE_BLOCK=FP8_BLOCK,
            PRECISION=prec, UPCAST=interpret(), A_FP8=True, W_BYTES=False, num_warps=warps, num_stages=stages)
        return out.view(*lead, n)
    bm, bn, split, per = _linear_plan(m, n, k, _sm_count(x.device), x.dtype)
    # one split: straight into the output; several: fp32 partials (split, M, N), summed in a fixed order
    # (deterministic, no atomics). Every element of `dst` is written by the kernel.
    dst = torch.empty((split, m, n) if split > 1 else (m, n), dtype=torch.float32 if split > 1 else x.dtype,
                      device=x.device)
    wk, wbytes = _weight_operand(w)
    linear[(triton.cdiv(m, bm), triton.cdiv(n, bn), split)](
        x2, x2, wk, scale_inv, dst, m, n, k,
        x2.stride(0), x2.stride(1), 0, 0, w.stride(0), w.stride(1), scale_inv.stride(0), scale_inv.stride(1),
        0 if split == 1 else dst.stride(0), dst.stride(-2), dst.stride(-1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=FP8_BLOCK, SPLIT_TILES=per, SCALE_BLOCK=FP8_BLOCK, PRECISION=prec,
        UPCAST=_upcast(x.dtype), A_FP8=False, W_BYTES=wbytes, **_config(bm, bn, x.dtype))
    out = dst if split == 1 else dst.sum(0).to(x.dtype)
    return out.view(*lead, n)


def fp8_grouped_mm(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor, offs: torch.Tensor,
                   row_expert: torch.Tensor | None = None, x_scale: torch.Tensor | None = None,
                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-expert x[rows of e] @ W[e].T for x (R, K) sorted by expert, w (E, N, K) fp8, offs (E,) int32 end rows.

    Out (R, N) in x.dtype; rows >= offs[-1] (no expert) are zeros. offs must be non-decreasing with
    offs[-1] <= R (empty experts and repeated values are fine). row_expert (R,), optional: the expert of
    each row (>= E for the rows past offs[-1]), i.e. the sorted keys that give offs; with it, far fewer
    rows than experts (decode: R * ROW_PROGRAMS <= E) launch a program per row instead of per expert (at
    batch 1: 8 rows for 256 experts, so 32x fewer programs, almost all of which would only find their
    expert empty).

    W8A8: x float8_e4m3fn with x_scale (R, ceil(K/128)) float32 from quantize_act (the caller quantizes
    once and gathers rows: see MoE._routed_grouped, and w8a8_grouped for when), out in out_dtype."""
    e, n, k = w.shape
    r = x.shape[0]
    a8 = x.dtype == torch.float8_e4m3fn
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"fp8_grouped_mm: x {tuple(x.shape)} against weights {tuple(w.shape)}")
    if offs.shape != (e,):
        raise ValueError(f"fp8_grouped_mm: offs {tuple(offs.shape)} for {e} experts")
    if a8 != (x_scale is not None) or (a8 and (out_dtype is None or x_scale.shape != (r, _cdiv128(k)))):
        raise ValueError("fp8_grouped_mm: FP8 x needs x_scale (R, ceil(K/128)) and out_dtype, 16-bit x neither")
    _check_scales(w, scale_inv)
    dtype = out_dtype if a8 else x.dtype
    prec = _precision(dtype)
    if not triton_available(x.device):
        xf = dequantize_act(x, x_scale).to(dtype) if a8 else x
        return _grouped_fallback(xf, w, scale_inv, offs)
    out = torch.empty((r, n), dtype=dtype, device=x.device)
    if r == 0 or n == 0:
        return out
    if e == 0 or k == 0:
        return out.zero_()
    offs = offs.to(torch.int32)  # no-op for the int32 offsets MoE builds
    rows = row_expert is not None and ROW_PROGRAMS * r <= e
    if rows and row_expert.shape != (r,):
        raise ValueError(f"fp8_grouped_mm: row_expert {tuple(row_expert.shape)} for {r} rows")
    _, grouped, _, tile_kernels = _kernels(interpret())
    tiles_from = TILES8_ROWS if a8 else TILES16_ROWS
    if MODE.grouped != "experts" and not rows and r >= tiles_from * e and dtype != torch.float32:
        return _grouped_tiles(tile_kernels, x, x_scale, w, scale_inv, offs, out)
    if a8:
        bm, bn, warps, stages = _w8a8_grouped_plan(r, e)
        wk, wbytes, cfg, upcast = w, False, dict(num_warps=warps, num_stages=stages), interpret()
        xs, xs_strides = x_scale, (x_scale.stride(0), x_scale.stride(1))
    else:
        bm, bn = _grouped_plan(r, e, x.dtype)
        (wk, wbytes), cfg, upcast = _weight_operand(w), _config(bm, bn, x.dtype), _upcast(x.dtype)
        xs, xs_strides = x, (0, 0)
    grouped[(triton.cdiv(n, bn), r if rows else e)](
        x, xs, wk, scale_inv, offs, row_expert if rows else offs, out, r, n, k, e,
        x.stride(0), x.stride(1), *xs_strides, w.stride(0), w.stride(1), w.stride(2),
        scale_inv.stride(0), scale_inv.stride(1), scale_inv.stride(2), out.stride(0), out.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=FP8_BLOCK, K_TILES=_cdiv128(k), SCALE_BLOCK=FP8_BLOCK, PRECISION=prec,
        UPCAST=upcast, ROWS=rows, A_FP8=a8, W_BYTES=wbytes, **cfg)
    return out


def _tma_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """The TMA launch's conditions: a Hopper-class GPU (or the interpreter), x and w contiguous with
    16-byte aligned bases and rows (the tensor-map rules for 1-byte elements)."""
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    return (x.is_contiguous() and w.is_contiguous() and x.shape[1] % 16 == 0
            and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0)


def _grouped_tiles(kernels, x, x_scale, w, scale_inv, offs, out):
    """fp8_grouped_mm with a program per (column tile, expert row tile), in _tile's order: FP8 x FP8 by _w8a8_tma_kernel
    (MODE.grouped "tma", where _tma_ok), by spmd.kernels.fp8_ws (MODE.grouped "ws": the same tiles, a
    persistent CTA per SM looping over them) or _grouped_tiles_kernel, which also runs 16-bit x (weight-only,
    e4m3 or bytes). The tile counts per expert come from offs by torch ops on the device (no host sync,
    graph-capturable); the grid is the static bound (ceil(R / BLOCK_M) + E) row tiles per column tile."""
    tiles_kernel, tma_kernel = kernels
    e, n, k = w.shape
    r = x.shape[0]
    a8 = x_scale is not None
    # the Gluon kernel's 128-row tiles from WS_ROWS rows per expert, the TMA launch's below
    ws = a8 and MODE.grouped == "ws" and _tma_ok(x, w) and x.device.type == "cuda" \
        and torch.cuda.get_device_capability(x.device)[0] == 9 \
        and (r >= WS_ROWS * e or MODE.tiles is not None) and fp8_ws().available()
    tma = a8 and MODE.grouped in ("tma", "ws") and _tma_ok(x, w)
    if ws:
        ws_options = fp8_ws().options(MODE.tiles, MODE.ws_columns)
        bm = fp8_ws().BLOCK_M
    elif a8:
        bm, bn, warps, stages = _w8a8_grouped_plan(r, e, tma)
    else:  # a 16-bit x tile is twice FP8's bytes: 3 stages of 128 x 128 (48 KB each)
        bm, bn, warps, stages = MODE.tiles or ((128, 128, 8, 3) if r >= 128 * e else (64, 128, 4, 3))
    ends = offs.clamp(max=r)
    counts = (ends - torch.nn.functional.pad(ends[:-1], (1, 0))).clamp(min=0)
    tend = torch.div(counts + (bm - 1), bm, rounding_mode="floor").cumsum(0).to(torch.int32)
    if ws:
        return fp8_ws().launch(x, x_scale, w, scale_inv, offs, tend, out, MODE.group_m, _sm_count(x.device),
                               **ws_options)
    grid = (triton.cdiv(n, bn) * (triton.cdiv(r, bm) + e),)
    common = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=FP8_BLOCK, K_TILES=_cdiv128(k), SCALE_BLOCK=FP8_BLOCK,
                  SEARCH=max(1, (e - 1).bit_length()), GROUP_M=MODE.group_m, num_warps=warps,
                  num_stages=stages)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        xd = TensorDescriptor(x, [r, k], [k, 1], [bm, FP8_BLOCK])
        wd = TensorDescriptor(w.view(e * n, k), [e * n, k], [k, 1], [bn, FP8_BLOCK])
        tma_kernel[grid](xd, x_scale, wd, scale_inv, offs, tend, out, r, n, k, e,
                         x_scale.stride(0), x_scale.stride(1), scale_inv.stride(0), scale_inv.stride(1),
                         scale_inv.stride(2), out.stride(0), out.stride(1), DEFER=MODE.tma_loop.startswith("defer"),
                         WS=MODE.tma_loop.endswith("ws"), **common)
        return out
    wk, wbytes = (w, False) if a8 else _weight_operand(w)
    xs, xs_strides = (x_scale, x_scale.stride()) if a8 else (x, (0, 0))
    tiles_kernel[grid](
        x, xs, wk, scale_inv, offs, tend, out, r, n, k, e,
        x.stride(0), x.stride(1), *xs_strides, w.stride(0), w.stride(1), w.stride(2),
        scale_inv.stride(0), scale_inv.stride(1), scale_inv.stride(2), out.stride(0), out.stride(1),
        PRECISION=_precision(out.dtype), UPCAST=interpret() if a8 else _upcast(x.dtype), A_FP8=a8,
        W_BYTES=wbytes, **common)
    return out


def fp8_ws():
    """spmd.kernels.fp8_ws, imported on first use (Gluon, like Triton, only where it runs)."""
    from spmd.kernels import fp8_ws as mod

    return mod


def _grouped_fallback(x, w, scale_inv, offs):
    """Torch path (host sync on offs): one dequantized GEMM per non-empty expert, zeros past offs[-1]."""
    out = torch.zeros((x.shape[0], w.shape[1]), dtype=x.dtype, device=x.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        end = min(end, x.shape[0])
        if end > start:
            out[start:end] = (x[start:end].float() @ dequantize(w[e], scale_inv[e], torch.float32).T).to(x.dtype)
        start = max(start, end)
    return out
