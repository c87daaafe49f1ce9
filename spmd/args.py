"""RunArgs (the command line) and ModelArgs (the checkpoint's config.json), with every check.

Checks raise `UsageError` with the numbers in the message; rank 0 runs them and the message
reaches every rank (see `world.on_root`).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

from .fp8 import FP8_BLOCK
from .profile import KINDS as PROFILE_KINDS, parse_steps
from .world import UsageError

ENGINES = ("hf", "native", "deepspeed")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print and exit on every rank; report once instead
        raise UsageError(message)


@dataclass(frozen=True)
class RunArgs:
    checkpoint: Path
    prompts: Path
    output: Path
    trace_dir: Path | None
    engine: str
    group_size: int
    max_new_tokens: int
    dtype: str
    device: str
    dispatch: str
    dispatch_size: int
    batch_size: int
    temperature: float
    top_p: float
    seed: int
    chat: bool
    local_debug: bool
    progress: bool
    profile: str = "none"
    profile_steps: tuple[int, int] = (2, 5)
    score: Path | None = None
    score_only: bool = False
    cuda_graph: str = "auto"
    fp8_weights: str = "auto"
    resume: bool = False
    pp: int = 1
    micro_batches: int = 0
    orchestrator: str = "inline"


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m mpi4py -m spmd", description="SPMD DeepSeek-V3 inference over MPI ranks.")
    p.add_argument("--checkpoint", type=Path, required=True, help="HF-layout checkpoint directory")
    p.add_argument("--prompts", type=Path, required=True, help=".txt (one per line) or .jsonl {id, prompt}")
    p.add_argument("--output", type=Path, required=True, help="output JSONL (written atomically by rank 0)")
    p.add_argument("--trace-dir", type=Path, default=None, help="per-rank HDF5 traces + merged.h5")
    p.add_argument("--engine", choices=ENGINES, default="native")
    p.add_argument("--group-size", type=int, default=1, help="tensor/expert-parallel ranks per model group "
                   "(per pipeline stage with --pp)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages per model group (native engine): a model "
                   "group is PP x GROUP_SIZE ranks")
    p.add_argument("--micro-batches", type=int, default=0,
                   help="micro-batches per pipeline step (default: --pp); rows are split evenly")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dispatch", choices=("static", "dynamic"), default=None,
                   help="static: prompts scattered by length at the start; dynamic: chunks of --dispatch-size "
                        "handed to model groups as they finish (default: static, dynamic with a dedicated "
                        "orchestrator)")
    p.add_argument("--orchestrator", choices=("inline", "dedicated"), default="inline",
                   help="inline: world rank 0 is also a model rank; dedicated: world rank 0 holds no model (no "
                        "GPU) and only reads, tokenizes, dispatches, decodes and writes: the world is 1 + "
                        "replicas x group ranks")
    p.add_argument("--dispatch-size", type=int, default=4, help="prompts per chunk (dynamic dispatch)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate batch")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (per prompt: seed + prompt index)")
    p.add_argument("--no-chat-template", dest="chat", action="store_false", help="tokenize prompts raw")
    p.add_argument("--local-debug", action="store_true", help="CPU, gloo, no DeepSpeed/NCCL setup")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--profile", choices=PROFILE_KINDS, default="none",
                   help="profiler window over decode steps (torch: chrome trace in TRACE_DIR/torch; nsys: "
                        "cudaProfilerStart/Stop for launch/rank.sh PROFILE=nsys)")
    p.add_argument("--score", type=Path, default=None, metavar="BASELINE",
                   help="teacher-forced scoring of a validation.baseline file's tokens (adds `score` to each row)")
    p.add_argument("--score-only", action="store_true", help="with --score: score, do not generate")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished run of OUTPUT.progress/ (same prompts, checkpoint and token-"
                        "deciding options; the layout may differ); without it that directory is replaced")
    p.add_argument("--cuda-graph", choices=("auto", "on", "off", "static"), default="auto",
                   help="native engine on CUDA: replay each decode step as one captured CUDA graph (auto: when "
                        "the MoE runs grouped GEMMs); traces then hold one event per step, not per layer. "
                        "static: the graph's static-shape step run eagerly, any device")
    p.add_argument("--fp8-weights", choices=("auto", "keep", "dequant"), default="auto",
                   help="native engine, FP8 checkpoint: keep FP8 weights on the GPU (Triton w8a16 kernels) or "
                        "dequantize them at load (auto: keep on CUDA when Triton is there)")
    p.add_argument("--profile-steps", type=_steps, default=(2, 5), metavar="A:B",
                   help="decode steps A..B inside the window (default 2:5)")
    return p


def _steps(text: str) -> tuple[int, int]:
    try:
        return parse_steps(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None = None) -> RunArgs:
    ns = parser().parse_args(argv)
    if ns.local_debug:
        ns.device = "cpu"
    explicit_static = ns.dispatch == "static"
    ns.dispatch = ns.dispatch or ("dynamic" if ns.orchestrator == "dedicated" else "static")
    if explicit_static and ns.orchestrator == "dedicated":
        raise UsageError("--orchestrator dedicated hands out prompts as groups finish: use --dispatch dynamic "
                         "(or leave --dispatch out)")
    args = RunArgs(**{f.name: getattr(ns, f.name) for f in fields(RunArgs)})
    check_run_args(args)
    return args


def check_run_args(a: RunArgs) -> None:
    """Checks that need no file system."""
    for name in ("group_size", "max_new_tokens", "dispatch_size", "batch_size", "pp"):
        if getattr(a, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}={getattr(a, name)} must be >= 1")
    if a.temperature < 0 or not 0 < a.top_p <= 1:
        raise UsageError(f"--temperature={a.temperature} must be >= 0 and --top-p={a.top_p} in (0, 1]")
    if a.local_debug and a.engine == "deepspeed":
        raise UsageError("--local-debug skips DeepSpeed setup: use --engine native or hf")
    if a.score_only and a.score is None:
        raise UsageError("--score-only needs --score BASELINE")
    if a.profile == "torch" and a.trace_dir is None:
        raise UsageError("--profile torch writes TRACE_DIR/torch/rank*.json: give --trace-dir")
    if a.cuda_graph == "on" and (a.device != "cuda" or a.engine != "native"):
        raise UsageError(f"--cuda-graph on needs --engine native --device cuda, got --engine {a.engine} "
                         f"--device {a.device}")
    if a.micro_batches < 0:
        raise UsageError(f"--micro-batches={a.micro_batches} must be >= 1 (0: as many as --pp)")
    if a.pp > 1 and a.engine != "native":
        raise UsageError(f"--pp {a.pp}: pipeline stages are built by --engine native only, got --engine {a.engine}")
    if a.pp > 1 and a.cuda_graph in ("on", "static"):
        raise UsageError(f"--pp {a.pp} runs eager steps (a stage waits on its neighbours between micro-batches): "
                         f"--cuda-graph {a.cuda_graph} is not available with pipeline stages")
    if a.profile == "nsys" and a.device != "cuda":
        raise UsageError(f"--profile nsys opens the window with cudaProfilerStart: needs --device cuda, "
                         f"got --device {a.device}")


def check_paths(a: RunArgs) -> None:
    """Checks on the file system (rank 0 only)."""
    if not a.checkpoint.is_dir():
        raise UsageError(f"checkpoint directory {a.checkpoint} does not exist")
    for name in ("config.json", "model.safetensors.index.json"):
        if not (a.checkpoint / name).is_file():
            raise UsageError(f"checkpoint {a.checkpoint} has no {name}")
    if not a.prompts.is_file():
        raise UsageError(f"prompt file {a.prompts} does not exist")
    if a.score is not None and not a.score.is_file():
        raise UsageError(f"baseline file {a.score} (--score) does not exist")
    out_dir = a.output.parent
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"output directory {out_dir} is not a directory")
    try:  # found now, not after an hour of generation (root passes permission checks: really write)
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as exc:
        raise UsageError(f"output directory {out_dir} is not writable: {exc.strerror or exc}") from None


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
                         orchestrator: str = "inline") -> None:
    """Divisibility of heads, experts, vocab and FP8 blocks by the model-group size; layers per stage.

    --engine hf with a group of G > 1 runs transformers' own tensor + expert parallel plan
    (DistributedConfig), which spans torch.distributed's whole world: one group, inline orchestration."""
    g = group_size
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
    if m.fp8:
        _check_fp8_blocks(m, g)


def _check_fp8_blocks(m: ModelArgs, g: int) -> None:
    """Each rank's slice of an FP8 weight must start and end on a 128-row/column block."""
    shared = m.moe_inter_dim * m.n_shared_experts
    per_rank = {"q_b_proj/q_proj rows": m.n_heads // g * m.qk_head_dim,
                "kv_b_proj rows": m.n_heads // g * (m.qk_nope_head_dim + m.v_head_dim),
                "o_proj columns": m.n_heads // g * m.v_head_dim,
                "dense MLP rows": m.inter_dim // g, "shared expert rows": shared // g}
    for name, n in per_rank.items():
        if g > 1 and n % FP8_BLOCK:
            raise UsageError(f"FP8 {name} per rank = {n} at group size {g} is not a multiple of the "
                             f"{FP8_BLOCK}-wide scale block")
