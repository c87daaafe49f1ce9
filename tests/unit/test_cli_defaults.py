"""Serial: the --device default (a GPU probe without torch) and --help showing every default."""
from __future__ import annotations

import re

import pytest

from spmd import config
from spmd.config import UsageError, cli

BASE = ["--checkpoint", "c", "--prompts", "p.jsonl", "--output", "o.jsonl"]


@pytest.mark.parametrize("files,visible,expected", [
    ([], None, False),
    (["dev/nvidiactl"], None, True),
    (["proc/driver/nvidia/gpus/0000:01:00.0/information"], None, True),
    (["dev/kfd"], None, True),  # ROCm
    (["dev/nvidiactl"], "", False),  # every device hidden
    (["dev/nvidiactl"], "-1", False),
    (["dev/nvidiactl"], "0,1", True),
])
def test_gpu_visible_probes_the_driver_files(tmp_path, files, visible, expected):
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    (tmp_path / "proc/driver/nvidia/gpus").mkdir(parents=True, exist_ok=True)  # a driver without GPUs: empty
    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert cli.gpu_visible(environ, tmp_path) is expected


@pytest.mark.parametrize("probe,extra,expected", [
    (True, [], "cuda"), (False, [], "cpu"),
    (True, ["--device", "cpu"], "cpu"), (False, ["--device", "cuda"], "cuda"),
    (True, ["--local-debug"], "cpu"),
])
def test_device_default_follows_the_probe(monkeypatch, probe, extra, expected):
    monkeypatch.setattr(cli, "gpu_visible", lambda: probe)
    assert config.parse_args(BASE + extra).device == expected
    monkeypatch.setattr(cli, "gpu_visible", lambda: pytest.fail("gpu= given: no probe"))
    assert config.parse_args(BASE + extra, gpu=probe).device == expected  # what the ranks agreed on


def test_help_shows_every_default():
    text = " ".join(config.parser().format_help().split())  # argparse wraps lines
    for shown in ("(default: 32)", "(default: native)", "(default: 2:5)", "(default: 0.9)", "(default: auto)"):
        assert shown in text
    assert "None: cuda when any rank sees a GPU" in text and "(None: timers off, no traces)" in text
    assert "--checkpoint CHECKPOINT HF-layout checkpoint directory --prompts" in text  # required: no default
    assert "tokenize prompts raw --local-debug" in text  # flags: no "(default: True)" of store_false
    assert config.parse_args(BASE).profile_steps == (2, 5)  # the "2:5" default goes through its type


def test_group_layout_dpa_names_what_it_needs():
    assert config.parse_args(BASE).group_layout == "tp"
    assert config.parse_args(BASE + ["--group-layout", "dpa", "--group-size", "4"]).group_layout == "dpa"
    for extra, need in ((["--engine", "hf"], "--engine native (got hf)"),
                        (["--batching", "static"], "--batching continuous or auto"),
                        (["--pp", "2"], "--pp 1 (got 2)"),
                        (["--cuda-graph", "static"], "--cuda-graph auto or off")):
        with pytest.raises(UsageError, match="--group-layout dpa needs .*" + re.escape(need)):
            config.parse_args(BASE + ["--group-layout", "dpa"] + extra)
