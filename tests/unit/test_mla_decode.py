"""Serial: the varlen MLA decode kernel (spmd/kernels/mla_decode.py) against the absorbed attention's formula.

On CUDA compiled; without CUDA in a subprocess under Triton's CPU interpreter (TRITON_INTERPRET=1 set
before triton is imported). Rows of different lengths (1 key, all keys, in between), cache views with a row
stride longer than their columns (the slots' cache), head counts that are and are not a multiple of the
kernel's head block, one and several column splits, several tiles.
"""
from __future__ import annotations

import pytest

from conftest import triton_check

pytest.importorskip("triton")

CHECK = r'''
import sys, torch
from spmd.kernels.mla_decode import mla_decode, splits_for
dev = sys.argv[1]
g = torch.Generator().manual_seed(0)

def reference(q_lat, q_pe, kv, pe, lens, scale):
    s = (torch.einsum("bhc,bsc->bhs", q_lat.float(), kv.float()) + torch.einsum("bhr,bsr->bhs", q_pe.float(), pe.float()))
    keys = torch.arange(kv.shape[1], device=kv.device)
    s = (s * scale).masked_fill(keys[None, None, :] >= lens[:, None, None], float("-inf"))
    return torch.einsum("bhs,bsc->bhc", torch.softmax(s, -1), kv.float())

for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 2e-2)):
    for heads, c, r, cols, lens in ((8, 128, 64, 200, [1, 200, 77]), (20, 32, 16, 45, [45, 3]),
                                    (16, 64, 16, 300, [1, 2, 299, 300, 150, 33, 64, 65])):
        b = len(lens)
        cache_kv = torch.randn(b, cols + 40, c, generator=g).to(dtype)  # the slots' rows are longer than the view
        cache_pe = torch.randn(b, cols + 40, r, generator=g).to(dtype)
        q_lat = torch.randn(b, heads, c, generator=g).to(dtype)
        q_pe = torch.randn(b, heads, r, generator=g).to(dtype)
        kv, pe = cache_kv.to(dev)[:, :cols], cache_pe.to(dev)[:, :cols]
        lens_t = torch.tensor(lens, device=dev)
        scale = (c + r) ** -0.5
        out = mla_decode(q_lat.to(dev), q_pe.to(dev), kv, pe, lens_t, scale)
        ref = reference(q_lat.to(dev), q_pe.to(dev), kv, pe, lens_t, scale)
        assert out.dtype == dtype and out.shape == (b, heads, c)
        err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
        assert err < tol, (dtype, heads, cols, err)
        for bh, bn, w in ((32, 64, 8), (64, 16, 4)):  # other tiles (traces/mla_bench.py times them)
            out = mla_decode(q_lat.to(dev), q_pe.to(dev), kv, pe, lens_t, scale, block_h=bh, block_n=bn, warps=w)
            err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            assert err < tol, (dtype, heads, cols, bh, bn, err)
assert splits_for(400, 128, 4096, 132) == 1 and splits_for(8, 128, 4096, 132) == 9
print("ok")
'''


def test_mla_decode_equals_the_formula():
    triton_check(CHECK, timeout=600)


MODEL = r"""
import sys, types, torch
from conftest import PROMPTS20, checkpoint_dir
from spmd.config import ModelArgs
from spmd.engines.native import NativeEngine
from spmd.obs.timers import Timers
from spmd.runtime.generate import GenConfig
from spmd.runtime.prompts import encode, load_tokenizer, read_prompts
from spmd.runtime.records import Sampling, WorkItem
from spmd.runtime.scheduler import Scheduler
from spmd.runtime.world import make_world, shutdown
dev = sys.argv[1]
world = make_world(1, dev)
ckpt = checkpoint_dir("tiny", "bf16")
ids = encode(load_tokenizer(ckpt), read_prompts(PROMPTS20), chat=True)[:4]
items = [WorkItem(i, q, sampling=Sampling(2 + i % 3, ignore_eos=True)) for i, q in enumerate(ids)]
out = {}
for mode in ("torch", "varlen"):
    args = types.SimpleNamespace(checkpoint=ckpt, dtype="fp32", max_new_tokens=4, cuda_graph="off",
                                 fp8_weights="dequant", mla_decode=mode)
    engine = NativeEngine(world, args, ModelArgs.from_checkpoint(ckpt), Timers(0, enabled=False))
    assert engine.model.varlen_decode == (mode == "varlen")
    rows = []
    Scheduler(engine, 3, 64, 256, GenConfig(4, 1, 1), Timers(0, enabled=False)).run(iter([items]), rows.extend)
    out[mode] = {r.index: r.tokens for r in rows}
    engine.close()
assert out["varlen"] == out["torch"] and len(out["torch"]) == 4, out
shutdown(world)
print("ok")
"""


def test_continuous_decode_through_the_kernel_gives_the_same_tokens():
    """The model's switch (Transformer.varlen_decode, --mla-decode varlen): greedy fp32 tokens of a continuous
    run equal those of torch's attention (3 slots, rows of different lengths)."""
    triton_check(MODEL, timeout=600, mpi=True)


def test_the_flag_picks_the_kernel_where_it_runs():
    """--mla-decode auto: the kernel on CUDA with Triton, torch on CPU; varlen where it cannot run: refused."""
    from types import SimpleNamespace as ModelArgs

    import torch

    from spmd.engines.native import varlen_decode

    m = ModelArgs(n_heads=16, kv_lora_rank=512, qk_rope_head_dim=64)  # the fields varlen_decode reads
    cpu = torch.device("cpu")
    assert varlen_decode("torch", cpu, m) is False and varlen_decode("auto", cpu, m) is False
    if torch.cuda.is_available():
        assert varlen_decode("auto", torch.device("cuda"), m) is True
        assert varlen_decode("auto", torch.device("cuda"), ModelArgs(n_heads=16, kv_lora_rank=96,
                                                                         qk_rope_head_dim=64)) is False
    with pytest.raises(ValueError, match="--mla-decode varlen needs Triton on a CUDA device"):
        varlen_decode("varlen", cpu, m)
