"""The EuroHPC proposal's facts and tables (docs/proposal/proposal.typ.in), every number from a result file, the
planner, or a documented input of this module.

    facts() -> {name: Fact}      tables(facts()) -> {name: Typst table}

- The system (``SYSTEM``) is an input: one named node type, its public sources in ``SOURCES``.
- Which layouts of DeepSeek-V3.1 (FP8) fit those nodes, and their decode tokens/s, come from the project's own
  planner and performance model (``spmd.plan``: the same code as ``python -m spmd.plan --config
  inputs/models/v3.1-671b.json --gpu-mem 64 --gpus-per-node 4 --hbm 1.6 --json``): projections, not measurements.
- The experiment plan (``PLAN``) is a choice. Each request line's node-hours are
  (prefill s + decode s + load s, each rounded to whole seconds) x nodes x runs / 3600, rounded to tenths; the
  total is the sum of the rounded lines, times the stated margin, rounded up to ``PLAN["round_to"]``; every
  printed sum and ratio is exact (tests/unit/test_proposal.py recomputes them).
- Load time: the measured cold read rate of the program's loader (traces/results/load/), per rank for the bytes
  the planner says it holds, capped by an assumed aggregate file-system share (``LOAD``).
All fact names start with ``p_`` and table names with ``p_``, so they merge with docs.build's without clashes.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

from docs.build import (DPA_G1, FP8_BENCH, FP8_PREFILL, FP8_PREFILL_DQ, FULL_CFG, LOAD, ROOT, SERVE, SLICE_CFG, VALID_A8,
                        VALID_CPU, Fact, _fmt, _load, _rel)

# --- the system: an input, not a result -------------------------------------------------------------------------
# MareNostrum 5, accelerated partition (ACC), Barcelona Supercomputing Center. Per node: 2 Intel Sapphire Rapids
# CPUs and 4 NVIDIA H100 (SXM) GPUs (BullSequana XH3000: heise.de, SOURCES). The 64 GB of HBM2e per GPU and the
# 4 x NDR200 InfiniBand ports per node (800 Gb/s = 100 GB/s one way) are BSC's published node description
# (bsc.es/supportkc/docs/MareNostrum5, not retrieved in our search: the figures docs/cluster-guide.md and
# docs/performance.md already plan with; to be re-checked at submission). hbm_tbps 1.6 is the project's stated
# assumption for the 64 GB HBM2e parts (docs/performance.md), not a datasheet figure; nvlink_gbps 450 one way
# is NVLink 4 on H100 SXM (the planner's default, a per-GPU vendor figure; a four-GPU board without NVSwitch
# gives less per peer pair: work package C measures it). The planner keeps 10 % of the GPU memory unused
# (spmd.plan.memory.USABLE_FRACTION), which also covers the difference between "64 GB" and what CUDA reports.
SYSTEM = {"name": "MareNostrum 5", "partition": "ACC", "site": "Barcelona Supercomputing Center (BSC)",
          "gpu": "NVIDIA H100 SXM, 64 GB HBM2e", "gpus_per_node": 4, "gpu_mem_gib": 64.0, "hbm_tbps": 1.6,
          "nvlink_gbps": 450.0, "node_gbps": 100.0, "network": "4 × InfiniBand NDR200 per node",
          "cpus": "2 × Intel Xeon (Sapphire Rapids)", "fs": "IBM Storage Scale (GPFS)"}
SOURCES = (
    ("MareNostrum 5 nodes: BullSequana XH3000, two Sapphire Rapids and four H100 per node; IBM storage, about "
     "200 PB high-performance and 400 PB archive",
     "heise.de/news/MareNostrum-5-EU-Supercomputer-mit-Intel-Sapphire-Rapids-und-Nvidia-Hopper-7154702.html"),
    ("MareNostrum 5 partitions: GPP (CPU) and ACC (Sapphire Rapids + H100), plus two NGT partitions",
     "hardwareluxx.de/index.php/news/allgemein/wirtschaft/58977-supercomputer-nutzt-gleich-mehrere-neue-cpu-und-gpu-generationen.html"),
    ("MareNostrum 5 file systems: GPFS /gpfs/home, /gpfs/projects, /gpfs/scratch, a local SSD per node; no backup",
     "bsc.es/supportkc/docs/MareNostrum5/storage"),
    ("64 GB HBM2e per H100 and 4 × NDR200 per node: BSC's node description (not retrieved here; the figures "
     "this repository's planner guides use, docs/cluster-guide.md)", "bsc.es/supportkc/docs/MareNostrum5"),
    ("The call: EuroHPC JU AI and Data-Intensive Applications Access, for ethical AI, machine learning and "
     "data-intensive applications, with a focus on foundation models and generative AI",
     "europapact.frl/subsidieprogrammas/eurohpc-ju"),
    ("EuroHPC access proposals: an online form and a \"Project Scope and Plan\" document, administrative check, "
     "peer review (Regular Access; the AI call's own template and page limit were not found)",
     "prace-ri.eu/regular-access"),
    ("DeepSeek-V3.1 weights: MIT licence (the licence text of the model's Ollama listing and the Hub "
     "derivatives' cards; the Hub card itself not retrieved here)", "ollama.com/library/deepseek-v3.1"),
    ("vLLM's DeepSeek-V3.1 recipe: one node of eight H200, tensor + expert parallel",
     "docs.vllm.ai/projects/recipes/en/stable/DeepSeek/DeepSeek-V3_1.html"),
)

# --- the experiment plan: a choice ------------------------------------------------------------------------------
# lines: (layout as the planner names it, nodes, decode rows of one model group, workload). Workload "decode":
# WAVES x rows x replicas prompts of input_tokens, new_tokens each (batch 1: BATCH1_PROMPTS prompts): the decode
# study. Workload "chat": the measured serving workload's mean input and output tokens per request (SERVE),
# CHAT_PROMPTS requests, through continuous batching (its decode approximated by the fixed-batch projection at
# that many rows).
PLAN = {"repeats": 3, "waves": 16, "input_tokens": 128, "new_tokens": 256, "batch1_prompts": 64,
        "chat_prompts": 2048, "context": 4096, "margin": "2", "round_to": 100,
        "lines": (("G16", 4, 1, "decode"), ("G16", 4, 32, "decode"), ("G32", 8, 32, "decode"),
                  ("G2xP8(M8)", 4, 32, "decode"), ("G2xP8(M8)", 4, 256, "decode"), ("G4xP4(M4)", 4, 128, "decode"),
                  ("G4xP8(M8)", 8, 256, "decode"),
                  ("dpaG32", 8, 32, "decode"), ("dpaG32", 8, 256, "decode"), ("dpaG64", 16, 256, "decode"),
                  ("2xG16", 8, 32, "decode"), ("2xG2xP8(M8)", 8, 256, "decode"), ("2xdpaG32", 16, 256, "decode"),
                  ("4xG16", 16, 32, "decode"),
                  ("G2xP8(M8)", 4, 256, "chat"), ("dpaG32", 8, 256, "chat"), ("2xG16", 8, 32, "chat"))}
FAMILIES = ("tp group across nodes", "pipeline stages", "dpa (data-parallel attention + expert all-to-all)",
            "replicas")  # the layout families the scientific case compares: each has request lines
PLANNER_NODES = range(1, 17)

# --- loading the checkpoint: measured rates, one stated assumption ------------------------------------------------
LOAD_FILE = LOAD  # docs.build's: the paper reads the same measurement
LOAD_VM_GLOB = "cpu-*.json"  # a CPU machine's measurement (raw read at least), used when present (beside LOAD_FILE)
# ASSUMPTION (not a measurement, not a published figure): one of our jobs gets at most this aggregate read rate
# from the parallel file system. The GPFS's published bandwidth was not found in the sources searched; 40 GB/s
# is a deliberately modest share for one job on a system of this size, to be replaced by the site's figure.
FS_JOB_GBPS = 40.0

# --- other result files ---------------------------------------------------------------------------------------
# (the paper's files, docs/build.py: one place for each result the two documents share)
PREFILL = FP8_BENCH
PREFILL_TAG, PREFILL_BATCH = "native-1gpu-fp8-w8a16", 32  # the validated weight-only path, 32 x 128 tokens
VALID_H100 = VALID_A8
TRACE = ROOT / "traces/results/gpu/slice-bf16-native-2.h5"  # an eager 2-rank trace: bytes and events per step
THIS = Path(__file__)

# --- the work plan: a choice ---------------------------------------------------------------------------------
# (letter, name, first month, last month, what it does, milestone, node-hours: "decode" / "chat" lines or "margin")
WORKPLAN = (
    ("A", "Bring-up and validation", 1, 2,
     "install (venv or the Apptainer image), fetch and checksum the checkpoint, the loader's rate on GPFS, first "
     "multi-node run (G2xP8 on four nodes), tokens of every family compared with each other and with the "
     "FP8-activation reference", "first multi-node GPU run, traced", "margin"),
    ("B", "Layout matrix", 3, 6, "the decode lines of the request table, three runs each, traced per rank",
     "matrix complete: tokens/s, step time, communication share per layout", "decode"),
    ("C", "Serving and communication", 5, 8,
     "the chat-workload lines; NCCL all-reduce and all-to-all curves across nodes (`traces/comm_bench.py`); "
     "Nsight Systems windows", "measured link parameters replace the stated ones", "chat"),
    ("D", "Model refit and planner", 7, 10, "refit the performance model to the multi-node rows, re-validate, "
     "update the planner's tables for EuroHPC node types", "prediction error reported per family", "margin"),
    ("E", "Publication", 9, 12, "paper, result files, code release", "paper submitted; data and code public",
     "none"),
)


@dataclass(frozen=True)
class Line:
    """One line of the request: a layout on its nodes, the workload, the projected and measured inputs."""

    family: str
    layout: str
    nodes: int
    gpus: int
    rows: int               # decode rows of one model group
    replicas: int
    workload: str
    prompts: int
    input_tokens: int
    new_tokens: int
    tokens_per_s: float     # projected (spmd.plan.perf)
    step_ms: float
    gib_per_gpu: float      # the planner's total: weights + latent cache + workspace
    weights_gib: float
    prefill_s: int
    decode_s: int
    load_s: int
    run_s: int
    runs: int
    tenths: int             # node-hours x 10, rounded half up

    @property
    def node_hours(self) -> str:
        return f"{self.tenths // 10}.{self.tenths % 10}"


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def family(row: dict, gpus_per_node: int) -> str:
    """The family of a planner row, as the scientific case names them."""
    if row["R"] > 1:
        return FAMILIES[3]
    if row["family"] == "dpa":
        return FAMILIES[2]
    if row["P"] > 1:
        return FAMILIES[1]
    return FAMILIES[0] if row["G"] > gpus_per_node else "tp group in one node"


def machine():
    from spmd.plan.planner import Machine
    return Machine(SYSTEM["gpu_mem_gib"], SYSTEM["gpus_per_node"], SYSTEM["hbm_tbps"], SYSTEM["node_gbps"],
                   SYSTEM["nvlink_gbps"])


def plans() -> dict[int, dict]:
    """The planner's answer for the system at every row count the plan uses (and batch 1, 32, 256 for the
    fewest-nodes facts): {rows: plan document}."""
    from spmd.config import ModelArgs
    from spmd.plan.planner import plan

    m = ModelArgs.from_config(_load(FULL_CFG))
    rows = sorted({r for _, _, r, _ in PLAN["lines"]} | {1, 32, 256})
    return {r: plan(m, machine(), PLANNER_NODES, "fp8", r, PLAN["context"]) for r in rows}


def checkpoint_bytes() -> tuple[float, float]:
    """(bytes the program reads: layers 0..L-1, embedding and head; bytes of the files with the MTP module, layer
    L, counted as one more MoE layer + its projection and copies of the embedding and head), from the config:
    FP8 tensors at 1 byte + a float32 scale per 128 x 128 block, the router gate and the vocabulary in bf16."""
    from spmd.config import ModelArgs
    from spmd.plan.memory import ACT_BYTES, WEIGHT_BYTES, layer_tensors

    m = ModelArgs.from_config(_load(FULL_CFG))
    fp8 = WEIGHT_BYTES["fp8"]

    def layer(i: int) -> float:
        return sum(n * (ACT_BYTES if name == "gate" else fp8) for name, n in layer_tensors(m, i).items())
    vocab = ACT_BYTES * m.vocab_size * m.dim
    read = sum(layer(i) for i in range(m.n_layers)) + 2 * vocab
    mtp = layer(m.n_layers) + 2 * m.dim * m.dim * fp8 + 2 * vocab
    return read, read + mtp


def _cold_rate(path: Path) -> dict:
    doc = _load(path)
    cold = next(r for r in doc["runs"] if r["cache"] == "cold")
    warm = next((r for r in doc["runs"] if r["cache"] == "warm"), None)
    return {"load": cold["load"]["gb_s"], "raw": cold["raw"]["gb_s"], "warm": warm["load"]["gb_s"] if warm else None,
            "gb": doc["checkpoint_bytes"] / 1e9, "fs": doc.get("mount", {}).get("fstype", "?"),
            "machine": doc.get("machine", "?")}


def load_seconds(weights_gib: float, gpus: int, rate_gbs: float) -> float:
    """Each rank reads the bytes it holds (the planner's weights per GPU: an upper bound, since kv_b_proj and
    dequantized tensors are held in bf16 but read in FP8) at the measured per-process rate, all ranks at once,
    the job's aggregate capped at FS_JOB_GBPS."""
    gb = weights_gib * 2**30 / 1e9
    return max(gb / rate_gbs, gb * gpus / FS_JOB_GBPS)


