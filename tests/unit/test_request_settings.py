"""Serial: per-request settings, the OpenAI batch format in and out, stop strings, the new progress fields."""
from __future__ import annotations

import json

import pytest

from spmd import config
from spmd.config import UsageError
from spmd.runtime import prompts as prompt_io
from spmd.runtime import resume as progress_files
from spmd.runtime.records import Result, Sampling
from spmd.runtime.score import work_items

RUN = ["--checkpoint", "c", "--prompts", "p.jsonl", "--output", "o.jsonl", "--device", "cpu",
       "--max-new-tokens", "16", "--temperature", "0.5", "--top-p", "0.9", "--seed", "7"]


def _write(tmp_path, rows, name="p.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _request(custom_id="r0", body=None, **top):
    body = {"model": "deepseek-v3", "messages": [{"role": "user", "content": "hi"}]} if body is None else body
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body, **top}


@pytest.fixture(scope="module")
def tokenizer(tiny_bf16):
    return prompt_io.load_tokenizer(tiny_bf16)  # byte-level BPE of 4032 ids, a chat template


def test_settings_are_read_and_merged_over_the_run_options(tmp_path):
    path = _write(tmp_path, [{"id": "a", "prompt": "x"},
                             {"id": "b", "prompt": "y", "max_new_tokens": 4, "temperature": 0, "top_p": 1,
                              "stop": "END", "seed": 3, "ignore_eos": True},
                             {"id": "c", "prompt": "z", "stop": ["\n\n", "User:"], "temperature": None}])
    read = prompt_io.read_prompts(path)
    assert [p.settings for p in read] == [{}, {"max_new_tokens": 4, "temperature": 0, "top_p": 1, "stop": "END",
                                                "seed": 3, "ignore_eos": True}, {"stop": ["\n\n", "User:"]}]
    assert prompt_io.file_format(read) == "plain" and read[0].messages is None
    args = config.parse_args(RUN)
    sampling = [prompt_io.sampling_of(p, i, args) for i, p in enumerate(read)]
    assert sampling == [Sampling(16, 0.5, 0.9, 7, (), False), Sampling(4, 0.0, 1.0, 3, ("END",), True),
                        Sampling(16, 0.5, 0.9, 9, ("\n\n", "User:"), False)]
    items = work_items([[1], [2], [3]], None, sampling)
    assert [w.sampling for w in items] == sampling and work_items([[1]], None)[0].sampling is None
    scored = work_items([[1], [2], [3]], [([5], [[5]])] * 3, sampling)
    assert scored[1].target == [5] and scored[1].sampling == sampling[1]


@pytest.mark.parametrize("key,value,msg", [
    ("max_new_tokens", 0, '"max_new_tokens" must be an integer >= 1 (at most 2^31 - 1), got 0'),
    ("max_new_tokens", 2.0, '"max_new_tokens" must be an integer >= 1 (at most 2^31 - 1), got 2.0'),
    ("max_new_tokens", True, '"max_new_tokens" must be an integer >= 1 (at most 2^31 - 1), got true'),
    ("max_new_tokens", 2 ** 31, '"max_new_tokens" must be an integer >= 1 (at most 2^31 - 1), got 2147483648'),
    ("max_new_tokens", 10 ** 4000, '"max_new_tokens" must be an integer >= 1 (at most 2^31 - 1), got 1000'),
    ("temperature", 10 ** 400, '"temperature" must be a number >= 0, got 1000'),  # no float holds it
    ("top_p", -10 ** 400, '"top_p" must be a number in (0, 1], got -1000'),
    ("seed", -2 ** 63 - 1, '"seed" must be a 64-bit integer, got -9223372036854775809'),
    ("temperature", -0.1, '"temperature" must be a number >= 0, got -0.1'),
    ("temperature", "0.5", '"temperature" must be a number >= 0, got "0.5"'),
    ("top_p", 1.5, '"top_p" must be a number in (0, 1], got 1.5'),
    ("top_p", 0, '"top_p" must be a number in (0, 1], got 0'),
    ("stop", "", '"stop" must be a non-empty string or a list of up to 4 non-empty strings, got ""'),
    ("stop", ["a", "b", "c", "d", "e"], '"stop" must be'),
    ("stop", ["a", 3], '"stop" must be'),
    ("seed", 2 ** 63, '"seed" must be a 64-bit integer'),
    ("seed", 1.5, '"seed" must be a 64-bit integer, got 1.5'),
    ("ignore_eos", 1, '"ignore_eos" must be true or false, got 1'),
])
def test_a_bad_setting_is_named_with_its_line(tmp_path, key, value, msg):
    path = _write(tmp_path, [{"id": "a", "prompt": "x"}, "", {"id": "b", "prompt": "y", key: value}])
    with pytest.raises(UsageError) as err:
        prompt_io.read_prompts(path)
    assert str(err.value).startswith(f"{path}:3: {msg}"), err.value


