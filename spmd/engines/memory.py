"""What an engine holds on this rank, for its `info` (and the traces' run metadata)."""
from __future__ import annotations

from dataclasses import dataclass


def param_bytes(model, contains: str = "") -> int:
    """Bytes this rank holds of model's parameters and buffers whose name contains `contains` (of a
    sharded tensor, its local shard: DTensor.to_local, as transformers' tensor-parallel plans make)."""
    total = 0
    for name, t in model.state_dict().items():
        if contains in name:
            local = t.to_local() if hasattr(t, "to_local") else t
            total += local.numel() * local.element_size()
    return total


def layout_check(args, margs, gpu_mem_gib: float, gpus_per_node: int, fp8_kept: bool) -> str | None:
    """Before loading (CUDA): does one GPU of this layout hold its weights, one slot per rank (--slots if
    given) of --max-context tokens (4,096 if unset) and the workspace within --gpu-memory-fraction? None, or
    the planner's message with its numbers and the smallest layout that fits (spmd.plan.memory.check).
    fp32 compute is not counted by the planner (bf16/FP8 weights): not checked."""
    if args.dtype == "fp32":
        return None
    from spmd.plan.memory import check

    g, layout = args.group_size, args.group_layout
    rows = max(args.slots, 1) * (g if layout == "dpa" else 1)  # dpa: every rank its own slots
    return check(margs, layout, g, args.pp, gpu_mem_gib, "fp8" if fp8_kept else "bf16", rows,
                 args.max_context or 4096, args.gpu_memory_fraction, gpus_per_node)


MAX_SLOTS, MAX_PREFILL_TOKENS = 512, 16384      # past ~512 rows a step is compute-bound (docs/performance.md)
CPU_SLOTS, CPU_PREFILL_TOKENS = 16, 1024        # no device memory to size from: small, fixed
DECODE_LOGIT_COPIES = 8                         # (R, V) float32 buffers a step and its sampling hold, per slot


@dataclass(frozen=True)
class SlotPlan:
    """How many decode slots and prefill tokens a model group runs with, and the numbers behind it."""

    slots: int
    prefill_tokens: int
    max_len: int
    slot_bytes: int            # latent cache of one slot (max_len columns, this rank's layers)
    token_bytes: int           # activations one prefill token needs at the peak (estimate)
    available_bytes: int       # memory the run may still use after the weights (0: not sized, CPU)
    source: str                # "memory" | "options" | "cpu default"

    def line(self) -> str:
        gib = 2 ** 30
        if not self.available_bytes:
            return f"slots: {self.slots} decode slots x {self.max_len} columns, prefill {self.prefill_tokens} " \
                   f"tokens per forward ({self.source})"
        return (f"slots: {self.slots} decode slots x {self.max_len} columns ({self.slots * self.slot_bytes / gib:.1f} "
                f"GiB of latent cache), prefill {self.prefill_tokens} tokens per forward (~"
                f"{self.prefill_tokens * self.token_bytes / gib:.1f} GiB of activations); "
                f"{self.available_bytes / gib:.1f} GiB were free for them ({self.source})")


def slot_bytes(margs, n_layers: int, max_len: int, elem_bytes: int) -> int:
    """One slot's latent cache: max_len columns of kv_lora_rank + qk_rope_head_dim values per layer."""
    return max_len * n_layers * (margs.kv_lora_rank + margs.qk_rope_head_dim) * elem_bytes


def prefill_token_bytes(margs, n_local_heads: int, max_len: int, elem_bytes: int) -> int:
    """Peak activation bytes per prefill token (an estimate with the grouped MoE path's copies: per routed
    slot its input, gate/up, the weighted intermediate, the output and its slot-ordered copy, all in the
    activation dtype (spmd.model.moe.MoE._routed_grouped); plus the expanded keys and values of a naive
    attention over max_len columns, spread over the chunk)."""
    k, dim, inter = margs.n_activated_experts, margs.dim, margs.moe_inter_dim
    moe = k * (dim * 3 * elem_bytes + inter * 3 * elem_bytes)
    dense = margs.inter_dim * 3 * elem_bytes + dim * 8 * 4
    heads = n_local_heads * (margs.qk_head_dim * 2 + margs.v_head_dim * 2) * elem_bytes
    return max(moe, dense) + heads + margs.vocab_size * 4 // 64


def plan_slots(margs, *, n_layers: int, n_local_heads: int, elem_bytes: int, max_len: int, n_requests: int,
               free_bytes: int = 0, total_bytes: int = 0, fraction: float = 0.9, want_slots: int = 0,
               want_tokens: int = 0) -> SlotPlan:
    """Slots and prefill budget for the memory left: (fraction x total) minus what is in use now (the
    weights, the context) must hold slots x slot_bytes of cache, the prefill budget's activations and the
    decode steps' logits. Explicit --slots / --prefill-tokens win; without a device (total 0) they are
    CPU_SLOTS / CPU_PREFILL_TOKENS. The slots never exceed the requests there are."""
    per_slot = slot_bytes(margs, n_layers, max_len, elem_bytes)
    per_token = prefill_token_bytes(margs, n_local_heads, max_len, elem_bytes)
    cap = max(1, min(MAX_SLOTS, n_requests))
    if not total_bytes:
        slots, tokens = min(want_slots or CPU_SLOTS, cap), want_tokens or CPU_PREFILL_TOKENS
        return SlotPlan(slots, tokens, max_len, per_slot, per_token, 0, "options" if want_slots else "cpu default")
    available = max(0, free_bytes - int((1 - fraction) * total_bytes))
    tokens = want_tokens or int(min(MAX_PREFILL_TOKENS, max(128, available // 3 // per_token)) // 128 * 128)
    left = available - tokens * per_token
    per_decode_slot = per_slot + DECODE_LOGIT_COPIES * margs.vocab_size * 4
    slots = want_slots or max(0, min(cap, left // per_decode_slot))
    if slots < 1:
        raise MemoryError(f"no decode slot fits: {available / 2**30:.2f} GiB left within --gpu-memory-fraction "
                          f"{fraction} after the weights, a slot of {max_len} columns needs "
                          f"{per_decode_slot / 2**30:.3f} GiB and {tokens} prefill tokens "
                          f"{tokens * per_token / 2**30:.2f} GiB: raise the fraction, lower --prefill-tokens, "
                          f"--max-new-tokens or the longest prompt, or use a larger group")
    source = "options" if want_slots and want_tokens else "memory"
    return SlotPlan(int(slots), int(tokens), max_len, per_slot, per_token, available, source)
