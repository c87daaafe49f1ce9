"""The decode performance model of a layout (tp or dpa groups, pipeline stages), shared by the planner and
traces/model.py (which fits its constants to the stored measurements and validates it: docs/performance.md).

Compute, per GPU of a stage: t = c (layers + 1 on the last stage) + bytes / (eta copy_bw); bytes: what the
step reads (``layer_bytes``: weights at the layout's split, routed experts the distinct ones the group's
tokens hit, the latent cache of the GPU's rows, the head on the last stage).
tp: per layer two all-reduces of the micro-batch's B x dim bf16 hidden states (attention output; MoE or
MLP), one for the embedding, the logits all-gathered (half an all-reduce); ring inside a node, hierarchical
across nodes (Hockney alpha-beta). dpa: no all-reduce; per MoE layer an all-to-all dispatch (each token's
hidden state, k ids and k weights, once to each distinct rank owning one of its experts) and combine (one
bf16 weighted sum back per such rank): latency of the farthest link + the larger of in-node bytes / NVLink
and cross-node bytes / the network share of a GPU (both links move at once); the split from
spmd.plan.routing. Load imbalance between ranks is not modelled (balanced routing).
Pipelines (P stages, M micro-batches): (M + P - 1) x the slowest stage + the logits' way back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from spmd.config import ModelArgs
from spmd.config.sizes import distinct_experts, layer_params
from spmd.plan.layouts import Layout
from spmd.plan.memory import ACT_BYTES, WEIGHT_BYTES, layer_tensors, stages
from spmd.plan.routing import Destinations, destinations, sample_routes


@dataclass(frozen=True)
class Link:
    alpha_s: float        # latency per ring step (or per all-to-all)
    beta_Bps: float       # bandwidth per GPU, bytes/s one way
    source: str


@dataclass(frozen=True)
class Gpu:
    name: str
    copy_gbps: float      # device-to-device copy rate (bytes read + written)
    mem_gib: float


@dataclass(frozen=True)
class Fit:
    mode: str             # "graph" | "eager"
    weights: str          # "bf16" | "fp8"
    c_layer_s: float      # fixed cost per layer (head included as one)
    eta: float            # fraction of the copy rate reached by the reads
    rows: int
    rms_rel_err: float


# The fitted and measured constants of traces/results/model/model-NVIDIA_H200.json (CUDA graphs, H200), so
# the planner needs no numpy and no result files; tests/unit/test_plan.py keeps them equal to the stored file.
FITS = {"fp8": Fit("graph", "fp8", 116.8e-6, 0.7308, 4, 0.0132),
        "bf16": Fit("graph", "bf16", 137.8e-6, 0.8179, 4, 0.0405)}
H200_COPY_GBPS, H200_HBM_TBPS = 3962.0, 4.8      # measured copy rate; the H200's stated HBM bandwidth
INTRA_ALPHA_S = 3.07e-6                          # measured: half the smallest 2-rank NCCL all-reduce kernel
NVLINK_BETA = 450e9                              # stated: NVLink 4 (H100/H200 SXM), one way per GPU
NETWORK_ALPHA_S, NETWORK_NODE_GBPS = 5e-6, 100.0  # stated: 4 x 200 Gb/s InfiniBand NDR per node, 5 us a step
ID_BYTES = 4 + 4                                 # a routed expert's id (int32) and weight (float32)


def ring_allreduce_s(nbytes: float, ranks: int, link: Link) -> float:
    """2(G-1) ring steps, each alpha + n/(G beta) (0 for one rank)."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) * (link.alpha_s + nbytes / (ranks * link.beta_Bps))


def allreduce_s(nbytes: float, ranks: int, intra: Link, inter: Link, gpus_per_node: int = 8) -> float:
    """Inside a node: one ring. Across nodes, hierarchical (as NCCL does in effect): a ring all-reduce
    inside each node, then one across the nodes on each GPU's 1/g share, in parallel over the g GPUs."""
    if ranks <= gpus_per_node:
        return ring_allreduce_s(nbytes, ranks, intra)
    nodes = math.ceil(ranks / gpus_per_node)
    return ring_allreduce_s(nbytes, gpus_per_node, intra) + ring_allreduce_s(nbytes / gpus_per_node, nodes, inter)


def p2p_s(nbytes: float, link: Link) -> float:
    return link.alpha_s + nbytes / link.beta_Bps


