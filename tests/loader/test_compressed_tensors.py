"""quantport.load on compressed-tensors checkpoints that quantport writes: exactly the simulated model."""

from __future__ import annotations

import copy

import pytest
import torch

import quantport
from moe_models import tiny_moe
from quantport.export import recipe_for_format
from quantport.loader import CheckpointError, load, load_report
from quantport.loader.compressed_tensors import CT_WEIGHT_SCHEMES, ct_scheme_for
from quantport.modules.quant_experts import experts_quantizer_of
from quantport.modules.quant_linear import QuantLinear
from quantport.read.quant_config import CTGroup
from quantport.recipes import LinearScheme
from tiny_models import make_calibration_batches

CT = "compressed-tensors"
DENSE_RECIPES = [
    ("fp8", None),
    ("fp8", "fp8"),
    ("fp8-dynamic", None),
    ("fp8-block", None),
    ("nvfp4", None),
    ("w4a16-nvfp4", None),
    ("mxfp4", None),
    ("int8", None),
    ("w4a16", None),
    ("w4a16-asym", None),
    ("w8a16", None),
    ("w8a16-asym", None),
]
BLOCK_DIMS = dict(hidden_size=256, intermediate_size=384, head_dim=64)  # several 128x128 blocks per weight


def _as_loaded(model: torch.nn.Module, directory) -> torch.nn.Module:
    """The model as users load it (from_pretrained in the stored dtype, fp32 rotary buffers)."""
    copy.deepcopy(model).save_pretrained(directory)
    return type(model).from_pretrained(directory, dtype="auto").eval()


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(("recipe", "kv_cache"), DENSE_RECIPES, ids=[f"{r}-kv{k}" for r, k in DENSE_RECIPES])
def test_dense_round_trip_gives_the_simulated_logits(tmp_path, tiny_model, calib_batches, recipe, kv_cache):
    dims = BLOCK_DIMS if recipe in ("fp8-block", "w4a16", "w4a16-asym", "w8a16", "w8a16-asym") else {}
    model = _as_loaded(tiny_model("llama", **dims), tmp_path / "base")
    quantport.quantize(model, recipe_for_format(recipe, CT), calib_batches, kv_cache=kv_cache, progress=False)
    out = quantport.export(model, tmp_path / "out", CT, progress=False)

    loaded = load(out, simulate_activations=True)

    modules = dict(loaded.named_modules())
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quantized
    for name, module in quantized.items():
        assert torch.equal(modules[name].weight, module.simulated_weight()), name
    report = load_report(loaded)
    assert set(report.dequantized) == set(quantized) and report.unused_tensors == []
    assert report.dialect.dialect.value == CT
    ids = calib_batches[0]
    with quantport.simulate(model):
        expected = _logits(model, ids)
    assert torch.equal(_logits(loaded, ids), expected)
    assert len(report.kv_simulated) == (2 if kv_cache else 0)


MOE_CASES = [("qwen3_moe", "fp8"), ("qwen3_moe", "int8"), ("mixtral", "nvfp4"), ("olmoe", "w4a16-nvfp4")]


@pytest.mark.parametrize(("family", "recipe"), MOE_CASES, ids=[f"{f}-{r}" for f, r in MOE_CASES])
def test_moe_per_expert_round_trip(tmp_path, family, recipe):
    """Experts stored per expert (compressed-tensors has no fused names) re-fuse to the simulated weights,
    and the loaded model with simulated activations computes the simulated logits."""
    model = _as_loaded(tiny_moe(family), tmp_path / "base")
    batches = make_calibration_batches(vocab_size=256)
    quantport.quantize(model, recipe_for_format(recipe, CT), batches, progress=False)
    out = quantport.export(model, tmp_path / "out", CT, progress=False)

    loaded = load(out, simulate_activations=True)

    modules = dict(loaded.named_modules())
    experts = [(n, q) for n, m in model.named_modules() if (q := experts_quantizer_of(m)) is not None]
    assert experts
    for name, quantizer in experts:
        simulated = quantizer.simulated_parameters()
        assert torch.equal(modules[name].gate_up_proj, simulated["gate_up"]), name
        assert torch.equal(modules[name].down_proj, simulated["down"]), name
    records = load_report(loaded).experts
    assert records and all(not r.fused and r.codec is not None for r in records)
    with quantport.simulate(model):
        expected = _logits(model, batches[0])
    assert torch.equal(_logits(loaded, batches[0]), expected)


def test_every_scheme_quantport_writes_is_read():
    """The reader's table covers every compressed-tensors row of the writer (and decodes it with that scheme)."""
    from quantport.dialects.compressed_tensors import CT_SCHEMES

    for scheme, row in CT_SCHEMES.items():
        group = CTGroup(
            "group_0", ("Linear",), dict(row.weights), row.input_activations and dict(row.input_activations), row.format
        )
        match = ct_scheme_for(group)
        assert (match.scheme, match.activations_known) == (scheme, True), scheme
    read = {s for by_inputs in CT_WEIGHT_SCHEMES.values() for s in by_inputs.values()}
    assert read == set(CT_SCHEMES)


def test_unknown_arguments_are_named():
    group = CTGroup(
        "group_0",
        ("Linear",),
        {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 64},
        None,
        "pack-quantized",
    )
    with pytest.raises(CheckpointError, match=r"'group_0': int4 group weights group 64 are not supported"):
        ct_scheme_for(group)


def test_other_activation_arguments_keep_the_weights():
    """Static INT8 activations (not a quantport scheme): weights decode as W8A8's, activations are not simulated."""
    weights = {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True}
    inputs = {"num_bits": 8, "type": "int", "strategy": "tensor", "dynamic": False}
    match = ct_scheme_for(CTGroup("g", ("Linear",), weights, inputs, "int-quantized"))
    assert match.scheme is LinearScheme.INT8 and not match.activations_known
