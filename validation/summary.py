"""The validation matrix's Markdown: one table of configurations × metrics, and what it answers."""
from __future__ import annotations

from dataclasses import asdict

from validation.compare import KL_NOTE, THRESHOLDS, thresholds_for
from validation.report import fmt, table

COLUMNS = [("config", "config"), ("weights", "weights"), ("engine", "engine"), ("layout", "layout"),
           ("dtype", "compute"), ("baseline_dtype", "baseline"), ("precision", "thresholds"),
           ("exact_prompts", "exact prompts"), ("mean_first_divergence", "mean first div."),
           ("top1_agreement", "top-1 agree"),
           ("max_abs_dlogp", "max \\|Δlogp\\|"), ("kl_mean", "KL mean"), ("kl_max", "KL max")]

EXACT = [k for k, _ in COLUMNS].index("exact_prompts")
PRECISION = [k for k, _ in COLUMNS].index("precision")


def matrix_rows(rows: list[dict]) -> list[list]:
    """Table cells per result row; exact prompts as 'n/N', pass/fail last."""
    out = []
    for r in rows:
        cells = [r.get(k) for k, _ in COLUMNS]
        if r.get("exact_prompts") is not None:
            cells[EXACT] = f"{r['exact_prompts']}/{r['n_prompts']}"
        if r.get("recipe"):
            cells[PRECISION] = thresholds_for(r["precision"], r["recipe"])[0]
        out.append(cells + ["pass" if r["passed"] else "**FAIL**"])
    return out


def _range(rows: list[dict], key: str) -> str:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return "—"
    lo, hi = min(vals), max(vals)
    return fmt(lo) if lo == hi else f"{fmt(lo)}–{fmt(hi)}"


def answers(doc: dict) -> list[str]:
    """Plain answers: does sharding change the outputs, does precision, and by how much."""
    rows = [r for r in doc["rows"] if "top1_agreement" in r]
    fp32 = [r for r in rows if r["dtype"] == "fp32"]
    lines = []
    if fp32:
        same = sum(r.get("exact_prompts") == r["n_prompts"] for r in fp32)
        lines.append(f"- **Sharding, fp32**: {same} of {len(fp32)} fp32 configurations (every engine, layout and "
                     f"weight format) give the baseline's tokens on every prompt; teacher-forced top-1 agreement "
                     f"{_range(fp32, 'top1_agreement')}, max |Δlogp| {_range(fp32, 'max_abs_dlogp')}, KL max "
                     f"{_range(fp32, 'kl_max')} nats: sharding changes the outputs only at float32 rounding.")
    for prec in ("bf16", "fp8"):
        low = [r for r in rows if r["precision"] == prec]
        if low:
            lines.append(f"- **Precision, {prec}** ({len(low)} configurations): exact prompts "
                         f"{_range(low, 'exact_prompts')} of {low[0]['n_prompts']}, mean first divergence "
                         f"{_range(low, 'mean_first_divergence')} tokens, top-1 agreement "
                         f"{_range(low, 'top1_agreement')}, KL mean {_range(low, 'kl_mean')} (max "
                         f"{_range(low, 'kl_max')}) nats.")
    for g in doc.get("layout_agreement", []):
        if g["dtype"] != "fp32":
            lines.append(f"- Across layouts {', '.join(g['layouts'])} ({g['config']}-{g['weights']}, {g['engine']}, "
                         f"{g['dtype']}): {g['identical_prompts']}/{g['n_prompts']} prompts have the same tokens "
                         f"in every layout.")
    return lines


def matrix_markdown(doc: dict) -> str:
    """The result file's Markdown."""
    rows = doc["rows"]
    n_pass, n = sum(r["passed"] for r in rows), next((r["n_prompts"] for r in rows if "n_prompts" in r), "?")
    lines = [f"# Validation matrix: {doc['machine']}, {doc['date']}", "",
             f"{n_pass}/{len(rows)} configurations pass. {doc['device']}, {n} prompts "
             f"({doc['prompts']}), {doc['max_new_tokens']} new tokens, greedy, "
             + (f"batches of {doc['batch_size']}, " if doc.get("batch_size") else "")
             + "teacher-forced scoring of the baseline's tokens. Baselines (transformers, one process): "
             + ", ".join(f"{k} {v['dtype']}" for k, v in doc["baselines"].items()) + ".", ""]
    lines += table([t for _, t in COLUMNS] + ["result"], matrix_rows(rows))
    lines += ["", "## What it answers", ""] + answers(doc)
    lines += ["", "## Thresholds", ""] + [f"- {p}: " + ", ".join(f"{k}={v}" for k, v in asdict(t).items()
                                                                  if v is not None) for p, t in THRESHOLDS.items()]
    for r in rows:
        if r.get("recipe"):
            rec, (label, t) = r["recipe"], thresholds_for(r["precision"], r["recipe"])
            lines.append(f"- {label} ({r['config']}-{r['weights']} {r['engine']} {r['layout']} {r['dtype']}): "
                         + ", ".join(f"{k}={fmt(v)}" for k, v in asdict(t).items() if v is not None)
                         + f"; {r['precision']} widened by the FP8-activation recipe's own distance from the baseline "
                         f"(`{rec['file']}`: top-1 {fmt(rec['top1_agreement'])}, KL mean {fmt(rec['kl_mean'])}, "
                         f"KL max {fmt(rec['kl_max'])})")
    lines += ["", KL_NOTE]
    fails = [f"- {r['config']}-{r['weights']} {r['engine']} {r['layout']} {r['dtype']}: "
             + " ".join("; ".join(r["failures"]).split())[-400:] for r in rows if not r["passed"]]
    lines += (["", "## Failures", ""] + fails if fails else []) + \
        (["", "## Notes", ""] + [f"- {n}" for n in doc["notes"]] if doc["notes"] else [])
    return "\n".join(lines) + "\n"
