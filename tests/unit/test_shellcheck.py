"""shellcheck passes on every shell script: launch/, slurm/ (scripts and batch files), tests/cluster/.

shellcheck comes from Debian's package; installed here when missing (root), else the test is skipped.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import ROOT

SCRIPTS = sorted(p for pattern in ("launch/*.sh", "slurm/*.sh", "slurm/*.sbatch", "tests/cluster/*.sh")
                 for p in ROOT.glob(pattern))


def _shellcheck() -> str | None:
    if shutil.which("shellcheck") is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run("apt-get install -y -qq shellcheck >/dev/null 2>&1 || "
                       "{ apt-get update -qq && apt-get install -y -qq shellcheck; }",
                       shell=True, env=env, capture_output=True, timeout=600)
    return shutil.which("shellcheck")


def test_scripts_are_found():
    names = {p.name for p in SCRIPTS}
    assert {"env.sh", "rank.sh", "infer.sbatch", "scaling.sh", "cluster.sh"} <= names


def test_shellcheck_passes():
    exe = _shellcheck()
    if exe is None:
        pytest.skip("shellcheck is not installed and cannot be installed here (not root, or no apt-get)")
    # -x: follow the `# shellcheck source=` files, relative to the repository root
    r = subprocess.run([exe, "-x", *map(str, (p.relative_to(ROOT) for p in SCRIPTS))], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
