"""The layer-by-layer path writes the same bytes as the whole-model path (issue 12: statistics and every
exported byte equal, activations propagated unquantized), for every family, recipe and format."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_models import tiny_moe
from quantport.loading import resolve_model_dir
from sequential_checkpoints import differences, whole_and_sequential

TINY_LLAMA = resolve_model_dir("bundled:tiny-llama")

MOE_CASES = [
    ("qwen3_moe", "nvfp4", None, "fp8"),
    ("qwen3_moe", "fp8", None, None),
    ("qwen3_moe", "int8", "compressed-tensors", None),
    ("qwen2_moe", "nvfp4", None, "fp8"),
    ("mixtral", "fp8", None, "fp8"),
    ("deepseek_v3", "nvfp4", None, None),
    ("deepseek_v3", "int8", "compressed-tensors", None),
    ("olmoe", "nvfp4", None, None),
    ("gpt_oss", "mxfp4-experts", "mxfp4", None),
    ("llama4_text", "nvfp4", None, "fp8"),
    ("llama4", "fp8", "compressed-tensors", None),
]


def _saved(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


@pytest.mark.parametrize(("family", "recipe", "fmt", "kv"), MOE_CASES, ids=lambda v: str(v))
def test_moe_family_checkpoints_are_identical(tmp_path: Path, family: str, recipe: str, fmt, kv) -> None:
    model_dir = _saved(tiny_moe(family), tmp_path / "model")
    whole, sequential = whole_and_sequential(model_dir, tmp_path, recipe, fmt, kv_cache=kv)
    assert differences(whole, sequential) == []


@pytest.mark.parametrize(
    ("recipe", "fmt", "kv"), [("nvfp4", None, "fp8"), ("w4a16", None, None), ("int8", "compressed-tensors", "fp8")]
)
def test_dense_checkpoints_are_identical(tmp_path: Path, recipe: str, fmt, kv) -> None:
    whole, sequential = whole_and_sequential(TINY_LLAMA, tmp_path, recipe, fmt, kv_cache=kv)
    assert differences(whole, sequential) == []


def test_sliding_and_full_attention_layers_get_their_own_masks(tmp_path: Path) -> None:
    """GPT-OSS alternates sliding-window and full attention: each layer must run with its own mask (a
    window shorter than the calibration sequences makes the two differ)."""
    model = tiny_moe("gpt_oss")
    model.config.layer_types = ["sliding_attention", "full_attention"]
    model.config.sliding_window = 4
    model_dir = _saved(model, tmp_path / "model")
    whole, sequential = whole_and_sequential(model_dir, tmp_path, "mxfp4-experts", "mxfp4")
    assert differences(whole, sequential) == []


def test_report_says_how_it_ran(tmp_path: Path) -> None:
    import json

    whole, sequential = whole_and_sequential(TINY_LLAMA, tmp_path, "fp8")
    run = json.loads((sequential / "quantport_report.json").read_text())["run"]
    assert run["path"] == "layer-by-layer"
    assert run["memory"]["device"] == "cpu" and run["memory"]["peak_host_rss_bytes"] > 0
    assert json.loads((whole / "quantport_report.json").read_text())["run"] == {"path": "whole-model", "memory": None}
