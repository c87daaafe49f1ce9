"""The reference: single-process transformers `DeepseekV3ForCausalLM.generate`, greedy, one prompt at a time."""
from __future__ import annotations

import torch

from spmd.engines.hf import load_hf

__all__ = ["load_hf", "hf_generate", "hf_last_logits"]


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
