"""The grouped FP8 x FP8 GEMM of the routed experts as a warp-specialized, persistent Hopper kernel (Gluon).

``fp8.fp8_grouped_mm`` with activation scales runs this launch where ``MODE.grouped == "ws"`` (sm_90 and a
Triton with Gluon's Hopper API: ``available``). It computes what ``fp8._w8a8_tma_kernel`` computes, tile for
tile in the same program order (``fp8._tile``: an expert's 128-row tiles in groups of GROUP_M per weight
column tile), with the work of one CTA split the way DeepSeek's DeepGEMM splits it:

- a **producer warp** loads each k-block's operand tiles (x rows (128, 128), the expert's weight rows
  (BLOCK_N, 128), FP8) into a ring of STAGES shared-memory slots with the TMA unit; a slot's ``ready``
  mbarrier fires when its bytes have landed;
- **two math warpgroups**, each its own partition, each owning 64 of the tile's 128 rows: wait for
  ``ready``, issue the wgmma of that k-block (a fresh fp32 product, FP8 x FP8), wait for it, arrive on the
  slot's ``empty`` mbarrier (count 2: both warpgroups) so the producer can refill it, and only then scale
  the product by the rows' activation scales and the weight's block scale and add it to the fp32
  accumulator on the CUDA cores (the "promotion" of DeepSeek-V3's recipe).

Why: the Triton kernel runs both warpgroups in lockstep (three CTA-wide barriers per k-block, measured
in its SASS by ``traces.fp8_sass``), so the tensor cores idle while both promote. Here nothing couples
the warpgroups except the slots' barriers, so one promotes while the other's wgmma runs, and the
producer runs ahead across tile boundaries (persistent grid: a CTA per SM loops over tiles), so there
is no pipeline fill per tile. DEFER additionally keeps one wgmma in flight inside a warpgroup (issue
block kb, then promote block kb-1): a second product tile in registers. WGS = 3: 192-row tiles.

Measured (one H100, docs/performance.md "FP8 prefill"): equal to the TMA launch bit for bit, and 5-10 %
slower; with one side left out (SKIP), the loads alone take as long as the whole kernel and the math
alone about two thirds: at 128 x 128 tiles the grouped GEMM is bound by its operand traffic from L2,
which only TMA multicast across a CTA cluster reduces (Gluon has it from Triton 3.7; the device image's
3.6 does not). Opt-in (``SPMD_FP8_GROUPED=ws``) until then.

Rows past the tile's expert (another expert's, or past R) are loaded and multiplied but never stored;
columns past N belong to the next expert's weight rows and are not stored either; K past the end
reads zeros (TMA). Rows past offs[E-1] (no expert) are written as zeros after the tiles, as the other
launches do. Gluon has no CPU interpreter: the kernel is tested on GPUs (tests/gpu) and compiled for
sm_90 on CPUs (tests/unit/test_fp8_ws.py).
"""
from __future__ import annotations

import functools

import torch

from spmd.config import FP8_BLOCK

WARPS = 4  # per math partition (one warpgroup of 64 rows); the producer partition is one warp


@functools.cache
def available() -> bool:
    """Whether this Triton has the Gluon Hopper API the kernel uses (Triton 3.6 and 3.7 do)."""
    try:
        _kernel()
    except (ImportError, AttributeError):
        return False
    return True


def plan(stages: int | None = None, block_n: int = 128, defer: bool = False, wgs: int = 2, skip: int = 0) -> dict:
    """The launch's compile-time choices: WGS math warpgroups of 64 rows each, STAGES slots of
    (64 * WGS + BLOCK_N) x 128 FP8 bytes (2 warpgroups, 4 slots: 128 KB). SKIP (timing only, wrong
    results): 1 leaves out the wgmmas and the scaling, 2 the loads (what is left is then the other side's
    time)."""
    return dict(BLOCK_N=block_n, STAGES=stages or 4, DEFER=defer, WGS=wgs, SKIP=skip)


