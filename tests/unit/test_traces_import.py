"""Serial tests of the trace importers (nsys, perf, sacct, NCCL logs), the profiler window, the report
sections that use them, plots and scaling, on small inputs written here or kept in tests/data."""

import json
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import ROOT, h5_digest
from spmd.obs.rankfile import write_h5_atomic
from traces.clock import SYNC_PREFIX
from traces.merge import merge
from traces.nccl_log import parse_nccl_log
from traces.nsys import read_nsys
from traces.perf import read_perf_script, read_perf_stat
from traces.report import load, report
from traces.sacct import parse_bytes, parse_duration, rows_from_json, rows_from_parsable

DATA = ROOT / "tests" / "data"
UTC_START = 1_800_000_000_000_000_000  # tests/data/make_nsys_sqlite.py


def events(rows):
    """Rank events in the spmd/obs/timers.py schema from (name, kind, phase, step, layer, start, dur, bytes)."""
    dt = [("name", "S32"), ("kind", "S8"), ("phase", "S8"), ("step", "<i4"), ("layer", "<i4"),
          ("start_ns", "<i8"), ("dur_ns", "<i8"), ("bytes", "<i8"), ("group", "S4")]
    return np.array([r + ((b"tp" if r[1] == b"comm" else b""),) for r in rows], dtype=dt)


def fake_run(run_dir, n=2, clock_t0_ns=4_990_000_000, epoch=UTC_START - 5_000_000, extra=None):
    """Rank files of an n-rank run: decode steps 1-2 of compute + one all-reduce each, on every rank."""
    for r in range(n):
        rows = []
        for step in (1, 2):
            t = step * 1_000_000 + 5_000 * r
            rows += [(b"attn", b"compute", b"decode", step, 0, t, 300_000, 0),
                     (b"attn.o_proj.all_reduce", b"comm", b"decode", step, 0, t + 300_000, 100_000, 4096)]
        attrs = {"schema": "spmd-trace/1", "rank": r, "world_size": n, "epoch_ns": epoch, "local_epoch_ns": epoch,
                 "clock_t0_ns": clock_t0_ns, "aligned": True, "device": "cpu", "hostname": f"h{r}",
                 "world": json.dumps({"replica": 0, "group_size": n}), "engine": "native", **(extra or {})}
        write_h5_atomic(run_dir / f"rank{r:05d}.h5", {"events": events(rows)}, attrs)
    return run_dir


def test_nsys_reader_follows_the_schema():
    d = read_nsys(DATA / "nsys_rank.sqlite")
    k = d["kernels"]
    assert k["name"][0] == ["gemm_bf16_tn", "ncclDevKernel_AllReduce_Sum_f32_RING_LL"]  # shortName
    assert k["nccl"][0] == [False, True] and k["dur_ns"][0] == [300_000, 70_000] and k["stream"][0] == [7, 13]
    names = d["nvtx"]["name"][0]  # ranges only (59, 60), finished ones, textId resolved through StringIds
    assert names == ["window", "spmd.sync:5000000000", "attn", "attn.o_proj.all_reduce"]
    assert d["memcpy"]["kind"][0] == ["Host-to-Device", "Device-to-Host"] and d["memcpy"]["bytes"][0] == [4096, 32768]
    assert d["utc_start_ns"] == UTC_START


def test_nsys_import_aligns_on_the_sync_marker_else_the_wall_clock(tmp_path):
    for clock_t0, method, offset in ((4_990_000_000, "sync-marker", 9_000_000),  # 5e9 - t0 = 10 ms at 1 ms
                                     (None, "wallclock", 5_000_000)):           # UTC start - epoch
        run = fake_run(tmp_path / method, clock_t0_ns=clock_t0 or 0)
        if clock_t0 is None:
            for r in (0, 1):
                with h5py.File(run / f"rank{r:05d}.h5", "a") as f:
                    del f.attrs["clock_t0_ns"]
        (run / "nsys").mkdir()
        shutil.copy(DATA / "nsys_rank.sqlite", run / "nsys" / "rank00001.sqlite")
        with h5py.File(merge(run), "r") as f:
            g = f["nsys/1"]
            assert g.attrs["clock"] == method and g.attrs["clock_offset_ns"] == offset
            assert g.attrs["source"] == "nsys/rank00001.sqlite" and "nsys/0" not in f
            assert g["kernels"]["start_ns"].tolist() == [2_100_000 + offset, 2_520_000 + offset]
            sync = g["nvtx"][g["nvtx"]["name"] == b"spmd.sync:5000000000"]
            if method == "sync-marker":
                assert sync["start_ns"][0] == 5_000_000_000 - clock_t0


