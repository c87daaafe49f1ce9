"""On a CUDA machine only (skipped elsewhere): the fast paths of the native engine against the plain ones.

- A decode step replayed from a captured CUDA graph gives the logits of the same static-shape step run
  eagerly (`--cuda-graph static`, which tests/mpi/test_native_mpi.py checks against the dynamic path on
  CPU), and the same greedy tokens; buffers and graphs are reused by a batch of the same shape.
- With the timers on and SPMD_GRAPH_MARKS=stamp|event, the replayed steps record the per-layer and per-collective events of the eager
  step (events recorded by the graph), stamped with their step, in step order; with them off, the
  untimed graph gives the same logits.
- FP8 weights kept as FP8 (Triton kernels) give the logits of the dequantizing load.
Run on the GPU machine: `python3 -m pytest -q tests/gpu/test_gpu.py` (one GPU, an MPI singleton world).
"""
from __future__ import annotations

import json
import types

import h5py
import numpy as np
import pytest
import torch

from conftest import PROMPTS20, checkpoint_dir
from spmd.config import ModelArgs
from spmd.runtime.generate import GenConfig, generate, left_pad
from spmd.runtime.score import work_items
from spmd.runtime.prompts import encode, load_tokenizer, read_prompts
from spmd.obs.timers import Timers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def world():
    import torch.distributed as dist
    from spmd.runtime.world import make_world, shutdown

    owned = not dist.is_initialized()
    w = make_world(1, "cuda")
    yield w
    if owned:
        shutdown(w)


def _engine(world, ckpt, max_new, dtype="bf16", **opts):
    from spmd.engines.native import NativeEngine

    args = types.SimpleNamespace(checkpoint=ckpt, dtype=dtype, max_new_tokens=max_new, **opts)
    return NativeEngine(world, args, ModelArgs.from_checkpoint(ckpt), Timers(world.rank, "cuda"))


def _prompts(ckpt, n):
    return encode(load_tokenizer(ckpt), read_prompts(PROMPTS20), chat=True)[:n]


@torch.inference_mode()
def test_continuous_graphs_equal_static_step(world):
    """Continuous batching with its decode steps replayed from graphs per (rows, columns) shape gives the
    greedy tokens of the same slots run as static-shape steps eagerly (the same ops, captured or not)."""
    from spmd.runtime.records import Sampling, WorkItem
    from spmd.runtime.scheduler import Scheduler

    ckpt = checkpoint_dir("tiny", "bf16")
    ids = _prompts(ckpt, 20)
    items = [WorkItem(i, q, sampling=Sampling(2 + (i * 5) % 12, ignore_eos=True)) for i, q in enumerate(ids)]
    out = {}
    for mode in ("static", "on"):
        engine = _engine(world, ckpt, 16, cuda_graph=mode, fp8_weights="dequant")
        rows: list = []
        stats = Scheduler(engine, 6, 48, 256, GenConfig(16, 1, 1), Timers(0, "cuda")).run(iter([items]), rows.extend)
        out[mode] = {r.index: r.tokens for r in rows}
        assert len(stats.decode_shapes) > 1  # several (rows, columns) shapes, so several graphs
        engine.close()
    assert out["on"] == out["static"] and len(out["on"]) == 20
    assert all(len(out["on"][i]) == it.sampling.max_new_tokens for i, it in enumerate(items))