@functools.cache
def _kernel():
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

    from spmd.kernels import fp8

    tile_of = gluon.jit(fp8._tile)  # the Triton launches' program order, for 64 * WGS-row tiles

    @gluon.jit
    def producer(x_desc, w_desc, a_bufs, b_bufs, ready, empty, offs_ptr, tend_ptr, xs_ptr, s_ptr, o_ptr,
                 R, N, E, strides, BLOCK_N: gl.constexpr, K_TILES: gl.constexpr, STAGES: gl.constexpr,
                 SEARCH: gl.constexpr, GROUP_M: gl.constexpr, DEFER: gl.constexpr, WGS: gl.constexpr,
                 SKIP: gl.constexpr, ROLE: gl.constexpr):
        nt = gl.cdiv(N, BLOCK_N)
        total = gl.load(tend_ptr + E - 1) * nt
        nbytes: gl.constexpr = WGS * x_desc.block_type.nbytes + w_desc.block_type.nbytes
        it = 0
        if SKIP != 2:
            for p in range(gl.program_id(0), total, gl.num_programs(0)):
                e, m0, end, pid_n = tile_of(p, nt, tend_ptr, offs_ptr, R, E, WGS * 64, SEARCH, GROUP_M)
                wrow = e * N + pid_n * BLOCK_N
                for kb in range(K_TILES):
                    s = it % STAGES
                    mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                    mbarrier.expect(ready.index(s), nbytes)
                    for j in gl.static_range(WGS):
                        tma.async_copy_global_to_shared(x_desc, [m0 + j * 64, kb * 128], ready.index(s),
                                                        a_bufs.index(s * WGS + j))
                    tma.async_copy_global_to_shared(w_desc, [wrow, kb * 128], ready.index(s), b_bufs.index(s))
                    it += 1

    @gluon.jit
    def consumer(x_desc, w_desc, a_bufs, b_bufs, ready, empty, offs_ptr, tend_ptr, xs_ptr, s_ptr, o_ptr,
                 R, N, E, strides, BLOCK_N: gl.constexpr, K_TILES: gl.constexpr, STAGES: gl.constexpr,
                 SEARCH: gl.constexpr, GROUP_M: gl.constexpr, DEFER: gl.constexpr, WGS: gl.constexpr,
                 SKIP: gl.constexpr, ROLE: gl.constexpr):
        stride_xsm, stride_xsk, stride_se, stride_sn, stride_sk, stride_om, stride_on = strides
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BLOCK_N, 32])
        rows_l: gl.constexpr = gl.SliceLayout(1, mma)
        out_l: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
        nt = gl.cdiv(N, BLOCK_N)
        total = gl.load(tend_ptr + E - 1) * nt
        zero = gl.zeros((64, BLOCK_N), gl.float32, mma)
        it = 0
        for p in range(gl.program_id(0), total, gl.num_programs(0)):
            e, m0, end, pid_n = tile_of(p, nt, tend_ptr, offs_ptr, R, E, WGS * 64, SEARCH, GROUP_M)
            r0 = m0 + ROLE * 64
            rows = r0 + gl.arange(0, 64, layout=rows_l)
            xs_ptrs = xs_ptr + rows.to(gl.int64) * stride_xsm
            rmask = rows < end
            ws_ptr = s_ptr + e.to(gl.int64) * stride_se + pid_n * stride_sn
            live = r0 < end  # a warpgroup past its expert's rows skips its wgmmas, still frees the slots
            acc = zero
            if DEFER:
                s = it % STAGES
                mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                prev = warpgroup_mma(a_bufs.index(s * WGS + ROLE), b_bufs.index(s).permute((1, 0)), zero,
                                     use_acc=False, is_async=True)
                sc = gl.load(xs_ptrs, mask=rmask, other=0.0) * gl.load(ws_ptr)
                it += 1
                for kb in range(1, K_TILES):
                    s = it % STAGES
                    mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                    cur = warpgroup_mma(a_bufs.index(s * WGS + ROLE), b_bufs.index(s).permute((1, 0)), zero,
                                        use_acc=False, is_async=True)
                    nsc = gl.load(xs_ptrs + kb * stride_xsk, mask=rmask, other=0.0) * gl.load(ws_ptr + kb * stride_sk)
                    prev = warpgroup_mma_wait(num_outstanding=1, deps=(prev, ))
                    mbarrier.arrive(empty.index((it - 1) % STAGES), count=1)
                    acc = acc + prev * sc[:, None]
                    prev = cur
                    sc = nsc
                    it += 1
                prev = warpgroup_mma_wait(num_outstanding=0, deps=(prev, ))
                mbarrier.arrive(empty.index((it - 1) % STAGES), count=1)
                acc = acc + prev * sc[:, None]
            else:
                for kb in range(K_TILES):
                    s = it % STAGES
                    if SKIP != 2:
                        mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                    if live and SKIP != 1:
                        part = warpgroup_mma(a_bufs.index(s * WGS + ROLE), b_bufs.index(s).permute((1, 0)),
                                             zero, use_acc=False, is_async=True)
                        sc = gl.load(xs_ptrs + kb * stride_xsk, mask=rmask, other=0.0) * gl.load(ws_ptr + kb * stride_sk)
                        part = warpgroup_mma_wait(num_outstanding=0, deps=(part, ))
                        if SKIP != 2:
                            mbarrier.arrive(empty.index(s), count=1)
                        acc = acc + part * sc[:, None]
                    elif SKIP != 2:
                        mbarrier.arrive(empty.index(s), count=1)
                    it += 1
            if live:
                out = gl.convert_layout(acc.to(o_ptr.dtype.element_ty), out_l)
                orow = r0 + gl.arange(0, 64, layout=gl.SliceLayout(1, out_l))
                ocol = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, out_l))
                optrs = o_ptr + orow.to(gl.int64)[:, None] * stride_om + ocol[None, :] * stride_on
                gl.store(optrs, out, mask=(orow < end)[:, None] & (ocol < N)[None, :])
        # rows past offs[E-1] (no expert): zeros, 64-row chunks dealt over (program, warpgroup)
        z0 = gl.minimum(gl.maximum(gl.load(offs_ptr + E - 1), 0), R)
        chunks = gl.cdiv(R - z0, 64) * nt
        zeros = gl.zeros((64, BLOCK_N), o_ptr.dtype.element_ty, out_l)
        for c in range(gl.program_id(0) * WGS + ROLE, chunks, gl.num_programs(0) * WGS):
            zr = z0 + (c // nt) * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, out_l))
            zc = (c % nt) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, out_l))
            zptrs = o_ptr + zr.to(gl.int64)[:, None] * stride_om + zc[None, :] * stride_on
            gl.store(zptrs, zeros, mask=(zr < R)[:, None] & (zc < N)[None, :])

    @gluon.jit
    def kernel(x_desc, xs_ptr, w_desc, s_ptr, offs_ptr, tend_ptr, o_ptr, R, N, E,
               stride_xsm, stride_xsk, stride_se, stride_sn, stride_sk, stride_om, stride_on,
               BLOCK_N: gl.constexpr, K_TILES: gl.constexpr, STAGES: gl.constexpr, SEARCH: gl.constexpr,
               GROUP_M: gl.constexpr, DEFER: gl.constexpr, WGS: gl.constexpr, SKIP: gl.constexpr,
               MATH_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
        a_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES * WGS] + x_desc.block_type.shape, x_desc.layout)
        b_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=WGS)
        strides = (stride_xsm, stride_xsk, stride_se, stride_sn, stride_sk, stride_om, stride_on)
        if WGS == 2:
            gl.warp_specialize([
                (consumer, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, offs_ptr, tend_ptr, xs_ptr, s_ptr, o_ptr,
                            R, N, E, strides, BLOCK_N, K_TILES, STAGES, SEARCH, GROUP_M, DEFER, WGS, SKIP, 0)),
                (consumer, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, offs_ptr, tend_ptr, xs_ptr, s_ptr, o_ptr,
                            R, N, E, strides, BLOCK_N, K_TILES, STAGES, SEARCH, GROUP_M, DEFER, WGS, SKIP, 1)),
                (producer, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, offs_ptr, tend_ptr, xs_ptr, s_ptr, o_ptr,
                            R, N, E, strides, BLOCK_N, K_TILES, STAGES, SEARCH, GROUP_M, DEFER, WGS, SKIP, WGS))],
                [4, 1], [MATH_REGS, PRODUCER_REGS])
        else:
            gl.warp_specialize([
                (consumer, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, offs_ptr, tend_ptr, xs_ptr, s_ptr, o_ptr,
                            R, N, E, strides, BLOCK_N, K_TILES, STAGES, SEARCH, GROUP_M, DEFER, WGS, SKIP, 0)),
                (consumer, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, offs_ptr, tend_ptr, xs_ptr, s_ptr, o_ptr,
                            R, N, E, strides, BLOCK_N, K_TILES, STAGES, SEARCH, GROUP_M, DEFER, WGS, SKIP, 1)),
                (consumer, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, offs_ptr, tend_ptr, xs_ptr, s_ptr, o_ptr,
                            R, N, E, strides, BLOCK_N, K_TILES, STAGES, SEARCH, GROUP_M, DEFER, WGS, SKIP, 2)),
                (producer, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, offs_ptr, tend_ptr, xs_ptr, s_ptr, o_ptr,
                            R, N, E, strides, BLOCK_N, K_TILES, STAGES, SEARCH, GROUP_M, DEFER, WGS, SKIP, WGS))],
                [4, 4, 1], [MATH_REGS, MATH_REGS, PRODUCER_REGS])

    return kernel


