"""Work distribution over MPI: static scatter, dynamic dispatch, progress, ordered gather.

A work item is a `WorkItem` (index, token ids; scoring adds the baseline's tokens). Every rank of a
model group must see the same items in the same order (they run one model together), so items go
to group leaders and are broadcast inside the group. Results come back as `Result`s carrying their
`index`; rank 0 restores input order. Static shares and dynamic chunks both go longest prompt first
(`longest_first`). With a dedicated orchestrator (world rank 0, no model) the
dispatcher runs in its main thread, and each leader's request for more work carries the results of
its previous chunk, so rank 0 receives, decodes and writes them while the groups compute.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

from mpi4py import MPI

from spmd.runtime.records import Result, WorkItem
from spmd.runtime.world import World

TAG_REQUEST, TAG_WORK, TAG_PROGRESS = 11, 12, 13
POLL_MIN_S, POLL_MAX_S = 50e-6, 1e-3  # the dispatcher's wait for requests (_Server._next_request)


def balance(lengths: list[int], n_bins: int) -> list[list[int]]:
    """Length-balanced assignment: longest first, each to the least-loaded bin (ties: lowest bin)."""
    bins: list[list[int]] = [[] for _ in range(n_bins)]
    load = [0] * n_bins
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        b = min(range(n_bins), key=lambda b: (load[b], b))
        bins[b].append(i)
        load[b] += lengths[i]
    return [sorted(b) for b in bins]


def scatter_static(world: World, items: list[WorkItem] | None) -> list[WorkItem]:
    """Rank 0 splits the items over the replicas by length; every rank gets its replica's share."""
    per_rank = None
    if world.rank == 0:
        shares = balance([len(it.ids) for it in items], world.n_replicas)
        per_rank = [[items[i] for i in shares[(r - world.first) // world.group_size]] if r >= world.first else []
                    for r in range(world.size)]
    return world.comm.scatter(per_rank, root=0)


def longest_first(items: list[WorkItem]) -> list[WorkItem]:
    """Items by prompt length, longest first (ties in input order): a chunk's batches then hold prompts of
    similar length (less padding), and the short ones come last, where they even out the replicas' finish."""
    return sorted(items, key=lambda it: (-len(it.ids), it.index))


class _Server:
    """Rank 0's dispatcher: hands the next chunk to any leader that asks, until all are told to stop.
    Chunks are taken longest prompt first (`longest_first`), as a static share is batched.

    A request is `(halt, rows)`: halt=True (a leader stopping on a signal, or `should_halt()` on rank 0)
    halts it: from then on every leader gets the empty chunk that ends its loop. rows (a dedicated
    orchestrator's leaders) are the results of the leader's previous chunk, handed to `on_rows`.
    """

    def __init__(self, comm, items: list[WorkItem], chunk: int, n_remote: int, on_rows=None, timers=None,
                 should_halt=None):
        self.comm, self.chunk, self.n_remote = comm, chunk, n_remote
        self.items, self.pos, self.lock = longest_first(items), 0, threading.Lock()
        self.halted = False
        self.on_rows, self.timers, self.should_halt = on_rows, timers, should_halt

    def halt(self) -> None:
        with self.lock:
            self.halted = True

    def take(self) -> list[WorkItem]:
        with self.lock:
            if self.halted:
                return []
            out = self.items[self.pos:self.pos + self.chunk]
            self.pos += len(out)
            return out

    def _next_request(self, status: MPI.Status):
        """The next leader's request, polled with sleeps that grow to POLL_MAX_S: a blocking receive busy-waits
        in MPI (a whole core for the job's length, on the orchestrator's shared node or, inline, beside rank
        0's own model work); a request is answered at most POLL_MAX_S late, against chunks of seconds."""
        delay = POLL_MIN_S
        while (msg := self.comm.improbe(source=MPI.ANY_SOURCE, tag=TAG_REQUEST, status=status)) is None:
            time.sleep(delay)
            delay = min(2 * delay, POLL_MAX_S)
        return msg.recv()

    def run(self) -> None:
        stopped, status = 0, MPI.Status()
        while stopped < self.n_remote:
            with _waiting(self.timers, "dispatch.serve"):  # a dedicated orchestrator's idle time
                halt, rows = self._next_request(status)
            if halt or (self.should_halt is not None and self.should_halt()):
                self.halt()
            work = self.take()
            self.comm.send(work, dest=status.Get_source(), tag=TAG_WORK)
            stopped += not work
            if rows and self.on_rows is not None:
                self.on_rows(rows)  # after the reply: the group computes meanwhile


def serve_chunks(world: World, items: list[WorkItem], chunk: int, on_rows, timers=None, should_halt=None) -> None:
    """A dedicated orchestrator (world rank 0): serve every leader until each got its empty chunk; the
    results each request carries go to on_rows(rows)."""
    _Server(world.comm, items, chunk, world.n_replicas, on_rows, timers, should_halt).run()


def iter_dynamic(world: World, items: list[WorkItem] | None, chunk: int, timers=None,
                 stop=None, outbox: list | None = None) -> Iterator[list[WorkItem]]:
    """Chunks of `chunk` items, handed to model groups as they ask for more; ends with an empty chunk.

    `stop` (a `stop.Agreement`): once its group has decided to stop, the next request halts the dispatcher.
    `outbox` (leaders, dedicated orchestrator): the caller's finished rows; each request takes them along.
    """
    inline = world.rank == 0 and not world.first
    if not world.first and world.n_replicas > 1 and MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        raise RuntimeError("dynamic dispatch needs MPI_THREAD_MULTIPLE (rank 0 serves chunks from a thread)")
    server = None
    if inline:
        server = _Server(world.comm, items, chunk, world.n_replicas - 1)
        thread = threading.Thread(target=server.run, name="spmd-dispatch", daemon=True)
        thread.start()
    while True:
        work = None
        if world.is_leader:
            halt = True if stop is not None and stop.decided else None
            rows = list(outbox or ())
            if outbox:
                outbox.clear()
            with _waiting(timers, "dispatch.request"):
                if server is not None:
                    if halt:
                        server.halt()
                    work = server.take()
                else:
                    world.comm.send((halt, rows), dest=0, tag=TAG_REQUEST)
                    work = recv_within(world.comm, 0, TAG_WORK, _answer_s(), "the dispatcher's next chunk")
        with _waiting(timers, "dispatch.group_bcast"):
            work = world.group_comm.bcast(work, root=0)
        if not work:
            break
        yield work
    if server is not None:
        thread.join()


def iter_static(world: World, items: list[WorkItem] | None, batch: int) -> Iterator[list[WorkItem]]:
    """This replica's share, in batches of similar length (sorted longest first to limit padding)."""
    mine = scatter_static(world, items)
    mine = longest_first(mine)
    for i in range(0, len(mine), batch):
        yield mine[i:i + batch]


class Progress:
    """Prompts done and their output tokens, summed on rank 0 (tqdm bar there, output tokens/s since the
    bar's start as its postfix); leaders report (prompts, tokens) with non-blocking sends."""

    def __init__(self, world: World, total: int, enabled: bool = True, initial: int = 0):
        self.world, self.total, self.done, self.pending = world, total, initial, []
        self.tokens, self.start = 0, time.perf_counter()  # this run's: --resume's earlier prompts don't count
        self.received = 0  # reports from other leaders (rank 0)
        self.bar = None
        if world.rank == 0 and enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="prompt", desc="prompts", dynamic_ncols=True)

    def update(self, n: int, tokens: int = 0) -> None:
        """A leader finished n prompts with `tokens` output tokens in all (a dedicated orchestrator counts the
        rows it receives: `add`)."""
        if not self.world.is_leader or self.world.first:
            return
        if self.world.rank == 0:
            self._count(n, tokens)
            self._poll()
        else:
            self.pending.append(self.world.comm.isend((n, tokens), dest=0, tag=TAG_PROGRESS))

    def add(self, n: int, tokens: int = 0) -> None:
        """Rank 0: n more prompts are done, with `tokens` output tokens."""
        self._count(n, tokens)

    def rate(self) -> float:
        """Output tokens per second since the start."""
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)

    def _count(self, n: int, tokens: int = 0) -> None:
        self.done += n
        self.tokens += tokens
        if self.bar is not None:
            if self.tokens:  # before bar.update, which redraws
                self.bar.set_postfix_str(f"{self.rate():,.1f} tok/s", refresh=False)
            self.bar.update(n)

    def _poll(self, until: int | None = None) -> None:
        """Count the reports that are there, or (until=N) wait until N reports have come in all."""
        comm = self.world.comm

        def more() -> bool:
            if until is not None:
                return self.received < until
            return comm.iprobe(source=MPI.ANY_SOURCE, tag=TAG_PROGRESS)
        while more():
            self._count(*comm.recv(source=MPI.ANY_SOURCE, tag=TAG_PROGRESS))
            self.received += 1

    def close(self) -> None:
        """Every rank (collective): rank 0 waits for every report sent (fewer than `total` after a stop);
        leaders complete their sends."""
        sent = self.world.comm.gather(len(self.pending), root=0)
        if self.world.rank == 0:
            self._poll(until=sum(sent))
            if self.bar is not None:
                self.bar.close()
        MPI.Request.waitall(self.pending)


