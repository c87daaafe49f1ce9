"""Continuous batching in one model group: a fixed set of decode slots, refilled as rows end.

Every rank of the group runs this loop on the same work items and the same logits, so every decision
(admission, chunking, a row's end) is the same on all of them and no step needs a message.

One iteration (`Scheduler.run`):
  1. refill: pull work from the source (the static share, or dynamic chunks) until the queue holds as
     many requests as there are free slots; admit queued requests into the free slots, lowest slot first
     (after asking `halt()`, the group's stop agreement: once it says stop, nothing more is admitted and
     the rows in flight finish);
  2. one prefill forward of at most `budget` prompt tokens, if any admitted row still has prompt left:
     either several new prompts together (left-padded; rows x longest <= budget), or the next piece of
     one long prompt (a prompt longer than the budget goes in pieces of `budget` tokens). A row whose
     prompt is done samples its first token from that forward;
  3. one decode step over the slots (every row that has its first token feeds its last one).
So prefill chunks and decode steps alternate: a long prompt delays the other rows' next token by one
chunk's forward per step, never by its whole prompt, and peak activation memory is set by the budget.

A request's tokens depend only on its own prompt, settings and generator (spmd.runtime.generate.sample),
never on its slot, its neighbours or the budget: tests/mpi/test_scheduler_mpi.py checks that against the
static loop. Times: queue_s from the group receiving the request to its admission, ttft_s and latency_s
from admission.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

from spmd.runtime.generate import GenConfig, ended, generators, sample, settings
from spmd.runtime.records import Result, Sampling, WorkItem

FLUSH_STEPS = 256  # decode steps between timer flushes (each synchronizes the device once)
BUSY, PREFILL, DECODE = 1, 2, 4  # lockstep flags: a rank has work left, a prompt to prefill, rows decoding


@dataclass
class Row:
    """A request in a slot."""

    item: WorkItem
    sampling: Sampling
    gen: object
    received: float
    admitted: float
    done: int = 0                                   # prompt tokens in the cache
    tokens: list[int] = field(default_factory=list)
    first: float = 0.0                              # time of the first token
    checked: int = 0                                # tokens `ended` has looked at

    @property
    def decoding(self) -> bool:
        return bool(self.tokens)


@dataclass
class Stats:
    """What the loop did (the run summary's scheduler numbers)."""

    slots: int
    prefill_tokens: int
    decode_steps: int = 0
    slot_steps: int = 0          # decode steps x slots
    prefill_forwards: int = 0
    admitted: int = 0
    moves: int = 0               # compactions (rows moved to lower slots)
    idle_forwards: int = 0       # lockstep: pad-token forwards while another rank prefilled
    decode_shapes: dict = field(default_factory=dict)  # "RxS": steps, from the engine
    decode_wall: dict = field(default_factory=dict)    # "RxS": (steps, seconds) of wall time
    decode_gpu_ms_by_shape: dict = field(default_factory=dict)  # "RxS": mean GPU ms of the step, from the engine
    loop_s: dict = field(default_factory=dict)         # wall seconds per part of the loop (Scheduler.run)

    def as_dict(self) -> dict:
        out = dict(batching="continuous", **self.__dict__)
        wall = out.pop("decode_wall")
        out["decode_ms_by_shape"] = {k: round(1e3 * s / n, 3) for k, (n, s) in wall.items()}  # mean wall ms
        out["loop_s"] = {k: round(v, 3) for k, v in self.loop_s.items()}
        return out


class Scheduler:
    """Slots of one model group over a `spmd.engines.native.NativeEngine` (open_slots, prefill_slots,
    extend_slot, decode_slots, close_slots)."""

    def __init__(self, engine, n_slots: int, budget: int, max_len: int, cfg: GenConfig, timers,
                 stop_hit=None, clock: Callable[[], float] = time.perf_counter,
                 lockstep: Callable[[int], int] | None = None):
        """lockstep (--group-layout dpa): the bitwise OR of an int over the ranks that share the MoE's
        all-to-alls; with it every rank runs a prefill forward when any has one (idle ranks: one pad
        token, engine.idle_forward) and a decode step when any has rows decoding, and the loop ends on all
        ranks together."""
        self.engine, self.n_slots, self.budget, self.max_len, self.cfg = engine, n_slots, budget, max_len, cfg
        self.timers, self.stop_hit, self.clock, self.lockstep = timers, stop_hit, clock, lockstep
        self.rows: list[Row | None] = [None] * n_slots
        self.queue: deque[tuple[WorkItem, float]] = deque()
        self.stats = Stats(n_slots, budget)

    def run(self, source: Iterator[list[WorkItem]], emit: Callable[[list[Result]], None],
            halt: Callable[[], bool] = lambda: False) -> Stats:
        """Serve every item of `source`; emit(results) after each step (the rows it finished, maybe none).

        stats.loop_s splits the loop's wall time: "admit" (the halt agreement, pulling work, admission),
        "prefill" (forwards and first tokens), "decode" (finishing and compacting rows, the step, sampling:
        the device's time shows here, as sampling waits for the step), "emit" (the caller's sink)."""
        self.engine.open_slots(self.n_slots, self.max_len)
        more, halted = True, False
        spent = self.stats.loop_s = dict.fromkeys(("admit", "prefill", "decode", "emit"), 0.0)
        clock = self.clock
        try:
            while True:
                t0 = clock()
                free = self.rows.count(None)
                if free and not halted and (self.queue or more):
                    halted = halt()
                    if not halted:
                        more = self._refill(source, free) if more else False
                        self._admit()
                idle = all(r is None for r in self.rows)
                finished = idle and (halted or not (self.queue or more))
                if self.lockstep is not None:
                    waiting = any(r is not None and r.done < len(r.item.ids) for r in self.rows)
                    flags = self.lockstep((not finished) * BUSY | waiting * PREFILL)
                    finished, idle = not flags & BUSY, False
                t1 = clock()
                spent["admit"] += t1 - t0
                if finished:
                    break
                if idle:
                    continue
                if self.lockstep is not None and flags & PREFILL and not waiting:
                    self.engine.idle_forward()  # another rank prefills: meet its all-to-alls
                    self.stats.idle_forwards += 1
                else:
                    self._prefill()
                t2 = clock()
                results = self._decode()
                t3 = clock()
                emit(results)  # every step, finished rows or none (the sink's clock)
                spent["prefill"] += t2 - t1
                spent["decode"] += t3 - t2
                spent["emit"] += clock() - t3
        finally:
            self.stats.decode_shapes = getattr(self.engine, "decode_shapes", dict)()
            self.stats.decode_gpu_ms_by_shape = getattr(self.engine, "decode_gpu_ms", dict)()
            self.engine.close_slots()
        return self.stats

    def _refill(self, source, free: int) -> bool:
        """Pull chunks until the queue can fill `free` slots; False once the source is exhausted."""
        while len(self.queue) < free:
            chunk = next(source, None)
            if not chunk:
                return False
            now = self.clock()
            self.queue.extend((it, now) for it in chunk)
        return True

    def _admit(self) -> None:
        now, admitted = self.clock(), []
        for slot, row in enumerate(self.rows):
            if row is None and self.queue:
                item, received = self.queue.popleft()
                s = settings(item, self.cfg)
                if len(item.ids) + s.max_new_tokens > self.max_len:  # serve sized the slots: a bug if it happens
                    raise ValueError(f"prompt {item.index}: {len(item.ids)} tokens + {s.max_new_tokens} new tokens "
                                     f"exceed the slots' {self.max_len} columns (--max-context)")
                self.rows[slot] = Row(item, s, generators([s])[0], received, now)
                admitted.append(slot)
        if admitted:
            self.stats.admitted += len(admitted)
            with self.timers.io("slot.admit"):  # an instant in the trace: the step that took new requests
                pass

    def _prefill(self) -> None:
        """At most one forward of <= budget prompt tokens (see the module doc)."""
        waiting = [s for s, r in enumerate(self.rows) if r is not None and r.done < len(r.item.ids)]
        if not waiting:
            return
        self.timers.set_phase("prefill", self.stats.prefill_forwards)
        self.stats.prefill_forwards += 1
        first = self.rows[waiting[0]]
        if first.done:  # the next piece of a long prompt, alone at its offset
            piece = first.item.ids[first.done:first.done + self.budget]
            logits = self.engine.extend_slot(waiting[0], piece, first.done)
            first.done += len(piece)
            self._first_tokens([waiting[0]], logits)
            return
        slots, width = [], 0
        for s in waiting:
            r = self.rows[s]
            n = min(len(r.item.ids), self.budget)
            if r.done or (slots and (len(slots) + 1) * max(width, n) > self.budget):
                break
            slots.append(s)
            width = max(width, n)
        pieces = [self.rows[s].item.ids[:self.budget] for s in slots]
        logits = self.engine.prefill_slots(slots, pieces)
        for s, q in zip(slots, pieces):
            self.rows[s].done = len(q)
        self._first_tokens(slots, logits)

    def _first_tokens(self, slots: list[int], logits) -> None:
        """Rows whose whole prompt is in the cache now take their first token from these logits."""
        ready = [(i, s) for i, s in enumerate(slots) if self.rows[s].done == len(self.rows[s].item.ids)]
        if not ready:
            return
        rows = [self.rows[s] for _, s in ready]
        toks = sample(logits[[i for i, _ in ready]], [r.sampling for r in rows], [r.gen for r in rows])
        now = self.clock()
        for r, tok in zip(rows, toks):
            r.tokens.append(tok)
            r.first = now

    def _decode(self) -> list[Result]:
        """Finish rows that ended on their last token; one decode step over the rest; the finished results."""
        results = self._finish()
        self._compact()
        live = [s for s, r in enumerate(self.rows) if r is not None]
        decoding = any(self.rows[s].decoding for s in live)
        if self.lockstep is not None:  # a step on every rank when any has rows decoding
            decoding = bool(self.lockstep(DECODE * decoding))
        if not decoding:
            return results
        used = live[-1] + 1 if live else 1
        step = self.stats.decode_steps + 1
        self.timers.set_phase("decode", step)
        toks = [r.tokens[-1] if r is not None and r.decoding else 0 for r in self.rows[:used]]
        lens = [(len(r.item.ids) + len(r.tokens) - 1 if r.decoding else r.done) if r is not None else 0
                for r in self.rows[:used]]
        t0 = self.clock()
        logits = self.engine.decode_slots(toks, lens)
        self.stats.decode_steps, self.stats.slot_steps = step, self.stats.slot_steps + self.n_slots
        decoding = [s for s in range(used) if self.rows[s] is not None and self.rows[s].decoding]
        rows = [self.rows[s] for s in decoding]
        if rows:  # none: an idle rank's step in lockstep
            for r, tok in zip(rows, sample(logits[decoding], [r.sampling for r in rows], [r.gen for r in rows])):
                r.tokens.append(tok)
        self._time_step(self.clock() - t0)
        if step % FLUSH_STEPS == 0:
            self.timers.flush()
        self.timers.set_phase("other", -1)
        return results + self._finish()

    def _time_step(self, seconds: float) -> None:
        """Wall time of a decode step per shape: inputs to the device, the step, sampling, tokens on the host
        (the sync): what the loop pays per step, to hold against gpu_bench's step at that shape."""
        shape = getattr(self.engine, "last_shape", lambda: "")()
        if shape:
            n, total = self.stats.decode_wall.get(shape, (0, 0.0))
            self.stats.decode_wall[shape] = (n + 1, total + seconds)

    def _compact(self) -> None:
        """Move rows from high slots into free low ones when that shrinks the decode step's rows (its shape
        bucket): as the last long rows of a run decode, the step runs 8 rows, not the whole slot count."""
        live = [s for s, r in enumerate(self.rows) if r is not None]
        rows_for = getattr(self.engine, "slot_rows", None)
        if not live or rows_for is None or rows_for(live[-1] + 1) <= rows_for(len(live)):
            return
        target = rows_for(len(live))
        free = [s for s in range(target) if self.rows[s] is None]
        for src in (s for s in live if s >= target):
            dst, r = free.pop(0), self.rows[src]
            self.engine.move_slot(src, dst, len(r.item.ids) + len(r.tokens))
            self.rows[dst], self.rows[src] = r, None
        self.stats.moves += 1

    def _finish(self) -> list[Result]:
        now, out = self.clock(), []
        for s, r in enumerate(self.rows):
            if r is None or len(r.tokens) == r.checked:
                continue
            r.checked = len(r.tokens)
            why = ended(r.tokens, r.sampling, self.cfg.eos_id, self.stop_hit)
            if why:
                out.append(Result(r.item.index, r.tokens, r.first - r.admitted, now - r.admitted,
                                  finish_reason=why, queue_s=r.admitted - r.received))
                self.rows[s] = None
        return out
