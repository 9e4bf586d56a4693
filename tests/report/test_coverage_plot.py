from __future__ import annotations

import sys

import matplotlib  # the dev extra installs it; quantport itself imports it only when drawing
import numpy as np
import pytest
from matplotlib.colors import LogNorm
from matplotlib.text import Text
from PIL import Image  # an independent PNG decoder (Pillow), not the writer's own code

from quantport.errors import OutputWriteError, QuantportError
from quantport.report.coverage import ExpertCoverage, LayerCoverage
from quantport.report.coverage_plot import (
    DEAD_COLOUR,
    PlotContext,
    PlotLibraryMissingError,
    build_coverage_figure,
    require_matplotlib,
    write_coverage_plot,
)
from report.synthetic_coverage import synthetic_coverage

CONTEXT = PlotContext("org/tiny-moe", "nvfp4", 32768)


def _small() -> ExpertCoverage:
    coverage = ExpertCoverage("shared", "routed")
    coverage.layers = [
        LayerCoverage("model.layers.0.mlp", (5, 0, 9, 2)),
        LayerCoverage("model.layers.1.mlp", (4, 4, 4, 4)),
        LayerCoverage("model.layers.2.mlp", (0, 0, 30, 1)),
    ]
    return coverage


def _texts(figure) -> str:
    return "\n".join(t.get_text() for t in figure.findobj(Text))


def _heat_axes(figure):
    return next(ax for ax in figure.axes if ax.get_xlabel().startswith("expert"))


def test_writer_produces_a_png_of_sane_size(tmp_path):
    path = write_coverage_plot(_small(), tmp_path / "coverage.png", CONTEXT)
    assert path == tmp_path / "coverage.png"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert 900 <= width <= 2000 and 400 <= height <= 1600
    assert 10_000 < path.stat().st_size < 1_000_000


def test_figure_has_axis_labels_colour_bar_and_title():
    figure = build_coverage_figure(_small(), CONTEXT)
    heat = _heat_axes(figure)
    assert heat.get_xlabel() == "expert (0-3)"
    assert heat.get_ylabel() == "MoE layer (model.layers.N.mlp)"
    assert [t.get_text() for t in heat.get_yticklabels()] == ["0", "1", "2"]
    bars = [ax for ax in figure.axes if ax.get_ylabel() == "calibration tokens per expert (log scale)"]
    assert len(bars) == 1
    image = heat.get_images()[0]
    assert isinstance(image.norm, LogNorm)
    assert (image.norm.vmin, image.norm.vmax) == (1.0, 30.0)
    title = figure._suptitle.get_text()
    for part in ("org/tiny-moe", "recipe nvfp4", "32,768 calibration tokens", "4 experts x 3 MoE layers"):
        assert part in title
    assert "uncalibrated-expert policy: shared input scale (layer max over experts)" in title


def test_dead_experts_are_red_counted_and_named():
    figure = build_coverage_figure(_small(), CONTEXT)
    heat = _heat_axes(figure)
    tokens, dead = (im.get_array() for im in heat.get_images())
    assert list(np.ma.getmaskarray(tokens)[0]) == [False, True, False, False]  # 0 tokens: not on the colour scale
    dead_cells = np.argwhere(np.nan_to_num(np.asarray(dead), nan=0.0) == 1.0).tolist()
    assert dead_cells == [[0, 1], [2, 0], [2, 1]]
    assert matplotlib.colors.to_hex(heat.get_images()[1].cmap(1.0)) == DEAD_COLOUR
    counts = next(ax for ax in figure.axes if ax.get_title().startswith("experts with"))
    assert [round(p.get_width()) for p in counts.patches] == [1, 0, 2]
    text = _texts(figure)
    assert "Experts that saw no calibration token (red): 3 in 2 of 3 layers" in text
    assert "layer 0: 1 dead: 1" in text and "layer 2: 2 dead: 0, 1" in text


def test_no_dead_experts_says_none_and_lists_nothing():
    coverage = ExpertCoverage("per-expert", "all-experts", [LayerCoverage("model.layers.0.mlp", (3, 4, 5))])
    figure = build_coverage_figure(coverage, CONTEXT)
    counts = next(ax for ax in figure.axes if ax.get_title().startswith("experts with"))
    assert [t.get_text() for t in counts.texts] == ["none"]
    assert "saw no calibration token" not in _texts(figure)
    assert "per-expert input scales (0-token experts take the layer max)" in figure._suptitle.get_text()


def test_many_dead_layers_are_truncated_with_a_pointer_to_the_report():
    coverage = synthetic_coverage(experts=8, layers=48, dead_per_layer=4.0, seed=1)
    text = _texts(build_coverage_figure(coverage, CONTEXT, max_text_rows=5))
    assert "more layers (full list: quantport_report.json)" in text
    assert text.count("dead: ") <= 5 * 3  # at most 5 rows per column


@pytest.mark.parametrize(("experts", "layers"), [(8, 48), (128, 60), (256, 60)])
def test_large_grids_have_readable_ticks(tmp_path, experts, layers):
    coverage = synthetic_coverage(experts, layers, dead_per_layer=1.0)
    figure = build_coverage_figure(coverage, CONTEXT)
    width, height = figure.get_size_inches()
    assert 10 <= width <= 20 and height <= 18
    heat = _heat_axes(figure)
    xticks, yticks = heat.get_xticks(), heat.get_yticks()
    assert len(xticks) <= 40 and len(yticks) <= 40
    assert xticks[0] == 0 and xticks[-1] == experts - 1 and yticks[-1] == layers - 1
    path = write_coverage_plot(coverage, tmp_path / "c.png", CONTEXT)
    with Image.open(path) as image:
        assert max(image.size) <= 2000
    assert path.stat().st_size < 1_000_000


def test_spread_panel_only_when_the_coverage_records_input_amax():
    with_amax = build_coverage_figure(synthetic_coverage(16, 6, with_amax=True), CONTEXT)
    without = build_coverage_figure(synthetic_coverage(16, 6, with_amax=False), CONTEXT)
    titles = [ax.get_title() for ax in with_amax.axes]
    assert any(t.startswith("input amax spread") for t in titles)
    assert not any(ax.get_title().startswith("input amax spread") for ax in without.axes)
    spread = next(ax for ax in with_amax.axes if ax.get_title().startswith("input amax spread"))
    assert sorted(line.get_label() for line in spread.get_lines() if not line.get_label().startswith("_")) == [
        "down",
        "gate_up",
    ]


def test_global_matplotlib_state_is_left_alone():
    backend = matplotlib.get_backend()
    rc = dict(matplotlib.rcParams)
    pyplot_loaded = "matplotlib.pyplot" in sys.modules
    build_coverage_figure(_small(), CONTEXT)
    assert matplotlib.get_backend() == backend
    assert dict(matplotlib.rcParams) == rc
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_loaded


def test_missing_matplotlib_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(PlotLibraryMissingError, match=r"pip install 'quantport\[plot\]'") as error:
        build_coverage_figure(_small(), CONTEXT)
    assert isinstance(error.value, QuantportError)
    with pytest.raises(PlotLibraryMissingError, match="drop --coverage-png"):
        require_matplotlib()


def test_no_layers_and_unwritable_path_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no MoE layers"):
        build_coverage_figure(ExpertCoverage("shared", "routed"), CONTEXT)
    with pytest.raises(OutputWriteError, match="cannot write the coverage plot"):
        write_coverage_plot(_small(), tmp_path / "missing" / "c.png", CONTEXT)
