"""The FP8-activation recipe on the transformers reference: what `--fp8-prefill w8a8` computes, in fp32.

The native engine's FP8 x FP8 GEMMs (spmd.kernels.fp8) quantize each GEMM's input per row and 128-column
group to e4m3 (scale = max|x| / 448 in float32, rounded up to a power of two where the checkpoint's
``scale_fmt`` is ``ue8m0``) and multiply it with the FP8 weight. ``fake_quantize(model, ckpt)`` makes a
transformers ``DeepseekV3ForCausalLM`` do the same in its own precision: the input of every linear layer
whose weight is FP8 in the checkpoint and that the engine multiplies in FP8 (q_a, q_b, kv_a, o_proj, the
dense and shared MLPs; kv_b_proj where its scales are powers of two: the engine keeps it dequantized for
the absorbed decode path and, on CUDA, an exact FP8 copy for prefill's expansion of the latents
(spmd.parallel.layers.fp8_copy); not the router or lm_head, which are not FP8) is replaced by ``dequantize(quantize(x))`` (spmd.kernels.fp8's torch
arithmetic, the kernels' reference in tests/unit/test_fp8.py); the routed experts quantize each token once
for gate+up and the intermediate, scaled by its routing weight as spmd.model.moe applies it (before the
down projection, not after as transformers and DeepSeek's inference code do: the same product, but the
quantized intermediate differs where scales are powers of two), for down.

A baseline made so (``python -m validation.baseline --act-quant``, ``validation.matrix --act-quant``) judges
the w8a8 path by its recipe: what is left between it and a run is the run's bf16 compute and kernels, as
for weight-only FP8 against the plain baseline. Quantization applies to every call here, while the engine
switches by row count (``W8A8_ROWS``, ``W8A8_EXPERT_ROWS``): the matrix's teacher-forced scoring pass is one
prefill over every prompt and its completion, above both thresholds; decode steps of small batches stay
weight-only in the engine (the "exact prompts" column sees that difference, the thresholds do not).
"""
from __future__ import annotations

import json
import types
from pathlib import Path

import torch

from safetensors import safe_open

from spmd.kernels.fp8 import SCALE_SUFFIX, _quantize_torch, dequantize_act
from spmd.weights.fp8_cast import power_of_two

KV_B = "kv_b_proj"  # FP8 in the checkpoint; dequantized by the engine, with an FP8 copy where exact


def fake_quant(x: torch.Tensor, ue8m0: bool) -> torch.Tensor:
    """x rounded through e4m3 per row and 128 columns, back in x's dtype and shape."""
    shape = x.shape
    q, s = _quantize_torch(x.reshape(-1, shape[-1]), ue8m0)
    return dequantize_act(q, s).to(x.dtype).view(shape)


def fp8_modules(ckpt: Path) -> set[str]:
    """Module names (transformers' naming) whose weight the checkpoint stores as FP8 with block scales."""
    index = json.loads((Path(ckpt) / "model.safetensors.index.json").read_text())["weight_map"]
    return {n[:-len(SCALE_SUFFIX)] for n in index if n.endswith(SCALE_SUFFIX)}


def _power_of_two_scales(ckpt: Path, names: list[str]) -> bool:
    """Whether every block scale of these FP8 modules is a power of two (fp8_copy's exactness condition)."""
    index = json.loads((Path(ckpt) / "model.safetensors.index.json").read_text())["weight_map"]
    for name in names:
        key = name + SCALE_SUFFIX
        with safe_open(Path(ckpt) / index[key], "pt") as f:
            if not power_of_two(f.get_tensor(key)):
                return False
    return True


def _experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers' DeepseekV3Experts.forward with the engine's activation quantization."""
    out = torch.zeros_like(hidden_states)
    xq = fake_quant(hidden_states, self.act_quant_ue8m0)  # each token once, as the engine quantizes then gathers
    mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
    for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist():
        pos, tok = torch.where(mask[e])
        # the weights in x's dtype: bf16-held ones under validation.reference.compute_in_fp32
        gate, up = torch.nn.functional.linear(xq[tok], self.gate_up_proj[e].to(xq.dtype)).chunk(2, dim=-1)
        act = self.act_fn(gate) * up * top_k_weights[tok, pos, None].to(up.dtype)
        h = torch.nn.functional.linear(fake_quant(act, self.act_quant_ue8m0), self.down_proj[e].to(act.dtype))
        out.index_add_(0, tok, h.to(out.dtype))
    return out


def fake_quantize(model: torch.nn.Module, ckpt: Path, ue8m0: bool) -> list[str]:
    """Make `model` (transformers DeepseekV3ForCausalLM) quantize its FP8 GEMMs' inputs; returns the names
    of the modules changed (linear layers, then experts blocks)."""
    fp8 = fp8_modules(ckpt)
    if not _power_of_two_scales(ckpt, sorted(n for n in fp8 if n.endswith(KV_B))):
        fp8 = {n for n in fp8 if not n.endswith(KV_B)}  # the engine keeps no FP8 copy of kv_b_proj then
    changed = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name in fp8:
            mod.register_forward_pre_hook(lambda m, args: (fake_quant(args[0], ue8m0), *args[1:]))
            changed.append(name)
        elif type(mod).__name__ == "DeepseekV3Experts" and f"{name}.0.gate_proj" in fp8:
            mod.act_quant_ue8m0 = ue8m0
            mod.forward = types.MethodType(_experts_forward, mod)
            changed.append(name)
    return changed
