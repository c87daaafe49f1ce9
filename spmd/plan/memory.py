"""Memory per GPU of a layout: weights + latent cache + workspace, against the usable part of the GPU.

Weights, per tensor of the checkpoint: FP8 ones at 1 byte + one fp32 scale per 128x128 block; bf16 ones at
2 bytes: the embedding, lm_head, the gate (and norms, negligible), kv_b_proj (the absorbed decode keeps
it as a bf16 matrix: spmd/model/transformer.py) and, in a tp group, every FP8 tensor whose shard does not
fall on 128-blocks (spmd.plan.layouts.unaligned). tp splits everything but q_a_proj, kv_a_proj_with_mqa
and the gate over G; dpa keeps everything whole but the routed experts. Both: E/G routed experts per rank.
The latent cache: kv_lora_rank + qk_rope_head_dim values (bf16) per token per layer of the stage, for the
rows the GPU holds (tp: all the group's rows; dpa: ceil(rows / G)). Workspace: WORKSPACE_GIB (activations,
a prefill chunk, allocator slack) + the decode logits (LOGIT_COPIES float32 vocab-wide buffers per row, as
spmd.engines.memory sizes them). A pipeline stage's GPUs hold only its layers (the embedding on the first
stage, the head on the last); the largest stage counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from spmd.config import ModelArgs
from spmd.config.partition import stage_layers
from spmd.plan.layouts import FAMILIES, Layout, candidates, invalid, unaligned

GIB = 2.0**30
WORKSPACE_GIB = 2.0        # activations and workspace per GPU (the performance model's allowance too)
USABLE_FRACTION = 0.9      # of the GPU's memory: the program's --gpu-memory-fraction default
LOGIT_COPIES = 8           # spmd.engines.memory.DECODE_LOGIT_COPIES (a test keeps them equal)
WEIGHT_BYTES = {"bf16": 2.0, "fp8": 1.0 + 4.0 / (128 * 128)}  # fp8: one fp32 scale per 128x128 block
ACT_BYTES = 2.0            # bf16 cache and activations
BF16_ALWAYS = ("kv_b_proj", "gate")  # bf16 whatever the checkpoint: absorbed decode; the router
REPLICATED = ("q_a_proj", "kv_a_proj_with_mqa", "gate")  # whole on every tp rank


def layer_tensors(m: ModelArgs, layer: int) -> dict[str, float]:
    """Parameters of one layer by tensor (``routed_experts``: all E of them)."""
    q_in = m.q_lora_rank or m.dim
    t = {"q_a_proj": m.dim * m.q_lora_rank if m.q_lora_rank else 0,
         "q_b_proj": q_in * m.n_heads * m.qk_head_dim,
         "kv_a_proj_with_mqa": m.dim * (m.kv_lora_rank + m.qk_rope_head_dim),
         "kv_b_proj": m.kv_lora_rank * m.n_heads * (m.qk_nope_head_dim + m.v_head_dim),
         "o_proj": m.n_heads * m.v_head_dim * m.dim}
    if layer < m.n_dense_layers:
        t["dense_mlp"] = 3 * m.dim * m.inter_dim
    else:
        t["shared_expert"] = 3 * m.dim * m.moe_inter_dim * m.n_shared_experts
        t["gate"] = m.n_routed_experts * m.dim
        t["routed_experts"] = m.n_routed_experts * 3 * m.dim * m.moe_inter_dim
    return t


def tensor_bytes(name: str, weights: str, dequant: tuple[str, ...] = ()) -> float:
    """Bytes per weight of a tensor held in memory."""
    return ACT_BYTES if weights == "bf16" or name in BF16_ALWAYS or name in dequant else WEIGHT_BYTES[weights]


def weight_bytes(m: ModelArgs, lay: Layout, layers: range, first: bool, last: bool, weights: str) -> float:
    """Bytes of weights one GPU of a stage holds: its layers, the embedding (first), the head (last)."""
    dequant = unaligned(m, lay.group) if lay.family == "tp" and weights == "fp8" else ()
    total = 0.0
    for i in layers:
        for name, n in layer_tensors(m, i).items():
            split = lay.group if name == "routed_experts" or (lay.family == "tp" and name not in REPLICATED) else 1
            total += tensor_bytes(name, weights, dequant) * n / split
    vocab = ACT_BYTES * m.vocab_size * m.dim / (lay.group if lay.family == "tp" else 1)
    return total + vocab * (int(first) + int(last))


def rows_per_gpu(lay: Layout, rows: int) -> int:
    """Rows whose latent cache one GPU holds (`rows`: the model group's decode rows)."""
    return rows if lay.family == "tp" else math.ceil(rows / lay.group)


@dataclass(frozen=True)
class Memory:
    """One GPU's share (the largest stage), GiB."""

    weights_gib: float
    cache_gib: float
    workspace_gib: float
    rows: int                       # rows whose cache this GPU holds
    dequantized: tuple[str, ...]    # FP8 tensors held in bf16 because their tp shards cut 128-blocks

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.cache_gib + self.workspace_gib


def stages(m: ModelArgs, lay: Layout) -> list[range]:
    """The layers of each pipeline stage, as the program partitions them."""
    return [range(m.n_layers)] if lay.pp == 1 else stage_layers(m, lay.pp, lay.group)


def per_gpu(m: ModelArgs, lay: Layout, rows: int, context: int, weights: str,
            parts: list[range] | None = None) -> Memory:
    """Memory of one GPU of the layout's largest stage for `rows` decode rows of `context` tokens (`parts`:
    the stages' layers when the caller has them)."""
    mine = rows_per_gpu(lay, rows)
    parts = stages(m, lay) if parts is None else parts
    worst = None
    for s, layers in enumerate(parts):
        w = weight_bytes(m, lay, layers, s == 0, s == len(parts) - 1, weights) / GIB
        cache = mine * context * (m.kv_lora_rank + m.qk_rope_head_dim) * ACT_BYTES * len(layers) / GIB
        if worst is None or w + cache > worst[0] + worst[1]:
            worst = (w, cache)
    work = WORKSPACE_GIB + mine * LOGIT_COPIES * m.vocab_size * 4.0 / GIB
    dequant = unaligned(m, lay.group) if lay.family == "tp" and weights == "fp8" else ()
    return Memory(worst[0], worst[1], work, mine, dequant)


def smallest_fit(m: ModelArgs, gpu_mem_gib: float, weights: str, rows: int, context: int,
                 fraction: float = USABLE_FRACTION, gpus_per_node: int = 8,
                 max_gpus: int = 1024) -> tuple[Layout, Memory] | None:
    """The layout of one replica on the fewest GPUs that fits (ties: the fewest stages, then the least memory
    per GPU: a pipeline re-reads the weights per micro-batch)."""
    gpus = 1
    while gpus <= max_gpus:
        fits = [(lay, mem) for lay in candidates(m, gpus, gpus_per_node, rows) if lay.replicas == 1
                for mem in [per_gpu(m, lay, rows, context, weights)] if mem.total_gib <= fraction * gpu_mem_gib]
        if fits:
            return min(fits, key=lambda f: (f[0].pp, f[1].total_gib))
        gpus *= 2
    return None


def check(m: ModelArgs, layout: str, group: int, stages: int, gpu_mem_gib: float, weights: str, rows: int,
          context: int, fraction: float = USABLE_FRACTION, gpus_per_node: int = 8) -> str | None:
    """None when one GPU of this layout holds its weights, `rows` rows' latent cache of `context` tokens and
    the workspace within fraction x gpu_mem_gib; else one message with the numbers and the smallest
    layout that would fit on these GPUs. Call it before loading (`layout`: "tp" | "dpa")."""
    if layout not in FAMILIES:
        return f"group layout {layout!r} is not one of {', '.join(FAMILIES)}"
    why = invalid(m, layout, group)
    if why:
        return f"{layout} layout: {why}"
    lay = Layout(group, stages, stages, 1, layout)
    mem = per_gpu(m, lay, rows, context, weights)
    avail = fraction * gpu_mem_gib
    if mem.total_gib <= avail:
        return None
    deq = f" ({', '.join(mem.dequantized)} dequantized to bf16: shards off the 128-blocks)" if mem.dequantized else ""
    msg = (f"layout {layout} G={group} P={stages} does not fit: per GPU weights {mem.weights_gib:.1f} GiB "
           f"({weights}){deq} + latent cache {mem.cache_gib:.1f} GiB ({mem.rows} rows x {context} tokens) + "
           f"workspace {mem.workspace_gib:.1f} GiB = {mem.total_gib:.1f} GiB > {fraction:g} x {gpu_mem_gib:g} GiB "
           f"= {avail:.1f} GiB")
    best = smallest_fit(m, gpu_mem_gib, weights, rows, context, fraction, gpus_per_node)
    if best is None:
        return msg + "; no layout of up to 1024 GPUs fits these rows and context"
    b, bm = best
    return (msg + f"; the smallest that fits {rows} rows x {context} tokens: --group-layout {b.family} "
            f"--group-size {b.group}" + (f" --pp {b.pp}" if b.pp > 1 else "") + f" ({b.gpus} GPUs, "
            f"{bm.total_gib:.1f} GiB per GPU; python -m spmd.plan for the full table)")
