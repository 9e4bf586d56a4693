"""quantize(): layer selection, bad input, calibration data."""

from __future__ import annotations

import pytest
import torch

import quantport
from quantport.errors import CalibrationDataError, InvalidWeightsError
from quantport.modules.quant_linear import QuantLinear
from quantport.state import state_of


def test_nan_weights_are_a_clear_error(tiny_model, calib_batches):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(InvalidWeightsError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*--exclude"):
        quantport.quantize(model, "fp8", calib_batches, progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_nan_weights_in_an_excluded_layer_are_fine(tiny_model, calib_batches):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    quantport.quantize(model, "fp8", calib_batches, exclude=["*.down_proj"], progress=False)
    assert "model.layers.1.mlp.down_proj" in state_of(model).excluded


def test_unblockable_layers_are_excluded_and_reported(tiny_model, calib_batches):
    # intermediate 200 is not a multiple of 16: down_proj cannot be NVFP4
    model = tiny_model("llama", intermediate_size=200)
    quantport.quantize(model, "nvfp4", calib_batches, progress=False)
    state = state_of(model)
    assert state.excluded["model.layers.0.mlp.down_proj"].startswith("in_features 200 is not a multiple of 16")
    assert isinstance(model.model.layers[0].mlp.gate_proj, QuantLinear)


def test_excluding_one_fused_member_excludes_the_group(tiny_model, calib_batches):
    model = tiny_model("llama")
    quantport.quantize(model, "nvfp4", calib_batches, exclude=["*.layers.0.self_attn.k_proj"], progress=False)
    excluded = state_of(model).excluded
    assert {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"} <= set(excluded)
    assert "fused with model.layers.0.self_attn.k_proj" in excluded["model.layers.0.self_attn.q_proj"]


def test_layer_that_never_runs_is_left_unquantized(tiny_model, calib_batches):
    model = tiny_model("llama")
    model.model.layers[1].extra = torch.nn.Linear(128, 128).to(torch.bfloat16)  # never called in forward
    quantport.quantize(model, "fp8", calib_batches, progress=False)
    assert "never ran" in state_of(model).excluded["model.layers.1.extra"]


def test_weight_only_recipe_needs_no_calibration(tiny_model):
    model = quantport.quantize(tiny_model("llama"), "w4a16-nvfp4", progress=False)
    assert state_of(model).calibration_tokens == 0


def test_missing_tokenizer_is_a_clear_error(tiny_model):
    with pytest.raises(CalibrationDataError, match="calib_data"):
        quantport.quantize(tiny_model("llama"), "fp8", progress=False)


def test_bad_batches_are_a_clear_error(tiny_model):
    with pytest.raises(CalibrationDataError, match=r"input_ids \[B, T\]"):
        quantport.quantize(tiny_model("llama"), "fp8", [torch.zeros(5, dtype=torch.long)], progress=False)


def test_unknown_option(tiny_model):
    with pytest.raises(TypeError, match="calib_sample"):
        quantport.quantize(tiny_model("llama"), "fp8", calib_sample=3)


def test_simulated_model_stays_close(tiny_model, calib_batches):
    model = tiny_model("llama")
    with torch.no_grad():
        reference = model(calib_batches[0]).logits.float()
    quantport.quantize(model, "fp8", calib_batches, progress=False)
    with torch.no_grad(), quantport.simulate(model):
        simulated = model(calib_batches[0]).logits.float()
    assert 0 < (simulated - reference).norm() / reference.norm() < 0.1


def test_format_option_picks_the_numerics_of_the_target_format(tmp_path, tiny_model, calib_batches):
    import json

    model = quantport.quantize(tiny_model("llama"), "nvfp4", calib_batches, format="compressed-tensors", progress=False)
    assert state_of(model).recipe.scheme.value == "nvfp4-ct"
    quantport.export(model, tmp_path / "out", format="compressed-tensors", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"


def test_nan_expert_weights_are_a_clear_error():
    from moe_models import tiny_moe
    from quantport.modules.quant_experts import experts_quantizer_of

    model = tiny_moe("qwen3_moe")
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[2, 0, 0] = float("nan")
    with pytest.raises(InvalidWeightsError, match=r"model\.layers\.1\.mlp\.experts\.down_proj"):
        quantport.quantize(model, "fp8", [torch.tensor([[1, 2, 3]])], progress=False)
    assert experts_quantizer_of(model.model.layers[1].mlp.experts) is None
