"""Integer codecs: compressed-tensors numerics (int8, w4a16, w8a16) and ModelOpt layouts (w4a16/w8a16-modelopt)."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
from compressed_tensors.quantization.utils import calculate_qparams

from quantport.dialects.compressed_tensors import CT_SCHEMES
from quantport.dialects.modelopt import named_tensors, pieces_of
from quantport.export.targets.modelopt import quant_algo
from quantport.formats.descriptors import ActivationQuant, ScaleConvention
from quantport.formats.integer import unpack_int_ct
from quantport.recipes import LinearScheme
from quantport.schemes import codec_for


def _weight(out: int = 64, inp: int = 256, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(out, inp, generator=generator) * 0.05).to(torch.bfloat16)


@pytest.mark.parametrize(
    ("scheme", "bits", "symmetric"),
    [
        (LinearScheme.W4A16, 4, True),
        (LinearScheme.W4A16_ASYM, 4, False),
        (LinearScheme.W8A16, 8, True),
        (LinearScheme.W8A16_ASYM, 8, False),
    ],
)
def test_group_codec_equals_compressed_tensors_arithmetic(scheme, bits, symmetric):
    w = _weight()
    codec = codec_for(scheme)
    pieces = codec.quantize_weight(w, w.abs().amax().float())
    tensors = CT_SCHEMES[scheme].named_tensors(pieces)
    args = QuantizationArgs(num_bits=bits, type="int", strategy="group", group_size=128, symmetric=symmetric)
    blocks = w.unflatten(-1, (2, 128))
    scale, zp = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args)
    assert tensors["weight_scale"].dtype == torch.bfloat16
    assert torch.equal(tensors["weight_scale"], scale)
    codes = quantize(w, scale, zp if not symmetric else None, args, dtype=torch.int8)
    assert torch.equal(tensors["weight_packed"], pack_to_int32(codes, bits))
    assert tensors["weight_shape"].tolist() == [64, 256]
    if symmetric:
        assert "weight_zero_point" not in tensors
    else:
        assert torch.equal(tensors["weight_zero_point"], pack_to_int32(zp, bits, packed_dim=0))
    expected = dequantize(codes, scale, None if symmetric else zp, args)
    assert torch.equal(codec.dequantize_weight(pieces, torch.bfloat16), expected)
    assert CT_SCHEMES[scheme].pieces_of(tensors) == dict(pieces)
    specs = codec.weight_specs(64, 256, torch.bfloat16)
    assert {k: (v.dtype, v.shape) for k, v in specs.items()} == {
        k: (v.dtype, tuple(v.shape)) for k, v in pieces.items()
    }


def test_w4a16_scale_is_amax_over_7_5():
    w = torch.zeros(2, 128, dtype=torch.bfloat16)
    w[0, 3] = -1.5
    w[1, 7] = 0.75
    tensors = CT_SCHEMES[LinearScheme.W4A16].named_tensors(
        codec_for(LinearScheme.W4A16).quantize_weight(w, torch.tensor(1.5))
    )
    assert tensors["weight_scale"].flatten().tolist() == [0.2001953125, 0.10009765625]  # bf16(1.5/7.5), bf16(0.75/7.5)
    codes = unpack_int_ct(tensors["weight_packed"], 4, 128)
    # w / scale is computed in bf16 as compressed-tensors does: -1.5/0.2002 = -7.49 rounds to bf16 -7.5,
    # then to the even code -8; 0.75/0.1001 -> 7.5 -> 8, clamped to 7
    assert codes[0, 3].item() == -8 and codes[1, 7].item() == 7


def test_asymmetric_all_zero_group_decodes_to_zero():
    w = _weight(8, 256)
    w[:, :128] = 0
    codec = codec_for(LinearScheme.W4A16_ASYM)
    decoded = codec.dequantize_weight(codec.quantize_weight(w, w.abs().amax().float()), torch.bfloat16)
    assert torch.equal(decoded[:, :128], torch.zeros(8, 128, dtype=torch.bfloat16))


def test_int8_codec_is_per_channel_with_dynamic_tokens():
    w = _weight(16, 96)
    codec = codec_for(LinearScheme.INT8)
    tensors = CT_SCHEMES[LinearScheme.INT8].named_tensors(codec.quantize_weight(w, w.abs().amax().float()))
    assert tensors["weight"].dtype == torch.int8 and tensors["weight_scale"].shape == (16, 1)
    args = QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True)
    scale, _ = calculate_qparams(w.amin(-1, keepdim=True), w.amax(-1, keepdim=True), args)
    assert torch.equal(tensors["weight_scale"], scale)
    assert torch.equal(tensors["weight"], quantize(w, scale, None, args, dtype=torch.int8))
    # amax / 127.5 maps the row's largest magnitude to 127 (positive) or -128 (negative: -127.5 -> -128)
    extreme = tensors["weight"].to(torch.int16).abs().amax(dim=1)
    assert set(extreme.tolist()) <= {127, 128} and 128 in extreme.tolist()
    x = torch.tensor([[0.5, -1.0, 0.25]], dtype=torch.float32)
    q = codec.fake_quantize_input(x, None)
    assert torch.allclose(q, torch.round(x * 127) / 127)
    assert codec.format.activations is ActivationQuant.DYNAMIC and codec.static_input_scale is False
    assert codec.format.convention is ScaleConvention.HALF_STEP_MODEL_DTYPE and quant_algo(LinearScheme.INT8) is None


def test_modelopt_int4_layout_and_values():
    w = torch.zeros(4, 128, dtype=torch.bfloat16)
    w[0, 0], w[1, 0], w[2, 5], w[3, 5] = 0.7, -0.35, 1.4, 0.2
    codec = codec_for(LinearScheme.W4A16_MODELOPT)
    pieces = codec.quantize_weight(w, torch.tensor(1.4))
    tensors = named_tensors(pieces)
    assert tensors["weight"].dtype == torch.uint8 and tensors["weight"].shape == (2, 128)
    assert tensors["weight_scale"].dtype == torch.float32 and tensors["weight_scale"].shape == (4, 1)
    torch.testing.assert_close(tensors["weight_scale"].flatten(), w.float().abs().amax(dim=1) / 7, rtol=0, atol=0)
    # rows 0 and 1 share byte row 0: low nibble = code of row 0 (7), high nibble = code of row 1 (-7 -> 0x9)
    assert tensors["weight"][0, 0].item() == 0x97
    assert tensors["weight"][1, 5].item() == (7 | (7 << 4))
    decoded = codec.dequantize_weight(pieces_of(tensors), torch.float32)
    expected = torch.tensor([[0.7, 0.0], [-0.35, 0.0], [0.0, 1.4], [0.0, 0.2]]).to(torch.bfloat16).float()
    torch.testing.assert_close(decoded[:, [0, 5]], expected, rtol=0, atol=0)  # the largest code is exact
    assert quant_algo(LinearScheme.W4A16_MODELOPT) == "W4A16_AWQ" and codec.group_size == 128
    assert codec.format.convention is ScaleConvention.RESTRICTED_FP32 and codec.format.stacks


def test_modelopt_int8_weight_only():
    w = _weight(8, 32)
    codec = codec_for(LinearScheme.W8A16_MODELOPT)
    pieces = codec.quantize_weight(w, w.abs().amax().float())
    tensors = named_tensors(pieces)
    assert tensors["weight_scale"].shape == (8,) and tensors["weight_scale"].dtype == torch.float32
    assert torch.equal(tensors["weight_scale"], w.abs().amax(dim=1).float() / 127)
    assert int(tensors["weight"].abs().amax(dim=1).min()) == 127
    decoded = tensors["weight"].float() * tensors["weight_scale"][:, None]  # decoded by hand, not by the codec
    assert torch.equal(codec.dequantize_weight(pieces, torch.float32), decoded)
    assert (decoded - w.float()).abs().max() <= tensors["weight_scale"].max() / 2 + 1e-7
    assert quant_algo(LinearScheme.W8A16_MODELOPT) == "W8A16"
