"""Rank-0 text I/O: read and validate prompts, chat template, tokenize, detokenize, stop strings, outputs.

Generation sees token ids only; text never leaves this module (and spmd.runtime.prompts_formats, the
file formats) except as output rows, and as the stop strings that `StopStrings` matches for it.
"""
from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from os.path import commonprefix
from pathlib import Path

from spmd.config import UsageError
from spmd.config.cli import SEED_MAX
from spmd.runtime.prompts_formats import Prompt, batch_rows, parse_lines, show
from spmd.runtime.records import Sampling

__all__ = ["Prompt", "PromptSet", "StopStrings", "batch_rows", "check_context", "cut_at_stop", "decode",
           "encode", "file_format", "load_tokenizer", "output_rows", "read_prompts", "sampling_of",
           "write_jsonl"]


@dataclass(frozen=True)
class PromptSet:
    """Rank 0's prompts, their token ids (input order) and the tokenizer that made them."""

    prompts: list[Prompt]
    ids: list[list[int]]
    tokenizer: object
    sampling: list[Sampling] | None = None  # per prompt: its settings over the run's (sampling_of)
    format: str = "plain"                   # "plain" | "openai": the input's format, and so the output's


def read_prompts(path: Path) -> list[Prompt]:
    """Prompts from `.txt` (one per non-empty line) or `.jsonl`: one {"id", "prompt", settings...} object
    per line, or one OpenAI batch request per line (spmd.runtime.prompts_formats)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read prompt file {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UsageError(f"prompt file {path} is not UTF-8 (line {line}, byte {exc.start})") from None
    # "\n" ends a line (JSONL's rule; a "\r" before it goes too): not str.splitlines, which also breaks at
    # U+2028, U+0085, "\x0c"..., characters a JSON string may hold as they are
    lines = [(n, ln[:-1] if ln.endswith("\r") else ln) for n, ln in enumerate(text.split("\n"), 1)]
    lines = [(n, ln) for n, ln in lines if ln.strip()]
    if not lines:
        raise UsageError(f"prompt file {path} has no prompts")
    prompts = parse_lines(path, lines) if Path(path).suffix == ".jsonl" else \
        [Prompt(i, str(n), ln) for i, (n, ln) in enumerate(lines)]
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise UsageError(f"prompt file {path} has duplicate ids: "
                         f"{', '.join(i if i.isprintable() else show(i) for i in dup[:5])}")
    return prompts


def file_format(prompts: list[Prompt]) -> str:
    """"openai" for OpenAI batch requests (they carry chat messages), else "plain"."""
    return "openai" if prompts and prompts[0].messages is not None else "plain"


def sampling_of(prompt: Prompt, index: int, args) -> Sampling:
    """A prompt's generation settings: its own (prompt.settings), else the run's options (RunArgs);
    its seed defaults to --seed + its index, so that its draws do not depend on its neighbours."""
    own = prompt.settings
    stop = own.get("stop", ())
    temperature = float(own.get("temperature", args.temperature))
    seed = own.get("seed", args.seed + index)
    if seed > SEED_MAX and temperature > 0:  # a sampled row's generator would refuse it mid-run
        raise UsageError(f"prompt {prompt.id!r} (prompt {index + 1} of the file) samples with seed --seed + its "
                         f"index = {args.seed} + {index} > {SEED_MAX} (2^64 - 1): give a smaller --seed")
    return Sampling(max_new_tokens=own.get("max_new_tokens", args.max_new_tokens),
                    temperature=temperature,
                    top_p=float(own.get("top_p", args.top_p)),
                    seed=seed,
                    stop=(stop,) if isinstance(stop, str) else tuple(stop),
                    ignore_eos=own.get("ignore_eos", False))


def load_tokenizer(checkpoint: Path):
    """The checkpoint's own tokenizer (tokenizer.json + tokenizer_config.json), local files only."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load the tokenizer of {checkpoint}: {exc}") from None


def encode(tokenizer, prompts: list[Prompt], chat: bool) -> list[list[int]]:
    """Token ids per prompt: the chat template with a generation prompt (over the whole chat of an OpenAI
    batch request), or the raw text with BOS."""
    if not chat and any(p.messages is not None for p in prompts):
        raise UsageError("OpenAI batch requests carry chat messages: they need the chat template "
                         "(drop --no-chat-template)")
    if chat and not tokenizer.chat_template:
        raise UsageError("the tokenizer has no chat_template: pass --no-chat-template")
    out = []
    for p in prompts:
        if chat:
            ids = _apply_chat_template(tokenizer, p)
        else:
            ids = list(tokenizer(p.text)["input_ids"])
        if not ids:
            raise UsageError(f"prompt {p.id!r} (prompt {p.index + 1} of the file) tokenizes to zero tokens")
        out.append(ids)
    return out


