"""compressed-tensors' vocabulary: each scheme's ``QuantizationArgs``, its pieces' names and shapes, and the
way back from stored arguments to a scheme.

One row per :class:`~quantport.recipes.LinearScheme` that compressed-tensors stores exactly
(:data:`CT_SCHEMES`), derived from the scheme's numeric format descriptor (:func:`ct_scheme_of`): the
keyword arguments of compressed-tensors' ``QuantizationArgs`` for weights and input activations and the
``format`` compressed-tensors infers for them (the exporter checks it against compressed-tensors' own
inference). The loader's reverse lookup (:func:`scheme_for_args`) is derived
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

from ..formats.descriptors import ActivationQuant, Element, NumericFormat, ScaleConvention, ScaleGranularity, ScaleType
from ..formats.pieces import Piece
from ..recipes import LinearScheme
from ..schemes import CODECS, codec_for

__all__ = [
    "CT_SCHEMES",
    "KV_CACHE_ARGS",
    "CtScheme",
    "InputKey",
    "WeightKey",
    "ct_scheme_of",
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


_STORED_CONVENTIONS = (None, ScaleConvention.DIVISOR, ScaleConvention.HALF_STEP_MODEL_DTYPE)
"""The scale conventions compressed-tensors decodes (its ``calculate_qparams`` / ``dequantize``)."""
_ELEMENTS: Mapping[Element, tuple[str, int]] = {
    Element.FP8_E4M3: ("float", 8),
    Element.E2M1: ("float", 4),
    Element.INT8: ("int", 8),
    Element.INT4: ("int", 4),
}
_STRATEGIES: Mapping[ScaleGranularity, str] = {
    ScaleGranularity.TENSOR: "tensor",
    ScaleGranularity.CHANNEL: "channel",
    ScaleGranularity.GROUP: "group",
    ScaleGranularity.BLOCK_2D: "block",
}


def _weight_args(fmt: NumericFormat) -> dict[str, Any]:
    kind, bits = _ELEMENTS[fmt.element]
    args: dict[str, Any] = {"num_bits": bits, "type": kind, "strategy": _STRATEGIES[fmt.granularity]}
    if fmt.granularity is ScaleGranularity.BLOCK_2D:
        args["block_structure"] = [fmt.block_size, fmt.block_size]
    elif fmt.granularity is ScaleGranularity.GROUP:
        args["group_size"] = fmt.block_size
    if fmt.global_scale:  # NVFP4: FP8 group scales under a global scale
        args |= {"strategy": "tensor_group", "scale_dtype": fmt.scale_dtype}
    if fmt.scale_type is ScaleType.E8M0:
        args |= {"scale_dtype": torch.uint8, "zp_dtype": torch.uint8}
    return args | {"symmetric": fmt.symmetric, "dynamic": False}


def _input_args(fmt: NumericFormat, weights: Mapping[str, Any]) -> dict[str, Any] | None:
    if fmt.activations is ActivationQuant.NONE:
        return None
    if weights["strategy"] == "tensor_group":  # NVFP4 activations: static global scale, local block scales
        return {**weights, "dynamic": "local"}
    static = fmt.activations is ActivationQuant.STATIC
    base = {key: weights[key] for key in ("num_bits", "type")}
    return base | {"symmetric": True, "strategy": "tensor" if static else "token", "dynamic": not static}


def _compression_format(fmt: NumericFormat) -> str:
    """The ``CompressionFormat`` compressed-tensors infers, in its priority order (``infer_module_format``)."""
    if fmt.element is Element.E2M1:
        return "mxfp4-pack-quantized" if fmt.scale_type is ScaleType.E8M0 else "nvfp4-pack-quantized"
    activations = fmt.activations is not ActivationQuant.NONE
    if fmt.element in (Element.INT8, Element.INT4):
        return "int-quantized" if activations else "pack-quantized"
    return "float-quantized" if activations else "naive-quantized"


def ct_scheme_of(fmt: NumericFormat) -> CtScheme | None:
    """The compressed-tensors description of numeric format ``fmt``, derived from its descriptor; None where
    compressed-tensors decodes other numbers (ModelOpt's scale conventions) or quantport writes no such form
    (MXFP8: E8M0-scaled FP8, ``mxfp8-quantized``, has no round trip tested against compressed-tensors)."""
    if fmt.convention not in _STORED_CONVENTIONS:
        return None
    if fmt.element is Element.FP8_E4M3 and fmt.scale_type is ScaleType.E8M0:
        return None
    weights = _weight_args(fmt)
    return CtScheme(weights, _input_args(fmt, weights), _compression_format(fmt))


CT_SCHEMES: dict[LinearScheme, CtScheme] = {
    scheme: row
    for scheme in LinearScheme
    if scheme in CODECS and (row := ct_scheme_of(codec_for(scheme).format)) is not None
}
"""Every scheme with a compressed-tensors form, in :class:`LinearScheme` order (derived: a new numeric format
needs no row here)."""

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
