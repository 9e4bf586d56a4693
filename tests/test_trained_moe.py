"""The trained tiny MoE models in ../shared/models: real routing imbalance, end to end through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantport.cli import main

MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"

pytestmark = pytest.mark.skipif(not MODELS.is_dir(), reason="../shared/models is not available")


@pytest.mark.parametrize("name", ["qwen3moe_tiny", "llama4_tiny"])
def test_cli_on_trained_moe(tmp_path, capsys, name):
    out = tmp_path / name
    args = [
        "quantize",
        str(MODELS / name),
        str(out),
        "--recipe",
        "nvfp4",
        "--calib-samples",
        "8",
        "--calib-seq-len",
        "256",
        "--device",
        "cpu",
        "--quiet",
        "--coverage-png",
        str(tmp_path / "cov.png"),
    ]
    assert main(args) == 0
    summary = capsys.readouterr().out
    assert "experts modules  : 4" in summary and "tokens per expert min" in summary
    report = json.loads((out / "quantport_report.json").read_text())
    layers = report["coverage"]["layers"]
    assert len(layers) == 4
    counts = [n for layer in layers.values() for n in layer]
    assert max(counts) > 3 * max(1, min(counts))  # trained routers are far from uniform
    assert (tmp_path / "cov.png").read_bytes()[:4] == b"\x89PNG"
