"""Fault injection (``SPMD_FAULT``) and the step watchdog (``SPMD_WATCHDOG_S``): the job aborts, never hangs.

``SPMD_FAULT="RANK:PHASE:STEP:ACTION[,RANK:PHASE:STEP:ACTION...]"`` makes rank RANK fail on purpose:

    RANK    a rank of the job (0 .. world size - 1)
    PHASE   start (right after the world is made) | load | prefill | decode | other (the phases
            ``Timers.set_phase`` is called with)
    STEP    the step ``set_phase`` is called with (decode: 1, 2, ...; prefill: 0; load/other: -1), or
            ``*`` for the first time PHASE starts; start takes only ``*``
    ACTION  raise (RuntimeError "injected fault ...") | exit (``os._exit(3)``: no MPI_Finalize) |
            hang (sleep forever) | kill (SIGKILL to itself)

Each fault fires once, when its phase/step starts, after a ``fault: ...`` line on stderr that carries the
unix time it fired (the tests measure fault → end of job from it). Every rank parses and checks the value
at start (``from_env`` under ``world.agree``): a malformed one is a UsageError, i.e. ``error: ...`` and
exit 2 on every rank.

Watchdog: ``SPMD_WATCHDOG_S`` seconds (default 1800; 0 turns it off). A daemon thread aborts the whole
job (``error: rank R ...: no progress for N s in phase P step S (watchdog)``, then ``MPI_Abort``) when a
prefill or decode step has run for N s, i.e. no ``set_phase`` call came for N s while the phase was
prefill or decode. It is paused in other (waiting for the dispatcher or for the other replicas to finish is
legitimate), so a normal run never trips it unless one forward takes N s. Load has its own deadline
(``set_load_deadline``, from the program): the bytes a rank reads at a minimum rate, ``SPMD_LOAD_MIN_MBPS``
(default 20 MB/s per rank, a busy parallel file system's worst), at least LOAD_MIN_S, or exactly
``SPMD_LOAD_TIMEOUT_S`` seconds when that is set (0: no deadline); a rank hung while loading (a stuck
file system, a peer that never arrives) ends the job instead of running to the allocation's limit. It catches what the collective timeout cannot: a rank stuck
while its peers wait in an MPI call (no timeout there), e.g. a hung replica while the others wait in the
final gather.

Stacks: the watchdog prints the Python stack of every thread of the rank before it aborts, and
``install_stack_dump`` (called by the program at start) makes SIGUSR2 print them on demand, the rank
going on: ``kill -USR2`` one rank, or ``scancel --signal=USR2 --full JOBID`` every rank of a job.

Unset ``SPMD_FAULT`` and watchdog off cost nothing: ``Guard.hook`` then returns the profiler's callback
as it is. With the watchdog on, ``set_phase`` stores one tuple.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping

from spmd.config import env
from spmd.obs.timers import PHASES
from spmd.config import UsageError

POINTS = ("start",) + PHASES
ACTIONS = ("raise", "exit", "hang", "kill")
WATCHED = ("prefill", "decode")  # the phases whose steps the watchdog times
FAULT_ENV, WATCHDOG_ENV = "SPMD_FAULT", "SPMD_WATCHDOG_S"
LOAD_TIMEOUT_ENV, LOAD_RATE_ENV = "SPMD_LOAD_TIMEOUT_S", "SPMD_LOAD_MIN_MBPS"
WATCHDOG_DEFAULT_S = 1800.0
LOAD_MIN_S, LOAD_MIN_MBPS = 900.0, 20.0  # the load deadline: at least this, and bytes at this rate
EXIT_CODE = 3
_FORMAT = "expected RANK:PHASE:STEP:ACTION[,...], e.g. 1:decode:2:raise"


@dataclass(frozen=True)
class Fault:
    rank: int
    phase: str
    step: int | None  # None: `*`, the first time the phase starts
    action: str

    def __str__(self) -> str:
        return f"{self.rank}:{self.phase}:{'*' if self.step is None else self.step}:{self.action}"


def parse(text: str, size: int | None = None) -> list[Fault]:
    """``SPMD_FAULT``'s value → faults; UsageError naming the bad entry and field. "" → []."""
    if not text.strip():
        return []
    return [_parse_one(entry.strip(), size) for entry in text.split(",")]


