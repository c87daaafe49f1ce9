"""Prefill / decode / generate on token ids, for any engine that implements `Stepper`.

Greedy (temperature 0) or seeded sampling: each prompt draws from its own generator seeded with
`seed + prompt index`, so a prompt's tokens do not depend on which batch or replica served it, and
every rank of a model group (same logits, same generator) picks the same token.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch

from spmd.runtime.records import Result, WorkItem


@dataclass(frozen=True)
class GenConfig:
    max_new_tokens: int
    eos_id: int
    pad_id: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


class Stepper(Protocol):
    """What an engine provides: one forward over a padded batch, then one token per row per step."""

    device: torch.device

    def prefill(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) left-padded ids and (B, T) bool mask → (B, V) float32 logits at the last position."""

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) ids → (B, V) float32 logits; appends to the cache made by prefill."""

    def release(self) -> None:
        """Drop the batch's KV cache."""

    def close(self) -> None:
        """End of the run, before the process groups are destroyed (e.g. captured CUDA graphs go)."""

    def score(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) left-padded ids and mask → (B, T, V) float32 logits at every position; no cache kept."""


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids with pads on the left, and the (B, T) bool mask of real tokens."""
    t = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, t - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, t - len(s):] = True
    return tokens.to(device), mask.to(device)


def sample(logits: torch.Tensor, cfg: GenConfig, gens: list[torch.Generator] | None) -> torch.Tensor:
    """(B, V) logits → (B,) next ids: argmax, or top-p sampling with one generator per row."""
    if cfg.temperature == 0 or gens is None:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > cfg.top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(gens)])


def _generators(indices: list[int], cfg: GenConfig, device) -> list[torch.Generator] | None:
    if cfg.temperature == 0:
        return None
    return [torch.Generator(device=device).manual_seed(cfg.seed + i) for i in indices]


def generate(stepper: Stepper, batch: list[WorkItem], cfg: GenConfig, timers=None) -> list[Result]:
    """Generate for a batch of work items; one Result per row, in batch order.

    ttft_s: batch start → first token of the row; latency_s: batch start → the row's last token.
    A row stops after EOS (included in its tokens) or max_new_tokens.
    """
    t0 = time.perf_counter()
    indices = [it.index for it in batch]
    tokens, mask = left_pad([it.ids for it in batch], cfg.pad_id, stepper.device)
    gens = _generators(indices, cfg, stepper.device)
    _phase(timers, "prefill", 0)
    nxt = sample(stepper.prefill(tokens, mask), cfg, gens).tolist()
    ttft = time.perf_counter() - t0
    out: list[list[int]] = [[] for _ in batch]
    finish = [0.0] * len(batch)
    for step in range(cfg.max_new_tokens):
        now = time.perf_counter() - t0
        for r, tok in enumerate(nxt):
            if not finish[r]:
                out[r].append(tok)
                if tok == cfg.eos_id or len(out[r]) == cfg.max_new_tokens:
                    finish[r] = now
        if all(finish):
            break
        _phase(timers, "decode", step + 1)
        feed = torch.tensor([cfg.pad_id if finish[r] else t for r, t in enumerate(nxt)], device=stepper.device)
        nxt = sample(stepper.decode(feed), cfg, gens).tolist()
    stepper.release()
    _phase(timers, "other", -1)  # what follows (dispatch, gather) is no step: the watchdog stops timing
    return [Result(i, o, ttft, f) for i, o, f in zip(indices, out, finish)]


@torch.inference_mode()
def score(stepper: Stepper, batch: list[WorkItem], k: int, timers=None) -> list[dict]:
    """Teacher-forced scoring: prompt + target ids through the model; per target position the run's numbers.

    batch: work items with their target ids and support ids (one list per target position). Per row:
    target_logprob (the run's log-prob of each target id), top1, topk_ids/topk_logprobs (the run's own
    top k) and support_logprobs (the run's log-probs of the support ids), in batch order. Rows of similar
    length share a forward (little padding); each (B, T, V) logits tensor is reduced here and dropped.
    """
    _phase(timers, "other", -1)
    seqs = [list(it.ids) + list(it.target[:-1]) for it in batch]  # the last target is predicted, never fed
    out: list[dict] = [{} for _ in batch]
    for chunk in _similar_lengths([len(s) for s in seqs]):
        tokens, mask = left_pad([seqs[r] for r in chunk], 0, stepper.device)
        logits = stepper.score(tokens, mask)  # (B, T, V) float32
        for b, r in enumerate(chunk):
            it = batch[r]
            first = tokens.shape[1] - len(seqs[r]) + len(it.ids) - 1  # the position that predicts target[0]
            out[r] = _position_numbers(logits[b, first:first + len(it.target)], it.target, it.support, k)
        del logits
    return out


def _similar_lengths(lengths: list[int]) -> list[list[int]]:
    """Row indices, longest first, cut where a row is under half as long as its chunk's first."""
    chunks: list[list[int]] = []
    for r in sorted(range(len(lengths)), key=lambda r: (-lengths[r], r)):
        if not chunks or 2 * lengths[r] < lengths[chunks[-1][0]]:
            chunks.append([])
        chunks[-1].append(r)
    return chunks


def _position_numbers(logits: torch.Tensor, target: list[int], support: list[list[int]], k: int) -> dict:
    """(n, V) logits of the positions that predict `target` → the run's numbers at those positions."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # (n, V)
    top = lp.topk(k, dim=-1)
    ids = torch.tensor(target, device=lp.device)[:, None]
    sup = torch.tensor(support, dtype=torch.long, device=lp.device)  # (n, k_baseline)
    return {"target_logprob": lp.gather(1, ids)[:, 0].tolist(), "top1": top.indices[:, 0].tolist(),
            "topk_ids": top.indices.tolist(), "topk_logprobs": top.values.tolist(),
            "support_logprobs": lp.gather(1, sup).tolist()}


def _phase(timers, phase: str, step: int) -> None:
    if timers is not None:
        timers.set_phase(phase, step)

