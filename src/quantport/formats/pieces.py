"""The neutral pieces of a quantized weight: what a codec returns and decodes, with no dialect names.

A codec (:mod:`quantport.schemes`) quantizes a weight into a few tensors with typed roles
(:class:`Piece`): the stored codes, the scale, a second-level global scale, a zero point, the original
shape, and the activation scale. Each checkpoint dialect (:mod:`quantport.dialects`) names these pieces
(ModelOpt's ``weight_scale_2`` and compressed-tensors' ``weight_global_scale`` are both
:attr:`Piece.GLOBAL_SCALE`) and, where its layout differs, reshapes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from enum import StrEnum

from torch import Tensor

__all__ = ["Piece", "QuantizedPieces"]


class Piece(StrEnum):
    """The role of one tensor of a quantized weight."""

    CODES = "codes"
    """The quantized elements, in the codec's packing (one per byte, or several per byte or int32 word)."""
    SCALE = "scale"
    """The (per-tensor, per-channel, per-group or per-block) scale that multiplies or divides the codes."""
    GLOBAL_SCALE = "global_scale"
    """A per-tensor second-level scale applied to every :attr:`SCALE` (NVFP4), in the codec's convention."""
    ZERO_POINT = "zero_point"
    """The integer zero point of asymmetric formats, in the codec's packing."""
    SHAPE = "shape"
    """int64 ``[out, in]`` of the unpacked weight, where the codes' shape does not tell it."""
    INPUT_SCALE = "input_scale"
    """The static activation scale (or activation global scale), fp32, when the format calibrates inputs."""


@dataclass(frozen=True, slots=True, eq=False)
class QuantizedPieces(Mapping[Piece, Tensor]):
    """One quantized weight as typed pieces; a read-only mapping ``Piece -> Tensor`` of the pieces present.

    Every field except :attr:`codes` and :attr:`scale` is optional (None: the format has no such piece).
    """

    codes: Tensor
    scale: Tensor
    global_scale: Tensor | None = None
    zero_point: Tensor | None = None
    shape: Tensor | None = None
    input_scale: Tensor | None = None

    def __getitem__(self, piece: Piece | str) -> Tensor:
        value = getattr(self, Piece(piece).value)
        if value is None:
            raise KeyError(piece)
        return value

    def __iter__(self) -> Iterator[Piece]:
        return (Piece(f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    @classmethod
    def of(cls, pieces: Mapping[Piece, Tensor]) -> QuantizedPieces:
        """The pieces of a mapping keyed by :class:`Piece` (e.g. one expert's slice of a stack)."""
        if isinstance(pieces, QuantizedPieces):
            return pieces
        return cls(**{Piece(piece).value: tensor for piece, tensor in pieces.items()})

    def map(self, fn: Callable[[Tensor], Tensor]) -> QuantizedPieces:
        """``fn`` applied to every piece present (e.g. a device move, or one slice of a stack)."""
        return QuantizedPieces(**{piece.value: fn(tensor) for piece, tensor in self.items()})

    def with_input_scale(self, input_scale: Tensor | None) -> QuantizedPieces:
        """A copy with :attr:`input_scale` set."""
        return QuantizedPieces(**{**{p.value: t for p, t in self.items()}, "input_scale": input_scale})