def alltoall_s(intra_bytes: float, cross_bytes: float, intra: Link, inter: Link) -> float:
    """One all-to-all of a GPU sending `intra_bytes` to its node's other GPUs and `cross_bytes` off the node."""
    if cross_bytes > 0:
        return inter.alpha_s + max(intra_bytes / intra.beta_Bps, cross_bytes / inter.beta_Bps)
    return intra.alpha_s + intra_bytes / intra.beta_Bps if intra_bytes > 0 else 0.0


def layer_bytes(m: ModelArgs, layer: int, rows: int, context: int, group: int = 1, weights: str = "bf16",
                family: str = "tp", tokens: int | None = None, dequant: tuple[str, ...] = ()) -> float:
    """Bytes one GPU reads for one layer in one decode step: weights (tp: split over the group but the
    replicated parts; dpa: whole but the routed experts), the distinct routed experts the group's `tokens`
    hit (its E/G share), the latent cache of its `rows`. kv_b_proj and `dequant` tensors read as bf16.
    tp with no dequant is traces.floor.layer_bytes (rows = tokens = the group's rows)."""
    wb = WEIGHT_BYTES[weights]
    t = layer_tensors(m, layer)
    p = layer_params(m, layer)
    split = group if family == "tp" else 1
    experts = distinct_experts(m, rows if tokens is None else tokens) * p.expert / group
    bf16 = t["kv_b_proj"] + sum(t.get(name, 0) for name in dequant)
    cache = rows * context * (m.kv_lora_rank + m.qk_rope_head_dim) * ACT_BYTES
    return wb * (p.replicated + p.sharded / split + experts) + (ACT_BYTES - wb) * bf16 / split + cache


def head_bytes(m: ModelArgs, group: int = 1) -> float:
    """The lm_head's bytes per GPU (bf16; tp splits it over the group by vocabulary rows, dpa: group=1)."""
    return ACT_BYTES * m.vocab_size * m.dim / group


def stage_bytes(m: ModelArgs, layers: range, rows: int, context: int, group: int, weights: str, last: bool,
                family: str = "tp", tokens: int | None = None, dequant: tuple[str, ...] = ()) -> float:
    total = sum(layer_bytes(m, i, rows, context, group, weights, family, tokens, dequant) for i in layers)
    return total + (head_bytes(m, group if family == "tp" else 1) if last else 0.0)


def _compute_s(fit: Fit, gpu: Gpu, n_layers: int, last: bool, nbytes: float) -> float:
    return fit.c_layer_s * (n_layers + (1 if last else 0)) + nbytes / (fit.eta * gpu.copy_gbps * 1e9)


