"""Pipeline stages without MPI: the layer partition, micro-batches, placement and --pp checks, bubble."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from conftest import ROOT
from spmd.config import ModelArgs, check_model_topology, parse_args
from spmd.parallel.pipeline import check_placement, micro_batches, partition, stage_layers
from traces.report import bubble_fraction
from spmd.obs.timers import Timers
from spmd.config import UsageError


def _brute_force(costs, stages, extra):
    """The best max-stage cost over every contiguous split."""
    n, best = len(costs), float("inf")
    for cuts in itertools.combinations(range(1, n), stages - 1):
        edges = (0, *cuts, n)
        loads = [sum(costs[a:b]) for a, b in zip(edges[:-1], edges[1:])]
        loads[-1] += extra
        best = min(best, max(loads))
    return best


@pytest.mark.parametrize("costs,stages,extra", [
    ([1, 1, 1, 1], 2, 0.0), ([5, 1, 1, 1, 1, 1], 2, 0.0), ([1, 2, 3, 4, 5, 6, 7], 3, 0.0),
    ([3, 3, 3, 3], 2, 5.0), ([2, 9, 2, 2, 9, 2, 2], 4, 1.0), ([1], 1, 0.0)])
def test_partition_is_contiguous_complete_and_optimal(costs, stages, extra):
    parts = partition(costs, stages, extra)
    assert len(parts) == stages and parts[0].start == 0 and parts[-1].stop == len(costs)
    assert all(p.stop == q.start for p, q in zip(parts, parts[1:])) and all(len(p) >= 1 for p in parts)
    loads = [sum(costs[p.start:p.stop]) for p in parts]
    loads[-1] += extra
    assert max(loads) == pytest.approx(_brute_force(costs, stages, extra))


def test_partition_refuses_more_stages_than_layers():
    with pytest.raises(UsageError, match="3 pipeline stages for 2 layers"):
        partition([1.0, 1.0], 3)


def test_real_config_stages_are_balanced():
    m = ModelArgs.from_config(json.loads((ROOT / "inputs/models/v3.1-671b.json").read_text()))
    parts = stage_layers(m, 4, 8)
    assert [len(p) for p in parts] and sum(len(p) for p in parts) == m.n_layers == 61
    assert parts[0].start == 0 and 14 <= len(parts[0]) <= 17  # 3 dense layers are light: the first stage takes more
    assert len(parts[-1]) <= len(parts[0])  # the head's bytes count on the last stage


def test_micro_batches_split_rows_evenly():
    assert micro_batches(5, 2) == [(0, 2), (2, 5)]
    assert micro_batches(7, 3) == [(0, 2), (2, 4), (4, 7)]
    assert micro_batches(2, 4) == [(0, 1), (1, 2)]  # never an empty micro-batch
    assert micro_batches(3, 0) == [(0, 3)]


def test_a_stage_spanning_hosts_is_refused_with_the_numbers():
    check_placement(["a", "a", "b", "b"], pp=2, tp=2)  # one stage per host
    check_placement(["a", "b"], pp=2, tp=1)            # stages on different hosts: that is the point
    with pytest.raises(UsageError, match=r"ranks 2\.\.3 spans hosts \['a', 'b'\].*multiple of 2 ranks per host"):
        check_placement(["a", "a", "a", "b"], pp=2, tp=2)


@pytest.mark.parametrize("argv,message", [
    (["--pp", "0"], "--pp=0 must be >= 1"),
    (["--pp", "2", "--engine", "hf"], "--pp 2: pipeline stages are built by --engine native only"),
    (["--pp", "2", "--device", "cuda", "--cuda-graph", "on"], "--cuda-graph on is not available with pipeline"),
    (["--micro-batches", "-1"], "--micro-batches=-1 must be >= 1"),
])
def test_pp_arguments_checked(argv, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        parse_args(["--checkpoint", "c", "--prompts", "p", "--output", "o", *argv])


def test_more_stages_than_layers_refused(tiny_bf16):
    m = ModelArgs.from_checkpoint(tiny_bf16)
    with pytest.raises(UsageError, match=f"--pp {m.n_layers + 1} stages for {m.n_layers} layers"):
        check_model_topology(m, 1, "native", pp=m.n_layers + 1)


def test_bubble_fraction_from_recv_time():
    t = Timers(0)
    t.set_phase("decode", 1)
    t.record("attn", "compute", 0, 600)
    t.record("pp.recv", "comm", 600, 300, nbytes=64, group="pp")
    t.record("pp.send", "comm", 900, 100, nbytes=64, group="pp")
    assert bubble_fraction(t.table()) == pytest.approx(0.3)
    t.record("pp.logits", "comm", 1000, 1000, nbytes=64, group="pp")
    assert bubble_fraction(t.table()) == pytest.approx(1300 / 2000)
    assert bubble_fraction(np.asarray(Timers(0).table())) is None
