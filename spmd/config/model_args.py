"""ModelArgs: the checkpoint's config.json as the engines read it, and the checks of a layout against it.

Checks raise `UsageError` with the numbers in the message; rank 0 runs them and the message reaches every
rank (spmd.parallel.errors.on_root). Pure Python: no torch, no mpi4py.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from spmd.config.errors import FP8_BLOCK, UsageError


@dataclass(frozen=True)
class ModelArgs:
    """The DeepSeek-V3 config fields the engines use (names as in the model code, not the HF file)."""

    vocab_size: int
    dim: int
    inter_dim: int
    moe_inter_dim: int
    n_layers: int
    n_dense_layers: int
    n_heads: int
    n_routed_experts: int
    n_shared_experts: int
    n_activated_experts: int
    n_expert_groups: int
    n_limited_groups: int
    route_scale: float
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    max_seq_len: int
    rope_theta: float
    rope_factor: float
    original_seq_len: int
    beta_fast: float
    beta_slow: float
    mscale: float
    mscale_all_dim: float
    norm_eps: float
    bos_token_id: int
    eos_token_id: int
    n_mtp_layers: int
    fp8: bool
    scale_fmt: str | None
    raw: dict = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_checkpoint(cls, ckpt: Path) -> "ModelArgs":
        try:
            cfg = json.loads((Path(ckpt) / "config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(f"cannot read {Path(ckpt) / 'config.json'}: {exc}") from None
        return cls.from_config(cfg)

    @classmethod
    def from_config(cls, c: dict) -> "ModelArgs":
        if c.get("model_type") != "deepseek_v3":
            raise UsageError(f"config model_type={c.get('model_type')!r}, expected 'deepseek_v3'")
        try:
            m = _model_args(cls, c)
        except KeyError as exc:
            raise UsageError(f"config.json lacks field {exc}") from None
        _check_consistent(m)
        return m

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


def _check_consistent(m: ModelArgs) -> None:
    """Fields that contradict each other (each message names the config.json fields and values)."""
    sizes = {"vocab_size": m.vocab_size, "hidden_size": m.dim, "num_hidden_layers": m.n_layers,
             "num_attention_heads": m.n_heads, "n_routed_experts": m.n_routed_experts,
             "num_experts_per_tok": m.n_activated_experts, "kv_lora_rank": m.kv_lora_rank,
             "max_position_embeddings": m.max_seq_len}
    bad = [f"{k}={v}" for k, v in sizes.items() if not isinstance(v, int) or v < 1]
    checks = [
        (m.n_activated_experts <= m.n_routed_experts,
         f"num_experts_per_tok={m.n_activated_experts} > n_routed_experts={m.n_routed_experts}"),
        (m.n_routed_experts % m.n_expert_groups == 0,
         f"n_routed_experts={m.n_routed_experts} not divisible by n_group={m.n_expert_groups}"),
        (m.n_limited_groups <= m.n_expert_groups, f"topk_group={m.n_limited_groups} > n_group={m.n_expert_groups}"),
        (0 <= m.n_dense_layers <= m.n_layers,
         f"first_k_dense_replace={m.n_dense_layers} outside 0..num_hidden_layers={m.n_layers}"),
        (m.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim={m.qk_rope_head_dim} is odd"),
    ]
    bad += [msg for ok, msg in checks if not ok]
    if bad:
        raise UsageError(f"config.json is inconsistent: {'; '.join(bad)}")


def _model_args(cls, c: dict) -> ModelArgs:
    rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
    q = c.get("quantization_config") or {}
    eos = c["eos_token_id"]
    return cls(
        vocab_size=c["vocab_size"], dim=c["hidden_size"], inter_dim=c["intermediate_size"],
        moe_inter_dim=c["moe_intermediate_size"], n_layers=c["num_hidden_layers"],
        n_dense_layers=c["first_k_dense_replace"], n_heads=c["num_attention_heads"],
        n_routed_experts=c["n_routed_experts"], n_shared_experts=c["n_shared_experts"],
        n_activated_experts=c["num_experts_per_tok"], n_expert_groups=c.get("n_group") or 1,
        n_limited_groups=c.get("topk_group") or 1, route_scale=c["routed_scaling_factor"],
        q_lora_rank=c.get("q_lora_rank") or 0, kv_lora_rank=c["kv_lora_rank"],
        qk_nope_head_dim=c["qk_nope_head_dim"], qk_rope_head_dim=c["qk_rope_head_dim"],
        v_head_dim=c["v_head_dim"], max_seq_len=c["max_position_embeddings"],
        rope_theta=c.get("rope_theta", rope.get("rope_theta", 10000.0)),
        rope_factor=rope.get("factor", 1.0),
        original_seq_len=rope.get("original_max_position_embeddings", c["max_position_embeddings"]),
        beta_fast=rope.get("beta_fast", 32), beta_slow=rope.get("beta_slow", 1),
        mscale=rope.get("mscale", 1.0), mscale_all_dim=rope.get("mscale_all_dim", 0.0),
        norm_eps=c.get("rms_norm_eps", 1e-6), bos_token_id=c.get("bos_token_id", 0),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        n_mtp_layers=c.get("num_nextn_predict_layers", 0),
        fp8=q.get("quant_method") == "fp8", scale_fmt=q.get("scale_fmt"), raw=c)


def check_model_topology(m: ModelArgs, group_size: int, engine: str, pp: int = 1, world_size: int | None = None,
                         orchestrator: str = "inline", layout: str = "tp") -> None:
    """Divisibility of heads, experts, vocab and FP8 blocks by the model-group size; layers per stage.

    --engine hf with a group of G > 1 runs transformers' own tensor + expert parallel plan
    (DistributedConfig), which spans torch.distributed's whole world: one group, inline orchestration.
    layout "dpa" splits only the routed experts (whole experts per rank: no FP8 block can be cut)."""
    g = group_size
    if layout == "dpa":
        if m.n_routed_experts % g:
            raise UsageError(f"n_routed_experts={m.n_routed_experts} not divisible by group size {g} "
                             f"(--group-layout dpa splits the routed experts over the group)")
        return
    if pp > m.n_layers:
        raise UsageError(f"--pp {pp} stages for {m.n_layers} layers (num_hidden_layers): each stage needs "
                         f"at least one layer")
    if engine == "hf" and g != 1 and (world_size != g or orchestrator != "inline"):
        raise UsageError(f"--engine hf --group-size {g} shards with transformers' tensor/expert parallel plan, "
                         f"which spans the whole world: it needs one model group (world size {g}, got "
                         f"{world_size}) and --orchestrator inline (got {orchestrator}); "
                         f"for replicas use --group-size 1")
    checks = [("n_heads", m.n_heads), ("n_routed_experts", m.n_routed_experts), ("vocab_size", m.vocab_size),
              ("intermediate_size", m.inter_dim), ("shared expert intermediate",
                                                   m.moe_inter_dim * m.n_shared_experts)]
    for name, n in checks:
        if n % g:
            raise UsageError(f"{name}={n} not divisible by group size {g}")


def fp8_unaligned(m: ModelArgs, g: int) -> list[str]:
    """The FP8 weights whose per-rank slice at group size g (tp layout) does not start and end on a
    128-row/column scale block: the loader reads the blocks covering the slice and dequantizes it to the
    compute dtype (spmd.weights.checkpoint.keep_fp8); e.g. the real config's dense MLP and shared expert at
    G = 32. The others stay FP8."""
    shared = m.moe_inter_dim * m.n_shared_experts
    per_rank = {"q_b_proj/q_proj rows": m.n_heads // g * m.qk_head_dim,
                "kv_b_proj rows": m.n_heads // g * (m.qk_nope_head_dim + m.v_head_dim),
                "o_proj columns": m.n_heads // g * m.v_head_dim,
                "dense MLP rows": m.inter_dim // g, "shared expert rows": shared // g}
    return [name for name, n in per_rank.items() if g > 1 and n % FP8_BLOCK]
