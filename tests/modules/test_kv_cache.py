from __future__ import annotations

import torch

import quantport
from quantport.modules.kv_cache import kv_quantizer_of


def test_kv_calibration_leaves_outputs_unchanged_and_records_amax(tiny_model, calib_batches):
    model = tiny_model("llama")
    with torch.no_grad():
        before = model(calib_batches[0]).logits
    # keys after RoPE, seen by a hook on the original attention function
    quantport.quantize(model, "fp8-dynamic", calib_batches, kv_cache="fp8", progress=False)
    attention = model.model.layers[0].self_attn
    quantizer = kv_quantizer_of(attention)
    assert quantizer.k_amax.item() > 0 and quantizer.v_amax.item() > 0
    k_scale, v_scale = quantizer.scales()
    assert torch.equal(k_scale, quantizer.k_amax / 448)
    with torch.no_grad():
        after = model(calib_batches[0]).logits
    assert torch.equal(before, after)


def test_v_amax_equals_max_of_value_projection(tiny_model, calib_batches):
    # values are not rotated, so their amax is the amax of v_proj's output
    model = tiny_model("llama")
    seen = []
    handle = model.model.layers[1].self_attn.v_proj.register_forward_hook(lambda m, i, o: seen.append(o.abs().amax()))
    quantport.quantize(model, "fp8-dynamic", calib_batches, kv_cache="fp8", progress=False)
    handle.remove()
    quantizer = kv_quantizer_of(model.model.layers[1].self_attn)
    assert quantizer.v_amax.item() == max(s.item() for s in seen)


def test_simulated_kv_changes_outputs_only_slightly(tiny_model, calib_batches):
    model = tiny_model("qwen3")
    with torch.no_grad():
        before = model(calib_batches[0]).logits.float()
    quantport.quantize(model, "fp8-dynamic", calib_batches, kv_cache="fp8", progress=False)
    with torch.no_grad(), quantport.simulate(model):
        after = model(calib_batches[0]).logits.float()
    assert not torch.equal(before, after)
    assert (after - before).norm() / before.norm() < 0.1
