"""FP8 E4M3 Linear schemes: per-tensor W8A8, per-channel weights with dynamic tokens, 128x128 blocks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .. import kernels
from ..formats import fp8
from ..formats.descriptors import NumericFormat
from ..formats.pieces import Piece, QuantizedPieces
from ..recipes import LinearScheme
from .codec import DynamicActivations, FormatCapabilities, TensorSpec, WeightOnly
from .registry import register

__all__ = ["Fp8BlockCodec", "Fp8DynamicCodec", "Fp8TensorCodec"]

_F32 = torch.float32
_FP8 = torch.float8_e4m3fn


@dataclass(frozen=True)
class Fp8TensorCodec(FormatCapabilities):
    """W8A8 FP8, static per-tensor scales (engines requantize fused shards to the max weight scale)."""

    scheme: LinearScheme = LinearScheme.FP8
    format: NumericFormat = fp8.FP8_PER_TENSOR_STATIC

    def weight_specs(
        self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16
    ) -> dict[Piece, TensorSpec]:
        return {Piece.CODES: TensorSpec(_FP8, (out_features, in_features)), Piece.SCALE: TensorSpec(_F32, ())}

    def quantize_weight(self, weight: torch.Tensor, weight_amax: torch.Tensor) -> QuantizedPieces:
        scale = fp8.fp8_scale_from_amax(weight_amax)
        # weight_amax is the weight's own (or a larger shared) amax of finite weights: in range.
        return QuantizedPieces(kernels.quantize_fp8_per_tensor(weight, scale, in_range=True), scale)

    def dequantize_weight(self, pieces: Mapping[Piece, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return fp8.dequantize_fp8(pieces[Piece.CODES], pieces[Piece.SCALE], dtype)

    def input_scale(self, input_amax: torch.Tensor) -> torch.Tensor:
        return fp8.fp8_scale_from_amax(input_amax)

    def fake_quantize_input(self, x: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
        return fp8.fake_quantize_fp8(x, input_scale)


@dataclass(frozen=True)
class Fp8DynamicCodec(DynamicActivations):
    """FP8 weights with one scale per output channel, dynamic per-token FP8 activations."""

    scheme: LinearScheme = LinearScheme.FP8_DYNAMIC
    format: NumericFormat = fp8.FP8_PER_CHANNEL_DYNAMIC

    def weight_specs(
        self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16
    ) -> dict[Piece, TensorSpec]:
        return {
            Piece.CODES: TensorSpec(_FP8, (out_features, in_features)),
            Piece.SCALE: TensorSpec(_F32, (out_features,)),
        }

    def quantize_weight(self, weight: torch.Tensor, weight_amax: torch.Tensor) -> QuantizedPieces:
        channel_amax = weight.abs().amax(dim=1).float()
        scale = fp8.fp8_scale_from_amax(channel_amax)
        return QuantizedPieces(fp8.quantize_fp8_per_channel(weight, scale), scale)

    def dequantize_weight(self, pieces: Mapping[Piece, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return fp8.dequantize_fp8(pieces[Piece.CODES], pieces[Piece.SCALE], dtype)

    def fake_quantize_input(self, x: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
        return fp8.fake_quantize_fp8_per_token(x)


@dataclass(frozen=True)
class Fp8BlockCodec(WeightOnly):
    """FP8 weights with one scale per 128x128 block, activations unquantized."""

    scheme: LinearScheme = LinearScheme.FP8_BLOCK
    format: NumericFormat = fp8.FP8_BLOCK_WEIGHTS

    def weight_specs(
        self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16
    ) -> dict[Piece, TensorSpec]:
        return {
            Piece.CODES: TensorSpec(_FP8, (out_features, in_features)),
            Piece.SCALE: TensorSpec(_F32, fp8.fp8_block_scale_shape(out_features, in_features)),
        }

    def quantize_weight(self, weight: torch.Tensor, weight_amax: torch.Tensor) -> QuantizedPieces:
        codes, scale = fp8.quantize_fp8_block(weight)
        return QuantizedPieces(codes, scale)

    def dequantize_weight(self, pieces: Mapping[Piece, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return fp8.dequantize_fp8(pieces[Piece.CODES], pieces[Piece.SCALE], dtype)


register(Fp8TensorCodec())
register(Fp8DynamicCodec())
register(Fp8BlockCodec())
