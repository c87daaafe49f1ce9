"""Parameter counts per layer and the distinct routed experts a batch hits: arithmetic on ModelArgs that the
pipeline partition (spmd.parallel.pipeline) and the floor and performance model (traces/) share."""
from __future__ import annotations

from dataclasses import dataclass

from spmd.config.model_args import ModelArgs


@dataclass(frozen=True)
class LayerParams:
    """Parameter counts of one layer, split by how they are sharded."""

    replicated: float   # q_a_proj, kv_a_proj_with_mqa, gate (norms are negligible)
    sharded: float      # q_b/kv_b/o_proj, dense MLP or shared expert: split over G
    expert: float       # one routed expert (0 for dense layers)


def layer_params(m: ModelArgs, layer: int) -> LayerParams:
    q = m.dim * m.n_heads * m.qk_head_dim if not m.q_lora_rank else \
        m.q_lora_rank * m.n_heads * m.qk_head_dim
    q_a = m.dim * m.q_lora_rank if m.q_lora_rank else 0
    kv_a = m.dim * (m.kv_lora_rank + m.qk_rope_head_dim)
    kv_b = m.kv_lora_rank * m.n_heads * (m.qk_nope_head_dim + m.v_head_dim)
    o = m.n_heads * m.v_head_dim * m.dim
    if layer < m.n_dense_layers:
        return LayerParams(q_a + kv_a, q + kv_b + o + 3 * m.dim * m.inter_dim, 0.0)
    shared = 3 * m.dim * m.moe_inter_dim * m.n_shared_experts
    return LayerParams(q_a + kv_a + m.n_routed_experts * m.dim, q + kv_b + o + shared,
                       3 * m.dim * m.moe_inter_dim)


def distinct_experts(m: ModelArgs, tokens: int) -> float:
    """Expected number of distinct routed experts hit by `tokens` tokens (uniform routing)."""
    e, k = m.n_routed_experts, m.n_activated_experts
    return e * (1 - (1 - k / e) ** tokens)