def hand_over(world: World, outbox: list | None, on_rows=None) -> None:
    """Every rank, with a dedicated orchestrator: the rows a leader finished after its last request (the
    continuous loop still decodes when the dispatcher runs dry) go to rank 0's on_rows. No-op inline."""
    if not world.first:
        return
    parts = world.comm.gather(list(outbox or ()), root=0)
    if outbox:
        outbox.clear()
    rows = [r for part in parts or () for r in part]
    if world.rank == 0 and rows and on_rows is not None:
        on_rows(rows)


def gather_results(world: World, results: list[Result], n_items: int | None = None,
                   prior: list[Result] = ()) -> list[Result] | None:
    """Leaders' results to rank 0, in input order; rank 0 checks that every index came back once.

    prior (rank 0): results finished by an earlier run (`--resume`), merged in. A dedicated orchestrator
    already holds every result (they came with the requests): its own list is the whole.
    """
    mine = world.is_orchestrator or (world.is_leader and not world.first)
    parts = world.comm.gather(results if mine else [], root=0)
    if world.rank != 0:
        return None
    out = sorted((r for part in [list(prior), *parts] for r in part), key=lambda r: r.index)
    idx = [r.index for r in out]
    if n_items is not None and idx != list(range(n_items)):
        raise RuntimeError(f"gather got {len(idx)} results for {n_items} prompts (lost or duplicated)")
    return out


