"""traces.bench_plot on the stored H200 gpu-bench result: a PNG with one line per configuration."""
from __future__ import annotations

import json

from conftest import ROOT
from traces.bench_plot import plot_bench

RESULT = ROOT / "traces" / "results" / "bench" / "NVIDIA_H200-2026-11-28.json"


def test_plot_of_the_stored_result(tmp_path):
    doc = json.loads(RESULT.read_text())
    out = plot_bench(doc, tmp_path / "bench.png", skip=("hf-1gpu-bf16",))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    tags = {r["tag"] for r in doc["rows"]}
    assert {"native-1gpu-bf16", "native-1gpu-fp8", "native-2gpu-bf16", "deepspeed-2gpu-bf16"} <= tags
    assert all(r["decode_floor_ms"] > 0 and r["decode_vs_floor"] >= 1 for r in doc["rows"])  # nothing beats the floor
