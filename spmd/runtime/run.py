"""One run, top to bottom: config → world → prompts (rank 0) → engine → serve → gather → outputs → traces.

Bad input is found on rank 0 (or agreed on by every rank) and reported once; every rank exits 2. Any other
exception on any rank aborts the whole job through `python -m mpi4py`. Finished prompts go to
OUTPUT.progress/ as they complete (`--resume` continues from there); SIGTERM/SIGUSR1 stop every rank after
its batch, exit 75.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import asdict

from mpi4py import MPI

from spmd import config
from spmd.config import ModelArgs, RunArgs, UsageError
from spmd.config.cli import gpu_visible
from spmd.engines import build_engine
from spmd.obs.merge import merge
from spmd.obs.profile import Profiler
from spmd.obs.metadata import run_metadata
from spmd.obs.timers import Timers
from spmd.parallel.errors import agree, on_root
from spmd.runtime import dispatch, faults, prompts, resume, score, stop, summary, world as world_mod
from spmd.runtime.prompts import PromptSet
from spmd.runtime.serve import ServeContext, serve
from spmd.weights.validate import check_checkpoint


def main(argv: list[str] | None = None) -> int:
    """The program's entry (`spmd.__main__`): every rank runs it; exits 2 on bad input, 75 when stopped."""
    comm = MPI.COMM_WORLD
    stop.install()  # SIGTERM/SIGUSR1: a flag, read at batch boundaries
    faults.install_stack_dump()  # SIGUSR2: every thread's stack on stderr
    try:
        run(comm, argv)
    except UsageError as exc:
        world_mod.exit_on_usage_error(comm, exc)
    except stop.Stopped as exc:  # every rank: finished prompts are on disk, --resume does the rest
        stop.exit_stopped(comm, exc)
    except Exception as exc:  # names the rank; `python -m mpi4py` then prints the traceback and aborts the job
        faults.report_error(comm.rank, comm.size, exc)
        raise
    return 0


