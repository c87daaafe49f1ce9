"""The checkpoint, checked before any weight is read or any model is built: config.json (ModelArgs.from_config),
the index, every shard's safetensors header, and the layers its tensor names hold.

Headers only: 8 bytes and the JSON header of each shard (the real checkpoint's 163 shards of ~4.3 GB: some
tens of MB in all), no tensor data. Pure Python (json, struct): no torch. Every problem is a `UsageError`
naming the file and the key or tensor, so the program reports it as one `error:` line and exits 2 on every
rank. The loader (spmd.weights.checkpoint) reads the index and the headers through the same functions.

What a header must be (what safetensors itself demands, found now rather than when a shard is opened):
a JSON object of at most 100 MB; `__metadata__`, if there, an object of strings; every other entry an object
with `dtype` (a safetensors dtype string), `shape` (non-negative integers) and `data_offsets` [begin, end]
with end - begin = elements x item size; sorted by offset, the tensors tile the data area exactly (no
overlap, no gap, nothing past the file's end, no bytes after the last tensor).
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path

from spmd.config import ModelArgs, UsageError

INDEX = "model.safetensors.index.json"
MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header's length
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
            "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}  # bytes per element
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
MTP_PARTS = ("eh_proj", "enorm", "hnorm")  # tensors only an MTP layer has: model.layers.N.eh_proj.weight
MAX_LISTED = 5
MAX_DIMS = 64  # more dimensions than any model tensor has: a corrupt header


def short(name: str) -> str:
    """A name from a file as a message shows it: escaped (one line) and at most ~100 characters."""
    text = json.dumps(name)[1:-1] if isinstance(name, str) else repr(name)
    return text if len(text) <= 100 else text[:97] + "..."


def _is_int(v) -> bool:
    return type(v) is int  # not a bool


def shard_path(root: Path, file, name: str = "") -> Path:
    """root / file for a weight_map value: a relative path that stays inside the checkpoint directory (no
    absolute path, no `..`). Only the name is checked: a shard may be a symbolic link (the Hugging Face
    cache links snapshot files to its blobs). Nothing is read, so nothing about an outside file is told."""
    parts = file.split("/") if isinstance(file, str) else []
    why = None
    if not isinstance(file, str) or not file.strip() or "\x00" in file or len(file) > 4096:
        why = "is not a file name"
    elif file.startswith("/"):
        why = "is an absolute path"
    elif ".." in parts:
        why = "leads out of the checkpoint with '..'"
    elif parts[-1] in ("", "."):
        why = "is not a file name"
    if why:
        shown = f'"{short(file)}"' if isinstance(file, str) else "null" if file is None else \
            f"a JSON {'number' if isinstance(file, (int, float)) else type(file).__name__}"
        raise UsageError(f"{INDEX}: weight_map[\"{short(name)}\"] = {shown} {why}: shards must be files "
                         f"inside the checkpoint directory ({root})")
    return root / file


def read_weight_map(root: Path) -> dict[str, str]:
    """The index's weight_map (tensor name -> shard file), each file checked by `shard_path`."""
    path = Path(root) / INDEX
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: bad JSON
        raise UsageError(f"cannot read {path}: {exc!r}") from None
    if not isinstance(index, dict):
        raise UsageError(f"{path} is not a JSON object")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        what = "no weight_map" if weight_map is None else "an empty weight_map" if weight_map == {} else \
            "a weight_map that is not an object"
        raise UsageError(f"{path} has {what} (tensor name -> shard file)")
    seen: set[str] = set()
    for name, file in weight_map.items():
        if not (isinstance(file, str) and file in seen):  # 163 files for 91991 tensors: each checked once
            shard_path(Path(root), file, name)
            seen.add(file)
    return weight_map


