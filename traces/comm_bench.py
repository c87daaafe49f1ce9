"""`make gpu-comm-bench`: the two group layouts' collectives on the GPUs of one host, in and out of CUDA graphs.

    mpirun -n G python -m mpi4py -m traces.comm_bench [--device cuda|cpu] [--rows 1,8,...] [--out traces/results/comm]

Per size, the collectives one MoE layer runs with a model group of G ranks (DeepSeek-V3: hidden 7168, bf16):
- tp: ``all_reduce`` of the group's rows x 7168 (``moe.combine``; attention's all-reduce is the same size);
- dpa: ``all_to_all_single`` of the dispatch with uneven splits: each rank holds rows/G of the group's rows
  and sends each once to every rank owning one of its top-8 experts, the experts drawn by group-limited
  routing of uniform scores (spmd.plan.routing, seeded: real splits, not even ones), contiguous expert
  ranges over the G ranks; the combine sends the same rows back (the same bytes, splits transposed).
Rows per group: decode-sized 1 to 512 and prefill-sized 1,024 to 16,384. Each is timed out of graphs
(median of --reps calls, CUDA events, after warm-up) and, on CUDA, captured once in a CUDA graph and timed
over --reps replays (fixed splits: what a graph-captured decode step would replay). Bytes: what this rank
sends. Rank 0 writes OUT/<gpu>-<date>-g<G>.json and .md. On CPU (gloo) it checks the script, not the
network: no graphs.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
DIM = 7168
DECODE_ROWS = (1, 8, 32, 64, 128, 256, 512)
PREFILL_ROWS = (1024, 4096, 16384)


def splits(rows_per_rank: int, group: int, rank: int, m) -> list[int]:
    """Rows this rank sends to each rank: its tokens' distinct destination ranks under seeded routing."""
    from spmd.plan.routing import sample_routes

    per = m.n_routed_experts // group
    routes = sample_routes(m, max(rows_per_rank, 1), seed=1000 + rank)[:rows_per_rank]
    out = [0] * group
    for experts in routes:
        for d in {e // per for e in experts}:
            out[d] += 1
    return out


def timed(fn, reps: int, cuda: bool) -> float:
    """Median ms of fn() (CUDA events on CUDA, as gpu_bench times; the host clock on CPU)."""
    if cuda:
        from traces.gpu_bench import _median_ms

        return _median_ms(fn, reps, warmup=3)
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def in_graph(fn, reps: int) -> float:
    """fn captured once in a CUDA graph (warm-up on a side stream first), median ms of a replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms = timed(graph.replay, reps, True)
    graph.reset()
    return ms


def one_size(rows: int, group: int, rank: int, m, device, reps: int) -> dict:
    cuda = device.type == "cuda"
    mine = -(-rows // group)
    send = splits(mine, group, rank, m)
    recv = torch.tensor(send, device=device)
    gathered = torch.empty(group * group, dtype=recv.dtype, device=device)
    dist.all_gather_into_tensor(gathered, recv) if cuda else dist.all_gather(list(gathered.view(group, group)), recv)
    recv_rows = gathered.view(group, group)[:, rank].tolist()  # what each rank sends to me
    x = torch.randn(sum(send), DIM, device=device, dtype=torch.bfloat16)
    y = torch.empty(sum(recv_rows), DIM, device=device, dtype=torch.bfloat16)
    ar = torch.randn(rows, DIM, device=device, dtype=torch.bfloat16)
    a2a = lambda: dist.all_to_all_single(y, x, recv_rows, send)  # noqa: E731
    red = lambda: dist.all_reduce(ar)  # noqa: E731
    out = {"rows": rows, "rows_per_rank": mine, "send_rows": send, "alltoall_bytes": sum(send) * DIM * 2,
           "allreduce_bytes": rows * DIM * 2, "alltoall_ms": timed(a2a, reps, cuda),
           "allreduce_ms": timed(red, reps, cuda)}
    if cuda:
        out["alltoall_graph_ms"], out["allreduce_graph_ms"] = in_graph(a2a, reps), in_graph(red, reps)
    return out


def markdown(doc: dict) -> str:
    lines = [f"# MoE-layer collectives on {doc['group']} ranks of one host: {doc['gpu']}, {doc['date']}", "",
             "dpa dispatch = all_to_all_single with routed uneven splits (rank 0's shown), tp = all_reduce of the "
             "group's rows x 7168 bf16; ms per call, median; graph = replay of a captured call.", "",
             "| rows (group) | rank 0 sends rows to | all-to-all bytes (rank 0) | all-to-all ms | in graph | "
             "all-reduce bytes | all-reduce ms | in graph |", "|---|---|---|---|---|---|---|---|"]
    for r in doc["sizes"]:
        lines.append(f"| {r['rows']} | {r['send_rows']} | {r['alltoall_bytes']:,} | {r['alltoall_ms']:.3f} | "
                     f"{r.get('alltoall_graph_ms', float('nan')):.3f} | {r['allreduce_bytes']:,} | "
                     f"{r['allreduce_ms']:.3f} | {r.get('allreduce_graph_ms', float('nan')):.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--rows", default=",".join(map(str, DECODE_ROWS + PREFILL_ROWS)))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--config", type=Path, default=ROOT / "inputs" / "models" / "v3.1-671b.json")
    p.add_argument("--out", type=Path, default=ROOT / "traces" / "results" / "comm")
    a = p.parse_args(argv)
    from spmd.config import ModelArgs
    from spmd.runtime.world import make_world, shutdown

    world = make_world(1, a.device)  # the whole world is the group here: one torch.distributed group
    device = torch.device(world.device)
    m = ModelArgs.from_config(json.loads(a.config.read_text()))
    group, rank = world.size, world.rank
    doc = {"date": dt.date.today().isoformat(), "group": group, "device": a.device,
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "sizes": []}
    for rows in map(int, a.rows.split(",")):
        doc["sizes"].append(one_size(rows, group, rank, m, device, a.reps))
        if rank == 0:
            r = doc["sizes"][-1]
            print(f"rows {rows}: all-to-all {r['alltoall_ms']:.3f} ms, all-reduce {r['allreduce_ms']:.3f} ms", flush=True)
    if rank == 0:
        from traces.table import write_result
        write_result(a.out, f"{doc['gpu']}-{doc['date']}-g{group}", doc, markdown(doc))
    shutdown(world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
