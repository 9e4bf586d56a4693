"""Calibration state belongs to one model's run: no module globals in observe/ or kv_cache/.

Two models calibrated with interleaved forwards get exactly the statistics each gets alone, each keeps
its own attention implementation, and nothing refers to an activation once the run is over.
"""

from __future__ import annotations

import torch

import quantport
from quantport.modules import QuantLinear, QuantMode
from quantport.modules.kv_cache import kv_quantizer_of, original_implementation
from quantport.state import iter_quant_modules, set_mode
from tiny_models import TINY_MODELS, make_calibration_batches

BATCHES = make_calibration_batches()


def _statistics(model):
    stats = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            stats[name] = module.input_amax.clone()
        kv = kv_quantizer_of(module)
        if kv is not None:
            stats[f"{name}.k"], stats[f"{name}.v"] = kv.k_amax.clone(), kv.v_amax.clone()
    return stats


def _reset(model):
    for module in iter_quant_modules(model):
        if isinstance(module, QuantLinear):
            module.input_amax = None
        else:
            module.k_amax = module.v_amax = None


def _model(family, seed, implementation):
    model = TINY_MODELS[family](seed)
    model.config._attn_implementation = implementation
    return model


def _forwards(model, batches):
    with torch.no_grad():
        for batch in batches:
            model(batch, use_cache=False)


def test_interleaved_calibration_of_two_models_equals_each_alone():
    alone_a = _model("llama", 0, "eager")
    quantport.quantize(alone_a, "fp8", BATCHES, kv_cache="fp8", progress=False)
    expected_a = _statistics(alone_a)

    # model B: installed, then calibrated by hand over the same batches, alone and interleaved with A
    b = _model("qwen3", 1, "sdpa")
    quantport.quantize(b, "fp8", BATCHES[:1], kv_cache="fp8", progress=False)
    _reset(b)
    set_mode(b, QuantMode.CALIBRATE)
    _forwards(b, BATCHES)
    set_mode(b, QuantMode.OFF)
    expected_b = _statistics(b)
    _reset(b)

    def interleaved():  # A's calibration data; B runs a forward before each of A's
        for batch in BATCHES:
            _forwards(b, [batch])
            yield batch

    a = _model("llama", 0, "eager")
    set_mode(b, QuantMode.CALIBRATE)
    quantport.quantize(a, "fp8", interleaved(), kv_cache="fp8", progress=False)
    set_mode(b, QuantMode.OFF)

    for expected, model in ((expected_a, a), (expected_b, b)):
        actual = _statistics(model)
        assert actual.keys() == expected.keys()
        for name, value in expected.items():
            assert torch.equal(actual[name], value), name
    assert original_implementation(a.config._attn_implementation) == "eager"
    assert original_implementation(b.config._attn_implementation) == "sdpa"


def test_a_run_shares_one_memo_per_model_and_drops_it():
    a, b = _model("llama", 0, "sdpa"), _model("llama", 2, "sdpa")
    for model in (a, b):
        quantport.quantize(model, "fp8", BATCHES[:1], progress=False)
    set_mode(a, QuantMode.CALIBRATE)
    set_mode(b, QuantMode.CALIBRATE)
    memos_a = {id(m.input_memo) for m in a.modules() if isinstance(m, QuantLinear)}
    memos_b = {id(m.input_memo) for m in b.modules() if isinstance(m, QuantLinear)}
    assert len(memos_a) == 1 and len(memos_b) == 1 and memos_a != memos_b
    set_mode(a, QuantMode.OFF)
    set_mode(b, QuantMode.OFF)
    assert all(m.input_memo is None for model in (a, b) for m in model.modules() if isinstance(m, QuantLinear))


def test_modules_keep_no_process_wide_state():
    """observe and kv_cache hold no mutable module-level containers or classes with class-level state."""
    from quantport.modules import kv_cache, observe

    for module in (observe, kv_cache):
        for name, value in vars(module).items():
            if name.startswith("__"):
                continue
            assert not isinstance(value, dict | list | set), f"{module.__name__}.{name} is process-wide state"
