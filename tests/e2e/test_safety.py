"""Safety: no pickle anywhere (checkpoints load through safetensors only), no remote code, and prompt
ids never become paths (an id like ``../../x`` stays a string in the output)."""
from __future__ import annotations

import json
import re

from conftest import ROOT, mpirun

CODE_DIRS = ("spmd", "traces", "validation")
FORBIDDEN = re.compile(r"\btorch\.load\(|\bpickle\b|\bcloudpickle\b|\bdill\b|trust_remote_code\s*=\s*True|"
                       r"\bnp\.load\(.*allow_pickle\s*=\s*True|\bmarshal\.loads?\(")


def test_no_pickle_or_remote_code_in_the_code():
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
            for d in CODE_DIRS for p in sorted((ROOT / d).rglob("*.py"))
            for n, line in enumerate(p.read_text().splitlines(), 1) if FORBIDDEN.search(line)]
    assert not hits, "\n".join(hits)


def test_prompt_ids_never_become_paths(tiny_bf16, tmp_path):
    prompts = tmp_path / "in" / "p.jsonl"
    prompts.parent.mkdir()
    ids = ["../../escape", "/abs/path", "a/b", "..", "x\u0000y"]
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"hello {n}"}) + "\n" for n, i in enumerate(ids)))
    out = tmp_path / "out" / "o.jsonl"
    r = mpirun(2, ["--checkpoint", str(tiny_bf16), "--prompts", str(prompts), "--output", str(out),
                   "--engine", "native", "--group-size", "2", "--max-new-tokens", "2", "--dtype", "fp32",
                   "--no-progress"], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ids
    made = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert made == ["in/p.jsonl", "out/o.jsonl", "out/o.summary.json"], made  # names from --output only
