"""What a rank records about itself in its trace file: host, versions, MPI library, git commit, GPU, NCCL
environment, SLURM ids (from the topology)."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import torch


def run_metadata(world_like: dict) -> dict:
    """What a rank knows by itself: host, versions, MPI library, git commit, GPU, NCCL env; SLURM ids
    from ``world_like["slurm"]`` (world.topology reads them) as top-level ``SLURM_*`` keys."""
    meta = {
        "hostname": socket.gethostname(),
        "world": dict(world_like),
        "versions": versions(),
        "mpi_library": _mpi_library(),
        "git_commit": git_commit(),
        "cuda_device": torch.cuda.get_device_name() if _on_cuda(world_like) else "",
        "gpu_peak_bytes": _gpu_peak_bytes(str(world_like.get("device", "cpu"))),
        "nccl_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("NCCL_")},
    }
    size = world_like.get("world_size", world_like.get("size"))
    if size is not None:
        meta["world_size"] = int(size)
    meta.update(world_like.get("slurm") or {})
    return meta


def _on_cuda(world_like: dict) -> bool:
    """A rank with a GPU (a dedicated orchestrator has none: it must not create a CUDA context)."""
    return str(world_like.get("device", "cuda")).startswith("cuda") and torch.cuda.is_available()


def _gpu_peak_bytes(device: str) -> int:
    """Peak bytes allocated by PyTorch on this rank's GPU (0 on CPU)."""
    return torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else 0


def versions(packages=("torch", "transformers", "mpi4py", "numpy", "h5py")) -> dict:
    """Python's version and each package's installed version ("" when it is not installed)."""
    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = ""
    return out


def _mpi_library() -> str:
    # only if the program already imported mpi4py.MPI: importing it here would initialize MPI
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None:
        return ""
    return mpi.Get_library_version().replace("\0", "").strip().splitlines()[0]  # Open MPI ends in NUL


def git_commit() -> str:
    """The checkout's HEAD commit ("" outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()
