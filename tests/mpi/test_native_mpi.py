"""pytest-mpi (1 and 2 ranks): the native engine over the whole world as one model group.

Prefill logits of the 20 prompts (one left-padded batch) agree with transformers (each prompt alone)
within 1e-4; the routed experts are sharded: each rank holds 1/G of their bytes.
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist
from mpi4py import MPI

from conftest import PROMPTS20, checkpoint_dir
from spmd.config import ModelArgs
from spmd.engines.native import NativeEngine
from spmd.runtime.generate import GenConfig, generate, left_pad
from spmd.runtime.score import work_items
from spmd.runtime.prompts import encode, load_tokenizer, read_prompts
from spmd.obs.timers import Timers
from spmd.runtime.world import make_world, shutdown
from validation.reference import hf_last_logits, load_hf

pytestmark = pytest.mark.mpi(min_size=1)


@pytest.fixture(scope="module")
def world():
    owned = not dist.is_initialized()
    w = make_world(MPI.COMM_WORLD.size, "cpu")
    yield w
    if owned:
        shutdown(w)


def _engine(world, ckpt, max_new=1, cuda_graph="auto", fp8_weights="auto", dtype="fp32", fp8_prefill="auto"):
    args = types.SimpleNamespace(checkpoint=ckpt, dtype=dtype, max_new_tokens=max_new, cuda_graph=cuda_graph,
                                 fp8_weights=fp8_weights, fp8_prefill=fp8_prefill)
    return NativeEngine(world, args, ModelArgs.from_checkpoint(ckpt), Timers(world.rank, enabled=False))


@pytest.mark.parametrize("config,weights", [("tiny", "bf16"), ("tiny", "fp8"), ("tiny-noqlora", "bf16")])
def test_prefill_logits_match_transformers(world, config, weights):
    ckpt = checkpoint_dir(config, weights)
    ids = encode(load_tokenizer(ckpt), read_prompts(PROMPTS20), chat=True)
    engine = _engine(world, ckpt)
    tokens, mask = left_pad(ids, 1, "cpu")
    ours = engine.prefill(tokens, mask)  # (20, vocab), the same on every rank of the group
    engine.release()
    ref = torch.stack(hf_last_logits(load_hf(ckpt, log=False), ids))
    assert (ours - ref).abs().max().item() < 1e-4
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    same = world.comm.allgather(ours.sum().item())
    assert all(s == same[0] for s in same)


def test_routed_experts_are_sharded(world):
    ckpt = checkpoint_dir("tiny", "bf16")
    m = ModelArgs.from_checkpoint(ckpt)
    engine = _engine(world, ckpt)
    n_moe = m.n_layers - m.n_dense_layers
    full_expert_bytes = n_moe * m.n_routed_experts * 3 * m.dim * m.moe_inter_dim * 4  # fp32
    assert engine.info["expert_param_bytes"] * world.group_size == full_expert_bytes
    local = {int(k) for k in engine.model.model.layers[1].mlp.experts.keys()}
    per = m.n_routed_experts // world.group_size
    assert local == set(range(world.group_rank * per, (world.group_rank + 1) * per))
    totals = world.comm.allgather(engine.info["param_bytes"])
    assert all(t == totals[0] for t in totals)  # every rank holds the same share
    if world.group_size > 1:
        assert engine.info["load_bytes_read"] < 0.6 * _total_bytes(ckpt)


def _total_bytes(ckpt) -> int:
    import json
    return json.loads((ckpt / "model.safetensors.index.json").read_text())["metadata"]["total_size"]


def test_sampling_gives_the_same_tokens_on_every_rank(world):
    ckpt = checkpoint_dir("tiny", "bf16")
    ids = encode(load_tokenizer(ckpt), read_prompts(PROMPTS20), chat=True)[:6]
    engine = _engine(world, ckpt, max_new=12)
    cfg = GenConfig(12, eos_id=1, pad_id=1, temperature=0.8, top_p=0.9, seed=7)
    rows = generate(engine, work_items(ids, None), cfg)
    tokens = [r.tokens for r in rows]
    every = world.comm.allgather(tokens)
    assert all(t == every[0] for t in every)
    greedy = generate(engine, work_items(ids, None), GenConfig(12, eos_id=1, pad_id=1))
    assert [r.tokens for r in greedy] != tokens  # sampling really sampled
    again = generate(engine, work_items(ids, None)[::-1], cfg)  # other batch order: same per-prompt draws
    assert [r.tokens for r in again][::-1] == tokens


def test_static_shape_decode_equals_eager(world):
    """The CUDA graph's code path (static buffers, tensor cache slot, attention over the whole rounded-up
    cache) run eagerly: the same logits as the dynamic-shape path, step by step, and buffers reused by a
    second batch of the same shape give that batch's own tokens."""
    ckpt = checkpoint_dir("tiny", "fp8")
    ids = encode(load_tokenizer(ckpt), read_prompts(PROMPTS20), chat=True)
    eager, static = _engine(world, ckpt, max_new=6), _engine(world, ckpt, max_new=6, cuda_graph="static")
    assert (eager.decode_mode, static.decode_mode) == ("eager", "static")
    for batch in (ids[:5], ids[:5][::-1]):  # same shape twice: the second reuses the first's buffers
        tokens, mask = left_pad(batch, 1, "cpu")
        a, b = eager.prefill(tokens, mask), static.prefill(tokens, mask)
        for step in range(6):  # prefill's logits, then 5 decode steps (the 6 new tokens)
            assert (a - b).abs().max().item() < 1e-4
            assert torch.equal(a.argmax(-1), b.argmax(-1))
            if step < 5:
                a, b = eager.decode(a.argmax(-1)), static.decode(a.argmax(-1))
        eager.release(), static.release()
    assert len(static.graphs.states) == 1
    cfg = GenConfig(6, eos_id=1, pad_id=1)
    rows = [generate(e, work_items(ids[:7], None), cfg) for e in (eager, static)]
    assert [r.tokens for r in rows[0]] == [r.tokens for r in rows[1]]
    static.close()  # end of run: the buffers (graphs, on CUDA) are gone before the process groups
    assert static.graphs is None and static.static is None


