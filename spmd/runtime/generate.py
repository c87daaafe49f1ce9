"""Prefill / decode / generate on token ids, for any engine that implements `Stepper`.

Greedy (temperature 0) or seeded sampling: each prompt draws from its own generator seeded with its
request's seed (default `--seed + prompt index`), so a prompt's tokens do not depend on which batch,
slot or replica served it, and every rank of a model group (same logits, same generator) picks the same
token. `generate` runs one static batch; spmd.runtime.scheduler runs continuous batching on the same
`sample` and `ended`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch

from spmd.runtime.records import Result, Sampling, WorkItem


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


def settings(item: WorkItem, cfg: GenConfig) -> Sampling:
    """The item's own settings, or the run's (seed: --seed + the item's index)."""
    if item.sampling is not None:
        return item.sampling
    return Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed + item.index)


def generators(rows: list[Sampling]) -> list[torch.Generator | None]:
    """One CPU generator per sampled row, seeded with its request's seed: a request's draws depend on
    nothing else (batch, slot, neighbours, layout); greedy rows get None."""
    return [torch.Generator().manual_seed(r.seed) if r.temperature > 0 else None for r in rows]


def sample(logits: torch.Tensor, rows: list[Sampling], gens: list[torch.Generator | None]) -> list[int]:
    """(>= R, V) logits → R next ids: argmax for greedy rows; for sampled rows, top-p sampling at their
    temperature by inverse CDF of one uniform drawn from the row's own generator (one batched kernel)."""
    logits = logits[:len(rows)]
    out = logits.argmax(dim=-1).tolist()
    picked = [r for r, s in enumerate(rows) if s.temperature > 0]
    if not picked:
        return out
    dev = logits.device
    temp = torch.tensor([rows[r].temperature for r in picked], device=dev)[:, None]
    probs = torch.softmax(logits[picked].float() / temp, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    top_p = torch.tensor([rows[r].top_p for r in picked], device=dev)[:, None]
    drop = (sorted_p.cumsum(-1) - sorted_p > top_p) & (top_p < 1.0)  # keep the smallest prefix reaching top_p
    cum = sorted_p.masked_fill(drop, 0.0).cumsum(-1)
    u = torch.tensor([torch.rand(1, generator=gens[r]).item() for r in picked], device=dev)
    at = torch.searchsorted(cum, (u * cum[:, -1])[:, None]).clamp(max=cum.shape[1] - 1)
    for r, tok in zip(picked, order.gather(1, at)[:, 0].tolist()):
        out[r] = tok
    return out


def ended(tokens: list[int], row: Sampling, eos_id: int, stop_hit=None) -> str:
    """Why a row ends after its last token: "stop" (EOS, unless ignore_eos; a stop string), "length"
    (its max new tokens), or "" (it goes on). stop_hit(tokens, stops): spmd.runtime.prompts.StopStrings.hit."""
    if tokens[-1] == eos_id and not row.ignore_eos:
        return "stop"
    if row.stop and stop_hit is not None and stop_hit(tokens, row.stop):
        return "stop"
    return "length" if len(tokens) >= row.max_new_tokens else ""


def generate(stepper: Stepper, batch: list[WorkItem], cfg: GenConfig, timers=None, stop_hit=None,
             stats: dict | None = None) -> list[Result]:
    """Generate for a static batch of work items; one Result per row, in batch order.

    ttft_s: batch start → first token of the row; latency_s: batch start → the row's last token. A row
    ends as `ended` says; the batch runs until its last row ends (finished rows are fed pads). stats
    (optional): decode_steps and slot_steps (steps × rows) are added to it.
    """
    t0 = time.perf_counter()
    rows = [settings(it, cfg) for it in batch]
    tokens, mask = left_pad([it.ids for it in batch], cfg.pad_id, stepper.device)
    gens = generators(rows)
    _phase(timers, "prefill", 0)
    nxt = sample(stepper.prefill(tokens, mask), rows, gens)
    ttft = time.perf_counter() - t0
    out: list[list[int]] = [[] for _ in batch]
    finish, why = [0.0] * len(batch), [""] * len(batch)
    step = 0
    while True:
        now = time.perf_counter() - t0
        for r, tok in enumerate(nxt):
            if not why[r]:
                out[r].append(tok)
                why[r] = ended(out[r], rows[r], cfg.eos_id, stop_hit)
                finish[r] = now
        if all(why):
            break
        step += 1
        _phase(timers, "decode", step)
        feed = torch.tensor([cfg.pad_id if why[r] else t for r, t in enumerate(nxt)], device=stepper.device)
        nxt = sample(stepper.decode(feed), rows, gens)
    stepper.release()
    _phase(timers, "other", -1)  # what follows (dispatch, gather) is no step: the watchdog stops timing
    if stats is not None:
        stats["decode_steps"] = stats.get("decode_steps", 0) + step
        stats["slot_steps"] = stats.get("slot_steps", 0) + step * len(batch)
    return [Result(it.index, o, ttft, f, finish_reason=w) for it, o, f, w in zip(batch, out, finish, why)]


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
            out[r] = position_numbers(logits[b, first:first + len(it.target)], it.target, it.support, k)
        del logits
    return out


def score_forwards(batch: list[WorkItem]) -> int:
    """How many forwards `score` runs for batch."""
    return len(_similar_lengths([len(it.ids) + len(it.target) - 1 for it in batch]))


def _similar_lengths(lengths: list[int]) -> list[list[int]]:
    """Row indices, longest first, cut where a row is under half as long as its chunk's first."""
    chunks: list[list[int]] = []
    for r in sorted(range(len(lengths)), key=lambda r: (-lengths[r], r)):
        if not chunks or 2 * lengths[r] < lengths[chunks[-1][0]]:
            chunks.append([])
        chunks[-1].append(r)
    return chunks


def position_numbers(logits: torch.Tensor, target: list[int], support: list[list[int]], k: int) -> dict:
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

