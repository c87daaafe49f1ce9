"""HF-layout checkpoint loader: each rank reads only its slices (safetensors get_slice); FP8 dequantized,
or kept (``keep_fp8``) for modules that run FP8 kernels.

Contract with the model (spmd/model/transformer.py, spmd/parallel/layers.py):
- state_dict() names equal the checkpoint names; a rank's model holds only its local routed experts,
  named with their global index, so loading is by name with no renaming table.
- A module owning ``weight`` may set ``shard_dim``: 0 (rows split), 1 (columns split) or None (replicated).
  Rank r of G holds the contiguous slice ``local_slice(n, r, G)`` of that dim; other tensors are whole.
- The model is built on the meta device; ``load`` allocates it on ``device``, fills every parameter and
  persistent buffer, then calls ``model.init_buffers(device)`` when the model has it (rope tables).
- ``keep_fp8``: an FP8 weight of a module with ``fp8_ok = True`` whose slice starts on a 128-block edge
  stays float8_e4m3fn, and its module gets a non-persistent float32 buffer ``weight_scale_inv`` with
  the scale blocks of that slice (the checkpoint's name); every other FP8 weight is dequantized.
"""
from __future__ import annotations

import math
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open

from spmd.config import ModelArgs
from spmd.config import FP8_BLOCK
from spmd.kernels.fp8 import dequantize, scale_name
from spmd.parallel.layers import local_slice
from spmd.config import UsageError
from spmd.weights.validate import INDEX, layer_of, read_shard, read_weight_map

FP32_NAMES = ("e_score_correction_bias",)  # routing bias stays fp32 whatever the compute dtype
PLAIN_DTYPES = (torch.bfloat16, torch.float32)  # stored dtypes of unquantized tensors
SCALE_DTYPES = (torch.float32, torch.float8_e8m0fnu)  # ue8m0 scales may come as e8m0 tensors
# safetensors header dtype strings -> torch dtypes (unknown ones are kept as strings for the messages)
ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
             "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
             "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
             "BOOL": torch.bool}
EXPERT_RE = re.compile(r"^(.*\.experts\.)\d+\.")
MAX_LISTED = 5  # names shown in a warning or error listing


@dataclass(frozen=True)
class Entry:
    """One model tensor to fill: name, this rank's shape, split dim (None = whole), target dtype."""

    name: str
    local_shape: tuple[int, ...]
    shard_dim: int | None
    dtype: torch.dtype

    def full_shape(self, size: int) -> tuple[int, ...]:
        """Shape of the whole tensor in the checkpoint when split over `size` ranks."""
        shape = list(self.local_shape)
        if self.shard_dim is not None:
            shape[self.shard_dim] *= size
        return tuple(shape)


@dataclass(frozen=True)
class TensorInfo:
    """A checkpoint tensor as its shard header describes it."""

    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype | str


@dataclass(frozen=True)
class LoadStats:
    """bytes_read: slice bytes this rank read; n_tensors: model tensors filled; skipped: checkpoint tensors not read."""

    bytes_read: int
    seconds: float
    n_tensors: int
    skipped: int


def plan(model: torch.nn.Module, rank: int, size: int, dtype: torch.dtype | None = None) -> list[Entry]:
    """Entries for every parameter and persistent buffer of `model` (target dtype: `dtype`, else its own)."""
    if not 0 <= rank < size:
        raise UsageError(f"rank {rank} outside model group of size {size}")
    entries = []
    for name, t in model.state_dict(keep_vars=True).items():
        owner, _, leaf = name.rpartition(".")
        shard = getattr(model.get_submodule(owner), "shard_dim", None) if leaf == "weight" else None
        if shard is not None and not 0 <= shard < t.dim():
            raise UsageError(f"{name}: shard_dim={shard} but the tensor has {t.dim()} dims")
        target = t.dtype
        if t.dtype.is_floating_point:
            target = torch.float32 if leaf in FP32_NAMES else (dtype or t.dtype)
        entries.append(Entry(name, tuple(t.shape), shard, target))
    return entries


