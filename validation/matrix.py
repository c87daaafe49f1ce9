"""The validation matrix: engines × layouts × dtypes × weights, each run scored against its checkpoint's baseline.

    python -m validation.matrix [--device cpu|cuda] [--configs tiny[,slice]] [--engines auto|hf,native,...]
        [--act-quant | --recipe-relative]
        [--layouts G1,G2,G4,2xG1,P2,P2G2,2xP2,G2s,G1+O,2xG1+O,G2+O,D4,2xD2,D2+O] [--dtypes fp32,bf16] [--weights bf16,fp8]
        [--max-gpus N] [--slots N]
        [--max-new-tokens 32] [--batch-size B] [--reuse] [--merge] [--out validation/results]
    python -m validation.matrix --rejudge validation/results/NAME.json

Per config × weights: the synthetic checkpoint (written if missing) and one transformers baseline
(`validation.baseline`, fp32; `<baselines>/NAME.jsonl` on CPU, `NAME-cuda.jsonl` on GPUs; reused while
its checkpoint fingerprint and settings match). Per row: the SPMD program under mpirun (`MPIRUN`,
default `mpirun`; `sys.executable`, so no .venv is needed) with `--score`, greedy (D: `--group-layout dpa`; 2xG1, 2xD2 and the +O
layouts: dynamic dispatch in chunks of 5), all prompts in one batch on GPUs, batches of 4 on CPU (the prompts run from
6 to 165 tokens; on CPU bf16 matmuls are slow, and padding to the longest prompt made batches of 20
cost 1.7× more for transformers), then `validation.compare` at the row's precision: fp32 compute →
fp32; bf16 compute → bf16 (bf16 weights) or fp8 (fp8 weights, dequantized). Jobs share `--slots`
(CPU cores, or GPUs with their own CUDA_VISIBLE_DEVICES). Writes <out>/<machine>-<date>.md and .json
(`--merge`: into the day's file, so several calls make one table); exit 1 if any row fails.
`--rejudge RESULT.json` only re-applies the current thresholds to a stored file's numbers.
`--recipe-relative` (FP8 activations, `--fp8-prefill w8a8`): FP8 rows are judged against the plain baseline
by thresholds widened by the recipe's own distance from it (`validation.compare --recipe`), measured by
the baseline's model with the recipe scoring the baseline's tokens (`NAME.recipe-a8.jsonl`, reused while
it scores the same baseline file).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path

from spmd.runtime import commands
from spmd.runtime.score import BaselineError, checkpoint_fingerprint, file_sha256, read_baseline
from validation.compare import compare, judge, read_run
from validation.jobs import Job, run_jobs
from validation.report import write_text
from validation.summary import matrix_markdown

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "inputs" / "prompts" / "validation20.jsonl"
# name: (ranks, ranks per pipeline stage (--group-size), pipeline stages (--pp), more options). G2s: the CUDA
# graph's static-shape decode step run eagerly; +O: a dedicated orchestrator (world rank 0, no model) besides
DPA = ("--group-layout", "dpa")  # D: data-parallel attention, experts by all-to-all (docs/engines.md)
LAYOUTS = {"G1": (1, 1, 1, ()), "G2": (2, 2, 1, ()), "G4": (4, 4, 1, ()), "2xG1": (2, 1, 1, ()),
           "P2": (2, 1, 2, ()), "P2G2": (4, 2, 2, ()), "2xP2": (4, 1, 2, ()),
           "G2s": (2, 2, 1, ("--cuda-graph", "static")),
           "G1+O": (2, 1, 1, ("--orchestrator", "dedicated")), "2xG1+O": (3, 1, 1, ("--orchestrator", "dedicated")),
           "G2+O": (3, 2, 1, ("--orchestrator", "dedicated")),
           "D2": (2, 2, 1, DPA), "D4": (4, 4, 1, DPA), "2xD2": (4, 2, 1, DPA),
           "D2+O": (3, 2, 1, (*DPA, "--orchestrator", "dedicated"))}
# native engine only, fp32 only (the exactness check; CI time): pipelines, the static step, the orchestrator;
# the static step with FP8 weights only (its path for them), the orchestrator with bf16 weights only
NATIVE_FP32 = ("P2", "P2G2", "2xP2", "G2s", "G1+O", "2xG1+O", "G2+O", "D2", "D4", "2xD2", "D2+O")
BY_HAND = ("D2",)  # not in the default --layouts (D4, 2xD2 and D2+O check it; CI time)
ONE_WEIGHTS = {"G2s": "fp8", "G1+O": "bf16", "2xG1+O": "bf16", "G2+O": "bf16", "2xD2": "fp8", "D2+O": "bf16",
               "P2": "bf16", "P2G2": "bf16", "2xP2": "bf16"}
REPLICATED = {"hf": ("G1", "2xG1")}  # engines that hold the whole model on every rank
# CI time (the 2-core machine): bf16 compute at G1 and G2 only (its rounding; sharding is checked exactly in
# fp32 at every layout); replicas with dynamic dispatch (engine-independent) for hf with bf16 weights and
# for native only; DeepSpeed at G4 with bf16 weights only; pipelines with bf16 weights only (FP8 weights
# are dequantized at load on CPU: the same stages)
BF16_LAYOUTS = ("G1", "G2")
ONLY = {("hf", "2xG1"): "bf16", ("deepspeed", "G4"): "bf16"}  # (engine, layout): the one weight format
NOT_FOR = {"deepspeed": ("2xG1",)}
# configs that check another model shape only: the native engine's plain layouts, fp32, bf16 weights
SHAPE_CONFIGS, SHAPE_LAYOUTS = ("tiny-noqlora",), ("G1", "G4")


def layout_fits(engine: str, layout: str, dtype: str) -> bool:
    if layout in NATIVE_FP32:
        return engine == "native" and dtype == "fp32"
    if dtype == "bf16" and layout not in BF16_LAYOUTS or layout in NOT_FOR.get(engine, ()):
        return False
    return layout in REPLICATED.get(engine, LAYOUTS)


def row_fits(config: str, weights: str, engine: str, layout: str, dtype: str) -> bool:
    """Every engine x layout x dtype that fits; a SHAPE_CONFIGS model (tiny-noqlora: a plain q projection,
    64 experts in 8 groups) only the native engine's plain layouts in fp32 with bf16 weights."""
    if config in SHAPE_CONFIGS:
        return weights == "bf16" and engine == "native" and dtype == "fp32" and layout in SHAPE_LAYOUTS
    return layout_fits(engine, layout, dtype) and ONE_WEIGHTS.get(layout, weights) == weights and \
        ONLY.get((engine, layout), weights) == weights


