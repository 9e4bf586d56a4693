"""The experts simulator: importable alone, the same forward as the quantize flow, a local grouped GEMM."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import quantport
from moe_models import FAMILIES, tiny_moe
from quantport.arch.experts import find_moe_blocks
from quantport.modules.expert_simulation import attach_experts_simulator, grouped_linear
from quantport.modules.quant_experts import experts_quantizer_of, uninstall_experts_quantizer
from tiny_models import make_calibration_batches

BATCHES = make_calibration_batches(vocab_size=256)


def test_simulator_imports_neither_calibrate_nor_export():
    code = textwrap.dedent(
        """
        import sys
        import quantport.modules.expert_simulation
        loaded = sorted(m for m in sys.modules if m.startswith(("quantport.calibrate", "quantport.export")))
        print(loaded)
        assert not loaded, loaded
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _logits(model, ids):
    target = getattr(model, "language_model", model)
    with torch.no_grad():
        return target(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_simulator_from_weights_and_scales_equals_quantize_simulation(family):
    """The loader's path: dequantized weights copied into the parameters plus the input scales, and a
    simulator attached with nothing else, compute exactly what ``quantport.simulate`` computes after quantize."""
    model = tiny_moe(family)
    quantport.quantize(model, "fp8", BATCHES, progress=False)
    with quantport.simulate(model):
        expected = _logits(model, BATCHES[0])
    for block in find_moe_blocks(model):
        quantizer = experts_quantizer_of(block.experts)
        weights = quantizer.simulated_parameters()
        scales = {p: quantizer.input_scale(p) for p in ("gate_up", "down")}
        uninstall_experts_quantizer(block.experts)
        with torch.no_grad():
            block.experts.gate_up_proj.copy_(weights["gate_up"])
            block.experts.down_proj.copy_(weights["down"])
        attach_experts_simulator(block, quantizer.codec, scales)
    with quantport.simulate(model):  # the Linear layers; the experts always simulate now
        actual = _logits(model, BATCHES[0])
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_attach_experts_simulator_on_plain_model_matches_fake_quant_reference():
    model = tiny_moe("qwen3_moe").float()
    from quantport.recipes import LinearScheme
    from quantport.schemes import codec_for

    codec = codec_for(LinearScheme.FP8)
    block = next(find_moe_blocks(model))
    scale = torch.full((block.num_experts,), 0.01)
    simulator = attach_experts_simulator(block, codec, {"gate_up": scale, "down": scale})
    assert attach_experts_simulator(block, codec, None) is simulator  # attached once
    hidden = torch.randn(5, block.experts.gate_up_proj.shape[-1])
    index = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 2], [1, 3]])
    weights = torch.rand(5, 2)
    with torch.no_grad():
        out = block.experts(hidden, index, weights)
        # reference: a loop over tokens and their experts, activations fake-quantized with the scale
        reference = torch.zeros_like(hidden)
        for t in range(5):
            for k in range(2):
                e = int(index[t, k])
                x = codec.fake_quantize_input(hidden[t : t + 1], scale[e])
                h = block.experts._apply_gate(x @ block.experts.gate_up_proj[e].T)
                h = codec.fake_quantize_input(h, scale[e])
                reference[t] += (h @ block.experts.down_proj[e].T)[0] * weights[t, k]
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims", [(16, 32), (8, 6)], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_linear_equals_a_loop_over_experts(transposed, dtype, dims):
    """One grouped GEMM where torch has it and the tensors are aligned, a loop otherwise: the same values."""
    torch.manual_seed(0)
    experts, rows, (inner, outer) = 4, 11, dims
    weight = torch.randn(experts, inner, outer) if transposed else torch.randn(experts, outer, inner)
    weight = weight.to(dtype)
    counts = [3, 0, 6, 2]  # expert 1 gets no rows
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(rows, inner, dtype=dtype)
    bias = torch.randn(rows, outer, dtype=dtype)
    out = grouped_linear(x, weight, offsets, bias, transposed)
    start, expected = 0, []
    for e, n in enumerate(counts):
        w = weight[e] if transposed else weight[e].T
        expected.append(x[start : start + n].float() @ w.float() + bias[start : start + n].float())
        start += n
    tolerance = 1e-5 if dtype is torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), torch.cat(expected), rtol=tolerance, atol=tolerance)
