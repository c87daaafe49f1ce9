"""Serial: outputs destroy nothing (check_paths' refusals at start-up), the progress directory's lock, file
modes that follow the umask, and symlinks in the progress directory never followed. No model, no MPI."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PROMPTS20

from spmd import config
from spmd.config import UsageError
from spmd.runtime import resume
from spmd.runtime.prompts import write_jsonl
from spmd.runtime.records import Result

IDS = [json.loads(ln)["id"] for ln in PROMPTS20.read_text().splitlines()]


def _args(ckpt: Path, prompts: Path, out: Path, *extra: str) -> config.RunArgs:
    return config.parse_args(["--checkpoint", str(ckpt), "--prompts", str(prompts), "--output", str(out),
                              "--max-new-tokens", "6", *extra])


@pytest.fixture
def prompts(tmp_path) -> Path:
    p = tmp_path / "in" / "p.jsonl"
    p.parent.mkdir()
    p.write_bytes(PROMPTS20.read_bytes())
    return p


def _refused(args, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        config.check_paths(args)


@pytest.mark.parametrize("make,match", [
    (lambda t, p: Path("/dev/null"), "--output /dev/null is a character device, not a regular file: writing it "
                                     "would replace it"),
    (lambda t, p: t / "in", "--output .*/in is a directory: give a file name"),
    (lambda t, p: p, "--output .*/p.jsonl is the prompt file .*p.jsonl \\(the same file\\): writing it would "
                     "destroy it"),
    (lambda t, p: (t / "link.jsonl").symlink_to(p) or t / "link.jsonl", "is the prompt file"),
    (lambda t, p: os.link(p, t / "hard.jsonl") or t / "hard.jsonl", "is the prompt file"),
    (lambda t, p: os.mkfifo(t / "fifo") or t / "fifo", "--output .*/fifo is a FIFO, not a regular file"),
])
def test_outputs_that_would_destroy_something_are_refused(tiny_bf16, tmp_path, prompts, make, match):
    _refused(_args(tiny_bf16, prompts, make(tmp_path, prompts)), match)
    assert Path("/dev/null").is_char_device()


def test_the_summary_beside_the_output_is_checked_too(tiny_bf16, tmp_path, prompts):
    named = prompts.rename(prompts.with_name("o.summary.json"))  # what --output o.jsonl's summary would replace
    _refused(_args(tiny_bf16, named, named.with_name("o.jsonl")),
             "the run summary \\(beside --output\\) .*o.summary.json is the prompt file")


def test_a_checkpoint_file_or_the_baseline_is_no_output(tiny_bf16, tmp_path, prompts):
    _refused(_args(tiny_bf16, prompts, tiny_bf16 / "config.json"), "is a file of checkpoint .*config.json")
    base = tmp_path / "base.jsonl"
    base.write_text("{}\n")
    _refused(_args(tiny_bf16, prompts, base, "--score", str(base)), "is the --score baseline")


def test_progress_directory_that_is_a_symlink_or_a_file_is_refused(tiny_bf16, tmp_path, prompts):
    out = tmp_path / "o.jsonl"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "o.jsonl.progress").symlink_to(elsewhere)
    _refused(_args(tiny_bf16, prompts, out), "progress directory .*o.jsonl.progress \\(beside --output\\) is a "
                                             "symlink: it is never followed")
    with pytest.raises(UsageError, match="is a symlink"):  # and lock() would not follow it either
        resume.lock(out)
    (tmp_path / "o.jsonl.progress").unlink()
    (tmp_path / "o.jsonl.progress").write_text("x")
    _refused(_args(tiny_bf16, prompts, out), "o.jsonl.progress \\(beside --output\\) is not a directory")


@pytest.mark.parametrize("trace,match", [
    (lambda t: (t / "file").write_text("x") and t / "file",
     "--trace-dir .*/file is not a directory \\(a regular file\\)"),
    (lambda t: Path("/proc/self/spmd-traces"), "trace directory /proc/self/spmd-traces is not writable"),
    (lambda t: Path("/proc/self"), "trace directory /proc/self is not writable"),
    (lambda t: t / "run.h5", "--trace-dir .*run.h5 ends in .h5: it names a directory"),
    (lambda t: t / "o.jsonl", "--trace-dir .*o.jsonl is the output's own path"),
])
def test_trace_directory_refusals(tiny_bf16, tmp_path, prompts, trace, match):
    _refused(_args(tiny_bf16, prompts, tmp_path / "o.jsonl", "--trace-dir", str(trace(tmp_path))), match)


def test_a_new_or_regular_output_and_a_new_trace_dir_pass(tiny_bf16, tmp_path, prompts):
    config.check_paths(_args(tiny_bf16, prompts, tmp_path / "new" / "o.jsonl", "--trace-dir", str(tmp_path / "t")))
    (tmp_path / "old.jsonl").write_text("an earlier output\n")
    config.check_paths(_args(tiny_bf16, prompts, tmp_path / "old.jsonl"))
    assert (tmp_path / "t").is_dir() and (tmp_path / "old.jsonl").read_text() == "an earlier output\n"


HOLD = """
import fcntl, json, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"host": "node7", "pid": 4242}).encode())
print("ready", flush=True)
sys.stdin.read()
"""

PROBE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("free")
except BlockingIOError:
    print("held", os.pread(fd, 4096, 0).decode())
"""


