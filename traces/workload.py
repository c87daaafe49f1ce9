"""A seeded chat-like workload: prompts whose input and output lengths follow production chat traffic.

    python -m traces.workload --n 2000 --seed 0 --checkpoint CKPT --out inputs/prompts/chat2000.jsonl
        [--input-median 1020 --input-sigma 0.99 --min-input 50 --max-input 4000]
        [--output-median 129 --output-sigma 0.86 --min-output 20 --max-output 1000]
        [--fixed-input N --fixed-output M] [--id-prefix chat]

Lengths are log-normal, clipped to a range: tokens = clip(round(median * exp(sigma * z)), lo, hi), z ~ N(0, 1).
The defaults match the conversation trace of the Azure LLM inference trace 2023 (Patel et al., "Splitwise:
Efficient generative LLM inference using phase splitting", ISCA 2024; data: github.com/Azure/AzurePublicDataset,
`data/AzureLLMInferenceTrace_conv.csv`, 19,366 requests, CC-BY). Computed here from that file:
ContextTokens median 1,020 (mean 1,155, p95 4,083), GeneratedTokens median 129 (mean 211, p95 451);
sigma = the standard deviation of ln(tokens) over the trace: 0.99 (input), 0.86 (output). The trace is not
log-normal (it has modes at ~4,080 input and ~400 output tokens), so the model keeps its median and log-spread,
not its shape: clipped to 50-4,000 / 20-1,000 the draws have mean ~1,420 / ~185 and p95 4,000 / ~530
(the clipped trace: 1,138 / 211 and 4,000 / 451).

Each prompt is text that the checkpoint's tokenizer, raw (no chat template, BOS included, as
`--no-chat-template` encodes it), turns into exactly its drawn input length, and carries its drawn output
length as `max_new_tokens` with `"ignore_eos": true` (decode to that length, as vLLM's throughput benchmark
does). The text is random words of the vocabulary: tokens that decode to a lone word (" word") and encode
back to that one token, so a prompt of n words is n tokens; every count is checked, and a prompt that is off
(another tokenizer) is trimmed or extended until it is exact. Draws use separate streams for inputs, outputs
and each prompt's text, so the first N prompts of a set of 2,000 are the set of N.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SOURCE = ("Azure LLM inference trace 2023, conversation (Splitwise, ISCA 2024): "
          "github.com/Azure/AzurePublicDataset data/AzureLLMInferenceTrace_conv.csv")


@dataclass(frozen=True)
class LengthDist:
    """A log-normal length distribution clipped to [lo, hi]; fixed > 0 makes every length `fixed`."""

    median: float
    sigma: float
    lo: int
    hi: int
    fixed: int = 0


INPUT = LengthDist(median=1020, sigma=0.99, lo=50, hi=4000)    # Azure conversation trace: ContextTokens
OUTPUT = LengthDist(median=129, sigma=0.86, lo=20, hi=1000)    # GeneratedTokens


def draw(dist: LengthDist, n: int, rng: np.random.Generator) -> np.ndarray:
    """n integer lengths from `dist` (z drawn even when fixed, so the stream does not depend on it)."""
    z = rng.standard_normal(n)
    if dist.fixed:
        return np.full(n, dist.fixed, dtype=np.int64)
    return np.clip(np.rint(dist.median * np.exp(dist.sigma * z)), dist.lo, dist.hi).astype(np.int64)


def draw_lengths(n: int, seed: int, inp: LengthDist = INPUT, out: LengthDist = OUTPUT) -> tuple[np.ndarray, np.ndarray]:
    """(input lengths, output lengths) of n requests; each from its own stream, so prefixes are stable."""
    return (draw(inp, n, np.random.default_rng([seed, 0])), draw(out, n, np.random.default_rng([seed, 1])))


class PromptMaker:
    """Texts of an exact token count under one tokenizer (raw encoding, special tokens included)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.special = len(tokenizer("a")["input_ids"]) - len(tokenizer("a", add_special_tokens=False)["input_ids"])
        self.words, self.heads = self._vocabulary()
        if len(self.words) < 16 or not self.heads:
            raise ValueError(f"the tokenizer has {len(self.words)} one-token ' word' pieces and {len(self.heads)} "
                             f"one-token leading words: too few to build prompts")

    def _vocabulary(self) -> tuple[list[str], list[str]]:
        """Strings that decode from, and encode back to, exactly one token: ' word' and (first) 'word'."""
        special = set(self.tok.all_special_ids)
        ids = [i for i in range(len(self.tok)) if i not in special]
        texts = [self.tok.decode([i]) for i in ids]
        spaced = [t for t in texts if re.fullmatch(r" [A-Za-z]{2,}", t)]
        bare = [t for t in texts if re.fullmatch(r"[A-Za-z]{2,}", t)]
        return self._one_token(spaced), self._one_token(bare)

    def _one_token(self, texts: list[str]) -> list[str]:
        if not texts:
            return []
        enc = self.tok(texts, add_special_tokens=False)["input_ids"]
        return sorted(t for t, e in zip(texts, enc) if len(e) == 1)

    def count(self, texts: list[str]) -> list[int]:
        """Token counts as the program's raw encoding gives them (BOS included)."""
        return [len(x) for x in self.tok(texts)["input_ids"]]

    def draft(self, n_tokens: int, rng: np.random.Generator) -> str:
        """A text of n_tokens under the one-token-per-word construction (checked by `exact`)."""
        body = n_tokens - self.special
        if body < 1:
            raise ValueError(f"a prompt of {n_tokens} tokens leaves no room for text after "
                             f"{self.special} special token(s)")
        head = self.heads[rng.integers(len(self.heads))]
        return head + "".join(self.words[i] for i in rng.integers(len(self.words), size=body - 1))

    def exact(self, text: str, n_tokens: int, rng: np.random.Generator, tries: int = 20) -> str:
        """`text` trimmed or extended (more words) until it encodes to exactly n_tokens."""
        for _ in range(tries):
            have = self.count([text])[0]
            if have == n_tokens:
                return text
            if have > n_tokens:
                ids = self.tok(text, add_special_tokens=False)["input_ids"][:n_tokens - self.special]
                text = self.tok.decode(ids)
            else:
                text += "".join(self.words[i] for i in rng.integers(len(self.words), size=n_tokens - have))
        raise ValueError(f"no text of exactly {n_tokens} tokens after {tries} tries (last: {self.count([text])[0]})")


