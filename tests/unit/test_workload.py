"""traces.workload: seeded chat-like length draws, prompts of exact token counts, the JSONL the program reads."""
from __future__ import annotations

import json

import numpy as np
import pytest

from traces import workload

SMALL_IN = workload.LengthDist(median=60, sigma=0.99, lo=16, hi=300)  # the tiny model's context is 2048
SMALL_OUT = workload.LengthDist(median=8, sigma=0.86, lo=4, hi=40)


def test_draws_are_seeded_and_prefix_stable():
    a_in, a_out = workload.draw_lengths(2000, seed=0)
    b_in, b_out = workload.draw_lengths(2000, seed=0)
    assert np.array_equal(a_in, b_in) and np.array_equal(a_out, b_out)
    c_in, c_out = workload.draw_lengths(300, seed=0)  # the first N of a larger set are the set of N
    assert np.array_equal(c_in, a_in[:300]) and np.array_equal(c_out, a_out[:300])
    d_in, _ = workload.draw_lengths(2000, seed=1)
    assert not np.array_equal(d_in, a_in)


def test_draws_follow_the_clipped_log_normal():
    inputs, outputs = workload.draw_lengths(20000, seed=3)
    for x, d in ((inputs, workload.INPUT), (outputs, workload.OUTPUT)):
        assert x.dtype.kind == "i" and x.min() == d.lo and x.max() == d.hi  # clipped, both ends reached
        assert abs(np.median(x) / d.median - 1) < 0.03
        inside = x[(x > d.lo) & (x < d.hi)]
        assert abs(np.log(inside).std() - d.sigma) < 0.15 * d.sigma  # the unclipped middle keeps the spread
    assert abs(outputs.mean() - 185) < 10  # the documented mean of the default outputs
    fixed = workload.draw(workload.LengthDist(1, 1, 1, 1, fixed=4096), 5, np.random.default_rng(0))
    assert fixed.tolist() == [4096] * 5


def test_prompts_have_exact_token_counts_and_the_program_reads_them(tmp_path, tiny_bf16):
    from spmd.runtime.prompts import load_tokenizer, read_prompts

    out = tmp_path / "w.jsonl"
    info = workload.generate(tiny_bf16, 40, 7, out, SMALL_IN, SMALL_OUT, prefix="chat")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    inputs, outputs = workload.draw_lengths(40, 7, SMALL_IN, SMALL_OUT)
    tok = load_tokenizer(tiny_bf16)
    assert [len(tok(r["prompt"])["input_ids"]) for r in rows] == inputs.tolist()  # raw, BOS included
    assert [r["max_new_tokens"] for r in rows] == outputs.tolist()
    assert all(set(r) == {"id", "prompt", "max_new_tokens", "ignore_eos"} and r["ignore_eos"] is True for r in rows)
    assert [r["id"] for r in rows[:2]] == ["chat-00001", "chat-00002"]
    assert [p.id for p in read_prompts(out)] == [r["id"] for r in rows]
    assert info["input"]["max"] == inputs.max() and "AzureLLMInferenceTrace_conv" in info["source"]
    again = tmp_path / "again.jsonl"
    workload.generate(tiny_bf16, 40, 7, again, SMALL_IN, SMALL_OUT)
    assert again.read_text() == out.read_text()  # seeded: the same file


def test_fixed_lengths_and_repair_of_an_off_text(tiny_bf16):
    from spmd.runtime.prompts import load_tokenizer

    maker = workload.PromptMaker(load_tokenizer(tiny_bf16))
    texts = workload.make_texts(maker, np.array([1536, 1536, 2]), seed=0)
    assert maker.count(texts) == [1536, 1536, 2]
    rng = np.random.default_rng(0)
    odd = "Ünïcödé, digits 12345 & punctuation!? " * 20  # not the one-token-per-word construction
    assert maker.count([maker.exact(odd, 50, rng)]) == [50]  # trimmed
    assert maker.count([maker.exact("hi", 90, rng)]) == [90]  # extended


def test_context_and_cli_checks(tmp_path, tiny_bf16, capsys):
    long = workload.LengthDist(2040, 0.1, 2040, 2040, fixed=2040)
    with pytest.raises(ValueError, match="reaches 2056 tokens > the model's context of 2048"):
        workload.generate(tiny_bf16, 2, 0, tmp_path / "x.jsonl", long, workload.LengthDist(16, 0, 16, 16, fixed=16))
    assert workload.main(["--n", "3", "--checkpoint", str(tiny_bf16), "--out", str(tmp_path / "c.jsonl"),
                          "--fixed-input", "100", "--fixed-output", "7"]) == 0
    assert "3 prompts: input tokens mean 100" in capsys.readouterr().out
    assert {json.loads(line)["max_new_tokens"] for line in (tmp_path / "c.jsonl").read_text().splitlines()} == {7}
    with pytest.raises(SystemExit):
        workload.parse(["--checkpoint", "c", "--out", "o", "--min-input", "10", "--max-input", "5"])
