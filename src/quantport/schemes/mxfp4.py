"""MXFP4 weight-only Linear scheme (compressed-tensors ``mxfp4-pack-quantized``).

The numerics are :mod:`quantport.formats.mx` (nvidia-modelopt's MXFP4 rounding). Every decoded value is
an E2M1 value times a power of two, so compressed-tensors' decompressor (which decodes the E8M0 scale
to bfloat16) gives exactly these weights; the way the shared exponent is chosen is ours to pick.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .. import kernels
from ..formats import mx
from ..formats.descriptors import NumericFormat
from ..formats.pieces import Piece, QuantizedPieces
from ..recipes import LinearScheme
from .codec import TensorSpec, WeightOnly
from .registry import register

__all__ = ["Mxfp4Codec"]


@dataclass(frozen=True)
class Mxfp4Codec(WeightOnly):
    """Codes uint8 ``[out, in/2]`` (two E2M1 codes per byte, even column low), scale uint8 E8M0
    ``[out, in/32]``; activations unquantized."""

    scheme: LinearScheme = LinearScheme.MXFP4
    format: NumericFormat = mx.MXFP4_WEIGHTS

    def weight_specs(
        self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16
    ) -> dict[Piece, TensorSpec]:
        return {
            Piece.CODES: TensorSpec(torch.uint8, (out_features, in_features // 2)),
            Piece.SCALE: TensorSpec(torch.uint8, (out_features, in_features // mx.MX_BLOCK)),
        }

    def quantize_weight(self, weight: torch.Tensor, weight_amax: torch.Tensor) -> QuantizedPieces:
        packed, scale = kernels.quantize_mxfp4(weight.detach())
        return QuantizedPieces(packed, scale)

    def dequantize_weight(self, pieces: Mapping[Piece, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return mx.dequantize_mxfp4(pieces[Piece.CODES], pieces[Piece.SCALE], dtype)


register(Mxfp4Codec())
