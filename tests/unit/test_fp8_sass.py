"""traces.fp8_sass: the grouped FP8 x FP8 kernel compiled for sm_90 without a GPU (Triton's ptxas and
nvdisasm), its k loop found and counted. In a fresh process without TRITON_INTERPRET (the compiler, not
the interpreter)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("triton")


def test_k_loop_of_the_tma_kernel(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "traces.fp8_sass", "--loop", "inline", "--tile", "64x128x4x3",
                        "--k", "1024", "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    # one 128-deep k-block per iteration: four k32 wgmmas, the A and B tiles by TMA, and the promotion's
    # multiply-adds: the 64 x 128 fp32 partial product over one warpgroup's 128 threads, 64 each
    assert (res["wgmma"], res["tma_load"], res["ffma"]) == (4, 2, 64 * 128 // 128), res
    assert res["spills"] == 0 and 0 < res["shared_bytes"] <= 232448
    assert res["all_wgmma_waited_before_promotion"] is True  # the finding docs/performance.md reports
    assert (tmp_path / "tma-inline-64x128x4x3.sass").stat().st_size > 10_000
    bad = subprocess.run([sys.executable, "-m", "traces.fp8_sass", "--loop", "fast"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--loop fast" in bad.stderr


def test_warp_specialized_kernel_compiles_without_cta_barriers(tmp_path):
    """spmd.kernels.fp8_ws for sm_90 with 128- and 256-column tiles: no spills in the k loop (with two
    column halves ptxas keeps a few scalars of the tile in local memory around it), the register split of
    fp8_ws set by setmaxnreg, a math warpgroup's k loop of four k32 wgmmas per column half and one
    mbarrier wait with no barrier of the whole CTA (the warpgroups are not in lockstep), slots within
    the H100's 227 KB of shared memory."""
    from spmd.kernels import fp8_ws

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "traces.fp8_sass", "--kernel", "ws", "--tile", "128x128x4x4,128x256x4x3",
                        "--k", "1024", "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for line, halves in zip(r.stdout.strip().splitlines(), (1, 2)):
        res = json.loads(line)
        assert res["loop_spills"] == 0 and res["spills"] <= 32 and 0 < res["shared_bytes"] <= 232448, res
        assert {fp8_ws.MATH_REGS, fp8_ws.PRODUCER_REGS} <= set(res["setmaxnreg"]), res
        assert (res["wgmma"], res["mbarrier_wait"], res["cta_barriers"]) == (4 * halves, 1, 0), res
