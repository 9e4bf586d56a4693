"""gpt-oss's native MXFP4 vocabulary (``quant_method: mxfp4``): fused expert parameter ``p`` of experts
module ``X`` stores its codes as ``X.p_blocks`` (uint8 ``[E, out, in/32, 16]``) and its E8M0 scales as
``X.p_scales`` (uint8 ``[E, out, in/32]``)."""

from __future__ import annotations

from collections.abc import Mapping

from ..formats.mx import MX_BLOCK
from ..formats.pieces import Piece
from ..recipes import LinearScheme

__all__ = ["PIECE_SUFFIXES", "SCHEME", "blocks_shape", "stored_name"]

SCHEME = LinearScheme.MXFP4
"""The scheme whose codec encodes and decodes native MXFP4 experts."""

PIECE_SUFFIXES: Mapping[Piece, str] = {Piece.CODES: "blocks", Piece.SCALE: "scales"}
"""The suffix of each stored piece."""


def stored_name(parameter: str, piece: Piece) -> str:
    """``gate_up_proj_blocks`` / ``gate_up_proj_scales`` (likewise ``down_proj``)."""
    return f"{parameter}_{PIECE_SUFFIXES[piece]}"


def blocks_shape(scale_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The stored codes' shape from the scales' ``[E, out, in/32]``: ``[E, out, in/32, 16]``."""
    return (*scale_shape, MX_BLOCK // 2)
