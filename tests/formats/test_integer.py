"""Tests for quantport.formats.integer: INT8 per-channel, INT4 group-wise, modelopt and CT packings."""

from __future__ import annotations

import warnings

import pytest
import torch

from quantport.formats.descriptors import ScaleConvention
from quantport.formats.integer import (
    INT4_GROUP,
    dequantize_int4,
    dequantize_int8,
    dequantize_int_group_ct,
    fake_quantize_int8_per_token,
    int4_group_scales,
    int4_scale_from_amax,
    int8_scale_from_amax,
    int_group_qparams,
    int_weight_scale,
    pack_int4_ct,
    pack_int4_modelopt,
    quantize_int4,
    quantize_int8,
    quantize_int_group_ct,
    unpack_int4_ct,
    unpack_int4_modelopt,
)

_BITS_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    view = _BITS_VIEW.get(t.dtype)
    return t.view(view) if view is not None else t


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    mismatch = _bits(actual) != _bits(expected)
    assert not bool(mismatch.any()), f"{int(mismatch.sum())} elements differ bitwise"


def hard_weight(dtype: torch.dtype, rows: int = 16, cols: int = 512, seed: int = 0) -> torch.Tensor:
    """Random weight (wide per-row range) with zero rows/groups, exact rounding ties and tiny values."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 3, rows)[:, None]
    w = w.to(dtype)
    w[0] = 0.0  # all-zero row (INT8) -> all-zero groups (INT4)
    w[1, :128] = 0.0  # one all-zero INT4 group
    # exact ties: INT4 group amax 7 * 2**-2 -> scale 2**-2, values (k + 0.5) * 2**-2
    half = (torch.arange(-7, 7, dtype=torch.float32) + 0.5) * 0.25
    w[2, 128:256] = 0.0
    w[2, 128 : 128 + half.numel()] = half.to(dtype)
    w[2, 255] = 7 * 0.25
    # INT8 ties on row 3: amax 127 * 2**-4 -> scale 2**-4, values (k + 0.5) * 2**-4
    w[3] = ((torch.arange(cols) % 254 - 127 + 0.5) * 2.0**-4).clamp(-127 * 2.0**-4, 127 * 2.0**-4).to(dtype)
    w[3, 0] = -127 * 2.0**-4
    # tiny values (subnormal in fp32/bf16) and a tiny-but-normal row
    w[4, :256] = (torch.randn(256, generator=g) * 1e-39).to(dtype)
    w[5] = (torch.randn(cols, generator=g) * 1e-20).to(dtype)
    # CT asymmetric: all-positive and all-negative groups
    w[6, :128] = w[6, :128].abs()
    w[6, 128:256] = -w[6, 128:256].abs()
    w[7, :] = -0.0
    w[7, 0] = 1.0  # so the row is not all zero; the other groups are negative zeros
    return w


# --------------------------------------------------------------------------------------------
# hand-computed bit vectors
# --------------------------------------------------------------------------------------------


def test_pack_int4_modelopt_hand_bytes() -> None:
    codes = torch.tensor([[-8, 7, 0, 3], [1, -1, -2, 0]], dtype=torch.int8)
    # byte[0, j] = (row0 & 0xF) | (row1 & 0xF) << 4   (even output row in the low nibble)
    #   j=0: -8 -> 0x8, 1 -> 0x1  -> 0x18
    #   j=1:  7 -> 0x7, -1 -> 0xF -> 0xF7
    #   j=2:  0 -> 0x0, -2 -> 0xE -> 0xE0
    #   j=3:  3 -> 0x3, 0 -> 0x0  -> 0x03
    expected = torch.tensor([[0x18, 0xF7, 0xE0, 0x03]], dtype=torch.uint8)
    assert torch.equal(pack_int4_modelopt(codes), expected)
    assert torch.equal(unpack_int4_modelopt(expected), codes)


def test_pack_int4_ct_hand_words() -> None:
    # element i of a word sits at bits 4i..4i+3 as (code + 8)
    # [-8..-1] -> nibbles 0..7   -> 0x76543210 =  1985229328
    # [0..7]   -> nibbles 8..15  -> 0xFEDCBA98 = 4275878552 - 2**32 = -19088744
    codes = torch.tensor([[-8, -7, -6, -5, -4, -3, -2, -1], [0, 1, 2, 3, 4, 5, 6, 7]], dtype=torch.int8)
    expected = torch.tensor([[1985229328], [-19088744]], dtype=torch.int32)
    assert torch.equal(pack_int4_ct(codes), expected)
    assert torch.equal(unpack_int4_ct(expected, 8), codes)
    # 9 zeros -> nibbles 8 x 9: word0 0x88888888 = -2004318072, word1 0x00000008 = 8 (tail padded with raw 0)
    # [7] -> 0x0000000F = 15;  9 x -8 -> all-zero nibbles -> [0, 0]
    assert pack_int4_ct(torch.zeros(1, 9, dtype=torch.int8)).tolist() == [[-2004318072, 8]]
    assert pack_int4_ct(torch.tensor([[7]], dtype=torch.int8)).tolist() == [[15]]
    assert pack_int4_ct(torch.full((1, 9), -8, dtype=torch.int8)).tolist() == [[0, 0]]
    # dim=-2 (zero-point layout): packs down the columns -> [ceil(out/8), cols]
    assert torch.equal(pack_int4_ct(codes.T.contiguous(), dim=-2), expected.T)
    assert torch.equal(unpack_int4_ct(expected.T.contiguous(), 8, dim=-2), codes.T)


def test_int_scales_hand_values() -> None:
    amax = torch.tensor([127.0, 0.0, float("nan"), 1.0, 1e-45])
    # amax/127; 0 and NaN -> maxbound (scale 1.0); 1e-45 (subnormal) -> clamp to fp32 tiny 2**-126
    expected = torch.stack([torch.tensor(x) / 127 for x in (127.0, 127.0, 127.0, 1.0, 2.0**-126)])
    assert expected[0].item() == 1.0
    assert_bits_equal(int8_scale_from_amax(amax), expected)
    assert_bits_equal(int4_scale_from_amax(torch.tensor([7.0, 0.0, 3.5])), torch.tensor([1.0, 1.0, 0.5]))
    w = torch.zeros(2, 256)
    w[0, 5] = -14.0
    w[1, 200] = 0.7
    row1 = torch.stack([torch.tensor(1.0), torch.tensor(0.7) / 7])
    expected4 = torch.stack([torch.tensor([2.0, 1.0]), row1])
    assert_bits_equal(int4_group_scales(w), expected4)


def test_quantize_hand_values() -> None:
    # INT8, scale 0.5: x/s = [2.5 -> 2 (half-even), -3.5 -> -4, 1000 -> 127, -1000 -> -128, 0.25 -> 0]
    w = torch.tensor([[1.25, -1.75, 500.0, -500.0, 0.125]])
    assert quantize_int8(w, torch.tensor([0.5])).tolist() == [[2, -4, 127, -128, 0]]
    # INT4, scale 1: [0.5 -> 0, 1.5 -> 2, -7.5 -> -8, 7.5 -> 7 (clamp 8), -9 -> -8]
    w4 = torch.zeros(1, 128)
    w4[0, :5] = torch.tensor([0.5, 1.5, -7.5, 7.5, -9.0])
    assert quantize_int4(w4, torch.ones(1, 1))[0, :5].tolist() == [0, 2, -8, 7, -8]
    # compressed-tensors symmetric 4-bit: scale = amax / 7.5 (not / 7)
    w4[0, 0] = 15.0
    scale, zp = int_group_qparams(w4, bits=4, group=128, symmetric=True)
    assert scale.tolist() == [[2.0]] and zp.tolist() == [[0]] and zp.dtype == torch.int8
    # asymmetric: min -9, max 15 -> scale 24/15 = 1.6, zp = round(-8 - (-9 / 1.6)) = round(-2.375) = -2
    scale, zp = int_group_qparams(w4, bits=4, group=128, symmetric=False)
    assert scale.tolist() == [[torch.tensor(24.0 / 15).item()]] and zp.tolist() == [[-2]]


# --------------------------------------------------------------------------------------------
# pack / unpack identities
# --------------------------------------------------------------------------------------------


def test_pack_int4_modelopt_all_code_pairs() -> None:
    v = torch.arange(-8, 8, dtype=torch.int8)
    codes = torch.stack((v.repeat(16), v.repeat_interleave(16)))  # every (low, high) pair, [2, 256]
    packed = pack_int4_modelopt(codes)
    assert packed.shape == (1, 256) and packed.dtype == torch.uint8
    assert sorted(packed[0].tolist()) == list(range(256))  # bijective on bytes
    assert torch.equal(unpack_int4_modelopt(packed), codes)
    all_bytes = torch.arange(256, dtype=torch.int64).to(torch.uint8).reshape(4, 64)
    assert torch.equal(pack_int4_modelopt(unpack_int4_modelopt(all_bytes)), all_bytes)
    # MoE 3-D
    codes3 = torch.randint(-8, 8, (3, 6, 10), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    assert torch.equal(unpack_int4_modelopt(pack_int4_modelopt(codes3)), codes3)


def test_pack_int4_ct_all_codes_every_position() -> None:
    # row r holds (r + i) % 16 - 8 at column i: every code appears at every nibble position
    codes = ((torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 16 - 8).to(torch.int8)
    for cols in (16, 13, 9, 1):
        c = codes[:, :cols].contiguous()
        packed = pack_int4_ct(c)
        assert packed.shape == (16, -(-cols // 8)) and packed.dtype == torch.int32
        assert torch.equal(unpack_int4_ct(packed, cols), c)
        assert torch.equal(unpack_int4_ct(pack_int4_ct(c.T.contiguous(), dim=-2), cols, dim=-2), c.T)
    # every int32 bit pattern is a valid full word
    g = torch.Generator().manual_seed(0)
    words = torch.randint(-(2**31), 2**31, (5, 7), generator=g, dtype=torch.int64).to(torch.int32)
    words[0, :4] = torch.tensor([-(2**31), 2**31 - 1, -1, 0], dtype=torch.int32)
    assert torch.equal(pack_int4_ct(unpack_int4_ct(words, 56)), words)
    codes3 = torch.randint(-8, 8, (3, 4, 20), generator=g, dtype=torch.int8)
    assert torch.equal(unpack_int4_ct(pack_int4_ct(codes3), 20), codes3)


# --------------------------------------------------------------------------------------------
# round-trip error bounds and properties
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_round_trip_error_bound(dtype: torch.dtype) -> None:
    w = (torch.randn(32, 256, generator=torch.Generator().manual_seed(1)) * 0.05).to(dtype)
    scale = int8_scale_from_amax(w.abs().amax(dim=-1))
    codes = quantize_int8(w, scale)
    deq = dequantize_int8(codes, scale, torch.float32)
    err = (deq - w.float()).abs()
    assert bool((err <= scale[:, None] * 0.5 * (1 + 1e-5)).all())
    assert int(codes.abs().amax()) == 127


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_round_trip_error_bound(dtype: torch.dtype) -> None:
    w = torch.randn(16, 512, generator=torch.Generator().manual_seed(2)).to(dtype)
    scale = int4_group_scales(w)
    codes = quantize_int4(w, scale)
    assert int(codes.min()) >= -7 and int(codes.max()) <= 7  # amax maps to exactly +-7
    deq = dequantize_int4(codes, scale, dtype=torch.float32)
    err = (deq - w.float()).abs()
    assert bool((err <= scale.repeat_interleave(INT4_GROUP, -1) * 0.5 * (1 + 1e-5)).all())
    assert dequantize_int4(codes, scale, dtype=dtype).dtype == dtype


@pytest.mark.parametrize("symmetric", [True, False])
def test_ct_round_trip_error_bound(symmetric: bool) -> None:
    w = torch.randn(16, 512, generator=torch.Generator().manual_seed(3))
    scale, zp = int_group_qparams(w, bits=4, group=128, symmetric=symmetric)
    codes = quantize_int_group_ct(w, scale, zp, bits=4, group=128)
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7
    deq = dequantize_int_group_ct(codes, scale, zp, group=128)
    err = (deq - w).abs()
    # symmetric: |x/s| <= 7.5 -> error <= s/2; asymmetric adds <= s/2 from rounding the zero point
    bound = scale.repeat_interleave(128, -1) * (0.5 if symmetric else 1.0) * (1 + 1e-5)
    assert bool((err <= bound).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize_int8_per_token(dtype: torch.dtype) -> None:
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(4)).to(dtype)
    x[0, 1] = 0.0
    x[1, 2] = 1e-9  # amax <= 2**-24 -> zeros
    y = fake_quantize_int8_per_token(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert bool((y[0, 1] == 0).all()) and bool((y[1, 2] == 0).all())
    # equals dequantize(quantize(x)) with per-token scale amax/127 up to one rounding step
    # (the fake-quant multiplies by 127/amax instead of dividing by amax/127)
    # (rows with amax <= 2**-24 are excluded: the fake quant zeroes them)
    keep = x.float().abs().amax(-1) > 2.0**-24
    xk = x.float()[keep]
    scale = xk.abs().amax(-1) / 127
    dq = dequantize_int8(quantize_int8(xk, scale), scale, torch.float32)
    step = scale[..., None]
    out_round = xk.abs() * (2.0**-8 if dtype == torch.bfloat16 else 0.0)  # final cast to x.dtype
    assert bool(((y.float()[keep] - dq).abs() <= step * 1.01 + out_round).all())
    assert bool(((y.float()[keep] - xk).abs() <= step * 0.51 + out_round).all())
    yn = fake_quantize_int8_per_token(x, narrow_range=True)
    assert bool(((yn.float()[keep] / step).round() >= -127).all())


def test_inputs_not_mutated() -> None:
    w = hard_weight(torch.bfloat16, rows=8, cols=256)
    before = w.clone()
    s = int4_group_scales(w)
    c = quantize_int4(w, s)
    pack_int4_modelopt(c)
    pack_int4_ct(c)
    int_group_qparams(w, symmetric=False)
    fake_quantize_int8_per_token(w)
    quantize_int8(w, int8_scale_from_amax(w.abs().amax(-1)))
    assert_bits_equal(w, before)


def test_errors() -> None:
    with pytest.raises(ValueError, match="divisible by the group size"):
        int4_group_scales(torch.zeros(4, 200))
    with pytest.raises(ValueError, match="divisible by the group size"):
        quantize_int4(torch.zeros(4, 200), torch.ones(4, 2))
    with pytest.raises(ValueError, match="scale has shape"):
        quantize_int4(torch.zeros(4, 256), torch.ones(4, 3))
    with pytest.raises(ValueError, match="divisible by the group size"):
        int_group_qparams(torch.zeros(4, 100), group=64)
    with pytest.raises(ValueError, match="must be even"):
        pack_int4_modelopt(torch.zeros(3, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4_modelopt(torch.full((2, 4), 8, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4_ct(torch.full((2, 4), -9, dtype=torch.int16))
    with pytest.raises(TypeError):
        pack_int4_ct(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="int32 words cannot hold"):
        unpack_int4_ct(torch.zeros(2, 2, dtype=torch.int32), 20)
    with pytest.raises(ValueError, match="must equal"):
        quantize_int8(torch.zeros(4, 8), torch.ones(8))
    with pytest.raises(ValueError, match="non-negative"):
        int8_scale_from_amax(torch.tensor([-1.0]))


# --------------------------------------------------------------------------------------------
# bit equality with nvidia-modelopt 0.47
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mo():
    pytest.importorskip("modelopt.torch.quantization")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from modelopt.torch.export import model_config, quant_utils
        from modelopt.torch.quantization.config import QuantizerAttributeConfig
        from modelopt.torch.quantization.nn import TensorQuantizer
        from modelopt.torch.quantization.qtensor import INT4QTensor
        from modelopt.torch.quantization.qtensor.int8_tensor import INT8QTensor
    return {
        "qu": quant_utils,
        "mc": model_config,
        "TQ": TensorQuantizer,
        "QAC": QuantizerAttributeConfig,
        "INT4QTensor": INT4QTensor,
        "INT8QTensor": INT8QTensor,
    }


def _calibrated(mo, w: torch.Tensor, **cfg):
    tq = mo["TQ"](mo["QAC"](**cfg))
    tq.enable_calib()
    tq.disable_quant()
    tq(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tq.load_calib_amax()
    tq.enable_quant()
    tq.disable_calib()
    return tq


def _scaling_factor(mo, tq) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero-amax warning
        return mo["qu"].get_scaling_factor(tq)


@pytest.mark.reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_matches_modelopt(mo, dtype: torch.dtype) -> None:
    w = hard_weight(dtype)
    tq = _calibrated(mo, w, num_bits=8, axis=0)
    ref_scale = _scaling_factor(mo, tq)  # export: sanitized amax.float() / 127
    scale = int8_scale_from_amax(w.abs().amax(dim=-1))
    assert_bits_equal(scale, ref_scale)
    codes = quantize_int8(w, scale)
    qu, mc = mo["qu"], mo["mc"]
    assert_bits_equal(codes, qu.to_quantized_weight(w, ref_scale, mc.QUANTIZATION_INT8_SQ))
    # INT8QTensor with the export scale (its own bf16 scale would be computed in bf16)
    ref_q, _ = mo["INT8QTensor"].quantize(w, scales=ref_scale[:, None], axis=0)
    assert_bits_equal(codes, ref_q._quantized_data)
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        ref = qu.from_quantized_weight(codes, ref_scale, mc.QUANTIZATION_INT8_SQ, out_dtype)
        assert_bits_equal(dequantize_int8(codes, scale, out_dtype), ref)
    # values beyond the range of a (too small) static scale are clamped to [-128, 127]
    small = scale / 4
    assert_bits_equal(quantize_int8(w, small), qu.to_quantized_weight(w, small, mc.QUANTIZATION_INT8_SQ))


@pytest.mark.reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("narrow_range", [False, True])
def test_int8_per_token_matches_modelopt(mo, dtype: torch.dtype, narrow_range: bool) -> None:
    x = (torch.randn(4, 6, 64, generator=torch.Generator().manual_seed(5)) * 3).to(dtype)
    x[0, 0] = 0.0
    x[1, 1] = 1e-9
    x[2, 2] = (torch.arange(64) - 31.5).to(dtype)  # amax 32 -> 127/32 = 3.96875: many exact products
    x[3, 3, 0] = 1e30
    tq = mo["TQ"](mo["QAC"](num_bits=8, axis=(0, 1), narrow_range=narrow_range))  # dynamic, per token
    ref = tq(x)
    assert_bits_equal(fake_quantize_int8_per_token(x, narrow_range=narrow_range), ref)


@pytest.mark.reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_matches_modelopt(mo, dtype: torch.dtype) -> None:
    qu, mc = mo["qu"], mo["mc"]
    for seed in range(2):
        w = hard_weight(dtype, seed=seed)
        tq = _calibrated(mo, w, num_bits=4, block_sizes={-1: INT4_GROUP})
        ref_scale = _scaling_factor(mo, tq)  # [out, in/128] = sanitized block amax / 7
        scale = int4_group_scales(w)
        assert_bits_equal(scale, ref_scale)
        packed = pack_int4_modelopt(quantize_int4(w, scale))
        assert_bits_equal(packed, qu.pack_int4_in_uint8(w, ref_scale, INT4_GROUP))
        exported = qu.to_quantized_weight(w, ref_scale, mc.QUANTIZATION_INT4_AWQ, block_size=INT4_GROUP)
        assert_bits_equal(packed, exported)
        assert torch.equal(unpack_int4_modelopt(exported), quantize_int4(w, scale))
    # clamping with a (clipped) static scale smaller than amax / 7
    small = scale * 0.6
    ref_small = qu.pack_int4_in_uint8(w, small, INT4_GROUP)
    assert_bits_equal(pack_int4_modelopt(quantize_int4(w, small)), ref_small)
    # MoE 3-D [E, out, in]
    w3 = w.reshape(2, 8, 512)
    s3 = int4_group_scales(w3)
    assert_bits_equal(pack_int4_modelopt(quantize_int4(w3, s3)), qu.pack_int4_in_uint8(w3, s3, INT4_GROUP))


@pytest.mark.reference
def test_int4_codes_agree_with_int4qtensor(mo) -> None:
    # INT4QTensor (modelopt's real-quant storage, not the export layout) computes w * (7 / amax);
    # in fp32 that gives the same codes as the export's w / (amax / 7) on this data.
    w = torch.randn(16, 512, generator=torch.Generator().manual_seed(6))
    q, _ = mo["INT4QTensor"].quantize(w, INT4_GROUP)
    data = q._quantized_data.to(torch.int16)  # offset-binary, even input column in the HIGH nibble
    ref_codes = torch.stack(((data >> 4) - 8, (data & 0xF) - 8), dim=-1).reshape(16, 512).to(torch.int8)
    assert torch.equal(quantize_int4(w, int4_group_scales(w)), ref_codes)


# --------------------------------------------------------------------------------------------
# bit equality with compressed-tensors 0.20
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    return {
        "pack": helpers.pack_to_int32,
        "unpack": helpers.unpack_from_int32,
        "Args": QuantizationArgs,
        "quantize": quantize,
        "dequantize": dequantize,
        "calculate_qparams": calculate_qparams,
    }


@pytest.mark.reference
def test_ct_pack_matches_compressed_tensors(ct) -> None:
    g = torch.Generator().manual_seed(7)
    for shape in [(16, 512), (5, 37), (3, 8), (2, 1), (4, 6, 40)]:
        codes = torch.randint(-8, 8, shape, generator=g, dtype=torch.int8)
        n = min(3, codes.numel())
        codes.view(-1)[:n] = torch.tensor([-8, 7, 0], dtype=torch.int8)[:n]
        ref = ct["pack"](codes, 4)
        assert_bits_equal(pack_int4_ct(codes), ref)
        assert_bits_equal(unpack_int4_ct(ref, shape[-1]), ct["unpack"](ref, 4, torch.Size(shape)))
        if len(shape) == 2:
            ref0 = ct["pack"](codes, 4, packed_dim=0)
            assert_bits_equal(pack_int4_ct(codes, dim=-2), ref0)
            assert torch.equal(unpack_int4_ct(ref0, shape[0], dim=-2), codes)
            if ref0.shape[0] > 1:  # CT's own unpack(packed_dim=0) fails to .view() a single packed row
                assert_bits_equal(
                    unpack_int4_ct(ref0, shape[0], dim=-2),
                    ct["unpack"](ref0, 4, torch.Size(shape), packed_dim=0),
                )


@pytest.mark.reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_ct_qparams_quantize_dequantize_match(ct, dtype: torch.dtype, symmetric: bool) -> None:
    w = hard_weight(dtype)
    if not symmetric:
        # an all-zero group gives zp from 0/0 (NaN) in compressed-tensors: platform-defined, skip it
        zero_groups = (w.unflatten(-1, (-1, 128)) == 0).all(-1)
        w.unflatten(-1, (-1, 128))[..., 0][zero_groups] = 1e-3
        assert not bool((w.unflatten(-1, (-1, 128)) == 0).all(-1).any())
    args = ct["Args"](num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=128)
    blocks = w.unflatten(-1, (-1, 128))
    ref_scale, ref_zp = ct["calculate_qparams"](blocks.amin(-1), blocks.amax(-1), args)
    scale, zp = int_group_qparams(w, bits=4, group=128, symmetric=symmetric)
    assert_bits_equal(scale, ref_scale)
    assert_bits_equal(zp, ref_zp)
    ref_q = ct["quantize"](w, ref_scale, ref_zp, args, dtype=torch.int8)
    codes = quantize_int_group_ct(w, scale, zp, bits=4, group=128)
    assert_bits_equal(codes, ref_q)
    assert_bits_equal(quantize_int_group_ct(w, scale, None if symmetric else zp, bits=4, group=128), ref_q)
    ref_deq = ct["dequantize"](ref_q, ref_scale, ref_zp, args)
    assert_bits_equal(dequantize_int_group_ct(codes, scale, zp, group=128), ref_deq)
    assert_bits_equal(pack_int4_ct(codes), ct["pack"](ref_q, 4))
    if not symmetric:
        assert_bits_equal(pack_int4_ct(zp, dim=-2), ct["pack"](ref_zp, 4, packed_dim=0))
    # 8-bit (channel-like groups) through the same code path
    args8 = ct["Args"](num_bits=8, type="int", symmetric=symmetric, strategy="group", group_size=64)
    b8 = w.unflatten(-1, (-1, 64))
    rs8, rz8 = ct["calculate_qparams"](b8.amin(-1), b8.amax(-1), args8)
    s8, z8 = int_group_qparams(w, bits=8, group=64, symmetric=symmetric)
    assert_bits_equal(s8, rs8)
    assert_bits_equal(z8, rz8)
    assert_bits_equal(
        quantize_int_group_ct(w, s8, z8, bits=8, group=64),
        ct["quantize"](w, rs8, rz8, args8, dtype=torch.int8),
    )


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int_weight_scale_in_both_conventions(bits: int, dtype: torch.dtype) -> None:
    w = hard_weight(dtype, rows=8, cols=256)
    w[0, :128] = 0  # an all-zero group
    group_amax = w.unflatten(-1, (2, 128)).abs().amax(dim=-1)
    ct_scale, _ = int_group_qparams(w, bits=bits, group=128, symmetric=True)
    half_step = int_weight_scale(group_amax, bits, ScaleConvention.HALF_STEP_MODEL_DTYPE)
    assert half_step.dtype == dtype and torch.equal(half_step, ct_scale)
    restricted = int_weight_scale(group_amax, bits, ScaleConvention.RESTRICTED_FP32)
    expected = int4_scale_from_amax(group_amax) if bits == 4 else int8_scale_from_amax(group_amax)
    assert restricted.dtype == torch.float32 and torch.equal(restricted, expected)
    assert restricted[0, 0].item() == 1.0  # zero amax -> maxbound -> scale 1
    with pytest.raises(ValueError, match="RESTRICTED_FP32 or HALF_STEP"):
        int_weight_scale(group_amax, bits, ScaleConvention.DIVISOR)