def test_unknown_keys_are_named(tmp_path):
    path = _write(tmp_path, [{"id": "a", "prompt": "x", "max_tokens": 3, "temp": 1}])
    with pytest.raises(UsageError, match=r'p.jsonl:1: unknown key\(s\) "max_tokens", "temp" \(supported: id, '
                                         r'prompt, max_new_tokens'):
        prompt_io.read_prompts(path)


def test_openai_batch_input(tmp_path, tokenizer):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}]
    path = _write(tmp_path, [_request("q-1", {"model": "m1", "messages": chat, "max_tokens": 5, "stop": ["\n"],
                                              "temperature": 0.7, "top_p": 0.5, "seed": 11, "n": 1,
                                              "stream": False}),
                             "",
                             _request("q-2", {"messages": [{"role": "user", "content": "hi"}],
                                              "max_completion_tokens": 3, "max_tokens": 3, "seed": None})])
    read = prompt_io.read_prompts(path)
    assert prompt_io.file_format(read) == "openai"
    assert [(p.index, p.id, p.text, p.model) for p in read] == [(0, "q-1", "and 3+3?", "m1"), (1, "q-2", "hi", None)]
    assert read[0].messages == chat and read[1].settings == {"max_new_tokens": 3}
    assert prompt_io.sampling_of(read[0], 0, config.parse_args(RUN)) == Sampling(5, 0.7, 0.5, 11, ("\n",), False)
    ids = prompt_io.encode(tokenizer, read, chat=True)  # the whole chat through the template
    templated = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert "Be brief." in templated and ids[0] == tokenizer(templated, add_special_tokens=False)["input_ids"]
    with pytest.raises(UsageError, match="OpenAI batch requests carry chat messages: they need the chat template"):
        prompt_io.encode(tokenizer, read, chat=False)


def _bad_body(**change):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    body.update(change)
    return {k: v for k, v in body.items() if v is not ...}


@pytest.mark.parametrize("second,msg", [
    (_request("r1", url="/v1/embeddings"), 'only "POST" "/v1/chat/completions" requests are supported'),
    (_request("r1", method="GET"), 'only "POST" "/v1/chat/completions" requests are supported, got "GET"'),
    (_request("r1", _bad_body(messages=[])), '"messages" must be a non-empty list'),
    (_request("r1", _bad_body(messages=...)), '"messages" must be a non-empty list'),
    (_request("r1", _bad_body(messages=[{"role": "tool", "content": "x"}])), "message 0 must be"),
    (_request("r1", _bad_body(messages=[{"role": "user", "content": [{"type": "text"}]}])), "message 0 must be"),
    (_request("r1", _bad_body(logprobs=True)), r'unknown key\(s\) "logprobs" \(supported: model, messages'),
    (_request("r1", _bad_body(n=2)), '"n" must be 1'),
    (_request("r1", _bad_body(stream=True)), '"stream" must be false'),
    (_request("r1", _bad_body(max_tokens=0)), r'"max_tokens" must be an integer >= 1 \(at most 2\^31 - 1\), got 0'),
    (_request("r1", _bad_body(max_tokens=10 ** 30)), '"max_tokens" must be an integer >= 1'),
    (_request("r1", _bad_body(seed=2 ** 64)), '"seed" must be a 64-bit integer, got 18446744073709551616'),
    (_request("r1", _bad_body(temperature=float("inf"))), '"temperature" must be a number >= 0, got Infinity'),
    (_request("r1", _bad_body(top_p=float("nan"))), r'"top_p" must be a number in \(0, 1\], got NaN'),
    (_request("r1", _bad_body(stop=["a", "b\ud800"])), r'"body"."stop"\[1\] holds a lone surrogate \\ud800'),
    (_request("r1\udc00"), r'"custom_id" holds a lone surrogate \\udc00'),
    (_request("r1", _bad_body(max_tokens=2, max_completion_tokens=3)), '"max_tokens" and "max_completion_tokens" '
                                                                      'differ'),
    (_request("", _bad_body()), '"custom_id" must be a non-empty string'),
    (_request("r1", extra=1), r'unknown key\(s\) "extra"'),
    ({"id": "r1", "prompt": "plain"}, "expected an OpenAI batch request"),
])
def test_a_malformed_batch_request_is_one_error_naming_its_line(tmp_path, second, msg):
    path = _write(tmp_path, [_request("r0"), second])
    with pytest.raises(UsageError, match=msg) as err:
        prompt_io.read_prompts(path)
    assert str(err.value).startswith(f"{path}:2: ")


