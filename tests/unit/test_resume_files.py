"""Serial: the progress directory (header, fingerprint, rows, torn lines) without running a model."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import PROMPTS20

from spmd import config
from spmd.runtime import resume as progress_files
from spmd.runtime.records import Result
from spmd.config import UsageError

IDS = [json.loads(ln)["id"] for ln in PROMPTS20.read_text().splitlines()]


def _args(ckpt: Path, out: Path, *extra: str) -> config.RunArgs:
    return config.parse_args(["--checkpoint", str(ckpt), "--prompts", str(PROMPTS20), "--output", str(out),
                         "--max-new-tokens", "6", *extra])


def _result(i: int, replica: int = 0, **kw) -> Result:
    return Result(i, [i, i + 1], 0.5 * i, 1.0 * i, replica, **kw)


def test_fresh_run_writes_a_header_and_replaces_a_stale_directory(tiny_bf16, tmp_path):
    out = tmp_path / "o.jsonl"
    logs: list[str] = []
    assert progress_files.prepare(_args(tiny_bf16, out), IDS, logs.append) == [] and logs == []
    d = progress_files.progress_dir(out)
    assert d == tmp_path / "o.jsonl.progress"
    header = json.loads((d / "header.json").read_text())
    assert header["kind"] == "spmd-progress" and header["n_prompts"] == len(IDS)
    (d / "replica-3.jsonl").write_text("old\n")
    assert progress_files.prepare(_args(tiny_bf16, out), IDS, logs.append) == []
    assert "starting over (pass --resume to continue it)" in logs[-1]
    assert sorted(f.name for f in d.iterdir()) == ["header.json"]


def test_resume_without_a_directory_starts_from_scratch(tiny_bf16, tmp_path):
    out = tmp_path / "o.jsonl"
    logs: list[str] = []
    assert progress_files.prepare(_args(tiny_bf16, out, "--resume"), IDS, logs.append) == []
    assert "no progress directory" in logs[0] and "starting from scratch" in logs[0]
    assert (progress_files.progress_dir(out) / "header.json").is_file()


def test_rows_round_trip_and_torn_lines_are_dropped(tiny_bf16, tmp_path):
    out = tmp_path / "o.jsonl"
    progress_files.prepare(_args(tiny_bf16, out), IDS, lambda m: None)
    w0, w1 = progress_files.Writer(out, 0, IDS), progress_files.Writer(out, 1, IDS)
    w0.append([_result(3), _result(0)])
    w1.append([_result(7, 1)])
    w0.append([_result(5)])
    w0.close()
    w1.close()
    d = progress_files.progress_dir(out)
    f1 = d / "replica-1.jsonl"
    good = f1.read_bytes()
    f1.write_bytes(good + b'{"index": 9, "id": "' + IDS[9].encode()[:2])  # a write cut short
    (d / "replica-2.jsonl").write_text(json.dumps({"index": 4, "id": "not-this-prompt", "completion_token_ids": [],
                                                   "ttft_s": 0, "latency_s": 0, "model_group": 2}) + "\n"
                                       + json.dumps({"index": 3, "id": IDS[3], "completion_token_ids": [9],
                                                     "ttft_s": 0, "latency_s": 0, "model_group": 2}) + "\n")
    rows, ignored = progress_files.read_rows(d, IDS, scored=False)
    assert [r.index for r in rows] == [0, 3, 5, 7] and ignored == 2  # torn line, wrong id; dup index 3 kept once
    assert rows[1] == _result(3) and rows[3] == _result(7, 1)  # replica-0's line for 3 wins (files in name order)
    assert f1.read_bytes() == good  # rewritten without the torn tail: appending goes on cleanly
    logs: list[str] = []
    got = progress_files.prepare(_args(tiny_bf16, out, "--resume", "--group-size", "2", "--dispatch", "dynamic"), IDS, logs.append)
    assert [r.index for r in got] == [0, 3, 5, 7] and "4 of 20 prompts already done" in logs[0]


def test_scores_round_trip(tiny_bf16, tmp_path):
    out = tmp_path / "o.jsonl"
    progress_files.prepare(_args(tiny_bf16, out), IDS, lambda m: None)
    score = {"target_logprob": [-0.1, float("-inf")], "top1": [4, 5]}
    w = progress_files.Writer(out, 0, IDS)
    w.append([_result(2, score=score)])
    w.close()
    rows, ignored = progress_files.read_rows(progress_files.progress_dir(out), IDS, scored=True)
    assert ignored == 0 and rows[0] == _result(2, score=score)
    assert progress_files.read_rows(progress_files.progress_dir(out), IDS, scored=False)[0] == []  # a scored row is not a plain one


@pytest.mark.parametrize("change,field", [(["--max-new-tokens", "7"], "max_new_tokens 6 there, 7 here"),
                                          (["--temperature", "0.5"], "temperature 0.0 there, 0.5 here"),
                                          (["--dtype", "fp32"], "dtype 'bf16' there, 'fp32' here"),
                                          (["--no-chat-template"], "chat True there, False here")])
def test_fingerprint_mismatch(tiny_bf16, tmp_path, change, field):
    out = tmp_path / "o.jsonl"
    progress_files.prepare(_args(tiny_bf16, out), IDS, lambda m: None)
    with pytest.raises(UsageError, match=f"--resume: .* belongs to a run with other inputs or settings .*{field}"):
        progress_files.prepare(_args(tiny_bf16, out, "--resume", *change), IDS, lambda m: None)  # a later option wins


def test_fingerprint_ignores_the_layout(tiny_bf16, tmp_path):
    a = progress_files.fingerprint(_args(tiny_bf16, tmp_path / "o.jsonl"))
    b = progress_files.fingerprint(_args(tiny_bf16, tmp_path / "o.jsonl", "--group-size", "2", "--dispatch", "dynamic",
                            "--batch-size", "3", "--dispatch-size", "5"))
    assert a == b
    other = tmp_path / "p.jsonl"
    other.write_text(PROMPTS20.read_text().replace("France", "Spain"))
    c = progress_files.fingerprint(config.parse_args(["--checkpoint", str(tiny_bf16), "--prompts", str(other), "--output", "x",
                                    "--max-new-tokens", "6"]))
    assert c["prompts_sha256"] != a["prompts_sha256"] and c["checkpoint_sha256"] == a["checkpoint_sha256"]


VOCAB = 1000  # read_rows' vocab_size in these tests; the tiny model's own is passed by the program
GOOD = {"index": 2, "id": IDS[2], "completion_token_ids": [5, 6], "ttft_s": 0.5, "latency_s": 1.0,
        "model_group": 0, "finish_reason": "length", "queue_s": 0.0}


@pytest.mark.parametrize("change,why", [
    ({"completion_token_ids": [5, -5]}, "a token id outside \\[0, 1000\\)"),
    ({"completion_token_ids": [5, VOCAB]}, "a token id outside"),
    ({"completion_token_ids": [5, True]}, "completion_token_ids is not a list of integers"),
    ({"completion_token_ids": "56"}, "completion_token_ids is not a list of integers"),
    ({"completion_token_ids": list(range(7))}, "7 tokens, more than its max_new_tokens 6"),
    ({"index": True}, "index True is not one of 0..19"),
    ({"index": 20}, "index 20 is not one of"),
    ({"id": IDS[3]}, "is not prompt 2's"),
    ({"ttft_s": "fast"}, "ttft_s 'fast' is not a finite number of seconds >= 0"),
    ({"latency_s": True}, "latency_s True is not a finite"),
    ({"queue_s": -1.0}, "queue_s -1.0 is not"),
    ({"ttft_s": float("nan")}, "ttft_s nan is not"),
    ({"model_group": "x"}, "model_group 'x' is not a group number"),
    ({"finish_reason": "bogus"}, "finish_reason 'bogus' is not one of"),
    ({"score": {}}, "a scored row in a run without --score"),
])
def test_invalid_rows_run_again_with_a_warning(tmp_path, change, why):
    d = tmp_path / "o.jsonl.progress"
    d.mkdir()
    f = d / "replica-0.jsonl"
    good0 = dict(GOOD, index=0, id=IDS[0])
    f.write_text(json.dumps(good0) + "\n" + json.dumps({**GOOD, **change}) + "\n")
    logs: list[str] = []
    rows, ignored = progress_files.read_rows(d, IDS, False, logs.append, VOCAB, [6] * len(IDS))
    assert [r.index for r in rows] == [0] and ignored == 1
    assert len(logs) == 1 and logs[0].startswith(f"warning: {f}:2: progress line ignored (")
    assert re.search(why, logs[0]), logs[0]
    assert f.read_text() == json.dumps(good0) + "\n"  # rewritten without it: the prompt runs again
    row = rows[0]
    assert (row.tokens, row.ttft_s, row.latency_s, row.finish_reason) == ([5, 6], 0.5, 1.0, "length")


def test_a_valid_row_passes_with_the_limits(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    (d / "replica-1.jsonl").write_text(json.dumps(dict(GOOD, ttft_s=0, completion_token_ids=[0, VOCAB - 1])) + "\n")
    rows, ignored = progress_files.read_rows(d, IDS, False, None, VOCAB, [2] * len(IDS))
    assert ignored == 0 and rows[0].tokens == [0, VOCAB - 1] and type(rows[0].ttft_s) is float


def test_resume_without_a_header_is_refused_and_the_rows_survive(tiny_bf16, tmp_path):
    out = tmp_path / "o.jsonl"
    progress_files.prepare(_args(tiny_bf16, out), IDS, lambda m: None)
    w = progress_files.Writer(out, 0, IDS)
    w.append([_result(3)])
    w.close()
    d = progress_files.progress_dir(out)
    rows = (d / "replica-0.jsonl").read_bytes()
    (d / "header.json").unlink()
    with pytest.raises(UsageError, match=f"--resume: {d} has progress rows \\(replica-0.jsonl\\) but no valid "
                                         f"header.json.*nothing was changed. Run without --resume to start over"):
        progress_files.prepare(_args(tiny_bf16, out, "--resume"), IDS, lambda m: None)
    assert (d / "replica-0.jsonl").read_bytes() == rows
    (d / "header.json").write_text("not json")
    with pytest.raises(UsageError, match="but no valid header.json"):
        progress_files.prepare(_args(tiny_bf16, out, "--resume"), IDS, lambda m: None)
    assert (d / "replica-0.jsonl").read_bytes() == rows
    progress_files.finish(out)


def _ckpt_copy(src: Path, dst: Path) -> Path:
    """A checkpoint of symlinks to src's files."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    return dst


