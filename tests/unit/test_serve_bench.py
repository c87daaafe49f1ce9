"""traces.serve_bench and serve_report (`make gpu-serve-bench`): ratios to the static runs, (b) = the best static run, the targets'
pass/fail computed from the numbers, the report's tables, and reading a run's files; on hand-made summaries."""
from __future__ import annotations

import json
import math

from traces import serve_bench as sb
from traces import serve_report as report


def summary(tok_s: float, **extra) -> dict:
    return {"prompts": 4, "input_tokens": 400, "output_tokens": 100, "wall_s": 100 / tok_s,
            "output_tokens_per_s": tok_s, "ttft_p50_s": 0.5, "ttft_p95_s": 1.5, "latency_p50_s": 2.0,
            "latency_p95_s": 4.0, "queue_p50_s": 0.1, "load_s": 5.0, "decode_comm_share": 0.0,
            "gpu_idle_share": 0.2, "scheduler": {"batching": "static", "slots": 8, "step_efficiency": 0.5}, **extra}


def row(name, batching, batch, role, tok_s=None, completed=4) -> dict:
    r = {"name": name, "batching": batching, "batch_size": batch, "role": role, "peak_gpu_gib": 30.0,
         "completed": completed, "requests": 4}
    return {**r, "summary": summary(tok_s)} if tok_s else {**r, "error": "exit 1: CUDA out of memory\nmore"}


def runs(cont: float) -> list[dict]:
    return [row("static-8", "static", 8, "a", 100.0), row("static-64", "static", 64, "sweep", 250.0),
            row("static-128", "static", 128, "sweep", 200.0), row("static-256", "static", 256, "sweep"),
            row("continuous", "continuous", 0, "c", cont)]


def test_ratios_best_static_and_targets():
    an = report.analyze(runs(400.0))
    assert (an["a"], an["b"], an["c"]) == ("static-8", "static-64", "continuous")
    by = {r["name"]: r for r in an["rows"]}
    assert math.isclose(by["continuous"]["vs_a"], 4.0) and math.isclose(by["continuous"]["vs_b"], 1.6)
    assert math.isclose(by["static-8"]["vs_b"], 0.4) and by["static-256"]["vs_a"] is None  # failed: no ratio
    t = {x["needed"]: x for x in an["targets"]}
    assert t[3.0]["pass"] is True and t[1.5]["pass"] is True and t[1.5]["target"].endswith("(b) static-64")
    an = report.analyze(runs(350.0))  # 3.5x (a) but 1.4x (b)
    assert [x["pass"] for x in an["targets"]] == [True, False]
    assert math.isclose(an["targets"][1]["ratio"], 1.4)


def test_best_static_may_be_the_default_and_missing_runs_are_not_measured():
    rs = runs(400.0)
    rs[1]["summary"]["output_tokens_per_s"] = 50.0
    rs[2]["summary"]["output_tokens_per_s"] = 60.0
    assert report.analyze(rs)["b"] == "static-8"
    an = report.analyze(runs(400.0)[:4])  # no continuous run
    assert an["c"] is None and [x["pass"] for x in an["targets"]] == [None, None]


def test_markdown_tables_and_incomplete_runs():
    rs = runs(400.0)
    rs[0]["completed"] = 3
    doc = {"checkpoint": "slice-fp8", "machine": "NVIDIA H100", "date": "2026-12-06", "analysis": report.analyze(rs),
           "workload": {"seed": 0, "summary": "4 prompts", "source": "Azure"},
           "long": {"description": "2 prompts of 4096 tokens", "summary": summary(10.0), "peak_gpu_gib": 61.25,
                    "by_prompt_tokens": {"4096": {"completed": 2, "requests": 2}}}}
    md = report.markdown(doc)
    assert "| continuous | continuous | 8 | 400 | 4.00 | 1.60 | 20.0% | 50.0% | 0.50 / 1.50 | 2.00 / 4.00 |" in md
    assert "| static-256 | static | 256 | failed: exit 1: CUDA out of memory |" in md
    assert "- continuous >= 3x (a) static-8: 4.00× — **pass** (not comparable" in md
    assert "- continuous >= 1.5x (b) static-64: 1.60× — **pass**\n" in md
    assert "in static-8 (column completed)" in md
    assert "| 4096 | 2 | 2 |" in md and "Peak GPU memory: 61.2 GiB" in md
    doc["long"]["peak_gpu_gib"] = None
    assert "Peak GPU memory: not recorded" in report.markdown(doc)


