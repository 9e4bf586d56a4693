"""What a scheme codec is: the :class:`SchemeCodec` protocol, the capability mixins and :class:`TensorSpec`.

A codec turns a Linear's weight and calibration statistics into neutral pieces
(:class:`~quantport.formats.pieces.QuantizedPieces`: codes, scale, global scale, zero point, shape),
turns pieces back into a dense weight, and fake-quantizes activations. Checkpoint names, shapes on disk
and ``quant_algo`` strings are the dialects' (:mod:`quantport.dialects`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from ..formats.descriptors import NumericFormat
from ..formats.pieces import Piece, QuantizedPieces
from ..recipes import LinearScheme

__all__ = ["DynamicActivations", "FormatCapabilities", "SchemeCodec", "TensorSpec", "WeightOnly"]


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """dtype and shape of one exported tensor, known before it is computed."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class SchemeCodec(Protocol):
    """What the pipeline needs to know about one Linear scheme: its numeric format and its numerics.

    Capabilities are typed fields of :attr:`format` (a :class:`~quantport.formats.descriptors.NumericFormat`);
    :class:`FormatCapabilities` exposes the ones the pipeline reads as properties.
    """

    scheme: LinearScheme
    format: NumericFormat

    @property
    def input_multiple(self) -> int:
        """``in_features`` must be a multiple of this (1: no constraint)."""
        ...

    @property
    def static_input_scale(self) -> bool:
        """Activations use a static, calibrated per-tensor scale (calibration forward needed)."""
        ...

    @property
    def shared_weight_amax(self) -> bool:
        """Members of a shared-input group (q/k/v, gate/up) share the per-tensor weight amax."""
        ...

    @property
    def group_size(self) -> int | None:
        """Block size along the input dimension (None: no group scales)."""
        ...

    def weight_specs(
        self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16
    ) -> dict[Piece, TensorSpec]:
        """The pieces of a quantized ``[out, in]`` weight (piece -> spec), without :attr:`Piece.INPUT_SCALE`.

        ``dtype`` is the weight's dtype, for schemes whose scales are stored in it (compressed-tensors
        integer schemes); the others ignore it.
        """
        ...

    def quantize_weight(self, weight: torch.Tensor, weight_amax: torch.Tensor) -> QuantizedPieces:
        """``weight`` [out, in] -> its pieces (codes, scale, global scale, zero point, shape).

        ``weight_amax`` is the fp32 0-d per-tensor amax (group-unified where the scheme shares it). With
        ``format.stacks``, also ``[E, out, in]`` with ``weight_amax [E]``, every piece with a leading ``E``.
        """
        ...

    def dequantize_weight(self, pieces: Mapping[Piece, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Pieces (a :class:`QuantizedPieces` or any mapping keyed by :class:`Piece`) -> dense ``[out, in]``
        weight in ``dtype``; :attr:`Piece.INPUT_SCALE` is ignored."""
        ...

    def input_scale(self, input_amax: torch.Tensor) -> torch.Tensor:
        """fp32 0-d ``input_scale`` from the calibrated activation amax (``format.needs_calibration`` only)."""
        ...

    def fake_quantize_input(self, x: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
        """Activations as the engine sees them after quantization (identity for weight-only)."""
        ...


class FormatCapabilities:
    """Mixin: the capabilities the pipeline reads, as properties of the codec's ``format`` descriptor."""

    format: NumericFormat

    @property
    def input_multiple(self) -> int:
        return self.format.input_multiple

    @property
    def static_input_scale(self) -> bool:
        return self.format.needs_calibration

    @property
    def shared_weight_amax(self) -> bool:
        return self.format.shared_weight_amax

    @property
    def group_size(self) -> int | None:
        return self.format.group_size


class DynamicActivations(FormatCapabilities):
    """Mixin for codecs whose activations have no calibrated scale (dynamic or none)."""

    def input_scale(self, input_amax: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{self.format.name} has no static input scale; read format.needs_calibration first")


class WeightOnly(DynamicActivations):
    """Mixin for weight-only codecs: activations pass through unquantized."""

    def fake_quantize_input(self, x: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
        return x
