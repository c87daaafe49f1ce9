"""pytest-mpi (1 and 2 ranks): bad input found before any model work raises the same UsageError on every rank.

In-process: `spmd.runtime.run.run` on this process's world, as `python -m mpi4py -m spmd` calls it; the
program turns that error into one `error:` line and exit 2 on every rank (tests/e2e/test_e2e.py checks that
exit path under mpirun, with the two cases that need a launch: a prompt file, and a shard one rank reads).
"""
from __future__ import annotations

import pytest
import torch.distributed as dist
from mpi4py import MPI

from conftest import PROMPTS20, bad_inputs, checkpoint_dir
from spmd.config import UsageError
from spmd.runtime.run import run

pytestmark = pytest.mark.mpi(min_size=1)

INLINE = ["missing prompts", "empty prompts", "non-UTF-8", "too long", "missing checkpoint", "group size",
          "malformed JSONL", "duplicate ids", "unwritable output", "no tokenizer", "config field"]


def _expect_error(argv: list[str], msg: str, out) -> None:
    """run(argv) raises UsageError containing msg on every rank, the same on all, and writes no output."""
    comm = MPI.COMM_WORLD
    with pytest.raises(UsageError) as caught:
        run(comm, argv)
    if dist.is_initialized():  # an error after the world was made: tear down what it started
        dist.destroy_process_group()
    text = str(caught.value)
    assert msg in text, text
    assert len(set(comm.allgather(text))) == 1  # the same message everywhere (rank 0 prints it once)
    assert not out.exists()


@pytest.fixture
def cases(mpi_tmp_path, monkeypatch):
    """The bad inputs, written once by rank 0 under a directory every rank sees."""
    monkeypatch.setenv("SPMD_WATCHDOG_S", "0")  # no watchdog thread left behind in this process
    comm = MPI.COMM_WORLD
    ckpt = checkpoint_dir("tiny", "bf16")
    made = bad_inputs(mpi_tmp_path, ckpt) if comm.rank == 0 else None
    return comm.bcast(made, root=0), ckpt, mpi_tmp_path


@pytest.mark.parametrize("case", INLINE)
def test_inline_bad_input(cases, case):
    made, ckpt, tmp = cases
    extra, msg = made[case]
    if case == "group size":  # --group-size 3 divides no world of 1 or 2 ranks
        msg = f"does not divide the world size {MPI.COMM_WORLD.size}"
    out = tmp / "o.jsonl"
    _expect_error(["--checkpoint", str(ckpt), "--output", str(out), "--engine", "hf", *extra], msg, out)


@pytest.mark.parametrize("case", ["static", "layout"])
def test_dedicated_orchestrator_bad_layout(cases, case):
    """--orchestrator dedicated: static dispatch is refused; so is a world with no model rank (1 rank) or
    whose model ranks are not whole groups (2 ranks, --group-size 2: 1 model rank)."""
    _, ckpt, tmp = cases
    size = MPI.COMM_WORLD.size
    extra, msg = {"static": (["--dispatch", "static"], "use --dispatch dynamic"),
                  "layout": (["--group-size", "2"], "needs model ranks besides rank 0" if size == 1
                             else f"does not divide the {size - 1} model ranks")}[case]
    out = tmp / "o.jsonl"
    _expect_error(["--checkpoint", str(ckpt), "--prompts", str(PROMPTS20), "--output", str(out),
                   "--orchestrator", "dedicated", *extra], msg, out)
