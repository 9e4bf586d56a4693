"""Running absolute-maximum statistics, kept on the tensor's device (no host synchronisation)."""

from __future__ import annotations

import torch

__all__ = ["update_amax"]


def update_amax(running: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """max(running, max|x|) as an fp32 0-d tensor; one pass over ``x`` and no temporary |x|."""
    lo, hi = torch.aminmax(x.detach())
    amax = torch.maximum(hi.float(), -lo.float())
    return amax if running is None else torch.maximum(running, amax)
