"""Serial: the grouped-GEMM MoE path (no host sync) equals the per-expert loop, on fresh random inputs."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch

from spmd.config import ModelArgs
from spmd.model.moe import MoE
from spmd.parallel.comm import Group

ROOT = Path(__file__).resolve().parents[2]


def _moe(config: str, dtype) -> MoE:
    m = ModelArgs.from_config(json.loads((ROOT / "inputs" / "models" / f"{config}.json").read_text()))
    moe = MoE(1, m, Group(), dtype)
    g = torch.Generator().manual_seed(zlib.crc32(config.encode()))
    for p in moe.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return moe


@pytest.mark.parametrize("config", ["tiny", "tiny-noqlora"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_grouped_equals_loop(config, dtype, tol, tokens):
    moe = _moe(config, dtype)
    x = torch.randn(tokens, moe.gate.weight.shape[1]).to(dtype)
    w, ids = moe.gate(x)
    ref = moe._routed_loop(x, w, ids)
    moe.pack()
    out = torch.full_like(ref, float("nan"))  # poisoned: every element must be written
    out.copy_(moe.routed(x, w, ids))
    assert torch.isfinite(out).all()
    assert (out.float() - ref.float()).abs().max().item() <= tol * max(1.0, ref.float().abs().max().item())


def test_pack_keeps_checkpoint_names_as_views():
    moe = _moe("tiny", torch.float32)
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    moe.pack()
    after = moe.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    e = moe.experts[str(moe.expert_lo + 1)]
    assert e.down_proj.weight.data_ptr() == moe.w2[1].data_ptr()


def test_expert_range_subset_only_counts_local_slots():
    """Emulate rank 1 of 2: the grouped path must drop the other rank's slots, like the loop."""
    moe = _moe("tiny-noqlora", torch.float32)
    half = moe.n_experts // 2
    keep = {str(e) for e in range(half, moe.n_experts)}
    moe.experts = torch.nn.ModuleDict({k: v for k, v in moe.experts.items() if k in keep})
    moe.expert_lo, moe.expert_hi = half, moe.n_experts
    x = torch.randn(9, moe.gate.weight.shape[1])
    w, ids = moe.gate(x)
    ref = moe._routed_loop(x, w, ids)
    moe.pack()
    assert (moe.routed(x, w, ids) - ref).abs().max().item() < 1e-5


def test_pack_weights_views_and_fp8_alignment():
    """pack_weights stacks linears that read one input: the modules' weights and scales become views of
    the stack (names and values kept), one GEMM gives their outputs side by side; FP8 modules whose rows
    would share a 128-row scale block are left alone."""
    from spmd.parallel.layers import Linear, matmul, pack_weights
    g = torch.Generator().manual_seed(3)
    a, b = Linear(64, 128, torch.float32), Linear(64, 40, torch.float32)
    for mod in (a, b):
        mod.weight.data.copy_(torch.randn(mod.weight.shape, generator=g))
    x = torch.randn(5, 64, generator=g)
    ref = torch.cat([a(x), b(x)], -1)
    w, s = pack_weights([a, b])
    assert s is None and w.shape == (168, 64)
    assert a.weight.data_ptr() == w.data_ptr() and b.weight.data_ptr() == w[128:].data_ptr()
    torch.testing.assert_close(matmul(x, w, None), ref, rtol=1e-6, atol=1e-5)
    fa, fb = Linear(256, 128, torch.float8_e4m3fn), Linear(256, 40, torch.float8_e4m3fn)
    for mod in (fa, fb):
        mod.weight.data.copy_(torch.randn(mod.weight.shape, generator=g).to(torch.float8_e4m3fn))
        mod.weight_scale_inv = torch.rand(-(-mod.weight.shape[0] // 128), 2, generator=g)
    before = [fa.weight_scale_inv.clone(), fb.weight_scale_inv.clone()]
    w8, s8 = pack_weights([fa, fb])
    assert s8.shape == (2, 2) and torch.equal(fa.weight_scale_inv, before[0]) and torch.equal(fb.weight_scale_inv, before[1])
    assert fb.weight_scale_inv.data_ptr() == s8[1:].data_ptr() and fb.weight.data_ptr() == w8[128:].data_ptr()
    assert pack_weights([fb, fa]) is None  # 40 rows, then another module: its scale rows would not align
    assert pack_weights([a, fa]) is None  # mixed dtypes


def test_fp8_copy_only_where_exact():
    """kv_b_proj's FP8 copy (MLA.pack): taken for a 16-bit weight dequantized from power-of-two block scales
    (it dequantizes back to the same weight), refused for other weights and beside a 16-bit model."""
    from spmd.kernels.fp8 import dequantize, quantize_weight
    from spmd.parallel.layers import fp8_copy

    g = torch.Generator().manual_seed(0)
    fp8 = torch.zeros(8, 8, dtype=torch.float8_e4m3fn)
    q, s = quantize_weight(torch.randn(256, 384, generator=g) * 0.02)
    w = dequantize(q, s, torch.bfloat16)
    cq, cs = fp8_copy(w, like=fp8)
    assert cq.dtype == torch.float8_e4m3fn and torch.equal(dequantize(cq, cs, torch.bfloat16), w)
    other = w * 1.25  # not q * a power of two: does not re-quantize exactly
    assert fp8_copy(other, like=fp8) == (None, None)
    assert fp8_copy(w, like=w) == (None, None)  # the model keeps no FP8 weights
    assert fp8_copy(w.float(), like=fp8) == (None, None)  # float32 compute: no FP8 GEMMs