def test_fp8_weights_kept_equal_dequantized(world, monkeypatch):
    """FP8 weights kept as FP8 (the Triton w8a16 kernels, here in Triton's CPU interpreter: slow, so two
    short prompts) give the dequantizing load's logits, with the experts on the FP8 grouped path; the
    layout (q_b, o_proj, dense MLP split on 128-block edges) keeps every FP8 weight but kv_b_proj."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ckpt = checkpoint_dir("tiny", "fp8")
    keep, deq = (_engine(world, ckpt, 2, "static", m) for m in ("keep", "dequant"))
    m = ModelArgs.from_checkpoint(ckpt)
    n_moe, local_experts = m.n_layers - m.n_dense_layers, m.n_routed_experts // world.group_size
    attn = 4 if m.q_lora_rank else 3  # q_a, q_b (or q_proj), kv_a, o_proj: all but kv_b_proj
    expected = m.n_layers * attn + m.n_dense_layers * 3 + n_moe * 3 * (1 + local_experts)  # + shared, routed
    assert keep.info["fp8_kept_tensors"] == expected
    assert (keep.info["moe_path"], deq.info["moe_path"]) == ("grouped-fp8", "grouped")
    assert keep.info["param_bytes"] < 0.5 * deq.info["param_bytes"]  # fp8 vs fp32
    ids = [p[:8] for p in encode(load_tokenizer(ckpt), read_prompts(PROMPTS20), chat=True)[:2]]
    tokens, mask = left_pad(ids, 1, "cpu")
    a, b = keep.prefill(tokens, mask), deq.prefill(tokens, mask)
    assert (a - b).abs().max().item() < 1e-4
    nxt = b.argmax(-1)
    assert (keep.decode(nxt) - deq.decode(nxt)).abs().max().item() < 1e-4


# Per-layer error of FP8 x FP8 prefill (activations quantized per row and 128 columns) against the
# dequantized bf16 model, each layer on the reference's own input (relative Frobenius norm of its output,
# residual included). Measured (tiny model, Triton's interpreter, 2 x 8 tokens): w8a8 0.039, 0.075, 0.029,
# 0.024 (0.044 and 0.075 on the first two with kv_b_proj's FP8 copy, 2026-12-06); weight-only 0.007,
# 0.065, 0.007, 0.006 (layer 1: bf16 rounding flips a token's expert, both paths).
W8A8_LAYER_REL_ERR = 0.10


def _isolated_layer_errors(ref, other, tokens, mask, layers: int) -> list[float]:
    """The first `layers` layers of `other`, each run on the input the same layer of `ref` gets in ref's
    prefill (a pre-hook, before ref's layer writes its cache rows: both write the same rows, ref's last)."""
    errs, pending, hooks = [], {}, []

    def pre(i):
        def hook(mod, args, kwargs):
            inputs = [a.clone() if torch.is_tensor(a) else a for a in args]
            pending[i] = other.model.model.layers[i](*inputs, **kwargs).float()
        return hook

    def post(i):
        def hook(mod, args, kwargs, out):
            errs.append(((pending.pop(i) - out.float()).norm() / out.float().norm()).item())
        return hook

    for i, layer in enumerate(ref.model.model.layers[:layers]):
        hooks += [layer.register_forward_pre_hook(pre(i), with_kwargs=True),
                  layer.register_forward_hook(post(i), with_kwargs=True)]
    try:
        ref.prefill(tokens, mask)
    finally:
        for h in hooks:
            h.remove()
        ref.release()
    return errs


def _input_of(module, run) -> torch.Tensor:
    """module's (first) input during run(), in float32; hooked before anything run() registers."""
    seen = {}
    hook = module.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].float().clone()))
    try:
        run()
    finally:
        hook.remove()
    return seen["x"]


