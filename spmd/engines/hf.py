"""Reference engine: transformers' DeepseekV3ForCausalLM, the whole model on every rank (data parallel), or,
with --group-size G > 1 (one group), sharded by transformers' own plan: DistributedConfig(tp_plan="auto",
enable_expert_parallel=True), i.e. the dense and shared MLPs split by columns/rows and the routed experts
split over the ranks (MLA attention is not in transformers' plan: replicated). An anchor for the native
engine's tensor + expert parallelism, run on the same torch.distributed world."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch

from spmd.weights.fp8_cast import exact_partial_blocks, needs_cast
from spmd.engines.memory import param_bytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_hf(checkpoint: Path, dtype: str = "fp32", device: str = "cpu", log: bool = True, parallel: bool = False):
    """transformers' model on one device, eval mode; the MTP layer(s) after the last layer are skipped.

    parallel: sharded over torch.distributed's world (initialized) by transformers' tensor + expert
    parallel plan; it places each rank's shards on that rank's device itself (LOCAL_RANK)."""
    from transformers import DeepseekV3ForCausalLM

    cfg = json.loads((Path(checkpoint) / "config.json").read_text())
    first, n_mtp = cfg["num_hidden_layers"], cfg.get("num_nextn_predict_layers", 0)
    skip = [rf"model\.layers\.{i}\..*" for i in range(first, first + n_mtp)]
    if skip and log:
        print(f"hf: skipping MTP layer(s) model.layers.{first}..{first + n_mtp - 1} "
              f"(num_nextn_predict_layers={n_mtp})", file=sys.stderr)
    # transformers ignores only model.layers.61 (the real checkpoint's MTP layer) by itself
    attrs = {"_keys_to_ignore_on_load_unexpected": [*DeepseekV3ForCausalLM._keys_to_ignore_on_load_unexpected,
                                                     *skip]}
    if parallel:  # transformers picks the experts' implementation by reading the class's module source; its
        # expert-parallel plan needs the grouped one (the eager loop's one_hot fails on the plan's sentinel
        # for other ranks' experts), which it takes only for a class of the modeling module
        attrs["__module__"] = DeepseekV3ForCausalLM.__module__
    cls = type("DeepseekV3ForCausalLM", (DeepseekV3ForCausalLM,), attrs)
    # built on the CPU, then moved: transformers fuses the per-expert tensors while loading, and on the GPU
    # that needs a second copy of every MoE layer (the full-width slice does not fit an 80 GB card so)
    if parallel:
        from transformers import DistributedConfig

        place = {"distributed_config": DistributedConfig(tp_plan="auto", enable_expert_parallel=True)}
    else:
        place = {"device_map": "cpu"}
    misread = needs_cast(checkpoint)
    if misread and log:  # spmd/weights/fp8_cast.py
        print(f"hf: {len(misread)} FP8 weights are not whole 128-blocks (e.g. {misread[0]}), which "
              f"transformers' dequantizer refuses or misreads: dequantizing those per 128x128 block",
              file=sys.stderr)
    with exact_partial_blocks() if misread else contextlib.nullcontext():
        model = cls.from_pretrained(str(checkpoint), dtype=DTYPES[dtype], **place, **_dequantized(cfg))
    return (model if parallel else model.to(device)).eval()


def _dequantized(cfg: dict) -> dict:
    """FP8 checkpoints load dequantized on every machine (transformers keeps FP8 kernels when a GPU is present)."""
    q = cfg.get("quantization_config") or {}
    if q.get("quant_method") != "fp8":
        return {}
    from transformers import FineGrainedFP8Config

    return {"quantization_config": FineGrainedFP8Config(dequantize=True, weight_block_size=tuple(
        q.get("weight_block_size", (128, 128))))}


class HFEngine:
    """A `generate.Stepper` over transformers' model with its own DynamicCache."""

    def __init__(self, world, args, margs, timers):
        self.device = torch.device(world.device)
        self.timers = timers
        with timers.io("load.hf.from_pretrained"):
            self.model = load_hf(args.checkpoint, args.dtype, world.device, log=world.model_rank == 0,
                                 parallel=world.group_size > 1)
        self.info = {"hf_parallel": "tp+ep" if world.group_size > 1 else "replicated",
                     "param_bytes": param_bytes(self.model), "expert_param_bytes": param_bytes(self.model, "mlp.experts.")}
        self.cache = self.mask = self.pos = None

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        self.mask = mask.long()
        pos = (self.mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): real tokens at 0..len-1, as HF generate
        self.pos = pos[:, -1:]
        with self.timers.compute("hf.forward"):
            out = self.model(input_ids=tokens, attention_mask=self.mask, position_ids=pos,
                             past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        self.pos = self.pos + 1
        with self.timers.compute("hf.forward"):
            out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.pos,
                             past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1].float()

    def release(self) -> None:
        self.cache = self.mask = self.pos = None

    def close(self) -> None:
        """End of the run: nothing outlives a batch here but the model."""
        self.release()

    @torch.inference_mode()
    def score(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, V) logits at every position, without a cache."""
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        with self.timers.compute("hf.forward"):
            out = self.model(input_ids=tokens, attention_mask=mask.long(), position_ids=pos, use_cache=False)
        return out.logits.float()
