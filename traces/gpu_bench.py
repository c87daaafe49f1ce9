"""`make gpu-bench`: the machine's ceilings, then prefill and decode of the slice per engine, with floors.

    python -m traces.gpu_bench all --out traces/results/bench            # driver: everything below, one JSON
    mpirun -n G python -m traces.gpu_bench run --engine native --checkpoint DIR --group-size G --tag T

`all` measures the device-to-device copy bandwidth and the bf16 matmul rate, writes the slice checkpoint
(bf16 and fp8), then runs each configuration in its own process (so the GPU memory of one does not
bleed into the next) and writes `traces/results/bench/<gpu>-<date>.json` (and its plot, `.png`) with, per row,
prefill tokens/s, time to first token, decode ms/step, GPU memory per rank, the floor (traces.floor)
and measured/floor; traced batches (1 and 32) add the time per named span and the collectives per step.
Prompts are random token ids (128 per row), the same for every engine.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

from spmd.runtime import commands

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 8, 32, 64)


def _median_ms(fn, reps: int = 10, warmup: int = 2) -> float:
    """Median wall ms of fn() on the current CUDA stream (events around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def ceilings() -> dict:
    """Copy bandwidth (GB/s of bytes read + written) and bf16 matmul TFLOP/s, on random data."""
    x = torch.randn(256 * 2**20, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    y = torch.empty_like(x)
    copy_ms = _median_ms(lambda: y.copy_(x))
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mm_ms = _median_ms(lambda: a @ b)
    return {"copy_gbps": 2 * x.numel() * 2 / copy_ms / 1e6, "matmul_tflops": 2 * 8192**3 / mm_ms / 1e9,
            "gpu": torch.cuda.get_device_name()}


def _engine(a, world, max_new: int):
    """The engine of a `run`, with timers that record only while `timers.enabled` (the traced batch)."""
    from spmd.config import ModelArgs
    from spmd.engines import build_engine
    from spmd.obs.timers import Timers

    margs = ModelArgs.from_checkpoint(a.checkpoint)
    args = types.SimpleNamespace(checkpoint=a.checkpoint, dtype="bf16", max_new_tokens=max_new, micro_batches=0,
                                 cuda_graph=a.cuda_graph, fp8_weights=a.fp8_weights,
                                 fp8_prefill=a.fp8_prefill, fp8_unpack=a.fp8_unpack,
                                 group_layout=getattr(a, "group_layout", "tp"))
    timers = Timers(world.rank, world.device)
    timers.enabled = False
    return build_engine(a.engine, world, args, margs, timers), margs, timers


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _one_batch(engine, batch: int, prompt: int, steps: int, vocab: int, prefills: int = 1) -> dict:
    """Prefill one batch (`prefills` times: the time to first token is their median), then `steps`
    greedy decode steps after the last; times on the host after a synchronize."""
    g = torch.Generator().manual_seed(batch)
    tokens = torch.randint(7, vocab, (batch, prompt), generator=g).to(engine.device)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    times, issue, gpu = [], [], []
    cuda = engine.device.type == "cuda"
    for i in range(prefills):
        if i:
            engine.release()
        _sync(engine.device)
        if cuda:  # the stream's time from the call to the first token's argmax, idle gaps included
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            ev[0].record()
        t0 = time.perf_counter()
        logits = engine.prefill(tokens, mask)
        issue.append(time.perf_counter() - t0)  # the host's time to issue the prefill's work
        nxt = logits.argmax(-1)
        if cuda:
            ev[1].record()
        nxt.tolist()  # the first token reaches the host: time to first token
        times.append(time.perf_counter() - t0)
        if cuda:
            gpu.append(ev[0].elapsed_time(ev[1]) / 1e3)
    ttft = statistics.median(times)
    for _ in range(2):  # warm-up steps, not timed
        nxt = engine.decode(nxt).argmax(-1)
    _sync(engine.device)
    t1 = time.perf_counter()
    for _ in range(steps):
        nxt = engine.decode(nxt).argmax(-1)
    _sync(engine.device)
    decode = (time.perf_counter() - t1) / steps
    engine.release()
    return {"batch": batch, "prompt": prompt, "ttft_ms": ttft * 1e3, "ttft_ms_each": [t * 1e3 for t in times],
            "prefill_issue_ms": statistics.median(issue) * 1e3,
            "prefill_stream_ms": statistics.median(gpu) * 1e3 if gpu else None,
            "prefill_tok_s": batch * prompt / ttft, "decode_ms_step": decode * 1e3}


def _traced_batch(engine, timers, batch: int, prompt: int, steps: int, vocab: int) -> dict:
    """One batch with the timers on: collectives per decode step, their time, the compute time and the
    time per named span, from this rank's events. Decode steps replay graphs that time themselves
    (SPMD_GRAPH_MARKS=stamp|event), else they run eager (a plain replay is one event)."""
    from spmd.obs.graph_marks import marks_mode
    from traces.report import bubble_fraction

    graphs = getattr(engine, "graphs", None)
    eager = graphs is not None and graphs.mode == "graph" and marks_mode() == "off"
    if eager:
        engine.graphs = None
    timers.enabled = True
    tokens = torch.randint(7, vocab, (batch, prompt), generator=torch.Generator().manual_seed(1)).to(engine.device)
    timers.set_phase("prefill", 0)
    nxt = engine.prefill(tokens, torch.ones_like(tokens, dtype=torch.bool)).argmax(-1)
    for step in range(1, steps + 1):
        timers.set_phase("decode", step)
        nxt = engine.decode(nxt).argmax(-1)
        nxt.tolist()  # the generate loop's host sync
    engine.release()
    timers.enabled, engine.graphs = False, graphs
    ev = timers.table()
    timers.clear()  # the next traced batch starts empty
    ev = ev[(ev["phase"] == b"decode") & (ev["step"] > 2)]  # the first steps warm up
    n = max(len(set(ev["step"].tolist())), 1)
    comm = ev[ev["kind"] == b"comm"]
    names = sorted({x.decode() for x in comm["name"].tolist()})
    per_name: dict[str, float] = {}
    for name, dur in zip(ev["name"].tolist(), ev["dur_ns"].tolist()):
        per_name[name.decode()] = per_name.get(name.decode(), 0.0) + dur / n / 1e6
    return {"traced_batch": batch, "bubble_fraction": bubble_fraction(ev), "traced_decode": "eager" if eager else getattr(engine, "decode_mode", "eager"),
            "graph_marks": marks_mode(), "comm_per_step": len(comm) / n, "comm_ms_per_step": comm["dur_ns"].sum() / n / 1e6,
            "comm_bytes_per_step": int(comm["bytes"].sum() / n), "comm_names": names,
            "compute_ms_per_step": ev[ev["kind"] == b"compute"]["dur_ns"].sum() / n / 1e6,
            "ms_per_step_by_name": dict(sorted(per_name.items(), key=lambda kv: -kv[1]))}


def _prefill_kernels(engine, batch: int, prompt: int, vocab: int, top: int = 25) -> dict:
    """One prefill under torch.profiler: the GPU kernels by their total time (where prefill time goes,
    e.g. FP8 x FP8 GEMMs vs quantization vs attention), the top `top` by name and the rest summed."""
    from torch.profiler import ProfilerActivity, profile

    tokens = torch.randint(7, vocab, (batch, prompt), generator=torch.Generator().manual_seed(2)).to(engine.device)
    _sync(engine.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.prefill(tokens, torch.ones_like(tokens, dtype=torch.bool)).argmax(-1).tolist()
        _sync(engine.device)
    engine.release()
    kern = [(e.key, e.self_device_time_total / 1e3, e.count) for e in prof.key_averages()
            if e.self_device_time_total > 0]
    kern.sort(key=lambda k: -k[1])
    total = sum(k[1] for k in kern)
    return {"profiled_batch": batch, "prefill_kernel_ms": total,
            "prefill_kernels": [{"name": n[:120], "ms": ms, "calls": c} for n, ms, c in kern[:top]],
            "prefill_kernels_rest_ms": total - sum(k[1] for k in kern[:top]), **_idle(prof.events())}


def _idle(events, top: int = 8, least_us: float = 20.0) -> dict:
    """Where the GPU waited during the profiled prefill: the span from the first kernel's start to the last
    one's end, the idle time in it (the span less the kernels' union), and the longest gaps of at least
    `least_us`, each with the kernels before and after (a gap is the host not keeping up: launch cost of
    small kernels, or a synchronisation)."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                   if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start)
    if not spans:
        return {}
    gaps, idle, end, prev = [], 0.0, spans[0][1], spans[0][2]
    for a, b, name in spans[1:]:
        if a > end:
            idle += a - end
            if a - end >= least_us:
                gaps.append({"us": a - end, "after": prev[:80], "before": name[:80]})
        if b > end:
            end, prev = b, name
    gaps.sort(key=lambda g: -g["us"])
    return {"prefill_gpu_span_ms": (end - spans[0][0]) / 1e3, "prefill_gpu_idle_ms": idle / 1e3,
            "prefill_gaps": gaps[:top], "prefill_gaps_n": len(gaps)}


def run(a) -> int:
    """One engine configuration over all batch sizes; rank 0 writes the rows to a.tag.json."""
    from spmd.runtime.world import make_world, shutdown
    from spmd.plan.perf import stage_bytes
    from traces.floor import decode_bytes

    dpa = a.group_layout == "dpa"  # every rank its own rows (batch / G), experts by all-to-all
    world = make_world(1 if dpa else a.group_size, a.device, pp=a.pp, ep=a.group_size if dpa else 1)
    gpus = a.group_size * a.pp
    cuda = a.device == "cuda"
    engine, margs, timers = _engine(a, world, a.steps + 4)
    vocab = min(margs.vocab_size, 8000)  # ids the synthetic tokenizer knows
    _one_batch(engine, 2, 16, 2, vocab)  # warm-up: first-call CUDA/cuBLAS setup stays out of the numbers
    rows = []
    for b in a.batches:
        mine = -(-b // a.group_size) if dpa else b  # dpa: this rank's share of the group's b rows
        _one_batch(engine, mine, a.prompt, 2, vocab)  # this shape's first call: cuBLAS/Triton setup, graph capture
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        r = {**_one_batch(engine, mine, a.prompt, a.steps, vocab, a.prefills), "batch": b, "rows_per_rank": mine}
        r["prefill_tok_s"] *= b / mine  # the group's prompt tokens over the (lockstep) prefill time
        mem = world.comm.allgather(torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0)
        # pipelines: the bytes per GPU if the stages split them evenly (the bubble is not in the floor)
        floor = (stage_bytes(margs, range(margs.n_layers), mine, a.prompt + a.steps // 2, a.group_size, a.weights,
                             True, family="dpa", tokens=b) if dpa else
                 decode_bytes(margs, b, a.prompt + a.steps // 2, a.group_size, a.weights) / a.pp)
        info = getattr(engine, "info", {})
        rows.append({**r, "engine": a.engine, "gpus": gpus, "pp": a.pp, "weights": a.weights,
                     "group_layout": a.group_layout,
                     "moe_path": info.get("moe_path", ""), "decode_mode": info.get("decode_mode", "eager"),
                     "fp8_path": info.get("fp8_path", ""), "load_s": info.get("load_s"),
                     "load_bytes_read": info.get("load_bytes_read"),
                     "gpu_mem_gib_per_rank": mem, "decode_floor_bytes": floor})
        if b in a.trace_batches:
            rows[-1].update(_traced_batch(engine, timers, mine, a.prompt, a.steps, vocab))
        if b in a.profile_batches and cuda:
            rows[-1].update(_prefill_kernels(engine, mine, a.prompt, vocab))
        if world.rank == 0:
            print(f"{a.tag} batch {b}: {r['decode_ms_step']:.2f} ms/step", flush=True)
    if world.rank == 0:
        Path(a.out).write_text(json.dumps(rows))
    engine.close()
    shutdown(world)
    return 0


def _spawn(tag: str, ckpt: Path, work: Path, batches: str, trace_batches: str, profile_batches: str = "",
           prompt: int = 128) -> list[dict]:
    engine, g, weights, opts = CONFIGS[tag]
    out = work / f"{tag}.json"
    if not out.is_file():
        pp = int(opts[opts.index("--pp") + 1]) if "--pp" in opts else 1
        cmd = commands.mpirun(g, "traces.gpu_bench", "run", "--engine", engine, "--checkpoint", str(ckpt),
                              "--group-size", str(g // pp), "--weights", weights, "--tag", tag, "--out", str(out),
                              "--batches", batches, "--trace-batches", trace_batches,
                              "--profile-batches", profile_batches, "--prompt", str(prompt), *opts)
        r = subprocess.run(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)  # stdout: the rows as they come
        if r.returncode != 0:
            print(f"{tag} failed:\n{r.stderr[-3000:]}", file=sys.stderr, flush=True)
            return [{"tag": tag, "error": r.stderr[-1500:]}]
    return [dict(row, tag=tag) for row in json.loads(out.read_text())]


EAGER, DEQUANT, DPA = ("--cuda-graph", "off"), ("--fp8-weights", "dequant"), ("--group-layout", "dpa")
CONFIGS = {  # tag: (engine, gpus, weights, options of `run`)
    "native-1gpu-bf16": ("native", 1, "bf16", ()), "native-1gpu-bf16-eager": ("native", 1, "bf16", EAGER),
    "native-1gpu-fp8": ("native", 1, "fp8", ()), "native-1gpu-fp8-dequant": ("native", 1, "fp8", DEQUANT),
    # FP8 kernels (issue 26): weight-only prefill (w8a16), and the Ampere path (bytes) forced on this GPU
    "native-1gpu-fp8-w8a16": ("native", 1, "fp8", ("--fp8-prefill", "w8a16")),
    "native-1gpu-fp8-bytes": ("native", 1, "fp8", ("--fp8-unpack", "bytes")),
    "native-2gpu-bf16": ("native", 2, "bf16", ()), "native-2gpu-fp8": ("native", 2, "fp8", ()),
    "native-2gpu-bf16-eager": ("native", 2, "bf16", EAGER),
    "native-2gpu-pp2-bf16": ("native", 2, "bf16", ("--pp", "2")),
    "hf-1gpu-bf16": ("hf", 1, "bf16", ()), "hf-2gpu-bf16": ("hf", 2, "bf16", ()),  # 2: transformers' TP/EP
    "deepspeed-2gpu-bf16": ("deepspeed", 2, "bf16", ()),
    # the group layouts (issue 29 runs them where 2-4 GPUs are lent): tp vs dpa at G2, G4; G1 dpa = tp
    "native-4gpu-fp8": ("native", 4, "fp8", ()), "native-1gpu-dpa-fp8": ("native", 1, "fp8", DPA),
    "native-2gpu-dpa-fp8": ("native", 2, "fp8", DPA), "native-4gpu-dpa-fp8": ("native", 4, "fp8", DPA),
}


def all_(a) -> int:
    """Ceilings, checkpoints, every configuration; one JSON with floors and ratios; a table on stdout."""
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ceil = ceilings()
    print(f"ceilings on {ceil['gpu']}: copy {ceil['copy_gbps']:.0f} GB/s, bf16 matmul "
          f"{ceil['matmul_tflops']:.0f} TFLOP/s", flush=True)
    rows = []
    for tag in a.configs.split(","):
        _, g, weights, _ = CONFIGS[tag]
        if g > torch.cuda.device_count():
            continue
        rows += _spawn(tag, commands.checkpoint("slice", weights, Path(a.ckpt_root), "cuda"), work, a.batches_arg,
                       a.trace_batches_arg, a.profile_batches_arg, a.prompt)
    for r in rows:
        if "decode_floor_bytes" in r:
            r["decode_floor_ms"] = r["decode_floor_bytes"] / (ceil["copy_gbps"] * 1e9) * 1e3
            r["decode_vs_floor"] = r["decode_ms_step"] / r["decode_floor_ms"]
    doc = {"gpu": ceil["gpu"], "date": dt.date.today().isoformat(), "ceilings": ceil, "rows": rows}
    out = Path(a.out) / f"{a.prefix}{ceil['gpu'].replace(' ', '_')}-{doc['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(table(rows))
    from traces.bench_plot import plot_bench
    print(f"wrote {out} and {plot_bench(doc, out.with_suffix('.png'))}")
    return 0


def table(rows: list[dict]) -> str:
    lines = [f"{'config':26} {'batch':>5} {'prefill tok/s':>13} {'TTFT ms':>8} {'decode ms':>9} "
             f"{'floor ms':>8} {'x floor':>7} {'GiB/rank':>8} {'comm/step':>9} {'comm ms':>7}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['tag']:26} ERROR")
            continue
        comm = f"{r['comm_per_step']:9.1f} {r['comm_ms_per_step']:7.2f}" if "comm_per_step" in r else ""
        lines.append(f"{r['tag']:26} {r['batch']:>5} {r['prefill_tok_s']:13.0f} {r['ttft_ms']:8.1f} "
                     f"{r['decode_ms_step']:9.2f} {r['decode_floor_ms']:8.2f} {r['decode_vs_floor']:7.2f} "
                     f"{max(r['gpu_mem_gib_per_rank']):8.2f} {comm}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--engine", required=True)
    r.add_argument("--checkpoint", type=Path, required=True)
    r.add_argument("--group-size", type=int, default=1, help="ranks per pipeline stage")
    r.add_argument("--pp", type=int, default=1, help="pipeline stages (native engine; eager decode)")
    r.add_argument("--group-layout", choices=("tp", "dpa"), default="tp",
                   help="dpa: each rank runs batch/G rows, experts by all-to-all (eager decode)")
    r.add_argument("--weights", default="bf16")
    r.add_argument("--tag", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--batches", default=",".join(map(str, BATCHES)))
    r.add_argument("--prompt", type=int, default=128)
    r.add_argument("--steps", type=int, default=16)
    r.add_argument("--prefills", type=int, default=5, help="prefills per batch: the time to first token is their "
                   "median (one prefill is noisy: +-3 %% between runs on an H100)")
    r.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    r.add_argument("--cuda-graph", default="auto")
    r.add_argument("--fp8-weights", default="auto")
    r.add_argument("--fp8-prefill", default="auto")
    r.add_argument("--fp8-unpack", default="auto")
    r.add_argument("--trace-batches", default="1,32", help="these batches are run again with the timers on: "
                   "collectives per step and their time, time per named span")
    r.add_argument("--profile-batches", default="", help="these batches' prefill is run again under "
                   "torch.profiler: time per GPU kernel (CUDA only)")
    al = sub.add_parser("all")
    al.add_argument("--configs", default=",".join(CONFIGS))
    al.add_argument("--batches", dest="batches_arg", default=",".join(map(str, BATCHES)))
    al.add_argument("--trace-batches", dest="trace_batches_arg", default="1,32",
                    help="batches run again with the timers on (time per span, collectives, bubble)")
    al.add_argument("--profile-batches", dest="profile_batches_arg", default="",
                    help="batches whose prefill is profiled per GPU kernel (torch.profiler)")
    al.add_argument("--prompt", type=int, default=128, help="prompt tokens per row (the prefill is batch x this)")
    al.add_argument("--ckpt-root", default=str(ROOT / "build" / "checkpoints"))
    al.add_argument("--work", default=str(ROOT / "build" / "bench"))
    al.add_argument("--out", default=str(ROOT / "traces" / "results" / "bench"))
    al.add_argument("--prefix", default="", help="of the result file's name (e.g. 'fused-': a run of some "
                                                 "configurations beside the full one of the same day)")
    a = p.parse_args(argv)
    if a.cmd == "run":
        a.batches = [int(b) for b in a.batches.split(",")]
        a.trace_batches = [int(b) for b in a.trace_batches.split(",") if b]
        a.profile_batches = [int(b) for b in a.profile_batches.split(",") if b]
        return run(a)
    return all_(a)


if __name__ == "__main__":
    sys.exit(main())
