"""DeepSpeed engine end to end under mpirun: AutoTP on our model group + our expert-parallel MoE.

Two runs (group size 2, 2 replicas x group 1; tiny bf16, fp32, one batch of 20) and their traces: the
sharding, the named all-reduces, no collective in a one-rank group, DeepSpeed's shared-memory buffers
unlinked. Its tokens for every layout, checkpoint and dtype are `make validate`'s deepspeed rows.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import PROMPTS20, mpirun

pytest.importorskip("deepspeed")

N_NEW = 32
LAYOUTS = {"G2": (2, 2), "2xG1": (2, 1)}  # name: (ranks, group size); tokens: make validate's deepspeed rows
N_LAYERS, N_DENSE = 4, 1  # inputs/models/tiny.json
SHM = Path("/dev/shm")
COMM_NAMES = {b"attn.o_proj.all_reduce", b"mlp.down.all_reduce", b"moe.combine", b"head.all_reduce"}


@pytest.fixture(scope="module")
def ds_run(request, tmp_path_factory):
    """run(checkpoint fixture name, layout) -> (output rows, trace dir); each run made once."""
    done: dict = {}

    def run(ckpt_name: str, layout: str):
        if (ckpt_name, layout) not in done:
            ckpt = request.getfixturevalue(ckpt_name)
            n, g = LAYOUTS[layout]
            work = tmp_path_factory.mktemp(f"ds-{ckpt_name}-{layout}")
            args = ["--checkpoint", str(ckpt), "--prompts", str(PROMPTS20), "--output", str(work / "out.jsonl"),
                    "--trace-dir", str(work / "trace"), "--engine", "deepspeed", "--group-size", str(g),
                    "--max-new-tokens", str(N_NEW), "--dtype", "fp32", "--batch-size", "20", "--no-progress"]
            shm_before = set(SHM.glob("deepspeed_allreduce_buffer_*"))
            r = mpirun(n, args, timeout=600)
            assert r.returncode == 0, r.stderr[-3000:]
            # DeepSpeed's CPU all-reduce buffers (67 MB of RAM per rank) are unlinked, not leaked
            assert set(SHM.glob("deepspeed_allreduce_buffer_*")) <= shm_before
            rows = [json.loads(line) for line in (work / "out.jsonl").read_text().splitlines()]
            done[ckpt_name, layout] = rows, work / "trace"
        return done[ckpt_name, layout]

    return run


def _engine_info(trace: Path) -> list[dict]:
    with h5py.File(trace / "merged.h5") as f:
        return [json.loads(f["ranks"][r].attrs["engine_info"]) for r in sorted(f["ranks"], key=int)]


def test_deepspeed_shards_attention_and_experts(ds_run, tiny_bf16):
    """G=2: AutoTP split attention, dense MLP and lm_head; each rank holds half of the routed experts' bytes."""
    whole = _engine_info(ds_run("tiny_bf16", "2xG1")[1])  # each rank: a whole model
    split = _engine_info(ds_run("tiny_bf16", "G2")[1])
    full_fp32 = 2 * json.loads((tiny_bf16 / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    for w in whole:
        assert w["autotp_layers"] == {}  # group size 1: DeepSpeed leaves the model as it is
    for s in split:
        assert s["autotp_layers"] == {"LinearLayer": 2 * N_LAYERS + 2 * N_DENSE,  # q_b, kv_b; gate, up
                                      "LinearAllreduce": N_LAYERS + N_DENSE,  # o_proj; down_proj
                                      "LmHeadLinearAllreduce": 1}
        assert 2 * s["expert_param_bytes"] == whole[0]["expert_param_bytes"] > 0
        assert s["param_bytes"] < 0.6 * whole[0]["param_bytes"]  # the embedding stays whole (AutoTP's choice)
        assert s["load_bytes_read"] < 0.6 * whole[0]["load_bytes_read"]
        # loading never materializes a full copy of the weights on a rank
        assert s["rss_peak_after_load"] - s["rss_peak_before_load"] < full_fp32


def test_deepspeed_trace_names_and_counts_all_reduces(ds_run):
    """Per decode step and layer: one o_proj all-reduce, one dense down_proj all-reduce or one MoE combine; one head."""
    with h5py.File(ds_run("tiny_bf16", "G2")[1] / "merged.h5") as f:
        ev = f["events"][:]
    comm = ev[ev["kind"] == b"comm"]
    assert set(comm[comm["phase"] != b"load"]["name"].tolist()) == COMM_NAMES
    assert (comm["bytes"] > 0).all() and set(comm["group"].tolist()) <= {b"tp"}
    dec = comm[(comm["phase"] == b"decode")]
    batch, dim, vocab = 20, 256, 4096
    for r in (0, 1):
        mine = dec[dec["rank"] == r]
        steps = sorted(set(mine["step"].tolist()))
        assert len(steps) == N_NEW - 1
        for step in steps:
            at = mine[mine["step"] == step]
            for layer in range(N_LAYERS):
                names = sorted(at[at["layer"] == layer]["name"].tolist())
                mlp = b"mlp.down.all_reduce" if layer < N_DENSE else b"moe.combine"
                assert names == sorted([b"attn.o_proj.all_reduce", mlp]), (r, step, layer, names)
            assert at[at["layer"] == -1]["name"].tolist() == [b"head.all_reduce"]
        fp32 = 4
        assert set(mine[mine["name"] != b"head.all_reduce"]["bytes"].tolist()) == {batch * dim * fp32}
        assert set(mine[mine["name"] == b"head.all_reduce"]["bytes"].tolist()) == {batch * vocab * fp32}
    _leaf_intervals(ev[(ev["rank"] == 0) & (ev["phase"] == b"decode")])


def _leaf_intervals(ev: np.ndarray) -> None:
    """Compute segments and collectives of one rank never overlap (the timers' leaf rule)."""
    ev = ev[np.argsort(ev["start_ns"], kind="stable")]
    ends = ev["start_ns"] + ev["dur_ns"]
    assert (ev["start_ns"][1:] >= ends[:-1]).all()


def test_deepspeed_single_group_has_no_collectives(ds_run):
    with h5py.File(ds_run("tiny_bf16", "2xG1")[1] / "merged.h5") as f:
        ev = f["events"][:]
    assert not (ev["kind"] == b"comm").any()
