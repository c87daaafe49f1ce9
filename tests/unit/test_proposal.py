"""docs/proposal_facts.py: the proposal's node-hour request is exact arithmetic on its lines, every layout family
the scientific case promises has lines, the planner was asked about the named node type, and the rendered
proposal compiles to a PDF of a few pages with no placeholder left."""
from __future__ import annotations

import math
import re
from decimal import Decimal
from fractions import Fraction

import pytest

from docs import build as docs_build
from docs import proposal_facts as pf

TEMPLATE = docs_build.ROOT / "docs/proposal/proposal.typ.in"


@pytest.fixture(scope="module")
def plans():
    return pf.plans()


@pytest.fixture(scope="module")
def lines(plans):
    return pf.request_lines(plans)


@pytest.fixture(scope="module")
def facts():
    return pf.facts()


def test_each_line_is_its_formula(lines):
    """run s = prefill + decode + load (whole seconds, from their inputs); node-hours = run s x nodes x runs /
    3600, rounded half up to a tenth."""
    rate, prefill, (chat_in, chat_out) = pf._cold_rate(pf.LOAD_FILE)["load"], pf.prefill_rate(), pf.chat_means()
    for x in lines:
        inp, new = (chat_in, chat_out) if x.workload == "chat" else (pf.PLAN["input_tokens"], pf.PLAN["new_tokens"])
        assert x.prefill_s == pf._half_up(x.prompts * inp / prefill)
        assert x.decode_s == pf._half_up(x.prompts * new / x.tokens_per_s)
        assert x.load_s == pf._half_up(pf.load_seconds(x.weights_gib, x.gpus, rate))
        assert x.run_s == x.prefill_s + x.decode_s + x.load_s
        assert x.runs == pf.PLAN["repeats"]
        exact = Fraction(x.run_s * x.nodes * x.runs, 3600)
        assert abs(Fraction(x.tenths, 10) - exact) <= Fraction(1, 20), (x.layout, x.tenths, float(exact))
        assert Decimal(x.node_hours) == Decimal(x.tenths) / 10
        if x.workload == "decode":
            assert x.prompts == (pf.PLAN["batch1_prompts"] if x.rows == 1 else pf.PLAN["waves"] * x.rows * x.replicas)


def test_sum_margin_and_rounding_are_exact(lines, facts):
    total = sum(Decimal(x.node_hours) for x in lines)
    assert Decimal(facts["p_total"].text) == total
    assert sum(Decimal(t) for t in facts["p_sum"].text.split(" + ")) == total  # the written-out sum
    assert Decimal(facts["p_decode_hours"].text) + Decimal(facts["p_chat_hours"].text) == total
    margin = Decimal(facts["p_margin"].text)
    assert margin == Decimal(pf.PLAN["margin"]) and margin > 1
    with_margin = Decimal(facts["p_with_margin"].text)
    assert with_margin == total * margin
    assert Decimal(facts["p_margin_hours"].text) == with_margin - total
    step, request = pf.PLAN["round_to"], int(facts["p_request"].text)
    assert request % step == 0 and request >= with_margin > request - step
    assert request == math.ceil(with_margin / step) * step
    assert int(facts["p_request_gpu_hours"].text) == request * pf.SYSTEM["gpus_per_node"]
    assert int(facts["p_lines"].text) == len(lines) == len(pf.PLAN["lines"])
    ex = lines[0]
    assert (facts["p_ex_run"].text, facts["p_ex_hours"].text) == (str(ex.run_s), ex.node_hours)


def test_every_promised_family_has_request_lines(lines, facts):
    have = {x.family for x in lines}
    assert set(pf.FAMILIES) <= have, set(pf.FAMILIES) - have
    for key in ("tp", "pp", "dpa", "rep"):
        assert int(facts[f"p_fam_{key}_lines"].text) >= 1
    # tp lines span nodes; pipeline lines have stages; replicas more than one copy
    for x in lines:
        if x.family == pf.FAMILIES[0]:
            assert x.gpus // x.replicas > pf.SYSTEM["gpus_per_node"]
        if x.family == pf.FAMILIES[3]:
            assert x.replicas > 1


def test_the_planner_was_asked_about_the_named_node_type(plans, lines, facts):
    for doc in plans.values():
        i = doc["inputs"]
        assert i["gpu_mem_gib"] == pf.SYSTEM["gpu_mem_gib"] and i["gpus_per_node"] == pf.SYSTEM["gpus_per_node"]
        assert i["hbm_tbps"] == pf.SYSTEM["hbm_tbps"] and i["node_gbps"] == pf.SYSTEM["node_gbps"]
        assert i["weights"] == "fp8" and i["context"] == pf.PLAN["context"]
    assert facts["p_sys_mem"].text == f"{pf.SYSTEM['gpu_mem_gib']:.0f}"
    assert facts["p_sys_gpus"].text == str(pf.SYSTEM["gpus_per_node"])
    usable = plans[32]["inputs"]["fraction"] * pf.SYSTEM["gpu_mem_gib"]
    for x in lines:  # every line is a fitting row of the planner on these nodes
        assert x.gib_per_gpu <= usable and x.gpus == x.nodes * pf.SYSTEM["gpus_per_node"]
        assert any(r["layout"] == x.layout and r["nodes"] == x.nodes for r in plans[x.rows]["rows"])


def test_facts_do_not_clash_and_cite_files(facts):
    """docs.build's own names never collide with these (once docs.build merges them, they are the same)."""
    base = docs_build.facts()
    assert all(base[k] == facts[k] for k in set(facts) & set(base))
    mine, theirs = pf.tables(facts), docs_build.tables(base)
    assert all(theirs[k] == mine[k] for k in set(mine) & set(theirs))
    for key, fact in facts.items():
        assert key.startswith(("p_", "_p_")), key
        assert (docs_build.ROOT / fact.source.split()[0]).is_file(), (key, fact.source)


def test_a_second_load_measurement_is_named_when_present(monkeypatch, lines):
    assert pf._vm_note(lines)[0] == "" or "GB/s" in pf._vm_note(lines)[0]
    monkeypatch.setattr(pf, "LOAD_VM_GLOB", pf.LOAD_FILE.name)  # stands in for a vm-*.json
    note, src = pf._vm_note(lines)
    assert "GB/s" in note and "{" not in note and src == docs_build._rel(pf.LOAD_FILE)


def test_the_proposal_compiles(tmp_path, facts):
    typst = pytest.importorskip("typst")
    base = docs_build.facts()
    f = {**base, **facts}
    t = {**docs_build.tables(base), **pf.tables(facts)}
    template = TEMPLATE.read_text()
    for key in docs_build.PLACEHOLDER.findall(template):
        assert key.removeprefix("table:") in (t if key.startswith("table:") else f), key
    src = docs_build.render(template, f, t)
    assert "{{" not in src and "}}" not in src
    assert facts["p_request"].text in src and facts["p_sys"].text in src
    (tmp_path / "proposal.typ").write_text(src)
    pdf = tmp_path / "proposal.pdf"
    typst.compile(str(tmp_path / "proposal.typ"), output=str(pdf), root=str(tmp_path))
    data = pdf.read_bytes()
    assert data[:5] == b"%PDF-"
    pages = [int(n) for n in re.findall(rb"/Type\s*/Pages\b.*?/Count\s+(\d+)", data, re.S)]
    assert pages and 4 <= max(pages) <= 6, pages
