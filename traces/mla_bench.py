"""`make gpu-mla-bench`: MLA decode attention of one layer, torch's padded form against the varlen kernel.

    python -m traces.mla_bench [--rows 8,64,128,256,400,512] [--heads 128] [--out traces/results/mla]

The attention core of one decode step (one query per row, DeepSeek-V3's absorbed MLA: kv_lora_rank 512,
rope 64, 128 heads on one GPU), on random bf16 data, per case:
- torch: what ``MLA._absorb`` runs: scores over all S columns of the (rows, S) cache view, the float32
  softmax with the additive mask, the product with the values (S = the longest row rounded up to a power
  of two, the slots' bucket: spmd/engines/slots.py);
- kernel tiles: ``spmd.kernels.mla_decode`` (each row reads only its own columns), per (heads, columns,
  warps) tile.
Row lengths: "chat" draws each row's length from the serving benchmark's input distribution (traces.workload:
log-normal, median 1,020, 50-4,000 tokens) plus up to 200 generated tokens; "long" gives every row 4,096.
The floor: the real columns' bytes (rows x length x 576 x 2) over the measured copy bandwidth (bytes
read + written per second of a device copy, as traces.floor). Times: median of 20 runs (CUDA events).
Writes OUT/<gpu>-<date>.json and .md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TILES = ((16, 32, 4), (16, 64, 4), (32, 32, 4), (32, 64, 8), (64, 32, 8), (64, 64, 8))
RANK, ROPE = 512, 64


def lengths(kind: str, rows: int, seed: int) -> list[int]:
    from traces import workload

    if kind == "long":
        return [4096] * rows
    ins, _ = workload.draw_lengths(rows, seed)
    rng = random.Random(seed)
    return [int(n) + rng.randrange(1, 201) for n in ins]


def torch_attention(q_lat, q_pe, kv, pe, bias, scale):
    """MLA._absorb's attention over every column of the view (T = 1): o_latent (B, H, C)."""
    scores = torch.einsum("bhc,bsc->bhs", q_lat, kv) + torch.einsum("bhr,bsr->bhs", q_pe, pe)
    probs = torch.softmax(scores.float() * scale + bias.float(), dim=-1).to(kv.dtype)
    return torch.einsum("bhs,bsc->bhc", probs, kv)


def case(kind: str, rows: int, heads: int, seed: int, copy_gbps: float, tiles) -> dict:
    from spmd.engines.slots import bucket
    from spmd.kernels.mla_decode import mla_decode
    from traces.gpu_bench import _median_ms

    lens = lengths(kind, rows, seed)
    cols = bucket(max(lens), 128, 1 << 20)
    dev, dt_ = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(seed)
    kv = torch.randn(rows, cols, RANK, device=dev, dtype=dt_, generator=g)
    pe = torch.randn(rows, cols, ROPE, device=dev, dtype=dt_, generator=g)
    q_lat = torch.randn(rows, heads, RANK, device=dev, dtype=dt_, generator=g)
    q_pe = torch.randn(rows, heads, ROPE, device=dev, dtype=dt_, generator=g)
    lens_t = torch.tensor(lens, device=dev)
    bias = torch.zeros(rows, 1, cols, device=dev, dtype=dt_).masked_fill(
        torch.arange(cols, device=dev)[None, None, :] >= lens_t[:, None, None], float("-inf"))
    scale = (128 + ROPE) ** -0.5
    real = sum(lens) * (RANK + ROPE) * 2
    out = {"kind": kind, "rows": rows, "columns": cols, "mean_len": sum(lens) / rows, "real_bytes": real,
           "padded_bytes": rows * cols * (RANK + ROPE) * 2, "floor_ms": real / copy_gbps / 1e6}
    ref = torch_attention(q_lat, q_pe, kv, pe, bias, scale).float()
    try:
        out["torch_ms"] = _median_ms(lambda: torch_attention(q_lat, q_pe, kv, pe, bias, scale), reps=20)
    except torch.OutOfMemoryError as e:
        out["torch_ms"], out["torch_error"] = None, str(e).splitlines()[0]
    out["tiles"] = []
    for bh, bn, w in tiles:
        fn = lambda: mla_decode(q_lat, q_pe, kv, pe, lens_t, scale, block_h=bh, block_n=bn, warps=w)  # noqa: E731
        try:
            err = ((fn().float() - ref).abs().max() / ref.abs().max()).item()
            out["tiles"].append({"tile": f"{bh}x{bn}/w{w}", "ms": _median_ms(fn, reps=20), "rel_err": err})
        except Exception as e:  # a tile that does not compile (shared memory) is a result, not a crash
            out["tiles"].append({"tile": f"{bh}x{bn}/w{w}", "ms": None, "error": f"{type(e).__name__}: {e}"[:300]})
    del kv, pe, bias, ref
    torch.cuda.empty_cache()
    return out