@dataclass(frozen=True)
class Row:
    config: str
    weights: str
    engine: str
    layout: str
    dtype: str

    @property
    def tag(self) -> str:
        return f"{self.config}-{self.weights}-{self.engine}-{self.layout}-{self.dtype}"

    @property
    def precision(self) -> str:
        return "fp32" if self.dtype == "fp32" else "fp8" if self.weights == "fp8" else "bf16"


def plan(args, engines: list[str]) -> list[Row]:
    """Every row to run, in table order; layouts needing more ranks than GPUs are left out on cuda."""
    fits = [lay for lay in args.layouts if args.device == "cpu" or LAYOUTS[lay][0] <= args.max_gpus]
    weights = [w for w in args.weights if w == "fp8" or not getattr(args, "act_quant", False)]  # a8: FP8 only
    return [Row(c, w, e, lay, d) for c in args.configs for w in weights for e in engines for lay in fits
            for d in args.dtypes if row_fits(c, w, e, lay, d)]


def checkpoint_job(config: str, weights: str, args) -> tuple[Path, Job | None]:
    """The checkpoint directory, and the job that writes it if it is missing."""
    out = args.ckpt_root / f"{config}-{weights}"
    if (out / "config.json").is_file():
        return out, None
    cmd = commands.synth(config, out, weights, args.device, overwrite=True)
    return out, Job(f"synth-{out.name}", cmd, 1, args.work / "logs" / f"synth-{out.name}.log")


