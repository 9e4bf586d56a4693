"""Running absolute-maximum statistics, kept on the tensor's device (no host synchronisation)."""

from __future__ import annotations

import torch

__all__ = ["SharedInputAmax", "update_amax"]


def update_amax(running: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """max(running, max|x|) as an fp32 0-d tensor; one pass over ``x`` and no temporary |x|."""
    lo, hi = torch.aminmax(x.detach())
    amax = torch.maximum(hi.float(), -lo.float())
    return amax if running is None else torch.maximum(running, amax)


class SharedInputAmax:
    """Per-run memo of the amax of the last Linear input: sibling projections share one pass over it.

    Sibling projections (q/k/v, gate/up) are called one after the other on the same input tensor; the
    memo keeps that tensor alive, so an identity check (plus its version counter, for in-place changes)
    is exact. One memo belongs to one calibration run of one model (``set_mode(model, CALIBRATE)``
    makes it and ``set_mode(model, OFF)`` drops it): nothing is shared between models or kept after
    the run.
    """

    def __init__(self) -> None:
        self._tensor: torch.Tensor | None = None
        self._version = -1
        self._amax: torch.Tensor | None = None

    def update(self, running: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """:func:`update_amax` for a Linear input, computing max|x| once per input tensor."""
        if x.is_inference():  # no version counter: nothing proves the tensor is unchanged
            return update_amax(running, x)
        if self._tensor is not x or self._version != x._version:
            self._tensor, self._version = x, x._version
            self._amax = update_amax(None, x)
        amax = self._amax
        assert amax is not None
        return amax if running is None else torch.maximum(running, amax)

    def clear(self) -> None:
        """Drop the reference to the last observed activation."""
        self._tensor, self._version, self._amax = None, -1, None
