"""Serial: command line, model config checks, prompt file validation, atomic outputs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from spmd import config
from spmd.runtime import prompts as prompt_io
from spmd.config import UsageError
from spmd.runtime.world import check_gpus_per_node, check_world_size

BASE = ["--checkpoint", "c", "--prompts", "p.jsonl", "--output", "o.jsonl"]


def test_parse_defaults_and_local_debug():
    a = config.parse_args(BASE + ["--device", "cuda", "--local-debug", "--engine", "hf"])
    assert a.device == "cpu" and a.engine == "hf" and a.chat and a.group_size == 1


@pytest.mark.parametrize("extra,msg", [
    (["--group-size", "0"], "--group-size=0"),
    (["--max-new-tokens", "0"], "--max-new-tokens=0"),
    (["--top-p", "0"], "--top-p=0"),
    (["--top-p", "nan"], r"--top-p=nan must be in \(0, 1\]"),
    (["--top-p", "1.01"], r"--top-p=1.01 must be in \(0, 1\]"),
    (["--temperature", "nan"], r"--temperature=nan must be a finite number >= 0 \(0: greedy\)"),
    (["--temperature", "inf"], "--temperature=inf must be a finite number >= 0"),
    (["--temperature", "-0.5"], "--temperature=-0.5 must be a finite number >= 0"),
    (["--seed", str(2 ** 64)], r"--seed=18446744073709551616 must be in 0..18446744073709551615 \(2\^64 - 1\)"),
    (["--seed", "-1"], r"--seed=-1 must be in 0..18446744073709551615"),
    (["--seed", "9" * 5000], "invalid int value"),  # past Python's 4300 digits: argparse's own error
    (["--output", ""], "argument --output: an empty path names no file"),
    (["--prompts", ""], "argument --prompts: an empty path names no file"),
    (["--output", "."], r"--output \. names a directory: give a file name"),
    (["--output", "d/.."], r"--output d/\.\. names a directory"),
    (["--engine", "nope"], "invalid choice"),
    (["--local-debug", "--engine", "deepspeed"], "--local-debug"),
])
def test_bad_arguments_raise_usage_error(extra, msg):
    with pytest.raises(UsageError, match=msg):
        config.parse_args(BASE + extra)


def test_topology_messages_carry_numbers():
    with pytest.raises(UsageError, match="--group-size=3 does not divide the world size 4"):
        check_world_size(4, 3)
    with pytest.raises(UsageError, match="does not divide the 4 model ranks"):
        check_world_size(5, 3, first=1)
    with pytest.raises(UsageError, match="4 ranks on this node but only 2 CUDA devices"):
        check_gpus_per_node(4, "cuda", 2)
    check_world_size(4, 2)
    check_gpus_per_node(4, "cpu", 0)


def test_model_args_of_the_real_config():
    cfg = json.loads((Path(__file__).parents[2] / "inputs/models/v3.1-671b.json").read_text())
    m = config.ModelArgs.from_config(cfg)
    assert (m.dim, m.n_layers, m.n_dense_layers, m.n_heads, m.n_routed_experts) == (7168, 61, 3, 128, 256)
    assert (m.kv_lora_rank, m.qk_rope_head_dim, m.rope_factor, m.fp8, m.scale_fmt) == (512, 64, 40, True, "ue8m0")
    config.check_model_topology(m, 16, "native")
    with pytest.raises(UsageError, match="n_heads=128 not divisible by group size 48"):
        config.check_model_topology(m, 48, "native")
    config.check_model_topology(m, 2, "hf", world_size=2)  # one group: transformers' own TP/EP plan
    with pytest.raises(UsageError, match="it needs one model group"):
        config.check_model_topology(m, 2, "hf", world_size=4)  # two replicas of a group
    with pytest.raises(UsageError, match="--orchestrator inline"):
        config.check_model_topology(m, 2, "hf", world_size=2, orchestrator="dedicated")


def test_groups_of_32_and_64_for_the_real_config():
    """FP8 no longer blocks a tp group whose shards cut the 128-blocks (those tensors are dequantized at
    load: fp8_unaligned names them); dpa splits whole experts only."""
    from spmd.config.model_args import fp8_unaligned
    from spmd.weights.checkpoint import _block_aligned

    cfg = json.loads((Path(__file__).parents[2] / "inputs/models/v3.1-671b.json").read_text())
    m = config.ModelArgs.from_config(cfg)
    for g in (32, 64):
        config.check_model_topology(m, g, "native")
        config.check_model_topology(m, g, "native", layout="dpa")
        assert fp8_unaligned(m, g) == ["dense MLP rows", "shared expert rows"]  # 18432/32 = 576, 2048/32 = 64
    assert fp8_unaligned(m, 16) == []
    with pytest.raises(UsageError, match="n_routed_experts=256 not divisible by group size 48"):
        config.check_model_topology(m, 48, "native", layout="dpa")
    assert _block_aligned(slice(256, 512)) and not _block_aligned(slice(0, 576)) and not _block_aligned(slice(64, 192))


def test_config_errors(tmp_path):
    with pytest.raises(UsageError, match="cannot read"):
        config.ModelArgs.from_checkpoint(tmp_path)
    with pytest.raises(UsageError, match="model_type='llama'"):
        config.ModelArgs.from_config({"model_type": "llama"})
    cfg = json.loads((Path(__file__).parents[2] / "inputs/models/tiny.json").read_text())
    del cfg["vocab_size"]
    with pytest.raises(UsageError, match="lacks field 'vocab_size'"):
        config.ModelArgs.from_config(cfg)


@pytest.mark.parametrize("change,msg", [
    ({"num_experts_per_tok": 99}, "num_experts_per_tok=99 > n_routed_experts=16"),
    ({"n_group": 3}, "n_routed_experts=16 not divisible by n_group=3"),
    ({"topk_group": 9, "n_group": 8}, "topk_group=9 > n_group=8"),
    ({"first_k_dense_replace": 7}, "first_k_dense_replace=7 outside 0..num_hidden_layers=4"),
    ({"hidden_size": 0}, "hidden_size=0"),
    ({"num_attention_heads": "8"}, "num_attention_heads=8"),
])
def test_inconsistent_config(change, msg):
    cfg = json.loads((Path(__file__).parents[2] / "inputs/models/tiny.json").read_text())
    with pytest.raises(UsageError, match=f"config.json is inconsistent: .*{msg}"):
        config.ModelArgs.from_config({**cfg, **change})


def test_unwritable_output_directory(tmp_path):
    base = config.parse_args(["--checkpoint", "build/checkpoints/tiny-bf16", "--prompts", "inputs/prompts/validation20.jsonl",
                         "--output", "/proc/spmd-no-such/o.jsonl"])
    if not base.checkpoint.is_dir():
        pytest.skip("no tiny checkpoint under build/")
    with pytest.raises(UsageError, match="output directory /proc/spmd-no-such is not writable"):
        config.check_paths(base)


def test_prompt_that_tokenizes_to_nothing():
    class Empty:  # a tokenizer giving no ids for this text (byte-level BPE never does; others may)
        chat_template = None

        def __call__(self, text):
            return {"input_ids": []}

    with pytest.raises(UsageError, match="prompt 'q7' \\(prompt 3 of the file\\) tokenizes to zero tokens"):
        prompt_io.encode(Empty(), [prompt_io.Prompt(2, "q7", "\u200b")], chat=False)


def test_read_prompts_jsonl_and_txt(tmp_path):
    j = tmp_path / "p.jsonl"
    j.write_text('{"id": "a", "prompt": "x"}\n\n{"id": "b", "prompt": "héllo 世界"}\n', encoding="utf-8")
    assert [(p.index, p.id, p.text) for p in prompt_io.read_prompts(j)] == [(0, "a", "x"), (1, "b", "héllo 世界")]
    t = tmp_path / "p.txt"
    t.write_text("one\n\n two \n")
    assert [p.text for p in prompt_io.read_prompts(t)] == ["one", " two "]


@pytest.mark.parametrize("content,msg", [
    (b"", "has no prompts"),
    (b"\n  \n", "has no prompts"),
    (b'{"id": "a", "prompt": "x"}\n\xff\xfe\n', "not UTF-8 \\(line 2"),
    (b'{"id": "a", "prompt": "x"}\n{oops}\n', "p.jsonl:2: invalid JSON"),
    (b'{"id": "a"}\n', "non-empty string"),
    (b'{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', "duplicate ids: a"),
])
def test_bad_prompt_files(tmp_path, content, msg):
    f = tmp_path / "p.jsonl"
    f.write_bytes(content)
    with pytest.raises(UsageError, match=msg):
        prompt_io.read_prompts(f)


def test_seed_bounds_are_accepted():
    assert config.parse_args(BASE + ["--seed", str(2 ** 64 - 1), "--temperature", "1"]).seed == 2 ** 64 - 1
    assert config.parse_args(BASE + ["--seed", "0", "--top-p", "1"]).seed == 0


def _raises(path, content: bytes, msg: str) -> str:
    path.write_bytes(content)
    with pytest.raises(UsageError) as err:
        prompt_io.read_prompts(path)
    text = str(err.value)
    assert text.startswith(msg) and "\n" not in text, text
    return text


@pytest.mark.parametrize("line,what", [
    (r'{"id": "a\ud800", "prompt": "x"}', r'"id" holds a lone surrogate \ud800'),
    (r'{"id": "a", "prompt": "x\udfffy"}', r'"prompt" holds a lone surrogate \udfff'),
    (r'{"id": "a", "prompt": "x", "stop": ["\udc00"]}', r'"stop"[0] holds a lone surrogate \udc00'),
    (r'{"\ud83d": 1, "prompt": "x"}', r'the key "\ud83d" holds a lone surrogate \ud83d'),
])
def test_lone_surrogates_are_refused_with_their_line(tmp_path, line, what):
    f = tmp_path / "p.jsonl"
    _raises(f, ('{"id": "ok", "prompt": "\\ud83d\\ude00 a pair is fine"}\n\n' + line + "\n").encode(),
            f"{f}:3: {what}: not a character, so it cannot be tokenized or written as UTF-8 in the output")


def test_deep_nesting_and_huge_integers_name_their_line(tmp_path):
    f = tmp_path / "p.jsonl"
    ok = b'{"id": "a", "prompt": "x"}\n'
    _raises(f, ok + b'{"prompt": "x", "id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
            f"{f}:2: JSON nested too deep")
    _raises(f, ok + b'{"prompt": "x", "seed": ' + b"7" * 5000 + b"}\n",
            f"{f}:2: unreadable JSON (Exceeds the limit (4300 digits) for integer string conversion")
    # nested as deep as the reader allows: the message cannot write it back, and says so
    deep = b"[" * 900 + b"]" * 900
    _raises(f, ok + b'{"prompt": "x", "temperature": ' + deep + b"}\n", f'{f}:2: "temperature" must be a number')
    _raises(f, ok + b'{"prompt": "x", "id": ' + deep + b"}\n", f'{f}:2: "id" must be a string or an integer')
    _raises(f, ok + b'{"prompt": "x", "id": {"a": 1}}\n', f'{f}:2: "id" must be a string or an integer, got {{"a": 1}}')
    _raises(f, ok + b'{"id": "a\\nb", "prompt": "x"}\n{"id": "a\\nb", "prompt": "y"}\n',
            f'prompt file {f} has duplicate ids: "a\\nb"')  # escaped: the `error:` report stays one line


def test_lines_end_at_newline_only(tmp_path):
    """JSON strings may hold U+2028, U+2029 and U+0085 as they are; str.splitlines broke lines there."""
    f = tmp_path / "p.jsonl"
    f.write_text('{"id": "a", "prompt": "x\u2028y\u2029z\u0085w"}\r\n\n{"id": "b", "prompt": "q"}\n{oops\n',
                 encoding="utf-8")
    _raises(f, f.read_bytes(), f"{f}:4: invalid JSON (Expecting property name enclosed in double quotes, column 2)")
    f.write_text('{"id": "a", "prompt": "x\u2028y\u2029z\u0085w"}\r\n\n{"id": "b", "prompt": "q"}', encoding="utf-8")
    assert [(p.id, p.text) for p in prompt_io.read_prompts(f)] == [("a", "x\u2028y\u2029z\x85w"), ("b", "q")]
    t = tmp_path / "p.txt"
    t.write_text("a\x0cb\u2028c\x1cd\r\n\n e\n", encoding="utf-8")
    assert [(p.id, p.text) for p in prompt_io.read_prompts(t)] == [("1", "a\x0cb\u2028c\x1cd"), ("3", " e")]


def test_missing_prompt_file(tmp_path):
    with pytest.raises(UsageError, match="cannot read prompt file"):
        prompt_io.read_prompts(tmp_path / "none.jsonl")


def test_context_check_names_prompt():
    ps = [prompt_io.Prompt(0, "long", "...")]
    with pytest.raises(UsageError, match="prompt 'long' has 100 tokens \\+ 32 new tokens > the model's context of 128"):
        prompt_io.check_context(ps, [[1] * 100], 32, 128)
    prompt_io.check_context(ps, [[1] * 96], 32, 128)


def test_write_jsonl_is_atomic(tmp_path):
    out = tmp_path / "sub" / "o.jsonl"
    prompt_io.write_jsonl(out, [{"a": 1}, {"b": "ü"}])
    assert out.read_text(encoding="utf-8").splitlines() == ['{"a": 1}', '{"b": "ü"}']
    assert sorted(x.name for x in out.parent.iterdir()) == ["o.jsonl"]  # no temp file left


def test_tokenizer_encode_decode(tiny_bf16):
    tok = prompt_io.load_tokenizer(tiny_bf16)
    ps = [prompt_io.Prompt(0, "a", "Hello world"), prompt_io.Prompt(1, "b", "Привет, 世界")]
    chat, raw = prompt_io.encode(tok, ps, chat=True), prompt_io.encode(tok, ps, chat=False)
    assert all(len(c) > len(r) for c, r in zip(chat, raw))  # template adds role tokens
    assert prompt_io.decode(tok, raw[1]) == "Привет, 世界"
    assert prompt_io.decode(tok, raw[0] + [len(tok) + 5]) == "Hello world"  # embedding-padding ids dropped
