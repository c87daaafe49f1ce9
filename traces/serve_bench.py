"""`make gpu-serve-bench`, `make serve-bench-cpu`: the program on a chat-like workload, static vs continuous batching.

    python -m traces.serve_bench [--device cuda|cpu] [--checkpoint DIR] [--prompts N] [--default-batch 8]
        [--static-sweep 16,32,64] [--variant NAME='OPTIONS' ...] [--long] [--long-only] [--out DIR]

One workload (traces.workload: Azure conversation-trace lengths, per-request max_new_tokens, ignore_eos), the
real program (`mpirun -n 1 python -m mpi4py -m spmd`, one rank, native engine, raw prompts) run on it in turn:
(a) `--batching static --batch-size 8` (the static loop's default), (b) static at each batch size of
--static-sweep, the best static run (highest output tokens/s, (a) included) being (b), and (c) `--batching
continuous` with slots and prefill budget chosen by the program from memory. Each run's `<output>.summary.json`
(written by the program) gives output tokens/s, TTFT/latency p50/p95, GPU idle share, scheduler step
efficiency; its trace gives the peak GPU memory, its output file whether every request decoded to its
max_new_tokens. --long adds a run of the continuous loop on fixed-length prompts (default 32 of 4,096 tokens
and 8 of 16,384, 64 new tokens each): completion and peak memory. The targets (continuous >= 3x (a) and >=
1.5x (b)) are computed from the numbers. Each --variant adds a continuous run with more program options (its
own targets). Per continuous run, decode_check tabulates its decode steps per shape: the loop's wall ms, the
step's GPU ms, gpu_bench's step at that row count (the warm-up's, the decode target <= 1.3x). Writes OUT/<gpu>-<date>.json and .md (CPU: cpu-<host>-<date>).
On CUDA, a warm-up process first runs the engine at the decode row counts of the plan (traces.gpu_bench run),
so that Triton's FP8 kernels compile outside the measured runs.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from spmd.runtime import commands
from traces import workload
from traces.serve_report import analyze, markdown

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Run:
    """One run of the program: its name, --batching and (static) --batch-size, and what it stands for."""

    name: str
    batching: str
    batch_size: int = 0
    role: str = ""          # "a" (the static default), "sweep", "c" (continuous), "variant", "long"
    opts: tuple[str, ...] = ()  # more program options (a --variant's)
    ranks: int = 1              # MPI ranks (a --variant NAME@RANKS: e.g. a group of 2 GPUs)


def plan(default_batch: int, sweep: list[int], variants: list[str] = ()) -> list[Run]:
    """(a), the sweep, (c); then one continuous run per --variant NAME=OPTIONS (the program's options)."""
    runs = [Run(f"static-{default_batch}", "static", default_batch, "a")]
    runs += [Run(f"static-{b}", "static", b, "sweep") for b in sweep if b != default_batch]
    runs.append(Run("continuous", "continuous", role="c"))
    for v in variants:
        name, _, opts = v.partition("=")
        got = re.fullmatch(r"([\w.-]+)(?:@(\d+))?", name)
        if not got or not opts or (got[2] is not None and int(got[2]) < 1):
            raise SystemExit(f"--variant {v!r}: expected NAME[@RANKS]=OPTIONS, e.g. varlen='--mla-decode varlen' "
                             f"or D2@2='--group-layout dpa --group-size 2'")
        runs.append(Run(f"continuous-{got[1]}", "continuous", role="variant", opts=tuple(shlex.split(opts)),
                        ranks=int(got[2] or 1)))
    return runs


def command(run: Run, a, prompts: Path, max_new: int) -> list[str]:
    """The program's command line for one run (one rank)."""
    opts = ["--batching", run.batching] + (["--batch-size", str(run.batch_size)] if run.batching == "static" else [])
    return commands.mpirun(run.ranks, "spmd", "--checkpoint", str(a.checkpoint), "--prompts", str(prompts),
                           "--output", str(a.work / f"{run.name}.jsonl"), "--trace-dir", str(a.work / run.name),
                           "--engine", "native", "--device", a.device, "--dtype", a.dtype, "--no-chat-template",
                           "--no-progress", "--max-new-tokens", str(max_new), *opts, *run.opts, mpi4py=True)


def summary_path(output: Path) -> Path:
    """`<output>.summary.json`: OUTPUT + .summary.json, or OUTPUT's stem + .summary.json, whichever exists."""
    full, stem = output.with_name(output.name + ".summary.json"), output.with_suffix(".summary.json")
    return full if full.is_file() or not stem.is_file() else stem


def trace_facts(trace_dir: Path) -> dict:
    """Rank 0's peak GPU memory (GiB) and GPU name, from its trace file's attributes ({} without one)."""
    path = trace_dir / "rank00000.h5"
    if not path.is_file():
        return {}
    import h5py

    with h5py.File(path, "r") as f:
        peak, gpu = f.attrs.get("gpu_peak_bytes"), f.attrs.get("cuda_device", "")
    gpu = gpu.decode() if isinstance(gpu, bytes) else str(gpu)
    return {"peak_gpu_gib": float(peak) / 2**30 if peak is not None and gpu else None, "gpu": gpu}


def completion(output: Path, requests: list[dict]) -> dict:
    """How many requests decoded exactly their max_new_tokens (ignore_eos), per prompt length."""
    got = {r["id"]: len(r["completion_token_ids"]) for r in map(json.loads, output.read_text().splitlines())}
    by_len: dict[int, list[int]] = {}
    for q in requests:
        n = by_len.setdefault(q["prompt_tokens"], [0, 0])
        n[0] += got.get(q["id"]) == q["max_new_tokens"]
        n[1] += 1
    done = sum(v[0] for v in by_len.values())
    return {"completed": done, "requests": len(requests), "output_tokens": sum(got.values()),
            "by_prompt_tokens": {str(k): {"completed": v[0], "requests": v[1]} for k, v in sorted(by_len.items())}}


def execute(run: Run, cmd: list[str], a, requests: list[dict]) -> dict:
    """Run one configuration; its summary, trace facts and completion, or the error's tail."""
    out = a.work / f"{run.name}.jsonl"
    for stale in (out, out.with_name(out.name + ".summary.json"), out.with_suffix(".summary.json")):
        stale.unlink(missing_ok=True)  # an earlier call's files must not stand in for a failed run's
    shutil.rmtree(a.work / run.name, ignore_errors=True)
    t0 = time.perf_counter()
    rc, err = launch(cmd, a.run_timeout)
    row = {"name": run.name, "batching": run.batching, "batch_size": run.batch_size, "role": run.role,
           "command": " ".join(cmd), "process_s": time.perf_counter() - t0, **trace_facts(a.work / run.name)}
    if rc != 0:
        return {**row, "error": f"exit {rc}: {error_line(err)}\n{err[-2500:]}"}
    summary = summary_path(out)
    if not summary.is_file():
        return {**row, "error": f"no summary file {summary.name} (the program writes <output>.summary.json)"}
    return {**row, "summary": json.loads(summary.read_text()), **completion(out, requests)}


def launch(cmd: list[str], timeout: float) -> tuple[int, str]:
    """(exit status, stderr) of cmd, run in its own process group; past `timeout` the whole group (mpirun and
    its ranks, which hold the GPU) is stopped: SIGTERM, then SIGKILL; status 124."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        pass
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            _, err = proc.communicate(timeout=grace)
            return 124, f"error: timed out after {timeout:.0f} s\n{err[-2000:]}"
        except subprocess.TimeoutExpired:
            continue
    return 124, f"error: timed out after {timeout:.0f} s"


def error_line(stderr: str) -> str:
    """What went wrong: the program's `error: rank R of N ...` line, else the last exception line, else the last
    line of stderr."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    said = [ln for ln in lines if ln.startswith("error:")]
    exc = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b", ln)]
    return (said or exc or lines or ["(no output)"])[-1][:300]


# ------------------------------------------------------------------------------------------- driver

def make_workload(a, name: str, n: int, inp, outp, prefix: str) -> tuple[Path, list[dict], dict]:
    """The prompts file, its requests (id, max_new_tokens, prompt tokens as drawn and verified) and its numbers."""
    path = a.work / f"{name}.prompts.jsonl"  # apart from the runs' outputs (<run name>.jsonl)
    info = workload.generate(a.checkpoint, n, a.seed, path, inp, outp, prefix)
    lengths, _ = workload.draw_lengths(n, a.seed, inp, outp)
    reqs = [{"id": o["id"], "max_new_tokens": o["max_new_tokens"], "prompt_tokens": int(k)}
            for o, k in zip(map(json.loads, path.read_text().splitlines()), lengths)]
    return path, reqs, info


def long_workload(a) -> tuple[Path, list[dict], str]:
    """Fixed-length prompts (--long-inputs LEN:COUNT,...), --long-output new tokens each, in one file."""
    parts, reqs = [], []
    for spec in a.long_inputs.split(","):
        length, count = (int(x) for x in spec.split(":"))
        d = workload.LengthDist(length, 0.0, length, length, fixed=length)
        o = workload.LengthDist(a.long_output, 0.0, a.long_output, a.long_output, fixed=a.long_output)
        path, r, _ = make_workload(a, f"long-{length}", count, d, o, f"long{length}")
        parts.append(path.read_text())
        reqs += r
    path = a.work / "long.prompts.jsonl"
    path.write_text("".join(parts))
    desc = " and ".join(f"{c} prompts of {n} tokens" for n, c in (s.split(":") for s in a.long_inputs.split(",")))
    return path, reqs, f"{desc}, {a.long_output} new tokens each (ignore_eos), `--batching continuous`"


def warm_up(a, runs: list[Run]) -> list[dict]:
    """CUDA: one process runs the engine at the plan's static batch sizes and at every decode row count the
    continuous loop can use (powers of two, 8 to 512, and the slot count's cap, min(prompts, 512)), so
    that Triton compiles those kernels here; its decode steps are the anchors of decode_check."""
    rows = sorted({r.batch_size for r in runs if r.batch_size} | {8 << k for k in range(7)} | {min(a.prompts, 512)})
    t0 = time.perf_counter()
    got = gpu_bench(a, "warmup", rows, PROMPT, STEPS)
    print(f"warm-up = gpu_bench at prompt {PROMPT} (decode rows {rows}): "
          f"{'done' if isinstance(got, list) else 'failed: ' + got} in {time.perf_counter() - t0:.0f} s", flush=True)
    return got if isinstance(got, list) else []


# the anchors: gpu_bench decode steps at prompt 64 (at its default 128, batch 512 prefills 65k tokens in one
# forward: out of memory on an 80 GB card with the slice)
PROMPT, STEPS = 64, 16


def gpu_bench(a, tag: str, batches: list[int], prompt: int, steps: int) -> list[dict] | str:
    """`traces.gpu_bench run` of the checkpoint at these batches: its rows (decode_ms_step per batch), or the
    error's tail."""
    out = a.work / f"{tag}.json"
    out.unlink(missing_ok=True)
    cmd = commands.mpirun(1, "traces.gpu_bench", "run", "--engine", "native", "--checkpoint", str(a.checkpoint),
                          "--weights", "fp8", "--tag", tag, "--out", str(out), "--batches",
                          ",".join(map(str, batches)), "--prompt", str(prompt), "--steps", str(steps),
                          "--trace-batches", "")
    rc, err = launch(cmd, a.run_timeout)
    return json.loads(out.read_text()) if rc == 0 and out.is_file() else err[-500:]


def decode_check(row: dict, anchors: list[dict]) -> dict:
    """A continuous run's decode steps per (rows, columns) shape: steps, the loop's wall ms per step, the
    step's GPU ms (graph replay, CUDA events), and gpu_bench's step at that row count (the warm-up's
    anchors, prompt PROMPT). The target row is the most frequent shape at the most rows (the slot count
    the program chose)."""
    sched = (row.get("summary") or {}).get("scheduler", {})
    shapes, wall, gpu = (sched.get(k) or {} for k in ("decode_shapes", "decode_ms_by_shape", "decode_gpu_ms_by_shape"))
    if not shapes:
        return {"error": f"{row['name']}: no decode shapes in its summary"}
    anchor = {r["batch"]: r["decode_ms_step"] for r in anchors}
    table = []
    for shape, n in sorted(shapes.items(), key=lambda kv: tuple(map(int, kv[0].split("x")))):
        rows_ = int(shape.split("x")[0])
        table.append({"shape": shape, "rows": rows_, "steps": n, "wall_ms": wall.get(shape),
                      "gpu_ms": gpu.get(shape), "gpu_bench_ms": anchor.get(rows_)})
    top = max(r["rows"] for r in table)
    target = max((r for r in table if r["rows"] == top), key=lambda r: r["steps"])
    return {"run": row["name"], "prompt": PROMPT, "shapes": table, "target_shape": target["shape"],
            "steps": sum(shapes.values()), "loop_s": sched.get("loop_s")}


def machine(device: str) -> str:
    """GPU 0's name (nvidia-smi), cpu-<host> on CPU: the result files' name."""
    if device == "cpu":
        return f"cpu-{socket.gethostname()}"
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                           capture_output=True, text=True, timeout=30)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else "cuda"
    except (OSError, subprocess.SubprocessError):
        return "cuda"


