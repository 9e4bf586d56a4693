"""FP8 E4M3 numerics: hand-computed bit vectors, round trips, and bit equality with nvidia-modelopt 0.47."""

from __future__ import annotations

import warnings

import pytest
import torch

from formats.reference_decoders import decode_fp8
from quantport.formats import fp8
from quantport.formats.fp8 import (
    FP8_E4M3_MAX,
    block_amax_2d,
    dequantize_fp8,
    fake_quantize_fp8,
    fake_quantize_fp8_per_token,
    fp8_block_scale_shape,
    fp8_scale_from_amax,
    quantize_fp8_block,
    quantize_fp8_per_channel,
    quantize_fp8_per_tensor,
)

FP8 = torch.float8_e4m3fn
DTYPES = [torch.bfloat16, torch.float32]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def _bits32(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _finite_codes() -> torch.Tensor:
    """All 254 finite float8_e4m3fn bit patterns (0x7F and 0xFF are NaN)."""
    raw = torch.arange(256, dtype=torch.uint8)
    return raw[(raw & 0x7F) != 0x7F].view(FP8)


def _hard_weight(dtype: torch.dtype, out_f: int = 200, in_f: int = 320, seed: int = 0) -> torch.Tensor:
    """Random rows over 10 orders of magnitude (fp8 subnormal codes), a zero row and a zero block."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    w *= torch.logspace(-9, 0, out_f).unsqueeze(1)[torch.randperm(out_f, generator=g)]
    w[3] = 0.0
    w[128:, 128:256] = 0.0  # a whole 128x128 block (partial on the out dim) of zeros
    w[7, :5] = torch.tensor([1e3, -1e3, 2.0**-20, -(2.0**-30), 0.0])
    return w.to(dtype)


# --------------------------------------------------------------------------- scales


def test_scale_from_amax_values_and_sanitising() -> None:
    amax = torch.tensor([448.0, 1.0, 0.0, float("nan"), float("inf"), 1e-45])
    scale = fp8_scale_from_amax(amax)
    assert scale.dtype == torch.float32 and scale.shape == amax.shape
    assert scale[0].item() == 1.0
    assert torch.equal(_bits32(scale[1:2]), _bits32(torch.tensor([1.0]) / 448.0))
    assert scale[2].item() == 1.0 and scale[3].item() == 1.0  # zero / NaN amax -> 448 -> scale 1
    assert torch.isfinite(scale).all() and (scale > 0).all()
    tiny = torch.tensor(torch.finfo(torch.float32).tiny)  # amax is clamped to the smallest normal
    assert torch.equal(_bits32(scale[5:6]), _bits32(tiny.reshape(1) / 448.0))
    assert fp8_scale_from_amax(torch.tensor(3.5, dtype=torch.bfloat16)).shape == ()
    grid = torch.rand(2, 1, 3, 1)
    assert fp8_scale_from_amax(grid).shape == (2, 1, 3, 1)
    assert FP8_E4M3_MAX == 448.0


def test_scale_from_amax_does_not_mutate() -> None:
    amax = torch.tensor([0.0, 2.0])
    before = amax.clone()
    fp8_scale_from_amax(amax)
    assert torch.equal(amax, before)


# --------------------------------------------------------------------------- hand-computed bits


def test_per_tensor_hand_computed_bytes() -> None:
    scale = torch.tensor(0.5)
    q = torch.tensor(
        [
            2.0,  # 0x40
            -1.0,  # 0xB8
            448.0,  # 0x7E, the largest finite value
            0.0,  # 0x00
            -0.0,  # 0x80
            1000.0,  # saturates to 448: 0x7E
            -1000.0,  # saturates to -448: 0xFE
            2.0**-9,  # smallest subnormal: 0x01
            2.0**-10,  # tie between 0 and 2^-9 -> even 0: 0x00
            3 * 2.0**-10,  # tie between 2^-9 and 2^-8 -> even 2^-8: 0x02
            1.0625,  # tie between 1.0 (0x38) and 1.125 (0x39) -> 0x38
            1.1875,  # tie between 1.125 (0x39) and 1.25 (0x3A) -> 0x3A
            240.0,  # 1.875 * 2^7: exponent field 7+7 = 0b1110, mantissa 0b111 -> 0x77
            432.0,  # tie between 416 (0x7D, odd mantissa) and 448 (0x7E) -> 0x7E
            456.0,  # above 448 -> saturates: 0x7E
        ]
    )
    expected = [0x40, 0xB8, 0x7E, 0x00, 0x80, 0x7E, 0xFE, 0x01, 0x00, 0x02, 0x38, 0x3A, 0x77, 0x7E, 0x7E]
    for dtype in DTYPES:
        codes = quantize_fp8_per_tensor((q * scale).to(dtype), scale)
        assert codes.dtype == FP8
        assert _bytes(codes).tolist() == expected, dtype


def test_per_channel_hand_computed_bytes() -> None:
    w = torch.tensor([[1.0, -2.0, 0.25], [8.0, 0.0, -4.0]])
    scale = torch.tensor([0.25, 2.0])
    # row 0 / 0.25 = [4, -8, 1]; row 1 / 2 = [4, 0, -2]
    expected = [[0x48, 0xD0, 0x38], [0x48, 0x00, 0xC0]]
    assert _bytes(quantize_fp8_per_channel(w, scale)).tolist() == expected
    assert _bytes(quantize_fp8_per_channel(w, scale.unsqueeze(1))).tolist() == expected


def test_block_layout_and_values() -> None:
    w = torch.zeros(200, 300)
    w[0, 0] = 448.0 * 3  # block (0, 0): amax 1344 -> scale 3
    w[150, 260] = -4.0  # block (1, 2): amax 4 -> scale 4/448
    codes, scale = quantize_fp8_block(w)
    assert scale.shape == (2, 1, 3, 1) == fp8_block_scale_shape(200, 300)
    assert scale.dtype == torch.float32 and codes.shape == w.shape and codes.dtype == FP8
    assert scale[0, 0, 0, 0].item() == 3.0
    assert torch.equal(_bits32(scale[1, 0, 2, 0]), _bits32(torch.tensor(4.0) / 448.0))
    zero_blocks = [(0, 1), (0, 2), (1, 0), (1, 1)]
    assert all(scale[i, 0, j, 0].item() == 1.0 for i, j in zero_blocks)  # all-zero block -> scale 1
    assert _bytes(codes)[0, 0].item() == 0x7E and _bytes(codes)[150, 260].item() == 0xFE
    assert int((_bytes(codes) != 0).sum()) == 2
    assert block_amax_2d(w).shape == (2, 1, 3, 1)
    assert fp8_block_scale_shape(256, 128, (64, 32)) == (4, 1, 4, 1)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_finite_codes_round_trip(dtype: torch.dtype) -> None:
    codes = _finite_codes()
    for scale in (torch.tensor(1.0), torch.tensor(2.0**-7), torch.tensor(8.0)):
        values = dequantize_fp8(codes, scale, dtype)
        assert values.dtype == dtype
        assert torch.equal(values, codes.to(torch.float32).to(dtype) * scale.item())
        assert torch.equal(_bytes(quantize_fp8_per_tensor(values, scale)), _bytes(codes))
    grid = codes[:252].reshape(2, 126)
    per_row = torch.tensor([0.5, 4.0])
    back = quantize_fp8_per_channel(dequantize_fp8(grid, per_row, dtype), per_row)
    assert torch.equal(_bytes(back), _bytes(grid))


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_error_bounds(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(96, 256, generator=g) * 0.02).to(dtype)
    wf = w.float()
    # fp8 e4m3 keeps 3 mantissa bits: relative error <= 2^-4 in the normal range, absolute error
    # <= scale * 2^-10 in the subnormal range; bf16 intermediates/outputs add < 2^-8 relative.
    # Decoded by compressed-tensors (an independent reader), never by the encoder's own module; our decoder
    # must agree with it bit for bit, so a 1% error in dequantize_fp8 fails here.
    tol_rel = 2.0**-4 + 2.0**-7
    scale_t = fp8_scale_from_amax(w.abs().amax())
    codes_t = quantize_fp8_per_tensor(w, scale_t)
    deq = decode_fp8(codes_t, scale_t)
    assert torch.equal(dequantize_fp8(codes_t, scale_t, torch.float32), deq)
    assert ((deq - wf).abs() <= tol_rel * wf.abs() + scale_t * 2.0**-10).all()
    scale_c = fp8_scale_from_amax(w.abs().amax(dim=1))
    codes_c = quantize_fp8_per_channel(w, scale_c)
    deq = decode_fp8(codes_c, scale_c)
    assert torch.equal(dequantize_fp8(codes_c, scale_c, torch.float32), deq)
    assert ((deq - wf).abs() <= tol_rel * wf.abs() + scale_c[:, None] * 2.0**-10).all()
    codes, scale_b = quantize_fp8_block(w)
    deq = decode_fp8(codes, scale_b)
    assert torch.equal(dequantize_fp8(codes, scale_b, torch.float32), deq)
    assert ((deq - wf).abs() <= tol_rel * wf.abs() + scale_b.max() * 2.0**-10).all()
    rel = ((deq - wf).norm() / wf.norm()).item()
    assert 0.005 < rel < 0.04  # e4m3 keeps 3 mantissa bits: ~2% RMS on Gaussian weights


def test_a_one_percent_decoding_error_is_caught() -> None:
    """The round trip above compares with the independent reader exactly: a decoder 1% off never passes."""
    w = (torch.randn(8, 256, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    scale = fp8_scale_from_amax(w.abs().amax())
    codes = quantize_fp8_per_tensor(w, scale)
    wrong = dequantize_fp8(codes, scale * 1.01, torch.float32)
    assert not torch.equal(wrong, decode_fp8(codes, scale))


def test_fake_quantize_equals_dequantize_of_quantize() -> None:
    g = torch.Generator().manual_seed(2)
    for dtype in (*DTYPES, torch.float16):
        x = torch.randn(3, 5, 64, generator=g).to(dtype)
        s = fp8_scale_from_amax(x.abs().amax())
        out = fake_quantize_fp8(x, s)
        assert out.dtype == dtype and out.shape == x.shape
        assert torch.equal(out, dequantize_fp8(quantize_fp8_per_tensor(x, s), s, dtype))
        rows = fp8_scale_from_amax(x.abs().amax(dim=-1))
        assert torch.equal(fake_quantize_fp8(x, rows), dequantize_fp8(quantize_fp8_per_channel(x, rows), rows, dtype))
        assert torch.equal(fake_quantize_fp8_per_token(x), fake_quantize_fp8(x, rows))
        w = x.reshape(15, 64)
        codes, sb = quantize_fp8_block(w, (8, 32))
        assert torch.equal(fake_quantize_fp8(w, sb, (8, 32)), dequantize_fp8(codes, sb, dtype, (8, 32)))


def test_zero_tensors_are_finite() -> None:
    for dtype in DTYPES:
        z = torch.zeros(130, 256, dtype=dtype)
        s = fp8_scale_from_amax(z.abs().amax())
        assert s.item() == 1.0  # modelopt writes scale 0 and NaN codes here; we write 1.0 and zeros
        assert int(_bytes(quantize_fp8_per_tensor(z, s)).sum()) == 0
        codes, sb = quantize_fp8_block(z)
        assert (sb == 1.0).all() and int(_bytes(codes).sum()) == 0
        out = fake_quantize_fp8_per_token(z)
        assert torch.equal(out, z) and not out.isnan().any()
        # a zero scale passed explicitly still never yields NaN codes (0/0 -> code 0)
        assert int(_bytes(quantize_fp8_per_tensor(z, torch.tensor(0.0))).sum()) == 0
        assert int(_bytes(quantize_fp8_per_channel(z, torch.zeros(130))).sum()) == 0
    nan_in = torch.tensor([float("nan"), 1.0, float("inf"), -float("inf")])
    assert _bytes(quantize_fp8_per_tensor(nan_in, torch.tensor(1.0))).tolist() == [0x00, 0x38, 0x7E, 0xFE]


def test_inputs_are_not_mutated() -> None:
    w = torch.randn(130, 200)
    keep = w.clone()
    s = fp8_scale_from_amax(w.abs().amax())
    quantize_fp8_per_tensor(w, s)
    quantize_fp8_block(w)
    fake_quantize_fp8_per_token(w)
    fake_quantize_fp8(w, s)
    assert torch.equal(w, keep)


def test_errors() -> None:
    with pytest.raises(TypeError):
        quantize_fp8_per_tensor(torch.ones(4, dtype=torch.int32), torch.tensor(1.0))
    with pytest.raises(ValueError, match="one element"):
        quantize_fp8_per_tensor(torch.ones(4), torch.ones(2))
    with pytest.raises(ValueError, match="per-channel"):
        quantize_fp8_per_channel(torch.ones(4, 8), torch.ones(8))
    with pytest.raises(ValueError, match="2-D"):
        quantize_fp8_block(torch.ones(2, 4, 8))
    with pytest.raises(ValueError, match="block scale"):
        dequantize_fp8(torch.zeros(256, 256, dtype=FP8), torch.ones(3, 1, 2, 1))
    with pytest.raises(TypeError):
        dequantize_fp8(torch.zeros(4), torch.tensor(1.0))
    with pytest.raises(ValueError):
        fake_quantize_fp8(torch.ones(4), None)  # type: ignore[arg-type]
    assert fp8.__all__  # the module exports its API


# --------------------------------------------------------------------------- modelopt reference


def _modelopt_export(weight: torch.Tensor, cfg_name: str) -> tuple[dict[str, torch.Tensor], object]:
    """Quantize a bias-free Linear holding ``weight`` with modelopt and run its per-module HF export."""
    mtq = pytest.importorskip("modelopt.torch.quantization")
    hf = pytest.importorskip("modelopt.torch.export.unified_export_hf")
    export_weight = getattr(hf, "_export_quantized_weight", None)
    if export_weight is None:
        pytest.skip("modelopt's _export_quantized_weight is not available")
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
    model = torch.nn.Sequential(lin)
    x = torch.randn(4, weight.shape[1], generator=torch.Generator().manual_seed(3)).to(weight.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, getattr(mtq, cfg_name), lambda m: m(x))
        module = model[0]
        input_amax = None
        if getattr(module, "input_quantizer", None) is not None and module.input_quantizer.is_enabled:
            input_amax = getattr(module.input_quantizer, "amax", None)
            input_amax = None if input_amax is None else input_amax.clone()
        export_weight(module, weight.dtype)
    out = {n: t.detach() for n, t in (*module.named_parameters(), *module.named_buffers()) if "quantizer" not in n}
    return out, input_amax


@pytest.mark.reference
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_export_per_tensor(dtype: torch.dtype) -> None:
    w = _hard_weight(dtype)
    ref, input_amax = _modelopt_export(w, "FP8_DEFAULT_CFG")
    scale = fp8_scale_from_amax(w.abs().amax())
    assert ref["weight_scale"].shape == () and ref["weight_scale"].dtype == torch.float32
    assert torch.equal(_bits32(ref["weight_scale"]), _bits32(scale))
    assert torch.equal(_bytes(ref["weight"]), _bytes(quantize_fp8_per_tensor(w, scale)))
    assert input_amax is not None
    assert torch.equal(_bits32(ref["input_scale"]), _bits32(fp8_scale_from_amax(input_amax).reshape(())))


@pytest.mark.reference
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_export_per_channel(dtype: torch.dtype) -> None:
    w = _hard_weight(dtype, seed=4)
    ref, _ = _modelopt_export(w, "FP8_PER_CHANNEL_PER_TOKEN_CFG")
    scale = fp8_scale_from_amax(w.abs().amax(dim=1))
    assert ref["weight_scale"].shape == (w.shape[0],) and ref["weight_scale"].dtype == torch.float32
    assert torch.equal(_bits32(ref["weight_scale"]), _bits32(scale))  # zero row -> 1.0 in both
    assert torch.equal(_bytes(ref["weight"]), _bytes(quantize_fp8_per_channel(w, scale)))


@pytest.mark.reference
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_export_block(dtype: torch.dtype) -> None:
    w = _hard_weight(dtype, seed=5)  # 200 x 320: partial blocks on both dims
    ref, _ = _modelopt_export(w, "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG")
    codes, scale = quantize_fp8_block(w)
    assert ref["weight_scale"].shape == (2, 1, 3, 1) and ref["weight_scale"].dtype == torch.float32
    assert torch.equal(_bits32(ref["weight_scale"]), _bits32(scale))
    assert torch.equal(_bytes(ref["weight"]), _bytes(codes))


@pytest.mark.reference
def test_reference_export_all_zero_deviation() -> None:
    """modelopt's FP8 per-tensor export writes scale 0 and NaN codes for an all-zero weight; we do not."""
    z = torch.zeros(64, 128, dtype=torch.bfloat16)
    ref, _ = _modelopt_export(z, "FP8_DEFAULT_CFG")
    scale = fp8_scale_from_amax(z.abs().amax())
    codes = quantize_fp8_per_tensor(z, scale)
    assert scale.item() == 1.0 and int(_bytes(codes).sum()) == 0
    if ref["weight_scale"].item() == 0.0:  # modelopt 0.47: documented degenerate output
        assert ref["weight"].float().isnan().all()
    for cfg in ("FP8_PER_CHANNEL_PER_TOKEN_CFG", "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG"):
        ref, _ = _modelopt_export(z, cfg)  # here modelopt sanitises amax 0 -> 448, as we do
        assert (ref["weight_scale"] == 1.0).all() and int(_bytes(ref["weight"]).sum()) == 0


@pytest.mark.reference
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_to_quantized_weight_ties_and_range(dtype: torch.dtype) -> None:
    qu = pytest.importorskip("modelopt.torch.export.quant_utils")
    mc = pytest.importorskip("modelopt.torch.export.model_config")
    scale = torch.tensor(2.0**-3)
    grid = _finite_codes().to(torch.float32)
    grid = grid[grid.abs() < 448]
    ordered = grid.sort().values
    mids = (ordered[1:] + ordered[:-1]) / 2  # exact midpoints between neighbouring fp8 values
    beyond = torch.tensor([450.0, 463.0, 464.0, 500.0, 1e4, -1e4, -470.0])
    g = torch.Generator().manual_seed(6)
    rnd = torch.randn(4096, generator=g) * torch.logspace(-12, 3, 4096)
    flat = torch.cat([mids, ordered, beyond, rnd])
    flat = torch.cat([flat, torch.zeros(-flat.numel() % 16)])
    w = (flat * scale).to(dtype).reshape(-1, 16)
    ours = quantize_fp8_per_tensor(w, scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = qu.to_quantized_weight(w, scale, mc.QUANTIZATION_FP8)
    valid = ~theirs.float().isnan()  # older torch casts >= 464 to NaN; 2.13 saturates like we do
    assert not ours.float().isnan().any()
    assert torch.equal(_bytes(ours)[valid], _bytes(theirs)[valid])
    per_row = fp8_scale_from_amax(w.abs().amax(dim=1))
    theirs = qu.to_quantized_weight(w, per_row, mc.QUANTIZATION_FP8_PC_PT)
    assert torch.equal(_bytes(quantize_fp8_per_channel(w, per_row)), _bytes(theirs))


@pytest.mark.reference
def test_reference_bf16_quotient_rounding_matters() -> None:
    """modelopt rounds ``w / scale`` to bf16 before the fp8 cast for bf16 per-tensor weights; so do we."""
    qu = pytest.importorskip("modelopt.torch.export.quant_utils")
    mc = pytest.importorskip("modelopt.torch.export.model_config")
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    scale = torch.tensor(0.0123456)
    theirs = qu.to_quantized_weight(w, scale, mc.QUANTIZATION_FP8)
    naive = (w.float() / scale).to(FP8)
    assert not torch.equal(_bytes(naive), _bytes(theirs))  # the test data exercises double rounding
    assert torch.equal(_bytes(quantize_fp8_per_tensor(w, scale)), _bytes(theirs))


def test_in_range_fast_path_gives_the_same_codes():
    torch.manual_seed(3)
    for dtype in (torch.bfloat16, torch.float32):
        w = (torch.randn(64, 96) * torch.logspace(-4, 2, 96)).to(dtype)
        w[0, 0] = -w.abs().max() * 1.0  # the amax element itself, negative
        scale = fp8.fp8_scale_from_amax(w.abs().amax().float())
        fast = fp8.quantize_fp8_per_tensor(w, scale, in_range=True)
        checked = fp8.quantize_fp8_per_tensor(w, scale)
        assert torch.equal(fast.view(torch.uint8), checked.view(torch.uint8))
