"""gpt-oss's native MXFP4 checkpoint: experts as *_blocks / *_scales, read back by transformers' own code."""

from __future__ import annotations

import json

import pytest
import torch

import quantport
from checkpoint_files import load_tensors
from moe_models import EXPERTS, silence_expert, tiny_moe
from quantport.arch.experts import find_moe_blocks
from quantport.check import check_checkpoint
from quantport.export.targets import UnsupportedFormatError
from quantport.modules.quant_experts import experts_quantizer_of
from quantport.state import state_of
from tiny_models import make_calibration_batches

BATCHES = make_calibration_batches(vocab_size=256)


def _export(tmp_path, calibration=BATCHES, dead=None):
    model = tiny_moe("gpt_oss")
    if dead is not None:
        silence_expert(model, dead)
    quantport.quantize(model, "mxfp4-experts", calibration, progress=False)
    quantport.export(model, tmp_path / "out", format="mxfp4", progress=False)
    return model, tmp_path / "out"


def test_layout_config_and_checker(tmp_path):
    model, out = _export(tmp_path, calibration=[torch.tensor([[17]])], dead=2)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "mxfp4"
    assert "model.layers.0.self_attn.q_proj" in config["modules_to_not_convert"]
    tensors = load_tensors(out)
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp.experts"
        assert tensors[f"{prefix}.gate_up_proj_blocks"].shape == (EXPERTS, 64, 2, 16)  # [E, 2I, H/32, 16]
        assert tensors[f"{prefix}.down_proj_scales"].shape == (EXPERTS, 64, 1)  # [E, H, I/32]
        for key in ("gate_up_proj_scales", "down_proj_scales"):
            assert (tensors[f"{prefix}.{key}"] != 255).all()  # E8M0 255 is NaN: never written
        assert tensors[f"{prefix}.gate_up_proj_bias"].dtype == torch.bfloat16
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert all(2 in layer.dead_experts for layer in state_of(model).coverage.layers)
    report = check_checkpoint(out)
    assert report.ok, [str(f) for f in report.errors]


def test_transformers_decodes_exactly_our_simulated_experts(tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    model, out = _export(tmp_path)
    tensors = load_tensors(out)
    blocks = find_moe_blocks(model)
    assert blocks
    for block in blocks:
        simulated = experts_quantizer_of(block.experts).simulated_parameters()
        for parameter in ("gate_up_proj", "down_proj"):
            decoded = convert_moe_packed_tensors(
                tensors[f"{block.experts_name}.{parameter}_blocks"], tensors[f"{block.experts_name}.{parameter}_scales"]
            )
            key = "gate_up" if parameter == "gate_up_proj" else "down"
            assert decoded.shape == simulated[key].shape and torch.equal(decoded, simulated[key]), parameter


def test_only_gpt_oss_experts_have_this_format(tmp_path):
    model = tiny_moe("qwen3_moe")
    quantport.quantize(model, "mxfp4-experts", BATCHES, progress=False)
    with pytest.raises(UnsupportedFormatError, match="GPT-OSS experts only.*qwen3_moe"):
        quantport.export(model, tmp_path / "out", format="mxfp4", progress=False)
    assert not (tmp_path / "out").exists()


def test_quantized_linears_are_refused(tmp_path):
    model = tiny_moe("gpt_oss")
    quantport.quantize(model, "mxfp4", BATCHES, progress=False)
    with pytest.raises(UnsupportedFormatError, match="mxfp4-experts"):
        quantport.export(model, tmp_path / "out", format="mxfp4", progress=False)


def test_transformers_loads_it_and_computes_our_simulation(tmp_path):
    import copy

    from transformers import AutoModelForCausalLM, Mxfp4Config

    base = tmp_path / "base"
    copy.deepcopy(tiny_moe("gpt_oss")).save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    quantport.quantize(model, "mxfp4-experts", BATCHES, progress=False)
    quantport.export(model, tmp_path / "out", format="mxfp4", progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", quantization_config=Mxfp4Config(dequantize=True), dtype=torch.bfloat16
    )
    with torch.no_grad(), quantport.simulate(model):
        expected = model(BATCHES[0]).logits
    with torch.no_grad():
        assert torch.equal(loaded(BATCHES[0]).logits, expected)
