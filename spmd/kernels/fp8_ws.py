"""The grouped FP8 x FP8 GEMM of the routed experts as a warp-specialized, persistent Hopper kernel (Gluon).

``fp8.fp8_grouped_mm`` with activation scales runs this launch where ``MODE.grouped == "ws"`` (sm_90 and a
Triton with Gluon's Hopper API: ``available``). It computes what ``fp8._w8a8_tma_kernel`` computes, in the
same program order (``tile_order.tile``: an expert's 128-row tiles in groups of GROUP_M per weight column
tile), with the work of one CTA split the way DeepSeek's DeepGEMM splits it:

- a **producer warp** loads each k-block's operand tiles (x rows (128, 128), the expert's weight rows in
  one or two (128, 128) halves, FP8) into a ring of STAGES shared-memory slots with the TMA unit; a
  slot's ``ready`` mbarrier fires when its bytes have landed;
- **two math warpgroups**, each its own partition, each owning 64 of the tile's 128 rows: wait for
  ``ready``, run the k-block's wgmma per column half (a fresh fp32 product, FP8 x FP8), scale the
  product by the rows' activation scales and the half's weight block scale and add it to that half's
  fp32 accumulator on the CUDA cores (the "promotion" of DeepSeek-V3's recipe), then arrive on the slot's
  ``empty`` mbarrier (count 2: both warpgroups) so the producer can refill it.

Nothing else couples the warpgroups (no CTA-wide barrier: ``traces.fp8_sass --kernel ws``), so one
promotes while the other's wgmma runs. The grid is persistent (a CTA per SM looping over tiles), so the
producer runs ahead across tile boundaries, and the tiles are handed out by a **counter**: the producer
takes the next tile in program order by an atomic add when it has issued the last loads of its current
one, and writes its number beside the slot of the tile's first k-block, where the math warpgroups read it
once that slot's ``ready`` fires (a number past the last tile: stop). So the tiles in flight stay a
compact window of the program order, as the hardware scheduler keeps them for the non-persistent TMA
launch, and a weight column tile is read from HBM once for a group of row tiles. A static walk (CTA i
taking tiles i, i + 132, ...) drifted: its window widened and Nsight Compute counted the weights read
from HBM 2.3 times (3.1 with 256 columns); the counter brings it back to once (8.5 GB at 16,384 tokens,
as the TMA launch).

With BLOCK_N 256 (two halves, the default) a k-block's activation tile serves 256 columns: 48 KB of
operands per 8.4 MFLOP instead of 32 KB per 4.2, which is what bounds these GEMMs at 128 x 128 (their
L2 traffic: timed with one side left out, ``SKIP``, the loads alone take 90 % of the whole kernel).
The two halves' products are made one after the other so a warpgroup holds two accumulators and one
product (192 registers of its 232), not two products.

Measured on an H100 (docs/performance.md, "FP8 prefill"): bit-identical to the TMA launch; gate+up at
16,384 tokens 9.7 ms against its 11.0 (kernel alone 7.7 against 9.1 ms), and the slice's 16,384-token
prefill 1.38x the dequantized model's speed against the TMA launch's 1.29x. The default on sm_90
(``SPMD_FP8_GROUPED`` auto; ``SPMD_FP8_WS_COLUMNS`` 128 or 256) from ``fp8.WS_ROWS`` rows per expert.

Rows past the tile's expert (another expert's, or past R) are loaded and multiplied but never stored;
columns past N belong to the next expert's weight rows and are not stored either (a half wholly past N
reads a zero scale); K past the end reads zeros (TMA). Rows past offs[E-1] (no expert) are written as
zeros after the tiles, as the other launches do. Gluon has no CPU interpreter: the kernel is tested on
GPUs (tests/unit/test_fp8.py there) and compiled for sm_90 on CPUs (tests/unit/test_fp8_sass.py).
"""
from __future__ import annotations

import functools

import torch

from spmd.config import FP8_BLOCK

WARPS = 4  # per math partition (one warpgroup of 64 rows); the producer partition is one warp
BLOCK_M = 128  # two math warpgroups
BLOCK_N = 256  # the default tile's columns (fp8.MODE.ws_columns; 128: measured slower, docs/performance.md)
# registers per thread: the kernel is launched with MAXNREG (three warpgroups of 128 threads, the
# producer's counted as one, share the SM's 65,536), then setmaxnreg moves the producer's down to
# PRODUCER_REGS and the math warpgroups' up to MATH_REGS (multiples of 8)
MAXNREG = 65536 // (128 * 3) // 8 * 8
PRODUCER_REGS = 40
MATH_REGS = (3 * MAXNREG - PRODUCER_REGS) // 2 // 8 * 8


