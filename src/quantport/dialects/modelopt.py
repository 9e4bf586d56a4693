"""ModelOpt's vocabulary: the ``quant_algo`` of each scheme and the names of a quantized weight's pieces.

One table (:data:`MODELOPT_ALGOS`) serves the exporter (scheme -> ``quant_algo`` and config group) and
the loader (:func:`scheme_for_algo`, its inverse). Per quantized Linear (or per-expert projection) ``P``:
``P.weight`` (codes), ``P.weight_scale``, ``P.weight_scale_2`` (global scale), ``P.input_scale``; fused
experts ``X`` store parameter ``p`` as ``X.p`` and ``X.p_weight_scale`` etc.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..errors import QuantportError
from ..formats.descriptors import NumericFormat
from ..formats.pieces import Piece
from ..recipes import LinearScheme
from ..schemes import codec_for

__all__ = [
    "ALGO_SCHEMES",
    "FP8_ARGS",
    "MODELOPT_ALGOS",
    "PIECE_NAMES",
    "ModeloptAlgo",
    "UnknownPieceError",
    "fused_name",
    "linear_suffix",
    "named_tensors",
    "numeric_format",
    "piece_of_suffix",
    "pieces_of",
    "quant_algo",
    "scheme_for_algo",
]

FP8_ARGS: Mapping[str, Any] = {"dynamic": False, "num_bits": 8, "type": "float"}
"""ModelOpt's per-tensor FP8 arguments (weights, inputs and the KV cache)."""
_NVFP4_ARGS = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}


class UnknownPieceError(QuantportError, KeyError):
    """A piece has no name in this dialect (the scheme's codec produces a piece the dialect cannot store)."""


@dataclass(frozen=True, slots=True)
class ModeloptAlgo:
    """How ModelOpt names a scheme.

    Attributes:
        quant_algo: the ``quant_algo`` string of both config files.
        config_group: ``group_0`` of the flat config's ``config_groups`` (``targets`` added), or None where
            ModelOpt writes no ``config_groups``.
    """

    quant_algo: str
    config_group: Mapping[str, Mapping[str, Any]] | None = None


MODELOPT_ALGOS: dict[LinearScheme, ModeloptAlgo] = {
    LinearScheme.FP8: ModeloptAlgo("FP8", {"input_activations": FP8_ARGS, "weights": FP8_ARGS}),
    LinearScheme.FP8_DYNAMIC: ModeloptAlgo("FP8_PER_CHANNEL_PER_TOKEN"),
    LinearScheme.FP8_BLOCK: ModeloptAlgo("FP8_PB_WO"),
    LinearScheme.NVFP4: ModeloptAlgo("NVFP4", {"input_activations": _NVFP4_ARGS, "weights": _NVFP4_ARGS}),
    LinearScheme.W4A16_NVFP4: ModeloptAlgo("W4A16_NVFP4", {"weights": _NVFP4_ARGS}),
    LinearScheme.MXFP8: ModeloptAlgo("MXFP8"),
    LinearScheme.W4A16_MODELOPT: ModeloptAlgo("W4A16_AWQ"),
    LinearScheme.W8A16_MODELOPT: ModeloptAlgo("W8A16"),
}
"""Every scheme with a ModelOpt form (what nvidia-modelopt 0.47 and quantport write). The others have none
an engine reads: the compressed-tensors numerics of NVFP4 and integers, and MXFP4, which ModelOpt writes
as a raw ``"mxfp4"`` algorithm no engine's ModelOpt reader accepts."""

ALGO_SCHEMES: Mapping[str, LinearScheme] = {algo.quant_algo: scheme for scheme, algo in MODELOPT_ALGOS.items()}
"""``quant_algo`` -> the scheme whose codec decodes it: the inverse of :data:`MODELOPT_ALGOS`."""

PIECE_NAMES: Mapping[Piece, str] = {
    Piece.CODES: "weight",
    Piece.SCALE: "weight_scale",
    Piece.GLOBAL_SCALE: "weight_scale_2",
    Piece.INPUT_SCALE: "input_scale",
}
"""The tensor suffix of each piece ModelOpt stores (no zero point, no shape)."""
_PIECES_BY_SUFFIX = {suffix: piece for piece, suffix in PIECE_NAMES.items()}


def quant_algo(scheme: LinearScheme) -> str | None:
    """ModelOpt's ``quant_algo`` of ``scheme``; None when ModelOpt has no form for it."""
    algo = MODELOPT_ALGOS.get(scheme)
    return None if algo is None else algo.quant_algo


def numeric_format(algo: str) -> NumericFormat | None:
    """The numeric format stored under ``quant_algo`` ``algo`` (exact spelling); None for other algorithms."""
    scheme = ALGO_SCHEMES.get(algo)
    return None if scheme is None else codec_for(scheme).format


def scheme_for_algo(algo: str) -> LinearScheme | None:
    """The scheme of ``quant_algo`` ``algo`` (case-insensitive); None when ModelOpt has no such algorithm."""
    return ALGO_SCHEMES.get(algo.upper())


def linear_suffix(piece: Piece) -> str:
    """The suffix of ``piece`` under a Linear's (or one expert's projection's) prefix."""
    try:
        return PIECE_NAMES[piece]
    except KeyError:
        raise UnknownPieceError(f"the ModelOpt format has no name for a {piece.value} tensor") from None


def fused_name(parameter: str, piece: Piece) -> str:
    """The name of ``piece`` of fused expert ``parameter`` (``gate_up_proj``, ``gate_up_proj_weight_scale``)."""
    return parameter if piece is Piece.CODES else f"{parameter}_{linear_suffix(piece)}"


def piece_of_suffix(suffix: str) -> Piece | None:
    """The piece stored under ``suffix`` (reader side); None for other tensors (``bias``, ``pre_quant_scale``)."""
    return _PIECES_BY_SUFFIX.get(suffix)


def named_tensors(pieces: Mapping[Piece, Tensor]) -> dict[str, Tensor]:
    """A Linear's pieces under ModelOpt's suffixes (``weight``, ``weight_scale``, ...)."""
    return {linear_suffix(piece): tensor for piece, tensor in pieces.items()}


def pieces_of(named: Mapping[str, Tensor]) -> dict[Piece, Tensor]:
    """The pieces among a Linear's stored tensors keyed by suffix (others, e.g. ``bias``, are left out)."""
    return {piece: tensor for suffix, tensor in named.items() if (piece := piece_of_suffix(suffix)) is not None}
