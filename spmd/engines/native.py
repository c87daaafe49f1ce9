"""Our engine: DeepSeek-V3 sharded over the model group (tensor + expert parallel), MLA latent cache."""
from __future__ import annotations

import resource

import torch

from spmd.config import env
from spmd.weights.checkpoint import load
from spmd.engines.memory import param_bytes
from spmd.engines.decode_graph import GraphDecoder
from spmd.engines.slots import SlotCache
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
        ep = Group(world.ep_group, "ep") if world.ep_size > 1 else None  # --group-layout dpa
        self.ep, self.ep_hosts = ep, world.ep_comm.allgather(world.hostname) if ep is not None else []
        with torch.device("meta"):
            self.model = Transformer(margs, Group(world.tp_group, "tp"), dtype=dtype, layers=layers,
                                     first=world.stage == 0, last=world.stage == pp - 1, ep=ep)
        self.pipe = Pipeline(world, getattr(args, "micro_batches", 0) or pp) if pp > 1 else None
        attach_timers(self.model, timers)
        if self.pipe is not None:
            attach_timers(self.pipe, timers)
        log = (lambda msg: print(msg, flush=True)) if world.model_rank == 0 else (lambda msg: None)
        fp8 = keep_fp8(getattr(args, "fp8_weights", "auto"), self.device, margs.fp8)
        if fp8:  # how the FP8 kernels run on this GPU: one setting for the process
            from spmd.kernels import fp8 as fp8_kernels
            fp8_kernels.configure(**fp8_mode(args, self.device, margs))
        peak0 = _rss_peak_bytes()
        stats = agree(world.group_comm, lambda: load(self.model, args.checkpoint, world.tp_rank,
                                                     world.tp_size, dtype, self.device, timers, log, fp8=fp8))
        moe_path = self.model.pack_experts()
        packed = self.model.pack_linears() if self.device.type == "cuda" else 0
        self.model.eval()
        self.info = {"moe_path": moe_path, "packed_linears": packed, "fp8_kv_b": self.model.fp8_kv_b(),
                     "load_bytes_read": stats.bytes_read,
                     "load_s": stats.seconds,
                     "load_tensors": stats.n_tensors, "param_bytes": param_bytes(self.model),
                     "expert_param_bytes": param_bytes(self.model, "mlp.experts."),
                     "rss_peak_before_load": peak0, "rss_peak_after_load": _rss_peak_bytes()}
        kept = sum(p.dtype == torch.float8_e4m3fn for p in self.model.parameters())
        self.info.update(fp8_weights="keep" if fp8 else ("dequant" if margs.fp8 else ""), fp8_kept_tensors=kept)
        if fp8:
            from spmd.kernels.fp8 import MODE
            self.info.update(fp8_unpack=MODE.weights, fp8_w8a8_rows=MODE.w8a8_rows,
                             fp8_w8a8_expert_rows=MODE.w8a8_expert_rows)
        # pipelines and the dpa layout's all-to-alls size their buffers on the host: eager steps
        self.decode_mode = "eager" if pp > 1 or world.ep_size > 1 else \
            decode_mode(getattr(args, "cuda_graph", "auto"), self.device, moe_path)
        self.info.update(decode_mode=self.decode_mode, pp=pp,
                         stage_layers=[self.model.stage_layers.start, self.model.stage_layers.stop])
        self.graphs = None if self.decode_mode == "eager" else GraphDecoder(self.model, timers, self.device,
                                                                            self.decode_mode)
        use_fused(self.model, self.decode_mode != "eager")  # graph, and static: the same ops eagerly
        self.model.varlen_decode = varlen_decode(getattr(args, "mla_decode", "torch"), self.device, margs)
        if self.model.varlen_decode and self.device.type == "cuda":  # compiled at load, not in a decode step
            from spmd.kernels.mla_decode import warm

            heads = next(m.n_local_heads for m in self.model.modules() if hasattr(m, "n_local_heads"))
            warm(self.device, self.model.dtype, heads, margs.kv_lora_rank, margs.qk_rope_head_dim)
        self.cache = self.key_mask = self.pos = self.static = None
        self.cur = 0
        self.slots: SlotCache | None = None

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

    # continuous batching (spmd.runtime.scheduler): decode slots, see spmd.engines.slots
    def open_slots(self, n_slots: int, max_len: int) -> None:
        """The slots' cache: n_slots rows of max_len columns (decode graphs share the graphs' pool)."""
        pool = self.graphs.pool if self.graphs is not None else None
        self.slots = SlotCache(self.model, n_slots, max_len, self.device, self.decode_mode, self.timers, pool)

    @torch.inference_mode()
    def prefill_slots(self, slots: list[int], seqs: list[list[int]]) -> torch.Tensor:
        """New requests' prompts (or first pieces) into their slots, columns 0..len-1 → (k, V) logits at each
        one's last token (one left-padded forward with a throw-away cache, copied into the slots' rows)."""
        width = max(len(q) for q in seqs)
        tokens = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.bool)
        for i, q in enumerate(seqs):
            tokens[i, width - len(q):], mask[i, width - len(q):] = torch.tensor(q), True
        tokens, mask = tokens.to(self.device), mask.to(self.device)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        pad_cache = self.model.new_cache(len(seqs), width)
        logits = self._forward(tokens, positions, mask, pad_cache, start=0)
        self.slots.take_prefill(slots, [len(q) for q in seqs], pad_cache, width)
        return logits

    @torch.inference_mode()
    def idle_forward(self) -> None:
        """One pad token through the model with a throw-away cache: a rank with nothing to prefill meets its
        expert-parallel group's all-to-alls (--group-layout dpa, spmd.runtime.scheduler)."""
        tokens = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self._forward(tokens, tokens, None, self.model.new_cache(1, 1), start=0)

    @torch.inference_mode()
    def extend_slot(self, slot: int, ids: list[int], start: int) -> torch.Tensor:
        """A later piece of a long prompt: ids at columns start.. of the slot's row → (1, V) logits."""
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        positions = start + torch.arange(len(ids), device=self.device)[None]
        view = self.slots.view(slice(slot, slot + 1), self.slots.max_len)
        return self._forward(tokens, positions, None, view, start=start, naive=True)

    @torch.inference_mode()
    def decode_slots(self, tokens: list[int], lens: list[int]) -> torch.Tensor:
        """One decode step of slots 0..len(tokens)-1: tokens[r] written at column lens[r] → (>= R, V) logits."""
        def forward(tok, pos, cache, start):
            return self._forward(tok, pos, None, cache, start=start)
        return self.slots.decode(tokens, lens, forward)

    def slot_rows(self, used: int) -> int:
        """Rows a decode step over slots 0..used-1 runs (its shape bucket)."""
        return self.slots.rows_for(used)

    @torch.inference_mode()
    def move_slot(self, src: int, dst: int, cols: int) -> None:
        """Move a request's first `cols` cache columns from slot src to slot dst."""
        self.slots.move(src, dst, cols)

    def last_shape(self) -> str:
        """The shape ("RxS") of the last decode step of the slots."""
        return self.slots.last if self.slots is not None else ""

    def decode_shapes(self) -> dict[str, int]:
        """Decode steps per (rows, columns) shape of the slots' step, as "RxS": count."""
        shapes = self.slots.shapes if self.slots is not None else {}
        return {f"{r}x{c}": n for (r, c), n in sorted(shapes.items())}

    def traffic(self) -> dict | None:
        """--group-layout dpa: this rank's all-to-all bytes per destination over the run, its group's hosts
        and the in-host / cross-host split (the trace's ``ep_traffic``; traces.report shows it)."""
        if self.ep is None:
            return None
        here = self.ep_hosts[self.ep.rank]
        same = [h == here for h in self.ep_hosts]
        sent = {k: list(v) for k, v in self.ep.sent.items()}
        total = [sum(col) for col in zip(*sent.values())] if sent else [0] * self.ep.size
        return {"group_rank": self.ep.rank, "hosts": self.ep_hosts, "bytes_to": sent,
                "in_host_bytes": sum(b for b, s in zip(total, same) if s),
                "cross_host_bytes": sum(b for b, s in zip(total, same) if not s)}

    def decode_gpu_ms(self) -> dict[str, float]:
        """Mean GPU ms of a replayed decode step of the slots per shape "RxS" ({} without graphs)."""
        return self.slots.gpu_ms() if self.slots is not None else {}

    def close_slots(self) -> None:
        if self.slots is not None:
            self.slots.close()
            self.slots = None
        self.timers.flush()

    def release(self) -> None:
        """End of a batch: drop its cache; resolve the timers' pending GPU events (one sync per batch)."""
        self.cache = self.key_mask = self.pos = self.static = None
        self.timers.flush()

    def close(self) -> None:
        """End of the run, before the process groups go: destroy the captured decode graphs."""
        self.release()
        self.close_slots()
        if self.graphs is not None:
            self.graphs.close()
            self.graphs = None

    @torch.inference_mode()
    def score(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, V) logits at every position, from a throw-away cache of length T."""
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        cache = self.model.new_cache(*tokens.shape)
        return self._forward(tokens, positions, mask, cache, start=0, all_positions=True)

    def _forward(self, tokens, positions, key_mask, cache, start, all_positions: bool = False,
                 naive: bool | None = None) -> torch.Tensor:
        """The model's forward, through the pipeline stages when there are several."""
        if self.pipe is None:
            return self.model(tokens, positions, key_mask, cache, start=start, naive=naive,
                              all_positions=all_positions)
        return self.pipe.forward(self.model, tokens, positions, key_mask, cache, start, naive,
                                 all_positions=all_positions)


