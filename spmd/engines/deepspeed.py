"""DeepSpeed engine: transformers' DeepseekV3ForCausalLM, sharded by DeepSpeed AutoTP over our model group,
with our expert-parallel MoE in place of every DeepseekV3MoE.

How the model gets onto the ranks without any rank holding a full copy (DeepSpeed 0.19.8, transformers 5):
1. transformers' model is built on the meta device; each MoE layer's `mlp` becomes our `spmd.model.moe.MoE`
   (gate replicated, shared expert split by columns/rows, only this rank's routed experts, one `moe.combine`
   all-reduce), built on meta too, with parameter names equal to the checkpoint's.
2. `deepspeed.init_inference(replace_with_kernel_inject=False)` runs AutoTP on the meta model. Its layer
   classes slice meta tensors into meta tensors (`TensorParallel_Layer.move` keeps meta as meta), and the
   engine ends with `to_empty()` when the model is on meta, so AutoTP needs no real weights. What it makes of
   DeepseekV3: q_b_proj, kv_b_proj, the dense MLP's gate/up_proj -> `LinearLayer` (weight rows split);
   o_proj, the dense MLP's down_proj -> `LinearAllreduce` (weight columns split, all-reduce of the output);
   lm_head -> `LmHeadLinearAllreduce` (columns split, input cut to the rank's columns, all-reduce of the
   logits); q_a_proj, kv_a_proj_with_mqa, norms and the embedding stay replicated. Our MoE holds no
   nn.Linear, so AutoTP leaves it alone.
3. `spmd.weights.checkpoint.load` then reads only this rank's slices by state_dict name: `LinearLayer` gets
   `shard_dim = 0`, the row-parallel layers `shard_dim = 1`; AutoTP's split must be the even contiguous one
   our loader reads (checked, else a startup error with the sizes).

Collectives, each named and timed in the trace: AutoTP's row-parallel layers are swapped for
`TracedRowParallel`, which holds the same sharded weight and does what their forward does (cut the input for
lm_head, matmul, all-reduce) with the all-reduce made through DeepSpeed's comm API under `timers.comm`:
`attn.o_proj.all_reduce` (every layer), `mlp.down.all_reduce` (dense layers), `moe.combine` (our MoE),
`head.all_reduce` (logits). The compute between two collectives is one `Segments` event.

DeepSpeed facts this relies on (found in its source):
- `tensor_parallel={"tp_group": ...}` alone is overwritten: without an `mpu` the engine builds its own group
  of ranks 0..tp_size-1, wrong for every replica but the first. An `mpu` whose model-parallel group is ours
  makes it use that group (and tp_size = its size).
- `deepspeed.init_distributed` on an initialized torch.distributed wraps the default group and skips its
  MPI discovery (`hostname -I`, port 29500). On CPU it also starts the shared-memory all-reduce op, which
  reduces over the WHOLE world whatever group it is given (and needs LOCAL_SIZE == world size): it is
  used only when the model group is the world on one host; otherwise DeepSpeed's `all_reduce(group=...)`.
  On CUDA `inference_all_reduce` is torch's all_reduce on the group.
- `init_inference` with tp_size > 1 broadcasts the RNG state over the world once: inside the
  `load.ds.init_inference` event (its only collective of its own).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import resource
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from spmd.weights.checkpoint import load
from spmd.model.moe import MoE
from spmd.parallel.comm import Group, attach_timers
from spmd.config import UsageError
from spmd.parallel.errors import agree
from spmd.engines.memory import param_bytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


class Segments:
    """The compute between two collectives as one leaf event: closed before each collective, reopened after."""

    def __init__(self, timers):
        self.timers, self._span = timers, None

    def open(self, name: str | None, layer: int = -1) -> None:
        self.close()
        if name is not None:
            self._span = self.timers.compute(name, layer=layer)
            self._span.__enter__()

    def close(self) -> None:
        if self._span is not None:
            span, self._span = self._span, None
            span.__exit__(None, None, None)


@dataclass(frozen=True)
class Next:
    """The compute segment that follows a collective: (name, layer); name None = none (end of forward)."""

    name: str | None
    layer: int = -1


def following(kind: str, layer: int, n_layers: int, n_dense: int) -> Next:
    """What runs after the collective ending `kind` ("attn" | "mlp" | "moe" | "head") of `layer`."""
    if kind == "attn":
        return Next("mlp" if layer < n_dense else "norm", layer)
    if kind in ("mlp", "moe"):
        return Next("attn", layer + 1) if layer + 1 < n_layers else Next("head")
    return Next(None)


class DSAllReduce:
    """DeepSpeed's all-reduce on the model group `tp`, timed as one comm event of group `tp.name`; the
    compute segment is cut around it."""

    def __init__(self, tp: Group, whole_world_one_host: bool, timers, segments: Segments):
        import deepspeed.comm as ds_comm

        self.tp, self.timers, self.segments = tp, timers, segments
        # the CPU shared-memory op ignores `group`: only right when the group is the world (on one host)
        self._reduce = ds_comm.inference_all_reduce if whole_world_one_host else ds_comm.all_reduce

    def __call__(self, y: torch.Tensor, name: str, layer: int, then: Next) -> torch.Tensor:
        self.segments.close()
        with self.timers.comm(name, y.numel() * y.element_size(), group=self.tp.name, layer=layer):
            self._reduce(y, group=self.tp.group)
        self.segments.open(then.name, then.layer)
        return y


class TracedRowParallel(nn.Module):
    """AutoTP's LinearAllreduce / LmHeadLinearAllreduce with the same weight and math, all-reduce named and timed."""

    shard_dim = 1

    def __init__(self, ds_layer, reduce: DSAllReduce, name: str, layer: int, then: Next, cut_input: bool):
        super().__init__()
        if ds_layer.bias is not None:
            raise UsageError(f"{name}: AutoTP layer with a bias; DeepSeek-V3 has none")
        self.weight = ds_layer.weight  # (out, in/G) as AutoTP cut it (meta until loaded)
        sizes, r = ds_layer._partition_sizes, ds_layer.tp_index
        self.cols = slice(sum(sizes[:r]), sum(sizes[:r + 1])) if cut_input else None  # lm_head: input columns
        self.reduce, self.name, self.layer, self.then = reduce, name, layer, then

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cols is not None:
            x = x[..., self.cols]  # (..., in/G): lm_head gets the full hidden state
        y = torch.matmul(x, self.weight.t())  # (..., out): this rank's partial sum
        return self.reduce(y, f"{self.name}.all_reduce", self.layer, self.then)


