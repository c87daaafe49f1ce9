"""Per-rank event timers and their HDF5 writer.

Schema (one row per event, dataset ``events`` of a rank file, numpy dtype ``EVENT_FIELDS``):

    name      S*     what ran; the name used in the code ("moe.combine", "attn.wq_b", ...)
    kind      S*     "compute" | "comm" (a collective) | "io" (file/host I/O) | "wait" (blocked on others)
    phase     S*     "load" | "prefill" | "decode" | "other", set by ``set_phase`` for the events after it
    step      int32  decode step (or any caller counter) from ``set_phase``; -1 when not given
    layer     int32  transformer layer index; -1 when not tied to one layer
    start_ns  int64  start on the aligned clock: ns since the ``align()`` barrier (negative = before it)
    dur_ns    int64  duration in ns
    bytes     int64  payload bytes of this rank's buffer for a collective (or bytes read/written for io)
    group     S*     communicator name of a collective ("tp", "ep", "world", ...); "" otherwise

Strings are stored as fixed-width bytes (numpy ``S``, UTF-8 encoded), the width being the longest value
in that file; ``table()`` returns the same dtype, so compare with ``b"comm"``.

Callers: the engines attach one Timers per rank to what they build (``spmd.parallel.comm.attach_timers``);
layers open their compute spans through it and ``spmd.parallel.comm.Group`` times each named collective
(no layer takes a Timers argument); the runtime records io, wait and phases, the engines their own spans.

Leaf rule: events are LEAF intervals. Code times the compute between two collectives as one event and
each collective as its own event, never one around the other, so summing ``dur_ns`` per kind never counts
a nanosecond twice. Opening a context while another one is open raises RuntimeError. ``record()`` is not
checked: the caller keeps the rule. For speed the contexts are one reusable object per Timers, so enter
the returned context at once (``with timers.compute("x"):``); don't keep it for later.

Clock: ``align(comm)`` runs a barrier and takes t0 right after it on every rank, so ``start_ns`` of all
ranks share one clock to within the barrier's exit skew. Rank 0's wall-clock time at t0 (``epoch_ns``)
is broadcast so a run can be placed in absolute time. Events are stored as raw host times and shifted at
``table()`` time, so events recorded before ``align()`` are kept and land on the aligned clock with
negative ``start_ns``; without any ``align()`` the clock starts at construction.

CUDA (``device.type == "cuda"``): compute and comm are timed by CUDA event pairs recorded on the
current stream, never synchronized per event; ``flush()`` synchronizes once, converts every pending pair
with an anchor event whose host time is known (start = anchor host time + elapsed(anchor, start)), and
re-anchors so float32 ``elapsed_time`` stays precise and GPU/host clock drift stays bounded between
flushes. Their times are GPU-stream times (when the stream reached the events). Construction and
``align()`` synchronize the device once each to place the anchor. io and wait always use the host
clock. ``nvtx=True`` also pushes an NVTX range with the event's name (CUDA only). Resolved events are
reused and Stream objects cached, so recording a CUDA interval costs ~8 µs of host time (H200 host).

HDF5 rank file ``rank{r:05d}.h5`` (written atomically by spmd.obs.rankfile; run metadata: spmd.obs.metadata):
dataset ``events``; file attributes ``schema``, ``rank``,
``epoch_ns`` (rank 0's wall clock at t0), ``local_epoch_ns`` (this rank's), ``clock_t0_ns`` (this rank's
``perf_counter_ns``, i.e. CLOCK_MONOTONIC, at t0: what profiler importers subtract), ``aligned`` (bool),
``device``, plus every key of the caller's ``meta`` (dict/list/tuple/None as JSON strings, scalars as
is). A ``world_size`` attribute, when given, is what ``traces.merge`` checks for missing ranks.

CUDA graphs (opt-in, ``SPMD_GRAPH_MARKS=stamp|event``): inside ``capturing()`` a compute/comm span is
timed by marks that the graph being captured records itself (``spmd.obs.graph_marks``); every replay
records them again, and ``replayed(timing)`` after the launch stamps that replay with the current phase
and step. Stamp marks (the default) are copied to pinned host memory after each replay; the next
``replayed`` of the same graph, after its launch, reads that copy while the GPU runs the new replay, so
one graph per shape suffices and no timer work precedes a launch. Event marks are re-recorded by the
launch itself: ``before_replay`` resolves the previous replay before the graph is launched again (it
waits for it), so a caller alternates two graphs of one step to keep that off the critical path. Any
replay is also resolved when another graph's launch finds it finished, or at ``flush()``. NVTX ranges are host calls and
are not captured: a replay shows as one range. ``SPMD_GRAPH_MARK_LEVEL=layer`` merges the spans that
follow each other with the same kind and layer into one (named ``layer.compute`` / ``layer.comm`` when
their names differ, bytes summed): a mark per compute/comm change instead of per span, for the
per-layer compute/comm split at a fraction of the marks; the capture ends with ``end_capture()``.

``on_phase(phase, step)``, when given, is called by every ``set_phase`` (the profiler window hook).
Not thread safe: one Timers per rank, used from the thread that runs the model.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from spmd.obs.graph_marks import GraphTiming, StampMarks, marks_level, marks_mode, new_marks, stamp_anchor
from spmd.obs.rankfile import attr_value, encode_column, write_h5_atomic

SCHEMA = "spmd-trace/1"
KINDS = ("compute", "comm", "io", "wait")
PHASES = ("load", "prefill", "decode", "other")
# (field, numpy type); "S" fields get their width at table() time
EVENT_FIELDS = (
    ("name", "S"), ("kind", "S"), ("phase", "S"), ("step", "<i4"), ("layer", "<i4"),
    ("start_ns", "<i8"), ("dur_ns", "<i8"), ("bytes", "<i8"), ("group", "S"),
)
_RESERVED = ("schema", "rank", "epoch_ns", "local_epoch_ns", "clock_t0_ns", "aligned", "device")
_perf_ns = time.perf_counter_ns


class _HostSpan:
    """Reusable context timing one leaf interval on the host clock; ``arm`` sets what it times."""

    __slots__ = ("_t", "_name", "_kind", "_nbytes", "_group", "_layer", "_start")

    def __init__(self, timers):
        self._t = timers

    def arm(self, name, kind, nbytes, group, layer):
        t = self._t
        if t._open is not None:  # checked here too, so arming never clobbers an open span
            t._nested(name)
        self._name, self._kind, self._nbytes, self._group, self._layer = name, kind, nbytes, group, layer
        return self

    def __enter__(self):
        t = self._t
        if t._open is not None:
            t._nested(self._name)
        t._open = self._name
        if t._nvtx:
            torch.cuda.nvtx.range_push(self._name)
        self._start = _perf_ns()
        return self

    def __exit__(self, *exc):
        end = _perf_ns()
        t = self._t
        t._events.append((self._name, self._kind, t._phase, t._step, self._layer,
                          self._start, end - self._start, self._nbytes, self._group))
        t._open = None
        if t._nvtx:
            torch.cuda.nvtx.range_pop()
        return False


class _CudaSpan(_HostSpan):
    """Reusable context timing one leaf interval with a CUDA event pair on the current stream (no sync)."""

    __slots__ = ()

    def __enter__(self):
        t = self._t
        if t._open is not None:
            t._nested(self._name)
        t._open = self._name
        if t._captured is not None:  # a mark recorded by the graph being captured
            t._graph_enter(self)
            return self
        if t._nvtx:
            torch.cuda.nvtx.range_push(self._name)
        self._start = t._record_now()
        return self

    def __exit__(self, *exc):
        t = self._t
        t._open = None
        if t._captured is not None:
            t._graph_exit(self)
            return False
        t._pending.append((self._name, self._kind, t._phase, t._step, self._layer,
                           t._anchor, self._start, t._record_now(), self._nbytes, self._group))
        if t._nvtx:
            torch.cuda.nvtx.range_pop()
        return False


class Timers:
    """Collects leaf-interval events of one rank; see the module docstring for the schema."""

    def __init__(self, rank: int, device: torch.device | str = "cpu", enabled: bool = True,
                 nvtx: bool = False, on_phase=None):
        self.rank = int(rank)
        self._on_phase = on_phase
        self.device = torch.device(device)
        self.enabled = bool(enabled)
        self._cuda = self.enabled and self.device.type == "cuda"
        self._nvtx = self._cuda and bool(nvtx)
        self._null = nullcontext()
        # one reusable span per clock: the leaf rule allows a single open span at a time
        self._host_span = _HostSpan(self)
        self._dev_span = _CudaSpan(self) if self._cuda else self._host_span
        # resolved: (name, kind, phase, step, layer, host_ns, dur_ns, bytes, group)
        self._events: list[tuple] = []
        self._pending: list[tuple] = []  # CUDA: (..., anchor, start_event, end_event, bytes, group)
        self._phase, self._step = "other", -1
        self._open: str | None = None
        self._t0 = _perf_ns()
        self._epoch_ns = self._local_epoch_ns = time.time_ns()
        self._aligned = False
        self._free_events: list = []  # resolved CUDA events, reused: no cudaEventCreate per record
        self._captured: GraphTiming | None = None  # of the CUDA graph being captured (see capturing())
        self._run: list | None = None  # level "layer": the open run of spans of one kind and layer
        self._layer_level = False
        self._last_end: int | None = None           # its last mark, when it ended a span
        self._replays: list[tuple] = []              # (timing, phase, step, anchor) not resolved yet
        self._stamp_anchor: tuple[int, int] | None = None  # (host ns, globaltimer ns), stamp marks only
        self._streams: dict = {}       # current-stream key -> torch Stream (building one costs µs)
        if self._cuda:  # "cuda" without an index means the device current at construction
            index = self.device.index
            self._dev_index = torch.cuda.current_device() if index is None else index
            # private, fast; torch.cuda.current_stream() itself reads this key
            self._stream_key = getattr(torch._C, "_cuda_getCurrentStream", None)
        self._anchor = self._new_anchor() if self._cuda else None

    @property
    def epoch_ns(self) -> int:
        """Rank 0's wall-clock ns at the aligned t0 (this rank's construction time before align)."""
        return self._epoch_ns

    def now_ns(self) -> int:
        """Current host time on the aligned clock, for ``record()`` callers."""
        return _perf_ns() - self._t0

    def align(self, comm) -> None:
        """Barrier on ``comm`` (mpi4py), then take t0; rank 0's epoch at t0 is broadcast."""
        if self._cuda:
            torch.cuda.synchronize(self._dev_index)  # before the barrier, so the barrier is the last wait
        comm.Barrier()
        self._t0 = _perf_ns()
        self._local_epoch_ns = time.time_ns()
        if self._cuda:
            self._anchor = (self._record_now(), self._t0)
        self._epoch_ns = int(comm.bcast(self._local_epoch_ns, root=0))
        self._aligned = True

    def set_phase(self, phase: str, step: int = -1) -> None:
        """Phase and step stamped on the events recorded after this call."""
        if phase not in PHASES:
            raise ValueError(f"phase={phase!r} not in {PHASES}")
        self._phase, self._step = phase, int(step)
        if self._on_phase is not None:
            self._on_phase(phase, self._step)

    def compute(self, name: str, layer: int = -1):
        """Context timing a compute block (CUDA events on GPU)."""
        if not self.enabled:
            return self._null
        return self._dev_span.arm(name, "compute", 0, "", layer)

    def comm(self, name: str, nbytes: int, group: str = "", layer: int = -1):
        """Context timing one collective; ``nbytes`` = payload bytes of this rank's buffer."""
        if not self.enabled:
            return self._null
        return self._dev_span.arm(name, "comm", nbytes, group, layer)

    @contextmanager
    def suspended(self):
        """Record nothing inside (e.g. while a CUDA graph is captured: its work runs later, at replay)."""
        was, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = was

    @contextmanager
    def capturing(self):
        """Context for the capture of a CUDA graph: the compute/comm spans opened inside are timed by
        marks the graph records itself (``spmd.obs.graph_marks``); yields their ``GraphTiming``, which each
        replay of that graph times again (``replayed``). Spans that follow each other share one mark
        (the end of one is the start of the next), so untimed work between two spans counts in the
        second. io and wait spans record nothing. Disabled timers, a CPU device or SPMD_GRAPH_MARKS=off
        record nothing and yield an empty GraphTiming."""
        mode = marks_mode() if self._cuda and self.enabled else "off"
        if mode == "off":
            with self.suspended():
                yield GraphTiming()
            return
        if mode == "stamp" and self._stamp_anchor is None:
            self._stamp_anchor = stamp_anchor(self._dev_index)  # also compiles the stamp kernel
        timing = GraphTiming(new_marks(mode, self._dev_index))
        self._captured, self._last_end, self._run = timing, None, None
        self._layer_level = marks_level() == "layer"
        try:
            with _host_only(self):
                yield timing
        finally:
            self._captured = self._run = None

    def replayed(self, timing) -> None:
        """Called right after a graph captured with ``capturing()`` was launched, on the same stream: its
        spans are stamped with the current phase and step. Earlier replays of *other* graphs that have
        finished are resolved here, while the GPU runs this one; call ``before_replay(timing)`` before
        launching the same graph again (the launch overwrites its marks)."""
        if not timing or not self.enabled:
            return
        if timing.marks.after_launch:  # the previous replay's stamps are on the host until launched() below
            for entry in [r for r in self._replays if r[0] is timing]:
                timing.marks.wait()
                self._resolve_replay(entry)
        timing.marks.launched()
        for entry in [r for r in self._replays if r[0] is not timing and r[0].marks.ready()]:
            self._resolve_replay(entry)
        anchor = self._stamp_anchor if isinstance(timing.marks, StampMarks) else self._anchor
        self._replays.append((timing, self._phase, self._step, anchor))

    def before_replay(self, timing) -> None:
        """Before this graph is launched again: resolve its previous replay if the launch would overwrite
        its marks before the host reads them (event marks; waits for that replay to finish). Stamp marks
        are read from their host copy, which only the next ``replayed`` replaces: they are resolved there,
        after the launch, while the GPU runs the new replay (no host work before the launch)."""
        if timing.marks.after_launch:
            return
        for entry in [r for r in self._replays if r[0] is timing]:
            timing.marks.wait()
            self._resolve_replay(entry)

    def _resolve_replay(self, entry) -> None:
        timing, phase, step, anchor = entry
        self._replays = [r for r in self._replays if r is not entry]
        times = timing.marks.times(anchor).tolist()
        for name, kind, layer, i0, i1, nbytes, group in timing.spans:
            self._events.append((name, kind, phase, step, layer, times[i0], times[i1] - times[i0], nbytes, group))

    def io(self, name: str, nbytes: int = 0):
        """Context timing host I/O on the host clock."""
        if not self.enabled:
            return self._null
        return self._host_span.arm(name, "io", nbytes, "", -1)

    def wait(self, name: str):
        """Context timing time blocked on other ranks or the dispatcher, on the host clock."""
        if not self.enabled:
            return self._null
        return self._host_span.arm(name, "wait", 0, "", -1)

    def record(self, name, kind, start_ns, dur_ns, nbytes=0, group="", layer=-1) -> None:
        """Add an event timed elsewhere; ``start_ns`` is host ns on the aligned clock."""
        if not self.enabled:
            return
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} not in {KINDS}")
        self._events.append((name, kind, self._phase, self._step, int(layer),
                             int(start_ns) + self._t0, int(dur_ns), int(nbytes), group))

    def flush(self) -> None:
        """Resolve pending CUDA event pairs (and graph replays) into ns with one synchronize; no-op on CPU."""
        if not self._pending and not self._replays:
            return
        torch.cuda.synchronize(self._dev_index)
        for entry in list(self._replays):
            self._resolve_replay(entry)
        if self._stamp_anchor is not None:
            self._stamp_anchor = stamp_anchor(self._dev_index)
        for name, kind, phase, step, layer, anchor, ev0, ev1, nbytes, group in self._pending:
            a_ev, a_ns = anchor
            start = a_ns + round(a_ev.elapsed_time(ev0) * 1e6)
            dur = round(ev0.elapsed_time(ev1) * 1e6)
            self._events.append((name, kind, phase, step, layer, start, dur, nbytes, group))
            self._free_events += (ev0, ev1)
        self._pending.clear()
        self._anchor = self._new_anchor(synced=True)

    def clear(self) -> None:
        """Drop every event recorded so far (after resolving the pending ones)."""
        self.flush()
        self._events.clear()

    def table(self) -> np.ndarray:
        """All events so far (flushed), sorted by start_ns, as a structured array."""
        self.flush()
        ev = self._events
        dtype, arrays = [], []
        for i, (field, typ) in enumerate(EVENT_FIELDS):
            col = [e[i] for e in ev]  # per column: zip(*ev) is much slower for long lists
            arr = encode_column(col) if typ == "S" else np.array(col, dtype=typ)
            if field == "start_ns":
                arr = arr - self._t0
            dtype.append((field, arr.dtype))
            arrays.append(arr)
        out = np.empty(len(ev), dtype=dtype)
        for (field, _), arr in zip(EVENT_FIELDS, arrays):
            out[field] = arr
        return out[np.argsort(out["start_ns"], kind="stable")]

    def write(self, path, meta: dict) -> Path:
        """Flush, then write ``path/rank{r:05d}.h5`` (or ``path`` itself if it ends in .h5) atomically."""
        path = Path(path)
        if path.suffix not in (".h5", ".hdf5"):
            path = path / f"rank{self.rank:05d}.h5"
        attrs = self._file_attrs(meta)
        write_h5_atomic(path, {"events": self.table()}, attrs)
        return path

    def _file_attrs(self, meta: dict) -> dict:
        clash = [k for k in _RESERVED if k in meta and not (k == "rank" and meta[k] == self.rank)]
        if clash:
            raise ValueError(f"meta keys {clash} are reserved for Timers")
        attrs = {k: attr_value(v) for k, v in meta.items()}
        attrs.update(schema=SCHEMA, rank=self.rank, epoch_ns=self._epoch_ns,
                     local_epoch_ns=self._local_epoch_ns, clock_t0_ns=self._t0, aligned=self._aligned,
                     device=str(self.device))
        return attrs

    def _nested(self, name: str):
        raise RuntimeError(f"timers: {name!r} opened inside {self._open!r}; events must be leaf "
                           f"intervals (time the parts between collectives, not around them)")

    def _record_now(self):
        """A timing event recorded now on this device's current stream."""
        ev = self._free_events.pop() if self._free_events else torch.cuda.Event(enable_timing=True)
        ev.record(self._current_stream())
        return ev

    def _graph_enter(self, span) -> None:
        """A span opens in a capture. Level "layer": it continues the run of spans of its kind and layer
        (no mark), or its start mark ends that run."""
        run = self._run
        if run is not None and (run[1], run[2]) == (span._kind, span._layer):
            return
        if run is not None:
            self._end_run()
        start = self._graph_mark(start=True)
        if self._layer_level:
            self._run = [span._name, span._kind, span._layer, start, 0, span._group]
        else:
            span._start = start

    def _graph_exit(self, span) -> None:
        run = self._run
        if run is None:
            self._captured.spans.append((span._name, span._kind, span._layer, span._start,
                                         self._graph_mark(start=False), span._nbytes, span._group))
            return
        run[4] += span._nbytes
        if run[0] != span._name:
            run[0] = f"layer.{span._kind}"  # several spans in one run: named by kind (per layer in `layer`)

    def _end_run(self) -> None:
        name, kind, layer, start, nbytes, group = self._run
        self._run = None
        self._captured.spans.append((name, kind, layer, start, self._graph_mark(start=False), nbytes, group))

    def end_capture(self) -> None:
        """Inside the capture, after the forward: the last run's end mark (level "layer")."""
        if self._captured is not None and self._run is not None:
            self._end_run()

    def _graph_mark(self, start: bool) -> int:
        """A mark in the graph being captured; a start right after an end reuses that end's mark."""
        if start and self._last_end is not None:
            mark, self._last_end = self._last_end, None
            return mark
        mark = self._captured.marks.mark()
        self._last_end = None if start else mark
        return mark

    def _current_stream(self):
        # torch.cuda.current_stream() builds a new Stream object per call (~5 µs): cache them by the
        # (id, device, type) key it reads, so a `with torch.cuda.stream(s)` block is still honoured
        if self._stream_key is None:
            return torch.cuda.current_stream(self._dev_index)
        key = self._stream_key(self._dev_index)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = torch.cuda.current_stream(self._dev_index)
        return stream

    def _new_anchor(self, synced: bool = False):
        # stream idle after a sync, so the event fires within launch latency of the host time taken
        if not synced:
            torch.cuda.synchronize(self._dev_index)
        host = _perf_ns()
        return (self._record_now(), host)


@contextmanager
def _host_only(timers: Timers):
    """io/wait spans inside a capture would time the capture, not the replay: record nothing."""
    host, timers._host_span = timers._host_span, _NullSpan()
    try:
        yield
    finally:
        timers._host_span = host


class _NullSpan(nullcontext):
    def arm(self, *args):
        return self
