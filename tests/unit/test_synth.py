"""Synthetic checkpoint writer: layout, FP8, determinism, tokenizer, and loading with HF transformers."""
import collections
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from spmd.weights import synth
from spmd.kernels.fp8 import dequantize as fp8_dequantize, quantize_weight

MODELS = Path(__file__).resolve().parents[2] / "inputs" / "models"
TINY, NOQ = MODELS / "tiny.json", MODELS / "tiny-noqlora.json"
PROMPTS = ["What is the capital of France?", "Write a Python function that adds two numbers.",
           "Расскажи сказку про кота.", "日本の首都はどこですか？"]
TEXTS = ["Hello, world!", "  leading spaces\tand tabs\n\nnew lines", "Grüße aus Köln — ça va? ¿Qué tal?",
         "Привет, мир!", "你好，世界。学习一门新的语言需要耐心。", "日本語のテキスト", "안녕하세요", "नमस्ते दुनिया",
         "مرحبا بالعالم", "שלום", "emoji 🚆🍞 and math ∑∫√≈", "def f(x):\n    return x ** 2  # square",
         "<｜User｜>hi<｜Assistant｜></think>ok<｜end▁of▁sentence｜>"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors run as fast on one thread, and two OpenMP threads on 2 shared cores spin-wait badly."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return {(cfg.stem, w): synth.write_checkpoint(cfg, root / f"{cfg.stem}-{w}", weights=w, seed=0)
            for cfg in (TINY, NOQ) for w in ("bf16", "fp8")}