def prefill_rate() -> float:
    """Prompt tokens/s of the whole model on one GPU, extrapolated: the FP8 slice's measured prefill (one H100,
    weight-only FP8 path, 32 x 128 tokens) x (slice layers + 1) / (full layers + 1). A dense layer and a MoE
    layer cost the same per token (3 x 7168 x 18432 = 9 x 3 x 7168 x 2048 multiply-adds), and no speed-up from
    the layout's other GPUs is counted: a bound for compute, but cross-node collectives in prefill are not
    modelled (risks)."""
    row = next(r for r in _load(PREFILL)["rows"] if r["tag"] == PREFILL_TAG and r["batch"] == PREFILL_BATCH)
    return row["prefill_tok_s"] * (_load(SLICE_CFG)["num_hidden_layers"] + 1) / (_load(FULL_CFG)["num_hidden_layers"] + 1)


def chat_means() -> tuple[float, float]:
    """Mean input and output tokens per request of the measured serving workload."""
    s = next(r["summary"] for r in _load(SERVE)["runs"] if r["name"] == "continuous")
    return s["input_tokens"] / s["prompts"], s["output_tokens"] / s["prompts"]


def request_lines(docs: dict[int, dict] | None = None) -> list[Line]:
    docs = plans() if docs is None else docs
    rate, pf = _cold_rate(LOAD_FILE)["load"], prefill_rate()
    chat_in, chat_out = chat_means()
    out = []
    for layout, nodes, rows, workload in PLAN["lines"]:
        hits = [r for r in docs[rows]["rows"] if r["layout"] == layout and r["nodes"] == nodes]
        if not hits:
            raise ValueError(f"PLAN line {layout} on {nodes} nodes at {rows} rows: the planner finds it does not fit")
        r = hits[0]
        if workload == "chat":
            prompts, inp, new = PLAN["chat_prompts"], chat_in, chat_out
        else:
            prompts = PLAN["batch1_prompts"] if rows == 1 else PLAN["waves"] * rows * r["R"]
            inp, new = PLAN["input_tokens"], PLAN["new_tokens"]
        prefill = _half_up(prompts * inp / pf)
        decode = _half_up(prompts * new / r["tokens_per_s"])
        load = _half_up(load_seconds(r["weights_gib"], r["gpus"], rate))
        run = prefill + decode + load
        tenths = (run * nodes * PLAN["repeats"] * 10 + 1800) // 3600  # half up, integers only
        out.append(Line(family(r, SYSTEM["gpus_per_node"]), layout, nodes, r["gpus"], rows, r["R"], workload, prompts,
                        _half_up(inp), _half_up(new), r["tokens_per_s"], r["step_ms"], r["total_gib"],
                        r["weights_gib"], prefill, decode, load, run, PLAN["repeats"], tenths))
    return out


