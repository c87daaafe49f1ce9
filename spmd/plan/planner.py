"""The planner's table: every layout of both families on 1..n nodes, the ones that fit, their predicted
decode speed, and the recommendation (the highest tokens/s per GPU among the fitting layouts on the fewest
nodes any layout fits)."""
from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from spmd.config import ModelArgs
from spmd.plan.layouts import candidates
from spmd.plan.memory import USABLE_FRACTION, WORKSPACE_GIB, per_gpu, stages
from spmd.plan.perf import FITS, H200_COPY_GBPS, H200_HBM_TBPS, INTRA_ALPHA_S, Fit, Gpu, Link, links, step_s
from spmd.plan.routing import destinations, sample_routes


@dataclass(frozen=True)
class Machine:
    """What the planner is told about the GPUs and the nodes."""

    gpu_mem_gib: float
    gpus_per_node: int
    hbm_tbps: float = 3.35            # stated HBM bandwidth (H100 SXM); scales the measured H200 copy rate
    node_gbps: float = 100.0          # network bandwidth per node, one way (4 x 200 Gb/s NDR)
    nvlink_gbps: float = 450.0        # per GPU, one way (NVLink 4)
    fraction: float = USABLE_FRACTION
    h200_copy_gbps: float = H200_COPY_GBPS  # the measured copy rate the HBM ratio scales
    intra_alpha_s: float = INTRA_ALPHA_S

    def gpu(self) -> Gpu:
        return Gpu(f"{self.gpu_mem_gib:g} GiB, {self.hbm_tbps:g} TB/s",
                   self.h200_copy_gbps * self.hbm_tbps / H200_HBM_TBPS, self.gpu_mem_gib)

    def links(self) -> tuple[Link, Link]:
        return links(self.gpus_per_node, self.node_gbps, self.nvlink_gbps, self.intra_alpha_s)


def _notes(lay, mem, pred) -> str:
    notes = []
    if mem.dequantized:
        notes.append(f"{'+'.join(mem.dequantized)} dequantized to bf16 (shards off 128-blocks)")
    dest = pred.get("destinations")
    if dest is not None and lay.group > 1:
        notes.append(f"token to {dest.ranks:.1f} ranks, {dest.nodes:.1f} nodes (max {dest.max_nodes})")
    if lay.pp > 1:
        notes.append(f"bubble {pred['bubble']:.2f}")
    return "; ".join(notes)


def row(m: ModelArgs, lay, nodes: int, machine: Machine, weights: str, rows: int, context: int,
        dest=None, parts: list[range] | None = None, fit: Fit | None = None) -> dict:
    """One layout's memory per GPU and, when it fits, its predicted decode step (dpa: `dest`, where its
    tokens go, spmd.plan.routing.destinations; `parts`: the stages' layers; both computed when None;
    `fit`: the compute constants, FITS[weights] when None)."""
    parts = stages(m, lay) if parts is None else parts
    mem = per_gpu(m, lay, rows, context, weights, parts)
    out = {"family": lay.family, "layout": lay.name, "G": lay.group, "P": lay.pp, "M": lay.micro, "R": lay.replicas,
           "nodes": nodes, "gpus": lay.gpus, "weights_gib": mem.weights_gib, "cache_gib": mem.cache_gib,
           "workspace_gib": mem.workspace_gib, "total_gib": mem.total_gib, "cache_rows": mem.rows,
           "dequantized": list(mem.dequantized),
           "fits": mem.total_gib <= machine.fraction * machine.gpu_mem_gib}
    if not out["fits"]:
        return out
    intra, inter = machine.links()
    pred = step_s(m, lay, rows, fit or FITS[weights], machine.gpu(), intra, inter, machine.gpus_per_node, context,
                  mem.dequantized, dest, parts)
    tps = rows * lay.replicas / pred["step_s"]
    out.update(step_ms=pred["step_s"] * 1e3, tokens_per_s=tps, tokens_per_s_per_gpu=tps / lay.gpus,
               compute_ms=pred["compute_s"] * 1e3, allreduce_ms=pred["allreduce_s"] * 1e3,
               alltoall_ms=pred["alltoall_s"] * 1e3, p2p_ms=pred["p2p_s"] * 1e3, bubble=pred["bubble"],
               notes=_notes(lay, mem, pred))
    if "destinations" in pred:
        out["destinations"] = asdict(pred["destinations"])
        out["dispatch_cross_mb_per_node"] = pred["dispatch_cross_B"] * min(lay.group, machine.gpus_per_node) / 1e6
    return out


