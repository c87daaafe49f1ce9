"""Serial: the run summary (spmd.runtime.summary), its trace-report block, the progress bar's token count."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from spmd.obs.timers import Timers
from spmd.runtime import dispatch, summary
from spmd.runtime.records import Result

MS = 1_000_000  # ns


def _results() -> list[Result]:
    """Four prompts (indexes 0, 2, 3, 5 of six): 3 + 5 + 2 + 6 = 16 output tokens."""
    return [Result(0, [1, 2, 3], ttft_s=0.1, latency_s=1.0, queue_s=0.0),
            Result(2, [1] * 5, ttft_s=0.2, latency_s=2.0, queue_s=0.5),
            Result(3, [1, 2], ttft_s=0.3, latency_s=3.0, queue_s=1.0),
            Result(5, [1] * 6, ttft_s=0.4, latency_s=4.0, queue_s=1.5)]


def test_summarize_counts_rates_and_percentiles():
    d = summary.summarize(_results(), [10, 99, 20, 30, 99, 40], wall_s=4.0, output="out/x.jsonl", load_s=2.5,
                          scheduler={"batching": "continuous", "slots": 4, "slot_steps": np.int64(20)})
    assert (d["prompts"], d["input_tokens"], d["output_tokens"]) == (4, 100, 16)
    assert d["wall_s"] == 4.0 and d["output_tokens_per_s"] == 4.0 and d["load_s"] == 2.5
    assert d["ttft_p50_s"] == pytest.approx(0.25) and d["ttft_p95_s"] == pytest.approx(0.385)  # numpy linear
    assert d["latency_p50_s"] == pytest.approx(2.5) and d["latency_p95_s"] == pytest.approx(3.85)
    assert d["queue_p50_s"] == pytest.approx(0.75)
    assert d["scheduler"]["step_efficiency"] == pytest.approx(12 / 20)  # 16 tokens, 4 of them from prefill
    assert type(d["scheduler"]["slot_steps"]) is int
    assert d["decode_comm_share"] is d["gpu_busy_share"] is d["gpu_idle_share"] is None  # no timers
    assert d["output"] == "out/x.jsonl"
    json.dumps(d)  # JSON as it is


def test_summarize_nothing_run_and_no_slot_steps():
    d = summary.summarize([], [5], wall_s=0.0, output="o.jsonl", scheduler={"batching": "static", "slot_steps": 0})
    assert (d["prompts"], d["output_tokens"], d["output_tokens_per_s"], d["ttft_p50_s"]) == (0, 0, None, None)
    assert "step_efficiency" not in d["scheduler"]
    assert summary.format_summary(d)[0].startswith("summary:")


def _timers_table() -> np.ndarray:
    """Rank 0's events: load, then serving from 1000 ms: decode compute 0-60 ms and comm 40-80 ms (overlapping
    streams), a decode wait of 20 ms; another compute at 150-170 ms."""
    t = Timers(0, "cpu")
    t.set_phase("load")
    t.record("load.weights", "io", 0, 900 * MS)
    t.set_phase("decode", 1)
    t.record("layer", "compute", 1000 * MS, 60 * MS)
    t.record("moe.combine", "comm", 1040 * MS, 40 * MS, nbytes=8)
    t.record("dispatch.request", "wait", 1080 * MS, 20 * MS)
    t.set_phase("prefill")
    t.record("layer", "compute", 1150 * MS, 20 * MS)
    return t.table()


def test_timer_shares_comm_share_and_gpu_busy():
    ev = _timers_table()
    shares = summary.timer_shares(ev, serve_start_ns=1000 * MS, wall_s=0.2, gpu=True)
    assert shares.decode_comm_share == pytest.approx(40 / 120)  # comm / (compute + comm + wait) of decode
    assert shares.gpu_busy_share == pytest.approx((80 + 20) / 200)  # the union 1000-1080, 1150-1170 ms
    assert summary.timer_shares(ev, 1000 * MS, 0.2, gpu=False).gpu_busy_share is None  # host-timed: no GPU
    assert summary.timer_shares(ev[ev["phase"] != b"decode"], 0, 0.2, gpu=False).decode_comm_share is None


def test_report_run_writes_the_json_and_prints_the_path(tmp_path, capsys):
    out = tmp_path / "out" / "x.jsonl"
    out.parent.mkdir()
    args = SimpleNamespace(output=out)
    prompt_set = SimpleNamespace(ids=[[1] * 10, [], [1] * 20, [1] * 30, [], [1] * 40])
    scheduler = {"batching": "continuous", "decode_steps": 5, "slot_steps": 32}
    timers = Timers(0, "cpu")
    timers.set_phase("decode")
    timers.record("attn", "compute", 0, 3 * MS)
    timers.record("tp.all_reduce", "comm", 3 * MS, 1 * MS)
    d = summary.report_run(args, prompt_set, _results(), scheduler, timers, serve_start_ns=2_000_000_000, wall_s=8.0)
    path = tmp_path / "out" / "x.summary.json"
    assert summary.summary_path(out) == path and json.loads(path.read_text()) == d
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert d["load_s"] == 2.0 and d["decode_comm_share"] == pytest.approx(0.25)
    assert d["gpu_busy_share"] is None and d["scheduler"]["step_efficiency"] == 12 / 32
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "summary:   4 prompts, 100 input + 16 output tokens in 8.00 s: 2.0 output tokens/s"
    assert lines[1].startswith("latency:   TTFT p50/p95 0.250/0.385 s, latency p50/p95 2.50/3.85 s")
    assert lines[2] == "time:      load 2.00 s, decode comm share 25%"
    assert "step efficiency 38%" in lines[3] and "decode steps 5" in lines[3]
    assert lines[4] == f"output:    {out} (summary: {path})"
    assert len({line.index(line.split(":", 1)[1].strip()) for line in lines}) == 1  # one text column


def test_trace_report_prints_the_stored_summary():
    from traces import report

    d = summary.summarize(_results(), [10, 99, 20, 30, 99, 40], 4.0, "o.jsonl")
    t = report.Trace(Path("run"), np.zeros(0), {0: {"summary": json.dumps(d)}}, {}, Path("run/merged.h5"))
    assert report._summary(t) == ["\n".join(summary.format_summary(d))]
    assert report._summary(replace(t, ranks={0: {}})) == []  # a run from before the summary


class _Comm:
    def iprobe(self, **kw) -> bool:
        return False  # no other leader reports


def test_progress_counts_output_tokens_and_shows_the_rate():
    world = SimpleNamespace(rank=0, is_leader=True, first=0, comm=_Comm())
    p = dispatch.Progress(world, total=10, enabled=True, initial=2)
    p.update(3, tokens=30)
    p.add(1, 12)
    p.update(1)  # callers without tokens still count prompts
    assert (p.done, p.tokens) == (7, 42) and p.rate() > 0
    assert "tok/s" in p.bar.postfix
    p.bar.close()
