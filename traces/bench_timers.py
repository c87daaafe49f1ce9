"""Timer overhead vs a decode step: ``make bench`` / ``python -m traces.bench_timers [--device cuda]``.

One process (group size 1) builds the tiny native engine and runs one batch: prefill, then ``--steps``
greedy decode steps timed on the host (each ends with the next tokens on the host, so GPU work is
included), with the engine's timers enabled and disabled on alternate steps (the order alternates per
trial), so each (on, off) pair runs the same weights close in time and shares the machine's load.
Overhead = median of the paired differences (on - off) / median step time off (also from the minima),
in process CPU time on CPU (what timers add; insensitive to a shared machine's load) and wall time
on GPU; both clocks are in the JSON.
Cross-check: events recorded per decode step × the cost of one empty timed span / the step time.
Writes ``OUT/timers-<device>[-graph]-<host>-<date>.json``; the limit is 2 %. A benchmark, not a test.
On GPU the default decode replays CUDA graphs: timed steps replay graphs that record the per-layer and
per-collective events themselves (resolved on the host while the next step runs), untimed steps a graph
without them; ``--cuda-graph off`` measures the eager step with the same events.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
LIMIT_PCT = 2.0


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _prefill(engine, timers, tokens, mask):
    timers.set_phase("prefill", 0)
    nxt = engine.prefill(tokens, mask).argmax(-1)
    nxt.tolist()
    return nxt


def _step(engine, timers, nxt, step: int):
    """One greedy decode step; (next tokens, (wall s, process CPU s) until they are on the host)."""
    timers.set_phase("decode", step)
    t0, c0 = time.perf_counter(), time.process_time()
    nxt = engine.decode(nxt).argmax(-1)
    nxt.tolist()
    return nxt, (time.perf_counter() - t0, time.process_time() - c0)


def toggled_steps(engine, timers, tokens, mask, steps: int, first_on: bool) -> dict[str, list[tuple]]:
    """Prefill, then decode steps with the timers switched on and off every other step."""
    nxt = _prefill(engine, timers, tokens, mask)
    times = {"on": [], "off": []}
    for s in range(steps):
        on = (s % 2 == 0) == first_on
        timers.enabled = on  # what Timers(enabled=False) does: every context is a shared null context
        nxt, dt = _step(engine, timers, nxt, s + 1)
        times["on" if on else "off"].append(dt)
    timers.enabled = True
    engine.release()
    timers.flush()
    return times


def span_cost_ns(device: str, n: int = 20000) -> float:
    """Host ns of one empty ``with timers.compute(...)`` span (CUDA events on GPU)."""
    from spmd.obs.timers import Timers

    t = Timers(0, device)
    for _ in range(100):
        with t.compute("warm", layer=0):
            pass
    _sync(device)
    t0 = time.perf_counter_ns()
    for _ in range(n):
        with t.compute("x", layer=0):
            pass
    return (time.perf_counter_ns() - t0) / n


def _engine(world, ckpt: Path, dtype: str, steps: int, cuda_graph: str = "auto"):
    from spmd.config import ModelArgs
    from spmd.engines.native import NativeEngine
    from spmd.obs.timers import Timers

    margs = ModelArgs.from_checkpoint(ckpt)
    args = types.SimpleNamespace(checkpoint=ckpt, dtype=dtype, max_new_tokens=steps + 1, cuda_graph=cuda_graph)
    timers = Timers(world.rank, world.device)
    return NativeEngine(world, args, margs, timers), timers, margs


def overhead(on: list[float], off: list[float], seed: int = 0) -> dict:
    """Median step times (ms); overhead in % = median of the paired differences / median off, with a
    bootstrap 95 % interval, and from the medians and the minima of each side."""
    on_a, off_a = np.array(on), np.array(off)
    diffs, base = on_a - off_a, np.median(off_a)
    rng = np.random.default_rng(seed)
    boot = np.median(rng.choice(diffs, size=(1000, len(diffs))), axis=1) / base * 100
    return {"ms_off": base * 1e3, "ms_on": float(np.median(on_a)) * 1e3,
            "overhead_pct": float(np.median(diffs) / base * 100),
            "overhead_pct_ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
            "overhead_pct_medians": float((np.median(on_a) / base - 1) * 100),
            "overhead_pct_min": float((on_a.min() / off_a.min() - 1) * 100), "pairs": len(diffs)}


def run(ckpt: Path, device: str, dtype: str, batch: int, steps: int, trials: int, cuda_graph: str = "auto") -> dict:
    """The benchmark; returns the result record."""
    from spmd.runtime.prompts import encode, load_tokenizer, read_prompts
    from spmd.runtime.generate import left_pad
    from spmd.runtime.world import make_world, shutdown

    world = make_world(1, device)
    engine, timers, margs = _engine(world, ckpt, dtype, steps, cuda_graph)
    ids = encode(load_tokenizer(ckpt), read_prompts(ROOT / "inputs/prompts/validation20.jsonl"), chat=True)
    tokens, mask = left_pad(ids[:batch], margs.eos_token_id, world.device)
    times = {"on": [], "off": []}
    for trial in range(trials + 1):  # trial 0 warms up and is dropped
        t = toggled_steps(engine, timers, tokens, mask, steps, first_on=trial % 2 == 1)
        if trial:
            for label in times:
                times[label] += t[label]
    clocks = {clock: overhead([t[i] for t in times["on"]], [t[i] for t in times["off"]])
              for i, clock in enumerate(("wall", "cpu"))}
    # CPU time of the process is what the timers add on CPU, and barely moves with the machine's load;
    # on GPU the step is GPU time, so wall time it is
    main = clocks["wall" if device == "cuda" else "cpu"]
    ev = timers.table()
    events_per_step = int((ev["phase"] == b"decode").sum()) / ((trials + 1) * (steps - steps // 2))
    cost = span_cost_ns(world.device)
    result = {
        "host": socket.gethostname(), "cpu": _cpu_name(), "device": world.device,
        "gpu": torch.cuda.get_device_name(world.device) if device == "cuda" else "",
        "torch": torch.__version__, "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": ckpt.name, "dtype": dtype, "batch": batch, "steps": steps, "trials": trials,
        "decode_mode": engine.decode_mode, "graph_marks": _graph_marks(engine.decode_mode),
        "omp_threads": os.environ.get("OMP_NUM_THREADS", ""), "cpus": os.cpu_count(),
        "loadavg_1min": os.getloadavg()[0],  # a shared machine's load makes the paired numbers noisy
        "clock": "wall" if device == "cuda" else "cpu", "decode_ms_off": main["ms_off"], "decode_ms_on": main["ms_on"],
        "overhead_pct": main["overhead_pct"], "overhead_pct_ci95": main["overhead_pct_ci95"],
        "wall_time": clocks["wall"], "cpu_time": clocks["cpu"],
        "events_per_decode_step": events_per_step, "ns_per_event": cost,
        "estimated_overhead_pct": 100 * events_per_step * cost / (main["ms_off"] * 1e6), "limit_pct": LIMIT_PCT}
    result["pass"] = result["overhead_pct"] < LIMIT_PCT
    engine.close()
    shutdown(world)
    return result


def _graph_marks(decode_mode: str) -> str:
    """The marks mode of graph replays, with "-layer" at SPMD_GRAPH_MARK_LEVEL=layer ("" when eager)."""
    from spmd.obs.graph_marks import marks_level, marks_mode

    if decode_mode != "graph":
        return ""
    mode = marks_mode()
    return f"{mode}-layer" if mode != "off" and marks_level() == "layer" else mode


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_result(result: dict, out_dir: Path) -> Path:
    """OUT/timers-<device>-<host>-<date>.json, written atomically."""
    dev = (result["gpu"] or "cpu").replace(" ", "_")
    mode = "" if result.get("decode_mode", "eager") == "eager" else f"-{result['decode_mode']}"
    mode += f"-{result['graph_marks']}" if result.get("graph_marks") else ""
    path = Path(out_dir) / f"timers-{dev}{mode}-{result['host']}-{result['date'][:10]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    """CLI: run the benchmark, write the JSON, print the verdict (exit 1 over the limit)."""
    p = argparse.ArgumentParser(prog="python -m traces.bench_timers", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=ROOT / "build/checkpoints/tiny-bf16")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default fp32 on CPU, bf16 on GPU")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=16, help="decode steps per trial (even)")
    p.add_argument("--trials", type=int, default=25)
    p.add_argument("--out", type=Path, default=ROOT / "traces/results/bench")
    p.add_argument("--cuda-graph", choices=("auto", "off"), default="auto",
                   help="auto: decode steps replayed from CUDA graphs on GPU (timed: graphs that record the "
                        "per-layer and per-collective events; untimed: a graph without them); off: eager")
    a = p.parse_args(argv)
    dtype = a.dtype or ("bf16" if a.device == "cuda" else "fp32")
    result = run(a.checkpoint, a.device, dtype, a.batch, a.steps, a.trials, a.cuda_graph)
    path = write_result(result, a.out)
    print(f"decode step {result['decode_ms_off']:.3f} ms (timers off), {result['decode_ms_on']:.3f} ms (on), "
          f"{result['clock']} time: overhead {result['overhead_pct']:+.2f} % (95 % interval "
          f"{result['overhead_pct_ci95'][0]:+.2f} to {result['overhead_pct_ci95'][1]:+.2f}; limit {LIMIT_PCT} %; "
          f"estimate "
          f"{result['events_per_decode_step']:.0f} events x {result['ns_per_event']:.0f} ns = "
          f"{result['estimated_overhead_pct']:.2f} %) -> {path}")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
