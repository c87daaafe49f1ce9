"""The run summary: what rank 0 prints after a run and writes next to the output (``OUTPUT.summary.json``).

``summarize`` is pure (no MPI, no torch): this run's results (with ``--resume``, the prompts an earlier
run finished are not counted) and the numbers the runtime measured go in, a JSON-ready dict comes out.
``timer_shares`` reads a Timers table (spmd.obs.timers schema); ``report_run`` is rank 0's glue.

Keys: prompts, input_tokens (their prompt tokens), output_tokens (generated, EOS included), wall_s (from
the start of serving to the last result on rank 0), output_tokens_per_s, ttft_p50_s, ttft_p95_s,
latency_p50_s, latency_p95_s, queue_p50_s (Result's fields: admission → first / last token, the group got
it → admission), load_s (the aligned start, after the world is set up, to the start of serving),
decode_comm_share (rank 0's decode-phase collective time over its timed decode time, as traces.report's
comm %), gpu_busy_share / gpu_idle_share (rank 0's GPU-timed compute and comm spans, their union, over
wall_s), output, scheduler (the serving loops' numbers, ``ServeContext.stats``, plus step_efficiency = (output_tokens - first tokens) /
slot_steps when slot_steps > 0). A number that cannot be had is None (timers off: no --trace-dir).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from spmd.runtime.prompts import write_atomic
from spmd.runtime.records import Result


@dataclass(frozen=True)
class TimerShares:
    """What rank 0's timers say about the serving window (None: not measured)."""

    decode_comm_share: float | None = None
    gpu_busy_share: float | None = None


def _union_ns(start: np.ndarray, end: np.ndarray) -> int:
    """Total length covered by intervals [start, end): compute and comm on two streams may overlap."""
    if not len(start):
        return 0
    order = np.argsort(start, kind="stable")
    start, end = start[order], end[order]
    reach = np.maximum.accumulate(end)
    before = np.concatenate(([start[0]], reach[:-1]))  # furthest end of the intervals before each one
    return int(np.maximum(reach - np.maximum(start, before), 0).sum())


def timer_shares(events: np.ndarray, serve_start_ns: int, wall_s: float, gpu: bool) -> TimerShares:
    """Decode comm share and (gpu: compute/comm timed by CUDA events) GPU busy share of one rank's table."""
    decode = events[events["phase"] == b"decode"]
    timed = int(decode["dur_ns"].sum())
    comm_share = float(decode["dur_ns"][decode["kind"] == b"comm"].sum() / timed) if timed else None
    busy = None
    if gpu and wall_s > 0:
        end_ns = serve_start_ns + wall_s * 1e9
        dev = events[np.isin(events["kind"], (b"compute", b"comm")) & (events["start_ns"] >= serve_start_ns)]
        covered = _union_ns(dev["start_ns"], np.minimum(dev["start_ns"] + dev["dur_ns"], end_ns))
        busy = min(covered / (wall_s * 1e9), 1.0) if len(dev) else None
    return TimerShares(comm_share, busy)


def _percentiles(values: list[float], qs: Sequence[float]) -> list[float | None]:
    if not values:
        return [None] * len(qs)
    return [float(v) for v in np.percentile(np.asarray(values, dtype=np.float64), qs)]


def _plain(value):
    """numpy scalars as Python ones, so the dict is JSON as it is."""
    return value.item() if isinstance(value, np.generic) else value


