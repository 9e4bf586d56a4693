"""Scale units: the weights that share one scale, and clipping them to chosen bounds.

Every codec derives a scale from the max |w| (symmetric) or the min and max (asymmetric) of the weights
the scale covers, and rounds each weight with saturation. So clamping a unit's weights to ``ratio`` times
its bounds and handing the clamped weight to the codec *is* quantizing with the clipped scale: the codes
of the weights inside the bounds do not move and those outside saturate either way. Algorithms therefore
return a replacement weight, and the codec, the export and the simulation all read it unchanged.

A unit view is ``[units, elements]`` (fp32): a row's group of ``block_size`` inputs (group scales), a row
(channel scales), the whole matrix (a tensor scale), or a ``block x block`` tile (2-D block scales).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ...formats.descriptors import NumericFormat, ScaleGranularity

__all__ = ["ScaleUnits", "unit_bounds"]


@dataclass(frozen=True, slots=True)
class ScaleUnits:
    """How a ``[out, in]`` weight splits into scale units for one numeric format."""

    granularity: ScaleGranularity
    block: int | None

    @classmethod
    def of(cls, fmt: NumericFormat) -> ScaleUnits:
        return cls(fmt.granularity, fmt.block_size)

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether a ``[out, in]`` weight divides into whole units."""
        out_features, in_features = shape
        if self.granularity is ScaleGranularity.GROUP:
            return in_features % self.block == 0
        if self.granularity is ScaleGranularity.BLOCK_2D:
            return in_features % self.block == 0 and out_features % self.block == 0
        return True

    def split(self, weight: Tensor) -> Tensor:
        """``[out, in]`` -> ``[units, elements]`` (a copy in fp32)."""
        w = weight.float()
        out_features, in_features = w.shape
        if self.granularity is ScaleGranularity.GROUP:
            return w.reshape(-1, self.block)
        if self.granularity is ScaleGranularity.CHANNEL:
            return w.clone()
        if self.granularity is ScaleGranularity.TENSOR:
            return w.reshape(1, -1)
        b = self.block
        return w.reshape(out_features // b, b, in_features // b, b).permute(0, 2, 1, 3).reshape(-1, b * b)

    def merge(self, units: Tensor, shape: tuple[int, ...]) -> Tensor:
        """The inverse of :meth:`split`: ``[units, elements]`` -> ``[out, in]``."""
        out_features, in_features = shape
        if self.granularity is not ScaleGranularity.BLOCK_2D:
            return units.reshape(out_features, in_features)
        b = self.block
        return units.reshape(out_features // b, in_features // b, b, b).permute(0, 2, 1, 3).reshape(shape)


def unit_bounds(units: Tensor, symmetric: bool) -> tuple[Tensor, Tensor]:
    """``(lo, hi)`` per unit ``[units, 1]``: ``-/+max|w|`` when symmetric, else ``min(w, 0)`` and ``max(w, 0)``
    (the range compressed-tensors' asymmetric scales span)."""
    if symmetric:
        hi = units.abs().amax(dim=-1, keepdim=True)
        return -hi, hi
    lo = units.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = units.amax(dim=-1, keepdim=True).clamp(min=0)
    return lo, hi
