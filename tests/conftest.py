"""Shared fixtures: tiny synthetic checkpoints (written once, reused), the repo root, MPI helpers."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROMPTS20 = ROOT / "inputs" / "prompts" / "validation20.jsonl"


def checkpoint_dir(config: str = "tiny", weights: str = "bf16") -> Path:
    """A synthetic checkpoint under $SPMD_CKPT (default build/checkpoints), written if missing.

    Under MPI, rank 0 writes and the others wait at a barrier, so every rank sees the same files.
    """
    base = Path(os.environ.get("SPMD_CKPT", ROOT / "build" / "checkpoints")).resolve()
    out = base / f"{config}-{weights}"
    comm = _mpi_comm()
    if comm is None or comm.rank == 0:
        if not (out / "config.json").is_file():
            from spmd.weights.synth import write_checkpoint
            write_checkpoint(ROOT / "inputs" / "models" / f"{config}.json", out, weights=weights, seed=0)
    if comm is not None:
        comm.Barrier()
    return out


@functools.lru_cache(maxsize=None)
def hf_reference(ckpt: Path, n_new: int) -> tuple[tuple[int, ...], ...]:
    """transformers greedy completions of the 20 chat-templated prompts (fp32, one prompt at a time)."""
    from spmd.runtime.prompts import encode, load_tokenizer, read_prompts
    from validation.reference import hf_generate, load_hf

    ids = encode(load_tokenizer(ckpt), read_prompts(PROMPTS20), chat=True)
    return tuple(map(tuple, hf_generate(load_hf(ckpt, log=False), ids, n_new, eos_id=1)))


FP32_EPS = 2.0 ** -23  # float32 machine epsilon: one ulp at magnitude 1


def assert_fp32_close(actual, expected, ulps: float = 16) -> None:
    """`actual` equals `expected` to within `ulps` float32 ulps of the largest |expected|, elementwise.

    Why not a fixed atol: two fp32 computations of the same sums in another order (micro-batches, a sharded
    reduction, another GEMM blocking) differ by rounding, and a rounding error is relative to the size of
    the numbers summed, not absolute. A logit near 128 has an ulp of 1.5e-5, so `atol=1e-5` fails on one
    ulp there. Each reordered sum of k terms moves a result by at most about k ulps of its largest
    partial sum; the few reductions in a tiny model's logits (a hidden size of 64-128 accumulated in
    blocks) stay well under 16 ulps of the largest logit, while a real bug (a wrong row, a missing
    all-reduce term) moves logits by a sizeable fraction of their magnitude. rtol stays 0: small
    elements get the same absolute bound as large ones, as their errors come from the same sums."""
    import torch

    scale = max(expected.detach().abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, atol=ulps * FP32_EPS * scale, rtol=0)


def h5_digest(path) -> dict:
    """Every dataset's bytes and every attribute of a file, by path, for equality checks."""
    out = {}
    import h5py

    with h5py.File(path, "r") as f:
        out["/"] = sorted((k, str(v)) for k, v in f.attrs.items())

        def visit(name, obj):
            out[name] = (obj[()].tobytes() if isinstance(obj, h5py.Dataset) else None,
                         sorted((k, str(v)) for k, v in obj.attrs.items()))
        f.visititems(visit)
    return out


def _ckpt_copy(ckpt: Path, dst: Path, change) -> Path:
    """A checkpoint of symlinks to `ckpt`'s files; `change(dst)` then replaces or breaks some of them."""
    dst.mkdir()
    for f in ckpt.iterdir():
        (dst / f.name).symlink_to(f)
    change(dst)
    return dst


