"""Our engine: DeepSeek-V3 sharded over the model group (tensor + expert parallel), MLA latent cache."""
from __future__ import annotations

import resource

import torch

from ..checkpoint import load
from ..model import Transformer
from ..world import agree

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class NativeEngine:
    """A `generate.Stepper`: builds the model on meta, loads this rank's slices, generates with a static cache."""

    def __init__(self, world, args, margs, timers):
        self.device = torch.device(world.device)
        self.max_new_tokens = args.max_new_tokens
        dtype = DTYPES[args.dtype]
        with torch.device("meta"):
            self.model = Transformer(margs, world.tp_group, timers, dtype=dtype)
        log = (lambda msg: print(msg, flush=True)) if world.rank == 0 else (lambda msg: None)
        peak0 = _rss_peak_bytes()
        stats = agree(world.group_comm, lambda: load(self.model, args.checkpoint, world.group_rank,
                                                     world.group_size, dtype, self.device, timers, log))
        moe_path = self.model.pack_experts()
        self.model.eval()
        self.info = {"moe_path": moe_path, "load_bytes_read": stats.bytes_read, "load_s": stats.seconds,
                     "load_tensors": stats.n_tensors, "param_bytes": param_bytes(self.model),
                     "expert_param_bytes": param_bytes(self.model, "mlp.experts."),
                     "rss_peak_before_load": peak0, "rss_peak_after_load": _rss_peak_bytes()}
        self.cache = self.key_mask = self.pos = None
        self.cur = 0

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        bsz, t = tokens.shape
        self.cache = self.model.new_cache(bsz, t + self.max_new_tokens)
        self.key_mask = torch.zeros(bsz, t + self.max_new_tokens, dtype=torch.bool, device=self.device)
        self.key_mask[:, :t] = mask
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T): real tokens at 0..len-1
        self.pos, self.cur = positions[:, -1:], t
        return self.model(tokens, positions, self.key_mask[:, :t], self.cache, start=0)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        self.key_mask[:, self.cur] = True
        self.pos = self.pos + 1
        logits = self.model(tokens[:, None], self.pos, self.key_mask[:, :self.cur + 1], self.cache, start=self.cur)
        self.cur += 1
        return logits

    def release(self) -> None:
        self.cache = self.key_mask = self.pos = None

    @torch.inference_mode()
    def score(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, V) logits at every position, from a throw-away cache of length T."""
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        cache = self.model.new_cache(*tokens.shape)
        return self.model(tokens, positions, mask, cache, start=0, all_positions=True)


def param_bytes(model: torch.nn.Module, contains: str = "") -> int:
    """Bytes of this rank's parameters and buffers whose name contains `contains`."""
    return sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if contains in n)
