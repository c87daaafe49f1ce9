"""`make paper`: the short paper and the EuroHPC proposal, every number taken from a stored result file.

    python -m docs.build [--out build/docs]      # docs/*/NAME.typ.in -> build/docs/NAME.typ -> NAME.pdf

The templates (docs/paper/paper.typ.in, docs/proposal/proposal.typ.in) hold no measured or projected
number of their own: each is a placeholder ``{{name}}`` (a fact) or ``{{table:name}}`` (a table), filled
here from the files under validation/results, traces/results/bench, traces/results/scaling and traces/results/model, and every fact records the
file it came from (``facts()``: name -> Fact(text, source)). The proposal's facts and tables (the system,
the planner's layouts, the node-hour request and its arithmetic) come from docs/proposal_facts.py, the
paper's figures from docs/figures.py (drawn into OUT/figures from the same result files), its
bibliography from docs/paper/refs.yml. tests/unit/test_docs.py fails when a template has a number outside
a placeholder (beyond the allow-listed model and format names), a placeholder without a fact, a figure
that was not drawn or a citation without an entry; tests/unit/test_proposal.py recomputes the request.
Typeset with Typst (PyPI ``typst``, the compiler itself as a Python extension).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = {"paper": ROOT / "docs/paper/paper.typ.in", "proposal": ROOT / "docs/proposal/proposal.typ.in"}
VALID_CPU = ROOT / "validation/results/cpu-vm-2026-12-06.json"
VALID_GPU = ROOT / "validation/results/NVIDIA_H200-2026-11-28.json"
BENCH = ROOT / "traces/results/bench/NVIDIA_H200-2026-11-28.json"
BENCH_PP = ROOT / "traces/results/bench/pp-NVIDIA_H200-2026-11-28.json"
MODEL = ROOT / "traces/results/model/model-NVIDIA_H200.json"
SWEEP_GPU = ROOT / "traces/results/scaling/gpu-NVIDIA_H200-2026-11-28.json"
SWEEP_MARKS = ROOT / "traces/results/scaling/gpu-NVIDIA_H200-2026-11-28-layer-marks.json"
SWEEP_CPU = ROOT / "traces/results/scaling/cpu-vm-2026-11-28.json"
ORDER = {v: ROOT / f"traces/results/scaling/dispatch-order-NVIDIA_H200-2026-11-29-r2-{v}.json"  # round 2 of the A/B call
         for v in ("sorted", "input")}
TIMERS_GRAPH = ROOT / "traces/results/bench/timers-NVIDIA_H200-graph-vm-2026-11-28.json"
TIMERS_LAYER = ROOT / "traces/results/bench/timers-NVIDIA_H200-graph-stamp-layer-slice-fp8-b1-vm-2026-11-28.json"
FULL_CFG, SLICE_CFG = ROOT / "inputs/models/v3.1-671b.json", ROOT / "inputs/models/slice.json"
# issue 26's and the serving loop's H100 results (one card, 2026-12-06)
SERVE = ROOT / "traces/results/serve/NVIDIA_H100_80GB_HBM3-2026-12-06-r4.json"      # the serving loop, 400 prompts
SERVE_FP8 = ROOT / "traces/results/serve/NVIDIA_H100_80GB_HBM3-2026-12-06-r5.json"  # w8a8 vs w8a16 prefill
FP8_BENCH = ROOT / "traces/results/bench/fp8-modes-2026-12-06-r3/NVIDIA_H100_80GB_HBM3-2026-12-06.json"  # decode, bytes
# prefill and its kernel profile (one H100, each row the median of five prefills): the TMA launch's three
# repeats (a in one call, b and c in the next on the same machine), each ratio within its own run
FP8_REPEATS = [ROOT / f"traces/results/bench/fp8-fusedquant-2026-12-07/{r}/NVIDIA_H100_80GB_HBM3-2026-12-07.json"
               for r in ("a", "b", "c")]
# then the default on sm_90, the ws launch (tile counter, 128 x 256 tiles), in one call: its FP8 rows
# (bench-ws256) against the dequantized rows of that call's bench run (bench)
FP8_WS = ROOT / "traces/results/bench/fp8-ws-dyn-2026-12-07"
FP8_PREFILL = FP8_WS / "bench-ws256/NVIDIA_H100_80GB_HBM3-2026-12-07.json"
FP8_PREFILL_DQ = FP8_WS / "bench/NVIDIA_H100_80GB_HBM3-2026-12-07.json"
VALID_A8 = ROOT / "validation/results/NVIDIA_H100_80GB_HBM3-2026-12-06.json"
# the weight-only run scored against the baseline with FP8 activations (validation.matrix --act-quant)
VALID_A16_VS_A8 = ROOT / "validation/results/NVIDIA_H100_80GB_HBM3-2026-12-07-w8a16-vs-a8.json"
# the w8a8 run judged by recipe-relative bounds (validation.matrix --recipe-relative), the recipe's distance in it
VALID_RECIPE = ROOT / "validation/results/NVIDIA_H100_80GB_HBM3-2026-12-07-recipe.json"
FP8_GEMMS = ROOT / "traces/results/fp8/NVIDIA_H100_80GB_HBM3-2026-12-06-r4.json"  # per GEMM (the fp8 figure's)
LOAD = ROOT / "traces/results/load/NVIDIA_H100_80GB_HBM3-2026-12-06.json"
DPA_G1 = ROOT / "traces/results/bench/dpa-g1-NVIDIA_H100_80GB_HBM3-2026-12-06.json"
PLACEHOLDER = re.compile(r"\{\{([a-z0-9_:]+)\}\}")
NODE_GPUS = 8


@dataclass(frozen=True)
class Fact:
    text: str
    source: str


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _fmt(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"


def _rng(values, digits: int = 2) -> str:
    lo, hi = min(values), max(values)
    return _fmt(lo, digits) if round(lo, digits) == round(hi, digits) else f"{_fmt(lo, digits)}–{_fmt(hi, digits)}"


def _bench_row(rows: list[dict], tag: str, batch: int) -> dict:
    return next(r for r in rows if r.get("tag") == tag and r.get("batch") == batch)


def facts() -> dict[str, Fact]:
    f: dict[str, Fact] = {}

    def put(name: str, text: str, src: Path) -> None:
        f[name] = Fact(text, _rel(src))

    for cfg, key in ((FULL_CFG, "full"), (SLICE_CFG, "slice")):
        c = _load(cfg)
        put(f"{key}_layers", str(c["num_hidden_layers"]), cfg)
        put(f"{key}_dense", str(c["first_k_dense_replace"]), cfg)
        put(f"{key}_experts", str(c["n_routed_experts"]), cfg)
        put(f"{key}_topk", str(c["num_experts_per_tok"]), cfg)
        put(f"{key}_hidden", str(c["hidden_size"]), cfg)
    put("node_gpus", str(NODE_GPUS), Path(__file__))
    cpu, gpu = _load(VALID_CPU), _load(VALID_GPU)
    fp32 = [r for r in cpu["rows"] if r["dtype"] == "fp32"]
    put("cpu_rows", str(len(cpu["rows"])), VALID_CPU)
    put("cpu_pass", str(sum(r["passed"] for r in cpu["rows"])), VALID_CPU)
    put("cpu_fp32_rows", str(len(fp32)), VALID_CPU)
    put("cpu_fp32_exact", str(sum(r["exact_prompts"] == r["n_prompts"] for r in fp32)), VALID_CPU)
    put("cpu_fp32_dlogp", f"{max(r['max_abs_dlogp'] for r in fp32):.1e}", VALID_CPU)
    bf = [r for r in cpu["rows"] if r["dtype"] == "bf16"]
    put("cpu_bf16_top1", _rng([r["top1_agreement"] for r in bf if r["weights"] == "bf16"]), VALID_CPU)
    put("cpu_fp8_top1", _rng([r["top1_agreement"] for r in bf if r["weights"] == "fp8"]), VALID_CPU)
    put("gpu_rows", str(len(gpu["rows"])), VALID_GPU)
    put("gpu_pass", str(sum(r["passed"] for r in gpu["rows"])), VALID_GPU)
    for w in ("bf16", "fp8"):
        sl = [r for r in gpu["rows"] if r["config"] == "slice" and r["weights"] == w]
        put(f"slice_{w}_top1", _rng([r["top1_agreement"] for r in sl], 3), VALID_GPU)
        put(f"slice_{w}_kl", _rng([r["kl_mean"] for r in sl], 3), VALID_GPU)
        put(f"slice_{w}_div", _rng([r["mean_first_divergence"] for r in sl], 1), VALID_GPU)

    bench = _load(BENCH)
    rows = bench["rows"]
    put("gpu_name", bench["gpu"], BENCH)
    put("copy_gbps", _fmt(bench["ceilings"]["copy_gbps"], 0), BENCH)
    put("matmul_tflops", _fmt(bench["ceilings"]["matmul_tflops"], 0), BENCH)
    for tag, key in (("native-1gpu-bf16", "n1_bf16"), ("native-1gpu-fp8", "n1_fp8"),
                     ("native-2gpu-bf16", "n2_bf16"), ("hf-1gpu-bf16", "hf1"), ("deepspeed-2gpu-bf16", "ds2")):
        for b in (1, 32):
            r = _bench_row(rows, tag, b)
            put(f"{key}_b{b}_ms", _fmt(r["decode_ms_step"]), BENCH)
            put(f"{key}_b{b}_floor", _fmt(r["decode_vs_floor"]), BENCH)
    n1, hf = _bench_row(rows, "native-1gpu-bf16", 1), _bench_row(rows, "hf-1gpu-bf16", 1)
    put("vs_hf_b1", _fmt(hf["decode_ms_step"] / n1["decode_ms_step"], 1), BENCH)
    a, b = _bench_row(rows, "native-1gpu-bf16", 32), _bench_row(rows, "native-2gpu-bf16", 32)
    put("speedup_2gpu_b32", _fmt(a["decode_ms_step"] / b["decode_ms_step"]), BENCH)
    ds = _bench_row(rows, "deepspeed-2gpu-bf16", 32)
    put("vs_ds_b32", _fmt(ds["decode_ms_step"] / b["decode_ms_step"], 1), BENCH)

    pp = _load(BENCH_PP)["rows"]
    for bt in (8, 32, 64):
        r = _bench_row(pp, "native-2gpu-pp2-bf16", bt)
        put(f"pp2_b{bt}_ms", _fmt(r["decode_ms_step"]), BENCH_PP)
        put(f"pp2_b{bt}_bubble", _fmt(r["bubble_fraction"]), BENCH_PP)
        put(f"g2e_b{bt}_ms", _fmt(_bench_row(pp, "native-2gpu-bf16-eager", bt)["decode_ms_step"]), BENCH_PP)

    f.update(sweep_facts())
    model = _load(MODEL)
    fits = {(x["mode"], x["weights"]): x for x in model["fits"]}
    for (mode, w), x in fits.items():
        put(f"fit_{mode}_{w}_c_us", _fmt(x["c_layer_s"] * 1e6, 0), MODEL)
        put(f"fit_{mode}_{w}_eta", _fmt(x["eta"]), MODEL)
        put(f"fit_{mode}_{w}_rms", _fmt(x["rms_rel_err"] * 100, 1), MODEL)
    errs = [abs(v["error"]) * 100 for v in model["validation"]]
    put("model_rows", str(len(errs)), MODEL)
    put("model_err_mean", _fmt(statistics.mean(errs), 0), MODEL)
    put("model_err_max", _fmt(max(errs), 0), MODEL)
    proj = model["projection"]
    put("context", str(proj[0]["context"]), MODEL)
    put("ib_source", model["inter"]["source"].removeprefix("stated: "), MODEL)

    def prow(gpu_: str, nodes: int, layout: str, batch: int) -> dict:
        return next(r for r in proj if (r["gpu"], r["nodes"], r["layout"], r["batch"]) == (gpu_, nodes, layout, batch))

    one = prow("H200", 1, "G8", 32)
    put("h200_1node_gib", _fmt(prow("H200", 1, "G8", 1)["mem_gib_per_gpu"], 0), MODEL)
    put("h200_1node_b32_tps", _fmt(one["tokens_per_s"], 0), MODEL)
    put("h200_1node_b32_ms", _fmt(one["step_ms"], 1), MODEL)
    for layout, key in (("G16", "g16"), ("G8xP2(M2)", "p2"), ("2xG8", "rep2")):
        r = prow("H200", 2, layout, 32)
        put(f"h200_2node_{key}_tps", _fmt(r["tokens_per_s"], 0), MODEL)
        put(f"h200_2node_{key}_eff", _fmt(r["efficiency"]), MODEL)
    put("h100_1node_fits", "no" if not prow("H100", 1, "G8", 1)["fits"] else "yes", MODEL)
    h100 = prow("H100", 2, "G16", 32)
    put("h100_2node_g16_tps", _fmt(h100["tokens_per_s"], 0), MODEL)
    f.update(h100_facts())
    from docs import proposal_facts  # imports this module: here, not at the top
    f.update(proposal_facts.facts())
    return f


def _serve_runs(path: Path) -> dict[str, dict]:
    return {r["name"]: r["summary"] for r in _load(path)["runs"] if "summary" in r}


def h100_facts() -> dict[str, Fact]:
    """The serving loop, FP8 prefill, its validation, the loader's read rate, dpa at one GPU (one H100)."""
    f: dict[str, Fact] = {}

    def put(name: str, text: str, src: Path) -> None:
        f[name] = Fact(text, _rel(src))

    sv = _serve_runs(SERVE)
    serve = _load(SERVE)
    put("serve_gpu", serve["machine"], SERVE)
    put("serve_prompts", str(serve["workload"]["n"]), SERVE)
    put("serve_static_tps", _fmt(sv["static-8"]["output_tokens_per_s"], 0), SERVE)
    put("serve_cont_tps", _fmt(sv["continuous"]["output_tokens_per_s"], 0), SERVE)
    put("serve_cont_x", _fmt(sv["continuous"]["output_tokens_per_s"] / sv["static-8"]["output_tokens_per_s"]), SERVE)
    put("serve_idle_static", _fmt(sv["static-8"]["gpu_idle_share"] * 100, 1), SERVE)
    put("serve_idle_cont", _fmt(sv["continuous"]["gpu_idle_share"] * 100, 1), SERVE)
    s8 = _serve_runs(SERVE_FP8)
    put("serve_a8_prompts", str(_load(SERVE_FP8)["workload"]["n"]), SERVE_FP8)
    put("serve_a8_tps", _fmt(s8["continuous"]["output_tokens_per_s"], 0), SERVE_FP8)
    put("serve_a16_tps", _fmt(s8["continuous-w8a16"]["output_tokens_per_s"], 0), SERVE_FP8)
    put("serve_a8_x", _fmt(s8["continuous"]["output_tokens_per_s"] / s8["continuous-w8a16"]["output_tokens_per_s"]),
        SERVE_FP8)
    reps = [_load(f)["rows"] for f in FP8_REPEATS]  # the TMA launch's ratio over the repeats
    # the ws launch's FP8 rows and the dequantized rows of the same call
    pre = [r for r in _load(FP8_PREFILL)["rows"] if r["tag"] == "native-1gpu-fp8"] + \
        [r for r in _load(FP8_PREFILL_DQ)["rows"] if r["tag"] == "native-1gpu-fp8-dequant"]
    tma = _load(FP8_PREFILL_DQ)["rows"]  # that call's TMA launch
    for b in (32, 128):
        a, d = _bench_row(pre, "native-1gpu-fp8", b), _bench_row(pre, "native-1gpu-fp8-dequant", b)
        put(f"fp8_prefill_b{b}_tps", _fmt(a["prefill_tok_s"], 0), FP8_PREFILL)
        put(f"dq_prefill_b{b}_tps", _fmt(d["prefill_tok_s"], 0), FP8_PREFILL_DQ)
        put(f"fp8_prefill_b{b}_tokens", str(b * a["prompt"]), FP8_PREFILL)
        put(f"fp8_prefill_b{b}_x", _fmt(a["prefill_tok_s"] / d["prefill_tok_s"]), FP8_PREFILL)
        put(f"tma_prefill_b{b}_x", _fmt(_bench_row(tma, "native-1gpu-fp8", b)["prefill_tok_s"] / d["prefill_tok_s"]),
            FP8_PREFILL_DQ)
        put(f"tma_prefill_b{b}_reps_x", _rng([_bench_row(r, "native-1gpu-fp8", b)["prefill_tok_s"] /
                                              _bench_row(r, "native-1gpu-fp8-dequant", b)["prefill_tok_s"]
                                              for r in reps]), FP8_REPEATS[0])
    rows = _load(FP8_BENCH)["rows"]
    for b in (1, 128):
        put(f"fp8_decode_b{b}_ms", _fmt(_bench_row(rows, "native-1gpu-fp8", b)["decode_ms_step"]), FP8_BENCH)
        put(f"dq_decode_b{b}_ms", _fmt(_bench_row(rows, "native-1gpu-fp8-dequant", b)["decode_ms_step"]), FP8_BENCH)
    ratios = [_bench_row(rows, "native-1gpu-fp8-bytes", b)["decode_ms_step"] /
              _bench_row(rows, "native-1gpu-fp8-w8a16", b)["decode_ms_step"] for b in (1, 32, 128)]
    put("bytes_decode_x", _rng(ratios), FP8_BENCH)
    # one 16,384-token prefill under torch.profiler: GPU kernel time by kind
    a, d = _bench_row(pre, "native-1gpu-fp8", 128), _bench_row(pre, "native-1gpu-fp8-dequant", 128)

    def kernels(r: dict, pred) -> float:
        return sum(k["ms"] for k in r["prefill_kernels"] if pred(k["name"]))
    grouped_fp8 = kernels(a, lambda n: "w8a8" in n or "grouped" in n)
    grouped_bf16 = kernels(d, lambda n: "cutlass" in n)
    dense_fp8 = kernels(a, lambda n: "Ablk128" in n)  # cuBLAS block-scaled FP8
    shared = kernels(a, lambda n: n.startswith("nvjet") and "Ablk128" not in n)  # bf16 GEMMs both runs have
    dense_bf16 = kernels(d, lambda n: n.startswith("nvjet")) - shared
    put("pf_fp8_ms", _fmt(a["prefill_kernel_ms"], 1), FP8_PREFILL)
    put("pf_dq_ms", _fmt(d["prefill_kernel_ms"], 1), FP8_PREFILL_DQ)
    put("pf_fp8_grouped_ms", _fmt(grouped_fp8, 1), FP8_PREFILL)
    put("pf_dq_grouped_ms", _fmt(grouped_bf16, 1), FP8_PREFILL_DQ)
    put("pf_grouped_x", _fmt(grouped_bf16 / grouped_fp8), FP8_PREFILL)
    put("pf_fp8_dense_ms", _fmt(dense_fp8, 1), FP8_PREFILL)
    put("pf_dq_dense_ms", _fmt(dense_bf16, 1), FP8_PREFILL_DQ)
    put("pf_glue_ms", _fmt(d["prefill_kernel_ms"] - grouped_bf16 - dense_bf16 - shared, 0), FP8_PREFILL_DQ)
    v = next(r for r in _load(VALID_A8)["rows"] if r["config"] == "slice" and r["weights"] == "fp8")
    put("a8_top1", _fmt(v["top1_agreement"], 3), VALID_A8)
    put("a8_kl", _fmt(v["kl_mean"], 3), VALID_A8)
    v = next(r for r in _load(VALID_A16_VS_A8)["rows"] if r["config"] == "slice" and r["weights"] == "fp8")
    put("a16r_top1", _fmt(v["top1_agreement"], 3), VALID_A16_VS_A8)
    put("a16r_kl", _fmt(v["kl_mean"], 3), VALID_A16_VS_A8)
    from validation.compare import thresholds_for
    v = next(r for r in _load(VALID_RECIPE)["rows"] if r["config"] == "slice" and r["weights"] == "fp8")
    put("a8rel_top1", _fmt(v["top1_agreement"], 3), VALID_RECIPE)
    put("a8rel_kl", _fmt(v["kl_mean"], 3), VALID_RECIPE)
    put("a8rel_result", "passes" if v["passed"] else "fails", VALID_RECIPE)
    put("recipe_top1", _fmt(v["recipe"]["top1_agreement"], 3), VALID_RECIPE)
    put("recipe_kl", _fmt(v["recipe"]["kl_mean"], 3), VALID_RECIPE)
    put("a8rel_min_top1", _fmt(thresholds_for(v["precision"], v["recipe"])[1].min_top1, 3), VALID_RECIPE)
    ld = _load(LOAD)
    cold = next(r for r in ld["runs"] if r["cache"] == "cold")
    warm = next(r for r in ld["runs"] if r["cache"] == "warm")
    put("load_gb", _fmt(ld["checkpoint_bytes"] / 1e9, 1), LOAD)
    put("load_cold_gbs", _fmt(cold["load"]["gb_s"]), LOAD)
    put("load_raw_gbs", _fmt(cold["raw"]["gb_s"]), LOAD)
    put("load_warm_gbs", _fmt(warm["load"]["gb_s"]), LOAD)
    dp = _load(DPA_G1)["rows"]
    for tag, key in (("native-1gpu-fp8", "tp"), ("native-1gpu-dpa-fp8", "dpa")):
        put(f"{key}_g1_b128_ms", _fmt(_bench_row(dp, tag, 128)["decode_ms_step"]), DPA_G1)
    put("dpa_batch", "128", DPA_G1)
    from spmd.config.errors import FP8_BLOCK
    put("fp8_block", str(FP8_BLOCK), ROOT / "spmd/config/errors.py")
    # the result files the figures' captions name
    for key, path in (("src_bench", BENCH), ("src_sweep", SWEEP_GPU), ("src_serve", SERVE), ("src_fp8", FP8_BENCH),
                      ("src_model", MODEL), ("src_marks", SWEEP_MARKS), ("src_fpgemm", FP8_GEMMS)):
        put(key, f"`{_rel(path)}`", path)
    return f


