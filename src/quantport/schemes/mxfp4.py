"""MXFP4 weight-only Linear scheme (compressed-tensors ``mxfp4-pack-quantized``).

The numerics are :mod:`quantport.formats.mx` (nvidia-modelopt's MXFP4 rounding). Every decoded value is
an E2M1 value times a power of two, so compressed-tensors' decompressor (which decodes the E8M0 scale
to bfloat16) gives exactly these weights; the way the shared exponent is chosen is ours to pick.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels
from ..formats import mx
from ..formats.descriptors import NumericFormat
from ..recipes import LinearScheme
from . import TensorSpec, WeightOnly, register

__all__ = ["Mxfp4Codec"]


@dataclass(frozen=True)
class Mxfp4Codec(WeightOnly):
    """``weight_packed`` uint8 ``[out, in/2]`` (two E2M1 codes per byte, even column low), ``weight_scale``
    uint8 E8M0 ``[out, in/32]``; activations unquantized."""

    scheme: LinearScheme = LinearScheme.MXFP4
    format: NumericFormat = mx.MXFP4_WEIGHTS

    def weight_specs(
        self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16
    ) -> dict[str, TensorSpec]:
        return {
            "weight_packed": TensorSpec(torch.uint8, (out_features, in_features // 2)),
            "weight_scale": TensorSpec(torch.uint8, (out_features, in_features // mx.MX_BLOCK)),
        }

    def quantize_weight(self, weight: torch.Tensor, weight_amax: torch.Tensor) -> dict[str, torch.Tensor]:
        packed, scale = kernels.quantize_mxfp4(weight.detach())
        return {"weight_packed": packed, "weight_scale": scale}

    def dequantize_weight(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return mx.dequantize_mxfp4(tensors["weight_packed"], tensors["weight_scale"], dtype)


register(Mxfp4Codec())
