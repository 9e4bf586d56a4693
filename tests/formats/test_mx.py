"""Tests for quantport.formats.mx (MXFP8 / MXFP4 with E8M0 scales per 32 inputs)."""

from __future__ import annotations

import warnings

import pytest
import torch

from formats.reference_decoders import decode_mxfp4, decode_mxfp8
from quantport.formats.mx import (
    E4M3_MAX,
    MX_BLOCK,
    dequantize_mxfp4,
    dequantize_mxfp8,
    e8m0_to_float,
    fake_quantize_mxfp4,
    fake_quantize_mxfp8,
    mx_shared_exponent,
    quantize_mxfp4,
    quantize_mxfp8,
)

_BITS_VIEW = {
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float8_e4m3fn: torch.uint8,
}


def _bits(t: torch.Tensor) -> torch.Tensor:
    view = _BITS_VIEW.get(t.dtype)
    return t.view(view) if view is not None else t


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    mismatch = _bits(actual) != _bits(expected)
    assert not bool(mismatch.any()), f"{int(mismatch.sum())} elements differ bitwise"


def hard_weight(dtype: torch.dtype, rows: int = 24, cols: int = 256, seed: int = 0) -> torch.Tensor:
    """Random weight with a wide per-row dynamic range plus crafted corner-case blocks."""
    g = torch.Generator().manual_seed(seed)
    span = 4 if dtype == torch.float16 else 9
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-span, span, rows)[:, None]
    w = w.to(dtype)
    # all-zero block, and a block of negative zeros
    w[0, 0:32] = 0.0
    w[0, 32:64] = -0.0
    # exact E2M1 ties after scaling by 2**3 (amax 48 -> shared exponent exactly 3), both signs
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4)
    ties = ties * torch.tensor([1.0, -1.0]).repeat(16)
    w[1, 0:32] = (ties * 8).to(dtype)
    w[1, 32:64] = (ties * 2.0**-20).to(dtype)
    # exact E4M3 ties at scale 1 (amax 448): midpoints between neighbouring fp8 values
    fp8_ties = torch.tensor([1.0625, 1.1875, 3.25, 0.0029296875, 208.0, 416.0, -1.0625, 448.0] * 4)
    w[1, 64:96] = fp8_ties.to(dtype)
    # tiny values: fp32/bf16 subnormals and near-tiny normals
    w[2, 0:32] = (torch.randn(32, generator=g) * 1e-40).to(dtype)
    w[2, 32:64] = (torch.randn(32, generator=g) * 1e-37).to(dtype)
    w[2, 64:96] = (torch.randn(32, generator=g) * 1e-30).to(dtype)
    # huge values (beyond every element format's range, still finite in fp32/bf16)
    if dtype != torch.float16:
        w[3, 0:32] = (torch.randn(32, generator=g) * 1e37).to(dtype)
        w[3, 32:64] = torch.full((32,), 3.0e38).to(dtype)
    # block amax at, just above and just below element_max * 2**k (log2 rounding edge)
    inf = torch.tensor(float("inf"), dtype=dtype)
    for j, (base, k) in enumerate([(448.0, -3), (6.0, 5), (448.0, 7), (6.0, -9)]):
        at = torch.tensor(base * 2.0**k, dtype=dtype)
        cols_ = slice(64 + 32 * (j + 1), 96 + 32 * (j + 1))
        blk = (torch.rand(32, generator=g) * float(at)).to(dtype)
        blk[0] = at
        blk[1] = torch.nextafter(at, inf)
        w[4, cols_] = blk
        blk2 = blk.clone()
        blk2[1] = torch.nextafter(at, -inf)
        blk2[0] = blk2[1]
        w[5, cols_] = blk2
    return w


# --------------------------------------------------------------------------------------------
# hand-computed vectors
# --------------------------------------------------------------------------------------------


def test_e8m0_to_float_hand_values() -> None:
    u = torch.tensor([0, 1, 126, 127, 128, 254, 255], dtype=torch.uint8)
    got = e8m0_to_float(u)
    expected = torch.tensor([2.0**-127, 2.0**-126, 0.5, 1.0, 2.0, 2.0**127, float("inf")])
    assert got.dtype == torch.float32
    assert_bits_equal(got, expected)


