"""Serial: which FP8 kernels a GPU gets (--fp8-weights, --fp8-unpack, --fp8-prefill by compute capability),
decided without a GPU: the capability and name are stubbed."""
from __future__ import annotations

import types

import pytest
import torch

from spmd.engines import native

CUDA0 = torch.device("cuda", 0)
GPUS = {"A100": (8, 0), "A10": (8, 6), "L40S": (8, 9), "H100": (9, 0), "B200": (10, 0), "V100": (7, 0)}


@pytest.fixture
def gpu(monkeypatch):
    """gpu(name): CUDA device 0 is that GPU, with Triton importable (the kernels' own check)."""
    def use(name: str):
        monkeypatch.setattr(native, "_capability", lambda dev: GPUS[name] if dev.type == "cuda" else None)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: name)
        from spmd.kernels import fp8
        monkeypatch.setattr(fp8, "triton_available", lambda dev: True)
    return use


def _mode(unpack="auto", prefill="auto", scale_fmt="ue8m0", device=CUDA0):
    args = types.SimpleNamespace(fp8_unpack=unpack, fp8_prefill=prefill)
    return native.fp8_mode(args, device, types.SimpleNamespace(scale_fmt=scale_fmt))


@pytest.mark.parametrize("name,weights,a8", [("A100", "bytes", False), ("A10", "bytes", False),
                                             ("L40S", "e4m3", True), ("H100", "e4m3", True),
                                             ("B200", "e4m3", True)])
def test_auto_by_capability(gpu, name, weights, a8):
    """Ampere decodes bytes and stays weight-only; Ada/Hopper/Blackwell convert in hardware and run FP8 x
    FP8 for prefill-sized GEMMs; the checkpoint's UE8M0 carries over to the activation scales."""
    gpu(name)
    assert native.keep_fp8("auto", CUDA0, True)
    mode = _mode()
    assert mode["weights"] == weights and mode["ue8m0"]
    assert (mode["w8a8_rows"], mode["w8a8_expert_rows"]) == \
        ((native.W8A8_ROWS, native.W8A8_EXPERT_ROWS) if a8 else (0, 0))
    assert not _mode(scale_fmt=None)["ue8m0"]
    assert mode["dense"] == ("scaled_mm" if GPUS[name] >= (9, 0) else "triton")  # cuBLAS block scales: sm_90
    # Hopper: the warp-specialized kernel (fp8_ws; it takes the TMA launch below 256 rows per expert)
    assert mode["grouped"] == ("ws" if GPUS[name][0] == 9 else "tma" if GPUS[name] >= (9, 0) else "tiles")


# (variable, mode field, default, a good value and its setting, a refused value)
ENV_KNOBS = [("SPMD_FP8_GROUPED", "grouped", "ws", "experts", "experts", "fast"),
             ("SPMD_FP8_GROUPED", "grouped", "ws", "ws", "ws", "fast"),  # fp8_ws's Gluon kernel
             ("SPMD_FP8_GROUP_M", "group_m", 8, "1", 1, "0"),
             ("SPMD_FP8_WS_COLUMNS", "ws_columns", 256, "128", 128, "192"),  # default: fp8_ws's 128 x 256 tiles
             ("SPMD_FP8_TMA_LOOP", "tma_loop", "inline", "defer", "defer", "later"),
             ("SPMD_FP8_FUSED_QUANT", "fused_quant", True, "0", False, "no")]


@pytest.mark.parametrize("var,field,default,good,value,bad", ENV_KNOBS)
def test_grouped_launch_from_the_environment(gpu, monkeypatch, var, field, default, good, value, bad):
    gpu("H100")
    assert _mode()[field] == default
    monkeypatch.setenv(var, good)
    assert _mode()[field] == value
    monkeypatch.setenv(var, bad)
    with pytest.raises(ValueError, match=var):
        _mode()


def test_forced_choices(gpu):
    gpu("H100")
    assert _mode(unpack="bytes")["weights"] == "bytes"  # the Ampere path, forced on Hopper (benchmarks)
    assert _mode(unpack="bytes")["w8a8_rows"] == 0  # no FP8 x FP8 where weights are decoded from bytes
    assert _mode(prefill="w8a16")["w8a8_rows"] == 0
    with pytest.raises(ValueError, match="w8a8"):
        _mode(unpack="bytes", prefill="w8a8")
    gpu("A100")
    with pytest.raises(ValueError, match="bytes"):  # one clear message, not a Triton crash
        _mode(unpack="hw")
    with pytest.raises(ValueError, match="8.9"):
        _mode(prefill="w8a8")


def test_older_gpus_dequantize(gpu):
    """No bf16 tensor cores before sm_80: auto dequantizes at load, keep is refused with the way out."""
    gpu("V100")
    assert not native.keep_fp8("auto", CUDA0, True)
    with pytest.raises(ValueError, match="--fp8-weights dequant"):
        native.keep_fp8("keep", CUDA0, True)


def test_interpreter_defaults():
    """Off CUDA (Triton's CPU interpreter): hardware e4m3, weight-only unless w8a8 is asked for."""
    cpu = torch.device("cpu")
    assert _mode(device=cpu)["w8a8_rows"] == 0 and _mode(device=cpu)["weights"] == "e4m3"
    assert _mode(prefill="w8a8", device=cpu)["w8a8_rows"] == native.W8A8_ROWS


def test_warp_specialized_launch_options():
    """fp8_ws's choices from fp8.MODE.tiles: 128 x 128 (4 slots) or 128 x 256 (3), other tiles refused.
    Its register split fills the SM's 65,536 registers with no more than the launch's per-thread budget
    allows."""
    from spmd.kernels import fp8, fp8_ws

    assert fp8_ws.plan(**fp8_ws.options(None)) == fp8_ws.plan(block_n=fp8_ws.BLOCK_N)
    assert fp8_ws.plan(**fp8_ws.options((128, 128, 4, 4))) == dict(HALVES=1, STAGES=4, SKIP=0)
    assert fp8_ws.plan(**fp8_ws.options((128, 256, 4, 2))) == dict(HALVES=2, STAGES=2, SKIP=0)
    assert fp8_ws.plan(block_n=256)["STAGES"] == 3
    assert fp8_ws.plan(**fp8_ws.options(None)) == dict(HALVES=2, STAGES=3, SKIP=0)  # the default 128 x 256
    assert fp8_ws.plan(**fp8_ws.options(None, 128)) == dict(HALVES=1, STAGES=4, SKIP=0)  # SPMD_FP8_WS_COLUMNS
    for tiles in ((64, 128, 4, 4), (128, 64, 4, 4), (192, 128, 4, 3)):
        with pytest.raises(ValueError, match="fp8_ws"):
            fp8_ws.options(tiles)
    assert fp8_ws.MAXNREG * 128 * 3 <= 65536
    assert 2 * fp8_ws.MATH_REGS + fp8_ws.PRODUCER_REGS <= 3 * fp8_ws.MAXNREG and fp8_ws.MATH_REGS % 8 == 0
    old = fp8.configure(grouped="ws")
    try:
        assert fp8.MODE.grouped == "ws"
    finally:
        fp8.configure(**vars(old))
    with pytest.raises(ValueError, match="ws_columns"):
        fp8.configure(ws_columns=192)
    assert fp8.MODE.ws_columns == 256
