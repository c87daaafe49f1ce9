"""Serial: a time-limit signal delivered twice is one stop request, and launch/rank.sh survives it.

Slurm's `--signal=TERM@GRACE` (slurm/*.sbatch) reaches every process of a task: the rank, the rank.sh
bash that wraps it (which forwards what it gets to the rank) and its tee processes. Before, the second
TERM (from rank.sh, milliseconds after Slurm's) killed the rank (exit 143), and the tees died, which cut
the rank's stdout mid-run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from spmd.runtime import stop

ROOT = Path(__file__).resolve().parents[2]


def test_a_repeat_within_repeat_s_is_the_same_request(monkeypatch):
    kills = []
    monkeypatch.setattr(stop, "_received", None)
    monkeypatch.setattr(os, "kill", lambda pid, sig: kills.append(sig))
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    stop._handler(signal.SIGTERM, None)
    now[0] += 0.05
    stop._handler(signal.SIGTERM, None)  # Slurm's and rank.sh's copies of one signal
    assert stop.received() == "SIGTERM" and kills == []
    now[0] += stop.REPEAT_S
    stop._handler(signal.SIGTERM, None)  # asked again later: stop at once
    assert kills == [signal.SIGTERM]


# A stand-in rank: catches TERM like spmd.runtime.stop, keeps printing for a while after it, exits 75.
CHILD = """
import signal, sys, time
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
print("ready", flush=True)
while not got:
    time.sleep(0.01)
time.sleep(0.3)  # the TERM (and rank.sh's forwarded copy) reached the whole group by now
for i in range(50):
    print(f"after {i}", flush=True)
sys.exit(75)
"""


def test_rank_sh_and_its_tees_survive_a_signal_to_the_whole_task(tmp_path):
    env = dict(os.environ, OMPI_COMM_WORLD_RANK="0")
    p = subprocess.Popen(["bash", str(ROOT / "launch/rank.sh"), sys.executable, "-c", CHILD,
                          "--trace-dir", str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True,
                         start_new_session=True)
    assert p.stdout.readline().strip() == "ready"
    os.killpg(p.pid, signal.SIGTERM)  # what Slurm's --signal does: every process of the task
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 75, "the rank's own exit code, not 143"
    assert out.splitlines()[-1] == "after 49", "stdout went on after the signal"
    assert (tmp_path / "logs/rank00000.log").read_text().splitlines()[-1] == "after 49"


# A rank that ends (exit 2) at the TERM that srun's --kill-on-bad-exit sends the whole task: rank.sh's
# `wait` was interrupted by the same signal and returned 143; if the rank was gone by the time rank.sh
# looked again, 143 was the task's code (seen in CI: a layout refused on every rank, job 143 for 2).
# Under srun rank.sh now ignores the signals (the rank gets them directly), so `wait` returns its code.
ENDS_AT_TERM = """
import os, signal, time
signal.signal(signal.SIGTERM, lambda s, f: os._exit(2))
print("ready", flush=True)
time.sleep(30)
"""


def test_rank_sh_under_srun_keeps_the_code_of_a_rank_that_ends_at_the_signal(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_"))}
    env["SLURM_PROCID"] = "0"  # srun's rank variable: its signals reach every process of the task
    codes = []
    for i in range(8):  # the race went one way or the other: a third of the runs gave 143 before
        p = subprocess.Popen(["bash", str(ROOT / "launch/rank.sh"), sys.executable, "-c", ENDS_AT_TERM,
                              "--trace-dir", str(tmp_path / str(i))], env=env, stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
        assert p.stdout.readline().strip() == "ready"
        os.killpg(p.pid, signal.SIGTERM)
        p.communicate(timeout=30)
        codes.append(p.returncode)
    assert codes == [2] * 8