class TracedMoE(MoE):
    """Our expert-parallel MoE (it times itself once the engine attaches its timers); the surrounding
    compute segment is closed while it runs."""

    def __init__(self, layer: int, margs, tp: Group, dtype, segments: Segments, then: Next):
        super().__init__(layer, margs, tp, dtype)
        self.segments, self.then = segments, then

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.segments.close()
        y = super().forward(x)  # (B, T, dim), combined over the group
        self.segments.open(self.then.name, self.then.layer)
        return y


@dataclass(frozen=True)
class GroupUnit:
    """The `mpu` DeepSpeed's inference engine asks for: our model group as its model-parallel group."""

    group: object

    def get_model_parallel_group(self):
        return self.group

    def get_model_parallel_rank(self) -> int:
        import torch.distributed as dist
        return dist.get_rank(self.group)

    def get_model_parallel_world_size(self) -> int:
        import torch.distributed as dist
        return dist.get_world_size(self.group)


def meta_model(checkpoint, margs, tp: Group, dtype, segments: Segments):
    """transformers' model on meta with our MoE (TracedMoE, over the model group `tp`) in every MoE layer."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config.from_pretrained(checkpoint)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config).to(dtype)
        for i, block in enumerate(model.model.layers):
            if i >= margs.n_dense_layers:
                then = following("moe", i, margs.n_layers, margs.n_dense_layers)
                block.mlp = TracedMoE(i, margs, tp, dtype, segments, then)
    return model.eval()


def autotp(model, world, dtype, timers, log):
    """deepspeed.init_inference on our model group (AutoTP on the meta model); returns the InferenceEngine."""
    import deepspeed

    tp = {"tp_size": 1}
    if world.group_size > 1:
        tp = {"tp_size": world.group_size, "tp_group": world.tp_group, "mpu": GroupUnit(world.tp_group)}
    if world.model_comm.size > 1:  # its RNG broadcast over the world would otherwise count others' build time as compute
        with timers.wait("load.ds.barrier"):
            world.model_comm.Barrier()
    out = io.StringIO()
    with timers.compute("load.ds.init_inference"), contextlib.redirect_stdout(out):
        engine = deepspeed.init_inference(model, tensor_parallel=tp, dtype=dtype, replace_with_kernel_inject=False)
    for line in out.getvalue().splitlines():
        log(f"deepspeed: {line}")
    return engine


def trace_and_plan(model, margs, reduce: DSAllReduce, size: int) -> dict:
    """Swap AutoTP's row-parallel layers for TracedRowParallel, give its column layers shard_dim 0 -> counts."""
    from deepspeed.module_inject.layers import (LinearAllreduce, LinearLayer, LmHeadLinearAllreduce,
                                                TensorParallel_Layer)

    counts: dict[str, int] = {}
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, TensorParallel_Layer):
            continue
        counts[type(mod).__name__] = counts.get(type(mod).__name__, 0) + 1
        _check_even(name, mod, size)
        if isinstance(mod, LinearAllreduce):
            kind, trace_name, layer = _row_parallel_site(name, isinstance(mod, LmHeadLinearAllreduce))
            then = following(kind, layer, margs.n_layers, margs.n_dense_layers)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    TracedRowParallel(mod, reduce, trace_name, layer, then, isinstance(mod, LmHeadLinearAllreduce)))
        elif type(mod) is LinearLayer:
            mod.shard_dim = 0  # weight rows split (column parallel): what spmd.weights.checkpoint reads
        else:
            raise UsageError(f"{name}: AutoTP made a {type(mod).__name__}, which this engine does not load")
    return counts


