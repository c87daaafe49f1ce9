"""Property-based (hypothesis): garbled prompt files give prompts or one UsageError, never anything else.

Random bytes, random text lines, and JSONL lines mixing valid objects with broken JSON, wrong types,
empty prompts, duplicate ids and non-UTF-8 bytes; random JSON values, plain lines and OpenAI batch requests
with random settings (NaN, infinities, integers of thousands of digits), nesting past the reader's limit,
odd Unicode (lone surrogates, U+2028, U+0085, form feeds) and odd line ends go through what rank 0 does
before any model work (read, tokenize with the tiny checkpoint's tokenizer and chat template, each prompt's
settings, context check). Every outcome is either a list of prompts that tokenize to at least one id each,
in file order with unique ids, writable as UTF-8, or a `UsageError` (what the program reports as one
`error:` line with exit 2 on every rank: tests/e2e/test_e2e.py checks that path end to end). Anything else
(a crash trace) fails the test.
"""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from spmd import config
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


RUN = config.parse_args(["--checkpoint", "c", "--prompts", "p.jsonl", "--output", "o.jsonl", "--temperature", "1",
                         "--seed", str(2 ** 64 - 3)])  # the last seeds the per-prompt default may reach


def _check(path, tokenizer) -> None:
    try:
        prompts = prompt_io.read_prompts(path)
        ids = prompt_io.encode(tokenizer, prompts, chat=True)
        sampling = [prompt_io.sampling_of(p, i, RUN) for i, p in enumerate(prompts)]
        prompt_io.check_context(prompts, ids, sampling, 2048)
    except UsageError as exc:
        assert str(exc) and "\n" not in str(exc).strip()  # one line for the `error:` report
        str(exc).encode("utf-8")  # and printable as such
        return
    assert prompts and [p.index for p in prompts] == list(range(len(prompts)))
    assert len({p.id for p in prompts}) == len(prompts)
    assert all(p.text.strip() for p in prompts if p.messages is None)  # a chat message may be empty
    assert all(len(t) > 0 for t in ids)
    for p, s in zip(prompts, sampling):  # what the output and the generators will be given
        json.dumps({"id": p.id, "prompt": p.text, "messages": p.messages, "stop": s.stop},
                   ensure_ascii=False).encode("utf-8")
        assert 1 <= s.max_new_tokens < 2 ** 31 and s.temperature >= 0 and 0 < s.top_p <= 1
        assert s.temperature == 0 or -2 ** 63 <= s.seed < 2 ** 64


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


# odd characters: lone surrogates (JSON can spell them as escapes); line and paragraph separators, NEL, form
# feed, NUL, BOM, an astral character
SURROGATE = st.sampled_from(["\ud800", "x\udfff", "\udbff\udbff", "\ud83d\ude00\udc00"])  # pairs are fine
ODD = st.sampled_from(["\u2028", "\u2029", "\x85", "\x0c", "\x1c", "\x00", "\r", "\ufeff",
                       "\U0001f600"])
ODD_TEXT = st.text(alphabet=st.one_of(st.characters(), ODD), max_size=12)
NUMBER = st.one_of(st.integers(), st.floats(), st.sampled_from([2 ** 31, 2 ** 63, 2 ** 64, -2 ** 63 - 1, 10 ** 400]))
LEAF = st.one_of(st.none(), st.booleans(), NUMBER, ODD_TEXT, SURROGATE)
VALUE = st.recursive(LEAF, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(ODD_TEXT, inner, max_size=3)), max_leaves=8)
# near-valid requests: each field mostly what it should be, sometimes an odd or wrong value
SMALL = st.one_of(st.integers(-3, 100), st.floats(-1, 2))
SETTING_VALUE = st.one_of(SMALL, SMALL, NUMBER, ODD_TEXT, st.lists(ODD_TEXT, max_size=5), st.booleans(), VALUE)
SETTING = st.sampled_from(["max_new_tokens", "temperature", "top_p", "stop", "seed", "ignore_eos"])
ID = st.one_of(ODD_TEXT, ODD_TEXT, ODD_TEXT, SURROGATE, st.integers(), VALUE)
TEXT = st.one_of(st.just("hello"), ODD_TEXT, ODD_TEXT, ODD_TEXT, SURROGATE, VALUE)
PLAIN = st.builds(lambda i, prompt, extra: {"id": i, "prompt": prompt, **extra}, ID, TEXT,
                  st.dictionaries(SETTING, SETTING_VALUE, max_size=3))
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "user", "system", "assistant", "tool"]),
                                 "content": TEXT})
BODY_KEY = st.sampled_from(["max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "n",
                            "stream", "model", "ignore_eos"])
REQUEST = st.builds(lambda cid, msgs, extra: {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                                              "body": {"messages": msgs, **extra}},
                    ID, st.lists(MESSAGE, min_size=1, max_size=3),
                    st.dictionaries(BODY_KEY, SETTING_VALUE, max_size=3))


def _dump(value, ascii: bool) -> str:
    return json.dumps(value, ensure_ascii=ascii)  # NaN and Infinity as Python writes them


LINE = st.one_of(
    st.builds(_dump, st.one_of(PLAIN, REQUEST, VALUE), st.booleans()),  # not ASCII: surrogates as they are
    st.integers(1, 3000).map(lambda d: '{"prompt": "x", "id": ' + "[" * d + "]" * d + "}"),  # deep
    st.integers(1, 6000).map(lambda n: '{"prompt": "x", "max_new_tokens": ' + "9" * n + "}"),  # huge
    st.integers(4000, 4600).map(lambda n: '{"prompt": "x", "seed": -' + "1" * n + "}"),
    ODD_TEXT,
)
END = st.sampled_from(["\n", "\r\n", "\n\n", "\u2028", "\x85", "\x0c", "\r"])


@SETTINGS
@given(lines=st.lists(st.tuples(LINE, END), min_size=1, max_size=5), suffix=st.sampled_from([".jsonl", ".txt"]))
def test_random_json_odd_unicode_deep_and_huge(tmp_path, tokenizer, lines, suffix):
    f = tmp_path / f"p{suffix}"
    f.write_bytes("".join(line + end for line, end in lines).encode("utf-8", "surrogatepass"))
    _check(f, tokenizer)


@SETTINGS
@given(requests=st.one_of(*(st.lists(kind, min_size=1, max_size=3)
                            for kind in (REQUEST, PLAIN, st.one_of(REQUEST, PLAIN)))))
def test_random_requests_and_settings(tmp_path, tokenizer, requests):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in requests), encoding="ascii")
    _check(f, tokenizer)