def totals(lines: list[Line]) -> dict:
    """The sum of the lines (tenths), the margin, the request (whole node-hours, rounded up)."""
    total = sum(x.tenths for x in lines)
    margin = Fraction(PLAN["margin"])
    with_margin = total * margin  # tenths
    request = math.ceil(with_margin / 10 / PLAN["round_to"]) * PLAN["round_to"]
    by_workload = {w: sum(x.tenths for x in lines if x.workload == w) for w in ("decode", "chat")}
    return {"tenths": total, "margin": margin, "with_margin_tenths": with_margin, "request": request,
            "by_workload": by_workload}


def _tenths_text(t: Fraction | int) -> str:
    t = Fraction(t)
    if t.denominator == 1:
        n = int(t)
        return f"{n // 10}.{n % 10}"
    return f"{float(t) / 10:.2f}"


def trace_volume(lines: list[Line]) -> dict:
    """An upper bound of the trace bytes: every run traced eagerly per layer (graph-replayed runs record one
    event per step), bytes and events per layer and step as in a stored eager 2-GPU trace, every rank holding
    all layers (pipelines hold fewer), rank files + merged.h5 (x 2)."""
    import h5py
    import numpy as np

    with h5py.File(TRACE, "r") as h:
        ev = h["events"][:]
    dec = ev[ev["phase"] == b"decode"]
    ranks, steps = len(np.unique(ev["rank"])), len(np.unique(dec["step"]))
    slice_layers = _load(SLICE_CFG)["num_hidden_layers"]
    per_layer_step = len(dec) / (ranks * steps * (slice_layers + 1))
    bytes_per_event = TRACE.stat().st_size / len(ev)
    full = _load(FULL_CFG)["num_hidden_layers"] + 1
    events = sum(x.runs * math.ceil(x.prompts / (x.rows * x.replicas)) * x.new_tokens * x.gpus * per_layer_step * full
                 for x in lines)
    return {"per_layer_step": per_layer_step, "bytes_per_event": bytes_per_event, "events": events,
            "bytes": 2 * events * bytes_per_event}


