"""traces.cpu_scaling (`make scaling`): the layouts run and are summarized from their traces into two
series, each against the 1-rank run; efficiency is (tokens/s per rank) / (1 rank's)."""
from __future__ import annotations

import json
import math

from traces import cpu_scaling as S


def test_series_and_efficiency():
    rows = {n: {"ranks": r, "tokens_per_s": 10.0 * r * (0.5 if n == "G4" else 1.0), "steps_per_s": 1.0,
                "decode_ms": 1.0, "decode_comm_pct": 0.0, "group_size": g, "device": "cpu", "engine": "native",
                "tokens": 100.0, "wall_s": 1.0}
            for n, (_, r, g, _) in S.LAYOUTS.items()}
    s = S.series(rows)
    assert [r["layout"] for r in s["replica"]] == ["G1", "2xG1", "4xG1"]
    assert [r["layout"] for r in s["group"]] == ["G1", "G2", "P2", "G4", "P2G2"]
    eff = {r["layout"]: r["efficiency"] for r in s["group"]}
    assert math.isclose(eff["G2"], 1.0) and math.isclose(eff["G4"], 0.5)


def test_two_layouts_run_and_are_written(tmp_path, tiny_bf16):
    assert S.main(["--checkpoint", str(tiny_bf16), "--layouts", "G1,2xG1", "--new-tokens", "2",
                   "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")]) == 0
    (doc_path,) = (tmp_path / "o").glob("cpu-*.json")
    doc = json.loads(doc_path.read_text())
    rep = doc["series"]["replica"]
    assert [r["layout"] for r in rep] == ["G1", "2xG1"] and rep[0]["efficiency"] == 1.0
    assert all(r["tokens"] > 0 and r["throughput"] > 0 for r in rep)  # tokens generated, from rank 0's trace
    assert doc_path.with_suffix(".png").stat().st_size > 0 and doc_path.with_suffix(".md").is_file()