def bench(a) -> dict:
    """Every run of the plan (and --long), in one process each; the result document, rewritten after each."""
    a.work.mkdir(parents=True, exist_ok=True)
    doc = {"date": dt.date.today().isoformat(), "device": a.device, "machine": machine(a.device),
           "checkpoint": str(a.checkpoint), "runs": []}
    runs = [] if a.long_only else plan(a.default_batch, a.sweep, a.variant)
    anchors = warm_up(a, runs) if a.device == "cuda" and a.warmup else []
    doc["gpu_bench_anchors"] = anchors
    if runs:
        dist_in = workload.LengthDist(a.input_median, a.input_sigma, a.min_input, a.max_input)
        dist_out = workload.LengthDist(a.output_median, a.output_sigma, a.min_output, a.max_output)
        path, reqs, doc["workload"] = make_workload(a, "workload", a.prompts, dist_in, dist_out, "chat")
        print(f"workload: {doc['workload']['summary']}", flush=True)
        for run in runs:
            doc["runs"].append(execute(run, command(run, a, path, a.max_output), a, reqs))
            print(f"{run.name}: {_brief(doc['runs'][-1])}", flush=True)
            doc["analysis"] = analyze(doc["runs"])
            write(doc, a.out)  # a later run that hangs or is killed leaves the earlier ones on disk
    doc["decode_checks"] = [decode_check(r, anchors) for r in doc["runs"]
                            if r["role"] in ("c", "variant") and "summary" in r]
    if a.long or a.long_only:
        path, reqs, desc = long_workload(a)
        run = Run("long", "continuous", role="long")
        doc["long"] = {**execute(run, command(run, a, path, a.long_output), a, reqs), "description": desc}
        print(f"long: {_brief(doc['long'])}", flush=True)
    doc["analysis"] = analyze(doc["runs"])
    return doc