def _esc(text: str) -> str:
    """Free text as Typst markup: the characters that would start markup escaped."""
    return re.sub(r"([_*#@$<\\`])", r"\\\1", text)


def _vm_note(lines: list[Line]) -> tuple[str, str]:
    """A second machine's measured read rate, when traces/results/load/ has one: a sentence and its source."""
    found = sorted(LOAD_FILE.parent.glob(LOAD_VM_GLOB))
    if not found:
        return "", _rel(THIS)
    doc = _load(found[-1])
    cold = next(r for r in doc["runs"] if r["cache"] == "cold")
    raw = cold["raw"]["gb_s"]
    worst = max(lines, key=lambda x: x.weights_gib)
    at_vm = load_seconds(worst.weights_gib, worst.gpus, raw)
    how = ("the program's load was not run there: the slice dequantized to bf16 does not fit its memory"
           if cold["load"] is None else f"the program loaded at {_fmt(cold['load']['gb_s'])} GB/s")
    return (f" A second measurement, on the development machine ({_esc(doc.get('machine', '?'))}, "
            f"{_esc(doc.get('mount', {}).get('fstype', '?'))}), read the same files at {_fmt(raw)} GB/s cold ({how}): "
            f"at that rate the heaviest rank above would take {_fmt(at_vm, 0)} s instead of {worst.load_s} s.",
            _rel(found[-1]))


