"""Scheme codecs: the bridge between a :class:`~quantport.recipes.LinearScheme` and tensors.

A codec turns a Linear's weight and calibration statistics into neutral pieces
(:class:`~quantport.formats.pieces.QuantizedPieces`: codes, scale, global scale, zero point, shape),
turns pieces back into a dense weight, and fake-quantizes activations. Each codec lives beside its numerics
in its format's file in :mod:`quantport.formats` and only calls those pure functions (weights through
:mod:`quantport.kernels`, which runs them, or on CUDA a kernel proven to return the same bytes), so what the
simulated model computes is what is exported, bit for bit. Which tensor names, shapes and config strings
the pieces get is each checkpoint dialect's (:mod:`quantport.dialects`).

:mod:`.codec` holds the protocol and mixins, :mod:`.registry` the registry, which imports (and so
registers) every format's codecs on its first look-up (:func:`~.registry.discover_codecs`).
"""

from __future__ import annotations

from ..formats.pieces import Piece, QuantizedPieces
from .codec import DynamicActivations, FormatCapabilities, SchemeCodec, TensorSpec, WeightOnly
from .registry import CODECS, codec_for, quantizes_stacks, register

__all__ = [
    "CODECS",
    "DynamicActivations",
    "FormatCapabilities",
    "Piece",
    "QuantizedPieces",
    "SchemeCodec",
    "TensorSpec",
    "WeightOnly",
    "codec_for",
    "quantizes_stacks",
    "register",
]
