"""Integer weight-only schemes in ModelOpt's unified-checkpoint layout (TensorRT-LLM); pieces by ModelOpt's names.

* ``w4a16-modelopt`` (``quant_algo: W4A16_AWQ``, ``group_size: 128``): ``weight`` uint8 ``[out/2, in]``
  with two INT4 codes per byte packed along the *output* dim (row ``2k`` in the low nibble), ``weight_scale``
  fp32 ``[out, in/128]`` = block amax / 7. Round to nearest: no AWQ smoothing, so no ``pre_quant_scale``.
* ``w8a16-modelopt`` (``quant_algo: W8A16``): ``weight`` int8 ``[out, in]``, ``weight_scale`` fp32 ``[out]``
  = channel amax / 127.

vLLM's ModelOpt reader rejects both algorithms; the compressed-tensors forms of these recipes
(:mod:`quantport.formats.integer_ct`) are the ones vLLM runs. The numerics are modelopt 0.47's export
arithmetic, from :mod:`quantport.formats.integer`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from .. import kernels
from ..recipes import LinearScheme
from ..schemes.codec import TensorSpec, WeightOnly
from ..schemes.registry import register
from . import integer
from .descriptors import NumericFormat, ScaleConvention
from .pieces import Piece, QuantizedPieces

__all__ = ["ModeloptInt4Codec", "ModeloptInt8WeightCodec"]


@dataclass(frozen=True)
class ModeloptInt4Codec(WeightOnly):
    """INT4 group-128 weights, ModelOpt ``W4A16_AWQ`` layout."""

    scheme: LinearScheme = LinearScheme.W4A16_MODELOPT
    format: NumericFormat = replace(
        integer.INT4_G128_WEIGHTS, scale_dtype=torch.float32, stacks=True, convention=ScaleConvention.RESTRICTED_FP32
    )

    def weight_specs(
        self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16
    ) -> dict[Piece, TensorSpec]:
        if out_features % 2:
            raise ValueError(f"W4A16_AWQ packs two output rows per byte; out_features {out_features} is odd")
        return {
            Piece.CODES: TensorSpec(torch.uint8, (out_features // 2, in_features)),
            Piece.SCALE: TensorSpec(torch.float32, (out_features, in_features // integer.INT4_GROUP)),
        }

    def quantize_weight(self, weight: torch.Tensor, weight_amax: torch.Tensor) -> QuantizedPieces:
        packed, scale = kernels.quantize_int4_modelopt(weight.detach(), integer.INT4_GROUP)
        return QuantizedPieces(packed, scale)

    def dequantize_weight(self, pieces: Mapping[Piece, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        codes = integer.unpack_int4_modelopt(pieces[Piece.CODES])
        return integer.dequantize_int4(codes, pieces[Piece.SCALE], dtype=dtype)


@dataclass(frozen=True)
class ModeloptInt8WeightCodec(WeightOnly):
    """INT8 per-channel weights, ModelOpt ``W8A16`` layout."""

    scheme: LinearScheme = LinearScheme.W8A16_MODELOPT
    format: NumericFormat = integer.INT8_PER_CHANNEL_WEIGHTS

    def weight_specs(
        self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16
    ) -> dict[Piece, TensorSpec]:
        return {
            Piece.CODES: TensorSpec(torch.int8, (out_features, in_features)),
            Piece.SCALE: TensorSpec(torch.float32, (out_features,)),
        }

    def quantize_weight(self, weight: torch.Tensor, weight_amax: torch.Tensor) -> QuantizedPieces:
        scale = integer.int8_scale_from_amax(weight.detach().abs().amax(dim=-1))
        return QuantizedPieces(integer.quantize_int8(weight.detach(), scale), scale)

    def dequantize_weight(self, pieces: Mapping[Piece, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return integer.dequantize_int8(pieces[Piece.CODES], pieces[Piece.SCALE], dtype)


register(ModeloptInt4Codec())
register(ModeloptInt8WeightCodec())