def facts() -> dict[str, Fact]:
    f: dict[str, Fact] = {}
    me = _rel(THIS)

    def put(name: str, text, src) -> None:
        f[name] = Fact(str(text), src if isinstance(src, str) else _rel(src))

    # the system and the call
    put("p_sys", SYSTEM["name"], me)
    put("p_sys_partition", SYSTEM["partition"], me)
    put("p_sys_site", SYSTEM["site"], me)
    put("p_sys_gpu", SYSTEM["gpu"], me)
    put("p_sys_gpus", SYSTEM["gpus_per_node"], me)
    put("p_sys_mem", _fmt(SYSTEM["gpu_mem_gib"], 0), me)
    put("p_sys_hbm", _fmt(SYSTEM["hbm_tbps"], 1), me)
    put("p_sys_nvlink", _fmt(SYSTEM["nvlink_gbps"], 0), me)
    put("p_sys_net", SYSTEM["network"], me)
    put("p_sys_net_gbps", _fmt(SYSTEM["node_gbps"], 0), me)
    put("p_sys_cpus", SYSTEM["cpus"], me)
    put("p_sys_fs", SYSTEM["fs"], me)
    put("p_sys_node_gib", _fmt(SYSTEM["gpu_mem_gib"] * SYSTEM["gpus_per_node"], 0), me)

    # the planner on the system
    docs = plans()
    src_plan = f"spmd/plan/planner.py ({_rel(FULL_CFG)}; SYSTEM in {me})"
    inp = docs[32]["inputs"]
    put("p_usable", _fmt(inp["fraction"] * inp["gpu_mem_gib"], 1), src_plan)
    put("p_fraction", _fmt(inp["fraction"], 1), src_plan)
    put("p_context", inp["context"], src_plan)
    for rows in (1, 32, 256):
        put(f"p_min_nodes_b{rows}", min(r["nodes"] for r in docs[rows]["rows"]), src_plan)
    put("p_nodes_max", PLANNER_NODES[-1], me)
    put("p_fit_count", sum(len(d["rows"]) for d in docs.values()), src_plan)
    m = _load(FULL_CFG)
    read, files = checkpoint_bytes()
    put("p_ckpt_read_gb", _fmt(read / 1e9, 0), f"{_rel(FULL_CFG)} (spmd/plan/memory.py)")
    put("p_ckpt_files_gb", _fmt(files / 1e9, 0), f"{_rel(FULL_CFG)} (spmd/plan/memory.py)")
    put("p_ckpt_read_gib", _fmt(read / 2**30, 0), f"{_rel(FULL_CFG)} (spmd/plan/memory.py)")
    put("p_mtp_layer", m["num_hidden_layers"], FULL_CFG)

    lines = request_lines(docs)
    t = totals(lines)
    put("p_repeats", PLAN["repeats"], me)
    put("p_waves", PLAN["waves"], me)
    put("p_input_tokens", PLAN["input_tokens"], me)
    put("p_new_tokens", PLAN["new_tokens"], me)
    put("p_batch1_prompts", PLAN["batch1_prompts"], me)
    put("p_chat_prompts", PLAN["chat_prompts"], me)
    chat_in, chat_out = chat_means()
    put("p_chat_in", _fmt(chat_in, 0), SERVE)
    put("p_chat_out", _fmt(chat_out, 0), SERVE)
    put("p_lines", len(lines), me)
    put("p_total", _tenths_text(t["tenths"]), me)
    put("p_margin", str(t["margin"]), me)
    put("p_with_margin", _tenths_text(t["with_margin_tenths"]), me)
    put("p_request", t["request"], me)
    put("p_round_to", PLAN["round_to"], me)
    put("p_sum", " + ".join(x.node_hours for x in lines), me)
    put("p_decode_hours", _tenths_text(t["by_workload"]["decode"]), me)
    put("p_chat_hours", _tenths_text(t["by_workload"]["chat"]), me)
    put("p_margin_hours", _tenths_text(t["with_margin_tenths"] - t["tenths"]), me)
    put("p_request_gpu_hours", t["request"] * SYSTEM["gpus_per_node"], me)
    load_share = Fraction(sum(x.load_s * x.nodes * x.runs for x in lines), sum(x.run_s * x.nodes * x.runs for x in lines))
    put("p_load_share", _fmt(float(load_share) * 100, 0), me)
    put("p_tokens_total_m", _fmt(sum(x.prompts * x.new_tokens * x.runs for x in lines) / 1e6, 1), me)
    ex = lines[0]
    put("p_ex_layout", ex.layout, me)
    put("p_ex_nodes", ex.nodes, me)
    put("p_ex_prefill", ex.prefill_s, me)
    put("p_ex_decode", ex.decode_s, me)
    put("p_ex_load", ex.load_s, me)
    put("p_ex_run", ex.run_s, me)
    put("p_ex_hours", ex.node_hours, me)
    for fam, key in zip(FAMILIES, ("tp", "pp", "dpa", "rep")):
        mine = [x for x in lines if x.family == fam]
        put(f"p_fam_{key}_lines", len(mine), me)
        best = max(mine, key=lambda x: x.tokens_per_s / x.gpus)
        put(f"p_fam_{key}_best", best.layout, src_plan)
    by = {(x.layout, x.nodes, x.rows): x for x in lines}
    for key, (lay, n, rows) in {"pp4": ("G2xP8(M8)", 4, 256), "dpa8": ("dpaG32", 8, 256), "tp4": ("G16", 4, 32),
                                "pp4b32": ("G2xP8(M8)", 4, 32), "rep8": ("2xG2xP8(M8)", 8, 256),
                                "tp8": ("G32", 8, 32), "dpa8b32": ("dpaG32", 8, 32)}.items():
        x = by[(lay, n, rows)]
        put(f"p_{key}_tps", _fmt(x.tokens_per_s, 0), src_plan)
        put(f"p_{key}_ms", _fmt(x.step_ms, 0), src_plan)
        put(f"p_{key}_gib", _fmt(x.gib_per_gpu, 1), src_plan)
    put("p_big_rows", 256, me)
    put("p_big_nodes", by[("dpaG32", 8, 256)].nodes, me)
    put("p_small_rows", 32, me)
    put("p_small_nodes", by[("G16", 4, 32)].nodes, me)
    put("p_wps", len(WORKPLAN), me)
    put("p_dpa_over_pp", _fmt(by[("dpaG32", 8, 256)].tokens_per_s / by[("2xG2xP8(M8)", 8, 256)].tokens_per_s, 1),
        src_plan)

    # loading and storage
    ld = _cold_rate(LOAD_FILE)
    put("p_load_cold", _fmt(ld["load"]), LOAD_FILE)
    put("p_load_raw", _fmt(ld["raw"]), LOAD_FILE)
    put("p_load_warm", _fmt(ld["warm"]), LOAD_FILE)
    put("p_load_gb", _fmt(ld["gb"], 1), LOAD_FILE)
    put("p_load_fs", ld["fs"], LOAD_FILE)
    put("p_fs_cap", _fmt(FS_JOB_GBPS, 0), me)
    put("p_load_min", min(x.load_s for x in lines), me)
    put("p_load_max", max(x.load_s for x in lines), me)
    capped = [x for x in lines if x.gpus * ld["load"] > FS_JOB_GBPS]
    put("p_load_capped", len(capped), me)
    put("p_full_load_min", _fmt(read / 1e9 / ld["load"] / 60, 0), LOAD_FILE)
    note, src = _vm_note(lines)
    put("p_load_vm_note", note, src)
    tv = trace_volume(lines)
    put("p_trace_ev_layer", _fmt(tv["per_layer_step"], 1), TRACE)
    put("p_trace_b_event", _fmt(tv["bytes_per_event"], 0), TRACE)
    put("p_trace_gb", _fmt(tv["bytes"] / 1e9, 0), f"{_rel(TRACE)} ({me})")
    storage = files / 1e9 + tv["bytes"] / 1e9
    put("p_storage_gb", _fmt(storage, 0), me)
    put("p_storage_request_tb", math.ceil(storage * 2 / 1000), me)

    # what is built and measured (H100 files; the H200 ones come from docs.build.facts)
    pf = prefill_rate()
    row = next(r for r in _load(PREFILL)["rows"] if r["tag"] == PREFILL_TAG and r["batch"] == PREFILL_BATCH)
    put("p_prefill_slice", _fmt(row["prefill_tok_s"], 0), PREFILL)
    put("p_prefill_full", _fmt(pf, 0), PREFILL)
    put("p_prefill_tokens", PREFILL_BATCH * row["prompt"], PREFILL)
    rows_ = _load(PREFILL)["rows"]

    def bench(tag: str, b: int) -> dict:
        return next(r for r in rows_ if r["tag"] == tag and r["batch"] == b)
    # the latest FP8 prefill (the ws launch) against the dequantized model in the same call
    a8 = next(r for r in _load(FP8_PREFILL)["rows"] if r["batch"] == PREFILL_BATCH and r["tag"] == "native-1gpu-fp8")
    dq = next(r for r in _load(FP8_PREFILL_DQ)["rows"]
              if r["batch"] == PREFILL_BATCH and r["tag"] == "native-1gpu-fp8-dequant")
    put("p_a8_prefill_x", _fmt(a8["prefill_tok_s"] / dq["prefill_tok_s"]), FP8_PREFILL)
    ratios = [bench("native-1gpu-fp8-bytes", b)["decode_ms_step"] / bench("native-1gpu-fp8-w8a16", b)["decode_ms_step"]
              for b in (1, 32, 128)]
    put("p_bytes_x", f"{_fmt(min(ratios))}–{_fmt(max(ratios))}", PREFILL)
    sv = {r["name"]: r["summary"] for r in _load(SERVE)["runs"] if "summary" in r}
    put("p_serve_gpu", _load(SERVE)["machine"], SERVE)
    put("p_serve_prompts", sv["continuous"]["prompts"], SERVE)
    put("p_serve_cont", _fmt(sv["continuous"]["output_tokens_per_s"], 0), SERVE)
    put("p_serve_static", _fmt(sv["static-8"]["output_tokens_per_s"], 0), SERVE)
    put("p_serve_x", _fmt(sv["continuous"]["output_tokens_per_s"] / sv["static-8"]["output_tokens_per_s"]), SERVE)
    a8 = next(r for r in _load(VALID_H100)["rows"] if r["config"] == "slice" and r["weights"] == "fp8")
    put("p_a8_top1", _fmt(a8["top1_agreement"], 3), VALID_H100)
    put("p_a8_kl", _fmt(a8["kl_mean"], 3), VALID_H100)
    put("p_a8_exact", f"{a8['exact_prompts']} of {a8['n_prompts']}", VALID_H100)
    dpa = [r for r in _load(VALID_CPU)["rows"] if "D" in r["layout"] and r["dtype"] == "fp32"]
    put("p_dpa_cpu_rows", len(dpa), VALID_CPU)
    put("p_dpa_cpu_exact", sum(r["exact_prompts"] == r["n_prompts"] for r in dpa), VALID_CPU)
    put("p_dpa_cpu_layouts", ", ".join(dict.fromkeys(r["layout"] for r in dpa)), VALID_CPU)
    g1 = {r["tag"]: r["decode_ms_step"] for r in _load(DPA_G1)["rows"] if r["batch"] == 128}
    put("p_dpa_g1_ms", _fmt(g1["native-1gpu-dpa-fp8"]), DPA_G1)
    put("p_tp_g1_ms", _fmt(g1["native-1gpu-fp8"]), DPA_G1)
    put("p_months", max(w[3] for w in WORKPLAN), me)
    put("p_nodes_lo", min(x.nodes for x in lines), me)
    put("p_nodes_hi", max(x.nodes for x in lines), me)
    put("p_hour_s", 3600, me)
    f["_p_lines"] = Fact(json.dumps([asdict(x) for x in lines]), me)
    return f