def run(comm, argv) -> None:
    # same argv and GPU answer everywhere: the same result, or the same UsageError, on every rank (the --device
    # default: a dedicated orchestrator's host may have no GPU while the model ranks' hosts do)
    args = config.parse_args(argv, gpu=comm.allreduce(gpu_visible(), op=MPI.LOR))
    first = int(args.orchestrator == "dedicated")  # world rank of the first model rank
    guard = agree(comm, lambda: faults.Guard.from_env(comm.rank, comm.size))  # SPMD_FAULT, SPMD_WATCHDOG_S
    # before the paths and the model's shape, so a world that fits no group says so first (make_world,
    # which tools and tests call directly, checks it again)
    on_root(comm, lambda: world_mod.check_world_size(comm.size, args.group_size * args.pp, first))
    on_root(comm, lambda: config.check_paths(args))  # inputs; outputs, progress and trace dir destroy nothing
    on_root(comm, lambda: resume.check_free(args.output))  # no other live run on this output (its lock)
    # config.json, the index and every shard's header (no tensor data), before any model is built
    margs, ckpt_bytes = on_root(comm, lambda: check_checkpoint(args.checkpoint))
    on_root(comm, lambda: config.check_model_topology(margs, args.group_size, args.engine, args.pp, comm.size,
                                                      args.orchestrator, args.group_layout))
    dpa = args.group_layout == "dpa"  # every rank its own rows (a group of one for attention), experts over G
    world = world_mod.make_world(1 if dpa else args.group_size, args.device, comm, pp=args.pp, first=first,
                                 ep=args.group_size if dpa else 1)
    agree(comm, lambda: check_fits(world, args, margs))  # the planner's memory check, before the load
    # the load phase's deadline: this rank's share of the checkpoint's bytes at a minimum read rate
    guard.set_load_deadline(ckpt_bytes // max(args.group_size * args.pp, 1))
    guard.start()  # faults at "start", the watchdog thread
    prof = Profiler.from_args(args, world)  # --profile: a window over decode steps, opened by set_phase
    timers = Timers(world.rank, world.device, args.trace_dir is not None, args.profile == "nsys",
                    guard.hook(prof.on_phase))  # the profiler's window, then injected faults and the watchdog
    timers.align(comm)
    timers.set_phase("load")
    engine, prompt_set = load(world, args, margs, timers)
    n = comm.bcast(len(prompt_set.prompts) if world.rank == 0 else None, root=0)
    scoring = score.prepare(comm, args.score, args.checkpoint, prompt_set) if args.score else None
    # the progress directory: a fresh one, or (--resume) the prompts an earlier run finished (rank 0)
    done = on_root(comm, lambda: prepare_progress(args, margs, prompt_set), share=False)
    if engine is None and not world.is_orchestrator:
        engine = build_engine(args.engine, world, args, margs, timers)
    if scoring is not None and not comm.allreduce(engine is None or hasattr(engine, "score"), op=MPI.LAND):
        raise UsageError(f"--engine {args.engine} has no score method: it cannot --score")
    ctx = ServeContext(world, engine, args, margs, timers, scoring)
    serve_ns, run_summary = timers.now_ns(), None  # the aligned clock runs with timers off too: load_s
    results = dispatch.gather_results(world, serve(ctx, prompt_set, n, done), n, prior=done or ())
    wall_s = (timers.now_ns() - serve_ns) / 1e9
    if world.rank == 0:
        results = write_outputs(args, prompt_set, results, scoring, done, timers)
        run_summary = summary.report_run(args, prompt_set, results, ctx.stats, timers, serve_ns, wall_s)
    prof.close()
    write_traces(world, args, margs, timers, engine, results, run_summary)
    if engine is not None:
        engine.close()  # before the process groups: a live CUDA graph holding NCCL work hangs their teardown
    world_mod.shutdown(world)


def prepare_progress(args: RunArgs, margs: ModelArgs, prompt_set: PromptSet) -> list:
    """Rank 0: lock the progress directory for the rest of the run, then resume.prepare (the finished
    prompts under --resume, their rows checked against the vocabulary and each prompt's max new tokens);
    refused, it lets the lock go and leaves the directory as it was."""
    resume.lock(args.output)
    max_new = [s.max_new_tokens for s in prompt_set.sampling] if prompt_set.sampling else None
    try:
        return resume.prepare(args, [p.id for p in prompt_set.prompts], vocab_size=margs.vocab_size,
                              max_new_tokens=max_new)
    except UsageError:
        resume.release(args.output)
        raise


def check_fits(world, args: RunArgs, margs: ModelArgs) -> None:
    """A CUDA model rank: UsageError (the planner's numbers) when its layout cannot fit its GPU."""
    if world.is_orchestrator or not world.device.startswith("cuda") or args.engine != "native":
        return
    import torch

    from spmd.engines.memory import layout_check
    from spmd.engines.native import keep_fp8

    dev = torch.device(world.device)
    gib = torch.cuda.get_device_properties(dev).total_memory / 2**30
    kept = keep_fp8(getattr(args, "fp8_weights", "auto"), dev, margs.fp8)
    problem = layout_check(args, margs, gib, world.local_size, kept)
    if problem:
        raise UsageError(problem)


def load(world, args: RunArgs, margs: ModelArgs, timers):
    """(engine or None, PromptSet on rank 0 / None elsewhere). Inline: rank 0 reads and tokenizes while the
    others wait; the engine is built later. Dedicated: the model ranks build their engine while rank 0
    reads and tokenizes; errors on either side meet in `agree`."""
    comm, engine, read = world.comm, None, (lambda: read_and_tokenize(args, margs))
    if world.first:
        if world.is_orchestrator:
            with timers.io("prompts.read_tokenize"):
                read = _attempt(read)
        with (timers.wait("load.models") if world.is_orchestrator else contextlib.nullcontext()):
            engine = agree(comm, lambda: None if world.is_orchestrator else
                           build_engine(args.engine, world, args, margs, timers))
    with (timers.io if world.rank == 0 else timers.wait)("prompts.read_tokenize"):  # others wait for rank 0
        prompt_set = on_root(comm, read, share=False)
    return engine, prompt_set


def _attempt(fn):
    """fn() now; returns a callable that gives its result, or raises its UsageError, later."""
    try:
        result = fn()
    except UsageError as exc:
        error = exc

        def fail():
            raise error
        return fail
    return lambda: result


def read_and_tokenize(args: RunArgs, margs: ModelArgs) -> PromptSet:
    """Rank 0: prompts, their token ids, their settings and the tokenizer (kept on rank 0)."""
    read = prompts.read_prompts(args.prompts)
    tokenizer = prompts.load_tokenizer(args.checkpoint)
    ids = prompts.encode(tokenizer, read, args.chat)
    sampling = [prompts.sampling_of(p, i, args) for i, p in enumerate(read)]
    prompts.check_context(read, ids, sampling, margs.max_seq_len)
    return PromptSet(read, ids, tokenizer, sampling, prompts.file_format(read))


def write_outputs(args: RunArgs, prompt_set: PromptSet, results, scoring, done, timers) -> list[dict]:
    """Rank 0: the output file (atomic; the OpenAI batch output for an OpenAI batch input), then the
    progress directory goes; returns this run's results."""
    timers.set_phase("other")
    with timers.io("outputs.write"):
        rows = prompts.output_rows(prompt_set.prompts, prompt_set.ids, results, prompt_set.tokenizer,
                                   prompt_set.sampling)
        if prompt_set.format == "openai":  # a request without body.model gets the checkpoint's name
            rows = prompts.batch_rows(prompt_set.prompts, rows, args.checkpoint.resolve().name)
        prompts.write_jsonl(args.output, score.attach(rows, results, scoring))
    resume.finish(args.output)  # the output is complete: drop the progress directory
    if not done:
        return results
    earlier = {r.index for r in done}  # traces count this run's tokens only
    return [r for r in results if r.index not in earlier]


def write_traces(world, args: RunArgs, margs: ModelArgs, timers, engine, results, run_summary=None) -> None:
    """Every rank writes its HDF5 file (rank 0's counts the tokens generated and holds the run summary, for
    traces.report); rank 0 merges them."""
    if args.trace_dir is None:
        return
    meta = run_metadata(world_mod.topology(world))
    meta.update(config=margs.raw, args={k: str(v) for k, v in asdict(args).items()}, engine=args.engine,
                engine_info=getattr(engine, "info", {}))
    traffic = getattr(engine, "traffic", lambda: None)()
    if traffic is not None:  # --group-layout dpa: all-to-all bytes per destination
        meta["ep_traffic"] = json.dumps(traffic)
    if results is not None:
        meta["tokens_generated"] = sum(len(r.tokens) for r in results)
    if run_summary is not None:
        meta["summary"] = json.dumps(run_summary)
    timers.write(args.trace_dir, meta)
    world.comm.Barrier()
    if world.rank == 0:
        merge(args.trace_dir)
