"""Checkpoint validation before any weight is read (spmd.weights.validate, ModelArgs.from_config): config.json,
the index, every shard header and the layer count, each broken class a UsageError naming the file and key or
tensor; the tiny checkpoints pass. Property tests (hypothesis): generated headers, configs and weight maps give
a result or a UsageError, never another exception, and a header the check accepts opens in safetensors."""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from spmd.config import ModelArgs, UsageError
from spmd.weights import checkpoint as ck
from spmd.weights import validate as v
from test_checkpoint import copy_checkpoint  # config, index and tokenizer copied, shards linked

ROOT = Path(__file__).resolve().parents[2]
TINY = json.loads((ROOT / "inputs/models/tiny.json").read_text())
EXTRA = "extra.safetensors"




def write_shard(path: Path, header, data: int | bytes = 0, raw: bytes | None = None) -> None:
    """A safetensors file by hand: 8-byte length, the JSON header (or `raw` bytes), then the data bytes."""
    text = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + (bytes(data) if isinstance(data, int) else data))


def edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    path.write_text(json.dumps(edit(obj) or obj))


@pytest.fixture
def ckpt(tmp_path, tiny_bf16) -> Path:
    """A copy of the tiny bf16 checkpoint with one more shard (extra.safetensors: tensor `extra`, 2 F32)."""
    out = copy_checkpoint(tiny_bf16, tmp_path / "ck")
    write_shard(out / EXTRA, {"extra": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 8)
    edit_json(out / v.INDEX, lambda i: i["weight_map"].update(extra=EXTRA))
    return out


def expect(ckpt: Path, *words: str) -> str:
    with pytest.raises(UsageError) as err:
        v.check_checkpoint(ckpt)
    msg = str(err.value)
    assert all(w in msg for w in words), msg
    assert "\n" not in msg
    return msg


def test_tiny_checkpoints_pass(tiny_bf16, tiny_fp8, noqlora_bf16, ckpt):
    for c in (tiny_bf16, tiny_fp8, noqlora_bf16, ckpt):
        margs, nbytes = v.check_checkpoint(c)
        assert margs == ModelArgs.from_checkpoint(c)
        assert nbytes == sum(f.stat().st_size for f in Path(c).glob("*.safetensors"))  # the load deadline's bytes
    for name in ("tiny", "tiny-noqlora", "slice", "v3.1-671b"):
        ModelArgs.from_config(json.loads((ROOT / "inputs/models" / f"{name}.json").read_text()))


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header,data,words", [
    ([F32], 8, ["header is not a JSON object"]),
    ({"extra": [1, 2]}, 8, ["tensor extra is not a JSON object"]),
    ({"extra": {"dtype": "F32", "data_offsets": [0, 8]}}, 8, ["tensor extra has no shape"]),
    ({"extra": {**F32, "shape": ["2"]}}, 8, ["extra has a shape that is not"]),
    ({"extra": {**F32, "shape": [True, 2]}}, 8, ["extra has a shape that is not"]),
    ({"extra": {**F32, "dtype": "F17"}}, 8, ["extra has dtype F17"]),
    ({"extra": {"shape": [2], "data_offsets": [0, 8]}}, 8, ["extra has dtype missing"]),
    ({"extra": {**F32, "data_offsets": [0]}}, 8, ["extra has data_offsets that are not"]),
    ({"extra": {**F32, "data_offsets": [8, 0]}}, 8, ["extra has data_offsets that are not"]),
    ({"extra": {**F32, "data_offsets": [0, 12]}}, 12, ["[0, 12] (12 bytes), but shape 2 of F32 takes 8"]),
    ({"extra": F32, "b": {**F32, "data_offsets": [4, 12]}}, 12, ["tensor b at data bytes 4..12 overlaps extra"]),
    ({"extra": F32, "b": {**F32, "data_offsets": [12, 20]}}, 20, ["tensor b", "gap of 4 bytes after extra"]),
    ({"extra": F32}, 4, ["truncated", "needs 8 data bytes (tensor extra), the file has 4"]),
    ({"extra": {**F32, "data_offsets": [8, 16]}}, 8, ["truncated", "needs 16 data bytes (tensor extra)"]),
    ({"extra": F32}, 12, ["4 bytes after the last tensor"]),
    ({"__metadata__": {"format": 1}, "extra": F32}, 8, ["__metadata__ is not an object of strings"]),
    (None, 8, ["unreadable header"]),
    ("nan", 8, ["unreadable header", "NaN is not JSON"]),
], ids=["list", "entry-list", "no-shape", "shape-str", "shape-bool", "dtype", "no-dtype", "offsets-short",
        "offsets-reversed", "offsets-size", "overlap", "gap", "past-end", "past-end-2", "trailing", "metadata",
        "not-utf8", "nan"])