def test_fp8_w8a8_follows_the_activation_recipe(world, monkeypatch):
    """The engine's FP8 x FP8 prefill rounds the activations as validation/act_quant.py's recipe does: the
    input of layer 0's q_b_proj (after the packed q_a GEMM of the quantized, normalized x) is nearer the
    recipe's (transformers in float32 with the inputs fake-quantized) than the unquantized model's
    (measured 1.7 % against 2.6 %). Not much nearer: bf16 against float32 inputs round to another e4m3
    neighbour for a few per cent of the elements, a whole e4m3 step each, so even a faithful bf16 run
    keeps about half of the rounding noise apart from the float32 recipe's (docs/validation.md). The
    weight-only path, as a control, is nearer the unquantized model. One rank: numerics."""
    pytest.importorskip("triton")
    if world.size > 1:
        pytest.skip("numerics of the kernels: one rank")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from spmd.kernels import fp8
    from validation import act_quant

    ckpt = checkpoint_dir("tiny", "fp8")
    ids = encode(load_tokenizer(ckpt), read_prompts(PROMPTS20), chat=True)[:1]
    tokens, mask = left_pad(ids, 1, "cpu")
    ref = {}
    for quant in (False, True):
        hf = load_hf(ckpt, log=False)

        def run(hf=hf, quant=quant):
            if quant:  # the recipe's hooks after the capturing one: it sees the input before their rounding
                act_quant.fake_quantize(hf, ckpt, ue8m0=ModelArgs.from_checkpoint(ckpt).scale_fmt == "ue8m0")
            with torch.inference_mode():
                hf(torch.tensor(ids))
        ref["recipe" if quant else "plain"] = _input_of(hf.model.layers[0].self_attn.q_b_proj, run)
    got = {}
    for mode, rows in (("w8a16", 0), ("w8a8", 1)):
        eng = _engine(world, ckpt, 1, "off", "keep", "bf16", "w8a8")
        eng.model.pack_linears()  # as on CUDA: q_a + kv_a in one GEMM, one quantization of x
        old = fp8.configure()
        try:
            fp8.configure(w8a8_rows=rows, w8a8_expert_rows=rows)
            got[mode] = _input_of(eng.model.model.layers[0].self_attn.q_b_proj, lambda: eng.prefill(tokens, mask))
        finally:
            fp8.configure(**vars(old))
            eng.release()

    def rel(a, b):
        return ((a - b.reshape(a.shape)).norm() / b.norm()).item()
    a8_recipe, a8_plain = rel(got["w8a8"], ref["recipe"]), rel(got["w8a8"], ref["plain"])
    assert a8_recipe < 0.8 * a8_plain, (a8_recipe, a8_plain)
    assert 0.01 < a8_plain < 0.06, a8_plain  # the rounding is there: a few per cent
    a16_recipe, a16_plain = rel(got["w8a16"], ref["recipe"]), rel(got["w8a16"], ref["plain"])
    assert a16_plain < 0.3 * a16_recipe, (a16_plain, a16_recipe)