def sweep_facts() -> dict[str, Fact]:
    """The scaling sweeps (GPU and CPU), the orchestration pairs and the timers' overhead."""
    f: dict[str, Fact] = {}
    gpu, marks, cpu = _load(SWEEP_GPU), _load(SWEEP_MARKS), _load(SWEEP_CPU)
    runs, src = gpu["runs"], _rel(SWEEP_GPU)
    for k in ("prompts", "new_tokens", "batch_size"):
        f[f"sweep_{k}"] = Fact(str(gpu[k]), src)
    eff = {r["layout"]: r for s in ("group", "replica") for r in gpu["series"][s]}
    eff.update({r["layout"]: r for r in gpu["series"]["orchestration"]})  # against G1 too
    for name, key in (("G2", "g2"), ("G4", "g4"), ("2xG1", "r2"), ("4xG1", "r4"), ("P2", "p2"), ("2xG2", "r2g2"),
                      ("4xG1+O", "r4o")):
        f[f"sweep_{key}_eff"] = Fact(_fmt(eff[name]["efficiency"]), src)
    for name, key in (("2xG1", "r2"), ("G2", "g2")):
        a, b = runs[name], runs[f"{name}+O"]
        f[f"orch_{key}_gen"] = Fact(_fmt(b["tokens_per_s"] / a["tokens_per_s"]), src)
        f[f"orch_{key}_job"] = Fact(_fmt(b["job_tokens_per_s"] / a["job_tokens_per_s"]), src)
        f[f"orch_{key}_idle_inline"] = Fact(_fmt(a["model_idle_pct"], 1), src)
        f[f"orch_{key}_idle_dedicated"] = Fact(_fmt(b["model_idle_pct"], 1), src)
    for name, key in (("G2", "g2"), ("G4", "g4"), ("P2", "p2")):
        f[f"comm_{key}_pct"] = Fact(_fmt(marks["runs"][name]["decode_comm_pct"], 0), _rel(SWEEP_MARKS))
    c = {r["layout"]: r for s in ("group", "replica", "orchestration") for r in cpu["series"][s]}
    f["cpu_cores"] = Fact(str(cpu["cpus"]), _rel(SWEEP_CPU))
    f["cpu_g2_eff"] = Fact(_fmt(c["G2"]["efficiency"]), _rel(SWEEP_CPU))
    f["cpu_r2_eff"] = Fact(_fmt(c["2xG1"]["efficiency"]), _rel(SWEEP_CPU))
    f["cpu_r2_orch"] = Fact(_fmt(c["2xG1+O"]["vs_inline"]), _rel(SWEEP_CPU))
    # the dispatch order, one H200, one call, round 2: longest first (this code) against input order
    srt, inp = _load(ORDER["sorted"])["runs"], _load(ORDER["input"])["runs"]
    s_src, i_src = _rel(ORDER["sorted"]), _rel(ORDER["input"])
    a, b = inp["G1+O"], srt["G1+O"]
    f["order_gen"] = Fact(_fmt(b["tokens_per_s"] / a["tokens_per_s"]), f"{s_src} (over {i_src})")
    f["order_decode_sorted"], f["order_decode_input"] = Fact(_fmt(b["decode_ms"]), s_src), Fact(_fmt(a["decode_ms"]), i_src)
    f["order_prefill_sorted"] = Fact(_fmt(b["per_rank"]["1"]["prefill"]["compute"], 1), s_src)
    f["order_prefill_input"] = Fact(_fmt(a["per_rank"]["1"]["prefill"]["compute"], 1), i_src)
    f["order_vs_inline_gen"] = Fact(_fmt(b["tokens_per_s"] / srt["G1"]["tokens_per_s"]), s_src)
    f["order_vs_inline_job"] = Fact(_fmt(b["job_tokens_per_s"] / srt["G1"]["job_tokens_per_s"]), s_src)
    f["timers_graph_pct"] = Fact(_fmt(_load(TIMERS_GRAPH)["overhead_pct"], 1), _rel(TIMERS_GRAPH))
    f["timers_layer_pct"] = Fact(_fmt(_load(TIMERS_LAYER)["overhead_pct"], 1), _rel(TIMERS_LAYER))
    return f


