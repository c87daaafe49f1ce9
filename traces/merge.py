"""Merge a run's per-rank trace files into RUN_DIR/merged.h5: ``python -m traces.merge RUN_DIR``.

merged.h5 layout (each source in its own group; every ``start_ns`` on the aligned clock of the rank):
    events          every rank's events (schema in spmd/obs/timers.py) with a leading ``rank`` int32 column,
                    sorted by (rank, start_ns); strings fixed-width bytes, widened to the widest rank
    ranks/<r>       one empty group per rank holding that rank file's attributes unchanged
    nccl/<r>        NCCL transports seen in logs/rank*.log (traces/nccl_log.py)
    nsys/<r>/       kernels, memcpy, nvtx from nsys/rank*.sqlite (traces/nsys.py)
    torch/<r>/      events from torch/rank*.json, torch.profiler chrome traces (traces/torch_trace.py)
    perf/<r>/       stat from perf/rank*.stat.csv, samples from perf/rank*.script.txt (traces/perf.py)
    sacct/steps     SLURM accounting per job step from sacct.json or sacct.txt (traces/sacct.py)
    attrs           schema, n_ranks, world_size, epoch_ns (rank 0's wall clock at the aligned t0),
                    nccl_transport, nccl_network, nccl_version

The file is built by the importers in ``IMPORTERS``, in order. An importer is one function
``fn(run_dir: Path, out: h5py.File) -> None`` that adds its datasets, groups or attributes to ``out``;
it reads only its own inputs from run_dir (never merged.h5), and does nothing when they are absent.
Profiler groups carry ``source``, ``clock`` and ``clock_offset_ns`` (how they were aligned:
traces/clock.py). The output is written to a hidden tmp file and renamed, so merging is atomic and
idempotent: the same inputs give the same merged.h5.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spmd.obs.merge import import_ranks, merge as merge_with
from traces.nccl_log import import_nccl_logs
from traces.nsys import import_nsys
from traces.perf import import_perf
from traces.sacct import import_sacct
from traces.torch_trace import import_torch

IMPORTERS = (import_ranks, import_nccl_logs, import_nsys, import_torch, import_perf, import_sacct)


def merge(run_dir) -> Path:
    """Every importer over run_dir into run_dir/merged.h5 (atomic); returns its path."""
    return merge_with(run_dir, IMPORTERS)


def main(argv=None) -> int:
    """CLI: merge RUN_DIR and print the merged file's path."""
    parser = argparse.ArgumentParser(prog="python -m traces.merge", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        print(merge(args.run_dir))
    except (FileNotFoundError, ValueError) as exc:
        print(f"traces.merge: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
