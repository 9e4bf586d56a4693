from __future__ import annotations

import pytest

from quantport.report.coverage import ExpertCoverage, LayerCoverage
from quantport.report.plot_layout import (
    LAYER_STEPS,
    LayerLabels,
    dead_expert_text,
    figure_size,
    input_amax_spread,
    layer_labels,
    tick_positions,
)


def test_layer_labels_keep_the_parts_that_differ():
    names = [f"model.layers.{i}.mlp" for i in (0, 1, 10, 47)]
    assert layer_labels(names) == LayerLabels(("0", "1", "10", "47"), "MoE layer (model.layers.N.mlp)")


def test_layer_labels_keep_names_with_nothing_in_common_whole():
    assert layer_labels(["a.b", "c"]) == LayerLabels(("a.b", "c"), "MoE layer")
    assert layer_labels(["model.layers.3.mlp"]) == LayerLabels(("model.layers.3.mlp",), "MoE layer")


@pytest.mark.parametrize(
    ("count", "max_labels", "expected"),
    [
        (8, 40, [0, 1, 2, 3, 4, 5, 6, 7]),
        (128, 40, list(range(0, 128, 4)) + [127]),
        (256, 20, list(range(0, 256, 16)) + [255]),
        (256, 40, list(range(0, 256, 8)) + [255]),
        (0, 10, []),
    ],
)
def test_expert_ticks(count, max_labels, expected):
    assert tick_positions(count, max_labels) == expected


def test_layer_ticks_use_round_steps_and_show_the_last_layer():
    assert tick_positions(60, 25, LAYER_STEPS) == list(range(0, 60, 5)) + [59]
    assert tick_positions(48, 50, LAYER_STEPS) == list(range(48))


@pytest.mark.parametrize(("experts", "layers"), [(8, 4), (8, 48), (128, 60), (256, 60), (1024, 200)])
def test_figure_size_stays_within_a_screen(experts, layers):
    size = figure_size(experts, layers, text_lines=14)
    assert 10.0 <= size.width <= 20.0
    assert 4.5 <= size.height - size.text_height <= 14.0
    assert size.text_height == pytest.approx(0.35 + 0.17 * 14)
    assert figure_size(experts, layers, 0).text_height == 0.0


def test_figure_grows_with_experts_and_layers():
    assert figure_size(256, 60, 0).width > figure_size(128, 60, 0).width > figure_size(8, 60, 0).width
    assert figure_size(8, 48, 0).height > figure_size(8, 8, 0).height


def _dead_coverage(layers: int, dead: int, experts: int = 64) -> ExpertCoverage:
    coverage = ExpertCoverage("per-expert", "routed")
    for index in range(layers):
        tokens = tuple(0 if e < dead else 100 for e in range(experts))
        coverage.layers.append(LayerCoverage(f"model.layers.{index}.mlp", tokens))
    return coverage


def test_dead_expert_text_names_each_layer_and_expert():
    coverage = _dead_coverage(layers=3, dead=2)
    coverage.layers[1] = LayerCoverage("model.layers.1.mlp", (100,) * 64)
    text = dead_expert_text(coverage, layer_labels([layer.layer for layer in coverage.layers]))
    assert text.lines == ("layer 0: 2 dead: 0, 1", "layer 2: 2 dead: 0, 1")
    assert (text.dead, text.layers) == (4, 2)


def test_dead_expert_text_is_truncated_in_both_directions():
    coverage = _dead_coverage(layers=30, dead=20)
    labels = layer_labels([layer.layer for layer in coverage.layers])
    text = dead_expert_text(coverage, labels, max_lines=5, max_experts=3)
    assert text.lines == (
        "layer 0: 20 dead: 0, 1, 2 (+17 more)",
        "layer 1: 20 dead: 0, 1, 2 (+17 more)",
        "layer 2: 20 dead: 0, 1, 2 (+17 more)",
        "layer 3: 20 dead: 0, 1, 2 (+17 more)",
        "... and 26 more layers (full list: quantport_report.json)",
    )
    assert (text.dead, text.layers) == (600, 30)


def test_input_amax_spread_is_max_over_median_of_calibrated_experts():
    layer = LayerCoverage("l", (5, 0, 5, 5), {"down": (2.0, 0.0, 4.0, 10.0)})
    assert input_amax_spread(layer, "down") == pytest.approx(10.0 / 4.0)
    assert input_amax_spread(layer, "gate_up") is None
    assert input_amax_spread(LayerCoverage("l", (5, 0), {"down": (3.0, 0.0)}), "down") is None