def test_duplicate_custom_ids_are_refused(tmp_path):
    with pytest.raises(UsageError, match="duplicate ids: r0"):
        prompt_io.read_prompts(_write(tmp_path, [_request("r0"), _request("r0")]))


def test_openai_batch_output(tmp_path, tokenizer):
    path = _write(tmp_path, [_request("a", {"model": "mine", "messages": [{"role": "user", "content": "x"}],
                                            "stop": "STOP"}),
                             _request("b", {"messages": [{"role": "user", "content": "y"}], "max_tokens": 3})])
    read = prompt_io.read_prompts(path)
    sampling = [prompt_io.sampling_of(p, i, config.parse_args(RUN)) for i, p in enumerate(read)]
    text = tokenizer("Hello world. STOP here", add_special_tokens=False)["input_ids"]
    results = [Result(0, text, 0.1, 0.2, 0, finish_reason="stop"), Result(1, text[:3], queue_s=0.5)]
    rows = prompt_io.output_rows(read, [[1] * 7, [1] * 4], results, tokenizer, sampling)
    assert rows[0]["completion"] == "Hello world. " and rows[0]["completion_token_ids"] == text
    assert [r["finish_reason"] for r in rows] == ["stop", "length"] and rows[1]["queue_s"] == 0.5
    out = prompt_io.batch_rows(read, rows, "tiny-bf16", created=1700000000)
    assert out[0] == {"id": "batch_req_0", "custom_id": "a", "error": None, "response": {
        "status_code": 200, "request_id": "spmd-batch-0", "body": {
            "id": "chatcmpl-0", "object": "chat.completion", "created": 1700000000, "model": "mine",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello world. "},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": len(text), "total_tokens": 7 + len(text)}}}}
    body = out[1]["response"]["body"]
    assert body["model"] == "tiny-bf16" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert json.loads(json.dumps(out)) == out  # JSON as it is written


def test_finish_reason_without_one_from_the_engine(tokenizer):
    ps = [prompt_io.Prompt(0, "a", "x"), prompt_io.Prompt(1, "b", "y")]
    eos = tokenizer.eos_token_id
    rows = prompt_io.output_rows(ps, [[1], [1]], [Result(0, [46, eos]), Result(1, [46, 319])], tokenizer)
    assert [r["finish_reason"] for r in rows] == ["stop", "length"]


def _first_hits(stops, tokenizer, ids):
    """Positions (1-based prefix lengths) at which StopStrings.hit says yes, fed token by token."""
    stop_strings = prompt_io.StopStrings(tokenizer)
    return [n for n in range(1, len(ids) + 1) if stop_strings.hit(ids[:n], stops)]


def test_stop_string_of_several_tokens(tokenizer):
    filler = tokenizer(" lorem ipsum" * 60, add_special_tokens=False)["input_ids"]  # past the decoded tail
    ids = filler + tokenizer(" Hello world. STOP here", add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode([i]) for i in ids[-5:-1]] == [" S", "T", "O", "P"]
    assert _first_hits(("STOP",), tokenizer, ids) == [len(ids) - 1]  # when "P" comes, not before or after
    assert _first_hits(("ld. S", "nothing"), tokenizer, ids) == [len(ids) - 4]  # across "ld", ".", " S"
    assert prompt_io.StopStrings(tokenizer).hit(ids[:-1] + [5000], ("STOP",)) is False  # beyond the vocab: dropped
    assert prompt_io.StopStrings(tokenizer).hit(ids[:-1] + [5000, 5001], ("S",)) is False
    assert _first_hits((), tokenizer, ids) == []


def test_stop_string_split_inside_a_character(tokenizer):
    ids = tokenizer("Привет, 世界 </end>", add_special_tokens=False)["input_ids"]
    hits = _first_hits(("世界",), tokenizer, ids)
    assert len(hits) == 1 and "世界" in prompt_io.decode(tokenizer, ids[:hits[0]])
    assert "世界" not in prompt_io.decode(tokenizer, ids[:hits[0] - 1])
    assert _first_hits(("</end>",), tokenizer, ids) == [len(ids)]


