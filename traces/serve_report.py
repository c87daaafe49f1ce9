"""The serving benchmark's analysis and report (traces.serve_bench): ratios, the best static run, targets, tables.

Pure functions of the runs' rows (no files, no processes): a row is one run of the program, {name, batching,
batch_size, role ("a" the static default, "sweep", "c" continuous, "variant" another continuous run, "long"), summary (the program's
<output>.summary.json) or error, completed/requests, peak_gpu_gib}.
"""
from __future__ import annotations

TARGETS = (("a", 3.0), ("b", 1.5))  # continuous output tokens/s >= ratio x that static run's


def tokens_per_s(row: dict | None) -> float | None:
    return row["summary"]["output_tokens_per_s"] if row and "summary" in row else None


def analyze(runs: list[dict]) -> dict:
    """Per run the ratios to (a) and (b), (b) = the best static run, and the targets with pass/fail."""
    a = next((r for r in runs if r["role"] == "a"), None)
    static = [r for r in runs if r["batching"] == "static" and r["role"] in ("a", "sweep") and tokens_per_s(r)]
    b = max(static, key=tokens_per_s, default=None)
    c = next((r for r in runs if r["role"] == "c"), None)
    ref = {"a": a, "b": b}
    rows = []
    for r in runs:
        t = tokens_per_s(r)
        ratio = {k: (t / tokens_per_s(v) if t and tokens_per_s(v) else None) for k, v in ref.items()}
        rows.append({**r, "tokens_per_s": t, "vs_a": ratio["a"], "vs_b": ratio["b"]})
    targets = []
    for cont in [c] + [r for r in runs if r["role"] == "variant"]:
        for key, need in TARGETS:
            base = ref[key]
            got = tokens_per_s(cont) / tokens_per_s(base) if tokens_per_s(cont) and tokens_per_s(base) else None
            targets.append({"target": f"{cont['name'] if cont else 'continuous'} >= {need:g}x ({key}) "
                                      f"{base['name'] if base else '(not measured)'}",
                            "needed": need, "ratio": got, "pass": None if got is None else got >= need,
                            "comparable": complete(cont) and complete(base)})
    return {"a": a and a["name"], "b": b and b["name"], "c": c and c["name"], "rows": rows, "targets": targets,
            "incomplete": [r["name"] for r in runs if "summary" in r and not complete(r)]}


def complete(row: dict | None) -> bool:
    """Whether every request of a run decoded exactly its max_new_tokens: only then do runs do the same work."""
    return bool(row and "summary" in row and row.get("completed") == row.get("requests"))


def _fmt(x, spec: str = ".2f", unit: str = "") -> str:
    return "—" if x is None else f"{x:{spec}}{unit}"


def _pair(s: dict, key: str) -> str:
    return f"{_fmt(s.get(f'{key}_p50_s'))} / {_fmt(s.get(f'{key}_p95_s'))}"


