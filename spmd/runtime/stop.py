"""Stopping early on SIGTERM (or SIGUSR1): finish the batch in flight, agree, exit 75 without an output.

Slurm sends SIGTERM to every task some time before the time limit (`#SBATCH --signal=TERM@120`);
`mpirun` turns a SIGTERM of its own into killing the job, but forwards SIGUSR1 to every rank
(`kill -USR1 <mpirun pid>`). The handler only sets a flag; a second signal of the same kind, REPEAT_S
or more after the first, terminates the process at once. One sooner is the same request delivered twice:
Slurm's `--signal` reaches every process of a task, so the rank gets it both from Slurm and from
launch/rank.sh, which forwards what it gets to the rank.

At every batch boundary the ranks of a model group agree on the flag (one tiny allreduce over the
group's communicator: they run the model together, so they are at the same boundary). A group that
stops because of its own signal tells the other replica leaders with a non-blocking message, which
they look for at their next boundary, so every replica stops after its current batch even if only
some ranks got the signal. With dynamic dispatch the stopping leader's next request carries the
stop, and rank 0's dispatcher hands out nothing more. After the loop every rank meets once in an
allgather on COMM_WORLD (replicas with fewer batches simply arrive earlier, nobody waits on a
message that never comes): if any group stopped, every rank exits with EX_TEMPFAIL (75); the
finished prompts are already in the progress directory (`spmd.runtime.resume`), `--resume` runs the rest.
"""
from __future__ import annotations

import os
import signal
import sys
import time

from mpi4py import MPI

from spmd.runtime.world import finalize_and_exit

EX_TEMPFAIL = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
TAG_STOP = 14

REPEAT_S = 2.0  # a second signal of the same kind at least this long after the first stops the rank at once

_received: str | None = None  # the name of the first stop signal this process got
_received_at = 0.0  # time.monotonic() of it


def install() -> None:
    """Catch SIGTERM and SIGUSR1 on this rank (main thread)."""
    for s in SIGNALS:
        signal.signal(s, _handler)


def _handler(signum, frame) -> None:
    global _received, _received_at
    name = signal.Signals(signum).name
    if _received == name:
        if time.monotonic() - _received_at < REPEAT_S:  # one request, delivered twice (Slurm + rank.sh)
            return
        signal.signal(signum, signal.SIG_DFL)  # asked again: stop now
        os.kill(os.getpid(), signum)
        return
    if _received is None:
        _received, _received_at = name, time.monotonic()


def received() -> str | None:
    return _received


class Stopped(Exception):
    """Every rank: the job stopped early on a signal; `done` of `total` prompts are finished on disk."""

    def __init__(self, signame: str, done: int, total: int, progress_dir=None):
        super().__init__(f"stopped by {signame} after {done} of {total} prompts")
        self.signame, self.done, self.total, self.progress_dir = signame, done, total, progress_dir


class Agreement:
    """One run's stop decision, taken at batch boundaries (see the module doc)."""

    def __init__(self, world, progress_dir=None):
        self.world, self.progress_dir = world, progress_dir
        self.decided = False
        self.sent: list = []         # isend requests of our notices
        self.notified: list[int] = []  # the leaders we sent a notice to
        self.got = 0                 # notices received

    def check(self) -> bool:
        """Every rank of the group, before each batch: True once the group stops (and from then on)."""
        if self.decided:
            return True
        w = self.world
        v = 1 if _received is not None else 0
        if w.is_leader and self._poll():
            v |= 2
        if w.group_size > 1:
            v = w.group_comm.allreduce(v, op=MPI.BOR)
        if v:
            self.decided = True
            if w.is_leader and not v & 2:  # our own signal: tell the other replicas
                self.notified = [w.leader(r) for r in range(w.n_replicas) if r != w.replica]
                self.sent = [w.comm.isend(None, dest=d, tag=TAG_STOP) for d in self.notified]
        return self.decided

    def _poll(self) -> bool:
        comm, got = self.world.comm, False
        while comm.iprobe(source=MPI.ANY_SOURCE, tag=TAG_STOP):
            comm.recv(source=MPI.ANY_SOURCE, tag=TAG_STOP)
            self.got += 1
            got = True
        return got

    def finish(self, n_done: int, n_prior: int, n_total: int) -> None:
        """Every rank, once, after its loop: collect the notices still on their way; raise Stopped on every
        rank if any group stopped. n_done: prompts this rank's group finished (counted on leaders)."""
        w = self.world
        info = w.comm.allgather((self.decided, self.notified, n_done if w.is_leader else 0, _received))
        expected = sum(n.count(w.rank) for _, n, _, _ in info)
        while self.got < expected:
            w.comm.recv(source=MPI.ANY_SOURCE, tag=TAG_STOP)
            self.got += 1
        MPI.Request.waitall(self.sent)
        if any(d for d, _, _, _ in info):
            names = sorted({s for _, _, _, s in info if s})
            raise Stopped("/".join(names) or "a signal", n_prior + sum(n for _, _, n, _ in info), n_total,
                          self.progress_dir)


def exit_stopped(comm, exc: Stopped) -> None:
    """Every rank raised the same Stopped: rank 0 says so once, all finalize and exit EX_TEMPFAIL."""
    if comm.rank == 0:
        print(f"{exc}; the finished ones are in {exc.progress_dir}: rerun with --resume to do the rest "
              f"(exit {EX_TEMPFAIL})", file=sys.stderr, flush=True)
    finalize_and_exit(comm, EX_TEMPFAIL)
