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
