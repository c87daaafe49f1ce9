"""What the grouped FP8 x FP8 kernel's k loop compiles to on sm_90, without a GPU.

    python -m traces.fp8_sass [--kernel tma|ws] [--loop inline] [--tile 128x128x8x4] [--k 7168] [--out DIR]

Compiles spmd.kernels.fp8's TMA grouped kernel (``_w8a8_tma_kernel``; ``--kernel ws``: the warp-specialized
Gluon kernel of spmd.kernels.fp8_ws, tiles 128x128x4xSLOTS or 128x256x4xSLOTS, its k loop being a math
warpgroup's; --loop does not apply) for sm_90 with Triton's own ptxas,
disassembles it with its nvdisasm, and reports the main k loop (the smallest loop of the SASS that holds
a wgmma): the FP8 wgmma instructions (QGMMA) and the waits for them
(``WARPGROUP.DEPBAR``), the CTA-wide barriers (``BAR.SYNC``), the TMA loads (``UTMALDG``), the global loads
of the scales (``LDG``) and the promotion's multiply-adds (``FFMA``); register spills (``STL``/``LDL``)
(in the loop and in the whole kernel) and shared memory. The question it answers: can the promotion of one k-block's
product (its scales times the partial product, added on CUDA cores) overlap the tensor cores' next
product? Only if a wgmma is still in flight while the FFMAs run (a wait for all of them,
``DEPBAR.LE gsb0, 0x0``, before the FFMAs says no), and only across warpgroups if no CTA-wide barrier
puts them in lockstep (``cta_barriers``: BAR.SYNC of the whole CTA; a warp-specialized partition's own
barriers name their thread count). Writes DIR/<kernel>-<loop>-<tile>.sass and prints a summary (JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPS = {"wgmma": r"\bQGMMA\.", "wgmma_wait": r"WARPGROUP\.DEPBAR", "wait_all": r"DEPBAR\.LE gsb0, 0x0",
       "bar_sync": r"\bBAR\.SYNC\b", "tma_load": r"\bUTMALDG\b", "scale_load": r"\bLDG\b", "ffma": r"\bFFMA\b",
       "mbarrier_wait": r"SYNCS\.PHASECHK", "cta_barriers": r"\bBAR\.SYNC\.DEFER_BLOCKING 0x[0-9a-f]+ ;"}
SPILL = r"\b(?:STL|LDL)\b"  # a register spilled to local memory, or read back


def compile_kernel(loop: str, tile: tuple[int, int, int, int], k: int):
    """The TMA kernel compiled for sm_90 (no GPU needed): Triton's compiled-kernel object."""
    from triton.compiler import ASTSource

    from spmd.kernels import fp8

    if loop not in fp8.TMA_LOOPS:
        raise SystemExit(f"--loop {loop}: one of {', '.join(fp8.TMA_LOOPS)}")
    bm, bn, warps, stages = tile
    kern = fp8._kernels(False)[3][1]  # (tiles, tma): the TMA launch
    sig = {"x_desc": f"tensordesc<fp8e4nv[{bm}, 128]>", "xs_ptr": "*fp32", "w_desc": f"tensordesc<fp8e4nv[{bn}, 128]>",
           "s_ptr": "*fp32", "offs_ptr": "*i32", "tend_ptr": "*i32", "o_ptr": "*bf16"}
    sig.update({name: "i32" for name in ("R", "N", "K", "E", "stride_xsm", "stride_xsk", "stride_se", "stride_sn",
                                         "stride_sk", "stride_om", "stride_on")})
    const = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, K_TILES=-(-k // 128), SCALE_BLOCK=128, SEARCH=8, GROUP_M=8,
                 DEFER=loop.startswith("defer"), WS=loop.endswith("ws"))
    return _compile(ASTSource, kern, sig, const, dict(num_warps=warps, num_stages=stages))


