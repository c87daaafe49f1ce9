"""Serial tests of spmd.obs.timers and the traces merge/report on a fake two-rank run."""

import json
import time

import h5py
import numpy as np
import pytest
import torch

from spmd.obs.metadata import run_metadata
from spmd.obs.timers import Timers
from spmd.obs.merge import MERGED
from traces.merge import merge
from traces.report import report

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class StubComm:
    """The two mpi4py calls Timers.align uses, for one process playing one rank."""

    def __init__(self):
        self.barriers = 0

    def Barrier(self):
        self.barriers += 1

    def bcast(self, obj, root=0):
        return obj


def _fake_rank(rank: int, run_dir, world_size: int = 2):
    """One rank of a fake run: a few events of each kind written to run_dir."""
    t = Timers(rank)
    t.align(StubComm())
    t.set_phase("prefill", 0)
    with t.compute("attn", layer=0):
        time.sleep(0.001)
    with t.comm("attn.o_proj.allreduce", nbytes=4096 * (rank + 1), group="tp", layer=0):
        time.sleep(0.001)
    t.set_phase("decode", 1)
    with t.comm("lm_head.allgather", nbytes=1000, group="tp"):
        pass
    with t.wait("dispatch"):
        pass
    with t.io("outputs", nbytes=10):
        pass
    return t.write(run_dir, {"world_size": world_size, "hostname": f"node{rank}"})


def test_fields_recorded():
    t = Timers(3)
    t.align(StubComm())
    t.set_phase("decode", step=7)
    with t.compute("moe.experts", layer=5):
        pass
    with t.comm("moe.combine", nbytes=1234, group="ep", layer=5):
        pass
    with t.io("ckpt.read", nbytes=99):
        pass
    t.set_phase("other")
    with t.wait("dispatch"):
        pass
    t.record("external", "compute", start_ns=t.now_ns(), dur_ns=500, layer=2)
    ev = t.table()
    assert [e.decode() for e in ev["name"]] == ["moe.experts", "moe.combine", "ckpt.read", "dispatch",
                                                "external"]
    assert [k.decode() for k in ev["kind"]] == ["compute", "comm", "io", "wait", "compute"]
    assert [p.decode() for p in ev["phase"]] == ["decode"] * 3 + ["other"] * 2
    assert ev["step"].tolist() == [7, 7, 7, -1, -1]
    assert ev["layer"].tolist() == [5, 5, -1, -1, 2]
    assert ev["bytes"].tolist() == [0, 1234, 99, 0, 0]
    assert ev["group"].tolist() == [b"", b"ep", b"", b"", b""]
    assert ev["dur_ns"][-1] == 500
    assert np.all(ev["start_ns"] >= 0) and np.all(np.diff(ev["start_ns"]) >= 0)
    assert ev["step"].dtype == np.int32 and ev["start_ns"].dtype == np.int64


def test_bad_phase_and_kind_rejected():
    t = Timers(0)
    with pytest.raises(ValueError, match="phase"):
        t.set_phase("training")
    with pytest.raises(ValueError, match="kind"):
        t.record("x", "gpu", 0, 1)


def test_nesting_is_an_error():
    """Leaf rule: a context opened inside another raises; the outer one is still recorded."""
    t = Timers(0)
    with pytest.raises(RuntimeError, match="leaf"):
        with t.compute("layer"):
            with t.comm("allreduce", nbytes=8):
                pass
    with t.compute("after"):
        pass
    assert [e.decode() for e in t.table()["name"]] == ["layer", "after"]


def test_cpu_durations_plausible():
    t = Timers(0)
    with t.compute("sleep"):
        time.sleep(0.010)
    dur = t.table()["dur_ns"][0]
    assert 10_000_000 <= dur < 1_000_000_000


def test_events_before_align_are_negative_on_the_aligned_clock():
    t = Timers(0)
    with t.compute("early"):
        pass
    time.sleep(0.002)
    t.align(StubComm())
    with t.compute("late"):
        pass
    early, late = t.table()
    assert early["start_ns"] < -1_000_000 and late["start_ns"] >= 0