def table_lines(rows: list[dict]) -> list[str]:
    """The markdown table of the runs (an errored run: its error's first line)."""
    lines = ["| run | batching | batch / slots | output tok/s | × (a) | × (b) | GPU idle | step efficiency | "
             "TTFT p50 / p95 s | latency p50 / p95 s | queue p50 s | peak GiB | completed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "summary" not in r:
            why = r["error"].splitlines()[0] if r.get("error") else "not run"
            lines.append(f"| {r['name']} | {r['batching']} | {r['batch_size'] or '—'} | failed: {why[:160]} |"
                         + " |" * 9)
            continue
        s, sched = r["summary"], r["summary"].get("scheduler", {})
        lines.append(f"| {r['name']} | {r['batching']} | {sched.get('slots', r['batch_size']) or '—'} | "
                     f"{_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(r['vs_a'])} | {_fmt(r['vs_b'])} | "
                     f"{_fmt(s.get('gpu_idle_share'), '.1%')} | {_fmt(sched.get('step_efficiency'), '.1%')} | "
                     f"{_pair(s, 'ttft')} | {_pair(s, 'latency')} | {_fmt(s.get('queue_p50_s'))} | "
                     f"{_fmt(r.get('peak_gpu_gib'), '.1f')} | {r.get('completed', '—')}/{r.get('requests', '—')} |")
    return lines


def target_lines(targets: list[dict]) -> list[str]:
    word = {True: "**pass**", False: "**fail**", None: "not measured"}
    return [f"- {t['target']}: {_fmt(t['ratio'])}× — {word[t['pass']]}"
            + ("" if t["comparable"] or t["pass"] is None else " (not comparable: a run did not decode every "
               "request to its max_new_tokens)") for t in targets]


def long_lines(long: dict | None) -> list[str]:
    if not long:
        return []
    lines = ["## Long prompts (continuous)", "", f"{long['description']}.", ""]
    if "error" in long:
        return lines + [f"Failed: `{long['error'].splitlines()[0][:200]}`", ""]
    s = long["summary"]
    lines += ["| prompt tokens | completed | requests |", "|---|---|---|"]
    lines += [f"| {k} | {v['completed']} | {v['requests']} |" for k, v in long["by_prompt_tokens"].items()]
    peak = long.get("peak_gpu_gib")
    lines += ["", f"Peak GPU memory: {_fmt(peak, '.1f', ' GiB') if peak is not None else 'not recorded'}; "
                  f"output tokens/s {_fmt(s.get('output_tokens_per_s'), ',.0f')}, TTFT p50 / p95 "
                  f"{_pair(s, 'ttft')} s, slots {s.get('scheduler', {}).get('slots', '—')}, prefill tokens per "
                  f"forward {s.get('scheduler', {}).get('prefill_tokens', '—')}.", ""]
    return lines


def markdown(doc: dict) -> str:
    an, wl = doc["analysis"], doc.get("workload", {})
    lines = [f"# Serving benchmark: {doc['checkpoint']}, {doc['machine']}, {doc['date']}", ""]
    if wl:
        lines += [f"Workload (traces.workload, seed {wl['seed']}): {wl['summary']}; per-request max_new_tokens, "
                  f"ignore_eos. Lengths: {wl['source']}.", ""]
    if an["rows"]:
        lines += [f"(a) = {an['a'] or '—'} (the static default), (b) = {an['b'] or '—'} (the best static run of "
                  f"{', '.join(r['name'] for r in an['rows'] if r['batching'] == 'static')}), "
                  f"(c) = {an['c'] or '—'}.", "", *table_lines(an["rows"]), "", "Targets:", "",
                  *target_lines(an["targets"]), ""]
        if an["incomplete"]:
            lines += [f"Not every request decoded exactly its max_new_tokens in {', '.join(an['incomplete'])} "
                      f"(column completed): those runs did other work than the workload asks.", ""]
    return "\n".join(lines + decode_lines(doc.get("decode_checks")) + long_lines(doc.get("long")))


DECODE_TARGET = 1.3  # the continuous loop's decode step <= this x gpu_bench's at the same batch
SHAPES_SHOWN = 12    # the shapes with the most steps (eager decode on CPU has one shape per length)


def decode_lines(checks: list[dict] | None) -> list[str]:
    """Per continuous run: its decode steps per shape, the loop's wall time against the step's GPU time and
    gpu_bench's step at that row count; the target (<= 1.3x gpu_bench) at the shape of the chosen slot count."""
    out = []
    for check in checks or []:
        if "error" in check:
            out += [f"## Decode steps: {check['error']}", ""]
            continue
        out += [f"## Decode steps of {check['run']} (per shape)", "",
                "wall: the loop's mean time per step at that shape (inputs, the step, sampling, tokens on the "
                "host); GPU: the step's graph replay (CUDA events); gpu_bench: its decode step at that row count "
                f"and a {check['prompt']}-token prompt (short rows).", "",
                "| shape (rows x columns) | steps | wall ms | GPU ms | wall / GPU | gpu_bench ms | wall / gpu_bench |",
                "|---|---|---|---|---|---|---|"]
        shown = sorted(sorted(check["shapes"], key=lambda r: -r["steps"])[:SHAPES_SHOWN],
                       key=lambda r: tuple(map(int, r["shape"].split("x"))))
        for r in shown:
            w, g, b = r["wall_ms"], r["gpu_ms"], r["gpu_bench_ms"]
            out.append(f"| {r['shape']} | {r['steps']} | {_fmt(w)} | {_fmt(g)} | "
                       f"{_fmt(w / g if w and g else None)} | {_fmt(b)} | {_fmt(w / b if w and b else None)} |")
        if len(shown) < len(check["shapes"]):
            rest = [r for r in check["shapes"] if r not in shown]
            out.append(f"| {len(rest)} other shapes | {sum(r['steps'] for r in rest)} | | | | | |")
        t = next(r for r in check["shapes"] if r["shape"] == check["target_shape"])
        ratio = t["wall_ms"] / t["gpu_bench_ms"] if t["wall_ms"] and t["gpu_bench_ms"] else None
        verdict = "not measured" if ratio is None else ("**pass**" if ratio <= DECODE_TARGET else "**fail**")
        loop = check.get("loop_s") or {}
        out += ["", f"Target (the slot count's shape {t['shape']}): wall / gpu_bench {_fmt(ratio)}x, <= "
                    f"{DECODE_TARGET}x: {verdict}." + (" Loop time (s): " + ", ".join(
                        f"{k} {v:.2f}" for k, v in loop.items()) + "." if loop else ""), ""]
    return out