def _row_parallel_site(name: str, is_head: bool) -> tuple[str, str, int]:
    """(kind, trace name, layer) of an AutoTP row-parallel layer, by its module name."""
    if is_head and name == "lm_head":
        return "head", "head", -1
    m = LAYER_RE.match(name)
    if m and name.endswith(".self_attn.o_proj"):
        return "attn", "attn.o_proj", int(m.group(1))
    if m and name.endswith(".mlp.down_proj"):
        return "mlp", "mlp.down", int(m.group(1))
    raise UsageError(f"{name}: unexpected AutoTP row-parallel layer")


def _check_even(name: str, mod, size: int) -> None:
    """Our loader reads even contiguous slices: AutoTP's split must be that one."""
    sizes = tuple(mod._partition_sizes)
    if len(sizes) != size or len(set(sizes)) != 1:
        raise UsageError(f"{name}: AutoTP split {sum(sizes)} into {list(sizes)} over {size} ranks; the "
                         f"loader needs equal parts (check num_key_value_heads and tp_grain_size=64)")


SHM_DIR = Path("/dev/shm")


def shm_buffer_name(rank: int, environ=os.environ) -> str:
    """The POSIX shared-memory name DeepSpeed 0.19's CPU all-reduce op gives this rank's buffer
    (csrc/cpu/comm/shm.cpp: ``deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}``)."""
    return (f"deepspeed_allreduce_buffer_{os.getuid()}_{environ.get('MASTER_ADDR', '')}_"
            f"{environ.get('MASTER_PORT', '')}_{rank}")