def keep_fp8(flag: str, device: torch.device, ckpt_fp8: bool) -> bool:
    """--fp8-weights → whether the loader keeps FP8 weights (auto: on CUDA sm_80+ when Triton imports)."""
    if not ckpt_fp8 or flag == "dequant" or (flag == "auto" and device.type != "cuda"):
        return False  # decided without importing Triton (a large import)
    from spmd.kernels.fp8 import triton_available

    if flag == "keep" and not triton_available(device):
        raise ValueError(f"--fp8-weights keep: the FP8 kernels need Triton and a CUDA device (or "
                         f"TRITON_INTERPRET=1), device here: {device}")
    cc = _capability(device)
    if cc is not None and cc < (8, 0):  # bf16 tensor cores: sm_80+
        if flag == "keep":
            raise ValueError(f"--fp8-weights keep: the FP8 kernels need compute capability 8.0+ (A100, H100); "
                             f"{torch.cuda.get_device_name(device)} is {cc[0]}.{cc[1]}: use --fp8-weights dequant")
        return False
    return flag == "keep" or (flag == "auto" and device.type == "cuda" and triton_available(device))


# --fp8-prefill auto: FP8 x FP8 GEMMs from these row counts on (dense: rows; grouped experts: rows per
# local expert on average). Below them the weight-only kernels are as fast or faster: they read the same
# weight bytes, and quantizing the activations is one more kernel per GEMM. Measured on one H100
# (traces/results/fp8/NVIDIA_H100_80GB_HBM3-2026-12-06.md, `make gpu-fp8-bench`): dense, torch._scaled_mm
# beats the weight-only kernel from 128 rows on for every projection (not yet at 64); grouped, the
# FP8 x FP8 kernel beats it from 64 tokens (2 rows per expert) on.
W8A8_ROWS, W8A8_EXPERT_ROWS = 128, 2


