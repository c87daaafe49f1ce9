"""Synthetic DeepSeek-V3.1 checkpoint writer in the exact Hugging Face layout.

Writes config.json, generation_config.json, model.safetensors.index.json, model-00001-of-00000K.safetensors
shards (5 and 6 digits, as the real repo; bf16, or FP8 e4m3 with float32 `weight_scale_inv` per 128x128 block,
UE8M0 power-of-two scales), tokenizer.json and tokenizer_config.json (byte-level BPE trained on inputs/corpus,
V3.1 chat template). With the full V3.1 config the fp8 layout has the real repo's 91991 tensors and bytes.

Contract:
- Deterministic: each tensor's generator is seeded from sha256(seed, tensor name), so one seed gives the same
  bytes on the same device type, and tensors can be generated one shard at a time (never the whole model).
- The bf16 and fp8 variants are one model: the same fp32 master, rounded to bf16 or block-quantized to FP8.
- Out-of-tokenizer ids: the embedding is vocab_size rows but the tokenizer has fewer tokens (as in the real
  model). `tokenizers` decode silently DROPS ids >= tokenizer size (no error, no placeholder), so such ids would
  vanish from output text. The lm_head rows past the tokenizer are therefore zero (logit exactly 0, never the
  greedy choice); code that detokenizes should still count or flag ids >= len(tokenizer) rather than trust decode.
- The write is atomic: everything goes to a temp dir next to OUT, which is renamed to OUT at the end.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from spmd.config import FP8_BLOCK

from spmd.kernels.fp8 import quantize_weight, scale_name

EMBED_STD = 1.0  # residual stream starts at unit scale; RMSNorm follows anyway
NORM_STD = 0.1  # norm weights ~ N(1, 0.1)
BIAS_STD = 0.02  # e_score_correction_bias ~ N(0, 0.02): small next to sigmoid scores in (0, 1)
LOGIT_STD = 4.0  # lm_head std = LOGIT_STD / sqrt(hidden): peaked enough that greedy follows the context
EOS_ROW_SCALE = 1.8  # lm_head EOS row x1.8: EOS is the greedy pick at ~1-2% of steps (reachable, rare)
TOKENIZER_SPARE = 64  # embedding rows kept past the tokenizer, like the real model (129280 > tokenizer)
DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "inputs" / "corpus"
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT, THINK, END_THINK = "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT, THINK, END_THINK)  # ids 0..6, bos=0 and eos=1 as in V3
# V3.1 non-thinking chat: BOS + system text + <｜User｜>q / <｜Assistant｜></think>a<｜end▁of▁sentence｜>
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for m in messages if m['role'] == 'system' %}{{ m['content'] }}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}" + USER + "{{ m['content'] }}"
    "{%- elif m['role'] == 'assistant' %}" + ASSISTANT + END_THINK + "{{ m['content'] }}" + EOS +
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}" + ASSISTANT + END_THINK + "{%- endif %}"
)
REQUIRED_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_nextn_predict_layers", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group",
    "topk_group", "first_k_dense_replace", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim", "num_attention_heads", "max_position_embeddings",
)


def fp8_quantization_config() -> dict:
    """The V3.1 `quantization_config` block (a fresh dict each call)."""
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
            "weight_block_size": [FP8_BLOCK, FP8_BLOCK], "scale_fmt": "ue8m0"}


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor. kind: linear (FP8 in fp8 variant) | matrix, head (bf16) | norm | bias (fp32)."""

    name: str
    shape: tuple[int, ...]
    kind: str
    std: float
    key: str = ""  # generator key when it differs from name (MTP embed/head = copies of the main ones)
    live_rows: int = 0  # head only: rows >= live_rows (ids past the tokenizer) are zero


def _linear(name: str, out: int, inp: int) -> TensorSpec:
    return TensorSpec(name + ".weight", (out, inp), "linear", inp ** -0.5)


def _norm(name: str, n: int) -> TensorSpec:
    return TensorSpec(name + ".weight", (n,), "norm", NORM_STD)


