"""Our unsharded Transformer against transformers' DeepseekV3ForCausalLM on the tiny checkpoints (fp32)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from spmd.config import ModelArgs
from spmd.engines.hf import load_hf
from spmd.model.transformer import Transformer, softmax_scale, yarn_inv_freq
from spmd.obs.timers import Timers
from spmd.parallel.comm import Group, attach_timers

from conftest import assert_fp32_close, checkpoint_dir

LENGTHS = (5, 9, 13)
DECODE_STEPS = 8
ULPS = 128  # ours (absorbed MLA, grouped experts) vs transformers (expanded, per expert): other sums, see assert_fp32_close


def hf_state(hf) -> dict[str, torch.Tensor]:
    """HF's state dict with the fused routed experts split into the checkpoint's per-expert names."""
    out = {}
    for name, t in hf.state_dict().items():
        prefix, _, leaf = name.rpartition(".")
        if prefix.endswith("mlp.experts") and leaf == "gate_up_proj":  # (E, 2I, H): gate rows, then up rows
            for e, w in enumerate(t):
                out[f"{prefix}.{e}.gate_proj.weight"], out[f"{prefix}.{e}.up_proj.weight"] = w.chunk(2, dim=0)
        elif prefix.endswith("mlp.experts") and leaf == "down_proj":  # (E, H, I)
            for e, w in enumerate(t):
                out[f"{prefix}.{e}.down_proj.weight"] = w
        else:
            out[name] = t
    return out


@pytest.fixture(scope="module", params=["tiny", "tiny-noqlora"])
def models(request):
    ckpt = checkpoint_dir(request.param, "bf16")
    hf = load_hf(ckpt, "fp32", log=False)
    margs = ModelArgs.from_checkpoint(ckpt)
    ours = Transformer(margs, Group()).eval()
    attach_timers(ours, Timers(0))  # enabled Timers: a nested timer would raise
    ours.load_state_dict(hf_state(hf), strict=True)
    return ckpt, margs, hf, ours


def _prompts(vocab: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(2, vocab, (n,), generator=gen) for n in LENGTHS]


def _left_pad(prompts: list[torch.Tensor]):
    """(B, T) tokens, (B, T) bool mask of real tokens, (B, T) rotary positions (real tokens at 0..len-1)."""
    t = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), t, dtype=torch.long)
    mask = torch.zeros(len(prompts), t, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, t - len(p):], mask[i, t - len(p):] = p, True
    return tokens, mask, (mask.long().cumsum(-1) - 1).clamp(min=0)


def _hf_run(hf, prompt: torch.Tensor, feed: list[int]) -> list[torch.Tensor]:
    """HF alone on one prompt: last-position logits after the prompt and after each fed token."""
    from transformers import DynamicCache

    cache = DynamicCache(config=hf.config)
    out = [hf(input_ids=prompt[None], past_key_values=cache, use_cache=True).logits[0, -1]]
    for tok in feed:
        out.append(hf(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True).logits[0, -1])
    return out


@torch.inference_mode()
def test_prefill_and_decode_match_hf(models):
    _, margs, hf, ours = models
    prompts = _prompts(margs.vocab_size)
    # the tokens fed during decode: HF's greedy continuation of each prompt (computed once, fed to both)
    feeds = []
    for p in prompts:
        seq = p.clone()
        for _ in range(DECODE_STEPS):
            nxt = hf(input_ids=seq[None]).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt[None]])
        feeds.append(seq[len(p):].tolist())
    ref = [torch.stack(_hf_run(hf, p, f)) for p, f in zip(prompts, feeds)]  # each (1 + steps, V)

    tokens, mask, pos = _left_pad(prompts)
    bsz, t = tokens.shape
    cache = ours.new_cache(bsz, t + DECODE_STEPS)
    logits = ours(tokens, pos, mask, cache, 0)
    assert logits.shape == (bsz, margs.vocab_size) and logits.dtype == torch.float32
    assert_fp32_close(logits, torch.stack([r[0] for r in ref]), ULPS)
    last = pos[:, -1:]
    for step in range(DECODE_STEPS):
        nxt = torch.tensor([f[step] for f in feeds])[:, None]
        last = last + 1
        mask = torch.cat([mask, torch.ones(bsz, 1, dtype=torch.bool)], dim=1)
        logits = ours(nxt, last, mask, cache, t + step)
        assert_fp32_close(logits, torch.stack([r[step + 1] for r in ref]), ULPS)


@torch.inference_mode()
def test_absorb_equals_naive(models):
    _, margs, _, ours = models
    tokens, mask, pos = _left_pad(_prompts(margs.vocab_size))
    out = {}
    for naive in (True, False):
        cache = ours.new_cache(*tokens.shape)
        out[naive] = ours(tokens, pos, mask, cache, 0, naive=naive, all_positions=True)  # (B, T, V)
        assert torch.isfinite(out[naive]).all(), "padded query rows must stay finite"
    assert_fp32_close(out[False][mask], out[True][mask], ULPS)


@torch.inference_mode()
def test_gate_matches_hf_router(models):
    _, margs, hf, ours = models
    layer = margs.n_dense_layers
    x = torch.randn(64, margs.dim, generator=torch.Generator().manual_seed(2))
    _, w_ref, ids_ref = hf.model.layers[layer].mlp.gate(x)
    w, ids = ours.model.layers[layer].mlp.gate(x)
    ids, order = ids.sort(dim=-1)
    ids_ref, order_ref = ids_ref.sort(dim=-1)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w.gather(1, order), w_ref.gather(1, order_ref), atol=1e-6, rtol=0)


def test_rope_and_scale_match_hf(models):
    _, margs, hf, ours = models
    assert torch.equal(ours.rope_inv_freq, hf.model.rotary_emb.inv_freq)
    assert ours.rope_factor == pytest.approx(hf.model.rotary_emb.attention_scaling, abs=0)
    assert ours.model.layers[0].self_attn.softmax_scale == pytest.approx(hf.model.layers[0].self_attn.scaling,
                                                                          abs=0)


def _checkpoint_shapes(ckpt, n_layers: int) -> dict[str, tuple]:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    shapes = {}
    for name, fname in index.items():
        if name.startswith(f"model.layers.{n_layers}."):  # the MTP layer: not implemented, skipped
            continue
        with safe_open(str(ckpt / fname), "pt") as f:
            shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def test_meta_construction_names_match_checkpoint(models):
    ckpt, margs, _, _ = models
    with torch.device("meta"):
        model = Transformer(margs, Group(), torch.bfloat16)
    state = model.state_dict()
    assert all(t.is_meta for t in state.values())
    assert {k: tuple(v.shape) for k, v in state.items()} == _checkpoint_shapes(ckpt, margs.n_layers)
    assert state["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    model.to_empty(device="cpu")
    model.init_buffers("cpu")
    assert torch.equal(model.rope_inv_freq, yarn_inv_freq(margs))
    assert model.new_cache(2, 7).kv[0].shape == (2, 7, margs.kv_lora_rank)
    assert softmax_scale(margs) > margs.qk_head_dim ** -0.5  # YaRN mscale correction is in
