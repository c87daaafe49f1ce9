"""`python -m mpi4py -m spmd`: one run, top to bottom.

args → world → prompts (rank 0) → engine → dispatch + generate → gather → outputs (rank 0) → traces.
Bad input is found on rank 0 and reported once; every rank exits 2. Any other exception on any
rank aborts the whole job through `python -m mpi4py`.
"""
from __future__ import annotations

import sys
from dataclasses import asdict

from mpi4py import MPI

from . import args as A
from . import dispatch, world as W
from . import prompts as P
from .engines import build_engine
from .generate import GenConfig, generate
from .timers import Timers, run_metadata


def main(argv: list[str] | None = None) -> int:
    comm = MPI.COMM_WORLD
    try:
        run(comm, argv)
    except W.UsageError as exc:
        W.exit_on_usage_error(comm, exc)
    return 0


def run(comm, argv) -> None:
    args = A.parse_args(argv)  # same argv everywhere: the same result, or the same UsageError, on every rank
    W.on_root(comm, lambda: W.check_world_size(comm.size, args.group_size))
    W.on_root(comm, lambda: A.check_paths(args))
    margs = W.on_root(comm, lambda: A.ModelArgs.from_checkpoint(args.checkpoint))
    W.on_root(comm, lambda: A.check_model_topology(margs, args.group_size, args.engine))
    world = W.make_world(args.group_size, args.device, comm)
    timers = Timers(world.rank, world.device, enabled=args.trace_dir is not None)
    timers.align(comm)
    timers.set_phase("load")
    with (timers.io if world.rank == 0 else timers.wait)("prompts.read_tokenize"):  # others wait for rank 0
        text = W.on_root(comm, lambda: read_and_tokenize(args, margs), share=False)
    n = comm.bcast(len(text[0]) if world.rank == 0 else None, root=0)
    engine = build_engine(args.engine, world, args, margs, timers)
    results = dispatch.gather_results(world, serve(world, engine, args, margs, text, n, timers), n)
    if world.rank == 0:
        prompts, ids, tokenizer = text
        timers.set_phase("other")
        with timers.io("outputs.write"):
            P.write_jsonl(args.output, P.output_rows(prompts, ids, results, tokenizer))
    write_traces(world, args, margs, timers, engine)
    W.shutdown(world)


def read_and_tokenize(args: A.RunArgs, margs: A.ModelArgs):
    """Rank 0: prompts, their token ids and the tokenizer (kept on rank 0)."""
    prompts = P.read_prompts(args.prompts)
    tokenizer = P.load_tokenizer(args.checkpoint)
    ids = P.encode(tokenizer, prompts, args.chat)
    P.check_context(prompts, ids, args.max_new_tokens, margs.max_seq_len)
    return prompts, ids, tokenizer


def serve(world: W.World, engine, args: A.RunArgs, margs: A.ModelArgs, text, n: int, timers) -> list[dict]:
    """Generate for this replica's prompts, batch by batch; results carry their input index."""
    items = list(enumerate(text[1])) if world.rank == 0 else None
    cfg = GenConfig(args.max_new_tokens, margs.eos_token_id, margs.eos_token_id,
                    args.temperature, args.top_p, args.seed)
    if args.dispatch == "static":
        batches = dispatch.iter_static(world, items, args.batch_size)
    else:
        batches = (chunk[i:i + args.batch_size]
                   for chunk in dispatch.iter_dynamic(world, items, args.dispatch_size, timers)
                   for i in range(0, len(chunk), args.batch_size))
    progress = dispatch.Progress(world, n, enabled=args.progress)
    results = []
    for batch in batches:
        rows = generate(engine, batch, cfg, timers)
        results += [dict(r, replica=world.replica) for r in rows]
        progress.update(len(rows))
    progress.close()
    return results


def write_traces(world: W.World, args: A.RunArgs, margs: A.ModelArgs, timers, engine) -> None:
    """Every rank writes its HDF5 file; rank 0 merges them once all are on disk."""
    if args.trace_dir is None:
        return
    meta = run_metadata(W.topology(world))
    meta.update(config=margs.raw, args={k: str(v) for k, v in asdict(args).items()}, engine=args.engine,
                engine_info=getattr(engine, "info", {}), gpu_peak_bytes=_gpu_peak_bytes(world))
    timers.write(args.trace_dir, meta)
    world.comm.Barrier()
    if world.rank == 0:
        from traces.merge import merge
        merge(args.trace_dir)


def _gpu_peak_bytes(world: W.World) -> int:
    """Peak bytes allocated by PyTorch on this rank's GPU (0 on CPU)."""
    import torch

    return torch.cuda.max_memory_allocated(world.device) if world.device.startswith("cuda") else 0


if __name__ == "__main__":
    sys.exit(main())