def _capability(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def fp8_mode(args, device: torch.device, margs) -> dict:
    """--fp8-unpack and --fp8-prefill for this device → spmd.kernels.fp8.configure's settings.

    unpack auto: the GPU's e4m3 conversion on sm_89+ (Ada, Hopper), the byte decoding on sm_80-sm_88
    (Ampere: no FP8 type); prefill auto: FP8 x FP8 where the GPU has FP8 tensor cores (sm_89+) and the
    weights are unpacked in hardware. Off CUDA (Triton's interpreter) auto means e4m3 and w8a16."""
    unpack, prefill = getattr(args, "fp8_unpack", "auto"), getattr(args, "fp8_prefill", "auto")
    cc = _capability(device)
    fp8_cores = cc is None or cc >= (8, 9)
    name = torch.cuda.get_device_name(device) if cc is not None else str(device)
    if unpack == "hw" and not fp8_cores:
        raise ValueError(f"--fp8-unpack hw: {name} (compute capability {cc[0]}.{cc[1]}) has no FP8 type; "
                         f"use --fp8-unpack bytes (or auto)")
    weights = "bytes" if unpack == "bytes" or (unpack == "auto" and not fp8_cores) else "e4m3"
    if prefill == "w8a8" and (not fp8_cores or weights == "bytes"):
        raise ValueError(f"--fp8-prefill w8a8: needs FP8 tensor cores (compute capability 8.9+) and "
                         f"--fp8-unpack hw/auto; here {name}, unpack {weights}")
    a8 = prefill == "w8a8" or (prefill == "auto" and cc is not None and fp8_cores and weights == "e4m3")
    from spmd.kernels.fp8 import GROUPED_LAUNCHES, TMA_LOOPS

    grouped = env.choice("SPMD_FP8_GROUPED", ("auto", *GROUPED_LAUNCHES))
    if grouped == "auto":  # Hopper: the warp-specialized kernel (its wgmma: sm_90); the TMA unit: sm_90+
        grouped = "ws" if cc is not None and cc[0] == 9 else "tma" if cc is not None and cc >= (9, 0) else "tiles"
    group_m = env.read("SPMD_FP8_GROUP_M") or "8"
    if not group_m.isdigit() or int(group_m) < 1:
        raise ValueError(f"SPMD_FP8_GROUP_M={group_m!r}: a positive integer")
    ws_columns = env.choice("SPMD_FP8_WS_COLUMNS", ("128", "256"))
    tma_loop = env.choice("SPMD_FP8_TMA_LOOP", TMA_LOOPS)
    fused_quant = env.choice("SPMD_FP8_FUSED_QUANT", ("0", "1"))
    return dict(weights=weights, w8a8_rows=W8A8_ROWS if a8 else 0, w8a8_expert_rows=W8A8_EXPERT_ROWS if a8 else 0,
                ue8m0=margs.scale_fmt == "ue8m0", grouped=grouped, group_m=int(group_m), tma_loop=tma_loop,
                ws_columns=int(ws_columns),
                fused_quant=fused_quant == "1",
                dense="scaled_mm" if cc is not None and cc >= (9, 0) else "triton")  # block scales: sm_90 cuBLAS


def varlen_decode(flag: str, device: torch.device, margs) -> bool:
    """--mla-decode: continuous decode attention by spmd.kernels.mla_decode (Triton, CUDA or its
    interpreter) for varlen, and for auto on CUDA where it can run; varlen is refused where it cannot."""
    if flag == "torch":
        return False
    from spmd.kernels.fp8 import triton_available
    from spmd.kernels.mla_decode import fits

    can = triton_available(device) and fits(margs.n_heads, margs.kv_lora_rank, margs.qk_rope_head_dim)
    if flag == "auto":
        return can and device.type == "cuda"
    if not can:
        raise ValueError(f"--mla-decode varlen needs Triton on a CUDA device (or TRITON_INTERPRET=1) and "
                         f"kv_lora_rank, qk_rope_head_dim powers of two >= 16; here {device}, "
                         f"{margs.kv_lora_rank}, {margs.qk_rope_head_dim}")
    return True


def decode_mode(flag: str, device: torch.device, moe_path: str) -> str:
    """--cuda-graph → "graph" | "static" | "eager" (auto: graphs on CUDA when the MoE needs no host sync)."""
    if flag == "static":
        return "static"
    if flag == "on" and moe_path == "loop":
        raise ValueError("--cuda-graph on: the MoE runs the per-expert loop here (torch._grouped_mm does not "
                         "run for this device/dtype), which reads counts back to the host and cannot be captured")
    graphable = device.type == "cuda" and moe_path != "loop"
    return "graph" if flag == "on" or (flag == "auto" and graphable) else "eager"
