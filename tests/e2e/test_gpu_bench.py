"""`traces.gpu_bench run` on CPU (2 ranks, tiny checkpoint): the benchmark's own logic without a GPU.

The timed rows come out for every batch size with the floor's bytes, and the traced batch counts the
collectives of one decode step from the timers: one embedding all-reduce, one per attention, one per
dense MLP and one per MoE layer, and the head's all-gather, with their bytes.
"""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, spmd_env
from spmd.config import ModelArgs


def test_bench_rows_and_traced_collectives(tiny_bf16, tmp_path):
    out = tmp_path / "rows.json"
    cmd = ["mpirun", "-n", "2", sys.executable, "-m", "traces.gpu_bench", "run", "--engine", "native",
           "--checkpoint", str(tiny_bf16), "--group-size", "2", "--tag", "t", "--out", str(out),
           "--batches", "1,3", "--prompt", "12", "--steps", "5", "--device", "cpu", "--cuda-graph", "static",
           "--trace-batches", "3"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=spmd_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [row["batch"] for row in rows] == [1, 3]
    assert all(row["decode_mode"] == "static" and row["decode_ms_step"] > 0 for row in rows)
    assert rows[0]["decode_floor_bytes"] < rows[1]["decode_floor_bytes"]
    m = ModelArgs.from_checkpoint(tiny_bf16)
    assert "comm_per_step" not in rows[0]
    assert rows[1]["comm_per_step"] == 1 + m.n_layers + m.n_layers + 1  # embed, attn, mlp/moe, head
    assert rows[1]["comm_names"] == ["attn.o_proj.all_reduce", "embed.all_reduce", "head.all_gather",
                                     "mlp.down.all_reduce", "moe.combine"]
    act = 3 * m.dim * 2  # one bf16 (3, dim) activation per all-reduce
    assert rows[1]["comm_bytes_per_step"] == (1 + 2 * m.n_layers) * act + 3 * (m.vocab_size // 2) * 2
    assert rows[1]["comm_ms_per_step"] > 0 and rows[1]["compute_ms_per_step"] > 0
    by_name = rows[1]["ms_per_step_by_name"]
    assert {"attn", "moe.experts", "moe.combine", "head"} <= set(by_name) and min(by_name.values()) >= 0
    assert abs(sum(by_name.values()) - rows[1]["comm_ms_per_step"] - rows[1]["compute_ms_per_step"]) < 1e-6


def test_bench_pipeline_rows_report_the_bubble(tiny_bf16, tmp_path):
    """--pp 2 on 2 ranks: 2 GPUs' worth of rows, the stage boundary's traffic and the bubble per step."""
    out = tmp_path / "rows.json"
    cmd = ["mpirun", "-n", "2", sys.executable, "-m", "traces.gpu_bench", "run", "--engine", "native",
           "--checkpoint", str(tiny_bf16), "--group-size", "1", "--pp", "2", "--tag", "t", "--out", str(out),
           "--batches", "4", "--prompt", "12", "--steps", "5", "--device", "cpu", "--trace-batches", "4"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=spmd_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["gpus"] == 2 and row["pp"] == 2 and row["decode_mode"] == "eager"
    assert set(row["comm_names"]) == {"pp.send", "pp.logits"}  # rank 0 (the first stage) writes the rows
    assert 0 < row["bubble_fraction"] < 1


def test_prefill_idle_gaps_from_kernel_times():
    """The profiled prefill's GPU idle time: the span less the union of the kernels' intervals (overlaps
    counted once), gaps of at least 20 us listed longest first with the kernels around them; host events
    are not kernels."""
    from types import SimpleNamespace as NS

    from torch.autograd import DeviceType

    from traces.gpu_bench import _idle

    def ev(a, b, name, dev=DeviceType.CUDA):
        return NS(device_type=dev, time_range=NS(start=a, end=b), name=name)

    got = _idle([ev(0, 100, "gemm"), ev(90, 120, "quant"), ev(130, 200, "norm"), ev(260, 300, "attn"),
                 ev(5, 400, "aten::prefill", DeviceType.CPU)])
    assert got["prefill_gpu_span_ms"] == 0.3 and got["prefill_gpu_idle_ms"] == (10 + 60) / 1e3
    assert got["prefill_gaps"] == [{"us": 60, "after": "norm", "before": "attn"}] and got["prefill_gaps_n"] == 1
    assert _idle([ev(0, 5, "host", DeviceType.CPU)]) == {}