def _parse_one(entry: str, size: int | None) -> Fault:
    def bad(why: str) -> UsageError:
        return UsageError(f"{FAULT_ENV} entry {entry!r}: {why} ({_FORMAT})")

    fields = entry.split(":")
    if len(fields) != 4:
        raise bad(f"{len(fields)} field(s), need 4")
    rank, phase, step, action = (f.strip() for f in fields)
    try:
        rank_i = int(rank)
    except ValueError:
        raise bad(f"RANK {rank!r} is not an integer") from None
    if rank_i < 0 or (size is not None and rank_i >= size):
        raise bad(f"RANK {rank_i} is not a rank of this job" + (f" (0..{size - 1})" if size else ""))
    if phase not in POINTS:
        raise bad(f"PHASE {phase!r} is not one of {', '.join(POINTS)}")
    if step == "*":
        step_i = None
    else:
        try:
            step_i = int(step)
        except ValueError:
            raise bad(f"STEP {step!r} is not an integer or *") from None
        if step_i < -1:
            raise bad(f"STEP {step_i} is < -1")
        if phase == "start":
            raise bad("PHASE start takes STEP *")
    if action not in ACTIONS:
        raise bad(f"ACTION {action!r} is not one of {', '.join(ACTIONS)}")
    return Fault(rank_i, phase, step_i, action)


