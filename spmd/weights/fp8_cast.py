"""An FP8 block-scaled checkpoint as a plain one: every FP8 weight times its 128x128 scale blocks.

    python -m spmd.weights.fp8_cast --checkpoint FP8_DIR --out DIR [--device cuda]

Why (the reference engine): transformers 5.17 dequantizes FP8 weights (FineGrainedFP8Config(dequantize=True))
with a block size derived from the scale grid, rows // grid_rows, not from the checkpoint's
``weight_block_size``. Where a weight's rows or columns are not a multiple of 128 (DeepSeek-V3's
``kv_a_proj_with_mqa``: 576 = 4.5 blocks) the real checkpoint is refused ("Weight shape (576, 7168) not
divisible by scale grid (5, 56)", seen on the full-width slice) and the tiny one (192 rows, 2 scale rows)
is read with 96-row blocks: wrong wherever the two blocks' scales differ. ``needs_cast`` finds such
weights; ``dequantized_copy`` writes the checkpoint in the HF layout without them: same shard files and
names, the FP8 weights as W = q * scale per 128x128 block (DeepSeek's reference ``weight_dequant``),
no scales, no ``quantization_config``. With power-of-two (UE8M0) scales, as V3.1's, the products are
exact in bf16 and the copy stores bf16; other scales give float32. Tokenizer and other files are copied.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from spmd.config import FP8_BLOCK as BLOCK

from spmd.kernels.fp8 import SCALE_SUFFIX, dequantize, scale_name

INDEX = "model.safetensors.index.json"


def _index(ckpt: Path) -> dict[str, str]:
    return json.loads((Path(ckpt) / INDEX).read_text())["weight_map"]


def _is_fp8(ckpt: Path) -> bool:
    q = json.loads((Path(ckpt) / "config.json").read_text()).get("quantization_config") or {}
    return q.get("quant_method") == "fp8"


def needs_cast(ckpt: Path) -> list[str]:
    """The FP8 weights of `ckpt` whose shape is not a multiple of the 128 block (what transformers'
    dequantizer refuses or misreads); [] for a plain checkpoint."""
    ckpt = Path(ckpt)
    if not _is_fp8(ckpt):
        return []
    weights = _index(ckpt)
    by_file: dict[str, list[str]] = {}
    for name, file in weights.items():
        if name.endswith(SCALE_SUFFIX):
            by_file.setdefault(weights[name.removesuffix(SCALE_SUFFIX) + ".weight"], []).append(
                name.removesuffix(SCALE_SUFFIX) + ".weight")
    out = []
    for file, names in sorted(by_file.items()):
        with safe_open(ckpt / file, "pt") as f:
            out += [n for n in names if any(d % BLOCK for d in f.get_slice(n).get_shape())]
    return sorted(out)


def power_of_two(scale: torch.Tensor) -> bool:
    """Power-of-two (or zero) scales: q (3 mantissa bits) times them is exact in bf16 (7 bits, fp32's exponents)."""
    m, _ = torch.frexp(scale.float())
    return bool(((m == 0.5) | (scale == 0)).all())


def dequantized_copy(ckpt: Path, out: Path, device: str = "cpu", log=None) -> Path:
    """Write `ckpt` (FP8) to `out` with every FP8 weight dequantized (module docstring); returns `out`."""
    ckpt, out = Path(ckpt), Path(out)
    t0 = time.perf_counter()
    weights = _index(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(set(weights.values()))
    new_map: dict[str, str] = {}
    total = 0
    for file in files:
        names = [n for n, f in weights.items() if f == file and not n.endswith(SCALE_SUFFIX)]
        tensors = {}
        with safe_open(ckpt / file, "pt", device=device) as f:
            for n in names:
                t = f.get_tensor(n)
                if t.dtype == torch.float8_e4m3fn:
                    sname = scale_name(n)
                    if sname not in weights:
                        raise ValueError(f"{ckpt}: FP8 tensor {n} has no {sname}")
                    if weights[sname] == file:
                        s = f.get_tensor(sname)
                    else:
                        with safe_open(ckpt / weights[sname], "pt", device=device) as g:
                            s = g.get_tensor(sname)
                    t = dequantize(t, s, torch.float32).to(torch.bfloat16 if power_of_two(s) else torch.float32)
                tensors[n] = t.cpu().contiguous()
                new_map[n] = file
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(out / file), metadata={"format": "pt"})
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": new_map}, indent=1))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for extra in ckpt.iterdir():  # tokenizer, generation config, ...
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in (INDEX, "config.json"):
            shutil.copy2(extra, out / extra.name)
    if log:
        log(f"fp8_cast: {ckpt} -> {out}: {len(files)} shards, {total / 2**30:.1f} GiB, "
            f"{time.perf_counter() - t0:.1f} s")
    return out


@contextlib.contextmanager
def exact_partial_blocks():
    """While open, transformers' FP8 dequantizer reads a weight whose scale grid is ceil(shape / 128) with a
    partial last block (kv_a_proj_with_mqa) as the checkpoint means it: W = q * scale per 128x128 block
    (`dequantize`), instead of refusing it or reading it with rows // grid_rows blocks. Every other weight
    goes through transformers' own code. The reference engine loads FP8 checkpoints so, in memory (the
    written copy, `dequantized_copy`, needs the model's bf16 size again on disk)."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    own = Fp8Dequantize._dequantize_one

    def patched(self, quantized, scales, output_dtype=None):
        rows, cols = quantized.shape[-2:]
        grid = tuple(scales.shape[-2:]) if scales.dim() >= 2 else None
        # (the loader may hand over the e4m3 values already cast to the model's float dtype: exact)
        if (rows % BLOCK or cols % BLOCK) and grid == (-(-rows // BLOCK), -(-cols // BLOCK)):
            dtype = output_dtype or (scales.dtype if scales.dtype.is_floating_point and scales.element_size() >= 2
                                     else torch.bfloat16)
            return dequantize(quantized, scales, torch.float32).to(dtype)
        return own(self, quantized, scales, output_dtype=output_dtype)

    Fp8Dequantize._dequantize_one = patched
    try:
        yield
    finally:
        Fp8Dequantize._dequantize_one = own


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m spmd.weights.fp8_cast", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cpu", help="where the products are computed (cuda: faster)")
    a = p.parse_args(argv)
    if not _is_fp8(a.checkpoint):
        print(f"error: {a.checkpoint} is not an FP8 checkpoint (no quantization_config fp8)", file=sys.stderr)
        return 2
    if a.out.exists() and any(a.out.iterdir()):
        print(f"error: {a.out} exists and is not empty", file=sys.stderr)
        return 2
    dequantized_copy(a.checkpoint, a.out, a.device, log=print)
    return 0


if __name__ == "__main__":
    sys.exit(main())
