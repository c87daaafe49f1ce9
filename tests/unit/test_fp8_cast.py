"""spmd.weights.fp8_cast: the FP8 weights transformers' dequantizer misreads are found, and the dequantized copy is
exact and complete, and the reference engine (load_hf) reads them exactly in memory."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import checkpoint_dir
from spmd.weights.fp8_cast import dequantize, dequantized_copy, main as cast_main, needs_cast

INDEX = "model.safetensors.index.json"


def _tensors(ckpt):
    wmap = json.loads((ckpt / INDEX).read_text())["weight_map"]
    out = {}
    for file in sorted(set(wmap.values())):
        with safe_open(ckpt / file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_needs_cast_lists_partial_block_weights():
    """kv_a_proj_with_mqa (kv_lora_rank + rope dims rows: 192 in tiny, 576 in V3) is not whole 128-blocks;
    every other tiny FP8 weight is; a bf16 checkpoint needs nothing."""
    names = needs_cast(checkpoint_dir("tiny", "fp8"))
    assert names and all(n.endswith("self_attn.kv_a_proj_with_mqa.weight") for n in names)
    assert len(names) == 5  # 4 decoder layers + the MTP layer
    assert needs_cast(checkpoint_dir("tiny", "bf16")) == []


def test_dequantized_copy_is_exact_and_complete(tmp_path):
    src = checkpoint_dir("tiny", "fp8")
    out = dequantized_copy(src, tmp_path / "cast")
    a, b = _tensors(src), _tensors(out)
    assert set(b) == {k for k in a if not k.endswith(".weight_scale_inv")}
    for name, t in b.items():
        if a[name].dtype == torch.float8_e4m3fn:
            assert t.dtype == torch.bfloat16  # power-of-two scales: exact in bf16
            assert torch.equal(t.float(), dequantize(a[name], a[name.removesuffix(".weight") + ".weight_scale_inv"]))
        else:
            assert torch.equal(t, a[name])
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert cast_main(["--checkpoint", str(src), "--out", str(out)]) == 2  # never over an existing copy


def test_reference_reads_partial_blocks_right(tmp_path):
    """A checkpoint whose kv_a_proj scale blocks differ (as in real weights): transformers' own dequantizer
    would read its 192 rows as two 96-row blocks; load_hf (in memory, exact_partial_blocks) gives W = q *
    scale per 128x128 block, the loader's numbers, and leaves transformers' dequantizer as it was."""
    from spmd.engines.hf import load_hf

    src = tmp_path / "fp8"
    shutil.copytree(checkpoint_dir("tiny", "fp8"), src)
    wmap = json.loads((src / INDEX).read_text())["weight_map"]
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    sname = name.removesuffix(".weight") + ".weight_scale_inv"
    file = src / wmap[name]
    with safe_open(file, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[sname] = tensors[sname].clone()
    tensors[sname][1] *= 4.0  # rows 128..191: another power of two
    save_file(tensors, str(file), metadata={"format": "pt"})
    model = load_hf(src, "fp32", "cpu", log=False)
    want = dequantize(tensors[name], tensors[sname], torch.float32)
    assert torch.equal(model.state_dict()[name], want)
    scale96 = tensors[sname].repeat_interleave(96, 0).repeat_interleave(128, 1)[:, :256]  # 2 blocks of 96 rows
    assert not torch.equal(want, tensors[name].float() * scale96)  # the misreading differs here
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    theirs = Fp8Dequantize(None)._dequantize_one(tensors[name], tensors[sname], torch.float32)
    assert torch.equal(theirs, tensors[name].float() * scale96)  # restored after the load


@pytest.mark.parametrize("bad", ["bf16", "nonempty"])
def test_cast_cli_refuses(tmp_path, bad, capsys):
    src = checkpoint_dir("tiny", "fp8" if bad == "nonempty" else "bf16")
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("")
    assert cast_main(["--checkpoint", str(src), "--out", str(out)]) == 2
    assert "error:" in capsys.readouterr().err
