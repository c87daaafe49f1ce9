"""The floor: bytes a decode step must move and FLOPs a prefill must do, per GPU of a model group.

Decode is bound by memory: every weight the step uses is read once (attention, dense and shared MLP,
the distinct routed experts the batch hits, the gate, the head), plus the latent KV cache. With FP8
weights, kv_b_proj still counts 2 bytes a weight: MLA's absorbed decode uses it as a bf16 matrix. Prefill is
bound by arithmetic: 2 FLOPs per multiply-add of every weight used per token, plus attention.
Expected distinct experts for B tokens choosing k of E uniformly: E * (1 - (1 - k/E)**B). Sharding
divides everything but the replicated parts (q_a_proj, kv_a_proj_with_mqa, gate, norms) by G.
Floor time = bytes / measured copy bandwidth (bytes read + written per second of a device copy),
FLOPs / measured matmul rate; measured/floor is the gap.
"""
from __future__ import annotations

from spmd.config import ModelArgs
from spmd.config.sizes import distinct_experts, layer_params

WEIGHT_BYTES = {"bf16": 2.0, "fp8": 1.0 + 4.0 / (128 * 128)}  # fp8: one fp32 scale per 128x128 block
ACT_BYTES = 2.0  # bf16 cache and activations


def layer_bytes(m: ModelArgs, layer: int, batch: int, context: int, group: int = 1, weights: str = "bf16") -> float:
    """Bytes one GPU of a group of `group` reads for one layer in one decode step of `batch` rows: its
    weights (routed experts: the distinct ones the rows hit) and its latent cache (not sharded: every
    rank of a group holds all of it)."""
    wb = WEIGHT_BYTES[weights]
    kv_b = m.kv_lora_rank * m.n_heads * (m.qk_nope_head_dim + m.v_head_dim)  # absorbed: kept in bf16
    p = layer_params(m, layer)
    experts = distinct_experts(m, batch) * p.expert / group
    cache = batch * context * (m.kv_lora_rank + m.qk_rope_head_dim) * ACT_BYTES
    return wb * (p.replicated + p.sharded / group + experts) + (ACT_BYTES - wb) * kv_b / group + cache


def head_bytes(m: ModelArgs, group: int = 1) -> float:
    """The lm_head's bytes per GPU (bf16 in the checkpoint, split over the group by vocabulary rows)."""
    return ACT_BYTES * m.vocab_size * m.dim / group


def decode_bytes(m: ModelArgs, batch: int, context: int, group: int = 1, weights: str = "bf16") -> float:
    """Bytes one GPU of a group of `group` must read in one decode step of `batch` rows."""
    return sum(layer_bytes(m, i, batch, context, group, weights) for i in range(m.n_layers)) + head_bytes(m, group)


def prefill_flops(m: ModelArgs, batch: int, prompt: int, group: int = 1) -> float:
    """FLOPs one GPU of a group does to prefill `batch` prompts of `prompt` tokens (last-token logits)."""
    tokens = batch * prompt
    flops = 0.0
    for layer in range(m.n_layers):
        p = layer_params(m, layer)
        active = p.sharded / group + p.replicated + m.n_activated_experts * p.expert / group
        flops += 2 * tokens * active
        # scores and values: q.k over (nope + rope), p.v over v_head, causal half, heads split over G
        flops += 2 * batch * prompt * prompt / 2 * m.n_heads / group * (m.qk_head_dim + m.v_head_dim)
    return flops + 2 * batch * m.vocab_size * m.dim / group


def floor_ms(nbytes: float, copy_gbps: float) -> float:
    """Milliseconds to move `nbytes` at a measured copy bandwidth (GB/s of bytes read + written)."""
    return nbytes / (copy_gbps * 1e9) * 1e3
