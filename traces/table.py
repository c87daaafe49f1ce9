"""Plain-text tables and SI units for the reports; result files."""
from __future__ import annotations

import json
from pathlib import Path


def si(x: float, unit: str) -> str:
    """``12300`` → ``12.3 kB`` (3 significant digits, SI prefixes up to T)."""
    for prefix in ("", "k", "M", "G", "T"):
        if abs(x) < 1000 or prefix == "T":
            return f"{x:.3g} {prefix}{unit}" if prefix else f"{x:.0f} {unit}"
        x /= 1000
    return ""


def format_table(heads: list[str], rows: list[list[str]], n_left: int = 1) -> str:
    """Aligned plain-text columns: the first n_left columns left-aligned, the rest right."""
    if not rows:
        return "  (none)"
    widths = [max(len(r[i]) for r in [heads] + rows) for i in range(len(heads))]

    def line(cells):
        return "  " + "  ".join(c.ljust(w) if i < n_left else c.rjust(w)
                                for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(heads)] + [line(r) for r in rows])



def write_result(out_dir: Path, stem: str, doc: dict, md: str) -> Path:
    """A benchmark's result pair: out_dir/<stem>.json (the document) and .md (its table); prints the table."""
    base = Path(out_dir) / stem.replace(" ", "_")
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    base.with_suffix(".md").write_text(md)
    print(md)
    return base