def test_a_second_run_on_the_same_output_is_refused_naming_the_holder(tiny_bf16, tmp_path, prompts):
    out = tmp_path / "o.jsonl"
    d = resume.progress_dir(out)
    d.mkdir()
    (d / "header.json").write_text("{}")
    (d / "replica-0.jsonl").write_text("a live run's rows\n")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(d / "lock")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        msg = "--output .*o.jsonl: another run \\(host node7, pid 4242\\) is using its progress directory"
        with pytest.raises(UsageError, match=msg):
            resume.check_free(out)  # at start-up
        with pytest.raises(UsageError, match=msg):
            resume.prepare(_args(tiny_bf16, prompts, out), IDS, lambda m: None)  # a fresh run would empty it
        assert (d / "replica-0.jsonl").read_text() == "a live run's rows\n"
    finally:
        holder.communicate("")
    resume.check_free(out)  # the holder ended: free


def test_the_lock_is_held_for_the_run_and_let_go_at_the_end(tiny_bf16, tmp_path, prompts):
    out = tmp_path / "o.jsonl"
    resume.lock(out)  # what the program does before prepare
    resume.prepare(_args(tiny_bf16, prompts, out), IDS, lambda m: None)
    lock = resume.progress_dir(out) / "lock"
    probe = subprocess.run([sys.executable, "-c", PROBE, str(lock)], capture_output=True, text=True, check=True)
    state, who = probe.stdout.split(" ", 1)
    assert state == "held" and json.loads(who)["pid"] == os.getpid()
    assert json.loads(who)["host"] == socket.gethostname()
    resume.prepare(_args(tiny_bf16, prompts, out, "--resume"), IDS, lambda m: None)  # the same process: its own
    resume.finish(out)
    assert not resume.progress_dir(out).exists()


def test_a_refused_run_leaves_the_directory_as_it_found_it(tmp_path):
    out = tmp_path / "o.jsonl"
    resume.lock(out)  # no directory yet: lock makes it, release removes it
    resume.release(out)
    assert not resume.progress_dir(out).exists()
    d = resume.progress_dir(out)
    d.mkdir()
    (d / "replica-0.jsonl").write_text("rows\n")
    resume.lock(out)
    assert sorted(f.name for f in d.iterdir()) == ["lock", "replica-0.jsonl"]
    resume.release(out)
    assert sorted(f.name for f in d.iterdir()) == ["replica-0.jsonl"]


def test_modes_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_jsonl(tmp_path / "a.jsonl", [{"a": 1}])
        os.umask(0o007)
        write_jsonl(tmp_path / "b.jsonl", [{"b": 1}])
        w = resume.Writer(tmp_path / "o.jsonl", 0, IDS)
        w.append([Result(0, [1], 0.1, 0.2, 0)])
        w.close()
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "a.jsonl") == 0o644 and mode(tmp_path / "b.jsonl") == 0o660
    assert mode(tmp_path / "o.jsonl.progress" / "replica-0.jsonl") == 0o660


def test_symlinks_in_the_progress_directory_are_never_followed(tiny_bf16, tmp_path, prompts):
    out = tmp_path / "o.jsonl"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    resume.prepare(_args(tiny_bf16, prompts, out), IDS, lambda m: None)
    d = resume.progress_dir(out)
    (d / "replica-0.jsonl").symlink_to(victim)
    w = resume.Writer(out, 0, IDS)
    with pytest.raises(OSError):
        w.append([Result(0, [1], 0.1, 0.2, 0)])
    with pytest.raises(UsageError, match="progress file .*replica-0.jsonl is a symlink \\(never followed\\)"):
        resume.prepare(_args(tiny_bf16, prompts, out, "--resume"), IDS, lambda m: None)
    resume.prepare(_args(tiny_bf16, prompts, out), IDS, lambda m: None)  # a fresh run removes the link only
    assert victim.read_text() == "precious\n" and not (d / "replica-0.jsonl").exists()
    resume.finish(out)
