"""The coverage quantize records carries each expert's observed input amax, so the plot draws its spread panel."""

from __future__ import annotations

import pytest
import torch

import quantport
from moe_models import tiny_moe
from quantport.state import state_of
from tiny_models import make_calibration_batches


def test_quantize_records_observed_input_amax_per_expert():
    model = tiny_moe("qwen3_moe")
    quantport.quantize(model, "fp8", make_calibration_batches(model.config.vocab_size), progress=False)
    coverage = state_of(model).coverage
    assert coverage is not None and coverage.layers
    for layer in coverage.layers:
        assert set(layer.input_amax) == {"gate_up", "down"}
        for projection, amax in layer.input_amax.items():
            assert len(amax) == len(layer.tokens)
            for tokens, value in zip(layer.tokens, amax, strict=True):
                # an expert that saw tokens observed a positive amax; one that saw none observed nothing
                assert (value > 0) == (tokens > 0), (layer.layer, projection)


def test_the_plot_draws_the_spread_panel_from_a_real_run():
    pytest.importorskip("matplotlib")
    from quantport.report.coverage_plot import PlotContext, build_coverage_figure

    model = tiny_moe("qwen3_moe")
    quantport.quantize(model, "fp8", make_calibration_batches(model.config.vocab_size), progress=False)
    coverage = state_of(model).coverage
    figure = build_coverage_figure(coverage, PlotContext("tiny", "fp8", state_of(model).calibration_tokens))
    labels = " ".join(axis.get_ylabel() + axis.get_title() for axis in figure.axes)
    assert "spread" in labels.lower() or "amax" in labels.lower(), labels
    assert torch.isfinite(torch.tensor([v for layer in coverage.layers for v in layer.input_amax["down"]])).all()
