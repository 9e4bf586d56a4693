"""An independent reader: transformers + compressed-tensors load our exports on CPU.

transformers' compressed-tensors quantizer decompresses every checkpoint weight while loading
(``CompressedTensorsConfig(dequantize=True)``); its logits must equal those of the model with our
simulated (dequantized) weights and unquantized activations, bit for bit. The default path
(``dequantize=False``: compressed modules, decompressed on the first forward) is checked for the
weight-only schemes, whose scales it stores in the model dtype as we do.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

import quantport
from quantport.export import recipe_for_format
from quantport.modules.quant_linear import QuantLinear
from tiny_models import TINY_MODELS, make_calibration_batches

CT_RECIPES = [
    "fp8",
    "fp8-dynamic",
    "fp8-block",
    "nvfp4",
    "w4a16-nvfp4",
    "mxfp4",
    "int8",
    "w4a16",
    "w4a16-asym",
    "w8a16",
    "w8a16-asym",
]
DTYPE = torch.bfloat16


@pytest.fixture(scope="module")
def source_models(tmp_path_factory):
    """The tiny models saved once, so reference and loaded models share every buffer (e.g. rotary)."""
    root = tmp_path_factory.mktemp("sources")
    for family, build in TINY_MODELS.items():
        build(0, hidden_size=256, intermediate_size=384, head_dim=64).save_pretrained(root / family)
    return root


def _quantize_and_export(source, out, recipe):
    model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPE)
    quantport.quantize(
        model, recipe_for_format(recipe, "compressed-tensors"), make_calibration_batches(), progress=False
    )
    quantport.export(model, out, "compressed-tensors", progress=False)
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPE)
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            reference.get_submodule(name).weight.data.copy_(module.simulated_weight())
    return reference


@torch.no_grad()
@pytest.mark.parametrize("family", list(TINY_MODELS))
@pytest.mark.parametrize("recipe", CT_RECIPES)
def test_transformers_dequantizes_to_our_weights(tmp_path, source_models, family, recipe):
    reference = _quantize_and_export(source_models / family, tmp_path / "out", recipe)
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", quantization_config=CompressedTensorsConfig(dequantize=True), dtype=DTYPE
    )
    loaded_state, reference_state = loaded.state_dict(), reference.state_dict()
    assert loaded_state.keys() == reference_state.keys()
    for name, tensor in reference_state.items():
        assert torch.equal(loaded_state[name], tensor), name
    input_ids = make_calibration_batches(n=1)[0]
    assert torch.equal(loaded(input_ids).logits, reference(input_ids).logits)


ASYM_BUG = pytest.mark.xfail(
    strict=True,
    reason="compressed-tensors 0.20 compresses meta modules without packing asymmetric zero points "
    "(pack_quantized/base.py), so transformers' compressed path expects int8 [out, groups] zero points",
)


@torch.no_grad()
@pytest.mark.parametrize(
    "recipe",
    ["w4a16", "w8a16", "mxfp4", "w4a16-nvfp4", pytest.param("w4a16-asym", marks=ASYM_BUG)],
)
def test_transformers_compressed_path_runs_our_weights(tmp_path, source_models, recipe):
    reference = _quantize_and_export(source_models / "llama", tmp_path / "out", recipe)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=DTYPE)
    input_ids = make_calibration_batches(n=1)[0]
    assert torch.equal(loaded(input_ids).logits, reference(input_ids).logits)
