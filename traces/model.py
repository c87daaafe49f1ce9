"""Performance model: a decode step of a DeepSeek-V3 layout, fitted to the slice on one GPU, projected to nodes.

    python -m traces.model [--bench traces/results/bench/NVIDIA_H200-2026-11-28.json ...] [--out traces/results/model]

Decode only (the phase that dominates a generation job, and the one the layouts change); all times per step.
The model's formulas live in spmd.plan.perf (shared with the planner, ``python -m spmd.plan``); this module
fits their constants to the stored measurements, validates them and writes the projections.

Compute, per GPU of one pipeline stage: t = c * (layers + 1) + bytes / (eta * copy_bw). bytes: what the
step must read (the floor's bytes, traces.floor: the stage's layers at this group size and batch, its latent
cache, the head on the last stage); copy_bw: the machine's measured device-to-device copy rate; c: a fixed
cost per layer (the head counts as one: kernel launches, small ops, synchronisation) and eta: the fraction
of the copy rate the weight reads reach. (c, eta) are fitted by least squares to the measured one-GPU rows
of the slice (1 dense + 2 MoE layers + head, batch 1..64), one fit per decode mode (CUDA graphs, eager) and
weight format (bf16, fp8).

Collectives (Hockney alpha-beta, ring): an all-reduce of n bytes over G ranks costs 2(G-1)(alpha + n/(G
beta)), with the alpha and beta of the slowest link in the ring: NVLink inside a node, the network between
nodes. Per layer the tp engine all-reduces twice (attention output; dense MLP or shared + routed experts,
summed in one) B x dim bf16 values, once for the embedding, and all-gathers the head's logits. The dpa
layout (data-parallel attention, experts by all-to-all) has no all-reduce: per MoE layer a dispatch and a
combine, latency + bytes / bandwidth, the bytes split into in-node and cross-node by where group-limited
routing sends a token (spmd.plan.routing: a seeded Monte-Carlo). alpha inside a node is measured (the
smallest NCCL all-reduce kernel of the 2-GPU torch.profiler trace, 2x H200); beta inside a node and both
numbers between nodes are stated parameters (NETWORK), not measurements.

Pipeline (P stages, M micro-batches, as spmd.parallel.pipeline runs them): step = (M + P - 1) x (slowest stage on B/M
rows + its send) + the logits broadcast; stages get contiguous layers balanced by bytes (spmd.config.partition).
Memory per GPU (``memory_gib``, the projection's): the stage's weights at the group size (replicated parts
whole, all at the FP8 rate), its latent cache for B rows x context (not sharded over G), 2 GiB for
activations and workspace. The layouts projection uses the planner's finer accounting (spmd.plan.memory).

Validation (``validate``): the measured 2-GPU slice rows (G = 2 with graphs, bf16 and fp8; G = 2 eager;
P = 2 eager) predicted from the one-GPU fits and the comm parameters; the relative error per row.
Projection (``project``): the full 61-layer DeepSeek-V3.1, FP8 weights, on 1, 2 and 3 nodes of 8 GPUs
(H200 measured; H100 scaled by its HBM bandwidth and memory): which layouts fit, step time, tokens/s,
per-token latency, tokens/s per GPU against the one-node layout. Both layouts (``project_layouts``): tp
and dpa on 1-8 nodes of 4 and of 8 GPUs, 256 rows x 4096 tokens, the fastest fitting layout of each.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from spmd.config import ModelArgs
from spmd.config.sizes import layer_params
from spmd.plan import perf
from spmd.plan.layouts import Layout
from spmd.plan.memory import GIB, USABLE_FRACTION, WORKSPACE_GIB, stages
from spmd.plan.perf import NVLINK_BETA, Fit, Gpu, Link, allreduce_s, p2p_s, ring_allreduce_s
from spmd.plan.planner import Machine, plan
from traces.floor import WEIGHT_BYTES, head_bytes

# the names callers and tests use, the model's formulas re-exported from spmd.plan among them
__all__ = ["GIB", "NETWORK", "NVLINK_BETA", "WORKSPACE_GIB", "Fit", "Gpu", "Layout", "Link", "allreduce_s",
           "build", "fit_compute", "intra_link", "load_bench", "main", "markdown", "memory_gib", "p2p_s", "project",
           "project_layouts", "ring_allreduce_s", "stages", "step_s", "validate"]

ROOT = Path(__file__).resolve().parents[1]
BENCH = [ROOT / "traces/results/bench/NVIDIA_H200-2026-11-28.json", ROOT / "traces/results/bench/pp-NVIDIA_H200-2026-11-28.json"]
TORCH_TRACE = ROOT / "traces/results/gpu/torchprof-tiny-native-2gpu-NVIDIA_H200/merged.h5"
SLICE = ROOT / "inputs/models/slice.json"
FULL = ROOT / "inputs/models/v3.1-671b.json"
PROMPT, STEPS = 128, 16  # gpu_bench: 128-token prompts, 16 timed steps (mean context prompt + steps/2)


# Stated (not measured) link parameters. NVLink 4 (H100/H200 SXM): 450 GB/s one way per GPU (vendor
# figure); the network: 4 x 200 Gb/s InfiniBand NDR per node of 8 GPUs (the example; EuroHPC
# GPU partitions carry 1-4 such ports per node) = 100 GB/s per node, 12.5 GB/s per GPU when all 8 send at
# once; 5 us per ring step (switch + NIC + NCCL proxy, a typical figure for IB).
NETWORK = Link(perf.NETWORK_ALPHA_S, perf.NETWORK_NODE_GBPS * 1e9 / 8,
               "stated: 4 x 200 Gb/s InfiniBand NDR per 8-GPU node, 5 us per ring step")


def load_bench(paths: list[Path]) -> tuple[dict, list[dict]]:
    """The ceilings of the first file and the rows of all (errors dropped; a (config, batch) that an
    earlier file has is taken from that one)."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    rows, seen = [], set()
    for r in (r for d in docs for r in d["rows"] if "error" not in r):
        key = (r.get("tag"), r.get("batch"))
        if key not in seen:
            seen.add(key)
            rows.append(r)
    return docs[0]["ceilings"], rows