def test_run_files_are_read(tmp_path):
    out = tmp_path / "continuous.jsonl"
    out.write_text("".join(json.dumps({"id": i, "completion_token_ids": [1] * n}) + "\n"
                           for i, n in (("a", 5), ("b", 3), ("c", 7))))
    reqs = [{"id": "a", "max_new_tokens": 5, "prompt_tokens": 100}, {"id": "b", "max_new_tokens": 4,
            "prompt_tokens": 100}, {"id": "c", "max_new_tokens": 7, "prompt_tokens": 900}]
    c = sb.completion(out, reqs)
    assert (c["completed"], c["requests"], c["output_tokens"]) == (2, 3, 15)
    assert c["by_prompt_tokens"] == {"100": {"completed": 1, "requests": 2}, "900": {"completed": 1, "requests": 1}}
    assert sb.summary_path(out) == tmp_path / "continuous.jsonl.summary.json"  # neither exists yet
    (tmp_path / "continuous.summary.json").write_text("{}")
    assert sb.summary_path(out) == tmp_path / "continuous.summary.json"
    assert sb.trace_facts(tmp_path / "no-trace") == {}
    assert [r.name for r in sb.plan(8, [8, 64])] == ["static-8", "static-64", "continuous"]


def test_the_error_line_of_a_failed_run():
    oom = ("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
           "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB.\n"
           "error: rank 0 of 1 (gpu01): OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB.\n"
           "[rank0]:[W1206] Warning: destroy_process_group() was not called\nMPI_ABORT was invoked on rank 0\n")
    assert sb.error_line(oom).startswith("error: rank 0 of 1 (gpu01): OutOfMemoryError")
    assert sb.error_line(oom.replace("error: rank", "rank")).startswith("torch.OutOfMemoryError: CUDA out of memory")
    assert sb.error_line("killed\n") == "killed" and sb.error_line("") == "(no output)"


def test_a_run_past_its_time_is_stopped_with_its_process_group():
    import sys
    import time

    t0 = time.perf_counter()
    rc, err = sb.launch([sys.executable, "-c", "import subprocess, sys, time; "
                         "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"], 1.0)
    assert rc == 124 and err.startswith("error: timed out after 1 s") and time.perf_counter() - t0 < 20
    assert sb.launch([sys.executable, "-c", "import sys; sys.exit('bad input')"], 30) == (1, "bad input\n")


def test_variants_are_continuous_runs_with_their_options_and_their_own_targets(tmp_path):
    plan = sb.plan(8, [16], ["varlen=--mla-decode varlen --slots 64"])
    assert [(r.name, r.role) for r in plan][-2:] == [("continuous", "c"), ("continuous-varlen", "variant")]
    a = sb.parse(["--device", "cpu", "--checkpoint", str(tmp_path), "--work", str(tmp_path)])
    cmd = sb.command(plan[-1], a, tmp_path / "p.jsonl", 32)
    assert cmd[-6:] == ["--batching", "continuous", "--mla-decode", "varlen", "--slots", "64"]
    d2 = sb.plan(8, [], ["D2@2=--group-layout dpa --group-size 2"])[-1]
    assert (d2.name, d2.ranks) == ("continuous-D2", 2) and sb.command(d2, a, tmp_path / "p.jsonl", 32)[:3] == \
        sb.commands.mpirun(2, "spmd")[:3]
    for bad in ("varlen", "=--slots 4", "a b=--slots 4", "x@0=--slots 4"):
        try:
            sb.plan(8, [], [bad])
        except SystemExit as e:
            assert "NAME[@RANKS]=OPTIONS" in str(e)
        else:
            raise AssertionError(bad)
    rs = runs(400.0) + [row("continuous-varlen", "continuous", 0, "variant", 500.0)]
    names = [t["target"] for t in report.analyze(rs)["targets"]]
    assert names == ["continuous >= 3x (a) static-8", "continuous >= 1.5x (b) static-64",
                     "continuous-varlen >= 3x (a) static-8", "continuous-varlen >= 1.5x (b) static-64"]
    assert [t["pass"] for t in report.analyze(rs)["targets"]] == [True, True, True, True]


def test_decode_check_per_shape_and_its_target():
    cont = row("continuous", "continuous", 0, "c", 400.0)
    cont["summary"]["scheduler"] = {"decode_shapes": {"8x128": 50, "64x512": 10, "64x1024": 30, "16x128": 5},
                                    "decode_ms_by_shape": {"8x128": 4.0, "64x512": 9.0, "64x1024": 12.0},
                                    "decode_gpu_ms_by_shape": {"8x128": 3.0, "64x1024": 10.0},
                                    "loop_s": {"admit": 0.1, "prefill": 2.0, "decode": 5.0, "emit": 0.2}}
    check = sb.decode_check(cont, [{"batch": 8, "decode_ms_step": 3.2}, {"batch": 64, "decode_ms_step": 10.0}])
    assert [r["shape"] for r in check["shapes"]] == ["8x128", "16x128", "64x512", "64x1024"]
    assert check["target_shape"] == "64x1024" and check["steps"] == 95  # most rows, then most steps
    md = "\n".join(report.decode_lines([check, {"error": "continuous-x: no decode shapes in its summary"}]))
    assert "| 64x1024 | 30 | 12.00 | 10.00 | 1.20 | 10.00 | 1.20 |" in md
    assert "| 16x128 | 5 | — | — | — | — | — |" in md
    assert "wall / gpu_bench 1.20x, <= 1.3x: **pass**" in md and "decode 5.00" in md
    assert "## Decode steps: continuous-x: no decode shapes" in md
    assert "error" in sb.decode_check(row("c2", "continuous", 0, "variant", 1.0), [])
