"""MSE weight-scale search: per scale unit, the clipping ratio of its bounds that minimises ``||Q(w) - w||^2``.

Each candidate ratio clamps every unit of the weight to ``ratio * (lo, hi)`` and runs the format's own
codec (its :mod:`quantport.formats` functions) on the clamped weight; each unit keeps the ratio with the
smallest squared error against the original weight (ties keep the larger ratio, so ``max`` is never
beaten by a worse choice). Units are independent for group, channel and 2-D block scales; a tensor scale
is searched once for a whole fused group (its members share the weight amax) and the chosen amax is set
on every member.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from ...algorithm_options import Algorithm, MseOptions
from ...formats.descriptors import ScaleGranularity
from ...schemes import SchemeCodec
from .registry import AlgorithmContext, register, replace_weight
from .units import ScaleUnits, unit_bounds

__all__ = ["MseStep", "mse_clipped_weight", "mse_tensor_amax"]

logger = logging.getLogger(__name__)


def _reconstruction(codec: SchemeCodec, weight: Tensor, weight_amax: Tensor) -> Tensor:
    """fp32 ``dequantize(quantize(weight))`` as the simulation computes it (in the weight's dtype)."""
    return codec.dequantize_weight(codec.quantize_weight(weight, weight_amax), weight.dtype).float()


def mse_clipped_weight(
    codec: SchemeCodec, weight: Tensor, weight_amax: Tensor, options: MseOptions
) -> tuple[Tensor, Tensor]:
    """The weight clamped per unit to the error-minimising ratio of its bounds, and the ratios chosen.

    Args:
        codec: the scheme's codec (group, channel or 2-D block scales).
        weight: ``[out, in]`` in the model dtype.
        weight_amax: fp32 0-d per-tensor amax handed to the codec (NVFP4's global scale), unchanged here.
        options: the ratio grid.

    Returns:
        ``(clipped, ratios)``: ``clipped`` ``[out, in]`` in ``weight.dtype``, which the codec quantizes with
        the chosen scales; ``ratios`` fp32 ``[units]``.
    """
    units = ScaleUnits.of(codec.format)
    shape = tuple(weight.shape)
    original = units.split(weight)
    lo, hi = unit_bounds(original, codec.format.symmetric)
    best_error = torch.full((original.shape[0],), float("inf"))
    best_ratio = torch.ones(original.shape[0])
    for ratio in options.ratios():
        clipped = units.merge(torch.clamp(original, lo * ratio, hi * ratio), shape).to(weight.dtype)
        error = (units.split(_reconstruction(codec, clipped, weight_amax)) - original).square().sum(dim=-1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_ratio = torch.where(better, torch.tensor(ratio), best_ratio)
    r = best_ratio.unsqueeze(-1)
    return units.merge(torch.clamp(original, lo * r, hi * r), shape).to(weight.dtype), best_ratio


def mse_tensor_amax(
    codec: SchemeCodec, weights: Sequence[Tensor], weight_amax: Tensor, options: MseOptions
) -> tuple[list[Tensor], Tensor]:
    """One per-tensor amax for ``weights`` (a fused group sharing it) minimising their summed error.

    Returns the weights clamped to the chosen amax (in their dtype) and that amax (fp32 0-d): the largest
    |w| left after clamping, so every weight is in range of the scale it gives.
    """
    if codec.format.granularity is not ScaleGranularity.TENSOR:
        raise ValueError(f"{codec.format.name} has no per-tensor weight scale")
    best: tuple[float, list[Tensor], Tensor] | None = None
    for ratio in options.ratios():
        bound = float(weight_amax) * ratio
        clipped = [w.float().clamp(-bound, bound).to(w.dtype) for w in weights]
        amax = torch.stack([c.abs().amax().float() for c in clipped]).amax()
        pairs = zip(clipped, weights, strict=True)
        error = sum(float((_reconstruction(codec, c, amax) - w.float()).square().sum()) for c, w in pairs)
        if best is None or error < best[0]:
            best = (error, clipped, amax)
    assert best is not None
    return best[1], best[2]


@register(Algorithm.MSE)
class MseStep:
    """``mse`` on every quantized Linear: clipped weights (unit scales) or a clipped tensor amax (per group)."""

    needs_forward = False

    def __init__(self, context: AlgorithmContext) -> None:
        self.context = context

    def stop_observing(self) -> None:
        pass

    def apply(self) -> None:
        context = self.context
        codec, options = context.codec, context.options
        assert isinstance(options, MseOptions)
        if codec.format.granularity is ScaleGranularity.TENSOR:
            self._apply_tensor_scales()
            return
        units = ScaleUnits.of(codec.format)
        for name, module in context.quantized_layers().items():
            if not units.fits(tuple(module.weight.shape)):
                shape = tuple(module.weight.shape)
                context.left_at_rtn[name] = f"shape {shape} is not whole {codec.format.name} blocks"
                continue
            clipped, ratios = mse_clipped_weight(codec, module.weight.detach(), module.weight_amax(), options)
            replace_weight(module, clipped)
            logger.debug("%s: mean clipping ratio %.3f", name, float(ratios.mean()))

    def _apply_tensor_scales(self) -> None:
        context = self.context
        layers = context.quantized_layers()
        groups = [[m for m in g if m in layers] for g in context.groups]
        grouped = {m for g in groups for m in g}
        sets = [g for g in groups if g] + [[n] for n in layers if n not in grouped]
        for names in sets:
            modules = [layers[n] for n in names]
            weights = [m.weight.detach() for m in modules]
            amax = torch.stack([m.weight_amax() for m in modules]).amax()
            clipped, chosen = mse_tensor_amax(context.codec, weights, amax, context.options)
            for module, weight in zip(modules, clipped, strict=True):
                replace_weight(module, weight)
                module.shared_weight_amax = chosen
