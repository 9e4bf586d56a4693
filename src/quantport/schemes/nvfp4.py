"""NVFP4 Linear schemes: W4A4 and weight-only W4A16, in both global-scale conventions.

The numerics are :mod:`quantport.formats.nvfp4`, whose ``convention`` parameter picks ModelOpt's
multiplier (``amax / 2688``) or compressed-tensors' divisor (``2688 / amax``) global scale. A model meant
for compressed-tensors is quantized with the divisor from the start (the ``nvfp4`` recipe resolves to
:attr:`~quantport.recipes.LinearScheme.NVFP4_CT` for that dialect): converting afterwards would change
decoded weights in the last bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from .. import kernels
from ..formats import nvfp4
from ..formats.descriptors import ActivationQuant, NumericFormat, ScaleConvention
from ..formats.pieces import Piece, QuantizedPieces
from ..recipes import LinearScheme
from .codec import FormatCapabilities, TensorSpec
from .registry import register

__all__ = ["NVFP4_DIVISOR", "Nvfp4Codec", "Nvfp4CtCodec"]

NVFP4_DIVISOR = replace(nvfp4.NVFP4, convention=ScaleConvention.DIVISOR, stacks=False)
"""NVFP4 W4A4 with compressed-tensors' divisor global scale."""
_WEIGHT_ONLY = ActivationQuant.NONE


class _Nvfp4Activations(FormatCapabilities):
    def input_scale(self, input_amax: torch.Tensor) -> torch.Tensor:
        """The activation global scale in the format's convention (fp32, same shape as ``input_amax``)."""
        return nvfp4.nvfp4_global_scale(input_amax, self.format.convention)

    def fake_quantize_input(self, x: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
        if not self.format.needs_calibration:
            return x
        if input_scale is None:
            raise ValueError("NVFP4 activations need the calibrated input global scale")
        return nvfp4.fake_quantize_nvfp4(x, input_scale, self.format.convention)


@dataclass(frozen=True)
class Nvfp4Codec(_Nvfp4Activations):
    """E2M1 weights, FP8 scale per 16 inputs, fp32 0-d multiplier global scale (``amax / 2688``)."""

    scheme: LinearScheme = LinearScheme.NVFP4
    format: NumericFormat = nvfp4.NVFP4

    def weight_specs(
        self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16
    ) -> dict[Piece, TensorSpec]:
        block = nvfp4.NVFP4_BLOCK
        return {
            Piece.CODES: TensorSpec(torch.uint8, (out_features, in_features // 2)),
            Piece.SCALE: TensorSpec(torch.float8_e4m3fn, (out_features, in_features // block)),
            Piece.GLOBAL_SCALE: TensorSpec(torch.float32, ()),
        }

    def quantize_weight(self, weight: torch.Tensor, weight_amax: torch.Tensor) -> QuantizedPieces:
        global_scale = nvfp4.nvfp4_global_scale(weight_amax)
        packed, block_scale = kernels.quantize_nvfp4(weight, global_scale)
        return QuantizedPieces(packed, block_scale, global_scale)

    def dequantize_weight(self, pieces: Mapping[Piece, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return nvfp4.dequantize_nvfp4(pieces[Piece.CODES], pieces[Piece.SCALE], pieces[Piece.GLOBAL_SCALE], dtype)


@dataclass(frozen=True)
class Nvfp4CtCodec(_Nvfp4Activations):
    """E2M1 weights, FP8 scale per 16 inputs, fp32 divisor global scale ``(1,)`` (``2688 / amax``); the input
    scale is the divisor activation global scale."""

    scheme: LinearScheme = LinearScheme.NVFP4_CT
    format: NumericFormat = NVFP4_DIVISOR

    def weight_specs(
        self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16
    ) -> dict[Piece, TensorSpec]:
        return {
            Piece.CODES: TensorSpec(torch.uint8, (out_features, in_features // 2)),
            Piece.SCALE: TensorSpec(torch.float8_e4m3fn, (out_features, in_features // nvfp4.NVFP4_BLOCK)),
            Piece.GLOBAL_SCALE: TensorSpec(torch.float32, (1,)),
        }

    def quantize_weight(self, weight: torch.Tensor, weight_amax: torch.Tensor) -> QuantizedPieces:
        global_scale = nvfp4.nvfp4_global_scale(weight_amax, ScaleConvention.DIVISOR).reshape(1)
        packed, block_scale = nvfp4.quantize_nvfp4(weight, global_scale, ScaleConvention.DIVISOR)
        return QuantizedPieces(packed, block_scale, global_scale)

    def dequantize_weight(self, pieces: Mapping[Piece, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return nvfp4.dequantize_nvfp4(
            pieces[Piece.CODES],
            pieces[Piece.SCALE],
            pieces[Piece.GLOBAL_SCALE],
            dtype,
            ScaleConvention.DIVISOR,
        )


register(Nvfp4Codec())
register(Nvfp4Codec(LinearScheme.W4A16_NVFP4, replace(nvfp4.NVFP4, activations=_WEIGHT_ONLY)))
register(Nvfp4CtCodec())
register(Nvfp4CtCodec(LinearScheme.W4A16_NVFP4_CT, replace(NVFP4_DIVISOR, activations=_WEIGHT_ONLY)))