def test_broken_header(ckpt, header, data, words):
    raw = {None: b"{\xff", "nan": b'{"extra": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": NaN}}'}
    write_shard(ckpt / EXTRA, header, data, raw=raw.get(header) if header is None or isinstance(header, str) else None)
    expect(ckpt, f"shard {EXTRA}", *words)


def test_header_length_does_not_fit(ckpt):
    (ckpt / EXTRA).write_bytes(struct.pack("<Q", 10**12) + b"{}")
    expect(ckpt, "truncated or corrupt", "header length 1000000000000 does not fit")


def test_weight_map_outside_the_checkpoint(tmp_path, ckpt):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"x" * 123457)  # its size must not appear in any message
    for file, why in [(str(outside), "is an absolute path"), ("../secret.bin", "'..'"),
                      ("sub/../../secret.bin", "'..'"), ("", "is not a file name"), (7, "is not a file name"),
                      ("a\x00b", "is not a file name"), ("sub/", "is not a file name")]:
        edit_json(ckpt / v.INDEX, lambda i: i["weight_map"].update(extra=file))
        msg = expect(ckpt, v.INDEX, 'weight_map["extra"]', why)
        assert "123457" not in msg, msg
        with pytest.raises(UsageError, match="weight_map"):  # the loader reads the index the same way
            ck.CheckpointIndex.open(ckpt)


@pytest.mark.parametrize("index,words", [
    ([1], ["is not a JSON object"]),
    ({"metadata": {}}, ["has no weight_map"]),
    ({"weight_map": {}}, ["an empty weight_map"]),
    ({"weight_map": [1]}, ["not an object"]),
])
def test_broken_index(ckpt, index, words):
    (ckpt / v.INDEX).write_text(json.dumps(index))
    expect(ckpt, v.INDEX, *words)


def test_missing_shard(ckpt):
    (ckpt / EXTRA).unlink()
    expect(ckpt, f"shard {EXTRA} listed in", "does not exist")


