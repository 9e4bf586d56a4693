"""MXFP8 Linear scheme: FP8 E4M3 weights and activations with an E8M0 scale per 32 inputs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..formats import mx
from ..formats.descriptors import NumericFormat
from ..formats.pieces import Piece, QuantizedPieces
from ..recipes import LinearScheme
from .codec import DynamicActivations, TensorSpec
from .registry import register

__all__ = ["Mxfp8Codec"]


@dataclass(frozen=True)
class Mxfp8Codec(DynamicActivations):
    """MXFP8 W8A8; activations are quantized dynamically per 32-block."""

    scheme: LinearScheme = LinearScheme.MXFP8
    format: NumericFormat = mx.MXFP8_DYNAMIC

    def weight_specs(
        self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16
    ) -> dict[Piece, TensorSpec]:
        return {
            Piece.CODES: TensorSpec(torch.float8_e4m3fn, (out_features, in_features)),
            Piece.SCALE: TensorSpec(torch.uint8, (out_features, in_features // mx.MX_BLOCK)),
        }

    def quantize_weight(self, weight: torch.Tensor, weight_amax: torch.Tensor) -> QuantizedPieces:
        codes, scale = mx.quantize_mxfp8(weight)
        return QuantizedPieces(codes, scale)

    def dequantize_weight(self, pieces: Mapping[Piece, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return mx.dequantize_mxfp8(pieces[Piece.CODES], pieces[Piece.SCALE], dtype)

    def fake_quantize_input(self, x: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
        return mx.fake_quantize_mxfp8(x)


register(Mxfp8Codec())
