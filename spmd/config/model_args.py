"""ModelArgs: the checkpoint's config.json as the engines read it, and the checks of a layout against it.

Checks raise `UsageError` with the numbers in the message; rank 0 runs them and the message reaches every
rank (spmd.parallel.errors.on_root). Pure Python: no torch, no mpi4py.
"""
from __future__ import annotations

import json
import math
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
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: bad JSON
            raise UsageError(f"cannot read {Path(ckpt) / 'config.json'}: {exc}") from None
        return cls.from_config(cfg)

    @classmethod
    def from_config(cls, c: dict) -> "ModelArgs":
        """The fields of a config.json dict, checked first (types, ranges, then relations): every problem
        is a UsageError naming config.json and the keys; nothing is silently replaced by a default."""
        if not isinstance(c, dict):
            raise UsageError(f"config.json is not a JSON object (it is {_kind(c)})")
        if c.get("model_type") != "deepseek_v3":
            raise UsageError(f"config model_type={c.get('model_type')!r}, expected 'deepseek_v3'")
        missing = [k for k in REQUIRED if k not in c]
        if missing:
            raise UsageError(f"config.json lacks field{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(repr(k) for k in missing)}")
        bad = _check_fields(c)
        if bad:
            raise UsageError(f"config.json is inconsistent: {'; '.join(bad)}")
        m = _model_args(cls, c)
        _check_consistent(m)
        return m

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "first_k_dense_replace", "num_attention_heads", "n_routed_experts", "n_shared_experts",
            "num_experts_per_tok", "routed_scaling_factor", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
            "v_head_dim", "max_position_embeddings", "eos_token_id")
# integers >= 1 (key: default when absent, None = required)
COUNTS = {"vocab_size": None, "hidden_size": None, "intermediate_size": None, "moe_intermediate_size": None,
          "num_hidden_layers": None, "num_attention_heads": None, "n_routed_experts": None,
          "n_shared_experts": None, "num_experts_per_tok": None, "kv_lora_rank": None, "qk_nope_head_dim": None,
          "qk_rope_head_dim": None, "v_head_dim": None, "max_position_embeddings": None,
          "n_group": 1, "topk_group": 1}
ROPE_KINDS = (None, "yarn", "default")  # the engines implement YaRN (factor 1: plain rope)


def _kind(v) -> str:
    """A JSON value's type in words, for messages."""
    names = {bool: "a boolean", str: "a string", list: "a list", dict: "an object", type(None): "null",
             float: "a number", int: "an integer"}
    return names.get(type(v), type(v).__name__)


