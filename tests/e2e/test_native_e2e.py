"""Native engine end to end under mpirun: the trace's named collectives, a failure on one rank's load, and
pipeline stages (their tokens and the bubble in the report).

Token equality with transformers for every layout, checkpoint and dtype (tiny bf16 and fp8, tiny-noqlora;
G1, G2, G4, 2xG1, pipelines, the static-shape step, the dedicated orchestrator) is `make validate`'s
matrix (validation/matrix.py), scored against the stored transformers baselines.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py

from conftest import PROMPTS20, hf_reference, mpirun

N_NEW = 32


def _native(ckpt: Path, out: Path, n: int, g: int, trace: Path | None = None, extra: tuple = ()):
    args = [*extra, "--checkpoint", str(ckpt), "--prompts", str(PROMPTS20), "--output", str(out), "--engine", "native",
            "--group-size", str(g), "--max-new-tokens", str(N_NEW), "--dtype", "fp32", "--no-progress"]
    r = mpirun(n, args + (["--trace-dir", str(trace)] if trace else []), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_native_trace_names_collectives_and_load(tiny_bf16, tmp_path):
    _native(tiny_bf16, tmp_path / "out.jsonl", 2, 2, trace=tmp_path / "tr")
    with h5py.File(tmp_path / "tr" / "merged.h5") as f:
        ev = f["events"][:]
        info = [json.loads(f["ranks"][r].attrs["engine_info"]) for r in ("0", "1")]
    comm = ev[ev["kind"] == b"comm"]
    names = set(comm["name"].tolist())
    assert {b"attn.o_proj.all_reduce", b"moe.combine", b"embed.all_reduce", b"head.all_gather"} <= names
    assert (comm["bytes"] > 0).all()
    n_layers, n_moe = 4, 3
    per_step = comm[(comm["rank"] == 0) & (comm["phase"] == b"decode") & (comm["step"] == 1)]
    # one prefill + decode batches: per decode step, one o_proj all-reduce per layer, one combine per MoE layer
    names_step = per_step["name"].tolist()
    n_batches = names_step.count(b"embed.all_reduce")
    assert names_step.count(b"attn.o_proj.all_reduce") == n_layers * n_batches
    assert names_step.count(b"moe.combine") == n_moe * n_batches
    loads = ev[(ev["kind"] == b"io") & (ev["name"] == b"load.read")]
    full_fp32 = 2 * json.loads((tiny_bf16 / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    for r in (0, 1):
        assert loads[loads["rank"] == r]["bytes"].sum() == info[r]["load_bytes_read"] > 0
        # loading never materializes a full copy of the weights on a rank
        assert info[r]["rss_peak_after_load"] - info[r]["rss_peak_before_load"] < full_fp32


def test_a_tensor_missing_on_one_rank_fails_every_rank(tiny_bf16, tmp_path):
    """Only rank 1 reads expert 15: its error must still stop rank 0 (no rank left in a collective)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_bf16, ckpt)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.experts.15.up_proj.weight"]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    args = ["--checkpoint", str(ckpt), "--prompts", str(PROMPTS20), "--output", str(tmp_path / "o.jsonl"),
            "--engine", "native", "--group-size", "2", "--dtype", "fp32"]
    r = mpirun(2, args, timeout=120)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 1, r.stderr[-2000:]
    assert "rank 1: model.layers.1.mlp.experts.15.up_proj.weight: not in the checkpoint" in errors[0]


def test_pipeline_stages_tokens_equal_transformers_and_bubble_reported(tiny_fp8, tmp_path):
    """--pp 2 --group-size 2 on 4 ranks (2 stages of 2 tensor/expert-parallel ranks), 3 micro-batches."""
    from spmd.config import ModelArgs
    from spmd.parallel.pipeline import stage_layers
    from traces.report import report

    rows = _native(tiny_fp8, tmp_path / "out.jsonl", 4, 2, trace=tmp_path / "tr",
                   extra=("--pp", "2", "--micro-batches", "3"))
    assert [r["completion_token_ids"] for r in rows] == [list(t) for t in hf_reference(tiny_fp8, N_NEW)]
    assert {r["model_group"] for r in rows} == {0}
    with h5py.File(tmp_path / "tr" / "merged.h5") as f:
        ev = f["events"][:]
        info = {r: json.loads(f["ranks"][str(r)].attrs["engine_info"]) for r in range(4)}
    stages = stage_layers(ModelArgs.from_checkpoint(tiny_fp8), 2, 2)  # balanced by bytes: head on the last
    assert [info[r]["stage_layers"] for r in range(4)] == [[s.start, s.stop] for s in stages for _ in range(2)]
    sends = ev[ev["name"] == b"pp.send"]
    assert set(sends["rank"].tolist()) == {0, 1} and (sends["bytes"] > 0).all()
    text = report(tmp_path / "tr")
    bubble = text.split("pipeline bubble", 1)[1].split("\n\n", 1)[0]
    assert all(f"\n  {r} " in bubble for r in range(4))