def fp32_gib(ckpt: Path) -> float:
    """The model's size in fp32 (from the index: 2 bytes per stored bf16 weight, about 1 per FP8 one)."""
    total = json.loads((ckpt / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    fp8 = bool(json.loads((ckpt / "config.json").read_text()).get("quantization_config"))
    return total / (1 if fp8 else 2) * 4 / 2**30


def baseline_job(ckpt: Path, args) -> tuple[Path, str, Job | None]:
    """The baseline file, its dtype, and the job that (re)makes it unless the file there matches.

    fp32, except on a GPU too small for the fp32 model (the full-width slice: ~95 GiB): there float32
    arithmetic over bf16-held weights (`validation.baseline --lean`, the same numbers) where every weight is
    exact in bf16 and half fits, else bf16, unless the file there is an fp32 baseline of the same checkpoint
    (e.g. made on an H200), which is kept.
    """
    a8 = getattr(args, "act_quant", False)  # the FP8-activation reference (validation/act_quant.py)
    out = args.baselines / f"{ckpt.name}{'' if args.device == 'cpu' else '-' + args.device}{'-a8' if a8 else ''}.jsonl"
    big, dtype, model_opts = reference_model(ckpt, args)
    try:
        head = read_baseline(out)[0] if out.is_file() else None
    except BaselineError:
        head = None
    # a stored fp32 baseline serves where this GPU could only make a bf16 one (made on a larger GPU)
    if head and head["checkpoint_sha256"] == checkpoint_fingerprint(ckpt) and head["dtype"] in (dtype, "fp32") and \
            (head["max_new_tokens"], head["device"], head.get("act_quant", False)) == \
            (args.max_new_tokens, args.device, a8):
        return out, head["dtype"], None
    cmd = [sys.executable, "-m", "validation.baseline", "--checkpoint", str(ckpt), "--prompts", str(PROMPTS),
           "--out", str(out), "--max-new-tokens", str(args.max_new_tokens), "--batch-size",
           "20" if args.device == "cuda" else "1", *(("--act-quant",) if a8 else ()), *model_opts]
    return out, dtype, Job(f"baseline-{ckpt.name}", cmd, args.slots if big else 1,
                           args.work / "logs" / f"baseline-{ckpt.name}.log")


def reference_model(ckpt: Path, args) -> tuple[bool, str, list[str]]:
    """(big, dtype, validation.baseline options) of the transformers reference on this device: see
    baseline_job. A large model is built in host memory first (validation.reference.load_hf): one at a
    time, with every CPU core (FP8 dequantizing and expert fusing on one thread made the slice-fp8
    baseline take > 6 min)."""
    big = args.device == "cuda" and fp32_gib(ckpt) > 0.8 * args.gpu_mem_gib
    if big:
        from validation.reference import bf16_exact
    lean = big and fp32_gib(ckpt) / 2 <= 0.8 * args.gpu_mem_gib and bf16_exact(ckpt) is None
    dtype = "bf16" if big and not lean else "fp32"
    opts = ["--dtype", dtype, "--device", args.device, *(("--lean",) if lean else ())]
    return big, dtype, opts + (["--threads", str(len(os.sched_getaffinity(0)))] if big else [])


def recipe_job(ckpt: Path, baseline: Path, args) -> tuple[Path, Job | None]:
    """--recipe-relative: the baseline's model with the FP8-activation recipe scoring the baseline's tokens
    (validation.baseline --score-of --act-quant), and the job that makes it unless the file there scores
    this very baseline file."""
    out = baseline.with_name(baseline.stem + ".recipe-a8.jsonl")
    try:
        rows = read_run(out) if out.is_file() else []
    except BaselineError:
        rows = []
    sha = file_sha256(baseline)
    if rows and all(r.get("score", {}).get("baseline_sha256") == sha and r["score"].get("act_quant") for r in rows):
        return out, None
    big, _, model_opts = reference_model(ckpt, args)
    cmd = [sys.executable, "-m", "validation.baseline", "--checkpoint", str(ckpt), "--score-of", str(baseline),
           "--out", str(out), "--act-quant", *model_opts]
    return out, Job(f"recipe-{ckpt.name}", cmd, args.slots if big else 1, args.work / "logs" / f"recipe-{ckpt.name}.log")


def run_job(row: Row, ckpt: Path, baseline: Path, args) -> Job:
    """The SPMD program for one row, scored against its baseline."""
    ranks, group, pp, extra = LAYOUTS[row.layout]
    cmd = commands.mpirun(ranks, "spmd", "--checkpoint", str(ckpt), "--prompts", str(PROMPTS), "--output",
                          str(output(row, args)), "--engine", row.engine, "--group-size", str(group), "--dtype",
                          row.dtype, "--device", args.device, "--max-new-tokens", str(args.max_new_tokens),
                          "--batch-size", str(args.batch_size), "--no-progress", "--score", str(baseline), *extra,
                          mpi4py=True)
    if pp > 1:
        cmd += ["--pp", str(pp)]
    cmd += shlex.split(args.program_opts)
    if ranks > group * pp:
        cmd += ["--dispatch", "dynamic", "--dispatch-size", "5"]
    return Job(row.tag, cmd, ranks, args.work / "logs" / f"{row.tag}.log")


def output(row: Row, args) -> Path:
    return args.work / "runs" / f"{row.tag}.jsonl"


def evaluate(row: Row, baseline: Path, args, wall_s: float | None, error: str | None,
             recipe: Path | None = None) -> dict:
    """One result row: the configuration, the compare summary, pass/fail (an error is a fail); with recipe
    (its scores of the baseline) judged by recipe-relative thresholds, the recipe's numbers kept."""
    res = {**row.__dict__, "precision": row.precision, "wall_s": wall_s}
    if error is None:
        try:
            c = compare(output(row, args), baseline, row.precision, recipe=recipe)
            return {**res, **c["summary"], "passed": c["passed"], "failures": c["failures"],
                    **({"recipe": {**c["recipe"], "file": _rel(recipe)}} if c["recipe"] else {})}
        except BaselineError as exc:
            error = f"refused: {exc}"
    return {**res, "passed": False, "failures": [error]}


def reusable(row: Row, baseline: Path, args) -> bool:
    """--reuse: a finished run whose scores belong to the current baseline is kept."""
    if not args.reuse or not output(row, args).is_file():
        return False
    try:
        compare(output(row, args), baseline, row.precision)
        return True
    except BaselineError:
        return False


def tail(path: Path, n: int = 1500) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else ""


def prepare(args, rows: list[Row]) -> tuple[dict, dict]:
    """Checkpoints, then baselines, then (--recipe-relative) the FP8 recipe's scores of them (a phase of jobs
    each): {(config, weights): (ckpt, baseline, dtype, recipe scores or None)}, errors."""
    pairs = sorted({(r.config, r.weights) for r in rows})
    ckpts = {p: checkpoint_job(*p, args) for p in pairs}
    done = run_jobs([j for _, j in ckpts.values() if j], args.slots, ROOT, echo=_echo)
    errors = {p: f"synthetic checkpoint failed: {tail(j.log)}" for p, (_, j) in ckpts.items()
              if j and done[j.tag].returncode}
    bases = {p: baseline_job(ckpts[p][0], args) for p in pairs if p not in errors}
    done = run_jobs([j for *_, j in bases.values() if j], args.slots, ROOT, _gpus(args), _echo)
    errors.update({p: f"baseline failed: {tail(j.log)}" for p, (*_, j) in bases.items()
                   if j and done[j.tag].returncode})
    ready = {p: (ckpts[p][0], b[0], b[1], None) for p, b in bases.items() if p not in errors}
    if getattr(args, "recipe_relative", False):  # FP8 rows: the recipe's own distance from the baseline
        recipes = {p: recipe_job(ready[p][0], ready[p][1], args) for p in ready if p[1] == "fp8"}
        done = run_jobs([j for _, j in recipes.values() if j], args.slots, ROOT, _gpus(args), _echo)
        errors.update({p: f"recipe scores failed: {tail(j.log)}" for p, (_, j) in recipes.items()
                       if j and done[j.tag].returncode})
        ready = {p: (*v[:3], recipes[p][0] if p in recipes else None) for p, v in ready.items() if p not in errors}
    return ready, errors


def run_rows(args, rows: list[Row], ready: dict, errors: dict) -> list[dict]:
    """Run what is not reusable, then one result per row, in plan order."""
    jobs = [run_job(r, *ready[r.config, r.weights][:2], args) for r in rows
            if (r.config, r.weights) in ready and not reusable(r, ready[r.config, r.weights][1], args)]
    done = run_jobs(jobs, args.slots, ROOT, _gpus(args), _echo)
    out = []
    for r in rows:
        if (r.config, r.weights) in errors:
            out.append(evaluate(r, None, args, None, errors[r.config, r.weights]))
            continue
        d = done.get(r.tag)
        err = f"exit {d.returncode}: {tail(args.work / 'logs' / f'{r.tag}.log')}" if d and d.returncode else None
        _, baseline, bdtype, recipe = ready[r.config, r.weights]
        out.append({**evaluate(r, baseline, args, d.wall_s if d else None, err, recipe), "baseline_dtype": bdtype})
    return out


def layout_agreement(args, rows: list[Row]) -> list[dict]:
    """Per (config, weights, engine, dtype) with several layouts: prompts whose tokens all layouts share."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.config, r.weights, r.engine, r.dtype), []).append(r)
    out = []
    for key, rs in groups.items():
        try:
            toks = [[x["completion_token_ids"] for x in map(json.loads, output(r, args).read_text().splitlines())]
                    for r in rs]
        except (OSError, json.JSONDecodeError, KeyError):
            continue
        if len(rs) > 1 and len({len(t) for t in toks}) == 1:
            same = sum(len({tuple(t[i]) for t in toks}) == 1 for i in range(len(toks[0])))
            out.append({"config": key[0], "weights": key[1], "engine": key[2], "dtype": key[3],
                        "layouts": [r.layout for r in rs], "identical_prompts": same, "n_prompts": len(toks[0])})
    return out


def deepspeed_problem() -> str | None:
    """None if the deepspeed engine is there, importable and can score; else why it is left out."""
    if not (ROOT / "spmd" / "engines" / "deepspeed.py").is_file():
        return "spmd/engines/deepspeed.py does not exist"
    code = ("import spmd.engines.deepspeed as m, sys; sys.exit(0 if any(isinstance(v, type) and hasattr(v, 'prefill')"
            " and hasattr(v, 'score') for v in vars(m).values()) else 3)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if r.returncode == 3:
        return "the deepspeed engine has no score method"
    return None if r.returncode == 0 else f"spmd.engines.deepspeed does not import: {r.stderr.strip()[-300:]}"


def gpu_info() -> tuple[str, float]:
    """(name, memory GiB) of the first GPU, from torch in a child process (this one keeps no CUDA context)."""
    code = "import torch; p = torch.cuda.get_device_properties(0); print(p.total_memory); print(p.name)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"error: --device cuda, but no GPU is usable: {r.stderr.strip()[-300:]}")
    mem, name = r.stdout.strip().split("\n", 1)
    return name.strip(), int(mem) / 2**30


def _gpus(args) -> list[str] | None:
    if args.device != "cuda":
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[:args.slots] if visible else [str(i) for i in range(args.slots)]


def _rel(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _echo(msg: str) -> None:
    print(msg, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m validation.matrix", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--configs", default="tiny", help="model configs (inputs/models/NAME.json), comma-separated")
    p.add_argument("--engines", default="auto", help="auto: hf, native, and deepspeed when it can score")
    p.add_argument("--layouts", default=",".join(x for x in LAYOUTS if x not in BY_HAND))
    p.add_argument("--dtypes", default=None, help="compute dtypes (default: fp32,bf16 on cpu, bf16 on cuda)")
    p.add_argument("--weights", default="bf16,fp8")
    p.add_argument("--max-gpus", type=int, default=2, help="cuda: layouts needing more ranks are left out")
    p.add_argument("--slots", type=int, default=None, help="concurrent ranks (default: CPU cores, or --max-gpus)")
    p.add_argument("--program-opts", default="", help="more options of every run, e.g. '--fp8-prefill w8a16' "
                   "(recorded in the result file)")
    p.add_argument("--act-quant", action="store_true", help="FP8 rows against a baseline whose FP8 layers "
                   "quantize their inputs as --fp8-prefill w8a8 does (baselines NAME-a8.jsonl; bf16 rows left out)")
    p.add_argument("--recipe-relative", action="store_true", help="FP8 rows judged against the plain baseline "
                   "by thresholds widened by the FP8-activation recipe's own distance from it (validation.compare "
                   "--recipe; the recipe's scores: validation.baseline --score-of --act-quant, NAME.recipe-a8.jsonl); for runs "
                   "whose prefill is FP8 x FP8 (--fp8-prefill w8a8, the default on sm_89+ GPUs; on CPU the engine "
                   "runs weight-only and the plain bounds are the right ones)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=None, help="default: 20 (all prompts) on cuda, 4 on cpu")
    p.add_argument("--reuse", action="store_true", help="keep finished runs whose scores match the baseline")
    p.add_argument("--merge", action="store_true", help="add to (replace rows in) the day's result file")
    p.add_argument("--rejudge", type=Path, default=None, metavar="RESULT_JSON",
                   help="only re-apply the current thresholds to a stored result file")
    p.add_argument("--ckpt-root", type=Path, default=ROOT / "build" / "checkpoints")
    p.add_argument("--baselines", type=Path, default=ROOT / "validation" / "results" / "baselines")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "validation")
    p.add_argument("--out", type=Path, default=ROOT / "validation" / "results")
    a = p.parse_args(argv)
    a.configs, a.weights, a.layouts = a.configs.split(","), a.weights.split(","), a.layouts.split(",")
    a.dtypes = (a.dtypes or ("bf16" if a.device == "cuda" else "fp32,bf16")).split(",")
    a.batch_size = a.batch_size or (20 if a.device == "cuda" else 4)
    a.slots = a.slots or (a.max_gpus if a.device == "cuda" else os.cpu_count() or 1)
    a.machine, a.gpu_mem_gib = gpu_info() if a.device == "cuda" else (f"cpu-{socket.gethostname()}", 0.0)
    if a.recipe_relative and a.act_quant:
        p.error("--recipe-relative judges against the plain baseline; --act-quant replaces that baseline by the "
                "recipe's own: choose one")
    bad = [x for x in a.layouts if x not in LAYOUTS] + [x for x in a.dtypes if x not in ("fp32", "bf16")] + \
        [x for x in a.weights if x not in ("bf16", "fp8")]
    if bad:
        p.error(f"unknown layout/dtype/weights: {', '.join(bad)}")
    return a


def rejudge(path: Path) -> int:
    """--rejudge FILE: apply the current thresholds to a stored result file's numbers; rewrite its .json and .md."""
    doc = json.loads(path.read_text())
    for r in doc["rows"]:
        if "top1_agreement" in r or "exact_prompts" in r:  # rows that failed to run keep their error
            r["failures"] = judge(r, r["precision"], recipe=r.get("recipe"))
            r["passed"] = not r["failures"]
    write_text(path, json.dumps(doc, indent=1) + "\n")
    write_text(path.with_suffix(".md"), matrix_markdown(doc))
    print(f"rewrote {path} and {path.with_suffix('.md')}: {sum(r['passed'] for r in doc['rows'])}/"
          f"{len(doc['rows'])} pass")
    return 0 if all(r["passed"] for r in doc["rows"]) else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.rejudge is not None:
        return rejudge(args.rejudge)
    notes = []
    engines = ["hf", "native", "deepspeed"] if args.engines == "auto" else args.engines.split(",")
    if args.engines == "auto" and (why := deepspeed_problem()):
        engines.remove("deepspeed")
        notes.append(f"deepspeed left out: {why}")
    rows = plan(args, engines)
    ready, errors = prepare(args, rows)
    results = run_rows(args, rows, ready, errors)
    stamp = dt.date.today().isoformat()
    doc = {"machine": args.machine, "date": stamp, "device": args.device, "max_new_tokens": args.max_new_tokens,
           "batch_size": args.batch_size, "program_opts": args.program_opts, "act_quant": args.act_quant,
           "recipe_relative": args.recipe_relative,
           "prompts": str(PROMPTS.relative_to(ROOT)), "engines": engines, "notes": notes,
           "baselines": {f"{c}-{w}": {"file": _rel(b), "dtype": d, **({"recipe": _rel(rc)} if rc else {})}
                         for (c, w), (_, b, d, rc) in ready.items()},
           "layout_agreement": layout_agreement(args, rows), "rows": results}
    name = f"{args.machine.replace(' ', '_')}-{stamp}"
    if args.merge:
        doc = merged(doc, args.out / f"{name}.json")
    write_text(args.out / f"{name}.json", json.dumps(doc, indent=1) + "\n")
    md = matrix_markdown(doc)
    write_text(args.out / f"{name}.md", md)
    print(md, flush=True)
    print(f"wrote {args.out / name}.md and .json")
    return 0 if all(r["passed"] for r in results) else 1


def merged(doc: dict, path: Path) -> dict:
    """--merge: this run's rows replace the same configurations in the day's file; the others stay."""
    if not path.is_file():
        return doc
    old = json.loads(path.read_text())
    row_key = itemgetter("config", "weights", "engine", "layout", "dtype")
    group_key = itemgetter("config", "weights", "engine", "dtype")
    rows, groups = {row_key(r) for r in doc["rows"]}, {group_key(g) for g in doc["layout_agreement"]}
    return {**doc, "engines": sorted(set(old["engines"]) | set(doc["engines"])),
            "notes": old["notes"] + [n for n in doc["notes"] if n not in old["notes"]],
            "baselines": {**old["baselines"], **doc["baselines"]},
            "layout_agreement": [g for g in old["layout_agreement"] if group_key(g) not in groups]
            + doc["layout_agreement"], "rows": [r for r in old["rows"] if row_key(r) not in rows] + doc["rows"]}


if __name__ == "__main__":
    sys.exit(main())