def _answer_s() -> float:
    """How long a replica leader waits for rank 0's answer to a request for work: SPMD_WATCHDOG_S (the
    dispatcher answers at once, from a thread or the orchestrator's loop; only a hung rank 0 takes longer)."""
    from spmd.config import env
    from spmd.runtime.faults import WATCHDOG_DEFAULT_S, WATCHDOG_ENV, parse_seconds

    return parse_seconds(WATCHDOG_ENV, env.read(WATCHDOG_ENV) or None, WATCHDOG_DEFAULT_S)


def recv_within(comm, source: int, tag: int, seconds: float, what: str):
    """comm.recv(source, tag), but a RuntimeError after `seconds` without a message (0: wait forever), so
    the rank aborts the job (python -m mpi4py) instead of waiting for a peer that will never send. Polls
    with a matched probe (any message size), sleeping up to 10 ms between looks."""
    if seconds <= 0:
        return comm.recv(source=source, tag=tag)
    end, nap = time.monotonic() + seconds, 1e-4
    while True:
        msg = comm.improbe(source=source, tag=tag)
        if msg is not None:
            return msg.recv()
        if time.monotonic() > end:
            raise RuntimeError(f"rank {comm.rank}: no message from rank {source} for {seconds:g} s while waiting "
                               f"for {what} (SPMD_WATCHDOG_S): it is hung or gone; aborting the job")
        time.sleep(nap)
        nap = min(nap * 2, 0.01)


def _waiting(timers, name: str):
    return timers.wait(name) if timers is not None else contextlib.nullcontext()