def test_perf_stat_csv_and_script_parse(tmp_path):
    stat = tmp_path / "s.csv"
    stat.write_text("# started on Sat Nov 28 02:19:12 2026\n\n"
                    "16950.27,msec,task-clock,16950274037,100.00,0.412,CPUs utilized\n"
                    "20504,,context-switches,16950274037,100.00,1.210,K/sec\n"
                    "<not supported>,,cycles,0,100.00,,\n")
    s = read_perf_stat(stat)
    assert s["event"][0] == ["task-clock", "context-switches", "cycles"]
    assert s["value"][0][:2] == [16950.27, 20504.0] and np.isnan(s["value"][0][2])
    assert s["supported"][0] == [True, True, False] and s["unit"][0][0] == "msec" and s["run_ns"][0][0] == 16950274037
    script = tmp_path / "s.txt"
    script.write_text("  python3 19650  3496.486206996:    5025125 cpu-clock:ppp:      7f5fffb544ba strcmp\n"
                      "pt_main_thread 7 3496.5:    5025125 cpu-clock:ppp:  ffffffff8226ec67 _raw_spin_lock\n"
                      "garbage line\n")
    p = read_perf_script(script, clock_t0_ns=3_000_000_000_000)
    assert p["start_ns"][0] == [496_486_206_996, 496_500_000_000]
    assert p["comm"][0] == ["python3", "pt_main_thread"] and p["symbol"][0] == ["strcmp", "_raw_spin_lock"]
    assert p["event"][0] == ["cpu-clock:ppp", "cpu-clock:ppp"] and p["period"][0] == [5025125] * 2


@pytest.mark.skipif(shutil.which("perf") is None, reason="needs perf (make install-perf)")
def test_real_perf_stat_output_parses(tmp_path):
    out = tmp_path / "real.csv"
    r = subprocess.run(["perf", "stat", "-x,", "-o", str(out), "-e", "task-clock,context-switches", "true"])
    if r.returncode != 0:
        pytest.skip("perf cannot count here")
    s = read_perf_stat(out)
    assert s["event"][0] == ["task-clock", "context-switches"] and s["value"][0][0] > 0


def test_sacct_json_and_parsable2():
    doc = {"jobs": [{"job_id": 42, "name": "infer", "steps": [
        {"step": {"id": "42.0", "name": "python3"}, "state": "COMPLETED", "time": {"elapsed": 61, "total": {
            "seconds": 100, "microseconds": 500000}}, "tres": {"requested": {"max": [
                {"type": "cpu", "count": 4}, {"type": "mem", "count": 3 * 2**30}]}}, "tasks": {"count": 2},
         "nodes": {"range": "n[1-2]"}},
        {"step": {"id": {"job_id": 42, "step_id": "batch"}, "name": "batch"}, "state": {"current": ["FAILED"]},
         "time": {"elapsed": 70, "total": {"seconds": 1, "microseconds": 0}}, "tres": {}, "tasks": {}},
        {"step": {"job_id": 42, "id": "extern", "name": "extern"}, "state": "COMPLETED",  # Slurm 22.05
         "time": {"elapsed": 71}, "tres": {"requested": {"max": []}}}]}]}
    rows = rows_from_json(doc)
    assert rows[0] == ("42", "42.0", "python3", "COMPLETED", 61.0, 100.5, 3 * 2**30, 2, "n[1-2]")
    assert rows[1][1] == "42.batch" and rows[1][3] == "FAILED" and rows[1][6] == -1
    assert rows[2][1:4] == ("42.extern", "extern", "COMPLETED")
    text = ("JobID|JobName|Elapsed|TotalCPU|MaxRSS|NTasks|NodeList|State\n"
            "42|infer|00:01:10|00:01.500||||COMPLETED\n42.0|python3|1-00:00:01|01:02:03|1.5G|2|n[1-2]|COMPLETED\n")
    p = rows_from_parsable(text)
    assert p[0][:2] == ("42", "42") and p[0][4] == 70.0 and p[0][5] == 1.5 and p[0][6] == -1
    assert p[1][4] == 86401.0 and p[1][5] == 3723.0 and p[1][6] == int(1.5 * 2**30) and p[1][7] == 2
    assert parse_duration("") != parse_duration("") and parse_bytes("512K") == 512 * 1024