def registers(wgs: int) -> tuple[int, int, int]:
    """(launch maxnreg, math warpgroup, producer) registers per thread: the SM's 65,536 over the CTA's
    warpgroups (wgs math + the producer's), then moved from the producer to the math warpgroups
    (setmaxnreg: multiples of 8)."""
    launch = 65536 // (128 * (wgs + 1)) // 8 * 8
    producer = 40 if wgs == 2 else 24
    return launch, ((wgs + 1) * launch - producer) // wgs // 8 * 8, producer


SKIP = 0  # plan's skip for every launch: traces.fp8_bench's leave-one-side-out timings only


def options(tiles: tuple | None, loop: str) -> dict:
    """plan's options from fp8.MODE: tiles (BLOCK_M, BLOCK_N, warps, stages) give BLOCK_M = 64 * wgs
    (128 or 192) and the slots (BLOCK_N 128 only: one weight scale per tile and k-block); the k loop
    "defer" / "defer-ws" keeps a wgmma in flight."""
    wgs, stages = 2, None
    if tiles is not None:
        if tiles[0] not in (128, 192) or tiles[1] != 128:
            raise ValueError(f"fp8_ws: tiles {tiles}: BLOCK_M 128 or 192, BLOCK_N 128")
        wgs, stages = tiles[0] // 64, tiles[3]
    return dict(wgs=wgs, stages=stages, defer=loop.startswith("defer"), skip=SKIP)


