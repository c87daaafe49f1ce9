"""The reference: single-process transformers `DeepseekV3ForCausalLM.generate`, greedy, one prompt at a time."""
from __future__ import annotations

import json
import types
from pathlib import Path

import torch
from safetensors import safe_open

from spmd.config import UsageError
from spmd.engines.hf import load_hf
from spmd.kernels.fp8 import SCALE_SUFFIX
from spmd.weights.fp8_cast import power_of_two

__all__ = ["load_hf", "load_hf_fp32_lean", "hf_generate", "hf_last_logits"]


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int) -> list[list[int]]:
    """Greedy completions (EOS included when reached), each prompt alone: no padding in the reference."""
    out = []
    for ids in prompts:
        x = torch.tensor([ids], device=model.device)
        y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                           do_sample=False, eos_token_id=eos_id, pad_token_id=eos_id)
        out.append(y[0, len(ids):].tolist())
    return out


@torch.inference_mode()
def hf_last_logits(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    """fp32 logits at the last prompt position, each prompt alone."""
    return [model(torch.tensor([ids], device=model.device)).logits[0, -1].float().cpu() for ids in prompts]


def bf16_exact(ckpt) -> str | None:
    """None where every weight of `ckpt` is exact in bf16 (bf16 tensors; FP8 ones whose block scales are all
    powers of two, as V3.1's UE8M0: q x 2^e); else why not. Only the router's correction bias may be float32:
    transformers keeps it in float32 whatever the model's dtype (_keep_in_fp32_modules_strict)."""
    ckpt = Path(ckpt)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    for file in sorted(set(index.values())):
        with safe_open(ckpt / file, "pt") as f:
            for name in f.keys():
                dtype = f.get_slice(name).get_dtype()
                if name.endswith(SCALE_SUFFIX):
                    if not power_of_two(f.get_tensor(name)):
                        return f"{name}: FP8 block scales that are not powers of two"
                elif dtype not in ("BF16", "F8_E4M3") and not name.endswith("e_score_correction_bias"):
                    return f"{name} is stored as {dtype}"
    return None


def _experts_fp32(self, hidden_states, top_k_index, top_k_weights):
    """transformers' DeepseekV3Experts.forward (its eager loop) with each expert's weights in x's dtype."""
    out = torch.zeros_like(hidden_states)
    mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
    for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist():
        pos, tok = torch.where(mask[e])
        x = hidden_states[tok]
        gate, up = torch.nn.functional.linear(x, self.gate_up_proj[e].to(x.dtype)).chunk(2, dim=-1)
        h = torch.nn.functional.linear(self.act_fn(gate) * up, self.down_proj[e].to(x.dtype))
        out.index_add_(0, tok, (h * top_k_weights[tok, pos, None]).to(out.dtype))
    return out


def _linear_fp32(self, x):
    bias = None if self.bias is None else self.bias.float()
    return torch.nn.functional.linear(x.float(), self.weight.float(), bias)


def compute_in_fp32(model) -> torch.nn.Module:
    """Make a transformers DeepseekV3ForCausalLM whose weights are held in bf16 compute in float32: the
    embedding's output is cast up, every linear layer multiplies float32 x by its weight cast up (one layer at
    a time), the experts likewise per expert; RMSNorm, rope, attention and the router then run in float32
    as in the float32 model. Where the weights are exact in bf16 (`bf16_exact`) these are the float32
    model's numbers with half its memory: the full-width slice's float32 reference fits an 80 GB GPU."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.forward = types.MethodType(_linear_fp32, mod)
        elif isinstance(mod, torch.nn.Embedding):
            mod.register_forward_hook(lambda m, args, out: out.float())
        elif type(mod).__name__ == "DeepseekV3Experts":
            mod.forward = types.MethodType(_experts_fp32, mod)
    return model


def load_hf_fp32_lean(ckpt, device: str = "cpu", log: bool = True) -> torch.nn.Module:
    """The float32 reference with bf16-held weights (compute_in_fp32); refuses a checkpoint whose weights
    are not exact in bf16."""
    why = bf16_exact(ckpt)
    if why:
        raise UsageError(f"{ckpt}: weights not exact in bf16 ({why}): the float32 reference needs them in float32")
    return compute_in_fp32(load_hf(ckpt, "bf16", device, log=log))
