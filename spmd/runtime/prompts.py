"""Rank-0 text I/O: read and validate prompts, chat template, tokenize, detokenize, write outputs.

Generation sees token ids only; text never leaves this module except as output rows.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from spmd.config import UsageError


@dataclass(frozen=True)
class Prompt:
    index: int      # position in the input file; outputs are written in this order
    id: str
    text: str


@dataclass(frozen=True)
class PromptSet:
    """Rank 0's prompts, their token ids (input order) and the tokenizer that made them."""

    prompts: list[Prompt]
    ids: list[list[int]]
    tokenizer: object


def read_prompts(path: Path) -> list[Prompt]:
    """Prompts from `.txt` (one per non-empty line) or `.jsonl` (one {"id", "prompt"} object per line)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read prompt file {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UsageError(f"prompt file {path} is not UTF-8 (line {line}, byte {exc.start})") from None
    lines = [(n, ln) for n, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    if not lines:
        raise UsageError(f"prompt file {path} has no prompts")
    prompts = _parse_jsonl(path, lines) if Path(path).suffix == ".jsonl" else \
        [Prompt(i, str(n), ln) for i, (n, ln) in enumerate(lines)]
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise UsageError(f"prompt file {path} has duplicate ids: {', '.join(dup[:5])}")
    return prompts


def _parse_jsonl(path: Path, lines: list[tuple[int, str]]) -> list[Prompt]:
    prompts = []
    for i, (n, ln) in enumerate(lines):
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{n}: invalid JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise UsageError(f"{path}:{n}: expected an object with a non-empty string \"prompt\"")
        prompts.append(Prompt(i, str(obj.get("id", n)), obj["prompt"]))
    return prompts


def load_tokenizer(checkpoint: Path):
    """The checkpoint's own tokenizer (tokenizer.json + tokenizer_config.json), local files only."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load the tokenizer of {checkpoint}: {exc}") from None


def encode(tokenizer, prompts: list[Prompt], chat: bool) -> list[list[int]]:
    """Token ids per prompt: the chat template with a generation prompt, or the raw text with BOS."""
    if chat and not tokenizer.chat_template:
        raise UsageError("the tokenizer has no chat_template: pass --no-chat-template")
    out = []
    for p in prompts:
        if chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": p.text}],
                                                add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        else:
            ids = list(tokenizer(p.text)["input_ids"])
        if not ids:
            raise UsageError(f"prompt {p.id!r} (prompt {p.index + 1} of the file) tokenizes to zero tokens")
        out.append(ids)
    return out


def check_context(prompts: list[Prompt], ids: list[list[int]], max_new_tokens: int, max_seq_len: int) -> None:
    """Every prompt plus its new tokens must fit the model's context."""
    for p, t in zip(prompts, ids):
        if len(t) + max_new_tokens > max_seq_len:
            raise UsageError(f"prompt {p.id!r} has {len(t)} tokens + {max_new_tokens} new tokens > "
                             f"the model's context of {max_seq_len}")


def decode(tokenizer, ids: list[int]) -> str:
    """Text of generated ids; ids beyond the tokenizer's vocabulary (embedding padding) are dropped."""
    n = len(tokenizer)
    return tokenizer.decode([i for i in ids if i < n], skip_special_tokens=True)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows as JSONL atomically: a temp file in the same directory, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def output_rows(prompts: list[Prompt], ids: list[list[int]], results: list, tokenizer) -> list[dict]:
    """One output row per prompt and its `spmd.runtime.records.Result`, in input order (a result's
    `completion`, if a dedicated orchestrator decoded it already, is taken as it is)."""
    return [{"id": p.id, "prompt": p.text,
             "completion": r.completion if r.completion is not None else decode(tokenizer, r.tokens),
             "completion_token_ids": r.tokens, "prompt_tokens": len(t),
             "ttft_s": r.ttft_s, "latency_s": r.latency_s, "model_group": r.replica}
            for p, t, r in zip(prompts, ids, results)]
