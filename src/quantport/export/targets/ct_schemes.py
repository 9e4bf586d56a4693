"""How each Linear scheme is described in a compressed-tensors checkpoint, as data.

One row per :class:`~quantport.recipes.LinearScheme` that compressed-tensors stores exactly: the
keyword arguments of compressed-tensors' ``QuantizationArgs`` for weights and input activations, the
``format`` compressed-tensors infers for them (checked against its own inference at export), and the
tensors whose compressed-tensors name differs from the codec's. Schemes not listed here have no
compressed-tensors form (their numerics would change in the last bit, or no reader accepts them).
Tensor layouts are the codecs'; :func:`ct_shape` reshapes the few that differ (scalars and FP8 grids).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ...recipes import LinearScheme

__all__ = ["CT_SCHEMES", "KV_CACHE_ARGS", "CtScheme", "ct_shape"]


@dataclass(frozen=True, slots=True)
class CtScheme:
    """A scheme's compressed-tensors description.

    Attributes:
        weights: ``QuantizationArgs`` keyword arguments of the weights.
        input_activations: ``QuantizationArgs`` keyword arguments of the inputs (None: weight-only).
        format: the ``CompressionFormat`` value compressed-tensors infers for the scheme.
        renames: codec tensor suffix -> compressed-tensors suffix, where they differ.
    """

    weights: Mapping[str, Any]
    input_activations: Mapping[str, Any] | None
    format: str
    renames: Mapping[str, str] = field(default_factory=dict)


_FP8 = {"num_bits": 8, "type": "float", "symmetric": True}
_NVFP4 = {
    "num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True,
    "scale_dtype": torch.float8_e4m3fn,
}  # fmt: skip
_NVFP4_WEIGHTS = {**_NVFP4, "dynamic": False}


def _int_group(bits: int, symmetric: bool) -> dict[str, Any]:
    return {
        "num_bits": bits,
        "type": "int",
        "strategy": "group",
        "group_size": 128,
        "symmetric": symmetric,
        "dynamic": False,
    }


CT_SCHEMES: dict[LinearScheme, CtScheme] = {
    LinearScheme.FP8: CtScheme(
        {**_FP8, "strategy": "tensor", "dynamic": False},
        {**_FP8, "strategy": "tensor", "dynamic": False},
        "float-quantized",
    ),
    LinearScheme.FP8_DYNAMIC: CtScheme(
        {**_FP8, "strategy": "channel", "dynamic": False},
        {**_FP8, "strategy": "token", "dynamic": True},
        "float-quantized",
    ),
    LinearScheme.FP8_BLOCK: CtScheme(
        {**_FP8, "strategy": "block", "block_structure": [128, 128], "dynamic": False}, None, "naive-quantized"
    ),
    LinearScheme.NVFP4_CT: CtScheme(
        _NVFP4_WEIGHTS,
        {**_NVFP4, "dynamic": "local"},
        "nvfp4-pack-quantized",
        {"input_scale": "input_global_scale"},
    ),
    LinearScheme.W4A16_NVFP4_CT: CtScheme(_NVFP4_WEIGHTS, None, "nvfp4-pack-quantized"),
    LinearScheme.MXFP4: CtScheme(
        {
            "num_bits": 4,
            "type": "float",
            "strategy": "group",
            "group_size": 32,
            "symmetric": True,
            "dynamic": False,
            "scale_dtype": torch.uint8,
            "zp_dtype": torch.uint8,
        },
        None,
        "mxfp4-pack-quantized",
    ),
    LinearScheme.INT8: CtScheme(
        {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True, "dynamic": False},
        {"num_bits": 8, "type": "int", "strategy": "token", "symmetric": True, "dynamic": True},
        "int-quantized",
    ),
    LinearScheme.W4A16: CtScheme(_int_group(4, True), None, "pack-quantized"),
    LinearScheme.W4A16_ASYM: CtScheme(_int_group(4, False), None, "pack-quantized"),
    LinearScheme.W8A16: CtScheme(_int_group(8, True), None, "pack-quantized"),
    LinearScheme.W8A16_ASYM: CtScheme(_int_group(8, False), None, "pack-quantized"),
}
"""Every scheme with a compressed-tensors form."""

KV_CACHE_ARGS: dict[str, Any] = {
    "num_bits": 8,
    "type": "float",
    "strategy": "tensor",
    "symmetric": True,
    "dynamic": False,
}
"""``kv_cache_scheme`` of an FP8 KV cache: one static per-tensor scale for keys and one for values."""


def ct_shape(suffix: str, shape: tuple[int, ...], out_features: int) -> tuple[int, ...]:
    """compressed-tensors' shape of a codec tensor: scalars become ``(1,)``, a per-channel
    ``weight_scale [out]`` becomes ``[out, 1]`` and ModelOpt's block grid ``[ob, 1, ib, 1]`` becomes
    ``[ob, ib]``; every other shape is already compressed-tensors'."""
    if not shape:
        return (1,)
    if suffix == "weight_scale" and shape == (out_features,):
        return (out_features, 1)
    if len(shape) == 4 and shape[1] == shape[3] == 1:
        return (shape[0], shape[2])
    return shape
