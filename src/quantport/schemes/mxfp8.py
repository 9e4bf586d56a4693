"""MXFP8 Linear scheme: FP8 E4M3 weights and activations with an E8M0 scale per 32 inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats import mx
from ..formats.descriptors import NumericFormat
from ..recipes import LinearScheme
from . import DynamicActivations, TensorSpec, register

__all__ = ["Mxfp8Codec"]


@dataclass(frozen=True)
class Mxfp8Codec(DynamicActivations):
    """MXFP8 W8A8; activations are quantized dynamically per 32-block."""

    scheme: LinearScheme = LinearScheme.MXFP8
    format: NumericFormat = mx.MXFP8_DYNAMIC

    def weight_specs(
        self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16
    ) -> dict[str, TensorSpec]:
        return {
            "weight": TensorSpec(torch.float8_e4m3fn, (out_features, in_features)),
            "weight_scale": TensorSpec(torch.uint8, (out_features, in_features // mx.MX_BLOCK)),
        }

    def quantize_weight(self, weight: torch.Tensor, weight_amax: torch.Tensor) -> dict[str, torch.Tensor]:
        codes, scale = mx.quantize_mxfp8(weight)
        return {"weight": codes, "weight_scale": scale}

    def dequantize_weight(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return mx.dequantize_mxfp8(tensors["weight"], tensors["weight_scale"], dtype)

    def fake_quantize_input(self, x: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
        return mx.fake_quantize_mxfp8(x)


register(Mxfp8Codec())