class CheckpointIndex:
    """The index of an HF checkpoint: name -> TensorInfo from every shard's header; opens shards on demand."""

    def __init__(self, root: Path, infos: dict[str, TensorInfo]):
        self.root = root
        self.infos = infos

    @classmethod
    def open(cls, root: str | Path) -> "CheckpointIndex":
        root = Path(root)
        weight_map = read_weight_map(root)  # relative shard names inside root (spmd.weights.validate)
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, []).append(name)
        infos = {}
        for file, names in sorted(by_file.items()):
            infos.update(_shard_infos(root, file, names))
        return cls(root, infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def __getitem__(self, name: str) -> TensorInfo:
        return self.infos[name]

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    def shard(self, file: str):
        """safe_open context for one shard file (tensors come out on the CPU)."""
        return safe_open(str(self.root / file), framework="pt", device="cpu")


def _shard_infos(root: Path, file: str, names: list[str]) -> dict[str, TensorInfo]:
    """TensorInfo of each indexed name of one shard file; errors name the file and the missing tensors."""
    header = read_shard(root, file, names)  # exists, holds them; dtype, shape, offsets checked
    return {n: TensorInfo(file, tuple(header[n]["shape"]), ST_DTYPES.get(header[n]["dtype"], header[n]["dtype"]))
            for n in names}


def _scale_grid(shape: tuple[int, ...]) -> tuple[int, int]:
    return math.ceil(shape[0] / FP8_BLOCK), math.ceil(shape[1] / FP8_BLOCK)


def _check_entry(index: CheckpointIndex, e: Entry, size: int, fp8: bool) -> None:
    """Shape and stored dtype of one entry (and of its FP8 scale); errors name the tensor and the numbers."""
    if e.name not in index:
        raise UsageError(f"{e.name}: not in the checkpoint ({index.root / INDEX}); the model expects "
                         f"shape {list(e.full_shape(size))}")
    info = index[e.name]
    if info.shape != e.full_shape(size):
        split = "" if e.shard_dim is None else f" = local {list(e.local_shape)} x {size} ranks along dim {e.shard_dim}"
        raise UsageError(f"{e.name}: checkpoint shape {list(info.shape)} ({info.file}), the model expects "
                         f"{list(e.full_shape(size))}{split}")
    if not e.dtype.is_floating_point:
        if info.dtype != e.dtype:
            raise UsageError(f"{e.name}: stored dtype {info.dtype} ({info.file}), the model expects {e.dtype}")
        return
    if e.dtype.itemsize == 1:
        raise UsageError(f"{e.name}: the model holds it as {e.dtype}; this loader fills bf16/fp16/fp32 only")
    if info.dtype == torch.float8_e4m3fn:
        _check_fp8(index, e.name, info, fp8)
    elif info.dtype not in PLAIN_DTYPES:
        raise UsageError(f"{e.name}: stored dtype {info.dtype} ({info.file}), expected "
                         f"{' or '.join(str(d) for d in PLAIN_DTYPES)}" + (" or float8_e4m3fn" if fp8 else ""))


def _check_fp8(index: CheckpointIndex, name: str, info: TensorInfo, fp8: bool) -> None:
    """An FP8 weight needs an fp8 config and a float32/e8m0 scale of shape [ceil(out/128), ceil(in/128)]."""
    if not fp8:
        raise UsageError(f"{name}: stored as float8_e4m3fn ({info.file}) but config.json has no fp8 "
                         f"quantization_config")
    if len(info.shape) != 2:
        raise UsageError(f"{name}: float8_e4m3fn tensor of shape {list(info.shape)}, expected a 2-D weight")
    scale = scale_name(name)
    if scale not in index:
        raise UsageError(f"{name}: float8_e4m3fn weight without {scale} in {INDEX}")
    s = index[scale]
    if s.shape != _scale_grid(info.shape) or s.dtype not in SCALE_DTYPES:
        raise UsageError(f"{scale}: shape {list(s.shape)} dtype {s.dtype} ({s.file}), expected "
                         f"{list(_scale_grid(info.shape))} float32 or float8_e8m0fnu for weight "
                         f"{list(info.shape)} in {FP8_BLOCK}x{FP8_BLOCK} blocks")


def _index(dim: int | None, sl: slice) -> tuple[slice, ...]:
    return () if dim is None else (slice(None),) * dim + (sl,)


def _read(f, name: str, idx: tuple[slice, ...], timers) -> tuple[torch.Tensor, int]:
    """One tensor (or its slice `idx`) from an open shard, timed as one io event -> (tensor, bytes)."""
    part = f.get_slice(name)
    shape = list(part.get_shape())
    for d, sl in enumerate(idx):
        shape[d] = len(range(*sl.indices(shape[d])))
    nbytes = math.prod(shape) * ST_DTYPES[part.get_dtype()].itemsize
    with timers.io("load.read", nbytes=nbytes) if timers is not None else nullcontext():
        t = part[idx] if idx else f.get_tensor(name)
    return t, nbytes


def _read_fp8(index: CheckpointIndex, f, e: Entry, sl: slice, device, timers) -> tuple[torch.Tensor, int]:
    """This rank's slice of an FP8 weight and the scale blocks covering it, dequantized (fp32 on device)."""
    q, s, row0, col0, nbytes = _read_fp8_parts(index, f, e, sl, timers)
    return dequantize(q.to(device), s, torch.float32, (row0, col0)), nbytes


def _read_fp8_parts(index: CheckpointIndex, f, e: Entry, sl: slice, timers):
    """(fp8 slice, its scale blocks, offset of the slice in the blocks (row0, col0), bytes read)."""
    q, nbytes = _read(f, e.name, _index(e.shard_dim, sl), timers)
    scale_idx, offset = (), 0  # not split: the whole scale
    if e.shard_dim is not None:
        blocks = slice(sl.start // FP8_BLOCK, math.ceil(sl.stop / FP8_BLOCK))
        scale_idx, offset = _index(e.shard_dim, blocks), sl.start - blocks.start * FP8_BLOCK
    scale = scale_name(e.name)
    if index[scale].file == index[e.name].file:
        s, sbytes = _read(f, scale, scale_idx, timers)
    else:  # a scale stored in another shard: open that one just for it
        with index.shard(index[scale].file) as g:
            s, sbytes = _read(g, scale, scale_idx, timers)
    row0, col0 = (offset, 0) if e.shard_dim == 0 else (0, offset)
    return q, s, row0, col0, nbytes + sbytes


def _slice(e: Entry, rank: int, size: int) -> slice:
    return local_slice(e.full_shape(size)[e.shard_dim], rank, size) if e.shard_dim is not None else slice(None)


def _block_aligned(sl: slice) -> bool:
    """Whether a slice starts and ends on 128-blocks: only such shards stay FP8; the others (e.g. the real
    config's dense MLP at G = 32: 576 rows a rank) are read with their covering blocks and dequantized."""
    return sl.start % FP8_BLOCK == 0 and (sl.stop - sl.start) % FP8_BLOCK == 0


def keep_fp8(model: torch.nn.Module, index: CheckpointIndex, entries: list[Entry], rank: int,
             size: int) -> list[Entry]:
    """Entries with the FP8 weights that stay FP8 retargeted to float8_e4m3fn; their modules (on meta)
    get the `weight_scale_inv` buffer of their slice's blocks (see the module docstring)."""
    out = []
    for e in entries:
        owner_name, _, leaf = e.name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if (leaf == "weight" and getattr(owner, "fp8_ok", False) and index[e.name].dtype == torch.float8_e4m3fn
                and (e.shard_dim is None or _block_aligned(_slice(e, rank, size)))):
            grid = tuple(math.ceil(n / FP8_BLOCK) for n in e.local_shape)
            owner.register_buffer("weight_scale_inv", torch.empty(grid, device=owner.weight.device),
                                  persistent=False)
            e = replace(e, dtype=torch.float8_e4m3fn)
        out.append(e)
    return out


def _retype(model: torch.nn.Module, entries: list[Entry]) -> None:
    """Give (meta) model tensors built in another dtype their target dtype, before any memory is allocated."""
    for e in entries:
        owner, _, leaf = e.name.rpartition(".")
        t = getattr(model.get_submodule(owner), leaf)
        if t.dtype != e.dtype:
            t.data = torch.empty(t.shape, dtype=e.dtype, device=t.device)


def _fill(model, index: CheckpointIndex, f, e: Entry, rank: int, size: int, device, timers) -> int:
    """Read entry `e` from shard `f` and copy it into the model tensor -> bytes read."""
    owner, _, leaf = e.name.rpartition(".")
    sl = _slice(e, rank, size)
    if e.dtype == torch.float8_e4m3fn:  # kept FP8 (see keep_fp8): the slice and its scale blocks as stored
        q, s, _, _, nbytes = _read_fp8_parts(index, f, e, sl, timers)
        module = model.get_submodule(owner)
        with torch.no_grad():
            module.weight.copy_(q)
            module.weight_scale_inv.copy_(s.float())
        return nbytes
    if index[e.name].dtype == torch.float8_e4m3fn:
        t, nbytes = _read_fp8(index, f, e, sl, device, timers)
    else:
        t, nbytes = _read(f, e.name, _index(e.shard_dim, sl), timers)
    with torch.no_grad():
        getattr(model.get_submodule(owner), leaf).copy_(t)
    return nbytes


def _skip_unused(index: CheckpointIndex, entries: list[Entry], n_layers: int, n_mtp: int, log, owns=None) -> int:
    """Log the MTP skip and any unexpected checkpoint tensors -> number of checkpoint tensors not read.
    MTP layers: n_layers .. n_layers + n_mtp - 1 (num_nextn_predict_layers); a layer past them is unexpected
    (spmd.weights.validate.check_layers rejects such a checkpoint before the run loads it).
    owns(name) False: another pipeline stage's tensor, skipped silently."""
    wanted = {e.name for e in entries} | {scale_name(e.name) for e in entries}
    expert_dirs = {m.group(1) for e in entries if (m := EXPERT_RE.match(e.name))}
    mtp, mtp_layers, unexpected, skipped = 0, set(), [], 0
    for name in index.names:
        if name in wanted:
            continue
        skipped += 1
        layer = layer_of(name)
        expert = EXPERT_RE.match(name)
        if layer is not None and n_layers <= layer < n_layers + n_mtp:
            mtp += 1
            mtp_layers.add(layer)
        elif owns is not None and not owns(name):
            continue
        elif not (expert and expert.group(1) in expert_dirs):  # another rank's routed expert: silently skipped
            unexpected.append(name)
    if mtp:
        log(f"checkpoint: skipping {mtp} tensors of the MTP module (layers {sorted(mtp_layers)}; "
            f"num_hidden_layers={n_layers}): multi-token prediction is not used")
    if unexpected:
        log(f"checkpoint: warning: {len(unexpected)} checkpoint tensors match no model tensor, e.g. "
            f"{', '.join(unexpected[:MAX_LISTED])}")
    return skipped


def load(model: torch.nn.Module, ckpt_dir: str | Path, rank: int, size: int, dtype: torch.dtype,
         device: torch.device | str, timers=None, log=print, fp8: bool = False) -> LoadStats:
    """Allocate `model` (built on meta) on `device` and fill it with this rank's slices of the checkpoint.

    Every check (names, shapes, dtypes, shard files) runs before any tensor is read. Floating tensors end up
    in `dtype` (e_score_correction_bias in float32); FP8 weights are dequantized with their block scales,
    or with `fp8` kept as FP8 where `keep_fp8` allows.
    Reads one tensor at a time, only this rank's slice; `timers` gets one "load.read" io event per read.
    """
    t0 = time.perf_counter()
    margs = ModelArgs.from_checkpoint(Path(ckpt_dir))
    index = CheckpointIndex.open(ckpt_dir)
    entries = plan(model, rank, size, dtype)
    for e in entries:
        _check_entry(index, e, size, margs.fp8)
    skipped = _skip_unused(index, entries, margs.n_layers, margs.n_mtp_layers, log, getattr(model, "owns", None))
    if fp8:
        entries = keep_fp8(model, index, entries, rank, size)
    _retype(model, entries)
    model.to_empty(device=device)
    by_file: dict[str, list[Entry]] = {}
    for e in entries:
        by_file.setdefault(index[e.name].file, []).append(e)
    nbytes, filled = 0, set()
    for file, group in sorted(by_file.items()):
        with index.shard(file) as f:
            for e in group:
                nbytes += _fill(model, index, f, e, rank, size, device, timers)
                filled.add(e.name)
    left = [e.name for e in entries if e.name not in filled]
    if left:
        raise UsageError(f"{len(left)} model tensors were not filled: {', '.join(left[:MAX_LISTED])}")
    if hasattr(model, "init_buffers"):
        model.init_buffers(device)
    return LoadStats(nbytes, time.perf_counter() - t0, len(entries), skipped)