@functools.cache
def available() -> bool:
    """Whether this Triton has the Gluon Hopper API the kernel uses (Triton 3.6 and 3.7 do)."""
    try:
        _kernel()
    except (ImportError, AttributeError):
        return False
    return True


def plan(stages: int | None = None, block_n: int = BLOCK_N, skip: int = 0) -> dict:
    """The launch's compile-time choices: BLOCK_N 128 or 256 columns (HALVES: one or two 128-column
    weight-scale blocks; with two, each k-block's activation tile serves twice the columns, 25 % fewer
    operand bytes per FLOP), STAGES slots of (128 + BLOCK_N) x 128 FP8 bytes (4 x 32 KB or 3 x 48 KB). SKIP
    (timing only, wrong results): 1 leaves out the wgmmas and the scaling, 2 the loads (the producer still
    hands out the tiles and the slots)."""
    if block_n not in (128, 256):
        raise ValueError(f"fp8_ws: BLOCK_N {block_n}: 128 or 256")
    return dict(HALVES=block_n // 128, STAGES=stages or (4 if block_n == 128 else 3), SKIP=skip)


SKIP = 0  # plan's skip for every launch: traces.fp8_bench's leave-one-side-out timings only


def options(tiles: tuple | None, columns: int = BLOCK_N) -> dict:
    """plan's options from fp8.MODE.tiles (BLOCK_M, BLOCK_N, warps, stages): BLOCK_M 128, BLOCK_N 128 or
    256; None: 128 x ``columns`` (fp8.MODE.ws_columns) with plan's slots."""
    if tiles is None:
        return dict(stages=None, block_n=columns, skip=SKIP)
    if tiles[0] != BLOCK_M or tiles[1] not in (128, 256):
        raise ValueError(f"fp8_ws: tiles {tiles}: BLOCK_M 128, BLOCK_N 128 or 256")
    return dict(stages=tiles[3], block_n=tiles[1], skip=SKIP)


@functools.cache
def _kernel():
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

    from spmd.kernels.tile_order import tile

    tile_of = gluon.jit(tile)  # the Triton launches' program order (fp8._tile)

    @gluon.jit
    def producer(x_desc, w_desc, a_bufs, b_bufs, ready, empty, offs_ptr, tend_ptr, xs_ptr, s_ptr, o_ptr, sched_ptr,
                 R, N, E, strides, K_TILES: gl.constexpr, STAGES: gl.constexpr, SEARCH: gl.constexpr,
                 GROUP_M: gl.constexpr, HALVES: gl.constexpr, SKIP: gl.constexpr, ROLE: gl.constexpr):
        nt = gl.cdiv(N, HALVES * 128)
        total = gl.load(tend_ptr + E - 1) * nt
        nbytes: gl.constexpr = x_desc.block_type.nbytes + HALVES * w_desc.block_type.nbytes
        slot_tile = sched_ptr + 1 + gl.program_id(0) * STAGES  # this CTA's tile of each slot's k-block 0
        it = 0
        p = gl.atomic_add(sched_ptr, 1)  # the next tile in program order, whichever CTA asks first
        while p < total:
            e, m0, end, pid_n = tile_of(p, nt, tend_ptr, offs_ptr, R, E, 128, SEARCH, GROUP_M)
            wrow = e * N + pid_n * (HALVES * 128)
            for kb in range(K_TILES):
                s = it % STAGES
                mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                if kb == 0:
                    gl.store(slot_tile + s, p)  # read by the math warpgroups once `ready` fires
                if SKIP != 2:
                    mbarrier.expect(ready.index(s), nbytes)
                    tma.async_copy_global_to_shared(x_desc, [m0, kb * 128], ready.index(s), a_bufs.index(s))
                    for h in gl.static_range(HALVES):
                        tma.async_copy_global_to_shared(w_desc, [wrow + h * 128, kb * 128], ready.index(s),
                                                        b_bufs.index(s * HALVES + h))
                else:
                    mbarrier.arrive(ready.index(s), count=1)
                it += 1
            p = gl.atomic_add(sched_ptr, 1)
        s = it % STAGES  # no tile left: the math warpgroups read `total` and stop
        mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
        gl.store(slot_tile + s, total)
        mbarrier.arrive(ready.index(s), count=1)

    @gluon.jit
    def consumer(x_desc, w_desc, a_bufs, b_bufs, ready, empty, offs_ptr, tend_ptr, xs_ptr, s_ptr, o_ptr, sched_ptr,
                 R, N, E, strides, K_TILES: gl.constexpr, STAGES: gl.constexpr, SEARCH: gl.constexpr,
                 GROUP_M: gl.constexpr, HALVES: gl.constexpr, SKIP: gl.constexpr, ROLE: gl.constexpr):
        stride_xsm, stride_xsk, stride_se, stride_sn, stride_sk, stride_om, stride_on = strides
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 128, 32])
        rows_l: gl.constexpr = gl.SliceLayout(1, mma)
        out_l: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
        nt = gl.cdiv(N, HALVES * 128)
        total = gl.load(tend_ptr + E - 1) * nt
        zero = gl.zeros((64, 128), gl.float32, mma)
        slot_tile = sched_ptr + 1 + gl.program_id(0) * STAGES
        it = 0
        mbarrier.wait(ready.index(0), 0)
        p = gl.load(slot_tile, volatile=True)  # the producer's first tile (or `total`: none)
        while p < total:
            e, m0, end, pid_n = tile_of(p, nt, tend_ptr, offs_ptr, R, E, 128, SEARCH, GROUP_M)
            r0 = m0 + ROLE * 64
            rows = r0 + gl.arange(0, 64, layout=rows_l)
            xs_ptrs = xs_ptr + rows.to(gl.int64) * stride_xsm
            rmask = rows < end
            nb0 = pid_n * HALVES  # the tile's first 128-column weight-scale block
            ws_ptr = s_ptr + e.to(gl.int64) * stride_se + nb0 * stride_sn
            second = (nb0 + 1) * 128 < N  # a second half with columns of this expert (else masked)
            live = r0 < end  # a warpgroup past its expert's rows skips its wgmmas, still frees the slots
            acc = zero
            if HALVES == 2:
                acc1 = zero
            for kb in range(K_TILES):
                s = it % STAGES
                mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                if live and SKIP != 1:
                    a = a_bufs.index(s).slice(ROLE * 64, 64)
                    part = warpgroup_mma(a, b_bufs.index(s * HALVES).permute((1, 0)), zero, use_acc=False,
                                         is_async=True)
                    xsk = gl.load(xs_ptrs + kb * stride_xsk, mask=rmask, other=0.0)
                    sc = xsk * gl.load(ws_ptr + kb * stride_sk)
                    part = warpgroup_mma_wait(num_outstanding=0, deps=(part, ))
                    acc = acc + part * sc[:, None]
                    if HALVES == 2:
                        part = warpgroup_mma(a, b_bufs.index(s * 2 + 1).permute((1, 0)), zero, use_acc=False,
                                             is_async=True)
                        sc = xsk * gl.load(ws_ptr + stride_sn + kb * stride_sk, mask=second, other=0.0)
                        part = warpgroup_mma_wait(num_outstanding=0, deps=(part, ))
                        acc1 = acc1 + part * sc[:, None]
                mbarrier.arrive(empty.index(s), count=1)
                it += 1
            if live:
                orow = r0 + gl.arange(0, 64, layout=gl.SliceLayout(1, out_l))
                ocol = nb0 * 128 + gl.arange(0, 128, layout=gl.SliceLayout(0, out_l))
                optrs = o_ptr + orow.to(gl.int64)[:, None] * stride_om + ocol[None, :] * stride_on
                omask = (orow < end)[:, None]
                gl.store(optrs, gl.convert_layout(acc.to(o_ptr.dtype.element_ty), out_l),
                         mask=omask & (ocol < N)[None, :])
                if HALVES == 2:
                    gl.store(optrs + 128 * stride_on, gl.convert_layout(acc1.to(o_ptr.dtype.element_ty), out_l),
                             mask=omask & (ocol + 128 < N)[None, :])
            s = it % STAGES  # the next tile's first k-block names it
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            p = gl.load(slot_tile + s, volatile=True)
        # rows past offs[E-1] (no expert): zeros, 64 x 128 chunks dealt over (program, warpgroup)
        z0 = gl.minimum(gl.maximum(gl.load(offs_ptr + E - 1), 0), R)
        nc = gl.cdiv(N, 128)
        zeros = gl.zeros((64, 128), o_ptr.dtype.element_ty, out_l)
        for c in range(gl.program_id(0) * 2 + ROLE, gl.cdiv(R - z0, 64) * nc, gl.num_programs(0) * 2):
            zr = z0 + (c // nc) * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, out_l))
            zc = (c % nc) * 128 + gl.arange(0, 128, layout=gl.SliceLayout(0, out_l))
            zptrs = o_ptr + zr.to(gl.int64)[:, None] * stride_om + zc[None, :] * stride_on
            gl.store(zptrs, zeros, mask=(zr < R)[:, None] & (zc < N)[None, :])

    @gluon.jit
    def _w8a8_ws_kernel(x_desc, xs_ptr, w_desc, s_ptr, offs_ptr, tend_ptr, o_ptr, sched_ptr, R, N, E,
                        stride_xsm, stride_xsk, stride_se, stride_sn, stride_sk, stride_om, stride_on,
                        K_TILES: gl.constexpr, STAGES: gl.constexpr, SEARCH: gl.constexpr, GROUP_M: gl.constexpr,
                        HALVES: gl.constexpr, SKIP: gl.constexpr, MATH_REGS: gl.constexpr,
                        PRODUCER_REGS: gl.constexpr):
        a_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
        b_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES * HALVES] + w_desc.block_type.shape, w_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # both math warpgroups
        strides = (stride_xsm, stride_xsk, stride_se, stride_sn, stride_sk, stride_om, stride_on)
        gl.warp_specialize([
            (consumer, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, offs_ptr, tend_ptr, xs_ptr, s_ptr, o_ptr,
                        sched_ptr, R, N, E, strides, K_TILES, STAGES, SEARCH, GROUP_M, HALVES, SKIP, 0)),
            (consumer, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, offs_ptr, tend_ptr, xs_ptr, s_ptr, o_ptr,
                        sched_ptr, R, N, E, strides, K_TILES, STAGES, SEARCH, GROUP_M, HALVES, SKIP, 1)),
            (producer, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, offs_ptr, tend_ptr, xs_ptr, s_ptr, o_ptr,
                        sched_ptr, R, N, E, strides, K_TILES, STAGES, SEARCH, GROUP_M, HALVES, SKIP, 2))],
            [4, 1], [MATH_REGS, PRODUCER_REGS])

    return _w8a8_ws_kernel


