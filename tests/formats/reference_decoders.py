"""Decoders that are not quantport's: compressed-tensors' ``dequantize`` and decompressors.

Format tests decode what quantport encoded with these, so a mistake shared by an encoder and its own
decoder (a wrong scale, a swapped nibble) cannot cancel out.
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.quantization import QuantizationArgs, preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import dequantize

__all__ = ["decode_fp8", "decode_mxfp4", "decode_mxfp8", "decode_nvfp4_multiplier"]


def decode_fp8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 weights from FP8 codes ``[out, in]`` and a per-tensor (0-d or 1 element), per-channel ``[out]``
    or 128x128 block scale (``[ob, ib]`` or ModelOpt's ``[ob, 1, ib, 1]``), by compressed-tensors."""
    scale = scale.float()
    if scale.numel() == 1:
        args = QuantizationArgs(num_bits=8, type="float", strategy="tensor")
        scale = scale.reshape(1)
    elif scale.dim() == 1:
        args = QuantizationArgs(num_bits=8, type="float", strategy="channel")
        scale = scale.reshape(-1, 1)
    else:
        args = QuantizationArgs(num_bits=8, type="float", strategy="block", block_structure=[128, 128])
        scale = scale.reshape(scale.shape[0], -1) if scale.dim() == 2 else scale[:, 0, :, 0]
    return dequantize(codes, scale, args=args, dtype=torch.float32)


def decode_mxfp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """bf16 weights from packed MXFP4 ``[out, in/2]`` and E8M0 scales ``[out, in/32]``, by compressed-tensors."""
    tensors = {"weight_packed": packed, "weight_scale": scale}
    return MXFP4PackedCompressor.decompress(tensors, preset_name_to_scheme("MXFP4A16", ["Linear"]))["weight"]


def decode_mxfp8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 weights from FP8 codes ``[out, in]`` and E8M0 scales ``[out, in/32]``, by hand from the OCP MX
    definition (``code * 2 ** (byte - 127)``), not quantport's decoder."""
    step = torch.exp2(scale.to(torch.float32) - 127).repeat_interleave(32, dim=-1)
    return codes.to(torch.float32) * step


def decode_nvfp4_multiplier(
    packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor
) -> torch.Tensor:
    """bf16 weights from ModelOpt-convention NVFP4 (``weight_scale_2 = amax / 2688``), by compressed-tensors'
    decompressor with the reciprocal global scale (the conversion compressed-tensors' own ModelOpt converter
    makes; it can differ from the exact decode in the last bit of bf16)."""
    tensors = {
        "weight_packed": packed,
        "weight_scale": block_scale,
        "weight_global_scale": (1.0 / global_scale.float()).reshape(1),
    }
    return NVFP4PackedCompressor.decompress(tensors, preset_name_to_scheme("NVFP4A16", ["Linear"]))["weight"]
