"""`make gpu-fp8-bench`: DeepSeek-V3's FP8 GEMMs, kernel by kernel, against the machine's matmul ceilings.

    python -m traces.fp8_bench [--rows 1,8,...] [--tokens 1,8,...] [--out traces/results/fp8]

The GEMMs of one layer at full width (one GPU: attention q_b / kv_a / o_proj, the dense MLP's gate+up and
down, the 256 routed experts' grouped gate+up and down), on random weights in the checkpoint's format
(float8_e4m3fn, one float32 scale per 128 x 128 block, powers of two as V3.1's UE8M0) and random bf16
activations, per row count:
- ``bf16``: the dequantized weight by torch (F.linear; torch._grouped_mm for the experts): what
  ``--fp8-weights dequant`` runs;
- ``w8a16``: spmd.kernels.fp8's weight-only kernels (e4m3 converted in hardware, sm_89+);
- ``bytes``: the same kernels decoding e4m3 from its bytes (the Ampere path, forced here);
- ``w8a8``: activations quantized per row and 128 columns (its kernel timed with the GEMM), FP8 x FP8;
  grouped: a program per (column tile, expert row tile), operands by cp.async; ``w8a8-tma``: the same
  with TMA loads; ``w8a8x``, ``w8a16x``, ``bytesx``: a program per expert (the launch before the row-tile
  ones, which 16-bit x takes from TILES16_ROWS rows per expert); ``cublas-loop``: the alternative to a
  grouped kernel, one cuBLAS block-scaled GEMM per expert (torch._scaled_mm after a host read of the
  offsets; its 1 x 128 scales need each expert's rows padded to a multiple of 4, done in the gather);
  ``w8a8-ws``, ``w8a8-ws256``: spmd.kernels.fp8_ws (warp-specialized, persistent; 128 x 128 and 128 x 256
  tiles), with ``-loads`` / ``-math``: the same with the wgmmas or the loads left out (timing only);
- ``scaled_mm``: the same quantization, then torch._scaled_mm with 1x128 x 128x128 block scales (dense
  only; "unsupported" where this torch build refuses the shapes or the layout).
Experts: each token routes to 8 distinct experts drawn uniformly (rows = tokens x 8, ~tokens / 32 per expert).

Per case: median ms over 20 runs (CUDA events), TFLOP/s, the ratio to the ceiling of its arithmetic (bf16
or FP8 dense matmul at 8192^3, measured in the same call), the weight bytes over the copy bandwidth (the
floor that binds at small row counts), and the error against float32 math on the dequantized weights:
relative Frobenius norm of the difference. Then a tile sweep of the w8a8 kernels at prefill sizes.
Writes OUT/<gpu>-<date>.json and .md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DIM, INTER, MOE_INTER, EXPERTS, TOPK = 7168, 18432, 2048, 256, 8
DENSE = {"q_b_proj": (24576, 1536), "kv_a_proj": (576, DIM), "o_proj": (DIM, 16384),
         "mlp.gate_up": (2 * INTER, DIM), "mlp.down": (DIM, INTER)}
GROUPED = {"experts.gate_up": (2 * MOE_INTER, DIM), "experts.down": (DIM, MOE_INTER)}
ROWS = (1, 8, 64, 128, 256, 512, 4096, 16384)
TOKENS = (1, 8, 64, 400, 1024, 4096, 16384)
SWEEP = ((64, 128, 4, 3), (64, 128, 4, 4), (128, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 3), (128, 64, 4, 4))
# the grouped kernel's tiles (256-column tiles span two weight-scale blocks: the scales load per column;
# (128, 256) was 3x slower, register-bound: traces/results/fp8/*-r3-launches.log), and its program orders
# (fp8.Mode.group_m: row tiles per group, 1 = column tiles fastest), swept with the TMA launch
SWEEP_GROUPED = ((64, 128, 4, 4), (64, 128, 4, 3), (128, 128, 8, 4), (64, 256, 8, 3))


def parse_tiles(spec: str) -> tuple[tuple[int, int, int, int], ...]:
    """"BMxBNxWARPSxSTAGES,..." -> the tiles (none for an empty spec)."""
    tiles = tuple(tuple(int(v) for v in t.split("x")) for t in spec.split(",") if t)
    for t in tiles:
        if len(t) != 4:
            raise SystemExit(f"tile {'x'.join(map(str, t))}: BLOCK_MxBLOCK_NxWARPSxSTAGES")
    return tiles
SWEEP_GROUP_M = (1, 4, 8, 16)


def _weights(shape, gen):
    """FP8 weight over e4m3's range and power-of-two block scales (UE8M0), both on the GPU."""
    *lead, n, k = shape
    w = (torch.randn(shape, device="cuda", generator=gen) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.exp2(torch.randint(-12, -8, (*lead, -(-n // 128), -(-k // 128)), device="cuda", generator=gen).float())
    return w, s


def ceilings() -> dict:
    from traces.gpu_bench import _median_ms, ceilings as base

    c = base()
    a = torch.randn(8192, 8192, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(8192, 8192, device="cuda").to(torch.float8_e4m3fn).T
    one = torch.ones((), device="cuda")
    ms = _median_ms(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
    c["fp8_matmul_tflops"] = 2 * 8192 ** 3 / ms / 1e9
    return c


def probe_scaled_mm() -> list[dict]:
    """Which block-scale layouts this torch build's _scaled_mm takes (1x128 activations x 128x128 weight)."""
    from spmd.kernels import fp8

    m, n, k = 256, 512, 1024
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    w, s = _weights((n, k), torch.Generator(device="cuda").manual_seed(1))
    q, qs = fp8.quantize_act(x, ue8m0=False)
    ref = fp8.dequantize_act(q, qs) @ fp8.dequantize(w, s, torch.float32).T
    out = []
    for a_name, sa in (("col-major (M,K/128)", qs), ("row-major (M,K/128)", qs.contiguous())):
        for b_name, sb in (("(K/128,N/128) view of (N/128,K/128)", s.T), ("(K/128,N/128) contiguous", s.T.contiguous())):
            row = dict(scale_a=a_name, scale_b=b_name)
            try:
                got = torch._scaled_mm(q, w.T, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
                row["rel_err_vs_emulation"] = _rel(got, ref)
            except (RuntimeError, NotImplementedError) as exc:
                row["error"] = str(exc).splitlines()[0][:300]
            out.append(row)
    return out


def _rel(out, ref) -> float:
    return ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _variants(kind: str):
    """(name, fp8.configure settings or None for bf16) of a case kind."""
    v = [("bf16", None), ("w8a16", dict(weights="e4m3", w8a8_rows=0, w8a8_expert_rows=0, grouped="tiles")),
         ("bytes", dict(weights="bytes", w8a8_rows=0, w8a8_expert_rows=0, grouped="tiles")),
         ("w8a8", dict(weights="e4m3", w8a8_rows=1, w8a8_expert_rows=1, dense="triton", grouped="tiles"))]
    if kind == "grouped":  # the launch before the row-tile ones (a program per expert), for comparison
        # spmd.kernels.fp8_ws: 128 x 128 tiles (4 slots), 128 x 256 (3 slots), each also with one side left
        # out (timing only, wrong results): the loads alone (no wgmma, no scaling), the math alone (no loads)
        ws = [(f"w8a8-{name}{side}", dict(weights="e4m3", w8a8_rows=1, w8a8_expert_rows=1, grouped="ws", tiles=tile))
              for name, tile in (("ws", (128, 128, 4, 4)), ("ws256", (128, 256, 4, 3)))
              for side in ("", "-loads", "-math")]
        v += [("w8a16x", dict(weights="e4m3", w8a8_rows=0, w8a8_expert_rows=0, grouped="experts")),
              ("bytesx", dict(weights="bytes", w8a8_rows=0, w8a8_expert_rows=0, grouped="experts")),
              ("w8a8-tma", dict(weights="e4m3", w8a8_rows=1, w8a8_expert_rows=1, grouped="tma", tma_loop="inline",
                                tiles=None)),
              *ws,  # before the last, which resets the tiles for the next GEMM's variants
              ("w8a8x", dict(weights="e4m3", w8a8_rows=1, w8a8_expert_rows=1, grouped="experts", tiles=None))]
    if kind == "dense":
        v.append(("scaled_mm", dict(weights="e4m3", w8a8_rows=1, dense="scaled_mm")))
    return v


def dense_cases(rows, ceil, gen) -> list[dict]:
    from spmd.kernels import fp8
    from traces.gpu_bench import _median_ms

    out = []
    for name, (n, k) in DENSE.items():
        w, s = _weights((n, k), gen)
        wd = fp8.dequantize(w, s, torch.bfloat16)
        for m in rows:
            x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
            ref = x.float() @ wd.float().T
            for var, mode in _variants("dense"):
                row = dict(gemm=name, rows=m, n=n, k=k, variant=var)
                try:
                    if mode is None:
                        fn = lambda: F.linear(x, wd)  # noqa: E731
                    else:
                        fp8.configure(**mode)
                        fn = lambda: fp8.fp8_linear(x, w, s)  # noqa: E731
                    row["rel_err"] = _rel(fn(), ref)
                    row["ms"] = _median_ms(fn, reps=20, warmup=3)
                except (RuntimeError, NotImplementedError) as exc:  # torch._scaled_mm: shape/layout refused
                    row["unsupported"] = str(exc).splitlines()[0][:200]
                out.append(_finish(row, 2 * m * n * k, n * k, var, ceil))
        del wd
    return out


def _cublas_loop(x: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor, w: torch.Tensor, s: torch.Tensor):
    """The per-expert cuBLAS alternative as MoE would run it: quantize the tokens, gather them into each
    expert's rows padded to a multiple of 4 (torch._scaled_mm takes 1 x 128 scales only as (M, K/128)
    with strides (1, M), and cuBLAS refuses M not a multiple of 4: measured on the H100, 2026-12-07) with
    the scales laid out per expert, then one GEMM per expert after a host read of the padded offsets.
    Returns (fn, valid): fn's output rows are the padded layout, valid the mask of real rows."""
    from spmd.kernels import fp8

    dev, k, n = x.device, x.shape[1], w.shape[1]
    kb, padded = k // fp8.FP8_BLOCK, (counts + 3) // 4 * 4
    pend, start = padded.cumsum(0), counts.cumsum(0) - counts
    p = torch.arange(int(pend[-1]), device=dev)
    j = torch.searchsorted(pend, p, right=True)  # each padded row's expert
    local = p - (pend - padded)[j]
    valid = local < counts[j]
    src = torch.where(valid, rows[(start[j] + local).clamp(max=rows.numel() - 1)], 0)  # pad rows: token 0
    idx = (kb * (pend - padded)[j][:, None] + torch.arange(kb, device=dev)[None, :] * padded[j][:, None]
           + local[:, None]).flatten()

    def fn():
        q, qs = fp8.quantize_act(x)
        scales = torch.empty(kb * len(p), dtype=torch.float32, device=dev)
        scales[idx] = qs[src].flatten()
        qp, out = q[src], torch.empty((len(p), n), dtype=x.dtype, device=dev)
        begin = 0
        for e, end in enumerate(pend.tolist()):  # the host read of the offsets: a sync per call
            if end > begin:
                torch._scaled_mm(qp[begin:end], w[e].T, scale_a=scales[kb * begin:kb * end].view(kb, end - begin).T,
                                 scale_b=s[e].T, out_dtype=x.dtype, out=out[begin:end])
            begin = end
        return out
    return fn, valid


def grouped_cases(tokens, ceil, gen, variants: tuple = ()) -> list[dict]:
    from spmd.kernels import fp8
    from traces.gpu_bench import _median_ms

    out = []
    torch.cuda.empty_cache()
    for name, (n, k) in GROUPED.items():
        w, s = _weights((EXPERTS, n, k), gen)
        wd = torch.stack([fp8.dequantize(w[e], s[e], torch.bfloat16) for e in range(EXPERTS)])  # no fp32 copy
        for t in tokens:
            ids = torch.rand(t, EXPERTS, device="cuda", generator=gen).topk(TOPK, dim=-1).indices.flatten()
            key, order = ids.sort(stable=True)
            counts = torch.bincount(ids, minlength=EXPERTS)
            offs = counts.cumsum(0).to(torch.int32)
            r = t * TOPK
            x = torch.randn(t, k, device="cuda", generator=gen).to(torch.bfloat16)
            rows = order // TOPK
            xs = x[rows]
            ref = torch.cat([xs[a:b].float() @ wd[e].float().T for e, (a, b) in
                             enumerate(zip([0] + offs[:-1].tolist(), offs.tolist()))]) if t <= 1024 else None
            hit = int((counts > 0).sum())
            for var, mode in _variants("grouped") + [("cublas-loop", None)]:
                if variants and var not in variants:
                    continue
                row = dict(gemm=name, tokens=t, rows=r, n=n, k=k, variant=var, experts_hit=hit)
                check = None
                if var == "cublas-loop":
                    fn, valid = _cublas_loop(x, rows, counts, w, s)
                    check = lambda: fn()[valid]  # noqa: E731  (the real rows, in the sorted order)
                elif mode is None:
                    fn = lambda: torch._grouped_mm(x[rows], wd.transpose(1, 2), offs=offs)  # noqa: E731
                elif var.startswith("w8a8"):
                    fp8.configure(**mode)
                    if mode["grouped"] == "ws":
                        fp8.fp8_ws().SKIP = 1 if var.endswith("-loads") else 2 if var.endswith("-math") else 0

                    def fn():
                        q, qs = fp8.quantize_act(x)
                        qr, qsr = fp8.gather_rows(q, qs, rows)
                        return fp8.fp8_grouped_mm(qr, w, s, offs, key, x_scale=qsr, out_dtype=x.dtype)
                else:
                    fp8.configure(**mode)
                    fn = lambda: fp8.fp8_grouped_mm(x[rows], w, s, offs, key)  # noqa: E731
                try:
                    if ref is not None:
                        row["rel_err"] = _rel((check or fn)(), ref)
                    row["ms"] = _median_ms(fn, reps=20, warmup=3)
                except Exception as exc:  # a launch this GPU or Triton cannot run: recorded, the others go on
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    print(f"{name} {t} {var}: {row['error']}", flush=True)
                # weight bytes actually read: the experts hit
                out.append(_finish(row, 2 * r * n * k, hit * n * k, var, ceil))
        del wd, w, s
        torch.cuda.empty_cache()
    fp8.fp8_ws().SKIP = 0
    return out


def _finish(row: dict, flops: int, fp8_bytes: int, var: str, ceil: dict) -> dict:
    if "ms" not in row:
        return row
    row["tflops"] = flops / row["ms"] / 1e9
    top = ceil["fp8_matmul_tflops"] if var.startswith("w8a8") or var in ("scaled_mm", "cublas-loop") \
        else ceil["matmul_tflops"]
    row["of_matmul_ceiling"] = row["tflops"] / top
    wbytes = fp8_bytes * (2 if var == "bf16" else 1)
    row["bytes_floor_ms"] = wbytes / (ceil["copy_gbps"] * 1e9) * 1e3
    row["x_bytes_floor"] = row["ms"] / row["bytes_floor_ms"]
    return row


def sweep(ceil, gen, only: str | None = None, tokens=(4096, 16384), loops=("inline",),
          group_ms=SWEEP_GROUP_M, tiles=SWEEP_GROUPED, cp_async: bool = True) -> list[dict]:
    """w8a8 tiles at prefill sizes: dense o_proj and mlp.gate_up at 4096 rows, experts at `tokens` tokens
    (both launches of the grouped kernel; the TMA one per k loop in `loops`, fp8.TMA_LOOPS: the other
    loops at the default program order only; `tiles` the grouped tiles, `cp_async` whether the cp.async
    launch runs them too)."""
    from spmd.kernels import fp8
    from traces.gpu_bench import _median_ms

    out = []
    fp8.configure(weights="e4m3", w8a8_rows=1, w8a8_expert_rows=1, dense="triton")
    for name in () if only == "grouped" else ("o_proj", "mlp.gate_up"):
        n, k = DENSE[name]
        w, s = _weights((n, k), gen)
        x = torch.randn(4096, k, device="cuda", generator=gen).to(torch.bfloat16)
        for tile in SWEEP:
            fp8.configure(tiles=tile)
            ms = _median_ms(lambda: fp8.fp8_linear(x, w, s), reps=20, warmup=3)
            out.append(dict(gemm=name, rows=4096, tile=list(tile), ms=ms, tflops=2 * 4096 * n * k / ms / 1e9))
    for name, (n, k) in {} if only == "dense" else GROUPED.items():
        w, s = _weights((EXPERTS, n, k), gen)
        for t in tokens:
            ids = torch.rand(t, EXPERTS, device="cuda", generator=gen).topk(TOPK, dim=-1).indices.flatten()
            key, order = ids.sort(stable=True)
            offs = torch.bincount(ids, minlength=EXPERTS).cumsum(0).to(torch.int32)
            q, qs = fp8.quantize_act(torch.randn(t, k, device="cuda", generator=gen).to(torch.bfloat16))
            q, qs = fp8.gather_rows(q, qs, order // TOPK)
            gm = fp8.Mode.group_m
            runs = [("tma", tile, g, loop) for loop in loops for tile in tiles
                    for g in (group_ms if loop == "inline" else (gm,))]
            runs += [("tiles", tile, gm, "inline") for tile in tiles if cp_async]
            for launch, tile, group_m, loop in runs:
                fp8.configure(tiles=tile, grouped=launch, group_m=group_m, tma_loop=loop)
                case = dict(gemm=name, tokens=t, launch=launch if loop == "inline" else f"{launch}-{loop}",
                            tile=list(tile) + [group_m])
                try:
                    ms = _median_ms(lambda: fp8.fp8_grouped_mm(q, w, s, offs, key, x_scale=qs,
                                                               out_dtype=torch.bfloat16), reps=10, warmup=2)
                    out.append(dict(case, ms=ms, tflops=2 * t * TOPK * n * k / ms / 1e9))
                except Exception as exc:  # e.g. out of shared memory / registers, a Triton compile error
                    out.append(dict(case, error=str(exc)[:200]))
                print(f"sweep {json.dumps(out[-1])}", flush=True)  # kept in the log should a later run hang
            del q, qs
        del w, s
        torch.cuda.empty_cache()
    fp8.configure(tiles=None, grouped="tiles", group_m=fp8.Mode.group_m, tma_loop="inline")
    return out


def markdown(doc: dict) -> str:
    c = doc["ceilings"]
    lines = [f"# FP8 GEMMs of one DeepSeek-V3 layer, {doc['gpu']}, {doc['date']}", "",
             f"Ceilings (same call): bf16 matmul {c['matmul_tflops']:.0f} TFLOP/s, FP8 matmul "
             f"{c['fp8_matmul_tflops']:.0f} TFLOP/s (torch._scaled_mm, 8192^3), copy {c['copy_gbps']:.0f} GB/s.", "",
             "ms per GEMM (x its ceiling: matmul rate for large rows, weight bytes for small); rel. error vs fp32.", ""]
    variants = ["bf16", "w8a16", "w8a16x", "bytes", "bytesx", "w8a8", "w8a8-tma", "w8a8-ws", "w8a8-ws256",
                "w8a8-ws-loads", "w8a8-ws-math", "w8a8-ws256-loads", "w8a8-ws256-math", "w8a8x", "cublas-loop",
                "scaled_mm"]
    lines += ["| GEMM | rows | " + " | ".join(variants) + " | w8a8 / bf16 speed | err w8a16 | err w8a8 |",
              "|" + "---|" * (len(variants) + 5)]
    keyed: dict = {}
    for r in doc["cases"]:
        keyed.setdefault((r["gemm"], r.get("tokens", r["rows"])), {})[r["variant"]] = r
    for (gemm, m), vs in keyed.items():
        cells = []
        for v in variants:
            r = vs.get(v)
            if r is None:
                cells.append("")
            elif "ms" not in r:
                cells.append("unsupported")
            else:
                cells.append(f"{r['ms']:.3f}")
        sp = vs["bf16"]["ms"] / vs["w8a8"]["ms"] if "ms" in vs.get("w8a8", {}) and "ms" in vs.get("bf16", {}) \
            else float("nan")
        e16, e8 = (f"{vs[v]['rel_err']:.1e}" if "rel_err" in vs.get(v, {}) else "" for v in ("w8a16", "w8a8"))
        label = f"{m} tok" if gemm.startswith("experts") else str(m)
        lines.append(f"| {gemm} | {label} | " + " | ".join(cells) + f" | {sp:.2f} | {e16} | {e8} |")
    lines += ["", "w8a8 tiles (BLOCK_M, BLOCK_N, warps, stages); dense at 4096 rows; experts per launch "
              "(a program per row tile, operands by TMA or cp.async: tma, tiles) and tokens, their tile with "
              "the row tiles per group of the program order last:", "",
              "| GEMM | rows / tokens | launch | tile | ms | TFLOP/s |", "|---|---|---|---|---|---|"]
    for r in doc["sweep"]:
        size = r.get("tokens", r.get("rows"))
        ms, tf = (f"{r['ms']:.3f}", f"{r['tflops']:.0f}") if "ms" in r else ("failed", r["error"][:60])
        lines.append(f"| {r['gemm']} | {size} | {r.get('launch', '')} | {tuple(r['tile'])} | {ms} | {tf} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(map(str, ROWS)))
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--sweep-tokens", default="4096,16384", help="token counts of the grouped tile sweep")
    p.add_argument("--sweep-loops", default="inline",
                   help="the TMA launch's k loops to sweep (spmd.kernels.fp8.TMA_LOOPS, comma-separated)")
    p.add_argument("--sweep-group-m", default=",".join(map(str, SWEEP_GROUP_M)),
                   help="the row tiles per group swept with the TMA launch's inline loop")
    p.add_argument("--sweep-tiles", default="", help="grouped tiles to sweep, BMxBNxWARPSxSTAGES comma-separated "
                   "(default: SWEEP_GROUPED)")
    p.add_argument("--no-cp-async", action="store_true", help="sweep the TMA launch only")
    p.add_argument("--only", choices=("dense", "grouped"), help="one kind of GEMM (and its part of the sweep)")
    p.add_argument("--variants", default="", help="grouped variants to run (comma-separated; default all)")
    p.add_argument("--out", default=str(ROOT / "traces" / "results" / "fp8"))
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("fp8_bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    from spmd.kernels import fp8

    gen = torch.Generator(device="cuda").manual_seed(0)
    ceil = ceilings()
    print(f"ceilings: {json.dumps(ceil)}", flush=True)
    old = fp8.configure(ue8m0=True)
    probe = probe_scaled_mm()
    print(f"torch._scaled_mm block scales: {json.dumps(probe)}", flush=True)
    cases = [] if a.only == "grouped" else dense_cases([int(r) for r in a.rows.split(",")], ceil, gen)
    print("dense done", flush=True)
    cases += [] if a.only == "dense" else grouped_cases([int(t) for t in a.tokens.split(",")], ceil, gen,
                                                           tuple(v for v in a.variants.split(",") if v))
    doc = {"gpu": ceil["gpu"], "date": dt.date.today().isoformat(), "ceilings": ceil, "torch": torch.__version__,
           "scaled_mm_probe": probe, "cases": cases,
           "sweep": [] if a.no_sweep else sweep(ceil, gen, a.only, [int(t) for t in a.sweep_tokens.split(",")],
                                                           a.sweep_loops.split(","),
                                                           [int(g) for g in a.sweep_group_m.split(",")],
                                                           parse_tiles(a.sweep_tiles) or SWEEP_GROUPED,
                                                           not a.no_cp_async)}
    fp8.configure(**vars(old))
    from traces.table import write_result
    write_result(Path(a.out), f"{ceil['gpu']}-{doc['date']}", doc, markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
