"""The work loop of one run: model ranks generate their batches; a dedicated orchestrator feeds them.

`serve` runs on every model rank (and, inline, on rank 0 as well): batches from the static scatter or
the dynamic dispatcher, generate (and score), progress files, the stop agreement. `orchestrate` is
world rank 0 with `--orchestrator dedicated`: it holds no model and only hands out chunks, receives
each group's results with its next request, decodes them and appends them to the progress directory
while the groups compute.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from spmd.config import ModelArgs, RunArgs, UsageError
from spmd.engines.memory import SlotPlan, plan_slots
from spmd.runtime import dispatch, prompts, resume, stop
from spmd.runtime.generate import GenConfig, generate, score, score_forwards, settings
from spmd.runtime.records import Result, WorkItem
from spmd.runtime.scheduler import Scheduler
from spmd.runtime.score import Scoring, work_items

FLUSH_S = 0.1  # a leader appends finished rows to its progress file at most this often (one fsync each)


@dataclass(frozen=True)
class ServeContext:
    """What the work loop needs of the run: topology, engine (None on a dedicated orchestrator), options,
    model config, this rank's timers, and the baseline's targets under --score."""

    world: Any
    engine: Any
    args: RunArgs
    margs: ModelArgs
    timers: Any
    scoring: Scoring | None = None
    stats: dict = field(default_factory=dict)  # rank 0, after serve: the loops' numbers (run summary)


def _pending(prompt_set, scoring, done):
    """Rank 0: the work items not finished by an earlier run (--resume)."""
    items = work_items(prompt_set.ids, scoring and scoring.targets, prompt_set.sampling)
    finished = {r.index for r in done or ()}
    return [it for it in items if it.index not in finished]


def serve(ctx: ServeContext, prompt_set, n: int, done: list[Result] | None = None) -> list[Result]:
    """Generate (and score) this replica's prompts; results carry their input index.

    prompt_set (rank 0, a PromptSet; None elsewhere): the prompts; n: how many. done (rank 0): prompts
    finished by an earlier run (--resume), left out. Continuous batching (spmd.runtime.scheduler) or static
    batches (`batching`). Leaders append finished results to the progress directory (with a dedicated
    orchestrator, rank 0 does). After a stop signal (see spmd.runtime.stop) every rank raises Stopped.
    Rank 0's ctx.stats gets the loops' numbers, summed over the replicas.
    """
    world, args = ctx.world, ctx.args
    items = _pending(prompt_set, ctx.scoring, done) if world.rank == 0 else None
    n_prior = world.comm.bcast(len(done or ()) if world.rank == 0 else None, root=0)
    prompt_ids = world.comm.bcast([p.id for p in prompt_set.prompts] if world.rank == 0 else None, root=0)
    halt = stop.Agreement(world, resume.progress_dir(args.output))
    cfg = GenConfig(args.max_new_tokens, ctx.margs.eos_token_id, ctx.margs.eos_token_id,
                    args.temperature, args.top_p, args.seed)
    stop_hit = _stop_strings(ctx, prompt_set, items)
    n_items, need = world.comm.bcast((len(items), max((len(it.ids) + settings(it, cfg).max_new_tokens
                                                       for it in items), default=1)) if world.rank == 0 else None,
                                     root=0)
    if args.max_context and args.max_context < need:  # every rank, the orchestrator too: all exit 2
        raise UsageError(f"--max-context {args.max_context} is shorter than the longest prompt + its new tokens "
                         f"({need})")
    if world.is_orchestrator:
        return orchestrate(ctx, prompt_set.tokenizer, items, n, n_prior, prompt_ids, halt)
    writer = resume.Writer(args.output, world.replica, prompt_ids) if world.is_leader and not world.first else None
    outbox = [] if world.first and world.is_leader else None  # rows that go back with the next request
    progress = dispatch.Progress(world, n, enabled=args.progress, initial=n_prior)
    sink = Sink(ctx, writer, outbox, progress, stop_hit)
    if batching(args, ctx.engine) == "continuous":
        stats = _serve_continuous(ctx, items, cfg, halt, sink, n_items, need)
    else:
        stats = _serve_static(ctx, items, cfg, halt, sink)
    sink.flush()
    dispatch.hand_over(world, outbox)  # a dedicated orchestrator's leaders: rows no request took along
    progress.close()
    _gather_stats(ctx, stats)
    if writer is not None:
        writer.close()
    halt.finish(len(sink.results), n_prior, n)  # every rank: raises Stopped on all if any group stopped
    return sink.results


def batching(args: RunArgs, engine) -> str:
    """--batching: continuous where the engine has slots (native) and there is generation to do."""
    if args.score_only:  # nothing to generate: scoring batches only
        return "static"
    if args.batching != "auto":
        return args.batching
    return "continuous" if hasattr(engine, "open_slots") else "static"


def _serve_static(ctx: ServeContext, items, cfg: GenConfig, halt, sink: "Sink") -> dict:
    """Static batches of --batch-size: each decodes until its last row ends."""
    world, args = ctx.world, ctx.args
    if args.dispatch == "static":
        batches = dispatch.iter_static(world, items, args.batch_size)
    else:
        batches = (chunk[i:i + args.batch_size]
                   for chunk in dispatch.iter_dynamic(world, items, args.dispatch_size, ctx.timers, halt, sink.outbox)
                   for i in range(0, len(chunk), args.batch_size))
    stats = {"batching": "static", "slots": args.batch_size}
    for batch in batches:
        if halt.check():  # the group agrees at every batch boundary; dynamic: drain to the halting request
            continue
        rows = run_batch(ctx.engine, batch, cfg, args.score_only, None, ctx.timers, sink.stop_hit, stats)
        sink.add(rows, batch)
        sink.flush()
    return stats


def _serve_continuous(ctx: ServeContext, items, cfg: GenConfig, halt, sink: "Sink", n_items: int,
                      need: int) -> dict:
    """Decode slots sized to memory, refilled as rows end (spmd.runtime.scheduler). n_items: the requests
    to run; need: the longest prompt + its new tokens (both from rank 0)."""
    world, args = ctx.world, ctx.args
    if args.dispatch == "static":
        share = dispatch.longest_first(dispatch.scatter_static(world, items))
        source, n_requests = iter([share]), len(share)
    else:
        source = dispatch.iter_dynamic(world, items, args.dispatch_size, ctx.timers, halt, sink.outbox)
        n_requests = n_items
    plan = plan_group(ctx, args.max_context or need, n_requests)
    given = {}

    def remember(chunks):  # --score scores finished rows: keep their work items
        for chunk in chunks:
            given.update((it.index, it) for it in chunk)
            yield chunk

    sched = Scheduler(ctx.engine, plan.slots, plan.prefill_tokens, plan.max_len, cfg, ctx.timers, sink.stop_hit,
                      lockstep=_lockstep(ctx) if ctx.world.ep_size > 1 else None)
    stats = sched.run(remember(source), lambda rows: sink.add(rows, [given[r.index] for r in rows]),
                      halt=halt.check)
    for _ in source:  # stopped: the next request tells the dispatcher, whose answer (empty) ends the source
        pass
    return stats.as_dict()


class Sink:
    """Where a group's finished rows go: --score's scores (a forward of the whole group, so taken at
    deterministic points: every --batch-size rows, and at the end), then on leaders the progress file
    (fsync'd: at once, then at most every FLUSH_S; a continuous loop ticks every step, so no finished row
    waits longer), the outbox of a dedicated orchestrator and the progress bar."""

    def __init__(self, ctx: ServeContext, writer, outbox, progress, stop_hit):
        self.ctx, self.writer, self.outbox, self.progress, self.stop_hit = ctx, writer, outbox, progress, stop_hit
        self.results: list[Result] = []
        self.unscored: list[tuple[Result, WorkItem]] = []
        self.unwritten: list[Result] = []
        self.last = float("-inf")  # the first finished row is written at once

    def add(self, rows: list[Result], items: list[WorkItem]) -> None:
        """Rows that finished (none: a tick, so that held rows are written within FLUSH_S)."""
        if not rows:
            if self.unwritten and time.perf_counter() - self.last >= FLUSH_S:
                self._write()
            return
        rows = [r.but(replica=self.ctx.world.replica) for r in rows]
        if self.ctx.scoring is None:
            self._done(rows)
            return
        self.unscored += zip(rows, items)
        if len(self.unscored) >= self.ctx.args.batch_size and self.ctx.world.ep_size == 1:  # dpa: at the end
            self._score()

    def _score(self) -> None:
        rows, items = [r for r, _ in self.unscored], [it for _, it in self.unscored]
        self.unscored = []
        if rows:
            scores = score(self.ctx.engine, items, self.ctx.scoring.k, self.ctx.timers)
            self._done([r.but(score=sc) for r, sc in zip(rows, scores)])

    def _done(self, rows: list[Result]) -> None:
        self.results += rows
        self.unwritten += rows
        if time.perf_counter() - self.last >= FLUSH_S:
            self._write()

    def _write(self) -> None:
        rows, self.unwritten, self.last = self.unwritten, [], time.perf_counter()
        if not rows:
            return
        if self.writer is not None:
            self.writer.append(rows)  # on disk (fsync'd) before anything else
        if self.outbox is not None:
            self.outbox += rows
        self.progress.update(len(rows), sum(len(r.tokens) for r in rows))

    def flush(self) -> None:
        """Every rank of the group at the same point: score what is left, write everything."""
        if self.ctx.world.ep_size > 1 and self.ctx.scoring is not None:
            self._score_in_lockstep()
        self._score()
        self._write()

    def _score_in_lockstep(self) -> None:
        """--group-layout dpa: each rank scores its own rows; every scoring forward meets the expert-parallel
        group's all-to-alls, so a rank with fewer forwards than the group's most runs pad-token forwards."""
        mine = score_forwards([it for _, it in self.unscored])
        most = reduce_int(self.ctx.world.ep_comm, mine, "max")
        self._score()
        for _ in range(most - mine):
            self.ctx.engine.idle_forward()


def _stop_strings(ctx: ServeContext, prompt_set, items):
    """StopStrings(tokenizer).hit on every model rank when some request has stop strings, else None: rows
    end on the same token on every rank of a group, so each decodes the tails itself."""
    world = ctx.world
    needed = world.comm.bcast(any(it.sampling is not None and it.sampling.stop for it in items)
                              if world.rank == 0 else None, root=0)
    if not needed or world.is_orchestrator:
        return None
    tokenizer = prompt_set.tokenizer if world.rank == 0 else prompts.load_tokenizer(ctx.args.checkpoint)
    return prompts.StopStrings(tokenizer).hit


def plan_group(ctx: ServeContext, max_len: int, n_requests: int) -> SlotPlan:
    """The group's slots and prefill budget (spmd.engines.memory.plan_slots on each rank, the smallest
    taken); printed by the leaders, kept in the engine's info (the trace's metadata)."""
    import torch

    world, args, engine = ctx.world, ctx.args, ctx.engine
    total = free = 0
    if engine.device.type == "cuda":  # memory torch's allocator holds but does not use counts as free
        free, total = torch.cuda.mem_get_info(engine.device)
        free += torch.cuda.memory_reserved(engine.device) - torch.cuda.memory_allocated(engine.device)
    model = engine.model
    try:
        mine = plan_slots(ctx.margs, n_layers=len(model.stage_layers), n_local_heads=ctx.margs.n_heads // world.tp_size,
                          elem_bytes=torch.empty(0, dtype=model.dtype).element_size(), max_len=max_len,
                          n_requests=n_requests, free_bytes=free, total_bytes=total,
                          fraction=args.gpu_memory_fraction, want_slots=args.slots, want_tokens=args.prefill_tokens)
    except MemoryError as exc:
        mine = str(exc)
    plans = world.group_comm.allgather(mine)
    errors = [p for p in plans if isinstance(p, str)]
    if errors:
        raise UsageError(errors[0])
    plan = replace(min(plans, key=lambda p: p.slots), prefill_tokens=min(p.prefill_tokens for p in plans))
    if world.model_rank == 0:
        print(("" if world.n_replicas == 1 else f"replica {world.replica}: ") + plan.line(), flush=True)
    engine.info["slots"] = asdict(plan)
    return plan


def _lockstep(ctx: ServeContext):
    """--group-layout dpa: the OR of the scheduler's flags over the expert-parallel group (a wait event
    "dpa.lockstep": the time a rank waits for its group's slowest rank, twice per step)."""
    comm, timers = ctx.world.ep_comm, ctx.timers

    def agree(flags: int) -> int:
        with timers.wait("dpa.lockstep"):
            return reduce_int(comm, flags, "bor")
    return agree


