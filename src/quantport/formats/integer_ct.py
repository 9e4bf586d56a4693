"""Integer Linear scheme codecs with compressed-tensors' numerics: W8A8 INT8 and W4A16 / W8A16 (group 128).

Scales follow compressed-tensors' ``calculate_qparams`` (see :mod:`quantport.formats.integer`):
symmetric ``scale = amax / ((2**bits - 1) / 2)`` (``/127.5`` for INT8, ``/7.5`` for INT4), asymmetric
``scale = (max - min) / (2**bits - 1)`` with an integer zero point, computed and stored in the weight's
dtype, which is the dtype vLLM's ``CompressedTensorsWNA16`` loads them into (so the engine decodes
exactly these weights). Decoding is ``(q - zp) * scale`` in the scale's dtype, as compressed-tensors'
``dequantize`` does.

Pieces, by the names compressed-tensors stores them under (:mod:`quantport.dialects.compressed_tensors`):

* ``int8`` (``int-quantized``): ``weight`` int8 ``[out, in]``, ``weight_scale`` ``[out, 1]``.
* ``w4a16`` / ``w8a16`` (``pack-quantized``): ``weight_packed`` int32 ``[out, in*bits/32]`` (offset
  binary ``q + 2**(bits-1)``, element ``i`` of a word in bits ``i*bits``...), ``weight_scale``
  ``[out, in/128]``, ``weight_shape`` int64 ``[2]``; asymmetric also ``weight_zero_point`` int32
  ``[ceil(out*bits/32), in/128]`` (packed along the output dim).

One deviation from compressed-tensors: an asymmetric group that is all zeros gets zero point ``qmin``
(it decodes to zeros) where compressed-tensors computes the zero point from ``0/0``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..recipes import LinearScheme
from ..schemes.codec import DynamicActivations, TensorSpec, WeightOnly
from ..schemes.registry import register
from .descriptors import Element, NumericFormat
from .integer import (
    INT4_G128_WEIGHTS,
    INT8_G128_WEIGHTS,
    INT8_PER_CHANNEL_DYNAMIC,
    dequantize_int_group_ct,
    fake_quantize_int8_per_token,
    int_group_qparams,
    pack_int_ct,
    quantize_int_group_ct,
    unpack_int_ct,
)
from .pieces import Piece, QuantizedPieces

__all__ = ["CT_GROUP", "CtInt8Codec", "CtIntGroupCodec"]

CT_GROUP = 128
"""Group size (inputs per scale) of the W4A16 / W8A16 schemes."""


@dataclass(frozen=True)
class CtInt8Codec(DynamicActivations):
    """W8A8 INT8 (compressed-tensors ``int-quantized``): per-channel weights, dynamic per-token inputs."""

    scheme: LinearScheme = LinearScheme.INT8
    format: NumericFormat = INT8_PER_CHANNEL_DYNAMIC

    def weight_specs(
        self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16
    ) -> dict[Piece, TensorSpec]:
        return {
            Piece.CODES: TensorSpec(torch.int8, (out_features, in_features)),
            Piece.SCALE: TensorSpec(dtype, (out_features, 1)),
        }

    def quantize_weight(self, weight: Tensor, weight_amax: Tensor) -> QuantizedPieces:
        w = weight.detach()
        scale, _ = int_group_qparams(w, bits=8, group=w.shape[-1], symmetric=True)
        codes = quantize_int_group_ct(w, scale, bits=8, group=w.shape[-1])
        return QuantizedPieces(codes, scale)

    def dequantize_weight(self, pieces: Mapping[Piece, Tensor], dtype: torch.dtype) -> Tensor:
        codes = pieces[Piece.CODES]
        return dequantize_int_group_ct(codes, pieces[Piece.SCALE], group=codes.shape[-1], dtype=dtype)

    def fake_quantize_input(self, x: Tensor, input_scale: Tensor | None) -> Tensor:
        return fake_quantize_int8_per_token(x)


@dataclass(frozen=True)
class CtIntGroupCodec(WeightOnly):
    """Weight-only INT4 / INT8 with one scale (and zero point, if asymmetric) per 128 inputs."""

    scheme: LinearScheme
    format: NumericFormat

    @property
    def bits(self) -> int:
        return 4 if self.format.element is Element.INT4 else 8

    @property
    def symmetric(self) -> bool:
        return self.format.symmetric

    def weight_specs(
        self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16
    ) -> dict[Piece, TensorSpec]:
        groups = in_features // CT_GROUP
        specs = {
            Piece.CODES: TensorSpec(torch.int32, (out_features, math.ceil(in_features * self.bits / 32))),
            Piece.SCALE: TensorSpec(dtype, (out_features, groups)),
            Piece.SHAPE: TensorSpec(torch.int64, (2,)),
        }
        if not self.symmetric:
            specs[Piece.ZERO_POINT] = TensorSpec(torch.int32, (math.ceil(out_features * self.bits / 32), groups))
        return specs

    def quantize_weight(self, weight: Tensor, weight_amax: Tensor) -> QuantizedPieces:
        w = weight.detach()
        scale, zero_point = int_group_qparams(w, bits=self.bits, group=CT_GROUP, symmetric=self.symmetric)
        if self.symmetric:
            zp = None
        else:
            empty = w.unflatten(-1, (-1, CT_GROUP)).abs().amax(dim=-1) == 0
            zp = torch.where(empty, torch.full_like(zero_point, -(2 ** (self.bits - 1))), zero_point)
        codes = quantize_int_group_ct(w, scale, zp, bits=self.bits, group=CT_GROUP)
        return QuantizedPieces(
            pack_int_ct(codes, self.bits),
            scale,
            zero_point=None if zp is None else pack_int_ct(zp, self.bits, dim=-2),
            shape=torch.tensor(list(w.shape), dtype=torch.int64),
        )

    def dequantize_weight(self, pieces: Mapping[Piece, Tensor], dtype: torch.dtype) -> Tensor:
        out_features, in_features = (int(v) for v in pieces[Piece.SHAPE])
        codes = unpack_int_ct(pieces[Piece.CODES], self.bits, in_features)
        packed_zp = pieces.get(Piece.ZERO_POINT)
        zp = None if packed_zp is None else unpack_int_ct(packed_zp, self.bits, out_features, dim=-2)
        return dequantize_int_group_ct(codes, pieces[Piece.SCALE], zp, group=CT_GROUP, dtype=dtype)


register(CtInt8Codec())
register(CtIntGroupCodec(LinearScheme.W4A16, INT4_G128_WEIGHTS))
register(CtIntGroupCodec(LinearScheme.W4A16_ASYM, replace(INT4_G128_WEIGHTS, symmetric=False)))
register(CtIntGroupCodec(LinearScheme.W8A16, INT8_G128_WEIGHTS))
register(CtIntGroupCodec(LinearScheme.W8A16_ASYM, replace(INT8_G128_WEIGHTS, symmetric=False)))
