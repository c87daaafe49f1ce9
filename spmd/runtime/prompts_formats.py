"""The two request formats a `.jsonl` prompt file may hold, and the `Prompt` record both become.

- plain: one `{"id", "prompt"}` object per line, with optional per-request settings (SETTINGS);
- OpenAI batch (the input of vLLM's `run_batch`): one `{"custom_id", "method", "url", "body"}` chat
  completion request per line; its output rows are made by `batch_rows`.

Every check names the file and line. spmd.runtime.prompts reads the file and picks the parser; this
module sits below it (it imports nothing of it), so the OpenAI format stays out of the main reader.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from spmd.config import UsageError

MAX_NEW_TOKENS = 2 ** 31 - 1  # far beyond any context; bounds what a JSON integer of any size may ask
# per-request settings of a plain line, and what they must be (the message's words)
SETTINGS = {
    "max_new_tokens": "an integer >= 1 (at most 2^31 - 1)",
    "temperature": "a number >= 0",
    "top_p": "a number in (0, 1]",
    "stop": "a non-empty string or a list of up to 4 non-empty strings",
    "seed": "a 64-bit integer",
    "ignore_eos": "true or false",
}
# an OpenAI request body's keys: the settings they set ("" : checked here, not a setting)
BODY_KEYS = {"model": "", "messages": "", "n": "", "stream": "", "max_tokens": "max_new_tokens",
             "max_completion_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p",
             "stop": "stop", "seed": "seed", "ignore_eos": "ignore_eos"}  # ignore_eos: vLLM's extension
ROLES = ("system", "user", "assistant")
CHAT_URL = "/v1/chat/completions"


@dataclass(frozen=True)
class Prompt:
    index: int      # position in the input file; outputs are written in this order
    id: str         # plain: "id" (else the line number); OpenAI batch: "custom_id"
    text: str       # plain: "prompt"; OpenAI batch: the last user message (what the plain output shows)
    messages: list[dict] | None = field(default=None, hash=False)  # OpenAI batch: the chat, templated whole
    settings: dict = field(default_factory=dict, hash=False)       # checked overrides, SETTINGS' names
    model: str | None = None  # OpenAI batch: body.model, only echoed in the output


def _is_number(value) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # a JSON integer beyond any float
        return False


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _valid(key: str, value) -> bool:
    if key == "max_new_tokens":
        return _is_int(value) and 1 <= value <= MAX_NEW_TOKENS
    if key == "temperature":
        return _is_number(value) and value >= 0
    if key == "top_p":
        return _is_number(value) and 0 < value <= 1
    if key == "stop":
        many = value if isinstance(value, list) and len(value) <= 4 else [value]
        return all(isinstance(s, str) and s for s in many)
    if key == "seed":
        return _is_int(value) and -2 ** 63 <= value < 2 ** 63  # what torch.Generator.manual_seed takes
    return isinstance(value, bool)  # ignore_eos


def check_setting(where: str, key: str, value, name: str | None = None):
    """`value` of setting `key` (written `name` in the file) if valid, else a UsageError naming `where`."""
    if not _valid(key, value):
        raise UsageError(f"{where}: \"{name or key}\" must be {SETTINGS[key]}, got {show(value)}")
    return value


def show(value, ascii: bool = True, limit: int = 200) -> str:
    """A value as JSON for a one-line message: cut to `limit` characters; never raises (a value nested as
    deep as the reader allows may be too deep to write back)."""
    try:
        text = json.dumps(value, ensure_ascii=ascii)
    except (RecursionError, ValueError):
        return "(a value nested too deep to show)"
    return text if len(text) <= limit else text[:limit] + "..."


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how a line's JSON can spell a lone surrogate


def lone_surrogate(obj) -> str | None:
    """Where `obj` (a line's parsed JSON) holds a lone surrogate ("\\ud800" in JSON: not a character, so
    not writable as UTF-8 in the output, nor tokenizable), as a message fragment; None when nowhere. Walked
    without recursion: the reader allows about 1000 levels."""
    todo = [("", obj)]
    while todo:
        at, value = todo.pop()
        if isinstance(value, dict):  # children pushed last first: found in file order
            for k, v in reversed(value.items()):
                key = f"{at}.{show(k)}" if at else show(k)
                todo += [(key, v), (f"the key {key}", k)]
        elif isinstance(value, list):
            todo.extend((f"{at}[{i}]", value[i]) for i in reversed(range(len(value))))
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                return f"{at or 'the line'} holds a lone surrogate \\u{ord(value[exc.start]):04x}"
    return None


def _unknown(where: str, keys, allowed) -> None:
    extra = [k for k in keys if k not in allowed]
    if extra:
        raise UsageError(f"{where}: unknown key(s) {', '.join(json.dumps(k) for k in extra)} "
                         f"(supported: {', '.join(allowed)})")


def parse_plain(where: str, index: int, line_number: int, obj) -> Prompt:
    """A plain line's object → its Prompt (settings checked; a null setting counts as not given)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
        raise UsageError(f"{where}: expected an object with a non-empty string \"prompt\"")
    _unknown(where, obj, ("id", "prompt", *SETTINGS))
    pid = obj.get("id", line_number)
    if not isinstance(pid, (str, int)) or isinstance(pid, bool):
        raise UsageError(f"{where}: \"id\" must be a string or an integer, got {show(pid)}")
    settings = {k: check_setting(where, k, v) for k, v in obj.items() if k in SETTINGS and v is not None}
    return Prompt(index, str(pid), obj["prompt"], settings=settings)


