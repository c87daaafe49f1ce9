"""End to end under mpirun (2 ranks, one group, continuous batching): an OpenAI batch file with per-request
settings in, the OpenAI batch output format out, the run summary; a malformed request refused by line."""
from __future__ import annotations

import json

from conftest import PROMPTS20, hf_reference, mpirun

from spmd.runtime.prompts import load_tokenizer

N_NEW = 12


def _requests(texts: list[str], stop: str) -> list[dict]:
    body = lambda i, t: {"model": "tiny", "messages": [{"role": "user", "content": t}],  # noqa: E731
                         "max_tokens": N_NEW if i % 3 else 4, **({"stop": [stop]} if i == 1 else {})}
    return [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body(i, t)}
            for i, t in enumerate(texts)]


def test_openai_batch_in_and_out(tiny_bf16, tmp_path):
    texts = [json.loads(line)["prompt"] for line in PROMPTS20.read_text().splitlines()][:6]
    ref = [list(t) for t in hf_reference(tiny_bf16, N_NEW)][:6]  # greedy, chat template, fp32
    tok = load_tokenizer(tiny_bf16)
    stop = tok.decode(ref[1][:4], skip_special_tokens=True)[-2:]  # ends request 1 within its first 4 tokens
    assert stop.strip()
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps(r) + "\n" for r in _requests(texts, stop)))
    out = tmp_path / "out.jsonl"
    r = mpirun(2, ["--checkpoint", str(tiny_bf16), "--prompts", str(batch), "--output", str(out), "--group-size",
                   "2", "--dtype", "fp32", "--max-new-tokens", "32", "--no-progress", "--slots", "2",
                   "--prefill-tokens", "16"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["custom_id"] for row in rows] == [f"req-{i}" for i in range(6)]
    for i, row in enumerate(rows):
        body = row["response"]["body"]
        assert row["response"]["status_code"] == 200 and row["error"] is None
        choice, usage = body["choices"][0], body["usage"]
        n = usage["completion_tokens"]
        if i == 1:  # the stop string: fewer tokens, a prefix of the reference, the text cut before it
            assert choice["finish_reason"] == "stop" and n <= 4 and stop not in choice["message"]["content"]
            assert n < len(ref[1])
        else:
            want = ref[i][:N_NEW if i % 3 else 4]
            eos = len(want) < (N_NEW if i % 3 else 4)
            assert n == len(want) and choice["finish_reason"] == ("stop" if eos else "length")
        assert usage["total_tokens"] == usage["prompt_tokens"] + n
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["prompts"] == 6 and summary["scheduler"]["batching"] == "continuous"
    assert summary["scheduler"]["slots"] == 2 and summary["output_tokens"] == sum(
        row["response"]["body"]["usage"]["completion_tokens"] for row in rows)
    assert [ln for ln in r.stdout.splitlines() if ln.startswith("summary:")] and str(out) in r.stdout
    assert sum(ln.startswith("summary:") for ln in r.stdout.splitlines()) == 1  # rank 0 only


def test_malformed_request_names_its_line(tiny_bf16, tmp_path):
    good = _requests(["Hello"], "x")[0]
    bad = {**good, "custom_id": "req-1", "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}}
    batch = tmp_path / "batch.jsonl"
    batch.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    out = tmp_path / "out.jsonl"
    r = mpirun(2, ["--checkpoint", str(tiny_bf16), "--prompts", str(batch), "--output", str(out), "--no-progress",
                   "--dtype", "fp32"])
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-2000:]
    assert f"{batch}:2" in errors[0] and "max_tokens" in errors[0]
    assert not out.exists()