def read_header(path: Path, file: str | None = None) -> dict[str, dict]:
    """The tensors of one safetensors file as its header describes them (`__metadata__` left out), checked
    against the format and the file's size (see the module docstring). `file`: the name messages use."""
    file = short(file or path.name)
    where = f"({path.parent})"
    try:
        size = os.stat(path).st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 0 < n <= min(size - 8, MAX_HEADER):
                raise UsageError(f"shard {file} is truncated or corrupt: {size} bytes, header length {n} does not "
                                 f"fit {where}")
            text = f.read(n)
    except OSError as exc:
        raise UsageError(f"cannot read shard {file}: {exc.strerror or exc} {where}") from None
    try:  # strict UTF-8 JSON, as safetensors reads it (no UTF-16, no NaN)
        header = json.loads(text.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UsageError(f"shard {file} is corrupt: unreadable header ({exc}) {where}") from None
    if not isinstance(header, dict):
        raise UsageError(f"shard {file} is corrupt: its header is not a JSON object {where}")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise UsageError(f"shard {file} is corrupt: __metadata__ is not an object of strings {where}")
    spans = sorted((_span(file, name, entry, where), name) for name, entry in header.items())
    data = size - 8 - n
    need, far = max(((stop, name) for (_, stop), name in spans), default=(0, None))
    if need > data:
        raise UsageError(f"shard {file} is truncated: its header needs {need} data bytes (tensor {short(far)}), the "
                         f"file has {data} ({size} bytes in all) {where}")
    end, last = 0, None
    for (begin, stop), name in spans:
        if begin != end:
            what = (f"overlaps {short(last)} (which ends at byte {end})" if begin < end else
                    f"leaves a gap of {begin - end} bytes after " + (short(last) if last else "the header"))
            raise UsageError(f"shard {file} is corrupt: tensor {short(name)} at data bytes {begin}..{stop} "
                             f"{what} {where}")
        end, last = stop, name
    if end < data:
        raise UsageError(f"shard {file} is corrupt: {data - end} bytes after the last tensor's data (its header "
                         f"covers {end} of {data} data bytes) {where}")
    return header


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _span(file: str, name: str, entry, where: str) -> tuple[int, int]:
    """(begin, end) of one header entry, after checking its dtype, shape and offsets."""
    def bad(what: str) -> UsageError:
        return UsageError(f"shard {file} is corrupt: tensor {short(name)} {what} {where}")

    if not isinstance(entry, dict):
        raise bad("is not a JSON object (dtype, shape, data_offsets)")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        shown = short(dtype) if isinstance(dtype, str) else "missing" if dtype is None else "not a string"
        raise bad(f"has dtype {shown}, expected one of {', '.join(ITEMSIZE)}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(d) and d >= 0 for d in shape):
        raise bad("has no shape (a list of non-negative integers)" if shape is None else
                  f"has a shape that is not a list of at most {MAX_DIMS} non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise bad("has no data_offsets [begin, end] (integers, 0 <= begin <= end)" if offsets is None else
                  "has data_offsets that are not [begin, end] integers with 0 <= begin <= end")
    begin, end = offsets
    need = math.prod(shape) * ITEMSIZE[dtype]
    if end - begin != need:
        dims = "x".join(map(str, shape)) if len(shape) <= 8 else f"{len(shape)}-dim"
        raise bad(f"has data_offsets [{begin}, {end}] ({end - begin} bytes), but shape {dims} of {dtype} "
                  f"takes {need}" if need < 10**30 else "has a shape of more than 10^30 bytes")
    return begin, end


def layer_of(name: str) -> int | None:
    """The layer index of a `model.layers.N.` tensor name, None for others (an absurd N: a huge number)."""
    m = LAYER_RE.match(name)
    if m is None:
        return None
    digits = m.group(1)
    return int(digits) if len(digits) <= 18 else 10**18


def check_layers(names, n_layers: int, n_mtp: int) -> None:
    """The layers in the tensor names against config.json: layers 0..num_hidden_layers-1 are decoder layers,
    all present and none an MTP layer; the next num_nextn_predict_layers are MTP layers (each holding the MTP
    tensors eh_proj/enorm/hnorm; they may be absent: nothing reads them); no other layer."""
    parts: dict[int, set[str]] = {}
    for name in names:
        layer = layer_of(name)
        if layer is not None:
            parts.setdefault(layer, set()).add(name[LAYER_RE.match(name).end():].split(".", 1)[0])
    mtp = (" and MTP layer" + (f" {n_layers}" if n_mtp == 1 else f"s {n_layers}..{n_layers + n_mtp - 1}")
           if n_mtp else "")
    counts = (f"config.json's num_hidden_layers={n_layers} and num_nextn_predict_layers={n_mtp} make decoder "
              f"layers 0..{n_layers - 1}{mtp}")
    missing = [i for i in range(n_layers) if i not in parts]
    if missing:
        raise UsageError(f"the checkpoint ({INDEX}) has no tensors of layer(s) {_listed(missing)}: {counts}")
    beyond = sorted(i for i in parts if i >= n_layers + n_mtp)
    if beyond:
        raise UsageError(f"the checkpoint ({INDEX}) has layer(s) {_listed(beyond)}, but {counts}: "
                         f"num_hidden_layers or num_nextn_predict_layers is wrong")
    mtp_below = [i for i in range(n_layers) if parts[i] & set(MTP_PARTS)]
    if mtp_below:
        raise UsageError(f"layer(s) {_listed(mtp_below)} of the checkpoint hold MTP tensors (eh_proj, enorm, "
                         f"hnorm), but {counts}: num_hidden_layers is too large")
    plain_mtp = [i for i in range(n_layers, n_layers + n_mtp) if i in parts and not parts[i] & set(MTP_PARTS)]
    if plain_mtp:
        raise UsageError(f"layer(s) {_listed(plain_mtp)} of the checkpoint are decoder layers (no eh_proj, enorm, "
                         f"hnorm tensors), but {counts}: num_hidden_layers is too small, they would be dropped")


def _listed(items: list[int]) -> str:
    return ", ".join(map(str, items[:MAX_LISTED])) + (f" (and {len(items) - MAX_LISTED} more)"
                                                      if len(items) > MAX_LISTED else "")


def check_shapes(headers: dict[str, dict], m: ModelArgs) -> None:
    """The embedding and the output head against vocab_size and hidden_size (a config from another model is
    found here, before a model of its sizes is built); the loader checks every tensor's shape later."""
    want = [m.vocab_size, m.dim]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        entry = headers.get(name)
        if entry is not None and entry["shape"] != want:
            raise UsageError(f"{name}: checkpoint shape {entry['shape']}, config.json's vocab_size={m.vocab_size} "
                             f"and hidden_size={m.dim} make {want}")


def read_shard(root: Path, file: str, names: list[str]) -> dict[str, dict]:
    """The checked header of one shard of the index (`read_header`), which must exist and hold `names`."""
    path = shard_path(root, file)
    try:
        exists = path.is_file()
    except OSError as exc:  # e.g. a name too long for the file system
        raise UsageError(f"cannot read shard {short(file)} listed in {INDEX}: {exc.strerror or exc} ({root})") from None
    if not exists:
        raise UsageError(f"shard {short(file)} listed in {INDEX} ({len(names)} tensors, e.g. {short(names[0])}) "
                         f"does not exist in {root}")
    header = read_header(path, file)
    absent = [n for n in names if n not in header]
    if absent:
        raise UsageError(f"{INDEX} maps {len(absent)} tensors to {short(file)}, which does not hold them: "
                         f"{', '.join(short(a) for a in absent[:MAX_LISTED])} ({root})")
    return header


def check_checkpoint(root: str | Path) -> tuple[ModelArgs, int]:
    """Every check above, config first -> (its ModelArgs, the bytes of its listed shards). Reads config.json,
    the index and each listed shard's header (never tensor data); raises UsageError at the first problem."""
    root = Path(root)
    margs = ModelArgs.from_checkpoint(root)
    weight_map = read_weight_map(root)
    check_layers(weight_map, margs.n_layers, margs.n_mtp_layers)  # from the names alone
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    headers: dict[str, dict] = {}
    nbytes = 0
    for file, names in sorted(by_file.items()):
        header = read_shard(root, file, names)
        headers.update((n, header[n]) for n in names)
        nbytes += shard_path(root, file).stat().st_size
    check_shapes(headers, margs)
    return margs, nbytes
