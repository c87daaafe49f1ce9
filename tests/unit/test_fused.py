"""Serial: the fused Triton RMSNorm and router (spmd/kernels/fused.py) against the torch paths of spmd/model/transformer.py and
spmd/model/moe.py (Gate).

On CUDA it runs compiled; without CUDA in a subprocess under Triton's CPU interpreter (TRITON_INTERPRET=1
set before triton is imported). Outputs come from torch.empty, poisoned with NaN here, so a row the
kernel fails to write fails the test.
"""
from __future__ import annotations

import pytest

from conftest import triton_check

pytest.importorskip("triton")

CHECK = r'''
import sys, torch
from spmd.kernels import fused
from spmd.kernels.fp8 import triton_available
from spmd.model.transformer import RMSNorm, use_fused
dev = sys.argv[1]
real = torch.empty
torch.empty = lambda *a, **k: (lambda t: t.fill_(float("nan")) if t.is_floating_point() else t)(real(*a, **k))
g = torch.Generator().manual_seed(0)
# bf16: two roundings to bf16, which the interpreter truncates (GPUs round to nearest): up to 2 ulps
for dtype, rtol in ((torch.bfloat16, 2e-2), (torch.float32, 1e-5)):
    for shape in ((1, 1, 7168), (3, 5, 512), (4, 1536), (2, 7, 96), (0, 64)):
        d = shape[-1]
        norm = RMSNorm(d, 1e-6, dtype)
        norm.weight.data = (torch.rand(d, generator=g) + 0.5).to(dtype)
        x = (torch.randn(shape, generator=g) * 3).to(dtype)
        norm, x = norm.to(dev), x.to(dev)
        assert triton_available(x.device)
        xf = x.float()  # RMSNorm's torch path
        ref = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).to(dtype)
        assert torch.equal(norm(x), ref)  # switched off (the default): the torch path
        atol = rtol * 1e-2 * (1 + (ref.abs().max().item() if ref.numel() else 0))
        out = fused.rms_norm(x, norm.weight, norm.eps)
        assert out.shape == x.shape and out.dtype == dtype and torch.isfinite(out).all(), shape
        torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol)
        use_fused(norm, True)  # only on CUDA: the interpreter is for tests, never the model's path
        assert norm.fused == (dev == "cuda")
        got = norm(x)
        assert got.shape == x.shape and torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), ref.float(), rtol=rtol, atol=atol)
        use_fused(norm, False)
        assert not norm.fused
        if len(shape) == 3 and shape[1] > 1:  # a strided view (rows of a wider tensor), as MLA's latent
            wide = torch.cat([x, x[..., :16]], -1)[..., :d]
            torch.testing.assert_close(fused.rms_norm(wide, norm.weight, norm.eps), out, rtol=0, atol=0)
# the router: the fused kernel against Gate's torch path (on the same logits), V3's shape and the tiny's
from types import SimpleNamespace
from spmd.model.moe import Gate
for e, groups, kept, k in ((256, 8, 4, 8), (16, 4, 2, 4)):
    m = SimpleNamespace(n_activated_experts=k, n_expert_groups=groups, n_limited_groups=kept, route_scale=2.5,
                        n_routed_experts=e, dim=64)
    gate = Gate(m, torch.float32)
    gate.weight.data = torch.randn(e, 64, generator=g)
    gate.e_score_correction_bias.data = torch.rand(e, generator=g) * 0.1
    assert fused.route_fits(e, groups, k)
    for n in (1, 7):
        x = torch.randn(n, 64, generator=g)
        ref_w, ref_ids = Gate.forward(gate, x)  # CPU: the torch path
        gate_d = gate.to(dev)
        w, ids = fused.route(torch.nn.functional.linear(x.to(dev), gate_d.weight), gate_d.e_score_correction_bias,
                             groups, kept, k, 2.5)
        gate = gate.to("cpu")
        assert ids.dtype == torch.int64 and w.dtype == torch.float32 and torch.isfinite(w).all()
        assert torch.equal(ids.cpu(), ref_ids), (e, n, ids, ref_ids)
        torch.testing.assert_close(w.cpu(), ref_w, rtol=1e-5, atol=1e-6)
        gate = gate.to(dev)
        use_fused(gate, True)  # Gate.forward then takes the kernel, on CUDA only
        assert gate.fused == (dev == "cuda")
        w2, ids2 = gate(x.to(dev))
        use_fused(gate, False)
        gate = gate.to("cpu")
        assert torch.equal(ids2.cpu(), ref_ids)
        torch.testing.assert_close(w2.cpu(), ref_w, rtol=1e-5, atol=1e-6)
w, ids = fused.route(torch.zeros(0, 16, device=dev), torch.zeros(16, device=dev), 4, 2, 4, 2.5)
assert w.shape == ids.shape == (0, 4)
assert not fused.route_fits(12, 4, 4) and not fused.route_fits(256, 8, 6)
m = SimpleNamespace(n_activated_experts=6, n_expert_groups=8, n_limited_groups=4, route_scale=2.5,
                    n_routed_experts=256, dim=64)
odd = Gate(m, torch.float32).to(dev)
use_fused(odd, True)
assert not odd.fused  # a shape the kernel does not take keeps the torch path
try:
    fused.rms_norm(x, norm.weight[:-1], norm.eps)
    raise SystemExit("a wrong weight shape was accepted")
except ValueError:
    pass
print("ok")
'''


def test_fused_ops_equal_torch():
    triton_check(CHECK)
