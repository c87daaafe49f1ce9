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


PREFILL = r'''
import sys, torch
from spmd.kernels import fused
from spmd.kernels.fp8 import quantize_act
from spmd.model.transformer import apply_rope
dev = sys.argv[1]
real = torch.empty
torch.empty = lambda *a, **k: (lambda t: t.fill_(float("nan")) if t.is_floating_point() else t)(real(*a, **k))
g = torch.Generator().manual_seed(1)
# the interpreter truncates where GPUs round to nearest, and silu's exp is not torch's: up to 2 bf16 ulps
# per rounded op (3 in a row at most) there; rope in bf16 rounds by integer arithmetic: torch's exactly,
# interpreted too; the keys' copy is exact anywhere
def same(a, b, exact=False, what=""):
    if exact:
        assert torch.equal(a, b), (what, (a.float() - b.float()).abs().max().item())
    else:
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=2e-2, msg=lambda m: f"{what}: {m}")
for b, t, h in ((2, 5, 3), (1, 1, 20), (1, 0, 4)):
    cos, sin = (torch.randn(b, t, 32, generator=g).to(torch.bfloat16).to(dev) for _ in range(2))
    # q: the rope part of (B, T, H, 192) rotated in place; its nope part untouched
    q = torch.randn(b, t, h * 192, generator=g).to(torch.bfloat16).to(dev).view(b, t, h, 192)
    ref = apply_rope(q[..., 128:], cos[:, :, None], sin[:, :, None])
    nope = q[..., :128].clone()
    fused.rope(q[..., 128:], cos, sin, out=q[..., 128:])
    same(q[..., 128:], ref, exact=True, what="rope q")
    assert torch.equal(q[..., :128], nope)
    # k_pe: a strided (B, T, 64) view of the kv_a output, into a new tensor
    kv = torch.randn(b, t, 576, generator=g).to(torch.bfloat16).to(dev)
    same(fused.rope(kv[..., 512:], cos, sin), apply_rope(kv[..., 512:], cos, sin), exact=True, what="rope k")
    # one row of angles for every row of the batch (the same positions)
    same(fused.rope(kv[..., 512:], cos[:1], sin[:1]), apply_rope(kv[..., 512:], cos[:1], sin[:1]), exact=True,
         what="rope one row")
    # keys: k_nope a strided view of kv_b's output (B, S, H, 256), pe (B, S, 64) a view of the cache
    kvb = torch.randn(b, t, h, 256, generator=g).to(torch.bfloat16).to(dev)
    pe = kv[..., 512:]
    k = fused.mla_keys(kvb[..., :128], pe)
    assert torch.equal(k, torch.cat([kvb[..., :128], pe[:, :, None].expand(-1, -1, h, -1)], -1)), "mla_keys"
for m, i in ((37, 256), (1, 128), (0, 128), (64, 384)):
    gu = (torch.randn(m, 2 * i, generator=g) * 3).to(torch.bfloat16).to(dev)
    w = torch.rand(m, generator=g).to(dev)
    gate, up = gu.chunk(2, dim=-1)
    plain = torch.nn.functional.silu(gate) * up
    same(fused.silu_mul(gu), plain, what="silu_mul")
    ref = plain * w.to(plain.dtype)[:, None]
    got = fused.silu_mul(gu, w)
    same(got, ref, what="silu_mul w")
    for ue8m0, pad4 in ((False, False), (True, False), (True, True)):  # the quantized product: quantize_act
        q, s = fused.silu_mul(gu, w, quant=True, ue8m0=ue8m0, pad4=pad4)  # of the fused product, bit for bit
        rq, rs = quantize_act(got, ue8m0, pad4=pad4)
        assert q.dtype == torch.float8_e4m3fn and s.stride(0) == 1 and s.shape == rs.shape and q.shape == rq.shape
        assert q.shape[0] == (-(-m // 4) * 4 if pad4 else m)
        assert torch.equal(q.float(), rq.float()) and torch.equal(s, rs), ("silu_mul quant", m, i, ue8m0, pad4)
# the residual add + RMSNorm in one kernel: the norm as rms_norm of the kernel's own sum (the interpreter
# rounds the add by truncation: torch's add only on GPUs)
for shape in ((2, 19, 256), (1, 7168), (0, 256)):
    d = shape[-1]
    x, r = ((torch.randn(shape, generator=g) * 3).to(torch.bfloat16).to(dev) for _ in range(2))
    w = (torch.rand(d, generator=g) + 0.5).to(torch.bfloat16).to(dev)
    summed, y = fused.norm(x, w, 1e-6, r)
    same(summed, x + r, exact=dev == "cuda", what="add")
    same(y, fused.rms_norm(summed, w, 1e-6), exact=True, what="add + norm")
    plain, y0 = fused.norm(x, w, 1e-6)
    assert plain is None and torch.equal(y0, fused.rms_norm(x, w, 1e-6))
for n, k, d in ((7, 8, 300), (1, 4, 1024), (0, 8, 64)):  # the experts' rows back to tokens, summed
    h = torch.randn(n * k + 3, d, generator=g).to(torch.bfloat16).to(dev)
    idx = torch.randperm(n * k + 3, generator=g)[:n * k].to(dev)
    got = fused.gather_sum(h, idx, k)
    same(got, h.index_select(0, idx).view(n, k, d).sum(1), what="gather_sum")
for bad in (lambda: fused.silu_mul(torch.zeros(2, 3, device=dev)),
            lambda: fused.gather_sum(torch.zeros(4, 8, device=dev), torch.zeros(5, dtype=torch.long, device=dev), 2),
            lambda: fused.silu_mul(torch.zeros(2, 200, device=dev), quant=True),
            lambda: fused.mla_keys(torch.zeros(1, 2, 3, 128, device=dev), torch.zeros(1, 3, 64, device=dev)),
            lambda: fused.rope(torch.zeros(1, 2, 64, device=dev), torch.zeros(1, 2, 16, device=dev),
                               torch.zeros(1, 2, 16, device=dev)),
            lambda: fused.norm(torch.zeros(2, 128, device=dev), torch.ones(128, device=dev), 1e-6,
                               torch.zeros(3, 128, device=dev))):  # a residual of another shape
    try:
        bad()
        raise SystemExit("a wrong shape was accepted")
    except ValueError:
        pass
print("ok")
'''


