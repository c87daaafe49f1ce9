"""Property-based (hypothesis): garbled prompt files give prompts or one UsageError, never anything else.

Random bytes, random text lines, and JSONL lines mixing valid objects with broken JSON, wrong types,
empty prompts, duplicate ids and non-UTF-8 bytes go through what rank 0 does before any model work
(read, tokenize with the tiny checkpoint's tokenizer and chat template, context check). Every outcome
is either a list of prompts that tokenize to at least one id each, in file order with unique ids, or a
`UsageError` (what the program reports as one `error:` line with exit 2 on every rank: tests/e2e/test_e2e.py
checks that path end to end). Anything else (a crash trace) fails the test.
"""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from spmd.runtime import prompts as prompt_io
from spmd.config import UsageError

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
JSON_LINE = st.one_of(
    st.builds(lambda i, p: json.dumps({"id": i, "prompt": p}), st.sampled_from(["a", "b", "c", "1"]), TEXT),
    st.builds(lambda p: json.dumps({"prompt": p}), TEXT),
    st.builds(json.dumps, st.one_of(st.integers(), st.lists(st.integers(), max_size=3), st.none(), TEXT)),
    st.builds(lambda p: json.dumps({"id": [1], "prompt": p}), TEXT),
    st.just('{"id": "x", "prompt": '), st.just("{oops}"), st.just(""), st.just("   "),
)


@pytest.fixture(scope="module")
def tokenizer(tiny_bf16):
    return prompt_io.load_tokenizer(tiny_bf16)


def _check(path, tokenizer) -> None:
    try:
        prompts = prompt_io.read_prompts(path)
        ids = prompt_io.encode(tokenizer, prompts, chat=True)
        prompt_io.check_context(prompts, ids, 32, 2048)
    except UsageError as exc:
        assert str(exc) and "\n" not in str(exc).strip()  # one line for the `error:` report
        return
    assert prompts and [p.index for p in prompts] == list(range(len(prompts)))
    assert len({p.id for p in prompts}) == len(prompts) and all(p.text.strip() for p in prompts)
    assert all(len(t) > 0 for t in ids)


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".txt"]))
def test_random_bytes(tmp_path, tokenizer, data, suffix):
    f = tmp_path / f"p{suffix}"
    f.write_bytes(data)
    _check(f, tokenizer)


@SETTINGS
@given(lines=st.lists(JSON_LINE, min_size=0, max_size=8), junk=st.sampled_from([b"", b"\xff\xfe", b"\x00"]))
def test_garbled_jsonl(tmp_path, tokenizer, lines, junk):
    f = tmp_path / "p.jsonl"
    f.write_bytes("\n".join(lines).encode() + junk)
    _check(f, tokenizer)
