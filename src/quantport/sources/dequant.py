"""Dequantizing the published FP8-block and MXFP4 weight layouts, with transformers' arithmetic.

Both functions reproduce transformers 5.24's loading path bit for bit (tests/sources/test_dequant.py
compares them with ``Fp8Dequantize._dequantize_one`` and ``convert_moe_packed_tensors``):

* FP8 block: every code and its block's ``weight_scale_inv`` are widened to float32, multiplied in float32
  and rounded once to the logical dtype. Unlike transformers, shapes that are not a multiple of the block
  (DeepSeek-V3's ``kv_a_proj_with_mqa`` has 576 rows, a grid of 5 row blocks) are accepted: the last block
  is partial, as the published format defines (transformers' loader refuses them); each element's
  arithmetic is unchanged.
* MXFP4: each byte holds two E2M1 codes (low nibble first), each group of 32 codes shares one E8M0
  exponent byte (``2 ** (byte - 127)``); the value table is in the logical dtype and the exponent is
  applied with ``torch.ldexp``. The last two dimensions are then swapped: GPT-OSS stores ``[E, out, in]``
  and its module (and bf16 checkpoint) holds ``[E, in, out]``.

Everything runs on the device of the inputs; no host copy is made.
"""

from __future__ import annotations

import math

import torch

from .base import SourceError

__all__ = ["E2M1_VALUES", "MXFP4_GROUP", "dequantize_fp8_block", "dequantize_mxfp4", "fp8_scale_grid", "mxfp4_shape"]

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""The 16 E2M1 (FP4) values by code."""
MXFP4_GROUP = 32
"""Codes per E8M0 scale in MXFP4."""
_E8M0_BIAS = 127


def fp8_scale_grid(shape: tuple[int, ...], block_size: tuple[int, int] | None) -> tuple[int, ...]:
    """Shape of ``weight_scale_inv`` for a weight of ``shape``: ``[..., ceil(out/bm), ceil(in/bn)]``;
    ``()`` for a per-tensor scale (no block size)."""
    if block_size is None:
        return ()
    if len(shape) < 2:
        raise SourceError(f"an FP8-block weight needs at least 2 dimensions, got shape {list(shape)}")
    rows, cols = shape[-2:]
    return (*shape[:-2], math.ceil(rows / block_size[0]), math.ceil(cols / block_size[1]))


def dequantize_fp8_block(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    dtype: torch.dtype,
    block_size: tuple[int, int] | None = (128, 128),
) -> torch.Tensor:
    """``weight`` (float8 codes ``[..., out, in]``) times its block's ``scale_inv``, in ``dtype``.

    ``block_size`` None means one per-tensor scale. Raises :class:`SourceError` when the scale grid does not
    fit the weight.
    """
    expected = fp8_scale_grid(tuple(weight.shape), block_size)
    if block_size is None:
        if scale_inv.numel() != 1:
            raise SourceError(f"a per-tensor FP8 scale must hold one value, got shape {list(scale_inv.shape)}")
        return (weight.to(torch.float32) * scale_inv.to(torch.float32).reshape(())).to(dtype)
    if tuple(scale_inv.shape) != expected:
        raise SourceError(
            f"FP8 weight of shape {list(weight.shape)} with {list(block_size)} blocks needs weight_scale_inv of "
            f"shape {list(expected)}, got {list(scale_inv.shape)}"
        )
    block_rows, block_cols = block_size
    rows, cols = weight.shape[-2:]
    values = weight.to(torch.float32)
    scales = scale_inv.to(torch.float32)
    if rows % block_rows or cols % block_cols:
        # A partial last block: give every row its block's scales, then the columns in whole blocks plus a tail.
        scales = scales.repeat_interleave(block_rows, dim=-2)[..., :rows, :]
        whole = cols // block_cols
        head = values[..., : whole * block_cols].unflatten(-1, (whole, block_cols))
        head.mul_(scales[..., :whole, None])
        if cols % block_cols:
            values[..., whole * block_cols :].mul_(scales[..., whole:])
        return values.to(dtype)
    blocks = values.unflatten(-1, (cols // block_cols, block_cols)).unflatten(-3, (rows // block_rows, block_rows))
    blocks.mul_(scales[..., :, None, :, None])
    return values.to(dtype)


def mxfp4_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Logical shape of an MXFP4 ``[E, out, G, 16]`` blocks tensor: ``[E, G * 32, out]``."""
    if len(blocks_shape) != 4 or blocks_shape[-1] * 2 != MXFP4_GROUP:
        raise SourceError(
            f"MXFP4 blocks must have shape [experts, rows, groups, {MXFP4_GROUP // 2}], got {list(blocks_shape)}"
        )
    experts, rows, groups, _ = blocks_shape
    return (experts, groups * MXFP4_GROUP, rows)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """GPT-OSS ``X_blocks`` (uint8 ``[E, out, G, 16]``) and ``X_scales`` (uint8 ``[E, out, G]``) as the
    ``[E, in, out]`` tensor in ``dtype`` that the model's parameter ``X`` holds.

    Works one expert at a time, so the temporaries stay at one expert's size.
    """
    logical = mxfp4_shape(tuple(blocks.shape))
    if tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise SourceError(
            f"MXFP4 scales must have shape {list(blocks.shape[:-1])} (the blocks' without the last), "
            f"got {list(scales.shape)}"
        )
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise SourceError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    table = torch.tensor(E2M1_VALUES, dtype=dtype, device=blocks.device)
    out = torch.empty(logical, dtype=dtype, device=blocks.device)
    rows = blocks.shape[1]
    for expert in range(blocks.shape[0]):
        packed = blocks[expert]
        values = torch.empty((*packed.shape[:-1], MXFP4_GROUP), dtype=dtype, device=blocks.device)
        values[..., 0::2] = table[(packed & 0x0F).int()]
        values[..., 1::2] = table[(packed >> 4).int()]
        exponents = scales[expert].to(torch.int32).sub_(_E8M0_BIAS).unsqueeze(-1)
        torch.ldexp(values, exponents, out=values)
        out[expert].copy_(values.reshape(rows, -1).t())
    return out