def _mode(row: dict) -> str:
    return "graph" if row.get("decode_mode") == "graph" else "eager"


def fit_compute(rows: list[dict], m: ModelArgs, copy_gbps: float) -> dict[tuple[str, str], Fit]:
    """(mode, weights) -> Fit, from the one-GPU native rows: t = c (L + 1) + bytes / (eta copy_bw)."""
    fits = {}
    ones = [r for r in rows if r["engine"] == "native" and r["gpus"] == 1 and r.get("pp", 1) == 1
            and r.get("fp8_weights", "") != "dequant" and "dequant" not in r.get("tag", "")]
    for key in sorted({(_mode(r), r["weights"]) for r in ones}):
        sel = [r for r in ones if (_mode(r), r["weights"]) == key]
        if len(sel) < 2:
            continue
        x = np.array([_stage_bytes(m, range(m.n_layers), r["batch"], 1, r["weights"], True) for r in sel])
        y = np.array([r["decode_ms_step"] / 1e3 for r in sel])
        a = np.stack([np.full_like(x, m.n_layers + 1), x / (copy_gbps * 1e9)], axis=1)
        (c, inv_eta), *_ = np.linalg.lstsq(a, y, rcond=None)
        pred = a @ np.array([c, inv_eta])
        rms = float(np.sqrt(np.mean(((pred - y) / y) ** 2)))
        fits[key] = Fit(key[0], key[1], float(c), float(1 / inv_eta), len(sel), rms)
    return fits


def _context(batch: int) -> int:
    return PROMPT + STEPS // 2


def _stage_bytes(m: ModelArgs, layers: range, batch: int, group: int, weights: str, last: bool,
                 context: int | None = None) -> float:
    ctx = _context(batch) if context is None else context
    return perf.stage_bytes(m, layers, batch, ctx, group, weights, last)


def step_s(m: ModelArgs, lay: Layout, batch: int, fit: Fit, gpu: Gpu, intra: Link, inter: Link,
           gpus_per_node: int = 8, context: int | None = None, **kw) -> dict:
    """spmd.plan.perf.step_s with the bench's context (prompt + half the timed steps) when none is given."""
    ctx = _context(batch) if context is None else context
    return perf.step_s(m, lay, batch, fit, gpu, intra, inter, gpus_per_node, ctx, **kw)


def memory_gib(m: ModelArgs, lay: Layout, batch: int, context: int, weights: str) -> float:
    """Per GPU of the largest stage: weights, latent cache, workspace."""
    wb = WEIGHT_BYTES[weights]
    worst = 0.0
    for s, layers in enumerate(stages(m, lay)):
        w = 0.0
        for i in layers:
            p = layer_params(m, i)
            w += wb * (p.replicated + (p.sharded + m.n_routed_experts * p.expert) / lay.group)
        if s == 0:
            w += 2.0 * m.vocab_size * m.dim / lay.group  # embedding (bf16), vocab split
        if s == lay.pp - 1:
            w += head_bytes(m, lay.group)
        cache = batch * context * (m.kv_lora_rank + m.qk_rope_head_dim) * 2.0 * len(layers)
        worst = max(worst, (w + cache) / GIB + WORKSPACE_GIB)
    return worst