def _show(v) -> str:
    """A config value as a message shows it, on one short line: numbers as they are, others with their kind."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v) if not isinstance(v, int) or v.bit_length() < 64 else "(a huge integer)"
    if isinstance(v, str):
        text = json.dumps(v)[1:-1]  # escaped: no line breaks in the one error line
        return (text if len(text) <= 40 else text[:37] + "...") + " (a string)"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"{json.dumps(v)} (a boolean)"
    return f"{'[...]' if isinstance(v, list) else '{...}' if isinstance(v, dict) else '?'} ({_kind(v)})"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_fields(c: dict) -> list[str]:
    """Each field the engines read has the right type and range: 'key=value, expected ...' per problem."""
    bad = []

    def need(key: str, v, ok: bool, what: str) -> None:
        if not ok:
            bad.append(f"{key}={_show(v)}, expected {what}")

    def integer(key: str, v, low: int, note: str = "") -> None:
        need(key, v, _is_int(v) and v >= low, f"an integer >= {low}{note}")

    def number(key: str, v, low: float, strict: bool = True) -> None:
        ok = _is_number(v) and (v > low if strict else v >= low)
        need(key, v, ok, f"a finite number {'>' if strict else '>='} {low}")

    for key, default in COUNTS.items():
        if key in c or default is None:
            integer(key, c[key], 1, "" if default is None else f" (absent: {default})")
    integer("first_k_dense_replace", c["first_k_dense_replace"], 0)
    if "num_nextn_predict_layers" in c:
        integer("num_nextn_predict_layers", c["num_nextn_predict_layers"], 0, " (absent: 0)")
    if c.get("q_lora_rank") is not None:
        integer("q_lora_rank", c["q_lora_rank"], 0, " or null (null, 0: no query compression)")
    number("routed_scaling_factor", c["routed_scaling_factor"], 0)
    if "rms_norm_eps" in c:
        number("rms_norm_eps", c["rms_norm_eps"], 0)
    if "rope_theta" in c:
        number("rope_theta", c["rope_theta"], 1)
    for key in ("rope_scaling", "rope_parameters"):
        rope = c.get(key)
        need(key, rope, rope is None or isinstance(rope, dict), "an object or null")
        if not isinstance(rope, dict):
            continue
        kind = rope.get("type", rope.get("rope_type"))
        need(f"{key}.type", kind, kind in ROPE_KINDS, " or ".join(map(str, ROPE_KINDS[1:])) +
             " (the engines implement YaRN only)")
        for sub, low, strict in (("factor", 0, True), ("beta_fast", 0, True), ("beta_slow", 0, True),
                                 ("mscale", 0, False), ("mscale_all_dim", 0, False), ("rope_theta", 1, True)):
            if sub in rope:
                number(f"{key}.{sub}", rope[sub], low, strict)
        if "original_max_position_embeddings" in rope:
            integer(f"{key}.original_max_position_embeddings", rope["original_max_position_embeddings"], 1)
    q = c.get("quantization_config")
    need("quantization_config", q, q is None or isinstance(q, dict), "an object or null")
    if isinstance(q, dict):
        method = q.get("quant_method")
        need("quantization_config.quant_method", method, method in (None, "fp8"),
             "fp8 (the only quantized format the loader reads)")
        block = q.get("weight_block_size", [FP8_BLOCK, FP8_BLOCK])
        need("quantization_config.weight_block_size", block, block == [FP8_BLOCK, FP8_BLOCK],
             f"[{FP8_BLOCK}, {FP8_BLOCK}]")
        need("quantization_config.scale_fmt", q.get("scale_fmt"), isinstance(q.get("scale_fmt"), (str, type(None))),
             "a string or null")
    vocab = c["vocab_size"] if _is_int(c["vocab_size"]) and c["vocab_size"] >= 1 else None
    within = f"a token id in 0..{vocab - 1} (vocab_size={vocab})" if vocab else "a token id"
    eos = c["eos_token_id"]
    ids = eos if isinstance(eos, list) and eos else [eos]
    need("eos_token_id", eos, all(_is_int(i) and (vocab is None or 0 <= i < vocab) for i in ids),
         within + " or a non-empty list of them")
    if c.get("bos_token_id") is not None:
        bos = c["bos_token_id"]
        need("bos_token_id", bos, _is_int(bos) and (vocab is None or 0 <= bos < vocab), within + " or null")
    return bad


def _check_consistent(m: ModelArgs) -> None:
    """Fields that contradict each other (each message names the config.json fields and values); the fields
    themselves passed _check_fields."""
    e, g = m.n_routed_experts, m.n_expert_groups
    per_group = e // g
    checks = [
        (m.n_activated_experts <= e, f"num_experts_per_tok={m.n_activated_experts} > n_routed_experts={e}"),
        (e % g == 0, f"n_routed_experts={e} not divisible by n_group={g}"),
        (m.n_limited_groups <= g, f"topk_group={m.n_limited_groups} > n_group={g}"),
        (e % g or per_group >= 2, f"n_routed_experts={e} / n_group={g} = {per_group} expert a group: the router "
                                  f"scores each group by its top 2 experts, it needs at least 2"),
        (e % g or m.n_limited_groups > g or m.n_activated_experts <= m.n_limited_groups * per_group,
         f"num_experts_per_tok={m.n_activated_experts} > topk_group={m.n_limited_groups} x {per_group} experts a "
         f"group (n_routed_experts={e} / n_group={g}): the router would pick experts of dropped groups"),
        (0 <= m.n_dense_layers <= m.n_layers,
         f"first_k_dense_replace={m.n_dense_layers} outside 0..num_hidden_layers={m.n_layers}"),
        (m.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim={m.qk_rope_head_dim} is odd"),
    ]
    bad = [msg for ok, msg in checks if not ok]
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
        n_activated_experts=c["num_experts_per_tok"], n_expert_groups=c.get("n_group", 1),
        n_limited_groups=c.get("topk_group", 1), route_scale=c["routed_scaling_factor"],
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
