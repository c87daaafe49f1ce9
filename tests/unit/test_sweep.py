"""traces.sweep (`make scaling`, `make gpu-scaling`): the layouts run and are summarized from their traces
into series against G1; efficiency is (tokens/s per model rank) / (G1's); +O runs compare with inline."""
from __future__ import annotations

import json
import math

from traces import sweep as sweeps


def test_series_efficiency_and_orchestration():
    rows = {n: {"ranks": r + o, "tokens_per_s": 10.0 * r * (0.5 if n == "G4" else 1.0), "steps_per_s": 1.0,
                "decode_ms": 1.0, "decode_comm_pct": 0.0, "group_size": g, "device": "cpu", "engine": "native",
                "tokens": 100.0, "wall_s": 1.0, "job_s": 2.0, "job_tokens_per_s": 50.0 * r * (1.2 if o else 1.0),
                "model_idle_pct": 5.0}
            for n, (_, r, g, _, twin) in sweeps.LAYOUTS.items() for o in [twin is not None]}
    s = sweeps.series(rows)
    assert [r["layout"] for r in s["replica"]] == ["G1", "2xG1", "2xG2", "4xG1"]
    assert [r["layout"] for r in s["group"]] == ["G1", "G2", "P2", "G4", "P2G2"]
    eff = {r["layout"]: r["efficiency"] for r in s["group"]}
    assert math.isclose(eff["G2"], 1.0) and math.isclose(eff["G4"], 0.5)
    orch = {r["layout"]: r for r in s["orchestration"]}
    assert {"G1", "G1+O", "2xG1", "2xG1+O", "4xG1+O"} <= set(orch)  # +O layouts and their inline twins
    assert orch["2xG1+O"]["ranks"] == 2 and math.isclose(orch["2xG1+O"]["vs_inline"], 1.2)


def test_synthesized_prompts_join_the_twenty(tmp_path):
    path = sweeps.prompt_file(50, tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    base = [json.loads(line)["prompt"] for line in sweeps.PROMPTS.read_text().splitlines()]
    assert len(rows) == 50 and len({r["id"] for r in rows}) == 50
    assert all(any(b in r["prompt"] for b in base) for r in rows)
    assert len({len(r["prompt"]) for r in rows}) > 10  # lengths vary
    assert sweeps.prompt_file(50, tmp_path).read_text() == path.read_text()  # seeded
    assert sweeps.prompt_file(20, tmp_path) == sweeps.PROMPTS


def test_inline_and_dedicated_layouts_run_and_are_written(tmp_path, tiny_bf16):
    assert sweeps.main(["--checkpoint", str(tiny_bf16), "--layouts", "G1,G1+O,2xG1", "--new-tokens", "2",
                   "--prompts", "24", "--warmup", "3", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")]) == 0
    warm = (tmp_path / "w" / "warmup-G1.jsonl").read_text().splitlines()
    assert len(warm) == 3 and not (tmp_path / "w" / "warmup-2xG1.jsonl").exists()  # one run per model shape
    (doc_path,) = (tmp_path / "o").glob("cpu-*.json")
    doc = json.loads(doc_path.read_text())
    rep = doc["series"]["replica"]
    assert [r["layout"] for r in rep] == ["G1", "2xG1"] and rep[0]["efficiency"] == 1.0
    assert all(r["tokens"] == 48 and r["throughput"] > 0 for r in rep)  # tokens generated, from rank 0's trace
    orch = {r["layout"]: r for r in doc["series"]["orchestration"]}
    assert set(orch) == {"G1", "G1+O"} and orch["G1+O"]["vs_inline"] > 0 and orch["G1"]["efficiency"] == 1.0
    assert all(r["warmup"] == 3 for r in doc["runs"].values())
    ded = doc["runs"]["G1+O"]["per_rank"]  # rank 0 the orchestrator: host work and waiting, no model
    assert set(ded) == {"0", "1"} and ded["0"]["decode"]["compute"] == 0 and ded["0"]["other"]["wait"] > 0
    assert ded["1"]["decode"]["compute"] > 0 and ded["1"]["prefill"]["compute"] > 0
    assert all(r["job_s"] > r["wall_s"] > 0 and 0 <= r["model_idle_pct"] < 100 for r in orch.values())
    a = [json.loads(x)["completion_token_ids"] for x in (tmp_path / "w" / "G1.jsonl").read_text().splitlines()]
    b = [json.loads(x)["completion_token_ids"] for x in (tmp_path / "w" / "G1+O.jsonl").read_text().splitlines()]
    assert a == b and len(a) == 24
    assert doc_path.with_suffix(".png").stat().st_size > 0 and doc_path.with_suffix(".md").is_file()


def test_resummarize_rebuilds_the_stored_series(tmp_path):
    """--resummarize: a stored result file's series, .md and .png come back from its runs alone."""
    import json
    import shutil

    for name in ("gpu-NVIDIA_H200-2026-11-28", "cpu-vm-2026-11-28"):
        src = sweeps.ROOT / "traces" / "results" / "scaling" / f"{name}.json"
        stored = json.loads(src.read_text())
        path = tmp_path / src.name
        shutil.copy(src, path)
        doc = dict(stored, series={})
        path.write_text(json.dumps(doc))
        assert sweeps.main(["--resummarize", str(path)]) == 0
        assert json.loads(path.read_text()) == stored
        assert path.with_suffix(".md").read_text() == src.with_suffix(".md").read_text()
        assert path.with_suffix(".png").stat().st_size > 0
