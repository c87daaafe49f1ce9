"""The profiler window: torch.profiler or nsys (cudaProfilerStart/Stop) around decode steps A..B.

``--profile torch|nsys --profile-steps A:B``. ``Timers.set_phase`` calls ``on_phase(phase, step)``: the
window opens when decode step A starts (in the first batch that reaches it) and closes when anything but
decode steps A..B starts, or at ``close()``. One window per run.

Clock marker: right after opening, a range named ``spmd.sync:<ns>`` is recorded, <ns> being this rank's
``perf_counter_ns()`` (CLOCK_MONOTONIC) taken just before it: a torch.profiler user annotation, or an NVTX
range under nsys. ``traces.merge`` subtracts the rank file's ``clock_t0_ns`` to put the profiler's
timestamps on the aligned clock of the rank's events.

torch: CPU ops, plus on GPU the CUPTI timeline (kernels incl. NCCL's, memcpy, memset), exported when the
window closes as chrome-trace JSON to ``TRACE_DIR/torch/rank{r:05d}.json``. nsys: the program only starts
and stops the CUDA profiler API; ``launch/rank.sh`` (PROFILE=nsys) runs ``nsys profile
--capture-range=cudaProfilerApi`` and names the files.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from spmd.config import PROFILE_KINDS as KINDS
from spmd.obs import SYNC_PREFIX

def torch_trace_path(trace_dir, rank: int) -> Path:
    """Where rank `rank` writes its torch.profiler chrome trace."""
    return Path(trace_dir) / "torch" / f"rank{rank:05d}.json"


class Profiler:
    """Opens and closes one profiler window from the phase/step stream of ``Timers.set_phase``."""

    def __init__(self, kind: str, steps: tuple[int, int], rank: int, device: str, trace_dir=None):
        if kind not in KINDS:
            raise ValueError(f"profile kind {kind!r} not in {KINDS}")
        self.kind, self.steps, self.rank = kind, tuple(steps), int(rank)
        self._cuda = torch.device(device).type == "cuda"
        self._trace_dir = trace_dir
        self._prof = None
        self.state = "idle"  # idle -> open -> done
        self.path: Path | None = None

    @classmethod
    def from_args(cls, args, world) -> "Profiler":
        """The profiler asked for on the command line (kind "none" does nothing)."""
        return cls(args.profile, args.profile_steps, world.rank, world.device, args.trace_dir)

    def on_phase(self, phase: str, step: int) -> None:
        """Open at decode step A; close at the first phase/step outside decode A..B."""
        if self.kind == "none" or self.state == "done":
            return
        inside = phase == "decode" and self.steps[0] <= step <= self.steps[1]
        if self.state == "idle" and phase == "decode" and step == self.steps[0]:
            self._open()
        elif self.state == "open" and not inside:
            self.close()

    def close(self) -> Path | None:
        """Close the window if open (idempotent); returns the torch trace path, if one was written."""
        if self.state == "open":
            self.state = "done"
            if self.kind == "torch":
                self._prof.stop()
                self.path = _export(self._prof, torch_trace_path(self._trace_dir, self.rank))
                self._prof = None
            else:
                torch.cuda.synchronize()
                torch.cuda.profiler.stop()
        return self.path

    def _open(self) -> None:
        self.state = "open"
        if self.kind == "torch":
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self._cuda:
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=acts)
            self._prof.start()
            t = time.perf_counter_ns()
            with torch.profiler.record_function(f"{SYNC_PREFIX}{t}"):
                pass
        else:
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            t = time.perf_counter_ns()
            torch.cuda.nvtx.range_push(f"{SYNC_PREFIX}{t}")
            torch.cuda.nvtx.range_pop()


def _export(prof, path: Path) -> Path:
    """Chrome-trace JSON written to a hidden tmp file, then renamed (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        prof.export_chrome_trace(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
