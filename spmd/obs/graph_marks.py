"""Time marks recorded by a CUDA graph itself, for the timers' spans inside captured decode steps.

A captured graph replays its spans without Python, so their start and end must be nodes of the graph.
``SPMD_GRAPH_MARKS`` chooses:

- ``off`` (default): no marks; a replayed step is one compute event ``decode.graph``, timed by a CUDA
  event pair around the launch (+1.1 % of a 1.1 ms step, H200). Per-layer and per-collective times then
  come from eager steps (``--cuda-graph off``).
- ``stamp``: a one-thread Triton kernel that writes the GPU's ``%globaltimer`` (ns) into a slot of a
  device buffer; after each replay one async copy brings the buffer to pinned host memory and a host
  event says when it has landed. The host reads that copy after the next launch of the same graph
  (``Timers.replayed``), while the GPU runs it. Measured on H200, FP8 slice at batch 1: +0.62 % of a
  1.92 ms step at layer level (5 marks), +1.31 % at span level (21 marks).
- ``event``: CUDA events recorded with ``external=True`` (event record nodes), resolved with
  ``elapsed_time``: +22 % of a 1.03 ms tiny step (27 spans), about 8 µs per mark. A launch records
  them again, so they are read before the graph's next launch (two graphs take turns). For machines
  without Triton (``stamp`` then refuses to start).

The marks are opt-in: they give the per-layer and per-collective split of the step that actually runs
(no launch gaps, unlike eager steps) at under 2 % with ``stamp``; the default is one event per step.

Both place their marks on the host clock through an anchor taken on an idle device at a known host time
(``perf_counter_ns``), and taken again at every ``Timers.flush`` (globaltimer and the host clock drift
apart slowly; flush once per batch keeps that bounded).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from spmd.config import env

MODES = ("off", "stamp", "event")
_stamp_kernel = None


def marks_mode() -> str:
    """SPMD_GRAPH_MARKS: off (default), stamp (needs Triton) or event."""
    mode = env.read("SPMD_GRAPH_MARKS") or "off"
    if mode not in MODES:
        raise ValueError(f"SPMD_GRAPH_MARKS={mode!r}, expected one of {MODES}")
    if mode == "stamp":
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            raise ValueError("SPMD_GRAPH_MARKS=stamp needs Triton (not importable here); use event") from exc
    return mode


LEVELS = ("span", "layer")


def marks_level() -> str:
    """SPMD_GRAPH_MARK_LEVEL: span (default: a mark pair per timer span) or layer (a mark per change of
    kind or layer: one compute span per layer, plus its collectives)."""
    level = env.read("SPMD_GRAPH_MARK_LEVEL") or "span"
    if level not in LEVELS:
        raise ValueError(f"SPMD_GRAPH_MARK_LEVEL={level!r}, expected one of {LEVELS}")
    return level


def _stamp():
    """The Triton kernel that writes %globaltimer at buf[slot] (compiled on first use)."""
    global _stamp_kernel
    if _stamp_kernel is None:
        import triton
        import triton.language as tl
        from triton.language.extra.cuda import globaltimer

        @triton.jit(do_not_specialize=["slot"])  # one compiled kernel for every slot: none compiles in a capture
        def stamp(buf, slot):
            tl.store(buf + slot, globaltimer())

        _stamp_kernel = stamp
    return _stamp_kernel


class StampMarks:
    """Marks of one graph: globaltimer stamps in a device buffer, copied to pinned memory per replay."""

    after_launch = True  # a replay's stamps stay in pinned memory until the next replay's copy is queued

    def __init__(self, device, capacity: int = 4096):
        self.n = 0
        self.dev = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.host = torch.zeros(capacity, dtype=torch.int64, pin_memory=True)
        self.done = torch.cuda.Event()

    def mark(self) -> int:
        """During capture: a stamp node; returns its slot."""
        if self.n == len(self.dev):
            raise RuntimeError(f"more than {len(self.dev)} timer marks in one CUDA graph")
        _stamp()[(1,)](self.dev, self.n)
        self.n += 1
        return self.n - 1

    def launched(self) -> None:
        """After a replay, on the same stream: bring the stamps to the host."""
        self.host[:self.n].copy_(self.dev[:self.n], non_blocking=True)
        self.done.record()

    def ready(self) -> bool:
        return self.done.query()

    def wait(self) -> None:
        self.done.synchronize()

    def times(self, anchor) -> np.ndarray:
        """Host ns of every mark of the last replay; anchor from ``stamp_anchor``."""
        host_ns, gpu_ns = anchor
        return self.host[:self.n].numpy() - gpu_ns + host_ns


class EventMarks:
    """Marks of one graph: external CUDA events (event record nodes)."""

    after_launch = False  # a launch re-records the events: the previous replay is read before it

    def __init__(self, device):
        self.events: list = []

    def mark(self) -> int:
        ev = torch.cuda.Event(enable_timing=True, external=True)
        ev.record()
        self.events.append(ev)
        return len(self.events) - 1

    def launched(self) -> None:
        pass

    def ready(self) -> bool:
        return self.events[-1].query()

    def wait(self) -> None:
        self.events[-1].synchronize()

    def times(self, anchor) -> np.ndarray:
        """Offsets from the first mark (small, so float32 ms keeps µs), placed by one elapsed time from the
        timers' (event, host ns) anchor."""
        a_ev, a_ns = anchor
        ref = self.events[0]
        base = a_ns + round(a_ev.elapsed_time(ref) * 1e6)
        return np.array([base + round(ref.elapsed_time(ev) * 1e6) for ev in self.events], dtype=np.int64)


def stamp_anchor(device) -> tuple[int, int]:
    """(host ns, globaltimer ns) of one moment: a stamp launched on an idle device, its host time taken
    as the middle of launch and synchronize (a few µs of uncertainty)."""
    buf = torch.zeros(1, dtype=torch.int64, device=device)
    _stamp()[(1,)](buf, 0)  # compiled outside any capture
    torch.cuda.synchronize(device)
    t0 = time.perf_counter_ns()
    _stamp()[(1,)](buf, 0)
    torch.cuda.synchronize(device)
    t1 = time.perf_counter_ns()
    return (t0 + t1) // 2, int(buf.item())


def new_marks(mode: str, device):
    return StampMarks(device) if mode == "stamp" else EventMarks(device)


class GraphTiming:
    """The timer spans of one captured graph and the marks that time them; false when it has none."""

    def __init__(self, marks=None):
        self.marks = marks
        self.spans: list[tuple] = []  # (name, kind, layer, start mark, end mark, bytes, group)

    def __bool__(self) -> bool:
        return bool(self.spans)
