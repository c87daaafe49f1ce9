"""traces.comm_bench (make gpu-comm-bench): the dispatch's uneven splits come from the real routing."""
from __future__ import annotations

import json

from conftest import ROOT
from spmd.config import ModelArgs
from traces.comm_bench import splits


def test_dispatch_splits_follow_group_limited_routing():
    m = ModelArgs.from_config(json.loads((ROOT / "inputs" / "models" / "v3.1-671b.json").read_text()))
    assert splits(64, 1, 0, m) == [64]  # one rank owns every expert: each token once
    for g in (2, 4, 8, 32):
        s = splits(64, g, 0, m)
        assert len(s) == g and 64 <= sum(s) <= 64 * min(8, g) and max(s) <= 64
    # 32 ranks of 8 experts, 4 of the 8 expert groups per token: at most 4 x 4 ranks, never all 32
    assert sum(x > 0 for x in splits(1, 32, 0, m)) <= 16
    assert splits(16, 4, 0, m) != splits(16, 4, 1, m)  # each rank its own tokens
