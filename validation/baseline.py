"""Baseline for validation: single-process transformers, greedy, with the top-k log-probs of every generated position.

    python -m validation.baseline --checkpoint DIR --prompts inputs/prompts/validation20.jsonl
        --out validation/results/baselines/NAME.jsonl [--max-new-tokens 32] [--top-k 8] [--dtype fp32|bf16]
        [--device cpu|cuda] [--batch-size 1] [--no-chat-template]

Output (JSONL, written atomically): a header line (kind "spmd-baseline", checkpoint and prompt-set
fingerprints, settings, versions), then per prompt: id, prompt, prompt_token_ids, completion,
completion_token_ids (EOS included when reached), token_logprobs, and per generated position topk_ids /
topk_logprobs (log-softmax of the logits that chose the token, in float32). `--batch-size 1` (default)
runs each prompt alone (no padding); larger batches are left-padded (faster, e.g. on a GPU).
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
from pathlib import Path

import torch

from spmd.config import UsageError
from spmd.obs.metadata import git_commit, versions
from spmd.runtime.prompts import write_jsonl
from spmd.weights.fp8_cast import needs_cast
from spmd.runtime.score import FORMAT, KIND, BaselineError, checkpoint_fingerprint, file_sha256, \
    prompts_fingerprint, read_baseline

ROOT = Path(__file__).resolve().parents[1]


@torch.inference_mode()
def greedy_with_topk(model, prompts: list[list[int]], n_new: int, k: int, eos_id: int,
                     batch_size: int = 1) -> list[dict]:
    """Per prompt: completion ids (cut after EOS), the log-prob of each, and the top-k ids/log-probs per position."""
    out = []
    for b in range(0, len(prompts), batch_size):
        chunk = prompts[b:b + batch_size]
        width = max(len(p) for p in chunk)
        x = torch.tensor([[eos_id] * (width - len(p)) + p for p in chunk], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
        y = model.generate(x, attention_mask=mask, max_new_tokens=n_new, do_sample=False, eos_token_id=eos_id,
                           pad_token_id=eos_id, output_logits=True, return_dict_in_generate=True)
        lp = torch.log_softmax(torch.stack(y.logits, dim=1).float(), dim=-1)  # (B, steps, V)
        top = lp.topk(k, dim=-1)
        for r in range(len(chunk)):
            ids = y.sequences[r, width:].tolist()
            n = ids.index(eos_id) + 1 if eos_id in ids else len(ids)
            out.append({"completion_token_ids": ids[:n],
                        "token_logprobs": lp[r, torch.arange(n), y.sequences[r, width:width + n]].tolist(),
                        "topk_ids": top.indices[r, :n].tolist(), "topk_logprobs": top.values[r, :n].tolist()})
    return out


def header(args, n_prompts: int, prompt_pairs: list[tuple[str, str]], eos_id: int, device_name: str) -> dict:
    """The baseline's first line: what it was made from and how."""
    return {"kind": KIND, "format": FORMAT, "engine": "transformers", "checkpoint": str(args.checkpoint),
            "checkpoint_sha256": checkpoint_fingerprint(args.checkpoint), "prompts": str(args.prompts),
            "prompts_sha256": prompts_fingerprint(prompt_pairs), "n_prompts": n_prompts, "chat": args.chat,
            "max_new_tokens": args.max_new_tokens, "top_k": args.top_k, "dtype": args.dtype,
            "device": args.device, "device_name": device_name, "batch_size": args.batch_size,
            "eos_token_id": eos_id, "decoding": "greedy", "versions": versions(("torch", "transformers")),
            "git_commit": git_commit(),
            # FP8 weights transformers cannot dequantize itself: read by spmd.weights.fp8_cast.exact_partial_blocks
            "fp8_weights_cast_by_spmd": len(needs_cast(args.checkpoint)),
            # FP8 GEMM inputs rounded through e4m3 per 1 x 128, as --fp8-prefill w8a8 (validation/act_quant.py)
            "act_quant": bool(getattr(args, "act_quant", False)),
            # the weights held in bf16, float32 arithmetic: the float32 model's numbers where they are exact
            "weights_held": "bf16" if getattr(args, "lean", False) else args.dtype,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def _check_checkpoint(ckpt: Path) -> None:
    if not (Path(ckpt) / "config.json").is_file():
        raise BaselineError(f"checkpoint {ckpt} has no config.json")


def load_model(args):
    """The transformers model the command line asks for (dtype, lean, device, threads, act-quant)."""
    from transformers.utils import logging as hf_logging

    from spmd.config import ModelArgs
    from validation.reference import load_hf

    _check_checkpoint(args.checkpoint)
    hf_logging.disable_progress_bar()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.lean:  # float32 arithmetic over bf16-held weights (validation.reference.compute_in_fp32)
        from validation.reference import load_hf_fp32_lean
        model = load_hf_fp32_lean(args.checkpoint, args.device, log=False)
    else:
        model = load_hf(args.checkpoint, args.dtype, args.device, log=False)
    if args.act_quant:  # the FP8-activation recipe of --fp8-prefill w8a8 (validation/act_quant.py)
        from validation.act_quant import fake_quantize
        if not fake_quantize(model, args.checkpoint, ModelArgs.from_checkpoint(args.checkpoint).scale_fmt == "ue8m0"):
            raise BaselineError(f"--act-quant: checkpoint {args.checkpoint} has no FP8 linear layers")
    return model


@torch.inference_mode()
def teacher_forced(model, rows: list[dict], k: int) -> list[dict]:
    """Per baseline row: the model's numbers at the positions that predict its completion, fed prompt +
    completion (each prompt alone), as the SPMD program's --score computes them."""
    from spmd.runtime.generate import position_numbers

    out = []
    for r in rows:
        prompt, target = r["prompt_token_ids"], r["completion_token_ids"]
        x = torch.tensor([prompt + target[:-1]], device=model.device)
        logits = model(x, attention_mask=torch.ones_like(x)).logits[0, len(prompt) - 1:]
        out.append(position_numbers(logits, target, r["topk_ids"], k))
    return out


def score_of(args) -> list[dict]:
    """--score-of: run-format rows (id, prompt, empty completion, score) of this model scoring the baseline."""
    header, rows = read_baseline(args.score_of)
    if header is None:
        raise BaselineError(f"--score-of {args.score_of}: a text baseline has no tokens to score")
    _check_checkpoint(args.checkpoint)
    if header["checkpoint_sha256"] != checkpoint_fingerprint(args.checkpoint):
        raise BaselineError(f"--score-of {args.score_of} was made from checkpoint {header.get('checkpoint')}, "
                            f"not {args.checkpoint}")
    model = load_model(args)
    meta = {"checkpoint_sha256": header["checkpoint_sha256"], "baseline_sha256": file_sha256(args.score_of),
            "engine": "transformers", "dtype": args.dtype, "lean": args.lean, "act_quant": args.act_quant}
    return [{"id": r["id"], "prompt": r["prompt"], "completion": "", "completion_token_ids": [],
             "score": {**meta, **nums}} for r, nums in zip(rows, teacher_forced(model, rows, int(header["top_k"])))]


def make_baseline(args) -> list[dict]:
    """The baseline's lines (header first) for the parsed command line."""
    from spmd.runtime import prompts as prompt_io

    from spmd.config import ModelArgs

    _check_checkpoint(args.checkpoint)
    eos = ModelArgs.from_checkpoint(args.checkpoint).eos_token_id
    prompts = prompt_io.read_prompts(args.prompts)
    tokenizer = prompt_io.load_tokenizer(args.checkpoint)
    ids = prompt_io.encode(tokenizer, prompts, args.chat)
    model = load_model(args)
    rows = greedy_with_topk(model, ids, args.max_new_tokens, args.top_k, eos, args.batch_size)
    name = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else platform.processor() or "cpu"
    head = header(args, len(prompts), [(p.id, p.text) for p in prompts], eos, name)
    return [head] + [{"id": p.id, "prompt": p.text, "prompt_token_ids": t,
                      "completion": prompt_io.decode(tokenizer, r["completion_token_ids"]), **r}
                     for p, t, r in zip(prompts, ids, rows)]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m validation.baseline", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--prompts", type=Path, help="the prompt set (required unless --score-of)")
    p.add_argument("--score-of", type=Path, default=None, metavar="BASELINE",
                   help="score this baseline's tokens teacher-forced (no generation): the run format of --score")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per generate call (1: no padding)")
    p.add_argument("--no-chat-template", dest="chat", action="store_false")
    p.add_argument("--act-quant", action="store_true", help="quantize the FP8 layers' inputs per 1 x 128 as the "
                   "engine's --fp8-prefill w8a8 does (the reference for its validation rows)")
    p.add_argument("--lean", action="store_true", help="with --dtype fp32: hold the weights in bf16 and "
                   "compute in float32 (half the memory; refused unless every weight is exact in bf16: bf16 or "
                   "UE8M0 FP8 checkpoints)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for building the model (dequantizing "
                   "FP8, fusing experts); 0: torch's default (OMP_NUM_THREADS, 1 under launch/env.sh)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.lean and args.dtype != "fp32":
        print("error: --lean is float32 arithmetic over bf16-held weights: it needs --dtype fp32", file=sys.stderr)
        return 2
    if min(args.max_new_tokens, args.top_k, args.batch_size) < 1 or args.threads < 0:
        print("error: --max-new-tokens, --top-k and --batch-size must be >= 1, --threads >= 0", file=sys.stderr)
        return 2
    if args.prompts is None and args.score_of is None:
        print("error: --prompts is required (unless --score-of)", file=sys.stderr)
        return 2
    try:
        lines = score_of(args) if args.score_of is not None else make_baseline(args)
    except (UsageError, BaselineError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_jsonl(args.out, lines)
    if args.score_of is not None:
        print(f"wrote {args.out}: scores of {len(lines)} prompts of {args.score_of} ({args.dtype}"
              f"{', lean' if args.lean else ''}{', FP8 activations' if args.act_quant else ''})")
        return 0
    n_tok = sum(len(r["completion_token_ids"]) for r in lines[1:])
    print(f"wrote {args.out}: {len(lines) - 1} prompts, {n_tok} tokens, top-{args.top_k}, {args.dtype} on "
          f"{lines[0]['device_name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
