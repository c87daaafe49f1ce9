"""No lost results: the progress directory, --resume after a kill, SIGTERM/SIGUSR1 stops (mpirun -n 2).

Kills land mid-run: each test polls OUTPUT.progress/replica-*.jsonl and signals the rank processes
(their pids come from a small sh wrapper per rank, which also records each rank's exit status) once
enough prompts are on disk. Whatever the kill point, a resumed run must give the uninterrupted run's
tokens and texts for every prompt, each exactly once.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PROMPTS20, ROOT, mpirun, spmd_env

from spmd import config
from spmd.runtime import resume as progress_files
from spmd.runtime.resume import progress_dir

EX_TEMPFAIL = 75  # spmd.runtime.stop.EX_TEMPFAIL

N = 20
BASE = ["--prompts", str(PROMPTS20), "--engine", "native", "--dtype", "fp32", "--max-new-tokens", "6",
        "--batch-size", "4", "--slots", "2", "--no-progress"]
RUN_TIMEOUT = 300  # seconds for any one mpirun (about 35 s here, with the CI job beside us)
# the rank wrapper: start the program, publish its pid, wait, record its exit status
WRAPPER = ('"$@" & pid=$!; echo $pid > "$SPMD_TEST_PIDS/rank-$OMPI_COMM_WORLD_RANK.pid"; '
           'wait $pid; rc=$?; echo $rc > "$SPMD_TEST_PIDS/rank-$OMPI_COMM_WORLD_RANK.rc"; exit $rc')


def _args(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(ckpt), "--output", str(out), *BASE, *extra]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _key(rows: list[dict]) -> list[tuple]:
    return [(r["id"], r["completion_token_ids"], r["completion"]) for r in rows]


def _progress_lines(out: Path) -> list[dict]:
    """Complete lines of every replica file (a line still being written is not counted)."""
    lines = []
    for f in sorted(progress_dir(out).glob("replica-*.jsonl")):
        data = f.read_bytes()
        lines += [json.loads(ln) for ln in data[: data.rfind(b"\n") + 1].splitlines()]
    return lines


class Job:
    """`mpirun -n N sh WRAPPER python -m mpi4py -m spmd ARGS` in the background; signals go to the ranks."""

    def __init__(self, tmp: Path, args: list[str], n: int = 2, env_extra: dict | None = None):
        self.pids = tmp / f"pids-{time.monotonic_ns()}"
        self.pids.mkdir()
        self.n = n
        env = spmd_env()
        # a rank's non-zero exit must not make mpirun kill the others: each one's status is what we check
        env.update(SPMD_TEST_PIDS=str(self.pids), PRTE_MCA_state_base_error_non_zero_exit="0", **(env_extra or {}))
        cmd = ["mpirun", "-n", str(n), "sh", "-c", WRAPPER, "sh", sys.executable, "-m", "mpi4py", "-m", "spmd",
               *args]
        self.log = tmp / f"job-{time.monotonic_ns()}.log"
        self.logf = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                     start_new_session=True)
        self.t0 = time.monotonic()

    def rank_pids(self) -> list[int]:
        files = [self.pids / f"rank-{r}.pid" for r in range(self.n)]
        return [int(f.read_text()) for f in files if f.is_file() and f.read_text().strip()]

    def wait_for(self, cond, what: str, timeout: float = RUN_TIMEOUT) -> None:
        while not cond():
            if self.proc.poll() is not None:
                pytest.fail(f"job ended (rc {self.proc.returncode}) before {what}:\n{self.output()[-3000:]}")
            if time.monotonic() - self.t0 > timeout:
                self.kill_all()
                pytest.fail(f"timed out waiting for {what}:\n{self.output()[-3000:]}")
            time.sleep(0.02)

    def signal_ranks(self, sig: int, ranks: list[int] | None = None) -> None:
        pids = self.rank_pids()
        for r in (range(len(pids)) if ranks is None else ranks):
            try:
                os.kill(pids[r], sig)
            except ProcessLookupError:
                pass

    def kill_all(self) -> None:
        self.signal_ranks(signal.SIGKILL)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float = RUN_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=max(1.0, timeout - (time.monotonic() - self.t0)))
        except subprocess.TimeoutExpired:
            self.kill_all()
            self.proc.wait(timeout=30)
            pytest.fail(f"job did not end in {timeout} s:\n{self.output()[-3000:]}")
        finally:
            self.logf.close()

    def rank_status(self) -> list[int | None]:
        files = [self.pids / f"rank-{r}.rc" for r in range(self.n)]
        return [int(f.read_text()) if f.is_file() else None for f in files]

    def output(self) -> str:
        if not self.logf.closed:
            self.logf.flush()
        return self.log.read_text(errors="replace")


def _killed_run(tmp: Path, ckpt: Path, out: Path, at_least: int, *extra: str) -> list[dict]:
    """A run SIGKILLed on every rank once `at_least` prompts are in its progress files; those lines."""
    job = Job(tmp, _args(ckpt, out, *extra))
    job.wait_for(lambda: len(job.rank_pids()) == 2 and len(_progress_lines(out)) >= at_least,
                 f"{at_least} prompts in the progress files")
    job.signal_ranks(signal.SIGKILL)
    job.wait()
    assert all(s is not None and s != 0 for s in job.rank_status()), job.rank_status()
    assert not out.exists()
    lines = _progress_lines(out)
    assert at_least <= len(lines) < N, len(lines)
    return lines


def _resume(ckpt: Path, out: Path, *extra: str, n: int = 2):
    r = mpirun(n, _args(ckpt, out, "--resume", *extra), timeout=RUN_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _check_same(out: Path, reference: list[dict]) -> None:
    rows = _rows(out)
    assert [r["id"] for r in rows] == [r["id"] for r in reference]  # every prompt once, in input order
    assert _key(rows) == _key(reference)
    assert not progress_dir(out).exists()  # removed after the clean finish


def _resumed_count(stderr: str) -> int:
    line = next(ln for ln in stderr.splitlines() if ln.startswith("resume: "))
    return int(line.split()[1])


@pytest.fixture(scope="module")
def reference(tiny_bf16, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ref") / "out.jsonl"
    r = mpirun(2, _args(tiny_bf16, out), timeout=RUN_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not progress_dir(out).exists()
    rows = _rows(out)
    assert len(rows) == N and len({tuple(r["completion_token_ids"]) for r in rows}) > 10
    return rows


def test_kill_early_then_resume_same_layout(tiny_bf16, reference, tmp_path):
    out = tmp_path / "out.jsonl"
    lines = _killed_run(tmp_path, tiny_bf16, out, 1)
    assert len({ln["index"] for ln in lines}) == len(lines)  # no prompt written twice
    ref = {r["id"]: r["completion_token_ids"] for r in reference}
    assert all(ln["completion_token_ids"] == ref[ln["id"]] for ln in lines)  # what is on disk is final
    fp = json.loads((progress_dir(out) / "header.json").read_text())["fingerprint"]
    assert {"prompts_sha256", "checkpoint_sha256", "engine", "dtype", "max_new_tokens", "temperature", "top_p",
            "seed", "chat", "score_baseline_sha256"} <= set(fp) and fp["max_new_tokens"] == 6
    assert not {"group_size", "dispatch", "batch_size"} & set(fp)  # the layout may change on resume
    r = _resume(tiny_bf16, out)
    assert _resumed_count(r.stderr) == len(lines)
    _check_same(out, reference)
    rows = _rows(out)  # the resumed rows keep the killed run's timings
    by_index = {ln["index"]: ln for ln in lines}
    assert all(rows[i]["latency_s"] == ln["latency_s"] for i, ln in by_index.items())


def test_kill_later_torn_line_then_resume_other_layout(tiny_bf16, reference, tmp_path):
    """Killed after >= 8 prompts; the last line of one file torn in half; resumed as one group of 2 ranks."""
    out = tmp_path / "out.jsonl"
    lines = _killed_run(tmp_path, tiny_bf16, out, 8, "--slots", "1")  # one row at a time: lines come steadily
    f = max(progress_dir(out).glob("replica-*.jsonl"), key=lambda p: p.stat().st_size)
    data = f.read_bytes().splitlines(keepends=True)
    f.write_bytes(b"".join(data[:-1]) + data[-1][: len(data[-1]) // 2])  # a kill in the middle of a write
    r = _resume(tiny_bf16, out, "--group-size", "2", "--dispatch", "dynamic", "--dispatch-size", "3")
    assert _resumed_count(r.stderr) == len(lines) - 1
    assert "1 torn or invalid line(s) ignored" in r.stderr
    _check_same(out, reference)
    assert {row["model_group"] for row in _rows(out)} >= {0, 1}  # rows of both runs (2 replicas, then 1)


def test_fingerprint_mismatch_is_refused(tiny_bf16, tmp_path):
    """A progress directory made with --max-new-tokens 6, resumed with 7: `error: ...`, exit 2, nothing touched."""
    out = tmp_path / "out.jsonl"
    ids = [json.loads(ln)["id"] for ln in PROMPTS20.read_text().splitlines()]
    progress_files.prepare(config.parse_args(_args(tiny_bf16, out)), ids, log=lambda msg: None)  # the header a run writes
    (progress_dir(out) / "replica-0.jsonl").write_text(json.dumps(
        {"index": 0, "id": ids[0], "completion_token_ids": [5], "ttft_s": 0.1, "latency_s": 0.2,
         "model_group": 0}) + "\n")
    before = {f.name: f.read_bytes() for f in progress_dir(out).iterdir()}
    r = mpirun(2, _args(tiny_bf16, out, "--resume", "--max-new-tokens", "7"), timeout=RUN_TIMEOUT)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "--resume:" in errors[0] and "max_new_tokens 6 there, 7 here" in errors[0], errors
    assert "rerun with that run's arguments, or without --resume to start over" in errors[0]
    assert {f.name: f.read_bytes() for f in progress_dir(out).iterdir()} == before and not out.exists()


def test_sigterm_every_rank_stops_and_resume_completes(tiny_bf16, reference, tmp_path):
    """Slurm's --signal: SIGTERM to every rank mid-run (dynamic dispatch) → each exits 75; --resume finishes."""
    out = tmp_path / "out.jsonl"
    job = Job(tmp_path, _args(tiny_bf16, out, "--dispatch", "dynamic", "--dispatch-size", "2"))
    job.wait_for(lambda: len(job.rank_pids()) == 2 and len(_progress_lines(out)) >= 2, "2 prompts on disk")
    job.signal_ranks(signal.SIGTERM)
    job.wait()
    log = job.output()
    assert job.rank_status() == [EX_TEMPFAIL, EX_TEMPFAIL], log[-3000:]
    stopped = [ln for ln in log.splitlines() if ln.startswith("stopped by SIGTERM after ")]
    assert len(stopped) == 1 and "rerun with --resume" in stopped[0], log[-3000:]
    lines = _progress_lines(out)
    assert int(stopped[0].split()[4]) == len(lines) < N  # "stopped by SIGTERM after N of 20 prompts"
    assert not out.exists()
    r = _resume(tiny_bf16, out)
    assert _resumed_count(r.stderr) == len(lines)
    _check_same(out, reference)


