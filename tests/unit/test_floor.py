"""Serial: the roofline floor of decode bytes and prefill FLOPs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from spmd.config import ModelArgs
from spmd.config.sizes import distinct_experts, layer_params
from traces.floor import decode_bytes, floor_ms, prefill_flops

ROOT = Path(__file__).resolve().parents[2]


def _m(name: str) -> ModelArgs:
    return ModelArgs.from_config(json.loads((ROOT / "inputs" / "models" / f"{name}.json").read_text()))


def test_slice_decode_floor_matches_the_issue_reference():
    m = _m("slice")  # issue 6: about 1.8 / 5 / 11 ms per step at batch 1 / 8 / 32 at 3.0 TB/s
    got = [floor_ms(decode_bytes(m, b, 160), 3000) for b in (1, 8, 32)]
    assert got == pytest.approx([1.8, 4.7, 10.9], abs=0.1)


def test_expert_count_sharding_and_fp8():
    m = _m("v3.1-671b")
    assert distinct_experts(m, 1) == pytest.approx(8)
    assert distinct_experts(m, 10_000) == pytest.approx(256)
    p = layer_params(m, 10)
    assert p.expert == 3 * 7168 * 2048
    # the main model (MTP excluded) is the 671B; the HF repo's 685B adds the 14B MTP module
    total = sum(layer_params(m, i).replicated + layer_params(m, i).sharded
                + (m.n_routed_experts * layer_params(m, i).expert) for i in range(m.n_layers))
    assert 668e9 < total + 2 * m.vocab_size * m.dim < 674e9
    one, two = decode_bytes(m, 32, 1000), decode_bytes(m, 32, 1000, group=2)
    assert 0.5 < two / one < 0.52  # everything but replicated parts and the cache halves
    assert decode_bytes(m, 32, 0, weights="fp8") < 0.55 * decode_bytes(m, 32, 0)


def test_prefill_flops_scale_with_tokens():
    m = _m("slice")
    assert prefill_flops(m, 2, 128) == pytest.approx(2 * prefill_flops(m, 1, 128), rel=1e-3)
    assert prefill_flops(m, 32, 128, group=2) < 0.52 * prefill_flops(m, 32, 128)  # q_a, kv_a, gate replicated
