"""The progress directory: finished prompts on disk as they complete, so a killed job can `--resume`.

`<output>.progress/` holds
- `lock`: rank 0's advisory lock (flock) for the whole run, with its host and pid: a second run on the
  same output is refused, naming them (`check_free` at start-up and in `prepare`; the program takes
  `lock` before `prepare` and keeps it until `finish` or its end).
- `header.json`: written atomically by rank 0 before any prompt runs; the fingerprint of everything
  that decides the output tokens (prompt file bytes, checkpoint config, index, sampled weights and
  tokenizer files, engine, dtype, max_new_tokens, sampling, chat template, score settings), not the
  layout (ranks, group size, dispatch, batch size).
- `replica-<k>.jsonl`: appended by the leader of model group k after every batch, one line per
  finished prompt `{index, id, completion_token_ids, ttft_s, latency_s, model_group, finish_reason,
  queue_s[, score]}` (files from before finish_reason and queue_s are read too: "" and 0.0),
  written with one `write` and fsync'd. A line cut short by a kill (no newline, bad JSON) or invalid
  (wrong fields or types, a token outside the vocabulary, more tokens than its max_new_tokens, a timing
  that is not a finite number >= 0) is ignored on resume with a warning naming its file and line, and
  the prompt runs again.

A fresh run (no `--resume`) empties the directory; `--resume` keeps what matches and runs the rest
(a resumed run may use another layout: its leaders append to their own `replica-<k>.jsonl`, old files
are read too); a directory with rows but no valid header is refused, not emptied. Files in it are
never followed if they are symlinks. On a clean finish rank 0 removes the directory after writing
the output. The directory must be on a file system that rank 0 and every replica leader see (the
output's), with flock for the lock (NFS has it; Lustre with `-o flock`; else a warning, no lock).
"""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import secrets
import shutil
import socket
import stat
import sys
import time
from pathlib import Path

from spmd.runtime import score
from spmd.runtime.prompts import write_jsonl
from spmd.runtime.records import Result
from spmd.config import UsageError

KIND = "spmd-progress"
FORMAT = 1
HEADER = "header.json"
LOCK = "lock"
ROW_KEYS = ("index", "id", "completion_token_ids", "ttft_s", "latency_s", "model_group")
FINISH_REASONS = ("", "stop", "length")
MAX_WARNINGS = 20  # invalid progress lines named one by one; the rest counted
_NOFOLLOW = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # O_NONBLOCK: a FIFO there fails, never blocks
# progress directory (absolute) → (fd of its lock file, made the directory, made the file): held by this process
_held: dict[str, tuple[int, bool, bool]] = {}


def progress_dir(output: Path) -> Path:
    """`<output>.progress`, beside the output file."""
    output = Path(output)
    return output.with_name(output.name + ".progress")


