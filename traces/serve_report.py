"""The serving benchmark's analysis and report (traces.serve_bench): ratios, the best static run, targets, tables.

Pure functions of the runs' rows (no files, no processes): a row is one run of the program, {name, batching,
batch_size, role ("a" the static default, "sweep", "c" continuous, "long"), summary (the program's
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
    for key, need in TARGETS:
        base = ref[key]
        got = tokens_per_s(c) / tokens_per_s(base) if tokens_per_s(c) and tokens_per_s(base) else None
        targets.append({"target": f"continuous >= {need:g}x ({key}) {base['name'] if base else '(not measured)'}",
                        "needed": need, "ratio": got, "pass": None if got is None else got >= need,
                        "comparable": complete(c) and complete(base)})
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
    return "\n".join(lines + decode_lines(doc.get("decode_check")) + long_lines(doc.get("long")))


DECODE_TARGET = 1.3  # the continuous loop's decode step <= this x gpu_bench's at the same batch


def decode_lines(check: dict | None) -> list[str]:
    """The continuous run's decode step against gpu_bench's at the same batch (target: <= 1.3x)."""
    if not check:
        return []
    if "error" in check:
        return ["## Decode step", "", check["error"], ""]
    rows, cols = check["shape"].split("x")
    ours = check["median_shape_ms"] if check.get("median_shape_ms") else check["median_ms_all_shapes"]
    out = ["## Decode step (continuous vs gpu_bench)", "",
           f"Most frequent decode shape: {rows} rows x {cols} cache columns ({check['shape_steps']} of "
           f"{check['steps']} steps); its step {ours:.2f} ms"
           + (" (the loop's wall time per step at that shape, mean)." if check.get("median_shape_ms") else
              " (median of every step's graph replay, all shapes: the run did not record steps per shape)."), ""]
    for key, what in (("gpu_bench_short_prompt_ms", "gpu_bench at that batch, short prompt"),
                      ("gpu_bench_same_length_ms", f"gpu_bench at that batch and ~{cols} cache columns")):
        ref = check.get(key)
        if ref:
            ratio = ours / ref
            verdict = "pass" if ratio <= DECODE_TARGET else "fail"
            out.append(f"- vs {what}: {ref:.2f} ms → {ratio:.2f}x (target <= {DECODE_TARGET}x: **{verdict}**)")
        else:
            out.append(f"- vs {what}: not measured ({check.get(key.replace('_ms', '_error')) or 'failed'})")
    return out + [""]