def _mlp(p: str, hidden: int, inter: int) -> list[TensorSpec]:
    return [_linear(p + "gate_proj", inter, hidden), _linear(p + "up_proj", inter, hidden),
            _linear(p + "down_proj", hidden, inter)]


def _attention(p: str, c: dict) -> list[TensorSpec]:
    hidden, heads, qk_head = c["hidden_size"], c["num_attention_heads"], c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    q_lora, kv_lora = c["q_lora_rank"], c["kv_lora_rank"]
    if q_lora:
        q = [_linear(p + "q_a_proj", q_lora, hidden), _norm(p + "q_a_layernorm", q_lora),
             _linear(p + "q_b_proj", heads * qk_head, q_lora)]
    else:
        q = [_linear(p + "q_proj", heads * qk_head, hidden)]
    return q + [
        _linear(p + "kv_a_proj_with_mqa", kv_lora + c["qk_rope_head_dim"], hidden),
        _norm(p + "kv_a_layernorm", kv_lora),
        _linear(p + "kv_b_proj", heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), kv_lora),
        _linear(p + "o_proj", hidden, heads * c["v_head_dim"]),
    ]


def _moe(p: str, c: dict) -> list[TensorSpec]:
    hidden, n_exp, inter = c["hidden_size"], c["n_routed_experts"], c["moe_intermediate_size"]
    specs = [TensorSpec(p + "gate.weight", (n_exp, hidden), "matrix", hidden ** -0.5),
             TensorSpec(p + "gate.e_score_correction_bias", (n_exp,), "bias", BIAS_STD)]
    specs += _mlp(p + "shared_experts.", hidden, inter * c["n_shared_experts"])
    for e in range(n_exp):
        specs += _mlp(f"{p}experts.{e}.", hidden, inter)
    return specs


def _is_moe(c: dict, layer: int) -> bool:
    return layer >= c["first_k_dense_replace"] and layer % c.get("moe_layer_freq", 1) == 0


def _decoder_layer(c: dict, layer: int) -> list[TensorSpec]:
    p, hidden = f"model.layers.{layer}.", c["hidden_size"]
    mlp = _moe(p + "mlp.", c) if _is_moe(c, layer) else _mlp(p + "mlp.", hidden, c["intermediate_size"])
    return _attention(p + "self_attn.", c) + mlp + [_norm(p + "input_layernorm", hidden),
                                                    _norm(p + "post_attention_layernorm", hidden)]


def _embed(name: str, c: dict) -> TensorSpec:
    return TensorSpec(name, (c["vocab_size"], c["hidden_size"]), "matrix", EMBED_STD, key="model.embed_tokens.weight")


def _head(name: str, c: dict, n_tokens: int) -> TensorSpec:
    std = LOGIT_STD * c["hidden_size"] ** -0.5
    return TensorSpec(name, (c["vocab_size"], c["hidden_size"]), "head", std, "lm_head.weight", n_tokens)


def _mtp_layer(c: dict, layer: int, n_tokens: int) -> list[TensorSpec]:
    """MTP module at index num_hidden_layers (+j), as the real repo stores it; loaders skip it."""
    p, hidden = f"model.layers.{layer}.", c["hidden_size"]
    return _decoder_layer(c, layer) + [
        _embed(p + "embed_tokens.weight", c), _norm(p + "enorm", hidden), _norm(p + "hnorm", hidden),
        TensorSpec(p + "eh_proj.weight", (hidden, 2 * hidden), "matrix", (2 * hidden) ** -0.5),
        _norm(p + "shared_head.norm", hidden), _head(p + "shared_head.head.weight", c, n_tokens),
    ]


def tensor_specs(c: dict, n_tokens: int) -> list[TensorSpec]:
    """Every tensor of the checkpoint in file order (embed, layers, norm, head, MTP)."""
    n_layers = c["num_hidden_layers"]
    specs = [_embed("model.embed_tokens.weight", c)]
    for layer in range(n_layers):
        specs += _decoder_layer(c, layer)
    specs += [_norm("model.norm", c["hidden_size"]), _head("lm_head.weight", c, n_tokens)]
    for j in range(c["num_nextn_predict_layers"]):
        specs += _mtp_layer(c, n_layers + j, n_tokens)
    return specs