def is_batch_request(obj) -> bool:
    """Whether a line's object is an OpenAI batch request (how the first line picks the file's format)."""
    return isinstance(obj, dict) and "custom_id" in obj and "body" in obj


def parse_batch_request(where: str, index: int, obj) -> Prompt:
    """One OpenAI batch request (a chat completion) → its Prompt; anything we cannot honour → UsageError."""
    if not is_batch_request(obj):
        raise UsageError(f"{where}: expected an OpenAI batch request {{\"custom_id\", \"method\", \"url\", "
                         f"\"body\"}} like the file's first line")
    _unknown(where, obj, ("custom_id", "method", "url", "body"))
    if not isinstance(obj["custom_id"], str) or not obj["custom_id"]:
        raise UsageError(f"{where}: \"custom_id\" must be a non-empty string, got {show(obj['custom_id'])}")
    if obj.get("method") != "POST" or obj.get("url") != CHAT_URL:
        raise UsageError(f"{where}: only \"POST\" \"{CHAT_URL}\" requests are supported, got "
                         f"{show(obj.get('method'))} {show(obj.get('url'))}")
    body = obj["body"]
    if not isinstance(body, dict):
        raise UsageError(f"{where}: \"body\" must be an object")
    _unknown(where, body, tuple(BODY_KEYS))
    messages = _messages(where, body.get("messages"))
    _check_body_constants(where, body)
    users = [m["content"] for m in messages if m["role"] == "user"]
    return Prompt(index, obj["custom_id"], (users or [messages[-1]["content"]])[-1], messages=messages,
                  settings=_body_settings(where, body), model=body.get("model"))


def _messages(where: str, messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise UsageError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"} or not isinstance(m["content"], str) \
                or m["role"] not in ROLES:
            raise UsageError(f"{where}: message {i} must be {{\"role\": one of {', '.join(ROLES)}, "
                             f"\"content\": a string}}, got {show(m, ascii=False)}")
    return [dict(m) for m in messages]


def _check_body_constants(where: str, body: dict) -> None:
    """Keys accepted for compatibility only: one completion per request, no streaming, a model name."""
    if body.get("n", 1) != 1 or isinstance(body.get("n"), bool):
        raise UsageError(f"{where}: \"n\" must be 1 (one completion per request), got {show(body['n'])}")
    if body.get("stream", False) is not False:
        raise UsageError(f"{where}: \"stream\" must be false, got {show(body['stream'])}")
    if not isinstance(body.get("model", ""), str):
        raise UsageError(f"{where}: \"model\" must be a string, got {show(body['model'])}")


def _body_settings(where: str, body: dict) -> dict:
    """The body's settings under SETTINGS' names (max_tokens / max_completion_tokens → max_new_tokens)."""
    settings: dict = {}
    for name, key in BODY_KEYS.items():
        if not key or body.get(name) is None:
            continue  # OpenAI clients send null for "the default"
        value = check_setting(where, key, body[name], name)
        if settings.get(key, value) != value:
            raise UsageError(f"{where}: \"max_tokens\" and \"max_completion_tokens\" differ "
                             f"({body['max_tokens']} and {body['max_completion_tokens']}): give one")
        settings[key] = value
    return settings


def batch_rows(prompts: list[Prompt], rows: list[dict], model: str, created: int | None = None) -> list[dict]:
    """The OpenAI batch output (as vLLM's run_batch writes it), one row per request, from the plain output
    rows (`completion` already cut at the stop strings). Ids come from the request's index, so that two
    runs of a file differ only in `created` (default: now, unix seconds); `model` answers a request that
    named none."""
    created = int(time.time()) if created is None else created
    return [_batch_row(p, row, model, created) for p, row in zip(prompts, rows)]


def _batch_row(p: Prompt, row: dict, model: str, created: int) -> dict:
    generated = len(row["completion_token_ids"])
    body = {"id": f"chatcmpl-{p.index}", "object": "chat.completion", "created": created,
            "model": p.model or model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": row["completion"]},
                         "finish_reason": row["finish_reason"]}],
            "usage": {"prompt_tokens": row["prompt_tokens"], "completion_tokens": generated,
                      "total_tokens": row["prompt_tokens"] + generated}}
    return {"id": f"batch_req_{p.index}", "custom_id": p.id,
            "response": {"status_code": 200, "request_id": f"spmd-batch-{p.index}", "body": body},
            "error": None}


def parse_lines(path: Path, lines: list[tuple[int, str]]) -> list[Prompt]:
    """A `.jsonl` file's non-empty (line number, text) pairs → Prompts; the first line picks the format."""
    prompts = []
    batch = None
    for index, (n, text) in enumerate(lines):
        where = f"{path}:{n}"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{where}: invalid JSON ({exc.msg}, column {exc.colno})") from None
        except RecursionError:
            raise UsageError(f"{where}: JSON nested too deep (Python's json reader stops near 1000 levels)") from None
        except ValueError as exc:  # an integer of more than 4300 digits (sys.get_int_max_str_digits)
            raise UsageError(f"{where}: unreadable JSON ({str(exc).split(';')[0]})") from None
        bad = lone_surrogate(obj) if _SURROGATE_ESCAPE.search(text) else None
        if bad:
            raise UsageError(f"{where}: {bad}: not a character, so it cannot be tokenized or written as UTF-8 "
                             f"in the output (a surrogate must come in a high-low pair)")
        batch = is_batch_request(obj) if batch is None else batch
        prompts.append(parse_batch_request(where, index, obj) if batch else parse_plain(where, index, n, obj))
    return prompts