def test_e8m0_to_float_is_exact_power_of_two_for_all_codes() -> None:
    u = torch.arange(256, dtype=torch.int32)
    # for u >= 1 the fp32 bit pattern of 2**(u-127) is u << 23 (255 -> +inf); u = 0 -> 2**-127 subnormal
    expected = (u << 23).view(torch.float32).clone()
    expected[0] = 2.0**-127
    assert_bits_equal(e8m0_to_float(u.to(torch.uint8)), expected)


def test_mx_shared_exponent_hand_values() -> None:
    amax = torch.tensor([0.0, 6.0, 7.0, 12.0, 13.0, 3.0, 1e-45, float("nan")])
    # ceil(log2(amax/6)): 0 -> -127 (zero block), 6 -> 0, 7 -> ceil(0.22)=1, 12 -> 1, 13 -> ceil(1.11)=2,
    # 3 -> -1, 1e-45 -> clamp -127, nan -> -127;  +127 bias
    expected = torch.tensor([0, 127, 128, 128, 129, 126, 0, 0], dtype=torch.uint8)
    assert torch.equal(mx_shared_exponent(amax, 6.0), expected)
    amax8 = torch.tensor([448.0, 1.0, 449.0, float("inf"), 3.0e38])
    # 448 -> 0; 1 -> ceil(-8.81) = -8; 449 -> 1; inf -> clamp 127; 3e38 -> ceil(119.3) = 120
    expected8 = torch.tensor([127, 119, 128, 254, 247], dtype=torch.uint8)
    assert torch.equal(mx_shared_exponent(amax8, E4M3_MAX), expected8)


def test_quantize_mxfp4_hand_bytes() -> None:
    w = torch.zeros(2, 64)
    # block (0, 0): amax 6 -> e = 0 -> u = 127 (0x7F), scale 1
    w[0, :8] = torch.tensor([6.0, 0.75, -2.5, 0.0, 1.75, -5.0, 3.5, 0.25])
    # codes (sign<<3 | #bounds strictly below |x|, bounds .25 .75 1.25 1.75 2.5 3.5 5; zero -> 0b1000):
    #   6 -> 0x7, 0.75 -> 0x1 (tie down to 0.5), -2.5 -> 0xC (tie down to 2), 0 -> 0x8,
    #   1.75 -> 0x3 (tie down to 1.5), -5 -> 0xE (tie down to 4), 3.5 -> 0x5 (tie down to 3), 0.25 -> 0x0
    # bytes (even column low nibble): 0x17, 0x8C, 0xE3, 0x05; the 24 zeros -> 0x88 x 12
    # block (0, 1): all zero -> u = 0, 16 bytes of 0x88
    # block (1, 0): amax 12 -> ceil(log2 2) = 1 -> u = 128 (0x80), scale 2:
    #   12 -> 6 -> 0x7, -1 -> -0.5 -> 0x9, 3 -> 1.5 -> 0x3, 0.5 -> 0.25 -> tie down -> 0x0
    #   bytes 0x97, 0x03, then 0x88 x 14
    w[1, :4] = torch.tensor([12.0, -1.0, 3.0, 0.5])
    # block (1, 1): amax 1e-3 -> ceil(log2(1e-3/6)) = ceil(-12.55) = -12 -> u = 115 (0x73);
    #   1e-3 / 2**-12 = 4.096 -> 0x6 (4); -1e-4 -> -0.4096 -> 0x9 (-0.5)  => byte 0x96
    w[1, 32:34] = torch.tensor([1e-3, -1e-4])
    packed, scale = quantize_mxfp4(w)
    row0 = [0x17, 0x8C, 0xE3, 0x05] + [0x88] * 12 + [0x88] * 16
    row1 = [0x97, 0x03] + [0x88] * 14 + [0x96] + [0x88] * 15
    assert torch.equal(packed, torch.tensor([row0, row1], dtype=torch.uint8))
    assert torch.equal(scale, torch.tensor([[0x7F, 0x00], [0x80, 0x73]], dtype=torch.uint8))
    deq = dequantize_mxfp4(packed, scale)
    assert deq[0, :8].tolist() == [6.0, 0.5, -2.0, -0.0, 1.5, -4.0, 3.0, 0.0]
    # an exact zero is stored as code 8 (-0.0); 0.25 (positive, rounds to zero) is code 0 (+0.0)
    assert bool(torch.signbit(deq[0, 3])) and not bool(torch.signbit(deq[0, 7]))
    assert deq[1, :4].tolist() == [12.0, -1.0, 3.0, 0.0]
    assert deq[1, 32:34].tolist() == [4.0 * 2.0**-12, -0.5 * 2.0**-12]


