"""NVFP4 numerics: hand-computed bytes, round trips, and bit equality with nvidia-modelopt 0.47."""

from __future__ import annotations

import warnings

import pytest
import torch

from formats.reference_decoders import decode_nvfp4_multiplier
from quantport.formats import nvfp4
from quantport.formats.nvfp4 import (
    E2M1_VALUES,
    NVFP4_BLOCK,
    cast_to_e2m1_codes,
    dequantize_nvfp4,
    e2m1_codes_to_float,
    fake_quantize_nvfp4,
    nvfp4_block_scales,
    nvfp4_global_scale,
    pack_fp4,
    quantize_nvfp4,
    unpack_fp4,
)

FP8 = torch.float8_e4m3fn
DTYPES = [torch.bfloat16, torch.float32]

# One 16-element block with block amax 6: every E2M1 tie, both signs, a tiny negative (-> code 8).
A = [1.0, -0.5, 6.0, 0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, 4.0, -0.1, 3.0, -6.0]
# codes 2,9 | 7,0 | 0,2 | 2,4 | 4,6 | 6,14 | 6,8 | 5,15  (low nibble = even column)
A_BYTES = [0x92, 0x07, 0x20, 0x42, 0x64, 0xE6, 0x86, 0xF5]
# -A: codes 10,1 | 15,0 (-0.0 -> code 0) | 8,10 | 10,12 | 12,14 | 14,6 | 14,0 | 13,7
NEG_A_BYTES = [0x1A, 0x0F, 0xA8, 0xCA, 0xEC, 0x6E, 0x0E, 0x7D]
# A / 4 (block scale clamped up to 2^-9): codes 0,8 | 3,0 | 0,0 | 1,1 | 1,2 | 2,10 | 2,8 | 2,11
QUARTER_A_BYTES = [0x80, 0x03, 0x00, 0x11, 0x21, 0xA2, 0x82, 0xB2]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def _bits32(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _hard_weight(dtype: torch.dtype, out_f: int = 96, in_f: int = 256, seed: int = 0) -> torch.Tensor:
    """Random blocks over 8 orders of magnitude (subnormal and clamped fp8 block scales), a zero row,
    a zero block and an outlier."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f // NVFP4_BLOCK, NVFP4_BLOCK, generator=g)
    w *= torch.logspace(-8, 0, w.shape[0] * w.shape[1]).reshape(w.shape[0], w.shape[1], 1)[
        torch.randperm(out_f, generator=g)
    ]
    w = w.reshape(out_f, in_f)
    w[5] = 0.0
    w[9, 32:48] = 0.0
    w[11, 7] = 20.0
    return w.to(dtype)


def _is_subnormal_fp8(scale: torch.Tensor) -> torch.Tensor:
    b = _bytes(scale)
    return ((b & 0x78) == 0) & ((b & 0x07) != 0)


# --------------------------------------------------------------------------- constants and codes


def test_constants() -> None:
    assert NVFP4_BLOCK == 16
    assert E2M1_VALUES[:8] == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    assert [-v for v in E2M1_VALUES[:8]] == list(E2M1_VALUES[8:])
    assert nvfp4.__all__


def test_all_16_codes_round_trip() -> None:
    codes = torch.arange(16, dtype=torch.uint8)
    values = e2m1_codes_to_float(codes)
    assert values.dtype == torch.float32
    assert values.tolist() == list(E2M1_VALUES)
    back = cast_to_e2m1_codes(values)
    expected = codes.clone()
    expected[8] = 0  # code 8 is -0.0, which modelopt (x < 0 is false) encodes as code 0
    assert torch.equal(back, expected)
    assert torch.equal(cast_to_e2m1_codes(values.to(torch.bfloat16)), expected)
    assert cast_to_e2m1_codes(torch.tensor([-1e-3])).item() == 8


def test_cast_rounding_ties_saturation_and_nan() -> None:
    x = torch.tensor(
        [0.25, 0.2500001, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.0001, 6.5, 1e30, float("inf"), -float("inf")]
        + [-0.25, -0.75, -5.0, -0.0, float("nan")]
    )
    expected = [0, 1, 2, 2, 4, 4, 6, 6, 7, 7, 7, 7, 15, 8, 10, 14, 0, 0]
    assert cast_to_e2m1_codes(x).tolist() == expected
    assert cast_to_e2m1_codes(x).dtype == torch.uint8


def test_pack_unpack_inverse_and_nibble_order() -> None:
    assert pack_fp4(torch.tensor([1, 2], dtype=torch.uint8)).tolist() == [0x21]
    assert unpack_fp4(torch.tensor([0x21], dtype=torch.uint8)).tolist() == [1, 2]
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(4, 64)
    assert torch.equal(pack_fp4(unpack_fp4(every_byte)), every_byte)
    codes = torch.randint(0, 16, (3, 5, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    packed = pack_fp4(codes)
    assert packed.shape == (3, 5, 16) and packed.dtype == torch.uint8
    assert torch.equal(unpack_fp4(packed), codes)


# --------------------------------------------------------------------------- hand-computed bytes


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_hand_computed_bytes(dtype: torch.dtype) -> None:
    a = torch.tensor(A)
    w = torch.stack(
        [
            torch.cat([a, torch.zeros(16), a * 2.0**-8]),
            torch.cat([a * 0.5, a * 2.0**-11, -a]),
        ]
    ).to(dtype)
    packed, scale = quantize_nvfp4(w, torch.tensor(1.0))
    assert packed.dtype == torch.uint8 and packed.shape == (2, 24)
    assert scale.dtype == FP8 and scale.shape == (2, 3)
    # amax 6 -> 1.0 (0x38); zeros -> 1.0; 6*2^-8 -> 2^-8 (subnormal 0x02); 3 -> 0.5 (0x30);
    # 6*2^-11 -> 2^-11, clamped up to 2^-9 (0x01); 6 -> 0x38
    assert _bytes(scale).tolist() == [[0x38, 0x38, 0x02], [0x30, 0x01, 0x38]]
    assert packed.tolist() == [
        A_BYTES + [0x00] * 8 + A_BYTES,
        A_BYTES + QUARTER_A_BYTES + NEG_A_BYTES,
    ]
    deq = dequantize_nvfp4(packed, scale, torch.tensor(1.0), torch.float32)
    assert deq[0, :16].tolist() == [1, -0.5, 6, 0, 0, 1, 1, 2, 2, 4, 4, -4, 4, -0.0, 3, -6]


def test_global_scale_values() -> None:
    amax = torch.tensor([2688.0, 1.0, 0.0, float("nan")])
    gs = nvfp4_global_scale(amax)
    assert gs.dtype == torch.float32
    assert gs[0].item() == 1.0
    assert torch.equal(_bits32(gs[1:2]), _bits32(torch.tensor([1.0]) / 2688.0))
    assert gs[2].item() == gs[3].item() == torch.tensor(6.0 / 2688.0).item()  # 0 / NaN amax -> 1/448
    assert nvfp4_global_scale(torch.tensor(3.0, dtype=torch.bfloat16)).shape == ()


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_error_bounds(dtype: torch.dtype) -> None:
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(2)).to(dtype)
    gs = nvfp4_global_scale(w.abs().amax())
    packed, scale = quantize_nvfp4(w, gs)
    deq = decode_nvfp4_multiplier(packed, scale, gs).float()  # compressed-tensors' decompressor, bf16
    # ours agrees to within bf16's last bit (the reader divides by 1/gs): a 1% error fails
    torch.testing.assert_close(dequantize_nvfp4(packed, scale, gs, torch.bfloat16).float(), deq, rtol=2**-8, atol=0)
    step = (scale.float() * gs).repeat_interleave(NVFP4_BLOCK, dim=-1)
    # half the largest E2M1 gap (4 -> 6) is one block-scale step; fp8 rounding of the block scale can
    # push the scaled block max to ~6.4 (saturation error 0.4 step); bf16 adds 2^-8 relative.
    wf = w.float()
    assert ((deq - wf).abs() <= step * 1.0 + wf.abs() * 2.0**-7).all()
    assert ((deq - wf).norm() / wf.norm()).item() < 0.12


def test_fake_quantize_equals_dequantize_of_quantize() -> None:
    g = torch.Generator().manual_seed(3)
    for dtype in (*DTYPES, torch.float16):
        x = (torch.randn(2, 3, 64, generator=g) * 4).to(dtype)
        gs = nvfp4_global_scale(torch.tensor(2.0))  # static: smaller than the amax, so blocks saturate
        out = fake_quantize_nvfp4(x, gs)
        assert out.dtype == dtype and out.shape == x.shape
        assert torch.equal(out, dequantize_nvfp4(*quantize_nvfp4(x, gs), gs, dtype))
        assert not out.isnan().any()


def test_per_expert_global_scale_matches_per_matrix() -> None:
    w = torch.randn(3, 8, 32, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    gs = nvfp4_global_scale(w.abs().amax(dim=(1, 2)))
    packed, scale = quantize_nvfp4(w, gs)
    for e in range(3):
        p_e, s_e = quantize_nvfp4(w[e], gs[e])
        assert torch.equal(packed[e], p_e) and torch.equal(_bytes(scale[e]), _bytes(s_e))
        assert torch.equal(dequantize_nvfp4(packed, scale, gs)[e], dequantize_nvfp4(p_e, s_e, gs[e]))


def test_zero_tensor_is_finite() -> None:
    for dtype in DTYPES:
        z = torch.zeros(4, 32, dtype=dtype)
        gs = nvfp4_global_scale(z.abs().amax())
        assert gs.item() == torch.tensor(1 / 448).item()  # modelopt writes 0 here (-> NaN scales)
        packed, scale = quantize_nvfp4(z, gs)
        assert int(packed.sum()) == 0 and (_bytes(scale) == 0x38).all()  # block scale 1.0
        assert torch.equal(dequantize_nvfp4(packed, scale, gs, dtype), z)
        # an explicit zero global scale still gives finite scales and codes
        packed, scale = quantize_nvfp4(z, torch.tensor(0.0))
        assert int(packed.sum()) == 0 and not scale.float().isnan().any()
        assert torch.equal(fake_quantize_nvfp4(z, torch.tensor(0.0)), z)


def test_inputs_are_not_mutated() -> None:
    w = torch.randn(4, 64)
    keep = w.clone()
    gs = nvfp4_global_scale(w.abs().amax())
    quantize_nvfp4(w, gs)
    fake_quantize_nvfp4(w, gs)
    cast_to_e2m1_codes(w)
    assert torch.equal(w, keep)


def test_errors() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize_nvfp4(torch.ones(4, 24), torch.tensor(1.0))
    with pytest.raises(ValueError, match="multiple of 16"):
        fake_quantize_nvfp4(torch.ones(2, 8), torch.tensor(1.0))
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4_block_scales(torch.ones(40), torch.tensor(1.0))
    with pytest.raises(ValueError, match="even"):
        pack_fp4(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="0..15"):
        pack_fp4(torch.tensor([16, 0], dtype=torch.uint8))
    with pytest.raises(TypeError):
        unpack_fp4(torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="block_scale"):
        dequantize_nvfp4(torch.zeros(2, 8, dtype=torch.uint8), torch.ones(2, 2, dtype=FP8), 1.0)
    with pytest.raises(ValueError, match="global scale"):
        quantize_nvfp4(torch.ones(2, 4, 16), torch.ones(3))
    with pytest.raises(ValueError, match="global scale"):
        fake_quantize_nvfp4(torch.ones(2, 16), None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- modelopt reference


def _nvfp4_qtensor() -> type:
    pytest.importorskip("modelopt.torch.quantization")
    mod = pytest.importorskip("modelopt.torch.quantization.qtensor.nvfp4_tensor")
    return mod.NVFP4QTensor


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
@pytest.mark.parametrize("cfg", ["NVFP4_DEFAULT_CFG", "W4A16_NVFP4_CFG"])
def test_reference_export(dtype: torch.dtype, cfg: str) -> None:
    w = _hard_weight(dtype)
    ref, input_amax = _modelopt_export(w, cfg)
    gs = nvfp4_global_scale(w.abs().amax())
    packed, scale = quantize_nvfp4(w, gs)
    assert ref["weight_scale_2"].shape == () and ref["weight_scale_2"].dtype == torch.float32
    assert torch.equal(_bits32(ref["weight_scale_2"]), _bits32(gs))
    assert ref["weight_scale"].dtype == FP8 and ref["weight_scale"].shape == (96, 16)
    assert torch.equal(_bytes(ref["weight_scale"]), _bytes(scale))
    assert ref["weight"].dtype == torch.uint8 and torch.equal(ref["weight"], packed)
    # the data really covers subnormal and clamped (2^-9) block scales and a zero block (1.0)
    assert _is_subnormal_fp8(scale).any() and (_bytes(scale) == 0x01).any() and (_bytes(scale) == 0x38).any()
    if cfg == "NVFP4_DEFAULT_CFG":
        assert input_amax is not None
        assert torch.equal(_bits32(ref["input_scale"]), _bits32(nvfp4_global_scale(input_amax).reshape(())))


@pytest.mark.reference
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_qtensor_default_path(dtype: torch.dtype) -> None:
    qt = _nvfp4_qtensor()
    w = _hard_weight(dtype, out_f=32, seed=5)
    ref_q, ref_scale, ref_gs = qt.quantize(w, 16)
    gs = nvfp4_global_scale(w.abs().amax())
    packed, scale = quantize_nvfp4(w, gs)
    assert torch.equal(_bits32(ref_gs), _bits32(gs))
    assert torch.equal(_bytes(ref_scale), _bytes(scale))
    assert torch.equal(ref_q._quantized_data, packed)
    ref_bs, _ = qt.get_weights_scaling_factor(w, 16, gs)
    assert torch.equal(_bytes(ref_bs), _bytes(nvfp4_block_scales(w, gs)))
    for out_dtype in DTYPES:
        ref_deq = ref_q.dequantize(out_dtype, scale=ref_scale, double_scale=ref_gs, block_sizes={-1: 16})
        assert torch.equal(ref_deq, dequantize_nvfp4(packed, scale, gs, out_dtype))


@pytest.mark.reference
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_qtensor_ties_and_saturation(dtype: torch.dtype) -> None:
    qt = _nvfp4_qtensor()
    gs = torch.tensor(2.0**-8)
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    rows = []
    for s in (2.0**-2, 2.0**-7, 2.0**-9, 2.0**-12, 1.0):  # normal, subnormal, min and clamped block scales
        block = torch.cat([mids, -mids, torch.tensor([6.0, -0.0])]) * s * gs
        rows.append(torch.cat([block, block.flip(0)]))
    w = torch.stack(rows).to(dtype)
    packed, scale = quantize_nvfp4(w, gs)
    ref_q, ref_scale, _ = qt.quantize(w, 16, None, gs)
    assert torch.equal(_bytes(ref_scale), _bytes(scale)) and torch.equal(ref_q._quantized_data, packed)
    assert _bytes(scale)[:, 0].tolist() == [0x28, 0x04, 0x01, 0x01, 0x38]
    # a static global scale far below the data: block scales clamp to 448 and codes saturate at +-6
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(6)).to(dtype) * 100
    small = torch.tensor(1e-4)
    packed, scale = quantize_nvfp4(x, small)
    ref_q, ref_scale, _ = qt.quantize(x, 16, None, small)
    assert (_bytes(scale) == 0x7E).all()
    assert torch.equal(_bytes(ref_scale), _bytes(scale)) and torch.equal(ref_q._quantized_data, packed)
    assert ((unpack_fp4(packed) & 7) == 7).any()


@pytest.mark.reference
def test_reference_cast_matches_modelopt_except_nan() -> None:
    qt = _nvfp4_qtensor()
    g = torch.Generator().manual_seed(7)
    x = torch.cat(
        [
            torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, float("inf"), -float("inf"), -0.0]),
            torch.tensor([-0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, -1e-6, 1e-6]),
            torch.randn(4096, generator=g) * 3,
        ]
    )
    assert torch.equal(cast_to_e2m1_codes(x), qt._cast_fp4(x.clone()))
    nan = torch.tensor([float("nan")])
    assert cast_to_e2m1_codes(nan).item() == 0  # deviation: modelopt maps NaN to code 7 (+6)


@pytest.mark.reference
def test_reference_all_zero_deviation() -> None:
    """modelopt exports weight_scale_2 = 0, NaN block scales and 0x77 bytes for an all-zero weight."""
    z = torch.zeros(32, 64, dtype=torch.bfloat16)
    ref, _ = _modelopt_export(z, "W4A16_NVFP4_CFG")
    gs = nvfp4_global_scale(z.abs().amax())
    packed, scale = quantize_nvfp4(z, gs)
    assert gs.item() > 0 and int(packed.sum()) == 0 and (_bytes(scale) == 0x38).all()
    if ref["weight_scale_2"].item() == 0.0:  # modelopt 0.47's documented degenerate output
        assert ref["weight_scale"].float().isnan().all()