def fingerprint(args) -> dict:
    """What decides the output tokens of a run with these RunArgs (rank 0: reads the files)."""
    try:
        ckpt = score.checkpoint_fingerprint(args.checkpoint)
        weights = score.weights_fingerprint(args.checkpoint)
        tokenizer = score.tokenizer_fingerprint(args.checkpoint)
    except score.BaselineError as exc:
        raise UsageError(str(exc)) from None
    try:
        prompts = score.file_sha256(args.prompts)
        baseline = score.file_sha256(args.score) if args.score is not None else None
    except OSError as exc:
        raise UsageError(f"cannot fingerprint {exc.filename}: {exc.strerror}") from None
    return {"prompts_sha256": prompts, "checkpoint_sha256": ckpt, "weights_sha256": weights,
            "tokenizer_sha256": tokenizer, "engine": args.engine, "dtype": args.dtype,
            "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "seed": args.seed, "chat": args.chat, "score_baseline_sha256": baseline, "score_only": args.score_only}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare(args, prompt_ids: list[str], log=_log, *, vocab_size: int | None = None,
            max_new_tokens: list[int] | None = None) -> list[Result]:
    """Rank 0, before any prompt runs (the program holds the `lock` by then): a fresh progress directory,
    or (--resume) the finished results (rows checked against `vocab_size` and each prompt's
    `max_new_tokens` where given).

    Returns the finished prompts' Results, sorted by index; [] for a fresh run. A directory another live
    run holds, one of another run, or (--resume) one with rows but no valid header → UsageError, the
    directory untouched.
    """
    d = progress_dir(args.output)
    check_free(args.output)
    _check_dir(d)
    d.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(args)
    header = _read_header(d)
    rows_there = sorted(f.name for f in d.glob("replica-*.jsonl"))
    if args.resume and header is not None:
        _check_fingerprint(d, header.get("fingerprint"), fp)
        rows, ignored = read_rows(d, prompt_ids, args.score is not None, log, vocab_size, max_new_tokens)
        log(f"resume: {len(rows)} of {len(prompt_ids)} prompts already done in {d}"
            + (f" ({ignored} torn or invalid line(s) ignored: those prompts run again)" if ignored else ""))
        return rows
    if args.resume and rows_there:
        raise UsageError(f"--resume: {d} has progress rows ({', '.join(rows_there[:3])}) but no valid {HEADER}, "
                         f"so they cannot be checked against this run; nothing was changed. Run without --resume "
                         f"to start over (that empties {d}), or move the directory away to keep it")
    if args.resume:
        log(f"resume: no progress directory {d} with finished prompts: starting from scratch")
    elif header is not None or rows_there:
        log(f"note: {d} is left from an unfinished run; starting over (pass --resume to continue it)")
    _clear(d)
    write_jsonl(d / HEADER, [{"kind": KIND, "format": FORMAT, "n_prompts": len(prompt_ids),
                              "prompts": str(args.prompts), "checkpoint": str(args.checkpoint), "fingerprint": fp}])
    _fsync_dir(d)
    return []


def check_free(output: Path) -> None:
    """Rank 0 at start-up, before any model work: UsageError if another live run holds the progress
    directory's lock (or its lock file is a symlink). Makes nothing; `lock` takes it later."""
    d = progress_dir(output)
    if os.path.abspath(d) in _held or not d.is_dir() or d.is_symlink():
        return  # not there yet (check_paths refuses a symlink or a file in its place)
    try:
        fd = os.open(d / LOCK, os.O_RDWR | _NOFOLLOW)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UsageError(f"cannot open the lock file {d / LOCK}: {_why(exc)}") from None
    try:
        if _flock(fd, d, output, lambda m: None):
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def lock(output: Path, log=_log) -> None:
    """Rank 0: hold `<output>.progress/lock` (flock, LOCK_EX | LOCK_NB) until `finish`, `release` or the
    process ends, writing this host and pid into it. Another live run's lock → UsageError naming its host
    and pid."""
    d = progress_dir(output)
    key = os.path.abspath(d)
    held = _held.pop(key, None)
    if held is not None:
        if _same_file(held[0], d / LOCK):
            _held[key] = held
            return
        os.close(held[0])  # the directory went away under us: lock again
    for _ in range(10):
        _check_dir(d)
        made_dir = not d.exists()
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot make the progress directory {d}: {_why(exc)}") from None
        _check_dir(d)
        fd, made_file = _open_lock(d / LOCK)
        try:
            locked = _flock(fd, d, output, log)
        except UsageError:
            os.close(fd)
            raise
        if _same_file(fd, d / LOCK):  # not removed by a run that finished between our open and flock
            if locked:
                me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, me + b"\n", 0)
            _held[key] = (fd, made_dir, made_file)
            return
        os.close(fd)
    raise UsageError(f"cannot lock {d}: it was removed 10 times in a row (another run on the same --output?)")


def release(output: Path) -> None:
    """Let the lock go early (a run refused after `lock`), removing the lock file and directory if `lock` made
    them (the directory only if empty): the progress directory is left as it was found."""
    d = progress_dir(output)
    held = _held.pop(os.path.abspath(d), None)
    if held is None:
        return
    fd, made_dir, made_file = held
    try:
        if made_file and _same_file(fd, d / LOCK):
            os.unlink(d / LOCK)
        if made_dir:
            d.rmdir()
    except OSError:
        pass
    finally:
        os.close(fd)


