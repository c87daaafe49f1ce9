"""docs/build.py (`make paper`): no number in the paper or the proposal that does not come from a result
file; every placeholder has a fact whose source exists; both PDFs build."""
from __future__ import annotations

import json
import re

import pytest

from docs import build as docs_build

# names that contain digits but are no results: models, formats, GPUs, programs, Typst lengths
ALLOWED = re.compile(r"DeepSeek-V3(\.1)?|DeepseekV3ForCausalLM|top-1|H[12]00|A100|mpi4py|HDF5|[Ff][Pp](8|16|32)|bf16|e4m3|UE8M0|kv_a_proj_with_mqa|"
                     r"\b\d+(\.\d+)?(pt|cm)\b|\"a4\"")


@pytest.mark.parametrize("name", sorted(docs_build.DOCS))
def test_templates_hold_no_numbers_of_their_own(name):
    text = docs_build.DOCS[name].read_text()
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith(("#set ", "#show ")):
            continue  # styling
        rest = ALLOWED.sub("", docs_build.PLACEHOLDER.sub("", line))
        assert not re.search(r"\d", rest), f"{docs_build.DOCS[name].name}:{n}: a number not from a result file: {line!r}"


def test_every_placeholder_has_a_fact_from_an_existing_file():
    facts, tables = docs_build.facts(), None
    tables = docs_build.tables(facts)
    for path in docs_build.DOCS.values():
        for key in docs_build.PLACEHOLDER.findall(path.read_text()):
            if key.startswith("table:"):
                assert key.removeprefix("table:") in tables, key
            else:
                assert key in facts, f"{path.name}: {{{{{key}}}}} has no fact"
    for key, fact in facts.items():
        src = fact.source.split()[0]
        assert (docs_build.ROOT / src).is_file(), f"{key}: source {fact.source} is no file"


def test_facts_are_the_result_files_numbers():
    f = docs_build.facts()
    bench = json.loads(docs_build.BENCH.read_text())
    row = next(r for r in bench["rows"] if r.get("tag") == "native-1gpu-bf16" and r["batch"] == 1)
    assert f["n1_bf16_b1_ms"].text == f"{row['decode_ms_step']:.2f}"
    gpu = json.loads(docs_build.VALID_GPU.read_text())
    assert f["gpu_pass"].text == str(sum(r["passed"] for r in gpu["rows"]))
    model = json.loads(docs_build.MODEL.read_text())
    assert f["model_err_max"].text == f"{max(abs(v['error']) for v in model['validation']) * 100:.0f}"


def test_pdfs_build(tmp_path):
    """Both PDFs build; every figure the paper includes was drawn, every citation is in the bibliography."""
    pytest.importorskip("typst")
    for pdf in docs_build.build(tmp_path):
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 20_000
    text = (tmp_path / "paper.typ").read_text()
    assert "{{" not in text and docs_build.facts()["n1_bf16_b1_ms"].text in text
    images = re.findall(r'image\("([^"]+)"', text)
    assert len(images) >= 6 and all((tmp_path / i).is_file() and (tmp_path / i).stat().st_size > 5_000 for i in images)
    keys = set(re.findall(r"^([a-z]+):", (docs_build.ROOT / "docs/paper/refs.yml").read_text(), re.M))
    labels = set(re.findall(r"<([a-z]+)>", text))  # the figures' labels
    cited = set(re.findall(r"(?<![\w.])@([a-z]+)\b", text)) - labels
    assert cited and cited <= keys, sorted(cited - keys)


def test_every_spmd_variable_is_in_the_one_table():
    """docs/command-line.md's table names every SPMD_* variable the repository's code and scripts name (a
    prefix such as SPMD_SLURM_* is no variable)."""
    import subprocess

    from conftest import ROOT
    from spmd.config.env import VARIABLES

    table = {m for line in (ROOT / "docs" / "command-line.md").read_text().splitlines() if line.startswith("| `SPMD_")
             for m in re.findall(r"^\| `(SPMD_[A-Z0-9_]*)`", line)}
    files = subprocess.run(["git", "ls-files", "*.py", "*.sh", "*.sbatch", "Makefile", "*.def"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    used = {m for f in files for m in re.findall(r"SPMD_[A-Z0-9_]*[A-Z0-9](?![A-Z0-9_*])", (ROOT / f).read_text(errors="replace"))}
    assert set(VARIABLES) <= table and used <= table, (sorted(set(VARIABLES) - table), sorted(used - table))
