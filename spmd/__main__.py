"""`python -m mpi4py -m spmd`: one run, top to bottom.

args → world → prompts (rank 0) → engine → dispatch + generate → gather → outputs (rank 0) → traces.
Bad input is found on rank 0 and reported once; every rank exits 2. Any other exception on any
rank aborts the whole job through `python -m mpi4py`. Finished prompts go to OUTPUT.progress/ as they
complete (`--resume` continues from there); SIGTERM/SIGUSR1 stop every rank after its batch, exit 75.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import asdict

from mpi4py import MPI

from . import args as A
from . import dispatch, faults as F, world as W
from . import resume as R
from . import stop
from .serve import serve
from . import prompts as P
from . import score as S
from .engines import build_engine
from .profile import Profiler
from .timers import Timers, run_metadata


def main(argv: list[str] | None = None) -> int:
    comm = MPI.COMM_WORLD
    stop.install()  # SIGTERM/SIGUSR1: a flag, read at batch boundaries
    F.install_stack_dump()  # SIGUSR2: every thread's stack on stderr
    try:
        run(comm, argv)
    except W.UsageError as exc:
        W.exit_on_usage_error(comm, exc)
    except stop.Stopped as exc:  # every rank: finished prompts are on disk, --resume does the rest
        stop.exit_stopped(comm, exc)
    except Exception as exc:  # names the rank; `python -m mpi4py` then prints the traceback and aborts the job
        F.report_error(comm.rank, comm.size, exc)
        raise
    return 0


def run(comm, argv) -> None:
    args = A.parse_args(argv)  # same argv everywhere: the same result, or the same UsageError, on every rank
    first = int(args.orchestrator == "dedicated")  # world rank of the first model rank
    guard = W.agree(comm, lambda: F.Guard.from_env(comm.rank, comm.size))  # SPMD_FAULT, SPMD_WATCHDOG_S
    # before the paths and the model's shape, so a world that fits no group says so first (make_world,
    # which tools and tests call directly, checks it again)
    W.on_root(comm, lambda: W.check_world_size(comm.size, args.group_size * args.pp, first))
    W.on_root(comm, lambda: A.check_paths(args))
    margs = W.on_root(comm, lambda: A.ModelArgs.from_checkpoint(args.checkpoint))
    W.on_root(comm, lambda: A.check_model_topology(margs, args.group_size, args.engine, args.pp, comm.size,
                                                   args.orchestrator))
    world = W.make_world(args.group_size, args.device, comm, pp=args.pp, first=first)
    guard.start()  # faults at "start", the watchdog thread
    prof = Profiler.from_args(args, world)  # --profile: a window over decode steps, opened by set_phase
    timers = Timers(world.rank, world.device, args.trace_dir is not None, args.profile == "nsys",
                    guard.hook(prof.on_phase))  # the profiler's window, then injected faults and the watchdog
    timers.align(comm)
    timers.set_phase("load")
    engine, read = None, (lambda: read_and_tokenize(args, margs))
    if first:  # dedicated: the model ranks load while rank 0 reads and tokenizes; errors meet in `agree`
        if world.is_orchestrator:
            with timers.io("prompts.read_tokenize"):
                read = _attempt(read)
        with (timers.wait("load.models") if world.is_orchestrator else contextlib.nullcontext()):
            engine = W.agree(comm, lambda: None if world.is_orchestrator else
                             build_engine(args.engine, world, args, margs, timers))
    with (timers.io if world.rank == 0 else timers.wait)("prompts.read_tokenize"):  # others wait for rank 0
        text = W.on_root(comm, read, share=False)
    n = comm.bcast(len(text[0]) if world.rank == 0 else None, root=0)
    scoring = S.prepare(comm, args.score, args.checkpoint, text) if args.score else None  # checks the baseline
    # the progress directory: a fresh one, or (--resume) the prompts an earlier run finished (rank 0)
    done = W.on_root(comm, lambda: R.prepare(args, [p.id for p in text[0]]), share=False)
    if not first:
        engine = build_engine(args.engine, world, args, margs, timers)
    if scoring is not None and not comm.allreduce(engine is None or hasattr(engine, "score"), op=MPI.LAND):
        raise W.UsageError(f"--engine {args.engine} has no score method: it cannot --score")
    results = dispatch.gather_results(world, serve(world, engine, args, margs, text, n, timers, scoring, done), n,
                                      prior=done or ())
    if world.rank == 0:
        prompts, ids, tokenizer = text
        timers.set_phase("other")
        with timers.io("outputs.write"):
            P.write_jsonl(args.output, S.attach(P.output_rows(prompts, ids, results, tokenizer), results, scoring))
        R.finish(args.output)  # the output is complete: drop the progress directory
        if done:  # traces count this run's tokens only
            earlier = {r["index"] for r in done}
            results = [r for r in results if r["index"] not in earlier]
    prof.close()
    write_traces(world, args, margs, timers, engine, results)
    if engine is not None:
        engine.close()  # before the process groups: a live CUDA graph holding NCCL work hangs their teardown
    W.shutdown(world)


def _attempt(fn):
    """fn() now; returns a callable that gives its result, or raises its UsageError, later."""
    try:
        result = fn()
    except W.UsageError as exc:
        error = exc

        def fail():
            raise error
        return fail
    return lambda: result


def read_and_tokenize(args: A.RunArgs, margs: A.ModelArgs):
    """Rank 0: prompts, their token ids and the tokenizer (kept on rank 0)."""
    prompts = P.read_prompts(args.prompts)
    tokenizer = P.load_tokenizer(args.checkpoint)
    ids = P.encode(tokenizer, prompts, args.chat)
    P.check_context(prompts, ids, args.max_new_tokens, margs.max_seq_len)
    return prompts, ids, tokenizer


def write_traces(world: W.World, args: A.RunArgs, margs: A.ModelArgs, timers, engine, results) -> None:
    """Every rank writes its HDF5 file (rank 0's counts the tokens generated); rank 0 merges them."""
    if args.trace_dir is None:
        return
    meta = run_metadata(W.topology(world))
    meta.update(config=margs.raw, args={k: str(v) for k, v in asdict(args).items()}, engine=args.engine,
                engine_info=getattr(engine, "info", {}))
    if results is not None:
        meta["tokens_generated"] = sum(len(r["tokens"]) for r in results)
    timers.write(args.trace_dir, meta)
    world.comm.Barrier()
    if world.rank == 0:
        from traces.merge import merge
        merge(args.trace_dir)


if __name__ == "__main__":
    sys.exit(main())
