"""quantport.load on checkpoints written by llm-compressor 0.14 (tests/fixtures/llmcompressor, made by
scripts/make-llmcompressor-fixtures.sh): every weight equals compressed-tensors' own decompression,
as transformers runs it (``CompressedTensorsConfig(run_compressed=False)``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from quantport.loader import CheckpointError, load, load_report

FIXTURES = Path(__file__).parent.parent / "fixtures" / "llmcompressor"
EXPECTED_SCHEMES = {
    "llama-w8a8-int8": "int8",
    "llama-w4a16": "w4a16",
    "llama-fp8": "fp8",
    "llama-fp8-dynamic": "fp8-dynamic",
    "llama-nvfp4": "nvfp4-ct",
    "qwen3moe-w4a16": "w4a16",
}


def _decompressed_by_compressed_tensors(directory: Path) -> dict[str, torch.Tensor]:
    config = CompressedTensorsConfig(run_compressed=False)
    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=config)
    return model.state_dict()


@pytest.mark.parametrize("name", sorted(EXPECTED_SCHEMES))
def test_weights_equal_compressed_tensors_decompression(name):
    directory = FIXTURES / name
    expected = _decompressed_by_compressed_tensors(directory)

    loaded = load(directory)

    actual = loaded.state_dict()
    assert actual.keys() == expected.keys()
    for key, tensor in actual.items():
        assert tensor.dtype == expected[key].dtype and torch.equal(tensor, expected[key]), key
    report = load_report(loaded)
    assert report.dequantized and set(report.dequantized.values()) == {EXPECTED_SCHEMES[name]}
    assert report.unused_tensors == [] or all(t.endswith("input_scale") for t in report.unused_tensors)


def test_moe_experts_are_read_per_expert():
    report = load_report(load(FIXTURES / "qwen3moe-w4a16"))
    assert [r.fused for r in report.experts] == [False]
    assert report.experts[0].codec is not None


@pytest.mark.parametrize("name", ["llama-fp8", "llama-nvfp4", "llama-w8a8-int8", "qwen3moe-w4a16"])
def test_activation_simulation_runs_with_the_stored_scales(name):
    loaded = load(FIXTURES / name, simulate_activations=True)
    ids = torch.arange(16)[None]
    with torch.no_grad():
        logits = loaded(ids).logits
    assert torch.isfinite(logits).all()
    report = load_report(loaded)
    quantizes_inputs = name != "qwen3moe-w4a16"
    assert bool(report.activations_simulated) == quantizes_inputs


def test_fixtures_stay_small():
    total = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    assert total < 3_000_000


def test_unsupported_arguments_are_a_checkpoint_error_naming_them(tmp_path):
    directory = tmp_path / "w4a16-g64"
    shutil.copytree(FIXTURES / "llama-w4a16", directory)
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 64
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"int4 group weights group 64 are not supported by quantport\.load"):
        load(directory)