def compile_ws(tile: tuple[int, int, int, int], k: int):
    """spmd.kernels.fp8_ws's kernel compiled for sm_90 as fp8_ws.launch would launch it (tile: 128 x
    BLOCK_N x warps x slots; the registers split by setmaxnreg as fp8_ws says)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from spmd.kernels import fp8_ws

    lay = gl.NVMMASharedLayout.get_default_for([128, 128], gl.float8e4nv)
    sig = {"x_desc": f"tensordesc<fp8e4nv[128, 128],{lay!r}>", "xs_ptr": "*fp32",
           "w_desc": f"tensordesc<fp8e4nv[128, 128],{lay!r}>", "s_ptr": "*fp32", "offs_ptr": "*i32",
           "tend_ptr": "*i32", "o_ptr": "*bf16", "sched_ptr": "*i32"}
    sig.update({name: "i32" for name in ("R", "N", "E", "stride_xsm", "stride_xsk", "stride_se", "stride_sn",
                                         "stride_sk", "stride_om", "stride_on")})
    const = dict(fp8_ws.plan(**fp8_ws.options(tile)), K_TILES=-(-k // 128), SEARCH=8, GROUP_M=8,
                 MATH_REGS=fp8_ws.MATH_REGS, PRODUCER_REGS=fp8_ws.PRODUCER_REGS)
    return _compile(GluonASTSource, fp8_ws._kernel(), sig, const, dict(num_warps=fp8_ws.WARPS, maxnreg=fp8_ws.MAXNREG))


def _compile(source, kern, sig: dict, const: dict, options: dict):
    """kern compiled for sm_90: sig the types of its runtime arguments, const its constexprs (both by
    name, put in the kernel's parameter order), source Triton's ASTSource or Gluon's."""
    import triton
    from triton.backends.compiler import GPUTarget

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("traces.fp8_sass compiles the kernel: run it without TRITON_INTERPRET")
    sig = {name: "constexpr" if name in const else sig[name] for name in kern.arg_names}
    names = list(sig)
    src = source(kern, sig, constexprs={(names.index(n),): v for n, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def disassemble(cubin: bytes, work: Path) -> str:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    path = work / "kernel.cubin"
    path.write_bytes(cubin)
    return subprocess.run([str(tool), "-c", str(path)], capture_output=True, text=True, check=True).stdout


def main_loop(sass: str) -> list[str]:
    """The instructions of the k loop: the smallest region from a backward branch's label to the branch
    (a BRA to a label at or before it) that holds a wgmma (larger ones: the spin-wait retries jumping back
    over the prologue); each line's instruction text."""
    lines, labels = [], {}
    pending = []
    for ln in sass.splitlines():
        m = re.match(r"\s*(\.L_x_\d+):", ln)
        if m:
            pending.append(m.group(1))
            continue
        a = re.search(r"/\*([0-9a-f]{4,})\*/", ln)
        if a:
            for name in pending:
                labels[name] = len(lines)
            pending = []
            lines.append(re.sub(r"^\s*/\*[0-9a-f]+\*/\s*", "", ln).strip())
    best = []
    for j, ln in enumerate(lines):
        m = re.search(r"\bBRA\b.*?(\.L_x_\d+)", ln)
        if m and labels.get(m.group(1), j + 1) <= j:
            body = lines[labels[m.group(1)]:j + 1]
            if any(re.search(OPS["wgmma"], x) for x in body) and (not best or len(body) < len(best)):
                best = body
    return best


def summary(loop: str, tile, k: int, out: Path | None, kernel: str = "tma") -> dict:
    c = compile_ws(tile, k) if kernel == "ws" else compile_kernel(loop, tile, k)
    with tempfile.TemporaryDirectory() as tmp:
        sass = disassemble(c.asm["cubin"], Path(tmp))
    body = main_loop(sass)
    counts = {name: sum(bool(re.search(rx, ln)) for ln in body) for name, rx in OPS.items()}
    first_ffma = next((i for i, ln in enumerate(body) if re.search(OPS["ffma"], ln)), None)
    waits_before = [i for i, ln in enumerate(body[:first_ffma]) if re.search(OPS["wait_all"], ln)]
    res = {"kernel": kernel, "loop": loop, "tile": list(tile), "k": k, "loop_instructions": len(body), **counts,
           "all_wgmma_waited_before_promotion": bool(waits_before),
           "spills": len(re.findall(SPILL, sass)), "loop_spills": sum(bool(re.search(SPILL, ln)) for ln in body),
           "shared_bytes": c.metadata.shared,
           # registers per thread the warpgroups set for themselves (setmaxnreg), warp-specialized kernels
           "setmaxnreg": sorted({int(v, 16) for v in re.findall(r"USETMAXREG\.\S+ (?:UP0, )?(0x[0-9a-f]+)", sass)})}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        name = f"{kernel}-{loop}-{'x'.join(map(str, tile))}"
        (out / f"{name}.sass").write_text(sass)
        (out / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", choices=("tma", "ws"), default="tma",
                    help="fp8's Triton TMA kernel or fp8_ws's warp-specialized Gluon kernel")
    ap.add_argument("--loop", default="inline", help="spmd.kernels.fp8.TMA_LOOPS, comma-separated (tma only)")
    ap.add_argument("--tile", default="128x128x8x4", help="BLOCK_M x BLOCK_N x warps x stages, comma-separated")
    ap.add_argument("--k", type=int, default=7168, help="the GEMM's K (7168: the experts' gate+up)")
    ap.add_argument("--out", type=Path, default=None, help="write each SASS and summary here")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from traces.fp8_bench import parse_tiles

    for loop in a.loop.split(","):
        for tile in parse_tiles(a.tile):
            print(json.dumps(summary(loop, tile, a.k, a.out, a.kernel)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