def _table(cols: list[str], rows: list[list[str]], align: str = "left") -> str:
    cells = ", ".join(f"[*{c}*]" for c in cols) + ",\n" + ",\n".join(", ".join(f"[{c}]" for c in r) for r in rows)
    return f"#table(columns: {len(cols)}, stroke: 0.4pt, inset: 3pt, align: {align},\n{cells})"


def tables(f: dict[str, Fact]) -> dict[str, str]:
    lines = [Line(**x) for x in json.loads(f["_p_lines"].text)]
    seen, lrows = set(), []
    for x in lines:
        if (x.layout, x.nodes, x.rows) in seen:
            continue
        seen.add((x.layout, x.nodes, x.rows))
        lrows.append([x.family.split(" (")[0], x.layout, str(x.nodes), str(x.gpus), str(x.rows), _fmt(x.gib_per_gpu, 1),
                      _fmt(x.step_ms, 0), _fmt(x.tokens_per_s, 0), _fmt(x.tokens_per_s / x.gpus, 1)])
    qrows = [[x.layout, str(x.nodes), str(x.rows), x.workload, str(x.prompts), str(x.prefill_s), str(x.decode_s),
              str(x.load_s), str(x.run_s), str(x.runs), x.node_hours] for x in lines]
    qrows.append(["*sum*", "", "", "", "", "", "", "", "", "", f"*{f['p_total'].text}*"])
    wrows = []
    for letter, name, a, b, what, milestone, hours in WORKPLAN:
        h = {"decode": f["p_decode_hours"].text, "chat": f["p_chat_hours"].text,
             "margin": "margin", "none": "–"}[hours]
        wrows.append([f"*{letter}* {name}", f"M{a}–M{b}", what, milestone, h])
    months = max(w[3] for w in WORKPLAN)
    grow = []
    for letter, name, a, b, *_ in WORKPLAN:
        grow.append([letter] + ["■" if a <= mo <= b else "" for mo in range(1, months + 1)])
    srows = [[what, f"`{where}`"] for what, where in SOURCES]
    return {
        "p_layouts": _table(["family", "layout", "nodes", "GPUs", "rows", "GiB/GPU", "step ms", "tokens/s",
                             "per GPU"], lrows),
        "p_request": _table(["layout", "nodes", "rows", "workload", "prompts", "prefill s", "decode s", "load s",
                             "run s", "runs", "node-h"], qrows),
        "p_workplan": _table(["work package", "months", "work", "milestone", "node-h"], wrows),
        "p_gantt": _table(["WP"] + [f"M{mo}" for mo in range(1, months + 1)], grow, "center"),
        "p_sources": _table(["what", "where"], srows),
    }