def _open_lock(path: Path) -> tuple[int, bool]:
    """(fd, whether this call made it) of the lock file, opened for writing (NFS locks need it), never followed."""
    for flags in (os.O_CREAT | os.O_EXCL, 0, os.O_CREAT | os.O_EXCL):  # made, there, or removed in between
        try:
            return os.open(path, os.O_RDWR | _NOFOLLOW | flags, 0o666), bool(flags)
        except (FileExistsError, FileNotFoundError):
            continue
        except OSError as exc:
            raise UsageError(f"cannot open the lock file {path}: {_why(exc)}") from None
    raise UsageError(f"cannot open the lock file {path}: it keeps appearing and vanishing")


def _flock(fd: int, d: Path, output: Path, log) -> bool:
    """flock fd without waiting: True when locked; False (a warning) where the file system has no locks;
    UsageError naming the holder when another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        raise UsageError(f"--output {output}: another run ({_holder(fd)}) is using its progress directory {d}: wait "
                         f"for it to end or stop it, or give another --output") from None
    except OSError as exc:
        log(f"warning: cannot lock {d} ({_why(exc)}): this file system has no flock, so a second run on the same "
            f"--output is not detected")
        return False


def _holder(fd: int) -> str:
    try:
        who = json.loads(os.pread(fd, 4096, 0))
        return f"host {who['host']}, pid {who['pid']}" + (f", since {who['since']}" if "since" in who else "")
    except (OSError, ValueError, TypeError, KeyError):
        return "host and pid not written yet"


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _check_dir(d: Path) -> None:
    """The progress directory, if there, must be a directory and not a symlink (never followed)."""
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"progress directory {d} is {'a symlink' if stat.S_ISLNK(st.st_mode) else 'not a directory'}"
                         f": it is never followed or replaced; remove it, or give another --output")


def _why(exc: OSError) -> str:
    return "a symlink (never followed)" if exc.errno == errno.ELOOP else (exc.strerror or str(exc))


def _clear(d: Path) -> None:
    """Empty the progress directory, all but the lock file; symlinks are removed, never followed."""
    with os.scandir(d) as entries:
        for e in entries:
            if e.name == LOCK:
                continue
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)


def _read_nofollow(path: Path) -> bytes:
    """A regular file's bytes; a symlink, FIFO or other non-file → OSError (ELOOP for a symlink)."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return f.read()


def _read_header(d: Path) -> dict | None:
    try:
        obj = json.loads(_read_nofollow(d / HEADER).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) and obj.get("kind") == KIND else None


def _check_fingerprint(d: Path, theirs, ours: dict) -> None:
    if not isinstance(theirs, dict):
        theirs = {}

    def show(k, v):  # a hash: its first 12 digits
        return f"{v[:12]}..." if k.endswith("_sha256") and isinstance(v, str) else repr(v)

    diff = [f"{k} {show(k, theirs.get(k))} there, {show(k, v)} here" for k, v in ours.items() if theirs.get(k) != v]
    if diff:
        raise UsageError(f"--resume: {d} belongs to a run with other inputs or settings ({'; '.join(diff)}); "
                         f"rerun with that run's arguments, or without --resume to start over")


def read_rows(d: Path, prompt_ids: list[str], scored: bool, log=_log, vocab_size: int | None = None,
              max_new_tokens: list[int] | None = None) -> tuple[list[Result], int]:
    """Finished prompts of every `replica-*.jsonl` (first valid line per index), and how many lines were
    ignored, each named in a warning (the first MAX_WARNINGS). Files with ignored lines are rewritten without
    them, so that appending goes on cleanly. A progress file that is a symlink or not a regular file → UsageError."""
    done: dict[int, Result] = {}
    ignored = 0
    for f in sorted(d.glob("replica-*.jsonl")):
        try:
            raw = _read_nofollow(f)
        except OSError as exc:
            raise UsageError(f"--resume: progress file {f} is {_why(exc)}: remove it, or run without --resume to "
                             f"start over") from None
        good: list[bytes] = []
        bad = 0
        for n, line in enumerate(raw.splitlines(keepends=True), 1):
            try:
                row = _parse_row(line, prompt_ids, scored, vocab_size, max_new_tokens)
            except BadRow as exc:
                bad += 1
                if ignored + bad <= MAX_WARNINGS:
                    log(f"warning: {f}:{n}: progress line ignored ({exc}); that prompt runs again")
                continue
            good.append(line)
            done.setdefault(row.index, row)
        if bad:
            ignored += bad
            _rewrite(f, b"".join(good))
    if ignored > MAX_WARNINGS:
        log(f"warning: {ignored - MAX_WARNINGS} more progress line(s) in {d} ignored")
    return [done[i] for i in sorted(done)], ignored


