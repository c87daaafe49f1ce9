"""A dedicated orchestrator under Slurm: slurm/hybrid.sbatch as a heterogeneous job on the two namespace
hosts of tests/cluster/cluster.sh (SPMD_SLURM_HOSTS=2; partitions cpu and gpu over both). Component 0 is
one task in partition cpu, component 1 two tasks in partition gpu; one `srun --het-group=0,1
--mpi=pmix` makes one MPI world of 3 ranks. The 20 completions equal transformers' (as an inline run's do), rank
0 is the orchestrator on component 0's host (partition cpu, from sacct), the model ranks on component
1's; a layout that does not fit fails the job with the numbers. The same layout under plain mpirun with
a host file (launch/hybrid.sh, inside a 2-node allocation) gives the same completions. Serial; skipped
unless SPMD_SLURM_TEST=1 (root: namespaces, a bridge, Debian's Slurm).

The components get a host each: Slurm's backfill scheduler, the only one that starts heterogeneous
jobs, plans each component on nodes of its own, so on the one-host cluster such a job never starts.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest

from conftest import PROMPTS20
from slurm_helpers import N_NEW, needs_slurm, reference, rows as _rows, sbatch as _sbatch

pytestmark = needs_slurm

CPU_PART = ["--partition=cpu", "--ntasks=1", "--cpus-per-task=1", "--time=10"]
GPU_PART = ["--partition=gpu", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]


def _hybrid(slurm, tiny_bf16, runs: Path, name: str, *args: str, cpu=CPU_PART, **extra):
    """sbatch [component 0] : [component 1] slurm/hybrid.sbatch ARGS: (rc, run dir, job output text)."""
    env = dict(slurm, DEVICE="cpu", CHECKPOINT=str(tiny_bf16), PROMPTS=str(PROMPTS20), ENGINE="native",
               DTYPE="fp32", MAX_NEW_TOKENS=str(N_NEW), RUNS_DIR=str(runs), **extra)
    rc, job, _ = _sbatch(env, f"--job-name={name}", f"--output={runs}/%x-%j.out", *cpu, ":", *GPU_PART,
                         "slurm/hybrid.sbatch", *args)
    out = runs / f"{name}-{job}.out"
    return rc, runs / f"{name}-{job}", out.read_text() if out.is_file() else ""


@pytest.fixture(scope="module")
def inline(tiny_bf16):
    """What an inline run gives: transformers' tokens (make validate, every fp32 layout)."""
    return reference(tiny_bf16)


@pytest.fixture(scope="module")
def hybrid_run(slurm, tiny_bf16, tmp_path_factory):
    """Two replicas of one rank behind the orchestrator: (run dir, job output)."""
    rc, run_dir, text = _hybrid(slurm, tiny_bf16, tmp_path_factory.mktemp("runs"), "hybrid", GROUP_SIZE="1")
    assert rc == 0, text[-4000:]
    return run_dir, text


def _worlds(trace: Path) -> list[dict]:
    with h5py.File(trace) as f:
        return [json.loads(f[f"ranks/{r}"].attrs["world"]) for r in sorted(map(int, f["ranks"]))]


def test_hybrid_job_equals_transformers(hybrid_run, inline):
    run_dir, _ = hybrid_run
    got = _rows(run_dir / "outputs.jsonl")
    assert len(got) == 20 and got == inline
    groups = {json.loads(line)["model_group"] for line in (run_dir / "outputs.jsonl").read_text().splitlines()}
    assert groups == {0, 1}  # both replicas got prompts from the orchestrator