def _brief(row: dict) -> str:
    if "summary" not in row:
        return "FAILED " + row.get("error", "")[-600:]
    return (f"{row['summary']['output_tokens_per_s']:.1f} output tok/s, {row['completed']}/{row['requests']} "
            f"completed, {row['process_s']:.0f} s")


def write(doc: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{doc['machine'].replace(' ', '_')}-{doc['date']}"
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    (out / f"{stem}.md").write_text(markdown(doc))
    return out / f"{stem}.md"


# device: defaults of the options left out (the CPU smoke run: the tiny model, short requests, 2 static runs)
DEFAULTS = {
    "cuda": dict(prompts=320, sweep="16,32,64", dtype="bf16", long_inputs="4096:32,16384:8", long_output=64,
                 warmup=1, out="traces/results/serve", work="build/serve_bench", config=("slice", "fp8"),
                 lengths=(workload.INPUT, workload.OUTPUT)),
    "cpu": dict(prompts=24, sweep="24", dtype="fp32", long_inputs="512:4,1536:2", long_output=8, warmup=0,
                out="build/serve_bench_cpu/results", work="build/serve_bench_cpu", config=("tiny", "bf16"),
                lengths=(workload.LengthDist(64, 0.99, 16, 256), workload.LengthDist(8, 0.86, 4, 32))),
}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=tuple(DEFAULTS), default="cuda")
    p.add_argument("--checkpoint", type=Path, help="default: the FP8 slice (cuda) or tiny bf16 (cpu), written if "
                                                   "missing under --ckpt-root")
    p.add_argument("--ckpt-root", type=Path, default=ROOT / "build" / "checkpoints")
    p.add_argument("--prompts", type=int, help="workload size (cuda 320: with the rest, about 8 minutes on one H100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--default-batch", type=int, default=8, help="(a): the static loop's --batch-size default")
    p.add_argument("--static-sweep", help="static batch sizes for (b), comma-separated (cuda 16,32,64)")
    p.add_argument("--dtype", choices=("bf16", "fp32"))
    p.add_argument("--variant", action="append", default=[], metavar="NAME[@RANKS]=OPTIONS",
                   help="one more continuous run with these program options on RANKS ranks (1), e.g. "
                        "varlen='--mla-decode varlen', D2@2='--group-layout dpa --group-size 2', "
                        "2xG1@2='--dispatch dynamic' (repeatable; its targets are computed like (c)'s)")
    for side in ("input", "output"):
        p.add_argument(f"--{side}-median", type=float)
        p.add_argument(f"--{side}-sigma", type=float)
        p.add_argument(f"--min-{side}", type=int)
        p.add_argument(f"--max-{side}", type=int)
    p.add_argument("--long", action="store_true", help="also the long-prompt check (continuous)")
    p.add_argument("--long-only", action="store_true", help="only the long-prompt check")
    p.add_argument("--long-inputs", help="LEN:COUNT,... fixed prompt lengths (cuda 4096:32,16384:8)")
    p.add_argument("--long-output", type=int, help="new tokens per long prompt (cuda 64)")
    p.add_argument("--warmup", type=int, choices=(0, 1), help="cuda: compile the kernels first (default 1)")
    p.add_argument("--run-timeout", type=float, default=300, help="seconds per run before it is stopped")
    p.add_argument("--work", type=Path)
    p.add_argument("--out", type=Path)
    return _defaults(p.parse_args(argv))


