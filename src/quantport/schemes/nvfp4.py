"""NVFP4 Linear schemes: W4A4 and weight-only W4A16."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import kernels
from ..formats import nvfp4
from ..recipes import LinearScheme
from . import TensorSpec, register

__all__ = ["Nvfp4Codec"]


@dataclass(frozen=True)
class Nvfp4Codec:
    """E2M1 weights, FP8 scale per 16 inputs, fp32 ``weight_scale_2``; optional NVFP4 activations."""

    stacks: ClassVar[bool] = True  # quantize_weight takes [E, out, in] stacks (quantizes_stacks)

    scheme: LinearScheme = LinearScheme.NVFP4
    modelopt_algo: str = "NVFP4"
    input_multiple: int = nvfp4.NVFP4_BLOCK
    static_input_scale: bool = True
    shared_weight_amax: bool = True  # engines fuse q/k/v and gate/up with one weight_scale_2
    group_size: int | None = nvfp4.NVFP4_BLOCK

    def weight_specs(
        self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16
    ) -> dict[str, TensorSpec]:
        block = nvfp4.NVFP4_BLOCK
        return {
            "weight": TensorSpec(torch.uint8, (out_features, in_features // 2)),
            "weight_scale": TensorSpec(torch.float8_e4m3fn, (out_features, in_features // block)),
            "weight_scale_2": TensorSpec(torch.float32, ()),
        }

    def quantize_weight(self, weight: torch.Tensor, weight_amax: torch.Tensor) -> dict[str, torch.Tensor]:
        global_scale = nvfp4.nvfp4_global_scale(weight_amax)
        packed, block_scale = kernels.quantize_nvfp4(weight, global_scale)
        return {"weight": packed, "weight_scale": block_scale, "weight_scale_2": global_scale}

    def dequantize_weight(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return nvfp4.dequantize_nvfp4(tensors["weight"], tensors["weight_scale"], tensors["weight_scale_2"], dtype)

    def input_scale(self, input_amax: torch.Tensor) -> torch.Tensor:
        return nvfp4.nvfp4_global_scale(input_amax)

    def fake_quantize_input(self, x: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
        if not self.static_input_scale:
            return x
        return nvfp4.fake_quantize_nvfp4(x, input_scale)


register(Nvfp4Codec())
register(Nvfp4Codec(scheme=LinearScheme.W4A16_NVFP4, modelopt_algo="W4A16_NVFP4", static_input_scale=False))