def test_disabled_stores_nothing(tmp_path):
    t = Timers(0, enabled=False)
    assert t.compute("a") is t.comm("b", 1) is t.io("c") is t.wait("d")
    with t.compute("a"):
        pass
    t.record("x", "compute", 0, 1)
    assert len(t.table()) == 0
    with h5py.File(t.write(tmp_path, {}), "r") as f:
        assert len(f["events"]) == 0


def test_write_atomic_and_metadata_roundtrip(tmp_path):
    t = Timers(1)
    t.align(StubComm())
    with t.compute("x"):
        pass
    meta = {"config": {"dim": 7168, "layers": [0, 1]}, "hostname": "h", "world_size": 2, "note": None}
    path = t.write(tmp_path, meta)
    assert path == tmp_path / "rank00001.h5"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank00001.h5"]  # no tmp file left over
    with h5py.File(path, "r") as f:
        assert json.loads(f.attrs["config"]) == meta["config"]
        assert f.attrs["hostname"] == "h" and f.attrs["world_size"] == 2
        assert f.attrs["rank"] == 1 and f.attrs["epoch_ns"] == t.epoch_ns and f.attrs["aligned"]
        assert f["events"][()].tobytes() == t.table().tobytes()
    explicit = t.write(tmp_path / "sub" / "mine.h5", {})
    assert explicit.exists()
    with pytest.raises(ValueError, match="reserved"):
        t.write(tmp_path, {"epoch_ns": 1})


def test_run_metadata_keys(monkeypatch):
    meta = run_metadata({"rank": 0, "world_size": 4})
    assert meta["world_size"] == 4 and meta["hostname"]
    assert {"torch", "python", "mpi4py"} <= set(meta["versions"])
    assert isinstance(meta["nccl_env"], dict) and isinstance(meta["git_commit"], str)
    assert meta["gpu_peak_bytes"] == 0 and "SLURM_JOB_ID" not in meta
    from spmd.runtime.world import slurm_ids

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_STEP_ID", "3")
    meta = run_metadata({"rank": 0, "world_size": 4, "slurm": slurm_ids()})  # world.topology's "slurm"
    assert meta["SLURM_JOB_ID"] == "4242" and meta["SLURM_STEP_ID"] == "3"


def test_on_phase_hook_and_monotonic_t0(tmp_path):
    seen = []
    t = Timers(0, on_phase=lambda phase, step: seen.append((phase, step)))
    t.align(StubComm())
    t.set_phase("decode", 3)
    t.set_phase("other")
    assert seen == [("decode", 3), ("other", -1)]
    with h5py.File(t.write(tmp_path, {}), "r") as f:
        t0 = int(f.attrs["clock_t0_ns"])  # CLOCK_MONOTONIC at t0: profiler importers subtract it
    assert abs((time.perf_counter_ns() - t0) - t.now_ns()) < 50_000_000


def test_merge_union_sorted_with_rank(tmp_path):
    t_files = [_fake_rank(r, tmp_path) for r in (1, 0)]
    path = merge(tmp_path)
    with h5py.File(path, "r") as f:
        ev = f["events"][()]
        assert f.attrs["n_ranks"] == 2
        assert f.attrs["epoch_ns"] == f["ranks/0"].attrs["epoch_ns"]
        assert f["ranks/1"].attrs["hostname"] == "node1"
    assert ev.dtype.names[0] == "rank" and ev["rank"].dtype == np.int32
    assert np.bincount(ev["rank"]).tolist() == [5, 5]
    order = np.lexsort((ev["start_ns"], ev["rank"]))
    assert np.array_equal(order, np.arange(len(ev)))
    for r, p in zip((1, 0), t_files):
        with h5py.File(p, "r") as f:
            own = f["events"][()]
        assert ev[ev["rank"] == r]["name"].tolist() == own["name"].tolist()