@torch.inference_mode()
def test_graph_replay_equals_static_step(world):
    ckpt = checkpoint_dir("tiny", "bf16")
    static, graph = (_engine(world, ckpt, 8, cuda_graph=m, fp8_weights="dequant") for m in ("static", "on"))
    assert (static.decode_mode, graph.decode_mode) == ("static", "graph")
    norms = [m for e in (static, graph) for m in e.model.modules() if hasattr(m, "fused")]
    assert norms and all(m.fused for m in norms)  # the same fused ops in both (spmd.model.transformer.use_fused)
    ids = _prompts(ckpt, 6)
    for batch in (ids, ids[::-1]):  # the second batch replays the first one's graph
        tokens, mask = left_pad(batch, 1, "cuda")
        a, b = static.prefill(tokens, mask), graph.prefill(tokens, mask)
        for step in range(8):
            torch.testing.assert_close(b, a, atol=2e-2, rtol=0)
            if step < 7:
                nxt = a.argmax(-1)
                a, b = static.decode(nxt), graph.decode(nxt).clone()
        static.release(), graph.release()
    assert len(graph.graphs.states) == 1 and len(next(iter(graph.graphs.states.values())).graphs[False]) == 1
    cfg = GenConfig(8, eos_id=1, pad_id=1)
    rows = [generate(e, work_items(ids, None), cfg) for e in (static, graph)]
    assert [r.tokens for r in rows[0]] == [r.tokens for r in rows[1]]
    graphs = [g for st in graph.graphs.states.values() for v in st.graphs.values() for g, _, _ in v]
    graph.close()  # the graphs are destroyed (a live one hangs NCCL's teardown on 2 GPUs)
    assert graph.graphs is None and graphs


def _decode_events(engine, ids, steps):
    timers = engine.timers
    tokens, mask = left_pad(ids, 1, "cuda")
    timers.set_phase("prefill", 0)
    nxt = engine.prefill(tokens, mask).argmax(-1)
    logits = []
    for s in range(1, steps + 1):
        timers.set_phase("decode", s)
        out = engine.decode(nxt)
        logits.append(out.clone())
        nxt = out.argmax(-1)
        nxt.tolist()  # the generate loop's host sync
    engine.release()
    ev = timers.table()
    return ev[ev["phase"] == b"decode"], logits


@torch.inference_mode()
@pytest.mark.parametrize("marks", ["stamp", "event"])
def test_graph_replays_record_the_eager_events(world, monkeypatch, marks):
    monkeypatch.setenv("SPMD_GRAPH_MARKS", marks)
    ckpt = checkpoint_dir("tiny", "bf16")
    ids = _prompts(ckpt, 4)
    eager, graph = (_engine(world, ckpt, 6, cuda_graph=m, fp8_weights="dequant") for m in ("off", "on"))
    ev_e, _ = _decode_events(eager, ids, 5)
    ev_g, logits_timed = _decode_events(graph, ids, 5)

    def keys(ev, step):
        sel = ev[(ev["step"] == step) & np.isin(ev["kind"], [b"compute", b"comm"])]
        return sorted(zip(sel["name"].tolist(), sel["kind"].tolist(), sel["layer"].tolist(),
                          sel["bytes"].tolist(), sel["group"].tolist()))

    assert len(keys(ev_e, 1)) > 3 * ModelArgs.from_checkpoint(ckpt).n_layers
    for step in range(1, 6):
        assert keys(ev_g, step) == keys(ev_e, step), step
    assert (ev_g["dur_ns"] > 0).all() and not (ev_g["name"] == b"decode.graph").any()
    ends = [(ev_g["start_ns"] + ev_g["dur_ns"])[ev_g["step"] == s].max() for s in range(1, 6)]
    starts = [ev_g["start_ns"][ev_g["step"] == s].min() for s in range(1, 6)]
    assert all(e <= s for e, s in zip(ends[:-1], starts[1:])), (starts, ends)
    graph.timers.enabled = False  # the untimed graph of the same shape: same logits
    _, logits_plain = _decode_events(graph, ids, 5)
    for a, b in zip(logits_timed, logits_plain):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def _runs(ev) -> list[tuple]:
    """(kind, layer, summed bytes) of each run of consecutive events with the same kind and layer."""
    out = []
    for kind, layer, nbytes in zip(ev["kind"].tolist(), ev["layer"].tolist(), ev["bytes"].tolist()):
        if out and out[-1][:2] == (kind, layer):
            out[-1] = (kind, layer, out[-1][2] + nbytes)
        else:
            out.append((kind, layer, nbytes))
    return out