class BadRow(ValueError):
    """A progress line that is not a finished prompt of this run (why: the message)."""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # bool is an int subclass: not a count or an id


def _seconds(row: dict, key: str, default=None) -> float:
    x = row.get(key, default)
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
        raise BadRow(f"{key} {x!r} is not a finite number of seconds >= 0")
    return float(x)


def _parse_row(line: bytes, prompt_ids: list[str], scored: bool, vocab_size: int | None = None,
               max_new_tokens: list[int] | None = None) -> Result:
    """A complete, well-formed progress line of this prompt set → its Result; anything else → BadRow."""
    if not line.endswith(b"\n"):
        raise BadRow("torn: no newline, a write cut short")
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadRow("not JSON") from None
    if not isinstance(obj, dict):
        raise BadRow("not a JSON object")
    missing = [k for k in ROW_KEYS if k not in obj]
    if missing:
        raise BadRow(f"lacks {', '.join(missing)}")
    if ("score" in obj) != scored:
        raise BadRow("a scored row in a run without --score" if not scored else "no score in a run with --score")
    i = obj["index"]
    if not _is_int(i) or not 0 <= i < len(prompt_ids):
        raise BadRow(f"index {i!r} is not one of 0..{len(prompt_ids) - 1}")
    if obj["id"] != prompt_ids[i]:
        raise BadRow(f"id {obj['id']!r} is not prompt {i}'s")
    toks = obj["completion_token_ids"]
    if not isinstance(toks, list) or not all(_is_int(t) for t in toks):
        raise BadRow("completion_token_ids is not a list of integers")
    if vocab_size is not None and not all(0 <= t < vocab_size for t in toks):
        raise BadRow(f"a token id outside [0, {vocab_size})")
    if max_new_tokens is not None and len(toks) > max_new_tokens[i]:
        raise BadRow(f"{len(toks)} tokens, more than its max_new_tokens {max_new_tokens[i]}")
    ttft, latency, queue = _seconds(obj, "ttft_s"), _seconds(obj, "latency_s"), _seconds(obj, "queue_s", 0.0)
    group, reason = obj["model_group"], obj.get("finish_reason", "")
    if not _is_int(group) or group < -1:
        raise BadRow(f"model_group {group!r} is not a group number")
    if not isinstance(reason, str) or reason not in FINISH_REASONS:
        raise BadRow(f"finish_reason {reason!r} is not one of {', '.join(map(repr, FINISH_REASONS))}")
    if scored and not isinstance(obj["score"], dict):
        raise BadRow("score is not a JSON object")
    return Result(i, toks, ttft, latency, group, obj["score"] if scored else None,
                  finish_reason=reason, queue_s=queue)


def _rewrite(path: Path, data: bytes) -> None:
    """Replace path's bytes atomically through a new temp file (created, never followed)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    each batch's rows appended with one write, then fsync'd. A symlink there is not followed (OSError)."""

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
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | _NOFOLLOW, 0o666)  # umask applies
            if not stat.S_ISREG(os.fstat(self.fd).st_mode):
                raise OSError(errno.EINVAL, "progress file is not a regular file", str(self.path))
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
    """Rank 0, after the output is written: the progress directory (lock file included) is no longer
    needed; then the lock is let go."""
    d = progress_dir(output)
    shutil.rmtree(d, ignore_errors=True)
    held = _held.pop(os.path.abspath(d), None)
    if held is not None:
        os.close(held[0])