def test_merge_idempotent(tmp_path):
    for r in (0, 1):
        _fake_rank(r, tmp_path)
    blobs = []
    for _ in range(2):
        with h5py.File(merge(tmp_path), "r") as f:
            blobs.append(f["events"][()].tobytes())
    assert blobs[0] == blobs[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [MERGED, "rank00000.h5", "rank00001.h5"]


def test_merge_detects_missing_ranks(tmp_path):
    with pytest.raises(FileNotFoundError, match="no rank"):
        merge(tmp_path)
    _fake_rank(0, tmp_path, world_size=3)
    _fake_rank(2, tmp_path, world_size=3)
    with pytest.raises(ValueError, match=r"missing ranks \[1\]"):
        merge(tmp_path)


def test_merge_detects_gap_without_world_size(tmp_path):
    for r in (0, 2):
        t = Timers(r)
        t.write(tmp_path, {})
    with pytest.raises(ValueError, match=r"missing ranks \[1\]"):
        merge(tmp_path)


def test_report_tables(tmp_path):
    for r in (0, 1):
        _fake_rank(r, tmp_path)
    text = report(tmp_path)  # merges first: only rank files exist
    assert (tmp_path / MERGED).exists()
    lines = text.splitlines()
    assert any(line.split()[:2] == ["0", "node0"] for line in lines)
    assert any(line.split()[:2] == ["1", "node1"] for line in lines)
    for phase in ("prefill", "decode"):
        assert any(line.split()[:1] == [phase] for line in lines)
    row = next(line.split() for line in lines if line.split()[:1] == ["attn.o_proj.allreduce"])
    assert row[1:3] == ["tp", "2"]
    assert " ".join(row[-2:]).endswith("B/s")
    assert "12.3 kB" in " ".join(row)  # 4096 + 8192 bytes over both ranks


@cuda
def test_cuda_events_resolved_on_flush_without_per_event_sync(monkeypatch):
    t = Timers(0, device="cuda", nvtx=True)
    t.align(StubComm())
    syncs = []
    real_sync = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: (syncs.append(1), real_sync(*a, **k)))
    host0 = time.perf_counter_ns()
    for i in range(3):
        with t.compute("spin", layer=i):
            torch.cuda._sleep(50_000_000)  # tens of ms of GPU time, returns at once on the host
    host_ns = time.perf_counter_ns() - host0
    assert syncs == [] and len(t._pending) == 3 and len(t._events) == 0
    t.flush()
    assert syncs == [1] and not t._pending
    ev = t.table()
    assert ev["layer"].tolist() == [0, 1, 2]
    assert np.all(ev["dur_ns"] > 5_000_000) and ev["dur_ns"].sum() > host_ns  # GPU time, not host
    assert np.all(np.diff(ev["start_ns"]) >= ev["dur_ns"][:-1] - 10_000)  # back to back on one stream
    pool = len(t._free_events)  # resolved pairs go back to the pool (less the new anchor)...
    assert pool == 6 - 1
    with t.comm("c", nbytes=8, group="tp"):
        pass
    assert len(t._free_events) == pool - 2 and len(t._streams) == 1  # ...and are reused
    with torch.cuda.stream(torch.cuda.Stream()):
        with t.compute("side"):
            pass
    assert len(t._streams) == 2  # the side stream was used, not the cached default one


@cuda
def test_cuda_io_wait_use_host_clock_and_clocks_agree():
    t = Timers(0, device="cuda")
    t.align(StubComm())
    with t.compute("spin"):
        torch.cuda._sleep(50_000_000)
    torch.cuda.synchronize()
    with t.wait("w"):
        time.sleep(0.005)
    assert len(t._pending) == 1
    spin, w = t.table()
    assert w["dur_ns"] >= 5_000_000 and spin["start_ns"] >= 0
    # the host event starts after the GPU interval ended (GPU times placed on the host clock)
    assert w["start_ns"] >= spin["start_ns"] + spin["dur_ns"] - 100_000


class FakeMarks:
    """Marks whose 'replay' times the test sets: the Timers' capture/resolve logic without a GPU."""

    after_launch = False  # like EventMarks: the launch overwrites the marks

    def __init__(self):
        self.n, self.now, self.finished = 0, None, False

    def mark(self):
        self.n += 1
        return self.n - 1

    def launched(self):
        pass

    def ready(self):
        return self.finished

    def wait(self):
        self.finished = True

    def times(self, anchor):
        return np.asarray(self.now)


