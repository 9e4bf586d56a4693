"""``quantport inspect``: format, recipe, layer formats, sizes, exclusions, KV cache, experts, coverage."""

from __future__ import annotations

import json

import pytest

import quantport
from quantport.check.commands import main
from quantport.inspect_checkpoint import format_summary, inspect_checkpoint
from tiny_models import TINY_MODELS, make_calibration_batches


@pytest.fixture(scope="module")
def nvfp4_llama(tmp_path_factory):
    model = TINY_MODELS["llama"](0)
    quantport.quantize(model, "nvfp4", make_calibration_batches(), kv_cache="fp8", progress=False)
    return quantport.export(model, tmp_path_factory.mktemp("inspect") / "llama-nvfp4", progress=False)


def test_summary_of_a_quantport_export(nvfp4_llama):
    s = inspect_checkpoint(nvfp4_llama)
    assert (s.format, s.quant_algo, s.group_size, s.kv_cache) == ("modelopt", "NVFP4", 16, "FP8")
    assert s.recipe["recipe"] == "nvfp4" and s.producer["name"] == "modelopt"
    assert s.kv_scales == 4 and s.excluded == ["lm_head", "model.embed_tokens"]
    nvfp4 = next(g for g in s.formats if g.format == "NVFP4")
    assert nvfp4.layers == 14 and nvfp4.leaves["q_proj"] == 2
    assert 4.5 <= nvfp4.bits_per_parameter < 4.6  # 4 bits + an fp8 scale per 16 + scalars
    assert s.parameters == sum(p.numel() for p in TINY_MODELS["llama"](0).parameters())
    assert s.moe is None and s.coverage is None and not s.problems
    text = format_summary(s)
    assert "NVFP4" in text and "bits/param" in text and "lm_head" in text


def test_coverage_section_is_read_when_present(nvfp4_llama, tmp_path):
    import shutil

    copy = shutil.copytree(nvfp4_llama, tmp_path / "copy")
    report = json.loads((copy / "quantport_report.json").read_text())
    report["coverage"] = {
        "input_scales": "shared",
        "calibration": "routed",
        "layers": {"model.layers.0.mlp.experts": [5, 0, 3, 9]},
        "experts_without_tokens": {"model.layers.0.mlp.experts": [1]},
    }
    (copy / "quantport_report.json").write_text(json.dumps(report))
    s = inspect_checkpoint(copy)
    assert s.coverage["summary"]["experts_without_tokens"] == 1 and s.coverage["summary"]["max_tokens"] == 9
    assert "saw no calibration tokens" in format_summary(s)


def test_json_cli(nvfp4_llama, capsys):
    assert main(["inspect", str(nvfp4_llama), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["quant_algo"] == "NVFP4" and data["formats"][0]["bits_per_parameter"] > 4


def test_text_cli(nvfp4_llama, capsys):
    assert main(["inspect", str(nvfp4_llama)]) == 0
    assert "layer formats" in capsys.readouterr().out
