"""Validation tools: the comparator catches what it must, baselines round-trip, --score under mpirun.

Serial tests build baselines and runs from known log-probs (no model); one e2e runs the native engine on
2 ranks with --score against a transformers baseline.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import pytest
import torch

from conftest import PROMPTS20, checkpoint_dir, mpirun
from spmd.runtime.generate import score
from spmd.runtime.records import WorkItem
from spmd.runtime.score import FORMAT, KIND, BaselineError, checkpoint_fingerprint, file_sha256, load_targets, \
    prompts_fingerprint, read_baseline
from validation import compare as comparison

V, K, N = 40, 4, 6  # vocabulary, top-k, generated positions per prompt


def _fake_checkpoint(d: Path, tag: str = "a") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "tag": tag}))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    return d


def _write(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture
def case(tmp_path):
    """A token baseline of 5 prompts from random log-probs, and a run that scored it identically."""
    g = torch.Generator().manual_seed(0)
    ckpt = _fake_checkpoint(tmp_path / "ckpt")
    prompts = [(f"p{i}", f"prompt {i}") for i in range(5)]
    logp = [torch.log_softmax(3 * torch.randn(N, V, generator=g), -1) for _ in prompts]
    rows = [_baseline_row(pid, text, lp) for (pid, text), lp in zip(prompts, logp)]
    head = {"kind": KIND, "format": FORMAT, "checkpoint": str(ckpt), "checkpoint_sha256": checkpoint_fingerprint(ckpt),
            "prompts_sha256": prompts_fingerprint(prompts), "n_prompts": len(rows), "top_k": K, "max_new_tokens": N,
            "chat": True, "dtype": "fp32", "engine": "transformers"}
    base = _write(tmp_path / "baseline.jsonl", [head] + rows)
    run = [_run_row(r, lp, ckpt, base) for r, lp in zip(rows, logp)]
    return argparse.Namespace(ckpt=ckpt, base=base, rows=rows, logp=logp, run=run, dir=tmp_path)


def _baseline_row(pid: str, text: str, lp: torch.Tensor) -> dict:
    top = lp.topk(K, -1)
    ids = top.indices[:, 0].tolist()
    return {"id": pid, "prompt": text, "prompt_token_ids": [3, 4, 5], "completion": " ".join(map(str, ids)),
            "completion_token_ids": ids, "token_logprobs": top.values[:, 0].tolist(),
            "topk_ids": top.indices.tolist(), "topk_logprobs": top.values.tolist()}


def _run_row(b: dict, lp: torch.Tensor, ckpt: Path, base: Path) -> dict:
    """What the SPMD program writes for a run whose log-probs are `lp` (greedy tokens = argmax)."""
    top = lp.topk(K, -1)
    sup = torch.tensor(b["topk_ids"])
    return {"id": b["id"], "prompt": b["prompt"], "completion": " ".join(map(str, top.indices[:, 0].tolist())),
            "completion_token_ids": top.indices[:, 0].tolist(), "model_group": 0,
            "score": {"checkpoint_sha256": checkpoint_fingerprint(ckpt), "baseline_sha256": file_sha256(base),
                      "target_logprob": lp.gather(1, torch.tensor(b["completion_token_ids"])[:, None])[:, 0].tolist(),
                      "top1": top.indices[:, 0].tolist(), "topk_ids": top.indices.tolist(),
                      "topk_logprobs": top.values.tolist(), "support_logprobs": lp.gather(1, sup).tolist()}}


def _compare(case, run, precision="fp32"):
    return comparison.compare(_write(case.dir / "run.jsonl", run), case.base, precision)


def test_identical_run_passes(case):
    res = _compare(case, case.run)
    s = res["summary"]
    assert res["passed"] and s["exact_prompts"] == 5 and s["top1_agreement"] == 1.0
    assert s["max_abs_dlogp"] == 0 and s["kl_max"] < 1e-9
    assert comparison.main([str(case.dir / "run.jsonl"), str(case.base), "--report", str(case.dir / "rep")]) == 0
    assert (case.dir / "rep" / "report.md").read_text().startswith("# Validation: PASS")
    assert (case.dir / "rep" / "report.png").stat().st_size > 1000


def test_one_changed_token_gives_its_position(case):
    run = copy.deepcopy(case.run)
    run[3]["completion_token_ids"][4] = (run[3]["completion_token_ids"][4] + 1) % V
    res = _compare(case, run)
    per = res["per_prompt"]
    assert not res["passed"] and res["summary"]["exact_prompts"] == 4
    assert per[3]["first_divergence"] == 4 and not per[3]["exact"]
    assert per[2]["first_divergence"] == N and per[2]["exact"]  # identical: counts its whole length
    assert comparison.main([str(case.dir / "run.jsonl"), str(case.base)]) == 1


def test_a_shifted_logit_is_flagged_by_top1_dlogp_and_kl(case):
    lp = case.logp[1].clone()
    first, second = case.rows[1]["topk_ids"][2][:2]
    lp[2, second] += lp[2, first] - lp[2, second] + 1.0  # the runner-up of position 2 overtakes the baseline token
    lp = torch.log_softmax(lp, -1)
    run = copy.deepcopy(case.run)
    run[1]["score"] = _run_row(case.rows[1], lp, case.ckpt, case.base)["score"]
    res = _compare(case, run)
    m = res["per_prompt"][1]
    assert m["first_top1_miss"] == 2 and m["top1_agreement"] == pytest.approx((N - 1) / N)
    assert m["max_abs_dlogp"] > 1 and m["kl_max"] > 0.1
    fails = " ".join(res["failures"])
    assert not res["passed"] and "top1_agreement" in fails and "max_abs_dlogp" in fails and "kl_max" in fails


def test_nan_scores_fail(case):
    run = copy.deepcopy(case.run)
    run[4]["score"]["support_logprobs"][0][0] = float("nan")
    run[4]["score"]["target_logprob"][-1] = float("nan")
    res = _compare(case, run, "bf16")
    assert not res["passed"] and "kl_max = nan" in " ".join(res["failures"])
    assert any("max_abs_dlogp = nan" in f for f in _compare(case, run, "fp32")["failures"])


def test_coarse_kl_is_zero_for_equal_and_a_lower_bound_of_full_kl():
    g = torch.Generator().manual_seed(1)
    p, q = (torch.log_softmax(torch.randn(V, generator=g), -1) for _ in range(2))
    top = p.topk(K).indices
    full = float((p.exp() * (p - q)).sum())
    coarse = comparison.coarse_kl(p[top].tolist(), q[top].tolist())
    assert comparison.coarse_kl(p[top].tolist(), p[top].tolist()) < 1e-12
    assert 0 < coarse <= full + 1e-9


def test_reordered_prompts_are_refused_at_the_right_place(case):
    run = copy.deepcopy(case.run)
    run[2], run[3] = run[3], run[2]
    with pytest.raises(BaselineError, match=r"prompt 2 is 'p3' here but 'p2' in the baseline \(same ids, other"):
        _compare(case, run)
    assert comparison.main([str(case.dir / "run.jsonl"), str(case.base)]) == 2


def test_another_checkpoint_or_baseline_is_refused(case, tmp_path):
    run = copy.deepcopy(case.run)
    for r in run:
        r["score"]["checkpoint_sha256"] = "0" * 64
    with pytest.raises(BaselineError, match="is not the baseline's"):
        _compare(case, run)
    other = _fake_checkpoint(tmp_path / "other", tag="b")
    unscored = [{k: v for k, v in r.items() if k != "score"} for r in case.run]
    with pytest.raises(BaselineError, match="is not the baseline's"):
        comparison.compare(_write(tmp_path / "u.jsonl", unscored), case.base, "fp32", checkpoint=other)
    res = comparison.compare(tmp_path / "u.jsonl", case.base, "fp32")  # fp32 without scores: tokens only, and a note
    assert res["passed"] and any("not verified" in n for n in res["notes"])
    assert not comparison.compare(tmp_path / "u.jsonl", case.base, "bf16")["passed"]  # bf16 bounds need scores
    base2 = tmp_path / "b2.jsonl"
    base2.write_text(case.base.read_text() + "\n")  # same rows, other bytes: the run was scored against case.base
    with pytest.raises(BaselineError, match="scored against another baseline"):
        comparison.compare(_write(tmp_path / "r.jsonl", case.run), base2, "fp32")


def test_spmd_side_check_refuses_another_checkpoint_and_prompt_set(case, tmp_path):
    from spmd.runtime.prompts import Prompt

    prompts = [Prompt(i, r["id"], r["prompt"]) for i, r in enumerate(case.rows)]
    ids = [r["prompt_token_ids"] for r in case.rows]
    k, targets = load_targets(case.base, case.ckpt, prompts, ids)
    assert k == K and targets[0] == (case.rows[0]["completion_token_ids"], case.rows[0]["topk_ids"])
    with pytest.raises(BaselineError, match="was made from checkpoint"):
        load_targets(case.base, _fake_checkpoint(tmp_path / "other", tag="b"), prompts, ids)
    with pytest.raises(BaselineError, match="'p1' has a different text"):
        load_targets(case.base, case.ckpt, [prompts[0], Prompt(1, "p1", "changed")] + prompts[2:], ids)
    with pytest.raises(BaselineError, match="tokenizes to other ids"):
        load_targets(case.base, case.ckpt, prompts, [[9]] + ids[1:])
    text = _write(tmp_path / "text.jsonl", [{"id": r["id"], "completion": r["completion"]} for r in case.rows])
    with pytest.raises(BaselineError, match="text baseline"):
        load_targets(text, case.ckpt, prompts, ids)


def test_text_baseline_mode(case, tmp_path):
    text = _write(tmp_path / "text.jsonl", [{"id": r["id"], "completion": r["completion"]} for r in case.rows])
    run = copy.deepcopy(case.run)
    run[0]["completion"] = run[0]["completion"][:3] + "#" + run[0]["completion"][4:]
    res = comparison.compare(_write(tmp_path / "run.jsonl", run), text, "fp32")
    assert res["mode"] == "text" and res["summary"]["exact_prompts"] == 4 and not res["passed"]
    per = res["per_prompt"]
    assert per[0]["prefix_chars"] == 3 and per[1]["prefix_chars"] == len(run[1]["completion"])
    assert comparison.compare(tmp_path / "run.jsonl", text, "bf16")["passed"]  # only fp32 gates on another system's text
    run[0], run[1] = run[1], run[0]
    with pytest.raises(BaselineError, match="prompt 0 is 'p1' here but 'p0'"):
        comparison.compare(_write(tmp_path / "run.jsonl", run), text, "fp32")


def test_text_baseline_token_prefix_with_the_checkpoint_tokenizer(tiny_bf16, tmp_path):
    text = _write(tmp_path / "text.jsonl", [{"id": "a", "completion": "The capital of France is Paris."}])
    run = _write(tmp_path / "run.jsonl", [{"id": "a", "completion": "The capital of France is Lyon."}])
    m = comparison.compare(run, text, "bf16", tokenizer=tiny_bf16)["per_prompt"][0]
    assert 0 < m["prefix_tokens"] < m["n_tokens"] and m["prefix_chars"] == len("The capital of France is ")


class ShiftStepper:
    """Logits at every position favour (input token + 1) % V: the score of a counting sequence is known."""

    device = torch.device("cpu")

    def score(self, tokens, mask):
        return 4.0 * torch.nn.functional.one_hot((tokens + 1) % V, V).float()


def test_score_aligns_targets_under_left_padding():
    batch = [WorkItem(7, [1, 2, 3, 4], [5, 6, 7], [[5, 0], [6, 0], [7, 9]]),
             WorkItem(3, [10], [11, 13], [[11, 1], [12, 13]])]
    out = score(ShiftStepper(), batch, k=2)
    hit, miss = torch.log_softmax(torch.tensor([4.0] + [0.0] * (V - 1)), 0)[:2].tolist()
    assert out[0]["top1"] == [5, 6, 7] and out[0]["target_logprob"] == pytest.approx([hit] * 3)
    assert out[1]["top1"] == [11, 12] and out[1]["target_logprob"] == pytest.approx([hit, miss])
    assert out[1]["support_logprobs"][1] == pytest.approx([hit, miss]) and len(out[0]["topk_ids"][0]) == 2


def _noisy(case, scale: float, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.log_softmax(lp + scale * torch.randn(lp.shape, generator=g), -1) for lp in case.logp]


def _recipe(case, scale: float, seed: int = 1, base: Path | None = None) -> Path:
    """Scores of the baseline by a 'recipe' model (validation.baseline --score-of's rows: no completion)."""
    rows = [dict(_run_row(r, lp, case.ckpt, base or case.base), completion="", completion_token_ids=[])
            for r, lp in zip(case.rows, _noisy(case, scale, seed))]
    return _write(case.dir / "recipe.jsonl", rows)


def test_recipe_relative_thresholds(case):
    """A run as far from the baseline as the recipe it follows passes the recipe-relative bounds (fp8's
    allowance added to the recipe's own distance) and fails the plain fp8 ones; a run three times as
    perturbed fails both; the recipe must score this very baseline file."""
    recipe = _recipe(case, 1.0)
    run = _write(case.dir / "run.jsonl", [_run_row(r, lp, case.ckpt, case.base)
                                         for r, lp in zip(case.rows, _noisy(case, 1.0, 2))])
    plain, rel = comparison.compare(run, case.base, "fp8"), comparison.compare(run, case.base, "fp8", recipe=recipe)
    own = comparison.compare(recipe, case.base, "fp8")["summary"]
    assert not plain["passed"] and rel["passed"], (plain["failures"], rel["failures"])
    assert rel["precision"] == "fp8+recipe" and rel["recipe"]["kl_mean"] == own["kl_mean"] > 0.15
    t = comparison.THRESHOLDS["fp8"]
    assert rel["thresholds"]["min_top1"] == pytest.approx(t.min_top1 - (1 - own["top1_agreement"]))
    assert rel["thresholds"]["max_kl_mean"] == pytest.approx(t.max_kl_mean + own["kl_mean"])
    worse = _write(case.dir / "worse.jsonl", [_run_row(r, lp, case.ckpt, case.base)
                                             for r, lp in zip(case.rows, _noisy(case, 3.0, 2))])
    res = comparison.compare(worse, case.base, "fp8", recipe=recipe)
    assert not res["passed"] and all(f.startswith("fp8+recipe:") for f in res["failures"])
    other = case.dir / "other-baseline.jsonl"
    other.write_text(case.base.read_text() + "\n")  # the same rows in another file
    with pytest.raises(BaselineError, match="another baseline file"):
        comparison.compare(run, case.base, "fp8", recipe=_recipe(case, 1.0, base=other))


def test_baseline_round_trip(tiny_bf16, tmp_path):
    from spmd.runtime.prompts import write_jsonl
    from validation.baseline import make_baseline, parser

    out = tmp_path / "b.jsonl"
    args = parser().parse_args(["--checkpoint", str(tiny_bf16), "--prompts", str(PROMPTS20), "--out", str(out),
                                "--max-new-tokens", "3", "--top-k", "5", "--batch-size", "20"])
    write_jsonl(out, make_baseline(args))
    head, rows = read_baseline(out)
    assert head["checkpoint_sha256"] == checkpoint_fingerprint(tiny_bf16) and head["top_k"] == 5
    assert head["n_prompts"] == len(rows) == 20 and head["dtype"] == "fp32" and head["versions"]["torch"]
    for r in rows:
        n = len(r["completion_token_ids"])
        assert 1 <= n <= 3 and len(r["topk_ids"]) == n and all(len(t) == 5 for t in r["topk_ids"])
        assert [t[0] for t in r["topk_ids"]] == r["completion_token_ids"]  # greedy: the top-1 is the token
        assert r["token_logprobs"] == pytest.approx([t[0] for t in r["topk_logprobs"]])


@pytest.fixture(scope="module")
def tiny_baseline(tiny_bf16, tmp_path_factory):
    from spmd.runtime.prompts import write_jsonl
    from validation.baseline import make_baseline, parser

    out = tmp_path_factory.mktemp("baseline") / "tiny-bf16.jsonl"
    write_jsonl(out, make_baseline(parser().parse_args(["--checkpoint", str(tiny_bf16), "--prompts", str(PROMPTS20),
                                                        "--out", str(out), "--max-new-tokens", "8"])))
    return out


def test_score_of_reproduces_the_baselines_own_numbers(tiny_bf16, tiny_baseline, tmp_path):
    """validation.baseline --score-of: the baseline's model scoring its own greedy tokens teacher-forced is
    the baseline up to float32 rounding (the run format of --score, no completion); another checkpoint's
    baseline is refused with one message."""
    from validation.baseline import main

    out = tmp_path / "scores.jsonl"
    assert main(["--checkpoint", str(tiny_bf16), "--score-of", str(tiny_baseline), "--out", str(out)]) == 0
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(rows) == 20 and rows[0]["completion_token_ids"] == [] and rows[0]["score"]["act_quant"] is False
    res = comparison.compare(out, tiny_baseline, "fp32")
    assert res["passed"], res["failures"]
    assert res["summary"]["top1_agreement"] == 1.0 and res["summary"]["max_abs_dlogp"] < 1e-4
    fp8 = checkpoint_dir("tiny", "fp8")
    assert main(["--checkpoint", str(fp8), "--score-of", str(tiny_baseline), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_score_of_with_the_fp8_activation_recipe(tiny_fp8, tmp_path):
    """The recipe's scores of a tiny FP8 baseline: it moves the outputs (KL > 0, log-probs beyond fp32
    rounding)."""
    from spmd.runtime.prompts import write_jsonl
    from validation.baseline import main, make_baseline, parser

    base = tmp_path / "tiny-fp8.jsonl"
    write_jsonl(base, make_baseline(parser().parse_args(["--checkpoint", str(tiny_fp8), "--prompts", str(PROMPTS20),
                                                         "--out", str(base), "--max-new-tokens", "6"])))
    out = tmp_path / "recipe.jsonl"
    assert main(["--checkpoint", str(tiny_fp8), "--score-of", str(base), "--out", str(out), "--act-quant"]) == 0
    own = comparison.compare(out, base, "fp8")["summary"]
    assert 0 < own["kl_mean"] and own["max_abs_dlogp"] > 1e-3


def test_score_native_g2_fp32_agrees_with_the_baseline(tiny_bf16, tiny_baseline, tmp_path):
    out = tmp_path / "out.jsonl"
    r = mpirun(2, ["--checkpoint", str(tiny_bf16), "--prompts", str(PROMPTS20), "--output", str(out),
                   "--engine", "native", "--group-size", "2", "--dtype", "fp32", "--max-new-tokens", "8",
                   "--no-progress", "--score", str(tiny_baseline)], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = comparison.compare(out, tiny_baseline, "fp32")
    s = res["summary"]
    assert res["passed"] and s["exact_prompts"] == 20, res["failures"]
    assert s["top1_agreement"] == 1.0 and s["max_abs_dlogp"] < 1e-4


def test_score_with_another_checkpoints_baseline_fails_on_every_rank(tiny_fp8, tiny_baseline, tmp_path):
    r = mpirun(2, ["--checkpoint", str(tiny_fp8), "--prompts", str(PROMPTS20), "--output", str(tmp_path / "o.jsonl"),
                   "--engine", "native", "--group-size", "2", "--dtype", "fp32", "--score", str(tiny_baseline)],
               timeout=120)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-2000:]
    assert "was made from checkpoint" in errors[0] and not (tmp_path / "o.jsonl").exists()


def test_jobs_share_slots_and_report_exit_codes(tmp_path):
    from validation.jobs import Job, run_jobs

    jobs = [Job("a", ["sleep", "0.3"], 1, tmp_path / "a.log"), Job("b", ["sleep", "0.3"], 1, tmp_path / "b.log"),
            Job("c", ["false"], 4, tmp_path / "c.log")]
    done = run_jobs(jobs, slots=1, cwd=tmp_path, echo=lambda msg: None)
    assert done["a"].returncode == done["b"].returncode == 0 and done["c"].returncode == 1
    assert done["a"].wall_s >= 0.3 and done["b"].wall_s >= 0.3


def _matrix_row(layout: str, kl_mean: float) -> dict:
    return {"config": "tiny", "weights": "bf16", "engine": "native", "layout": layout, "dtype": "bf16",
            "precision": "bf16", "baseline_dtype": "fp32", "n_prompts": 20, "exact_prompts": 5,
            "mean_first_divergence": 8.0, "positions": 400, "top1_agreement": 0.93, "max_abs_dlogp": 6.0,
            "kl_mean": kl_mean, "kl_max": 2.5, "passed": False, "failures": ["old bound"]}


def test_matrix_rejudge_and_merge(tmp_path):
    from validation.matrix import merged, rejudge

    doc = {"machine": "m", "date": "d", "device": "cpu", "max_new_tokens": 32, "prompts": "p", "engines": ["native"],
           "notes": [], "baselines": {}, "layout_agreement": [], "rows": [_matrix_row("G1", 0.04),
                                                                          _matrix_row("G2", 0.5)]}
    path = tmp_path / "m-d.json"
    path.write_text(json.dumps(doc))
    assert rejudge(path) == 1  # G2's KL mean is over the bf16 bound
    rows = json.loads(path.read_text())["rows"]
    assert rows[0]["passed"] and not rows[1]["passed"] and "kl_mean" in rows[1]["failures"][0]
    assert "1/2 configurations pass" in path.with_suffix(".md").read_text()
    # a recipe-relative row: the same KL mean passes where the recipe itself is 0.45 from the baseline
    recipe = {"file": "r.jsonl", "top1_agreement": 0.9, "kl_mean": 0.45, "kl_max": 3.0, "max_abs_dlogp": 5.0}
    path.write_text(json.dumps(dict(doc, rows=[dict(_matrix_row("G2", 0.5), recipe=recipe)])))
    assert rejudge(path) == 0
    md = path.with_suffix(".md").read_text()
    assert "| bf16+recipe |" in md and "min_top1=0.75" in md and "max_kl_mean=0.57" in md
    path.write_text(json.dumps(doc))
    rejudge(path)
    new = dict(doc, rows=[dict(_matrix_row("G2", 0.04), passed=True, failures=[])])
    both = merged(new, path)["rows"]
    assert [(r["layout"], r["passed"]) for r in both] == [("G1", True), ("G2", True)]
