"""Compare a run's outputs with a baseline: tokens, teacher-forced scores, KL; thresholds per precision.

    python -m validation.compare RUN_OUTPUT BASELINE [--precision fp32|bf16|fp8] [--report DIR]
        [--checkpoint DIR] [--tokenizer DIR] [--recipe RECIPE_SCORES]

Token baseline (from `validation.baseline`), per prompt: exact token match, first divergence (the index
of the first differing token; an identical prompt counts its length), and from the run's `score`
(`--score BASELINE` in the SPMD program, teacher-forced on the baseline's tokens, so one early
divergence does not cascade): top-1 agreement (the run's argmax equals the baseline token), max
|Δ log-prob| of the baseline token, and KL(baseline ‖ run) per position.

KL approximation: the baseline stores only its top-k log-probs, so both distributions are coarse-grained
to k + 1 outcomes, the baseline's top-k ids plus one bucket for all other ids (baseline: 1 − Σ top-k;
run: 1 − Σ of its probabilities of those k ids). Coarse-graining never increases KL (data-processing
inequality), so the figure is a lower bound of the full KL, tight when the bucket holds little mass
or both models spread it alike.

Text baseline ({id, completion} rows, e.g. another system's outputs): exact text match and common
prefix length in characters, and in tokens with `--tokenizer DIR`.

Recipe-relative thresholds (`--recipe`): where the run follows a numerical recipe that is meant to move
the outputs (FP8 activations, `--fp8-prefill w8a8`), RECIPE_SCORES is the baseline's own model with that
recipe, teacher-forced on the baseline's tokens (`python -m validation.baseline --score-of BASELINE
--act-quant`). Its distance from the baseline is added to the precision's allowance: top-1 agreement at
least min_top1 - (1 - recipe's), KL mean and max at most the bound plus the recipe's (small, independent
perturbations: their KLs add to first order, their top-1 misses at most add). The run may then be as far
from the baseline as the recipe in fp32 is, plus what its own precision costs: no further.

A baseline of another checkpoint or prompt set (fingerprints, ids, order, texts) is refused, not
compared: exit 2. Thresholds failed: exit 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from spmd.runtime.score import BaselineError, check_prompt_set, checkpoint_fingerprint, file_sha256, \
    prompts_fingerprint, read_baseline


KL_NOTE = ("KL(baseline ‖ run) is computed on the baseline's top-k ids plus one bucket for the remaining mass: "
           "a lower bound of the full-vocabulary KL (coarse-graining never increases KL).")


@dataclass(frozen=True)
class Thresholds:
    """Pass bounds: None = not checked. Measured spreads and margins: README.md, Validation."""

    exact: bool                       # every prompt's greedy tokens identical to the baseline's
    min_top1: float | None            # teacher-forced top-1 agreement, pooled over all positions
    max_dlogp: float | None           # max |Δ log-prob| of the baseline token
    max_kl_mean: float | None         # mean over all positions of KL(baseline ‖ run)
    max_kl_max: float | None          # max over positions


THRESHOLDS = {
    "fp32": Thresholds(exact=True, min_top1=1.0, max_dlogp=1e-3, max_kl_mean=1e-6, max_kl_max=1e-4),
    "bf16": Thresholds(exact=False, min_top1=0.85, max_dlogp=None, max_kl_mean=0.12, max_kl_max=8.0),
    "fp8": Thresholds(exact=False, min_top1=0.80, max_dlogp=None, max_kl_mean=0.15, max_kl_max=10.0),
}


def read_run(path: Path) -> list[dict]:
    """The SPMD program's output rows."""
    try:
        rows = [json.loads(ln) for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BaselineError(f"cannot read run output {path}: {exc}") from None
    if not rows or not all(isinstance(r, dict) and "id" in r and "completion" in r for r in rows):
        raise BaselineError(f"run output {path}: expected rows with id and completion")
    return rows


def check_token_baseline(run: list[dict], header: dict, base: list[dict], baseline: Path,
                         checkpoint: Path | None) -> list[str]:
    """Refuse a baseline that does not belong to this run; returns notes on what could not be checked."""
    pairs = [(r["id"], r.get("prompt")) for r in run]
    check_prompt_set(pairs, [(b["id"], b["prompt"]) for b in base], f"run vs baseline {baseline}")
    if prompts_fingerprint(pairs) != header["prompts_sha256"]:
        raise BaselineError(f"baseline {baseline}: its rows do not match its header's prompt-set fingerprint")
    notes = []
    scored = [r["score"] for r in run if "score" in r]
    if scored:
        if {s["checkpoint_sha256"] for s in scored} != {header["checkpoint_sha256"]}:
            raise BaselineError(f"the run's checkpoint (fingerprint {scored[0]['checkpoint_sha256'][:12]}) is not "
                                f"the baseline's ({header['checkpoint_sha256'][:12]}, {header.get('checkpoint')})")
        if {s.get("baseline_sha256") for s in scored} != {file_sha256(baseline)}:
            raise BaselineError(f"the run was scored against another baseline file than {baseline}")
    if checkpoint is not None and checkpoint_fingerprint(checkpoint) != header["checkpoint_sha256"]:
        raise BaselineError(f"checkpoint {checkpoint} is not the baseline's ({header.get('checkpoint')})")
    if not scored and checkpoint is None:
        notes.append("checkpoint not verified (the run has no scores; pass --checkpoint)")
    if len(scored) not in (0, len(run)):
        raise BaselineError(f"only {len(scored)} of {len(run)} run rows have scores")
    return notes


def first_divergence(a: list, b: list) -> int | None:
    """Index of the first difference (the shorter length if one is a prefix of the other); None if equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def coarse_kl(base_topk: list[float], run_support: list[float]) -> float:
    """KL(p ‖ q) over the baseline's top-k ids plus one bucket for the rest (log-probs in, nats out)."""
    p_rest = max(-math.expm1(_logsumexp(base_topk)), 0.0)
    q_rest = max(-math.expm1(min(_logsumexp(run_support), 0.0)), 1e-12)
    kl = sum(math.exp(lp) * (lp - lq) for lp, lq in zip(base_topk, run_support))
    if p_rest > 0:
        kl += p_rest * (math.log(p_rest) - math.log(q_rest))
    return kl if math.isnan(kl) else max(kl, 0.0)


def nanmax(xs: list[float]) -> float:
    """max, but NaN if any value is NaN (Python's max depends on where the NaN is)."""
    return math.nan if any(math.isnan(x) for x in xs) else max(xs)


def _logsumexp(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def teacher_forced(score: dict, base: dict) -> dict:
    """Per-prompt teacher-forced numbers from the run's score of the baseline's tokens."""
    target, n = base["completion_token_ids"], len(base["completion_token_ids"])
    if len(score["target_logprob"]) != n:
        raise BaselineError(f"prompt {base['id']!r}: the run scored {len(score['target_logprob'])} positions, "
                            f"the baseline has {n}")
    dlogp = [abs(a - b) for a, b in zip(score["target_logprob"], base["token_logprobs"])]
    kl = [coarse_kl(p, q) for p, q in zip(base["topk_logprobs"], score["support_logprobs"])]
    agree = [int(a == b) for a, b in zip(score["top1"], target)]
    return {"positions": n, "top1_agree": sum(agree), "top1_agreement": sum(agree) / n,
            "max_abs_dlogp": nanmax(dlogp), "kl": kl, "kl_mean": sum(kl) / n, "kl_max": nanmax(kl),
            "first_top1_miss": agree.index(0) if 0 in agree else None}


def token_metrics(run: list[dict], base: list[dict]) -> list[dict]:
    """One dict per prompt: exactness, first divergence, teacher-forced numbers when the run has scores."""
    out = []
    for r, b in zip(run, base):
        a, t = r.get("completion_token_ids") or [], b["completion_token_ids"]
        m = {"id": b["id"], "n_baseline": len(t)}
        if a:  # a --score-only run generated nothing: token metrics do not apply
            div = first_divergence(a, t)
            m.update(exact=div is None, first_divergence=len(t) if div is None else div)
        if "score" in r:
            m.update(teacher_forced(r["score"], b))
        out.append(m)
    return out


def text_metrics(run: list[dict], base: list[dict], tokenizer=None) -> list[dict]:
    """One dict per prompt for a text baseline: exact text, common prefix in characters (and tokens)."""
    out = []
    for r, b in zip(run, base):
        a, t = r["completion"], b["completion"]
        m = {"id": b["id"], "exact": a == t, "prefix_chars": _prefix(a, t), "n_chars": len(t)}
        if tokenizer is not None:
            ta, tt = (tokenizer(x, add_special_tokens=False)["input_ids"] for x in (a, t))
            m.update(prefix_tokens=_prefix(ta, tt), n_tokens=len(tt))
        out.append(m)
    return out


def _prefix(a, b) -> int:
    d = first_divergence(list(a), list(b))
    return len(b) if d is None else d


def summarize(per_prompt: list[dict]) -> dict:
    """Totals over the prompts; teacher-forced figures pooled over all positions."""
    s = {"n_prompts": len(per_prompt)}
    if per_prompt and "exact" in per_prompt[0]:
        s["exact_prompts"] = sum(m["exact"] for m in per_prompt)
    if per_prompt and "first_divergence" in per_prompt[0]:
        s["mean_first_divergence"] = sum(m["first_divergence"] for m in per_prompt) / len(per_prompt)
    if per_prompt and "prefix_chars" in per_prompt[0]:
        s["mean_prefix_chars"] = sum(m["prefix_chars"] for m in per_prompt) / len(per_prompt)
        if "prefix_tokens" in per_prompt[0]:
            s["mean_prefix_tokens"] = sum(m["prefix_tokens"] for m in per_prompt) / len(per_prompt)
    if per_prompt and "kl" in per_prompt[0]:
        n = sum(m["positions"] for m in per_prompt)
        s.update(positions=n, top1_agreement=sum(m["top1_agree"] for m in per_prompt) / n,
                 max_abs_dlogp=nanmax([m["max_abs_dlogp"] for m in per_prompt]),
                 kl_mean=sum(sum(m["kl"]) for m in per_prompt) / n, kl_max=nanmax([m["kl_max"] for m in per_prompt]))
    return s


RECIPE_KEYS = ("top1_agreement", "kl_mean", "kl_max", "max_abs_dlogp")


def relative(t: Thresholds, recipe: dict) -> Thresholds:
    """t widened by a recipe's own distance from the baseline (its compare summary): see --recipe."""
    def add(bound, key):
        return None if bound is None else bound + recipe[key]
    return dataclasses.replace(t, min_top1=None if t.min_top1 is None else t.min_top1 - (1 - recipe["top1_agreement"]),
                               max_dlogp=add(t.max_dlogp, "max_abs_dlogp"), max_kl_mean=add(t.max_kl_mean, "kl_mean"),
                               max_kl_max=add(t.max_kl_max, "kl_max"))


def thresholds_for(precision: str, recipe: dict | None = None) -> tuple[str, Thresholds]:
    """(label, bounds) of a precision, recipe-relative where a recipe summary is given."""
    if recipe is None:
        return precision, THRESHOLDS[precision]
    return f"{precision}+recipe", relative(THRESHOLDS[precision], recipe)


def judge(summary: dict, precision: str, text_mode: bool = False, recipe: dict | None = None) -> list[str]:
    """The thresholds this summary fails (empty: pass); recipe: the recipe's summary (relative bounds)."""
    fails = []
    precision, t = thresholds_for(precision, recipe)
    if t.exact and summary.get("exact_prompts", summary["n_prompts"]) < summary["n_prompts"]:
        fails.append(f"{precision}: {summary['exact_prompts']}/{summary['n_prompts']} prompts identical, "
                     f"all must be")
    if text_mode:
        return fails  # another system's text: only the fp32 exact-match rule applies
    if "top1_agreement" not in summary:  # fp32 without scores: the exact-token rule alone
        return fails if t.exact else fails + [f"{precision} thresholds need the run's teacher-forced scores "
                                              f"(run the SPMD program with --score BASELINE)"]
    if t.min_top1 is not None and not summary["top1_agreement"] >= t.min_top1:
        fails.append(f"{precision}: top1_agreement = {summary['top1_agreement']:.4f} < {t.min_top1:g}")
    for key, bound in (("max_abs_dlogp", t.max_dlogp), ("kl_mean", t.max_kl_mean), ("kl_max", t.max_kl_max)):
        if bound is not None and not summary[key] <= bound:  # NaN fails too
            fails.append(f"{precision}: {key} = {summary[key]:.3g} > {bound:g}")
    return fails


def recipe_summary(recipe: Path, header: dict | None, base: list[dict], baseline: Path) -> dict:
    """The recipe scores' distance from the baseline (RECIPE_KEYS of their summary), checked to be scores
    of this baseline file."""
    if header is None:
        raise BaselineError(f"--recipe needs a token baseline; {baseline} is a text baseline")
    rows = read_run(recipe)
    check_token_baseline(rows, header, base, baseline, None)
    if "score" not in rows[0]:
        raise BaselineError(f"recipe {recipe} has no scores: make it with python -m validation.baseline "
                            f"--score-of {baseline}")
    s = summarize(token_metrics(rows, base))
    return {k: s[k] for k in RECIPE_KEYS}


def compare(run_path: Path, baseline: Path, precision: str = "fp32", checkpoint: Path | None = None,
            tokenizer: Path | None = None, recipe: Path | None = None) -> dict:
    """Everything the report needs: mode, per-prompt metrics, summary, failures, notes; with recipe (its
    scores of the baseline's tokens) the bounds are recipe-relative."""
    run = read_run(run_path)
    header, base = read_baseline(baseline)
    if header is None:
        check_prompt_set([(r["id"], "") for r in run], [(b["id"], "") for b in base], f"run vs baseline {baseline}")
        tok = _tokenizer(tokenizer) if tokenizer else None
        per, notes = text_metrics(run, base, tok), []
    else:
        notes = check_token_baseline(run, header, base, baseline, checkpoint)
        per = token_metrics(run, base)
        if "score" not in run[0]:
            notes.append("no teacher-forced numbers (the run has no scores: run with --score BASELINE)")
    summary = summarize(per)
    rec = recipe_summary(recipe, header, base, baseline) if recipe is not None else None
    fails = judge(summary, precision, text_mode=header is None, recipe=rec)
    label, bounds = thresholds_for(precision, rec)
    return {"run": str(run_path), "baseline": str(baseline), "mode": "text" if header is None else "tokens",
            "precision": label, "thresholds": asdict(bounds), "baseline_header": header,
            "recipe": None if rec is None else {"file": str(recipe), **rec},
            "per_prompt": per, "summary": summary, "failures": fails, "passed": not fails, "notes": notes}


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise BaselineError(f"cannot load the tokenizer of {path}: {exc}") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m validation.compare", description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="the SPMD program's output JSONL")
    p.add_argument("baseline", type=Path, help="validation.baseline output, or {id, completion} JSONL")
    p.add_argument("--precision", choices=tuple(THRESHOLDS), default="fp32")
    p.add_argument("--report", type=Path, default=None, help="write report.md and report.png here")
    p.add_argument("--checkpoint", type=Path, default=None, help="verify the checkpoint of an unscored run")
    p.add_argument("--tokenizer", type=Path, default=None, help="checkpoint dir: token prefixes in text mode")
    p.add_argument("--recipe", type=Path, default=None, help="the baseline's model with the run's recipe, "
                   "teacher-forced on the baseline's tokens (validation.baseline --score-of): relative bounds")
    args = p.parse_args(argv)
    try:
        result = compare(args.run, args.baseline, args.precision, args.checkpoint, args.tokenizer, args.recipe)
    except BaselineError as exc:
        print(f"error: refused: {exc}", file=sys.stderr)
        return 2
    from validation.report import summary_lines, write_report

    print("\n".join(summary_lines(result)))
    if args.report is not None:
        print(f"wrote {', '.join(str(p) for p in write_report(result, args.report))}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
