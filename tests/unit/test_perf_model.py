"""traces.model: the fit recovers known parameters, the collective and pipeline formulas behave, memory
says what fits, and the stored model file is what the code makes from the stored measurements."""
from __future__ import annotations

import json
import math

import pytest

from spmd.config import ModelArgs
from traces import model as perf_model

SLICE = ModelArgs.from_config(json.loads(perf_model.SLICE.read_text()))
FULL = ModelArgs.from_config(json.loads(perf_model.FULL.read_text()))
INTRA = perf_model.Link(3e-6, 450e9, "test")
INTER = perf_model.Link(5e-6, 12.5e9, "test")


def _rows(c: float, eta: float, copy_gbps: float, weights: str = "bf16") -> list[dict]:
    out = []
    for b in (1, 8, 32, 64):
        nb = perf_model._stage_bytes(SLICE, range(SLICE.n_layers), b, 1, weights, True)
        t = c * (SLICE.n_layers + 1) + nb / (eta * copy_gbps * 1e9)
        out.append({"engine": "native", "gpus": 1, "pp": 1, "weights": weights, "decode_mode": "graph",
                    "batch": b, "decode_ms_step": t * 1e3, "tag": f"native-1gpu-{weights}"})
    return out


def test_fit_recovers_known_parameters():
    fits = perf_model.fit_compute(_rows(150e-6, 0.7, 4000.0) + _rows(90e-6, 0.5, 4000.0, "fp8"), SLICE, 4000.0)
    bf, f8 = fits["graph", "bf16"], fits["graph", "fp8"]
    assert bf.c_layer_s == pytest.approx(150e-6, rel=1e-6) and bf.eta == pytest.approx(0.7, rel=1e-6)
    assert f8.c_layer_s == pytest.approx(90e-6, rel=1e-6) and f8.eta == pytest.approx(0.5, rel=1e-6)
    assert bf.rms_rel_err < 1e-9 and bf.rows == 4


def test_collectives():
    assert perf_model.ring_allreduce_s(1e6, 1, INTRA) == 0.0
    assert perf_model.ring_allreduce_s(1e6, 2, INTRA) == pytest.approx(2 * (3e-6 + 1e6 / (2 * 450e9)))
    assert perf_model.allreduce_s(1e6, 8, INTRA, INTER) == perf_model.ring_allreduce_s(1e6, 8, INTRA)  # one node: one ring
    two = perf_model.allreduce_s(1e6, 16, INTRA, INTER)
    assert two == pytest.approx(perf_model.ring_allreduce_s(1e6, 8, INTRA) + perf_model.ring_allreduce_s(1e6 / 8, 2, INTER))
    assert two > perf_model.allreduce_s(1e6, 8, INTRA, INTER)


def test_pipeline_step():
    fit = perf_model.Fit("graph", "bf16", 100e-6, 0.8, 4, 0.0)
    gpu = perf_model.Gpu("x", 4000.0, 141.0)
    plain = perf_model.step_s(SLICE, perf_model.Layout(1), 32, fit, gpu, INTRA, INTER)
    assert plain["bubble"] == 0 and plain["p2p_s"] == 0 and plain["allreduce_s"] == 0  # one GPU
    assert plain["step_s"] == pytest.approx(plain["compute_s"])
    pipe = perf_model.step_s(SLICE, perf_model.Layout(1, pp=2, micro=2), 32, fit, gpu, INTRA, INTER)
    assert pipe["bubble"] == pytest.approx(1 / 3)
    slowest = pipe["compute_s"] + pipe["allreduce_s"] + pipe["p2p_s"]
    assert pipe["step_s"] > 3 * slowest  # (M + P - 1) stage times, then the logits broadcast
    assert perf_model.step_s(SLICE, perf_model.Layout(2), 32, fit, gpu, INTRA, INTER)["allreduce_s"] > 0


def test_memory_says_what_fits():
    """The full FP8 model on one node: about 690 GB of weights over 8 GPUs, so an H200 node (141 GB each)
    holds it and an H100 node (80 GB) does not; two pipeline stages halve the weights per GPU."""
    one = perf_model.memory_gib(FULL, perf_model.Layout(8), 1, 4096, "fp8")
    assert 70 < one < 95
    assert perf_model.memory_gib(FULL, perf_model.Layout(8, pp=2, micro=2), 1, 4096, "fp8") < 0.6 * one
    assert perf_model.memory_gib(FULL, perf_model.Layout(8), 64, 4096, "fp8") > one  # the latent cache grows with rows


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15) or (math.isnan(a) and math.isnan(b))
    return a == b


def test_stored_model_is_regenerated_from_the_stored_measurements():
    doc = perf_model.build(perf_model.BENCH)
    stored = json.loads((perf_model.ROOT / "traces/results/model/model-NVIDIA_H200.json").read_text())
    assert _close(json.loads(json.dumps(doc)), stored)  # numbers to 1e-9: another machine's lstsq may differ in the last bits
    bench = {}  # (config, batch) -> ms from the first file that has it, as load_bench takes it
    for p in perf_model.BENCH:
        for r in json.loads(p.read_text())["rows"]:
            if "error" not in r:
                bench.setdefault((r["tag"], r["batch"]), r["decode_ms_step"])
    assert doc["validation"] and all(v["measured_ms"] == bench[v["tag"], v["batch"]] for v in doc["validation"])
    assert all(math.isclose(v["error"], v["predicted_ms"] / v["measured_ms"] - 1) for v in doc["validation"])
    layouts = {v["layout"] for v in doc["validation"]}
    assert {"G2", "G1xP2(M2)"} <= layouts  # both layouts of the 2-GPU runs
    assert {r["layout"] for r in doc["projection"] if r["nodes"] == 2} == {"G16", "G8xP2(M2)", "2xG8"}