def _apply_chat_template(tokenizer, p: Prompt) -> list[int]:
    """Token ids of a prompt's chat; the template is the checkpoint's (jinja), so anything it raises (its own
    raise_exception on a chat it refuses, a syntax error, an undefined name...) is bad input: a UsageError."""
    try:
        ids = tokenizer.apply_chat_template(p.messages or [{"role": "user", "content": p.text}],
                                            add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    except Exception as exc:  # noqa: BLE001 - a user-supplied template: any of its errors is bad input
        why = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
        raise UsageError(f"the chat template of tokenizer {getattr(tokenizer, 'name_or_path', '?')} fails on "
                         f"prompt {p.id!r} (prompt {p.index + 1} of the file): {why}"
                         + (" (fix the template, or pass --no-chat-template)" if p.messages is None else "")) from None


def check_context(prompts: list[Prompt], ids: list[list[int]], sampling: list[Sampling] | int,
                  max_seq_len: int) -> None:
    """Every prompt plus its own max_new_tokens (its Sampling; an int: the same for all) must fit the
    model's context."""
    for i, (p, t) in enumerate(zip(prompts, ids)):
        new = sampling if isinstance(sampling, int) else sampling[i].max_new_tokens
        if len(t) + new > max_seq_len:
            raise UsageError(f"prompt {p.id!r} has {len(t)} tokens + {new} new tokens > "
                             f"the model's context of {max_seq_len}")


def decode(tokenizer, ids: list[int]) -> str:
    """Text of generated ids; ids beyond the tokenizer's vocabulary (embedding padding) are dropped."""
    n = len(tokenizer)
    return tokenizer.decode([i for i in ids if i < n], skip_special_tokens=True)


class StopStrings:
    """Whether a row's last token completed one of its stop strings, on the text `decode` gives.

    Only a tail of the tokens is decoded: a stop string of B UTF-8 bytes spans at most B tokens that
    give text (each gives at least one byte), so B + MARGIN tokens hold it (the margin: tokens that give
    none, special or beyond the vocabulary, and a character cut at the tail's start). Cost per step:
    two decodes of that tail, whatever the row's length."""

    MARGIN = 8

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def hit(self, tokens: list[int], stops: tuple[str, ...]) -> bool:
        """True when the text of `tokens` holds a stop string that the text before the last token did not."""
        if not stops or not tokens:
            return False
        tail = tokens[-(max(len(s.encode("utf-8")) for s in stops) + self.MARGIN):]
        now, before = decode(self.tokenizer, tail), decode(self.tokenizer, tail[:-1])
        # text both share was there before; a new match must end past it. Not just len(before): a
        # character whose bytes were cut short decodes to U+FFFD before its last token comes
        kept = len(commonprefix([before, now]))
        return any(now.find(s, max(0, kept - len(s) + 1)) >= 0 for s in stops)


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """The completion up to, not including, its first stop string (OpenAI's semantics)."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(ends)] if ends else text


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows as JSONL atomically: a temp file in the same directory, then rename."""
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_atomic(path: Path, text: str) -> None:
    """Write a text file atomically: a new temp file in the same directory, fsync, then rename over path (a
    symlink there is replaced, not followed). Its mode is 0666 less the umask, as for any new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temp(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _new_temp(path: Path) -> tuple[int, Path]:
    """(fd, name) of a new hidden file beside path, made with O_EXCL (mkstemp would make it 0600)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp file name beside {path}")


def output_rows(prompts: list[Prompt], ids: list[list[int]], results: list, tokenizer,
                sampling: list[Sampling] | None = None) -> list[dict]:
    """One output row per prompt and its `spmd.runtime.records.Result`, in input order (a result's
    `completion`, if a dedicated orchestrator decoded it already, is taken as it is), the completion cut
    at its first stop string (`sampling`: per prompt; None: no stop strings)."""
    rows = []
    for i, (p, t, r) in enumerate(zip(prompts, ids, results)):
        text = r.completion if r.completion is not None else decode(tokenizer, r.tokens)
        cut = cut_at_stop(text, sampling[i].stop if sampling else ())
        reason = r.finish_reason or _finish_reason(r, cut != text, tokenizer)
        rows.append({"id": p.id, "prompt": p.text, "completion": cut, "completion_token_ids": r.tokens,
                     "prompt_tokens": len(t), "finish_reason": reason, "ttft_s": r.ttft_s, "queue_s": r.queue_s,
                     "latency_s": r.latency_s, "model_group": r.replica})
    return rows


def _finish_reason(result, stopped: bool, tokenizer) -> str:
    """For a Result that does not say (an engine or a progress file from before finish_reason): "stop"
    when a stop string or EOS ended it, else "length"."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return "stop" if stopped or (result.tokens and result.tokens[-1] == eos) else "length"
