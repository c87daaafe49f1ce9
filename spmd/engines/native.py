"""Our engine: DeepSeek-V3 sharded over the model group (tensor + expert parallel), MLA latent cache."""
from __future__ import annotations

import resource

import torch

from spmd.weights.checkpoint import load
from spmd.engines.memory import param_bytes
from spmd.engines.decode_graph import GraphDecoder
from spmd.model.transformer import Transformer, use_fused
from spmd.parallel.comm import Group, attach_timers
from spmd.parallel.pipeline import Pipeline, stage_layers
from spmd.parallel.errors import agree

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class NativeEngine:
    """A `generate.Stepper`: builds the model on meta, loads this rank's slices, generates with a static cache;
    `timers` are attached to the model and the pipeline once built (spmd.parallel.comm.attach_timers)."""

    def __init__(self, world, args, margs, timers):
        self.device, self.timers = torch.device(world.device), timers
        self.max_new_tokens = args.max_new_tokens
        dtype = DTYPES[args.dtype]
        pp = world.pp
        layers = stage_layers(margs, pp, world.tp_size)[world.stage] if pp > 1 else None
        with torch.device("meta"):
            self.model = Transformer(margs, Group(world.tp_group, "tp"), dtype=dtype, layers=layers,
                                     first=world.stage == 0, last=world.stage == pp - 1)
        self.pipe = Pipeline(world, getattr(args, "micro_batches", 0) or pp) if pp > 1 else None
        attach_timers(self.model, timers)
        if self.pipe is not None:
            attach_timers(self.pipe, timers)
        log = (lambda msg: print(msg, flush=True)) if world.model_rank == 0 else (lambda msg: None)
        fp8 = keep_fp8(getattr(args, "fp8_weights", "auto"), self.device, margs.fp8)
        peak0 = _rss_peak_bytes()
        stats = agree(world.group_comm, lambda: load(self.model, args.checkpoint, world.tp_rank,
                                                     world.tp_size, dtype, self.device, timers, log, fp8=fp8))
        moe_path = self.model.pack_experts()
        self.model.eval()
        self.info = {"moe_path": moe_path, "load_bytes_read": stats.bytes_read, "load_s": stats.seconds,
                     "load_tensors": stats.n_tensors, "param_bytes": param_bytes(self.model),
                     "expert_param_bytes": param_bytes(self.model, "mlp.experts."),
                     "rss_peak_before_load": peak0, "rss_peak_after_load": _rss_peak_bytes()}
        kept = sum(p.dtype == torch.float8_e4m3fn for p in self.model.parameters())
        self.info.update(fp8_weights="keep" if fp8 else ("dequant" if margs.fp8 else ""), fp8_kept_tensors=kept)
        self.decode_mode = "eager" if pp > 1 else decode_mode(getattr(args, "cuda_graph", "auto"), self.device,
                                                                moe_path)
        self.info.update(decode_mode=self.decode_mode, pp=pp,
                         stage_layers=[self.model.stage_layers.start, self.model.stage_layers.stop])
        self.graphs = None if self.decode_mode == "eager" else GraphDecoder(self.model, timers, self.device,
                                                                            self.decode_mode)
        use_fused(self.model, self.decode_mode != "eager")  # graph, and static: the same ops eagerly
        self.cache = self.key_mask = self.pos = self.static = None
        self.cur = 0

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        bsz, t = tokens.shape
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T): real tokens at 0..len-1
        self.cur = t
        if self.graphs is not None:  # static buffers (reused by later batches of this shape)
            st = self.static = self.graphs.state(bsz, t + self.max_new_tokens)
            st.key_mask.zero_()
            st.key_mask[:, :t] = mask
            st.pos.copy_(positions[:, -1:])
            return self.model(tokens, positions, st.key_mask[:, :t], st.cache, start=0)
        self.cache = self.model.new_cache(bsz, t + self.max_new_tokens)
        self.key_mask = torch.zeros(bsz, t + self.max_new_tokens, dtype=torch.bool, device=self.device)
        self.key_mask[:, :t] = mask
        self.pos = positions[:, -1:]
        return self._forward(tokens, positions, self.key_mask[:, :t], self.cache, start=0)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.graphs is not None:
            logits = self.graphs.step(self.static, tokens, self.cur)
            self.cur += 1
            return logits
        self.key_mask[:, self.cur] = True
        self.pos = self.pos + 1
        logits = self._forward(tokens[:, None], self.pos, self.key_mask[:, :self.cur + 1], self.cache, start=self.cur)
        self.cur += 1
        return logits

    def release(self) -> None:
        """End of a batch: drop its cache; resolve the timers' pending GPU events (one sync per batch)."""
        self.cache = self.key_mask = self.pos = self.static = None
        self.timers.flush()

    def close(self) -> None:
        """End of the run, before the process groups go: destroy the captured decode graphs."""
        self.release()
        if self.graphs is not None:
            self.graphs.close()
            self.graphs = None

    @torch.inference_mode()
    def score(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, V) logits at every position, from a throw-away cache of length T."""
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        cache = self.model.new_cache(*tokens.shape)
        return self._forward(tokens, positions, mask, cache, start=0, all_positions=True)

    def _forward(self, tokens, positions, key_mask, cache, start, all_positions: bool = False) -> torch.Tensor:
        """The model's forward, through the pipeline stages when there are several."""
        if self.pipe is None:
            return self.model(tokens, positions, key_mask, cache, start=start, all_positions=all_positions)
        return self.pipe.forward(self.model, tokens, positions, key_mask, cache, start, all_positions=all_positions)


def keep_fp8(flag: str, device: torch.device, ckpt_fp8: bool) -> bool:
    """--fp8-weights → whether the loader keeps FP8 weights (auto: on CUDA when Triton imports)."""
    if not ckpt_fp8 or flag == "dequant" or (flag == "auto" and device.type != "cuda"):
        return False  # decided without importing Triton (a large import)
    from spmd.kernels.fp8 import triton_available

    if flag == "keep" and not triton_available(device):
        raise ValueError(f"--fp8-weights keep: the FP8 kernels need Triton and a CUDA device (or "
                         f"TRITON_INTERPRET=1), device here: {device}")
    return flag == "keep" or (flag == "auto" and device.type == "cuda" and triton_available(device))


def decode_mode(flag: str, device: torch.device, moe_path: str) -> str:
    """--cuda-graph → "graph" | "static" | "eager" (auto: graphs on CUDA when the MoE needs no host sync)."""
    if flag == "static":
        return "static"
    if flag == "on" and moe_path == "loop":
        raise ValueError("--cuda-graph on: the MoE runs the per-expert loop here (torch._grouped_mm does not "
                         "run for this device/dtype), which reads counts back to the host and cannot be captured")
    graphable = device.type == "cuda" and moe_path != "loop"
    return "graph" if flag == "on" or (flag == "auto" and graphable) else "eager"