def plan(m: ModelArgs, machine: Machine, nodes: Iterable[int], weights: str = "fp8", rows: int = 256,
         context: int = 4096, fit: Fit | None = None) -> dict:
    """Every layout on each node count of `nodes`: the fitting rows, the recommendation, the inputs."""
    nodes = list(nodes)
    routes = sample_routes(m)
    out, parts, dests = [], {}, {}  # (P, G) -> the stages' layers; G -> Destinations (the slow parts, once)
    for n in nodes:
        for lay in candidates(m, n * machine.gpus_per_node, machine.gpus_per_node, rows):
            key = (lay.pp, lay.group)
            parts[key] = parts[key] if key in parts else stages(m, lay)
            if lay.family == "dpa" and lay.group not in dests:
                dests[lay.group] = destinations(m, lay.group, machine.gpus_per_node, routes)
            out.append(row(m, lay, n, machine, weights, rows, context, dests.get(lay.group), parts[key], fit))
    fits = [r for r in out if r["fits"]]
    return {"inputs": {**asdict(machine), "nodes": nodes, "weights": weights,
                       "rows": rows, "context": context, "workspace_gib": WORKSPACE_GIB},
            "rows": fits, "not_fitting": len(out) - len(fits), "recommendation": recommend(fits)}


def recommend(fits: list[dict]) -> dict | None:
    """The fitting row with the most tokens/s per GPU on the fewest nodes that any layout fits."""
    if not fits:
        return None
    least = min(r["nodes"] for r in fits)
    return max((r for r in fits if r["nodes"] == least), key=lambda r: r["tokens_per_s_per_gpu"])


COLUMNS = (("family", "{}"), ("G", "{}"), ("P", "{}"), ("R", "{}"), ("nodes", "{}"), ("weights_gib", "{:.1f}"),
           ("cache_gib", "{:.1f}"), ("total_gib", "{:.1f}"), ("step_ms", "{:.1f}"), ("tokens_per_s", "{:.0f}"),
           ("tokens_per_s_per_gpu", "{:.1f}"), ("notes", "{}"))
TOP = 2  # rows the table shows per node count and family
HEADERS = ("family", "G", "P", "R", "nodes", "weights GiB", "cache GiB", "total GiB", "step ms", "tok/s",
           "tok/s/GPU", "notes")


def _recommendation(doc: dict) -> list[str]:
    best = doc["recommendation"]
    if best is None:
        return ["Recommendation: none fits; add nodes (--nodes), stages, or lower --batch / --context."]
    flags = f"--group-layout {best['family']} --group-size {best['G']}"
    flags += f" --pp {best['P']}" if best["P"] > 1 else ""
    replicas = f", {best['R']} replicas" if best["R"] > 1 else ""
    lines = ["Recommendation (most tokens/s per GPU on the fewest nodes that fit):",
             f"  {best['layout']} on {best['nodes']} node(s) ({flags}{replicas}): {best['step_ms']:.1f} ms per step, "
             f"{best['tokens_per_s']:.0f} tokens/s, {best['total_gib']:.1f} GiB per GPU."]
    top = max(doc["rows"], key=lambda r: r["tokens_per_s_per_gpu"])
    if top is not best:
        ratio = top["tokens_per_s_per_gpu"] / best["tokens_per_s_per_gpu"]
        lines.append(f"Most tokens/s per GPU in the range: {top['layout']} on {top['nodes']} node(s), "
                     f"{top['tokens_per_s_per_gpu']:.0f} per GPU ({ratio:.2f}x).")
    return lines