def reduce_int(comm, value: int, op: str) -> int:
    """An int reduced over comm ("bor" or "max") by the buffer Allreduce, which releases the GIL while it
    waits (mpi4py's allreduce of Python objects holds it: the inline orchestrator's dispatch thread then
    starves)."""
    import numpy as np
    from mpi4py import MPI

    out = np.zeros(1, np.int64)
    comm.Allreduce(np.array([value], np.int64), out, op=MPI.BOR if op == "bor" else MPI.MAX)
    return int(out[0])


def _gather_stats(ctx: ServeContext, stats: dict) -> None:
    """Rank 0: the leaders' loop numbers, counts summed over the replicas."""
    world = ctx.world
    parts = world.comm.gather(stats if world.is_leader and not world.is_orchestrator else None, root=0)
    if world.rank != 0:
        return
    parts = [p for p in parts if p]
    if not parts:
        return
    out = dict(parts[0])
    for key in ("decode_steps", "slot_steps", "prefill_forwards", "admitted"):
        if key in out:
            out[key] = sum(p.get(key, 0) for p in parts)
    out["replicas"] = len(parts)
    ctx.stats.update(out)


def orchestrate(ctx: ServeContext, tokenizer, items, n: int, n_prior: int, prompt_ids, halt) -> list[dict]:
    """World rank 0 without a model: serve chunks; each group's rows, as they come, are decoded (the
    completion text) and appended to the progress directory. Its own stop signal halts the dispatcher."""
    world, args, timers = ctx.world, ctx.args, ctx.timers
    timers.set_phase("other")  # host work and idle time, apart from the load
    writer = resume.Writer(args.output, "orchestrator", prompt_ids)
    progress = dispatch.Progress(world, n, enabled=args.progress, initial=n_prior)
    results = []

    def received(rows: list[dict]) -> None:
        with timers.io("outputs.detokenize"):
            rows = [r.but(completion=prompts.decode(tokenizer, r.tokens)) for r in rows]
        with timers.io("progress.write"):
            writer.append(rows)
        results.extend(rows)
        progress.add(len(rows), sum(len(r.tokens) for r in rows))

    dispatch.serve_chunks(world, items, args.dispatch_size, received, timers, lambda: stop.received() is not None)
    dispatch.hand_over(world, None, received)  # rows that finished after their group's last request
    progress.close()
    _gather_stats(ctx, {})
    writer.close()
    halt.decided = stop.received() is not None
    halt.finish(0, n_prior, n)
    return results


def run_batch(engine, batch: list[WorkItem], cfg: GenConfig, score_only: bool, scoring, timers, stop_hit=None,
              stats: dict | None = None) -> list[Result]:
    """Generate (unless --score-only) and score (with a scoring) one batch; one Result per row, in batch order."""
    rows = [Result(it.index, []) for it in batch] if score_only else generate(engine, batch, cfg, timers, stop_hit,
                                                                              stats)
    if scoring is not None:
        rows = [r.but(score=s) for r, s in zip(rows, score(engine, batch, scoring.k, timers))]
    return rows