def _truncate_first_shard(d: Path) -> None:
    shard = sorted(d.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.unlink()
    shard.write_bytes(data[: len(data) // 2])


def _drop_config_field(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    del cfg["num_attention_heads"]
    (d / "config.json").unlink()
    (d / "config.json").write_text(json.dumps(cfg))


def bad_inputs(tmp: Path, ckpt: Path) -> dict:
    """Bad input case name -> (command-line arguments, the message its one `error:` line contains); the files
    they name are written under `tmp` (checkpoint copies are symlinks to `ckpt`'s files, one file changed)."""
    (tmp / "empty.jsonl").write_text("")
    (tmp / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp / "long.txt").write_text("word " * 3000 + "\n")
    (tmp / "garbled.jsonl").write_text('{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": \n')
    (tmp / "dup.jsonl").write_text('{"id": "a", "prompt": "hi"}\n{"id": "a", "prompt": "ho"}\n')
    p = str(PROMPTS20)
    no_tok = lambda: _ckpt_copy(ckpt, tmp / "notok", lambda d: (d / "tokenizer.json").unlink())  # noqa: E731
    cut = lambda: _ckpt_copy(ckpt, tmp / "cut", _truncate_first_shard)  # noqa: E731
    no_field = lambda: _ckpt_copy(ckpt, tmp / "nofield", _drop_config_field)  # noqa: E731
    return {
        "malformed JSONL": (["--prompts", str(tmp / "garbled.jsonl")], "garbled.jsonl:2: invalid JSON"),
        "duplicate ids": (["--prompts", str(tmp / "dup.jsonl")], "duplicate ids: a"),
        "unwritable output": (["--prompts", p, "--output", "/proc/spmd/o.jsonl"], "is not writable"),
        "no tokenizer": (["--prompts", p, "--checkpoint", str(no_tok())], "cannot load the tokenizer"),
        "truncated shard": (["--prompts", p, "--checkpoint", str(cut()), "--engine", "native"], "truncated"),
        "config field": (["--prompts", p, "--checkpoint", str(no_field())], "num_attention_heads"),
        "missing prompts": (["--prompts", str(tmp / "none.jsonl")], "does not exist"),
        "empty prompts": (["--prompts", str(tmp / "empty.jsonl")], "has no prompts"),
        "non-UTF-8": (["--prompts", str(tmp / "latin1.txt")], "is not UTF-8"),
        "too long": (["--prompts", str(tmp / "long.txt")], "> the model's context of 2048"),
        "missing checkpoint": (["--checkpoint", str(tmp / "nockpt"), "--prompts", p], "does not exist"),
        "group size": (["--prompts", p, "--group-size", "3"], "does not divide the world size 2"),
    }


@pytest.fixture(scope="module")
def whole_world():
    """MPI tests: the whole world as one CPU model group (gloo); torch.distributed torn down after the
    module unless something else set it up."""
    import torch.distributed as dist
    from mpi4py import MPI

    from spmd.runtime.world import make_world, shutdown

    owned = not dist.is_initialized()
    w = make_world(MPI.COMM_WORLD.size, "cpu")
    yield w
    if owned:
        shutdown(w)


def triton_check(code: str, timeout: float = 300, mpi: bool = False) -> None:
    """Run `code` (a script that prints "ok" last) on CUDA, compiled, or else on CPU under Triton's
    interpreter (TRITON_INTERPRET=1 set before triton is imported: a fresh process); its device is argv[1]."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
    if dev == "cpu":
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, *(["-m", "mpi4py"] if mpi else []), "-c", code, dev]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-3000:]


def _mpi_comm():
    if "mpi4py.MPI" not in sys.modules:
        return None
    from mpi4py import MPI
    return MPI.COMM_WORLD


@pytest.fixture(scope="session")
def tiny_bf16() -> Path:
    return checkpoint_dir("tiny", "bf16")


@pytest.fixture(scope="session")
def tiny_fp8() -> Path:
    return checkpoint_dir("tiny", "fp8")


@pytest.fixture(scope="session")
def noqlora_bf16() -> Path:
    return checkpoint_dir("tiny-noqlora", "bf16")


_START_ENV = frozenset(os.environ)  # before this process initializes MPI (a singleton adds OMPI_/PMIX_ vars)
_LAUNCHED = bool(_START_ENV & {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK"})  # pytest itself started by mpirun


def spmd_env() -> dict:
    """The environment launch/env.sh sets, for subprocess launches from tests."""
    # drop what an MPI launch or singleton set for this process: the child mpirun starts its own job; keep
    # Open MPI settings the machine itself sets (e.g. a container's launch agent: without it mpirun fails)
    base = {k: v for k, v in os.environ.items()
            if not (k.startswith(("PMIX_", "PRTE_", "OMPI_")) and (_LAUNCHED or k not in _START_ENV))}
    out = subprocess.run(["bash", "-c", f". {ROOT}/launch/env.sh && env -0"], capture_output=True,
                         check=True, env=base)
    return dict(kv.split("=", 1) for kv in out.stdout.decode().split("\0") if "=" in kv)


def mpirun(n: int, args: list[str], timeout: float = 300, env_extra: dict | None = None):
    """`mpirun -n N python -m mpi4py -m spmd ARGS` as a subprocess; returns CompletedProcess."""
    env = spmd_env()
    env.update(env_extra or {})
    cmd = ["mpirun", "-n", str(n), sys.executable, "-m", "mpi4py", "-m", "spmd", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """The cluster tier's Slurm cluster (tests/cluster/slurm_helpers.py): two namespace hosts, started once
    for every test that asks for it in this session, stopped at its end; yields the client environment."""
    import importlib.util

    path = ROOT / "tests" / "cluster" / "slurm_helpers.py"
    spec = importlib.util.spec_from_file_location("slurm_helpers", path)
    helpers = sys.modules.get("slurm_helpers") or importlib.util.module_from_spec(spec)
    if "slurm_helpers" not in sys.modules:
        spec.loader.exec_module(helpers)
    with helpers.slurm_cluster(tmp_path_factory.mktemp("slurm"), SPMD_SLURM_HOSTS="2") as env:
        yield env


TIERS = ("unit", "mpi", "e2e", "cluster", "gpu")


def pytest_collection_modifyitems(config, items):
    """Each test carries its tier's marker (the directory it lives in), so `-m e2e` and the like select tiers."""
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
