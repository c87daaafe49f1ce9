"""Plot a `make gpu-bench` result: decode ms/step and measured/floor against batch size, per configuration.

    python -m traces.bench_plot traces/results/bench/<gpu>-<date>.json [--out PNG]   (default: beside the JSON)

Left: decode ms/step per configuration (solid) and the floor of each GPU count and weight format
(dotted); right: measured / floor, with the target of issue 6 (2×) as a line. Rows with an error and
configurations named in --skip are left out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from traces.plots import _save, plt


def plot_bench(doc: dict, path: Path, skip: tuple[str, ...] = ()) -> Path:
    rows = [r for r in doc["rows"] if "error" not in r and r["tag"] not in skip]
    tags = list(dict.fromkeys(r["tag"] for r in rows))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    floors = {}
    for tag in tags:
        rs = sorted((r for r in rows if r["tag"] == tag), key=lambda r: r["batch"])
        batches = [r["batch"] for r in rs]
        line, = ax.plot(batches, [r["decode_ms_step"] for r in rs], marker="o", label=tag)
        bx.plot(batches, [r["decode_vs_floor"] for r in rs], marker="o", color=line.get_color(), label=tag)
        floors.setdefault((rs[0]["gpus"], rs[0]["weights"]), (batches, [r["decode_floor_ms"] for r in rs]))
    for (gpus, weights), (batches, ms) in sorted(floors.items()):
        ax.plot(batches, ms, ":", color="grey", linewidth=1)
        ax.annotate(f"floor {gpus} GPU {weights}", (batches[-1], ms[-1]), fontsize=7, color="grey")
    bx.axhline(2.0, color="red", linewidth=1, linestyle="--", label="target 2x floor")
    for a, ylabel in ((ax, "decode ms/step"), (bx, "measured / floor")):
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("batch (rows decoded per step)")
        a.set_ylabel(ylabel)
        a.grid(True, which="both", alpha=0.3)
    bx.legend(fontsize=7, loc="upper right")
    ceil = doc["ceilings"]
    fig.suptitle(f"DeepSeek-V3.1 slice (1 dense + 2 MoE layers, full width), {doc['gpu']}, {doc['date']}: "
                 f"copy {ceil['copy_gbps']:.0f} GB/s", fontsize=10)
    return _save(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m traces.bench_plot", description=__doc__.splitlines()[0])
    p.add_argument("result", type=Path)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--skip", default="", help="comma-separated configuration tags to leave out")
    a = p.parse_args(argv)
    doc = json.loads(a.result.read_text())
    out = plot_bench(doc, a.out or a.result.with_suffix(".png"), tuple(filter(None, a.skip.split(","))))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
