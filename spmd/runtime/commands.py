"""Command lines of the project's programs, for the drivers that start them (validation/, traces/).

Import-light on purpose (no torch, no mpi4py): a driver stays a plain process that starts MPI jobs.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "inputs" / "models"


def mpirun(n: int, module: str, *args: str, mpi4py: bool = False) -> list[str]:
    """`$MPIRUN -n n python -m [mpi4py -m] module args` (MPIRUN: the launcher and its options, default mpirun)."""
    return [*os.environ.get("MPIRUN", "mpirun").split(), "-n", str(n), sys.executable, "-m",
            *(("mpi4py", "-m") if mpi4py else ()), module, *args]


def synth(config: str, out: Path, weights: str, device: str, overwrite: bool = False) -> list[str]:
    """Write the synthetic checkpoint of inputs/models/<config>.json (seed 0) to out; the tiny config is
    written on the CPU whatever the device (it is small, and CPU-written tiny checkpoints are the CI's)."""
    dev = "cuda" if device == "cuda" and config != "tiny" else "cpu"
    return [sys.executable, "-m", "spmd.weights.synth", "--config", str(MODELS / f"{config}.json"), "--out", str(out),
            "--weights", weights, "--seed", "0", "--device", dev, *(("--overwrite",) if overwrite else ())]


def checkpoint(config: str, weights: str, root: Path, device: str) -> Path:
    """root/<config>-<weights>, written now (`synth`) unless it holds a config.json already."""
    out = Path(root) / f"{config}-{weights}"
    if not (out / "config.json").is_file():
        subprocess.run(synth(config, out, weights, device), check=True, cwd=ROOT)
    return out
