"""The progress directory: finished prompts on disk as they complete, so a killed job can `--resume`.

`<output>.progress/` holds
- `header.json`: written atomically by rank 0 before any prompt runs; the fingerprint of everything
  that decides the output tokens (prompt file bytes, checkpoint, engine, dtype, max_new_tokens,
  sampling, chat template, score settings), not the layout (ranks, group size, dispatch, batch size).
- `replica-<k>.jsonl`: appended by the leader of model group k after every batch, one line per
  finished prompt `{index, id, completion_token_ids, ttft_s, latency_s, model_group, finish_reason,
  queue_s[, score]}` (files from before finish_reason and queue_s are read too: "" and 0.0),
  written with one `write` and fsync'd. A line cut short by a kill (no newline, bad JSON, wrong
  fields) is ignored on resume and the prompt runs again.

A fresh run (no `--resume`) replaces the directory; `--resume` keeps what matches and runs the rest
(a resumed run may use another layout: its leaders append to their own `replica-<k>.jsonl`, old files
are read too). On a clean finish rank 0 removes the directory after writing the output. The
directory must be on a file system that rank 0 and every replica leader see (the output's).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from spmd.runtime import score
from spmd.runtime.prompts import write_jsonl
from spmd.runtime.records import Result
from spmd.config import UsageError

KIND = "spmd-progress"
FORMAT = 1
HEADER = "header.json"
ROW_KEYS = ("index", "id", "completion_token_ids", "ttft_s", "latency_s", "model_group")


def progress_dir(output: Path) -> Path:
    """`<output>.progress`, beside the output file."""
    output = Path(output)
    return output.with_name(output.name + ".progress")


def fingerprint(args) -> dict:
    """What decides the output tokens of a run with these RunArgs (rank 0: reads the files)."""
    try:
        ckpt = score.checkpoint_fingerprint(args.checkpoint)
    except score.BaselineError as exc:
        raise UsageError(str(exc)) from None
    try:
        prompts = score.file_sha256(args.prompts)
        baseline = score.file_sha256(args.score) if args.score is not None else None
    except OSError as exc:
        raise UsageError(f"cannot fingerprint {exc.filename}: {exc.strerror}") from None
    return {"prompts_sha256": prompts, "checkpoint_sha256": ckpt, "engine": args.engine, "dtype": args.dtype,
            "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "seed": args.seed, "chat": args.chat, "score_baseline_sha256": baseline, "score_only": args.score_only}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare(args, prompt_ids: list[str], log=_log) -> list[Result]:
    """Rank 0, before any prompt runs: a fresh progress directory, or (--resume) the finished results.

    Returns the finished prompts' Results, sorted by index; [] for a fresh run. A progress directory of another run → UsageError.
    """
    d = progress_dir(args.output)
    fp = fingerprint(args)
    header = _read_header(d)
    if args.resume and header is not None:
        _check_fingerprint(d, header.get("fingerprint"), fp)
        rows, ignored = read_rows(d, prompt_ids, args.score is not None)
        log(f"resume: {len(rows)} of {len(prompt_ids)} prompts already done in {d}"
            + (f" ({ignored} torn or invalid line(s) ignored: those prompts run again)" if ignored else ""))
        return rows
    if args.resume:
        log(f"resume: no progress directory {d} (or it has no {HEADER}): starting from scratch")
    elif d.exists():
        log(f"note: {d} is left from an unfinished run; starting over (pass --resume to continue it)")
    if d.exists() or d.is_symlink():
        shutil.rmtree(d) if d.is_dir() and not d.is_symlink() else d.unlink()
    d.mkdir(parents=True)
    write_jsonl(d / HEADER, [{"kind": KIND, "format": FORMAT, "n_prompts": len(prompt_ids),
                              "prompts": str(args.prompts), "checkpoint": str(args.checkpoint), "fingerprint": fp}])
    _fsync_dir(d)
    return []


def _read_header(d: Path) -> dict | None:
    try:
        obj = json.loads((d / HEADER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) and obj.get("kind") == KIND else None


def _check_fingerprint(d: Path, theirs, ours: dict) -> None:
    if not isinstance(theirs, dict):
        theirs = {}
    diff = [f"{k} {theirs.get(k)!r} there, {v!r} here" for k, v in ours.items() if theirs.get(k) != v]
    if diff:
        raise UsageError(f"--resume: {d} belongs to a run with other inputs or settings ({'; '.join(diff)}); "
                         f"rerun with that run's arguments, or without --resume to start over")


def read_rows(d: Path, prompt_ids: list[str], scored: bool) -> tuple[list[Result], int]:
    """Finished prompts of every `replica-*.jsonl` (first valid line per index), and how many lines were
    ignored. Files with ignored lines are rewritten without them, so that appending goes on cleanly."""
    done: dict[int, Result] = {}
    ignored = 0
    for f in sorted(d.glob("replica-*.jsonl")):
        raw = f.read_bytes()
        good: list[bytes] = []
        bad = 0
        for line in raw.splitlines(keepends=True):
            row = _parse_row(line, prompt_ids, scored)
            if row is None:
                bad += 1
                continue
            good.append(line)
            done.setdefault(row.index, row)
        if bad:
            ignored += bad
            _rewrite(f, b"".join(good))
    return [done[i] for i in sorted(done)], ignored


def _parse_row(line: bytes, prompt_ids: list[str], scored: bool) -> Result | None:
    """A complete, well-formed progress line of this prompt set → its Result; anything else → None."""
    if not line.endswith(b"\n"):
        return None  # torn: the write did not finish
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(obj, dict) or any(k not in obj for k in ROW_KEYS) or ("score" in obj) != scored:
        return None
    i = obj["index"]
    if not isinstance(i, int) or not 0 <= i < len(prompt_ids) or obj["id"] != prompt_ids[i]:
        return None
    toks = obj["completion_token_ids"]
    if not isinstance(toks, list) or not all(isinstance(t, int) for t in toks):
        return None
    reason, queue_s = obj.get("finish_reason", ""), obj.get("queue_s", 0.0)
    if not isinstance(reason, str) or not isinstance(queue_s, (int, float)):
        return None
    return Result(i, toks, obj["ttft_s"], obj["latency_s"], obj["model_group"], obj["score"] if scored else None,
                  finish_reason=reason, queue_s=queue_s)


def _rewrite(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory
    finally:
        os.close(fd)


class Writer:
    """A replica leader's `replica-<k>.jsonl` (a dedicated orchestrator's `replica-orchestrator.jsonl`):
    each batch's rows appended with one write, then fsync'd."""

    def __init__(self, output: Path, replica: int | str, prompt_ids: list[str]):
        self.dir = progress_dir(output)
        self.path = self.dir / f"replica-{replica}.jsonl"
        self.ids = prompt_ids
        self.fd: int | None = None

    def append(self, rows: list[Result]) -> None:
        """Results → lines on disk (ROW_KEYS, and `score` when scored)."""
        if not rows:
            return
        if self.fd is None:
            self.dir.mkdir(parents=True, exist_ok=True)  # rank 0 made it; a slow shared file system may lag
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            _fsync_dir(self.dir)
        data = "".join(json.dumps(_row(r, self.ids[r.index]), ensure_ascii=False) + "\n" for r in rows)
        buf = memoryview(data.encode("utf-8"))
        while buf:
            buf = buf[os.write(self.fd, buf):]
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _row(r: Result, prompt_id: str) -> dict:
    row = {"index": r.index, "id": prompt_id, "completion_token_ids": r.tokens, "ttft_s": r.ttft_s,
           "latency_s": r.latency_s, "model_group": r.replica, "finish_reason": r.finish_reason,
           "queue_s": r.queue_s}
    if r.score is not None:
        row["score"] = r.score
    return row


def finish(output: Path) -> None:
    """Rank 0, after the output is written: the progress directory is no longer needed."""
    shutil.rmtree(progress_dir(output), ignore_errors=True)
