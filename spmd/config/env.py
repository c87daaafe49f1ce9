"""Every SPMD_* environment variable the program reads: read here (`read`), nowhere else in spmd/.

The launch scripts and tests have variables of their own (SPMD_IFNAME, SPMD_VENV, SPMD_SLURM_*, ...);
docs/command-line.md tables all of them. A test checks that every SPMD_* name in spmd/ is one of these.
"""
from __future__ import annotations

import os
from typing import Mapping

VARIABLES = {  # name -> (default, what it sets; who parses it)
    "SPMD_FAULT": ("", "fault injection RANK:PHASE:STEP:ACTION[,...] (spmd.runtime.faults)"),
    "SPMD_WATCHDOG_S": ("1800", "seconds a decode step or phase may take before the job is aborted; 0: off "
                                "(spmd.runtime.faults)"),
    "SPMD_LOAD_TIMEOUT_S": ("", "seconds loading may take before the job is aborted (default: the bytes each rank "
                                "reads at SPMD_LOAD_MIN_MBPS, at least 900 s); 0: no deadline (spmd.runtime.faults)"),
    "SPMD_LOAD_MIN_MBPS": ("20", "the read rate per rank the load deadline assumes, MB/s (spmd.runtime.faults)"),
    "SPMD_COLLECTIVE_TIMEOUT_S": ("600", "seconds a torch.distributed collective may wait (spmd.runtime.world)"),
    "SPMD_GRAPH_MARKS": ("off", "timer marks inside CUDA graphs: off, stamp or event (spmd.obs.graph_marks)"),
    "SPMD_GRAPH_MARK_LEVEL": ("span", "span or layer: a mark per timer span or per compute/comm change "
                                      "(spmd.obs.graph_marks)"),
    "SPMD_FP8_GROUPED": ("auto", "the FP8 x FP8 grouped-expert launch: tma (sm_90+), ws (sm_90 GPUs: warp-"
                                 "specialized persistent Gluon kernel, spmd.kernels.fp8_ws), tiles, experts; auto: "
                                 "ws on sm_90, tma on later GPUs, else tiles (spmd.engines.native, "
                                 "spmd.kernels.fp8)"),
    "SPMD_FP8_WS_COLUMNS": ("256", "the ws launch's tile columns, 128 or 256 (spmd.kernels.fp8.Mode.ws_columns)"),
    "SPMD_FP8_GROUP_M": ("8", "row tiles per group in the grouped FP8 launches' program order (1: column tiles "
                              "fastest; spmd.kernels.fp8.Mode.group_m)"),
    "SPMD_FP8_FUSED_QUANT": ("1", "1: the MoE input quantized once for the shared and routed experts, silu * up "
                                  "quantized in its own kernel for the dense and shared down projections; 0: "
                                  "a quantization before each FP8 x FP8 GEMM (spmd.kernels.fp8.Mode.fused_quant)"),
    "SPMD_FP8_TMA_LOOP": ("inline", "the TMA grouped launch's k loop: inline, defer (block scales applied one "
                                    "block later), ws, defer-ws (warp specialized; spmd.kernels.fp8.Mode.tma_loop)"),
}


def read(name: str, environ: Mapping[str, str] | None = None) -> str:
    """The variable's value, stripped ("" when unset); `environ` for tests (default: the process's)."""
    if name not in VARIABLES:
        raise KeyError(f"{name} is not one of spmd's variables ({', '.join(VARIABLES)})")
    return (os.environ if environ is None else environ).get(name, "").strip()


def choice(name: str, allowed, environ: Mapping[str, str] | None = None) -> str:
    """The variable's value, or its registered default when unset, checked against `allowed` (one clear
    ValueError naming the variable otherwise)."""
    value = read(name, environ) or VARIABLES[name][0]
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: {', '.join(allowed)}")
    return value
