"""quantize(..., algorithm=...): every algorithm's output goes through the same exporters and checker, and
``quantport.load`` reads it back to the logits of the in-memory simulation; ``max`` is today's bytes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import quantport
from checkpoint_files import load_tensors
from moe_models import tiny_moe
from quantport.algorithm_options import (
    AVAILABLE_ALGORITHMS,
    Algorithm,
    GptqOptions,
    MaxOptions,
    MseOptions,
    algorithm_options,
)
from quantport.calibrate.algorithms import ALGORITHMS
from quantport.errors import InvalidArgumentError
from quantport.loader import load
from quantport.modules.quant_linear import QuantLinear
from quantport.state import state_of
from tiny_models import make_calibration_batches

CASES = [
    ("w4a16", "gptq"),
    ("w4a16", "mse"),
    ("w4a16-asym", "gptq"),
    ("w8a16", "gptq"),
    ("int8", "mse"),
    ("nvfp4", "gptq"),
    ("nvfp4", "mse"),
    ("fp8", "mse"),
    ("fp8", "gptq"),
]


def _as_loaded(model, directory):
    """The model as users load it (from_pretrained in the stored dtype, fp32 rotary buffers)."""
    copy.deepcopy(model).save_pretrained(directory)
    return AutoModelForCausalLM.from_pretrained(directory, dtype="auto").eval()


@pytest.mark.parametrize(("recipe", "algorithm"), CASES)
def test_round_trip_gives_the_simulated_model(tmp_path, tiny_model, calib_batches, recipe, algorithm):
    model = _as_loaded(tiny_model("llama"), tmp_path / "base")
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantport.quantize(model, recipe, calib_batches, progress=False, algorithm=algorithm)
    out = quantport.export(model, tmp_path / "out", progress=False)  # the checker runs on it before it is kept
    loaded = load(out, simulate_activations=True)

    modules = dict(loaded.named_modules())
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    changed = [n for n, m in quantized.items() if not torch.equal(m.weight, original[n])]
    assert changed  # the algorithm chose other weights or scales than max for some layers
    for name, module in quantized.items():
        assert torch.equal(modules[name].weight, module.simulated_weight()), name
    with torch.no_grad(), quantport.simulate(model):
        expected = model(calib_batches[0]).logits
    with torch.no_grad():
        assert torch.equal(loaded(calib_batches[0]).logits, expected)
    report = json.loads((out / "quantport_report.json").read_text())
    assert report["algorithm"] == algorithm and report["left_at_round_to_nearest"] == {}


@pytest.mark.parametrize("recipe", ["w4a16", "nvfp4", "fp8"])
def test_max_writes_the_bytes_of_no_algorithm(tmp_path, tiny_model, calib_batches, recipe):
    tensors = []
    for name, options in (("default", {}), ("max", {"algorithm": "max"}), ("options", {"algorithm": MaxOptions()})):
        model = tiny_model("llama")
        quantport.quantize(model, recipe, calib_batches, progress=False, **options)
        tensors.append(load_tensors(quantport.export(model, tmp_path / name, progress=False)))
    for other in tensors[1:]:
        assert sorted(other) == sorted(tensors[0])
        for key, value in tensors[0].items():
            assert torch.equal(other[key], value), key


def _logit_error(model, base, batches):
    with torch.no_grad(), quantport.simulate(model):
        quantized = torch.cat([model(b).logits.float() for b in batches])
    with torch.no_grad():
        reference = torch.cat([base(b).logits.float() for b in batches])
    return float((quantized - reference).square().mean())


def test_gptq_and_mse_bring_int4_logits_closer_than_max(tiny_model, calib_batches):
    base = tiny_model("llama")
    errors = {}
    for algorithm in ("max", "mse", "gptq"):
        model = copy.deepcopy(base)
        quantport.quantize(model, "w4a16", calib_batches, progress=False, algorithm=algorithm)
        errors[algorithm] = _logit_error(model, base, calib_batches)
    assert errors["gptq"] < 0.7 * errors["max"], errors
    assert errors["mse"] < 1.1 * errors["max"], errors  # weight error, not output error: close to max here


def test_typed_options_reach_the_algorithm(tiny_model, calib_batches):
    results = []
    for options in (GptqOptions(), GptqOptions(act_order=True), GptqOptions(damp=0.1)):
        model = tiny_model("llama")
        quantport.quantize(model, "w4a16", calib_batches, progress=False, algorithm=options)
        results.append(model.model.layers[0].self_attn.o_proj.simulated_weight())
        assert state_of(model).algorithm == "gptq"
    assert not torch.equal(results[0], results[1]) and not torch.equal(results[0], results[2])


@pytest.mark.parametrize("algorithm", ["mse", GptqOptions(experts=False)])
def test_moe_experts_keep_round_to_nearest_and_are_named(tmp_path, algorithm):
    model = tiny_moe("qwen3_moe")  # hidden size 64: NVFP4's 16-input blocks fit
    batches = make_calibration_batches(vocab_size=256)
    quantport.quantize(model, "nvfp4", batches, progress=False, algorithm=algorithm)
    state = state_of(model)
    assert state.experts and set(state.left_at_rtn) == set(state.experts)
    assert all(
        "not implemented for MoE experts" in why or "--gptq-no-experts" in why for why in state.left_at_rtn.values()
    )
    out = quantport.export(model, tmp_path / "out", progress=False)
    report = json.loads((out / "quantport_report.json").read_text())
    assert sorted(report["left_at_round_to_nearest"]) == sorted(state.experts)


def test_algorithm_names_and_errors():
    assert set(ALGORITHMS) == set(AVAILABLE_ALGORITHMS)
    assert algorithm_options(None) == MaxOptions()
    assert algorithm_options("mse") == MseOptions() and algorithm_options(Algorithm.GPTQ) == GptqOptions()
    with pytest.raises(InvalidArgumentError, match="unknown algorithm 'rtn'; choose one of: max, mse, gptq, awq"):
        algorithm_options("rtn")
    with pytest.raises(InvalidArgumentError, match="damp"):
        GptqOptions(damp=1.5)


def test_gptq_block_size_is_checked_before_calibration(tiny_model, calib_batches):
    with pytest.raises(InvalidArgumentError, match="multiple of int4-g128's group size"):
        quantport.quantize(
            tiny_model("llama"), "w4a16", calib_batches, progress=False, algorithm=GptqOptions(block_size=64)
        )