def test_sigterm_to_one_rank_stops_the_whole_job(tiny_bf16, tmp_path):
    """Only rank 1 gets SIGTERM (static dispatch): its replica tells the other one; nobody hangs, all exit 75."""
    out = tmp_path / "out.jsonl"
    job = Job(tmp_path, _args(tiny_bf16, out, "--batch-size", "2"))
    job.wait_for(lambda: len(job.rank_pids()) == 2 and len(_progress_lines(out)) >= 1, "a prompt on disk")
    job.signal_ranks(signal.SIGTERM, ranks=[1])
    job.wait()
    assert job.rank_status() == [EX_TEMPFAIL, EX_TEMPFAIL], job.output()[-3000:]
    assert len(_progress_lines(out)) < N and not out.exists()


def test_sigusr1_to_mpirun_stops_the_job(tiny_bf16, tmp_path):
    """mpirun kills the job on SIGTERM but forwards SIGUSR1 to every rank: exit status 75 from mpirun."""
    out = tmp_path / "out.jsonl"
    env = spmd_env()
    cmd = ["mpirun", "-n", "2", sys.executable, "-m", "mpi4py", "-m", "spmd",
           *_args(tiny_bf16, out, "--batch-size", "2")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        t0 = time.monotonic()
        while len(_progress_lines(out)) < 1:
            assert proc.poll() is None and time.monotonic() - t0 < RUN_TIMEOUT, "job ended or hung before a prompt"
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EX_TEMPFAIL, err[-3000:]
    assert "stopped by SIGUSR1 after " in err
    assert not out.exists() and 1 <= len(_progress_lines(out)) < N


if shutil.which("mpirun") is None:  # pragma: no cover
    pytestmark = pytest.mark.skip("no mpirun")