def test_rank0_is_the_orchestrator_on_the_cpu_component(hybrid_run):
    run_dir, text = hybrid_run
    worlds = _worlds(run_dir / "merged.h5")
    assert [w["role"] for w in worlds] == ["orchestrator", "model", "model"]
    assert [w["backend"] for w in worlds] == ["none", "gloo", "gloo"]
    # sacct: a line per component with its partition and node; the step of each ran there
    rows = [line.split("|") for line in (run_dir / "sacct.txt").read_text().splitlines()]
    comp = {r[0].split("+")[1]: dict(zip(rows[0], r)) for r in rows[1:] if "+" in r[0] and "." not in r[0]}
    assert (comp["0"]["Partition"], comp["1"]["Partition"]) == ("cpu", "gpu"), rows
    assert worlds[0]["hostname"] == comp["0"]["NodeList"]
    assert {w["hostname"] for w in worlds[1:]} == {comp["1"]["NodeList"]} != {comp["0"]["NodeList"]}
    assert f"orchestrator: rank 0, component 0, partition cpu, node {worlds[0]['hostname']}" in text
    assert "transport: none: no NCCL transport in the trace (gloo over TCP)" in text
    with h5py.File(run_dir / "merged.h5") as f:
        steps = f["sacct/steps"][()]
    spmd = sorted((s["job_id"].decode(), int(s["ntasks"]), s["state"].decode()) for s in steps if s["name"] == b"spmd")
    job = run_dir.name.rsplit("-", 1)[1]
    assert spmd == [(f"{job}+0", 1, "COMPLETED"), (f"{job}+1", 2, "COMPLETED")]


@pytest.mark.parametrize("case,message", [
    ("group size", "REPLICAS=0 x GROUP_SIZE=3 != 2 model tasks (component 1"),
    ("two orchestrators", "the first of 2 tasks"),
    ("pipeline", "does not divide the 2 model ranks"),
])
def test_layout_that_does_not_fit_fails_the_job(slurm, tiny_bf16, tmp_path, case, message):
    """Found by the batch script (exit 2, no step starts), or by rank 0 on the CPU node (the step fails:
    every rank exits 2 together, so srun --kill-on-bad-exit has no rank left to end with SIGTERM: 143)."""
    cpu, args, extra = CPU_PART, (), {"GROUP_SIZE": "3"}
    if case == "two orchestrators":
        cpu, extra = [*CPU_PART[:1], "--ntasks=2", *CPU_PART[2:]], {}
    if case == "pipeline":  # one model group of 2 x 2 stages does not fit 2 model ranks
        args, extra = ("--pp", "2"), {"GROUP_SIZE": "2"}
    rc, _, text = _hybrid(slurm, tiny_bf16, tmp_path, "hybrid-bad", *args, cpu=cpu, **extra)
    assert rc == 2, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert errors and message in errors[0], text[-3000:]


def test_launch_hybrid_sh_puts_rank0_on_the_first_host(slurm, tiny_bf16, inline, tmp_path):
    """launch/hybrid.sh with a host file in a 2-node allocation: mpirun starts its daemons through Slurm,
    rank 0 in the first host's one slot, one model group of 2 on the other host."""
    (tmp_path / "hosts").write_text("# the orchestrator's host first\nspmdh1 slots=1\nspmdh2 slots=2\n")
    out, traces = tmp_path / "out.jsonl", tmp_path / "traces"
    cmd = (f"launch/hybrid.sh {tmp_path}/hosts -- --checkpoint {tiny_bf16} --prompts {PROMPTS20} --output {out} "
           f"--trace-dir {traces} --group-size 2 --device cpu --dtype fp32 --max-new-tokens {N_NEW} --no-progress")
    rc, job, _ = _sbatch(slurm, "--job-name=hybrid-mpirun", f"--output={tmp_path}/%x-%j.out", "--nodes=2",
                         "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10", f"--wrap={cmd}")
    text = (tmp_path / f"hybrid-mpirun-{job}.out").read_text()
    assert rc == 0, text[-4000:]
    assert _rows(out) == inline
    worlds = _worlds(traces / "merged.h5")
    assert [(w["role"], w["hostname"]) for w in worlds] == [("orchestrator", "spmdh1"), ("model", "spmdh2"),
                                                            ("model", "spmdh2")]

