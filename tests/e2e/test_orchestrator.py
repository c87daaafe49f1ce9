"""`--orchestrator dedicated` under mpirun: world rank 0 holds no model and only orchestrates; bad input found
on either side ends every rank."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest

from conftest import PROMPTS20, bad_inputs, mpirun

N_NEW = 12
KEYS = ("id", "prompt", "completion", "completion_token_ids", "prompt_tokens")


def _run(ckpt: Path, out: Path, n: int, *extra: str, **kw):
    return mpirun(n, ["--checkpoint", str(ckpt), "--prompts", str(PROMPTS20), "--output", str(out),
                      "--max-new-tokens", str(N_NEW), "--dtype", "fp32", "--no-progress", *extra], **kw)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dedicated_orchestrator_run(tiny_bf16, tmp_path):
    """2 replicas of one rank and the orchestrator: every group serves prompts, rank 0 only reads, dispatches,
    detokenizes and writes (its trace), the progress directory goes. Its tokens equal transformers' in
    `make validate` (layouts G1+O, 2xG1+O, G2+O)."""
    ranks, group = 3, 1
    out, traces = tmp_path / "out.jsonl", tmp_path / "traces"
    r = _run(tiny_bf16, out, ranks, "--orchestrator", "dedicated", "--group-size", str(group),
             "--dispatch-size", "3", "--batch-size", "2", "--trace-dir", str(traces))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(out)
    ids = [json.loads(line)["id"] for line in PROMPTS20.read_text().splitlines()]
    assert [x["id"] for x in rows] == ids and all(set(KEYS) <= set(x) for x in rows)
    assert {x["model_group"] for x in rows} == set(range((ranks - 1) // group))  # every group served prompts
    assert not out.with_name(out.name + ".progress").exists()
    with h5py.File(traces / "merged.h5") as f:
        ev = f["events"][:]
    zero = ev[ev["rank"] == 0]
    assert set(zero["phase"].tolist()) <= {b"load", b"other"}  # no prefill, no decode on rank 0
    names = set(zero["name"].tolist())
    assert {b"prompts.read_tokenize", b"dispatch.serve", b"outputs.detokenize", b"progress.write"} <= names
    assert set(ev["rank"].tolist()) == set(range(ranks))
    with h5py.File(traces / "rank00000.h5") as f0, h5py.File(traces / "rank00001.h5") as f1:
        assert json.loads(f0.attrs["world"])["role"] == "orchestrator"
        assert json.loads(f1.attrs["world"])["role"] == "model"


@pytest.mark.parametrize("case", ["too long", "truncated shard"])
def test_dedicated_bad_input_fails_cleanly(tiny_bf16, tmp_path, case):
    """Errors found on rank 0 while the model ranks load, and on model ranks while rank 0 tokenizes,
    reach every rank: one message, non-zero exit, no output. The layout errors (static dispatch, one rank,
    a group size that does not divide the model ranks) are checked in-process: tests/mpi/test_bad_input_mpi.py."""
    bad = bad_inputs(tmp_path, tiny_bf16)
    extra, msg, n = {"too long": (bad["too long"][0], bad["too long"][1], 3),
                     "truncated shard": (bad["truncated shard"][0], bad["truncated shard"][1], 3)}[case]
    out = tmp_path / "o.jsonl"
    r = mpirun(n, ["--checkpoint", str(tiny_bf16), "--prompts", str(PROMPTS20), "--output", str(out),
                   "--orchestrator", "dedicated", *extra], timeout=120)
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and msg in errors[0], r.stderr[-2000:]
    assert not out.exists()
