"""SmoothQuant (Xiao et al., 2022): activation outliers migrated into the weights.

For one shared input and its readers, every input channel ``j`` gets ``s_j = max|x_j|^alpha / max|w_j|^(1-alpha)``
(``max|w_j|`` over all the readers' rows), folded like AWQ's scales: activations are divided by ``s`` (their
outlier channels shrink), weight columns multiplied. ``alpha`` is the migration strength (0.5 balances the
two ranges). Channels that never fired, or whose weights are all zero, keep scale 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["smoothquant_scale"]

_FLOOR = 1e-5


def smoothquant_scale(
    input_max: Tensor,
    weights: list[Tensor],
    alpha: float,
    reduce: Callable[[Tensor], Tensor] = lambda t: t,
) -> Tensor:
    """fp32 scale per entry of ``input_max`` (the max |x| per entry, ``reduce``d already).

    ``weights`` are the readers' ``[out, in]`` weights; ``reduce`` maps a per-column max ``[in]`` to the
    scale's entries (o_proj: max over the query heads of a kv head).
    """
    weight_max = reduce(torch.stack([w.float().abs().amax(dim=0) for w in weights]).amax(dim=0))
    x, w = input_max.float(), weight_max
    valid = (x > _FLOOR) & (w > _FLOOR)
    scale = x.clamp(min=_FLOOR).pow(alpha) / w.clamp(min=_FLOOR).pow(1 - alpha)
    return torch.where(valid, scale.clamp(min=_FLOOR), torch.ones_like(scale))