def _defaults(a: argparse.Namespace) -> argparse.Namespace:
    d = DEFAULTS[a.device]
    for key in ("prompts", "dtype", "long_inputs", "long_output", "warmup"):
        if getattr(a, key) is None:
            setattr(a, key, d[key])
    a.static_sweep = a.static_sweep or d["sweep"]
    a.sweep = [int(b) for b in a.static_sweep.split(",") if b]
    a.work, a.out = Path(a.work or ROOT / d["work"]), Path(a.out or ROOT / d["out"])
    for side, dist in zip(("input", "output"), d["lengths"]):
        for key, value in (("median", dist.median), ("sigma", dist.sigma)):
            if getattr(a, f"{side}_{key}") is None:
                setattr(a, f"{side}_{key}", value)
        for key, value in (("min", dist.lo), ("max", dist.hi)):
            if getattr(a, f"{key}_{side}") is None:
                setattr(a, f"{key}_{side}", value)
    if a.checkpoint is None:
        a.checkpoint = commands.checkpoint(*d["config"], a.ckpt_root, a.device)
    return a


def main(argv=None) -> int:
    a = parse(argv)
    doc = bench(a)
    md = write(doc, a.out)
    print(markdown(doc))
    print(f"wrote {md} and {md.with_suffix('.json').name}")
    return 0 if doc["runs"] or "long" in doc else 1


if __name__ == "__main__":
    sys.exit(main())
