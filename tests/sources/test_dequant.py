"""FP8-block and MXFP4 dequantization, bit for bit against transformers 5.24's own functions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.finegrained_fp8 import Fp8Dequantize
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from quantport.sources import SourceError, dequantize_fp8_block, dequantize_mxfp4


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes (so NaNs compare equal to themselves and -0.0 differs from 0.0)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def random_fp8(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Every finite e4m3 code, at random (the NaN codes 0x7F / 0xFF excluded)."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x7E
    return codes.view(torch.float8_e4m3fn)


def random_scales(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator) * 1e-3 + 1e-6


def transformers_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return Fp8Dequantize(None)._dequantize_one(weight, scale_inv, output_dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(256, 384), (3, 128, 256)])
def test_fp8_block_is_bit_equal_to_transformers(shape, dtype):
    weight = random_fp8(shape, 0)
    scale_inv = random_scales((*shape[:-2], shape[-2] // 128, shape[-1] // 128), 1)
    ours = dequantize_fp8_block(weight, scale_inv, dtype)
    assert ours.dtype == dtype and ours.shape == shape
    assert torch.equal(bits(ours), bits(transformers_fp8(weight, scale_inv, dtype)))


@pytest.mark.parametrize("shape", [(576, 384), (192, 200), (96, 64), (2, 130, 129)])
def test_fp8_partial_blocks_match_transformers_on_the_zero_padded_weight(shape):
    """A partial last block (DeepSeek-V3's kv_a_proj_with_mqa: 576 rows) is scaled by its block's scale: the
    same as transformers' arithmetic on the weight zero-padded to whole blocks, then cropped."""
    weight = random_fp8(shape, 2)
    grid = (-(-shape[-2] // 128), -(-shape[-1] // 128))
    scale_inv = random_scales((*shape[:-2], *grid), 3)
    padded = F.pad(weight.view(torch.uint8), (0, grid[1] * 128 - shape[-1], 0, grid[0] * 128 - shape[-2]))
    expected = transformers_fp8(padded.view(torch.float8_e4m3fn), scale_inv, torch.bfloat16)
    expected = expected[..., : shape[-2], : shape[-1]]
    assert torch.equal(bits(dequantize_fp8_block(weight, scale_inv, torch.bfloat16)), bits(expected))


def test_fp8_partial_block_value_by_hand():
    """Row 130 lies in row block 1, column 129 in column block 1: its scale is scale_inv[1, 1]."""
    weight = torch.zeros(131, 130).to(torch.float8_e4m3fn)
    weight[130, 129] = 3.0
    weight[0, 0] = -2.0
    scale_inv = torch.tensor([[0.5, 2.0], [4.0, 0.25]])
    out = dequantize_fp8_block(weight, scale_inv, torch.float32)
    assert out[130, 129].item() == 0.75 and out[0, 0].item() == -1.0
    assert out.abs().sum().item() == 1.75


def test_fp8_ue8m0_scales_as_stored_by_scale_fmt_ue8m0():
    weight = random_fp8((128, 256), 4)
    scale_inv = torch.tensor([[2.0**-8, 2.0**3]]).to(torch.float8_e8m0fnu)
    ours = dequantize_fp8_block(weight, scale_inv, torch.bfloat16)
    assert torch.equal(bits(ours), bits(transformers_fp8(weight, scale_inv, torch.bfloat16)))


def test_fp8_per_tensor_scale():
    weight = random_fp8((64, 32), 5)
    out = dequantize_fp8_block(weight, torch.tensor(0.5), torch.bfloat16, block_size=None)
    assert torch.equal(bits(out), bits((weight.float() * 0.5).to(torch.bfloat16)))


@pytest.mark.parametrize(
    ("weight_shape", "scale_shape"), [((256, 256), (2, 3)), ((256, 256), (2,)), ((257, 128), (2, 2)), ((5,), (1,))]
)
def test_fp8_wrong_scale_grid_is_refused(weight_shape, scale_shape):
    with pytest.raises(SourceError, match="weight_scale_inv|2 dimensions"):
        dequantize_fp8_block(random_fp8(weight_shape, 0), torch.ones(scale_shape), torch.bfloat16)


def all_mxfp4_bytes(experts: int = 2, rows: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks holding every byte value, scales holding every E8M0 byte (0 -> 2**-127 ... 255 -> 2**128 = inf)."""
    generator = torch.Generator().manual_seed(6)
    blocks = torch.randint(0, 256, (experts, rows, 3, 16), generator=generator, dtype=torch.uint8)
    blocks.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    scales = torch.arange(experts * rows * 3, dtype=torch.int64).remainder(256).to(torch.uint8)
    return blocks, scales.view(experts, rows, 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mxfp4_is_bit_equal_to_transformers(dtype):
    blocks, scales = all_mxfp4_bytes()
    ours = dequantize_mxfp4(blocks, scales, dtype)
    expected = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    assert ours.shape == expected.shape == (2, 96, 256) and ours.dtype == dtype
    assert ours.is_contiguous()
    assert torch.equal(bits(ours), bits(expected))


def test_mxfp4_layout_by_hand():
    """Low nibble first, the scale byte's exponent minus 127, then [E, out, in] -> [E, in, out]."""
    blocks = torch.zeros(1, 2, 1, 16, dtype=torch.uint8)
    blocks[0, 1, 0, 0] = 0x72  # low nibble 2 -> 1.0 at in=0, high nibble 7 -> 6.0 at in=1
    scales = torch.tensor([[[127], [129]]], dtype=torch.uint8)  # row 1 scaled by 2**2
    out = dequantize_mxfp4(blocks, scales, torch.float32)
    assert out.shape == (1, 32, 2)
    assert out[0, 0, 1].item() == 4.0 and out[0, 1, 1].item() == 24.0
    assert out.abs().sum().item() == 28.0


@pytest.mark.parametrize(
    ("blocks_shape", "scales_shape", "match"),
    [((2, 4, 3, 16), (2, 4, 2), "scales must have shape"), ((2, 4, 3, 8), (2, 4, 3), "blocks must have shape"),
     ((4, 3, 16), (4, 3), "blocks must have shape")],
)  # fmt: skip
def test_mxfp4_malformed_pairs_are_refused(blocks_shape, scales_shape, match):
    with pytest.raises(SourceError, match=match):
        dequantize_mxfp4(
            torch.zeros(blocks_shape, dtype=torch.uint8), torch.zeros(scales_shape, dtype=torch.uint8), torch.bfloat16
        )