@pytest.mark.parametrize("change,words", [
    (None, ["config.json is not a JSON object (it is a list)"]),
    ({"intermediate_size": "512"}, ["intermediate_size=512 (a string), expected an integer >= 1"]),
    ({"intermediate_size": -1}, ["intermediate_size=-1, expected an integer >= 1"]),
    ({"num_hidden_layers": True}, ["num_hidden_layers=true (a boolean)"]),
    ({"n_group": 0}, ["n_group=0, expected an integer >= 1"]),
    ({"routed_scaling_factor": float("nan")}, ["routed_scaling_factor=nan, expected a finite number > 0"]),
    ({"rms_norm_eps": -1e-6}, ["rms_norm_eps=-1e-06"]),
    ({"eos_token_id": 4096}, ["eos_token_id=4096, expected a token id in 0..4095 (vocab_size=4096)"]),
    ({"eos_token_id": [1, -1]}, ["eos_token_id=[...] (a list)"]),
    ({"bos_token_id": 99999}, ["bos_token_id=99999"]),
    ({"rope_scaling": {"factor": 0}}, ["rope_scaling.factor=0"]),
    ({"rope_scaling": {"type": "linear", "factor": 4}}, ["rope_scaling.type=linear (a string)"]),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}}, ["weight_block_size"]),
    ({"num_nextn_predict_layers": -1}, ["num_nextn_predict_layers=-1"]),
    ({"q_lora_rank": -4}, ["q_lora_rank=-4"]),
    ({"n_group": 16, "topk_group": 1}, ["1 expert a group", "at least 2"]),
    ({"num_experts_per_tok": 9}, ["num_experts_per_tok=9 > topk_group=2 x 4 experts a group"]),
    ({"num_hidden_layers": 3}, ["has layer(s) 4, but", "num_hidden_layers=3", "MTP layer 3"]),
    ({"num_hidden_layers": 3, "num_nextn_predict_layers": 2}, ["layer(s) 3", "decoder layers", "dropped"]),
    ({"num_hidden_layers": 5, "num_nextn_predict_layers": 0}, ["layer(s) 4", "hold MTP tensors"]),
    ({"num_hidden_layers": 6, "num_nextn_predict_layers": 0}, ["no tensors of layer(s) 5"]),
    ({"num_nextn_predict_layers": 0}, ["has layer(s) 4, but", "layers 0..3:"]),
    ({"vocab_size": 4000}, ["model.embed_tokens.weight: checkpoint shape [4096, 256]", "[4000, 256]"]),
], ids=lambda x: None if x is None or isinstance(x, list) else "-".join(x))
def test_broken_config(ckpt, change, words):
    edit_json(ckpt / "config.json", lambda c: [c] if change is None else {**c, **change})
    expect(ckpt, *words)


def test_missing_mtp_layer_is_fine(ckpt):
    """A checkpoint without its MTP layer (nothing reads it) passes; its decoder layers must all be there."""
    edit_json(ckpt / v.INDEX, lambda i: {"weight_map": {k: f for k, f in i["weight_map"].items()
                                                        if not k.startswith("model.layers.4.")}})
    assert v.check_checkpoint(ckpt)[0].n_mtp_layers == 1
    edit_json(ckpt / v.INDEX, lambda i: {"weight_map": {k: f for k, f in i["weight_map"].items()
                                                        if not k.startswith("model.layers.2.")}})
    expect(ckpt, "no tensors of layer(s) 2")


def test_loader_takes_mtp_layers_from_the_config(tiny_bf16):
    """MTP layers are num_hidden_layers .. + num_nextn_predict_layers - 1; a layer past them is unexpected."""
    from tests.unit.test_checkpoint import stand_in

    index = ck.CheckpointIndex.open(tiny_bf16)
    entries = ck.plan(stand_in(TINY, 0, 1), 0, 1)
    logs: list[str] = []
    ck._skip_unused(index, entries, 4, 1, logs.append)
    assert len(logs) == 1 and "MTP" in logs[0] and "layers [4]" in logs[0], logs
    logs.clear()
    ck._skip_unused(index, entries, 4, 0, logs.append)
    assert len(logs) == 1 and "MTP" not in logs[0] and "model.layers.4." in logs[0], logs


# property tests ---------------------------------------------------------------------------------------------

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)
TENSOR = st.tuples(st.sampled_from(sorted(v.ITEMSIZE)), st.lists(st.integers(0, 5), max_size=3))
MUTATION = st.sampled_from(["none", "offset", "shape", "dtype", "drop-key", "json", "data+", "data-", "metadata"])


