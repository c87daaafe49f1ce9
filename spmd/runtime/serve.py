"""The work loop of one run: model ranks generate their batches; a dedicated orchestrator feeds them.

`serve` runs on every model rank (and, inline, on rank 0 as well): batches from the static scatter or
the dynamic dispatcher, generate (and score), progress files, the stop agreement. `orchestrate` is
world rank 0 with `--orchestrator dedicated`: it holds no model and only hands out chunks, receives
each group's results with its next request, decodes them and appends them to the progress directory
while the groups compute.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spmd.config import ModelArgs, RunArgs
from spmd.runtime import dispatch, prompts, resume, stop
from spmd.runtime.generate import GenConfig, generate, score
from spmd.runtime.records import Result, WorkItem
from spmd.runtime.score import Scoring, work_items


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


def _pending(prompt_set, scoring, done):
    """Rank 0: the work items not finished by an earlier run (--resume)."""
    items = work_items(prompt_set.ids, scoring and scoring.targets)
    finished = {r.index for r in done or ()}
    return [it for it in items if it.index not in finished]


def serve(ctx: ServeContext, prompt_set, n: int, done: list[Result] | None = None) -> list[Result]:
    """Generate (and score) this replica's prompts, batch by batch; results carry their input index.

    prompt_set (rank 0, a PromptSet; None elsewhere): the prompts; n: how many. done (rank 0): prompts
    finished by an earlier run (--resume), left out. Leaders append each batch's results to the progress
    directory (with a dedicated orchestrator, rank 0 does). After a stop signal (see spmd.runtime.stop)
    every rank raises Stopped.
    """
    world, args, timers = ctx.world, ctx.args, ctx.timers
    items = _pending(prompt_set, ctx.scoring, done) if world.rank == 0 else None
    n_prior = world.comm.bcast(len(done or ()) if world.rank == 0 else None, root=0)
    prompt_ids = world.comm.bcast([p.id for p in prompt_set.prompts] if world.rank == 0 else None, root=0)
    halt = stop.Agreement(world, resume.progress_dir(args.output))
    if world.is_orchestrator:
        return orchestrate(ctx, prompt_set.tokenizer, items, n, n_prior, prompt_ids, halt)
    writer = resume.Writer(args.output, world.replica, prompt_ids) if world.is_leader and not world.first else None
    cfg = GenConfig(args.max_new_tokens, ctx.margs.eos_token_id, ctx.margs.eos_token_id,
                    args.temperature, args.top_p, args.seed)
    outbox = [] if world.first and world.is_leader else None  # rows that go back with the next request
    if args.dispatch == "static":
        batches = dispatch.iter_static(world, items, args.batch_size)
    else:
        batches = (chunk[i:i + args.batch_size]
                   for chunk in dispatch.iter_dynamic(world, items, args.dispatch_size, timers, halt, outbox)
                   for i in range(0, len(chunk), args.batch_size))
    progress = dispatch.Progress(world, n, enabled=args.progress, initial=n_prior)
    results = []
    for batch in batches:
        if halt.check():  # the group agrees at every batch boundary; dynamic: drain to the halting request
            continue
        rows = run_batch(ctx.engine, batch, cfg, args.score_only, ctx.scoring, timers)
        rows = [r.but(replica=world.replica) for r in rows]
        if writer is not None:
            writer.append(rows)  # on disk (fsync'd) before anything else
        if outbox is not None:
            outbox += rows
        results += rows
        progress.update(len(rows))
    progress.close()
    if writer is not None:
        writer.close()
    halt.finish(len(results), n_prior, n)  # every rank: raises Stopped on all if any group stopped
    return results


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
        progress.add(len(rows))

    dispatch.serve_chunks(world, items, args.dispatch_size, received, timers, lambda: stop.received() is not None)
    progress.close()
    writer.close()
    halt.decided = stop.received() is not None
    halt.finish(0, n_prior, n)
    return results


def run_batch(engine, batch: list[WorkItem], cfg: GenConfig, score_only: bool, scoring, timers) -> list[Result]:
    """Generate (unless --score-only) and score (with --score) one batch; one Result per row, in batch order."""
    rows = [Result(it.index, []) for it in batch] if score_only else generate(engine, batch, cfg, timers)
    if scoring is not None:
        rows = [r.but(score=s) for r, s in zip(rows, score(engine, batch, scoring.k, timers))]
    return rows
