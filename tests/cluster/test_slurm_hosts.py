"""Two hosts on this machine under Slurm (tests/cluster/cluster.sh with SPMD_SLURM_HOSTS=2: a network and
UTS namespace per host, its own address and slurmd): slurm/infer.sbatch over 2 nodes x 2 tasks, model
groups of 2 inside a host (2 replicas across the hosts) and one group of 4 spanning both, give the
outputs of the same layouts on one host; the traces name each rank's host, local ranks count per host,
and the report splits collectives in-host / cross-host; a dpa group of 2 with one rank on each host
gives transformers' tokens with its all-to-alls cross-host. A wrong interface setting fails the job at
start-up with the host and its interfaces. Serial; skipped unless SPMD_SLURM_TEST=1 (root: namespaces,
a bridge, Debian's Slurm)."""
from __future__ import annotations

import json
import re
import time

import h5py
import pytest

from conftest import PROMPTS20
from slurm_helpers import N_NEW, needs_slurm, reference, rows as _rows, sbatch as _sbatch

pytestmark = needs_slurm

TWO_NODES = ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]


def _infer(slurm, tiny_bf16, runs, group: int, name: str, args: tuple[str, ...] = (), nodes=TWO_NODES, **extra):
    env = dict(slurm, DEVICE="cpu", CHECKPOINT=str(tiny_bf16), PROMPTS=str(PROMPTS20), ENGINE="native",
               GROUP_SIZE=str(group), DTYPE="fp32", MAX_NEW_TOKENS=str(N_NEW), RUNS_DIR=str(runs), **extra)
    rc, job, err = _sbatch(env, f"--job-name={name}", f"--output={runs}/%x-%j.out", *nodes, "slurm/infer.sbatch",
                           *args)
    return rc, runs / f"{name}-{job}", (runs / f"{name}-{job}.out")


@pytest.mark.parametrize("group,where", [(2, "in-host"), (4, "cross-host")])
def test_two_hosts_equal_one_host(slurm, tiny_bf16, tmp_path, group, where):
    """The one-host outputs of these layouts are transformers' tokens (make validate: G2, 2xG1, G4), so the
    two-host job is compared with those."""
    rc, run_dir, out = _infer(slurm, tiny_bf16, tmp_path, group, f"hosts-g{group}")
    assert rc == 0, out.read_text()[-4000:] if out.is_file() else ""
    got = _rows(run_dir / "outputs.jsonl")
    assert len(got) == 20 and got == reference(tiny_bf16)
    with h5py.File(run_dir / "merged.h5") as f:
        world = [json.loads(f[f"ranks/{r}"].attrs["world"]) for r in range(4)]
    assert [w["hostname"] for w in world] == ["spmdh1", "spmdh1", "spmdh2", "spmdh2"]
    assert [(w["local_rank"], w["local_size"]) for w in world] == [(0, 2), (1, 2)] * 2
    report = (run_dir / "report.txt").read_text()
    section = report[report.index("collectives by placement (2 hosts"):].split("\n\n")[0]
    places = set(re.findall(r"^\s+(in-host|cross-host)\s+attn\.o_proj\.all_reduce\s", section, re.M))
    assert places == {where}, section


def test_dpa_group_across_two_hosts(slurm, tiny_bf16, tmp_path):
    """--group-layout dpa, one expert-parallel group of 2, one rank on each host (make validate's D2 gives
    transformers' tokens on one host): the same tokens; the all-to-alls cross hosts, and each rank's traffic
    table splits its bytes into in-host (its own share) and cross-host."""
    one_each = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
    rc, run_dir, out = _infer(slurm, tiny_bf16, tmp_path, 2, "hosts-dpa2", ("--group-layout", "dpa"), nodes=one_each)
    assert rc == 0, out.read_text()[-4000:] if out.is_file() else ""
    assert _rows(run_dir / "outputs.jsonl") == reference(tiny_bf16)
    report = (run_dir / "report.txt").read_text()
    section = report[report.index("collectives by placement (2 hosts"):].split("\n\n")[0]
    assert set(re.findall(r"^\s+(in-host|cross-host)\s+moe\.dispatch\s", section, re.M)) == {"cross-host"}
    traffic = report[report.index("expert all-to-all traffic"):].split("\n\n")[0]
    rows = re.findall(r"^\s+(\d+)\s+\d+\s+(\S+ \S?B)\s+(\S+ \S?B)\s", traffic, re.M)  # rank, in-host, cross-host
    assert [r[0] for r in rows] == ["0", "1"] and all(r[2] != "0 B" for r in rows), traffic


@pytest.mark.parametrize("setting,message", [("nosuch0", "GLOO_SOCKET_IFNAME=nosuch0 selects no interface"),
                                             ("lo", "rendezvous address is 127.0.0.1 (loopback) but the job spans hosts")])
def test_wrong_interface_fails_the_job_fast(slurm, tiny_bf16, tmp_path, setting, message):
    t0 = time.monotonic()
    rc, _, out = _infer(slurm, tiny_bf16, tmp_path, 2, "hosts-badif", SPMD_IFNAME=setting)
    assert rc != 0
    text = out.read_text()
    assert message in text, text[-3000:]
    assert time.monotonic() - t0 < 240  # not the 10-minute collective timeout