def _capture_fake(t):
    """What Timers.capturing does on CUDA, with FakeMarks: two spans back to back, a gap, a comm span."""
    from spmd.obs.graph_marks import GraphTiming
    from spmd.obs.timers import _CudaSpan

    timing = GraphTiming(FakeMarks())
    t._dev_span, t._captured, t._last_end = _CudaSpan(t), timing, None
    with t.compute("a", layer=0):
        pass
    with t.compute("b", layer=0):  # starts at a's end mark
        pass
    with t.wait("host-side"):  # inside a capture io/wait record nothing...
        pass
    with t.comm("c", nbytes=64, group="tp", layer=1):  # ...and don't break the shared mark
        pass
    t._captured = None
    return timing


def test_graph_spans_share_marks_and_resolve_per_replay():
    from spmd.obs.timers import _host_only

    t = Timers(0, device="cpu")
    t._cuda = True
    with _host_only(t):
        timing = _capture_fake(t)
    assert timing.marks.n == 4  # a: 0-1, b: 1-2, c: 2-3
    assert [s[3:5] for s in timing.spans] == [(0, 1), (1, 2), (2, 3)]
    assert t._events == []
    for step, now in ((1, [100, 110, 130, 170]), (2, [200, 205, 215, 240])):
        t.set_phase("decode", step)
        t.before_replay(timing)  # the previous replay of this graph is resolved before its marks change
        timing.marks.now, timing.marks.finished = now, False
        t.replayed(timing)
    assert len(t._events) == 3 and len(t._replays) == 1
    timing.marks.finished = True
    t.before_replay(timing)
    rows = [(e[0], e[3], e[5], e[6], e[7], e[8]) for e in t._events]
    assert rows == [("a", 1, 100, 10, 0, ""), ("b", 1, 110, 20, 0, ""), ("c", 1, 130, 40, 64, "tp"),
                    ("a", 2, 200, 5, 0, ""), ("b", 2, 205, 10, 0, ""), ("c", 2, 215, 25, 64, "tp")]


class FakeStamps(FakeMarks):
    """Like StampMarks: a replay writes `dev`; launched() queues its copy to the host buffer `now`."""

    after_launch = True

    def __init__(self):
        super().__init__()
        self.dev = None

    def launched(self):
        self.now = list(self.dev)


def test_stamp_replays_resolve_after_the_next_launch():
    """One graph: replay N is read from its host copy after replay N+1's launch, before N+1's copy
    replaces it; nothing is resolved before a launch."""
    from spmd.obs.timers import _host_only

    t = Timers(0, device="cpu")
    t._cuda = True
    with _host_only(t):
        timing = _capture_fake(t)
    timing.marks = FakeStamps()
    timing.marks.n = 4
    for step, dev in ((1, [100, 110, 130, 170]), (2, [200, 205, 215, 240]), (3, [300, 301, 302, 303])):
        t.set_phase("decode", step)
        t.before_replay(timing)  # a no-op for stamps: no host work before the launch
        assert len(t._events) == 3 * max(step - 2, 0)
        timing.marks.dev = dev  # the launch: the graph writes its stamps on the device
        t.replayed(timing)  # resolves the previous replay from the host copy, then copies this one
        assert len(t._events) == 3 * (step - 1) and len(t._replays) == 1
    t._resolve_replay(t._replays[0])  # what flush() does after its synchronize
    starts = [(e[0], e[3], e[5], e[6]) for e in t._events]
    assert starts == [("a", 1, 100, 10), ("b", 1, 110, 20), ("c", 1, 130, 40),
                      ("a", 2, 200, 5), ("b", 2, 205, 10), ("c", 2, 215, 25),
                      ("a", 3, 300, 1), ("b", 3, 301, 1), ("c", 3, 302, 1)]