def markdown(doc: dict) -> str:
    tiles = [t["tile"] for t in doc["cases"][0]["tiles"]] if doc["cases"] else []
    lines = [f"# MLA decode attention, one layer: torch (padded) vs the varlen kernel — {doc['gpu']}, {doc['date']}",
             "", f"{doc['heads']} heads, kv_lora_rank {RANK}, rope {ROPE}, bf16; copy bandwidth "
             f"{doc['copy_gbps']:.0f} GB/s (the floor's rate). ms per call (median of 20); x floor in brackets.",
             "", "| lengths | rows | columns | mean length | floor ms | torch ms | " + " | ".join(tiles) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(tiles)]
    for c in doc["cases"]:
        def cell(ms):
            return "—" if ms is None else f"{ms:.3f} ({ms / c['floor_ms']:.1f}x)"
        lines.append(f"| {c['kind']} | {c['rows']} | {c['columns']} | {c['mean_len']:.0f} | {c['floor_ms']:.3f} | "
                     f"{cell(c['torch_ms'])} | " + " | ".join(cell(t["ms"]) for t in c["tiles"]) + " |")
    best = {}
    for c in doc["cases"]:
        ok = [t for t in c["tiles"] if t["ms"] is not None]
        if ok:
            best[f"{c['kind']} {c['rows']}"] = min(ok, key=lambda t: t["ms"])["tile"]
    lines += ["", "Fastest tile per case: " + ", ".join(f"{k}: {v}" for k, v in best.items()) + "."]
    errs = [t.get("rel_err", 0) for c in doc["cases"] for t in c["tiles"] if t["ms"] is not None]
    if errs:
        lines.append(f"Largest error of a kernel tile against torch (max abs / max abs of torch): {max(errs):.2e}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="8,64,128,256,400,512")
    p.add_argument("--kinds", default="chat,long")
    p.add_argument("--heads", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "traces" / "results" / "mla")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("mla_bench: needs a CUDA device", file=sys.stderr)
        return 2
    from traces.gpu_bench import ceilings

    ceil = ceilings()
    doc = {"date": dt.date.today().isoformat(), "gpu": ceil["gpu"], "copy_gbps": ceil["copy_gbps"],
           "heads": a.heads, "tiles": [list(t) for t in TILES], "cases": []}
    for kind in a.kinds.split(","):
        for rows in map(int, a.rows.split(",")):
            if kind == "long" and rows > 256:  # 512 x 4096 x 576 x 2 bytes and torch's float32 scores: skip
                continue
            doc["cases"].append(case(kind, rows, a.heads, a.seed, ceil["copy_gbps"], TILES))
            c = doc["cases"][-1]
            print(f"{kind} rows {rows} cols {c['columns']}: floor {c['floor_ms']:.3f} torch {c['torch_ms']} "
                  + " ".join(f"{t['tile']} {t['ms']}" for t in c["tiles"]), flush=True)
    from traces.table import write_result
    write_result(a.out, f"{doc['gpu']}-{doc['date']}", doc, markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
