"""Reports of `validation.compare` results: console summary, Markdown, PNG plot (matplotlib, Agg); atomic writes."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from validation.compare import KL_NOTE


def atomic_write(path: Path, write) -> Path:
    """Call write(tmp_path) on a temp file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def fmt(v) -> str:
    """A metric for a table cell: ints as is, small floats in scientific notation, None as a dash."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def summary_lines(result: dict) -> list[str]:
    """A few console lines: verdict, summary figures, failures and notes."""
    verdict = "PASS" if result["passed"] else "FAIL"
    s = result["summary"]
    lines = [f"{verdict} ({result['precision']}, {result['mode']} baseline): "
             + ", ".join(f"{k}={fmt(v)}" for k, v in s.items())]
    lines += [f"  fail: {f}" for f in result["failures"]] + [f"  note: {n}" for n in result["notes"]]
    return lines


PER_PROMPT = {"tokens": [("id", "id"), ("exact", "exact"), ("first_divergence", "first div."),
                         ("n_baseline", "tokens"), ("top1_agreement", "top-1 agree"),
                         ("max_abs_dlogp", "max \\|Δlogp\\|"), ("kl_mean", "KL mean"), ("kl_max", "KL max")],
              "text": [("id", "id"), ("exact", "exact"), ("prefix_chars", "prefix chars"), ("n_chars", "chars"),
                       ("prefix_tokens", "prefix tokens"), ("n_tokens", "tokens")]}


def table(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in r) + " |" for r in rows]


def markdown(result: dict) -> str:
    """The whole report as Markdown."""
    h = result["baseline_header"] or {}
    lines = [f"# Validation: {'PASS' if result['passed'] else 'FAIL'}", "",
             f"- run: `{result['run']}`", f"- baseline: `{result['baseline']}` ({result['mode']} baseline"
             + (f"; {h.get('engine')} {h.get('dtype')} on {h.get('device_name')}, checkpoint `{h.get('checkpoint')}`, "
                f"{h.get('max_new_tokens')} new tokens, top-{h.get('top_k')}, {h.get('created')}" if h else "") + ")",
             f"- precision: {result['precision']}; thresholds: "
             + ", ".join(f"{k}={fmt(v)}" for k, v in result["thresholds"].items() if v is not None)]
    if result.get("recipe"):
        rec = result["recipe"]
        lines.append(f"- recipe-relative: `{rec['file']}` (the baseline's model with the run's recipe) is itself at "
                     + ", ".join(f"{k}={fmt(rec[k])}" for k in rec if k != "file") + " from the baseline")
    lines += [f"- **fail**: {f}" for f in result["failures"]] + [f"- note: {n}" for n in result["notes"]]
    lines += ["", "## Summary", ""] + table(list(result["summary"]), [list(result["summary"].values())])
    cols = [(k, t) for k, t in PER_PROMPT[result["mode"]] if any(k in m for m in result["per_prompt"])]
    lines += ["", "## Per prompt", ""] + table([t for _, t in cols],
                                               [[m.get(k) for k, _ in cols] for m in result["per_prompt"]])
    if result["mode"] == "tokens":
        lines += ["", KL_NOTE]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path:
    """Per prompt: first divergence (or common prefix) vs length; per position: KL of every prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = result["per_prompt"]
    scored = [m for m in per if "kl" in m]
    fig, axes = plt.subplots(1, 2 if scored else 1, figsize=(12 if scored else 7, 4), squeeze=False)
    ax = axes[0][0]
    n_key, d_key = ("n_baseline", "first_divergence") if result["mode"] == "tokens" else ("n_chars", "prefix_chars")
    x = range(len(per))
    ax.bar(x, [m[n_key] for m in per], color="0.85", label="baseline length")
    ax.bar(x, [m.get(d_key, 0) for m in per], color="tab:blue", label="common prefix (first divergence)")
    ax.set_xticks(list(x), [m["id"] for m in per], rotation=90, fontsize=7)
    ax.set_ylabel("tokens" if result["mode"] == "tokens" else "characters")
    ax.legend(fontsize=8)
    if scored:
        ax = axes[0][1]
        width = max(m["positions"] for m in scored)
        for j in range(width):
            kl = [m["kl"][j] for m in scored if j < m["positions"]]
            ax.scatter([j] * len(kl), [max(v, 1e-12) for v in kl], s=6, color="tab:orange", alpha=0.5)
        ax.set_yscale("log")
        ax.set_xlabel("generated position")
        ax.set_ylabel("KL(baseline ‖ run), nats (one dot per prompt)")
    fig.suptitle(f"{Path(result['run']).name} vs {Path(result['baseline']).name} "
                 f"({result['precision']}: {'pass' if result['passed'] else 'FAIL'})", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    return path


def write_report(result: dict, out_dir: Path) -> list[Path]:
    """report.md and report.png in out_dir."""
    return [write_text(Path(out_dir) / "report.md", markdown(result)), plot(result, Path(out_dir) / "report.png")]