def summarize(results: Sequence[Result], prompt_lengths: Sequence[int], wall_s: float, output,
              load_s: float | None = None, shares: TimerShares | None = None,
              scheduler: dict | None = None) -> dict:
    """This run's summary (keys: the module docstring); prompt_lengths[i] = prompt i's token count."""
    shares = shares or TimerShares()
    out_tokens = sum(len(r.tokens) for r in results)
    ttft = _percentiles([r.ttft_s for r in results], (50, 95))
    latency = _percentiles([r.latency_s for r in results], (50, 95))
    sched = {k: _plain(v) for k, v in (scheduler or {}).items()}
    if sched.get("slot_steps"):  # a row's first token comes from its prefill, the rest from decode slot-steps
        sched["step_efficiency"] = (out_tokens - sum(1 for r in results if r.tokens)) / sched["slot_steps"]
    busy = shares.gpu_busy_share
    return {
        "prompts": len(results), "input_tokens": sum(int(prompt_lengths[r.index]) for r in results),
        "output_tokens": out_tokens, "wall_s": wall_s,
        "output_tokens_per_s": out_tokens / wall_s if wall_s > 0 else None,
        "ttft_p50_s": ttft[0], "ttft_p95_s": ttft[1], "latency_p50_s": latency[0], "latency_p95_s": latency[1],
        "queue_p50_s": _percentiles([r.queue_s for r in results], (50,))[0], "load_s": load_s,
        "decode_comm_share": shares.decode_comm_share, "gpu_busy_share": busy,
        "gpu_idle_share": None if busy is None else 1.0 - busy, "output": str(output), "scheduler": sched,
    }


def summary_path(output) -> Path:
    """out/x.jsonl → out/x.summary.json."""
    return Path(output).with_suffix(".summary.json")


def write_summary(path: Path, summary: dict) -> None:
    """The summary as JSON, atomically (a temporary file in the same directory, fsync, rename)."""
    write_atomic(path, json.dumps(summary, indent=1) + "\n")


def _secs(x: float) -> str:
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:,.0f}"


def _pair(a: float | None, b: float | None) -> str:
    return f"{_secs(a)}/{_secs(b)} s"


def _value(key: str, v) -> str:
    if key.endswith(("_share", "_efficiency")) and isinstance(v, float):
        return f"{v:.0%}"
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


def format_summary(d: dict) -> list[str]:
    """The printed lines: label column aligned, numbers that are None left out."""
    rate = d.get("output_tokens_per_s")
    lines = [("summary", f"{d['prompts']:,} prompts, {d['input_tokens']:,} input + {d['output_tokens']:,} output "
                         f"tokens in {_secs(d['wall_s'])} s" + (f": {rate:,.1f} output tokens/s" if rate else ""))]
    if d["prompts"]:
        lines.append(("latency", f"TTFT p50/p95 {_pair(d['ttft_p50_s'], d['ttft_p95_s'])}, latency p50/p95 "
                                 f"{_pair(d['latency_p50_s'], d['latency_p95_s'])}, queue p50 "
                                 f"{_secs(d['queue_p50_s'])} s"))
    times = [f"load {_secs(d['load_s'])} s"] if d.get("load_s") is not None else []
    if d.get("decode_comm_share") is not None:
        times.append(f"decode comm share {d['decode_comm_share']:.0%}")
    if d.get("gpu_busy_share") is not None:
        times.append(f"GPU busy {d['gpu_busy_share']:.0%} (rank 0)")
    if times:
        lines.append(("time", ", ".join(times)))
    if d.get("scheduler"):
        lines.append(("scheduler", ", ".join(f"{k.replace('_', ' ')} {_value(k, v)}"
                                             for k, v in d["scheduler"].items() if not isinstance(v, dict))))
    lines.append(("output", f"{d['output']} (summary: {summary_path(d['output'])})"))
    width = max(len(label) for label, _ in lines) + 2
    return [f"{label + ':':<{width}}{text}" for label, text in lines]


def print_summary(d: dict) -> None:
    print("\n".join(format_summary(d)), flush=True)


def report_run(args, prompt_set, results: Sequence[Result], scheduler: dict, timers, serve_start_ns: int,
               wall_s: float) -> dict:
    """Rank 0, after the outputs: summarize this run, write OUTPUT.summary.json, print it; returns the dict.
    serve_start_ns: the start of serving on the timers' aligned clock (so also the load time)."""
    shares = TimerShares()
    if timers.enabled:
        shares = timer_shares(timers.table(), serve_start_ns, wall_s, gpu=timers.device.type == "cuda")
    d = summarize(results, [len(ids) for ids in prompt_set.ids], wall_s, args.output,
                  load_s=serve_start_ns / 1e9, shares=shares, scheduler=scheduler)
    write_summary(summary_path(args.output), d)
    print_summary(d)
    return d
