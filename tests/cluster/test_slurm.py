"""The batch scripts on a real Slurm (tests/cluster/cluster.sh; the tier shares one cluster of two namespace hosts).

slurm/infer.sbatch on CPU (1 node, 2 tasks, srun --mpi=pmix) gives transformers' 20 greedy completions
(fp32, as every layout does: make validate), and its sacct accounting lands in merged.h5; a topology that does not fit
the job fails it with the numbers; slurm/scaling.sh chains its runs and the summary job compares them. The
infer run is one RUN_NAME over two jobs: the first stopped by Slurm's signal, the second finishing it.
Serial. Skipped unless SPMD_SLURM_TEST=1 (.ci/run sets it): it needs root, and installs Debian's
slurm-wlm, slurmdbd, munge, mariadb-server and libpmix-dev when they are missing.
"""
from __future__ import annotations

import subprocess
import time
import types

import h5py
import pytest

from conftest import PROMPTS20, ROOT
from slurm_helpers import N_NEW, needs_slurm, reference, rows as _rows, sbatch as _sbatch

pytestmark = needs_slurm

CPU_TASKS = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]


@pytest.fixture(scope="module")
def infer_run(slurm, tiny_bf16, tmp_path_factory):
    """slurm/infer.sbatch: tiny checkpoint, CPU, one model group of 2 tasks, as one run (RUN_NAME) over two
    jobs: the first gets SIGTERM on every task once a first prompt is on disk (what --signal=TERM@S does
    before the time limit; sent by scancel --signal here: Slurm's granularity for --time would make a
    real limit take minutes), the same sbatch again finishes the run. (run dir of the second job, its
    job id, the first job's log, the run's output file, the submit options)."""
    runs = tmp_path_factory.mktemp("runs")
    env = dict(slurm, DEVICE="cpu", CHECKPOINT=str(tiny_bf16), PROMPTS=str(PROMPTS20), ENGINE="native",
               GROUP_SIZE="2", DTYPE="fp32", MAX_NEW_TOKENS=str(N_NEW), RUNS_DIR=str(runs), RUN_NAME="chain")
    opts = ("--job-name=ci-infer", f"--output={runs}/%x-%j.out", *CPU_TASKS, "slurm/infer.sbatch",
            "--batching", "static", "--batch-size", "2")
    first = subprocess.run(["sbatch", "--parsable", *opts], env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=60).stdout.strip()
    progress = runs / "chain" / "outputs.jsonl.progress"
    deadline = time.monotonic() + 300
    while not any(p.stat().st_size for p in progress.glob("replica-*.jsonl")):
        assert time.monotonic() < deadline, "no prompt finished in 5 minutes"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=TERM", first], env=env, check=True)
    while subprocess.run(["squeue", "-h", "-j", first], env=env, capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, "the stopped job did not end"
        time.sleep(1)
    first_log = (runs / "chain" / f"job-{first}" / "job.log").read_text()
    stopped_early = not (runs / "chain" / "outputs.jsonl").exists()
    rc, job, err = _sbatch(env, *opts)
    out = runs / f"ci-infer-{job}.out"
    assert rc == 0, f"job {job} exit {rc}: {err}\n{out.read_text()[-4000:] if out.is_file() else ''}"
    return types.SimpleNamespace(run_dir=runs / "chain" / f"job-{job}", job=job, first_log=first_log,
                                 stopped_early=stopped_early, output=runs / "chain" / "outputs.jsonl",
                                 env=env, opts=opts, runs=runs)


def test_infer_sbatch_equals_transformers(infer_run, tiny_bf16):
    got = _rows(infer_run.output)
    assert len(got) == 20
    assert got == reference(tiny_bf16)


def test_run_stopped_by_signal_is_finished_by_the_next_job(infer_run):
    """The first job stopped after the batch in flight (exit 75, rows kept, no output); the second resumed
    (the output above is the whole run's); a third submission finds the run complete and ends at once."""
    assert infer_run.stopped_early
    assert "stopped by SIGTERM after" in infer_run.first_log and "(step exit 75)" in infer_run.first_log, \
        infer_run.first_log[-3000:]
    assert "--resume" in (infer_run.run_dir / "job.log").read_text()
    rc, third, _ = _sbatch(infer_run.env, *infer_run.opts)
    assert rc == 0 and "run chain is complete" in (infer_run.runs / f"ci-infer-{third}.out").read_text()


def test_run_dir_holds_traces_logs_and_report(infer_run):
    run_dir, job = infer_run.run_dir, infer_run.job
    for name in ("rank00000.h5", "rank00001.h5", "merged.h5", "logs/rank00000.log", "logs/rank00001.log",
                 "job.log", "job.txt", "report.txt", "sacct.txt"):
        assert (run_dir / name).is_file(), name
    log = (run_dir / "job.log").read_text()
    assert "transport: none" in log  # gloo: no NCCL, the policy passes
    with h5py.File(run_dir / "merged.h5") as f:
        assert {str(f[f"ranks/{r}"].attrs["SLURM_JOB_ID"]) for r in (0, 1)} == {job}


def test_sacct_accounting_is_in_the_merged_trace(infer_run):
    run_dir, job = infer_run.run_dir, infer_run.job
    with h5py.File(run_dir / "merged.h5") as f:
        steps = f["sacct/steps"][()]
    assert {s["job_id"].decode() for s in steps} == {job}
    spmd = [s for s in steps if s["name"] == b"spmd"]  # the srun step of infer.sbatch
    assert len(spmd) == 1, steps
    s = spmd[0]
    assert s["state"] == b"COMPLETED" and s["ntasks"] == 2
    assert s["elapsed_s"] > 0 and s["cpu_s"] > 0 and s["max_rss_bytes"] > 0


def test_topology_that_does_not_fit_fails_the_job(slurm, tmp_path):
    env = dict(slurm, DEVICE="cpu", GROUP_SIZE="3", RUNS_DIR=str(tmp_path))
    rc, job, _ = _sbatch(env, "--job-name=ci-bad", f"--output={tmp_path}/%x-%j.out", *CPU_TASKS,
                         "slurm/infer.sbatch")
    assert rc == 2
    assert "GROUP_SIZE=3 != 2 tasks" in (tmp_path / f"ci-bad-{job}.out").read_text()


def test_scaling_sweep_chains_runs_and_summarizes(slurm, tiny_bf16, tmp_path):
    prompts = tmp_path / "four.jsonl"  # small: the sweep is about the chaining, not the tokens
    prompts.write_text("".join(PROMPTS20.read_text().splitlines(keepends=True)[:4]))
    env = dict(slurm, DEVICE="cpu", CHECKPOINT=str(tiny_bf16), PROMPTS=str(prompts), MAX_NEW_TOKENS="2",
               RUNS_DIR=str(tmp_path))
    r = subprocess.run(["slurm/scaling.sh", "-N", "1", "-g", "2", "--", "--cpus-per-task=1", "--time=10"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    ids = [line.split("job ")[1].split()[0] for line in r.stdout.splitlines() if line.startswith("submitted")]
    assert len(ids) == 3, r.stdout  # n1g1, n1g2, summary
    deadline = time.monotonic() + 600
    while subprocess.run(["squeue", "-h", "-j", ",".join(ids)], env=env, capture_output=True,
                         text=True).stdout.strip():
        assert time.monotonic() < deadline, "sweep did not finish in 10 minutes"
        time.sleep(2)
    summary = tmp_path / f"spmd-scaling-{ids[2]}"
    text = (summary / "scaling.txt").read_text() if (summary / "scaling.txt").is_file() else ""
    assert f"spmd-scale-n1g1-{ids[0]}" in text and f"spmd-scale-n1g2-{ids[1]}" in text, \
        text + (tmp_path / f"spmd-scaling-{ids[2]}.out").read_text()
    assert (summary / "scaling.png").is_file()
    # the summary re-collected sacct after the runs ended: the job's own line is final now
    assert "|COMPLETED|" in (tmp_path / f"spmd-scale-n1g1-{ids[0]}" / "sacct.txt").read_text().splitlines()[1]