def make_texts(maker: PromptMaker, lengths: np.ndarray, seed: int) -> list[str]:
    """One text per length, each from its own stream (seed, 2, index); every count verified."""
    rngs = [np.random.default_rng([seed, 2, i]) for i in range(len(lengths))]
    texts = [maker.draft(int(n), r) for n, r in zip(lengths, rngs)]
    for i, have in enumerate(maker.count(texts)):
        if have != lengths[i]:
            texts[i] = maker.exact(texts[i], int(lengths[i]), rngs[i])
    return texts


def rows(texts: list[str], outputs: np.ndarray, prefix: str = "chat") -> list[dict]:
    """The JSONL objects: id, prompt, the request's max_new_tokens, ignore_eos."""
    return [{"id": f"{prefix}-{i + 1:05d}", "prompt": t, "max_new_tokens": int(m), "ignore_eos": True}
            for i, (t, m) in enumerate(zip(texts, outputs))]


def stats(x: np.ndarray) -> dict:
    return {"mean": float(np.mean(x)), "p50": float(np.percentile(x, 50)), "p95": float(np.percentile(x, 95)),
            "min": int(np.min(x)), "max": int(np.max(x)), "sum": int(np.sum(x))}


def summary_line(inputs: np.ndarray, outputs: np.ndarray) -> str:
    i, o = stats(inputs), stats(outputs)
    return (f"{len(inputs)} prompts: input tokens mean {i['mean']:.0f} p50 {i['p50']:.0f} p95 {i['p95']:.0f} "
            f"(range {i['min']}-{i['max']}); output tokens mean {o['mean']:.0f} p50 {o['p50']:.0f} "
            f"p95 {o['p95']:.0f} (range {o['min']}-{o['max']})")


def write(out: Path, objs: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in objs), encoding="utf-8")
    tmp.replace(out)


def generate(checkpoint: Path, n: int, seed: int, out: Path, inp: LengthDist = INPUT, outp: LengthDist = OUTPUT,
             prefix: str = "chat") -> dict:
    """Draw, build and verify n prompts, write them to `out`; returns the distribution's numbers."""
    from spmd.config import ModelArgs
    from spmd.runtime.prompts import load_tokenizer

    inputs, outputs = draw_lengths(n, seed, inp, outp)
    ctx = ModelArgs.from_checkpoint(checkpoint).max_seq_len
    if int((inputs + outputs).max()) > ctx:
        raise ValueError(f"input + output reaches {int((inputs + outputs).max())} tokens > the model's context "
                         f"of {ctx} ({checkpoint}): lower --max-input/--max-output")
    texts = make_texts(PromptMaker(load_tokenizer(checkpoint)), inputs, seed)
    write(out, rows(texts, outputs, prefix))
    return {"n": n, "seed": seed, "input": {**inp.__dict__, **stats(inputs)},
            "output": {**outp.__dict__, **stats(outputs)}, "source": SOURCE, "summary": summary_line(inputs, outputs)}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", type=Path, required=True, help="its tokenizer counts the tokens")
    p.add_argument("--out", type=Path, required=True, help="prompts JSONL")
    p.add_argument("--id-prefix", default="chat")
    for side, d in (("input", INPUT), ("output", OUTPUT)):
        p.add_argument(f"--{side}-median", type=float, default=d.median)
        p.add_argument(f"--{side}-sigma", type=float, default=d.sigma, help="of ln(tokens)")
        p.add_argument(f"--min-{side}", type=int, default=d.lo)
        p.add_argument(f"--max-{side}", type=int, default=d.hi)
        p.add_argument(f"--fixed-{side}", type=int, default=0, help="every request this many tokens")
    a = p.parse_args(argv)
    for side in ("input", "output"):
        lo, hi = getattr(a, f"min_{side}"), getattr(a, f"max_{side}")
        if not 1 <= lo <= hi:
            p.error(f"--min-{side}={lo} --max-{side}={hi}: need 1 <= min <= max")
    if a.n < 1:
        p.error(f"--n={a.n} must be >= 1")
    return a


def dists(a: argparse.Namespace) -> tuple[LengthDist, LengthDist]:
    return tuple(LengthDist(getattr(a, f"{s}_median"), getattr(a, f"{s}_sigma"), getattr(a, f"min_{s}"),
                            getattr(a, f"max_{s}"), getattr(a, f"fixed_{s}")) for s in ("input", "output"))


def main(argv=None) -> int:
    a = parse(argv)
    inp, outp = dists(a)
    try:
        info = generate(a.checkpoint, a.n, a.seed, a.out, inp, outp, a.id_prefix)
    except ValueError as exc:
        print(f"workload: {exc}", file=sys.stderr)
        return 2
    print(f"workload (seed {a.seed}): {info['summary']} -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