def descriptors(x: torch.Tensor, w: torch.Tensor, block_n: int):
    """The TMA descriptors: x (R, K) in (64, 128) blocks (a warpgroup's rows), the experts' weights as one (E * N, K) matrix in
    (BLOCK_N, 128) blocks, both FP8 with the default 128-byte swizzle."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    e, n, k = w.shape
    lay_x = gl.NVMMASharedLayout.get_default_for([64, FP8_BLOCK], gl.float8e4nv)
    lay_w = gl.NVMMASharedLayout.get_default_for([block_n, FP8_BLOCK], gl.float8e4nv)
    return (TensorDescriptor(x, list(x.shape), [k, 1], [64, FP8_BLOCK], lay_x),
            TensorDescriptor(w.view(e * n, k), [e * n, k], [k, 1], [block_n, FP8_BLOCK], lay_w))


def launch(x, x_scale, w, scale_inv, offs, tend, out, group_m: int, sms: int, **options) -> torch.Tensor:
    """out (R, N) = the grouped product, tend the cumulative row tiles (64 * wgs rows) per expert
    (fp8._grouped_tiles); a persistent grid of ``sms`` CTAs (one per SM: the slots take 128 KB or more of
    shared memory). options: plan's."""
    e, n, k = w.shape
    cfg = plan(**options)
    maxnreg, math_regs, producer_regs = registers(cfg["WGS"])
    xd, wd = descriptors(x, w, cfg["BLOCK_N"])
    _kernel()[(sms, )](xd, x_scale, wd, scale_inv, offs, tend, out, x.shape[0], n, e,
                       x_scale.stride(0), x_scale.stride(1), scale_inv.stride(0), scale_inv.stride(1),
                       scale_inv.stride(2), out.stride(0), out.stride(1), K_TILES=-(-k // FP8_BLOCK),
                       SEARCH=max(1, (e - 1).bit_length()), GROUP_M=group_m, MATH_REGS=math_regs,
                       PRODUCER_REGS=producer_regs, num_warps=WARPS, maxnreg=maxnreg, **cfg)
    return out