def _stage_nodes(lay: Layout, gpus_per_node: int) -> list[int]:
    return [(s * lay.group) // gpus_per_node for s in range(lay.pp)]


def _tp_stage(m, lay, s, layers, rows, context, fit, gpu, intra, inter, gpn, dequant) -> dict:
    last = s == lay.pp - 1
    nb = stage_bytes(m, layers, rows, context, lay.group, fit.weights, last, "tp", None, dequant)
    comp = _compute_s(fit, gpu, len(layers), last, nb)
    act = rows * m.dim * 2.0  # bf16 hidden states of a micro-batch
    n_ar = 2 * len(layers) + (1 if s == 0 else 0)
    ar = n_ar * allreduce_s(act, lay.group, intra, inter, gpn)
    if last:  # head: logits all-gather (vocab split): half an all-reduce of the logits
        ar += allreduce_s(rows * m.vocab_size * 4.0, lay.group, intra, inter, gpn) / 2
    nodes = _stage_nodes(lay, gpn)
    send = 0.0 if last else p2p_s(act, inter if nodes[s + 1] != nodes[s] else intra)
    return {"compute_s": comp, "allreduce_s": ar, "p2p_s": send, "alltoall_s": 0.0}


def dispatch_bytes(m: ModelArgs, tokens: int, dest: Destinations) -> dict[str, float]:
    """Bytes one GPU sends per MoE layer for `tokens` of its own rows: dispatch and combine, in-node and
    cross-node (sends to its own rank are free)."""
    hidden = m.dim * ACT_BYTES
    dispatch = hidden + m.n_activated_experts * ID_BYTES
    return {"dispatch_intra_B": tokens * dest.intra * dispatch, "dispatch_cross_B": tokens * dest.cross * dispatch,
            "combine_intra_B": tokens * dest.intra * hidden, "combine_cross_B": tokens * dest.cross * hidden}


def _dpa_stage(m, lay, s, layers, rows, context, fit, gpu, intra, inter, gpn, dest) -> dict:
    last = s == lay.pp - 1
    mine = math.ceil(rows / lay.group)  # this rank's rows of the micro-batch
    nb = stage_bytes(m, layers, mine, context, lay.group, fit.weights, last, "dpa", rows)
    comp = _compute_s(fit, gpu, len(layers), last, nb)
    moe = sum(1 for i in layers if i >= m.n_dense_layers)
    sent = dispatch_bytes(m, mine, dest)
    a2a = moe * (alltoall_s(sent["dispatch_intra_B"], sent["dispatch_cross_B"], intra, inter)
                 + alltoall_s(sent["combine_intra_B"], sent["combine_cross_B"], intra, inter))
    nodes = _stage_nodes(lay, gpn)
    send = 0.0 if last else p2p_s(mine * m.dim * 2.0, inter if nodes[s + 1] != nodes[s] else intra)
    return {"compute_s": comp, "allreduce_s": 0.0, "p2p_s": send, "alltoall_s": a2a, **sent}


def step_s(m: ModelArgs, lay: Layout, batch: int, fit: Fit, gpu: Gpu, intra: Link, inter: Link,
           gpus_per_node: int = 8, context: int = 4096, dequant: tuple[str, ...] = (),
           dest: Destinations | None = None, parts: list[range] | None = None) -> dict:
    """Predicted decode step of one model group (`batch` rows) and the parts of its slowest stage.
    dpa: `dest` where its tokens go (spmd.plan.routing.destinations; from a fresh sample when None);
    `parts`: the stages' layers when the caller has them."""
    rows = math.ceil(batch / lay.micro)
    if lay.family == "dpa" and dest is None:
        dest = destinations(m, lay.group, gpus_per_node, sample_routes(m))
    slowest, worst = 0.0, {}
    for s, layers in enumerate(stages(m, lay) if parts is None else parts):
        if lay.family == "dpa":
            p = _dpa_stage(m, lay, s, layers, rows, context, fit, gpu, intra, inter, gpus_per_node, dest)
        else:
            p = _tp_stage(m, lay, s, layers, rows, context, fit, gpu, intra, inter, gpus_per_node, dequant)
        t = p["compute_s"] + p["allreduce_s"] + p["p2p_s"] + p["alltoall_s"]
        if t > slowest:
            slowest, worst = t, p
    extra = {"destinations": dest} if lay.family == "dpa" else {}
    if lay.pp == 1:
        return {"step_s": slowest, **worst, "bubble": 0.0, **extra}
    logits = rows * lay.micro * m.vocab_size * 4.0
    if lay.family == "dpa":  # each rank's logits back to its rank of the first stage
        nodes = _stage_nodes(lay, gpus_per_node)
        back = p2p_s(logits / lay.group, inter if nodes[-1] != nodes[0] else intra)
    else:  # a broadcast over the model group: about half an all-reduce
        back = allreduce_s(logits, lay.pp * lay.group, intra, inter, gpus_per_node) / 2
    total = (lay.micro + lay.pp - 1) * slowest + back
    return {"step_s": total, **worst, "bubble": (lay.pp - 1) / (lay.micro + lay.pp - 1), **extra}


def links(gpus_per_node: int, node_gbps: float = NETWORK_NODE_GBPS, nvlink_gbps: float = NVLINK_BETA / 1e9,
          intra_alpha_s: float = INTRA_ALPHA_S) -> tuple[Link, Link]:
    """(inside a node, between nodes): the network's bandwidth per node shared by its GPUs sending at once."""
    intra = Link(intra_alpha_s, nvlink_gbps * 1e9, f"NVLink {nvlink_gbps:g} GB/s per GPU (stated), "
                                                   f"{intra_alpha_s * 1e6:.2f} us (measured, H200)")
    inter = Link(NETWORK_ALPHA_S, node_gbps * 1e9 / gpus_per_node,
                 f"{node_gbps:g} GB/s per node of {gpus_per_node} GPUs, {NETWORK_ALPHA_S * 1e6:g} us (stated)")
    return intra, inter
