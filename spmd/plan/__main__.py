"""python -m spmd.plan --config CONFIG --gpu-mem GIB --gpus-per-node N [options]: the layouts that fit."""
from __future__ import annotations

import json
import sys

from spmd.config import ModelArgs, UsageError
from spmd.plan.planner import TOP, Machine, parser, plan, table


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        m = ModelArgs.from_config(json.loads(a.config.read_text()))
    except (OSError, json.JSONDecodeError, UsageError) as exc:
        print(f"spmd.plan: {exc}", file=sys.stderr)
        return 2
    machine = Machine(a.gpu_mem, a.gpus_per_node, a.hbm, a.link, a.nvlink, a.fraction)
    doc = plan(m, machine, a.nodes, a.weights, a.batch, a.context)
    print(json.dumps(doc, indent=1) if a.json else table(doc, None if a.all else TOP), end="\n" if a.json else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