def test_fp8_w8a8_layer_error(world, monkeypatch):
    """bf16 compute: FP8 x FP8 GEMMs (forced from one row on; the linears packed and kv_b_proj's FP8 copy
    taken, as on CUDA) keep a dense and a MoE layer within W8A8_LAYER_REL_ERR of the dequantized bf16
    model, the weight-only kernels within it too, and w8a8 adds error (it ran). One rank: it checks the kernels' numerics, not sharding. Two layers: Triton's
    interpreter takes ~4 s per layer and mode."""
    pytest.importorskip("triton")
    if world.size > 1:
        pytest.skip("numerics of the kernels: one rank")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from spmd.kernels import fp8

    ckpt = checkpoint_dir("tiny", "fp8")
    ids = [p[:8] for p in encode(load_tokenizer(ckpt), read_prompts(PROMPTS20), chat=True)[:2]]
    tokens, mask = left_pad(ids, 1, "cpu")
    ref = _engine(world, ckpt, 1, "off", "dequant", "bf16")
    kept = _engine(world, ckpt, 1, "off", "keep", "bf16", "w8a8")
    kept.model.pack_linears()  # as on CUDA: q_a + kv_a and gate + up packed, kv_b_proj's FP8 copy
    m = ModelArgs.from_checkpoint(ckpt)
    assert kept.model.fp8_kv_b() == m.n_layers and ref.model.fp8_kv_b() == 0
    old = fp8.configure()
    try:
        fp8.configure(w8a8_rows=0, w8a8_expert_rows=0)
        layers = m.n_dense_layers + 1  # the dense layers and the first MoE layer
        w8a16 = _isolated_layer_errors(ref, kept, tokens, mask, layers)
        fp8.configure(w8a8_rows=1, w8a8_expert_rows=1)  # this tiny batch is far below the prefill threshold
        w8a8 = _isolated_layer_errors(ref, kept, tokens, mask, layers)
    finally:
        fp8.configure(**vars(old))
    assert len(w8a8) == len(w8a16) == layers
    assert max(w8a8) < W8A8_LAYER_REL_ERR and max(w8a16) < W8A8_LAYER_REL_ERR, (w8a8, w8a16)
    assert sum(w8a8) > sum(w8a16), "w8a8 ran: quantizing the activations adds error"


def test_fp8_activations_quantized_once_equal_a_quantization_per_gemm(world, monkeypatch):
    """Mode.fused_quant: the MoE input quantized once for the shared and the routed experts, and silu * up
    quantized by its own kernel for the dense and shared down projections, give the logits of a
    quantization before each FP8 x FP8 GEMM, bit for bit, and they ran (one shared quantization per MoE
    layer, one quantizing silu * up per dense or shared MLP). The fused ops forced on for every step (on
    CUDA: use_fused, steps of FUSED_ROWS tokens). One rank."""
    pytest.importorskip("triton")
    if world.size > 1:
        pytest.skip("numerics of the kernels: one rank")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from spmd.kernels import fp8, fused

    ckpt = checkpoint_dir("tiny", "fp8")
    m = ModelArgs.from_checkpoint(ckpt)
    ids = [p[:6] for p in encode(load_tokenizer(ckpt), read_prompts(PROMPTS20), chat=True)[:2]]
    tokens, mask = left_pad(ids, 1, "cpu")
    eng = _engine(world, ckpt, 1, "off", "keep", "bf16", "w8a8")
    eng.model.pack_linears()
    for mod in eng.model.modules():  # what use_fused sets on CUDA, by hand: the interpreter runs the kernels
        if hasattr(mod, "fused_ok"):
            mod.fused_ok = True
    monkeypatch.setattr(fused, "FUSED_ROWS", 1)
    calls = {"quantize_act": 0, "silu_mul": 0}
    for mod, name in ((fp8, "quantize_act"), (fused, "silu_mul")):
        def counted(*a, _f=getattr(mod, name), _n=name, **k):
            calls[_n] += bool(k.get("pad4")) and (_n == "quantize_act" or bool(k.get("quant")))
            return _f(*a, **k)
        monkeypatch.setattr(mod, name, counted)
    old = fp8.configure()
    logits = {}
    try:
        for on in (False, True):
            fp8.configure(w8a8_rows=1, w8a8_expert_rows=1, fused_quant=on)
            logits[on] = eng.prefill(tokens, mask)
            if not on:  # the dense GEMMs here are Triton's (no cuBLAS): no padded quantization of their own
                assert calls == {"quantize_act": 0, "silu_mul": 0}, calls
    finally:
        fp8.configure(**vars(old))
        eng.release()
    assert calls == {"quantize_act": m.n_layers - m.n_dense_layers, "silu_mul": m.n_layers}, calls
    assert torch.isfinite(logits[True]).all() and torch.equal(logits[True], logits[False])