@torch.inference_mode()
def test_layer_level_marks_merge_the_eager_events(world, monkeypatch):
    """SPMD_GRAPH_MARK_LEVEL=layer: one event per run of the eager step's spans of one kind and layer."""
    monkeypatch.setenv("SPMD_GRAPH_MARKS", "stamp")
    monkeypatch.setenv("SPMD_GRAPH_MARK_LEVEL", "layer")
    ckpt = checkpoint_dir("tiny", "bf16")
    ids = _prompts(ckpt, 4)
    eager, graph = (_engine(world, ckpt, 6, cuda_graph=m, fp8_weights="dequant") for m in ("off", "on"))
    ev_e, _ = _decode_events(eager, ids, 4)
    ev_g, _ = _decode_events(graph, ids, 4)
    for step in range(1, 5):
        e = ev_e[(ev_e["step"] == step) & np.isin(ev_e["kind"], [b"compute", b"comm"])]
        g = ev_g[ev_g["step"] == step]
        assert _runs(np.sort(g, order="start_ns")) == _runs(np.sort(e, order="start_ns")), step
        assert len(g) < len(e) and (g["dur_ns"] > 0).all()
    layers = ModelArgs.from_checkpoint(ckpt).n_layers
    assert {b"layer.compute"} <= set(ev_g["name"].tolist()) and set(ev_g["layer"].tolist()) >= set(range(layers))


@torch.inference_mode()
def test_fp8_kept_equals_dequantized(world):
    """fp32 activations (the kernels' tf32x3 dots against cuBLAS fp32): in bf16 a last-bit difference can
    flip a top-k routing choice of this random model, which says nothing about the kernels."""
    ckpt = checkpoint_dir("tiny", "fp8")
    keep, deq = (_engine(world, ckpt, 4, cuda_graph="off", fp8_weights=m, dtype="fp32") for m in ("keep", "dequant"))
    assert keep.info["fp8_kept_tensors"] > 0 and deq.info["fp8_kept_tensors"] == 0
    assert keep.info["moe_path"] == "grouped-fp8"
    assert keep.info["param_bytes"] < 0.5 * deq.info["param_bytes"]
    tokens, mask = left_pad(_prompts(ckpt, 8), 1, "cuda")
    a, b = keep.prefill(tokens, mask), deq.prefill(tokens, mask)
    assert (a - b).abs().max().item() < 1e-3
    nxt = b.argmax(-1)
    assert (keep.decode(nxt) - deq.decode(nxt)).abs().max().item() < 1e-3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpu_graph_run_ends(tmp_path):
    """A 2-GPU run whose decode steps replay captured graphs (NCCL all-reduces inside) finishes and
    exits: the engine destroys its graphs before the process groups (with a graph alive, NCCL's
    teardown hung forever after the outputs were written); its tokens equal those of the same
    static-shape steps run eagerly (bf16: the grouped MoE path, the one graphs capture)."""
    from conftest import mpirun

    ckpt = checkpoint_dir("tiny", "bf16")
    rows = {}
    for mode in ("auto", "static"):
        out, trace = tmp_path / f"{mode}.jsonl", tmp_path / f"{mode}-trace"
        r = mpirun(2, ["--checkpoint", str(ckpt), "--prompts", str(PROMPTS20), "--output", str(out),
                       "--engine", "native", "--group-size", "2", "--device", "cuda", "--dtype", "bf16",
                       "--max-new-tokens", "8", "--no-progress", "--cuda-graph", mode, "--trace-dir", str(trace)],
                   timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
        rows[mode] = [json.loads(line)["completion_token_ids"] for line in out.read_text().splitlines()]
        with h5py.File(trace / "merged.h5") as f:
            info = json.loads(f["ranks"]["0"].attrs["engine_info"])
        assert info["decode_mode"] == ("graph" if mode == "auto" else "static")
    assert len(rows["auto"]) == 20 and rows["auto"] == rows["static"]
