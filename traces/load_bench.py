"""`make load-bench`: how fast the program's loader reads a checkpoint, cold and warm, against the raw file read.

    python -m traces.load_bench [--device cuda|cpu] [--checkpoint DIR | --config slice --weights fp8]
                                [--repeats 2] [--out traces/results/load]

Per repeat, twice: "cold" after asking the kernel to drop the shards from the page cache
(``posix_fadvise(DONTNEED)`` on each file: clean pages go, so a freshly written checkpoint has to be
synced first; where the file system keeps its own cache, e.g. a network file system's client, the read
may still be partly cached, which the raw rate shows), then "warm" (the pages just read). Each measures
1. the raw read: every shard read start to end in 16 MiB blocks into one buffer (the file system's rate
   for one process, the floor of what any loader can do), and
2. the program's load: the native engine's model built on the meta device and filled by
   ``spmd.weights.checkpoint.load`` (one rank, the whole model: FP8 kept on GPUs that run it, else as
   the engine would), its own bytes read and seconds (``LoadStats``).
Writes OUT/<host-or-gpu>-<date>.json and .md: bytes, seconds, GB/s, the file system of the checkpoint
(from /proc/mounts), and whether the page-cache drop was accepted. The proposal's I/O estimate
(docs/proposal) scales the per-process rate to the real checkpoint (~690 GB) with a stated assumption.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import socket
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 16 << 20


def shards(ckpt: Path) -> list[Path]:
    return sorted(ckpt.glob("*.safetensors"))


def drop_cache(files: list[Path]) -> bool:
    """Ask the kernel to forget the files' cached pages (fsync first: dirty pages cannot be dropped)."""
    ok = hasattr(os, "posix_fadvise")
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            if ok:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            ok = False
        finally:
            os.close(fd)
    return ok


def raw_read(files: list[Path]) -> dict:
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    n = 0
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while True:
                got = fh.readinto(view)
                if not got:
                    break
                n += got
    s = time.perf_counter() - t0
    return {"bytes": n, "seconds": s, "gb_s": n / s / 1e9}


def program_load(ckpt: Path, device: str) -> dict:
    """The engine's load path without the engine: meta model, keep_fp8 / fp8_mode as the engine decides."""
    import torch

    from spmd.config import ModelArgs
    from spmd.engines.native import fp8_mode, keep_fp8
    from spmd.model.transformer import Transformer
    from spmd.parallel.comm import Group
    from spmd.weights.checkpoint import load

    margs = ModelArgs.from_checkpoint(ckpt)
    dev = torch.device(device)
    with torch.device("meta"):
        model = Transformer(margs, Group(None, "tp"), dtype=torch.bfloat16)
    fp8 = keep_fp8("auto", dev, margs.fp8)
    if fp8:
        from spmd.kernels import fp8 as fp8_kernels
        fp8_kernels.configure(**fp8_mode(types.SimpleNamespace(), dev, margs))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    stats = load(model, ckpt, 0, 1, torch.bfloat16, dev, log=lambda m: None, fp8=fp8)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    s = time.perf_counter() - t0
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"bytes": stats.bytes_read, "seconds": s, "gb_s": stats.bytes_read / s / 1e9,
            "loader_seconds": stats.seconds, "fp8_kept": fp8}


def mount_of(path: Path) -> dict:
    """The /proc/mounts entry with the longest mount point above `path`."""
    best = {"mount": "?", "fstype": "?"}
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return best
    real = str(path.resolve())
    for line in lines:
        parts = line.split()
        if len(parts) >= 3 and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")):
            if len(parts[1]) >= len(best["mount"]) or best["mount"] == "?":
                best = {"mount": parts[1], "fstype": parts[2]}
    return best


def markdown(doc: dict) -> str:
    lines = [f"# Checkpoint read rates, {doc['machine']}, {doc['date']}", "",
             f"Checkpoint `{doc['checkpoint']}`: {doc['shards']} shards, {doc['checkpoint_bytes'] / 1e9:.2f} GB, "
             f"on {doc['mount']['fstype']} ({doc['mount']['mount']}); device {doc['device']}; page-cache drop "
             f"{'accepted' if doc['cache_drop'] else 'refused'}.", "",
             "| repeat | cache | raw read GB/s | program load GB/s | load s | loader bytes GB |", "|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        ld = r["load"]
        cells = ("not run", "", "") if ld is None else (f"{ld['gb_s']:.2f}", f"{ld['seconds']:.2f}",
                                                       f"{ld['bytes'] / 1e9:.2f}")
        lines.append(f"| {r['repeat']} | {r['cache']} | {r['raw']['gb_s']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--checkpoint", type=Path, help="default: --config/--weights under --ckpt-root, written if missing")
    p.add_argument("--config", default="slice")
    p.add_argument("--weights", default="fp8")
    p.add_argument("--ckpt-root", type=Path, default=ROOT / "build" / "checkpoints")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--raw-only", action="store_true", help="only the raw read (a machine whose memory cannot hold "
                   "the loaded model, e.g. the FP8 slice dequantized to bf16 on a 24 GiB CPU machine)")
    p.add_argument("--out", type=Path, default=ROOT / "traces" / "results" / "load")
    a = p.parse_args(argv)
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("load_bench: --device cuda needs a CUDA GPU", file=sys.stderr)
        return 2
    from spmd.runtime import commands

    ckpt = a.checkpoint or commands.checkpoint(a.config, a.weights, a.ckpt_root, a.device)
    files = shards(ckpt)
    if not files:
        print(f"load_bench: no *.safetensors in {ckpt}", file=sys.stderr)
        return 2
    machine = torch.cuda.get_device_name() if a.device == "cuda" else f"cpu-{socket.gethostname()}"
    runs, dropped = [], True
    for i in range(a.repeats):
        for cache in ("cold", "warm"):
            if cache == "cold":
                dropped = drop_cache(files) and dropped
            raw = raw_read(files)
            if cache == "cold":  # the program's load gets a cold cache too
                dropped = drop_cache(files) and dropped
            load = None if a.raw_only else program_load(ckpt, a.device)
            runs.append({"repeat": i, "cache": cache, "raw": raw, "load": load})
            print(f"repeat {i} {cache}: raw {raw['gb_s']:.2f} GB/s"
                  + ("" if load is None else f", load {load['gb_s']:.2f} GB/s"), flush=True)
    doc = {"machine": machine, "date": dt.date.today().isoformat(), "device": a.device, "checkpoint": str(ckpt.name),
           "shards": len(files), "checkpoint_bytes": sum(f.stat().st_size for f in files),
           "mount": mount_of(ckpt), "cache_drop": dropped, "runs": runs}
    from traces.table import write_result
    write_result(a.out, f"{machine}-{doc['date']}", doc, markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