def stored_entries(spec: TensorSpec, weights: str) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of what `spec` becomes on disk in the given variant."""
    if spec.kind == "bias":
        return [(spec.name, spec.shape, torch.float32)]
    if spec.kind == "linear" and weights == "fp8":
        out, inp = spec.shape
        grid = (math.ceil(out / FP8_BLOCK), math.ceil(inp / FP8_BLOCK))
        return [(spec.name, spec.shape, torch.float8_e4m3fn), (scale_name(spec.name), grid, torch.float32)]
    return [(spec.name, spec.shape, torch.bfloat16)]


def _nbytes(spec: TensorSpec, weights: str) -> int:
    return sum(math.prod(s) * d.itemsize for _, s, d in stored_entries(spec, weights))


def plan_shards(specs: list[TensorSpec], weights: str, shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy packing in file order; a weight and its scale share a shard, a layer may straddle two."""
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in specs:
        size = _nbytes(spec, weights)
        if shards[-1] and used + size > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += size
    return shards


def default_shard_bytes(total_bytes: int) -> int:
    """About the real repo's shard size (~4.3 GB), but small enough that a small model still gets 5+ shards."""
    return max(1 << 20, min(4300 * 10**6, total_bytes // 5))


def tensor_seed(seed: int, key: str) -> int:
    """Stable 63-bit generator seed for one tensor."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def master_weight(spec: TensorSpec, seed: int, device: str = "cpu") -> torch.Tensor:
    """The fp32 master tensor both variants are derived from."""
    gen = torch.Generator(device=device)
    gen.manual_seed(tensor_seed(seed, spec.key or spec.name))
    w = torch.empty(spec.shape, device=device, dtype=torch.float32).normal_(0.0, spec.std, generator=gen)
    if spec.kind == "norm":
        w.add_(1.0)
    if spec.kind == "head":
        w[spec.live_rows:] = 0.0
        w[1].mul_(EOS_ROW_SCALE)  # eos_token_id 1
    return w


def materialize(spec: TensorSpec, seed: int, weights: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """CPU tensors to store for `spec` in the given variant."""
    w = master_weight(spec, seed, device)
    if spec.kind == "bias":
        return {spec.name: w.cpu()}
    if spec.kind == "linear" and weights == "fp8":
        q, scale = quantize_weight(w)
        return {spec.name: q.cpu(), scale_name(spec.name): scale.cpu()}
    return {spec.name: w.to(torch.bfloat16).cpu()}


def train_tokenizer(corpus_dir: Path, vocab_size: int):
    """Byte-level BPE on the corpus (deterministic), specials at ids 0..6; at most vocab_size - 64 tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    files = sorted(str(f) for f in Path(corpus_dir).glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no *.txt tokenizer corpus in {corpus_dir}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - TOKENIZER_SPARE, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(files, trainer)
    # <think> and </think> are plain added tokens (kept by skip_special_tokens), as in V3.1
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK, END_THINK)])
    # the post-processor adds BOS; transformers 5.17 takes BOS from here, not from add_bos_token
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)])
    return tok


