"""Checkpoint loader: per-rank slices of the tiny synthetic checkpoint (bf16 and fp8), bytes read, errors."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from spmd.weights import checkpoint as ck
from spmd.kernels.fp8 import SCALE_SUFFIX, dequantize as fp8_dequantize
from spmd.kernels.fp8 import quantize_weight as quantize_fp8
from spmd.obs.timers import Timers
from spmd.config import UsageError
from tests.conftest import checkpoint_dir


class Col(nn.Module):
    """Stand-in column-parallel linear / vocab-parallel embedding: rows split."""

    shard_dim = 0

    def __init__(self, out: int, inp: int, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out // size, inp))


class Row(nn.Module):
    """Stand-in row-parallel linear: columns split."""

    shard_dim = 1

    def __init__(self, out: int, inp: int, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out, inp // size))


class Rep(nn.Module):
    """Stand-in replicated weight (linear or norm)."""

    def __init__(self, *shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape))


class Gate(Rep):
    def __init__(self, n_experts: int, dim: int):
        super().__init__(n_experts, dim)
        self.e_score_correction_bias = nn.Parameter(torch.empty(n_experts))


def _mlp(dim: int, inter: int, size: int) -> nn.Module:
    m = nn.Module()
    m.gate_proj, m.up_proj, m.down_proj = Col(inter, dim, size), Col(inter, dim, size), Row(dim, inter, size)
    return m


def _expert(dim: int, inter: int) -> nn.Module:
    m = nn.Module()
    m.gate_proj, m.up_proj, m.down_proj = Rep(inter, dim), Rep(inter, dim), Rep(dim, inter)
    return m


def _attention(c: dict, size: int) -> nn.Module:
    a, dim, heads = nn.Module(), c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    a.q_a_proj, a.q_a_layernorm = Rep(c["q_lora_rank"], dim), Rep(c["q_lora_rank"])
    a.q_b_proj = Col(heads * qk, c["q_lora_rank"], size)
    a.kv_a_proj_with_mqa = Rep(c["kv_lora_rank"] + c["qk_rope_head_dim"], dim)
    a.kv_a_layernorm = Rep(c["kv_lora_rank"])
    a.kv_b_proj = Col(heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"], size)
    a.o_proj = Row(dim, heads * c["v_head_dim"], size)
    return a


def _moe(c: dict, rank: int, size: int) -> nn.Module:
    m, dim, n, inter = nn.Module(), c["hidden_size"], c["n_routed_experts"], c["moe_intermediate_size"]
    m.gate = Gate(n, dim)
    m.shared_experts = _mlp(dim, inter * c["n_shared_experts"], size)
    local = range(rank * n // size, (rank + 1) * n // size)
    m.experts = nn.ModuleDict({str(e): _expert(dim, inter) for e in local})
    return m


def stand_in(c: dict, rank: int, size: int, dtype=torch.float32) -> nn.Module:
    """A meta-device module tree with the checkpoint's names and the shard_dim convention."""
    with torch.device("meta"):
        top, model = nn.Module(), nn.Module()
        model.embed_tokens = Col(c["vocab_size"], c["hidden_size"], size)
        model.layers = nn.ModuleList()
        for i in range(c["num_hidden_layers"]):
            layer = nn.Module()
            layer.self_attn = _attention(c, size)
            dense = i < c["first_k_dense_replace"]
            layer.mlp = _mlp(c["hidden_size"], c["intermediate_size"], size) if dense else _moe(c, rank, size)
            layer.input_layernorm, layer.post_attention_layernorm = Rep(c["hidden_size"]), Rep(c["hidden_size"])
            model.layers.append(layer)
        model.norm = Rep(c["hidden_size"])
        top.model, top.lm_head = model, Col(c["vocab_size"], c["hidden_size"], size)
    return top.to(dtype)


def config(ckpt: Path) -> dict:
    return json.loads((ckpt / "config.json").read_text())