def test_fused_prefill_ops_equal_torch():
    """The prefill glue kernels (rope in place, the per-head keys, silu * up * routing weight, quantized or
    not; the residual add + RMSNorm) against the torch ops they replace."""
    triton_check(PREFILL)


MODEL = r'''
import json, sys, torch
from spmd.config import ModelArgs
from spmd.kernels import fused
from spmd.model.moe import MLP, MoE
from spmd.model.transformer import MLA, Transformer, use_fused
from spmd.parallel.comm import Group
dev = sys.argv[1]
m = ModelArgs.from_config(json.load(open("inputs/models/tiny.json")))
torch.manual_seed(0)
model = Transformer(m, Group(), torch.bfloat16).eval()
for p in model.parameters():
    p.data.copy_(torch.randn(p.shape) * 0.05)
model.init_buffers("cpu")
model = model.to(dev)
assert model.pack_experts() == "grouped"  # after the move: the stacks are plain attributes
calls = {}
for name in ("rope", "mla_keys", "silu_mul", "gather_sum"):  # count the glue kernels' calls
    def wrap(f, name=name):
        def g(*a, **k):
            calls[name] = calls.get(name, 0) + 1
            return f(*a, **k)
        return g
    setattr(fused, name, wrap(getattr(fused, name)))
glue = [mod for mod in model.modules() if isinstance(mod, (MLA, MoE, MLP))]
def run(ok: bool, t: int):
    use_fused(model, False)
    for mod in glue:  # the interpreter: what use_fused sets on CUDA, by hand
        mod.fused_ok = ok
    tokens = torch.randint(2, m.vocab_size, (2, t), generator=torch.Generator().manual_seed(t)).to(dev)
    pos = torch.arange(t, device=dev)[None].expand(2, -1)
    mask = torch.ones(2, t, dtype=torch.bool, device=dev)
    with torch.inference_mode():
        return model(tokens, pos, mask, model.new_cache(2, t), 0, naive=True, all_positions=True).float()
t = fused.FUSED_ROWS // 2 + 3  # 2 x t rows: at the threshold's size
ref = run(False, t)
assert not calls
assert model.pack_linears() == 2 * m.n_layers  # q_a + kv_a, gate + up: one GEMM each, per layer
def close(got):
    assert torch.isfinite(got).all()
    err = (got - ref).abs().max().item() / ref.abs().max().item()
    assert err < 3e-2, err
close(run(False, t))  # packed GEMMs, torch's ops after them
assert not calls
close(run(True, t))
n_moe = sum(isinstance(mod, MoE) for mod in glue)
# silu_mul: the routed experts of each MoE layer, and each layer's MLP (dense or shared experts)
assert calls == {"rope": 2 * m.n_layers, "mla_keys": m.n_layers, "silu_mul": n_moe + m.n_layers,
                 "gather_sum": n_moe}, calls
calls.clear()
run(True, 5)  # fewer rows: torch's ops (the decode graphs' switch `fused` is off)
assert not calls
print("ok")
'''


def test_model_takes_glue_kernels_for_prefill():
    """A bf16 prefill of the tiny model at FUSED_ROWS tokens, its linears packed (q_a + kv_a, gate + up),
    takes the glue kernels (rope twice per layer, the keys, silu * up per MLP and per MoE layer's experts)
    and gives the unpacked torch path's logits within bf16 rounding; a small step keeps torch's ops."""
    triton_check(MODEL)


def test_gate_logits_bf16_gemm_accumulates_in_float32():
    """On CUDA the router's logits of bf16 x and W come from one bf16 tensor-core GEMM with float32 output:
    exact products, float32 sums. The tensor cores' float32 accumulation is coarser than a CUDA-core float32
    GEMM's (one H100, 2026-12-07: 3.1e-5 on logits up to 7.5, the float32 GEMM 1.7e-6), so the bound is on
    the error against exact sums relative to each logit's sum of |x_i w_i|: 2^-19 (that H100: ~2^-21.5).
    A bf16 output's rounding alone breaks it, as the last line checks."""
    import torch

    from types import SimpleNamespace

    from spmd.model.moe import Gate

    if not torch.cuda.is_available():
        pytest.skip("CUDA only (torch.mm's out_dtype overload)")
    m = SimpleNamespace(n_activated_experts=8, n_expert_groups=8, n_limited_groups=4, route_scale=2.5,
                        n_routed_experts=256, dim=7168)
    gate = Gate(m, torch.bfloat16, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    gate.weight.data = (torch.randn(256, 7168, device="cuda", generator=g) * 0.02).bfloat16()
    x = torch.randn(300, 7168, device="cuda", generator=g).bfloat16()
    got = gate.logits(x)
    assert got.dtype == torch.float32
    w64, x64 = gate.weight.double(), x.double()
    ref = torch.nn.functional.linear(x64, w64)
    mag = torch.nn.functional.linear(x64.abs(), w64.abs())

    def rel(v):
        return ((v.double() - ref).abs() / mag).max().item()
    assert rel(got) <= 2 ** -19, rel(got)
    assert rel(torch.nn.functional.linear(x, gate.weight)) > 2 ** -19  # bf16 output