def unlink_shm_buffer(world) -> None:
    """DeepSpeed's CPU shm op maps one 67 MB /dev/shm buffer per rank and never unlinks it: every run
    leaked them (21 GB of RAM after a day of tests here). Once every rank has mapped every buffer
    (``init_distributed`` returns after that; the barrier makes it true on all ranks), this rank
    unlinks its own: the mappings stay valid and the memory goes back when the job ends, crash or not."""
    world.model_comm.Barrier()
    (SHM_DIR / shm_buffer_name(world.rank)).unlink(missing_ok=True)


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class DeepSpeedEngine:
    """A `generate.Stepper` over DeepSpeed's InferenceEngine (AutoTP + our MoE) with transformers' DynamicCache."""

    def __init__(self, world, args, margs, timers):
        import deepspeed

        if world.model_comm.size > 1:
            with timers.wait("load.ds.init_distributed"):  # wraps our default group; on CPU starts its shm op
                deepspeed.init_distributed(dist_backend=world.backend)
            unlink_shm_buffer(world)
        self.device = torch.device(world.device)
        self.segments = Segments(timers)
        dtype = DTYPES[args.dtype]
        log = (lambda msg: print(msg, flush=True)) if world.model_rank == 0 else (lambda msg: None)
        tp = Group(world.tp_group, "tp")
        model = meta_model(args.checkpoint, margs, tp, dtype, self.segments)
        self.ds = autotp(model, world, dtype, timers, log)
        one_host_world = world.group_size == world.model_comm.size == world.local_size
        reduce = DSAllReduce(tp, one_host_world, timers, self.segments)
        autotp_layers = trace_and_plan(self.ds.module, margs, reduce, world.group_size)
        attach_timers(self.ds.module, timers)  # our MoE's spans and its moe.combine
        peak0 = _rss_peak_bytes()
        stats = agree(world.group_comm, lambda: load(self.ds.module, args.checkpoint, world.group_rank,
                                                     world.group_size, dtype, self.device, timers, log))
        self._finish(self.ds.module)
        self.info = {"load_bytes_read": stats.bytes_read, "load_s": stats.seconds, "load_tensors": stats.n_tensors,
                     "param_bytes": param_bytes(self.ds.module),
                     "expert_param_bytes": param_bytes(self.ds.module, "mlp.experts."),
                     "rss_peak_before_load": peak0, "rss_peak_after_load": _rss_peak_bytes(),
                     "autotp_layers": autotp_layers, "ds_inference_all_reduce": one_host_world}
        self.cache = self.mask = self.pos = None

    def _finish(self, model) -> None:
        """After loading: rotary tables (float32, not in the checkpoint) and our MoE's packed experts."""
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

        with torch.device(self.device):
            model.model.rotary_emb = DeepseekV3RotaryEmbedding(config=model.config)
        for block in model.model.layers:
            if isinstance(block.mlp, MoE):
                block.mlp.pack()

    def _forward(self, **kw) -> torch.Tensor:
        """One forward through DeepSpeed's engine, timed as compute segments between the collectives."""
        self.segments.open("attn", 0)  # embedding, rope, mask and layer 0 up to its first collective
        try:
            out = self.ds(**kw)
        finally:
            self.segments.close()
        return out.logits

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.ds.module.config)
        self.mask = mask.long()
        pos = (self.mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): real tokens at 0..len-1, as HF generate
        self.pos = pos[:, -1:]
        logits = self._forward(input_ids=tokens, attention_mask=self.mask, position_ids=pos,
                               past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return logits[:, -1].float()

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        self.pos = self.pos + 1
        logits = self._forward(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.pos,
                               past_key_values=self.cache, use_cache=True)
        return logits[:, -1].float()

    def release(self) -> None:
        self.cache = self.mask = self.pos = None

    def close(self) -> None:
        """End of the run: nothing outlives a batch here but the DeepSpeed engine."""
        self.release()

    @torch.inference_mode()
    def score(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, V) logits at every position, without a cache."""
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return self._forward(input_ids=tokens, attention_mask=mask.long(), position_ids=pos, use_cache=False).float()