def intra_link(trace: Path = TORCH_TRACE) -> Link:
    """alpha inside a node: the smallest NCCL all-reduce kernel (10 KB, 2 ranks: 2 ring steps) of the
    2-GPU torch.profiler trace; beta: NVLink's stated rate."""
    import h5py

    durs = []
    with h5py.File(trace) as f:
        for r in f["torch"]:
            ev = f["torch"][r]["events"][:]
            keep = np.array([n.startswith(b"ncclDevKernel_AllReduce") for n in ev["name"]], dtype=bool)
            durs += (ev["dur_ns"][keep] / 1e9).tolist()
    alpha = min(durs) / 2  # 2(G-1) = 2 ring steps for 2 ranks
    return Link(alpha, NVLINK_BETA, f"alpha measured: smallest NCCL all-reduce kernel in {trace.relative_to(ROOT)} "
                                    f"({min(durs) * 1e6:.1f} us for 2 ring steps); beta stated: NVLink 4, 450 GB/s")


def validate(rows: list[dict], fits: dict, gpu: Gpu, intra: Link) -> list[dict]:
    """The 2-GPU slice rows predicted from the one-GPU fits."""
    m = ModelArgs.from_config(json.loads(SLICE.read_text()))
    out = []
    for r in rows:
        if r["engine"] != "native" or r["gpus"] != 2 or (_mode(r), r["weights"]) not in fits:
            continue
        pp = r.get("pp", 1)
        lay = Layout(group=2 // pp, pp=pp, micro=pp)
        pred = step_s(m, lay, r["batch"], fits[_mode(r), r["weights"]], gpu, intra, intra)
        meas = r["decode_ms_step"]
        out.append({"tag": r["tag"], "layout": lay.name, "mode": _mode(r), "weights": r["weights"],
                    "batch": r["batch"], "measured_ms": meas, "predicted_ms": pred["step_s"] * 1e3,
                    "error": pred["step_s"] * 1e3 / meas - 1,
                    "predicted_bubble": pred["bubble"], "measured_bubble": r.get("bubble_fraction")})
    return out


GPUS_PROJECTED = {"H200": (1.0, 141.0), "H100": (3.35 / 4.8, 80.0)}  # HBM bandwidth vs H200 (spec), memory GiB


def project(fits: dict, h200: Gpu, intra: Link, inter: Link = NETWORK, nodes=(1, 2, 3), batches=(1, 32, 128),
            context: int = 4096, gpus_per_node: int = 8) -> list[dict]:
    """Full DeepSeek-V3.1, FP8 weights, CUDA graphs: per node count, GPU and layout, whether it fits and its step."""
    m = ModelArgs.from_config(json.loads(FULL.read_text()))
    fit = fits["graph", "fp8"]
    out = []
    for gname, (bw_ratio, mem) in GPUS_PROJECTED.items():
        gpu = Gpu(gname, h200.copy_gbps * bw_ratio, mem)
        for n in nodes:
            total = n * gpus_per_node
            layouts = [Layout(total)]  # one group over every GPU (tensor/expert parallel across nodes)
            if n > 1:
                layouts += [Layout(gpus_per_node, pp=n, micro=n), Layout(gpus_per_node, replicas=n)]
            for lay in layouts:
                for b in batches:
                    mem_gib = memory_gib(m, lay, b, context, "fp8")
                    row = {"gpu": gname, "nodes": n, "gpus": total, "layout": lay.name, "batch": b,
                           "context": context, "mem_gib_per_gpu": mem_gib, "fits": mem_gib <= 0.95 * mem}
                    if row["fits"]:
                        p = step_s(m, lay, b, fit, gpu, intra, inter, gpus_per_node, context)
                        row.update(step_ms=p["step_s"] * 1e3, token_latency_ms=p["step_s"] * 1e3,
                                   tokens_per_s=b * lay.replicas / p["step_s"],
                                   allreduce_ms=p["allreduce_s"] * 1e3, p2p_ms=p["p2p_s"] * 1e3,
                                   bubble=p["bubble"])
                    out.append(row)
    # efficiency: tokens/s per GPU against the same GPU's best row at that batch on the fewest nodes that fit it
    for r in out:
        fit_rows = [x for x in out if x["gpu"] == r["gpu"] and x["batch"] == r["batch"] and x["fits"]]
        if r["fits"]:
            least = min(x["nodes"] for x in fit_rows)
            base = max((x for x in fit_rows if x["nodes"] == least), key=lambda x: x["tokens_per_s"] / x["gpus"])
            r["efficiency"] = (r["tokens_per_s"] / r["gpus"]) / (base["tokens_per_s"] / base["gpus"])
            r["efficiency_vs"] = f"{base['layout']} on {least} node(s)"
    return out


LAYOUT_NODES, LAYOUT_GPUS_PER_NODE = (1, 2, 3, 4, 6, 8), (4, 8)
LAYOUT_ROWS, LAYOUT_CONTEXT = 256, 4096  # decode rows of one model group, tokens per row


def project_layouts(fits: dict, h200: Gpu, intra: Link, nodes=LAYOUT_NODES, per_node=LAYOUT_GPUS_PER_NODE,
                    rows: int = LAYOUT_ROWS, context: int = LAYOUT_CONTEXT) -> list[dict]:
    """Both group layouts (tp, dpa) of the full model, FP8, CUDA graphs, on 1-8 nodes of 4 and of 8 GPUs, with
    the planner's memory accounting (spmd.plan): per GPU kind, node count and family the fastest single
    model instance that fits (any G, P; R = 1), and the fastest layout with replicas."""
    m = ModelArgs.from_config(json.loads(FULL.read_text()))
    out = []
    for gname, (bw_ratio, mem) in GPUS_PROJECTED.items():
        for gpn in per_node:
            machine = Machine(mem, gpn, perf.H200_HBM_TBPS * bw_ratio, perf.NETWORK_NODE_GBPS, intra.beta_Bps / 1e9,
                              USABLE_FRACTION, h200.copy_gbps, intra.alpha_s)
            doc = plan(m, machine, nodes, "fp8", rows, context, fits["graph", "fp8"])
            out += [_layout_row(doc["rows"], gname, gpn, n, family, rows, context) for n in nodes
                    for family in ("tp", "dpa")]
    return out


def _layout_row(fitting: list[dict], gname: str, gpn: int, nodes: int, family: str, rows: int, context: int) -> dict:
    mine = [r for r in fitting if r["nodes"] == nodes and r["family"] == family]
    one = [r for r in mine if r["R"] == 1]
    out = {"gpu": gname, "gpus_per_node": gpn, "nodes": nodes, "gpus": nodes * gpn, "family": family,
           "batch": rows, "context": context, "fits": bool(one)}
    if mine:
        best = max(mine, key=lambda r: r["tokens_per_s"])
        out.update(best_layout=best["layout"], best_tokens_per_s=best["tokens_per_s"],
                   best_tokens_per_s_per_gpu=best["tokens_per_s_per_gpu"])
    if one:
        r = max(one, key=lambda r: r["tokens_per_s"])
        dest = r.get("destinations") or {}
        out.update({k: r[k] for k in ("layout", "G", "P", "weights_gib", "cache_gib", "total_gib", "step_ms",
                                      "tokens_per_s", "tokens_per_s_per_gpu", "allreduce_ms", "alltoall_ms",
                                      "p2p_ms", "dequantized")},
                   dispatch_cross_mb_per_node=r.get("dispatch_cross_mb_per_node", 0.0),
                   dest_ranks=dest.get("ranks", 0.0), dest_nodes=dest.get("nodes", 0.0))
    return out


def markdown_layouts(rows: list[dict]) -> list[str]:
    lines = ["", f"## Both group layouts (tp, dpa): DeepSeek-V3.1, FP8, {rows[0]['batch']} rows x "
             f"{rows[0]['context']} tokens per model group", "",
             "Projected, not measured (dpa has not run on several GPUs yet). Memory: the planner's accounting "
             "(spmd.plan.memory: bf16 embedding, head, gate and kv_b_proj; dpa caches only its rows), against 0.9 "
             "of the GPU. Per node count and family the fastest single model instance that fits (R = 1), and the "
             "fastest layout with replicas. Network: 100 GB/s per node shared by its GPUs. Dispatch: the bytes one "
             "node sends off-node per MoE layer (dispatch only; combine moves as much less the ids).", "",
             "| GPU | GPUs/node | nodes | family | layout | GiB/GPU | step ms | tokens/s | tok/s/GPU | all-reduce ms "
             "| all-to-all ms | dispatch MB/node/layer | ranks / nodes per token | best with replicas (tok/s/GPU) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        best = f"{r['best_layout']} ({r['best_tokens_per_s_per_gpu']:.0f})" if "best_layout" in r else "none fits"
        head = f"| {r['gpu']} | {r['gpus_per_node']} | {r['nodes']} | {r['family']} |"
        if not r["fits"]:
            lines.append(f"{head} does not fit | | | | | | | | | {best} |")
            continue
        dest = f"{r['dest_ranks']:.1f} / {r['dest_nodes']:.1f}" if r["family"] == "dpa" else ""
        lines.append(f"{head} {r['layout']} | {r['total_gib']:.0f} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['tokens_per_s_per_gpu']:.0f} | {r['allreduce_ms']:.2f} | {r['alltoall_ms']:.2f} | "
                     f"{r['dispatch_cross_mb_per_node']:.2f} | {dest} | {best} |")
    return lines


def markdown(doc: dict) -> str:
    lines = ["# Performance model (decode)", "",
             f"Machine: {doc['gpu']} (copy {doc['copy_gbps']:.0f} GB/s measured). Intra-node link: "
             f"{doc['intra']['source']}. Between nodes: {doc['inter']['source']}.", "",
             "## Fits (one GPU, slice, batch 1-64)", "", "| mode | weights | c per layer (us) | eta | rows | rms error |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {f['mode']} | {f['weights']} | {f['c_layer_s'] * 1e6:.0f} | {f['eta']:.2f} | {f['rows']} | "
              f"{f['rms_rel_err'] * 100:.1f} % |" for f in doc["fits"]]
    lines += ["", "## Validation: 2-GPU slice rows predicted from the one-GPU fits", "",
              "| row | layout | batch | measured ms | predicted ms | error | bubble meas. / pred. |", "|---|---|---|---|---|---|---|"]
    for v in doc["validation"]:
        bub = f"{v['measured_bubble']:.2f} / {v['predicted_bubble']:.2f}" if v["measured_bubble"] is not None else ""
        lines.append(f"| {v['tag']} | {v['layout']} | {v['batch']} | {v['measured_ms']:.2f} | {v['predicted_ms']:.2f} | "
                     f"{v['error'] * 100:+.0f} % | {bub} |")
    errs = [abs(v["error"]) for v in doc["validation"]]
    if errs:
        lines += ["", f"Mean |error| {np.mean(errs) * 100:.0f} %, max {max(errs) * 100:.0f} % over {len(errs)} rows."]
    lines += ["", f"## Projection: DeepSeek-V3.1 (61 layers), FP8 weights, CUDA graphs, context {doc['projection'][0]['context']}",
              "", "Projected, not measured.", "",
              "| GPU | nodes | layout | batch | GiB/GPU | fits | step ms | tokens/s | all-reduce ms | p2p ms | efficiency |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["projection"]:
        if r["fits"]:
            lines.append(f"| {r['gpu']} | {r['nodes']} | {r['layout']} | {r['batch']} | {r['mem_gib_per_gpu']:.0f} | yes | "
                         f"{r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {r['allreduce_ms']:.2f} | {r['p2p_ms']:.2f} | "
                         f"{r.get('efficiency', float('nan')):.2f} |")
        else:
            lines.append(f"| {r['gpu']} | {r['nodes']} | {r['layout']} | {r['batch']} | {r['mem_gib_per_gpu']:.0f} | no | | | | | |")
    if doc.get("layouts"):
        lines += markdown_layouts(doc["layouts"])
    return "\n".join(lines) + "\n"


def build(bench: list[Path], trace: Path = TORCH_TRACE) -> dict:
    ceil, rows = load_bench(bench)
    m = ModelArgs.from_config(json.loads(SLICE.read_text()))
    gpu = Gpu(ceil["gpu"], ceil["copy_gbps"], 141.0)
    fits = fit_compute(rows, m, gpu.copy_gbps)
    intra = intra_link(trace)
    return {"gpu": gpu.name, "copy_gbps": gpu.copy_gbps, "bench": [str(Path(p).relative_to(ROOT)) for p in bench],
            "intra": asdict(intra), "inter": asdict(NETWORK), "fits": [asdict(f) for f in fits.values()],
            "validation": validate(rows, fits, gpu, intra), "projection": project(fits, gpu, intra),
            "layouts": project_layouts(fits, gpu, intra)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m traces.model", description=__doc__.splitlines()[0])
    p.add_argument("--bench", type=Path, nargs="+", default=BENCH)
    p.add_argument("--trace", type=Path, default=TORCH_TRACE)
    p.add_argument("--out", type=Path, default=ROOT / "traces" / "results" / "model")
    a = p.parse_args(argv)
    doc = build(a.bench, a.trace)
    a.out.mkdir(parents=True, exist_ok=True)
    name = doc["gpu"].replace(" ", "_")
    (a.out / f"model-{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (a.out / f"model-{name}.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