NCCL_LOG = """h:11:22 [0] NCCL INFO NCCL version 2.21.5+cuda12.4
h:11:22 [0] NCCL INFO NET/IB : Using [0]mlx5_0:1/IB ; OOB ib0:10.0.0.1<0>
h:11:22 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[1] via P2P/CUMEM/read
h:11:22 [0] NCCL INFO Channel 01/0 : 0[0] -> 1[1] via P2P/CUMEM/read
h:11:22 [0] NCCL INFO Channel 00/0 : 1[1] -> 2[0] [send] via NET/IB/0/GDRDMA
"""


def test_nccl_log_transports(tmp_path):
    info = parse_nccl_log(NCCL_LOG + "h:1:2 [1] NCCL INFO Channel 00 : 0[0] -> 1[1] via SHM/direct/direct\n")
    assert info["transports"] == {"P2P": 2, "NET/IB": 1, "SHM": 1} and info["networks"] == ["IB"]
    assert info["channels"]["P2P/CUMEM/read"] == 2 and info["version"] == "2.21.5+cuda12.4"
    run = fake_run(tmp_path)
    (run / "logs").mkdir()
    (run / "logs" / "rank00000.nccl.log").write_text(NCCL_LOG)
    (run / "logs" / "rank00001.log").write_text("no nccl here\n")
    with h5py.File(merge(run), "r") as f:
        assert f.attrs["nccl_transport"] == "NET/IB,P2P" and f.attrs["nccl_network"] == "IB"
        assert json.loads(f["nccl/0"].attrs["transports"]) == {"NET/IB": 1, "P2P": 2} and "nccl/1" not in f


