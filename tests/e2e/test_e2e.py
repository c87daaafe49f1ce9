"""End to end under mpirun: the hf engine (2 replicas; transformers' own tensor + expert parallel plan), the
traces of every rank, and the exit path of bad input."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest

from conftest import PROMPTS20, bad_inputs, hf_reference, mpirun

N_NEW = 32


def _run(ckpt: Path, out: Path, *extra: str, n: int = 2, **kw):
    args = ["--checkpoint", str(ckpt), "--prompts", str(PROMPTS20), "--output", str(out),
            "--max-new-tokens", str(N_NEW), "--dtype", "fp32", "--no-progress", *extra]
    return mpirun(n, args, **kw)


def _tokens(path: Path) -> list[list[int]]:
    return [json.loads(line)["completion_token_ids"] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tiny_bf16):
    return [list(t) for t in hf_reference(tiny_bf16, N_NEW)]


@pytest.fixture(scope="module")
def hf_run(tiny_bf16, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_static")
    r = _run(tiny_bf16, d / "out.jsonl", "--engine", "hf", "--trace-dir", str(d / "traces"))
    assert r.returncode == 0, r.stderr[-3000:]
    return d


def test_hf_engine_two_replicas_equals_transformers(hf_run, reference):
    rows = [json.loads(line) for line in (hf_run / "out.jsonl").read_text().splitlines()]
    ids = [json.loads(line)["id"] for line in PROMPTS20.read_text().splitlines()]
    assert [r["id"] for r in rows] == ids
    assert _tokens(hf_run / "out.jsonl") == reference
    assert {r["model_group"] for r in rows} == {0, 1}  # both replicas served prompts
    assert all(r["prompt_tokens"] > 0 and 0 < r["ttft_s"] <= r["latency_s"] for r in rows)
    assert len({tuple(t) for t in reference}) > 10  # the synthetic model is not degenerate


def test_traces_written_by_every_rank_and_merged(hf_run):
    t = hf_run / "traces"
    assert (t / "rank00000.h5").is_file() and (t / "rank00001.h5").is_file()
    with h5py.File(t / "merged.h5") as f:
        ev = f["events"][:]
        assert set(ev["rank"].tolist()) == {0, 1}
        assert {b"prefill", b"decode", b"load"} <= set(ev["phase"].tolist())


def test_hf_engine_with_transformers_tensor_expert_parallel_equals_transformers(tiny_bf16, reference, hf_run,
                                                                               tmp_path):
    """--engine hf --group-size 2: transformers' DistributedConfig(tp_plan="auto", expert parallel) over
    both ranks gives the unsharded model's tokens; its routed experts are split between the ranks."""
    r = _run(tiny_bf16, tmp_path / "tp.jsonl", "--engine", "hf", "--group-size", "2", "--trace-dir",
             str(tmp_path / "traces"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert _tokens(tmp_path / "tp.jsonl") == reference
    info = {}
    for run, d in (("tp", tmp_path / "traces"), ("replicas", hf_run / "traces")):
        with h5py.File(d / "merged.h5") as f:
            info[run] = [json.loads(f[f"ranks/{r}"].attrs["engine_info"]) for r in range(2)]
            if run == "tp":
                world = json.loads(f["ranks/0"].attrs["world"])
                assert world["group_size"] == 2 and world["n_replicas"] == 1
    assert [i["hf_parallel"] for i in info["tp"]] == ["tp+ep"] * 2
    full = info["replicas"][0]["expert_param_bytes"]
    assert full > 0 and all(i["expert_param_bytes"] == full // 2 for i in info["tp"])  # experts split in two


@pytest.mark.parametrize("case", ["malformed JSONL", "truncated shard"])
def test_bad_input_fails_cleanly_on_every_rank(tiny_bf16, tmp_path, case):
    """The exit path of bad input: one `error:` line, every rank exits non-zero, no output. Found by rank 0
    before any model work (a prompt file), or by one rank while loading (a shard). Every other bad input is
    checked in-process, on 1 and 2 ranks: tests/mpi/test_bad_input_mpi.py."""
    extra, msg = bad_inputs(tmp_path, tiny_bf16)[case]
    args = ["--checkpoint", str(tiny_bf16), "--output", str(tmp_path / "o.jsonl"), "--engine", "hf", *extra]
    r = mpirun(2, args, timeout=90)
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and msg in errors[0], r.stderr[-2000:]
    assert not (tmp_path / "o.jsonl").exists()