@pytest.fixture(scope="module", params=["bf16", "fp8"])
def ckpt(request) -> Path:
    return checkpoint_dir("tiny", request.param)


@pytest.fixture(scope="module")
def full(ckpt) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor read whole, fp32 (FP8 weights dequantized with synth's reference)."""
    index = ck.CheckpointIndex.open(ckpt)
    files = sorted({index[n].file for n in index.names})
    raw = {k: v for f in files for k, v in load_file(ckpt / f).items()}
    out = {}
    for name, t in raw.items():
        if t.dtype == torch.float8_e4m3fn:
            out[name] = fp8_dequantize(t, raw[ck.scale_name(name)], torch.float32)
        elif not name.endswith(SCALE_SUFFIX):
            out[name] = t.float()
    return out


def load(ckpt: Path, model: nn.Module, rank: int, size: int, **kw):
    logs: list[str] = []
    stats = ck.load(model, ckpt, rank, size, torch.float32, "cpu", log=logs.append, **kw)
    return stats, logs


def stored_bytes(index: ck.CheckpointIndex, name: str) -> int:
    """Bytes of a tensor and of its FP8 scale, if it has one."""
    names = [name] + ([ck.scale_name(name)] if index[name].dtype == torch.float8_e4m3fn else [])
    return sum(math.prod(index[n].shape) * index[n].dtype.itemsize for n in names)


def test_plan_shard_dims_and_dtypes(tiny_bf16):
    model = stand_in(config(tiny_bf16), 1, 2, torch.bfloat16)
    entries = {e.name: e for e in ck.plan(model, 1, 2, torch.bfloat16)}
    qb = entries["model.layers.0.self_attn.q_b_proj.weight"]
    assert (qb.shard_dim, qb.local_shape, qb.full_shape(2)) == (0, (512, 128), (1024, 128))
    assert entries["model.layers.0.self_attn.o_proj.weight"].shard_dim == 1
    assert entries["model.layers.0.self_attn.q_a_proj.weight"].shard_dim is None
    assert entries["model.embed_tokens.weight"].local_shape == (2048, 256)
    bias = entries["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert (bias.shard_dim, bias.dtype) == (None, torch.float32)
    assert entries["model.norm.weight"].dtype == torch.bfloat16
    assert "model.layers.1.mlp.experts.8.up_proj.weight" in entries
    assert "model.layers.1.mlp.experts.7.up_proj.weight" not in entries


@pytest.mark.parametrize("size", [1, 2, 4])
def test_load_slices_equal_full(ckpt, full, size):
    c, index = config(ckpt), ck.CheckpointIndex.open(ckpt)
    whole = ck.plan(stand_in(c, 0, 1), 0, 1)
    total = sum(stored_bytes(index, e.name) for e in whole)
    split = sum(stored_bytes(index, e.name) for e in whole if e.shard_dim is not None or ".experts." in e.name)
    for rank in range(size):
        model, timers = stand_in(c, rank, size), Timers(rank)
        stats, logs = load(ckpt, model, rank, size, timers=timers)
        state = model.state_dict()
        for e in ck.plan(model, rank, size):
            t, ref = state[e.name], full[e.name]
            if e.shard_dim is not None:
                n = ref.shape[e.shard_dim]
                ref = ref.narrow(e.shard_dim, rank * n // size, n // size)
            assert t.dtype == torch.float32 and torch.equal(t, ref), e.name
        # replicated tensors whole, split tensors and routed experts 1/size each
        assert stats.bytes_read == total - split + split // size
        events = timers.table()
        assert set(events["name"]) == {b"load.read"} and set(events["kind"]) == {b"io"}
        assert int(events["bytes"].sum()) == stats.bytes_read
        assert stats.n_tensors == len(state)
        assert len(logs) == 1 and "MTP" in logs[0] and "layers [4]" in logs[0], logs
    print(f"{ckpt.name} size {size}: {stats.bytes_read} bytes per rank (size 1: {total})")


def test_compute_dtype_and_init_buffers(ckpt, full):
    model, called = stand_in(config(ckpt), 1, 2, torch.float32), []
    model.init_buffers = called.append  # the loader calls it once every tensor is filled
    ck.load(model, ckpt, 1, 2, torch.bfloat16, "cpu", log=lambda line: None)
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and torch.equal(bias, full["model.layers.1.mlp.gate.e_score_correction_bias"])
    wkv = model.model.layers[0].self_attn.kv_b_proj.weight
    assert wkv.dtype == torch.bfloat16 and isinstance(wkv, nn.Parameter)
    assert torch.equal(wkv, full["model.layers.0.self_attn.kv_b_proj.weight"][512:].bfloat16())
    assert called == ["cpu"]


def test_unexpected_tensors_warn(tiny_bf16):
    model = stand_in(config(tiny_bf16), 0, 1)
    del model.model.norm
    _, logs = load(tiny_bf16, model, 0, 1)
    assert len(logs) == 2 and "warning: 1 checkpoint tensors" in logs[1] and "model.norm.weight" in logs[1]


def unaligned_checkpoint(tmp: Path, src: Path, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A one-shard fp8 checkpoint, split dims of 300 (slices off the 128-blocks) -> fp32 references."""
    tmp.mkdir()
    shutil.copy(src / "config.json", tmp / "config.json")
    tensors, refs = {}, {}
    for i, (name, shape) in enumerate((("col.weight", (300, 260)), ("row.weight", (260, 300)))):
        w = torch.randn(shape, generator=torch.Generator().manual_seed(i))
        q, s = quantize_fp8(w)
        tensors[name], tensors[ck.scale_name(name)] = q, s.to(scale_dtype)
        refs[name] = fp8_dequantize(q, s, torch.float32)
    save_file(tensors, tmp / "model-00001-of-000001.safetensors")
    index = {"weight_map": dict.fromkeys(tensors, "model-00001-of-000001.safetensors")}
    (tmp / ck.INDEX).write_text(json.dumps(index))
    return refs


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float8_e8m0fnu])
def test_fp8_slices_off_block_boundaries(tmp_path, tiny_fp8, scale_dtype):
    refs = unaligned_checkpoint(tmp_path / "ck", tiny_fp8, scale_dtype)
    for size in (3, 4, 5):
        for rank in range(size):
            with torch.device("meta"):
                model = nn.Module()
                model.col, model.row = Col(300, 260, size), Row(260, 300, size)
            stats = ck.load(model, tmp_path / "ck", rank, size, torch.float32, "cpu", log=print)
            part = slice(rank * 300 // size, (rank + 1) * 300 // size)
            assert torch.equal(model.col.weight, refs["col.weight"][part])
            assert torch.equal(model.row.weight, refs["row.weight"][:, part])
            assert stats.bytes_read < 2 * (300 * 260 + 3 * 3 * scale_dtype.itemsize)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """Copy config + index, symlink the shards (tests replace the ones they edit)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            (dst / f.name).symlink_to(f)
        else:
            shutil.copy(f, dst / f.name)
    return dst


def edit_index(ckpt: Path, edit) -> None:
    index = json.loads((ckpt / ck.INDEX).read_text())
    edit(index["weight_map"])
    (ckpt / ck.INDEX).write_text(json.dumps(index))


def shard_of(ckpt: Path, name: str) -> str:
    return json.loads((ckpt / ck.INDEX).read_text())["weight_map"][name]


def expect_error(ckpt: Path, *words: str, size: int = 2, model=None) -> str:
    with pytest.raises(UsageError) as err:
        load(ckpt, model or stand_in(config(ckpt), 0, size), 0, size)
    msg = str(err.value)
    assert all(w in msg for w in words), msg
    return msg


def test_missing_tensor(tmp_path, tiny_bf16):
    ckpt = copy_checkpoint(tiny_bf16, tmp_path / "ck")
    edit_index(ckpt, lambda m: m.pop("model.layers.1.self_attn.o_proj.weight"))
    print(expect_error(ckpt, "model.layers.1.self_attn.o_proj.weight", "not in the checkpoint", "[256, 512]"))


def test_missing_scale(tmp_path, tiny_fp8):
    ckpt = copy_checkpoint(tiny_fp8, tmp_path / "ck")
    edit_index(ckpt, lambda m: m.pop("model.layers.0.mlp.down_proj.weight_scale_inv"))
    print(expect_error(ckpt, "model.layers.0.mlp.down_proj.weight_scale_inv", "without"))


def test_wrong_shape(tiny_bf16):
    c = dict(config(tiny_bf16), vocab_size=4000)
    print(expect_error(tiny_bf16, "model.embed_tokens.weight", "[4096, 256]", "[4000, 256]", "[2000, 256] x 2",
                       model=stand_in(c, 0, 2)))


def test_wrong_dtype(tmp_path, tiny_bf16):
    ckpt = copy_checkpoint(tiny_bf16, tmp_path / "ck")
    shard = shard_of(ckpt, "model.norm.weight")
    tensors = load_file(tiny_bf16 / shard)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].half()
    (ckpt / shard).unlink()
    save_file(tensors, ckpt / shard)
    print(expect_error(ckpt, "model.norm.weight", "torch.float16", shard, "bfloat16"))


def test_fp8_without_fp8_config(tmp_path, tiny_fp8):
    ckpt = copy_checkpoint(tiny_fp8, tmp_path / "ck")
    c = config(ckpt)
    del c["quantization_config"]
    (ckpt / "config.json").write_text(json.dumps(c))
    print(expect_error(ckpt, "float8_e4m3fn", "quantization_config"))


def test_truncated_shard(tmp_path, tiny_bf16):
    ckpt = copy_checkpoint(tiny_bf16, tmp_path / "ck")
    shard = shard_of(ckpt, "model.layers.2.self_attn.o_proj.weight")
    data = (tiny_bf16 / shard).read_bytes()
    (ckpt / shard).unlink()
    (ckpt / shard).write_bytes(data[:-1000])
    print(expect_error(ckpt, shard, "truncated", str(len(data) - 1000)))
    (ckpt / shard).write_bytes(data[:4])
    expect_error(ckpt, shard, "truncated or corrupt", "4 bytes")


def test_missing_shard_file(tmp_path, tiny_bf16):
    ckpt = copy_checkpoint(tiny_bf16, tmp_path / "ck")
    shard = shard_of(ckpt, "lm_head.weight")
    (ckpt / shard).unlink()
    print(expect_error(ckpt, shard, "does not exist"))


def test_index_names_tensor_absent_from_shard(tmp_path, tiny_bf16):
    ckpt = copy_checkpoint(tiny_bf16, tmp_path / "ck")
    other = shard_of(ckpt, "lm_head.weight")
    wrong = next(f for f in sorted(p.name for p in ckpt.glob("*.safetensors")) if f != other)
    edit_index(ckpt, lambda m: m.update({"lm_head.weight": wrong}))
    print(expect_error(ckpt, "lm_head.weight", wrong, "does not hold"))


def test_real_model_loads_every_tensor(ckpt, full):
    model_mod = pytest.importorskip("spmd.model.transformer")
    from spmd.config import ModelArgs
    from spmd.parallel.comm import Group
    model = model_mod.Transformer(ModelArgs.from_checkpoint(ckpt), Group(), torch.float32, device="meta")
    stats, logs = load(ckpt, model, 0, 1)
    state = model.state_dict()
    assert stats.n_tensors == len(state) and len(logs) == 1 and "MTP" in logs[0], logs
    for name, t in state.items():
        assert t.dtype == torch.float32 and torch.equal(t, full[name]), name
    assert model.rope_inv_freq.device.type == "cpu"