@st.composite
def header_and_data(draw):
    """A valid header (contiguous tensors) and its data length, then maybe one mutation."""
    tensors = draw(st.dictionaries(st.text(min_size=1, max_size=6).filter(lambda k: k != "__metadata__"), TENSOR,
                                   max_size=4))
    header, end = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = math.prod(shape) * v.ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [end, end + n]}
        end += n
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    mutation, data = draw(MUTATION), end
    names = [k for k in header if k != "__metadata__"]
    if names and mutation in ("offset", "shape", "dtype", "drop-key", "json"):
        entry = header[draw(st.sampled_from(names))]
        if mutation == "offset":
            entry["data_offsets"][draw(st.integers(0, 1))] += draw(st.integers(-3, 3))
        elif mutation == "shape":
            entry["shape"] = draw(st.lists(st.integers(-1, 5), max_size=3) | JSON)
        elif mutation == "dtype":
            entry["dtype"] = draw(st.sampled_from(sorted(v.ITEMSIZE) + ["F4", "f32"]) | JSON)
        elif mutation == "drop-key":
            del entry[draw(st.sampled_from(sorted(entry)))]
        else:
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(JSON)
    elif mutation in ("data+", "data-"):
        data = max(0, data + draw(st.integers(1, 3)) * (1 if mutation == "data+" else -1))
    elif mutation == "metadata":
        header["__metadata__"] = draw(JSON)
    elif mutation == "json":
        header = draw(JSON)
    return header, data, mutation


@SETTINGS
@given(case=header_and_data())
def test_generated_headers(tmp_path, case):
    from safetensors import safe_open

    header, data, mutation = case
    path = tmp_path / "x.safetensors"
    write_shard(path, header, data)
    try:
        tensors = v.read_header(path)
    except UsageError as exc:
        assert mutation != "none" and "\n" not in str(exc), (exc, header)
        return
    with safe_open(str(path), framework="pt") as f:  # what the check accepts, safetensors opens
        assert sorted(f.keys()) == sorted(tensors)


CONFIG_KEYS = sorted(TINY) + ["rope_scaling.factor", "rope_scaling.beta_fast", "rope_scaling.mscale_all_dim",
                              "rope_scaling.original_max_position_embeddings", "quantization_config.quant_method"]
VALUE = st.one_of(JSON, st.integers(-2, 20), st.sampled_from([0, 1, 2, 4, 16, 4096, float("nan"), float("inf"),
                                                              -1.5, "4", None, True, [1], {}]))


@SETTINGS
@given(edits=st.lists(st.tuples(st.sampled_from(CONFIG_KEYS), st.none() | VALUE), max_size=3), whole=st.none() | JSON)
def test_generated_configs(edits, whole):
    c = json.loads(json.dumps(TINY))
    for key, value in edits:
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        if value is None and leaf in node:
            del node[leaf]
        else:
            node[leaf] = value
    if whole is not None:
        c = whole
    try:
        m = ModelArgs.from_config(c)
    except UsageError as exc:
        assert "\n" not in str(exc)
        return
    counts = (m.vocab_size, m.dim, m.inter_dim, m.n_layers, m.n_heads, m.n_routed_experts, m.n_expert_groups,
              m.n_limited_groups, m.n_activated_experts, m.kv_lora_rank)
    assert all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in counts), m
    assert math.isfinite(m.route_scale) and m.route_scale > 0 and 0 <= m.eos_token_id < m.vocab_size
    assert m.n_routed_experts % m.n_expert_groups == 0 and m.n_activated_experts <= m.n_routed_experts


@SETTINGS
@given(files=st.lists(st.text(alphabet="ab./\x00~", max_size=12) | JSON, min_size=1, max_size=4))
def test_generated_weight_maps(tmp_path, files):
    root = tmp_path / "ck"
    root.mkdir(exist_ok=True)
    (root / v.INDEX).write_text(json.dumps({"weight_map": {f"t{i}": f for i, f in enumerate(files)}}))
    try:
        weight_map = v.read_weight_map(root)
    except UsageError as exc:
        assert "\n" not in str(exc)
        return
    for file in weight_map.values():  # every accepted name stays inside the checkpoint
        assert os.path.normpath(root / file).startswith(str(root) + os.sep), file
