"""Integer Linear schemes with compressed-tensors' numerics: W8A8 INT8 and W4A16 / W8A16 (group 128).

Scales follow compressed-tensors' ``calculate_qparams`` (see :mod:`quantport.formats.integer`):
symmetric ``scale = amax / ((2**bits - 1) / 2)`` (``/127.5`` for INT8, ``/7.5`` for INT4), asymmetric
``scale = (max - min) / (2**bits - 1)`` with an integer zero point, computed and stored in the weight's
dtype, which is the dtype vLLM's ``CompressedTensorsWNA16`` loads them into (so the engine decodes
exactly these weights). Decoding is ``(q - zp) * scale`` in the scale's dtype, as compressed-tensors'
``dequantize`` does.

Tensors (compressed-tensors names and layouts):

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
from dataclasses import dataclass

import torch
from torch import Tensor

from ..formats.integer import (
    dequantize_int_group_ct,
    fake_quantize_int8_per_token,
    int_group_qparams,
    pack_int4_ct,
    quantize_int_group_ct,
    unpack_int4_ct,
)
from ..recipes import LinearScheme
from . import DynamicActivations, TensorSpec, WeightOnly, register

__all__ = ["CT_GROUP", "CtInt8Codec", "CtIntGroupCodec", "pack_int_ct", "unpack_int_ct"]

CT_GROUP = 128
"""Group size (inputs per scale) of the W4A16 / W8A16 schemes."""

_SHIFTS8 = (0, 8, 16, 24)


def _check_bits(bits: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"only 4- and 8-bit packing is supported, got {bits}")


def pack_int_ct(codes: Tensor, bits: int, *, dim: int = -1) -> Tensor:
    """Pack signed ``bits``-bit codes ``[..., rows, cols]`` into int32 as compressed-tensors does.

    ``dim=-1`` packs along the last dim (``[..., rows, ceil(cols*bits/32)]``), ``dim=-2`` along the
    rows (zero points). 4-bit is :func:`quantport.formats.integer.pack_int4_ct`; 8-bit stores
    ``q + 128`` with element ``i`` of each word in bits ``8i..8i+7``.
    """
    _check_bits(bits)
    if bits == 4:
        return pack_int4_ct(codes, dim=dim)
    if codes.dim() < 2 or dim not in (-1, -2):
        raise ValueError("pack_int_ct: expected [..., rows, cols] codes and dim -1 or -2")
    if codes.numel() and (int(codes.min()) < -128 or int(codes.max()) > 127):
        raise ValueError("pack_int_ct: 8-bit codes must lie in [-128, 127]")
    v = codes.to(torch.int64) + 128
    if dim == -2:
        v = v.transpose(-1, -2)
    words = math.ceil(v.shape[-1] / 4)
    v = torch.nn.functional.pad(v, (0, words * 4 - v.shape[-1]))
    shifts = torch.tensor(_SHIFTS8, dtype=torch.int64, device=v.device)
    packed = (v.unflatten(-1, (words, 4)) << shifts).sum(dim=-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return (packed.transpose(-1, -2) if dim == -2 else packed).contiguous()


def unpack_int_ct(packed: Tensor, bits: int, length: int, *, dim: int = -1) -> Tensor:
    """Inverse of :func:`pack_int_ct`: int32 words -> int8 codes, ``length`` long along ``dim``."""
    _check_bits(bits)
    if bits == 4:
        return unpack_int4_ct(packed, length, dim=dim)
    if packed.dtype != torch.int32:
        raise TypeError(f"unpack_int_ct: packed must be torch.int32, got {packed.dtype}")
    w = packed.to(torch.int64) & 0xFFFFFFFF
    if dim == -2:
        w = w.transpose(-1, -2)
    if math.ceil(length / 4) != w.shape[-1]:
        raise ValueError(f"unpack_int_ct: {w.shape[-1]} words cannot hold {length} 8-bit values")
    shifts = torch.tensor(_SHIFTS8, dtype=torch.int64, device=w.device)
    out = (((w.unsqueeze(-1) >> shifts) & 0xFF).flatten(-2)[..., :length] - 128).to(torch.int8)
    return (out.transpose(-1, -2) if dim == -2 else out).contiguous()


@dataclass(frozen=True)
class CtInt8Codec(DynamicActivations):
    """W8A8 INT8 (compressed-tensors ``int-quantized``): per-channel weights, dynamic per-token inputs."""

    scheme: LinearScheme = LinearScheme.INT8
    modelopt_algo: str | None = None  # ModelOpt's INT8 algorithms use static or SmoothQuant activations
    input_multiple: int = 1
    static_input_scale: bool = False
    shared_weight_amax: bool = False
    group_size: int | None = None

    def weight_specs(
        self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16
    ) -> dict[str, TensorSpec]:
        return {
            "weight": TensorSpec(torch.int8, (out_features, in_features)),
            "weight_scale": TensorSpec(dtype, (out_features, 1)),
        }

    def quantize_weight(self, weight: Tensor, weight_amax: Tensor) -> dict[str, Tensor]:
        w = weight.detach()
        scale, _ = int_group_qparams(w, bits=8, group=w.shape[-1], symmetric=True)
        codes = quantize_int_group_ct(w, scale, bits=8, group=w.shape[-1])
        return {"weight": codes, "weight_scale": scale}

    def dequantize_weight(self, tensors: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        codes = tensors["weight"]
        return dequantize_int_group_ct(codes, tensors["weight_scale"], group=codes.shape[-1], dtype=dtype)

    def fake_quantize_input(self, x: Tensor, input_scale: Tensor | None) -> Tensor:
        return fake_quantize_int8_per_token(x)


@dataclass(frozen=True)
class CtIntGroupCodec(WeightOnly):
    """Weight-only INT4 / INT8 with one scale (and zero point, if asymmetric) per 128 inputs."""

    scheme: LinearScheme
    bits: int
    symmetric: bool
    modelopt_algo: str | None = None  # ModelOpt's INT4 layout and scales differ: see integer_modelopt.py
    input_multiple: int = CT_GROUP
    static_input_scale: bool = False
    shared_weight_amax: bool = False
    group_size: int | None = CT_GROUP

    def weight_specs(
        self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16
    ) -> dict[str, TensorSpec]:
        groups = in_features // CT_GROUP
        specs = {
            "weight_packed": TensorSpec(torch.int32, (out_features, math.ceil(in_features * self.bits / 32))),
            "weight_scale": TensorSpec(dtype, (out_features, groups)),
            "weight_shape": TensorSpec(torch.int64, (2,)),
        }
        if not self.symmetric:
            specs["weight_zero_point"] = TensorSpec(torch.int32, (math.ceil(out_features * self.bits / 32), groups))
        return specs

    def quantize_weight(self, weight: Tensor, weight_amax: Tensor) -> dict[str, Tensor]:
        w = weight.detach()
        scale, zero_point = int_group_qparams(w, bits=self.bits, group=CT_GROUP, symmetric=self.symmetric)
        if self.symmetric:
            zp = None
        else:
            empty = w.unflatten(-1, (-1, CT_GROUP)).abs().amax(dim=-1) == 0
            zp = torch.where(empty, torch.full_like(zero_point, -(2 ** (self.bits - 1))), zero_point)
        codes = quantize_int_group_ct(w, scale, zp, bits=self.bits, group=CT_GROUP)
        tensors = {
            "weight_packed": pack_int_ct(codes, self.bits),
            "weight_scale": scale,
            "weight_shape": torch.tensor(list(w.shape), dtype=torch.int64),
        }
        if zp is not None:
            tensors["weight_zero_point"] = pack_int_ct(zp, self.bits, dim=-2)
        return tensors

    def dequantize_weight(self, tensors: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        out_features, in_features = (int(v) for v in tensors["weight_shape"])
        codes = unpack_int_ct(tensors["weight_packed"], self.bits, in_features)
        packed_zp = tensors.get("weight_zero_point")
        zp = None if packed_zp is None else unpack_int_ct(packed_zp, self.bits, out_features, dim=-2)
        return dequantize_int_group_ct(codes, tensors["weight_scale"], zp, group=CT_GROUP, dtype=dtype)


register(CtInt8Codec())
register(CtIntGroupCodec(LinearScheme.W4A16, bits=4, symmetric=True))
register(CtIntGroupCodec(LinearScheme.W4A16_ASYM, bits=4, symmetric=False))
register(CtIntGroupCodec(LinearScheme.W8A16, bits=8, symmetric=True))
register(CtIntGroupCodec(LinearScheme.W8A16_ASYM, bits=8, symmetric=False))