def test_fingerprint_covers_the_weights_and_the_tokenizer(tiny_bf16, tmp_path):
    same = _ckpt_copy(tiny_bf16, tmp_path / "same")
    out = tmp_path / "o.jsonl"
    progress_files.prepare(_args(same, out), IDS, lambda m: None)
    progress_files.prepare(_args(tiny_bf16, out, "--resume"), IDS, lambda m: None)  # the same files: accepted
    other = _ckpt_copy(tiny_bf16, tmp_path / "other")  # the same shapes, other weights in one shard
    shard = sorted(tiny_bf16.glob("*.safetensors"))[-1]
    raw = shard.read_bytes()
    n = 8 + int.from_bytes(raw[:8], "little")
    (other / shard.name).unlink()
    (other / shard.name).write_bytes(raw[:n] + raw[n:][::-1])
    with pytest.raises(UsageError, match="belongs to a run with other inputs or settings \\(weights_sha256 "
                                         "[0-9a-f]{12}\\.\\.\\. there, [0-9a-f]{12}\\.\\.\\. here\\)"):
        progress_files.prepare(_args(other, out, "--resume"), IDS, lambda m: None)
    tok = _ckpt_copy(tiny_bf16, tmp_path / "tok")
    cfg = json.loads((tiny_bf16 / "tokenizer_config.json").read_text())
    (tok / "tokenizer_config.json").unlink()
    (tok / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": "{{ 'other' }}"}))
    with pytest.raises(UsageError, match="\\(tokenizer_sha256 [0-9a-f]{12}\\.\\.\\. there"):
        progress_files.prepare(_args(tok, out, "--resume"), IDS, lambda m: None)
    progress_files.finish(out)