def shown(doc: dict, top: int | None = TOP) -> list[dict]:
    """The rows the table shows: per node count and family the `top` by tokens/s (all when None)."""
    if top is None:
        return doc["rows"]
    keep = []
    for key in dict.fromkeys((r["nodes"], r["family"]) for r in doc["rows"]):
        same = [r for r in doc["rows"] if (r["nodes"], r["family"]) == key]
        keep += sorted(same, key=lambda r: -r["tokens_per_s"])[:top]
    return keep


def table(doc: dict, top: int | None = TOP) -> str:
    """The readable form: the inputs, the fitting layouts (per node count and family the `top` fastest;
    all when None), the recommendation."""
    i = doc["inputs"]
    lines = [f"{i['gpus_per_node']} GPUs per node of {i['gpu_mem_gib']:g} GiB (usable {i['fraction']:g}), HBM "
             f"{i['hbm_tbps']:g} TB/s, NVLink {i['nvlink_gbps']:g} GB/s, network {i['node_gbps']:g} GB/s per node",
             f"{i['weights']} weights, {i['rows']} rows x {i['context']} tokens per model group, workspace "
             f"{i['workspace_gib']:g} GiB + decode logits; nodes {i['nodes'][0]}-{i['nodes'][-1]}", ""]
    rows = shown(doc, top)
    cells = [[fmt.format(r[k]) for k, fmt in COLUMNS] for r in rows]
    widths = [max([len(h)] + [len(c[j]) for c in cells]) for j, h in enumerate(HEADERS)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(HEADERS, widths)).rstrip())
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)).rstrip() for cell in cells]
    more = f" (shown: the {top} fastest per node count and family; --all for every one)"
    lines += ["", f"{len(doc['rows'])} layouts fit{more if len(rows) < len(doc['rows']) else ''}, "
                  f"{doc['not_fitting']} do not."]
    lines += _recommendation(doc)
    lines.append("Predicted by spmd.plan.perf: fitted to one H200, scaled by the HBM bandwidth; links stated; dpa not "
                 "yet measured on several GPUs.")
    return "\n".join(lines) + "\n"


def _nodes(text: str) -> range:
    a, _, b = text.partition("-")
    lo, hi = int(a), int(b or a)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"--nodes {text!r}: expected a-b with 1 <= a <= b")
    return range(lo, hi + 1)


def parser() -> argparse.ArgumentParser:
    """python -m spmd.plan's options."""
    p = argparse.ArgumentParser(prog="python -m spmd.plan", description="The layouts (tp or dpa groups, pipeline "
                                "stages, replicas) that fit these GPUs, their memory and predicted decode speed.")
    p.add_argument("--config", type=Path, required=True, help="the checkpoint's config.json (or inputs/models/*.json)")
    p.add_argument("--gpu-mem", type=float, required=True, help="memory per GPU, GiB")
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--nodes", type=_nodes, default=range(1, 9), help="node counts a-b (default 1-8)")
    p.add_argument("--link", type=float, default=100.0, help="network GB/s per node, one way (default 100)")
    p.add_argument("--nvlink", type=float, default=450.0, help="GPU-to-GPU GB/s in a node, one way (default 450)")
    p.add_argument("--hbm", type=float, default=3.35, help="HBM TB/s of one GPU, stated (default 3.35, H100 SXM)")
    p.add_argument("--weights", choices=("fp8", "bf16"), default="fp8")
    p.add_argument("--context", type=int, default=4096, help="tokens per row (default 4096)")
    p.add_argument("--batch", type=int, default=256, help="decode rows of one model group (default 256)")
    p.add_argument("--fraction", type=float, default=USABLE_FRACTION, help="usable part of the GPU memory")
    p.add_argument("--all", action="store_true", help="every fitting layout in the table, not the fastest 2 "
                                                       "per node count and family")
    p.add_argument("--json", action="store_true", help="JSON (every fitting layout) instead of the table")
    return p
