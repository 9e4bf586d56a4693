from __future__ import annotations

import struct
import zlib

import pytest

from quantport.report.coverage import ExpertCoverage, LayerCoverage
from quantport.report.heatmap import write_coverage_heatmap


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


def test_heatmap_is_a_valid_png(tmp_path):
    path = write_coverage_heatmap(_coverage(), tmp_path / "coverage.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (4 * 12, 2 * 12)
    idat = data.index(b"IDAT")
    length = struct.unpack(">I", data[idat - 4 : idat])[0]
    raw = zlib.decompress(data[idat + 4 : idat + 4 + length])
    assert len(raw) == height * (1 + width * 3)
    dead_pixel = raw[1 + 12 * 3 : 1 + 12 * 3 + 3]  # row 0, expert 1
    assert dead_pixel == bytes((200, 30, 30))


def test_heatmap_needs_moe_layers(tmp_path):
    with pytest.raises(ValueError, match="no MoE layers"):
        write_coverage_heatmap(ExpertCoverage("shared", "routed"), tmp_path / "x.png")