def test_quantize_mxfp8_hand_bytes() -> None:
    w = torch.zeros(1, 64)
    # block 0: amax 448 -> u = 127, scale 1: fp8 bits 448 -> 0x7E, 1 -> 0x38, -2 -> 0xC0, 0.5 -> 0x30,
    #          1.0625 (tie between 1 and 1.125) -> RNE -> 1.0 -> 0x38
    w[0, :5] = torch.tensor([448.0, 1.0, -2.0, 0.5, 1.0625])
    # block 1: amax 1 -> ceil(log2(1/448)) = ceil(-8.81) = -8 -> u = 119 (0x77), x * 2**8:
    #          1 -> 256 -> 0x78 (2**8: exp field 15), 0.001 -> 0.256 -> 0.25 -> 0x28
    w[0, 32:34] = torch.tensor([1.0, 0.001])
    codes, scale = quantize_mxfp8(w)
    assert torch.equal(scale, torch.tensor([[0x7F, 0x77]], dtype=torch.uint8))
    got = codes.view(torch.uint8)
    assert got[0, :5].tolist() == [0x7E, 0x38, 0xC0, 0x30, 0x38]
    assert got[0, 32:34].tolist() == [0x78, 0x28]
    assert int(got[0, 5:32].count_nonzero()) == 0 and int(got[0, 34:].count_nonzero()) == 0
    deq = dequantize_mxfp8(codes, scale)
    assert deq[0, :5].tolist() == [448.0, 1.0, -2.0, 0.5, 1.0]
    assert deq[0, 32:34].tolist() == [1.0, 0.25 * 2.0**-8]


# --------------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------------


