"""docs/figures.py: every figure of the paper is written as a PNG, drawn from result files that exist."""
from __future__ import annotations

import pytest

from docs import figures

NAMES = {"arch", "decode_floor", "scaling", "comm_split", "timeline", "serve", "projection", "fp8"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    return out, figures.make(out)


def test_the_figures_are_the_papers(made):
    _, figs = made
    assert set(figs) == NAMES


@pytest.mark.parametrize("name", sorted(NAMES))
def test_each_figure_is_a_png_from_existing_sources(made, name):
    out, figs = made
    fig = figs[name]
    path = out / fig["file"]
    assert fig["file"] == f"{name}.png"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is no PNG"
    assert len(data) > 8_000, f"{path}: {len(data)} bytes, too small to hold a figure"
    for src in fig["sources"]:
        assert not src.startswith("/"), f"{name}: source {src} is not repository-relative"
        assert (figures.ROOT / src).is_file(), f"{name}: source {src} is no file"
    assert fig["sources"] or name == "arch", f"{name}: drawn from no result file"
    caption = fig["caption"]
    assert isinstance(caption, str) and caption.endswith(".") and "\n" not in caption
    for src in fig["sources"]:
        assert src in caption, f"{name}: the caption does not name {src}"