def tables(f: dict[str, Fact]) -> dict[str, str]:
    """Typst tables, built from the result files."""
    def table(cols: list[str], rows: list[list[str]]) -> str:
        cells = ", ".join(f"[{c}]" for c in cols) + ",\n" + ",\n".join(", ".join(f"[{c}]" for c in r) for r in rows)
        return f"#table(columns: {len(cols)}, stroke: 0.4pt, inset: 4pt,\n{cells})"

    gpu = _load(VALID_GPU)
    vrows = [[r["config"], r["weights"], r["layout"], f"{r['exact_prompts']}/{r['n_prompts']}",
              _fmt(r["top1_agreement"], 3), _fmt(r["kl_mean"], 3), "pass" if r["passed"] else "FAIL"] for r in gpu["rows"]]
    bench = _load(BENCH)["rows"]
    brows = []
    for tag in ("native-1gpu-bf16", "native-1gpu-fp8", "native-2gpu-bf16", "native-2gpu-fp8", "hf-1gpu-bf16",
                "deepspeed-2gpu-bf16"):
        rs = {r["batch"]: r for r in bench if r.get("tag") == tag}
        brows.append([tag] + [f"{_fmt(rs[b]['decode_ms_step'])} ({_fmt(rs[b]['decode_vs_floor'], 1)}×)" for b in (1, 8, 32, 64)])
    model = _load(MODEL)
    mrows = [[v["tag"], v["layout"], str(v["batch"]), _fmt(v["measured_ms"]), _fmt(v["predicted_ms"]),
              f"{v['error'] * 100:+.0f} %"] for v in model["validation"]]
    prows = [[r["gpu"], str(r["nodes"]), r["layout"], str(r["batch"]), _fmt(r["mem_gib_per_gpu"], 0),
              _fmt(r["step_ms"], 1) if r["fits"] else "does not fit", _fmt(r["tokens_per_s"], 0) if r["fits"] else "–",
              _fmt(r["efficiency"]) if r["fits"] else "–"] for r in model["projection"] if r["batch"] in (1, 32)]
    sweep = _load(SWEEP_GPU)
    gpus = {r["layout"]: r["ranks"] for series in sweep["series"].values() for r in series}
    srows = [[n, str(gpus[n]), _fmt(r["tokens_per_s"], 0), _fmt(r["decode_ms"]), _fmt(r["job_tokens_per_s"], 0),
              _fmt(r["model_idle_pct"], 0), "yes" if r.get("warmup") else "no"] for n, r in sweep["runs"].items()]
    from docs import proposal_facts
    return {**proposal_facts.tables(f),
        "validation_gpu": table(["checkpoint", "weights", "layout", "exact", "top-1", "KL mean", "result"], vrows),
        "bench": table(["configuration", "batch 1", "batch 8", "batch 32", "batch 64"], brows),
        "model_validation": table(["measured row", "layout", "batch", "measured ms", "predicted ms", "error"], mrows),
        "projection": table(["GPU", "nodes", "layout", "batch", "GiB/GPU", "step ms", "tokens/s", "efficiency"], prows),
        "sweep": table(["layout", "GPUs", "tokens/s", "decode ms", "job tokens/s", "idle %", "warm-up"], srows),
    }


def render(template: str, f: dict[str, Fact], t: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key.startswith("table:"):
            return t[key.removeprefix("table:")]
        return f[key].text
    return PLACEHOLDER.sub(sub, template)


PAPER_FILES = (ROOT / "docs/paper/refs.yml",)  # beside the rendered sources: the bibliography


def build(out: Path) -> list[Path]:
    import shutil

    import typst

    from docs import figures

    f = facts()
    t = tables(f)
    out.mkdir(parents=True, exist_ok=True)
    figures.make(out / "figures")  # the paper's figures, drawn from the result files
    for extra in PAPER_FILES:
        shutil.copy(extra, out / extra.name)
    made = []
    for name, path in DOCS.items():
        src = out / f"{name}.typ"
        src.write_text(render(path.read_text(), f, t))
        pdf = out / f"{name}.pdf"
        typst.compile(str(src), output=str(pdf), root=str(out))
        made.append(pdf)
    return made


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m docs.build", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "build" / "docs")
    a = p.parse_args(argv)
    for pdf in build(a.out):
        print(f"wrote {pdf} ({pdf.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
