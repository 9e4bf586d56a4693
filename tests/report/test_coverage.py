from __future__ import annotations

from quantport.report.coverage import ExpertCoverage, LayerCoverage


def _coverage() -> ExpertCoverage:
    coverage = ExpertCoverage("shared", "routed")
    coverage.layers = [
        LayerCoverage("model.layers.0.mlp", (5, 0, 9, 2)),
        LayerCoverage("model.layers.1.mlp", (4, 4, 4, 4)),
    ]
    return coverage


def test_summary_names_dead_experts():
    coverage = _coverage()
    assert coverage.summary() == {
        "experts": 8,
        "experts_without_tokens": 1,
        "min_tokens": 0,
        "median_tokens": 4.0,
        "max_tokens": 9,
    }
    lines = coverage.summary_lines()
    assert "min 0 / median 4 / max 9" in lines[0]
    assert lines[-1] == "  model.layers.0.mlp: experts 1"
    assert coverage.to_json()["experts_without_tokens"] == {"model.layers.0.mlp": [1]}


def test_input_amax_is_optional_and_stays_out_of_the_json():
    layer = LayerCoverage("model.layers.0.mlp", (1, 0), {"gate_up": (2.0, 0.0)})
    assert LayerCoverage("model.layers.0.mlp", (1, 0)).input_amax == {}
    coverage = ExpertCoverage("shared", "routed", [layer])
    assert coverage.to_json()["layers"] == {"model.layers.0.mlp": [1, 0]}
