"""compressed-tensors' vocabulary: each scheme's ``QuantizationArgs``, its pieces' names and shapes, and the
way back from stored arguments to a scheme.

One row per :class:`~quantport.recipes.LinearScheme` that compressed-tensors stores exactly
(:data:`CT_SCHEMES`): the keyword arguments of compressed-tensors' ``QuantizationArgs`` for weights and
input activations and the ``format`` compressed-tensors infers for them (the exporter checks it against
compressed-tensors' own inference). The loader's reverse lookup (:func:`scheme_for_args`) is derived
from the same rows. Tensor names follow from the row (:meth:`CtScheme.suffix`): codes are
``weight_packed`` in the ``*pack-quantized`` formats and ``weight`` otherwise; ``weight_scale``,
``weight_global_scale``, ``weight_zero_point``, ``weight_shape``; the activation scale is
``input_global_scale`` where the weights have a global scale (NVFP4) and ``input_scale`` otherwise.
Layouts are the codecs', except the few :func:`ct_shape` changes (scalars, per-channel scales, FP8 grids).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..formats.pieces import Piece
from ..recipes import LinearScheme

__all__ = [
    "CT_SCHEMES",
    "KV_CACHE_ARGS",
    "CtScheme",
    "InputKey",
    "WeightKey",
    "ct_shape",
    "input_key",
    "schemes_by_args",
    "weight_key",
]

_WEIGHT_PIECE_NAMES: Mapping[Piece, str] = {
    Piece.SCALE: "weight_scale",
    Piece.GLOBAL_SCALE: "weight_global_scale",
    Piece.ZERO_POINT: "weight_zero_point",
    Piece.SHAPE: "weight_shape",
}


@dataclass(frozen=True, slots=True)
class CtScheme:
    """A scheme's compressed-tensors description.

    Attributes:
        weights: ``QuantizationArgs`` keyword arguments of the weights.
        input_activations: ``QuantizationArgs`` keyword arguments of the inputs (None: weight-only).
        format: the ``CompressionFormat`` value compressed-tensors infers for the scheme.
    """

    weights: Mapping[str, Any]
    input_activations: Mapping[str, Any] | None
    format: str

    @property
    def packed(self) -> bool:
        """Whether the codes are stored as ``weight_packed`` (the ``*pack-quantized`` formats)."""
        return self.format.endswith("pack-quantized")

    @property
    def global_scales(self) -> bool:
        """Whether the scheme has a per-tensor global scale (``tensor_group`` weights: NVFP4), whose
        activation scale compressed-tensors stores as ``input_global_scale``."""
        return self.weights.get("strategy") == "tensor_group"

    def suffix(self, piece: Piece) -> str:
        """The tensor suffix of ``piece`` under a module's prefix."""
        if piece is Piece.CODES:
            return "weight_packed" if self.packed else "weight"
        if piece is Piece.INPUT_SCALE:
            return "input_global_scale" if self.global_scales else "input_scale"
        return _WEIGHT_PIECE_NAMES[piece]

    def named_tensors(self, pieces: Mapping[Piece, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A module's pieces under this scheme's suffixes (shapes unchanged: see :func:`ct_shape`)."""
        return {self.suffix(piece): tensor for piece, tensor in pieces.items()}

    def pieces_of(self, named: Mapping[str, torch.Tensor]) -> dict[Piece, torch.Tensor]:
        """The pieces among a module's stored tensors keyed by suffix (other tensors are left out)."""
        by_suffix = {self.suffix(piece): piece for piece in Piece}
        return {by_suffix[suffix]: tensor for suffix, tensor in named.items() if suffix in by_suffix}


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


def ct_shape(piece: Piece, shape: tuple[int, ...], out_features: int) -> tuple[int, ...]:
    """compressed-tensors' shape of a codec piece: scalars become ``(1,)``, a per-channel scale ``[out]``
    becomes ``[out, 1]`` and the FP8 block grid ``[ob, 1, ib, 1]`` becomes ``[ob, ib]``; every other shape is
    already compressed-tensors'."""
    if not shape:
        return (1,)
    if piece is Piece.SCALE and shape == (out_features,):
        return (out_features, 1)
    if len(shape) == 4 and shape[1] == shape[3] == 1:
        return (shape[0], shape[2])
    return shape


WeightKey = tuple[str, int, str, int | None, bool]
"""(type, num_bits, strategy, group_size, symmetric) of a group's weight arguments."""
InputKey = tuple[str, int, str, bool | str] | None
"""(type, num_bits, strategy, dynamic) of a group's input-activation arguments; None: weight-only."""


def weight_key(args: Mapping[str, Any]) -> WeightKey:
    """The fields of weight arguments that pick a scheme (a block other than 128x128 gets group -1)."""
    strategy = str(args.get("strategy"))
    group = args.get("group_size") if strategy in ("group", "tensor_group") else None
    if strategy == "block" and args.get("block_structure") not in ([128, 128], (128, 128)):
        group = -1  # no scheme has other blocks
    return (str(args.get("type")), args.get("num_bits"), strategy, group, bool(args.get("symmetric", True)))


def input_key(args: Mapping[str, Any] | None) -> InputKey:
    """The fields of input-activation arguments that pick a scheme; None for weight-only."""
    if args is None:
        return None
    return (str(args.get("type")), args.get("num_bits"), str(args.get("strategy")), args.get("dynamic"))


def schemes_by_args() -> dict[WeightKey, dict[InputKey, LinearScheme]]:
    """Weight arguments -> (input arguments -> scheme), from :data:`CT_SCHEMES` in its order: the first
    scheme of a weight key decodes the weights when the stored input arguments are not listed."""
    table: dict[WeightKey, dict[InputKey, LinearScheme]] = {}
    for scheme, row in CT_SCHEMES.items():
        table.setdefault(weight_key(row.weights), {})[input_key(row.input_activations)] = scheme
    return table
