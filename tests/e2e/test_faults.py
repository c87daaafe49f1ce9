"""Abort, never hang: injected faults (SPMD_FAULT) end the whole job fast, naming the rank; the parser.

The end-to-end cases run `mpirun -n 2 python -m mpi4py -m spmd` on the tiny checkpoint. Startup (imports,
checkpoint) takes 15-35 s on the 2-core CI machine, so the bound that matters is measured from the
injected fault (its `fault:` line carries the unix time it fired) to the end of mpirun: under 30 s.
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import PROMPTS20, ROOT, mpirun, spmd_env
from spmd.runtime import faults as fault_inj
from spmd.runtime.records import WorkItem
from spmd.runtime import world as world_mod
from spmd.runtime.faults import Fault
from spmd.config import UsageError

FAULT_LINE = re.compile(r"^fault: rank (\d+) of \d+ \(.*\): injecting (\w+) at .* at unix time ([\d.]+)$", re.M)
BOUND_S = 30.0
TIMEOUT_S = 120  # mpirun as a whole (startup included); a job that hangs fails here instead of hanging


# --- the parser ----------------------------------------------------------------------------------


def test_parse_one_and_many():
    assert fault_inj.parse("") == [] and fault_inj.parse("  ") == []
    assert fault_inj.parse("1:decode:2:raise") == [Fault(1, "decode", 2, "raise")]
    assert fault_inj.parse(" 0:load:*:exit , 1:start:*:kill,1:prefill:0:hang,0:other:-1:raise", size=2) == [
        Fault(0, "load", None, "exit"), Fault(1, "start", None, "kill"), Fault(1, "prefill", 0, "hang"),
        Fault(0, "other", -1, "raise")]
    assert str(Fault(1, "decode", None, "hang")) == "1:decode:*:hang"


@pytest.mark.parametrize("text, why", [
    ("1:decode:2", "3 field(s), need 4"),
    ("1:decode:2:raise:x", "5 field(s), need 4"),
    ("one:decode:2:raise", "RANK 'one' is not an integer"),
    ("-1:decode:2:raise", "RANK -1 is not a rank of this job"),
    ("2:decode:2:raise", "RANK 2 is not a rank of this job (0..1)"),
    ("1:decoding:2:raise", "PHASE 'decoding' is not one of start, load, prefill, decode, other"),
    ("1:decode:two:raise", "STEP 'two' is not an integer or *"),
    ("1:decode:-2:raise", "STEP -2 is < -1"),
    ("1:start:0:raise", "PHASE start takes STEP *"),
    ("1:decode:2:crash", "ACTION 'crash' is not one of raise, exit, hang, kill"),
    ("1:decode:2:raise,", "'': 1 field(s), need 4"),
])
def test_parse_errors_name_the_entry_and_field(text, why):
    with pytest.raises(world_mod.UsageError) as e:
        fault_inj.parse(text, size=2)
    msg = str(e.value)
    assert msg.startswith("SPMD_FAULT entry ") and why in msg and "RANK:PHASE:STEP:ACTION" in msg


def test_seconds_variables():
    assert fault_inj.parse_seconds("X", None, 7) == 7 and fault_inj.parse_seconds("X", " ", 7) == 7
    assert fault_inj.parse_seconds("X", "2.5", 7) == 2.5 and fault_inj.parse_seconds("X", "0", 7) == 0
    for bad in ("soon", "-1", "nan", "inf"):
        with pytest.raises(world_mod.UsageError, match="X="):
            fault_inj.parse_seconds("X", bad, 7)
    assert world_mod.collective_timeout({}) == world_mod.COLLECTIVE_TIMEOUT_DEFAULT_S == 600
    assert world_mod.collective_timeout({"SPMD_COLLECTIVE_TIMEOUT_S": "30"}) == 30
    for bad in ("0", "-5", "x", "inf"):
        with pytest.raises(world_mod.UsageError, match="SPMD_COLLECTIVE_TIMEOUT_S="):
            world_mod.collective_timeout({"SPMD_COLLECTIVE_TIMEOUT_S": bad})


def test_guard_from_env_defaults_and_errors():
    g = fault_inj.Guard.from_env(1, 2, {})
    assert g.faults == [] and g.watchdog_s == fault_inj.WATCHDOG_DEFAULT_S == 1800
    g = fault_inj.Guard.from_env(1, 2, {"SPMD_FAULT": "0:load:*:raise,1:decode:3:hang", "SPMD_WATCHDOG_S": "0"})
    assert g.faults == [Fault(1, "decode", 3, "hang")] and g.watchdog_s == 0  # this rank's only
    with pytest.raises(world_mod.UsageError, match="SPMD_WATCHDOG_S="):
        fault_inj.Guard.from_env(0, 2, {"SPMD_WATCHDOG_S": "-3"})


# --- the guard in process ------------------------------------------------------------------------


def test_hook_is_the_profilers_callback_when_idle():
    def prof(phase, step):
        pass
    idle = fault_inj.Guard(0, 2, [Fault(1, "decode", 1, "raise")], watchdog_s=0)  # a fault for another rank
    assert idle.hook(prof) is prof and idle.hook(None) is None
    seen = []
    g = fault_inj.Guard(0, 2, [], watchdog_s=60)
    assert g.hook(None) == g.on_phase
    g.hook(lambda p, s: seen.append((p, s)))("decode", 4)
    assert seen == [("decode", 4)] and g._beat[1:] == ("decode", 4)


def test_raise_fires_once_at_its_step(capsys):
    g = fault_inj.Guard(1, 2, fault_inj.parse("1:decode:2:raise,1:prefill:*:raise"), watchdog_s=0)
    g.on_phase("decode", 1)
    with pytest.raises(RuntimeError, match=r"injected fault 1:decode:2:raise \(SPMD_FAULT\) at decode step 2"):
        g.on_phase("decode", 2)
    g.on_phase("decode", 2)  # fired once
    with pytest.raises(RuntimeError, match="1:prefill:[*]:raise"):
        g.on_phase("prefill", 0)
    g.on_phase("prefill", 0)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and FAULT_LINE.match(lines[0]) and "injecting raise at decode step 2" in lines[0]


def _aborts():
    calls = []
    return calls, lambda code: calls.append(code)


def _wait_for(calls, seconds):
    end = time.monotonic() + seconds
    while not calls and time.monotonic() < end:
        time.sleep(0.02)
    return calls


def test_watchdog_times_steps_only(monkeypatch, capfd):
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)  # start() chains it; undone after
    calls, abort = _aborts()
    g = fault_inj.Guard(0, 2, [], watchdog_s=0.3, abort=abort)
    g.start()
    try:
        for phase in ("start", "load", "other"):  # paused: reading the checkpoint, waiting for the others
            g.on_phase(phase, -1)
            time.sleep(0.6)
        g.on_phase("decode", 1)
        g.on_phase("other", -1)  # the step ended
        time.sleep(0.6)
        assert calls == []
        g.on_phase("decode", 2)  # a step that never ends
        assert _wait_for(calls, 5) == [1]
    finally:
        g.close()
    err = capfd.readouterr().err
    assert re.search(r"^error: rank 0 of 2 \(.*\): no progress for \d+ s in phase decode step 2 \(watchdog", err, re.M)
    assert "(most recent call first)" in err and "test_watchdog_times_steps_only" in err  # the stacks


def test_load_deadline(monkeypatch, capfd):
    """Load has its own deadline: bytes at the minimum rate, at least LOAD_MIN_S, or SPMD_LOAD_TIMEOUT_S;
    it fires in load only, with the step watchdog off, and names how it was set."""
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    g = fault_inj.Guard.from_env(0, 2, {})
    assert g.set_load_deadline(0) == fault_inj.LOAD_MIN_S
    assert g.set_load_deadline(int(86e9)) == 86e9 / (fault_inj.LOAD_MIN_MBPS * 1e6)  # 690 GB over 8 ranks: 72 min
    assert fault_inj.Guard.from_env(0, 2, {"SPMD_LOAD_MIN_MBPS": "1000"}).set_load_deadline(int(2e12)) == 2000
    for bad in ({"SPMD_LOAD_MIN_MBPS": "0"}, {"SPMD_LOAD_MIN_MBPS": "fast"}, {"SPMD_LOAD_TIMEOUT_S": "-1"}):
        with pytest.raises(UsageError):
            fault_inj.Guard.from_env(0, 2, bad)
    calls, abort = _aborts()
    g = fault_inj.Guard.from_env(0, 2, {"SPMD_LOAD_TIMEOUT_S": "0.4", "SPMD_WATCHDOG_S": "0"})
    g._abort = abort
    assert g.set_load_deadline(10**15) == 0.4 and g.active
    g.start()
    try:
        g.on_phase("other", -1)
        time.sleep(0.8)
        assert calls == []  # not in other
        g.on_phase("load", -1)  # a load that never ends
        assert _wait_for(calls, 5) == [1]
    finally:
        g.close()
    err = capfd.readouterr().err
    assert re.search(r"^error: rank 0 of 2 \(.*\): still loading after \d+ s \(load deadline 0 s: "
                     r"SPMD_LOAD_TIMEOUT_S=0.4\)", err, re.M)


def test_sigusr2_prints_every_stack_and_the_rank_goes_on():
    code = ("import sys, time; from spmd.runtime.faults import install_stack_dump; install_stack_dump()\n"
            "def waiting_here():\n    print('ready', flush=True); time.sleep(3); print('went on', flush=True)\n"
            "waiting_here()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=spmd_env())
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGUSR2)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == "went on"
    assert "(most recent call first)" in err and "in waiting_here" in err


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_exception_in_a_program_thread_aborts(monkeypatch, capsys):
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    calls, abort = _aborts()
    fault_inj.Guard(0, 1, [], watchdog_s=0, abort=abort).start()

    def boom():
        raise ValueError("x")
    for name in ("other-thread", "spmd-dispatch"):
        t = threading.Thread(target=boom, name=name)
        t.start()
        t.join()
    assert calls == [1]  # the program's thread only
    assert re.search(r"^error: rank 0 of 1 \(.*\): thread spmd-dispatch: ValueError: x$", capsys.readouterr().err, re.M)


def test_generate_ends_in_phase_other():
    """After a batch comes dispatch or the final gather (MPI waits as long as the slowest replica):
    generate leaves the step phases, so the watchdog does not time those waits."""
    import torch
    from spmd.runtime.generate import GenConfig, generate

    class Stepper:
        device = torch.device("cpu")

        def prefill(self, tokens, mask):
            return torch.nn.functional.one_hot(tokens[:, -1] + 1, 16).float()

        def decode(self, tokens):
            return torch.nn.functional.one_hot(tokens + 1, 16).float()

        def release(self):
            pass

    class Phases:
        def __init__(self):
            self.seen = []

        def set_phase(self, phase, step=-1):
            self.seen.append((phase, step))

    t = Phases()
    generate(Stepper(), [WorkItem(0, [1]), WorkItem(1, [2, 3])], GenConfig(4, eos_id=15, pad_id=0), t)
    assert t.seen == [("prefill", 0), ("decode", 1), ("decode", 2), ("decode", 3), ("other", -1)]


def test_report_error_names_the_rank(capsys):
    fault_inj.report_error(1, 2, RuntimeError("first line\nsecond"))
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: rank 1 of 2 \(.+\): RuntimeError: first line \.\.\.\n", err)


# --- end to end under mpirun ---------------------------------------------------------------------

NATIVE = ["--engine", "native", "--max-new-tokens", "4", "--dtype", "fp32", "--no-progress"]


def _run(ckpt: Path, out: Path, group_size: int, env: dict):
    args = ["--checkpoint", str(ckpt), "--prompts", str(PROMPTS20), "--output", str(out),
            "--group-size", str(group_size), *NATIVE]
    t0 = time.monotonic()
    r = mpirun(2, args, timeout=TIMEOUT_S, env_extra=env)
    return r, time.monotonic() - t0, time.time()


# (fault, group size, extra env, what stderr must say)
CASES = {
    "raise": ("1:decode:2:raise", 2, {},
              [r"^error: rank 1 of 2 \(.*\): RuntimeError: injected fault 1:decode:2:raise", "MPI_ABORT"]),
    "exit": ("1:decode:2:exit", 2, {}, [r"injecting exit at decode step 2", r"Exit code:\s+3"]),
    "kill": ("1:decode:2:kill", 2, {}, [r"injecting kill at decode step 2", r"rank 1 .*\n?.*signal 9"]),
    # rank 0 waits in the gloo all-reduce for rank 1: the collective times out (watchdog off)
    "hang, collective timeout": ("1:decode:2:hang", 2, {"SPMD_COLLECTIVE_TIMEOUT_S": "10", "SPMD_WATCHDOG_S": "0"},
                                 [r"^error: rank 0 of 2 \(.*\): RuntimeError: .*Timed out waiting 10000ms"]),
    "raise at load on rank 0": ("0:load:*:raise", 2, {},
                                [r"^error: rank 0 of 2 \(.*\): RuntimeError: injected fault 0:load:\*:raise"]),
    # two replicas: no collective between them; rank 0 ends up in the final MPI gather (no timeout there)
    "hang, 2 replicas, watchdog": ("1:decode:2:hang", 1, {"SPMD_WATCHDOG_S": "5"},
                                   [r"^error: rank 1 of 2 \(.*\): no progress for \d+ s in phase decode step 2 "
                                    r"\(watchdog"]),
    "kill, 2 replicas": ("1:decode:2:kill", 1, {}, [r"signal 9"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fault_ends_the_job_fast(case, tiny_bf16, tmp_path):
    fault, group_size, env, says = CASES[case]
    out = tmp_path / "out.jsonl"
    r, wall, end = _run(tiny_bf16, out, group_size, dict(env, SPMD_FAULT=fault))
    fired = FAULT_LINE.findall(r.stderr)
    assert r.returncode != 0 and fired, r.stderr[-3000:]
    rank, action, at = fired[0]
    assert (int(rank), action) == (int(fault.split(":")[0]), fault.split(":")[3])
    after = end - float(at)
    print(f"{case}: exit {r.returncode}, {after:.1f} s after the fault, {wall:.1f} s in all")
    assert after < BOUND_S, f"{after:.1f} s from the fault to the end of the job"
    for pattern in says:
        assert re.search(pattern, r.stderr, re.M), (pattern, r.stderr[-3000:])
    assert not out.exists()


@pytest.mark.parametrize("env, says", [
    ({"SPMD_FAULT": "1:decoding:2:raise"}, "error: rank 0: SPMD_FAULT entry '1:decoding:2:raise': PHASE 'decoding'"),
    ({"SPMD_COLLECTIVE_TIMEOUT_S": "soon"}, "error: SPMD_COLLECTIVE_TIMEOUT_S='soon' must be a number of seconds > 0"),
])
def test_malformed_settings_exit_2_with_one_error_line(env, says, tiny_bf16, tmp_path):
    out = tmp_path / "out.jsonl"
    r, wall, _ = _run(tiny_bf16, out, 2, env)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and says in errors[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr and not out.exists()