def test_layer_level_merges_runs_of_one_kind_and_layer():
    """SPMD_GRAPH_MARK_LEVEL=layer: a mark per change of (kind, layer); merged runs sum their bytes."""
    from spmd.obs.graph_marks import GraphTiming
    from spmd.obs.timers import _CudaSpan, _host_only

    t = Timers(0, device="cpu")
    t._cuda = True
    with _host_only(t):
        timing = GraphTiming(FakeMarks())
        t._dev_span, t._captured, t._last_end, t._run, t._layer_level = _CudaSpan(t), timing, None, None, True
        for name, kind, layer, nbytes in (("embed", "compute", -1, 0), ("attn", "compute", 0, 0),
                                          ("rope", "compute", 0, 0), ("attn.out", "comm", 0, 8),
                                          ("moe", "compute", 0, 0), ("moe.out", "comm", 0, 8),
                                          ("moe.more", "comm", 0, 4), ("attn", "compute", 1, 0),
                                          ("head", "compute", -1, 0)):
            with (t.comm(name, nbytes=nbytes, group="tp", layer=layer) if kind == "comm" else
                  t.compute(name, layer=layer)):
                pass
        t.end_capture()
        t._captured = None
    assert [(n, k, layer, a, b, nb) for n, k, layer, a, b, nb, _ in timing.spans] == [
        ("embed", "compute", -1, 0, 1, 0), ("layer.compute", "compute", 0, 1, 2, 0), ("attn.out", "comm", 0, 2, 3, 8),
        ("moe", "compute", 0, 3, 4, 0), ("layer.comm", "comm", 0, 4, 5, 12), ("attn", "compute", 1, 5, 6, 0),
        ("head", "compute", -1, 6, 7, 0)]
    assert timing.marks.n == 8  # 7 runs back to back: 8 marks for 9 spans (the span level takes 10)


def test_graph_mark_level_from_env(monkeypatch):
    from spmd.obs.graph_marks import marks_level

    monkeypatch.delenv("SPMD_GRAPH_MARK_LEVEL", raising=False)
    assert marks_level() == "span"
    monkeypatch.setenv("SPMD_GRAPH_MARK_LEVEL", "layer")
    assert marks_level() == "layer"
    monkeypatch.setenv("SPMD_GRAPH_MARK_LEVEL", "kernel")
    with pytest.raises(ValueError, match="SPMD_GRAPH_MARK_LEVEL='kernel', expected one of"):
        marks_level()


@cuda
@pytest.mark.parametrize("mode", ["stamp", "event"])
def test_cuda_graph_marks_time_the_replay(monkeypatch, mode):
    monkeypatch.setenv("SPMD_GRAPH_MARKS", mode)
    t = Timers(0, device="cuda")
    t.align(StubComm())
    x = torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with t.capturing() as timing, torch.cuda.graph(graph):
        for i, ns in enumerate((2_000_000, 6_000_000)):
            with t.compute("spin", layer=i):
                torch.cuda._sleep(ns)  # cycles, roughly ns at ~1-2 GHz
                x.add_(1)
    assert len(timing.spans) == 2
    host0 = t.now_ns()
    for step in (1, 2, 3):
        t.set_phase("decode", step)
        t.before_replay(timing)
        graph.replay()
        t.replayed(timing)
    t.flush()
    host1 = t.now_ns()
    ev = t.table()
    assert ev["step"].tolist() == [1, 1, 2, 2, 3, 3] and x.item() == 6
    assert (ev["start_ns"] >= host0 - 50_000).all() and (ev["start_ns"] + ev["dur_ns"] <= host1 + 50_000).all()
    dur = ev["dur_ns"].reshape(3, 2)
    assert (dur[:, 1] > 2 * dur[:, 0]).all() and (dur[:, 0] > 500_000).all()
    ends = ev["start_ns"] + ev["dur_ns"]
    assert (ev["start_ns"][1:] >= ends[:-1] - 5_000).all()  # in order, back to back


def test_graph_marks_mode_from_env(monkeypatch):
    from spmd.obs.graph_marks import marks_mode

    monkeypatch.delenv("SPMD_GRAPH_MARKS", raising=False)
    assert marks_mode() == "off"
    for mode in ("off", "event", "stamp"):  # Triton is installed by make install
        monkeypatch.setenv("SPMD_GRAPH_MARKS", mode)
        assert marks_mode() == mode
    monkeypatch.setenv("SPMD_GRAPH_MARKS", "nvtx")
    with pytest.raises(ValueError, match="SPMD_GRAPH_MARKS='nvtx', expected one of"):
        marks_mode()


def test_capturing_records_nothing_on_cpu(monkeypatch):
    monkeypatch.setenv("SPMD_GRAPH_MARKS", "stamp")
    t = Timers(0, device="cpu")  # CPU (no graphs): capturing() suspends the timers, whatever the mode
    with t.capturing() as timing:
        with t.compute("x"):
            pass
    assert not timing and t.table().size == 0 and t.enabled
