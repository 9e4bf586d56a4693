from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantport.modules.quant_linear import QuantLinear, QuantMode
from quantport.recipes import LinearScheme
from quantport.schemes import codec_for


def _linear(in_features=64, out_features=32, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=True).to(torch.bfloat16)


def test_convert_keeps_parameters_and_state_dict():
    linear = _linear()
    weight, keys = linear.weight, list(linear.state_dict())
    q = QuantLinear.convert(linear, codec_for(LinearScheme.FP8))
    assert q is linear and q.weight is weight and list(q.state_dict()) == keys
    assert isinstance(q.revert(), nn.Linear) and type(linear) is nn.Linear


def test_convert_refuses_linear_subclasses():
    class Router(nn.Linear):
        def forward(self, x):
            return super().forward(x).sigmoid()

    with pytest.raises(TypeError, match="Router"):
        QuantLinear.convert(Router(4, 4), codec_for(LinearScheme.FP8))


def test_calibration_records_input_amax_and_keeps_outputs():
    q = QuantLinear.convert(_linear(), codec_for(LinearScheme.FP8))
    x1 = torch.tensor([[0.5, -3.0] + [0.0] * 62], dtype=torch.bfloat16)
    x2 = torch.tensor([[2.0, 1.0] + [0.0] * 62], dtype=torch.bfloat16)
    q.mode = QuantMode.CALIBRATE
    out = q(x1)
    q(x2)
    assert q.input_amax.item() == 3.0 and q.input_amax.dtype == torch.float32
    assert torch.equal(out, F.linear(x1, q.weight, q.bias))


@pytest.mark.parametrize("scheme", list(LinearScheme))
def test_simulation_uses_exactly_the_exported_tensors(scheme):
    codec = codec_for(scheme)
    q = QuantLinear.convert(_linear(in_features=256, out_features=128), codec)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    q.mode = QuantMode.CALIBRATE
    q(x)
    q.mode = QuantMode.SIMULATE
    exported = q.quantized_tensors()
    weight = codec.dequantize_weight(exported, torch.bfloat16)
    assert torch.equal(q.simulated_weight(), weight)
    expected = F.linear(codec.fake_quantize_input(x, exported.get("input_scale")), weight, q.bias)
    assert torch.equal(q(x), expected)
    # the simulation is close to the full-precision layer
    reference = F.linear(x, q.weight, q.bias).float()
    error = (q(x).float() - reference).norm() / reference.norm()
    assert error < 0.25


def test_weight_amax_prefers_the_group_value():
    q = QuantLinear.convert(_linear(), codec_for(LinearScheme.NVFP4))
    own = q.weight.abs().amax().float()
    assert torch.equal(q.weight_amax(), own)
    q.shared_weight_amax = own * 2
    q.input_amax = torch.tensor(1.0)
    assert torch.equal(q.quantized_tensors().global_scale, (own * 2) / (6 * 448))


def test_siblings_share_one_amax_pass_over_the_same_input(monkeypatch):
    from quantport.modules import observe

    calls = []
    real = observe.update_amax
    monkeypatch.setattr(observe, "update_amax", lambda running, x: calls.append(x) or real(running, x))
    codec = codec_for(LinearScheme.FP8)
    q, k = (QuantLinear.convert(_linear(seed=s), codec) for s in (1, 2))
    q.mode = k.mode = QuantMode.CALIBRATE
    q.input_memo = k.input_memo = observe.SharedInputAmax()  # what set_mode(model, CALIBRATE) gives a run
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    q(x)
    k(x)
    assert len(calls) == 1 and torch.equal(q.input_amax, k.input_amax)
    x.mul_(3)  # an in-place change is a new input
    q(x)
    assert len(calls) == 2 and q.input_amax == x.abs().amax().float()
    k(x.clone())  # another tensor with the same values is observed on its own
    assert len(calls) == 3
