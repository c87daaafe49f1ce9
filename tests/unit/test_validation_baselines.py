"""Serial: which baseline a validation matrix row is scored against (validation.matrix.baseline_job)."""
from __future__ import annotations

import json
import types
from pathlib import Path

from spmd.runtime.score import checkpoint_fingerprint
from validation import matrix

ROOT = Path(__file__).resolve().parents[2]
STORED = ROOT / "validation/results/baselines/tiny-fp8-cuda.jsonl"


def _args(tmp_path: Path, gpu_mem_gib: float) -> types.SimpleNamespace:
    return types.SimpleNamespace(baselines=tmp_path, device="cuda", gpu_mem_gib=gpu_mem_gib, max_new_tokens=32,
                                 slots=1, work=tmp_path / "work")


def _store(tmp_path: Path, ckpt: Path, dtype: str) -> Path:
    """A baseline of `ckpt` made in `dtype` (the stored tiny one with its header rewritten)."""
    lines = STORED.read_text().splitlines()
    head = dict(json.loads(lines[0]), checkpoint_sha256=checkpoint_fingerprint(ckpt), dtype=dtype, max_new_tokens=32)
    out = tmp_path / f"{ckpt.name}-cuda.jsonl"
    out.write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n")
    return out


def test_an_fp32_baseline_serves_a_gpu_that_could_only_make_bf16(tmp_path, tiny_fp8):
    """A small GPU makes a bf16 baseline; a stored fp32 one of the same checkpoint (made on a larger GPU)
    is better and is kept (the H100 scoring against the H200's slice baseline)."""
    out = _store(tmp_path, tiny_fp8, "fp32")
    assert matrix.baseline_job(tiny_fp8, _args(tmp_path, gpu_mem_gib=1e-6)) == (out, "fp32", None)


def test_a_bf16_baseline_is_remade_where_fp32_fits(tmp_path, tiny_fp8):
    out = _store(tmp_path, tiny_fp8, "bf16")
    got, dtype, job = matrix.baseline_job(tiny_fp8, _args(tmp_path, gpu_mem_gib=80.0))
    assert (got, dtype) == (out, "fp32") and job is not None and "--dtype" in job.cmd
    assert job.cmd[job.cmd.index("--dtype") + 1] == "fp32"


def test_the_fp8_activation_reference_is_its_own_file(tmp_path, tiny_fp8):
    """--act-quant rows need a baseline made with --act-quant: the plain one beside it is not taken."""
    _store(tmp_path, tiny_fp8, "fp32")
    args = _args(tmp_path, gpu_mem_gib=80.0)
    args.act_quant = True
    got, dtype, job = matrix.baseline_job(tiny_fp8, args)
    assert got == tmp_path / f"{tiny_fp8.name}-cuda-a8.jsonl" and job is not None and "--act-quant" in job.cmd


def test_a_gpu_too_small_for_fp32_holds_the_weights_in_bf16(tmp_path, tiny_fp8):
    """Where the float32 model does not fit but half of it does and every weight is exact in bf16 (UE8M0
    FP8), the baseline is float32 arithmetic over bf16-held weights (--lean), not a bf16 one; smaller still,
    bf16."""
    gib = matrix.fp32_gib(tiny_fp8)
    got, dtype, job = matrix.baseline_job(tiny_fp8, _args(tmp_path, gpu_mem_gib=gib / 0.8 * 0.6))
    assert dtype == "fp32" and "--lean" in job.cmd and job.cmd[job.cmd.index("--dtype") + 1] == "fp32"
    got, dtype, job = matrix.baseline_job(tiny_fp8, _args(tmp_path, gpu_mem_gib=gib / 0.8 * 0.4))
    assert dtype == "bf16" and "--lean" not in job.cmd


def test_the_lean_reference_is_the_fp32_one(tiny_fp8, tiny_bf16, tmp_path):
    """compute_in_fp32 over bf16-held weights gives the float32 model's logits (the weights are exact in
    bf16; bit for bit when run alone, up to float32 summation order after other tests changed torch's
    threads or transformers' experts path), with the FP8-activation recipe too; a checkpoint with float32
    weights is refused."""
    import shutil

    import pytest
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from spmd.config import UsageError
    from validation import act_quant
    from validation.reference import bf16_exact, load_hf, load_hf_fp32_lean

    ids = torch.tensor([[5, 9, 200, 31, 7, 1000, 44]])

    def same(a, b):
        assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item()
    for ckpt in (tiny_fp8, tiny_bf16):
        full, lean = load_hf(ckpt, "fp32", "cpu", log=False), load_hf_fp32_lean(ckpt, "cpu", log=False)
        assert next(lean.parameters()).dtype == torch.bfloat16
        with torch.inference_mode():
            same(full(ids).logits, lean(ids).logits)
    full, lean = load_hf(tiny_fp8, "fp32", "cpu", log=False), load_hf_fp32_lean(tiny_fp8, "cpu", log=False)
    assert act_quant.fake_quantize(full, tiny_fp8, True) == act_quant.fake_quantize(lean, tiny_fp8, True)
    with torch.inference_mode():
        same(full(ids).logits, lean(ids).logits)
    bad = tmp_path / "fp32w"
    shutil.copytree(tiny_bf16, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    name = next(n for n in index if n.endswith("input_layernorm.weight"))
    with safe_open(bad / index[name], "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[name] = tensors[name].float()
    save_file(tensors, str(bad / index[name]), metadata={"format": "pt"})
    assert name in bf16_exact(bad)
    with pytest.raises(UsageError, match="not exact in bf16"):
        load_hf_fp32_lean(bad, "cpu", log=False)
