"""Skew between ranks: when each rank reached the same collective, and how long each took per step.

Matching rule: the k-th event of one (name, group, phase, step, layer) on a rank is the same collective
instance as the k-th such event on the other ranks of its model group (replica); every rank of a
group runs the same sequence of collectives. A decode step occurrence is a maximal run of a rank's
events with the same (phase, step); the k-th such run of a rank matches the k-th of its group.
Arrival skew of an instance = latest start - earliest start; the late rank is the one that started
last (the others waited for it inside the collective).
"""
from __future__ import annotations

import json

import numpy as np

from traces.table import format_table


def replica_of(ranks: dict[int, dict]) -> dict[int, int]:
    """Rank → its model group, from the rank attributes' ``world`` JSON (0 when unknown)."""
    out = {}
    for r, attrs in ranks.items():
        try:
            out[r] = int(json.loads(attrs.get("world", "{}")).get("replica", 0))
        except (TypeError, ValueError):
            out[r] = 0
    return out


def _occurrence(keys: np.ndarray, ranks: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """For each event, how many events with the same key came before it on its rank."""
    order = np.lexsort((starts, keys, ranks))
    k, r = keys[order], ranks[order]
    new = np.ones(len(order), dtype=bool)
    new[1:] = (k[1:] != k[:-1]) | (r[1:] != r[:-1])
    idx = np.arange(len(order))
    first = np.maximum.accumulate(np.where(new, idx, 0))
    occ = np.empty(len(order), dtype=np.int64)
    occ[order] = idx - first
    return occ


def collective_instances(t) -> dict:
    """Matched comm instances: name, per-instance skew (ns), late rank, number of ranks matched."""
    ev = t.events[t.events["kind"] == b"comm"]
    if not len(ev):
        return {"name": np.array([], dtype=bytes), "skew_ns": np.array([], dtype=np.int64),
                "late": np.array([], dtype=np.int64), "n": np.array([], dtype=np.int64)}
    rep = replica_of(t.ranks)
    ranks = ev["rank"].astype(np.int64)
    replica = np.array([rep.get(int(r), 0) for r in ranks], dtype=np.int64)
    fields = [ev[f].astype(bytes) for f in ("name", "group", "phase")]
    text = np.char.add(np.char.add(np.char.add(fields[0], b"\x1f"), fields[1]), np.char.add(b"\x1f", fields[2]))
    _, key = np.unique(text, return_inverse=True)
    key = key.astype(np.int64)
    occ = _occurrence(key, ranks, ev["start_ns"])
    inst_key = np.stack([replica, key, ev["step"].astype(np.int64), ev["layer"].astype(np.int64), occ], axis=1)
    _, inst = np.unique(inst_key, axis=0, return_inverse=True)
    inst = inst.ravel()
    n = inst.max() + 1
    first = np.full(n, np.iinfo(np.int64).max)
    last = np.full(n, np.iinfo(np.int64).min)
    np.minimum.at(first, inst, ev["start_ns"])
    np.maximum.at(last, inst, ev["start_ns"])
    late = np.full(n, -1, dtype=np.int64)
    is_last = ev["start_ns"] == last[inst]
    late[inst[is_last]] = ranks[is_last]
    names = np.empty(n, dtype=ev["name"].dtype)
    names[inst] = ev["name"]
    return {"name": names, "skew_ns": last - first, "late": late, "n": np.bincount(inst, minlength=n)}


def skew_section(t) -> str:
    """Per collective: instances matched on more than one rank, mean/max arrival skew, the usual late rank."""
    c = collective_instances(t)
    multi = c["n"] > 1
    rows = []
    for name in np.unique(c["name"][multi]):
        sel = multi & (c["name"] == name)
        skew = c["skew_ns"][sel] / 1e3
        lates, counts = np.unique(c["late"][sel], return_counts=True)
        top = int(np.argmax(counts))
        rows.append((skew.sum(), [name.decode(), str(sel.sum()), f"{skew.mean():.1f}", f"{np.median(skew):.1f}",
                                  f"{skew.max():.1f}", f"{lates[top]} ({100 * counts[top] / sel.sum():.0f}%)"]))
    rows.sort(key=lambda x: -x[0])
    heads = ["collective", "instances", "mean skew us", "median us", "max us", "late rank (share)"]
    return "arrival skew between ranks (start of the same collective)\n" + format_table(
        heads, [r for _, r in rows])


def step_spans(t, phase: bytes = b"decode") -> dict:
    """Per rank, the spans (ns) of its step occurrences in `phase`: {rank: (starts, ends, steps)}."""
    out = {}
    for r in sorted(t.ranks):
        ev = t.events[t.events["rank"] == r]
        ev = ev[np.argsort(ev["start_ns"], kind="stable")]
        if not len(ev):
            continue
        change = np.ones(len(ev), dtype=bool)
        change[1:] = (ev["phase"][1:] != ev["phase"][:-1]) | (ev["step"][1:] != ev["step"][:-1])
        run = np.cumsum(change) - 1
        sel = ev["phase"] == phase
        if not sel.any():
            continue
        ids, inv = np.unique(run[sel], return_inverse=True)
        starts = np.full(len(ids), np.iinfo(np.int64).max)
        ends = np.full(len(ids), np.iinfo(np.int64).min)
        np.minimum.at(starts, inv, ev["start_ns"][sel])
        np.maximum.at(ends, inv, ev["start_ns"][sel] + ev["dur_ns"][sel])
        steps = np.zeros(len(ids), dtype=np.int64)
        steps[inv] = ev["step"][sel]
        out[r] = (starts, ends, steps)
    return out


def step_section(t) -> str:
    """Decode step time per rank (mean, max) and how often each rank was the slowest of its group."""
    spans = step_spans(t)
    if not spans:
        return "decode steps per rank\n  (none)"
    rep = replica_of(t.ranks)
    slowest = {r: 0 for r in spans}
    spread = []
    for g in sorted(set(rep.get(r, 0) for r in spans)):
        members = [r for r in spans if rep.get(r, 0) == g]
        n = min(len(spans[r][0]) for r in members)
        dur = np.stack([(spans[r][1] - spans[r][0])[:n] for r in members])  # (ranks, steps)
        for i in np.argmax(dur, axis=0):
            slowest[members[i]] += 1
        spread += list((dur.max(axis=0) - dur.min(axis=0)) / 1e3)
    rows = []
    for r, (s, e, _) in spans.items():
        d = (e - s) / 1e6
        rows.append([str(r), str(len(d)), f"{d.mean():.3f}", f"{np.median(d):.3f}", f"{d.max():.3f}",
                     str(slowest[r])])
    heads = ["rank", "steps", "mean ms", "median ms", "max ms", "slowest in"]
    tail = (f"\n  step time spread between ranks of a group: mean {np.mean(spread):.1f} us, "
            f"max {np.max(spread):.1f} us" if spread else "")
    return "decode steps per rank\n" + format_table(heads, rows) + tail


SECTIONS = (skew_section, step_section)