def tokenizer_config(c: dict) -> dict:
    return {
        "add_bos_token": True, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "unk_token": None, "clean_up_tokenization_spaces": False, "model_max_length": c["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
    }


def load_config(config_path: str | Path) -> dict:
    """Read and check a model config (HF config.json contents)."""
    c = json.loads(Path(config_path).read_text())
    missing = [k for k in REQUIRED_KEYS if k not in c]
    if missing:
        raise ValueError(f"{config_path}: missing config keys {missing}")
    if c["n_routed_experts"] % c["n_group"]:
        raise ValueError(f"n_routed_experts={c['n_routed_experts']} not divisible by n_group={c['n_group']}")
    if c["vocab_size"] < 512 + TOKENIZER_SPARE:
        raise ValueError(f"vocab_size={c['vocab_size']} too small for a byte-level tokenizer (min 576)")
    return c


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _write_metadata(tmp: Path, c: dict, weights: str, tok, shard_files: dict[str, str], total: int) -> None:
    config = {k: v for k, v in c.items() if k != "quantization_config"}
    config["torch_dtype"] = "bfloat16"
    if weights == "fp8":
        config["quantization_config"] = fp8_quantization_config()
    _write_json(tmp / "config.json", config)
    _write_json(tmp / "generation_config.json", {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1,
                                                 "do_sample": True, "temperature": 0.6, "top_p": 0.95})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(shard_files.items()))}
    _write_json(tmp / "model.safetensors.index.json", index)
    tok.save(str(tmp / "tokenizer.json"))
    _write_json(tmp / "tokenizer_config.json", tokenizer_config(c))


def _write_shards(plan: list[list[TensorSpec]], tmp: Path, seed: int, weights: str, device: str):
    """Generate and save one shard at a time -> ({tensor name: shard file}, total bytes, n params)."""
    shard_files, total, params = {}, 0, 0
    for i, group in enumerate(plan):
        fname = f"model-{i + 1:05d}-of-{len(plan):06d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for spec in group:
            tensors.update(materialize(spec, seed, weights, device))
            params += math.prod(spec.shape)
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        shard_files.update(dict.fromkeys(tensors, fname))
        del tensors
    return shard_files, total, params


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename tmp to out; an existing checkpoint at out is replaced only with overwrite."""
    for f in tmp.iterdir():  # mkdtemp and the safetensors writer leave owner-only modes
        f.chmod(0o644)
    tmp.chmod(0o755)
    if not out.exists():
        os.rename(tmp, out)
        return
    if not overwrite or not (out / "model.safetensors.index.json").exists():
        raise FileExistsError(f"{out} exists (pass overwrite=True / --overwrite to replace a checkpoint there)")
    trash = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.rename(out, trash)
    os.rename(tmp, out)
    shutil.rmtree(trash)


def write_checkpoint(config_path: str | Path, out_dir: str | Path, weights: str = "bf16", seed: int = 0,
                     shard_size_mb: float | None = None, device: str = "cpu", overwrite: bool = False,
                     corpus_dir: str | Path = DEFAULT_CORPUS) -> Path:
    """Write a synthetic checkpoint to out_dir (atomically) and return its path; prints a one-line summary."""
    if weights not in ("bf16", "fp8"):
        raise ValueError(f"weights={weights!r}, expected 'bf16' or 'fp8'")
    t0 = time.perf_counter()
    c = load_config(config_path)
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True / --overwrite to replace a checkpoint there)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tok = train_tokenizer(Path(corpus_dir), c["vocab_size"])
        specs = tensor_specs(c, tok.get_vocab_size())
        total_est = sum(_nbytes(s, weights) for s in specs)
        shard_bytes = int(shard_size_mb * 2**20) if shard_size_mb else default_shard_bytes(total_est)
        plan = plan_shards(specs, weights, shard_bytes)
        shard_files, total, params = _write_shards(plan, tmp, seed, weights, device)
        _write_metadata(tmp, c, weights, tok, shard_files, total)
        _replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"synth: {out} {weights} seed={seed}: {params / 1e6:.2f}M params, {total / 2**20:.1f} MiB, "
          f"{len(plan)} shards, tokenizer {tok.get_vocab_size()} tokens, {time.perf_counter() - t0:.1f}s")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m spmd.weights.synth", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="model config json (inputs/models/*.json)")
    ap.add_argument("--out", required=True, help="checkpoint directory to create")
    ap.add_argument("--weights", choices=("bf16", "fp8"), default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-size-mb", type=float, default=None, help="default: ~4.3 GB, or total/5 if smaller")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where random numbers are made")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    a = ap.parse_args(argv)
    write_checkpoint(a.config, a.out, a.weights, a.seed, a.shard_size_mb, a.device, a.overwrite)


if __name__ == "__main__":
    main()