def descriptors(x: torch.Tensor, w: torch.Tensor):
    """The TMA descriptors: x (R, K) in (128, 128) blocks (a tile's rows, 64 per math warpgroup), the
    experts' weights as one (E * N, K) matrix in (128, 128) blocks (a tile's column half), both FP8
    with the default 128-byte swizzle."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    e, n, k = w.shape
    lay = gl.NVMMASharedLayout.get_default_for([BLOCK_M, FP8_BLOCK], gl.float8e4nv)
    return (TensorDescriptor(x, list(x.shape), [k, 1], [BLOCK_M, FP8_BLOCK], lay),
            TensorDescriptor(w.view(e * n, k), [e * n, k], [k, 1], [FP8_BLOCK, FP8_BLOCK], lay))


def launch(x, x_scale, w, scale_inv, offs, tend, out, group_m: int, sms: int, **options) -> torch.Tensor:
    """out (R, N) = the grouped product, tend the cumulative 128-row tiles per expert (fp8._grouped_tiles);
    a persistent grid of ``sms`` CTAs (one per SM: the slots take 128 KB or more of shared memory).
    options: plan's."""
    e, n, k = w.shape
    xd, wd = descriptors(x, w)
    opts = plan(**options)
    # the tile counter, then each CTA's tile per slot (written by its producer, read by its math warpgroups)
    sched = torch.zeros(1 + sms * opts["STAGES"], dtype=torch.int32, device=x.device)
    _kernel()[(sms, )](xd, x_scale, wd, scale_inv, offs, tend, out, sched, x.shape[0], n, e,
                       x_scale.stride(0), x_scale.stride(1), scale_inv.stride(0), scale_inv.stride(1),
                       scale_inv.stride(2), out.stride(0), out.stride(1), K_TILES=-(-k // FP8_BLOCK),
                       SEARCH=max(1, (e - 1).bit_length()), GROUP_M=group_m, MATH_REGS=MATH_REGS,
                       PRODUCER_REGS=PRODUCER_REGS, num_warps=WARPS, maxnreg=MAXNREG, **opts)
    return out
