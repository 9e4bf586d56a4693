"""NVFP4 in the DIVISOR convention (compressed-tensors' numerics), and MXFP4, against compressed-tensors'
own compressors and decompressors."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.quantization import QuantizationArgs, preset_name_to_scheme
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

from quantport.dialects.compressed_tensors import CT_SCHEMES
from quantport.formats.descriptors import ActivationQuant, ScaleConvention
from quantport.formats.nvfp4 import (
    E2M1_VALUES,
    dequantize_nvfp4,
    fake_quantize_nvfp4,
    nvfp4_global_scale,
    quantize_nvfp4,
)
from quantport.recipes import LinearScheme
from quantport.schemes import codec_for

DIVISOR = ScaleConvention.DIVISOR


def ct_nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    return nvfp4_global_scale(amax, DIVISOR)


def quantize_nvfp4_ct(w: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_nvfp4(w, g, DIVISOR)


def dequantize_nvfp4_ct(packed, scale, g, dtype) -> torch.Tensor:
    return dequantize_nvfp4(packed, scale, g, dtype, DIVISOR)


def _ct_decompress(packed: torch.Tensor, scale: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' own decoder of NVFP4 (bf16), independent of quantport's."""
    tensors = {"weight_packed": packed, "weight_scale": scale, "weight_global_scale": g.reshape(1)}
    return NVFP4PackedCompressor.decompress(tensors, preset_name_to_scheme("NVFP4A16", ["Linear"]))["weight"]


def _weight(out: int = 32, inp: int = 128, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(out, inp, generator=generator) * 0.05).to(torch.bfloat16)


def test_global_scale_is_the_divisor():
    assert ct_nvfp4_global_scale(torch.tensor(2688.0)).item() == 1.0
    assert ct_nvfp4_global_scale(torch.tensor(1.0)).item() == 2688.0
    assert ct_nvfp4_global_scale(torch.tensor(0.0)).item() == 1.0  # 2688 / tiny overflows -> 1.0
    assert ct_nvfp4_global_scale(torch.tensor(float("nan"))).item() == 1.0
    amax = torch.tensor(0.37)
    assert torch.equal(ct_nvfp4_global_scale(amax).reshape(1), generate_gparam(-amax, amax))


def test_hand_vector():
    # amax 6 -> global 448; block 0 amax 6 -> scale fp8(448 * 6 / 6) = 448, step 448/448 = 1
    w = torch.zeros(1, 32)
    w[0, :8] = torch.tensor([6.0, -6.0, 0.25, 0.75, 1.25, 1.75, 2.5, -5.0])
    w[0, 16] = 0.3  # block 1: amax 0.3 -> scale fp8(448*0.3/6 = 22.4) = 22, step 22/448
    packed, scale = quantize_nvfp4_ct(w, ct_nvfp4_global_scale(torch.tensor(6.0)))
    assert scale.float().tolist() == [[448.0, 22.0]]
    values = _ct_decompress(packed, scale, ct_nvfp4_global_scale(torch.tensor(6.0))).float()
    # ties round to even: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, -5 -> -4
    assert values[0, :8].tolist() == [6.0, -6.0, 0.0, 1.0, 1.0, 2.0, 2.0, -4.0]
    # 0.3 / (22/448) = 6.1 saturates to 6; compressed-tensors decodes to bf16
    assert values[0, 16].item() == torch.tensor(6.0 * 22 / 448).bfloat16().item()


def test_zero_block_gets_compressed_tensors_epsilon():
    w = torch.zeros(1, 32)
    w[0, 20] = 1.0
    _, scale = quantize_nvfp4_ct(w, ct_nvfp4_global_scale(torch.tensor(1.0)))
    assert scale.float().tolist() == [[0.125, 448.0]]


@pytest.mark.parametrize("scheme", [LinearScheme.NVFP4_CT, LinearScheme.W4A16_NVFP4_CT])
def test_codec_equals_compressed_tensors(scheme):
    w = _weight()
    codec = codec_for(scheme)
    pieces = codec.quantize_weight(w, w.abs().amax().float())
    tensors = CT_SCHEMES[scheme].named_tensors(pieces)
    args = QuantizationArgs(
        num_bits=4, type="float", strategy="tensor_group", group_size=16, scale_dtype=torch.float8_e4m3fn
    )
    global_scale = generate_gparam(w.float().amin(), w.float().amax())
    assert torch.equal(tensors["weight_global_scale"], global_scale)
    blocks = w.float().unflatten(-1, (8, 16))
    scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale=global_scale)
    assert torch.equal(tensors["weight_scale"].float(), scale)
    ct_scheme = preset_name_to_scheme("NVFP4A16", ["Linear"])
    compressed = NVFP4PackedCompressor.compress(
        {"weight": w, "weight_scale": scale, "weight_global_scale": global_scale}, ct_scheme
    )
    assert torch.equal(tensors["weight_packed"], compressed["weight_packed"])
    assert torch.equal(tensors["weight_scale"].view(torch.uint8), compressed["weight_scale"].view(torch.uint8))
    decompressed = NVFP4PackedCompressor.decompress(tensors, ct_scheme)["weight"]
    assert torch.equal(codec.dequantize_weight(pieces, torch.bfloat16), decompressed.to(torch.bfloat16))
    error = (decompressed.float() - w.float()).norm() / w.float().norm()
    assert 0.02 < error < 0.15  # NVFP4's error on Gaussian weights: decoded independently, not by the codec


def test_activation_fake_quant_and_input_scale():
    codec = codec_for(LinearScheme.NVFP4_CT)
    x = _weight(4, 64, seed=3)
    g = codec.input_scale(torch.tensor(0.2))
    assert g.item() == pytest.approx(2688 / 0.2)
    y = codec.fake_quantize_input(x, g)
    assert y.dtype == x.dtype and torch.equal(y, fake_quantize_nvfp4(x, g, DIVISOR))
    allowed = {abs(v) for v in E2M1_VALUES}
    packed, scale = quantize_nvfp4_ct(x, g)
    assert torch.equal(y, _ct_decompress(packed, scale, g).to(x.dtype))
    steps = (scale.float() / g).repeat_interleave(16, dim=-1)
    ratios = (dequantize_nvfp4_ct(packed, scale, g, torch.float32) / steps).abs()
    assert ratios.numel() == 256 and set(ratios.flatten().tolist()) <= allowed
    assert codec_for(LinearScheme.W4A16_NVFP4_CT).fake_quantize_input(x, None) is x


def test_mxfp4_codec_equals_compressed_tensors_decompression():
    w = _weight(16, 128, seed=5)
    codec = codec_for(LinearScheme.MXFP4)
    pieces = codec.quantize_weight(w, w.abs().amax().float())
    tensors = CT_SCHEMES[LinearScheme.MXFP4].named_tensors(pieces)
    assert tensors["weight_packed"].shape == (16, 64) and tensors["weight_scale"].shape == (16, 4)
    assert tensors["weight_scale"].dtype == torch.uint8
    ct_scheme = preset_name_to_scheme("MXFP4A16", ["Linear"])
    decompressed = MXFP4PackedCompressor.decompress(tensors, ct_scheme)["weight"]
    assert torch.equal(codec.dequantize_weight(pieces, torch.bfloat16), decompressed.to(torch.bfloat16))
    assert codec.format.activations is ActivationQuant.NONE and codec.static_input_scale is False
    error = (decompressed.float() - w.float()).norm() / w.float().norm()
    assert 0.02 < error < 0.2