def test_report_plots_and_idempotent_merge_with_every_source(tmp_path):
    run = fake_run(tmp_path / "run", extra={"tokens_generated": 16})
    (run / "nsys").mkdir()
    shutil.copy(DATA / "nsys_rank.sqlite", run / "nsys" / "rank00000.sqlite")
    (run / "logs").mkdir()
    (run / "logs" / "rank00000.nccl.log").write_text(NCCL_LOG)
    (run / "sacct.txt").write_text("JobID|JobName|Elapsed|TotalCPU|MaxRSS|NTasks|NodeList|State\n"
                                   "42.0|python3|00:01:00|00:02:00|2G|2|n1|COMPLETED\n")
    first = h5_digest(merge(run))
    assert h5_digest(merge(run)) == first and {"nsys/0/kernels", "sacct/steps", "nccl/0"} <= set(first)
    assert sorted(p.name for p in run.iterdir()) == ["logs", "merged.h5", "nsys", "rank00000.h5", "rank00001.h5",
                                                     "sacct.txt"]
    text = report(run)
    assert "NCCL transport: NET/IB,P2P" in text and "python3" in text and "2.15 GB" in text  # sacct max RSS
    row = next(line.split() for line in text.splitlines() if line.split()[:2] == ["0", "nsys"])
    assert row[2:5] == ["2", "0.370", "0.070"]  # kernels, kernel ms, nccl ms
    late = next(line for line in text.splitlines() if line.lstrip().startswith("attn.o_proj.all_reduce")
                and "(" in line)
    assert late.split()[1:3] == ["2", "5.0"] and "1 (100%)" in late  # rank 1 starts 5 us later
    from traces.plots import write_plots
    paths = write_plots(load(run))
    assert [p.name for p in paths] == ["ranks.png", "timeline.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_scaling_table_and_plot(tmp_path):
    from traces.scaling import scaling_main, summarize, with_efficiency

    runs = [fake_run(tmp_path / f"n{n}", n=n, extra={"tokens_generated": 100}) for n in (1, 2)]
    rows = with_efficiency([summarize(load(r)) for r in runs])
    assert [r["ranks"] for r in rows] == [1, 2] and rows[0]["efficiency"] == 1.0
    assert rows[1]["efficiency"] == pytest.approx(rows[1]["tokens_per_s"] / 2 / rows[0]["tokens_per_s"])
    text = scaling_main(runs, tmp_path)
    assert "tokens/s" in text and (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"


def test_profiler_window_opens_at_a_and_closes_after_b(tmp_path):
    from spmd.config import parse_steps
    from spmd.obs.profile import Profiler

    assert parse_steps("3:5") == (3, 5) and parse_steps("4") == (4, 4)
    for bad in ("0:2", "5:3", "x"):
        with pytest.raises(ValueError):
            parse_steps(bad)
    p = Profiler("torch", (2, 3), rank=1, device="cpu", trace_dir=tmp_path)
    states = []
    for phase, step in [("prefill", 0), ("decode", 1), ("decode", 2), ("decode", 3), ("decode", 4),
                        ("prefill", 0), ("decode", 2)]:
        p.on_phase(phase, step)
        states.append(p.state)
    assert states == ["idle", "idle", "open", "open", "done", "done", "done"]
    trace = json.loads((tmp_path / "torch" / "rank00001.json").read_text())
    assert any(e.get("name", "").startswith(SYNC_PREFIX) for e in trace["traceEvents"])
    assert p.close() == tmp_path / "torch" / "rank00001.json"  # idempotent


def test_rank_wrapper_refuses_bad_settings():
    base = {"PATH": "/usr/bin:/bin"}
    r = subprocess.run([ROOT / "launch/rank.sh", "true"], env=base, capture_output=True, text=True)
    assert r.returncode == 2 and "no rank variable" in r.stderr
    r = subprocess.run([ROOT / "launch/rank.sh", "true"], env={**base, "PMIX_RANK": "3", "PROFILE": "vtune"},
                       capture_output=True, text=True)
    assert r.returncode == 2 and "PROFILE=vtune" in r.stderr
    r = subprocess.run([ROOT / "launch/rank.sh", sys.executable, "-c", "print('hi')"],
                       env={**base, "SLURM_PROCID": "0", "PROFILE": "perf"}, capture_output=True, text=True)
    assert r.returncode == 2 and "needs PROFILE_DIR or --trace-dir" in r.stderr


def test_rank_wrapper_tees_output_and_keeps_the_exit_code(tmp_path):
    code = "import sys; print('out line'); print('err line', file=sys.stderr); sys.exit(3)"
    r = subprocess.run([ROOT / "launch/rank.sh", sys.executable, "-c", code],
                       env={"PATH": "/usr/bin:/bin", "OMPI_COMM_WORLD_RANK": "1", "PROFILE_DIR": str(tmp_path)},
                       capture_output=True, text=True)
    assert r.returncode == 3 and r.stdout == "out line\n" and r.stderr == "err line\n"
    assert sorted((tmp_path / "logs" / "rank00001.log").read_text().splitlines()) == ["err line", "out line"]


def test_torch_gpu_trace_kernels_on_the_aligned_clock(tmp_path):
    """A chrome trace shaped like torch.profiler's on GPU (CPU annotation + CUDA kernels incl. NCCL's)."""
    run = fake_run(tmp_path, clock_t0_ns=1_000_000)
    base = 1_790_000_000_000_000_000
    sync = {"ph": "X", "cat": "user_annotation", "name": f"{SYNC_PREFIX}3000000", "pid": 9, "tid": 9,
            "ts": 100.0, "dur": 5.0}  # raw 3e6 - t0 1e6 = 2 ms on the aligned clock, at 100 us of the trace
    kernels = [{"ph": "X", "cat": "kernel", "name": n, "pid": 0, "tid": 7, "ts": ts, "dur": 40.0,
                "args": {"device": 0, "stream": 7}}
               for n, ts in (("gemm_bf16", 150.0), ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 350.0))]
    gpu_copy = dict(sync, cat="gpu_user_annotation", ts=90.0, pid=0, tid=7)  # Kineto's GPU-side copy
    doc = {"schemaVersion": 1, "baseTimeNanoseconds": base, "traceEvents": [gpu_copy, sync, *kernels,
                                                                            {"ph": "M", "name": "process_name"}]}
    (run / "torch").mkdir()
    (run / "torch" / "rank00000.json").write_text(json.dumps(doc))
    with h5py.File(merge(run), "r") as f:
        ev = f["torch/0/events"][()]
        assert f["torch/0"].attrs["clock"] == "sync-marker"
    k = ev[ev["cat"] == b"kernel"]
    assert k["start_ns"].tolist() == [2_050_000, 2_250_000] and k["nccl"].tolist() == [False, True]
    assert k["device"].tolist() == [0, 0] and k["stream"].tolist() == [7, 7]
    text = report(run)
    row = next(line.split() for line in text.splitlines() if line.split()[:2] == ["0", "torch"])
    assert row[2:6] == ["2", "0.080", "0.040", "50.0"]
    from traces.plots import write_plots
    assert (write_plots(load(run))[1]).read_bytes()[:4] == b"\x89PNG"