def test_mxfp4_all_bytes_decode_and_reencode() -> None:
    # every byte value in every position of a block, scale 1 (u = 127)
    packed = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    scale = torch.full((16, 1), 127, dtype=torch.uint8)
    values = dequantize_mxfp4(packed, scale)
    # code -> value by hand: sign bit 3, magnitude index into (0, .5, 1, 1.5, 2, 3, 4, 6); code 8 = -0.0
    table = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                          -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])  # fmt: skip
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(16, 32)  # even column = low nibble
    assert_bits_equal(values, table[codes.long()])
    # re-encoding reproduces every byte except +0 (code 0) which MXFP4QTensor re-encodes as -0 (code 8)
    # (each row holds +-6 so its scale stays 1)
    repacked, rescale = quantize_mxfp4(values)
    assert torch.equal(rescale, scale)
    codes = torch.where(codes == 0, torch.full_like(codes, 8), codes)
    assert torch.equal(repacked, codes[:, 0::2] | (codes[:, 1::2] << 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp8_round_trip_error_bound(dtype: torch.dtype) -> None:
    w = (torch.randn(32, 512, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    codes, scale = quantize_mxfp8(w)
    deq = decode_mxfp8(codes, scale)  # the OCP MX definition by hand, not quantport's decoder
    assert torch.equal(dequantize_mxfp8(codes, scale, torch.float32), deq)
    step = e8m0_to_float(scale).repeat_interleave(MX_BLOCK, dim=-1)
    # e4m3: relative half-ulp 2**-4 for normals, absolute half-step 2**-10 * scale for subnormals
    bound = w.float().abs() * 2.0**-4 + step * 2.0**-10
    assert bool(((deq - w.float()).abs() <= bound).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_round_trip_error_bound(dtype: torch.dtype) -> None:
    w = torch.randn(32, 512, generator=torch.Generator().manual_seed(2)).to(dtype)
    packed, scale = quantize_mxfp4(w)
    deq = decode_mxfp4(packed, scale).float()  # compressed-tensors' decompressor (bf16)
    assert torch.equal(dequantize_mxfp4(packed, scale, torch.bfloat16).float(), deq)
    step = e8m0_to_float(scale).repeat_interleave(MX_BLOCK, dim=-1)
    # largest E2M1 gap is 2 (between 4 and 6) -> |error| <= 1 * scale
    assert bool(((deq - w.float()).abs() <= step).all())
    # block amax lands in (3, 6] * scale, so the error is also below amax / 3
    amax = w.float().abs().unflatten(-1, (-1, MX_BLOCK)).amax(-1).repeat_interleave(MX_BLOCK, -1)
    assert bool(((deq - w.float()).abs() <= amax / 3).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fake_quantize_equals_dequantize_of_quantize(dtype: torch.dtype) -> None:
    x = hard_weight(dtype, rows=8, cols=256)
    assert_bits_equal(fake_quantize_mxfp8(x), dequantize_mxfp8(*quantize_mxfp8(x), dtype))
    assert_bits_equal(fake_quantize_mxfp4(x), dequantize_mxfp4(*quantize_mxfp4(x), dtype))
    # leading dims (activations [batch, seq, hidden] / MoE [E, out, in])
    x3 = x.reshape(2, 4, 256)
    assert_bits_equal(fake_quantize_mxfp8(x3), fake_quantize_mxfp8(x).reshape(2, 4, 256))
    assert_bits_equal(fake_quantize_mxfp4(x3), fake_quantize_mxfp4(x).reshape(2, 4, 256))


def test_inputs_not_mutated_and_shapes() -> None:
    w = hard_weight(torch.bfloat16, rows=6, cols=256)[:4, :128]
    before = w.clone()
    codes, scale8 = quantize_mxfp8(w)
    packed, scale4 = quantize_mxfp4(w)
    fake_quantize_mxfp4(w)
    fake_quantize_mxfp8(w)
    assert_bits_equal(w, before)
    assert codes.shape == (4, 128) and codes.dtype == torch.float8_e4m3fn
    assert scale8.shape == (4, 4) and scale8.dtype == torch.uint8
    assert packed.shape == (4, 64) and packed.dtype == torch.uint8
    assert scale4.shape == (4, 4) and scale4.dtype == torch.uint8


def test_explicit_scale_clamps_to_e4m3_range() -> None:
    w = torch.tensor([[1000.0, -1000.0, 1.0] + [0.0] * 29])
    codes, scale = quantize_mxfp8(w, torch.tensor([[127]], dtype=torch.uint8))  # scale 1 < amax/448
    assert codes.float()[0, :3].tolist() == [448.0, -448.0, 1.0]
    assert torch.equal(scale, torch.tensor([[127]], dtype=torch.uint8))


def test_errors() -> None:
    with pytest.raises(ValueError, match="multiple of the MX block size"):
        quantize_mxfp8(torch.zeros(2, 48))
    with pytest.raises(ValueError, match="multiple of the MX block size"):
        quantize_mxfp4(torch.zeros(2, 33))
    with pytest.raises(ValueError, match="multiple of the MX block size"):
        fake_quantize_mxfp4(torch.zeros(16))
    with pytest.raises(ValueError):
        quantize_mxfp8(torch.tensor(1.0))
    with pytest.raises(ValueError, match="multiple of the MX block size"):
        dequantize_mxfp4(torch.zeros(2, 8, dtype=torch.uint8), torch.zeros(2, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="scale has shape"):
        dequantize_mxfp8(torch.zeros(2, 64).to(torch.float8_e4m3fn), torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(TypeError):
        dequantize_mxfp8(torch.zeros(2, 64).to(torch.float8_e4m3fn), torch.zeros(2, 2))
    with pytest.raises(TypeError):
        e8m0_to_float(torch.zeros(3))


# --------------------------------------------------------------------------------------------
# bit equality with nvidia-modelopt 0.47
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mo():
    qtensor = pytest.importorskip("modelopt.torch.quantization.qtensor")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant_utils = pytest.importorskip("modelopt.torch.export.quant_utils")
        model_config = pytest.importorskip("modelopt.torch.export.model_config")
    return qtensor, quant_utils, model_config


@pytest.mark.reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mxfp4_matches_modelopt(mo, dtype: torch.dtype) -> None:
    qtensor, quant_utils, mc = mo
    for seed in range(3):
        w = hard_weight(dtype, seed=seed)
        ref_q, ref_scale = qtensor.MXFP4QTensor.quantize(w, block_size=MX_BLOCK)
        packed, scale = quantize_mxfp4(w)
        assert_bits_equal(packed, ref_q._quantized_data)
        assert_bits_equal(scale, ref_scale.reshape(*w.shape[:-1], -1))
        ref_deq = ref_q.dequantize(scale=ref_scale, block_sizes={-1: MX_BLOCK})
        assert_bits_equal(dequantize_mxfp4(packed, scale, dtype), ref_deq)
        assert_bits_equal(
            dequantize_mxfp4(packed, scale, torch.float32),
            ref_q.dequantize(torch.float32, scale=ref_scale, block_sizes={-1: MX_BLOCK}),
        )
    # the export path: to_quantized_weight(..., QUANTIZATION_MXFP4) is MXFP4QTensor's packed data
    exported = quant_utils.to_quantized_weight(w, None, mc.QUANTIZATION_MXFP4, block_size=MX_BLOCK)
    assert_bits_equal(quantize_mxfp4(w)[0], exported)


@pytest.mark.reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mxfp8_matches_modelopt(mo, dtype: torch.dtype) -> None:
    qtensor, quant_utils, mc = mo
    for seed in range(3):
        w = hard_weight(dtype, seed=seed)
        ref_q, ref_scale = qtensor.MXFP8QTensor.quantize(w)
        codes, scale = quantize_mxfp8(w)
        assert_bits_equal(codes, ref_q._quantized_data)
        assert_bits_equal(scale, ref_scale)
        assert_bits_equal(scale, qtensor.MXFP8QTensor.get_weights_scaling_factor(w))
        assert_bits_equal(dequantize_mxfp8(codes, scale, dtype), ref_q.dequantize(scale=ref_scale))
        assert_bits_equal(
            dequantize_mxfp8(codes, scale, torch.float32), ref_q.dequantize(torch.float32, scale=ref_scale)
        )
        exported = quant_utils.to_quantized_weight(w, scale, mc.QUANTIZATION_MXFP8)
        assert_bits_equal(codes, exported)
    # a static (too small / too large) scale, through quantize_with_scale
    g = torch.Generator().manual_seed(7)
    static = torch.randint(100, 140, scale.shape, generator=g, dtype=torch.int64).to(torch.uint8)
    assert_bits_equal(quantize_mxfp8(w, static)[0], qtensor.MXFP8QTensor.quantize_with_scale(w, static))


@pytest.mark.reference
def test_mx_moe_3d_matches_modelopt(mo) -> None:
    qtensor, _, _ = mo
    w = hard_weight(torch.bfloat16, rows=24, cols=256).reshape(3, 8, 256)
    assert_bits_equal(quantize_mxfp8(w)[1], qtensor.MXFP8QTensor.get_weights_scaling_factor(w))
    assert_bits_equal(quantize_mxfp8(w)[0], qtensor.MXFP8QTensor.quantize(w)[0]._quantized_data)
    ref_q, ref_scale = qtensor.MXFP4QTensor.quantize(w, block_size=MX_BLOCK)
    packed, scale = quantize_mxfp4(w)
    assert_bits_equal(packed, ref_q._quantized_data)
    assert_bits_equal(scale, ref_scale.reshape(3, 8, -1))


@pytest.mark.reference
def test_e8m0_decode_matches_modelopt_for_all_codes(mo) -> None:
    qtensor, _, _ = mo
    # every scale code, against MXFP8QTensor.dequantize with unit codes
    scale = torch.arange(256, dtype=torch.int64).to(torch.uint8).reshape(256, 1)
    ones = torch.ones(256, MX_BLOCK).to(torch.float8_e4m3fn)
    ref = qtensor.MXFP8QTensor((256, MX_BLOCK), torch.float32, ones).dequantize(scale=scale)
    assert_bits_equal(dequantize_mxfp8(ones, scale), ref)
    assert_bits_equal(e8m0_to_float(scale).expand(256, MX_BLOCK), ref)