def parse_seconds(name: str, text: str | None, default: float) -> float:
    """A ``*_S`` variable: seconds >= 0 (unset or empty: default); UsageError otherwise."""
    if text is None or not text.strip():
        return float(default)
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{name}={text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise UsageError(f"{name}={text!r} must be a finite number of seconds >= 0")
    return value


def _rate(text: str | None) -> float:
    """SPMD_LOAD_MIN_MBPS: MB/s > 0 (unset or empty: LOAD_MIN_MBPS); UsageError otherwise."""
    if text is None or not text.strip():
        return LOAD_MIN_MBPS
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise UsageError(f"{LOAD_RATE_ENV}={text!r} must be a number of MB/s > 0")
    return value


def where(rank: int, size: int) -> str:
    """``rank R of N (host)``: how error lines name a rank."""
    return f"rank {rank} of {size} ({socket.gethostname()})"


def _abort_job(code: int = 1) -> None:
    """MPI_Abort on COMM_WORLD (mpirun/srun then kill every rank); exit if that ever returns."""
    try:
        from mpi4py import MPI
        MPI.COMM_WORLD.Abort(code)
    finally:
        os._exit(code)


class Guard:
    """One rank's injected faults and step watchdog, driven by ``Timers.set_phase`` (see the module doc)."""

    def __init__(self, rank: int, size: int, faults: list[Fault] = (), watchdog_s: float = 0.0,
                 abort: Callable[[int], None] = _abort_job):
        self.rank, self.size = int(rank), int(size)
        self.faults = [f for f in faults if f.rank == self.rank]  # this rank's, each fires once
        self.watchdog_s = float(watchdog_s)
        self._abort = abort
        self.load_s, self._load_why = 0.0, ""  # the load deadline (set_load_deadline; 0: none)
        self._beat = (time.monotonic(), "start", -1)  # (when, phase, step) of the last set_phase
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_env(cls, rank: int, size: int, environ: Mapping[str, str] = os.environ) -> "Guard":
        """From ``SPMD_FAULT`` and ``SPMD_WATCHDOG_S``; UsageError if either is malformed."""
        faults = parse(env.read(FAULT_ENV, environ), size)
        watchdog = parse_seconds(WATCHDOG_ENV, env.read(WATCHDOG_ENV, environ) or None, WATCHDOG_DEFAULT_S)
        guard = cls(rank, size, faults, watchdog)
        guard._load_env = (env.read(LOAD_TIMEOUT_ENV, environ), env.read(LOAD_RATE_ENV, environ))
        parse_seconds(LOAD_TIMEOUT_ENV, guard._load_env[0] or None, 0.0)  # malformed: UsageError now
        _rate(guard._load_env[1])
        return guard

    _load_env: tuple = (None, None)  # SPMD_LOAD_TIMEOUT_S, SPMD_LOAD_MIN_MBPS as read by from_env

    def set_load_deadline(self, rank_bytes: int) -> float:
        """The load phase's deadline for a rank that reads `rank_bytes` (see the module doc); returns it.
        Call before ``start``."""
        timeout, rate = self._load_env
        if timeout is not None and timeout.strip():
            self.load_s = parse_seconds(LOAD_TIMEOUT_ENV, timeout, 0.0)
            self._load_why = f"{LOAD_TIMEOUT_ENV}={self.load_s:g}"
        else:
            mbps = _rate(rate)
            self.load_s = max(LOAD_MIN_S, rank_bytes / (mbps * 1e6))
            self._load_why = (f"{rank_bytes / 1e9:.1f} GB at {LOAD_RATE_ENV}={mbps:g}, at least {LOAD_MIN_S:g} s; "
                              f"{LOAD_TIMEOUT_ENV} sets it")
        return self.load_s

    @property
    def active(self) -> bool:
        return bool(self.faults) or self.watchdog_s > 0 or self.load_s > 0

    def hook(self, other: Callable[[str, int], None] | None = None):
        """The ``on_phase`` callback for Timers: ``other`` (e.g. the profiler's) then this guard's.

        When there is nothing to do (no fault for this rank, watchdog off) it is ``other`` itself.
        """
        if not self.active:
            return other
        if other is None:
            return self.on_phase

        def both(phase: str, step: int) -> None:
            other(phase, step)
            self.on_phase(phase, step)  # after the profiler: the step clock starts once its export is done
        return both

    def start(self) -> None:
        """Right after the world is made: fire the ``start`` faults, start the watchdog thread."""
        if (self.watchdog_s > 0 or self.load_s > 0) and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="spmd-watchdog", daemon=True)
            self._thread.start()
        _install_thread_hook(self.rank, self.size, self._abort)
        self.on_phase("start", -1)

    def on_phase(self, phase: str, step: int) -> None:
        self._beat = (time.monotonic(), phase, step)
        if self.faults:
            for f in self.faults:
                if f.phase == phase and (f.step is None or f.step == step):
                    self.faults.remove(f)
                    self._fire(f, phase, step)
                    break

    def close(self) -> None:
        """Stop the watchdog thread (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _fire(self, f: Fault, phase: str, step: int) -> None:
        at = f"{phase}" + (f" step {step}" if step >= 0 else "")
        print(f"fault: {where(self.rank, self.size)}: injecting {f.action} at {at} ({FAULT_ENV}={f}) "
              f"at unix time {time.time():.3f}", file=sys.stderr, flush=True)
        if f.action == "raise":
            raise RuntimeError(f"injected fault {f} ({FAULT_ENV}) at {at} on rank {self.rank}")
        if f.action == "exit":
            os._exit(EXIT_CODE)
        if f.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        while True:  # hang: the watchdog or a peer's collective timeout ends the job
            time.sleep(3600)

    def _watch(self) -> None:
        poll = min(max(min(s for s in (self.watchdog_s, self.load_s) if s > 0) / 10, 0.05), 5.0)
        while not self._stop.wait(poll):
            t, phase, step = self._beat
            idle = time.monotonic() - t
            if phase == "load" and 0 < self.load_s < idle:
                print(f"error: {where(self.rank, self.size)}: still loading after {idle:.0f} s (load deadline "
                      f"{self.load_s:.0f} s: {self._load_why}); aborting the job; where every thread of this "
                      f"rank is:", file=sys.stderr, flush=True)
            elif phase in WATCHED and 0 < self.watchdog_s < idle:
                print(f"error: {where(self.rank, self.size)}: no progress for {idle:.0f} s in phase {phase} "
                      f"step {step} (watchdog, {WATCHDOG_ENV}={self.watchdog_s:g}); aborting the job; "
                      f"where every thread of this rank is:", file=sys.stderr, flush=True)
            else:
                continue
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            self._abort(1)
            return


STACK_SIGNAL = signal.SIGUSR2


def install_stack_dump() -> None:
    """SIGUSR2 prints the Python stack of every thread of this rank to stderr, and the rank goes on:
    `kill -USR2 PID` (or `scancel --signal=USR2 --full JOBID`) shows where a slow or hung job is."""
    faulthandler.register(STACK_SIGNAL, file=sys.stderr, all_threads=True, chain=False)


def report_error(rank: int, size: int, exc: BaseException) -> None:
    """The ``error: rank R of N (host): Type: message`` line printed before an exception aborts the job."""
    print(f"error: {where(rank, size)}: {type(exc).__name__}: {_first_line(exc)}", file=sys.stderr, flush=True)


def _install_thread_hook(rank: int, size: int, abort: Callable[[int], None]) -> None:
    """An exception escaping one of the program's threads (``spmd-*``, e.g. the dispatcher) aborts the
    job like one in the main thread would; other threads keep Python's default hook."""
    previous = threading.excepthook
    if getattr(previous, "_spmd", False):
        return

    def hook(args) -> None:
        previous(args)
        if args.thread is not None and args.thread.name.startswith("spmd-") and args.exc_type is not SystemExit:
            print(f"error: {where(rank, size)}: thread {args.thread.name}: {args.exc_type.__name__}: "
                  f"{_first_line(args.exc_value)}", file=sys.stderr, flush=True)
            abort(1)

    hook._spmd = True
    threading.excepthook = hook


def _first_line(exc: BaseException | None) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return line[:500] + (" ..." if len(line) > 500 or "\n" in text else "")