def test_cut_at_stop():
    assert prompt_io.cut_at_stop("a STOP b END c", ("END", "STOP")) == "a "
    assert prompt_io.cut_at_stop("abc", ("x",)) == "abc" and prompt_io.cut_at_stop("abc", ()) == "abc"
    assert prompt_io.cut_at_stop("STOP", ("STOP",)) == ""


def test_context_check_uses_each_prompts_own_max_new_tokens():
    ps = [prompt_io.Prompt(0, "short", "..."), prompt_io.Prompt(1, "long", "...")]
    sampling = [Sampling(100), Sampling(33)]
    prompt_io.check_context(ps, [[1] * 28, [1] * 95], sampling, 128)  # 28 + 100 and 95 + 33 fit exactly
    with pytest.raises(UsageError, match="prompt 'long' has 96 tokens \\+ 33 new tokens > the model's context of 128"):
        prompt_io.check_context(ps, [[1] * 28, [1] * 96], sampling, 128)
    prompt_io.check_context(ps, [[1] * 28, [1] * 96], 32, 128)  # one number for every prompt, as before


def test_progress_rows_keep_finish_reason_and_queue_time(tmp_path):
    ids = ["p0", "p1", "p2"]
    writer = progress_files.Writer(tmp_path / "o.jsonl", 0, ids)
    writer.append([Result(0, [1, 2], 0.5, 1.0, 0, finish_reason="stop", queue_s=0.25),
                   Result(1, [3], 0.1, 0.2, 0, finish_reason="length")])
    writer.close()
    d = progress_files.progress_dir(tmp_path / "o.jsonl")
    with open(d / "replica-1.jsonl", "w") as f:  # a line from before the new fields
        f.write(json.dumps({"index": 2, "id": "p2", "completion_token_ids": [4], "ttft_s": 0, "latency_s": 0,
                            "model_group": 1}) + "\n")
    rows, ignored = progress_files.read_rows(d, ids, scored=False)
    assert ignored == 0
    assert [(r.index, r.finish_reason, r.queue_s) for r in rows] == [(0, "stop", 0.25), (1, "length", 0.0),
                                                                     (2, "", 0.0)]


def test_nan_and_infinity_settings_in_a_plain_line_are_refused(tmp_path):
    path = tmp_path / "p.jsonl"  # JSON has no NaN, but Python's reader takes the literal: refused by name
    for text, msg in (('"temperature": NaN', '"temperature" must be a number >= 0, got NaN'),
                      ('"top_p": Infinity', '"top_p" must be a number in (0, 1], got Infinity')):
        path.write_text('{"id": "a", "prompt": "x", %s}\n' % text)
        with pytest.raises(UsageError) as err:
            prompt_io.read_prompts(path)
        assert str(err.value) == f"{path}:1: {msg}"


def test_a_seed_past_2_64_is_refused_for_a_sampled_prompt_only(tmp_path):
    path = _write(tmp_path, [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"},
                             {"id": "c", "prompt": "z", "temperature": 0}])
    read = prompt_io.read_prompts(path)
    top = str(2 ** 64 - 1)
    args = config.parse_args(RUN[:-1] + [top])  # --temperature 0.5: every row samples but "c"
    assert prompt_io.sampling_of(read[0], 0, args).seed == 2 ** 64 - 1
    assert prompt_io.sampling_of(read[2], 2, args).seed == 2 ** 64 + 1  # greedy: no generator is seeded
    with pytest.raises(UsageError, match=rf"prompt 'b' \(prompt 2 of the file\) samples with seed --seed \+ its "
                                         rf"index = {top} \+ 1 > {top} \(2\^64 - 1\): give a smaller --seed"):
        prompt_io.sampling_of(read[1], 1, args)


@pytest.mark.parametrize("template,why", [
    ("{{ raise_exception('system messages are not supported') }}", "TemplateError: system messages are not supported"),
    ("{% if %}", "TemplateSyntaxError: Expected an expression"),
    ("{{ messages[5].content }}", "UndefinedError: list object has no element 5"),
])
def test_a_failing_chat_template_is_one_usage_error(tokenizer, template, why):
    kept = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        with pytest.raises(UsageError) as err:
            prompt_io.encode(tokenizer, [prompt_io.Prompt(0, "a", "hi"), prompt_io.Prompt(1, "b", "yo")], chat=True)
    finally:
        tokenizer.chat_template = kept
    msg = str(err.value)
    assert msg.startswith(f"the chat template of tokenizer {tokenizer.name_or_path} fails on prompt 'a' (prompt 1 of "
                          f"the file): {why}") and "\n" not in msg, msg
    assert msg.endswith("(fix the template, or pass --no-chat-template)")
