"""CI run of the tracing path: 2 ranks through launch/rank.sh with PROFILE=perf (perf stat; perf record
is left out here: `perf script` on libtorch takes half a minute) and --profile torch, then
``python -m traces.merge`` and ``python -m traces.report --plots``.

Checks (static batches of BATCH rows, `--batching static`, so that every decode step has one shape; a
continuous step makes the same calls with its own row count): every named collective of the native engine
appears on every rank with the byte count its shape gives; every rank's events lie inside the run window on the aligned clock, and the torch.profiler
ops of the window fall inside the decode steps they profiled; the merge is idempotent.
"""

import json
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import ROOT, checkpoint_dir, h5_digest, spmd_env

N_PROMPTS, BATCH, NEW, STEPS = 8, 4, 6, (2, 3)
pytestmark = pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun")


def _perf_works() -> bool:
    return shutil.which("perf") is not None and subprocess.run(
        ["perf", "stat", "-e", "task-clock", "true"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The run directory, the run's wall time in ns, and the report's stdout."""
    if not _perf_works():
        pytest.skip("perf missing or cannot count (make install-perf)")
    ckpt = checkpoint_dir("tiny", "bf16")
    tmp = tmp_path_factory.mktemp("traced")
    prompts = tmp / "prompts.jsonl"
    lines = (ROOT / "inputs/prompts/validation20.jsonl").read_text().splitlines()[:N_PROMPTS]
    prompts.write_text("\n".join(lines) + "\n")
    trace = tmp / "trace"
    env = dict(spmd_env(), PROFILE="perf")
    cmd = ["mpirun", "-n", "2", str(ROOT / "launch/rank.sh"), sys.executable, "-m", "mpi4py", "-m", "spmd",
           "--checkpoint", str(ckpt), "--prompts", str(prompts), "--output", str(tmp / "out.jsonl"),
           "--trace-dir", str(trace), "--engine", "native", "--group-size", "2", "--dtype", "fp32",
           "--max-new-tokens", str(NEW), "--batching", "static", "--batch-size", str(BATCH), "--no-progress",
           "--profile", "torch", "--profile-steps", f"{STEPS[0]}:{STEPS[1]}"]
    t0 = time.perf_counter_ns()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    wall = time.perf_counter_ns() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    for tool in ("traces.merge", "traces.report"):
        args = [str(trace)] + (["--plots"] if tool == "traces.report" else [])
        out = subprocess.run([sys.executable, "-m", tool, *args], capture_output=True, text=True, env=spmd_env(),
                             cwd=ROOT, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
    return trace, wall, out.stdout


def test_outputs_of_every_source(run):
    trace, _, text = run
    for r in (0, 1):
        tag = f"rank{r:05d}"
        for rel in (f"{tag}.h5", f"perf/{tag}.stat.csv", f"torch/{tag}.json",
                    f"logs/{tag}.log"):
            assert (trace / rel).is_file(), rel
    for png in ("ranks.png", "timeline.png"):
        assert (trace / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    with h5py.File(trace / "merged.h5", "r") as f:
        assert {"perf/0/stat", "perf/1/stat", "torch/0/events", "torch/1/events"} <= set(_names(f))
        assert f["torch/0"].attrs["clock"] == f["torch/1"].attrs["clock"] == "sync-marker"
        stat = f["perf/1/stat"][()]
        assert stat["value"][stat["event"] == b"task-clock"][0] > 0
    for section in ("per rank and phase", "collectives", "arrival skew", "decode steps per rank", "per layer",
                    "perf stat (whole process)", "torch.profiler CPU ops"):
        assert section in text, section


def _names(f: h5py.File) -> list[str]:
    names = []
    f.visit(names.append)
    return names


def test_named_collectives_with_their_bytes(run):
    trace, _, _ = run
    cfg = json.loads((checkpoint_dir("tiny", "bf16") / "config.json").read_text())
    dim, n_layers, n_dense = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["first_k_dense_replace"]
    per_step = {"embed.all_reduce": 1, "attn.o_proj.all_reduce": n_layers, "mlp.down.all_reduce": n_dense,
                "moe.combine": n_layers - n_dense, "head.all_gather": 1}
    with h5py.File(trace / "merged.h5", "r") as f:
        ev = f["events"][()]
    comm = ev[ev["kind"] == b"comm"]
    assert set(comm["group"].tolist()) == {b"tp"}
    for r in (0, 1):
        mine = comm[comm["rank"] == r]
        dec = mine[mine["phase"] == b"decode"]
        assert set(dec["name"].tolist()) == {k.encode() for k in per_step}
        for name, count in per_step.items():
            sel = dec[dec["name"] == name.encode()]
            # fp32, one new token per row: (BATCH, dim) activations; the head gathers (BATCH, vocab / 2)
            want = BATCH * (cfg["vocab_size"] // 2 if name == "head.all_gather" else dim) * 4
            assert set(sel["bytes"].tolist()) == {want}, name
            assert len(sel) == count * len(dec[dec["name"] == b"embed.all_reduce"]), name
        pre = mine[(mine["phase"] == b"prefill") & (mine["name"] == b"embed.all_reduce")]
        assert len(pre) == N_PROMPTS // BATCH and np.all(pre["bytes"] % (BATCH * dim * 4) == 0)


def test_clock_alignment_keeps_events_in_the_run_window(run):
    trace, wall, _ = run
    with h5py.File(trace / "merged.h5", "r") as f:
        ev = f["events"][()]
        torch_ev = {r: f[f"torch/{r}/events"][()] for r in (0, 1)}
    end = ev["start_ns"] + ev["dur_ns"]
    assert ev["start_ns"].min() >= 0 and end.max() <= wall  # t0 is after launch, the last event before exit
    for r in (0, 1):
        mine = ev[ev["rank"] == r]
        assert mine["start_ns"].min() < 2e9 and end[ev["rank"] == r].max() > mine["start_ns"].max()
        # the first batch's decode steps A..B on this rank, and the torch ops of the profiled window
        dec = mine[(mine["phase"] == b"decode") & (mine["step"] >= STEPS[0]) & (mine["step"] <= STEPS[1])]
        prefills = mine[mine["phase"] == b"prefill"]["start_ns"]
        dec = dec[dec["start_ns"] < np.min(prefills[prefills > dec["start_ns"].min()], initial=np.iinfo(np.int64).max)]
        lo, hi = dec["start_ns"].min(), (dec["start_ns"] + dec["dur_ns"]).max()
        ops = torch_ev[r][torch_ev[r]["cat"] == b"cpu_op"]
        mm = ops[np.char.startswith(ops["name"], b"aten::mm")]
        assert len(mm) and mm["start_ns"].min() >= lo - 2_000_000 and mm["start_ns"].max() <= hi + 2_000_000


def test_merge_is_idempotent(run):
    trace, _, _ = run
    before = h5_digest(trace / "merged.h5")
    out = subprocess.run([sys.executable, "-m", "traces.merge", str(trace)], capture_output=True, text=True,
                         env=spmd_env(), cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert h5_digest(trace / "merged.h5") == before
    assert not [p for p in trace.iterdir() if p.name.startswith(".")]