def read_all(path: Path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(path / shard, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def expected_layout(cfg: dict, fp8: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype), derived here independently of synth.tensor_specs."""
    h, v, heads = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"]
    nope, rope, vh = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    bf, out = torch.bfloat16, {}

    def proj(name, o, i):
        out[name + ".weight"] = ((o, i), torch.float8_e4m3fn if fp8 else bf)
        if fp8:
            out[name + ".weight_scale_inv"] = ((math.ceil(o / 128), math.ceil(i / 128)), torch.float32)

    def mlp(p, inter):
        for name, o, i in (("gate_proj", inter, h), ("up_proj", inter, h), ("down_proj", h, inter)):
            proj(p + name, o, i)

    def layer(i):
        p = f"model.layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm"):
            out[p + n + ".weight"] = ((h,), bf)
        a, q = p + "self_attn.", cfg["q_lora_rank"]
        if q:
            proj(a + "q_a_proj", q, h)
            proj(a + "q_b_proj", heads * (nope + rope), q)
            out[a + "q_a_layernorm.weight"] = ((q,), bf)
        else:
            proj(a + "q_proj", heads * (nope + rope), h)
        proj(a + "kv_a_proj_with_mqa", cfg["kv_lora_rank"] + rope, h)
        out[a + "kv_a_layernorm.weight"] = ((cfg["kv_lora_rank"],), bf)
        proj(a + "kv_b_proj", heads * (nope + vh), cfg["kv_lora_rank"])
        proj(a + "o_proj", h, heads * vh)
        if i < cfg["first_k_dense_replace"]:
            return mlp(p + "mlp.", cfg["intermediate_size"])
        n_exp = cfg["n_routed_experts"]
        out[p + "mlp.gate.weight"] = ((n_exp, h), bf)
        out[p + "mlp.gate.e_score_correction_bias"] = ((n_exp,), torch.float32)
        mlp(p + "mlp.shared_experts.", cfg["moe_intermediate_size"] * cfg["n_shared_experts"])
        for e in range(n_exp):
            mlp(f"{p}mlp.experts.{e}.", cfg["moe_intermediate_size"])

    for name, shape in (("model.embed_tokens", (v, h)), ("lm_head", (v, h)), ("model.norm", (h,))):
        out[name + ".weight"] = (shape, bf)
    for i in range(cfg["num_hidden_layers"] + cfg["num_nextn_predict_layers"]):
        layer(i)
    for i in range(cfg["num_hidden_layers"], cfg["num_hidden_layers"] + cfg["num_nextn_predict_layers"]):
        p = f"model.layers.{i}."
        for n, shape in (("embed_tokens", (v, h)), ("enorm", (h,)), ("hnorm", (h,)), ("eh_proj", (h, 2 * h)),
                         ("shared_head.norm", (h,)), ("shared_head.head", (v, h))):
            out[p + n + ".weight"] = (shape, bf)
    return out


@pytest.mark.parametrize("key", [("tiny", "bf16"), ("tiny", "fp8"), ("tiny-noqlora", "bf16"), ("tiny-noqlora", "fp8")])
def test_index_shards_names_shapes_dtypes(ckpts, key):
    path = ckpts[key]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):06d}\.safetensors", s) for s in shards)
    seen, total = collections.Counter(), 0
    for shard in shards:
        with safe_open(path / shard, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for k in f.keys():
                seen[k] += 1
                assert index["weight_map"][k] == shard
                t = f.get_slice(k)
                total += math.prod(t.get_shape()) * {"BF16": 2, "F32": 4, "F8_E4M3": 1}[t.get_dtype()]
    assert set(seen) == set(index["weight_map"]) and max(seen.values()) == 1
    assert index["metadata"]["total_size"] == total
    cfg = json.loads((MODELS / f"{key[0]}.json").read_text())
    want = expected_layout(cfg, key[1] == "fp8")
    got = {k: (tuple(t.shape), t.dtype) for k, t in read_all(path).items()}
    assert got == want


def test_config_files(ckpts):
    src = json.loads(TINY.read_text())
    bf, fp = (json.loads((ckpts["tiny", w] / "config.json").read_text()) for w in ("bf16", "fp8"))
    assert bf == src and "quantization_config" not in bf and "auto_map" not in bf
    assert fp.pop("quantization_config") == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                             "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}
    assert fp == src
    full = json.loads((MODELS / "v3.1-671b.json").read_text())
    assert full["quantization_config"]["scale_fmt"] == "ue8m0" and full["num_hidden_layers"] == 61
    gen = json.loads((ckpts["tiny", "bf16"] / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["do_sample"], gen["temperature"], gen["top_p"]) == (
        0, 1, True, 0.6, 0.95)


def test_full_config_layout_matches_real_repo():
    # The real DeepSeek-V3 FP8 repo holds 91991 tensors, 688,574,839,360 bytes.
    cfg = synth.load_config(MODELS / "v3.1-671b.json")
    specs = synth.tensor_specs(cfg, 128000)
    entries = [e for s in specs for e in synth.stored_entries(s, "fp8")]
    assert len(entries) == 91991
    assert sum(math.prod(shape) * dt.itemsize for _, shape, dt in entries) == 688_574_839_360


def test_fp8_scales_and_dequant(ckpts):
    bf, fp = read_all(ckpts["tiny", "bf16"]), read_all(ckpts["tiny", "fp8"])
    scales = [k for k in fp if k.endswith("weight_scale_inv")]
    assert scales
    for sk in scales:
        wk = sk.removesuffix("_scale_inv")
        q, s = fp[wk], fp[sk]
        assert torch.all(torch.frexp(s).mantissa == 0.5), sk  # exact powers of two
        w = fp8_dequantize(q, s, torch.float32)
        ref = bf[wk].float()
        assert (w - ref).norm() / ref.norm() < 0.07, wk
        # scale rounded up to a power of two: every block amax lands in (224, 448]
        amax = torch.nn.functional.pad(q.float().abs(), (0, -q.shape[1] % 128, 0, -q.shape[0] % 128))
        amax = amax.view(s.shape[0], 128, s.shape[1], 128).amax(dim=(1, 3))
        assert amax.max() <= 448 and amax.min() > 224 * 0.9, wk
    for k in bf:
        if synth.scale_name(k) not in fp:
            assert torch.equal(bf[k], fp[k]), k  # embed, head, norms, gate, bias identical in both variants


def test_quantize_weight_edge_shapes_and_exact_requantization():
    w = torch.randn(192, 300) * 0.01
    w[:128, :128] = 0.0  # an all-zero block must not give inf/nan
    w[128:, 128:256] *= 1e-3  # a block whose values fall in e4m3's subnormal range at the first scale
    q, s = quantize_weight(w)
    assert q.shape == (192, 300) and s.shape == (2, 3) and torch.isfinite(s).all()
    assert torch.allclose(fp8_dequantize(q, s, torch.float32), w, rtol=0.07, atol=1e-6)
    # a weight dequantized from power-of-two scales (exact in bf16) quantizes back to the same values:
    # what MLA.pack's FP8 copy of kv_b_proj relies on
    deq = fp8_dequantize(q, s, torch.bfloat16)
    assert torch.equal(deq.float(), fp8_dequantize(q, s, torch.float32))
    q2, s2 = quantize_weight(deq)
    assert torch.equal(fp8_dequantize(q2, s2, torch.float32), deq.float())


def test_determinism(ckpts, tmp_path):
    ref = ckpts["tiny", "bf16"]
    shard = "model-00002-of-000006.safetensors"
    same = synth.write_checkpoint(TINY, tmp_path / "same", seed=0)
    other = synth.write_checkpoint(TINY, tmp_path / "other", seed=1)
    assert (same / shard).read_bytes() == (ref / shard).read_bytes()
    assert (same / "tokenizer.json").read_bytes() == (ref / "tokenizer.json").read_bytes()
    assert (other / shard).read_bytes() != (ref / shard).read_bytes()


def test_atomic_write_and_overwrite(tmp_path, capsys):
    out = tmp_path / "ck"
    synth.main(["--config", str(TINY), "--out", str(out), "--shard-size-mb", "8"])
    assert "6 shards" in capsys.readouterr().out
    with pytest.raises(FileExistsError):
        synth.write_checkpoint(TINY, out)
    with pytest.raises(FileNotFoundError):
        synth.write_checkpoint(TINY, tmp_path / "bad", corpus_dir=tmp_path / "nowhere")
    synth.write_checkpoint(TINY, out, seed=3, overwrite=True, shard_size_mb=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp or old dirs left behind
    assert len(list(out.glob("*.safetensors"))) == 3


def load_hf(path, **kw):
    from transformers import DeepseekV3ForCausalLM

    model, info = DeepseekV3ForCausalLM.from_pretrained(path, output_loading_info=True, **kw)
    return model.eval(), info


def chat_ids(tok, prompt):
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False, return_tensors="pt").input_ids


def greedy(model, tok):
    """16 greedy tokens for each chat-templated prompt."""
    with torch.no_grad():
        return [model.generate(ids, max_new_tokens=16, do_sample=False, attention_mask=torch.ones_like(ids))
                [0, ids.shape[1]:].tolist() for ids in (chat_ids(tok, p) for p in PROMPTS)]


def routing(model, tok):
    """{layer: Counter(expert)} and token count for one forward over ~1500 tokens of varied corpus text."""
    text = " ".join(f.read_text()[:500] for f in sorted(synth.DEFAULT_CORPUS.glob("*.txt")))
    ids = tok(text, return_tensors="pt").input_ids
    routed = collections.defaultdict(collections.Counter)
    hooks = [layer.mlp.gate.register_forward_hook(
        lambda mod, inp, out, i=i: routed[i].update(out[2].flatten().tolist()))
        for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return routed, ids.shape[1]


def assert_non_degenerate(model, tok):
    outs = greedy(model, tok)
    assert all(len(o) == 16 or o[-1] == 1 for o in outs)
    assert all(len(set(o)) >= min(4, len(o)) for o in outs), outs  # no single token repeated
    assert len({tuple(o) for o in outs}) == len(outs)  # prompts lead to different completions
    assert sum(o.count(1) for o in outs) < len(outs)  # EOS reachable but rare
    routed, n_tokens = routing(model, tok)
    assert len(routed) == model.config.num_hidden_layers - model.config.first_k_dense_replace
    for layer, counts in routed.items():
        assert len(counts) == model.config.n_routed_experts, (layer, counts)  # every expert used
        assert max(counts.values()) < 0.5 * n_tokens, (layer, counts)  # no expert takes (nearly) every token


@pytest.mark.parametrize("model", ["tiny", "tiny-noqlora"])
def test_hf_loads_bf16_and_generates(ckpts, model):
    from transformers import AutoTokenizer

    path = ckpts[model, "bf16"]
    m, info = load_hf(path, dtype=torch.float32)
    n = m.config.num_hidden_layers
    assert not info["missing_keys"]
    assert all(k.startswith(f"model.layers.{n}.") for k in info["unexpected_keys"])  # MTP only
    assert {p.dtype for p in m.parameters()} == {torch.float32}
    assert_non_degenerate(m, AutoTokenizer.from_pretrained(path))


def test_hf_loads_fp8_on_cpu(ckpts):
    from transformers import AutoTokenizer

    fp8, info = load_hf(ckpts["tiny", "fp8"], dtype=torch.float32)
    assert not info["missing_keys"]
    # no GPU: transformers dequantizes FP8 at load into plain nn.Linear of the requested dtype
    q_b = fp8.model.layers[1].self_attn.q_b_proj
    assert type(q_b) is torch.nn.Linear and q_b.weight.dtype == torch.float32
    assert_non_degenerate(fp8, AutoTokenizer.from_pretrained(ckpts["tiny", "fp8"]))
    bf16, _ = load_hf(ckpts["tiny", "bf16"], dtype=torch.float32)
    ids = chat_ids(AutoTokenizer.from_pretrained(ckpts["tiny", "fp8"]), PROMPTS[0])
    with torch.no_grad():
        a, b = bf16(ids).logits.flatten(), fp8(ids).logits.flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9  # same model up to FP8 rounding
    default, _ = load_hf(ckpts["tiny", "fp8"])
    assert default.model.layers[1].self_attn.q_b_proj.weight.dtype == torch.bfloat16


def test_tokenizer(ckpts):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path = ckpts["tiny", "bf16"]
    raw, auto = Tokenizer.from_file(str(path / "tokenizer.json")), AutoTokenizer.from_pretrained(path)
    size = raw.get_vocab_size()
    assert size <= json.loads((path / "config.json").read_text())["vocab_size"] and len(auto) == size
    assert [raw.token_to_id(t) for t in synth.SPECIAL_TOKENS] == list(range(7))
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (0, 1, 2)
    for text in TEXTS:
        ids = raw.encode(text).ids
        assert ids[0] == 0 and ids.count(0) == 1  # BOS added once
        assert auto(text)["input_ids"] == ids
        assert auto.decode(ids, skip_special_tokens=True) == raw.decode(ids) == text.replace(
            "<｜User｜>", "").replace("<｜Assistant｜>", "").replace("<｜end▁of▁sentence｜>", "")
    assert raw.encode("<think>x</think>").ids[1::2] == [5, 6]
    # documented in synth's docstring: ids past the tokenizer are silently dropped by decode
    assert raw.decode([size, size + 10]) == "" and auto.decode([size]) == ""
    head = read_all(path)["lm_head.weight"]
    assert not head[size:].any() and head[:size].abs().sum(1).min() > 0


def test_chat_template(ckpts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpts["tiny", "bf16"])
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜></think>Hello!<｜end▁of▁sentence｜>"
                    "<｜User｜>2+2?<｜Assistant｜></think>")
    text = tok.apply_chat_template(msgs[1:2], tokenize=False, add_generation_prompt=False)
    assert text == "<｜begin▁of▁sentence｜><｜User｜>Hi"
    ids = tok(tok.apply_chat_template(msgs[1:2], tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    assert ids[:2] == [0, 3] and ids[-2:] == [4, 6]
